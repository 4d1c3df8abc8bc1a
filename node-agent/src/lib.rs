//! volmig node agent: the data plane of a live volume migration.
//!
//! Workload I/O reaches a volume's [`interposer`] through a frontend (the
//! `volmig-frontends` crate, over `volmig_api::io::VolumeIo`); the
//! [`monitor`] records writes in a dirty map; the [`copy`] module moves data
//! from source to target; a [`session`] is the agent's half of a
//! migration, whose phases a master drives; the [`agent`] holds the volumes
//! (served at runtime, see [`serving`]) and sessions of one node and is a
//! slave only (`slave_api`, over gRPC in [`grpc`]).

pub mod agent;
pub mod copy;
pub mod csi;
pub mod error;
pub mod grpc;
pub mod interposer;
pub mod metrics;
pub mod monitor;
pub mod serving;
pub mod session;
pub mod session_args;
pub mod slave_api;
pub mod state_file;
pub use volmig_api::units;
pub mod volume;

pub use error::{AgentError, Result};
