//! Why a CSI call failed: the gRPC code the CSI spec's tables prescribe
//! for the condition (chosen where the condition is detected, never from
//! a message's text), the call and volume it happened in, and a message
//! for people (kubelet shows it in the pod's events).

use std::fmt;

use volmig_api::{ErrorKind, SlaveError};

/// The CSI error codes this plugin answers with (shared with the
/// controller).
pub use volmig_api::csi_driver::CsiCode as Code;
use volmig_api::csi_driver::error_context;

/// A failed CSI call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsiError {
    pub code: Code,
    /// The RPC, set at the service boundary.
    pub op: Option<&'static str>,
    pub volume: Option<String>,
    pub message: String,
}

impl std::error::Error for CsiError {}

impl fmt::Display for CsiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&error_context(self.op, self.volume.as_deref()))?;
        f.write_str(&self.message)
    }
}

impl CsiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            op: None,
            volume: None,
            message: message.into(),
        }
    }

    /// A required field is missing.
    pub fn missing(field: &str) -> Self {
        Self::new(Code::InvalidArgument, format!("{field} is required"))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(Code::AlreadyExists, message)
    }

    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// Sets the RPC unless one is set.
    pub fn op(mut self, op: &'static str) -> Self {
        self.op.get_or_insert(op);
        self
    }

    /// Sets the volume unless one is set.
    pub fn volume(mut self, volume: &str) -> Self {
        self.volume.get_or_insert_with(|| volume.to_string());
        self
    }

    /// The agent's answer, as a CSI code: a device that cannot be opened
    /// or served is a precondition of the call (`Invalid`), and so is a
    /// migration that holds the volume (`InUse`); another operation on it
    /// is `ABORTED` (retry); the rest keeps its meaning.
    pub fn from_agent(e: SlaveError) -> Self {
        let code = match e.kind {
            ErrorKind::Invalid | ErrorKind::InUse | ErrorKind::WrongState => {
                Code::FailedPrecondition
            }
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::Busy => Code::Aborted,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Fenced | ErrorKind::Failed => Code::Internal,
        };
        let mut out = Self::new(code, e.message);
        out.volume = e.context.volume;
        out
    }
}

impl From<CsiError> for tonic::Status {
    fn from(e: CsiError) -> Self {
        tonic::Status::new(e.code.grpc(), e.to_string())
    }
}

pub type CsiResult<T> = Result<T, CsiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_kinds_become_csi_codes_and_the_context_is_said_once() {
        let e = CsiError::from_agent(
            SlaveError::new(ErrorKind::InUse, "held by migration session s1").volume("v"),
        )
        .op("NodeUnstageVolume")
        .volume("ignored");
        assert_eq!(e.code, Code::FailedPrecondition);
        assert_eq!(
            e.to_string(),
            "NodeUnstageVolume of volume v: held by migration session s1"
        );
        let s = tonic::Status::from(CsiError::missing("volume_id").op("NodeStageVolume"));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "NodeStageVolume: volume_id is required");
        for (kind, code) in [
            (ErrorKind::Busy, Code::Aborted),
            (ErrorKind::AlreadyExists, Code::AlreadyExists),
            (ErrorKind::Invalid, Code::FailedPrecondition),
            (ErrorKind::Failed, Code::Internal),
        ] {
            assert_eq!(CsiError::from_agent(SlaveError::new(kind, "x")).code, code);
        }
    }
}
