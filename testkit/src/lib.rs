//! volmig's one test kit, shared by every integration test of the
//! workspace (the cross-crate ones in `tests/`, and those that stay in a
//! crate). Not published.
//!
//! - [`binaries`]: the `volmig-agent` and `volmig` binaries of this build,
//!   always built first (a test never runs a stale binary).
//! - [`process`], [`net`], [`tools`], [`devices`], [`fio`]: child guards,
//!   free ports, external tools (a missing one fails the test naming its
//!   Debian package), loop devices and mounts, fio's verdicts.
//! - [`cgroup`]: a memory cgroup with a limit (v1 or v2).
//! - [`sqlite`]: a database as a workload (WAL, synchronous=FULL, one insert
//!   per transaction) and the check that every committed row is there.
//! - [`certs`]: mutual-TLS certificates, made by `volmig certs`.
//! - [`fswriter`]: a writer of files in a mounted filesystem, with the
//!   model every file is checked against.
//! - [`csi`]: the CSI node plugin as kubelet drives it: a client over its
//!   socket, kubelet's requests, and a plugin to drive.
//! - [`pattern`]: the block pattern, pattern and sparse files, the
//!   [`Expected`](pattern::Expected) image every test checks devices
//!   against, and the [`Writer`](pattern::Writer) that records each
//!   acknowledged write in it.
//! - [`mem`]: a volume in memory (a `VolumeIo` without an interposer).
//! - [`agent`]: a `volmig-agent serve` process (with kernel block devices
//!   if asked), and an in-process agent; [`keeper`]: its descriptor keeper.
//! - [`master`]: a migration driven by the `volmig migrate` process, or by
//!   an in-process `volmig_master::Driver`.
//! - [`lab`]: a directory of volumes, agents and one local master.
//! - [`fake_api`], [`k8s`]: the in-memory Kubernetes API server and the
//!   objects of a small cluster.
//!
//! Everything here panics on failure with a message saying what went
//! wrong: it is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: failing loudly is the point

pub mod agent;
pub mod binaries;
pub mod certs;
pub mod cgroup;
pub mod csi;
pub mod devices;
pub mod fake_api;
pub mod fio;
pub mod fswriter;
pub mod k8s;
pub mod keeper;
pub mod lab;
pub mod master;
pub mod mem;
pub mod net;
pub mod pattern;
pub mod process;
pub mod sqlite;
pub mod tools;

pub use mem::MemVolume;
pub use pattern::{BLOCK, Expected, MIB, Writer, WriterOpts, fill};
pub use process::{ChildGuard, killed};
pub use tools::{
    Out, require_bin, require_fuse, require_root, require_staging, run, run_cmd, run_ok, wait_until,
};
