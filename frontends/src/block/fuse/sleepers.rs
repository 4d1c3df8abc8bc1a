//! FUSE workers asleep in a blocking read of `/dev/fuse`, and how to wake
//! them when they must stop.
//!
//! An idle worker reads its descriptor with a blocking `read` (see
//! `dev::serve`): the kernel wakes exactly one such reader per request (an
//! exclusive wait), where readers polling the descriptor are all woken and
//! all but one find nothing, and the request is answered without a turn of
//! the worker's reactor. Such a reader does not see its stop signal, so
//! whoever stops the workers also sends each a signal (`SIGURG`, with a
//! handler that does nothing, installed without `SA_RESTART`): its `read`
//! fails with EINTR, and it looks at the stop signal. The signal may come
//! just before a worker enters its `read`, so it is repeated until every
//! worker has left.

use std::sync::{Arc, Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

/// The signal that interrupts a sleeping reader. Ignored by default, used
/// by nothing else in the agent (Go's runtime picks it for the same
/// reason).
const WAKE: libc::c_int = libc::SIGURG;
/// How often the signal is repeated until every worker has left.
const REPEAT: Duration = Duration::from_millis(10);
/// After this, the workers still registered are left alone (logged).
const GIVE_UP: Duration = Duration::from_secs(10);

extern "C" fn interrupted(_: libc::c_int) {}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
        // handler is an extern "C" fn that does nothing (async-signal-safe)
        // and lives for the whole process.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = interrupted as *const () as libc::sighandler_t;
            // No SA_RESTART: the interrupted read fails with EINTR.
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(WAKE, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            tracing::error!(error = %std::io::Error::last_os_error(),
                "cannot install the FUSE workers' wake-up handler");
        }
    });
}

/// The worker threads of one connection that may sleep in a `read`.
#[derive(Debug, Default)]
pub struct Sleepers {
    threads: Mutex<Vec<libc::pthread_t>>,
}

/// Registered while it lives: the thread may be signalled.
#[derive(Debug)]
pub struct Registered {
    sleepers: Arc<Sleepers>,
    thread: libc::pthread_t,
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Under the lock the signaller holds while it signals: once this
        // returns, this thread is signalled no more (it may exit).
        let mut t = self
            .sleepers
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = t.iter().position(|&x| x == self.thread) {
            t.swap_remove(i);
        }
    }
}

impl Sleepers {
    pub fn new() -> Arc<Self> {
        install_handler();
        Arc::new(Self::default())
    }

    /// Registers the calling thread until the guard is dropped (drop it on
    /// the same thread, before the thread ends).
    pub fn register(self: &Arc<Self>) -> Registered {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(thread);
        Registered {
            sleepers: self.clone(),
            thread,
        }
    }

    /// Signals every registered thread once; returns how many there were.
    pub fn wake_all(&self) -> usize {
        let t = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        for &thread in t.iter() {
            // SAFETY: a registered thread is alive: it deregisters under
            // this lock before it ends, and we hold the lock.
            unsafe { libc::pthread_kill(thread, WAKE) };
        }
        t.len()
    }

    /// Signals the registered threads until none is left (or
    /// [`GIVE_UP`]), from a thread of its own: callable from `Drop`.
    pub fn wake_until_gone(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("fuse-wake".into())
            .spawn(move || {
                let start = Instant::now();
                while me.wake_all() > 0 {
                    if start.elapsed() > GIVE_UP {
                        tracing::warn!(
                            left = me.wake_all(),
                            "FUSE workers did not stop after their wake-up signals"
                        );
                        return;
                    }
                    std::thread::sleep(REPEAT);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the thread that wakes the FUSE workers");
            self.wake_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread asleep in a blocking read of a pipe wakes with EINTR and
    /// leaves; the waker stops once it has.
    #[test]
    fn a_sleeping_reader_is_woken_and_deregisters() {
        let sleepers = Sleepers::new();
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the live array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let s = sleepers.clone();
        let reader = std::thread::spawn(move || {
            let _reg = s.register();
            let mut b = [0u8; 1];
            // SAFETY: b is a live buffer of one byte.
            let r = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
            (r, std::io::Error::last_os_error().raw_os_error())
        });
        while sleepers.threads.lock().unwrap().is_empty() {
            std::thread::yield_now();
        }
        sleepers.wake_until_gone();
        let (r, errno) = reader.join().unwrap();
        assert_eq!((r, errno), (-1, Some(libc::EINTR)));
        let t0 = Instant::now();
        while sleepers.wake_all() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "still registered");
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: both descriptors are ours and open.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
