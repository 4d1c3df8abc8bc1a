//! What an NBD export serves: the contract between the NBD frontend and the
//! interposer. The frontend knows nothing of migrations; the interposer knows
//! nothing of NBD.

use std::future::Future;
use std::io;

/// One run of the volume's allocation map, as `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// No storage is allocated (NBD_STATE_HOLE).
    pub hole: bool,
    /// Reads return zeroes (NBD_STATE_ZERO).
    pub zero: bool,
}

/// A volume as the frontend sees it. All offsets and lengths are already
/// checked by the frontend against `size()` before a call is made.
///
/// Buffers are passed by value and handed back so the frontend can pool them
/// (no per-request allocation of large buffers on the hot path).
pub trait ExportBackend: Send + Sync + 'static {
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
    /// Allocation map of `[offset, offset+length)`; extents must cover at
    /// least one byte from `offset` and lie inside the volume.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send;
}
