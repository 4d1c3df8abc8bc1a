//! The volume module: backing devices (regular files or block devices) with
//! positional I/O, flush, trim, write-zeroes and allocation (sparse) queries.

mod backing;
mod segments;
mod span_locks;

pub use backing::{BackingDevice, DeviceKind, OpenMode};
pub use segments::Segment;
