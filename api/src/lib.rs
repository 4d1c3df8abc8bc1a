//! Types shared by the master (operator, `volmig migrate`) and the node
//! agents (slaves): the phase machine and the agent gRPC API; and, between
//! a volume's interposer and its frontends, the I/O contract ([`io`]).

#[cfg(feature = "crd")]
pub mod crd;
pub mod io;
pub mod phase;
pub mod slave;
pub mod units;

/// The agent (slave) API, generated from `proto/volmig/agent/v1/agent.proto`.
pub mod agent {
    #![allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
    tonic::include_proto!("volmig.agent.v1");
}

pub use phase::{
    BadTransition, CopyMode, Event, Phase, Policy, Progress, Transition, estimate, transition,
};
pub use slave::{Slave, SlaveError, SlaveResult};
