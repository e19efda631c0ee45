//! The state of one in-memory "server": keys, revisions, history, watchers
//! and the lock table, all behind one mutex, plus the sweeper thread that
//! expires TTL keys and lock holders at their deadlines.
//!
//! Everything that changes the state runs inside [`Shared::run`], which
//! first expires whatever is due. So a read never sees an expired key, and
//! expiries are ordered with the other writes by their revision.

use bytes::Bytes;
use futures::channel::mpsc::UnboundedSender;
use latchkey_core::{Compare, Error, EventKind, KeyValue, LockEntry, Result, Revision, WatchEvent};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Default number of events kept for watches that resume from a revision.
pub(crate) const DEFAULT_HISTORY_EVENTS: usize = 100_000;
/// Default bound on the bytes of values kept in the history.
pub(crate) const DEFAULT_HISTORY_BYTES: usize = 64 * 1024 * 1024;

/// The store-internal name of a user key or lock: namespace, NUL, key.
/// Neither a namespace nor a key may contain NUL, so this is injective and
/// namespaces never see each other's keys (also through prefixes: the NUL
/// ends the namespace).
pub(crate) fn full(ns: &str, key: &str) -> String {
    let mut s = String::with_capacity(ns.len() + 1 + key.len());
    s.push_str(ns);
    s.push('\0');
    s.push_str(key);
    s
}

/// One key's current state.
pub(crate) struct Entry {
    value: Bytes,
    revision: Revision,
    ttl: Option<Duration>,
    deadline: Option<Instant>,
}

/// One change, as kept in the history (full key).
struct RawEvent {
    kind: EventKind,
    key: String,
    value: Bytes,
    revision: Revision,
}

struct Watcher {
    prefix: String,
    ns_len: usize,
    min_rev: Revision,
    tx: UnboundedSender<Result<WatchEvent>>,
}

impl Watcher {
    /// Delivers `ev` if it matches; false if the watcher is gone.
    fn offer(&self, ev: &RawEvent) -> bool {
        if ev.revision < self.min_rev || !ev.key.starts_with(&self.prefix) {
            return !self.tx.is_closed();
        }
        self.tx
            .unbounded_send(Ok(to_event(ev, self.ns_len)))
            .is_ok()
    }
}

fn to_event(ev: &RawEvent, ns_len: usize) -> WatchEvent {
    WatchEvent {
        kind: ev.kind,
        key: ev.key[ns_len..].to_string(),
        value: ev.value.clone(),
        revision: ev.revision,
    }
}

/// What a waiter is told when the lock is handed to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grant {
    pub token: u64,
    pub granted_at: Instant,
}

struct Holder {
    id: String,
    token: u64,
    deadline: Instant,
}

struct Waiter {
    wid: u64,
    id: String,
    ttl: Duration,
    tx: oneshot::Sender<Grant>,
}

#[derive(Default)]
struct LockSlot {
    holder: Option<Holder>,
    queue: VecDeque<Waiter>,
}

/// The outcome of an acquire attempt that may wait.
pub(crate) enum Acquire {
    Granted(Grant),
    Queued {
        wid: u64,
        rx: oneshot::Receiver<Grant>,
    },
}

/// The whole state of one store.
pub(crate) struct State {
    rev: Revision,
    kv: BTreeMap<String, Entry>,
    key_deadlines: BTreeSet<(Instant, String)>,
    history: VecDeque<RawEvent>,
    history_bytes: usize,
    history_limit: usize,
    history_byte_limit: usize,
    /// Highest revision dropped from the history (0: nothing dropped).
    compacted: Revision,
    watchers: Vec<Watcher>,
    locks: HashMap<String, LockSlot>,
    lock_deadlines: BTreeSet<(Instant, String)>,
    next_id: u64,
    /// Set when a deadline earlier than every other was added, so the
    /// sweeper must recompute when to wake.
    wake: bool,
    shutdown: bool,
}

/// The state and the sweeper's wake-up.
pub(crate) struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    pub(crate) fn new(history_limit: usize, history_byte_limit: usize) -> Self {
        Shared {
            state: Mutex::new(State {
                rev: 0,
                kv: BTreeMap::new(),
                key_deadlines: BTreeSet::new(),
                history: VecDeque::new(),
                history_bytes: 0,
                history_limit,
                history_byte_limit,
                compacted: 0,
                watchers: Vec::new(),
                locks: HashMap::new(),
                lock_deadlines: BTreeSet::new(),
                next_id: 0,
                wake: false,
                shutdown: false,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the state after expiring what is due, and wakes the
    /// sweeper if `f` added an earlier deadline.
    pub(crate) fn run<R>(&self, f: impl FnOnce(&mut State, Instant) -> R) -> R {
        let mut st = self.lock();
        let now = Instant::now();
        st.expire_due(now);
        let r = f(&mut st, now);
        if std::mem::take(&mut st.wake) {
            self.wake.notify_all();
        }
        r
    }

    /// Stops the sweeper.
    pub(crate) fn shutdown(&self) {
        self.lock().shutdown = true;
        self.wake.notify_all();
    }

    /// The sweeper: sleeps until the earliest deadline (or until woken by an
    /// earlier one), then expires what is due. No fixed polling interval.
    pub(crate) fn sweep_forever(&self) {
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return;
            }
            let now = Instant::now();
            st.expire_due(now);
            st.wake = false;
            st = match st.next_deadline() {
                None => self.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    self.wake
                        .wait_timeout(st, d.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

impl State {
    /// The current revision of the store.
    pub(crate) fn revision(&self) -> Revision {
        self.rev
    }

    /// Allocates the next revision.
    pub(crate) fn next_rev(&mut self) -> Revision {
        self.rev += 1;
        self.rev
    }

    /// A store-unique number (waiter and handle ids).
    pub(crate) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn next_deadline(&self) -> Option<Instant> {
        let k = self.key_deadlines.first().map(|(d, _)| *d);
        let l = self.lock_deadlines.first().map(|(d, _)| *d);
        match (k, l) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn note_deadline(&mut self, d: Instant) {
        if self.next_deadline().is_none_or(|m| d < m) {
            self.wake = true;
        }
    }

    /// Expires TTL keys and lock holders whose deadline is `<= now`. Each
    /// expired key is deleted with a new revision and a Delete event; each
    /// expired lock goes to its next waiter.
    fn expire_due(&mut self, now: Instant) {
        while let Some((d, _)) = self.key_deadlines.first() {
            if *d > now {
                break;
            }
            let (_, key) = self.key_deadlines.pop_first().expect("first exists");
            if self.kv.remove(&key).is_some() {
                let rev = self.next_rev();
                self.emit(EventKind::Delete, key, Bytes::new(), rev);
            }
        }
        while let Some((d, _)) = self.lock_deadlines.first() {
            if *d > now {
                break;
            }
            let (d, name) = self.lock_deadlines.pop_first().expect("first exists");
            if let Some(slot) = self.locks.get_mut(&name) {
                if slot.holder.as_ref().is_some_and(|h| h.deadline == d) {
                    tracing::debug!(lock = %name.replace('\0', "/"), "mem: lock holder expired");
                    slot.holder = None;
                    self.hand_over(&name, now);
                }
            }
        }
    }

    /// Records an event in the history and sends it to the watchers.
    fn emit(&mut self, kind: EventKind, key: String, value: Bytes, revision: Revision) {
        let ev = RawEvent {
            kind,
            key,
            value,
            revision,
        };
        self.watchers.retain(|w| w.offer(&ev));
        self.history_bytes += ev.value.len() + ev.key.len();
        self.history.push_back(ev);
        while self.history.len() > self.history_limit
            || (self.history_bytes > self.history_byte_limit && self.history.len() > 1)
        {
            let old = self.history.pop_front().expect("non-empty");
            self.history_bytes -= old.value.len() + old.key.len();
            self.compacted = old.revision;
        }
    }

    // ---------------------------------------------------------------- KV

    pub(crate) fn current(&self, full: &str) -> Option<Revision> {
        self.kv.get(full).map(|e| e.revision)
    }

    pub(crate) fn get(&self, full: &str, ns_len: usize) -> Option<KeyValue> {
        self.kv.get(full).map(|e| to_kv(full, e, ns_len, false))
    }

    pub(crate) fn list(
        &self,
        full_prefix: &str,
        ns_len: usize,
        limit: Option<usize>,
        keys_only: bool,
    ) -> Vec<KeyValue> {
        self.kv
            .range::<str, _>((
                std::ops::Bound::Included(full_prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(full_prefix))
            .take(limit.unwrap_or(usize::MAX))
            .map(|(k, e)| to_kv(k, e, ns_len, keys_only))
            .collect()
    }

    /// Writes `full` at revision `rev` (allocated by the caller).
    pub(crate) fn write_put(
        &mut self,
        full: &str,
        value: Bytes,
        ttl: Option<Duration>,
        rev: Revision,
        now: Instant,
    ) {
        if let Some(old) = self.kv.get(full).and_then(|e| e.deadline) {
            self.key_deadlines.remove(&(old, full.to_string()));
        }
        let deadline = ttl.map(|t| now + t);
        if let Some(d) = deadline {
            self.note_deadline(d);
            self.key_deadlines.insert((d, full.to_string()));
        }
        self.kv.insert(
            full.to_string(),
            Entry {
                value: value.clone(),
                revision: rev,
                ttl,
                deadline,
            },
        );
        self.emit(EventKind::Put, full.to_string(), value, rev);
    }

    /// Deletes `full` (which must exist) at revision `rev`.
    pub(crate) fn write_delete(&mut self, full: &str, rev: Revision) -> bool {
        match self.kv.remove(full) {
            None => false,
            Some(e) => {
                if let Some(d) = e.deadline {
                    self.key_deadlines.remove(&(d, full.to_string()));
                }
                self.emit(EventKind::Delete, full.to_string(), Bytes::new(), rev);
                true
            }
        }
    }

    /// Evaluates one compare of a transaction.
    pub(crate) fn compare(&self, ns: &str, cmp: &Compare) -> bool {
        match cmp {
            Compare::Revision { key, op, revision } => {
                op.holds(self.current(&full(ns, key)).unwrap_or(0), *revision)
            }
            Compare::Value { key, value } => self
                .kv
                .get(&full(ns, key))
                .is_some_and(|e| e.value == *value),
            Compare::Exists(key) => self.kv.contains_key(&full(ns, key)),
            Compare::Absent(key) => !self.kv.contains_key(&full(ns, key)),
            Compare::Held(entry) => self.is_held(&full(ns, &entry.name), entry),
            // `Compare` may grow; an unknown compare never holds.
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Registers a watcher after replaying the history from `from`.
    pub(crate) fn watch(
        &mut self,
        full_prefix: String,
        ns_len: usize,
        from: Option<Revision>,
        tx: UnboundedSender<Result<WatchEvent>>,
    ) -> Result<()> {
        let start = match from {
            None => self.rev + 1,
            Some(r) => {
                let r = r.max(1);
                if r <= self.compacted {
                    return Err(Error::Compacted {
                        oldest: self.compacted + 1,
                    });
                }
                r
            }
        };
        let first = self.history.partition_point(|e| e.revision < start);
        for ev in self.history.range(first..) {
            if ev.key.starts_with(&full_prefix) {
                // The receiver is alive: we hold it's other half's caller.
                let _ = tx.unbounded_send(Ok(to_event(ev, ns_len)));
            }
        }
        self.watchers.push(Watcher {
            prefix: full_prefix,
            ns_len,
            min_rev: start,
            tx,
        });
        Ok(())
    }

    // ------------------------------------------------------------- locks

    fn is_held(&self, full_name: &str, entry: &LockEntry) -> bool {
        self.locks
            .get(full_name)
            .and_then(|s| s.holder.as_ref())
            .is_some_and(|h| h.id == entry.id && h.token == entry.token)
    }

    fn set_holder(&mut self, full_name: &str, id: String, ttl: Duration, now: Instant) -> Grant {
        let token = self.next_rev();
        let deadline = now + ttl;
        self.note_deadline(deadline);
        self.lock_deadlines
            .insert((deadline, full_name.to_string()));
        self.locks.entry(full_name.to_string()).or_default().holder = Some(Holder {
            id,
            token,
            deadline,
        });
        Grant {
            token,
            granted_at: now,
        }
    }

    /// Takes the lock if it is free and nobody queues for it.
    pub(crate) fn try_acquire(
        &mut self,
        full_name: &str,
        id: &str,
        ttl: Duration,
        now: Instant,
    ) -> Option<Grant> {
        let free = self
            .locks
            .get(full_name)
            .is_none_or(|s| s.holder.is_none() && s.queue.is_empty());
        free.then(|| self.set_holder(full_name, id.to_string(), ttl, now))
    }

    /// Takes the lock if free, else joins the end of its FIFO queue.
    pub(crate) fn acquire_or_enqueue(
        &mut self,
        full_name: &str,
        id: &str,
        ttl: Duration,
        now: Instant,
    ) -> Acquire {
        if let Some(g) = self.try_acquire(full_name, id, ttl, now) {
            return Acquire::Granted(g);
        }
        let wid = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.locks
            .entry(full_name.to_string())
            .or_default()
            .queue
            .push_back(Waiter {
                wid,
                id: id.to_string(),
                ttl,
                tx,
            });
        Acquire::Queued { wid, rx }
    }

    /// Gives a free lock to the first waiter still waiting, waking exactly
    /// that one; forgets the slot when nobody holds or waits.
    fn hand_over(&mut self, full_name: &str, now: Instant) {
        loop {
            let Some(slot) = self.locks.get_mut(full_name) else {
                return;
            };
            if slot.holder.is_some() {
                return;
            }
            let Some(w) = slot.queue.pop_front() else {
                self.locks.remove(full_name);
                return;
            };
            if w.tx.is_closed() {
                continue;
            }
            let grant = self.set_holder(full_name, w.id.clone(), w.ttl, now);
            if w.tx.send(grant).is_ok() {
                return;
            }
            // The waiter vanished between the check and the send: take the
            // lock back (its token is simply never used again).
            self.clear_holder(full_name);
        }
    }

    fn clear_holder(&mut self, full_name: &str) {
        if let Some(slot) = self.locks.get_mut(full_name) {
            if let Some(h) = slot.holder.take() {
                self.lock_deadlines
                    .remove(&(h.deadline, full_name.to_string()));
            }
        }
    }

    /// Releases the lock if `id`+`token` still hold it; hands it over.
    /// Returns whether it was held.
    pub(crate) fn release(&mut self, full_name: &str, id: &str, token: u64, now: Instant) -> bool {
        let held = self
            .locks
            .get(full_name)
            .and_then(|s| s.holder.as_ref())
            .is_some_and(|h| h.id == id && h.token == token);
        if held {
            self.clear_holder(full_name);
            self.hand_over(full_name, now);
        }
        held
    }

    /// Frees the lock whoever holds it (an operator's intervention, or a
    /// test's "revoke behind the holder's back"). Returns whether it was held.
    pub(crate) fn revoke(&mut self, full_name: &str, now: Instant) -> bool {
        let held = self
            .locks
            .get(full_name)
            .is_some_and(|s| s.holder.is_some());
        if held {
            self.clear_holder(full_name);
            self.hand_over(full_name, now);
        }
        held
    }

    /// Cleans up after a waiter whose future was dropped: removes its queue
    /// entry, or, if the lock was handed to it meanwhile, releases it.
    pub(crate) fn cancel_wait(&mut self, full_name: &str, wid: u64, id: &str, now: Instant) {
        let Some(slot) = self.locks.get_mut(full_name) else {
            return;
        };
        if let Some(pos) = slot.queue.iter().position(|w| w.wid == wid) {
            slot.queue.remove(pos);
            if slot.holder.is_none() && slot.queue.is_empty() {
                self.locks.remove(full_name);
            }
            return;
        }
        if slot.holder.as_ref().is_some_and(|h| h.id == id) {
            self.clear_holder(full_name);
            self.hand_over(full_name, now);
        }
    }

    /// Extends the deadline of a still-held entry to `now + ttl`; false if
    /// the entry is gone (expired, revoked, released).
    pub(crate) fn renew(
        &mut self,
        full_name: &str,
        entry: &LockEntry,
        ttl: Duration,
        now: Instant,
    ) -> bool {
        let Some(h) = self
            .locks
            .get_mut(full_name)
            .and_then(|s| s.holder.as_mut())
            .filter(|h| h.id == entry.id && h.token == entry.token)
        else {
            return false;
        };
        let new = (now + ttl).max(h.deadline);
        let old = std::mem::replace(&mut h.deadline, new);
        if old != new {
            self.lock_deadlines.remove(&(old, full_name.to_string()));
            self.lock_deadlines.insert((new, full_name.to_string()));
        }
        true
    }

    /// Number of live watchers (tests).
    #[cfg(test)]
    pub(crate) fn watcher_count(&self) -> usize {
        self.watchers.len()
    }

    /// Number of entries queued for a lock (tests and diagnostics).
    pub(crate) fn queue_len(&self, full_name: &str) -> usize {
        self.locks.get(full_name).map_or(0, |s| s.queue.len())
    }

    /// The token of the lock's current holder, if held.
    pub(crate) fn holder_token(&self, full_name: &str) -> Option<u64> {
        self.locks
            .get(full_name)
            .and_then(|s| s.holder.as_ref())
            .map(|h| h.token)
    }
}

fn to_kv(full: &str, e: &Entry, ns_len: usize, keys_only: bool) -> KeyValue {
    KeyValue {
        key: full[ns_len..].to_string(),
        value: if keys_only {
            Bytes::new()
        } else {
            e.value.clone()
        },
        revision: e.revision,
        lease_ttl: e.ttl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, id: &str, token: u64) -> LockEntry {
        LockEntry {
            name: name.into(),
            token,
            id: id.into(),
        }
    }

    #[test]
    fn hand_over_skips_gone_waiters_and_wakes_exactly_one() {
        let sh = Shared::new(10, usize::MAX);
        let ttl = Duration::from_secs(60);
        let n = full("", "m");
        let g = sh.run(|st, now| st.try_acquire(&n, "a", ttl, now)).unwrap();
        let q = |id: &str| match sh.run(|st, now| st.acquire_or_enqueue(&n, id, ttl, now)) {
            Acquire::Queued { wid, rx } => (wid, rx),
            Acquire::Granted(_) => panic!("lock is held"),
        };
        let (_, rx_b) = q("b");
        let (_, mut rx_c) = q("c");
        let (_, mut rx_d) = q("d");
        drop(rx_b); // b gave up without cleaning up
        assert!(sh.run(|st, now| st.release(&n, "a", g.token, now)));
        let gc = rx_c.try_recv().expect("c is next");
        assert!(gc.token > g.token);
        assert!(rx_d.try_recv().is_err(), "only one waiter woken");
        assert!(sh.run(|st, _| st.is_held(&n, &entry("m", "c", gc.token))));
        // A stale release (old token) does nothing.
        assert!(!sh.run(|st, now| st.release(&n, "a", g.token, now)));
        assert_eq!(sh.run(|st, _| st.queue_len(&n)), 1);
    }

    #[test]
    fn cancelled_waiter_that_was_granted_passes_the_lock_on() {
        let sh = Shared::new(10, usize::MAX);
        let ttl = Duration::from_secs(60);
        let n = full("ns", "m");
        let g = sh.run(|st, now| st.try_acquire(&n, "a", ttl, now)).unwrap();
        let Acquire::Queued { wid: wb, rx: rx_b } =
            sh.run(|st, now| st.acquire_or_enqueue(&n, "b", ttl, now))
        else {
            panic!()
        };
        let Acquire::Queued { rx: mut rx_c, .. } =
            sh.run(|st, now| st.acquire_or_enqueue(&n, "c", ttl, now))
        else {
            panic!()
        };
        // b is granted the lock but its future is dropped before it sees it.
        sh.run(|st, now| st.release(&n, "a", g.token, now));
        drop(rx_b);
        sh.run(|st, now| st.cancel_wait(&n, wb, "b", now));
        let gc = rx_c.try_recv().expect("the lock moved on to c");
        assert_eq!(sh.run(|st, _| st.holder_token(&n)), Some(gc.token));
        assert_eq!(sh.run(|st, _| st.queue_len(&n)), 0);
    }

    #[test]
    fn renew_extends_only_the_current_holding_and_expiry_hands_over() {
        let sh = Shared::new(10, usize::MAX);
        let n = full("", "m");
        let short = Duration::from_millis(20);
        let g = sh
            .run(|st, now| st.try_acquire(&n, "a", short, now))
            .unwrap();
        let e = entry("m", "a", g.token);
        assert!(sh.run(|st, now| st.renew(&n, &e, short, now)));
        assert!(!sh.run(|st, now| st.renew(&n, &entry("m", "a", g.token + 1), short, now)));
        let Acquire::Queued { rx, .. } =
            sh.run(|st, now| st.acquire_or_enqueue(&n, "b", short, now))
        else {
            panic!()
        };
        std::thread::sleep(short * 2);
        // The next request (or the sweeper) expires the holder first.
        assert!(!sh.run(|st, now| st.renew(&n, &e, short, now)));
        let gb = rx.blocking_recv().unwrap();
        assert!(gb.token > g.token);
    }

    #[test]
    fn history_is_bounded_by_bytes_too() {
        let sh = Shared::new(1000, 100);
        sh.run(|st, now| {
            for i in 0..10 {
                let r = st.next_rev();
                st.write_put(
                    &full("", &format!("k{i}")),
                    Bytes::from(vec![0; 40]),
                    None,
                    r,
                    now,
                );
            }
        });
        let (tx, _rx) = futures::channel::mpsc::unbounded();
        let err = sh
            .run(|st, _| st.watch(full("", ""), 1, Some(1), tx))
            .unwrap_err();
        match err {
            Error::Compacted { oldest } => assert!(oldest > 1 && oldest <= 10, "{oldest}"),
            e => panic!("{e}"),
        }
    }
}
