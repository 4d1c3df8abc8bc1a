//! The copy module: moves dirty ranges from one backing device to the other
//! in parallel chunks, sparse aware and throttled.

mod copier;
mod throttle;

pub use copier::{Copier, CopyConfig, CopyStats, PassReport};
pub use throttle::Throttle;
