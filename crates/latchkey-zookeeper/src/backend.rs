//! [`ZookeeperBackend`]: connecting, the KV store and transactions.

use crate::conn::ConnCfg;
use crate::error::{is_transport, map, no_ttl, Kind, NAME};
use crate::keys::{decode_key, encode_key};
use crate::kv::{current, logical, result_revision, Commit, KeyState, Node, Plan, Sim};
use crate::lock::Locks;
use async_trait::async_trait;
use bytes::Bytes;
use latchkey_core::{
    validate, Backend, BackendUrl, Capabilities, Compare, DeleteOptions, Error, KeyValue, KvStore,
    ListOptions, Op, OpResult, PutOptions, Result, Revision, Txn, TxnOutcome, TxnRequest,
    WatchStream,
};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use zookeeper_client as zk;

/// Most ops per transaction branch. ZooKeeper's own bound is the request
/// size (`jute.maxbuffer`, 1 MiB by default), not a count.
pub const MAX_TXN_OPS: usize = 128;
/// How often a write is re-read and retried when a concurrent write changed
/// what it pinned, before giving up with [`Error::Unavailable`].
const MAX_RETRIES: usize = 1000;
/// Keys read per `multi` read by `list`.
const LIST_BATCH: usize = 64;
/// Session timeout asked for the handle's main session by default.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// ZooKeeper's default `znode.container.checkIntervalMs`: how often the
/// server looks for expired TTL nodes.
const DEFAULT_TTL_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Which reads a handle makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Plain ZooKeeper reads, served by the member the session is connected
    /// to: sequentially consistent, possibly stale (the default).
    Sequential,
    /// Every `get` (and read-only `txn`) is confirmed through the write
    /// path: read, then `multi[check(path, version_read)]`, retried until
    /// the check passes. Linearizable, at the cost of a quorum write per read.
    Linearizable,
}

pub(crate) struct Inner {
    /// The main session; replaced by a new one once it expired.
    client: std::sync::RwLock<zk::Client>,
    reconnect: tokio::sync::Mutex<()>,
    session_timeout: Duration,
    /// Requests sent by this handle (all its sessions).
    pub ops: Arc<AtomicU64>,
    pub cfg: ConnCfg,
    pub acls: zk::Acls<'static>,
    pub ns: String,
    pub kv_dir: String,
    pub mode: ReadMode,
    pub ttl_nodes: bool,
    pub bounds: (Duration, Duration),
    pub ttl_check_interval: Duration,
    pub locks: Locks,
}

/// One client handle of a ZooKeeper ensemble in one namespace.
///
/// It holds one main session (KV, txn, watches) plus one session per
/// distinct lock TTL (see [`crate`] docs), over which any number of locks
/// and waiters are multiplexed.
#[derive(Clone)]
pub struct ZookeeperBackend {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for ZookeeperBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZookeeperBackend")
            .field("cluster", &self.inner.cfg.cluster)
            .field("chroot", &self.inner.cfg.chroot)
            .field("namespace", &self.inner.ns)
            .field("mode", &self.inner.mode)
            .finish()
    }
}

/// A key TTL as ZooKeeper keeps it: whole milliseconds, at least one.
fn ms(d: Duration) -> Duration {
    Duration::from_millis((d.as_millis() as u64).max(1))
}

impl ZookeeperBackend {
    /// Connects as described by `url` (see the crate docs for the URL form).
    pub async fn connect(url: &BackendUrl) -> Result<Self> {
        if !crate::SCHEMES.contains(&url.scheme()) {
            return Err(url.invalid("the scheme is not zookeeper://"));
        }
        url.require_hosts()?;
        url.expect_params(&[
            "session_timeout",
            "reads",
            "ttl_check_interval",
            "connect_timeout",
        ])?;
        let ns = url.namespace().to_string();
        validate::namespace(&ns)?;
        let mode = match url.param("reads") {
            None | Some("sequential") => ReadMode::Sequential,
            Some("linearizable") => ReadMode::Linearizable,
            Some(other) => {
                return Err(url.invalid(&format!(
                    "reads={other:?}: expected sequential or linearizable"
                )));
            }
        };
        let session_timeout = url
            .param_duration("session_timeout")?
            .unwrap_or(DEFAULT_SESSION_TIMEOUT);
        let ttl_check_interval = url
            .param_duration("ttl_check_interval")?
            .unwrap_or(DEFAULT_TTL_CHECK_INTERVAL);
        let connect_timeout = url
            .param_duration("connect_timeout")?
            .unwrap_or(Duration::from_secs(10));
        let chroot = match url.path() {
            "" | "/" => None,
            p => {
                let p = p.trim_end_matches('/');
                if p.split('/')
                    .skip(1)
                    .any(|s| s.is_empty() || s == "." || s == "..")
                {
                    return Err(url.invalid("the chroot path has an empty, '.' or '..' segment"));
                }
                Some(p.to_string())
            }
        };
        let auth = match (url.username(), url.password()) {
            (None, None) => None,
            (Some(u), Some(p)) => Some(format!("{u}:{p}").into_bytes()),
            _ => {
                return Err(url.invalid("digest auth needs both a user and a password (user:pass@)"))
            }
        };
        // Authenticated handles keep their nodes to their own identity.
        let acls = if auth.is_some() {
            zk::Acls::creator_all()
        } else {
            zk::Acls::anyone_all()
        };
        let cfg = ConnCfg {
            cluster: url.endpoints(2181).join(","),
            chroot,
            auth,
            connect_timeout,
        };
        let bounds = cfg.session_bounds().await?;
        let root = cfg.connect_raw(session_timeout, false).await?;
        let dir_opts = zk::CreateMode::Persistent.with_acls(acls);
        if let Some(c) = &cfg.chroot {
            root.mkdir(c, &dir_opts)
                .await
                .map_err(|e| map(e, Kind::Write, &format!("creating chroot {c:?}")))?;
        }
        let client = match &cfg.chroot {
            Some(c) => root.chroot(c.as_str()).map_err(|_| {
                Error::InvalidArgument(format!("{c:?} is not a valid ZooKeeper chroot"))
            })?,
            None => root,
        };
        let base = if ns.is_empty() {
            "/latchkey/default".to_string()
        } else {
            format!("/latchkey/ns/{}", encode_key(&ns))
        };
        let kv_dir = format!("{base}/kv");
        let lock_dir = format!("{base}/locks");
        for d in [&kv_dir, &lock_dir] {
            client
                .mkdir(d, &dir_opts)
                .await
                .map_err(|e| map(e, Kind::Write, &format!("creating {d:?}")))?;
        }
        // TTL nodes exist only with zookeeper.extendedTypesEnabled=true.
        let probe = zk::CreateMode::Persistent
            .with_acls(acls)
            .with_ttl(Duration::from_secs(1));
        let ttl_nodes = match client
            .create(&format!("{base}/ttl-probe"), &[], &probe)
            .await
        {
            Ok(_) | Err(zk::Error::NodeExists) => true,
            Err(e) if is_transport(&e) => {
                return Err(map(e, Kind::Read, "probing TTL node support"))
            }
            Err(_) => false,
        };
        let ops = Arc::new(AtomicU64::new(0));
        let locks = Locks::new(cfg.clone(), lock_dir, acls, bounds, ops.clone());
        Ok(ZookeeperBackend {
            inner: Arc::new(Inner {
                client: std::sync::RwLock::new(client),
                reconnect: tokio::sync::Mutex::new(()),
                session_timeout,
                ops,
                cfg,
                acls,
                ns,
                kv_dir,
                mode,
                ttl_nodes,
                bounds,
                ttl_check_interval,
                locks,
            }),
        })
    }

    /// The read mode of this handle.
    pub fn read_mode(&self) -> ReadMode {
        self.inner.mode
    }

    /// The znode path (below the chroot) that stores `key`.
    pub fn key_path(&self, key: &str) -> String {
        format!("{}/{}", self.inner.kv_dir, encode_key(key))
    }

    /// The znode (below the chroot) under which lock `name`'s entries live:
    /// the path a Curator `InterProcessMutex` must use to exclude, and be
    /// excluded by, this lock.
    pub fn lock_path(&self, name: &str) -> String {
        self.inner.locks.dir_of(name)
    }

    /// Deletes the entry of lock `name`'s current holder, whoever it is, as
    /// an operator would (`deleteall` of that one znode): its holder's
    /// `lost()` fires at its next check, the next waiter gets the lock.
    /// Returns whether the lock was held.
    pub async fn revoke_lock(&self, name: &str) -> Result<bool> {
        validate::lock_name(name)?;
        let dir = self.lock_path(name);
        let what = format!("revoke lock {name:?}");
        let client = self.zk().await?;
        loop {
            self.count();
            let children = match client.list_children(&dir).await {
                Ok(c) => c,
                Err(zk::Error::NoNode) => return Ok(false),
                Err(e) => return Err(map(e, Kind::Read, &what)),
            };
            let Some(first) = crate::lock::holder_of(&children) else {
                return Ok(false);
            };
            self.count();
            match client.delete(&format!("{dir}/{first}"), None).await {
                Ok(()) => return Ok(true),
                // Released meanwhile: look again.
                Err(zk::Error::NoNode) => continue,
                Err(e) => return Err(map(e, Kind::Write, &what)),
            }
        }
    }

    /// The ZooKeeper session id of the handle's main session.
    pub fn session_id(&self) -> i64 {
        self.current().session_id().0
    }

    /// The main session's client (for tests and interop).
    pub fn client(&self) -> zk::Client {
        self.current()
    }

    /// Number of requests this handle has sent to ZooKeeper (KV, txn, lock
    /// and renewal requests, on all its sessions; not the client library's
    /// own pings). A waiting `lock()` sends none while it waits.
    pub fn requests(&self) -> u64 {
        self.inner.ops.load(Ordering::Relaxed)
    }

    /// Counts one request.
    pub(crate) fn count(&self) {
        self.inner.ops.fetch_add(1, Ordering::Relaxed);
    }

    fn current(&self) -> zk::Client {
        self.inner
            .client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The main session's client. Once that session expired (a partition
    /// longer than its timeout), a new session replaces it, so the handle
    /// recovers; the calls that were in flight failed with `Unavailable` and
    /// watches on the old session ended with an error.
    pub(crate) async fn zk(&self) -> Result<zk::Client> {
        let c = self.current();
        if c.state() != zk::SessionState::Expired {
            return Ok(c);
        }
        let _one = self.inner.reconnect.lock().await;
        let c = self.current();
        if c.state() != zk::SessionState::Expired {
            return Ok(c);
        }
        tracing::warn!(cluster = %self.inner.cfg.cluster, "zookeeper session expired; opening a new one");
        let fresh = self.inner.cfg.connect(self.inner.session_timeout).await?;
        *self.inner.client.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    pub(crate) async fn read_key(&self, path: &str, what: &str) -> Result<KeyState> {
        let client = self.zk().await?;
        self.count();
        match client.get_data(path).await {
            Ok((data, stat)) => Ok(Some(Node::from_read(data, &stat))),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(map(e, Kind::Read, what)),
        }
    }

    /// Reads many znodes in one `multi` read (one consistent server state).
    pub(crate) async fn read_many(&self, paths: &[String], what: &str) -> Result<Vec<KeyState>> {
        let client = self.zk().await?;
        let mut r = client.new_multi_reader();
        for p in paths {
            r.add_get_data(p).map_err(|e| map(e, Kind::Read, what))?;
        }
        self.count();
        let results = r.commit().await.map_err(|e| map(e, Kind::Read, what))?;
        results
            .into_iter()
            .map(|res| match res {
                zk::MultiReadResult::Data { data, stat } => Ok(Some(Node::from_read(data, &stat))),
                zk::MultiReadResult::Error {
                    err: zk::Error::NoNode,
                } => Ok(None),
                zk::MultiReadResult::Error { err } => Err(map(err, Kind::Read, what)),
                _ => Err(Error::backend(
                    NAME,
                    format!("{what}: unexpected multi-read result"),
                )),
            })
            .collect()
    }

    /// Confirms `st` of `path` through the write path. `Ok(true)`: still so.
    async fn confirm(&self, path: &str, st: &KeyState, what: &str) -> Result<bool> {
        let client = self.zk().await?;
        let mut plan = Plan::new(&client, self.inner.acls);
        plan.pin(path, st).map_err(|e| map(e, Kind::Read, what))?;
        self.count();
        match plan.commit().await {
            Commit::Done(_) => Ok(true),
            Commit::Retry => Ok(false),
            Commit::Failed(e) => Err(map(e, Kind::Read, what)),
        }
    }

    /// Whether the lock entry `path` exists, asked through the write path
    /// (a `multi[check]`, ordered by the leader), so a lagging member's
    /// copy cannot answer "gone" for an entry that was just created.
    async fn entry_exists(&self, path: &str, what: &str) -> Result<bool> {
        let client = self.zk().await?;
        let mut plan = Plan::new(&client, self.inner.acls);
        plan.check(path, -1).map_err(|e| map(e, Kind::Read, what))?;
        self.count();
        match plan.commit().await {
            Commit::Done(_) => Ok(true),
            Commit::Retry => Ok(false),
            Commit::Failed(e) => Err(map(e, Kind::Read, what)),
        }
    }

    fn contention(what: &str) -> Error {
        Error::unavailable(
            NAME,
            format!("{what}: gave up after {MAX_RETRIES} retries under contention"),
        )
    }

    /// All keys of the namespace starting with `prefix`, sorted, with their
    /// znode names.
    pub(crate) async fn matching_keys(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let client = self.zk().await?;
        self.count();
        let names = match client.list_children(&self.inner.kv_dir).await {
            Ok(n) => n,
            Err(zk::Error::NoNode) => Vec::new(),
            Err(e) => return Err(map(e, Kind::Read, "listing keys")),
        };
        let mut keys: Vec<(String, String)> = names
            .into_iter()
            .filter_map(|n| {
                decode_key(&n)
                    .filter(|k| k.starts_with(prefix))
                    .map(|k| (k, n))
            })
            .collect();
        keys.sort_unstable();
        Ok(keys)
    }
}

#[async_trait]
impl KvStore for ZookeeperBackend {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        validate::key(key)?;
        let path = self.key_path(key);
        let what = format!("get {key:?}");
        for _ in 0..MAX_RETRIES {
            let st = self.read_key(&path, &what).await?;
            if self.inner.mode == ReadMode::Sequential || self.confirm(&path, &st, &what).await? {
                return Ok(logical(key, &st, false));
            }
        }
        Err(Self::contention(&what))
    }

    async fn put(&self, key: &str, value: Bytes, opts: PutOptions) -> Result<Revision> {
        validate::key(key)?;
        validate::value(key, &value)?;
        if let Some(t) = opts.ttl {
            validate::ttl(t)?;
            if !self.inner.ttl_nodes {
                return Err(no_ttl());
            }
        }
        let ttl = opts.ttl.map(ms);
        let path = self.key_path(key);
        let what = format!("put {key:?}");
        for _ in 0..MAX_RETRIES {
            let st = self.read_key(&path, &what).await?;
            let cur = current(&st);
            let fails = (opts.if_absent && cur.is_some())
                || opts.if_revision.is_some_and(|r| cur.unwrap_or(0) != r);
            if fails {
                // A conflict is a read too: confirm it, so it is never
                // decided on a stale view.
                if self.confirm(&path, &st, &what).await? {
                    return Err(Error::conflict(key, cur));
                }
                continue;
            }
            let client = self.zk().await?;
            let mut plan = Plan::new(&client, self.inner.acls);
            let mut sim = Sim::new(&st);
            let idx = plan
                .put(&path, &mut sim, &value, ttl)
                .map_err(|e| map(e, Kind::Write, &what))?;
            self.count();
            match plan.commit().await {
                Commit::Done(r) => {
                    return r.get(idx).and_then(result_revision).ok_or_else(|| {
                        Error::backend(NAME, format!("{what}: no revision in the reply"))
                    });
                }
                Commit::Retry => continue,
                Commit::Failed(zk::Error::Unimplemented) if ttl.is_some() => return Err(no_ttl()),
                Commit::Failed(e) => return Err(map(e, Kind::Write, &what)),
            }
        }
        Err(Self::contention(&what))
    }

    async fn delete(&self, key: &str, opts: DeleteOptions) -> Result<bool> {
        validate::key(key)?;
        let path = self.key_path(key);
        let what = format!("delete {key:?}");
        for _ in 0..MAX_RETRIES {
            let st = self.read_key(&path, &what).await?;
            let cur = current(&st);
            if opts.if_revision.is_some_and(|r| cur.unwrap_or(0) != r) {
                if self.confirm(&path, &st, &what).await? {
                    return Err(Error::conflict(key, cur));
                }
                continue;
            }
            if cur.is_none() {
                if self.confirm(&path, &st, &what).await? {
                    return Ok(false);
                }
                continue;
            }
            let client = self.zk().await?;
            let mut plan = Plan::new(&client, self.inner.acls);
            let mut sim = Sim::new(&st);
            plan.tombstone(&path, &mut sim)
                .map_err(|e| map(e, Kind::Write, &what))?;
            self.count();
            match plan.commit().await {
                Commit::Done(_) => return Ok(true),
                Commit::Retry => continue,
                Commit::Failed(e) => return Err(map(e, Kind::Write, &what)),
            }
        }
        Err(Self::contention(&what))
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>> {
        validate::prefix(prefix)?;
        let keys = self.matching_keys(prefix).await?;
        let limit = opts.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for chunk in keys.chunks(LIST_BATCH) {
            if out.len() >= limit {
                break;
            }
            let paths: Vec<String> = chunk
                .iter()
                .map(|(_, n)| format!("{}/{}", self.inner.kv_dir, n))
                .collect();
            let states = self.read_many(&paths, &format!("list {prefix:?}")).await?;
            for ((k, _), st) in chunk.iter().zip(states) {
                if out.len() >= limit {
                    break;
                }
                if let Some(kv) = logical(k, &st, opts.keys_only) {
                    out.push(kv);
                }
            }
        }
        Ok(out)
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream> {
        validate::prefix(prefix)?;
        if from.is_some() {
            return Err(Error::Unsupported {
                capability: latchkey_core::Capability::WatchResume,
                backend: NAME,
            });
        }
        crate::watch::start(self.clone(), prefix.to_string()).await
    }
}

/// A result of a txn op, before the txn's revision is known.
enum Pending {
    Done(OpResult),
    Put,
    Get(String, Bytes, Option<Duration>),
}

#[async_trait]
impl Txn for ZookeeperBackend {
    async fn txn(&self, req: TxnRequest) -> Result<TxnOutcome> {
        validate::txn(&req, MAX_TXN_OPS)?;
        for op in req.then.iter().chain(req.otherwise.iter()) {
            if matches!(op, Op::Put { ttl: Some(_), .. }) && !self.inner.ttl_nodes {
                return Err(no_ttl());
            }
        }
        // Every znode the txn may look at: user keys first, then the lock
        // entries of `held` compares, then the data dir (for a revision).
        let mut keys: Vec<String> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut add = |k: &str, keys: &mut Vec<String>| {
            if !index.contains_key(k) {
                index.insert(k.to_string(), keys.len());
                keys.push(k.to_string());
            }
        };
        for c in &req.when {
            if let Some(k) = c.key() {
                add(k, &mut keys);
            }
        }
        for op in req.then.iter().chain(req.otherwise.iter()) {
            add(op.key(), &mut keys);
        }
        let mut held: Vec<String> = Vec::new();
        for c in &req.when {
            if let Compare::Held(e) = c {
                validate::lock_name(&e.name)?;
                if !self.inner.locks.is_entry_path(&e.id) {
                    return Err(Error::InvalidArgument(format!(
                        "lock entry {:?} of lock {:?} is not a ZooKeeper lock node",
                        e.id, e.name
                    )));
                }
                held.push(e.id.clone());
            }
        }
        let mut paths: Vec<String> = keys.iter().map(|k| self.key_path(k)).collect();
        paths.extend(held.iter().cloned());
        paths.push(self.inner.kv_dir.clone());
        let what = "txn";
        'attempt: for _ in 0..MAX_RETRIES {
            let states = self.read_many(&paths, what).await?;
            let key_state = |k: &str| &states[index[k]];
            let held_state = |id: &str| {
                let i = keys.len() + held.iter().position(|h| h == id).unwrap_or(0);
                &states[i]
            };
            // The read may come from a member that has not applied the
            // entry's create yet (it was made on the lock's own session,
            // maybe through another member). An entry never comes back once
            // deleted, so an absence confirmed through the leader is final.
            for id in &held {
                if held_state(id).is_none() && self.entry_exists(id, what).await? {
                    continue 'attempt;
                }
            }
            let succeeded = req.when.iter().all(|c| match c {
                Compare::Revision { key, op, revision } => {
                    op.holds(current(key_state(key)).unwrap_or(0), *revision)
                }
                Compare::Value { key, value } => {
                    logical(key, key_state(key), false).is_some_and(|kv| kv.value == *value)
                }
                Compare::Exists(key) => current(key_state(key)).is_some(),
                Compare::Absent(key) => current(key_state(key)).is_none(),
                Compare::Held(e) => held_state(&e.id).is_some(),
                #[allow(unreachable_patterns)]
                _ => false,
            });
            let branch = if succeeded { &req.then } else { &req.otherwise };
            let client = self.zk().await?;
            let mut plan = Plan::new(&client, self.inner.acls);
            let mut sims: HashMap<&str, Sim> = HashMap::new();
            let wmap = |e| map(e, Kind::Write, what);
            // Pin everything the decision and the reads rest on.
            for c in &req.when {
                match c {
                    Compare::Held(e) => {
                        if held_state(&e.id).is_some() {
                            plan.check(&e.id, -1).map_err(wmap)?;
                        }
                    }
                    other => {
                        let k = other.key().unwrap_or_default();
                        let st = key_state(k);
                        let sim = sims.entry(k).or_insert_with(|| Sim::new(st));
                        plan.pin_sim(&self.key_path(k), sim, st).map_err(wmap)?;
                    }
                }
            }
            for op in branch {
                if let Op::Get { key } = op {
                    let st = key_state(key);
                    let sim = sims.entry(key.as_str()).or_insert_with(|| Sim::new(st));
                    plan.pin_sim(&self.key_path(key), sim, st).map_err(wmap)?;
                }
            }
            let mut pending = Vec::with_capacity(branch.len());
            let mut rev_op: Option<usize> = None;
            for op in branch {
                let k = op.key();
                let st = key_state(k);
                let path = self.key_path(k);
                let sim = sims.entry(k).or_insert_with(|| Sim::new(st));
                match op {
                    Op::Put { value, ttl, .. } => {
                        let i = plan.put(&path, sim, value, ttl.map(ms)).map_err(wmap)?;
                        rev_op.get_or_insert(i);
                        pending.push(Pending::Put);
                    }
                    Op::Delete { .. } => {
                        if sim.alive() {
                            let i = plan.tombstone(&path, sim).map_err(wmap)?;
                            rev_op.get_or_insert(i);
                            pending.push(Pending::Done(OpResult::Delete { deleted: true }));
                        } else {
                            plan.pin_sim(&path, sim, st).map_err(wmap)?;
                            pending.push(Pending::Done(OpResult::Delete { deleted: false }));
                        }
                    }
                    Op::Get { .. } => {
                        if sim.written {
                            match &sim.value {
                                Some((v, t)) => {
                                    pending.push(Pending::Get(k.to_string(), v.clone(), *t))
                                }
                                None => pending.push(Pending::Done(OpResult::Get(None))),
                            }
                        } else {
                            pending.push(Pending::Done(OpResult::Get(logical(k, st, false))));
                        }
                    }
                }
            }
            let revision = if rev_op.is_some() || self.inner.mode == ReadMode::Linearizable {
                self.count();
                match plan.commit().await {
                    Commit::Done(r) => match rev_op {
                        Some(i) => r
                            .get(i)
                            .and_then(result_revision)
                            .ok_or_else(|| Error::backend(NAME, "txn: no revision in the reply"))?,
                        None => observed_revision(&states),
                    },
                    Commit::Retry => continue 'attempt,
                    Commit::Failed(zk::Error::Unimplemented) => return Err(no_ttl()),
                    Commit::Failed(e) => {
                        let kind = if rev_op.is_some() {
                            Kind::Write
                        } else {
                            Kind::Read
                        };
                        return Err(map(e, kind, what));
                    }
                }
            } else {
                // Read-only in sequential mode: one multi read is one
                // consistent server state, which is all this txn needs.
                observed_revision(&states)
            };
            let results = pending
                .into_iter()
                .map(|p| match p {
                    Pending::Done(r) => r,
                    Pending::Put => OpResult::Put { revision },
                    Pending::Get(key, value, lease_ttl) => OpResult::Get(Some(KeyValue {
                        key,
                        value,
                        revision,
                        lease_ttl,
                    })),
                })
                .collect();
            return Ok(TxnOutcome {
                succeeded,
                results,
                revision,
            });
        }
        Err(Self::contention(what))
    }
}

/// The newest zxid a read saw (modification or child change of any node
/// read, the data dir included): a lower bound of the store's revision.
fn observed_revision(states: &[KeyState]) -> Revision {
    states
        .iter()
        .flatten()
        .map(|n| n.mzxid.max(n.pzxid).max(0) as Revision)
        .max()
        .unwrap_or(0)
}

impl Backend for ZookeeperBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let (min, max) = self.inner.bounds;
        let mut c = Capabilities::full();
        c.watch_every_revision = false;
        c.watch_resume = false;
        c.watch_reports_expiry = self.inner.ttl_nodes;
        c.global_revision = true;
        c.native_ttl = self.inner.ttl_nodes;
        // Locks live as long as a session: the server's minimum session
        // timeout is the shortest lock TTL it honours.
        c.min_ttl = min;
        // TTL keys vanish at the server's next TTL sweep after their TTL;
        // sessions expire on the server's tick (min = 2 ticks).
        c.ttl_granularity = self.inner.ttl_check_interval.max(min / 2) + min / 2;
        c.max_txn_ops = MAX_TXN_OPS;
        c.fifo_locks = true;
        c.linearizable_reads = self.inner.mode == ReadMode::Linearizable;
        c.durable_fencing = true;
        c.durable_writes = true;
        c.max_lock_ttl = Some(max);
        c
    }
}
