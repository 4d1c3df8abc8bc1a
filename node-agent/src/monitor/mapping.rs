//! Word storage for the dirty map: a `MAP_SHARED` mapping of a checkpoint
//! file (survives a SIGKILL of the agent: the pages stay in the page cache)
//! or plain heap memory when the session has no state directory.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::AtomicU64;

pub(super) enum Words {
    Heap(Box<[AtomicU64]>),
    Mapped {
        ptr: *mut AtomicU64,
        words: usize,
        _file: File,
    },
}

// SAFETY: the mapping is only accessed through `AtomicU64`s, which are Sync;
// the pointer stays valid until Drop unmaps it.
unsafe impl Send for Words {}
// SAFETY: see Send: all shared access is atomic.
unsafe impl Sync for Words {}

impl Words {
    pub(super) fn heap(words: usize) -> Self {
        Words::Heap((0..words).map(|_| AtomicU64::new(0)).collect())
    }

    /// Maps `words` u64 words of `file` (already sized to at least that).
    pub(super) fn map(file: File, words: usize) -> io::Result<Self> {
        let len = words * 8;
        if len == 0 {
            return Ok(Words::heap(0));
        }
        // SAFETY: mapping a file we own, shared and read/write, at an address
        // of the kernel's choosing; the result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Words::Mapped {
            ptr: ptr.cast::<AtomicU64>(),
            words,
            _file: file,
        })
    }

    pub(super) fn as_slice(&self) -> &[AtomicU64] {
        match self {
            Words::Heap(b) => b,
            // SAFETY: ptr is page aligned (so 8-byte aligned), points at
            // `words` u64s mapped read/write for the life of self, and
            // AtomicU64 has the same layout as u64.
            Words::Mapped { ptr, words, .. } => unsafe { std::slice::from_raw_parts(*ptr, *words) },
        }
    }

    /// Asks the kernel to write the mapping back (host-crash durability;
    /// a process crash never needs it).
    pub(super) fn sync(&self) -> io::Result<()> {
        if let Words::Mapped { ptr, words, .. } = self {
            // SAFETY: msync over exactly the range we mapped.
            let r = unsafe { libc::msync(ptr.cast(), *words * 8, libc::MS_SYNC) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        if let Words::Mapped { ptr, words, .. } = self {
            // SAFETY: unmapping exactly the range mapped in `map`; no
            // references into it outlive self.
            unsafe {
                libc::munmap(ptr.cast(), *words * 8);
            }
        }
    }
}
