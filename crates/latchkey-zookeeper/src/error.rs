//! Mapping `zookeeper-client` errors into latchkey's categories.

use latchkey_core::{Capability, Error};
use zookeeper_client as zk;

pub(crate) const NAME: &str = "zookeeper";

/// Whether the failed call may have changed data.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A read: retrying is always safe.
    Read,
    /// A write: a transport failure leaves its outcome unknown.
    Write,
}

/// True for errors that mean "the connection broke": the request may or may
/// not have reached the server. `zookeeper-client` reports some of these as
/// `Custom` (see notes/crates.md), so those count too.
pub(crate) fn is_transport(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::ConnectionLoss | zk::Error::Timeout | zk::Error::Custom(_)
    )
}

/// True once the session is gone for good.
pub(crate) fn is_session_gone(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::SessionExpired
            | zk::Error::SessionMoved
            | zk::Error::ClientClosed
            | zk::Error::AuthFailed
    )
}

/// Maps an error of `what` (an operation naming its key).
pub(crate) fn map(e: zk::Error, kind: Kind, what: &str) -> Error {
    match e {
        ref t if is_transport(t) => match kind {
            Kind::Read => Error::unavailable(NAME, format!("{what}: {t}")),
            Kind::Write => Error::Indeterminate {
                backend: NAME,
                op: what.to_string(),
                message: t.to_string(),
            },
        },
        zk::Error::NoAuth | zk::Error::AuthFailed => Error::Auth {
            backend: NAME,
            message: format!("{what}: {e}"),
        },
        zk::Error::NoHosts
        | zk::Error::SessionExpired
        | zk::Error::SessionMoved
        | zk::Error::ClientClosed
        | zk::Error::NotReadOnly
        | zk::Error::Throttled => Error::unavailable(NAME, format!("{what}: {e}")),
        other => Error::backend(NAME, Wrapped(format!("{what}: {other}"), other)),
    }
}

/// The client error with the operation in its message.
#[derive(Debug)]
struct Wrapped(String, zk::Error);

impl std::fmt::Display for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Wrapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.1)
    }
}

/// The error for a TTL write on a server without TTL nodes.
pub(crate) fn no_ttl() -> Error {
    Error::Unsupported {
        capability: Capability::NativeTtl,
        backend: NAME,
    }
}
