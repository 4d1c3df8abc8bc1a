//! Why a controller call failed: a kind chosen where the condition is
//! detected (never from a message's text), the call and volume it
//! happened in, and a message for people (the sidecars put it in the
//! claim's and VolumeAttachment's events). Mapped to the gRPC code the
//! CSI spec prescribes once, at the service boundary ([`Kind::grpc`]).

/// What went wrong, as far as the caller needs to know: the CSI code
/// (shared with the node plugin).
pub use volmig_api::csi_driver::CsiCode as Kind;
use volmig_api::csi_driver::error_context;

/// A failed controller call.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", error_context(*op, volume.as_deref()))]
pub struct ControllerError {
    pub kind: Kind,
    /// The RPC, set at the service boundary.
    pub op: Option<&'static str>,
    pub volume: Option<String>,
    pub message: String,
}

impl ControllerError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            op: None,
            volume: None,
            message: message.into(),
        }
    }

    pub fn missing(field: &str) -> Self {
        Self::new(Kind::InvalidArgument, format!("{field} is required"))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, message)
    }

    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(Kind::AlreadyExists, message)
    }

    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(Kind::FailedPrecondition, message)
    }

    /// Not yet: the caller retries.
    pub fn pending(message: impl Into<String>) -> Self {
        Self::new(Kind::Aborted, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }

    /// Sets the RPC unless one is set.
    pub fn op(mut self, op: &'static str) -> Self {
        self.op.get_or_insert(op);
        self
    }

    /// Sets the volume unless one is set.
    pub fn volume(mut self, volume: &str) -> Self {
        if !volume.is_empty() {
            self.volume.get_or_insert_with(|| volume.to_string());
        }
        self
    }
}

/// The API server failed us: retry (a conflict too, since every call
/// reads again and is idempotent).
impl From<kube::Error> for ControllerError {
    fn from(e: kube::Error) -> Self {
        Self::new(Kind::Unavailable, format!("Kubernetes API: {e}"))
    }
}

impl From<ControllerError> for tonic::Status {
    fn from(e: ControllerError) -> Self {
        tonic::Status::new(e.kind.grpc(), e.to_string())
    }
}

pub type ControllerResult<T> = Result<T, ControllerError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_the_kind_and_the_context_is_said_once() {
        let s = tonic::Status::from(
            ControllerError::missing("name")
                .op("CreateVolume")
                .op("ignored"),
        );
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "CreateVolume: name is required");
        let e = ControllerError::pending("backing claim b is Pending")
            .volume("vm-1")
            .op("CreateVolume");
        assert_eq!(
            e.to_string(),
            "CreateVolume of volume vm-1: backing claim b is Pending"
        );
        assert_eq!(e.kind.grpc(), tonic::Code::Aborted);
    }
}
