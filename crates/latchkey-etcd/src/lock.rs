//! Locks the way etcd's `concurrency.Mutex` takes them, minus its traps.
//!
//! - One lease per (handle, TTL in seconds), granted at the first lock of
//!   that TTL and kept alive by one core [`RenewalGroup`] whose
//!   [`Renewer`] sends one `LeaseKeepAlive` on a long-lived stream per tick
//!   (plus, while locks are held, one `LeaseTimeToLive` with keys, which
//!   tells which of the handle's entries still exist).
//! - Tasks of one handle queue locally first ([`LocalQueues`]), so two of
//!   them never share the entry `<name>/<lease>` (with etcd's recipe two
//!   Mutexes on one session both "hold" the lock).
//! - Acquire = one txn: `if create_revision(entry) == 0 then put(entry,
//!   lease) + get(first by create revision) + get(last two by create
//!   revision)`. The holder is the entry with the lowest create revision;
//!   its create revision is the fencing token. A waiter watches only the
//!   deletion of the entry just before its own, starting at the txn's header
//!   revision + 1 (never older: an old start revision waits for the server's
//!   100 ms catch-up tick), then re-reads.
//! - `try_lock` = one txn: `if create_revision(every entry of the lock) == 0
//!   then put(entry)`: a held lock costs one request and leaves nothing.
//! - Cancelled `lock()`/`try_lock()`: the entry is deleted, after every txn
//!   that may have created it has answered (they run on as [`InFlight`]
//!   requests; a delete sent earlier could overtake one), and only then
//!   may the handle's next local task for that name start.
//! - Release = one txn: `if create_revision(entry) == token then delete`.

use crate::conn::{classify, map_read, ttl_secs, Fault, Shared};
use async_trait::async_trait;
use etcd_client::{
    Compare as ECompare, CompareOp, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions as EPut, SortOrder, SortTarget, Txn as ETxn, TxnOp, TxnOpResponse, WatchFilterType,
    WatchOptions,
};
use latchkey_core::lock::local::{LocalQueues, SharedTurn};
use latchkey_core::{
    validate, Error, GuardOps, InFlight, LockEntry, LockGuard, LockOptions, RenewOutcome,
    RenewalGroup, Renewer, Result,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

fn lock_mutex<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the renewer and the waiters share about one lease.
struct LeaseState {
    lease: i64,
    /// When the last request that proved the lease alive (its grant or a
    /// keep-alive) was *sent*: the lease lives at least until this + TTL.
    confirmed: Mutex<Instant>,
    /// Set once the server says the lease is gone.
    dead: watch::Sender<bool>,
}

/// One lease of a handle, with its renewal loop.
pub(crate) struct Slot {
    st: Arc<LeaseState>,
    ttl: Duration,
    group: RenewalGroup,
    sh: Arc<Shared>,
}

impl Slot {
    fn is_dead(&self) -> bool {
        self.group.is_dead() || *self.st.dead.borrow()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Nobody uses this lease any more: revoke it rather than let it
        // linger for its TTL (best effort).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (mut c, lease) = (self.sh.req(), self.st.lease);
            rt.spawn(async move {
                let _ = c.lease_revoke(lease).await;
            });
        }
    }
}

/// Keeps one lease alive: one `LeaseKeepAlive` per call on a long-lived
/// stream, and — when locks are held — one `LeaseTimeToLive` listing the
/// lease's keys, so an entry deleted behind our back fires its `lost()`.
struct KeepAlive {
    sh: Arc<Shared>,
    st: Arc<LeaseState>,
    stream: tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>,
}

impl KeepAlive {
    fn lost(&self) -> Result<RenewOutcome> {
        self.st.dead.send_replace(true);
        Ok(RenewOutcome::lease_lost())
    }
}

#[async_trait]
impl Renewer for KeepAlive {
    async fn renew(&self, members: &[LockEntry]) -> Result<RenewOutcome> {
        let sent = Instant::now();
        let mut ttl = None;
        {
            let mut s = self.stream.lock().await;
            match s.as_mut() {
                None => {
                    // Opening the stream sends one keep-alive and reads its answer.
                    let mut c = self.sh.req();
                    match c.lease_keep_alive(self.st.lease).await {
                        Ok(pair) => *s = Some(pair),
                        Err(etcd_client::Error::LeaseKeepAliveError(m))
                            if m.contains("not found") =>
                        {
                            return self.lost()
                        }
                        Err(e) => return Err(map_read(e)),
                    }
                }
                Some((keeper, stream)) => {
                    self.sh.count();
                    let r = match keeper.keep_alive().await {
                        Ok(()) => stream.message().await,
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(Some(resp)) if resp.ttl() <= 0 => return self.lost(),
                        Ok(Some(resp)) => ttl = Some(Duration::from_secs(resp.ttl() as u64)),
                        Ok(None) => {
                            *s = None;
                            return Err(Error::unavailable(
                                crate::BACKEND,
                                "keep-alive stream closed",
                            ));
                        }
                        Err(e) => {
                            *s = None;
                            return Err(map_read(e));
                        }
                    }
                }
            }
        }
        let mut lost = Vec::new();
        if !members.is_empty() {
            let lease = self.st.lease;
            let resp = self
                .sh
                .read(|mut c| async move {
                    c.lease_time_to_live(
                        lease,
                        Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
                    )
                    .await
                })
                .await?;
            if resp.ttl() <= 0 {
                return self.lost();
            }
            let keys: HashSet<&[u8]> = resp.keys().iter().map(Vec::as_slice).collect();
            lost = members
                .iter()
                .filter(|m| !keys.contains(m.id.as_bytes()))
                .map(|m| m.id.clone())
                .collect();
        }
        {
            let mut c = lock_mutex(&self.st.confirmed);
            *c = (*c).max(sent);
        }
        Ok(RenewOutcome {
            lost,
            lease_lost: false,
            ttl,
        })
    }
}

type Slots = Arc<Mutex<HashMap<u64, Arc<Slot>>>>;

/// The lock half of a handle.
pub(crate) struct Locks {
    sh: Arc<Shared>,
    local: LocalQueues,
    slots: Slots,
    granting: tokio::sync::Mutex<()>,
}

/// What the acquire txn found.
struct Acquired {
    my_rev: i64,
    header: i64,
    /// The entry just before ours, if it is not ours to hold yet.
    pred: Option<Vec<u8>>,
}

impl Locks {
    pub(crate) fn new(sh: Arc<Shared>) -> Self {
        Locks {
            sh,
            local: LocalQueues::new(),
            slots: Arc::new(Mutex::new(HashMap::new())),
            granting: tokio::sync::Mutex::new(()),
        }
    }

    /// The live lease for `ttl`, granting one (and starting its renewal)
    /// if there is none.
    async fn slot(&self, ttl: Duration) -> Result<Arc<Slot>> {
        let secs = ttl_secs(ttl);
        let live = |slots: &Slots| {
            lock_mutex(slots)
                .get(&secs)
                .filter(|s| !s.is_dead())
                .cloned()
        };
        if let Some(s) = live(&self.slots) {
            return Ok(s);
        }
        // One grant at a time, so concurrent first locks share one lease.
        let _g = self.granting.lock().await;
        if let Some(s) = live(&self.slots) {
            return Ok(s);
        }
        let sent = Instant::now();
        let (lease, granted) = self.sh.grant(Duration::from_secs(secs)).await?;
        let st = Arc::new(LeaseState {
            lease,
            confirmed: Mutex::new(sent),
            dead: watch::channel(false).0,
        });
        let renewer = Arc::new(KeepAlive {
            sh: self.sh.clone(),
            st: st.clone(),
            stream: tokio::sync::Mutex::new(None),
        });
        let slot = Arc::new(Slot {
            st,
            ttl: granted,
            group: RenewalGroup::spawn(granted, renewer),
            sh: self.sh.clone(),
        });
        lock_mutex(&self.slots).insert(secs, slot.clone());
        Ok(slot)
    }

    /// `lock` (`wait = true`) and `try_lock` (`wait = false`).
    pub(crate) async fn acquire(
        &self,
        name: &str,
        opts: &LockOptions,
        wait: bool,
    ) -> Result<Option<LockGuard>> {
        let turn = if wait {
            self.local.turn(name).await
        } else {
            match self.local.try_turn(name) {
                Some(t) => t,
                None => return Ok(None),
            }
        };
        let dir = self.sh.layout.lock_dir(name);
        let shared_turn = SharedTurn::new(turn);
        // The txns that may create our entry; the cleanup waits for their
        // answers, since a delete sent while one is in flight may overtake it.
        let requests = InFlight::new();
        loop {
            let slot = self.slot(opts.ttl).await?;
            let key = self.sh.layout.lock_entry(name, slot.st.lease);
            // Until the entry becomes a held lock, a cancelled or failed
            // attempt deletes it; the local turn is given up only after that,
            // so the next local task never finds this task's entry.
            let delete = {
                let (sh, key) = (self.sh.clone(), key.clone());
                async move {
                    let r = sh
                        .read(|mut c| {
                            let key = key.clone();
                            async move { c.delete(key, None).await }
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "deleting an abandoned lock entry failed; it expires with its lease");
                    }
                }
            };
            let cleanup = requests.undo_on_drop(delete, Some(&shared_turn));
            let outcome = if wait {
                self.acquire_waiting(&requests, &slot, &key, &dir).await
            } else {
                self.acquire_now(&requests, &slot, &key, &dir).await
            };
            let my_rev = match outcome {
                Ok(Some(r)) => r,
                Ok(None) => {
                    // Busy: try_lock created nothing.
                    shared_turn.take();
                    cleanup.disarm();
                    return Ok(None);
                }
                Err(Error::LockLost { .. }) if wait => {
                    // Our entry vanished while we waited (the lease expired
                    // during a partition, or an operator deleted it): queue
                    // again, with a fresh lease if this one is gone.
                    cleanup.disarm();
                    let (sh, key) = (self.sh.clone(), key.clone());
                    let _ = sh
                        .read(|mut c| {
                            let key = key.clone();
                            async move { c.delete(key, None).await }
                        })
                        .await;
                    continue;
                }
                Err(e) => {
                    cleanup.run_now().await;
                    return Err(e);
                }
            };
            let entry = LockEntry {
                name: name.to_string(),
                token: my_rev as u64,
                id: key,
            };
            // The entry lives as long as the lease, which is proven alive
            // until its last confirmed renewal + TTL.
            let since = *lock_mutex(&slot.st.confirmed);
            let trigger = slot.group.add(entry.clone(), since);
            if trigger.is_fired() && wait {
                // The lease died just now: this holding is worthless.
                cleanup.disarm();
                continue;
            }
            let turn = shared_turn.take();
            cleanup.disarm();
            let ops = Arc::new(Ops {
                sh: self.sh.clone(),
                slot,
                slots: self.slots.clone(),
                secs: ttl_secs(opts.ttl),
            });
            return Ok(Some(LockGuard::new(entry, trigger, ops, turn)));
        }
    }

    /// try_lock: creates the entry only if the lock has no entry at all.
    /// `Ok(None)` when busy.
    async fn acquire_now(
        &self,
        requests: &InFlight,
        slot: &Slot,
        key: &str,
        dir: &str,
    ) -> Result<Option<i64>> {
        let owner = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1)
            .with_keys_only();
        let txn = ETxn::new()
            .when([ECompare::create_revision(dir, CompareOp::Equal, 0).with_prefix()])
            .and_then([TxnOp::put(
                key,
                "",
                Some(EPut::new().with_lease(slot.st.lease)),
            )])
            .or_else([
                TxnOp::get(key, Some(GetOptions::new().with_keys_only())),
                TxnOp::get(dir, Some(owner)),
            ]);
        let resp = self.creating(requests, txn, Arc::default()).await?;
        if !resp.succeeded() {
            let ops = resp.op_responses();
            let first = |i: usize| match ops.get(i) {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.create_revision()),
                _ => None,
            };
            return match (first(0), first(1)) {
                // An earlier attempt of this call (whose answer was lost)
                // created our entry, and it is the oldest: we hold the lock.
                (Some(mine), Some(owner)) if mine == owner => Ok(Some(mine)),
                // Busy, with an entry of ours from a lost answer: remove it.
                (Some(mine), _) => {
                    let del = ETxn::new()
                        .when([ECompare::create_revision(key, CompareOp::Equal, mine)])
                        .and_then([TxnOp::delete(key, None)]);
                    self.sh.txn_repeatable(&del).await?;
                    Ok(None)
                }
                _ => Ok(None),
            };
        }
        // The put created the entry, so its create revision is the txn's.
        Ok(Some(resp.header().map_or(0, |h| h.revision())))
    }

    /// The acquire txn; see the module docs.
    async fn create(
        &self,
        requests: &InFlight,
        slot: &Slot,
        key: &str,
        dir: &str,
    ) -> Result<Acquired> {
        let owner = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1)
            .with_keys_only();
        let last_two = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(2)
            .with_keys_only();
        let txn = ETxn::new()
            .when([ECompare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(key, "", Some(EPut::new().with_lease(slot.st.lease))),
                TxnOp::get(dir, Some(owner.clone())),
                TxnOp::get(dir, Some(last_two)),
            ])
            .or_else([
                TxnOp::get(key, Some(GetOptions::new().with_keys_only())),
                TxnOp::get(dir, Some(owner)),
            ]);
        let mut stale_deleted = false;
        loop {
            let attempts = Arc::new(AtomicUsize::new(0));
            // Safe to repeat: a repeated txn finds our entry and takes it
            // (the else branch), exactly as a first answer would have.
            let resp = self
                .creating(requests, txn.clone(), attempts.clone())
                .await?;
            let header = resp.header().map_or(0, |h| h.revision());
            let ops = resp.op_responses();
            let kvs = |i: usize| match ops.get(i) {
                Some(TxnOpResponse::Get(g)) => g.kvs().to_vec(),
                _ => Vec::new(),
            };
            if resp.succeeded() {
                let my_rev = header;
                let owner = kvs(1).first().map(|kv| kv.create_revision());
                if owner == Some(my_rev) {
                    return Ok(Acquired {
                        my_rev,
                        header,
                        pred: None,
                    });
                }
                let pred = kvs(2)
                    .into_iter()
                    .find(|kv| kv.create_revision() < my_rev)
                    .map(|kv| kv.key().to_vec());
                return Ok(Acquired {
                    my_rev,
                    header,
                    pred,
                });
            }
            let mine = kvs(0).first().map(|kv| kv.create_revision()).unwrap_or(0);
            if mine == 0 {
                // Deleted between the compare and the read: cannot happen
                // inside one txn, but never hand out token 0.
                continue;
            }
            if attempts.load(Ordering::Relaxed) > 1 || stale_deleted {
                // Our own earlier attempt created it: take it.
                let owner = kvs(1).first().map(|kv| kv.create_revision());
                if owner == Some(mine) {
                    return Ok(Acquired {
                        my_rev: mine,
                        header,
                        pred: None,
                    });
                }
                // The predecessor is found by the next read.
                return Ok(Acquired {
                    my_rev: mine,
                    header,
                    pred: Some(Vec::new()),
                });
            }
            // A stale entry of this lease (a release that failed): nobody
            // holds it locally, so delete it and create a fresh one, with a
            // fresh (larger) token.
            let del = ETxn::new()
                .when([ECompare::create_revision(key, CompareOp::Equal, mine)])
                .and_then([TxnOp::delete(key, None)]);
            self.sh.txn_repeatable(&del).await?;
            stale_deleted = true;
        }
    }

    /// lock: creates the entry and waits until it is the oldest.
    async fn acquire_waiting(
        &self,
        requests: &InFlight,
        slot: &Slot,
        key: &str,
        dir: &str,
    ) -> Result<Option<i64>> {
        let a = self.create(requests, slot, key, dir).await?;
        let (my_rev, mut header) = (a.my_rev, a.header);
        // None: held; Some(empty): the predecessor is not known yet.
        let Some(p) = a.pred else {
            return Ok(Some(my_rev));
        };
        let mut pred = (!p.is_empty()).then_some(p);
        let mut dead = slot.st.dead.subscribe();
        loop {
            if let Some(p) = pred.take() {
                self.wait_deleted(&p, header + 1, &mut dead).await?;
            }
            // Re-read: our entry must still be there (the lease may have
            // expired meanwhile), and find the entry now just before ours.
            let before = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_max_create_revision(my_rev - 1)
                .with_limit(1)
                .with_keys_only();
            let txn = ETxn::new().and_then([
                TxnOp::get(dir, Some(before)),
                TxnOp::get(key, Some(GetOptions::new().with_keys_only())),
            ]);
            let resp = self.sh.txn_repeatable(&txn).await?;
            header = resp.header().map_or(0, |h| h.revision());
            let ops = resp.op_responses();
            let first = |i: usize| match ops.get(i) {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().cloned(),
                _ => None,
            };
            if first(1).map(|kv| kv.create_revision()) != Some(my_rev) {
                return Err(Error::LockLost {
                    name: key.to_string(),
                });
            }
            match first(0) {
                None => return Ok(Some(my_rev)),
                Some(kv) => pred = Some(kv.key().to_vec()),
            }
        }
    }

    /// Runs a txn that may create our entry to its answer, even if the
    /// caller is dropped meanwhile (see [`InFlight`]); counts its attempts.
    async fn creating(
        &self,
        requests: &InFlight,
        txn: ETxn,
        attempts: Arc<AtomicUsize>,
    ) -> Result<etcd_client::TxnResponse> {
        let sh = self.sh.clone();
        requests
            .run(async move {
                sh.read(|mut c| {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await
            })
            .await?
    }

    /// Waits for the deletion of `key` at or after revision `from`.
    async fn wait_deleted(
        &self,
        key: &[u8],
        from: i64,
        dead: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let opts = WatchOptions::new()
            .with_start_revision(from)
            .with_filters([WatchFilterType::NoPut]);
        let mut c = self.sh.req();
        let mut s = match c.watch(key.to_vec(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                if classify(&e) == Fault::Auth {
                    return Err(map_read(e));
                }
                // Re-read instead (after a pause, not in a tight loop).
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(());
            }
        };
        loop {
            tokio::select! {
                m = s.message() => match m {
                    Ok(Some(r)) => {
                        if r.canceled() || r.events().iter().any(|e| e.event_type() == EventType::Delete) {
                            return Ok(());
                        }
                    }
                    Ok(None) | Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        return Ok(());
                    }
                },
                r = async { dead.wait_for(|d| *d).await.map(|_| ()) } => {
                    if r.is_ok() {
                        return Err(Error::LockLost { name: String::from_utf8_lossy(key).into_owned() });
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Deletes the holder's entry of lock `name` (a fault hook for tests).
    pub(crate) async fn revoke(&self, name: &str) -> Result<bool> {
        validate::lock_name(name)?;
        let dir = self.sh.layout.lock_dir(name);
        let owner = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1)
            .with_keys_only();
        let resp = self
            .sh
            .read(|mut c| {
                let (dir, owner) = (dir.clone(), owner.clone());
                async move { c.get(dir, Some(owner)).await }
            })
            .await?;
        let Some(kv) = resp.kvs().first().cloned() else {
            return Ok(false);
        };
        let resp = self
            .sh
            .read(|mut c| {
                let k = kv.key().to_vec();
                async move { c.delete(k, None).await }
            })
            .await?;
        Ok(resp.deleted() > 0)
    }
}

/// Release and abandon of one held entry.
struct Ops {
    sh: Arc<Shared>,
    slot: Arc<Slot>,
    slots: Slots,
    secs: u64,
}

#[async_trait]
impl GuardOps for Ops {
    async fn release(&self, entry: &LockEntry) -> Result<()> {
        // Only our own holding: the entry with our token. Repeating it is
        // harmless, so transient failures are retried.
        let txn = ETxn::new()
            .when([ECompare::create_revision(
                entry.id.clone(),
                CompareOp::Equal,
                entry.token as i64,
            )])
            .and_then([TxnOp::delete(entry.id.clone(), None)]);
        self.sh.txn_repeatable(&txn).await?;
        self.slot.group.remove(&entry.id);
        Ok(())
    }

    fn abandon(&self, entry: &LockEntry) {
        // Stop renewing this holding: its lost() fires at its deadline.
        self.slot.group.abandon(&entry.id);
        // The lease is shared with the handle's other locks and stays alive,
        // so move the entry to a lease of its own that nobody renews (a put
        // keeps its create revision, i.e. its token), as if its holder died.
        // Later locks of this handle get a new lease (and new entry keys).
        {
            let mut slots = lock_mutex(&self.slots);
            if slots
                .get(&self.secs)
                .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
            {
                slots.remove(&self.secs);
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (sh, ttl, entry) = (self.sh.clone(), self.slot.ttl, entry.clone());
        rt.spawn(async move {
            let Ok((lease, _)) = sh.grant(ttl).await else {
                return;
            };
            let txn = ETxn::new()
                .when([ECompare::create_revision(
                    entry.id.clone(),
                    CompareOp::Equal,
                    entry.token as i64,
                )])
                .and_then([TxnOp::put(
                    entry.id.clone(),
                    "",
                    Some(EPut::new().with_lease(lease)),
                )]);
            let _ = sh.txn_repeatable(&txn).await;
        });
    }
}
