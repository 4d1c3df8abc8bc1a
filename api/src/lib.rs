//! Types shared by the master (operator, `volmig migrate`) and the node
//! agents (slaves): the phase machine, a session's settings, the slave
//! contract in domain types with its one protobuf boundary, the fault
//! hooks the crash tests use; between a volume's interposer and its
//! frontends, the I/O contract ([`io`]); and the CSI protocol ([`csi`]).

pub mod config;
#[cfg(feature = "crd")]
pub mod crd;
pub mod csi_driver;
pub mod fault;
pub mod io;
pub mod limits;
pub mod phase;
pub mod report;
pub mod slave;
pub mod tls;
pub mod units;

/// The agent API's protobuf messages and gRPC stubs, generated from
/// `proto/volmig/agent/v1/agent.proto`. Only the gRPC client and server
/// use them; everything else speaks [`slave`]'s domain types.
pub mod wire {
    #![allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
    tonic::include_proto!("volmig.agent.v1");
}

/// The Container Storage Interface v1.9 (`proto/csi/v1/csi.proto`, the
/// upstream file unmodified): messages and the Identity, Controller, Node
/// and GroupController services, servers and clients. The agent serves
/// Identity and Node (`csi.volmig.io`'s node plugin); the controller
/// will serve Identity and Controller.
pub mod csi {
    #![allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
    tonic::include_proto!("csi.v1");
}

pub use config::{SessionConfig, Verify};
pub use phase::{
    BadTransition, CopyMode, Event, Phase, Policy, Progress, Transition, estimate, transition,
};
pub use slave::{ErrorKind, Fence, Slave, SlaveError, SlaveResult};
