//! [`MemBackend`]: one client handle of a [`MemStore`], implementing the
//! three traits.

use crate::store::{full, Acquire, Grant, Shared};
use crate::MemStore;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use latchkey_core::lock::local::{LocalQueues, LocalTurn};
use latchkey_core::{
    validate, with_wait, Backend, Capabilities, DeleteOptions, DistributedLock, Error, GuardOps,
    KeyValue, KvStore, ListOptions, LockEntry, LockGuard, LockOptions, Op, OpResult, PutOptions,
    RenewOutcome, RenewalGroup, Renewer, Result, Revision, Txn, TxnOutcome, TxnRequest,
    WatchStream,
};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The shortest TTL (keys and locks) the mem backend honours; shorter ones
/// are raised to it. Renewal runs every TTL/3, so going lower would only
/// burn CPU.
pub const MIN_TTL: Duration = Duration::from_millis(10);
/// How late past its deadline a key or lock may still be seen: the sweeper
/// thread wakes at the deadline itself, so this is scheduling latency only.
pub const TTL_GRANULARITY: Duration = Duration::from_millis(50);
/// Most ops per transaction branch (as etcd's default and Consul 1.14+).
pub const MAX_TXN_OPS: usize = 128;

const NAME: &str = "mem";

fn grant_ttl(ttl: Duration) -> Duration {
    ttl.max(MIN_TTL)
}

/// One client handle of a [`MemStore`] in one namespace.
///
/// Several handles on one store behave like several clients of one server:
/// each has its own lock renewal (one [`RenewalGroup`] per distinct TTL) and
/// its own local lock queues. Get one with [`MemStore::handle`] or
/// [`crate::connect`].
pub struct MemBackend {
    store: MemStore,
    ns: String,
    handle_id: u64,
    ops: Arc<AtomicU64>,
    local: LocalQueues,
    groups: Mutex<HashMap<Duration, Arc<RenewalGroup>>>,
    next_lock: AtomicU64,
}

impl fmt::Debug for MemBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemBackend")
            .field("namespace", &self.ns)
            .field("handle", &self.handle_id)
            .finish()
    }
}

impl MemBackend {
    pub(crate) fn new(store: MemStore, ns: &str) -> Self {
        let handle_id = store.shared().run(|st, _| st.next_id());
        MemBackend {
            store,
            ns: ns.to_string(),
            handle_id,
            ops: Arc::new(AtomicU64::new(0)),
            local: LocalQueues::new(),
            groups: Mutex::new(HashMap::new()),
            next_lock: AtomicU64::new(0),
        }
    }

    /// The store this handle talks to.
    pub fn store(&self) -> &MemStore {
        &self.store
    }

    /// This handle's namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// Number of requests this handle has made to the store (every KV call,
    /// txn, lock attempt, renewal and release counts one). A lock waiter
    /// makes none while it waits, which is how tests show it does not poll.
    pub fn op_count(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// Frees lock `name` of this namespace whoever holds it, as an operator
    /// deleting the entry behind the holder's back would. The holder's
    /// `lost()` fires at its next renewal; the next waiter gets the lock.
    /// Returns whether it was held.
    pub fn revoke_lock(&self, name: &str) -> Result<bool> {
        validate::lock_name(name)?;
        self.count();
        let full_name = full(&self.ns, name);
        Ok(self.shared().run(|st, now| st.revoke(&full_name, now)))
    }

    /// Number of waiters queued in the store for lock `name` (the holder not
    /// counted). Lets tests show a cancelled waiter left nothing behind.
    pub fn lock_queue_len(&self, name: &str) -> Result<usize> {
        validate::lock_name(name)?;
        let full_name = full(&self.ns, name);
        Ok(self.shared().run(|st, _| st.queue_len(&full_name)))
    }

    /// The fencing token of lock `name`'s current holder, if it is held.
    pub fn lock_holder_token(&self, name: &str) -> Result<Option<u64>> {
        validate::lock_name(name)?;
        let full_name = full(&self.ns, name);
        Ok(self.shared().run(|st, _| st.holder_token(&full_name)))
    }

    fn shared(&self) -> &Shared {
        self.store.shared()
    }

    fn count(&self) {
        self.ops.fetch_add(1, Ordering::SeqCst);
    }

    fn ns_len(&self) -> usize {
        self.ns.len() + 1
    }

    fn new_lock_id(&self) -> String {
        let n = self.next_lock.fetch_add(1, Ordering::SeqCst);
        format!("h{}-{}", self.handle_id, n)
    }

    /// The renewal group for `ttl`, started on first use.
    fn group(&self, ttl: Duration) -> Arc<RenewalGroup> {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(g) = groups.get(&ttl).filter(|g| !g.is_dead()) {
            return g.clone();
        }
        let renewer = Arc::new(MemRenewer {
            store: self.store.clone(),
            ns: self.ns.clone(),
            ttl,
            ops: self.ops.clone(),
        });
        let g = Arc::new(RenewalGroup::spawn(ttl, renewer));
        groups.insert(ttl, g.clone());
        g
    }

    fn make_guard(
        &self,
        name: &str,
        id: String,
        grant: Grant,
        ttl: Duration,
        turn: LocalTurn,
    ) -> LockGuard {
        let entry = LockEntry {
            name: name.to_string(),
            token: grant.token,
            id,
        };
        let group = self.group(ttl);
        // The store's deadline is `granted_at + ttl` and renewals only move
        // it later, so the guard's deadline (same start, same TTL) never
        // outlives the store's: lost() fires no later than the store frees it.
        // Measured back from tokio's clock (not converted from the std
        // instant) so a runtime with a paused test clock stays consistent.
        let now = tokio::time::Instant::now();
        let granted_at = now.checked_sub(grant.granted_at.elapsed()).unwrap_or(now);
        let trigger = group.add(entry.clone(), granted_at);
        let ops = Arc::new(MemGuardOps {
            store: self.store.clone(),
            ns: self.ns.clone(),
            group,
            ops: self.ops.clone(),
        });
        LockGuard::new(entry, trigger, ops, Some(turn))
    }

    async fn acquire(&self, name: &str, ttl: Duration) -> Result<LockGuard> {
        // Tasks of this handle queue locally first, so each remote holding
        // belongs to exactly one guard.
        let turn = self.local.turn(name).await;
        let id = self.new_lock_id();
        let full_name = full(&self.ns, name);
        self.count();
        let attempt = self
            .shared()
            .run(|st, now| st.acquire_or_enqueue(&full_name, &id, ttl, now));
        let grant = match attempt {
            Acquire::Granted(g) => g,
            Acquire::Queued { wid, rx } => {
                // Armed until the grant is in hand: dropping this future
                // (cancellation, `wait` timeout) removes the queue entry at
                // once, or releases the lock if it was handed over meanwhile.
                let cleanup = WaiterCleanup {
                    store: self.store.clone(),
                    full_name: full_name.clone(),
                    wid,
                    id: id.clone(),
                    armed: true,
                };
                let g = rx
                    .await
                    .map_err(|_| Error::unavailable(NAME, "the store dropped a lock waiter"))?;
                cleanup.disarm();
                g
            }
        };
        Ok(self.make_guard(name, id, grant, ttl, turn))
    }
}

/// Removes a cancelled waiter's queue entry synchronously on drop (the
/// store's mutex is a plain one, so no runtime is needed and the entry is
/// gone by the time the cancelled `lock()` has returned).
struct WaiterCleanup {
    store: MemStore,
    full_name: String,
    wid: u64,
    id: String,
    armed: bool,
}

impl WaiterCleanup {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for WaiterCleanup {
    fn drop(&mut self) {
        if self.armed {
            let (name, wid, id) = (&self.full_name, self.wid, &self.id);
            self.store
                .shared()
                .run(|st, now| st.cancel_wait(name, wid, id, now));
        }
    }
}

/// Renews every lock of one handle with one TTL in one store request.
struct MemRenewer {
    store: MemStore,
    ns: String,
    ttl: Duration,
    ops: Arc<AtomicU64>,
}

#[async_trait]
impl Renewer for MemRenewer {
    async fn renew(&self, members: &[LockEntry]) -> Result<RenewOutcome> {
        if members.is_empty() {
            // Nothing to keep alive: no request at all.
            return Ok(RenewOutcome::alive());
        }
        self.ops.fetch_add(1, Ordering::SeqCst);
        let lost = self.store.shared().run(|st, now| {
            members
                .iter()
                .filter(|e| !st.renew(&full(&self.ns, &e.name), e, self.ttl, now))
                .map(|e| e.id.clone())
                .collect()
        });
        Ok(RenewOutcome {
            lost,
            ..RenewOutcome::alive()
        })
    }
}

struct MemGuardOps {
    store: MemStore,
    ns: String,
    group: Arc<RenewalGroup>,
    ops: Arc<AtomicU64>,
}

#[async_trait]
impl GuardOps for MemGuardOps {
    async fn release(&self, entry: &LockEntry) -> Result<()> {
        self.group.remove(&entry.id);
        self.ops.fetch_add(1, Ordering::SeqCst);
        let full_name = full(&self.ns, &entry.name);
        self.store
            .shared()
            .run(|st, now| st.release(&full_name, &entry.id, entry.token, now));
        Ok(())
    }

    fn abandon(&self, entry: &LockEntry) {
        self.group.abandon(&entry.id);
    }
}

#[async_trait]
impl KvStore for MemBackend {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        validate::key(key)?;
        self.count();
        let k = full(&self.ns, key);
        Ok(self.shared().run(|st, _| st.get(&k, self.ns_len())))
    }

    async fn put(&self, key: &str, value: Bytes, opts: PutOptions) -> Result<Revision> {
        validate::key(key)?;
        validate::value(key, &value)?;
        if let Some(t) = opts.ttl {
            validate::ttl(t)?;
        }
        self.count();
        let k = full(&self.ns, key);
        self.shared().run(|st, now| {
            let cur = st.current(&k);
            if opts.if_absent && cur.is_some() {
                return Err(Error::conflict(key, cur));
            }
            // An absent key has revision 0 here, as in `Compare::Revision`.
            if opts.if_revision.is_some_and(|r| cur.unwrap_or(0) != r) {
                return Err(Error::conflict(key, cur));
            }
            let rev = st.next_rev();
            st.write_put(&k, value, opts.ttl.map(grant_ttl), rev, now);
            Ok(rev)
        })
    }

    async fn delete(&self, key: &str, opts: DeleteOptions) -> Result<bool> {
        validate::key(key)?;
        self.count();
        let k = full(&self.ns, key);
        self.shared().run(|st, _| {
            let cur = st.current(&k);
            if opts.if_revision.is_some_and(|r| cur.unwrap_or(0) != r) {
                return Err(Error::conflict(key, cur));
            }
            if cur.is_none() {
                return Ok(false);
            }
            let rev = st.next_rev();
            Ok(st.write_delete(&k, rev))
        })
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>> {
        validate::prefix(prefix)?;
        self.count();
        let p = full(&self.ns, prefix);
        Ok(self
            .shared()
            .run(|st, _| st.list(&p, self.ns_len(), opts.limit, opts.keys_only)))
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream> {
        validate::prefix(prefix)?;
        self.count();
        let p = full(&self.ns, prefix);
        // Unbounded: a slow watcher never blocks writers, and never loses an
        // event (its memory grows instead).
        let (tx, rx) = futures::channel::mpsc::unbounded();
        self.shared()
            .run(|st, _| st.watch(p, self.ns_len(), from, tx))?;
        Ok(rx.boxed())
    }
}

#[async_trait]
impl Txn for MemBackend {
    async fn txn(&self, txn: TxnRequest) -> Result<TxnOutcome> {
        validate::txn(&txn, MAX_TXN_OPS)?;
        for cmp in &txn.when {
            if let latchkey_core::Compare::Held(e) = cmp {
                validate::lock_name(&e.name)?;
            }
        }
        self.count();
        let ns = &self.ns;
        Ok(self.shared().run(|st, now| {
            let succeeded = txn.when.iter().all(|c| st.compare(ns, c));
            let ops = if succeeded { &txn.then } else { &txn.otherwise };
            // All writes of one transaction share one revision (as etcd's).
            let mut rev: Option<Revision> = None;
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                match op {
                    Op::Put { key, value, ttl } => {
                        let r = *rev.get_or_insert_with(|| st.next_rev());
                        st.write_put(&full(ns, key), value.clone(), ttl.map(grant_ttl), r, now);
                        results.push(OpResult::Put { revision: r });
                    }
                    Op::Delete { key } => {
                        let k = full(ns, key);
                        let deleted = st.current(&k).is_some() && {
                            let r = *rev.get_or_insert_with(|| st.next_rev());
                            st.write_delete(&k, r)
                        };
                        results.push(OpResult::Delete { deleted });
                    }
                    Op::Get { key } => {
                        results.push(OpResult::Get(st.get(&full(ns, key), ns.len() + 1)));
                    }
                }
            }
            TxnOutcome {
                succeeded,
                results,
                revision: st.revision(),
            }
        }))
    }
}

#[async_trait]
impl DistributedLock for MemBackend {
    async fn lock(&self, name: &str, opts: LockOptions) -> Result<LockGuard> {
        validate::lock_name(name)?;
        validate::ttl(opts.ttl)?;
        let ttl = grant_ttl(opts.ttl);
        with_wait(
            opts.wait,
            || format!("waiting for lock {name:?} on mem"),
            self.acquire(name, ttl),
        )
        .await
    }

    async fn try_lock(&self, name: &str, opts: LockOptions) -> Result<Option<LockGuard>> {
        validate::lock_name(name)?;
        validate::ttl(opts.ttl)?;
        let ttl = grant_ttl(opts.ttl);
        let Some(turn) = self.local.try_turn(name) else {
            return Ok(None);
        };
        let id = self.new_lock_id();
        let full_name = full(&self.ns, name);
        self.count();
        let grant = self
            .shared()
            .run(|st, now| st.try_acquire(&full_name, &id, ttl, now));
        Ok(grant.map(|g| self.make_guard(name, id, g, ttl, turn)))
    }
}

impl Backend for MemBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::full();
        c.min_ttl = MIN_TTL;
        c.ttl_granularity = TTL_GRANULARITY;
        c.max_txn_ops = MAX_TXN_OPS;
        c
    }
}

const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<MemBackend>();
};
