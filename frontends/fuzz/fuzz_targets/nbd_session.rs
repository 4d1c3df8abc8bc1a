#![no_main]
//! A whole server session fed arbitrary client bytes (handshake and
//! transmission). The server may answer errors or hang up, but must never
//! panic, and must never let a request reach the backend outside the
//! export's bounds.

use std::io;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use volmig_api::io::{Extent, VolumeIo};
use volmig_frontends::nbd::{Export, NbdServer};

const SIZE: u64 = 1 << 20;

struct Mem(Mutex<Vec<u8>>);

fn check(offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= SIZE => Ok(()),
        _ => panic!("request beyond the export reached the backend: {offset}+{len}"),
    }
}

impl VolumeIo for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        check(offset, buf.len() as u64)?;
        let m = self.0.lock().unwrap();
        let n = buf.len();
        buf.copy_from_slice(&m[offset as usize..offset as usize + n]);
        Ok(buf)
    }
    async fn write(&self, offset: u64, buf: Vec<u8>, _fua: bool) -> io::Result<Vec<u8>> {
        check(offset, buf.len() as u64)?;
        self.0.lock().unwrap()[offset as usize..offset as usize + buf.len()].copy_from_slice(&buf);
        Ok(buf)
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        check(offset, length)
    }
    async fn write_zeroes(&self, offset: u64, length: u64, _may_trim: bool) -> io::Result<()> {
        check(offset, length)
    }
    async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        check(offset, length)?;
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let server: NbdServer<Mem> = NbdServer::new();
        server
            .add_export(Export::new(
                "f",
                std::sync::Arc::new(Mem(Mutex::new(vec![0; SIZE as usize]))),
            ))
            .unwrap();
        let (mut client, srv) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { server.serve_connection(srv, "fuzz").await });
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut sink = vec![0u8; 1 << 16];
        // drain replies until the server hangs up (bounded in time)
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while let Ok(n) = client.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    });
});
