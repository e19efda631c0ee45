//! Locks in the layout of Consul's own `api.Lock`, on sessions.
//!
//! - **Key**: `latchkey/…/locks/<escaped name>`, value empty, flags
//!   [`LOCK_FLAG`] (`api.Lock`'s magic), held by a session: a Go program
//!   using `api.LockKey` on that key and latchkey exclude each other.
//! - **Sessions**: one per (handle, TTL), created with `Behavior=release`,
//!   `LockDelay=0s` and no health checks (`Checks: []`, `NodeChecks: []`),
//!   so a healthy holder is never invalidated by the agent's `serfHealth`
//!   and a successor is never stalled by lock-delay. The TTL is the lock
//!   TTL rounded up to whole seconds and raised to Consul's minimum of 10 s.
//!   Core's [`RenewalGroup`] renews each session (one `PUT
//!   /v1/session/renew` per tick for all locks of that TTL); a 404 means the
//!   session is gone and every lock on it is lost. A session with no
//!   renewing lock and no pending acquisition is retired (no longer
//!   renewed, destroyed once empty); later locks get a fresh one.
//! - **Acquire**: one `/v1/txn` with a `lock` op; the `ModifyIndex` it
//!   returns is the fencing token (a Raft index: never reused, also across
//!   delete-and-recreate, unlike `LockIndex`).
//! - **Wait**: blocking queries on the key (`?index=…&wait=…&consistent`),
//!   woken by its change, never by polling. Waiters leave no server state,
//!   so a cancelled `lock()` leaves nothing behind. An acquire txn dropped
//!   in flight runs on to its answer ([`InFlight`]); a grant nobody took is
//!   deleted before the handle's next task for that name may start. After
//!   a refused acquire on a key that looks free (another client's session
//!   lock-delay), it retries after a short pause, as `api.Lock` does.
//! - **Release**: one txn `[check-session, check-index(token), delete]`:
//!   deletes the key only if this holding still has it.
//! - **Lost**: the renewal deadline (core), a 404 on renewal, and a per-handle
//!   monitor (one blocking query on the namespace's `locks/` subtree for all
//!   held locks) that fires `lost()` as soon as a held key's session or
//!   index changes (deleted or released behind our back).
//! - **Fenced writes**: `Compare::held(guard)` holds iff the lock key exists,
//!   its `Session` is the guard's and its `ModifyIndex` equals the guard's
//!   token; the txn pins it with `check-index(token)` (which implies the
//!   session, since an index names one write). Checking the session alone
//!   would not do: the handle's session outlives a holding, and a later
//!   holding of the same handle reuses it. The token-equality rule is sound
//!   because nothing but acquire, release and abandon ever writes a lock key:
//!   lock keys live outside the `kv/` subtree, so a holder's fenced writes
//!   (to any user key) can never change its own lock's index; a write to the
//!   lock key by a foreign tool ends the holding for fencing purposes, and
//!   the monitor fires `lost()`.
//! - **Abandon** (`LockGuard::abandon`, "as if the holder died"): the key is
//!   handed in one txn (`unlock`, `lock`) to a fresh session that nobody
//!   renews, because the handle's session stays renewed for its other
//!   locks; Consul releases the key when that session expires (TTL..2×TTL).
//!   The guard's token is stale from then on; its `lost()` fires at its
//!   renewal deadline. A `lock` op by a session that already holds the key
//!   returns the unchanged entry (same index): such a re-lock is not counted
//!   as a new holding, the task waits instead.

use crate::client::{Client, KvOp, TxnReply, Verb, NAME};
use crate::keys;
use async_trait::async_trait;
use latchkey_core::lock::local::{LocalQueues, LocalTurn, SharedTurn};
use latchkey_core::{
    Error, GuardOps, InFlight, LockEntry, LockGuard, RenewOutcome, RenewalGroup, Renewer, Result,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// `api.Lock`'s flags value (`LockFlagValue`), set on every lock key.
pub const LOCK_FLAG: u64 = 0x2ddc_cbc0_58a5_0c18;

/// Consul's session TTL bounds.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(10);
/// Consul's default `session_ttl_max`.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(86_400);

/// How long one blocking query waits before it is re-sent.
const BLOCK_WAIT: Duration = Duration::from_secs(30);

/// The session TTL for a requested TTL: whole seconds, at least 10 s.
pub fn session_ttl(ttl: Duration) -> Result<Duration> {
    if ttl > MAX_SESSION_TTL {
        return Err(Error::InvalidArgument(format!(
            "a TTL of {ttl:?} is longer than Consul's session maximum of {MAX_SESSION_TTL:?}"
        )));
    }
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Ok(Duration::from_secs(secs).max(MIN_SESSION_TTL))
}

struct SlotState {
    retired: bool,
    pending: usize,
    /// When the last request that proved the session alive was sent.
    alive_sent: Instant,
}

struct Shared {
    id: String,
    state: Mutex<SlotState>,
}

impl Shared {
    fn st(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One session of a handle and its renewal loop.
struct Slot {
    shared: Arc<Shared>,
    group: RenewalGroup,
}

struct SessionRenewer {
    client: Client,
    shared: Arc<Shared>,
}

#[async_trait]
impl Renewer for SessionRenewer {
    async fn renew(&self, members: &[LockEntry]) -> Result<RenewOutcome> {
        {
            let mut st = self.shared.st();
            if st.retired || (members.is_empty() && st.pending == 0) {
                // Nothing to keep alive: let the session lapse, so that
                // abandoned locks on it expire as their TTL says.
                st.retired = true;
                return Ok(RenewOutcome::alive());
            }
        }
        let sent = Instant::now();
        match self.client.session_renew(&self.shared.id).await? {
            Some(ttl) => {
                self.shared.st().alive_sent = sent;
                Ok(RenewOutcome {
                    ttl,
                    ..RenewOutcome::alive()
                })
            }
            None => Ok(RenewOutcome::lease_lost()),
        }
    }
}

struct Held {
    key: String,
    session: String,
    token: u64,
    slot: Arc<Slot>,
}

/// The lock state of one handle.
pub(crate) struct Locks {
    client: Client,
    prefix: String,
    queues: LocalQueues,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    retired: Mutex<Vec<Arc<Slot>>>,
    held: Mutex<HashMap<String, Held>>,
    /// The last token this handle got per lock key: a `lock` op by a session
    /// that already holds the key (an abandoned holding of this handle)
    /// succeeds without changing the entry, so the same token comes back;
    /// that is not a new holding.
    issued: Mutex<HashMap<String, u64>>,
    monitor_running: AtomicBool,
    me: Weak<Locks>,
}

/// Decrements a slot's pending count when an acquisition attempt ends.
struct Pending(Arc<Slot>);
impl Drop for Pending {
    fn drop(&mut self) {
        let mut st = self.0.shared.st();
        st.pending = st.pending.saturating_sub(1);
    }
}

/// The session ID inside a [`LockEntry::id`] (`<session>:<token>`).
pub(crate) fn session_of(entry: &LockEntry) -> &str {
    entry
        .id
        .rsplit_once(':')
        .map_or(entry.id.as_str(), |(s, _)| s)
}

impl Locks {
    pub(crate) fn new(client: Client, prefix: String) -> Arc<Self> {
        Arc::new_cyclic(|me| Locks {
            client,
            prefix,
            queues: LocalQueues::new(),
            slots: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            held: Mutex::new(HashMap::new()),
            issued: Mutex::new(HashMap::new()),
            monitor_running: AtomicBool::new(false),
            me: me.clone(),
        })
    }

    /// The Consul key of lock `name`.
    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}{}", self.prefix, keys::encode(name))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A live session for `ttl`, with an acquisition counted as pending.
    async fn slot(&self, ttl: Duration) -> Result<Pending> {
        let secs = ttl.as_secs();
        {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = slots.get(&secs) {
                let mut st = s.shared.st();
                if !st.retired && !s.group.is_dead() {
                    st.pending += 1;
                    drop(st);
                    return Ok(Pending(s.clone()));
                }
                drop(st);
                let old = slots.remove(&secs).expect("present");
                self.retire(old);
            }
        }
        let sent = Instant::now();
        let id = self
            .client
            .session_create(ttl, "release", "latchkey-lock")
            .await?;
        let shared = Arc::new(Shared {
            id,
            state: Mutex::new(SlotState {
                retired: false,
                pending: 1,
                alive_sent: sent,
            }),
        });
        let group = RenewalGroup::spawn(
            ttl,
            Arc::new(SessionRenewer {
                client: self.client.clone(),
                shared: shared.clone(),
            }),
        );
        let slot = Arc::new(Slot { shared, group });
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slots.insert(secs, slot.clone()) {
            // A concurrent task made one too: keep both alive, retire the old.
            self.retire(old);
        }
        Ok(Pending(slot))
    }

    /// Keeps a replaced slot until its locks are gone, then destroys its session.
    fn retire(&self, slot: Arc<Slot>) {
        slot.shared.st().retired = true;
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.push(slot);
        retired.retain(|s| {
            if s.group.is_empty() && s.shared.st().pending == 0 {
                let (c, id) = (self.client.clone(), s.shared.id.clone());
                tokio::spawn(async move {
                    let _ = c.session_destroy(&id).await;
                });
                false
            } else {
                true
            }
        });
    }

    /// One acquisition attempt; `Ok(None)` if the lock is held by another session.
    pub(crate) async fn try_acquire(
        &self,
        name: &str,
        ttl: Duration,
        mut turn: LocalTurn,
    ) -> Result<std::result::Result<LockGuard, LocalTurn>> {
        let key = self.key(name);
        for _ in 0..3 {
            let pending = self.slot(ttl).await?;
            let slot = pending.0.clone();
            let sid = slot.shared.id.clone();
            let alive_sent = slot.shared.st().alive_sent;
            let op = KvOp::new(Verb::Lock, key.clone())
                .value(bytes::Bytes::new())
                .flags(LOCK_FLAG)
                .session(sid.clone());
            let what = format!("acquiring lock {name:?}");
            // Consul may grant the lock although this call is dropped (or
            // loses the answer) while the txn is in flight. The cleanup
            // waits for the txn's answer, gives back a holding that no guard
            // took, and only then lets the handle's next task in: a `lock`
            // op by our session on a key it already holds would succeed
            // again with the same entry, so that task must not race it.
            let requests = InFlight::new();
            let shared_turn = SharedTurn::new(turn);
            let cleanup = requests.undo_on_drop(
                clean_orphan(
                    self.client.clone(),
                    self.me.clone(),
                    key.clone(),
                    sid.clone(),
                ),
                Some(&shared_turn),
            );
            let answer = {
                let client = self.client.clone();
                requests
                    .run(async move { client.txn(&[op], &what).await })
                    .await
            };
            let reply = match answer {
                Ok(Ok(r)) => r,
                Ok(Err(e @ Error::Indeterminate { .. })) => {
                    // Unknown outcome: clean up in the background (it holds
                    // the turn until done).
                    drop(cleanup);
                    return Err(e);
                }
                Ok(Err(e)) | Err(e) => {
                    cleanup.disarm();
                    return Err(e);
                }
            };
            cleanup.disarm();
            turn = shared_turn
                .take()
                .expect("only the disarmed cleanup takes the turn");
            match reply {
                TxnReply::Committed(entries) => {
                    let token = entries.first().map_or(0, |e| e.modify_index);
                    {
                        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
                        if issued.get(&key).is_some_and(|t| *t >= token) {
                            // Our session still holds it for an abandoned
                            // guard: wait until that holding is gone.
                            return Ok(Err(turn));
                        }
                        issued.insert(key.clone(), token);
                    }
                    let entry = LockEntry {
                        name: name.to_string(),
                        token,
                        id: format!("{sid}:{token}"),
                    };
                    let trigger = slot.group.add(entry.clone(), alive_sent);
                    self.held().insert(
                        entry.id.clone(),
                        Held {
                            key: key.clone(),
                            session: sid,
                            token,
                            slot: slot.clone(),
                        },
                    );
                    self.start_monitor();
                    drop(pending);
                    let ops: Arc<dyn GuardOps> = Arc::new(LockOps {
                        locks: self.me.upgrade().expect("Locks is alive while used"),
                    });
                    return Ok(Ok(LockGuard::new(entry, trigger, ops, Some(turn))));
                }
                TxnReply::RolledBack(errs) => {
                    let session_gone = errs.iter().any(|e| {
                        let w = e.what.to_ascii_lowercase();
                        w.contains("session") && !w.contains("held")
                    });
                    if session_gone {
                        slot.shared.st().retired = true;
                        continue;
                    }
                    return Ok(Err(turn));
                }
            }
        }
        Err(Error::unavailable(
            NAME,
            format!("acquiring lock {name:?}: the session kept disappearing"),
        ))
    }

    /// Waits (blocking queries, no polling) until `name` is free and takes it.
    pub(crate) async fn lock(&self, name: &str, ttl: Duration) -> Result<LockGuard> {
        let key = self.key(name);
        let mut turn = self.queues.turn(name).await;
        let mut index = 0u64;
        let mut refused_while_free = 0u32;
        loop {
            match self.try_acquire(name, ttl, turn).await? {
                Ok(g) => return Ok(g),
                Err(t) => turn = t,
            }
            // Held by someone else: wait until the key changes and is free.
            let mut first = true;
            let mut failures = 0u32;
            loop {
                let (e, idx) = match self.client.kv_get_blocking(&key, index, BLOCK_WAIT).await {
                    Ok(r) => r,
                    // A waiter rides out a short outage (or a leader
                    // election); `opts.wait` still bounds the whole call.
                    Err(e) if e.is_transient() && failures < 30 => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(
                            100 * u64::from(failures.min(10)),
                        ))
                        .await;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                failures = 0;
                // Consul's advice: an index that goes backwards is reset.
                index = if idx < index { 0 } else { idx.max(1) };
                match e {
                    Some(e) if e.holder().is_some() => {
                        refused_while_free = 0;
                        first = false;
                    }
                    _ => break,
                }
            }
            if first {
                // Refused although the key looks free: lock-delay of another
                // client's session (or a race with a release). Back off a
                // little after the first time, as api.Lock does.
                refused_while_free += 1;
                if refused_while_free > 1 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Takes `name` if it is free now.
    pub(crate) async fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<LockGuard>> {
        let Some(turn) = self.queues.try_turn(name) else {
            return Ok(None);
        };
        Ok(self.try_acquire(name, ttl, turn).await?.ok())
    }

    fn start_monitor(&self) {
        if self.monitor_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.me.clone();
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        tokio::spawn(async move { monitor(me, client, prefix).await });
    }

    async fn release(&self, entry: &LockEntry) -> Result<()> {
        let key = self.key(&entry.name);
        let sid = session_of(entry).to_string();
        let ops = [
            KvOp::new(Verb::CheckSession, key.clone()).session(sid),
            KvOp::new(Verb::CheckIndex, key.clone()).index(entry.token),
            KvOp::new(Verb::Delete, key),
        ];
        // Rolled back = the holding is already gone: nothing to release.
        self.client
            .txn(&ops, &format!("releasing lock {:?}", entry.name))
            .await?;
        if let Some(h) = self.held().remove(&entry.id) {
            h.slot.group.remove(&entry.id);
        }
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        if issued.get(&self.key(&entry.name)) == Some(&entry.token) {
            issued.remove(&self.key(&entry.name));
        }
        Ok(())
    }

    /// Stops renewing a holding, as if its holder had died. The session is
    /// shared with the handle's other locks of that TTL and stays renewed,
    /// so the key is handed (in one txn: unlock, lock) to a fresh session
    /// that nobody renews: it is released after the TTL, as a crashed
    /// holder's would be. The guard's `lost()` fires at its renewal deadline.
    fn abandon(&self, entry: &LockEntry) {
        let Some(h) = self.held().remove(&entry.id) else {
            return;
        };
        h.slot.group.abandon(&entry.id);
        let client = self.client.clone();
        let ttl = h.slot.group.ttl();
        tokio::spawn(async move {
            let Ok(s2) = client
                .session_create(ttl, "release", "latchkey-abandoned")
                .await
            else {
                tracing::warn!(key = %h.key, "could not hand an abandoned lock to an expiring session");
                return;
            };
            let ops = [
                KvOp::new(Verb::CheckSession, h.key.clone()).session(h.session.clone()),
                KvOp::new(Verb::CheckIndex, h.key.clone()).index(h.token),
                KvOp::new(Verb::Unlock, h.key.clone())
                    .value(bytes::Bytes::new())
                    .flags(LOCK_FLAG)
                    .session(h.session.clone()),
                KvOp::new(Verb::Lock, h.key.clone())
                    .value(bytes::Bytes::new())
                    .flags(LOCK_FLAG)
                    .session(s2.clone()),
            ];
            match client.txn(&ops, "handing over an abandoned lock").await {
                Ok(TxnReply::Committed(_)) => {}
                // Already gone: the spare session is not needed.
                _ => {
                    let _ = client.session_destroy(&s2).await;
                }
            }
        });
    }
}

/// After an acquire that nobody took (cancelled, or its answer lost): if
/// our session holds the key without a guard, delete it, so it does not
/// stay held while the session lives.
async fn clean_orphan(client: Client, me: Weak<Locks>, key: String, sid: String) {
    let Ok((Some(e), _)) = client.kv_get(&key, true).await else {
        return;
    };
    if e.holder() != Some(sid.as_str()) {
        return;
    }
    let id = format!("{sid}:{}", e.modify_index);
    if me.upgrade().is_some_and(|l| l.held().contains_key(&id)) {
        return;
    }
    let _ = client
        .txn(
            &[
                KvOp::new(Verb::CheckSession, key.clone()).session(sid),
                KvOp::new(Verb::CheckIndex, key.clone()).index(e.modify_index),
                KvOp::new(Verb::Delete, key),
            ],
            "cleaning up an unclaimed lock acquisition",
        )
        .await;
}

/// Watches the namespace's lock subtree and fires `lost()` of every held
/// lock whose key no longer carries this holding.
async fn monitor(me: Weak<Locks>, client: Client, prefix: String) {
    let mut index = 0u64;
    let mut failures = 0u32;
    loop {
        {
            let Some(l) = me.upgrade() else { return };
            let held = l.held();
            if held.is_empty() {
                l.monitor_running.store(false, Ordering::SeqCst);
                return;
            }
        }
        let res = client
            .kv_list(&prefix, true, Some((index, BLOCK_WAIT)))
            .await;
        let Some(l) = me.upgrade() else { return };
        match res {
            Err(e) => {
                // The renewal deadline still guards every lock.
                tracing::debug!(error = %e, "consul lock monitor: retrying");
                failures += 1;
                drop(l);
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(10)))).await;
                continue;
            }
            Ok((entries, idx)) => {
                failures = 0;
                index = if idx < index { 0 } else { idx.max(1) };
                let by_key: HashMap<&str, &crate::client::Entry> =
                    entries.iter().map(|e| (e.key.as_str(), e)).collect();
                let mut held = l.held();
                let lost: Vec<String> = held
                    .iter()
                    // A holding newer than this snapshot cannot be judged by it.
                    .filter(|(_, h)| h.token <= idx)
                    .filter(|(_, h)| {
                        !by_key.get(h.key.as_str()).is_some_and(|e| {
                            e.holder() == Some(h.session.as_str()) && e.modify_index == h.token
                        })
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in lost {
                    if let Some(h) = held.remove(&id) {
                        tracing::warn!(key = %h.key, "consul lock taken or released behind our back: lost");
                        h.slot.group.lose(&id);
                    }
                }
            }
        }
    }
}

/// The guard operations of one handle's locks.
struct LockOps {
    locks: Arc<Locks>,
}

#[async_trait]
impl GuardOps for LockOps {
    async fn release(&self, entry: &LockEntry) -> Result<()> {
        self.locks.release(entry).await
    }

    fn abandon(&self, entry: &LockEntry) {
        self.locks.abandon(entry);
    }
}
