//! Plain data types of the KV and lock APIs.

use bytes::Bytes;
use std::time::Duration;

/// A per-write sequence number. It strictly increases with every write to a
/// key and is never reused, also across delete-and-recreate. Revisions of
/// different keys are comparable where [`crate::Capabilities::global_revision`].
pub type Revision = u64;

/// A key with its value as read from a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, without the namespace.
    pub key: String,
    /// The value (empty for `keys_only` listings).
    pub value: Bytes,
    /// The revision of the last write to this key.
    pub revision: Revision,
    /// The TTL the key was written with, if it has one.
    pub lease_ttl: Option<Duration>,
}

/// Options of [`crate::KvStore::put`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// Expire the key after this long. `None` removes any earlier TTL.
    pub ttl: Option<Duration>,
    /// Write only if the key's current revision is exactly this.
    pub if_revision: Option<Revision>,
    /// Write only if the key does not exist.
    pub if_absent: bool,
}

impl PutOptions {
    /// Write with a TTL.
    pub fn ttl(ttl: Duration) -> Self {
        PutOptions {
            ttl: Some(ttl),
            ..Default::default()
        }
    }
    /// Compare-and-swap on the revision.
    pub fn if_revision(revision: Revision) -> Self {
        PutOptions {
            if_revision: Some(revision),
            ..Default::default()
        }
    }
    /// Create only.
    pub fn if_absent() -> Self {
        PutOptions {
            if_absent: true,
            ..Default::default()
        }
    }
    /// Adds a TTL to these options.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// Options of [`crate::KvStore::delete`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    /// Delete only if the key's current revision is exactly this.
    pub if_revision: Option<Revision>,
}

/// Options of [`crate::KvStore::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Return at most this many keys (the first ones in key order).
    pub limit: Option<usize>,
    /// Return keys and revisions only; values are left empty.
    pub keys_only: bool,
}

/// What a watch event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key was written.
    Put,
    /// The key was deleted (or expired, where the backend reports expiry).
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key, without the namespace.
    pub key: String,
    /// The new value (empty for deletes).
    pub value: Bytes,
    /// The revision of this change.
    pub revision: Revision,
}

/// Options of [`crate::DistributedLock::lock`] and `try_lock`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockOptions {
    /// How long the lock survives its holder without renewal. The guard
    /// renews it automatically while it lives.
    pub ttl: Duration,
    /// How long `lock` may wait. `None` waits as long as it takes; `Some(0)`
    /// tries once. Ignored by `try_lock`.
    pub wait: Option<Duration>,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: Duration::from_secs(15),
            wait: None,
        }
    }
}

impl LockOptions {
    /// Options with this TTL and an unbounded wait.
    pub fn ttl(ttl: Duration) -> Self {
        LockOptions { ttl, wait: None }
    }
    /// Sets how long `lock` may wait.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }
}
