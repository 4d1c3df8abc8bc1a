//! Why a slave refused or failed a call: a kind the master acts on, the
//! context it happened in (session, volume, agent, operation) and a message
//! for people. The master decides on the kind and the context, never on the
//! message's text.

use std::fmt;

/// What went wrong, as far as the caller must act on it. Each kind has one
/// gRPC code (and travels by name beside it, see `wire`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The call's epoch is older than one the agent has seen.
    Fenced,
    /// Another operation runs on this volume: retry.
    Busy,
    /// Unknown volume or session.
    NotFound,
    /// A different session already owns the volume, or the volume is
    /// already served differently.
    AlreadyExists,
    /// The request is wrong and repeating it will not help.
    Invalid,
    /// The step cannot run in the session's current state.
    WrongState,
    /// The volume is in use (a migration session holds it, or its kernel
    /// block device is mounted or open).
    InUse,
    /// The agent cannot be reached: retry.
    Unavailable,
    /// The step failed (I/O error, verification mismatch...).
    Failed,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Fenced,
        ErrorKind::Busy,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Invalid,
        ErrorKind::WrongState,
        ErrorKind::InUse,
        ErrorKind::Unavailable,
        ErrorKind::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Fenced => "Fenced",
            ErrorKind::Busy => "Busy",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::AlreadyExists => "AlreadyExists",
            ErrorKind::Invalid => "Invalid",
            ErrorKind::WrongState => "WrongState",
            ErrorKind::InUse => "InUse",
            ErrorKind::Unavailable => "Unavailable",
            ErrorKind::Failed => "Failed",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an error happened. Every field is optional: each layer adds what
/// it knows (the agent its volume and session, the master's multi-attach
/// fan-out the agent's address).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorContext {
    pub op: Option<String>,
    pub volume: Option<String>,
    pub session: Option<String>,
    /// The agent's address (as the master knows it).
    pub agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaveError {
    pub kind: ErrorKind,
    /// Boxed: errors travel in every `Result` of the contract, and most
    /// are never made.
    pub context: Box<ErrorContext>,
    /// What happened, for people: never parsed.
    pub message: String,
}

impl std::error::Error for SlaveError {}

impl fmt::Display for SlaveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.context;
        let mut wrote = false;
        if let Some(op) = &c.op {
            write!(f, "{op}")?;
            wrote = true;
        }
        if let Some(v) = &c.volume {
            write!(f, "{}volume {v}", if wrote { " of " } else { "" })?;
            wrote = true;
        }
        if let Some(s) = &c.session {
            write!(f, "{}session {s}", if wrote { ", " } else { "" })?;
            wrote = true;
        }
        if let Some(a) = &c.agent {
            write!(f, "{}on agent {a}", if wrote { " " } else { "" })?;
            wrote = true;
        }
        if wrote {
            write!(f, ": ")?;
        }
        f.write_str(&self.message)
    }
}

impl SlaveError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            context: Box::default(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, message)
    }

    /// Sets the operation unless one is set already (the innermost layer
    /// knows best).
    pub fn op(mut self, op: impl Into<String>) -> Self {
        self.context.op.get_or_insert_with(|| op.into());
        self
    }

    pub fn volume(mut self, volume: impl Into<String>) -> Self {
        self.context.volume.get_or_insert_with(|| volume.into());
        self
    }

    pub fn session(mut self, session: impl Into<String>) -> Self {
        self.context.session.get_or_insert_with(|| session.into());
        self
    }

    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.context.agent.get_or_insert_with(|| agent.into());
        self
    }

    /// Worth retrying the same call later.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable | ErrorKind::Busy)
    }

    pub fn is(&self, kind: ErrorKind) -> bool {
        self.kind == kind
    }
}

pub type SlaveResult<T> = Result<T, SlaveError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_context_once() {
        let e = SlaveError::invalid("target is smaller than the source");
        assert_eq!(e.to_string(), "target is smaller than the source");
        let e = e
            .op("prepare")
            .volume("db")
            .session("db-1")
            .agent("https://n2:7443")
            .op("ignored: the inner op stays");
        assert_eq!(
            e.to_string(),
            "prepare of volume db, session db-1 on agent https://n2:7443: target is smaller than the source"
        );
        assert!(!e.is_transient());
        assert!(SlaveError::new(ErrorKind::Busy, "x").is_transient());
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(k.name()), Some(k));
        }
    }
}
