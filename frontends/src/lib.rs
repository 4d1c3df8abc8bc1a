//! volmig frontends: how a workload reaches a volume. A frontend serves
//! any [`VolumeIo`](volmig_api::io::VolumeIo) (in the agent, a volume's
//! interposer) and knows nothing of migrations.
//!
//! - [`nbd`]: the NBD server and a small client.
//! - [`block`]: kernel block devices behind one interface
//!   ([`block::BlockDriver`]): kernel NBD over netlink, ublk, FUSE + loop.
//!
//! All of them share the I/O-thread policy of [`volmig_api::io::threads`].

pub mod block;
pub mod nbd;
