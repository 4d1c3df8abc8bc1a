#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Block devices as backing devices: loop devices over files, so the
//! `BLKGETSIZE64`, `BLKZEROOUT` and `BLKDISCARD` paths run for real. Needs
//! root and `losetup` (Debian package `mount`); fails, never skips, without.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::master::Master;

use volmig_agent::agent::Agent;
use volmig_agent::session::{Phase, SessionConfig};
use volmig_agent::volume::{BackingDevice, DeviceKind, OpenMode};
use volmig_api::io::VolumeIo;

struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("losetup not found: install the Debian package `mount` (and run as root)");
        assert!(
            out.status.success(),
            "losetup failed (this test needs root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn file(dir: &Path, name: &str, size: u64, fill: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![fill; size as usize]).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_between_loop_devices_under_writes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32u64 << 20;
    let src = Loop::attach(&file(dir.path(), "a", size, 0x33));
    let tgt = Loop::attach(&file(dir.path(), "b", size, 0x77));

    let dev = BackingDevice::open(&src.0, OpenMode::ReadWrite, false).unwrap();
    assert_eq!(dev.kind(), DeviceKind::Block);
    assert_eq!(dev.size(), size, "BLKGETSIZE64");
    // BLKZEROOUT / BLKDISCARD: both leave zeroes
    dev.write_zeroes(4096, 8192, false).unwrap();
    dev.trim(1 << 20, 1 << 20).unwrap();
    let mut b = vec![1u8; 8192];
    dev.read_at(&mut b, 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let mut b = vec![1u8; 1 << 20];
    dev.read_at(&mut b, 1 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(dev);

    let agent = Agent::new(&dir.path().join("state")).unwrap();
    let vol = agent.add_volume("blk", &src.0, false).await.unwrap();
    let mut expect = std::fs::read(&src.0).unwrap();
    let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let w = {
        let vol = vol.clone();
        let writes = writes.clone();
        tokio::spawn(async move {
            for i in 0..400u64 {
                let off = (i * 7919 * 4096) % (size - 8192);
                vol.write(off, vec![i as u8; 8192], false).await.unwrap();
                writes.lock().unwrap().push((off, i as u8));
                tokio::task::yield_now().await;
            }
        })
    };
    let cfg = SessionConfig {
        bandwidth: 64 << 20,
        ..SessionConfig::default()
    };
    let master = Master::new(agent.clone(), &dir.path().join("master"));
    master.migrate("blk", &tgt.0, cfg).await.unwrap();
    let st = master.wait("blk").await.unwrap();
    w.await.unwrap();
    assert_eq!(st.phase, Phase::Completed, "{:?}", st.error);
    assert_eq!(st.verified, Some(true));
    for (off, v) in writes.lock().unwrap().iter() {
        expect[*off as usize..*off as usize + 8192].fill(*v);
    }
    let got = std::fs::read(&tgt.0).unwrap();
    assert!(got == expect, "the target device holds every write");
    assert_eq!(vol.active().path(), tgt.0.as_path());
}
