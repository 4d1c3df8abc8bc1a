//! READ answers spliced from the volume's backing file: the reply's data
//! goes page cache -> pipe (page references, no copy) -> the request's
//! pages (the one copy), where a buffered answer copies twice (page cache
//! -> the agent's buffer -> the request's pages). For large reads the
//! copies are most of the agent's work.
//!
//! The kernel takes a spliced answer only whole: header and data in the
//! pipe at once. Each worker thread has its own pipe, as large as an
//! unprivileged process may make it (`/proc/sys/fs/pipe-max-size`, 1 MiB
//! by default); a read whose pages do not fit (the header takes a slot of
//! its own) is answered the buffered way.

use std::cell::OnceCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::rc::Rc;

use super::dev::{Answer, DevFd};
use super::proto::{self, OutHeader};

/// Reads below this are answered the buffered way: their copies cost
/// less than the splices' system calls, and a small read that misses the
/// page cache goes to the shared pool instead of blocking a worker.
pub const MIN_LEN: usize = 64 << 10;
/// The pipe size asked for (the unprivileged ceiling by default).
const PIPE_SIZE: usize = 1 << 20;
const PAGE: u64 = 4096;

/// A worker thread's pipe for spliced answers.
#[derive(Debug)]
pub struct ReplyPipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Pipe buffers: each holds one page's worth at most.
    slots: usize,
}

thread_local! {
    static PIPE: OnceCell<Option<Rc<ReplyPipe>>> = const { OnceCell::new() };
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl ReplyPipe {
    /// This thread's pipe, made at first use; `None` when none can be
    /// made (answers are then buffered).
    pub fn this_thread() -> Option<Rc<ReplyPipe>> {
        PIPE.with(|p| {
            p.get_or_init(|| match ReplyPipe::new() {
                Ok(p) => Some(Rc::new(p)),
                Err(e) => {
                    tracing::info!(error = %e, "no pipe for spliced FUSE answers; reads are copied");
                    None
                }
            })
            .clone()
        })
    }

    fn new() -> io::Result<ReplyPipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the live array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on our descriptor with integer arguments.
        let size = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ReplyPipe {
            read,
            write,
            slots: size as usize / PAGE as usize,
        })
    }

    /// Whether an answer of `length` bytes read from `offset` fits the
    /// pipe whole: a slot for the header, one per page the data spans.
    pub fn fits(&self, offset: u64, length: usize) -> bool {
        let first = offset / PAGE;
        let end = offset + length as u64;
        let pages = end.div_ceil(PAGE) - first;
        // One slot for the header.
        (pages as usize) < self.slots
    }

    /// Answers request `unique` with `length` bytes of `src` at `offset`.
    /// The outer `Err` is `src`'s read failing (nothing was answered); the
    /// inner result is what became of the answer (an `Err` there: the
    /// kernel did not take it, or it could not be made; answer it
    /// otherwise).
    pub fn answer(
        &self,
        dev: &DevFd,
        unique: u64,
        src: BorrowedFd<'_>,
        offset: u64,
        length: usize,
    ) -> io::Result<io::Result<Answer>> {
        let total = size_of::<OutHeader>() + length;
        let h = OutHeader {
            len: total as u32,
            error: 0,
            unique,
        };
        let filled = self.fill(proto::bytes(&h), src, offset, length);
        if let Err(e) = filled {
            self.drain();
            if e.kind() == io::ErrorKind::WouldBlock {
                // A full pipe (cannot be: `fits`), or a kernel whose
                // non-blocking splice would not wait for the disk: not the
                // file failing. Nothing was answered; the caller answers
                // from a buffer.
                return Ok(Err(e));
            }
            return Err(e);
        }
        // SAFETY: both descriptors are live; null offsets (pipe, device).
        let r = unsafe {
            libc::splice(
                self.read.as_raw_fd(),
                std::ptr::null_mut(),
                dev.as_raw_fd(),
                std::ptr::null_mut(),
                total,
                0,
            )
        };
        let sent = match cvt(r) {
            Ok(n) if n == total => Ok(Answer::Taken),
            Ok(n) => Err(io::Error::other(format!(
                "the kernel took {n} of a {total} byte answer"
            ))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Answer::Orphaned),
            Err(e) => Err(e),
        };
        // Whatever the kernel did not take must not prefix the next answer.
        self.drain();
        Ok(sent)
    }

    /// The header, then the data spliced from `src`.
    fn fill(
        &self,
        header: &[u8],
        src: BorrowedFd<'_>,
        offset: u64,
        length: usize,
    ) -> io::Result<()> {
        // SAFETY: header is a live buffer of header.len() bytes.
        let n = cvt(unsafe {
            libc::write(self.write.as_raw_fd(), header.as_ptr().cast(), header.len())
        })?;
        if n != header.len() {
            return Err(io::Error::other("short header write into the pipe"));
        }
        let mut off = offset as libc::loff_t;
        let mut left = length;
        while left > 0 {
            // SAFETY: `off` is a live loff_t the kernel advances; the pipe
            // end and `src` are live descriptors.
            let r = unsafe {
                libc::splice(
                    src.as_raw_fd(),
                    &mut off,
                    self.write.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            match cvt(r) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => left -= n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Empties the pipe (after a failure, or what the kernel left).
    fn drain(&self) {
        let mut scratch = [0u8; 4096];
        loop {
            // SAFETY: scratch is a live buffer of its length; the pipe is
            // non-blocking, so this ends at EAGAIN once it is empty.
            let r = unsafe {
                libc::read(
                    self.read.as_raw_fd(),
                    scratch.as_mut_ptr().cast(),
                    scratch.len(),
                )
            };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if r < 0 && e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_fits_when_its_pages_and_the_header_do() {
        let p = ReplyPipe::new().unwrap();
        // 1 MiB unless /proc/sys/fs/pipe-max-size is lower.
        let n = p.slots as u64;
        assert!(n >= 2, "{n} slots");
        assert!(p.fits(0, (n as usize - 1) * 4096));
        assert!(!p.fits(0, n as usize * 4096), "the header takes a slot");
        assert!(
            !p.fits(512, (n as usize - 1) * 4096),
            "an unaligned start spans one page more"
        );
        assert!(p.fits(512, (n as usize - 2) * 4096));
        assert!(p.fits(4095, 1) && p.fits(4095, 2), "one or two pages");
    }
}
