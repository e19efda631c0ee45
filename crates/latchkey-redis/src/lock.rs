//! Locks: `SET NX PX` with a random owner id and a fencing token from the
//! lock's own counter, in one script; release by compare-and-delete that
//! publishes a wake-up; renewal of every lock of one TTL in one script call
//! per tick through core's [`RenewalGroup`].

use crate::backend::{ttl_ms, RedisBackend, Shared};
use crate::conn::Retry;
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

/// How long a waiter waits for a holder whose key has no expiry (a foreign
/// client's `SET` without `PX`) before it looks again. Our own locks always
/// have a PTTL, which bounds the wait instead.
const NO_TTL_RECHECK: Duration = Duration::from_secs(1);

enum Attempt {
    Acquired(u64),
    /// Someone else holds it; their key expires in this many ms (-1: never,
    /// -2: it just vanished).
    Held(i64),
}

fn new_owner() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long to wait for a release notification before looking again: the
/// holder's remaining PTTL (an expiry publishes nothing).
fn wait_bound(pttl: i64) -> Duration {
    match pttl {
        p if p >= 0 => Duration::from_millis(p as u64 + 1),
        -1 => NO_TTL_RECHECK,
        _ => Duration::ZERO,
    }
}

async fn attempt(shared: &Shared, name: &str, owner: &str, ttl_ms: u64) -> Result<Attempt> {
    let keys = [shared.layout.lock(name), shared.layout.fence(name)];
    let (ok, n): (i64, i64) = shared
        .conn
        .run(Retry::Safe, "lock", |mut c| {
            let mut inv = scripts().acquire.prepare_invoke();
            inv.key(&keys[..]).arg(owner).arg(ttl_ms);
            async move { inv.invoke_async(&mut c).await }
        })
        .await?;
    Ok(if ok == 1 {
        Attempt::Acquired(n as u64)
    } else {
        Attempt::Held(n)
    })
}

async fn release(shared: &Shared, name: &str, owner: &str) -> Result<()> {
    let key = shared.layout.lock(name);
    let channel = shared.layout.released(name);
    let _: i64 = shared
        .conn
        .run(Retry::Safe, "unlock", |mut c| {
            let mut inv = scripts().release.prepare_invoke();
            inv.key(&key).arg(owner).arg(&channel);
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

    /// One acquisition attempt that cannot leave an orphan: if the caller
    /// drops it while the script is in flight, the holding it may have
    /// created is released in the background.
    async fn attempt_once(&self, name: &str, owner: &str, ttl_ms: u64) -> Result<Attempt> {
        let shared = self.shared.clone();
        let (n, o) = (name.to_string(), owner.to_string());
        let cleanup = CancelOnDrop::new(async move {
            let _ = release(&shared, &n, &o).await;
        });
        let r = attempt(&self.shared, name, owner, ttl_ms).await;
        cleanup.disarm();
        r
    }

    async fn acquire(&self, name: &str, ttl: Duration) -> Result<LockGuard> {
        // Tasks of this handle queue locally first, so each remote holding
        // belongs to exactly one guard.
        let turn = self.shared.local.turn(name).await;
        let owner = new_owner();
        let ms = ttl_ms(ttl);
        let mut sub: Option<Subscription> = None;
        // A waiter rides out a short outage (a server restart) for up to
        // one timeout, counted from the first failure in a row.
        let mut failing_since: Option<Instant> = None;
        loop {
            if let Some(s) = sub.as_mut() {
                s.mark_seen();
            }
            let sent = Instant::now();
            let outcome = match self.attempt_once(name, &owner, ms).await {
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
                    return Ok(self.make_guard(name, owner, token, ttl, sent, turn))
                }
                Attempt::Held(pttl) => match sub.as_mut() {
                    // Subscribe before the next attempt, so a release
                    // between that attempt and the wait still wakes us.
                    None => {
                        sub = Some(
                            self.shared
                                .notifier
                                .subscribe(&self.shared.layout.released(name))
                                .await?,
                        )
                    }
                    Some(s) => {
                        tokio::select! {
                            _ = s.changed() => {}
                            _ = tokio::time::sleep(wait_bound(pttl)) => {}
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
        let mut con = self
            .shared
            .conn
            .client()
            .get_connection_with_timeout(timeout)
            .map_err(|e| crate::conn::map_err(&e))?;
        let _ = con.set_read_timeout(Some(timeout));
        let (deleted, _): (i64, i64) = redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.shared.layout.lock(name))
            .cmd("PUBLISH")
            .arg(self.shared.layout.released(name))
            .arg("revoked")
            .query(&mut con)
            .map_err(|e| crate::conn::map_err(&e))?;
        Ok(deleted == 1)
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
        match self.attempt_once(name, &owner, ttl_ms(ttl)).await? {
            Attempt::Acquired(token) => {
                Ok(Some(self.make_guard(name, owner, token, ttl, sent, turn)))
            }
            Attempt::Held(_) => Ok(None),
        }
    }
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
