//! The NBD driver against a fake kernel that keeps its socket ends and
//! speaks the NBD transmission phase over them the way the kernel's client
//! does (raw requests, simple replies).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use volmig_testkit::MemVolume;

use super::*;
use crate::nbd::proto::{self, Request};

const MIB: u64 = 1 << 20;

#[derive(Debug)]
struct FakeDev {
    identifier: String,
    size: u64,
    connected: bool,
    conns: Vec<UnixStream>,
    /// Held open by someone (a mount): claims fail with EBUSY.
    open: bool,
}

#[derive(Debug, Default)]
struct FakeState {
    devs: BTreeMap<u32, FakeDev>,
    connects: Vec<Connect>,
    reconfigures: Vec<Reconfigure>,
}

/// A kernel NBD client in a test: takes references to the sockets it is
/// given (dup), answers STATUS, checks identifiers, replaces only dead
/// connections, sends NBD_CMD_DISC on disconnect.
#[derive(Debug, Default)]
struct FakeKernel {
    st: Mutex<FakeState>,
}

fn dup(fd: i32) -> io::Result<UnixStream> {
    // SAFETY: dup(2) of a descriptor the caller keeps open for the call.
    let new = unsafe { libc::dup(fd) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor that nothing else owns.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(new) }))
}

/// The peer closed its end.
fn is_dead(s: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    // SAFETY: `b` is valid for one byte; MSG_PEEK leaves the data queued.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FakeKernel {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.st.lock().unwrap()
    }

    fn set_open(&self, index: u32, open: bool) {
        self.lock().devs.get_mut(&index).unwrap().open = open;
    }

    /// What the kernel does when a request on a connection times out:
    /// shuts the connection down (and re-queues the request elsewhere).
    fn drop_connection(&self, index: u32, conn: usize) {
        let st = self.lock();
        st.devs[&index].conns[conn]
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
    }

    fn connected(&self, index: u32) -> bool {
        self.lock().devs.get(&index).is_some_and(|d| d.connected)
    }

    fn size(&self, index: u32) -> u64 {
        self.lock().devs[&index].size
    }

    /// One request on connection `conn` of device `index`, as the kernel
    /// sends it; the reply's error and, for reads, its data.
    fn request(&self, index: u32, conn: usize, op: Op, payload: &[u8]) -> (u32, Vec<u8>) {
        let Op {
            kind,
            flags,
            offset,
            length,
        } = op;
        let mut s = self.lock().devs[&index].conns[conn].try_clone().unwrap();
        let cookie = 0x1234_0000 + u64::from(kind);
        let hdr = proto::encode_request(&Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        });
        s.write_all(&hdr).unwrap();
        s.write_all(payload).unwrap();
        let mut reply = [0u8; proto::SIMPLE_REPLY_SIZE];
        s.read_exact(&mut reply).unwrap();
        let r = proto::parse_simple_reply(&reply).unwrap();
        assert_eq!(r.cookie, cookie);
        let mut data = Vec::new();
        if kind == proto::CMD_READ && r.error == 0 {
            data = vec![0u8; length as usize];
            s.read_exact(&mut data).unwrap();
        }
        (r.error, data)
    }
}

impl NbdKernel for FakeKernel {
    fn connect(&self, req: &Connect) -> io::Result<u32> {
        let conns = req
            .sockets
            .iter()
            .map(|fd| dup(*fd))
            .collect::<io::Result<Vec<_>>>()?;
        let mut st = self.lock();
        st.connects.push(req.clone());
        let index = (0..).find(|i| !st.devs.get(i).is_some_and(|d| d.connected));
        let index = index.ok_or_else(|| errno(libc::ENOSPC))?;
        st.devs.insert(
            index,
            FakeDev {
                identifier: req.identifier.clone(),
                size: req.size,
                connected: true,
                conns,
                open: false,
            },
        );
        Ok(index)
    }

    fn reconfigure(&self, req: &Reconfigure) -> io::Result<()> {
        let mut st = self.lock();
        st.reconfigures.push(req.clone());
        let dev = st
            .devs
            .get_mut(&req.index)
            .filter(|d| d.connected)
            .ok_or_else(|| errno(libc::EINVAL))?;
        if dev.identifier != req.identifier {
            return Err(errno(libc::EINVAL));
        }
        if let Some(size) = req.size {
            dev.size = size;
        }
        for fd in &req.sockets {
            let slot = dev
                .conns
                .iter_mut()
                .find(|c| is_dead(c))
                .ok_or_else(|| errno(libc::ENOSPC))?;
            *slot = dup(*fd)?;
        }
        Ok(())
    }

    fn disconnect(&self, index: u32) -> io::Result<()> {
        let mut st = self.lock();
        let dev = st
            .devs
            .get_mut(&index)
            .filter(|d| d.connected)
            .ok_or_else(|| errno(libc::EINVAL))?;
        let disc = proto::encode_request(&Request {
            flags: 0,
            kind: proto::CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        });
        for c in dev.conns.drain(..) {
            let _ = (&c).write_all(&disc);
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        dev.connected = false;
        Ok(())
    }

    fn status(&self, index: u32) -> io::Result<Option<DeviceStatus>> {
        Ok(self.lock().devs.get(&index).map(|d| DeviceStatus {
            index,
            connected: d.connected,
        }))
    }

    fn backend(&self, index: u32) -> io::Result<Option<String>> {
        Ok(self
            .lock()
            .devs
            .get(&index)
            .filter(|d| d.connected)
            .map(|d| d.identifier.clone()))
    }

    fn claim(&self, index: u32) -> io::Result<Box<dyn Send>> {
        match self.lock().devs.get(&index) {
            Some(d) if d.open => Err(errno(libc::EBUSY)),
            Some(_) => Ok(Box::new(())),
            None => Err(errno(libc::ENXIO)),
        }
    }
}

fn params(connections: usize) -> NbdParams {
    NbdParams {
        connections,
        block_size: 4096,
        io_timeout: Duration::ZERO,
        dead_conn_timeout: Duration::from_secs(600),
        reconnect_wait: Duration::from_millis(300),
    }
}

fn driver(kernel: &Arc<FakeKernel>, connections: usize) -> NbdNetlinkDriver<MemVolume, FakeKernel> {
    NbdNetlinkDriver::with_kernel(kernel.clone(), params(connections)).unwrap()
}

/// One request's header fields.
#[derive(Debug, Clone, Copy)]
struct Op {
    kind: u16,
    flags: u16,
    offset: u64,
    length: u32,
}

/// Runs a fake-kernel request (`kind`, `flags`, `offset`, `length`) off the
/// runtime (it blocks on the socket).
async fn req(
    k: &Arc<FakeKernel>,
    index: u32,
    conn: usize,
    (kind, flags, offset, length): (u16, u16, u64, u32),
    payload: Vec<u8>,
) -> (u32, Vec<u8>) {
    let k = k.clone();
    let op = Op {
        kind,
        flags,
        offset,
        length,
    };
    tokio::task::spawn_blocking(move || k.request(index, conn, op, &payload))
        .await
        .unwrap()
}

fn detail(a: &Attached) -> NbdDetail {
    serde_json::from_value(a.record.detail.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_connects_serves_every_connection_and_detach_disconnects() {
    let k = Arc::new(FakeKernel::default());
    let d = driver(&k, 2);
    let vol = Arc::new(MemVolume::new(MIB));
    let a = d.attach("v1", vol.clone()).await.unwrap();
    assert_eq!(a.path, PathBuf::from("/dev/nbd0"));
    assert_eq!(a.record.kind, BlockKind::Nbd);
    assert_eq!(a.record.volume, "v1");
    let det = detail(&a);
    assert_eq!(det.index, 0);
    assert_eq!(det.connections, 2);
    assert!(
        det.identifier.starts_with("volmig:v1:"),
        "{}",
        det.identifier
    );
    {
        let st = k.lock();
        let c = &st.connects[0];
        assert_eq!(c.size, MIB);
        assert_eq!(c.block_size, 4096);
        assert_eq!(c.timeout, 0, "no I/O timeout");
        assert_eq!(c.dead_conn_timeout, 600);
        assert_eq!(c.server_flags, server_flags());
        assert_eq!(c.client_flags, 0, "neither destroy nor disconnect on close");
        assert_eq!(c.sockets.len(), 2);
        assert_eq!(c.identifier, det.identifier);
    }

    // A write on one connection is read back on the other.
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    let (e, _) = req(
        &k,
        0,
        0,
        (proto::CMD_WRITE, proto::CMD_FLAG_FUA, 4096, 8192),
        data.clone(),
    )
    .await;
    assert_eq!(e, 0);
    assert_eq!(vol.counters.fua_writes.load(Ordering::SeqCst), 1);
    let (e, got) = req(&k, 0, 1, (proto::CMD_READ, 0, 4096, 8192), vec![]).await;
    assert_eq!(e, 0);
    assert_eq!(got, data);
    assert_eq!(vol.bytes(4096, 8192), data);
    let (e, _) = req(&k, 0, 1, (proto::CMD_FLUSH, 0, 0, 0), vec![]).await;
    assert_eq!(e, 0);
    assert_eq!(vol.counters.flushes.load(Ordering::SeqCst), 1);
    let (e, _) = req(
        &k,
        0,
        0,
        (proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 4096, 4096),
        vec![],
    )
    .await;
    assert_eq!(e, 0);
    let (e, _) = req(&k, 0, 0, (proto::CMD_TRIM, 0, 8192, 4096), vec![]).await;
    assert_eq!(e, 0);
    assert_eq!(vol.bytes(4096, 8192), vec![0u8; 8192]);
    // Out of range: an error reply, the connection stays usable.
    let (e, _) = req(&k, 0, 0, (proto::CMD_READ, 0, MIB, 4096), vec![]).await;
    assert_eq!(e, proto::EINVAL);
    let (e, _) = req(&k, 0, 0, (proto::CMD_READ, 0, 0, 512), vec![]).await;
    assert_eq!(e, 0);

    let again = d.attach("v1", vol.clone()).await.unwrap_err();
    assert_eq!(again.kind(), BlockErrorKind::AlreadyAttached);

    d.detach("v1").await.unwrap();
    assert!(!k.connected(0));
    let e = d.detach("v1").await.unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::NotAttached);
    // The name is free again.
    let a2 = d.attach("v1", vol).await.unwrap();
    assert_eq!(a2.path, PathBuf::from("/dev/nbd0"));
    assert_ne!(
        detail(&a2).identifier,
        det.identifier,
        "a new device, a new identifier"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_reconfigures_the_same_device() {
    let k = Arc::new(FakeKernel::default());
    let vol = Arc::new(MemVolume::new(MIB));
    let first = driver(&k, 3);
    let a = first.attach("v1", vol.clone()).await.unwrap();
    let (e, _) = req(&k, 0, 2, (proto::CMD_WRITE, 0, 0, 4096), vec![0xab; 4096]).await;
    assert_eq!(e, 0);

    first.crash().await;
    assert!(k.connected(0), "the device outlives the agent");

    // The record survives as JSON in the agent's state directory.
    let record: DeviceRecord =
        serde_json::from_str(&serde_json::to_string(&a.record).unwrap()).unwrap();
    let second = driver(&k, 1);
    let b = second.reattach(&record, vol.clone()).await.unwrap();
    assert_eq!(b.path, a.path);
    assert_eq!(b.record, a.record, "the same device, the same record");
    {
        let st = k.lock();
        assert_eq!(st.connects.len(), 1, "no new device");
        assert_eq!(st.reconfigures.len(), 3, "one RECONFIGURE per connection");
        for r in &st.reconfigures {
            assert_eq!(r.index, 0);
            assert_eq!(r.identifier, detail(&a).identifier);
            assert_eq!(r.sockets.len(), 1);
        }
    }
    for conn in 0..3 {
        let (e, got) = req(&k, 0, conn, (proto::CMD_READ, 0, 0, 4096), vec![]).await;
        assert_eq!(e, 0);
        assert_eq!(got, vec![0xab; 4096], "connection {conn}");
    }
    second.detach("v1").await.unwrap();
    assert!(!k.connected(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_refuses_foreign_gone_and_invalid_records_and_changes_nothing() {
    let k = Arc::new(FakeKernel::default());
    let vol = Arc::new(MemVolume::new(MIB));
    let first = driver(&k, 1);
    let a = first.attach("v1", vol.clone()).await.unwrap();
    first.crash().await;
    let second = driver(&k, 1);

    // Another backend's identifier on the same index.
    let mut foreign = a.record.clone();
    let mut det = detail(&a);
    det.identifier = "volmig:v1:someone-else".into();
    foreign.detail = serde_json::to_value(&det).unwrap();
    let e = second.reattach(&foreign, vol.clone()).await.unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::Foreign, "{e}");

    // A device that does not exist.
    let mut gone = a.record.clone();
    let mut det = detail(&a);
    det.index = 9;
    gone.detail = serde_json::to_value(&det).unwrap();
    let e = second.reattach(&gone, vol.clone()).await.unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::Gone, "{e}");

    // Records that are not ours to read.
    let mut wrong_kind = a.record.clone();
    wrong_kind.kind = BlockKind::Ublk;
    let e = second.reattach(&wrong_kind, vol.clone()).await.unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::InvalidRecord);
    let mut garbage = a.record.clone();
    garbage.detail = serde_json::json!({"index": "zero"});
    let e = second.reattach(&garbage, vol.clone()).await.unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::InvalidRecord);

    assert!(
        k.lock().reconfigures.is_empty(),
        "a refused device is never reconfigured"
    );
    // The real record still works after all that.
    second.reattach(&a.record, vol).await.unwrap();
    let (e, _) = req(&k, 0, 0, (proto::CMD_FLUSH, 0, 0, 0), vec![]).await;
    assert_eq!(e, 0);

    // A device that was disconnected meanwhile is gone.
    second.detach("v1").await.unwrap();
    let third = driver(&k, 1);
    let e = third
        .reattach(&a.record, Arc::new(MemVolume::new(MIB)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::Gone, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_while_the_old_connections_live_gives_up_and_leaves_them_alone() {
    let k = Arc::new(FakeKernel::default());
    let vol = Arc::new(MemVolume::new(MIB));
    let first = driver(&k, 1);
    let a = first.attach("v1", vol.clone()).await.unwrap();
    // The first agent is still alive: no dead connection to replace.
    let second = driver(&k, 1);
    let e = second.reattach(&a.record, vol.clone()).await.unwrap_err();
    assert!(
        k.lock().reconfigures.len() > 1,
        "ENOSPC is retried until the wait is over"
    );
    assert_eq!(e.kind(), BlockErrorKind::Io, "{e}");
    let (e, _) = req(&k, 0, 0, (proto::CMD_READ, 0, 0, 512), vec![]).await;
    assert_eq!(e, 0, "the old connection still serves");
    // The failed attempt left nothing behind: the volume can be reattached
    // once the old agent is gone.
    first.crash().await;
    second.reattach(&a.record, vol).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_device_is_not_detached() {
    let k = Arc::new(FakeKernel::default());
    let d = driver(&k, 1);
    d.attach("v1", Arc::new(MemVolume::new(MIB))).await.unwrap();
    k.set_open(0, true);
    let e = d.detach("v1").await.unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::Busy, "{e}");
    assert!(k.connected(0));
    let (e, _) = req(&k, 0, 0, (proto::CMD_FLUSH, 0, 0, 0), vec![]).await;
    assert_eq!(e, 0, "still served");
    k.set_open(0, false);
    d.detach("v1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_reconfigures_the_size_in_whole_blocks() {
    let k = Arc::new(FakeKernel::default());
    let d = driver(&k, 1);
    let vol = Arc::new(MemVolume::new(MIB));
    d.attach("v1", vol.clone()).await.unwrap();
    vol.grow(2 * MIB);
    d.resize("v1", 2 * MIB).await.unwrap();
    assert_eq!(k.size(0), 2 * MIB);
    let e = d.resize("v1", 2 * MIB + 512).await.unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::InvalidArgument);
    let e = d.resize("nope", 2 * MIB).await.unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::NotAttached);
    // The grown end is served.
    let (e, _) = req(
        &k,
        0,
        0,
        (proto::CMD_WRITE, 0, 2 * MIB - 4096, 4096),
        vec![1; 4096],
    )
    .await;
    assert_eq!(e, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_of_odd_size_gets_small_blocks_or_is_refused() {
    let k = Arc::new(FakeKernel::default());
    let d = driver(&k, 1);
    d.attach("v1", Arc::new(MemVolume::new(MIB + 512)))
        .await
        .unwrap();
    assert_eq!(k.lock().connects[0].block_size, 512);
    let e = d
        .attach("v2", Arc::new(MemVolume::new(MIB + 100)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::InvalidArgument);
    assert_eq!(k.lock().connects.len(), 1, "nothing sent to the kernel");
    // v2's failed attach left no export behind.
    d.attach("v2", Arc::new(MemVolume::new(MIB))).await.unwrap();
}

#[test]
fn the_reattach_plan_needs_a_configured_device_with_our_identifier() {
    let det = NbdDetail {
        index: 2,
        identifier: "volmig:v:1".into(),
        connections: 2,
        block_size: 4096,
    };
    let live = Some(DeviceStatus {
        index: 2,
        connected: true,
    });
    assert_eq!(
        plan_reattach(&det, live, Some("volmig:v:1")),
        ReattachPlan::Reconfigure
    );
    let refused = |p: ReattachPlan| match p {
        ReattachPlan::Refuse(k, _) => k,
        ReattachPlan::Reconfigure => panic!("reconfigured"),
    };
    assert_eq!(
        refused(plan_reattach(&det, live, Some("volmig:v:2"))),
        BlockErrorKind::Foreign
    );
    assert_eq!(
        refused(plan_reattach(&det, live, Some("rbd-nbd:pool/img"))),
        BlockErrorKind::Foreign
    );
    assert_eq!(
        refused(plan_reattach(&det, live, None)),
        BlockErrorKind::Foreign
    );
    assert_eq!(
        refused(plan_reattach(&det, None, None)),
        BlockErrorKind::Gone
    );
    let idle = Some(DeviceStatus {
        index: 2,
        connected: false,
    });
    assert_eq!(
        refused(plan_reattach(&det, idle, Some("volmig:v:1"))),
        BlockErrorKind::Gone
    );
}

#[test]
fn parameters_block_sizes_and_identifiers() {
    assert!(NbdParams::default().validate().is_ok());
    assert_eq!(NbdParams::default().io_timeout, Duration::ZERO);
    for bad in [
        NbdParams {
            connections: 0,
            ..NbdParams::default()
        },
        NbdParams {
            connections: MAX_CONNECTIONS + 1,
            ..NbdParams::default()
        },
        NbdParams {
            block_size: 1000,
            ..NbdParams::default()
        },
        NbdParams {
            block_size: 8192,
            ..NbdParams::default()
        },
        NbdParams {
            dead_conn_timeout: Duration::ZERO,
            ..NbdParams::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    assert_eq!(block_size_for(MIB, 4096), Some(4096));
    assert_eq!(block_size_for(MIB + 512, 4096), Some(512));
    assert_eq!(block_size_for(MIB + 1, 4096), None);
    assert_eq!(block_size_for(0, 4096), None);
    assert_eq!(identifier("pv-1", 0xab), "volmig:pv-1:00000000000000ab");
    assert!(reconfigure_retryable(&errno(libc::ENOSPC)));
    assert!(reconfigure_retryable(&errno(libc::EBUSY)));
    assert!(!reconfigure_retryable(&errno(libc::EINVAL)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_kernel_drops_is_replaced() {
    let k = Arc::new(FakeKernel::default());
    let d = driver(&k, 2);
    let vol = Arc::new(MemVolume::new(MIB));
    let a = d.attach("v1", vol.clone()).await.unwrap();
    k.drop_connection(0, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while k.lock().reconfigures.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the dropped connection was not replaced"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        let st = k.lock();
        let r = &st.reconfigures[0];
        assert_eq!(r.index, 0);
        assert_eq!(r.identifier, detail(&a).identifier);
        assert_eq!(r.sockets.len(), 1);
        assert_eq!(r.size, None, "nothing else changes");
    }
    // The new connection serves, the other one never stopped.
    let (e, _) = req(&k, 0, 1, (proto::CMD_WRITE, 0, 0, 512), vec![5; 512]).await;
    assert_eq!(e, 0);
    let (e, got) = req(&k, 0, 0, (proto::CMD_READ, 0, 0, 512), vec![]).await;
    assert_eq!((e, got), (0, vec![5; 512]));
    // Detach's own disconnect is not "healed".
    d.detach("v1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(k.lock().reconfigures.len(), 1);
    assert!(!k.connected(0));
}
