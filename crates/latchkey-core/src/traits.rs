//! The three traits of latchkey, and `Backend`, which bundles them.
//!
//! All are object-safe: `Arc<dyn Backend>` is how the facade hands a backend
//! to callers.

use crate::capabilities::Capabilities;
use crate::error::Result;
use crate::lock::guard::LockGuard;
use crate::txn::{TxnOutcome, TxnRequest};
use crate::types::{
    DeleteOptions, KeyValue, ListOptions, LockOptions, PutOptions, Revision, WatchEvent,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

/// A stream of watch events. It ends only on error (which is its last item)
/// or when dropped.
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;

/// A key-value store with revisions, compare-and-swap, TTLs, prefix listing
/// and watches.
#[async_trait]
pub trait KvStore: Send + Sync {
    /// Reads a key. `Ok(None)` when it does not exist.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Writes a key and returns the new revision. A failed condition
    /// (`if_revision`, `if_absent`) is [`crate::Error::Conflict`] with the
    /// key's current revision; nothing is written then.
    async fn put(&self, key: &str, value: Bytes, opts: PutOptions) -> Result<Revision>;

    /// Deletes a key; true if it existed. A failed `if_revision` is
    /// [`crate::Error::Conflict`].
    async fn delete(&self, key: &str, opts: DeleteOptions) -> Result<bool>;

    /// Keys starting with `prefix` (any string, `""` for all), in key order.
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>>;

    /// Changes to keys starting with `prefix`. With `from`, starts at that
    /// revision (replaying history where
    /// [`Capabilities::watch_resume`]); without, starts after the
    /// current revision.
    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream>;
}

/// Atomic multi-key transactions.
#[async_trait]
pub trait Txn: Send + Sync {
    /// Runs the transaction atomically. More ops in a branch than
    /// [`Capabilities::max_txn_ops`] is [`crate::Error::InvalidArgument`]
    /// before anything is sent.
    async fn txn(&self, txn: TxnRequest) -> Result<TxnOutcome>;
}

/// Mutual exclusion with fencing tokens and lease-loss signals.
#[async_trait]
pub trait DistributedLock: Send + Sync {
    /// Waits (without polling) until the lock is held, or until
    /// `opts.wait` passes ([`crate::Error::Timeout`]). Dropping the future
    /// leaves nothing behind.
    async fn lock(&self, name: &str, opts: LockOptions) -> Result<LockGuard>;

    /// Takes the lock if it is free right now; never waits.
    async fn try_lock(&self, name: &str, opts: LockOptions) -> Result<Option<LockGuard>>;
}

/// A complete backend: the three traits plus what it is and what it can do.
pub trait Backend: KvStore + Txn + DistributedLock + Send + Sync {
    /// The backend's short name (`"mem"`, `"redis"`, ...).
    fn name(&self) -> &'static str;
    /// What this backend can and cannot promise.
    fn capabilities(&self) -> Capabilities;
}
