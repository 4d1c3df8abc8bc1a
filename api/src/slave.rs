//! The slave contract: what a master asks of a node agent, one method per
//! gRPC call. Implemented in-process by the agent itself and remotely by
//! the gRPC client, so the master's phase driver cannot tell them apart.

use std::future::Future;

use crate::agent::{
    CopyPassRequest, DirtyBatch, MergeDirtyRequest, PassResult, PrepareRequest, QuiesceRequest,
    QuiesceResult, RedirectRequest, ResumeResult, SessionState, SetBandwidthRequest,
    SetMirrorRequest, Step, TakeDirtyRequest, TerminateRequest, TerminateResult,
};

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

/// One method per agent RPC; see `agent.proto` for their contracts.
pub trait Slave: Send + Sync {
    fn prepare(&self, r: PrepareRequest) -> impl Future<Output = SlaveResult<SessionState>> + Send;
    fn copy_pass(&self, r: CopyPassRequest)
    -> impl Future<Output = SlaveResult<PassResult>> + Send;
    fn set_mirror(
        &self,
        r: SetMirrorRequest,
    ) -> impl Future<Output = SlaveResult<SessionState>> + Send;
    fn quiesce(&self, r: QuiesceRequest)
    -> impl Future<Output = SlaveResult<QuiesceResult>> + Send;
    fn release(&self, r: Step) -> impl Future<Output = SlaveResult<SessionState>> + Send;
    fn synchronize(&self, r: Step) -> impl Future<Output = SlaveResult<SessionState>> + Send;
    fn redirect(
        &self,
        r: RedirectRequest,
    ) -> impl Future<Output = SlaveResult<SessionState>> + Send;
    fn resume(&self, r: Step) -> impl Future<Output = SlaveResult<ResumeResult>> + Send;
    fn terminate(
        &self,
        r: TerminateRequest,
    ) -> impl Future<Output = SlaveResult<TerminateResult>> + Send;
    fn abort(&self, r: Step) -> impl Future<Output = SlaveResult<SessionState>> + Send;
    fn set_bandwidth(
        &self,
        r: SetBandwidthRequest,
    ) -> impl Future<Output = SlaveResult<SessionState>> + Send;
    fn get_state(&self, r: Step) -> impl Future<Output = SlaveResult<SessionState>> + Send;
    fn take_dirty(
        &self,
        r: TakeDirtyRequest,
    ) -> impl Future<Output = SlaveResult<DirtyBatch>> + Send;
    fn merge_dirty(
        &self,
        r: MergeDirtyRequest,
    ) -> impl Future<Output = SlaveResult<SessionState>> + Send;
}

macro_rules! forward {
    ($($name:ident($req:ty) -> $res:ty;)*) => {
        /// A shared slave is a slave.
        impl<T: Slave> Slave for std::sync::Arc<T> {
            $(fn $name(&self, r: $req) -> impl Future<Output = SlaveResult<$res>> + Send {
                (**self).$name(r)
            })*
        }
    };
}

forward! {
    prepare(PrepareRequest) -> SessionState;
    copy_pass(CopyPassRequest) -> PassResult;
    set_mirror(SetMirrorRequest) -> SessionState;
    quiesce(QuiesceRequest) -> QuiesceResult;
    release(Step) -> SessionState;
    synchronize(Step) -> SessionState;
    redirect(RedirectRequest) -> SessionState;
    resume(Step) -> ResumeResult;
    terminate(TerminateRequest) -> TerminateResult;
    abort(Step) -> SessionState;
    set_bandwidth(SetBandwidthRequest) -> SessionState;
    get_state(Step) -> SessionState;
    take_dirty(TakeDirtyRequest) -> DirtyBatch;
    merge_dirty(MergeDirtyRequest) -> SessionState;
}

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
