//! # latchkey-zookeeper
//!
//! The ZooKeeper (3.6+) backend of latchkey, on `zookeeper-client`.
//!
//! ```text
//! zookeeper://[user:pass@]host:2181[,host2:2181…][/chroot][?namespace=…&session_timeout=10s
//!             &reads=sequential|linearizable&ttl_check_interval=60s&connect_timeout=10s]
//! ```
//!
//! - `user:pass@`: ZooKeeper `digest` auth; nodes are then created with the
//!   `CREATOR_ALL` ACL (only that identity may use them), else `OPEN_ACL_UNSAFE`.
//! - `/chroot`: everything lives below it (created if missing).
//! - `namespace`: keys and locks live below `/latchkey/ns/<namespace>`
//!   (`/latchkey/default` without one); namespaces never see each other.
//! - `session_timeout`: the main session's timeout asked of the server.
//! - `reads`: `sequential` (default: plain ZooKeeper reads, possibly stale)
//!   or `linearizable` (each `get` is confirmed through the write path,
//!   read then `multi[check(path, version)]`; `sync`+read is *not*
//!   linearizable, ZOOKEEPER-1675). [`Capabilities::linearizable_reads`](latchkey_core::Capabilities)
//!   says which mode a handle is in. `list` and `watch` are never linearizable.
//! - `ttl_check_interval`: the server's `znode.container.checkIntervalMs`
//!   (default 60 s), which bounds how late a TTL key disappears; declared
//!   in `Capabilities::ttl_granularity`.
//!
//! ## Data layout (below the chroot)
//! | what | znode |
//! |---|---|
//! | key `k` | `/latchkey/ns/<ns>/kv/<escaped k>` (see [`keys`]) |
//! | TTL of key `k` | its child `t`, a TTL node |
//! | lock `x` (Curator `InterProcessMutex` path) | `/latchkey/ns/<ns>/locks/<escaped x>` |
//! | one holder/waiter of lock `x` | `…/locks/<escaped x>/_c_<uuid>-lock-<seq>` (ephemeral) |
//!
//! Revisions are `mzxid`s (global, never reused); fencing tokens are the
//! lock entry's `czxid`. Writes are "read, decide, one `multi` that pins
//! what was read (by `dataVersion`, or absence by `create`+`delete`) and
//! writes", re-read and retried when a pin fails, so value compares and
//! transactions stay atomic. Deletes leave tombstones so that versions never
//! restart (ABA safety), at the cost of one small znode per deleted key
//! (see [`keys`]).
//!
//! ## Locks
//! Curator's `InterProcessMutex` layout and ZooKeeper's recipe: an
//! ephemeral-sequential entry with a protected (uuid) name, the lowest
//! sequence holds, each waiter watches only its predecessor, a create whose
//! reply was lost is found again by its uuid, a cancelled wait deletes its
//! entry. The fencing token is the entry's `czxid`, never its sequence
//! suffix. An entry lives as long as its session, so **each distinct lock
//! TTL gets its own session** with that timeout; any number of locks and
//! waiters share it. `lost()` fires when the entry is seen deleted, when
//! the session expired, or once `TTL` has passed since the last request the
//! session answered was *sent* (the server cannot have expired it before),
//! e.g. while disconnected; a disconnection that recovers sooner is not a
//! loss. `Compare::held(&guard)` checks in the `multi` that the entry still
//! exists. Abandoning a guard stops its checks (its `lost()` fires at its
//! deadline) and deletes the entry one TTL later, as the server would have
//! had its holder died; closing the session instead would free every lock
//! of that TTL at once.
//!
//! ## Sessions
//! A handle has a main session (KV, txn, watch), re-opened by itself after
//! it expired, plus one session per distinct lock TTL.
//! [`ZookeeperBackend::requests`] counts the requests a handle sent.
//!
//! ## Limits
//! - A transaction is one `multi`, bounded by `jute.maxbuffer` (1 MiB by
//!   default): 128 ops per branch are accepted, but not 128 large values.
//! - Lock TTLs are session timeouts, clamped by the server to
//!   `[minSessionTimeout, maxSessionTimeout]` (2–20 × tickTime by default):
//!   `Capabilities::{min_ttl, max_lock_ttl}`. A longer TTL is lowered to the
//!   maximum (the lock may be lost sooner after a disconnection, never later).
//! - TTL keys need `-Dzookeeper.extendedTypesEnabled=true` on the server;
//!   without it `native_ttl` is false and TTL writes are `Unsupported`.

#![warn(missing_docs)]

mod backend;
mod conn;
mod error;
pub mod keys;
mod kv;
mod lock;
mod watch;

pub use backend::{ReadMode, ZookeeperBackend, MAX_TXN_OPS};

use async_trait::async_trait;
use latchkey_core::{
    validate, with_wait, Backend, BackendUrl, DistributedLock, Error, LockGuard, LockOptions,
    Result,
};
use std::sync::Arc;

/// URL schemes this backend serves.
pub const SCHEMES: &[&str] = &["zookeeper"];

/// Connects to the ZooKeeper ensemble of `url`.
pub async fn connect(url: BackendUrl) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(ZookeeperBackend::connect(&url).await?))
}

#[async_trait]
impl DistributedLock for ZookeeperBackend {
    async fn lock(&self, name: &str, opts: LockOptions) -> Result<LockGuard> {
        validate::lock_name(name)?;
        validate::ttl(opts.ttl)?;
        if opts.wait == Some(std::time::Duration::ZERO) {
            // "Try once": one attempt, however long its round trips take.
            return self
                .inner
                .locks
                .try_lock(name, opts.ttl)
                .await?
                .ok_or_else(|| Error::Timeout {
                    what: format!("waiting for lock {name:?} on zookeeper"),
                    after: std::time::Duration::ZERO,
                });
        }
        with_wait(
            opts.wait,
            || format!("waiting for lock {name:?} on zookeeper"),
            self.inner.locks.lock(name, opts.ttl),
        )
        .await
    }

    async fn try_lock(&self, name: &str, opts: LockOptions) -> Result<Option<LockGuard>> {
        validate::lock_name(name)?;
        validate::ttl(opts.ttl)?;
        self.inner.locks.try_lock(name, opts.ttl).await
    }
}
