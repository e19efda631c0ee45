//! Lease renewal, written once.
//!
//! A [`RenewalGroup`] is one renewal loop for one lease-like thing of a
//! handle: an etcd lease, a Consul session, or "every Redis lock of this
//! handle with this TTL". Each tick it calls the adapter's [`Renewer`] once
//! for all its members, so renewal work grows with the number of distinct
//! TTLs, not with the number of locks.
//!
//! Deadlines are measured from when a request was *sent* (never from when
//! its answer arrived), on the monotonic clock: a member's lock is
//! guaranteed until `sent + ttl` of the last renewal that succeeded. When
//! that passes without a newer success, its `lost()` fires — even while a
//! renewal request is still hanging.

use super::guard::LockEntry;
use super::lost::LostTrigger;
use crate::error::Result;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What one renewal call found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RenewOutcome {
    /// Ids ([`LockEntry::id`]) of members that are no longer held (their
    /// entry vanished or belongs to someone else). Their `lost()` fires.
    pub lost: Vec<String>,
    /// The whole lease is gone (etcd lease expired, Consul session
    /// invalidated): every member is lost and the group is dead.
    pub lease_lost: bool,
    /// The TTL the server granted, if it says (it may differ from the asked one).
    pub ttl: Option<Duration>,
}

impl RenewOutcome {
    /// Everything renewed.
    pub fn alive() -> Self {
        Self::default()
    }
    /// The lease is gone.
    pub fn lease_lost() -> Self {
        RenewOutcome {
            lease_lost: true,
            ..Default::default()
        }
    }
}

/// The adapter's half of renewal.
#[async_trait]
pub trait Renewer: Send + Sync + 'static {
    /// Renews the lease and every entry in `members` in as few requests as
    /// the backend allows. `members` may be empty (a lease with no locks
    /// still needs keeping alive on some backends; others return at once).
    async fn renew(&self, members: &[LockEntry]) -> Result<RenewOutcome>;
}

struct Member {
    entry: LockEntry,
    trigger: LostTrigger,
    deadline: Instant,
    renewing: bool,
}

struct Inner {
    ttl: Duration,
    members: Mutex<HashMap<String, Member>>,
    /// The earliest deadline the loop is sleeping towards; an `add` with a
    /// later deadline need not wake it (so adding n locks costs O(n), not
    /// O(n²) deadline scans).
    next_wake: Mutex<Option<Instant>>,
    dead: AtomicBool,
    changed: Notify,
}

impl Inner {
    fn members(&self) -> std::sync::MutexGuard<'_, HashMap<String, Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One renewal loop; see the module docs. The loop stops when the group is
/// dropped or its lease is lost.
pub struct RenewalGroup {
    inner: Arc<Inner>,
}

impl RenewalGroup {
    /// Starts a loop that renews every `ttl / 3`. `granted_at` is when the
    /// request that created the lease was sent: the lease is safe until
    /// `granted_at + ttl`. Must be called inside a tokio runtime.
    pub fn spawn(ttl: Duration, renewer: Arc<dyn Renewer>) -> Self {
        let inner = Arc::new(Inner {
            ttl,
            members: Mutex::new(HashMap::new()),
            next_wake: Mutex::new(None),
            dead: AtomicBool::new(false),
            changed: Notify::new(),
        });
        tokio::spawn(run(Arc::downgrade(&inner), renewer));
        RenewalGroup { inner }
    }

    /// The TTL this group renews at.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Adds a held lock. `acquired_sent_at` is when the acquiring request
    /// was sent. Returns the trigger that fires its `lost()`.
    pub fn add(&self, entry: LockEntry, acquired_sent_at: Instant) -> LostTrigger {
        let trigger = LostTrigger::new();
        if self.is_dead() {
            trigger.fire();
            return trigger;
        }
        let deadline = acquired_sent_at + self.inner.ttl;
        self.inner.members().insert(
            entry.id.clone(),
            Member {
                entry,
                trigger: trigger.clone(),
                deadline,
                renewing: true,
            },
        );
        let wake = *self
            .inner
            .next_wake
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if wake.is_none_or(|w| deadline < w) {
            self.inner.changed.notify_one();
        }
        trigger
    }

    /// Forgets a released lock.
    pub fn remove(&self, id: &str) {
        self.inner.members().remove(id);
    }

    /// Stops renewing a lock; its `lost()` fires at its current deadline.
    pub fn abandon(&self, id: &str) {
        if let Some(m) = self.inner.members().get_mut(id) {
            m.renewing = false;
        }
        self.inner.changed.notify_one();
    }

    /// Fires `lost()` of a member now (its entry was seen deleted).
    pub fn lose(&self, id: &str) {
        if let Some(m) = self.inner.members().remove(id) {
            m.trigger.fire();
        }
    }

    /// Fires `lost()` of every member now and marks the group dead (the
    /// session or lease was seen to expire: no need to wait for a check).
    pub fn lose_all(&self) {
        self.inner.dead.store(true, Ordering::SeqCst);
        for (_, m) in self.inner.members().drain() {
            m.trigger.fire();
        }
        self.inner.changed.notify_one();
    }

    /// True once the lease is lost; the adapter must start a new group
    /// (and a new lease) for later locks.
    pub fn is_dead(&self) -> bool {
        self.inner.dead.load(Ordering::SeqCst)
    }

    /// Number of locks in the group.
    pub fn len(&self) -> usize {
        self.inner.members().len()
    }

    /// True if the group holds no lock.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for RenewalGroup {
    fn drop(&mut self) {
        self.inner.changed.notify_one();
    }
}

/// Fires and removes every member whose deadline has passed; returns the
/// earliest deadline left.
fn expire_due(inner: &Inner, now: Instant) -> Option<Instant> {
    let mut members = inner.members();
    members.retain(|_, m| {
        if m.deadline <= now {
            tracing::warn!(lock = %m.entry.name, "lock lease not renewed before its deadline: lost");
            m.trigger.fire();
            false
        } else {
            true
        }
    });
    members.values().map(|m| m.deadline).min()
}

async fn run(weak: Weak<Inner>, renewer: Arc<dyn Renewer>) {
    let Some(ttl) = weak.upgrade().map(|i| i.ttl) else {
        return;
    };
    let period = (ttl / 3).max(Duration::from_millis(1));
    let mut next_tick = Instant::now() + period;
    loop {
        // Sleep until the next tick, waking early for a deadline or a change.
        let earliest = {
            let Some(inner) = weak.upgrade() else { return };
            if inner.dead.load(Ordering::SeqCst) {
                return;
            }
            let earliest = expire_due(&inner, Instant::now());
            let wake = earliest.map_or(next_tick, |d| d.min(next_tick));
            *inner.next_wake.lock().unwrap_or_else(|p| p.into_inner()) = Some(wake);
            // Holding `inner` while asleep is fine: dropping the group
            // notifies, and the next upgrade then fails.
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = inner.changed.notified() => { continue; }
            }
            earliest
        };
        let now = Instant::now();
        if now < next_tick {
            // Woken for a deadline, not for a tick.
            let _ = earliest;
            continue;
        }
        let Some(inner) = weak.upgrade() else { return };
        let members: Vec<LockEntry> = inner
            .members()
            .values()
            .filter(|m| m.renewing)
            .map(|m| m.entry.clone())
            .collect();
        let sent = Instant::now();
        // Do not wait for an answer past the earliest deadline: firing
        // lost() on time matters more than the answer.
        let limit = inner
            .members()
            .values()
            .map(|m| m.deadline)
            .min()
            .unwrap_or(sent + ttl)
            .max(sent + Duration::from_millis(1));
        drop(inner);
        let result = tokio::time::timeout_at(limit, renewer.renew(&members)).await;
        let Some(inner) = weak.upgrade() else { return };
        match result {
            Ok(Ok(outcome)) => {
                if outcome.lease_lost {
                    inner.dead.store(true, Ordering::SeqCst);
                    for (_, m) in inner.members().drain() {
                        m.trigger.fire();
                    }
                    return;
                }
                let granted = outcome.ttl.map_or(ttl, |t| t.min(ttl));
                let mut map = inner.members();
                for id in &outcome.lost {
                    if let Some(m) = map.remove(id) {
                        m.trigger.fire();
                    }
                }
                for e in &members {
                    if let Some(m) = map.get_mut(&e.id) {
                        if m.renewing {
                            m.deadline = m.deadline.max(sent + granted);
                        }
                    }
                }
                next_tick = sent + period;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "lease renewal failed; retrying");
                // Retry sooner, but not in a tight loop.
                next_tick = Instant::now() + (period / 4).max(Duration::from_millis(5));
            }
            Err(_) => {
                next_tick = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::AtomicUsize;

    struct Scripted {
        calls: AtomicUsize,
        fail_after: usize,
    }

    #[async_trait]
    impl Renewer for Scripted {
        async fn renew(&self, _m: &[LockEntry]) -> Result<RenewOutcome> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n >= self.fail_after {
                Err(Error::unavailable("test", "down"))
            } else {
                Ok(RenewOutcome::alive())
            }
        }
    }

    fn entry(id: &str) -> LockEntry {
        LockEntry {
            name: "n".into(),
            token: 1,
            id: id.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_keeps_alive_then_failure_fires_lost_at_deadline() {
        let r = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            fail_after: 10,
        });
        let g = RenewalGroup::spawn(Duration::from_secs(3), r.clone());
        let t = g.add(entry("a"), Instant::now());
        let sig = t.signal();
        let start = Instant::now();
        sig.wait().await;
        let held_for = start.elapsed();
        // 10 good renewals at 1 s intervals, then the deadline of the last one (+3 s).
        assert!(held_for >= Duration::from_secs(12), "{held_for:?}");
        assert!(held_for <= Duration::from_secs(14), "{held_for:?}");
        assert!(g.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_member_expires_others_live() {
        let r = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            fail_after: usize::MAX,
        });
        let g = RenewalGroup::spawn(Duration::from_secs(3), r);
        let a = g.add(entry("a"), Instant::now()).signal();
        let b = g.add(entry("b"), Instant::now()).signal();
        g.abandon("a");
        a.wait().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!b.is_lost());
    }

    struct LeaseGone;
    #[async_trait]
    impl Renewer for LeaseGone {
        async fn renew(&self, _m: &[LockEntry]) -> Result<RenewOutcome> {
            Ok(RenewOutcome::lease_lost())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lease_loss_fires_all_and_kills_group() {
        let g = RenewalGroup::spawn(Duration::from_secs(3), Arc::new(LeaseGone));
        let a = g.add(entry("a"), Instant::now()).signal();
        let b = g.add(entry("b"), Instant::now()).signal();
        a.wait().await;
        b.wait().await;
        assert!(g.is_dead());
        assert!(g.add(entry("c"), Instant::now()).is_fired());
    }

    #[tokio::test(start_paused = true)]
    async fn lose_all_fires_at_once_and_many_adds_stay_cheap() {
        let r = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            fail_after: usize::MAX,
        });
        let g = RenewalGroup::spawn(Duration::from_secs(3), r);
        let signals: Vec<_> = (0..10_000)
            .map(|i| g.add(entry(&i.to_string()), Instant::now()).signal())
            .collect();
        assert_eq!(g.len(), 10_000);
        g.lose_all();
        for s in &signals {
            assert!(s.is_lost());
        }
        assert!(g.is_dead() && g.is_empty());
    }
}
