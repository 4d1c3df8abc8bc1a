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

/// The body of `GET path` from the HTTP server at `addr` (a metrics
/// endpoint); panics unless it answers 200.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("asking {addr} for {path}: {e}"));
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("reading {path} from {addr}: {e}"));
    assert!(out.starts_with("HTTP/1.1 200"), "{path} from {addr}: {out}");
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => String::new(),
    }
}

/// The value of the sample `name` (labels included, as in the text) in
/// Prometheus/OpenMetrics `text`.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}
