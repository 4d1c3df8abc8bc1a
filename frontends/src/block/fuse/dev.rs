//! The `/dev/fuse` transport: opening and mounting a connection, cloning
//! one descriptor per worker (`FUSE_DEV_IOC_CLONE`: each has its own queue
//! of requests in processing, so workers do not contend on one), the worker
//! loop that reads requests and writes answers, and notifications
//! (`FUSE_NOTIFY_RESEND` after a restart, invalidations).
//!
//! A worker runs on a dedicated I/O thread (`volmig_api::io::threads`)
//! with its own runtime. With nothing in flight it sleeps in a blocking
//! read (the kernel wakes one such reader per request; a stop wakes it
//! with a signal, see [`Sleepers`]); with requests in flight it polls the
//! descriptor through the thread's reactor, so it finishes them meanwhile.
//! It serves each request right there unless it waits; one that waits goes
//! on as a task, up to [`IN_FLIGHT`] at once, so one thread keeps many
//! requests in flight while the volume's I/O waits on the shared pool.
//! Large READs are answered by splicing ([`splice`](super::splice)).

use crate::block::mountinfo::MountEntry;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Semaphore, watch};
use volmig_api::io::VolumeIo;

use super::fs::{Fs, Out, Spliced};
use super::proto::{self, *};
use super::sleepers::Sleepers;

/// Requests one worker serves at once.
pub const IN_FLIGHT: usize = 64;
/// The file system type in /proc/self/mountinfo (`fuse.` + subtype).
pub const FSTYPE: &str = "fuse.volmig";

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// What became of an answer written to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The kernel completed the request with it.
    Taken,
    /// No request of that `unique` was waiting (see [`DevFd::reply`]).
    Orphaned,
}

/// One `/dev/fuse` descriptor of a connection.
#[derive(Debug)]
pub struct DevFd(OwnedFd);

impl AsRawFd for DevFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl From<OwnedFd> for DevFd {
    fn from(fd: OwnedFd) -> Self {
        DevFd(fd)
    }
}

impl DevFd {
    /// Opens `/dev/fuse` (a new connection once mounted).
    pub fn open() -> io::Result<DevFd> {
        // SAFETY: a NUL-terminated literal path; open returns a new
        // descriptor we own.
        let fd = cvt(unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
        // SAFETY: fd is fresh and owned by nobody else.
        Ok(DevFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Another descriptor of `master`'s connection, with its own
    /// processing queue.
    pub fn clone_of(master: &DevFd) -> io::Result<DevFd> {
        let fd = DevFd::open()?;
        let m = master.as_raw_fd() as u32;
        // SAFETY: FUSE_DEV_IOC_CLONE reads a u32 descriptor number from the
        // pointer, which points at a live u32.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), FUSE_DEV_IOC_CLONE, &m as *const u32) })?;
        Ok(fd)
    }

    pub fn owned(&self) -> &OwnedFd {
        &self.0
    }

    /// Reads block until a request comes (`true`) or fail with EAGAIN when
    /// none is there (`false`, as for polling).
    pub fn set_blocking(&self, blocking: bool) -> io::Result<()> {
        // SAFETY: fcntl on our descriptor with integer arguments.
        let fl = cvt(unsafe { libc::fcntl(self.as_raw_fd(), libc::F_GETFL) })?;
        let fl = if blocking {
            fl & !libc::O_NONBLOCK
        } else {
            fl | libc::O_NONBLOCK
        };
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(self.as_raw_fd(), libc::F_SETFL, fl) })?;
        Ok(())
    }

    /// Writes the answer to request `unique`: [`Answer::Taken`], or
    /// [`Answer::Orphaned`] when the kernel no longer waits for it (ENOENT:
    /// it gave up on the request, or queued it again under another
    /// `unique`, so the request was or will be served twice).
    pub fn reply(&self, unique: u64, out: &Out) -> io::Result<Answer> {
        let (error, data) = match out {
            Out::None => return Ok(Answer::Taken),
            Out::Err(e) => (-e, &[][..]),
            other => (0, other.bytes()),
        };
        let h = OutHeader {
            len: (size_of::<OutHeader>() + data.len()) as u32,
            error,
            unique,
        };
        let hb = proto::bytes(&h);
        let iov = [
            libc::iovec {
                iov_base: hb.as_ptr() as *mut libc::c_void,
                iov_len: hb.len(),
            },
            libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            },
        ];
        let n = if data.is_empty() { 1 } else { 2 };
        // SAFETY: both iovecs point into live buffers (`h`, `data`) of the
        // lengths given.
        let r = unsafe { libc::writev(self.as_raw_fd(), iov.as_ptr(), n) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(Answer::Orphaned),
                _ => Err(e),
            };
        }
        Ok(Answer::Taken)
    }

    /// Writes a notification (see [`proto::notification`]).
    pub fn notify(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: msg is a live buffer of msg.len() bytes.
        let n = unsafe { libc::write(self.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != msg.len() {
            return Err(io::Error::other("short notification write"));
        }
        Ok(())
    }

    /// Asks the kernel to queue again every request read from this
    /// connection and not answered (FUSE_NOTIFY_RESEND, Linux 6.9+): what
    /// the agent that died was serving.
    pub fn notify_resend(&self) -> io::Result<()> {
        self.notify(&proto::notification(NOTIFY_RESEND, &[], &[]))
    }

    /// The kernel forgets the cached attributes of `ino` (its size).
    pub fn notify_inval_inode(&self, ino: u64) -> io::Result<()> {
        let body = NotifyInvalInode {
            ino,
            off: -1,
            len: 0,
        };
        self.notify(&proto::notification(
            NOTIFY_INVAL_INODE,
            proto::bytes(&body),
            &[],
        ))
    }

    /// The kernel forgets the cached name `name` in the root directory.
    pub fn notify_inval_entry(&self, name: &str) -> io::Result<()> {
        let body = NotifyInvalEntry {
            parent: ROOT_ID,
            namelen: name.len() as u32,
            flags: 0,
        };
        let mut tail = name.as_bytes().to_vec();
        tail.push(0);
        self.notify(&proto::notification(
            NOTIFY_INVAL_ENTRY,
            proto::bytes(&body),
            &tail,
        ))
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Mounts the connection of `fd` at `at` (root only).
pub fn mount(fd: &DevFd, at: &Path) -> io::Result<()> {
    let target = cpath(at)?;
    let data = CString::new(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
        fd.as_raw_fd()
    ))
    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fstype = CString::new(FSTYPE).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    cvt(unsafe {
        libc::mount(
            c"volmig".as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    })?;
    Ok(())
}

/// Detaches the mount at `at` (lazily: users keep what they hold).
pub fn unmount_lazy(at: &Path) -> io::Result<()> {
    let target = cpath(at)?;
    // SAFETY: target is a NUL-terminated string that outlives the call.
    cvt(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) })?;
    Ok(())
}

/// The mount on top at `at` now.
pub fn find_mount(at: &Path) -> Option<MountEntry> {
    crate::block::mountinfo::find(at)
}

/// A descriptor polled by a worker's reactor; holding it keeps it open.
struct Polled(Arc<DevFd>);

impl AsRawFd for Polled {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Reads one request: its first [`WRITE_HEAD`] bytes into `head`, the
/// rest into `body` (so a WRITE's data is at the start of `body`).
fn read_request(fd: RawFd, head: &mut [u8; WRITE_HEAD], body: &mut [u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: body.as_mut_ptr().cast(),
            iov_len: body.len(),
        },
    ];
    // SAFETY: both iovecs point into live, exclusively borrowed buffers of
    // the lengths given.
    let n = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// What a worker's read got.
enum Got {
    /// A request of this many bytes.
    Request(usize),
    /// Nothing to read now (poll).
    Nothing,
    /// The connection is over, or the worker must stop.
    End,
}

/// Reads a request in a blocking read, woken by a request or by a signal
/// (see [`Sleepers`]) to look at `stop`.
fn read_asleep(
    fd: &DevFd,
    head: &mut [u8; WRITE_HEAD],
    body: &mut [u8],
    stop: &watch::Receiver<bool>,
) -> io::Result<Got> {
    loop {
        if *stop.borrow() {
            return Ok(Got::End);
        }
        match read_request(fd.as_raw_fd(), head, body) {
            Ok(n) => return Ok(Got::Request(n)),
            Err(e) => match e.raw_os_error() {
                // Woken to look at `stop`, or the request was aborted
                // before we got it.
                Some(libc::EINTR) | Some(libc::ENOENT) => continue,
                // Unmounted or aborted: the connection is over.
                Some(libc::ENODEV) | Some(libc::ECONNABORTED) => return Ok(Got::End),
                Some(libc::EAGAIN) => return Ok(Got::Nothing),
                _ => return Err(e),
            },
        }
    }
}

/// Reads a request when the thread's reactor says one is there.
async fn read_polled(
    afd: &AsyncFd<Polled>,
    head: &mut [u8; WRITE_HEAD],
    body: &mut [u8],
    stop: &mut watch::Receiver<bool>,
) -> io::Result<Got> {
    loop {
        let mut ready = tokio::select! {
            r = afd.readable() => r?,
            _ = stop.wait_for(|s| *s) => return Ok(Got::End),
        };
        match ready.try_io(|inner| read_request(inner.get_ref().as_raw_fd(), head, body)) {
            Ok(Ok(n)) => return Ok(Got::Request(n)),
            Ok(Err(e)) => match e.raw_os_error() {
                // Interrupted, or the request was aborted before we got it.
                Some(libc::EINTR) | Some(libc::ENOENT) => continue,
                // Unmounted or aborted: the connection is over.
                Some(libc::ENODEV) | Some(libc::ECONNABORTED) => return Ok(Got::End),
                _ => return Err(e),
            },
            Err(_would_block) => continue,
        }
    }
}

/// Serves requests from `fd` until the connection ends (unmounted or
/// aborted: ENODEV) or `stop`. Runs on a dedicated I/O thread's runtime.
pub async fn serve<V: VolumeIo>(
    fs: Arc<Fs<V>>,
    fd: Arc<DevFd>,
    mut stop: watch::Receiver<bool>,
    sleepers: Arc<Sleepers>,
) -> io::Result<()> {
    // Until the loop ends, a stop wakes this thread from a blocking read.
    let registered = sleepers.register();
    // SAFETY: Polled owns (a share of) the descriptor, so it stays open and
    // the same for the AsyncFd's whole life; as_raw_fd always returns it.
    let afd = unsafe { AsyncFd::register_with_interest(Polled(fd.clone()), Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let limit = Arc::new(Semaphore::new(IN_FLIGHT));
    // Room for the largest request, as the kernel demands (its data plus
    // a page for the headers).
    let max_write = fs.params().map_or(1 << 20, |p| p.max_write).max(1 << 20) as usize;
    let mut body = vec![0u8; max_write + 4096 - WRITE_HEAD];
    super::pool::prefault(&mut body);
    let mut head = [0u8; WRITE_HEAD];
    tracing::debug!(fd = fd.as_raw_fd(), "FUSE worker serving");
    // Whether the descriptor is in blocking mode now (it starts not).
    let mut blocking = false;
    let ended = loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
            _ = stop.wait_for(|s| *s) => break Ok(()),
        };
        // Nothing of this worker's in flight: it sleeps in a blocking read,
        // of which the kernel wakes one per request (polling readers are
        // all woken), and nothing else on this thread needs to run.
        let idle = limit.available_permits() == IN_FLIGHT - 1;
        if idle != blocking {
            fd.set_blocking(idle)?;
            blocking = idle;
        }
        let got = if idle {
            read_asleep(&fd, &mut head, &mut body, &stop)?
        } else {
            Got::Nothing
        };
        let got = match got {
            Got::Nothing => read_polled(&afd, &mut head, &mut body, &mut stop).await?,
            got => got,
        };
        let Got::Request(n) = got else {
            break Ok(());
        };
        let Some(h) = proto::read::<InHeader>(&head[..n.min(WRITE_HEAD)]) else {
            continue;
        };
        let len = (h.len as usize).min(n);
        let hlen = size_of::<InHeader>();
        let (arg, data, slot) = if h.opcode == WRITE {
            if len < WRITE_HEAD {
                continue;
            }
            // Waits when every buffer is in use: the kernel queues meanwhile.
            let (mut data, slot) = fs.pool.get(len - WRITE_HEAD).await;
            data.copy_from_slice(&body[..len - WRITE_HEAD]);
            (Arg::inline(&head[hlen..WRITE_HEAD]), Some(data), Some(slot))
        } else if len <= WRITE_HEAD {
            (Arg::inline(&head[hlen..len.max(hlen)]), None, None)
        } else {
            let mut a = head[hlen..].to_vec();
            a.extend_from_slice(&body[..len - WRITE_HEAD]);
            (Arg::Heap(a), None, None)
        };
        let (fs, fd) = (fs.clone(), fd.clone());
        let mut request = Box::pin(async move {
            answer(&fs, &fd, &h, arg.bytes(), data).await;
            drop((slot, permit));
        });
        // Served right here when it does not wait (a write the interposer
        // does inline, a read the page cache holds): no task to schedule
        // and no turn of the reactor before the answer. A request that
        // waits (the shared pool, a range lock) goes on as a task.
        let first = std::future::poll_fn(|cx| Poll::Ready(request.as_mut().poll(cx))).await;
        if first.is_pending() {
            tokio::spawn(request);
        }
    };
    // No more signals: the requests finishing here must not see EINTR.
    drop(registered);
    // Let the requests in flight finish (bounded: a stop must end).
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        limit.acquire_many(IN_FLIGHT as u32),
    )
    .await;
    ended
}

async fn answer<V: VolumeIo>(
    fs: &Fs<V>,
    fd: &DevFd,
    h: &InHeader,
    arg: &[u8],
    data: Option<Vec<u8>>,
) {
    if h.opcode == INIT {
        let (out, params) = fs.init(arg);
        if let Err(e) = fd.reply(h.unique, &out) {
            tracing::error!(error = %e, "cannot answer FUSE INIT");
            return;
        }
        if let Some(p) = params {
            tracing::info!(
                max_write = p.max_write,
                max_pages = p.max_pages,
                flags = format_args!("{:#x}", p.flags),
                resend = p.kernel_resends(),
                "FUSE connection initialized"
            );
            fs.adopt(p);
        }
        return;
    }
    let spliced = match h.opcode {
        READ => fs.read_spliced(h, arg, fd).await,
        _ => None,
    };
    let (answered, out) = match spliced {
        Some(Spliced::Answered(Err(e))) => {
            // The spliced answer could not be made, or the kernel refused
            // it, most likely before taking the request (a malformed
            // answer): answer it the buffered way rather than leave it
            // waiting. Had the kernel taken it and failed it itself, this
            // answer finds no request (an orphaned answer, logged below).
            tracing::warn!(unique = h.unique, error = %e,
                "no spliced READ answer; answering it from a buffer");
            let out = fs.dispatch(h, arg, data).await;
            (fd.reply(h.unique, &out), out)
        }
        Some(Spliced::Answered(a)) => (a, Out::None),
        Some(Spliced::Failed(out)) => (fd.reply(h.unique, &out), out),
        None => {
            let out = fs.dispatch(h, arg, data).await;
            (fd.reply(h.unique, &out), out)
        }
    };
    match answered {
        Ok(Answer::Taken) => {}
        Ok(Answer::Orphaned) => {
            // A write served twice can land after a newer one: never
            // expected (the re-send after a restart happens before any
            // worker reads), so loud.
            fs.stats
                .orphaned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                opcode = h.opcode,
                unique = h.unique,
                "the kernel no longer waited for this answer (the request was given up or re-queued)"
            );
        }
        Err(e) => tracing::warn!(opcode = h.opcode, error = %e, "cannot answer a FUSE request"),
    }
    if let Out::Data(buf, slot) = out {
        fs.pool.put(buf);
        drop(slot);
    }
}

/// A request's arguments: inline for the data path's (at most 40 bytes:
/// no allocation while serving I/O), on the heap for the rest.
enum Arg {
    Inline([u8; WRITE_HEAD - size_of::<InHeader>()], usize),
    Heap(Vec<u8>),
}

impl Arg {
    fn inline(b: &[u8]) -> Arg {
        let mut a = [0u8; WRITE_HEAD - size_of::<InHeader>()];
        let n = b.len().min(a.len());
        a[..n].copy_from_slice(&b[..n]);
        Arg::Inline(a, n)
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Arg::Inline(a, n) => &a[..*n],
            Arg::Heap(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_mountinfo_has_the_root() {
        assert!(find_mount(Path::new("/")).is_some());
    }
}
