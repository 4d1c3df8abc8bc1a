//! Dedicated I/O threads: a frontend may serve a stream of requests (an NBD
//! connection, a kernel queue) on its own OS thread with its own
//! single-threaded tokio runtime, like one of nbdkit's request threads. A
//! request on that thread may do short blocking device I/O right where it
//! was parsed (a 4 KiB `pwrite` into the page cache), with no hand-off to a
//! pool thread and back: blocking there holds up only this thread's
//! requests, never the process's shared runtime (gRPC, control socket,
//! copier, other frontends' requests).
//!
//! I/O that may take long (a read that misses the page cache, `fdatasync`,
//! a write waiting for a copier's range lock) still goes to the shared
//! blocking pool through [`spawn_blocking`], which every thread, dedicated
//! or not, reaches: so the pool's bound (`--io-threads`) holds for the
//! whole process. One exception: a thread that is one of several serving
//! one queue ([`share_queue`]: the FUSE workers of a connection) may also
//! flush right where the request came in ([`may_wait_long`]): the others
//! serve the queue meanwhile, and a flush saves two thread hand-offs.
//!
//! A frontend bounds its dedicated threads with [`Slots`]; requests beyond
//! the bound are served on the shared runtime, where [`may_block`] is false
//! and every blocking call goes to the pool.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

thread_local! {
    /// On a dedicated I/O thread: the shared runtime, whose blocking pool
    /// takes the long I/O.
    static SHARED: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

/// True on a dedicated I/O thread: the caller may block it briefly.
pub fn may_block() -> bool {
    SHARED.with(|s| s.borrow().is_some())
}

thread_local! {
    /// See [`share_queue`].
    static SHARES_QUEUE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Says that this dedicated I/O thread is one of several taking requests
/// from one queue (a kernel device's: the FUSE workers of a connection), so
/// while it waits long (an `fdatasync`) the others go on serving the
/// queue. Then [`may_wait_long`] is true here.
pub fn share_queue() {
    SHARES_QUEUE.with(|s| s.set(true));
}

/// True on a dedicated I/O thread that shares its queue (see
/// [`share_queue`]): a request may do long blocking I/O (a flush) right
/// here instead of handing it to the pool and back. Not on a thread that
/// alone serves its stream (an NBD connection): its other requests would
/// all wait.
pub fn may_wait_long() -> bool {
    may_block() && SHARES_QUEUE.with(|s| s.get())
}

/// Runs `f` on the shared blocking pool (bounded by `--io-threads`), from
/// any thread: a dedicated I/O thread's own runtime has no pool of its own
/// to use.
pub fn spawn_blocking<F, R>(f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let shared = SHARED.with(|s| s.borrow().clone());
    match shared {
        Some(h) => h.spawn_blocking(f),
        None => tokio::task::spawn_blocking(f),
    }
}

/// Counts the dedicated I/O threads of one frontend (one server, say); a
/// slot is taken for a thread's whole life.
#[derive(Debug)]
pub struct Slots {
    used: AtomicUsize,
    max: AtomicUsize,
}

/// One dedicated I/O thread's place in its [`Slots`], given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    /// Room for at most `max` dedicated threads at once.
    pub fn new(max: usize) -> Self {
        Slots {
            used: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    /// A slot, unless the most threads allowed are running.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max.load(Ordering::Relaxed);
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(Slot(self.clone())),
                Err(now) => cur = now,
            }
        }
    }

    /// At most `max` dedicated threads from now on (0: none; running
    /// ones are not stopped).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Starts a dedicated I/O thread named `name` that runs `work` (given its
/// input, moved in) to completion on a fresh single-threaded runtime.
/// `shared` is the runtime whose blocking pool takes the long I/O. Returns
/// the input back if no thread or runtime could be made (the caller then
/// serves it on the shared runtime), else a receiver that resolves when the
/// thread is done.
pub fn spawn_dedicated<T, F, Fut>(
    name: impl Into<String>,
    slot: Slot,
    shared: Handle,
    input: T,
    work: F,
) -> Result<tokio::sync::oneshot::Receiver<()>, (T, std::io::Error)>
where
    T: Send + 'static,
    F: FnOnce(T) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Err((input, e)),
    };
    // The input goes through a slot the thread empties, so a failed spawn
    // can hand it back.
    let cell = Arc::new(std::sync::Mutex::new(Some(input)));
    let theirs = cell.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let input = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(input) = input {
                SHARED.with(|s| *s.borrow_mut() = Some(shared));
                rt.block_on(work(input));
            }
            // Tasks left on the runtime end here, and the slot is free
            // before anyone is told the thread is done.
            drop(rt);
            drop(slot);
            let _ = done_tx.send(());
        });
    match spawned {
        Ok(_) => Ok(done_rx),
        Err(e) => {
            let input = cell.lock().unwrap_or_else(|p| p.into_inner()).take();
            match input {
                Some(input) => Err((input, e)),
                // Unreachable in practice: a thread that never started
                // cannot have taken the input; report it as served.
                None => Ok(done_rx),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 128;

    #[test]
    fn slots_are_bounded_and_returned() {
        let slots = Arc::new(Slots::new(MAX));
        let held: Vec<Slot> = (0..MAX).map(|_| slots.take().unwrap()).collect();
        assert!(slots.take().is_none(), "one slot too many");
        assert_eq!(slots.in_use(), MAX);
        drop(held);
        assert_eq!(slots.in_use(), 0);
        assert!(slots.take().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn dedicated_threads_may_block_and_reach_the_shared_pool() {
        assert!(!may_block(), "the shared runtime must not block");
        let slots = Arc::new(Slots::new(MAX));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done = spawn_dedicated(
            "io-test",
            slots.take().unwrap(),
            Handle::current(),
            tx,
            |tx| async move {
                let inline = may_block();
                // Alone on its stream until it says it shares a queue.
                let long_alone = may_wait_long();
                share_queue();
                let long_shared = may_wait_long();
                // The pool is the shared runtime's: its threads are no
                // dedicated I/O threads.
                let pooled = spawn_blocking(|| (may_block(), may_wait_long()))
                    .await
                    .unwrap();
                let _ = tx.send((inline, long_alone, long_shared, pooled));
            },
        )
        .map_err(|(_, e)| e)
        .unwrap();
        let (inline, long_alone, long_shared, pooled) = rx.await.unwrap();
        done.await.unwrap();
        assert!(inline, "a dedicated I/O thread may block");
        assert!(!long_alone, "but not long while it alone serves its stream");
        assert!(long_shared, "long, once others serve its queue meanwhile");
        assert_eq!(pooled, (false, false), "pool threads are shared ones");
        share_queue();
        assert!(!may_wait_long(), "the shared runtime never waits long");
        assert_eq!(slots.in_use(), 0, "the slot is returned at the end");
    }
}
