//! [`ConsulBackend`]: the KV store and transactions on `/v1/kv` and
//! `/v1/txn`; locks are in [`crate::lock`], watches in [`crate::watch`].
//!
//! # Writes
//! Every write is one `/v1/txn`, because only a txn returns the
//! `ModifyIndex` of what it wrote (a plain `PUT /v1/kv` answers `true`):
//!
//! | call | txn ops |
//! |---|---|
//! | `put(k, v)` | `delete k`, `set k v` |
//! | `put(k, v, if_revision r)` | `check-index k r`, `delete k`, `set k v` |
//! | `put(k, v, if_absent)` | `check-not-exists k`, `set k v` |
//! | … with a TTL | the same with `lock k v <session>` instead of `set` |
//! | `delete(k)` | `get k`, `delete k` (the `get` fails the txn if `k` is absent → `false`) |
//! | `delete(k, if_revision r)` | `check-index k r`, `delete k` |
//!
//! The `delete` before `set` drops a TTL key's session binding (a `set`
//! keeps the session of the key it overwrites), so a put without TTL removes
//! an earlier TTL. A failed condition re-reads the key (`?consistent`) to
//! report `Conflict { current }`; if the re-read shows the condition holding
//! again (the key changed and changed back between the two), the write is
//! retried, so the reported outcome is always one that was true at a moment
//! inside the call.
//!
//! Values larger than [`RAW_VALUE_BYTES`] do not fit a txn under Consul's
//! default `txn_max_req_len` (512 KiB, and values are base64 in a txn); a
//! put of such a value (without TTL) goes through `PUT /v1/kv/<k>?cas=`
//! instead, marks the entry's flags with a random nonce and reads the
//! revision back. If another write overwrote it before that read, the put
//! reports `Indeterminate` (it was written; its revision is unknown).
//!
//! # TTL keys
//! A key with a TTL is acquired (`lock` verb) by a session created for that
//! put with `Behavior=delete`, `LockDelay=0s`, no health checks and the TTL
//! (whole seconds, at least 10 s): Consul deletes the key when the session
//! expires, between TTL and 2×TTL after the put. Such sessions are never
//! renewed (renewing would keep the key forever) and hold only the keys of
//! one put or txn; the entry's flags hold the TTL in ms for `lease_ttl`.
//!
//! # Transactions
//! Consul's txn has no `else` and compares nothing but index, session and
//! existence, so [`Txn::txn`] reads every key the request touches (one
//! read-only `?consistent` txn), evaluates the compares locally, and sends
//! the chosen branch in one txn that **pins** what was read: each compared
//! key gets `check-index <index read>` (or `check-not-exists`) before any
//! other op, and each op on a key not pinned yet uses a pinning verb
//! (`cas`, `delete-cas`, `check-not-exists`). If any pin fails, something
//! changed in between: the whole thing is retried. The branch that ran is
//! therefore exactly the one the compares chose at the moment of commit,
//! atomically and in isolation; a txn is never split. Gets are real `get`
//! ops inside the committing txn (after earlier ops of the branch, as in
//! etcd). A branch of only reads is sent as a read-only `?consistent` txn.
//!
//! Fast path: when every compare has a native check (`held` →
//! `check-session` + `check-index(token)`, `revision = r` → `check-index`,
//! `revision = 0` and `absent` → `check-not-exists`) and `then` only puts,
//! the checks and the writes go in one txn first; only if it rolls back does
//! the read-and-pin path run. A fenced write or a CAS on several keys is
//! then one round trip.

use crate::client::{Client, Entry, KvOp, TxnReply, Verb, NAME};
use crate::keys;
use crate::lock::{session_ttl, Locks};
use async_trait::async_trait;
use bytes::Bytes;
use latchkey_core::{
    validate, BackendUrl, Capabilities, Compare, DeleteOptions, DistributedLock, Error, KeyValue,
    KvStore, ListOptions, LockGuard, LockOptions, Op, OpResult, PutOptions, Result, Revision, Txn,
    TxnOutcome, TxnRequest, WatchStream,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Most ops one txn branch may hold (Consul 1.14+ accepts 128 ops per
/// `/v1/txn`). A branch whose translation needs more than 128 Consul ops
/// (TTL puts over TTL keys take two, a compared key not written by the
/// branch takes one more) is refused with `InvalidArgument` before any write.
pub const MAX_TXN_OPS: usize = 128;

/// Consul's limit of ops per `/v1/txn` (1.14+).
pub const CONSUL_MAX_TXN_OPS: usize = 128;

/// Largest value written through `/v1/txn`; larger ones use `PUT /v1/kv`.
pub const RAW_VALUE_BYTES: usize = 360 * 1024;

/// How often a txn is retried when what it read changed before it committed.
const MAX_ATTEMPTS: usize = 200;

/// The state shared by a handle's clones.
pub(crate) struct Inner {
    pub(crate) client: Client,
    pub(crate) base: String,
    pub(crate) kv_prefix: String,
    pub(crate) locks: Arc<Locks>,
}

/// The Consul backend: one handle (one HTTP client, its sessions).
#[derive(Clone)]
pub struct ConsulBackend {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for ConsulBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulBackend")
            .field("client", &self.inner.client)
            .field("base", &self.inner.base)
            .finish()
    }
}

impl Inner {
    fn ckey(&self, key: &str) -> String {
        format!("{}{}", self.kv_prefix, keys::encode(key))
    }

    /// A Consul entry of the KV subtree as a latchkey `KeyValue`; `None`
    /// for keys latchkey did not write.
    pub(crate) fn to_kv(&self, e: &Entry, keys_only: bool) -> Result<Option<KeyValue>> {
        let Some(rest) = e.key.strip_prefix(&self.kv_prefix) else {
            return Ok(None);
        };
        let Some(key) = keys::decode(rest) else {
            return Ok(None);
        };
        let lease_ttl = match (e.holder(), e.flags) {
            (Some(_), f) if f > 0 && f < u64::MAX / 2 => Some(Duration::from_millis(f)),
            _ => None,
        };
        Ok(Some(KeyValue {
            key,
            value: if keys_only { Bytes::new() } else { e.bytes()? },
            revision: e.modify_index,
            lease_ttl,
        }))
    }

    /// A new never-renewed session that deletes what it holds after `ttl`.
    async fn ttl_session(&self, ttl: Duration) -> Result<String> {
        self.client
            .session_create(ttl, "delete", "latchkey-ttl")
            .await
    }

    async fn current(&self, ckey: &str) -> Result<Option<Revision>> {
        Ok(self
            .client
            .kv_get(ckey, true)
            .await?
            .0
            .map(|e| e.modify_index))
    }

    /// Reads keys in one (or, past 128, several) read-only consistent txns.
    async fn read_many(&self, keys: &[String]) -> Result<HashMap<String, Option<Entry>>> {
        let mut out = HashMap::new();
        for chunk in keys.chunks(CONSUL_MAX_TXN_OPS) {
            let mut missing: HashSet<&str> = HashSet::new();
            let mut done = false;
            for _ in 0..MAX_ATTEMPTS {
                let ops: Vec<KvOp> = chunk
                    .iter()
                    .map(|k| {
                        let verb = if missing.contains(k.as_str()) {
                            Verb::CheckNotExists
                        } else {
                            Verb::Get
                        };
                        KvOp::new(verb, k.clone())
                    })
                    .collect();
                match self.client.txn(&ops, "reading keys for a txn").await? {
                    TxnReply::Committed(entries) => {
                        let mut it = entries.into_iter();
                        for op in &ops {
                            let e = if op.verb == Verb::Get {
                                it.next()
                            } else {
                                None
                            };
                            out.insert(op.key.clone(), e);
                        }
                        done = true;
                        break;
                    }
                    TxnReply::RolledBack(errs) => {
                        for e in errs {
                            let Some(op) = ops.get(e.op_index) else {
                                return Err(Error::backend(NAME, e.what));
                            };
                            if op.verb == Verb::Get {
                                missing.insert(chunk[e.op_index].as_str());
                            } else {
                                missing.remove(chunk[e.op_index].as_str());
                            }
                        }
                    }
                }
            }
            if !done {
                return Err(Error::unavailable(
                    NAME,
                    "keys kept changing while a txn read them",
                ));
            }
        }
        Ok(out)
    }

    async fn put(&self, key: &str, value: Bytes, opts: &PutOptions) -> Result<Revision> {
        let ck = self.ckey(key);
        if opts.ttl.is_none() && value.len() > RAW_VALUE_BYTES {
            return self.put_raw(key, &ck, value, opts).await;
        }
        let session = match opts.ttl {
            Some(t) => Some((self.ttl_session(session_ttl(t)?).await?, session_ttl(t)?)),
            None => None,
        };
        for _ in 0..MAX_ATTEMPTS {
            let mut ops = Vec::new();
            if opts.if_absent {
                ops.push(KvOp::new(Verb::CheckNotExists, ck.clone()));
            } else {
                if let Some(r) = opts.if_revision {
                    ops.push(KvOp::new(Verb::CheckIndex, ck.clone()).index(r));
                }
                ops.push(KvOp::new(Verb::Delete, ck.clone()));
            }
            ops.push(match &session {
                Some((sid, ttl)) => KvOp::new(Verb::Lock, ck.clone())
                    .value(value.clone())
                    .flags(ttl.as_millis() as u64)
                    .session(sid.clone()),
                None => KvOp::new(Verb::Set, ck.clone()).value(value.clone()),
            });
            let what = format!("writing key {key:?}");
            match self
                .client
                .txn(&ops, &what)
                .await
                .map_err(|e| too_large(e, key))?
            {
                TxnReply::Committed(entries) => {
                    return Ok(entries.last().map_or(0, |e| e.modify_index));
                }
                TxnReply::RolledBack(errs) => {
                    if !opts.if_absent && opts.if_revision.is_none() {
                        return Err(Error::backend(NAME, format!("{what}: {errs:?}")));
                    }
                    let cur = self.current(&ck).await?;
                    let holds = if opts.if_absent {
                        cur.is_none()
                    } else {
                        cur.is_some() && cur == opts.if_revision
                    };
                    if !holds {
                        return Err(Error::conflict(key, cur));
                    }
                }
            }
        }
        Err(Error::unavailable(
            NAME,
            format!("writing key {key:?}: it kept changing"),
        ))
    }

    /// A put of a value too large for a txn: `PUT /v1/kv?cas=`.
    async fn put_raw(
        &self,
        key: &str,
        ck: &str,
        value: Bytes,
        opts: &PutOptions,
    ) -> Result<Revision> {
        for _ in 0..MAX_ATTEMPTS {
            let (cur, _) = self.client.kv_get(ck, true).await?;
            let cur_rev = cur.as_ref().map(|e| e.modify_index);
            if (opts.if_absent && cur.is_some())
                || opts.if_revision.is_some_and(|r| cur_rev != Some(r))
            {
                return Err(Error::conflict(key, cur_rev));
            }
            let mut cas = cur_rev.unwrap_or(0);
            if let Some(e) = cur.as_ref().filter(|e| e.holder().is_some()) {
                // Drop the TTL binding first (a plain PUT keeps it).
                let ops = [
                    KvOp::new(Verb::CheckIndex, ck.to_string()).index(e.modify_index),
                    KvOp::new(Verb::Delete, ck.to_string()),
                ];
                if let TxnReply::RolledBack(_) = self.client.txn(&ops, "clearing a TTL").await? {
                    continue;
                }
                cas = 0;
            }
            let nonce = (rand::random::<u64>() | (1 << 63)) & !1;
            if !self
                .client
                .kv_put_raw(ck, value.clone(), nonce, Some(cas))
                .await
                .map_err(|e| too_large(e, key))?
            {
                continue;
            }
            let (now, _) = self.client.kv_get(ck, true).await?;
            return match now {
                Some(e) if e.flags == nonce => Ok(e.modify_index),
                _ => Err(Error::Indeterminate {
                    backend: NAME,
                    op: format!("put of key {key:?}"),
                    message: "written, but overwritten before its revision could be read".into(),
                }),
            };
        }
        Err(Error::unavailable(
            NAME,
            format!("writing key {key:?}: it kept changing"),
        ))
    }

    async fn delete(&self, key: &str, opts: &DeleteOptions) -> Result<bool> {
        let ck = self.ckey(key);
        for _ in 0..MAX_ATTEMPTS {
            let first = match opts.if_revision {
                Some(r) => KvOp::new(Verb::CheckIndex, ck.clone()).index(r),
                None => KvOp::new(Verb::Get, ck.clone()),
            };
            let ops = [first, KvOp::new(Verb::Delete, ck.clone())];
            match self
                .client
                .txn(&ops, &format!("deleting key {key:?}"))
                .await?
            {
                TxnReply::Committed(_) => return Ok(true),
                TxnReply::RolledBack(_) => {
                    let Some(r) = opts.if_revision else {
                        return Ok(false);
                    };
                    let cur = self.current(&ck).await?;
                    if cur != Some(r) {
                        return Err(Error::conflict(key, cur));
                    }
                }
            }
        }
        Err(Error::unavailable(
            NAME,
            format!("deleting key {key:?}: it kept changing"),
        ))
    }

    /// The one-round-trip path: when every compare has a native check
    /// (`held` → `check-session` + `check-index(token)`, `revision = r` →
    /// `check-index`, `revision = 0` / `absent` → `check-not-exists`) and the
    /// `then` branch only puts, send checks and writes in one txn. If a check
    /// fails nothing was written and `Ok(None)` sends the caller to the
    /// general read-and-pin path (which then runs `otherwise`).
    async fn txn_fast(
        &self,
        req: &TxnRequest,
        sessions: &mut HashMap<u64, String>,
    ) -> Result<Option<TxnOutcome>> {
        if req.then.is_empty() {
            return Ok(None);
        }
        let mut ops: Vec<KvOp> = Vec::new();
        for c in &req.when {
            match c {
                Compare::Held(e) => {
                    let k = self.locks.key(&e.name);
                    ops.push(
                        KvOp::new(Verb::CheckSession, k.clone())
                            .session(crate::lock::session_of(e).to_string()),
                    );
                    ops.push(KvOp::new(Verb::CheckIndex, k).index(e.token));
                }
                Compare::Revision {
                    key,
                    op: latchkey_core::CmpOp::Equal,
                    revision,
                } => ops.push(if *revision == 0 {
                    KvOp::new(Verb::CheckNotExists, self.ckey(key))
                } else {
                    KvOp::new(Verb::CheckIndex, self.ckey(key)).index(*revision)
                }),
                Compare::Absent(k) => ops.push(KvOp::new(Verb::CheckNotExists, self.ckey(k))),
                _ => return Ok(None),
            }
        }
        let mut puts = Vec::new();
        for (i, op) in req.then.iter().enumerate() {
            let Op::Put { key, value, ttl } = op else {
                return Ok(None);
            };
            let k = self.ckey(key);
            // `delete` first: drops a TTL binding and makes a new entry.
            ops.push(KvOp::new(Verb::Delete, k.clone()));
            ops.push(match ttl {
                Some(t) => {
                    let t = session_ttl(*t)?;
                    if let std::collections::hash_map::Entry::Vacant(v) =
                        sessions.entry(t.as_secs())
                    {
                        v.insert(self.ttl_session(t).await?);
                    }
                    KvOp::new(Verb::Lock, k)
                        .value(value.clone())
                        .flags(t.as_millis() as u64)
                        .session(sessions[&t.as_secs()].clone())
                }
                None => KvOp::new(Verb::Set, k).value(value.clone()),
            });
            puts.push((ops.len() - 1, i));
        }
        if ops.len() > CONSUL_MAX_TXN_OPS {
            return Ok(None);
        }
        match self.client.txn(&ops, "running a transaction").await? {
            // A check failed (or a write did, e.g. a `lock` on a TTL key
            // of another session): nothing was written; the general path
            // decides, and runs `otherwise` if the compares are false.
            TxnReply::RolledBack(_) => Ok(None),
            TxnReply::Committed(entries) => {
                // Entry positions: count the results of the ops before each put.
                let mut pos = Vec::with_capacity(ops.len());
                let mut n = 0;
                for op in &ops {
                    pos.push(n);
                    n += op.verb.results();
                }
                let mut results = vec![OpResult::Delete { deleted: false }; req.then.len()];
                let mut revision = 0;
                for (op_i, i) in puts {
                    let e = entries
                        .get(pos[op_i])
                        .ok_or_else(|| Error::backend(NAME, "a txn result was missing"))?;
                    revision = revision.max(e.modify_index);
                    results[i] = OpResult::Put {
                        revision: e.modify_index,
                    };
                }
                Ok(Some(TxnOutcome {
                    succeeded: true,
                    results,
                    revision,
                }))
            }
        }
    }

    /// One attempt of a txn; `Ok(None)` when what it read changed before it
    /// could commit (retry).
    async fn txn_once(
        &self,
        req: &TxnRequest,
        sessions: &mut HashMap<u64, String>,
    ) -> Result<Option<TxnOutcome>> {
        // 1. Read every key the request touches.
        let mut wanted: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        let mut want = |k: String| {
            if seen.insert(k.clone()) {
                wanted.push(k);
            }
        };
        for c in &req.when {
            match c {
                Compare::Held(e) => want(self.locks.key(&e.name)),
                other => want(self.ckey(other.key().unwrap_or_default())),
            }
        }
        for op in req.then.iter().chain(&req.otherwise) {
            want(self.ckey(op.key()));
        }
        let read = if wanted.is_empty() {
            HashMap::new()
        } else {
            self.read_many(&wanted).await?
        };
        let entry = |k: &str| read.get(k).and_then(|e| e.as_ref());

        // 2. Evaluate the compares.
        let mut ok = true;
        for c in &req.when {
            let holds = match c {
                Compare::Revision { key, op, revision } => {
                    let cur = entry(&self.ckey(key)).map_or(0, |e| e.modify_index);
                    op.holds(cur, *revision)
                }
                Compare::Value { key, value } => match entry(&self.ckey(key)) {
                    Some(e) => e.bytes()? == *value,
                    None => false,
                },
                Compare::Exists(k) => entry(&self.ckey(k)).is_some(),
                Compare::Absent(k) => entry(&self.ckey(k)).is_none(),
                Compare::Held(le) => entry(&self.locks.key(&le.name)).is_some_and(|e| {
                    e.holder() == Some(crate::lock::session_of(le)) && e.modify_index == le.token
                }),
            };
            ok &= holds;
        }
        let branch = if ok { &req.then } else { &req.otherwise };

        // 3. Sessions for the branch's TTL puts (one per distinct TTL).
        for op in branch {
            if let Op::Put { ttl: Some(t), .. } = op {
                let t = session_ttl(*t)?;
                if let std::collections::hash_map::Entry::Vacant(v) = sessions.entry(t.as_secs()) {
                    v.insert(self.ttl_session(t).await?);
                }
            }
        }

        // 4. Translate: pins first, then the branch's ops.
        #[derive(Clone, Copy)]
        struct St {
            exists: bool,
            index: u64,
            session: bool,
            pinned: bool,
        }
        let mut state: HashMap<String, St> = read
            .iter()
            .map(|(k, e)| {
                let st = match e {
                    Some(e) => St {
                        exists: true,
                        index: e.modify_index,
                        session: e.holder().is_some(),
                        pinned: false,
                    },
                    None => St {
                        exists: false,
                        index: 0,
                        session: false,
                        pinned: false,
                    },
                };
                (k.clone(), st)
            })
            .collect();
        enum Role {
            Pin,
            Aux,
            Put(usize),
            Get(usize),
            Marker,
        }
        let mut ops: Vec<(KvOp, Role)> = Vec::new();
        let mut results: Vec<Option<OpResult>> = vec![None; branch.len()];
        let mut max_read = 0u64;
        for c in &req.when {
            let k = match c {
                Compare::Held(e) => self.locks.key(&e.name),
                other => self.ckey(other.key().unwrap_or_default()),
            };
            let st = state.get_mut(&k).expect("read");
            if st.pinned {
                continue;
            }
            st.pinned = true;
            max_read = max_read.max(st.index);
            let op = if st.exists {
                KvOp::new(Verb::CheckIndex, k).index(st.index)
            } else {
                KvOp::new(Verb::CheckNotExists, k)
            };
            ops.push((op, Role::Pin));
        }
        let mut writes_with_result = false;
        let mut writes = false;
        for (i, op) in branch.iter().enumerate() {
            let k = self.ckey(op.key());
            let st = state.get_mut(&k).expect("read");
            match op {
                Op::Put { value, ttl, .. } => {
                    writes = true;
                    writes_with_result = true;
                    let main = match ttl {
                        Some(t) => {
                            let t = session_ttl(*t)?;
                            KvOp::new(Verb::Lock, k.clone())
                                .value(value.clone())
                                .flags(t.as_millis() as u64)
                                .session(sessions[&t.as_secs()].clone())
                        }
                        None => KvOp::new(Verb::Set, k.clone()).value(value.clone()),
                    };
                    // An existing key is deleted first: that drops a TTL
                    // binding (`set` keeps the holder) and makes the write a
                    // new entry even if the value is unchanged (a `set` of an
                    // equal entry keeps its ModifyIndex).
                    if st.exists {
                        let del = if st.pinned {
                            KvOp::new(Verb::Delete, k.clone())
                        } else {
                            KvOp::new(Verb::DeleteCas, k.clone()).index(st.index)
                        };
                        ops.push((del, Role::Aux));
                        ops.push((main, Role::Put(i)));
                    } else if st.pinned || ttl.is_some() {
                        // A `lock` on an absent key fails if another session
                        // took it meanwhile: then the txn is retried.
                        ops.push((main, Role::Put(i)));
                    } else {
                        // `cas` with index 0: only if still absent.
                        let mut m = main;
                        m.verb = Verb::Cas;
                        m.index = 0;
                        ops.push((m, Role::Put(i)));
                    }
                    *st = St {
                        exists: true,
                        index: 0,
                        session: ttl.is_some(),
                        pinned: true,
                    };
                }
                Op::Delete { .. } => {
                    results[i] = Some(OpResult::Delete { deleted: st.exists });
                    if st.pinned {
                        if st.exists {
                            writes = true;
                            ops.push((KvOp::new(Verb::Delete, k.clone()), Role::Aux));
                        }
                    } else if st.exists {
                        writes = true;
                        ops.push((
                            KvOp::new(Verb::DeleteCas, k.clone()).index(st.index),
                            Role::Aux,
                        ));
                    } else {
                        ops.push((KvOp::new(Verb::CheckNotExists, k.clone()), Role::Aux));
                    }
                    st.exists = false;
                    st.session = false;
                    st.pinned = true;
                }
                Op::Get { .. } => {
                    if st.exists {
                        ops.push((KvOp::new(Verb::Get, k.clone()), Role::Get(i)));
                    } else {
                        results[i] = Some(OpResult::Get(None));
                        if !st.pinned {
                            ops.push((KvOp::new(Verb::CheckNotExists, k.clone()), Role::Aux));
                        }
                    }
                    st.pinned = true;
                }
            }
        }
        if writes && !writes_with_result {
            // Deletes return no entry: a marker write tells the txn's index.
            ops.push((
                KvOp::new(Verb::Set, format!("{}rev", self.base)).value(Bytes::new()),
                Role::Marker,
            ));
        }
        if ops.len() > CONSUL_MAX_TXN_OPS {
            return Err(Error::InvalidArgument(format!(
                "this transaction needs {} Consul txn operations; Consul allows {CONSUL_MAX_TXN_OPS}",
                ops.len()
            )));
        }

        // 5. Commit (or, for reads only, check) in one txn.
        let mut revision = max_read;
        if !ops.is_empty() {
            let kv_ops: Vec<KvOp> = ops.iter().map(|(o, _)| o.clone()).collect();
            match self.client.txn(&kv_ops, "running a transaction").await? {
                TxnReply::RolledBack(errs) => {
                    let unexpected = errs.iter().find(|e| {
                        ops.get(e.op_index).is_none_or(|(o, _)| {
                            matches!(o.verb, Verb::Set | Verb::Delete)
                                && !e.what.contains("session")
                        })
                    });
                    if let Some(e) = unexpected {
                        return Err(Error::backend(
                            NAME,
                            format!("transaction failed: {}", e.what),
                        ));
                    }
                    return Ok(None);
                }
                TxnReply::Committed(entries) => {
                    let mut it = entries.into_iter();
                    for (op, role) in &ops {
                        let e = if op.verb.results() == 1 {
                            it.next()
                        } else {
                            None
                        };
                        let Some(e) = e else { continue };
                        match role {
                            Role::Put(i) => {
                                revision = revision.max(e.modify_index);
                                results[*i] = Some(OpResult::Put {
                                    revision: e.modify_index,
                                });
                            }
                            Role::Get(i) => {
                                revision = revision.max(e.modify_index);
                                results[*i] = Some(OpResult::Get(self.to_kv(&e, false)?));
                            }
                            Role::Marker => revision = revision.max(e.modify_index),
                            Role::Pin | Role::Aux => {}
                        }
                    }
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| r.ok_or_else(|| Error::backend(NAME, "a txn result was missing")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(TxnOutcome {
            succeeded: ok,
            results,
            revision,
        }))
    }
}

fn too_large(e: Error, key: &str) -> Error {
    match e {
        Error::InvalidArgument(reason) if reason.contains("too large") => Error::InvalidValue {
            key: key.to_string(),
            reason,
        },
        other => other,
    }
}

/// Parses `consul://` / `consuls://` URLs and opens a handle.
impl ConsulBackend {
    /// Opens a handle (no request is sent until first use; the URL is
    /// checked here).
    pub async fn connect(url: &BackendUrl) -> Result<Self> {
        url.expect_params(&["token", "dc", "timeout"])?;
        url.require_hosts()?;
        let scheme = match url.scheme() {
            "consul" => "http",
            "consuls" => {
                if !cfg!(feature = "tls") {
                    return Err(url
                        .invalid("consuls:// needs the Cargo feature \"tls\" of latchkey-consul"));
                }
                "https"
            }
            other => return Err(url.invalid(&format!("not a consul URL scheme: {other}"))),
        };
        if url.hosts().len() > 1 {
            return Err(url.invalid(
                "give one Consul agent (agents forward to the servers); several hosts are not supported",
            ));
        }
        let host = &url.endpoints(8500)[0];
        let token = url
            .param("token")
            .map(str::to_string)
            .or_else(|| std::env::var("CONSUL_HTTP_TOKEN").ok())
            .filter(|t| !t.is_empty());
        let timeout = url
            .param_duration("timeout")?
            .unwrap_or(Duration::from_secs(10));
        let client = Client::new(
            format!("{scheme}://{host}"),
            token,
            url.param("dc").map(str::to_string),
            timeout,
        )?;
        let base = keys::namespace_base(url.namespace());
        Ok(ConsulBackend {
            inner: Arc::new(Inner {
                locks: Locks::new(client.clone(), format!("{base}locks/")),
                kv_prefix: format!("{base}kv/"),
                base,
                client,
            }),
        })
    }

    /// How many HTTP requests this handle has sent (a test hook: a lock
    /// waiter must not poll).
    pub fn op_count(&self) -> u64 {
        self.inner.client.ops()
    }

    /// Deletes lock `name`'s key whoever holds it, as an operator would
    /// (`consul kv delete`): a test hook. Blocks the calling thread (it runs
    /// on its own thread and runtime, so it may be called from async code).
    /// Returns whether the lock was held.
    pub fn revoke_lock(&self, name: &str) -> Result<bool> {
        validate::lock_name(name)?;
        let key = self.inner.locks.key(name);
        let client = self.inner.client.fresh()?;
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::backend(NAME, e))?;
                rt.block_on(async {
                    let (e, _) = client.kv_get(&key, true).await?;
                    let Some(e) = e else { return Ok(false) };
                    let ops = [KvOp::new(Verb::DeleteCas, key.clone()).index(e.modify_index)];
                    client.txn(&ops, "revoking a lock").await?;
                    Ok(e.holder().is_some())
                })
            })
            .join()
            .map_err(|_| Error::backend(NAME, "the revoke thread panicked"))?
        })
    }

    /// What this backend promises (see the crate docs for the reasons).
    pub fn caps() -> Capabilities {
        let mut c = Capabilities::full();
        c.watch_every_revision = false;
        c.watch_resume = false;
        c.watch_reports_expiry = true;
        c.global_revision = true;
        c.native_ttl = true;
        c.min_ttl = crate::lock::MIN_SESSION_TTL;
        c.ttl_granularity = crate::lock::MIN_SESSION_TTL;
        c.max_txn_ops = MAX_TXN_OPS;
        c.fifo_locks = false;
        c.linearizable_reads = true;
        c.durable_fencing = true;
        c.durable_writes = true;
        c.max_lock_ttl = Some(crate::lock::MAX_SESSION_TTL);
        c
    }
}

#[async_trait]
impl KvStore for ConsulBackend {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        validate::key(key)?;
        let (e, _) = self
            .inner
            .client
            .kv_get(&self.inner.ckey(key), true)
            .await?;
        match e {
            Some(e) => self.inner.to_kv(&e, false),
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: Bytes, opts: PutOptions) -> Result<Revision> {
        validate::key(key)?;
        validate::value(key, &value)?;
        if let Some(t) = opts.ttl {
            validate::ttl(t)?;
            session_ttl(t)?;
        }
        if opts.if_absent && opts.if_revision.is_some() {
            return Err(Error::InvalidArgument(
                "if_absent and if_revision cannot both be set".into(),
            ));
        }
        self.inner.put(key, value, &opts).await
    }

    async fn delete(&self, key: &str, opts: DeleteOptions) -> Result<bool> {
        validate::key(key)?;
        self.inner.delete(key, &opts).await
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>> {
        validate::prefix(prefix)?;
        let cprefix = format!("{}{}", self.inner.kv_prefix, keys::encode(prefix));
        let (entries, _) = self.inner.client.kv_list(&cprefix, true, None).await?;
        let mut out = Vec::with_capacity(entries.len());
        for e in &entries {
            if let Some(kv) = self.inner.to_kv(e, opts.keys_only)? {
                if kv.key.starts_with(prefix) {
                    out.push(kv);
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(l) = opts.limit {
            out.truncate(l);
        }
        Ok(out)
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream> {
        validate::prefix(prefix)?;
        if from.is_some() {
            return Err(crate::watch::no_resume());
        }
        crate::watch::start(self.inner.clone(), prefix.to_string()).await
    }
}

#[async_trait]
impl Txn for ConsulBackend {
    async fn txn(&self, req: TxnRequest) -> Result<TxnOutcome> {
        validate::txn(&req, MAX_TXN_OPS)?;
        for c in &req.when {
            if let Compare::Held(e) = c {
                validate::lock_name(&e.name)?;
            }
        }
        for op in req.then.iter().chain(&req.otherwise) {
            if let Op::Put { ttl: Some(t), .. } = op {
                session_ttl(*t)?;
            }
        }
        let mut sessions = HashMap::new();
        if let Some(o) = self.inner.txn_fast(&req, &mut sessions).await? {
            return Ok(o);
        }
        for attempt in 0..MAX_ATTEMPTS {
            if let Some(o) = self.inner.txn_once(&req, &mut sessions).await? {
                return Ok(o);
            }
            if attempt > 3 {
                // Heavy contention: spread the retries out a little.
                let ms = rand::random::<u64>() % (2 * attempt.min(20) as u64 + 1);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        Err(Error::unavailable(
            NAME,
            "a transaction kept conflicting with concurrent writes",
        ))
    }
}

#[async_trait]
impl DistributedLock for ConsulBackend {
    async fn lock(&self, name: &str, opts: LockOptions) -> Result<LockGuard> {
        validate::lock_name(name)?;
        validate::ttl(opts.ttl)?;
        let ttl = session_ttl(opts.ttl)?;
        let what = || format!("waiting for lock {name:?} on consul");
        if opts.wait == Some(Duration::ZERO) {
            return self
                .inner
                .locks
                .try_lock(name, ttl)
                .await?
                .ok_or_else(|| Error::Timeout {
                    what: what(),
                    after: Duration::ZERO,
                });
        }
        latchkey_core::with_wait(opts.wait, what, self.inner.locks.lock(name, ttl)).await
    }

    async fn try_lock(&self, name: &str, opts: LockOptions) -> Result<Option<LockGuard>> {
        validate::lock_name(name)?;
        validate::ttl(opts.ttl)?;
        let ttl = session_ttl(opts.ttl)?;
        self.inner.locks.try_lock(name, ttl).await
    }
}

impl latchkey_core::Backend for ConsulBackend {
    fn name(&self) -> &'static str {
        NAME
    }
    fn capabilities(&self) -> Capabilities {
        Self::caps()
    }
}
