//! `blockserve KIND FILE RECORD`: serves FILE as a kernel block device of
//! KIND (`nbd` or `ublk`) through volmig's block drivers, the way the agent
//! does, for the kind e2e steps (e2e/block.sh) on hosts that have the
//! modules.
//!
//! - RECORD missing: attaches a new device and writes its record there.
//! - RECORD present: re-attaches the device it names (the previous
//!   blockserve was SIGKILLed; the device waited with the workload's I/O).
//! - SIGTERM or SIGINT: detaches the device (EBUSY while mounted: then it
//!   keeps serving) and removes RECORD. SIGKILL leaves the device for the
//!   next blockserve.
//!
//! Prints `device <path>` once the device is served.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: failing loudly is the point

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use volmig_api::io::{Extent, VolumeIo};
use volmig_frontends::block::nbd_netlink::{NbdNetlinkDriver, NbdParams};
use volmig_frontends::block::ublk::{UblkDriver, UblkParams};
use volmig_frontends::block::{BlockDriver, BlockErrorKind, BlockKind, DeviceRecord};

/// A file as a volume (blocking I/O on the blocking pool).
struct FileVolume {
    file: Arc<File>,
    size: u64,
}

impl FileVolume {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(io::Error::other)?
    }

    async fn zero(&self, offset: u64, length: u64) -> io::Result<()> {
        self.blocking(move |f| {
            let zeroes = vec![0u8; 1 << 20];
            let mut at = offset;
            while at < offset + length {
                let n = (offset + length - at).min(zeroes.len() as u64) as usize;
                f.write_all_at(&zeroes[..n], at)?;
                at += n as u64;
            }
            Ok(())
        })
        .await
    }
}

impl VolumeIo for FileVolume {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        self.blocking(move |f| {
            f.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, buf: Vec<u8>, fua: bool) -> io::Result<Vec<u8>> {
        self.blocking(move |f| {
            f.write_all_at(&buf, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(buf)
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.blocking(|f| f.sync_data()).await
    }

    async fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero(offset, length).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, _may_trim: bool) -> io::Result<()> {
        self.zero(offset, length).await
    }

    async fn block_status(&self, _offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

async fn serve<D: BlockDriver<FileVolume>>(
    driver: D,
    volume: Arc<FileVolume>,
    record_path: PathBuf,
) {
    let attached = match std::fs::read(&record_path) {
        Ok(bytes) => {
            let record: DeviceRecord = serde_json::from_slice(&bytes).unwrap();
            driver
                .reattach(&record, volume)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let a = driver
                .attach("e2e", volume)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let tmp = record_path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&a.record).unwrap()).unwrap();
            std::fs::rename(&tmp, &record_path).unwrap();
            a
        }
        Err(e) => panic!("{}: {e}", record_path.display()),
    };
    println!("device {}", attached.path.display());
    let mut term = signal(SignalKind::terminate()).unwrap();
    let mut int = signal(SignalKind::interrupt()).unwrap();
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        match driver.detach("e2e").await {
            Ok(()) => break,
            Err(e) if e.kind() == BlockErrorKind::Busy => {
                eprintln!("blockserve: {e}; still serving");
            }
            Err(e) => panic!("{e}"),
        }
    }
    std::fs::remove_file(&record_path).unwrap();
    println!("detached");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, kind, file, record] = &args[..] else {
        eprintln!("usage: blockserve nbd|ublk FILE RECORD");
        std::process::exit(2);
    };
    let kind: BlockKind = kind.parse().unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let size = f.metadata().unwrap().len();
    let volume = Arc::new(FileVolume {
        file: Arc::new(f),
        size,
    });
    let record = PathBuf::from(record);
    match kind {
        BlockKind::Nbd => {
            serve(
                NbdNetlinkDriver::new(NbdParams::default()).unwrap(),
                volume,
                record,
            )
            .await
        }
        BlockKind::Ublk => {
            serve(
                UblkDriver::new(UblkParams::default()).unwrap(),
                volume,
                record,
            )
            .await
        }
        BlockKind::FuseLoop => {
            panic!("blockserve serves nbd and ublk; FUSE + loop runs in the agent's tests")
        }
    }
}
