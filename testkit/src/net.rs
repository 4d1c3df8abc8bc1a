//! Ports for the processes a test starts.

use std::net::{SocketAddr, TcpListener};

/// A TCP port of 127.0.0.1 free right now. Another process may take it
/// before the test's server binds it: servers started on one retry (see
/// `agent::AgentBuilder::start`).
pub fn free_port() -> u16 {
    free_addr().port()
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
}
