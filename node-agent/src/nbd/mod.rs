//! NBD frontend (being written).
mod backend;
pub use backend::{ExportBackend, Extent};
