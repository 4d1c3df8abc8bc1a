#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! NBD connections on their own dedicated I/O threads
//! (`volmig_api::io::threads`): past the server's bound on threads,
//! connections fall back to the shared runtime, and every connection is
//! served either way.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use volmig_api::io::threads::may_block;
use volmig_api::io::{Extent, VolumeIo};
use volmig_frontends::nbd::{Export, NbdClient, NbdServer};

/// Remembers, per write offset, whether the write ran where it may block.
struct Probe {
    size: u64,
    data: Mutex<Vec<u8>>,
    seen: Mutex<Vec<(u64, bool)>>,
}

impl VolumeIo for Probe {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        let n = buf.len();
        buf.copy_from_slice(&d[o..o + n]);
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: Vec<u8>, _fua: bool) -> io::Result<Vec<u8>> {
        self.seen.lock().unwrap().push((offset, may_block()));
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(&buf);
        Ok(buf)
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }

    async fn write_zeroes(&self, _offset: u64, _length: u64, _may_trim: bool) -> io::Result<()> {
        Ok(())
    }

    async fn block_status(&self, _offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

/// With room for two connection threads, four open connections: two run on
/// threads (their backend calls may block), two on the shared runtime
/// (they may not), and all four are served correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_thread_bound_run_on_the_shared_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let probe = Arc::new(Probe {
        size: 1 << 20,
        data: Mutex::new(vec![0; 1 << 20]),
        seen: Mutex::new(Vec::new()),
    });
    let server = NbdServer::new();
    server.set_connection_threads(2);
    server.add_export(Export::new("p", probe.clone())).unwrap();
    let handle = server.serve_unix(&sock).await.unwrap();

    let mut clients = Vec::new();
    for i in 0..4u64 {
        let mut c = NbdClient::connect_unix(&sock, "p").await.unwrap();
        let data = vec![i as u8 + 1; 4096];
        c.write(i * 4096, &data, false).await.unwrap();
        assert_eq!(c.read(i * 4096, 4096).await.unwrap(), data);
        clients.push(c);
    }
    let mut seen = probe.seen.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(
        seen,
        vec![(0, true), (4096, true), (8192, false), (12288, false)],
        "the first two connections get threads, the others the shared runtime"
    );
    for c in clients {
        c.disconnect().await.unwrap();
    }
    // Threads are returned: a new connection gets one again.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut c = NbdClient::connect_unix(&sock, "p").await.unwrap();
            c.write(16384, &[9; 512], false).await.unwrap();
            c.disconnect().await.unwrap();
            let last = *probe.seen.lock().unwrap().last().unwrap();
            if last == (16384, true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connection threads were not returned");
    handle.shutdown().await.unwrap();
}
