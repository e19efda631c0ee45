//! # latchkey-mem
//!
//! The embedded in-memory backend of latchkey: complete semantics with no
//! server, and the reference model every other backend is held against.
//!
//! - One global revision counter per store, strictly increasing, never
//!   reused (also across delete and re-create). Lock fencing tokens come
//!   from the same counter.
//! - TTL keys and lock leases expire at their deadline: a sweeper thread per
//!   store sleeps until the next deadline (no fixed polling), deletes
//!   expired keys with a new revision and a Delete watch event, and hands
//!   expired locks to their next waiter. Reads never see an expired key.
//! - Watches deliver every revision in order and can resume from a revision
//!   still in the bounded history (100,000 events / 64 MiB by default);
//!   older is [`Error::Compacted`](latchkey_core::Error::Compacted).
//! - Locks are FIFO; a waiter is woken by a one-shot notification (exactly
//!   one per release), a cancelled waiter leaves nothing behind, and a
//!   holder that stops renewing loses the lock after its TTL.
//!
//! URLs: `mem://` is the process-wide default store, `mem://<name>` a named
//! store (the same name gives the same store), `?namespace=` works as on
//! every backend.

#![deny(missing_docs)]

mod backend;
mod store;

pub use backend::{MemBackend, MAX_TXN_OPS, MIN_TTL, TTL_GRANULARITY};

use latchkey_core::{validate, Backend, BackendUrl, Result};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use store::Shared;

/// The URL schemes of this backend.
pub const SCHEMES: &[&str] = &["mem"];

/// One in-process "server": a key space, a revision counter, a watch
/// history and a lock table. Cloning shares the same store.
///
/// Each [`handle`](MemStore::handle) is a separate client of it, with its
/// own lease renewal and local lock queue, so several handles on one store
/// behave like several processes talking to one etcd.
///
/// ```
/// use latchkey_core::{KvStore, DistributedLock, LockOptions, PutOptions, Bytes};
/// use latchkey_mem::MemStore;
/// use std::time::Duration;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = MemStore::new();
/// let alice = store.handle("app")?;
/// let bob = store.handle("app")?;
///
/// // Compare-and-swap on the revision.
/// let r1 = alice.put("config", Bytes::from("v1"), PutOptions::default()).await?;
/// let r2 = bob.put("config", Bytes::from("v2"), PutOptions::if_revision(r1)).await?;
/// assert!(r2 > r1);
/// assert!(alice.put("config", Bytes::from("v3"), PutOptions::if_revision(r1)).await.is_err());
///
/// // Locks exclude across handles; tokens increase across holders.
/// let g = alice.lock("job", LockOptions::ttl(Duration::from_secs(5))).await?;
/// assert!(bob.try_lock("job", LockOptions::ttl(Duration::from_secs(5))).await?.is_none());
/// let t1 = g.fencing_token();
/// g.release().await?;
/// let g2 = bob.lock("job", LockOptions::ttl(Duration::from_secs(5))).await?;
/// assert!(g2.fencing_token() > t1);
///
/// // Another namespace sees nothing of "app".
/// assert!(store.handle("other")?.get("config").await?.is_none());
/// # Ok::<(), latchkey_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct MemStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    shared: Arc<Shared>,
}

impl Drop for StoreInner {
    fn drop(&mut self) {
        // Handles and guards hold the store, so nobody can use it any more:
        // let the sweeper thread end.
        self.shared.shutdown();
    }
}

impl fmt::Debug for MemStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStore")
            .field("revision", &self.revision())
            .finish()
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    /// A new, empty store with the default history bound.
    pub fn new() -> Self {
        Self::with_history_limit(store::DEFAULT_HISTORY_EVENTS)
    }

    /// A new, empty store that keeps at most `events` watch events of
    /// history (at least 1); a watch from an older revision fails with
    /// `Compacted`. Useful to test resumption and compaction.
    pub fn with_history_limit(events: usize) -> Self {
        let shared = Arc::new(Shared::new(events.max(1), store::DEFAULT_HISTORY_BYTES));
        let sweeper = shared.clone();
        // A thread, not a tokio task: a store outlives any one runtime (the
        // named stores are process-wide, and tests each have a runtime).
        std::thread::Builder::new()
            .name("latchkey-mem-sweeper".into())
            .spawn(move || sweeper.sweep_forever())
            .expect("spawning the latchkey-mem sweeper thread");
        MemStore {
            inner: Arc::new(StoreInner { shared }),
        }
    }

    /// The process-wide store called `name`: the same name always gives
    /// the same store (it lives until the process ends). `mem://<name>`
    /// connects to it; `mem://` to the one called `""`.
    pub fn named(name: &str) -> MemStore {
        static NAMED: OnceLock<Mutex<HashMap<String, MemStore>>> = OnceLock::new();
        let mut map = NAMED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.entry(name.to_string()).or_default().clone()
    }

    /// A new client handle on namespace `namespace` (`""` for none).
    pub fn handle(&self, namespace: &str) -> Result<Arc<MemBackend>> {
        validate::namespace(namespace)?;
        Ok(Arc::new(MemBackend::new(self.clone(), namespace)))
    }

    /// The store's current revision (0 for a new store).
    pub fn revision(&self) -> latchkey_core::Revision {
        self.shared().run(|st, _| st.revision())
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }
}

/// Opens a handle for `mem://` (the process default store) or
/// `mem://<name>` (a named store). `?namespace=` is honoured; anything else
/// (credentials, a port, a path, other parameters) is `InvalidUrl`.
pub async fn connect(url: BackendUrl) -> Result<Arc<dyn Backend>> {
    if !SCHEMES.contains(&url.scheme()) {
        return Err(url.invalid("the mem backend handles mem:// only"));
    }
    url.expect_params(&[])?;
    if url.username().is_some() || url.password().is_some() {
        return Err(url.invalid("mem:// takes no credentials"));
    }
    if !(url.path().is_empty() || url.path() == "/") {
        return Err(url.invalid("mem:// takes no path: use mem://<store name>"));
    }
    let name = match url.hosts() {
        [] => "",
        [h] if h.port.is_none() => h.host.as_str(),
        [_] => return Err(url.invalid("mem:// takes no port")),
        _ => return Err(url.invalid("mem:// names one store, not a list")),
    };
    let store = MemStore::named(name);
    Ok(store.handle(url.namespace())?)
}

#[cfg(test)]
mod tests;
