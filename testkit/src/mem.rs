//! A volume in memory ([`MemVolume`]): a `VolumeIo` for frontend tests that
//! need no interposer, with a 4 KiB allocation map (a block is a hole until
//! written), counters of what reached it, and a size that can grow.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use volmig_api::io::{Extent, VolumeIo};

/// The allocation map's block size.
pub const MEM_BLOCK: u64 = 4096;

#[derive(Debug, Default)]
pub struct MemCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// Writes with FUA (force unit access) set.
    pub fua_writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    /// Reads answered from the descriptor (`read_by_fd`).
    pub fd_reads: AtomicU64,
    /// The offsets of those reads (someone else, udev say, may read the
    /// device too: tests look at the ranges they read).
    pub fd_read_offsets: Mutex<Vec<u64>>,
}

#[derive(Debug)]
struct State {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

/// A volume in memory.
#[derive(Debug)]
pub struct MemVolume {
    st: Mutex<State>,
    size: AtomicU64,
    pub counters: MemCounters,
    /// See [`offering_fd`](Self::offering_fd).
    fd: Option<std::fs::File>,
}

impl MemVolume {
    /// `size` bytes of zeroes, all holes.
    pub fn new(size: u64) -> Self {
        Self::with_data(vec![0; size as usize], false)
    }

    /// These bytes, allocated or not.
    pub fn with_data(data: Vec<u8>, allocated: bool) -> Self {
        let size = data.len() as u64;
        Self {
            st: Mutex::new(State {
                allocated: vec![allocated; size.div_ceil(MEM_BLOCK) as usize],
                data,
            }),
            size: AtomicU64::new(size),
            counters: MemCounters::default(),
            fd: None,
        }
    }

    /// How many reads from the descriptor started in `[start, end)`.
    pub fn fd_reads_in(&self, start: u64, end: u64) -> usize {
        self.fd_read_offsets()
            .iter()
            .filter(|o| (start..end).contains(*o))
            .count()
    }

    fn fd_read_offsets(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.counters
            .fd_read_offsets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Offers its data through a descriptor too (`read_by_fd`), as a
    /// volume on a buffered file does: a memfd the range is copied into
    /// before each such read.
    pub fn offering_fd(mut self) -> Self {
        // SAFETY: a NUL-terminated literal name; memfd_create returns a
        // new descriptor we own.
        let fd = unsafe { libc::memfd_create(c"volmig-mem".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: fd is fresh and owned by nobody else.
        self.fd = Some(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the bytes.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let st = self.lock();
        st.data[offset as usize..offset as usize + len].to_vec()
    }

    /// The volume grows (zeroes, holes) to `size`.
    pub fn grow(&self, size: u64) {
        let mut st = self.lock();
        assert!(size >= st.data.len() as u64, "volumes only grow");
        st.data.resize(size as usize, 0);
        st.allocated
            .resize(size.div_ceil(MEM_BLOCK) as usize, false);
        self.size.store(size, Ordering::SeqCst);
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        // A frontend promises to check ranges: make violations visible.
        assert!(
            offset + len <= self.size(),
            "the frontend passed an out-of-range request: {offset}+{len} > {}",
            self.size()
        );
        Ok(())
    }

    fn mark(st: &mut State, offset: u64, len: u64, allocated: bool) {
        let (first, last) = if allocated {
            (offset / MEM_BLOCK, (offset + len).div_ceil(MEM_BLOCK))
        } else {
            // Only whole blocks become holes.
            (offset.div_ceil(MEM_BLOCK), (offset + len) / MEM_BLOCK)
        };
        for b in first..last {
            st.allocated[b as usize] = allocated;
        }
    }
}

impl VolumeIo for MemVolume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        self.check(offset, buf.len() as u64)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let st = self.lock();
        let (o, n) = (offset as usize, buf.len());
        buf.copy_from_slice(&st.data[o..o + n]);
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: Vec<u8>, fua: bool) -> io::Result<Vec<u8>> {
        self.check(offset, buf.len() as u64)?;
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.counters.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        let mut st = self.lock();
        let o = offset as usize;
        st.data[o..o + buf.len()].copy_from_slice(&buf);
        Self::mark(&mut st, offset, buf.len() as u64, true);
        Ok(buf)
    }

    async fn read_by_fd<R, F>(&self, offset: u64, length: u64, f: F) -> Option<io::Result<R>>
    where
        R: Send,
        F: FnOnce(std::os::fd::BorrowedFd<'_>, u64) -> io::Result<R> + Send,
    {
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;
        let file = self.fd.as_ref()?;
        if !volmig_api::io::threads::may_wait_long() {
            return None;
        }
        if let Err(e) = self.check(offset, length) {
            return Some(Err(e));
        }
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.fd_reads.fetch_add(1, Ordering::Relaxed);
        self.fd_read_offsets().push(offset);
        // Held while `f` reads: no write changes the range meanwhile.
        let st = self.lock();
        let (o, n) = (offset as usize, length as usize);
        if let Err(e) = file.write_all_at(&st.data[o..o + n], offset) {
            return Some(Err(e));
        }
        Some(f(file.as_fd(), offset))
    }

    async fn flush(&self) -> io::Result<()> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check(offset, length)?;
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        st.data[offset as usize..(offset + length) as usize].fill(0);
        Self::mark(&mut st, offset, length, false);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool) -> io::Result<()> {
        self.check(offset, length)?;
        self.counters.zeroes.fetch_add(1, Ordering::Relaxed);
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
            let blk = pos / MEM_BLOCK;
            let blk_end = ((blk + 1) * MEM_BLOCK).min(end);
            let hole = !st.allocated[blk as usize];
            let len = blk_end - pos;
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += len,
                _ => out.push(Extent {
                    length: len,
                    hole,
                    zero: hole,
                }),
            }
            pos = blk_end;
        }
        Ok(out)
    }
}
