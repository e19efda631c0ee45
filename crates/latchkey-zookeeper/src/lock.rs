//! Locks: Curator's `InterProcessMutex` layout, one ZooKeeper session per
//! distinct lock TTL, fencing tokens from `czxid`.
//!
//! - **Layout.** Lock `x` of namespace `ns` is the persistent znode
//!   `<chroot>/latchkey/ns/<ns>/locks/<escaped x>` (no namespace:
//!   `/latchkey/default/locks/<escaped x>`); each contender creates an
//!   ephemeral-sequential child `_c_<uuid>-lock-<seq>` (Curator's protected
//!   name); the lowest sequence holds the lock, each waiter watches only its
//!   predecessor. A create whose reply was lost is resolved by finding the
//!   entry by its uuid; a cancelled or failed attempt deletes its entry (by
//!   path, or by uuid when the create's outcome is unknown). The lock dir is
//!   created persistent, never as a container, so it is never reaped under
//!   a waiter. (Same layout as `zookeeper-client`'s
//!   `LockPrefix::new_curator` recipe, which `Locks::lock` explains why
//!   it does not use.)
//! - **Fencing token** = the entry's `czxid`: global, never reused. (The
//!   sequence suffix is the parent's 32-bit child counter; it restarts if
//!   the parent is recreated, so it is not a token.)
//! - **TTL = session timeout.** An entry is ephemeral: it dies with its
//!   session. So each distinct TTL gets its own session with that timeout
//!   (clamped by the server to `[minSessionTimeout, maxSessionTimeout]`,
//!   `2..20 × tickTime` by default; declared as `min_ttl` / `max_lock_ttl`).
//!   All locks and waiters of that TTL share that one session.
//! - **`lost()`.** Core's [`RenewalGroup`] per session: every TTL/3 one
//!   `multi` read checks that every member entry still exists. A reply
//!   proves the session was alive when the request was *sent*, so the
//!   server cannot expire it before `sent + timeout`; when that deadline
//!   passes without a newer reply (e.g. disconnected), `lost()` fires. A
//!   vanished entry, or an expired session, fires it at the next check.
//!   A disconnection that recovers within the deadline is not a loss.
//! - **Abandon.** Stopping renewal alone would not free anything (the
//!   client library keeps the session alive), and closing the session would
//!   free every lock of that TTL at once. So abandon stops renewing the
//!   entry (its `lost()` fires at its deadline) and deletes the entry one TTL
//!   later, which is when the server would have freed it had the holder died.

use crate::conn::ConnCfg;
use crate::error::{is_session_gone, is_transport, map, Kind};
use crate::keys::encode_key;
use async_trait::async_trait;
use latchkey_core::lock::local::{LocalQueues, LocalTurn};
use latchkey_core::{
    CancelOnDrop, GuardOps, LockEntry, LockGuard, RenewOutcome, RenewalGroup, Renewer, Result,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use zookeeper_client as zk;

/// The lock name part of Curator's entry names (`InterProcessMutex`).
const LOCK_NAME: &str = "lock-";
/// Entries checked per renewal request.
const RENEW_BATCH: usize = 512;

/// One session and the renewal loop of the locks it holds.
pub(crate) struct LockSession {
    client: zk::Client,
    ops: Arc<AtomicU64>,
    ttl: Duration,
    group: Arc<RenewalGroup>,
}

impl LockSession {
    /// The client, counting one request.
    fn req(&self) -> &zk::Client {
        self.ops.fetch_add(1, Ordering::Relaxed);
        &self.client
    }

    fn usable(&self) -> bool {
        !self.group.is_dead() && !self.client.state().is_terminated()
    }
}

/// The lock side of a handle.
pub(crate) struct Locks {
    cfg: ConnCfg,
    dir: String,
    acls: zk::Acls<'static>,
    bounds: (Duration, Duration),
    sessions: tokio::sync::Mutex<HashMap<Duration, Arc<LockSession>>>,
    local: LocalQueues,
    ops: Arc<AtomicU64>,
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((5u64 << attempt.min(5)).min(200))
}

impl Locks {
    pub fn new(
        cfg: ConnCfg,
        dir: String,
        acls: zk::Acls<'static>,
        bounds: (Duration, Duration),
        ops: Arc<AtomicU64>,
    ) -> Self {
        Locks {
            cfg,
            dir,
            acls,
            bounds,
            sessions: tokio::sync::Mutex::new(HashMap::new()),
            local: LocalQueues::new(),
            ops,
        }
    }

    /// The lock dir of `name`.
    pub fn dir_of(&self, name: &str) -> String {
        format!("{}/{}", self.dir, encode_key(name))
    }

    /// Could `id` be a lock entry of ours (a znode path)?
    pub fn is_entry_path(&self, id: &str) -> bool {
        id.starts_with('/') && id.contains("/_c_")
    }

    /// The session for locks with `ttl`, opened on first use and replaced
    /// once expired.
    async fn session(&self, ttl: Duration) -> Result<Arc<LockSession>> {
        let ttl = ttl.clamp(self.bounds.0, self.bounds.1);
        let mut sessions = self.sessions.lock().await;
        if let Some(s) = sessions.get(&ttl).filter(|s| s.usable()) {
            return Ok(s.clone());
        }
        let client = self.cfg.connect(ttl).await?;
        let granted = client.session_timeout();
        let renewer = Arc::new(ZkRenewer {
            client: client.clone(),
            ops: self.ops.clone(),
        });
        let group = Arc::new(RenewalGroup::spawn(granted, renewer));
        let s = Arc::new(LockSession {
            client,
            ops: self.ops.clone(),
            ttl: granted,
            group,
        });
        sessions.insert(ttl, s.clone());
        Ok(s)
    }

    fn guard(
        &self,
        name: &str,
        path: String,
        czxid: i64,
        sess: Arc<LockSession>,
        sent: Instant,
        turn: LocalTurn,
    ) -> LockGuard {
        let entry = LockEntry {
            name: name.to_string(),
            token: czxid as u64,
            id: path,
        };
        let trigger = sess.group.add(entry.clone(), sent);
        LockGuard::new(entry, trigger, Arc::new(ZkGuardOps { sess }), Some(turn))
    }

    /// Creates this contender's entry `<dir>/_c_<uuid>-lock-<seq>` and arms
    /// its cleanup. A create whose reply was lost (any transport error) is
    /// resolved by looking for the uuid; if the outcome stays unknown, the
    /// cleanup deletes whatever entry carries the uuid.
    async fn create_entry(&self, sess: &LockSession, dir: &str, what: &str) -> Result<Entry> {
        let protected = format!("_c_{}-{LOCK_NAME}", uuid::Uuid::new_v4());
        let prefix = format!("{dir}/{protected}");
        // Requests of one session are served in order, so a cleanup that
        // lists the dir after the create was sent sees the entry if it exists.
        let cleanup = CancelOnDrop::new(delete_by_prefix(
            sess.client.clone(),
            dir.to_string(),
            protected.clone(),
        ));
        let create = zk::CreateMode::EphemeralSequential.with_acls(self.acls);
        let mut attempt = 0u32;
        loop {
            match sess.req().create(&prefix, &[], &create).await {
                Ok((stat, seq)) => {
                    let path = format!("{prefix}{seq}");
                    return Ok(Entry::new(sess, dir, path, stat.czxid, cleanup));
                }
                Err(zk::Error::NoNode) => {
                    // The lock dir: persistent, never a container, so it is
                    // not reaped while waiters use it.
                    sess.req()
                        .mkdir(dir, &zk::CreateMode::Persistent.with_acls(self.acls))
                        .await
                        .map_err(|e| map(e, Kind::Write, what))?;
                }
                Err(e) if is_transport(&e) && attempt < 10 => {
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt)).await;
                    let children = match sess.req().list_children(dir).await {
                        Ok(c) => c,
                        Err(e) if is_transport(&e) => continue,
                        Err(e) => return Err(map(e, Kind::Read, what)),
                    };
                    if let Some(c) = children.into_iter().find(|c| c.starts_with(&protected)) {
                        let path = format!("{dir}/{c}");
                        match sess.req().check_stat(&path).await {
                            Ok(Some(stat)) => {
                                return Ok(Entry::new(sess, dir, path, stat.czxid, cleanup));
                            }
                            Ok(None) => continue,
                            Err(e) if is_transport(&e) => continue,
                            Err(e) => return Err(map(e, Kind::Read, what)),
                        }
                    }
                }
                Err(e) => return Err(map(e, Kind::Write, what)),
            }
        }
    }

    /// Where `entry` stands among the entries of `dir`: `Ok(None)` = it is
    /// first (holds the lock), `Ok(Some(pred))` = the entry just before it.
    /// Also returns when the listing was sent (the session was alive then).
    async fn position(
        &self,
        sess: &LockSession,
        dir: &str,
        own_name: &str,
        what: &str,
    ) -> Result<(Position, Instant)> {
        let mut attempt = 0u32;
        loop {
            let sent = Instant::now();
            match sess.req().list_children(dir).await {
                Ok(children) => {
                    let own = sequence_of(own_name);
                    let mut seqs: Vec<(i64, String)> = children
                        .into_iter()
                        .filter_map(|c| sequence_of(&c).map(|s| (s, c)))
                        .collect();
                    seqs.sort_unstable();
                    return Ok((
                        match seqs.iter().position(|(_, c)| c == own_name) {
                            None => Position::Gone,
                            Some(0) => Position::First,
                            Some(i) if own.is_some() => Position::After(seqs[i - 1].1.clone()),
                            Some(_) => Position::Gone,
                        },
                        sent,
                    ));
                }
                Err(e) if is_transport(&e) => {
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) if is_session_gone(&e) => return Ok((Position::Gone, sent)),
                Err(e) => return Err(map(e, Kind::Read, what)),
            }
        }
    }

    /// Waits for lock `name` (cancel-safe: a dropped wait deletes its entry).
    ///
    /// ZooKeeper's lock recipe, written here rather than taken from
    /// `zookeeper-client`'s `Client::lock`: that one leaves an orphan entry
    /// when a connection reset surfaces as `Error::Custom` (its lost-create
    /// recovery handles only `ConnectionLoss`, and its background cleanup
    /// gives up on the same error), and the orphan then blocks the lock for
    /// the session's lifetime. The layout is the same (Curator's).
    pub async fn lock(&self, name: &str, ttl: Duration) -> Result<LockGuard> {
        let turn = self.local.turn(name).await;
        let dir = self.dir_of(name);
        let what = format!("lock {name:?}");
        'contend: loop {
            let sess = self.session(ttl).await?;
            let entry = match self.create_entry(&sess, &dir, &what).await {
                Ok(e) => e,
                Err(e) if e.is_transient() => continue 'contend,
                Err(e) => return Err(e),
            };
            loop {
                match self.position(&sess, &dir, &entry.name, &what).await? {
                    (Position::First, sent) => {
                        let Entry {
                            path,
                            czxid,
                            cleanup,
                            ..
                        } = entry;
                        cleanup.disarm();
                        return Ok(self.guard(name, path, czxid, sess, sent, turn));
                    }
                    (Position::Gone, _) => {
                        // Deleted behind our back, or the session expired:
                        // contend again with a new entry.
                        continue 'contend;
                    }
                    (Position::After(pred), _) => {
                        // Watch only the predecessor: one waiter wakes per release.
                        let pred = format!("{dir}/{pred}");
                        match sess.req().check_and_watch_stat(&pred).await {
                            Ok((None, _)) => {}
                            Ok((Some(_), watcher)) => {
                                watcher.changed().await;
                            }
                            Err(e) if is_transport(&e) => tokio::time::sleep(backoff(1)).await,
                            Err(e) if is_session_gone(&e) => continue 'contend,
                            Err(e) => return Err(map(e, Kind::Read, &what)),
                        }
                    }
                }
            }
        }
    }

    /// Takes lock `name` if it is free now; never waits.
    pub async fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<LockGuard>> {
        let Some(turn) = self.local.try_turn(name) else {
            return Ok(None);
        };
        let sess = self.session(ttl).await?;
        let dir = self.dir_of(name);
        let what = format!("try_lock {name:?}");
        let entry = self.create_entry(&sess, &dir, &what).await?;
        match self.position(&sess, &dir, &entry.name, &what).await? {
            (Position::First, sent) => {
                let Entry {
                    path,
                    czxid,
                    cleanup,
                    ..
                } = entry;
                cleanup.disarm();
                Ok(Some(self.guard(name, path, czxid, sess, sent, turn)))
            }
            _ => {
                entry.cleanup.run_now().await;
                Ok(None)
            }
        }
    }
}

/// A contender's entry, deleted by `cleanup` unless it becomes a guard.
struct Entry {
    /// Its name in the lock dir.
    name: String,
    path: String,
    czxid: i64,
    cleanup: CancelOnDrop,
}

impl Entry {
    /// The entry at `path`: from now on its cleanup deletes it by path (one
    /// request) instead of searching for it by uuid.
    fn new(
        sess: &LockSession,
        dir: &str,
        path: String,
        czxid: i64,
        by_prefix: CancelOnDrop,
    ) -> Entry {
        by_prefix.disarm();
        Entry {
            name: path[dir.len() + 1..].to_string(),
            cleanup: CancelOnDrop::new(delete_entry(sess.client.clone(), path.clone())),
            path,
            czxid,
        }
    }
}

enum Position {
    First,
    After(String),
    Gone,
}

/// The entry that holds the lock among `children` of a lock dir.
pub(crate) fn holder_of(children: &[String]) -> Option<&str> {
    children
        .iter()
        .filter_map(|c| sequence_of(c).map(|s| (s, c)))
        .min()
        .map(|(_, c)| c.as_str())
}

/// The sequence number of a Curator lock entry (the digits after the last
/// `lock-`), as Curator sorts them.
fn sequence_of(name: &str) -> Option<i64> {
    let i = name.rfind(LOCK_NAME)?;
    name[i + LOCK_NAME.len()..].parse().ok()
}

/// Deletes a lock entry of ours; gone already (or session gone, which
/// deletes it) is fine. Retries transport errors a few times.
async fn delete_entry(client: zk::Client, path: String) {
    let _ = delete_entry_checked(&client, &path).await;
}

async fn delete_entry_checked(client: &zk::Client, path: &str) -> Result<()> {
    let mut attempt = 0u32;
    loop {
        match client.delete(path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => return Ok(()),
            Err(e) if is_session_gone(&e) => return Ok(()),
            Err(e) if is_transport(&e) && attempt < 10 => {
                attempt += 1;
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(e) => {
                return Err(map(
                    e,
                    Kind::Write,
                    &format!("releasing lock entry {path:?}"),
                ))
            }
        }
    }
}

/// Deletes the entry whose name starts with `protected`, if the create
/// whose reply was lost made one.
async fn delete_by_prefix(client: zk::Client, dir: String, protected: String) {
    for attempt in 0..10u32 {
        match client.list_children(&dir).await {
            Ok(children) => {
                if let Some(c) = children.iter().find(|c| c.starts_with(&protected)) {
                    let _ = delete_entry_checked(&client, &format!("{dir}/{c}")).await;
                }
                return;
            }
            Err(e) if is_transport(&e) => tokio::time::sleep(backoff(attempt)).await,
            Err(_) => return,
        }
    }
}

/// One renewal = one `multi` read of every member entry of the session.
struct ZkRenewer {
    client: zk::Client,
    ops: Arc<AtomicU64>,
}

#[async_trait]
impl Renewer for ZkRenewer {
    async fn renew(&self, members: &[LockEntry]) -> Result<RenewOutcome> {
        let mut lost = Vec::new();
        for chunk in members.chunks(RENEW_BATCH) {
            let mut r = self.client.new_multi_reader();
            for e in chunk {
                r.add_get_data(&e.id)
                    .map_err(|e| map(e, Kind::Read, "renewing locks"))?;
            }
            self.ops.fetch_add(1, Ordering::Relaxed);
            match r.commit().await {
                Ok(results) => {
                    for (e, res) in chunk.iter().zip(results) {
                        if let zk::MultiReadResult::Error {
                            err: zk::Error::NoNode,
                        } = res
                        {
                            lost.push(e.id.clone());
                        }
                    }
                }
                Err(e) if is_session_gone(&e) => return Ok(RenewOutcome::lease_lost()),
                Err(e) => return Err(map(e, Kind::Read, "renewing locks")),
            }
        }
        Ok(RenewOutcome {
            lost,
            ..RenewOutcome::alive()
        })
    }
}

struct ZkGuardOps {
    sess: Arc<LockSession>,
}

#[async_trait]
impl GuardOps for ZkGuardOps {
    async fn release(&self, entry: &LockEntry) -> Result<()> {
        self.sess.group.remove(&entry.id);
        self.sess.ops.fetch_add(1, Ordering::Relaxed);
        delete_entry_checked(&self.sess.client, &entry.id).await
    }

    fn abandon(&self, entry: &LockEntry) {
        self.sess.group.abandon(&entry.id);
        let (client, path, ttl) = (self.sess.client.clone(), entry.id.clone(), self.sess.ttl);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(ttl).await;
                    delete_entry(client, path).await;
                });
            }
            Err(_) => tracing::warn!(lock = %entry.name,
                "lock abandoned outside a tokio runtime: it is freed when its session ends"),
        }
    }
}
