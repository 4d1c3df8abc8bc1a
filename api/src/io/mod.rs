//! The frontend-neutral I/O contract: what a volume offers to whatever
//! serves it to a workload (the NBD server today, kernel block devices
//! later). The interposer implements [`VolumeIo`]; a frontend is generic
//! over it. The frontend knows nothing of migrations; the interposer knows
//! nothing of the frontend's protocol.
//!
//! [`block`] names the kinds of kernel block device a volume can be
//! served as (the drivers are `volmig_frontends::block`).
//!
//! [`threads`] is the I/O-thread policy both sides share: where a request
//! may block, and the bounded pool that takes the I/O that may not.

pub mod block;
pub mod threads;

pub use block::{BlockChoice, BlockKind};

use std::future::Future;
use std::io;

/// One run of the volume's allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// No storage is allocated.
    pub hole: bool,
    /// Reads return zeroes.
    pub zero: bool,
}

/// A volume as a frontend sees it. All offsets and lengths are already
/// checked by the frontend against `size()` before a call is made.
///
/// Buffers are passed by value and handed back so the frontend can pool them
/// (no per-request allocation of large buffers on the hot path).
pub trait VolumeIo: Send + Sync + 'static {
    /// Size of the volume in bytes.
    fn size(&self) -> u64;
    /// Fill all of `buf` from `offset`; returns the buffer.
    fn read(&self, offset: u64, buf: Vec<u8>) -> impl Future<Output = io::Result<Vec<u8>>> + Send;
    /// Write all of `buf` at `offset`; with `fua` the data is durable on return.
    /// Returns the buffer for reuse.
    fn write(
        &self,
        offset: u64,
        buf: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = io::Result<Vec<u8>>> + Send;
    /// Make every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Discard a range (reads afterwards return zeroes).
    fn trim(&self, offset: u64, length: u64) -> impl Future<Output = io::Result<()>> + Send;
    /// Write zeroes over a range; `may_trim` allows deallocating it.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        may_trim: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Reads `[offset, offset+length)` straight from the descriptor that
    /// holds it now, if the volume can offer one: calls `f` with that
    /// descriptor and the range's offset in it, and keeps the range where
    /// it is until `f` returns (no cutover in between), so a frontend can
    /// move the data without copying it through a buffer (`splice`). `f`
    /// may wait for the disk: it is only called on a thread that may (see
    /// [`threads::may_wait_long`]). `None`: no such descriptor (O_DIRECT,
    /// a thread that must not wait, ...); use [`read`](Self::read). An
    /// `Err` from `f` is the descriptor's read failing.
    fn read_by_fd<R, F>(
        &self,
        offset: u64,
        length: u64,
        f: F,
    ) -> impl Future<Output = Option<io::Result<R>>> + Send
    where
        R: Send,
        F: FnOnce(std::os::fd::BorrowedFd<'_>, u64) -> io::Result<R> + Send,
    {
        let _ = (offset, length, f);
        std::future::ready(None)
    }

    /// Allocation map of `[offset, offset+length)`; extents must cover at
    /// least one byte from `offset` and lie inside the volume.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send;
}
