//! The one error type of the NBD frontend (server, client and wire format).

use std::io;

use super::proto;

/// Everything that can go wrong in the NBD module.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A socket read/write failed (or the peer closed the connection).
    #[error("I/O error while {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },

    /// Binding a listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },

    /// Connecting to a server failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },

    /// A message was shorter than its fixed layout requires.
    #[error("truncated {what}: need {need} bytes, got {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },

    /// A message did not start with the magic number its position requires.
    #[error("bad magic in {what}: expected {expected:#x}, found {found:#x}")]
    BadMagic {
        what: &'static str,
        expected: u64,
        found: u64,
    },

    /// A message is syntactically invalid.
    #[error("malformed {what}: {detail}")]
    Malformed {
        what: &'static str,
        detail: &'static str,
    },

    /// The client set handshake flags this server does not know.
    #[error("client sent unsupported handshake flags {flags:#x}")]
    UnsupportedClientFlags { flags: u32 },

    /// An option payload is larger than the server is willing to buffer.
    #[error("option {option} has a {length}-byte payload (limit {max})")]
    OptionTooLarge { option: u32, length: u32, max: u32 },

    /// The client asked for an export that does not exist.
    #[error("unknown export {name:?}")]
    UnknownExport { name: String },

    /// An export name is invalid (empty, too long or contains NUL).
    #[error("invalid export name {name:?}: {reason}")]
    InvalidExportName { name: String, reason: &'static str },

    /// An export with that name is already registered.
    #[error("export {name:?} already exists")]
    DuplicateExport { name: String },

    /// The server answered an option with an error reply (client side).
    #[error("server rejected {} with {}: {message}", proto::option_name(*option), proto::reply_name(*reply))]
    OptionRejected {
        option: u32,
        reply: u32,
        message: String,
    },

    /// A transmission request completed with an NBD error (client side).
    #[error("{command} at offset {offset} length {length} failed: {} ({errno})", proto::errno_name(*errno))]
    Command {
        command: &'static str,
        offset: u64,
        length: u64,
        errno: u32,
    },

    /// A request's payload is larger than the negotiated maximum.
    #[error("{command} of {length} bytes exceeds the maximum of {max}")]
    RequestTooLarge {
        command: &'static str,
        length: u64,
        max: u64,
    },

    /// The peer violated the protocol in a way that ends the connection.
    #[error("protocol violation: {detail}")]
    Protocol { detail: String },

    /// A phase of the protocol took too long.
    #[error("timed out while {context}")]
    Timeout { context: &'static str },

    /// The connection can no longer be used (an earlier error broke it).
    #[error("connection is closed: {context}")]
    Closed { context: &'static str },
}

impl NbdError {
    /// Wrap an I/O error with what was being done.
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> NbdError {
        move |source| NbdError::Io { context, source }
    }

    /// The NBD errno of a failed command, if this is one.
    pub fn errno(&self) -> Option<u32> {
        match self {
            NbdError::Command { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// True if the peer closed the connection cleanly (EOF at a message boundary
    /// or a reset), as opposed to a protocol error.
    pub fn is_disconnect(&self) -> bool {
        match self {
            NbdError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
            NbdError::Closed { .. } => true,
            _ => false,
        }
    }
}
