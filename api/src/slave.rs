//! The slave contract: what a master asks of a node agent, one method per
//! gRPC call. Implemented in-process by the agent itself and remotely by
//! the gRPC client, so the master's phase driver cannot tell them apart.

use std::future::Future;

/// Why a slave refused or failed a call. Each kind maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlaveError {
    /// The call's epoch is older than one the agent has seen (FAILED_PRECONDITION).
    #[error("fenced: {0}")]
    Fenced(String),
    /// Another operation runs on this volume (ABORTED).
    #[error("busy: {0}")]
    Busy(String),
    /// Unknown volume or session (NOT_FOUND).
    #[error("not found: {0}")]
    NotFound(String),
    /// A different session already owns the volume (ALREADY_EXISTS).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The request is wrong and repeating it will not help (INVALID_ARGUMENT).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The step cannot run in the session's current state (OUT_OF_RANGE).
    #[error("wrong state: {0}")]
    WrongState(String),
    /// The agent cannot be reached (UNAVAILABLE): retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The step failed (I/O error, verification mismatch...) (INTERNAL).
    #[error("failed: {0}")]
    Failed(String),
}

impl SlaveError {
    /// Worth retrying the same call later.
    pub fn is_transient(&self) -> bool {
        matches!(self, SlaveError::Unavailable(_) | SlaveError::Busy(_))
    }
}

impl From<SlaveError> for tonic::Status {
    fn from(e: SlaveError) -> Self {
        use tonic::Code;
        let (code, msg) = match e {
            SlaveError::Fenced(m) => (Code::FailedPrecondition, m),
            SlaveError::Busy(m) => (Code::Aborted, m),
            SlaveError::NotFound(m) => (Code::NotFound, m),
            SlaveError::AlreadyExists(m) => (Code::AlreadyExists, m),
            SlaveError::Invalid(m) => (Code::InvalidArgument, m),
            SlaveError::WrongState(m) => (Code::OutOfRange, m),
            SlaveError::Unavailable(m) => (Code::Unavailable, m),
            SlaveError::Failed(m) => (Code::Internal, m),
        };
        tonic::Status::new(code, msg)
    }
}

impl From<tonic::Status> for SlaveError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let m = s.message().to_string();
        match s.code() {
            Code::FailedPrecondition => SlaveError::Fenced(m),
            Code::Aborted => SlaveError::Busy(m),
            Code::NotFound => SlaveError::NotFound(m),
            Code::AlreadyExists => SlaveError::AlreadyExists(m),
            Code::InvalidArgument => SlaveError::Invalid(m),
            Code::OutOfRange => SlaveError::WrongState(m),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                SlaveError::Unavailable(format!("{}: {m}", s.code()))
            }
            _ => SlaveError::Failed(m),
        }
    }
}

pub type SlaveResult<T> = Result<T, SlaveError>;

/// Calls `$m!` with every slave call as `name(Request) -> Response;`: the
/// one list the [`Slave`] trait, its forwarding impls and the gRPC client
/// (`volmig_master::GrpcSlave`) are generated from, so a new agent RPC is
/// added in one place (plus its implementations).
#[macro_export]
macro_rules! slave_calls {
    ($m:ident) => {
        $m! {
            prepare($crate::agent::PrepareRequest) -> $crate::agent::SessionState;
            copy_pass($crate::agent::CopyPassRequest) -> $crate::agent::PassResult;
            set_mirror($crate::agent::SetMirrorRequest) -> $crate::agent::SessionState;
            quiesce($crate::agent::QuiesceRequest) -> $crate::agent::QuiesceResult;
            release($crate::agent::Step) -> $crate::agent::SessionState;
            synchronize($crate::agent::Step) -> $crate::agent::SessionState;
            redirect($crate::agent::RedirectRequest) -> $crate::agent::SessionState;
            resume($crate::agent::Step) -> $crate::agent::ResumeResult;
            terminate($crate::agent::TerminateRequest) -> $crate::agent::TerminateResult;
            abort($crate::agent::Step) -> $crate::agent::SessionState;
            set_bandwidth($crate::agent::SetBandwidthRequest) -> $crate::agent::SessionState;
            get_state($crate::agent::Step) -> $crate::agent::SessionState;
            take_dirty($crate::agent::TakeDirtyRequest) -> $crate::agent::DirtyBatch;
            merge_dirty($crate::agent::MergeDirtyRequest) -> $crate::agent::SessionState;
        }
    };
}

macro_rules! define_slave {
    ($($name:ident($req:ty) -> $res:ty;)*) => {
        /// One method per agent RPC; see `agent.proto` for their contracts.
        pub trait Slave: Send + Sync {
            $(fn $name(&self, r: $req) -> impl Future<Output = SlaveResult<$res>> + Send;)*
        }

        /// A shared slave is a slave.
        impl<T: Slave> Slave for std::sync::Arc<T> {
            $(fn $name(&self, r: $req) -> impl Future<Output = SlaveResult<$res>> + Send {
                (**self).$name(r)
            })*
        }
    };
}

slave_calls!(define_slave);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_roundtrip_through_grpc_status() {
        for e in [
            SlaveError::Fenced("a".into()),
            SlaveError::Busy("b".into()),
            SlaveError::NotFound("c".into()),
            SlaveError::AlreadyExists("d".into()),
            SlaveError::Invalid("e".into()),
            SlaveError::WrongState("f".into()),
            SlaveError::Failed("g".into()),
        ] {
            let s: tonic::Status = e.clone().into();
            assert_eq!(SlaveError::from(s), e);
        }
        assert!(SlaveError::from(tonic::Status::unavailable("x")).is_transient());
    }
}
