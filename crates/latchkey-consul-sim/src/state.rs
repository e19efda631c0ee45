//! The simulator's state store: KV entries, tombstones, sessions and
//! lock-delays, with Consul's index rules (agent/consul/state/kvs.go,
//! session.go, txn.go). Everything here runs under one mutex, so each
//! request is atomic; a txn keeps an undo log and rolls back on any error.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// Consul's `SessionTTLMin` default and `SessionTTLMax` (structs.go).
pub(crate) const SESSION_TTL_MIN: Duration = Duration::from_secs(10);
pub(crate) const SESSION_TTL_MAX: Duration = Duration::from_secs(86_400);
/// structs.MaxLockDelay: larger lock-delays are clamped to this.
pub(crate) const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// The only node check of the simulated node; always passing.
pub(crate) const SERF_CHECK: &str = "serfHealth";

/// One KV entry (`structs.DirEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    pub session: String,
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Entry {
    pub fn new(key: &str) -> Entry {
        Entry {
            key: key.to_string(),
            value: Vec::new(),
            flags: 0,
            session: String::new(),
            lock_index: 0,
            create_index: 0,
            modify_index: 0,
        }
    }
    /// `DirEntry.Equal`: what decides whether a set is a no-op.
    fn same_content(&self, o: &Entry) -> bool {
        self.lock_index == o.lock_index
            && self.key == o.key
            && self.flags == o.flags
            && self.value == o.value
            && self.session == o.session
    }
}

/// What happens to a session's locks when it is invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Behavior {
    Release,
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

/// One session (`structs.Session`) plus its TTL timer.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub id: String,
    pub name: String,
    pub node: String,
    pub lock_delay: Duration,
    pub behavior: Behavior,
    /// As given by the client (Consul echoes the string).
    pub ttl_text: String,
    pub ttl: Option<Duration>,
    pub node_checks: Vec<String>,
    pub create_index: u64,
    pub modify_index: u64,
    /// When the TTL timer fires (last create/renew + TTL × multiplier).
    pub deadline: Option<Instant>,
}

/// Undo log of a transaction.
#[derive(Clone)]
enum Undo {
    Kv(String, Option<Entry>),
    Tomb(String, Option<u64>),
}

/// Why a KV op failed; `Error` strings are Consul's.
pub(crate) enum OpFail {
    /// The op ran and answered false (CAS mismatch, lock held...).
    False,
    /// The op failed with an error message.
    Error(String),
}

/// The store.
#[derive(Clone)]
pub(crate) struct Store {
    /// The Raft index: bumped by every write that goes through "Raft".
    raft_index: u64,
    /// Table index of `kvs` and `tombstones` (kvsMaxIndex).
    kvs_index: u64,
    /// Table index of `sessions`.
    sessions_index: u64,
    kv: BTreeMap<String, Entry>,
    /// Key (or deleted prefix) → index of its deletion (the graveyard).
    tombstones: BTreeMap<String, u64>,
    sessions: BTreeMap<String, Session>,
    /// Key → end of its lock-delay.
    lock_delay: HashMap<String, Instant>,
    /// Undo log while a txn runs.
    undo: Option<Vec<Undo>>,
    /// No TTL deadline is earlier than this (may be stale-early after a
    /// renew; then a reap pass finds nothing and recomputes it).
    earliest: Option<Instant>,
    pub node_name: String,
}

impl Store {
    pub fn new() -> Store {
        Store {
            // A fresh agent has applied a few internal Raft entries before
            // any user write (index 1 is the Raft configuration).
            raft_index: 10,
            kvs_index: 0,
            sessions_index: 0,
            kv: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            sessions: BTreeMap::new(),
            lock_delay: HashMap::new(),
            undo: None,
            earliest: None,
            node_name: "latchkey-consul-sim".into(),
        }
    }

    /// The current Raft index.
    pub fn raft_index(&self) -> u64 {
        self.raft_index
    }

    /// Starts a Raft apply: the next index. Never reused.
    pub fn next_index(&mut self) -> u64 {
        self.raft_index += 1;
        self.raft_index
    }

    // ----- raw mutations (logged while a txn runs) -----

    fn put_raw(&mut self, e: Entry) {
        let idx = e.modify_index;
        let old = self.kv.insert(e.key.clone(), e.clone());
        if let Some(u) = &mut self.undo {
            u.push(Undo::Kv(e.key, old));
        }
        self.kvs_index = self.kvs_index.max(idx);
    }

    fn remove_raw(&mut self, key: &str, idx: u64) {
        if let Some(old) = self.kv.remove(key) {
            if let Some(u) = &mut self.undo {
                u.push(Undo::Kv(key.to_string(), Some(old)));
            }
            self.kvs_index = self.kvs_index.max(idx);
        }
    }

    fn tombstone(&mut self, key: &str, idx: u64) {
        let old = self.tombstones.insert(key.to_string(), idx);
        if let Some(u) = &mut self.undo {
            u.push(Undo::Tomb(key.to_string(), old));
        }
        self.kvs_index = self.kvs_index.max(idx);
    }

    /// Runs `f` atomically: on `Err` every KV change it made is undone.
    /// (Only KV ops run inside; the table index is restored too.)
    pub fn atomically<T, E>(&mut self, f: impl FnOnce(&mut Store) -> Result<T, E>) -> Result<T, E> {
        let saved_index = self.kvs_index;
        self.undo = Some(Vec::new());
        let r = f(self);
        let log = self.undo.take().unwrap_or_default();
        if r.is_err() {
            for u in log.into_iter().rev() {
                match u {
                    Undo::Kv(k, Some(e)) => {
                        self.kv.insert(k, e);
                    }
                    Undo::Kv(k, None) => {
                        self.kv.remove(&k);
                    }
                    Undo::Tomb(k, Some(i)) => {
                        self.tombstones.insert(k, i);
                    }
                    Undo::Tomb(k, None) => {
                        self.tombstones.remove(&k);
                    }
                }
            }
            self.kvs_index = saved_index;
        }
        r
    }

    // ----- reads -----

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.kv.get(key)
    }

    fn prefix_iter<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.kv
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e)
    }

    fn graveyard_max(&self, prefix: &str) -> u64 {
        self.tombstones
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0)
    }

    /// The index a list of `prefix` reports (kvsListTxn): the highest
    /// ModifyIndex of its entries and tombstones, else the table index.
    fn list_index(&self, prefix: &str, entries_max: u64) -> u64 {
        let mut lindex = entries_max;
        if prefix.is_empty() {
            lindex = self.kvs_index;
        } else {
            lindex = lindex.max(self.graveyard_max(prefix));
        }
        if lindex != 0 {
            lindex
        } else {
            self.kvs_index
        }
    }

    /// `KVS.Get`: the entry and the query index (the entry's ModifyIndex,
    /// or the table index when absent, so a blocking read of an absent key
    /// wakes when anything is written).
    pub fn kv_get(&self, key: &str) -> (Option<Entry>, u64) {
        match self.kv.get(key) {
            Some(e) => (Some(e.clone()), e.modify_index),
            None => (None, self.kvs_index),
        }
    }

    /// `KVS.List`: entries under `prefix` and the query index.
    pub fn kv_list(&self, prefix: &str) -> (Vec<Entry>, u64) {
        let entries: Vec<Entry> = self.prefix_iter(prefix).cloned().collect();
        let max = entries.iter().map(|e| e.modify_index).max().unwrap_or(0);
        let idx = self.list_index(prefix, max);
        (entries, idx)
    }

    /// `KVS.ListKeys`: keys under `prefix`, cut after the first `sep`
    /// following the prefix (deduplicated), and the query index.
    pub fn kv_keys(&self, prefix: &str, sep: &str) -> (Vec<String>, u64) {
        let mut keys: Vec<String> = Vec::new();
        let mut max = 0;
        let mut last: Option<String> = None;
        for e in self.prefix_iter(prefix) {
            max = max.max(e.modify_index);
            if sep.is_empty() {
                keys.push(e.key.clone());
                continue;
            }
            let after = &e.key[prefix.len()..];
            match after.find(sep) {
                Some(i) => {
                    let k = e.key[..prefix.len() + i + sep.len()].to_string();
                    if last.as_deref() != Some(k.as_str()) {
                        keys.push(k.clone());
                    }
                    last = Some(k);
                }
                None => keys.push(e.key.clone()),
            }
        }
        (keys, self.list_index(prefix, max))
    }

    // ----- KV writes (txn.go / kvs.go semantics) -----

    /// `kvsSetTxn`: CreateIndex and (unless `update_session`) Session come
    /// from the existing entry; an unchanged entry keeps its ModifyIndex.
    fn set_entry(&mut self, idx: u64, mut e: Entry, update_session: bool) -> Entry {
        let existing = self.kv.get(&e.key).cloned();
        e.create_index = existing.as_ref().map(|x| x.create_index).unwrap_or(idx);
        if !update_session {
            e.session = existing
                .as_ref()
                .map(|x| x.session.clone())
                .unwrap_or_default();
        }
        if let Some(x) = &existing {
            if x.same_content(&e) {
                e.modify_index = x.modify_index;
                return e;
            }
        }
        e.modify_index = idx;
        self.put_raw(e.clone());
        e
    }

    pub fn kv_set(&mut self, idx: u64, e: Entry) -> Entry {
        self.set_entry(idx, e, false)
    }

    /// CAS: `cas` = 0 creates only; otherwise the ModifyIndex must match.
    pub fn kv_cas(&mut self, idx: u64, e: Entry, cas: u64) -> Result<Entry, OpFail> {
        match self.kv.get(&e.key) {
            Some(_) if cas == 0 => return Err(OpFail::False),
            None if cas != 0 => return Err(OpFail::False),
            Some(x) if x.modify_index != cas => return Err(OpFail::False),
            _ => {}
        }
        Ok(self.set_entry(idx, e, false))
    }

    /// `kvsLockTxn`. (Lock-delay is checked before, outside Raft.)
    pub fn kv_lock(&mut self, idx: u64, mut e: Entry) -> Result<Entry, OpFail> {
        if e.session.is_empty() {
            return Err(OpFail::Error("missing session".into()));
        }
        if !self.sessions.contains_key(&e.session) {
            return Err(OpFail::Error(format!(
                "invalid session {}",
                crate::godur::go_quote(&e.session)
            )));
        }
        match self.kv.get(&e.key) {
            Some(x) if x.session == e.session => {
                e.create_index = x.create_index;
                e.lock_index = x.lock_index;
            }
            Some(x) if !x.session.is_empty() => return Err(OpFail::False),
            Some(x) => {
                e.create_index = x.create_index;
                e.lock_index = x.lock_index + 1;
            }
            None => {
                e.create_index = idx;
                e.lock_index = 1;
            }
        }
        Ok(self.set_entry(idx, e, true))
    }

    /// `kvsUnlockTxn`.
    pub fn kv_unlock(&mut self, idx: u64, mut e: Entry) -> Result<Entry, OpFail> {
        if e.session.is_empty() {
            return Err(OpFail::Error("missing session".into()));
        }
        let Some(x) = self.kv.get(&e.key) else {
            return Err(OpFail::False);
        };
        if x.session != e.session {
            return Err(OpFail::False);
        }
        e.session = String::new();
        e.lock_index = x.lock_index;
        e.create_index = x.create_index;
        Ok(self.set_entry(idx, e, true))
    }

    /// `kvsDeleteTxn`: a tombstone keeps the index from sliding back.
    pub fn kv_delete(&mut self, idx: u64, key: &str) {
        if self.kv.contains_key(key) {
            self.tombstone(key, idx);
            self.remove_raw(key, idx);
        }
    }

    /// `kvsDeleteCASTxn`: true also when the key does not exist.
    pub fn kv_delete_cas(&mut self, idx: u64, key: &str, cas: u64) -> bool {
        match self.kv.get(key) {
            None => true,
            Some(x) if x.modify_index != cas => false,
            Some(_) => {
                self.kv_delete(idx, key);
                true
            }
        }
    }

    /// `kvsDeleteTreeTxn`: one tombstone at the prefix (none for the root).
    pub fn kv_delete_tree(&mut self, idx: u64, prefix: &str) {
        let keys: Vec<String> = self.prefix_iter(prefix).map(|e| e.key.clone()).collect();
        if keys.is_empty() {
            return;
        }
        for k in &keys {
            self.remove_raw(k, idx);
        }
        if !prefix.is_empty() {
            self.tombstone(prefix, idx);
        }
        self.kvs_index = self.kvs_index.max(idx);
    }

    /// The end of `key`'s lock-delay, if it is still running.
    pub fn lock_delay_until(&self, key: &str, now: Instant) -> Option<Instant> {
        self.lock_delay.get(key).copied().filter(|t| *t > now)
    }

    // ----- sessions -----

    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    pub fn sessions_table_index(&self) -> u64 {
        self.sessions_index
    }

    pub fn insert_session(&mut self, s: Session) {
        if let Some(d) = s.deadline {
            self.earliest = Some(self.earliest.map_or(d, |e| e.min(d)));
        }
        self.sessions_index = self.sessions_index.max(s.modify_index);
        self.sessions.insert(s.id.clone(), s);
    }

    /// Resets a session's TTL timer; the session, or None if it is gone.
    pub fn renew_session(&mut self, id: &str, now: Instant, multiplier: f64) -> Option<Session> {
        let s = self.sessions.get_mut(id)?;
        s.deadline = s.ttl.map(|t| now + t.mul_f64(multiplier));
        let s = s.clone();
        if let Some(d) = s.deadline {
            self.earliest = Some(self.earliest.map_or(d, |e| e.min(d)));
        }
        Some(s)
    }

    /// Destroys a session (explicitly, by TTL, or by a test hook):
    /// releases or deletes its keys at a new index and starts their
    /// lock-delay. False if it did not exist.
    pub fn invalidate_session(&mut self, id: &str, now: Instant) -> bool {
        let Some(s) = self.sessions.remove(id) else {
            return false;
        };
        let idx = self.next_index();
        self.sessions_index = self.sessions_index.max(idx);
        let held: Vec<Entry> = self
            .kv
            .values()
            .filter(|e| e.session == s.id)
            .cloned()
            .collect();
        for mut e in held {
            let key = e.key.clone();
            match s.behavior {
                Behavior::Release => {
                    e.session = String::new();
                    self.set_entry(idx, e, true);
                }
                Behavior::Delete => self.kv_delete(idx, &key),
            }
            // deleteSessionTxn caps the delay at MaxLockDelay here (the
            // session keeps the value it was created with).
            let delay = s.lock_delay.min(MAX_LOCK_DELAY);
            if !delay.is_zero() {
                self.lock_delay.insert(key, now + delay);
            }
        }
        // Forget lock-delays that are over (keeps the map small).
        self.lock_delay.retain(|_, t| *t > now);
        true
    }

    /// Invalidates every session whose TTL deadline has passed. Run on
    /// every access to the store (cheap unless a deadline passed), so a
    /// session is gone exactly at its deadline whatever the reaper task's
    /// scheduling; true if anything changed.
    pub fn reap(&mut self, now: Instant) -> bool {
        if self.earliest.is_none_or(|e| e > now) {
            return false;
        }
        let expired: Vec<String> = self
            .sessions
            .values()
            .filter(|s| s.deadline.is_some_and(|d| d <= now))
            .map(|s| s.id.clone())
            .collect();
        for id in &expired {
            self.invalidate_session(id, now);
            tracing::debug!(session = %id, "consul simulator: session TTL expired");
        }
        self.earliest = self.next_deadline();
        !expired.is_empty()
    }

    /// Drops every tombstone, as Consul's leader does once they are older
    /// than `tombstone_ttl` (15 min by default). Afterwards a listing whose
    /// newest entry was deleted reports a lower index than before: one of
    /// the documented ways a blocking query's index goes backwards.
    pub fn reap_tombstones(&mut self) {
        self.tombstones.clear();
    }

    /// Replaces the data with `snap` as a snapshot restore does: entries,
    /// tombstones, sessions and table indexes come back as they were (so
    /// indexes go backwards); the Raft index keeps growing (the restore is
    /// itself a Raft operation); session timers restart with a full TTL, as
    /// a new leader's do; lock-delays (leader memory) are forgotten.
    pub fn restore_from(&mut self, snap: &Store, now: Instant, multiplier: f64) {
        let raft = self.raft_index.max(snap.raft_index) + 1;
        *self = snap.clone();
        self.raft_index = raft;
        self.undo = None;
        self.lock_delay.clear();
        for s in self.sessions.values_mut() {
            s.deadline = s.ttl.map(|t| now + t.mul_f64(multiplier));
        }
        self.earliest = self.next_deadline();
    }

    /// The next TTL deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.sessions.values().filter_map(|s| s.deadline).min()
    }
}
