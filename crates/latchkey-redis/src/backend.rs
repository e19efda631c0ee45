//! [`RedisBackend`]: one handle (one command connection) on one namespace,
//! implementing the KV store and the transactions. Locks are in
//! [`crate::lock`], watches in [`crate::watch`].

use crate::conn::{Config, Conn, Retry, NAME};
use crate::layout::Layout;
use crate::notify::Notifier;
use crate::scripts::scripts;
use async_trait::async_trait;
use bytes::Bytes;
use latchkey_core::lock::local::LocalQueues;
use latchkey_core::{
    validate, Backend, Capabilities, CmpOp, Compare, DeleteOptions, Error, KeyValue, KvStore,
    ListOptions, Op, OpResult, PutOptions, RenewalGroup, Result, Revision, Txn, TxnOutcome,
    TxnRequest, WatchStream,
};
use redis::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shortest TTL (keys and locks); shorter ones are raised to it. Lock
/// renewal runs every TTL/3, and a few milliseconds of scheduling delay on a
/// loaded machine must not lose a lock.
pub const MIN_TTL: Duration = Duration::from_millis(10);
/// How late past its TTL a key may still be seen: Redis checks expiry on
/// every access with millisecond resolution (on the server's clock).
pub const TTL_GRANULARITY: Duration = Duration::from_millis(1);
/// Most ops per transaction branch (and most compares). One script runs
/// them all, blocking the server meanwhile, so the bound is ours, not
/// Redis's.
pub const MAX_TXN_OPS: usize = 1024;

/// What every part of a handle shares (guards and renewers hold it too).
pub(crate) struct Shared {
    pub conn: Conn,
    pub layout: Layout,
    pub history: u64,
    pub notifier: Notifier,
    pub local: LocalQueues,
    pub groups: Mutex<HashMap<Duration, Arc<RenewalGroup>>>,
}

/// One client handle of a Redis server (or cluster) in one namespace: one
/// multiplexed command connection (on a cluster: one per master), plus one
/// pub/sub connection while a lock waiter waits, plus one connection per
/// open watch. Any number of locks, held or awaited, share these.
///
/// Get one with [`crate::connect`] or [`RedisBackend::connect`]. Cloning
/// shares the handle (its connections, renewals and local lock queues).
#[derive(Clone)]
pub struct RedisBackend {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("cluster", &self.shared.conn.target().is_cluster())
            .field("prefix", &self.shared.layout.lock(""))
            .finish()
    }
}

/// Milliseconds for Redis, rounded up so a key never lives shorter than
/// asked, and at least [`MIN_TTL`].
pub(crate) fn ttl_ms(ttl: Duration) -> u64 {
    let ttl = ttl.max(MIN_TTL);
    u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

fn lease(t: u64) -> Option<Duration> {
    (t > 0).then(|| Duration::from_millis(t))
}

fn unexpected(what: &str, v: &Value) -> Error {
    Error::backend(NAME, format!("unexpected reply to {what}: {v:?}"))
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_bytes(v: &Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        Value::Nil => Some(Bytes::new()),
        _ => None,
    }
}

/// `{v, r, t}` as the scripts return a read key (an empty array: absent).
fn parse_get(key: &str, v: &Value) -> Result<Option<KeyValue>> {
    match v {
        Value::Array(a) if a.is_empty() => Ok(None),
        Value::Nil => Ok(None),
        Value::Array(a) if a.len() == 3 => {
            let value = as_bytes(&a[0]).ok_or_else(|| unexpected("a read", v))?;
            let revision = as_u64(&a[1]).ok_or_else(|| unexpected("a read", v))?;
            let t = as_u64(&a[2]).ok_or_else(|| unexpected("a read", v))?;
            Ok(Some(KeyValue {
                key: key.to_string(),
                value,
                revision,
                lease_ttl: lease(t),
            }))
        }
        _ => Err(unexpected("a read", v)),
    }
}

impl RedisBackend {
    /// Opens a handle for a `redis://`, `rediss://`, `redis+cluster://` or
    /// `rediss+cluster://` URL (see the crate docs for the parameters). Connects at once, so a wrong address or
    /// password fails here.
    pub async fn connect(url: &latchkey_core::BackendUrl) -> Result<RedisBackend> {
        let cfg = Config::from_url(url)?;
        let conn = Conn::new(cfg.target.clone(), cfg.timeout);
        let layout = Layout::new(&cfg.namespace, cfg.target.is_cluster());
        // A server that wants credentials accepts the connection and
        // refuses the first command (NOAUTH): find out now, not later. On
        // a cluster, PING would go to every node (and fail while any
        // replica is down): ask the namespace's master instead, which also
        // shows that the namespace's slot is served.
        let probe = if cfg.target.is_cluster() {
            redis::cmd("EXISTS").arg(layout.rev()).clone()
        } else {
            redis::cmd("PING")
        };
        let _: redis::Value = conn
            .run(Retry::Safe, "ping", |mut c| {
                let probe = probe.clone();
                async move { probe.query_async(&mut c).await }
            })
            .await?;
        Ok(RedisBackend {
            shared: Arc::new(Shared {
                notifier: Notifier::new(
                    cfg.target.clone(),
                    layout.rev(),
                    cfg.timeout,
                    conn.ops().clone(),
                ),
                conn,
                layout,
                history: cfg.history,
                local: LocalQueues::new(),
                groups: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Number of requests this handle has sent (commands and scripts on
    /// its command connection, SUBSCRIBE/UNSUBSCRIBE, watch reads). A lock
    /// waiter sends none while it waits for a notification, which is how
    /// tests show that it does not poll.
    pub fn op_count(&self) -> u64 {
        self.shared
            .conn
            .ops()
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The Redis key a lock named `name` occupies in this handle's
    /// namespace (it holds the owner id while the lock is held, as
    /// `SET <key> <owner> NX PX <ttl>` would).
    pub fn lock_key(&self, name: &str) -> String {
        self.shared.layout.lock(name)
    }

    /// The Redis key of the fencing counter of lock `name`.
    pub fn fence_key(&self, name: &str) -> String {
        self.shared.layout.fence(name)
    }

    /// The Redis key (a hash `{v, r, t}`) that holds user key `key`.
    pub fn kv_key(&self, key: &str) -> String {
        self.shared.layout.kv(key)
    }
}

#[async_trait]
impl KvStore for RedisBackend {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        validate::key(key)?;
        let k = self.shared.layout.kv(key);
        let (v, r, t): (Option<Vec<u8>>, Option<u64>, Option<u64>) = self
            .shared
            .conn
            .run(Retry::Safe, "get", |mut c| {
                let k = k.clone();
                async move {
                    redis::cmd("HMGET")
                        .arg(&k)
                        .arg("v")
                        .arg("r")
                        .arg("t")
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(match (v, r) {
            (Some(v), Some(r)) => Some(KeyValue {
                key: key.to_string(),
                value: Bytes::from(v),
                revision: r,
                lease_ttl: lease(t.unwrap_or(0)),
            }),
            _ => None,
        })
    }

    async fn put(&self, key: &str, value: Bytes, opts: PutOptions) -> Result<Revision> {
        validate::key(key)?;
        validate::value(key, &value)?;
        if let Some(t) = opts.ttl {
            validate::ttl(t)?;
        }
        let l = &self.shared.layout;
        let keys = [l.rev(), l.index(), l.log(), l.ttl(), l.kv(key)];
        let ttl = opts.ttl.map_or(0, ttl_ms);
        let if_rev = opts.if_revision.map_or(String::new(), |r| r.to_string());
        let absent = if opts.if_absent { "1" } else { "0" };
        let history = self.shared.history;
        let (ok, rev): (i64, u64) = self
            .shared
            .conn
            .run(Retry::Unsafe, "put", |mut c| {
                let mut inv = scripts().put.prepare_invoke();
                inv.key(&keys[..])
                    .arg(key)
                    .arg(value.as_ref())
                    .arg(ttl)
                    .arg(absent)
                    .arg(&if_rev)
                    .arg(history);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        if ok == 1 {
            Ok(rev)
        } else {
            Err(Error::conflict(key, (rev != 0).then_some(rev)))
        }
    }

    async fn delete(&self, key: &str, opts: DeleteOptions) -> Result<bool> {
        validate::key(key)?;
        let l = &self.shared.layout;
        let keys = [l.rev(), l.index(), l.log(), l.ttl(), l.kv(key)];
        let if_rev = opts.if_revision.map_or(String::new(), |r| r.to_string());
        let history = self.shared.history;
        let (ok, n): (i64, u64) = self
            .shared
            .conn
            .run(Retry::Unsafe, "delete", |mut c| {
                let mut inv = scripts().delete.prepare_invoke();
                inv.key(&keys[..]).arg(key).arg(&if_rev).arg(history);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        if ok == 1 {
            Ok(n == 1)
        } else {
            Err(Error::conflict(key, (n != 0).then_some(n)))
        }
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>> {
        validate::prefix(prefix)?;
        if opts.limit == Some(0) {
            return Ok(Vec::new());
        }
        let l = &self.shared.layout;
        let (min, max) = if prefix.is_empty() {
            (b"-".to_vec(), b"+".to_vec())
        } else {
            // Every key with the prefix sorts between `[prefix` and
            // `(prefix\xff`: UTF-8 never contains the byte 0xff.
            let mut min = b"[".to_vec();
            min.extend_from_slice(prefix.as_bytes());
            let mut max = b"(".to_vec();
            max.extend_from_slice(prefix.as_bytes());
            max.push(0xff);
            (min, max)
        };
        let index = l.index();
        let kv_prefix = l.kv_prefix();
        let limit = opts.limit.unwrap_or(0);
        let keys_only = if opts.keys_only { "1" } else { "0" };
        let rows: Vec<(String, Vec<u8>, u64, u64)> = self
            .shared
            .conn
            .run(Retry::Safe, "list", |mut c| {
                let mut inv = scripts().list.prepare_invoke();
                inv.key(&index)
                    .arg(&kv_prefix)
                    .arg(&min)
                    .arg(&max)
                    .arg(limit)
                    .arg(keys_only);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(key, value, revision, t)| KeyValue {
                key,
                value: Bytes::from(value),
                revision,
                lease_ttl: lease(t),
            })
            .collect())
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream> {
        validate::prefix(prefix)?;
        crate::watch::open(&self.shared, prefix, from).await
    }
}

/// Builds the ARGV of the txn script (see its doc in `scripts.rs`).
struct TxnArgs {
    keys: Vec<String>,
    key_pos: HashMap<String, usize>,
    args: Vec<Vec<u8>>,
}

impl TxnArgs {
    fn key(&mut self, k: String) -> Vec<u8> {
        let n = self.keys.len() + 1;
        let pos = *self.key_pos.entry(k.clone()).or_insert_with(|| {
            self.keys.push(k);
            n
        });
        pos.to_string().into_bytes()
    }
    fn arg(&mut self, a: impl Into<Vec<u8>>) {
        self.args.push(a.into());
    }
    fn ops(&mut self, layout: &Layout, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Put { key, value, ttl } => {
                    self.arg("p");
                    let k = self.key(layout.kv(key));
                    self.arg(k);
                    self.arg(value.to_vec());
                    self.arg(ttl.map_or(0, ttl_ms).to_string());
                }
                Op::Delete { key } => {
                    self.arg("d");
                    let k = self.key(layout.kv(key));
                    self.arg(k);
                }
                Op::Get { key } => {
                    self.arg("g");
                    let k = self.key(layout.kv(key));
                    self.arg(k);
                }
            }
        }
    }
}

#[async_trait]
impl Txn for RedisBackend {
    async fn txn(&self, txn: TxnRequest) -> Result<TxnOutcome> {
        validate::txn(&txn, MAX_TXN_OPS)?;
        for cmp in &txn.when {
            if let Compare::Held(e) = cmp {
                validate::lock_name(&e.name)?;
            }
        }
        let l = &self.shared.layout;
        let mut a = TxnArgs {
            keys: vec![l.rev(), l.index(), l.log(), l.ttl()],
            key_pos: HashMap::new(),
            args: Vec::new(),
        };
        for (n, k) in a.keys.clone().into_iter().enumerate() {
            a.key_pos.insert(k, n + 1);
        }
        // Placeholders for [1]..[7], filled in below.
        for _ in 0..7 {
            a.arg("");
        }
        for cmp in &txn.when {
            match cmp {
                Compare::Revision { key, op, revision } => {
                    a.arg("r");
                    let k = a.key(l.kv(key));
                    a.arg(k);
                    a.arg(match op {
                        CmpOp::Equal => "=",
                        CmpOp::NotEqual => "!",
                        CmpOp::Less => "<",
                        CmpOp::Greater => ">",
                    });
                    a.arg(revision.to_string());
                }
                Compare::Value { key, value } => {
                    a.arg("v");
                    let k = a.key(l.kv(key));
                    a.arg(k);
                    a.arg(value.to_vec());
                }
                Compare::Exists(key) => {
                    a.arg("e");
                    let k = a.key(l.kv(key));
                    a.arg(k);
                }
                Compare::Absent(key) => {
                    a.arg("a");
                    let k = a.key(l.kv(key));
                    a.arg(k);
                }
                Compare::Held(entry) => {
                    a.arg("h");
                    let lk = a.key(l.lock(&entry.name));
                    a.arg(lk);
                    let fk = a.key(l.fence(&entry.name));
                    a.arg(fk);
                    a.arg(entry.id.clone());
                    a.arg(entry.token.to_string());
                }
                // `Compare` may grow; refuse what this adapter cannot check.
                #[allow(unreachable_patterns)]
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "the redis backend cannot evaluate {other:?}"
                    )))
                }
            }
        }
        let then_start = a.args.len() + 1;
        a.ops(l, &txn.then);
        let else_start = a.args.len() + 1;
        a.ops(l, &txn.otherwise);
        let plen = l.kv_prefix().len();
        let header = [
            self.shared.history.to_string(),
            plen.to_string(),
            txn.when.len().to_string(),
            then_start.to_string(),
            txn.then.len().to_string(),
            else_start.to_string(),
            txn.otherwise.len().to_string(),
        ];
        for (n, h) in header.into_iter().enumerate() {
            a.args[n] = h.into_bytes();
        }
        let TxnArgs { keys, args, .. } = a;
        let (ok, rev_after, results): (i64, u64, Vec<Value>) = self
            .shared
            .conn
            .run(Retry::Unsafe, "txn", |mut c| {
                let mut inv = scripts().txn.prepare_invoke();
                inv.key(&keys[..]);
                for arg in &args {
                    inv.arg(&arg[..]);
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let succeeded = ok == 1;
        let ops = if succeeded { &txn.then } else { &txn.otherwise };
        if results.len() != ops.len() {
            return Err(Error::backend(
                NAME,
                format!(
                    "the txn script returned {} results for {} ops",
                    results.len(),
                    ops.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(ops.len());
        for (op, r) in ops.iter().zip(&results) {
            out.push(match op {
                Op::Put { .. } => OpResult::Put {
                    revision: as_u64(r).ok_or_else(|| unexpected("a txn put", r))?,
                },
                Op::Delete { .. } => OpResult::Delete {
                    deleted: as_u64(r).ok_or_else(|| unexpected("a txn delete", r))? == 1,
                },
                Op::Get { key } => OpResult::Get(parse_get(key, r)?),
            });
        }
        Ok(TxnOutcome {
            succeeded,
            results: out,
            revision: rev_after,
        })
    }
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::full();
        c.min_ttl = MIN_TTL;
        c.ttl_granularity = TTL_GRANULARITY;
        c.max_txn_ops = MAX_TXN_OPS;
        // One primary serves every read and write. (Replicas are never
        // read; a failover to one may lose acknowledged writes, see below.)
        c.linearizable_reads = true;
        // Counters and data live in memory: a restart without
        // `appendfsync always`, or a failover (Sentinel, or a replica
        // promoted in a Redis Cluster: replication is asynchronous), loses
        // them, and tokens and revisions can then repeat. On a cluster
        // every other capability is the same: a namespace is one slot, so
        // each script still runs on one master.
        c.durable_fencing = false;
        c.durable_writes = false;
        c
    }
}

const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<RedisBackend>();
};
