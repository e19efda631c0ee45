//! Locks: `SET PX` with a random owner id and a fencing token from the
//! lock's own counter, in one script, for the head of the lock's FIFO queue;
//! release by compare-and-delete that wakes the next waiter only; renewal
//! of every lock of one TTL in one script call per tick through core's
//! [`RenewalGroup`]. See the `ACQUIRE` script for the queue's rules.

use crate::backend::{ttl_ms, RedisBackend, Shared};
use crate::conn::{Retry, Target};
use crate::notify::Subscription;
use crate::scripts::scripts;
use async_trait::async_trait;
use latchkey_core::lock::local::LocalTurn;
use latchkey_core::{
    validate, CancelOnDrop, DistributedLock, Error, GuardOps, LockEntry, LockGuard, LockOptions,
    RenewOutcome, RenewalGroup, Renewer, Result,
};
use rand::Rng;
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;
use tokio::time::Instant;

enum Attempt {
    Acquired(u64),
    /// Not ours (yet); try again after at most this long, or when notified.
    Wait(Duration),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Queue up if the lock is not ours.
    Wait,
    /// Never queue.
    Try,
}

/// How often a waiter renews its place in the queue, at most: its lease
/// is twice this, so a waiter that crashed without leaving holds up the
/// queue for at most that long (locks with a shorter TTL use their TTL).
const MAX_WAITER_REFRESH: Duration = Duration::from_secs(10);

fn new_owner() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn attempt(
    shared: &Shared,
    name: &str,
    owner: &str,
    ttl_ms: u64,
    mode: Mode,
) -> Result<Attempt> {
    let l = &shared.layout;
    let keys = [
        l.lock(name),
        l.fence(name),
        l.queue(name),
        l.waiters(name),
        l.qseq(),
    ];
    let channels = l.released(name);
    let mode = if mode == Mode::Wait { "w" } else { "t" };
    let refresh = ttl_ms.min(MAX_WAITER_REFRESH.as_millis() as u64);
    let (ok, n): (i64, i64) = shared
        .conn
        .run(Retry::Safe, "lock", |mut c| {
            let mut inv = scripts().acquire.prepare_invoke();
            inv.key(&keys[..])
                .arg(owner)
                .arg(ttl_ms)
                .arg(mode)
                .arg(&channels)
                .arg(refresh);
            async move { inv.invoke_async(&mut c).await }
        })
        .await?;
    Ok(if ok == 1 {
        Attempt::Acquired(n as u64)
    } else {
        Attempt::Wait(Duration::from_millis(n.max(0) as u64))
    })
}

async fn release(shared: &Shared, name: &str, owner: &str) -> Result<()> {
    let keys = [shared.layout.lock(name), shared.layout.queue(name)];
    let channels = shared.layout.released(name);
    let _: i64 = shared
        .conn
        .run(Retry::Safe, "unlock", |mut c| {
            let mut inv = scripts().release.prepare_invoke();
            inv.key(&keys[..]).arg(owner).arg(&channels);
            async move { inv.invoke_async(&mut c).await }
        })
        .await?;
    Ok(())
}

/// A waiter giving up: leave the queue (see the `leave` script).
async fn leave(shared: &Shared, name: &str, owner: &str) -> Result<()> {
    let l = &shared.layout;
    let keys = [l.lock(name), l.queue(name), l.waiters(name)];
    let channels = l.released(name);
    let _: i64 = shared
        .conn
        .run(Retry::Safe, "leave lock queue", |mut c| {
            let mut inv = scripts().leave.prepare_invoke();
            inv.key(&keys[..]).arg(owner).arg(&channels);
            async move { inv.invoke_async(&mut c).await }
        })
        .await?;
    Ok(())
}

impl RedisBackend {
    /// The renewal group for `ttl`, started on first use.
    fn group(&self, ttl: Duration) -> Arc<RenewalGroup> {
        let mut groups = self
            .shared
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(g) = groups.get(&ttl).filter(|g| !g.is_dead()) {
            return g.clone();
        }
        let renewer = Arc::new(RedisRenewer {
            shared: Arc::downgrade(&self.shared),
            ttl_ms: ttl_ms(ttl),
        });
        let g = Arc::new(RenewalGroup::spawn(ttl, renewer));
        groups.insert(ttl, g.clone());
        g
    }

    fn make_guard(
        &self,
        name: &str,
        owner: String,
        token: u64,
        ttl: Duration,
        sent: Instant,
        turn: LocalTurn,
    ) -> LockGuard {
        let entry = LockEntry {
            name: name.to_string(),
            token,
            id: owner,
        };
        let group = self.group(ttl);
        // The server's expiry runs from when it executed the script, which
        // is after `sent`: the guard never outlives the key.
        let trigger = group.add(entry.clone(), sent);
        let ops = Arc::new(RedisGuardOps {
            shared: self.shared.clone(),
            group,
        });
        LockGuard::new(entry, trigger, ops, Some(turn))
    }

    async fn acquire(&self, name: &str, ttl: Duration) -> Result<LockGuard> {
        // Tasks of this handle queue locally first, so each remote holding
        // (and each remote queue entry) belongs to exactly one task.
        let turn = self.shared.local.turn(name).await;
        let owner = new_owner();
        let ms = ttl_ms(ttl);
        // Armed until the guard is made: if this future is dropped
        // (cancelled, `wait` ran out), the queue entry goes, and a holding
        // that an attempt in flight may have created is released.
        let cleanup = {
            let (shared, n, o) = (self.shared.clone(), name.to_string(), owner.clone());
            CancelOnDrop::new(async move {
                let _ = leave(&shared, &n, &o).await;
            })
        };
        let mut sub: Option<Subscription> = None;
        // A waiter rides out a short outage (a server restart) for up to
        // one timeout, counted from the first failure in a row.
        let mut failing_since: Option<Instant> = None;
        loop {
            if let Some(s) = sub.as_mut() {
                s.mark_seen();
            }
            let sent = Instant::now();
            let outcome = match attempt(&self.shared, name, &owner, ms, Mode::Wait).await {
                Err(e) if e.is_transient() && sub.is_some() => {
                    let since = *failing_since.get_or_insert(sent);
                    if since.elapsed() < self.shared.conn.timeout() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    return Err(e);
                }
                r => r?,
            };
            failing_since = None;
            match outcome {
                Attempt::Acquired(token) => {
                    cleanup.disarm();
                    return Ok(self.make_guard(name, owner, token, ttl, sent, turn));
                }
                Attempt::Wait(bound) => match sub.as_mut() {
                    // Subscribe before the next attempt, so a turn given
                    // between that attempt and the wait still wakes us.
                    None => {
                        let channel = format!("{}{owner}", self.shared.layout.released(name));
                        sub = Some(self.shared.notifier.subscribe(&channel).await?)
                    }
                    Some(s) => {
                        tokio::select! {
                            _ = s.changed() => {}
                            _ = tokio::time::sleep(bound) => {}
                        }
                        s.refresh().await?;
                    }
                },
            }
        }
    }

    /// Deletes lock `name` of this namespace whoever holds it, as an
    /// operator running `DEL` on its key would, and wakes its waiters. The
    /// holder's `lost()` fires at its next renewal. Returns whether it was
    /// held. A fault hook for tests: it blocks the calling thread for one
    /// round trip on a connection of its own (so it also works where no
    /// async runtime is at hand).
    pub fn revoke_lock(&self, name: &str) -> Result<bool> {
        validate::lock_name(name)?;
        let timeout = self.shared.conn.timeout();
        let map = |e: redis::RedisError| crate::conn::map_err(&e);
        match self.shared.conn.target() {
            Target::Single(client) => {
                let mut con = client.get_connection_with_timeout(timeout).map_err(map)?;
                let _ = con.set_read_timeout(Some(timeout));
                revoke(&self.shared.layout, name, &mut con).map_err(map)
            }
            Target::Cluster(c) => {
                let mut con = c.sync_connection().map_err(map)?;
                revoke(&self.shared.layout, name, &mut con).map_err(map)
            }
        }
    }

    /// Number of release channels this handle listens on: one per lock
    /// name that has a waiter. Tests use it to show that a cancelled waiter
    /// leaves nothing behind.
    pub fn waiting_channels(&self) -> usize {
        self.shared.notifier.channel_count()
    }
}

#[async_trait]
impl DistributedLock for RedisBackend {
    async fn lock(&self, name: &str, opts: LockOptions) -> Result<LockGuard> {
        validate::lock_name(name)?;
        validate::ttl(opts.ttl)?;
        let what = || format!("waiting for lock {name:?} on redis");
        if opts.wait == Some(Duration::ZERO) {
            // "Try once": one attempt, however long its round trip takes.
            return match self.try_lock(name, opts.clone()).await? {
                Some(g) => Ok(g),
                None => Err(Error::Timeout {
                    what: what(),
                    after: Duration::ZERO,
                }),
            };
        }
        let ttl = Duration::from_millis(ttl_ms(opts.ttl));
        latchkey_core::with_wait(opts.wait, what, self.acquire(name, ttl)).await
    }

    async fn try_lock(&self, name: &str, opts: LockOptions) -> Result<Option<LockGuard>> {
        validate::lock_name(name)?;
        validate::ttl(opts.ttl)?;
        let Some(turn) = self.shared.local.try_turn(name) else {
            return Ok(None);
        };
        let owner = new_owner();
        let ttl = Duration::from_millis(ttl_ms(opts.ttl));
        let sent = Instant::now();
        // If this future is dropped while the attempt is in flight, a
        // holding it may have created is released.
        let cleanup = {
            let (shared, n, o) = (self.shared.clone(), name.to_string(), owner.clone());
            CancelOnDrop::new(async move {
                let _ = release(&shared, &n, &o).await;
            })
        };
        let r = attempt(&self.shared, name, &owner, ttl_ms(ttl), Mode::Try).await;
        cleanup.disarm();
        match r? {
            Attempt::Acquired(token) => {
                Ok(Some(self.make_guard(name, owner, token, ttl, sent, turn)))
            }
            Attempt::Wait(_) => Ok(None),
        }
    }
}

/// `DEL` of the lock key, then the `leave` script so the head of the queue
/// learns that the lock is free (nobody owns "").
fn revoke(
    l: &crate::layout::Layout,
    name: &str,
    con: &mut impl redis::ConnectionLike,
) -> redis::RedisResult<bool> {
    let deleted: i64 = redis::cmd("DEL").arg(l.lock(name)).query(con)?;
    let _: i64 = scripts()
        .leave
        .key(l.lock(name))
        .key(l.queue(name))
        .key(l.waiters(name))
        .arg("")
        .arg(l.released(name))
        .invoke(con)?;
    Ok(deleted == 1)
}

/// Renews every lock of one handle with one TTL in one script call.
struct RedisRenewer {
    shared: Weak<Shared>,
    ttl_ms: u64,
}

#[async_trait]
impl Renewer for RedisRenewer {
    async fn renew(&self, members: &[LockEntry]) -> Result<RenewOutcome> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(RenewOutcome::lease_lost());
        };
        if members.is_empty() {
            return Ok(RenewOutcome::alive());
        }
        let keys: Vec<String> = members
            .iter()
            .map(|m| shared.layout.lock(&m.name))
            .collect();
        let gone: Vec<usize> = shared
            .conn
            .run(Retry::Safe, "renew locks", |mut c| {
                let mut inv = scripts().renew.prepare_invoke();
                inv.key(&keys[..]).arg(self.ttl_ms);
                for m in members {
                    inv.arg(&m.id);
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(RenewOutcome {
            lost: gone
                .into_iter()
                .filter_map(|n| members.get(n.wrapping_sub(1)).map(|m| m.id.clone()))
                .collect(),
            ..RenewOutcome::alive()
        })
    }
}

struct RedisGuardOps {
    shared: Arc<Shared>,
    group: Arc<RenewalGroup>,
}

#[async_trait]
impl GuardOps for RedisGuardOps {
    async fn release(&self, entry: &LockEntry) -> Result<()> {
        self.group.remove(&entry.id);
        release(&self.shared, &entry.name, &entry.id).await
    }

    fn abandon(&self, entry: &LockEntry) {
        self.group.abandon(&entry.id);
    }
}
