//! volmig frontends: how a workload reaches a volume. A frontend serves
//! any [`VolumeIo`](volmig_api::io::VolumeIo) (in the agent, a volume's
//! interposer) and knows nothing of migrations.
//!
//! - [`nbd`]: the NBD server and a small client, for clients that speak NBD.
//! - [`block`]: kernel block devices of the node (FUSE + loop; kernel NBD
//!   and ublk beside it), one interface, the same I/O-thread policy
//!   ([`volmig_api::io::threads`]).

pub mod block;
pub mod nbd;
