//! Memory-pressure safety of a user-space block device server. Reclaim may
//! write dirty pages back to the very device the agent serves; a server
//! thread that itself waits in reclaim for that writeback deadlocks. So:
//!
//! - the threads doing the device's I/O are I/O flushers
//!   (`PR_SET_IO_FLUSHER`: their allocations never recurse into I/O, as
//!   nbd and ublk servers do). It needs CAP_SYS_RESOURCE; without it this
//!   is a warning, once (the chart grants the capability);
//! - the agent's memory is locked after start-up
//!   (`mlockall(MCL_CURRENT | MCL_ONFAULT)`), so serving a request never
//!   waits for its own code or buffers to be paged in;
//! - volumes served as block devices should use O_DIRECT backing I/O
//!   (`--direct`): the server then allocates no page cache for its writes
//!   (measured: a buffered backing file deadlocks a 256 MiB memory cgroup,
//!   O_DIRECT does not).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

const PR_SET_IO_FLUSHER: libc::c_int = 57;
const PR_GET_IO_FLUSHER: libc::c_int = 58;

static WARNED: AtomicBool = AtomicBool::new(false);

/// Marks the calling thread an I/O flusher (PF_MEMALLOC_NOIO |
/// PF_LOCAL_THROTTLE).
pub fn set_io_flusher() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the calling thread is an I/O flusher.
pub fn is_io_flusher() -> io::Result<bool> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let r = unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r == 1)
}

/// [`set_io_flusher`] for an I/O thread: a failure is logged once per
/// process (it is the same for every thread), never fatal.
pub fn io_flusher_best_effort() {
    if let Err(e) = set_io_flusher()
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(error = %e,
            "cannot make I/O threads I/O flushers (PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE): \
             under memory pressure a kernel block device of this agent may deadlock in reclaim");
    }
}

/// Locks the process's current pages as they are touched
/// (`MCL_CURRENT | MCL_ONFAULT`; future mappings stay unlocked, so thread
/// stacks and allocator arenas made later do not count).
pub fn lock_memory() -> io::Result<()> {
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_ONFAULT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// VmLck of this process in KiB (/proc/self/status).
pub fn locked_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmLck:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_flusher_is_set_or_refused_for_lack_of_capability() {
        std::thread::spawn(|| match set_io_flusher() {
            Ok(()) => assert!(is_io_flusher().unwrap()),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        })
        .join()
        .unwrap();
    }
}
