//! Allocation runs of a backing device, from `SEEK_DATA` / `SEEK_HOLE`.

/// A run of the device that is either allocated data or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub length: u64,
    /// True when the run is a hole (reads as zeroes, no storage allocated).
    pub hole: bool,
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}
