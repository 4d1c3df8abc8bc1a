//! volmig master: drives sessions through the eight phases by calling node
//! agents (slaves), keeping each session's record (the communication data
//! set) in a [`SessionStore`]: a state file locally, the VolumeMigration
//! status in a cluster. A [`Supervisor`] runs the drivers of one master
//! (the operator, or `volmig migrate`): admission, bandwidth pool, start,
//! stop and wait.

pub mod admission;
pub mod bandwidth;
pub mod cutover;
pub mod driver;
pub mod error;
pub mod group;
pub mod group_run;
pub mod grpc_slave;
pub mod multi_attach;
pub mod record;
pub mod recovery;
pub mod session;
pub mod store;
pub mod supervisor;
#[cfg(test)]
mod testing;

pub use admission::{Slot, Slots};
pub use bandwidth::{BandwidthPool, fair_shares};
pub use cutover::{Cutover, Gate, MidCutover, Solo};
pub use driver::{Driver, DriverConfig, StopSignal};
pub use error::{MasterError, Result};
pub use group::{Barrier, GroupCoord, InGroup, Verdict};
pub use group_run::{Member, create_group};
pub use grpc_slave::{ClientTls, GrpcSlave};
pub use multi_attach::MultiAttach;
pub use record::{PhaseTime, SessionRecord, now_ms};
pub use session::{create_session, request_abort, set_bandwidth};
pub use store::{FileStore, SessionStore};
pub use supervisor::{Admission, Ended, Job, Supervisor};
pub use volmig_api::fault;
pub use volmig_api::{SessionConfig, Verify};
