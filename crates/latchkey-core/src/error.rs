//! The one error type of latchkey. Every backend maps its client's errors into
//! these categories, so callers can match on them whatever the backend.

use crate::capabilities::Capability;
use crate::types::Revision;
use std::time::Duration;

/// Result with latchkey's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed source error of a backend's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong, by category. Messages name the key (or lock,
/// or URL) and the backend involved; passwords never appear in them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A key or prefix broke the rules of [`crate::validate`].
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key, shortened to 80 characters.
        key: String,
        /// Which rule it broke.
        reason: String,
    },
    /// A value broke the rules of [`crate::validate`] (e.g. too large).
    #[error("invalid value for key {key:?}: {reason}")]
    InvalidValue {
        /// The key the value was meant for.
        key: String,
        /// Which rule it broke.
        reason: String,
    },
    /// An argument other than a key or value was wrong (a TTL of zero, too
    /// many txn ops, a namespace with a NUL, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A connection URL could not be used. The URL is shown redacted.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A conditional write's condition did not hold. `current` is the
    /// revision the key has now (`None` if it does not exist).
    #[error("conflict on key {key:?}: current revision is {current:?}")]
    Conflict {
        /// The key whose condition failed.
        key: String,
        /// Its current revision, `None` when absent.
        current: Option<Revision>,
    },
    /// An operation did not finish within the time it was given.
    #[error("timed out after {after:?} while {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// How long it waited.
        after: Duration,
    },
    /// The lock is no longer held (its lease expired or its entry vanished).
    #[error("lock {name:?} was lost")]
    LockLost {
        /// The lock's name.
        name: String,
    },
    /// The backend cannot do this; the capability is declared absent.
    #[error("{backend} does not support {capability}")]
    Unsupported {
        /// The missing capability.
        capability: Capability,
        /// The backend's name.
        backend: &'static str,
    },
    /// A watch asked for history the backend no longer keeps.
    #[error("revision compacted: the oldest revision still available is {oldest}")]
    Compacted {
        /// The oldest revision a watch can start from.
        oldest: Revision,
    },
    /// The server or cluster could not be reached or answered that it cannot serve.
    #[error("{backend} unavailable: {message}")]
    Unavailable {
        /// The backend's name.
        backend: &'static str,
        /// What happened.
        message: String,
    },
    /// The outcome of a write is unknown: the request may or may not have
    /// committed (the connection broke after it was sent). Re-read to find out.
    #[error("{backend}: outcome of {op} unknown: {message}")]
    Indeterminate {
        /// The backend's name.
        backend: &'static str,
        /// The operation whose outcome is unknown.
        op: String,
        /// What happened.
        message: String,
    },
    /// Credentials were missing or refused.
    #[error("{backend} refused the credentials: {message}")]
    Auth {
        /// The backend's name.
        backend: &'static str,
        /// The server's words.
        message: String,
    },
    /// Any other error of the backend's client library.
    #[error("{backend} error: {source}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// The client library's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// A [`Error::Backend`] from any error of a client library.
    pub fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            backend,
            source: source.into(),
        }
    }

    /// A [`Error::Unavailable`].
    pub fn unavailable(backend: &'static str, message: impl std::fmt::Display) -> Self {
        Error::Unavailable {
            backend,
            message: message.to_string(),
        }
    }

    /// A [`Error::Conflict`].
    pub fn conflict(key: impl Into<String>, current: Option<Revision>) -> Self {
        Error::Conflict {
            key: key.into(),
            current,
        }
    }

    /// True for errors after which retrying the same call may succeed
    /// (the server was unreachable or the call timed out).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Timeout { .. })
    }
}

/// Shortens a user-supplied string for an error message.
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(MAX).collect();
        out.push('…');
        out
    }
}
