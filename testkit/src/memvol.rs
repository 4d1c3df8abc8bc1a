//! [`MemVolume`]: a volume in memory, for frontend tests that need a
//! [`VolumeIo`] without an agent (the block drivers' unit tests).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use volmig_api::io::{Extent, VolumeIo};

/// A volume of `size` bytes in memory; counts flushes and FUA writes.
#[derive(Debug)]
pub struct MemVolume {
    data: Mutex<Vec<u8>>,
    size: AtomicU64,
    pub flushes: AtomicU64,
    pub fua_writes: AtomicU64,
}

impl MemVolume {
    pub fn new(size: u64) -> Self {
        MemVolume {
            data: Mutex::new(vec![0; size as usize]),
            size: AtomicU64::new(size),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
        }
    }

    /// A copy of `len` bytes at `offset`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let d = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        d[offset as usize..offset as usize + len].to_vec()
    }

    /// Grows (or shrinks) the volume to `size` bytes.
    pub fn resize(&self, size: u64) {
        let mut d = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        d.resize(size as usize, 0);
        self.size.store(size, Ordering::SeqCst);
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.size())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(offset as usize..end as usize)
    }
}

impl VolumeIo for MemVolume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let r = self.range(offset, buf.len() as u64)?;
        let d = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        buf.copy_from_slice(&d[r]);
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: Vec<u8>, fua: bool) -> io::Result<Vec<u8>> {
        let r = self.range(offset, buf.len() as u64)?;
        self.data.lock().unwrap_or_else(PoisonError::into_inner)[r].copy_from_slice(&buf);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(buf)
    }

    async fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.write_zeroes(offset, length, true).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, _may_trim: bool) -> io::Result<()> {
        let r = self.range(offset, length)?;
        self.data.lock().unwrap_or_else(PoisonError::into_inner)[r].fill(0);
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.range(offset, length)?;
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }
}
