//! NBD (Network Block Device) frontend: protocol, server and a small client.
//!
//! - [`proto`]: wire constants and pure encode/parse functions.
//! - [`server`]: [`NbdServer`] with named exports over unix sockets and TCP,
//!   generic over the [`VolumeIo`](volmig_api::io::VolumeIo) an export
//!   serves; each connection on its own dedicated I/O thread (up to
//!   [`MAX_CONNECTION_THREADS`], see [`volmig_api::io::threads`]), where a
//!   backend may block briefly.
//! - [`client`]: [`NbdClient`], a minimal client for tools, tests and benches.

pub mod bufpool;
pub mod client;
pub mod error;
mod handshake;
pub mod proto;
pub mod server;
mod transmission;

pub use client::{ClientOptions, ExportInfo, NbdClient};
pub use error::NbdError;
pub use server::{Export, ListenAddr, MAX_CONNECTION_THREADS, NbdServer, ServerHandle};
pub use transmission::{MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES};
