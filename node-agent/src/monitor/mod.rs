//! The monitor: records which regions of a volume were written since they
//! were last copied (the dirty map), durably across an agent crash.

mod dirty_map;
mod mapping;

pub use dirty_map::{COPY_SLOTS, DirtyMap, DirtyRun, MapOrigin};
