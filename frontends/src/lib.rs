//! volmig frontends: how a workload reaches a volume. A frontend serves
//! any [`VolumeIo`](volmig_api::io::VolumeIo) (in the agent, a volume's
//! interposer) and knows nothing of migrations.
//!
//! - [`nbd`]: the NBD server and a small client (today's frontend).
//!
//! Kernel block devices (FUSE + loop, ublk, kernel NBD) come later, beside
//! it, over the same interface and the same I/O-thread policy
//! ([`volmig_api::io::threads`]).

pub mod nbd;
