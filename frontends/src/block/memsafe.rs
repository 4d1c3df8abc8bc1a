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

/// The agent's allocator: the system's, except that allocations of whole
/// pages (a multiple of 4 KiB) are page-aligned. Request buffers (sized by
/// powers of two from 4 KiB) then go to an O_DIRECT backing device as they
/// are, without a bounce buffer (a copy, and memory touched on the I/O
/// path). Installed by the agent binary (`#[global_allocator]`).
pub struct PageAligned;

const PAGE: usize = 4096;

/// The layout actually allocated for `l`.
fn page_layout(l: std::alloc::Layout) -> std::alloc::Layout {
    if l.size() >= PAGE && l.size().is_multiple_of(PAGE) && l.align() < PAGE {
        std::alloc::Layout::from_size_align(l.size(), PAGE).unwrap_or(l)
    } else {
        l
    }
}

// SAFETY: every call goes to `System` with the layout `page_layout` makes
// of the caller's, a pure function of size and alignment: dealloc and
// realloc see the same layout alloc used, and alignments only grow, so
// every block satisfies the caller's layout.
unsafe impl std::alloc::GlobalAlloc for PageAligned {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's layout has a non-zero size; page_layout
        // keeps the size and only raises the alignment.
        unsafe { std::alloc::System.alloc(page_layout(l)) }
    }

    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as in alloc.
        unsafe { std::alloc::System.alloc_zeroed(page_layout(l)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, l: std::alloc::Layout) {
        // SAFETY: ptr came from alloc with page_layout(l), the same layout.
        unsafe { std::alloc::System.dealloc(ptr, page_layout(l)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, l: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let old = page_layout(l);
        let Ok(wanted) = std::alloc::Layout::from_size_align(new_size, l.align()) else {
            return std::ptr::null_mut();
        };
        let new = page_layout(wanted);
        if new.align() == old.align() {
            // SAFETY: ptr was allocated with `old`; the new size with old's
            // alignment is `new`, a valid layout (checked above).
            return unsafe { std::alloc::System.realloc(ptr, old, new_size) };
        }
        // SAFETY: `new` has a non-zero size (a realloc's new size is).
        let p = unsafe { std::alloc::System.alloc(new) };
        if !p.is_null() {
            // SAFETY: both blocks are live and at least min(old, new)
            // bytes long; distinct allocations do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, p, old.size().min(new_size)) };
            // SAFETY: ptr was allocated with `old`.
            unsafe { std::alloc::System.dealloc(ptr, old) };
        }
        p
    }
}

#[cfg(test)]
mod alloc_tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout};

    #[test]
    fn whole_pages_are_page_aligned_and_the_rest_unchanged() {
        assert_eq!(
            page_layout(Layout::from_size_align(8192, 1).unwrap()).align(),
            4096
        );
        assert_eq!(
            page_layout(Layout::from_size_align(4100, 1).unwrap()).align(),
            1
        );
        assert_eq!(
            page_layout(Layout::from_size_align(64, 8).unwrap()).align(),
            8
        );
        let a = PageAligned;
        let l = Layout::from_size_align(1 << 20, 1).unwrap();
        // SAFETY: a non-zero layout; the block is used within its size
        // and freed with the layout it has after the realloc.
        unsafe {
            let p = a.alloc_zeroed(l);
            assert_eq!(p as usize % 4096, 0);
            *p.add(5) = 7;
            // Shrinking to a size that is no whole number of pages moves it.
            let q = a.realloc(p, l, 5000);
            assert_eq!(*q.add(5), 7, "contents kept");
            let r = a.realloc(q, Layout::from_size_align(5000, 1).unwrap(), 16384);
            assert_eq!((r as usize % 4096, *r.add(5)), (0, 7));
            a.dealloc(r, Layout::from_size_align(16384, 1).unwrap());
        }
    }
}
