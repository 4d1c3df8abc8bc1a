//! Limits both ends of a connection must agree on.

/// Largest gRPC message either way, set on the agent's server and every
/// master's client: a dirty map handed between the agents of a
/// multi-attach volume is 2 MiB per TiB at the default 64 KiB grain.
pub const MAX_MESSAGE: usize = 64 << 20;
