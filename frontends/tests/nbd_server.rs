//! Integration tests of the NBD server: our own client, real NBD clients
//! (qemu-io, qemu-img, nbdinfo, nbdcopy) over unix sockets and TCP, and
//! malformed input over raw sockets.
//!
//! The external tools are required: a missing binary fails the test with the
//! name of the Debian package to install.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use volmig_api::io::{Extent, VolumeIo};
use volmig_frontends::nbd::proto::{self, OptionHeader, OptionReplyHeader, Request};
use volmig_frontends::nbd::{ClientOptions, Export, NbdClient, NbdError, NbdServer, ServerHandle};
use volmig_testkit::pattern::pattern;
use volmig_testkit::require_bin;
use volmig_testkit::tools::{qemu_img_compare, run_async, run_ok_async};

const MIB: usize = 1024 * 1024;
const DISK_SIZE: u64 = 64 * MIB as u64;
const RO_SIZE: u64 = MIB as u64;
const BLK: u64 = 4096;

// ---------------------------------------------------------------------------
// In-memory backend
// ---------------------------------------------------------------------------

struct State {
    data: Vec<u8>,
    /// Allocation per 4 KiB block (for base:allocation).
    alloc: Vec<bool>,
    flushes: u64,
    fua_writes: u64,
    /// Errno to fail the next write with.
    fail_next_write: Option<i32>,
}

struct MemBackend {
    size: u64,
    st: Mutex<State>,
    /// Panic in the next read (outside the lock).
    panic_next_read: AtomicBool,
}

impl MemBackend {
    fn new(size: u64) -> Arc<Self> {
        Arc::new(MemBackend {
            size,
            st: Mutex::new(State {
                data: vec![0; size as usize],
                alloc: vec![false; size.div_ceil(BLK) as usize],
                flushes: 0,
                fua_writes: 0,
                fail_next_write: None,
            }),
            panic_next_read: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap()
    }

    fn snapshot(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        self.lock().data[offset as usize..offset as usize + len].to_vec()
    }

    /// Write directly (bypassing NBD), marking blocks allocated.
    fn poke(&self, offset: u64, data: &[u8]) {
        let mut st = self.lock();
        st.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Self::mark(&mut st, offset, data.len() as u64, true);
    }

    fn mark(st: &mut State, offset: u64, len: u64, allocated: bool) {
        if len == 0 {
            return;
        }
        if allocated {
            for b in offset / BLK..(offset + len).div_ceil(BLK) {
                st.alloc[b as usize] = true;
            }
        } else {
            // Only blocks entirely inside the range become holes.
            for b in offset.div_ceil(BLK)..(offset + len) / BLK {
                st.alloc[b as usize] = false;
            }
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        // The frontend promises to check; make violations visible.
        assert!(
            offset + len <= self.size,
            "frontend passed an out-of-range request"
        );
        Ok(())
    }
}

impl VolumeIo for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        self.check(offset, buf.len() as u64)?;
        if self.panic_next_read.swap(false, Ordering::SeqCst) {
            panic!("injected backend panic");
        }
        let st = self.lock();
        let o = offset as usize;
        let n = buf.len();
        buf.copy_from_slice(&st.data[o..o + n]);
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: Vec<u8>, fua: bool) -> io::Result<Vec<u8>> {
        self.check(offset, buf.len() as u64)?;
        let mut st = self.lock();
        if let Some(code) = st.fail_next_write.take() {
            return Err(io::Error::from_raw_os_error(code));
        }
        let o = offset as usize;
        st.data[o..o + buf.len()].copy_from_slice(&buf);
        Self::mark(&mut st, offset, buf.len() as u64, true);
        if fua {
            st.fua_writes += 1;
        }
        Ok(buf)
    }

    async fn flush(&self) -> io::Result<()> {
        self.lock().flushes += 1;
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check(offset, length)?;
        let mut st = self.lock();
        st.data[offset as usize..(offset + length) as usize].fill(0);
        Self::mark(&mut st, offset, length, false);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool) -> io::Result<()> {
        self.check(offset, length)?;
        let mut st = self.lock();
        st.data[offset as usize..(offset + length) as usize].fill(0);
        Self::mark(&mut st, offset, length, !may_trim);
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.check(offset, length)?;
        let st = self.lock();
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let blk = pos / BLK;
            let blk_end = ((blk + 1) * BLK).min(end);
            let allocated = st.alloc[blk as usize];
            let len = blk_end - pos;
            match out.last_mut() {
                Some(last) if last.hole != allocated => last.length += len,
                _ => out.push(Extent {
                    length: len,
                    hole: !allocated,
                    zero: !allocated,
                }),
            }
            pos = blk_end;
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

struct Fixture {
    server: NbdServer<MemBackend>,
    disk: Arc<MemBackend>,
    ro: Arc<MemBackend>,
    unix: ServerHandle,
    tcp: ServerHandle,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let disk = MemBackend::new(DISK_SIZE);
        let ro = MemBackend::new(RO_SIZE);
        let server = NbdServer::new();
        server
            .add_export(Export::new("disk", disk.clone()).with_description("test disk"))
            .unwrap();
        server
            .add_export(Export::new("ro", ro.clone()).with_read_only(true))
            .unwrap();
        let unix = server.serve_unix(&sock).await.unwrap();
        let tcp = server.serve_tcp("127.0.0.1:0").await.unwrap();
        Fixture {
            server,
            disk,
            ro,
            unix,
            tcp,
            sock,
            dir,
        }
    }

    fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn tcp_uri(&self, export: &str) -> String {
        let a = self.tcp.tcp_addr().unwrap();
        format!("nbd://{}:{}/{export}", a.ip(), a.port())
    }

    async fn client(&self, export: &str) -> NbdClient {
        NbdClient::connect_unix(&self.sock, export).await.unwrap()
    }

    /// The server still serves new clients: connect, write, read back.
    async fn assert_still_serving(&self) {
        let mut c = self.client("disk").await;
        let pattern = vec![0x5a; 4096];
        let off = DISK_SIZE - 4096;
        c.write(off, &pattern, false).await.unwrap();
        assert_eq!(c.read(off, 4096).await.unwrap(), pattern);
        c.disconnect().await.unwrap();
    }
}

async fn timed<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("test timed out")
}

// ---------------------------------------------------------------------------
// (a) Our client
// ---------------------------------------------------------------------------

async fn client_roundtrip(f: &Fixture, opts: &ClientOptions, tcp: bool) {
    let mut c = if tcp {
        NbdClient::connect_tcp_with(f.tcp.tcp_addr().unwrap(), "disk", opts)
            .await
            .unwrap()
    } else {
        NbdClient::connect_unix_with(&f.sock, "disk", opts)
            .await
            .unwrap()
    };
    assert_eq!(c.size(), DISK_SIZE);
    assert!(!c.is_read_only());
    assert!(c.can_multi_conn());
    assert_eq!(c.structured_replies(), opts.structured_replies);
    assert_eq!(c.info().max_block, proto::MAX_BLOCK_SIZE);
    assert_eq!(c.info().description.as_deref(), Some("test disk"));

    // Unaligned write and read, crossing block boundaries.
    let data = pattern(0, 3 * MIB + 123, 7);
    c.write(12345, &data, false).await.unwrap();
    assert_eq!(c.read(12345, data.len()).await.unwrap(), data);
    assert_eq!(f.disk.bytes(12345, data.len()), data);

    // A read larger than the 32 MiB maximum is split by the client.
    let big = c.read(0, 40 * MIB).await.unwrap();
    assert_eq!(&big[12345..12345 + data.len()], &data[..]);

    // FUA and flush reach the backend.
    let fua_before = f.disk.lock().fua_writes;
    c.write(0, &[1, 2, 3], true).await.unwrap();
    assert_eq!(f.disk.lock().fua_writes, fua_before + 1);
    let flushes = f.disk.lock().flushes;
    c.flush().await.unwrap();
    assert_eq!(f.disk.lock().flushes, flushes + 1);

    // Trim and write zeroes read back as zeroes.
    c.trim(12345, 4096).await.unwrap();
    assert!(c.read(12345, 4096).await.unwrap().iter().all(|&b| b == 0));
    c.write_zeroes(2 * MIB as u64, MIB as u64, true)
        .await
        .unwrap();
    assert!(
        c.read(2 * MIB as u64, MIB)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(f.disk.bytes(2 * MIB as u64, MIB), vec![0; MIB]);

    if opts.structured_replies && opts.base_allocation {
        assert!(c.has_base_allocation());
        // Fresh region: allocate [32M, 32M+8K), leave the rest a hole.
        let base = 32 * MIB as u64;
        c.write(base, &[9u8; 8192], false).await.unwrap();
        let ext = c.block_status(base, 65536, false).await.unwrap();
        assert_eq!(ext[0].length, 8192);
        assert_eq!(ext[0].flags, 0);
        assert_eq!(ext[1].flags, proto::STATE_HOLE | proto::STATE_ZERO);
        let total: u64 = ext.iter().map(|e| u64::from(e.length)).sum();
        assert_eq!(total, 65536);
        let one = c.block_status(base, 65536, true).await.unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].length, 8192);
        // Write zeroes allowing holes deallocates.
        c.write_zeroes(base, 8192, false).await.unwrap();
        let ext = c.block_status(base, 8192, false).await.unwrap();
        assert_eq!(ext[0].flags, proto::STATE_HOLE | proto::STATE_ZERO);
    } else {
        assert!(!c.has_base_allocation());
        assert!(c.block_status(0, 4096, false).await.is_err());
    }
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_roundtrip_structured_unix() {
    timed(async {
        let f = Fixture::start().await;
        client_roundtrip(&f, &ClientOptions::default(), false).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_roundtrip_simple_replies_unix() {
    timed(async {
        let f = Fixture::start().await;
        let opts = ClientOptions {
            structured_replies: false,
            base_allocation: false,
        };
        client_roundtrip(&f, &opts, false).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_roundtrip_tcp() {
    timed(async {
        let f = Fixture::start().await;
        client_roundtrip(&f, &ClientOptions::default(), true).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_errors_keep_connection_usable() {
    timed(async {
        let f = Fixture::start().await;
        for opts in [
            ClientOptions::default(),
            ClientOptions {
                structured_replies: false,
                base_allocation: false,
            },
        ] {
            let mut c = NbdClient::connect_unix_with(&f.sock, "disk", &opts)
                .await
                .unwrap();
            let before = f.disk.snapshot();

            // Read past the end: EINVAL.
            let e = c.read(DISK_SIZE - 512, 4096).await.unwrap_err();
            assert_eq!(e.errno(), Some(proto::EINVAL), "{e}");
            // Write past the end: ENOSPC (spec), nothing written.
            let e = c
                .write(DISK_SIZE - 512, &[0xee; 4096], false)
                .await
                .unwrap_err();
            assert_eq!(e.errno(), Some(proto::ENOSPC), "{e}");
            // Offset + length overflowing u64.
            let e = c.read(u64::MAX - 10, 512).await.unwrap_err();
            assert_eq!(e.errno(), Some(proto::EINVAL), "{e}");
            let e = c.write(u64::MAX - 10, &[1; 512], false).await.unwrap_err();
            assert_eq!(e.errno(), Some(proto::ENOSPC), "{e}");
            let e = c.trim(DISK_SIZE, 4096).await.unwrap_err();
            assert_eq!(e.errno(), Some(proto::EINVAL), "{e}");
            let e = c.write_zeroes(DISK_SIZE - 1, 2, false).await.unwrap_err();
            assert_eq!(e.errno(), Some(proto::ENOSPC), "{e}");
            assert!(
                f.disk.snapshot() == before,
                "data changed by rejected requests"
            );

            // Backend errors are mapped and the connection survives.
            f.disk.lock().fail_next_write = Some(libc::ENOSPC);
            let e = c.write(0, &[1; 512], false).await.unwrap_err();
            assert_eq!(e.errno(), Some(proto::ENOSPC), "{e}");
            f.disk.lock().fail_next_write = Some(libc::EROFS);
            let e = c.write(0, &[1; 512], false).await.unwrap_err();
            assert_eq!(e.errno(), Some(proto::EPERM), "{e}");
            f.disk.lock().fail_next_write = Some(libc::EBADF);
            let e = c.write(0, &[1; 512], false).await.unwrap_err();
            assert_eq!(e.errno(), Some(proto::EIO), "{e}");

            // A panicking backend yields EIO, not a hung request.
            f.disk.panic_next_read.store(true, Ordering::SeqCst);
            let e = c.read(0, 512).await.unwrap_err();
            assert_eq!(e.errno(), Some(proto::EIO), "{e}");

            c.write(4096, &[3; 4096], false).await.unwrap();
            assert_eq!(c.read(4096, 4096).await.unwrap(), vec![3; 4096]);
            c.disconnect().await.unwrap();
        }

        // Read-only export: writes, trims and zeroing are EPERM.
        let mut c = f.client("ro").await;
        assert!(c.is_read_only());
        let e = c.write(0, &[1; 4096], false).await.unwrap_err();
        assert_eq!(e.errno(), Some(proto::EPERM), "{e}");
        let e = c.trim(0, 4096).await.unwrap_err();
        assert_eq!(e.errno(), Some(proto::EPERM), "{e}");
        let e = c.write_zeroes(0, 4096, false).await.unwrap_err();
        assert_eq!(e.errno(), Some(proto::EPERM), "{e}");
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
        assert!(f.ro.snapshot().iter().all(|&b| b == 0));
        c.disconnect().await.unwrap();

        // Unknown export.
        let e = NbdClient::connect_unix(&f.sock, "nope").await.unwrap_err();
        assert!(
            matches!(e, NbdError::OptionRejected { reply, .. } if reply == proto::REP_ERR_UNKNOWN),
            "{e}"
        );
        // Empty name = default export (the first one).
        let c = f.client("").await;
        assert_eq!(c.size(), DISK_SIZE);
        c.disconnect().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_conn_concurrent_writers() {
    timed(async {
        let f = Fixture::start().await;
        let before = f.server.total_connections();
        const CLIENTS: u64 = 4;
        const BLOCKS: u64 = 64;
        const BS: usize = 64 * 1024;
        let mut tasks = Vec::new();
        for i in 0..CLIENTS {
            let sock = f.sock.clone();
            let tcp = f.tcp.tcp_addr().unwrap();
            tasks.push(tokio::spawn(async move {
                // Half over unix, half over TCP.
                let mut c = if i % 2 == 0 {
                    NbdClient::connect_unix(&sock, "disk").await.unwrap()
                } else {
                    NbdClient::connect_tcp(tcp, "disk").await.unwrap()
                };
                // Interleaved blocks: client i owns blocks i, i+CLIENTS, ...
                for b in 0..BLOCKS {
                    let blk = b * CLIENTS + i;
                    let data = vec![(i as u8) + 1; BS];
                    c.write(blk * BS as u64, &data, b % 8 == 0).await.unwrap();
                }
                c.flush().await.unwrap();
                c
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.unwrap());
        }
        assert_eq!(f.server.active_connections(), CLIENTS as usize);
        // Every client sees every other client's flushed writes.
        for c in &mut clients {
            let all = c.read(0, (CLIENTS * BLOCKS) as usize * BS).await.unwrap();
            for blk in 0..(CLIENTS * BLOCKS) as usize {
                let want = (blk as u64 % CLIENTS) as u8 + 1;
                assert!(
                    all[blk * BS..(blk + 1) * BS].iter().all(|&b| b == want),
                    "block {blk} has wrong content"
                );
            }
        }
        for c in clients {
            c.disconnect().await.unwrap();
        }
        assert_eq!(f.server.total_connections() - before, CLIENTS);
    })
    .await;
}

// ---------------------------------------------------------------------------
// (b) Real clients
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_io_write_and_verify() {
    timed(async {
        let qemu_io = require_bin("qemu-io", "qemu-utils");
        let f = Fixture::start().await;
        for (uri, off) in [
            (f.unix_uri("disk"), 0u64),
            (f.tcp_uri("disk"), 8 * MIB as u64),
        ] {
            let w = format!("write -P 0xab {off} 1M");
            let r = format!("read -P 0xab {off} 1M");
            let out = run_ok_async(
                &qemu_io,
                &["-f", "raw", &uri, "-c", &w, "-c", &r, "-c", "flush"],
            )
            .await;
            assert!(out.contains("wrote 1048576/1048576 bytes"), "{out}");
            assert!(out.contains("read 1048576/1048576 bytes"), "{out}");
            assert!(!out.contains("Pattern verification failed"), "{out}");
            assert_eq!(f.disk.bytes(off, MIB), vec![0xab; MIB]);
        }
        // Data written behind qemu's back is what qemu reads.
        f.disk.poke(16 * MIB as u64, &vec![0xcd; MIB]);
        let out = run_ok_async(
            &qemu_io,
            &[
                "-f",
                "raw",
                &f.unix_uri("disk"),
                "-c",
                "read -P 0xcd 16M 1M",
            ],
        )
        .await;
        assert!(!out.contains("Pattern verification failed"), "{out}");
        // A wrong pattern is detected (the check above is meaningful).
        let out = run_async(
            &qemu_io,
            &[
                "-f",
                "raw",
                &f.unix_uri("disk"),
                "-c",
                "read -P 0x11 16M 1M",
            ],
        )
        .await;
        assert!(
            out.stdout.contains("Pattern verification failed"),
            "{}",
            out.text()
        );
        // Zeroing and discard through qemu.
        let out = run_ok_async(
            &qemu_io,
            &[
                "-f",
                "raw",
                &f.unix_uri("disk"),
                "-c",
                "write -z 0 64k",
                "-c",
                "discard 64k 64k",
            ],
        )
        .await;
        assert!(out.contains("wrote 65536/65536 bytes"), "{out}");
        assert_eq!(f.disk.bytes(0, 128 * 1024), vec![0; 128 * 1024]);
        // Read-only export: qemu's write fails, data untouched.
        let out = run_async(
            &qemu_io,
            &[
                "-f",
                "raw",
                "-r",
                &f.unix_uri("ro"),
                "-c",
                "read -P 0 0 64k",
            ],
        )
        .await;
        assert!(out.status.success(), "{}", out.text());
        assert!(!out.stdout.contains("Pattern verification failed"));
        f.assert_still_serving().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_img_info_and_compare() {
    timed(async {
        let qemu_img = require_bin("qemu-img", "qemu-utils");
        let f = Fixture::start().await;
        f.disk.poke(MIB as u64, &pattern(0, 2 * MIB, 3));

        for uri in [f.unix_uri("disk"), f.tcp_uri("disk")] {
            let out = run_ok_async(&qemu_img, &["info", "--output=json", &uri]).await;
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["virtual-size"].as_u64(), Some(DISK_SIZE), "{out}");
        }

        let file = f.dir.path().join("copy.raw");
        std::fs::write(&file, f.disk.snapshot()).unwrap();
        let file_s = file.to_str().unwrap();
        let out = run_async(&qemu_img, &qemu_img_compare(file_s, &f.unix_uri("disk"))).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "identical images:\n{}",
            out.text()
        );

        // One changed byte is found at the right offset.
        f.disk.poke(MIB as u64 + 4242, &[0xff]);
        let out = run_async(&qemu_img, &qemu_img_compare(file_s, &f.tcp_uri("disk"))).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "different images:\n{}",
            out.text()
        );
        let stdout = &out.stdout;
        // qemu reports the start of the (aligned) block holding the change.
        let off: u64 = stdout
            .split("mismatch at offset ")
            .nth(1)
            .and_then(|r| r.trim_end().trim_end_matches('!').parse().ok())
            .unwrap_or_else(|| panic!("no mismatch offset in {stdout:?}"));
        let changed = MIB as u64 + 4242;
        assert!(off <= changed && changed - off < 4096, "{stdout}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdinfo_json_list_and_map() {
    timed(async {
        let nbdinfo = require_bin("nbdinfo", "libnbd-bin");
        let f = Fixture::start().await;

        for uri in [f.unix_uri("disk"), f.tcp_uri("disk")] {
            let out = run_ok_async(&nbdinfo, &["--json", &uri]).await;
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let e = &v["exports"][0];
            assert_eq!(e["export-name"], "disk", "{out}");
            assert_eq!(e["export-size"].as_u64(), Some(DISK_SIZE), "{out}");
            assert_eq!(e["description"], "test disk", "{out}");
            assert_eq!(e["is_read_only"], false, "{out}");
            for cap in [
                "can_flush",
                "can_fua",
                "can_trim",
                "can_zero",
                "can_multi_conn",
                "can_df",
            ] {
                assert_eq!(e[cap], true, "{cap}: {out}");
            }
            assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{out}");
            assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{out}");
            assert_eq!(
                e["block_size_maximum"].as_u64(),
                Some(32 * MIB as u64),
                "{out}"
            );
            let contexts = e["contexts"].as_array().expect("contexts");
            assert!(contexts.iter().any(|c| c == "base:allocation"), "{out}");
        }

        // NBD_OPT_LIST: both exports, read-only flag of the second.
        let out = run_ok_async(&nbdinfo, &["--list", "--json", &f.unix_uri("")]).await;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let exports = v["exports"].as_array().unwrap();
        let names: Vec<&str> = exports
            .iter()
            .map(|e| e["export-name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["disk", "ro"], "{out}");
        assert_eq!(exports[1]["is_read_only"], true, "{out}");
        assert_eq!(exports[1]["export-size"].as_u64(), Some(RO_SIZE), "{out}");

        // --map: base:allocation through structured replies.
        f.disk.poke(0, &vec![1; MIB]);
        f.disk.poke(4 * MIB as u64, &vec![2; 2 * MIB]);
        for uri in [f.unix_uri("disk"), f.tcp_uri("disk")] {
            let out = run_ok_async(&nbdinfo, &["--map", &uri]).await;
            let rows: Vec<(u64, u64, u32)> = out
                .lines()
                .map(|l| {
                    let mut it = l.split_whitespace();
                    let a = it.next().unwrap().parse().unwrap();
                    let b = it.next().unwrap().parse().unwrap();
                    let c = it.next().unwrap().parse().unwrap();
                    (a, b, c)
                })
                .collect();
            let m = MIB as u64;
            assert_eq!(
                rows,
                vec![
                    (0, m, 0),
                    (m, 3 * m, 3),
                    (4 * m, 2 * m, 0),
                    (6 * m, DISK_SIZE - 6 * m, 3)
                ],
                "{out}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdcopy_to_and_from_file() {
    timed(async {
        let nbdcopy = require_bin("nbdcopy", "libnbd-bin");
        let f = Fixture::start().await;
        let src = f.dir.path().join("src.raw");
        let data = pattern(0, 24 * MIB, 42);
        std::fs::write(&src, &data).unwrap();
        let src_s = src.to_str().unwrap();

        // File -> NBD (unix), with several connections (multi-conn).
        let conns_before = f.server.total_connections();
        run_ok_async(&nbdcopy, &["--connections=4", src_s, &f.unix_uri("disk")]).await;
        assert!(f.disk.bytes(0, data.len()) == data, "copied data differs");
        assert!(
            f.server.total_connections() - conns_before >= 2,
            "nbdcopy should use several connections (multi-conn)"
        );

        // NBD (TCP) -> file: the whole export.
        let dst = f.dir.path().join("dst.raw");
        let dst_s = dst.to_str().unwrap();
        run_ok_async(&nbdcopy, &[&f.tcp_uri("disk"), dst_s]).await;
        let got = std::fs::read(&dst).unwrap();
        assert_eq!(got.len() as u64, DISK_SIZE);
        assert!(got == f.disk.snapshot(), "exported data differs");

        // NBD -> NBD between two exports of the same server is refused
        // for a read-only destination.
        let out = run_async(&nbdcopy, &[&f.unix_uri("disk"), &f.unix_uri("ro")]).await;
        assert!(!out.status.success(), "{}", out.text());
        assert!(f.ro.snapshot().iter().all(|&b| b == 0));
        f.assert_still_serving().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// (c) Bad input over raw sockets
// ---------------------------------------------------------------------------

async fn raw(f: &Fixture) -> UnixStream {
    UnixStream::connect(&f.sock).await.unwrap()
}

async fn read_greeting<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> u16 {
    let mut g = [0u8; proto::GREETING_SIZE];
    s.read_exact(&mut g).await.unwrap();
    proto::parse_greeting(&g).unwrap()
}

async fn send_opt<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    let h = proto::encode_option_header(&OptionHeader {
        option,
        length: data.len() as u32,
    });
    s.write_all(&h).await.unwrap();
    s.write_all(data).await.unwrap();
}

async fn read_opt_reply<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> (OptionReplyHeader, Vec<u8>) {
    let mut h = [0u8; proto::OPTION_REPLY_HEADER_SIZE];
    s.read_exact(&mut h).await.unwrap();
    let h = proto::parse_option_reply_header(&h).unwrap();
    let mut data = vec![0u8; h.length as usize];
    s.read_exact(&mut data).await.unwrap();
    (h, data)
}

/// Greeting + client flags.
async fn raw_start(f: &Fixture, client_flags: u32) -> UnixStream {
    let mut s = raw(f).await;
    let hf = read_greeting(&mut s).await;
    assert_eq!(hf, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    s.write_all(&client_flags.to_be_bytes()).await.unwrap();
    s
}

/// NBD_OPT_GO on a started connection; returns (size, flags, infos).
async fn raw_go<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    name: &str,
    infos: &[u16],
) -> (u64, u16, Vec<Vec<u8>>) {
    send_opt(
        s,
        proto::OPT_GO,
        &proto::encode_info_request(name.as_bytes(), infos),
    )
    .await;
    let mut size_flags = None;
    let mut all = Vec::new();
    loop {
        let (h, data) = read_opt_reply(s).await;
        assert_eq!(h.option, proto::OPT_GO);
        match h.reply {
            proto::REP_INFO => {
                if let proto::InfoReply::Export { size, flags } =
                    proto::parse_info_reply(&data).unwrap()
                {
                    size_flags = Some((size, flags));
                }
                all.push(data);
            }
            proto::REP_ACK => break,
            other => panic!(
                "unexpected GO reply {other:#x}: {}",
                String::from_utf8_lossy(&data)
            ),
        }
    }
    let (size, flags) = size_flags.expect("NBD_INFO_EXPORT");
    (size, flags, all)
}

/// A connection in transmission phase on "disk" (simple or structured).
async fn raw_transmission(f: &Fixture, structured: bool) -> UnixStream {
    let mut s = raw_start(f, proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    if structured {
        send_opt(&mut s, proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(read_opt_reply(&mut s).await.0.reply, proto::REP_ACK);
    }
    let (size, _, _) = raw_go(&mut s, "disk", &[]).await;
    assert_eq!(size, DISK_SIZE);
    s
}

async fn send_req<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    kind: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) {
    let r = proto::encode_request(&Request {
        flags,
        kind,
        cookie,
        offset,
        length,
    });
    s.write_all(&r).await.unwrap();
}

async fn read_simple<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> proto::SimpleReply {
    let mut b = [0u8; proto::SIMPLE_REPLY_SIZE];
    s.read_exact(&mut b).await.unwrap();
    proto::parse_simple_reply(&b).unwrap()
}

async fn read_chunk<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> (proto::ChunkHeader, Vec<u8>) {
    let mut b = [0u8; proto::CHUNK_HEADER_SIZE];
    s.read_exact(&mut b).await.unwrap();
    let h = proto::parse_chunk_header(&b).unwrap();
    let mut p = vec![0u8; h.length as usize];
    s.read_exact(&mut p).await.unwrap();
    (h, p)
}

/// The server closed the connection (EOF or reset) within 5 s.
async fn assert_closed<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut buf = [0u8; 256];
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("server did not close the connection");
    if let Err(e) = r {
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_handshakes_close_or_error_and_server_survives() {
    timed(async {
        let f = Fixture::start().await;
        // A client in transmission phase before the bad ones.
        let mut bystander = f.client("disk").await;

        // Unknown client flags: closed.
        let mut s = raw_start(&f, 0x8000_0001).await;
        assert_closed(&mut s).await;

        // Garbage instead of an option header: closed.
        let mut s = raw_start(&f, 1).await;
        s.write_all(b"GARBAGE!GARBAGE!").await.unwrap();
        assert_closed(&mut s).await;

        // Oversized option length: closed without waiting for the payload.
        let mut s = raw_start(&f, 1).await;
        let h = proto::encode_option_header(&OptionHeader {
            option: proto::OPT_GO,
            length: 1 << 20,
        });
        s.write_all(&h).await.unwrap();
        assert_closed(&mut s).await;

        // Errors that keep the handshake going, all on one connection.
        let mut s = raw_start(&f, 1).await;
        for (opt, data, want) in [
            (0xdead_u32, vec![1, 2, 3], proto::REP_ERR_UNSUP),
            (proto::OPT_STARTTLS, vec![], proto::REP_ERR_UNSUP),
            (proto::OPT_EXTENDED_HEADERS, vec![], proto::REP_ERR_UNSUP),
            (proto::OPT_PEEK_EXPORT, vec![], proto::REP_ERR_UNSUP),
            (proto::OPT_LIST, vec![0], proto::REP_ERR_INVALID),
            (proto::OPT_STRUCTURED_REPLY, vec![0], proto::REP_ERR_INVALID),
            // Name length larger than the payload.
            (
                proto::OPT_GO,
                vec![0, 0, 1, 0, b'd', 0, 0],
                proto::REP_ERR_INVALID,
            ),
            // Trailing garbage after the info requests.
            (
                proto::OPT_INFO,
                {
                    let mut p = proto::encode_info_request(b"disk", &[]);
                    p.push(7);
                    p
                },
                proto::REP_ERR_INVALID,
            ),
            // Truncated.
            (proto::OPT_INFO, vec![0, 0], proto::REP_ERR_INVALID),
            // Meta context before structured replies.
            (
                proto::OPT_SET_META_CONTEXT,
                proto::encode_meta_context_request(b"disk", &[b"base:allocation"]),
                proto::REP_ERR_INVALID,
            ),
            (
                proto::OPT_LIST_META_CONTEXT,
                vec![0xff; 9],
                proto::REP_ERR_INVALID,
            ),
            (
                proto::OPT_GO,
                proto::encode_info_request(b"nope", &[]),
                proto::REP_ERR_UNKNOWN,
            ),
            (
                proto::OPT_INFO,
                proto::encode_info_request(b"nope", &[]),
                proto::REP_ERR_UNKNOWN,
            ),
            (
                proto::OPT_LIST_META_CONTEXT,
                proto::encode_meta_context_request(b"nope", &[]),
                proto::REP_ERR_UNKNOWN,
            ),
        ] {
            send_opt(&mut s, opt, &data).await;
            let (h, msg) = read_opt_reply(&mut s).await;
            assert_eq!(h.option, opt);
            assert_eq!(
                h.reply,
                want,
                "option {} got {}: {}",
                proto::option_name(opt),
                proto::reply_name(h.reply),
                String::from_utf8_lossy(&msg)
            );
        }
        // ... and the same connection still negotiates fine afterwards.
        let (size, _, _) = raw_go(&mut s, "disk", &[]).await;
        assert_eq!(size, DISK_SIZE);
        send_req(&mut s, proto::CMD_READ, 0, 1, 0, 512).await;
        assert_eq!(read_simple(&mut s).await.error, 0);

        // NBD_OPT_EXPORT_NAME with an unknown export: closed.
        let mut s = raw_start(&f, 1).await;
        send_opt(&mut s, proto::OPT_EXPORT_NAME, b"nope").await;
        assert_closed(&mut s).await;

        // Client that vanishes mid-option.
        let mut s = raw_start(&f, 1).await;
        let h = proto::encode_option_header(&OptionHeader {
            option: proto::OPT_GO,
            length: 100,
        });
        s.write_all(&h).await.unwrap();
        s.write_all(&[0; 10]).await.unwrap();
        drop(s);

        // NBD_OPT_ABORT: acknowledged, then closed.
        let mut s = raw_start(&f, 1).await;
        send_opt(&mut s, proto::OPT_ABORT, &[]).await;
        let (h, _) = read_opt_reply(&mut s).await;
        assert_eq!(h.reply, proto::REP_ACK);
        assert_closed(&mut s).await;

        // The bystander and new clients are unaffected.
        bystander.write(0, &[8; 4096], false).await.unwrap();
        assert_eq!(bystander.read(0, 4096).await.unwrap(), vec![8; 4096]);
        bystander.disconnect().await.unwrap();
        f.assert_still_serving().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handshake_options_behave_per_spec() {
    timed(async {
        let f = Fixture::start().await;

        // NBD_OPT_LIST: every export with its description, then ACK.
        let mut s = raw_start(&f, 1).await;
        send_opt(&mut s, proto::OPT_LIST, &[]).await;
        let mut listed = Vec::new();
        loop {
            let (h, data) = read_opt_reply(&mut s).await;
            match h.reply {
                proto::REP_SERVER => {
                    let (n, d) = proto::parse_server_reply(&data).unwrap();
                    listed.push((
                        String::from_utf8(n.to_vec()).unwrap(),
                        String::from_utf8(d.to_vec()).unwrap(),
                    ));
                }
                proto::REP_ACK => break,
                r => panic!("unexpected reply {r:#x}"),
            }
        }
        assert_eq!(
            listed,
            [
                ("disk".into(), "test disk".into()),
                ("ro".into(), String::new())
            ]
        );

        // LIST_META_CONTEXT: base:allocation for the empty query list and "base:".
        for queries in [vec![], vec![&b"base:"[..]], vec![&b"base:allocation"[..]]] {
            send_opt(
                &mut s,
                proto::OPT_LIST_META_CONTEXT,
                &proto::encode_meta_context_request(b"disk", &queries),
            )
            .await;
            let (h, data) = read_opt_reply(&mut s).await;
            assert_eq!(h.reply, proto::REP_META_CONTEXT);
            assert_eq!(
                proto::parse_meta_context_reply(&data).unwrap().1,
                b"base:allocation"
            );
            assert_eq!(read_opt_reply(&mut s).await.0.reply, proto::REP_ACK);
        }
        // Unknown namespaces are ignored.
        send_opt(
            &mut s,
            proto::OPT_LIST_META_CONTEXT,
            &proto::encode_meta_context_request(b"disk", &[b"qemu:dirty-bitmap:x"]),
        )
        .await;
        assert_eq!(read_opt_reply(&mut s).await.0.reply, proto::REP_ACK);

        // INFO on the default export: EXPORT, NAME, DESCRIPTION, BLOCK_SIZE.
        send_opt(
            &mut s,
            proto::OPT_INFO,
            &proto::encode_info_request(
                b"",
                &[
                    proto::INFO_NAME,
                    proto::INFO_DESCRIPTION,
                    proto::INFO_BLOCK_SIZE,
                ],
            ),
        )
        .await;
        let mut infos = Vec::new();
        loop {
            let (h, data) = read_opt_reply(&mut s).await;
            if h.reply == proto::REP_ACK {
                break;
            }
            assert_eq!(h.reply, proto::REP_INFO);
            infos.push(data);
        }
        let parsed: Vec<proto::InfoReply<'_>> = infos
            .iter()
            .map(|d| proto::parse_info_reply(d).unwrap())
            .collect();
        let flags = proto::FLAG_HAS_FLAGS
            | proto::FLAG_SEND_FLUSH
            | proto::FLAG_SEND_FUA
            | proto::FLAG_SEND_TRIM
            | proto::FLAG_SEND_WRITE_ZEROES
            | proto::FLAG_CAN_MULTI_CONN;
        assert!(
            parsed.contains(&proto::InfoReply::Export {
                size: DISK_SIZE,
                flags
            }),
            "{parsed:?}"
        );
        assert!(parsed.contains(&proto::InfoReply::Name(b"disk")));
        assert!(parsed.contains(&proto::InfoReply::Description(b"test disk")));
        assert!(parsed.contains(&proto::InfoReply::BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20
        }));

        // Structured replies add SEND_DF; read-only export adds READ_ONLY.
        send_opt(&mut s, proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(read_opt_reply(&mut s).await.0.reply, proto::REP_ACK);
        let (size, fl, _) = raw_go(&mut s, "ro", &[]).await;
        assert_eq!(size, RO_SIZE);
        assert_eq!(fl, flags | proto::FLAG_SEND_DF | proto::FLAG_READ_ONLY);
        drop(s);

        // NBD_OPT_EXPORT_NAME with and without NO_ZEROES: exact byte counts.
        for no_zeroes in [true, false] {
            let cf = proto::FLAG_C_FIXED_NEWSTYLE
                | if no_zeroes {
                    proto::FLAG_C_NO_ZEROES
                } else {
                    0
                };
            let mut s = raw_start(&f, cf).await;
            send_opt(&mut s, proto::OPT_EXPORT_NAME, b"disk").await;
            let mut b = [0u8; 10];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), DISK_SIZE);
            if !no_zeroes {
                let mut z = [1u8; 124];
                s.read_exact(&mut z).await.unwrap();
                assert_eq!(z, [0u8; 124]);
            }
            // The next bytes are the reply to our first request.
            send_req(&mut s, proto::CMD_READ, 0, 77, 0, 16).await;
            let r = read_simple(&mut s).await;
            assert_eq!((r.cookie, r.error), (77, 0));
            let mut d = [1u8; 16];
            s.read_exact(&mut d).await.unwrap();
            assert_eq!(d, [0u8; 16]);
        }

        // SET_META_CONTEXT for one export, GO to another: no block status.
        let mut s = raw_start(&f, 1).await;
        send_opt(&mut s, proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(read_opt_reply(&mut s).await.0.reply, proto::REP_ACK);
        send_opt(
            &mut s,
            proto::OPT_SET_META_CONTEXT,
            &proto::encode_meta_context_request(b"ro", &[b"base:allocation"]),
        )
        .await;
        let (h, data) = read_opt_reply(&mut s).await;
        assert_eq!(h.reply, proto::REP_META_CONTEXT);
        assert_ne!(proto::parse_meta_context_reply(&data).unwrap().0, 0);
        assert_eq!(read_opt_reply(&mut s).await.0.reply, proto::REP_ACK);
        raw_go(&mut s, "disk", &[]).await;
        send_req(&mut s, proto::CMD_BLOCK_STATUS, 0, 5, 0, 4096).await;
        let (h, p) = read_chunk(&mut s).await;
        assert_eq!(h.kind, proto::REPLY_TYPE_ERROR);
        assert_eq!(proto::parse_error_payload(&p).unwrap().0, proto::EINVAL);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_simple_replies() {
    timed(async {
        let f = Fixture::start().await;
        f.disk.poke(0, &[0x42; 8192]);
        let before = f.disk.snapshot();
        let mut s = raw_transmission(&f, false).await;

        // Out-of-range read: EINVAL, no payload; the stream stays in sync.
        send_req(&mut s, proto::CMD_READ, 0, 1, DISK_SIZE - 100, 4096).await;
        let r = read_simple(&mut s).await;
        assert_eq!((r.cookie, r.error), (1, proto::EINVAL));
        // Overflowing offset.
        send_req(&mut s, proto::CMD_READ, 0, 2, u64::MAX, 1).await;
        assert_eq!(read_simple(&mut s).await.error, proto::EINVAL);
        // Read over the 32 MiB maximum (in range): EINVAL, connection kept.
        send_req(&mut s, proto::CMD_READ, 0, 3, 0, 33 * MIB as u32).await;
        assert_eq!(read_simple(&mut s).await.error, proto::EINVAL);
        // Flags not valid for the command (DF without structured replies).
        send_req(&mut s, proto::CMD_READ, proto::CMD_FLAG_DF, 4, 0, 512).await;
        assert_eq!(read_simple(&mut s).await.error, proto::EINVAL);
        // Unknown command.
        send_req(&mut s, 99, 0, 5, 0, 0).await;
        assert_eq!(read_simple(&mut s).await.error, proto::EINVAL);
        // Block status without a negotiated context.
        send_req(&mut s, proto::CMD_BLOCK_STATUS, 0, 6, 0, 4096).await;
        assert_eq!(read_simple(&mut s).await.error, proto::EINVAL);
        // Fast zero is not advertised.
        send_req(
            &mut s,
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_FAST_ZERO,
            7,
            0,
            4096,
        )
        .await;
        assert_eq!(read_simple(&mut s).await.error, proto::EINVAL);

        // Out-of-range write: payload consumed, ENOSPC, data untouched.
        send_req(&mut s, proto::CMD_WRITE, 0, 10, DISK_SIZE - 100, 4096).await;
        s.write_all(&[0xee; 4096]).await.unwrap();
        let r = read_simple(&mut s).await;
        assert_eq!((r.cookie, r.error), (10, proto::ENOSPC));
        // Write with an invalid flag: payload consumed, EINVAL.
        send_req(
            &mut s,
            proto::CMD_WRITE,
            proto::CMD_FLAG_REQ_ONE,
            11,
            0,
            4096,
        )
        .await;
        s.write_all(&[0xee; 4096]).await.unwrap();
        assert_eq!(read_simple(&mut s).await.error, proto::EINVAL);
        assert!(f.disk.snapshot() == before, "rejected writes changed data");

        // Zero-length requests succeed without data.
        send_req(&mut s, proto::CMD_READ, 0, 20, DISK_SIZE, 0).await;
        assert_eq!(read_simple(&mut s).await.error, 0);
        send_req(&mut s, proto::CMD_WRITE, 0, 21, 0, 0).await;
        assert_eq!(read_simple(&mut s).await.error, 0);
        send_req(&mut s, proto::CMD_TRIM, 0, 22, 0, 0).await;
        assert_eq!(read_simple(&mut s).await.error, 0);
        // CACHE is accepted.
        send_req(&mut s, proto::CMD_CACHE, 0, 23, 0, 4096).await;
        assert_eq!(read_simple(&mut s).await.error, 0);
        assert!(f.disk.snapshot() == before);

        // Still in sync: a valid read returns the right data.
        send_req(&mut s, proto::CMD_READ, 0, 30, 0, 8192).await;
        let r = read_simple(&mut s).await;
        assert_eq!((r.cookie, r.error), (30, 0));
        let mut d = vec![0u8; 8192];
        s.read_exact(&mut d).await.unwrap();
        assert_eq!(d, vec![0x42; 8192]);

        // Oversized write: EINVAL, then the connection is closed.
        send_req(&mut s, proto::CMD_WRITE, 0, 40, 0, 64 * MIB as u32).await;
        let _ = s.write_all(&vec![0xee; MIB]).await;
        let r = read_simple(&mut s).await;
        assert_eq!((r.cookie, r.error), (40, proto::EINVAL));
        assert_closed(&mut s).await;
        assert!(f.disk.snapshot() == before, "oversized write changed data");

        // Bad request magic: closed.
        let mut s = raw_transmission(&f, false).await;
        let mut req = proto::encode_request(&Request {
            flags: 0,
            kind: proto::CMD_READ,
            cookie: 1,
            offset: 0,
            length: 512,
        });
        req[0] ^= 0x55;
        s.write_all(&req).await.unwrap();
        assert_closed(&mut s).await;

        // Read-only export: write payload consumed, EPERM, connection kept.
        let mut s = raw_start(&f, 3).await;
        raw_go(&mut s, "ro", &[]).await;
        send_req(&mut s, proto::CMD_WRITE, 0, 50, 0, 4096).await;
        s.write_all(&[1; 4096]).await.unwrap();
        assert_eq!(read_simple(&mut s).await.error, proto::EPERM);
        send_req(&mut s, proto::CMD_TRIM, 0, 51, 0, 4096).await;
        assert_eq!(read_simple(&mut s).await.error, proto::EPERM);
        send_req(&mut s, proto::CMD_READ, 0, 52, 0, 16).await;
        assert_eq!(read_simple(&mut s).await.error, 0);
        let mut d = [1u8; 16];
        s.read_exact(&mut d).await.unwrap();
        assert_eq!(d, [0; 16]);
        assert!(f.ro.snapshot().iter().all(|&b| b == 0));

        f.assert_still_serving().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn structured_replies_on_the_wire() {
    timed(async {
        let f = Fixture::start().await;
        f.disk.poke(4096, &[0x77; 4096]);
        let mut s = raw_transmission(&f, true).await;

        // Successful read: one OFFSET_DATA chunk with DONE (DF accepted).
        send_req(&mut s, proto::CMD_READ, proto::CMD_FLAG_DF, 1, 4096, 4096).await;
        let (h, p) = read_chunk(&mut s).await;
        assert_eq!(
            (h.cookie, h.kind, h.flags),
            (1, proto::REPLY_TYPE_OFFSET_DATA, proto::REPLY_FLAG_DONE)
        );
        let (off, data) = proto::parse_offset_data(&p).unwrap();
        assert_eq!(off, 4096);
        assert_eq!(data, &[0x77; 4096][..]);

        // Failed read: an ERROR chunk with DONE and a message.
        send_req(&mut s, proto::CMD_READ, 0, 2, DISK_SIZE, 1).await;
        let (h, p) = read_chunk(&mut s).await;
        assert_eq!(
            (h.cookie, h.kind, h.flags),
            (2, proto::REPLY_TYPE_ERROR, proto::REPLY_FLAG_DONE)
        );
        let (errno, msg) = proto::parse_error_payload(&p).unwrap();
        assert_eq!(errno, proto::EINVAL);
        assert!(!msg.is_empty());

        // Write and flush: NONE chunk with DONE.
        send_req(&mut s, proto::CMD_WRITE, proto::CMD_FLAG_FUA, 3, 0, 512).await;
        s.write_all(&[5; 512]).await.unwrap();
        let (h, p) = read_chunk(&mut s).await;
        assert_eq!(
            (h.cookie, h.kind, h.flags, p.len()),
            (3, proto::REPLY_TYPE_NONE, proto::REPLY_FLAG_DONE, 0)
        );
        send_req(&mut s, proto::CMD_FLUSH, 0, 4, 0, 0).await;
        let (h, _) = read_chunk(&mut s).await;
        assert_eq!((h.cookie, h.kind), (4, proto::REPLY_TYPE_NONE));
        assert_eq!(f.disk.bytes(0, 512), vec![5; 512]);

        // Zero-length read: NONE (OFFSET_DATA must carry at least one byte).
        send_req(&mut s, proto::CMD_READ, 0, 5, 0, 0).await;
        let (h, _) = read_chunk(&mut s).await;
        assert_eq!((h.cookie, h.kind), (5, proto::REPLY_TYPE_NONE));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_requests_and_disc_drains_in_flight() {
    timed(async {
        let f = Fixture::start().await;
        let mut s = raw_transmission(&f, false).await;
        // 100 writes of 64 KiB and 100 reads pipelined, then DISC, in one go.
        let mut out = Vec::new();
        for i in 0..100u64 {
            out.extend_from_slice(&proto::encode_request(&Request {
                flags: 0,
                kind: proto::CMD_WRITE,
                cookie: i,
                offset: i * 65536,
                length: 65536,
            }));
            out.extend_from_slice(&vec![i as u8; 65536]);
        }
        for i in 0..100u64 {
            out.extend_from_slice(&proto::encode_request(&Request {
                flags: 0,
                kind: proto::CMD_READ,
                cookie: 1000 + i,
                offset: DISK_SIZE - 65536 * (i + 1),
                length: 512,
            }));
        }
        out.extend_from_slice(&proto::encode_request(&Request {
            flags: 0,
            kind: proto::CMD_DISC,
            cookie: 9999,
            offset: 0,
            length: 0,
        }));
        let (mut rd, mut wr) = s.split();
        let writer = async {
            wr.write_all(&out).await.unwrap();
        };
        let reader = async {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..200 {
                let mut b = [0u8; proto::SIMPLE_REPLY_SIZE];
                rd.read_exact(&mut b).await.unwrap();
                let r = proto::parse_simple_reply(&b).unwrap();
                assert_eq!(r.error, 0);
                if r.cookie >= 1000 {
                    let mut d = vec![0u8; 512];
                    rd.read_exact(&mut d).await.unwrap();
                }
                assert!(seen.insert(r.cookie), "duplicate reply {}", r.cookie);
            }
            // No reply to DISC: the server closes after the in-flight ones.
            let mut rest = Vec::new();
            rd.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            seen
        };
        let ((), seen) = tokio::join!(writer, reader);
        assert_eq!(seen.len(), 200);
        for i in 0..100u64 {
            assert_eq!(f.disk.bytes(i * 65536, 65536), vec![i as u8; 65536]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_change_at_runtime_and_shutdown_drains() {
    timed(async {
        let f = Fixture::start().await;
        let mut removed = f.client("ro").await;
        let mut c = f.client("disk").await;
        assert_eq!(removed.read(0, 512).await.unwrap(), vec![0; 512]);
        assert!(f.server.remove_export("ro").is_some());
        assert_eq!(f.server.export_names(), ["disk"]);
        // The removed export's connection is closed, new ones are refused;
        // other exports' connections keep working.
        let e = tokio::time::timeout(Duration::from_secs(10), removed.read(0, 512))
            .await
            .expect("the removed export's connection must close, not hang");
        assert!(e.is_err(), "a removed export still answered");
        assert_eq!(c.read(0, 512).await.unwrap().len(), 512);
        let e = NbdClient::connect_unix(&f.sock, "ro").await.unwrap_err();
        assert!(
            matches!(e, NbdError::OptionRejected { reply, .. } if reply == proto::REP_ERR_UNKNOWN),
            "{e}"
        );
        // Added back (and duplicates refused).
        f.server
            .add_export(Export::new("ro2", f.ro.clone()))
            .unwrap();
        assert!(matches!(
            f.server.add_export(Export::new("ro2", f.ro.clone())),
            Err(NbdError::DuplicateExport { .. })
        ));
        assert!(f.server.add_export(Export::new("", f.ro.clone())).is_err());
        let c2 = f.client("ro2").await;
        c2.disconnect().await.unwrap();

        // Shutdown: the idle connection is closed, the socket removed.
        let Fixture {
            unix,
            tcp,
            sock,
            server,
            ..
        } = f;
        unix.shutdown().await.unwrap();
        tcp.shutdown().await.unwrap();
        assert!(!sock.exists(), "socket file removed on shutdown");
        assert!(c.read(0, 512).await.is_err());
        assert_eq!(server.active_connections(), 0);
        assert!(UnixStream::connect(&sock).await.is_err());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_write_over_tcp_reply_survives_close() {
    timed(async {
        let f = Fixture::start().await;
        let before = f.disk.snapshot();
        for _ in 0..3 {
            let mut s = TcpStream::connect(f.tcp.tcp_addr().unwrap()).await.unwrap();
            s.set_nodelay(true).unwrap();
            read_greeting(&mut s).await;
            s.write_all(&3u32.to_be_bytes()).await.unwrap();
            raw_go(&mut s, "disk", &[]).await;
            send_req(&mut s, proto::CMD_WRITE, 0, 7, 0, 48 * MIB as u32).await;
            // Keep sending some of the (rejected) payload while the server closes.
            let _ = s.write_all(&vec![0xee; 2 * MIB]).await;
            let r = read_simple(&mut s).await;
            assert_eq!((r.cookie, r.error), (7, proto::EINVAL));
            assert_closed(&mut s).await;
        }
        assert!(f.disk.snapshot() == before, "oversized write changed data");
        f.assert_still_serving().await;
    })
    .await;
}
