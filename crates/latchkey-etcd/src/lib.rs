//! # latchkey-etcd
//!
//! latchkey's etcd v3 adapter (over [`etcd_client`] 0.21): a KV store with
//! global revisions, native transactions, resumable watches, TTL keys on
//! leases, and fenced locks in the layout of etcd's own `concurrency.Mutex`.
//!
//! ## URLs
//!
//! `etcd://[user:password@]host:port[,host:port…][?namespace=…&timeout=…]`
//! and `etcds://…` for TLS.
//!
//! | part | meaning |
//! |---|---|
//! | hosts | every member to use; requests that fail because a member is down are retried on another where that is safe (default port 2379) |
//! | `user:password@` | etcd authentication (`ConnectOptions::with_user`); refused or missing credentials are [`Error::Auth`] at connect |
//! | `?namespace=` | everything lives under its own prefix (see the layout) |
//! | `?timeout=` | per-request timeout, default 5 s (`500ms`, `5s`, `1m`) |
//! | `?connect_timeout=` | TCP/TLS connect timeout, default min(timeout, 3 s) |
//! | `?ca=/path/ca.pem` | `etcds://` only: the CA that signed the servers' certificates (PEM); without it the system roots are used |
//!
//! `connect` makes one linearizable read, so an unreachable cluster is
//! [`Error::Unavailable`] and bad credentials are [`Error::Auth`] right there.
//!
//! ## Layout (what a key or a lock occupies in etcd)
//!
//! | what | etcd key |
//! |---|---|
//! | user key `k`, no namespace | `latchkey/kv/k` |
//! | user key `k`, namespace `app` | `latchkey@app/kv/k` |
//! | lock `x`, no namespace | `latchkey/lock/x/<lease id in hex>` |
//! | lock `x`, namespace `app` | `latchkey@app/lock/x/<lease id in hex>` |
//!
//! In namespaces and lock names `%` and `/` are written `%25` and `%2F`, so
//! no namespace sees another's keys and lock `a` never ranges over the
//! entries of lock `a/b`. A lock entry is exactly what etcd's Go
//! `concurrency.NewMutex(session, "latchkey/lock/x")` and the server's Lock
//! RPC (`etcdctl lock latchkey/lock/x`) create, and they decide the holder
//! the same way (lowest create revision under `latchkey/lock/x/`), so a
//! latchkey lock and a Go/etcdctl lock on that name exclude each other.
//! (Lock names containing `/` or `%` map to their escaped form.)
//!
//! ## Semantics
//!
//! - **Revisions** are etcd's `mod_revision`: global, never reused.
//!   `if_revision` / `if_absent` / conditional deletes / [`Txn`]
//!   are native etcd transactions (`mod_revision == r`, `create_revision == 0`
//!   for absent, native value compares). `Compare::held(guard)` is
//!   `create_revision(entry) == token`.
//! - **Reads** (`get`, `list`) are etcd's default linearizable ranges.
//! - **Watches** start at the given revision (or after the current one) and
//!   report every event; after a broken stream or a leader change they
//!   resume at the last revision seen + 1, so nothing is lost or repeated.
//!   A start revision that was compacted away is [`Error::Compacted`] with
//!   the oldest revision still available.
//! - **TTL keys** are attached to leases. A lease is **shared** by this
//!   handle's puts with the same TTL (in whole seconds) for 1 s after its
//!   grant, so a hot path does not grant one lease per write; the shared
//!   lease is granted `ceil(ttl) + 1 s` long, so a key never expires
//!   before its TTL, and may live up to ~2 s longer (1 s sharing window + up to
//!   1 s of rounding up to whole seconds, plus etcd's own lateness).
//!   `lease_ttl` reports the lease's granted TTL. A put without TTL detaches
//!   the key from its lease (lease 0), which removes its TTL.
//! - **Errors**: refused credentials ("user name is empty", "authentication
//!   failed", `Unauthenticated`, `PermissionDenied`) are [`Error::Auth`];
//!   an unreachable member or cluster is [`Error::Unavailable`] (reads are
//!   retried on other members within the timeout); a write whose outcome is
//!   unknown (connection broke after sending, leader changed mid-request,
//!   timeout) is [`Error::Indeterminate`] — re-read to find out.
//!
//! ## Locks
//!
//! The recipe of etcd's `concurrency.Mutex`, without its traps:
//!
//! - one lease per (handle, lock TTL), renewed by one keep-alive loop
//!   whatever the number of locks (never one Session shared by two handles;
//!   never the server's Lock RPC with its orphaned 60 s lease);
//! - tasks of one handle queue locally first, so two of them never share
//!   one `<name>/<lease>` entry (with etcd's recipe both would "hold" it);
//! - the holder is the entry with the lowest create revision, whose create
//!   revision is the fencing token;
//! - a waiter watches only the deletion of the entry just before its own,
//!   from the header revision of its read + 1 (etcd's Go Mutex watches from
//!   an older revision and waits for the server's 100 ms catch-up tick);
//! - a cancelled or timed-out wait deletes its entry; a waiter whose entry
//!   vanished while it waited (its lease expired in a partition, an operator
//!   deleted it) queues again, with a fresh lease if needed;
//! - `lost()` fires when the keep-alive has not succeeded for a TTL
//!   (measured from when the last good one was *sent*), when the server says
//!   the lease is gone (keep-alive TTL 0), or — checked each renewal tick,
//!   every TTL / 3, by one `LeaseTimeToLive` listing the lease's keys — when
//!   the entry was deleted behind the holder's back;
//! - `abandon()` (a simulated crash) moves the entry to a lease of its own
//!   that nobody renews (a put keeps the create revision, i.e. the token),
//!   since the handle's shared lease stays alive; later locks of that handle
//!   use a new lease.
//!
//! Lease TTLs are whole seconds and etcd raises short ones to its minimum
//! (≈ 1.5 × the election timeout: 2 s with default settings); the adapter
//! reads and uses the granted TTL.
//!
//! **Round trips.** An uncontended `lock` + `release` costs **2 requests**:
//! one txn (create the entry if absent + read the owner) and one txn
//! (delete the entry if it still has our token) — the same as Go's
//! `Mutex.Lock` + `Unlock` (one txn + one delete). The lease grant and its
//! keep-alive stream are amortized over the handle's life, as with a Go
//! `Session`. `try_lock` on a held lock is one request and creates nothing.
//! The adapter test `uncontended_lock_release_is_two_requests` counts them
//! both on the client and in the server's own gRPC counters.

mod conn;
mod kv;
mod layout;
mod lock;
mod watch;

use async_trait::async_trait;
use bytes::Bytes;
use latchkey_core::{
    validate, with_wait, Backend, BackendUrl, Capabilities, DeleteOptions, DistributedLock, Error,
    KeyValue, KvStore, ListOptions, LockGuard, LockOptions, PutOptions, Result, Revision, Txn,
    TxnOutcome, TxnRequest, WatchStream,
};
use std::sync::Arc;
use std::time::Duration;

/// The backend's name in errors and capabilities.
pub(crate) const BACKEND: &str = "etcd";

/// URL schemes served by this adapter.
pub const SCHEMES: &[&str] = &["etcd", "etcds"];

/// Most ops per txn branch: etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

/// A handle on an etcd cluster: one gRPC channel (multiplexed), one lease per
/// distinct lock TTL, any number of locks, watches and requests.
pub struct EtcdBackend {
    sh: Arc<conn::Shared>,
    locks: lock::Locks,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.sh.endpoints)
            .finish_non_exhaustive()
    }
}

/// Connects to etcd as the URL says (see the crate docs); the facade's
/// connector for [`SCHEMES`].
pub async fn connect(url: BackendUrl) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(EtcdBackend::connect(&url).await?))
}

impl EtcdBackend {
    /// Connects to etcd as the URL says (see the crate docs).
    pub async fn connect(url: &BackendUrl) -> Result<EtcdBackend> {
        let sh = Arc::new(conn::Shared::connect(url).await?);
        Ok(EtcdBackend {
            locks: lock::Locks::new(sh.clone()),
            sh,
        })
    }

    /// Requests this handle has sent so far: unary calls, watch and
    /// keep-alive stream openings, and each keep-alive message.
    pub fn op_count(&self) -> u64 {
        self.sh.ops()
    }

    /// Deletes the current holder's entry of lock `name` behind its back, as
    /// an operator would (a fault hook for tests). Returns whether the lock
    /// was held. Blocking: call it from a multi-threaded tokio runtime.
    pub fn revoke_lock(&self, name: &str) -> Result<bool> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::InvalidArgument("revoke_lock needs a tokio runtime".into()))?;
        if rt.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return Err(Error::InvalidArgument(
                "revoke_lock blocks: call it from a multi-threaded tokio runtime".into(),
            ));
        }
        tokio::task::block_in_place(|| rt.block_on(self.locks.revoke(name)))
    }
}

#[async_trait]
impl KvStore for EtcdBackend {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        kv::get(&self.sh, key).await
    }

    async fn put(&self, key: &str, value: Bytes, opts: PutOptions) -> Result<Revision> {
        kv::put(&self.sh, key, value, opts).await
    }

    async fn delete(&self, key: &str, opts: DeleteOptions) -> Result<bool> {
        kv::delete(&self.sh, key, opts).await
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>> {
        kv::list(&self.sh, prefix, opts).await
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream> {
        watch::watch(self.sh.clone(), prefix, from).await
    }
}

#[async_trait]
impl Txn for EtcdBackend {
    async fn txn(&self, txn: TxnRequest) -> Result<TxnOutcome> {
        kv::txn(&self.sh, txn, MAX_TXN_OPS).await
    }
}

#[async_trait]
impl DistributedLock for EtcdBackend {
    async fn lock(&self, name: &str, opts: LockOptions) -> Result<LockGuard> {
        validate::lock_name(name)?;
        validate::ttl(opts.ttl)?;
        let what = || format!("lock {name:?} on etcd");
        if opts.wait == Some(Duration::ZERO) {
            // "Try once": take it if free, else time out at once.
            return match self.locks.acquire(name, &opts, false).await? {
                Some(g) => Ok(g),
                None => Err(Error::Timeout {
                    what: what(),
                    after: Duration::ZERO,
                }),
            };
        }
        with_wait(opts.wait, what, async {
            self.locks
                .acquire(name, &opts, true)
                .await?
                .ok_or_else(|| Error::unavailable(BACKEND, "lock wait ended without the lock"))
        })
        .await
    }

    async fn try_lock(&self, name: &str, opts: LockOptions) -> Result<Option<LockGuard>> {
        validate::lock_name(name)?;
        validate::ttl(opts.ttl)?;
        self.locks.acquire(name, &opts, false).await
    }
}

impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::full();
        // Leases are whole seconds; etcd's minimum is ~1.5 × the election
        // timeout (2 s with default settings).
        c.min_ttl = Duration::from_secs(2);
        // TTL keys: up to 1 s sharing window + 1 s rounding; leases: up to
        // the server's 500 ms expiry check; leader changes may extend more.
        c.ttl_granularity = Duration::from_secs(2);
        c.max_txn_ops = MAX_TXN_OPS;
        c
    }
}
