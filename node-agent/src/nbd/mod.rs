//! NBD (Network Block Device) frontend: protocol, server and a small client.
//!
//! - [`proto`]: wire constants and pure encode/parse functions.
//! - [`server`]: [`NbdServer`] with named exports over unix sockets and TCP.
//! - [`client`]: [`NbdClient`], a minimal client for tools, tests and benches.
//! - [`backend`]: the [`ExportBackend`] contract an export implements.
//! - [`conn_thread`]: connections on their own threads, where a backend may
//!   block briefly.

pub mod backend;
pub mod bufpool;
pub mod client;
pub mod conn_thread;
pub mod error;
mod handshake;
pub mod proto;
pub mod server;
mod transmission;

pub use backend::{ExportBackend, Extent};
pub use client::{ClientOptions, ExportInfo, NbdClient};
pub use error::NbdError;
pub use server::{Export, ListenAddr, NbdServer, ServerHandle};
pub use transmission::{MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES};
