//! A counting semaphore: at most N holders of a name at once.
//!
//! The N permits are N ordinary locks, `<name>/slot/0` … `<name>/slot/N-1`,
//! so "never more than N holders" is exactly the backend's mutual
//! exclusion, and each permit inherits everything a lock gives: a fencing
//! token (per slot), `lost()`, renewal, release on drop, expiry of a dead
//! holder after its TTL, and no orphan state when a waiter is cancelled.
//!
//! `acquire` first tries every slot in order without waiting; if all are
//! taken, it queues on **all** slots at once (one `lock()` per slot, which
//! waits without polling) and keeps the first slot it gets, cancelling the
//! other waits. Where the backend's locks are FIFO, every waiter is queued
//! on every slot in arrival order, so the longest-waiting acquirer gets the
//! next freed permit: FIFO among waiters. A newcomer's first `try_lock`
//! pass can still take a slot freed at that instant where the backend
//! hands a released lock to nobody in particular (non-FIFO backends).
//!
//! The permit count is stored in the KV key `<name>/limit`, written by the
//! first acquirer; every acquire checks it, and a caller asking for a
//! different count gets [`Error::InvalidArgument`] instead of silently
//! changing it. The key stays (delete it when no permit is held to change
//! the count).

use crate::util::invalid;
use bytes::Bytes;
use futures::FutureExt;
use latchkey_core::{
    validate, with_wait, Backend, Compare, Error, LockGuard, LockOptions, PutOptions, Result,
};
use std::sync::Arc;
use std::time::Duration;

/// The largest permit count: an acquirer waits on every slot at once.
pub const MAX_PERMITS: usize = 256;

/// Acquires permits of named semaphores on one backend. Cheap to clone.
#[derive(Clone)]
pub struct Semaphore {
    backend: Arc<dyn Backend>,
    ttl: Duration,
    wait: Option<Duration>,
}

impl Semaphore {
    /// Semaphores on `backend`; default permit TTL 15 s, unbounded wait.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Semaphore {
            backend,
            ttl: Duration::from_secs(15),
            wait: None,
        }
    }

    /// Sets the permits' lease TTL (renewed automatically while held; a
    /// dead holder's permit is reclaimed after about this long).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Bounds how long [`acquire`](Self::acquire) waits ([`Error::Timeout`]).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    fn check_args(name: &str, permits: usize) -> Result<()> {
        validate::lock_name(name)?;
        validate::key(&slot_name(name, permits.saturating_sub(1)))?;
        if permits == 0 || permits > MAX_PERMITS {
            return Err(invalid(format!(
                "a semaphore has 1..={MAX_PERMITS} permits, not {permits}"
            )));
        }
        Ok(())
    }

    /// Checks (or records, the first time) the permit count of `name`.
    async fn check_limit(&self, name: &str, permits: usize) -> Result<()> {
        let key = format!("{name}/limit");
        let want = permits.to_string();
        for _ in 0..3 {
            match self.backend.get(&key).await? {
                Some(kv) => {
                    if kv.value.as_ref() == want.as_bytes() {
                        return Ok(());
                    }
                    return Err(invalid(format!(
                        "semaphore {name:?} has {} permits, this caller asked for {permits}",
                        String::from_utf8_lossy(&kv.value)
                    )));
                }
                None => {
                    match self
                        .backend
                        .put(&key, Bytes::from(want.clone()), PutOptions::if_absent())
                        .await
                    {
                        Ok(_) => return Ok(()),
                        // Someone else recorded it first: compare with theirs.
                        Err(Error::Conflict { .. }) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Err(Error::Conflict { key, current: None })
    }

    fn opts(&self) -> LockOptions {
        LockOptions {
            ttl: self.ttl,
            wait: None,
        }
    }

    /// Takes a permit of `name` if one is free now; never waits.
    pub async fn try_acquire(&self, name: &str, permits_total: usize) -> Result<Option<Permit>> {
        Self::check_args(name, permits_total)?;
        validate::ttl(self.ttl)?;
        self.check_limit(name, permits_total).await?;
        self.try_slots(name, permits_total).await
    }

    async fn try_slots(&self, name: &str, permits: usize) -> Result<Option<Permit>> {
        for slot in 0..permits {
            if let Some(g) = self
                .backend
                .try_lock(&slot_name(name, slot), self.opts())
                .await?
            {
                return Ok(Some(Permit::new(g, slot, name)));
            }
        }
        Ok(None)
    }

    /// Waits (without polling; FIFO where locks are) for a permit of
    /// `name`, a semaphore of `permits_total` permits. A different count
    /// than the one recorded for `name` is [`Error::InvalidArgument`].
    /// Dropping the future leaves nothing behind.
    pub async fn acquire(&self, name: &str, permits_total: usize) -> Result<Permit> {
        Self::check_args(name, permits_total)?;
        validate::ttl(self.ttl)?;
        let wait = self.wait;
        with_wait(
            wait,
            || format!("waiting for a permit of semaphore {name:?}"),
            async {
                self.check_limit(name, permits_total).await?;
                // The pass over the slots runs to completion even if this
                // future is dropped meanwhile: a permit it takes is then
                // dropped (released) instead of depending on every
                // adapter's `try_lock` being safe to cancel mid-flight.
                let (me, n) = (self.clone(), name.to_string());
                let first = tokio::spawn(async move { me.try_slots(&n, permits_total).await })
                    .await
                    .map_err(|e| Error::unavailable(self.backend.name(), e))??;
                if let Some(p) = first {
                    return Ok(p);
                }
                let waits = (0..permits_total).map(|slot| {
                    let (backend, lock, opts) =
                        (self.backend.clone(), slot_name(name, slot), self.opts());
                    async move { backend.lock(&lock, opts).await.map(|g| (g, slot)) }.boxed()
                });
                // The first slot granted wins; dropping the other waits
                // cancels them (and releases any granted at the same time).
                let ((guard, slot), _rest) = futures::future::select_ok(waits).await?;
                Ok(Permit::new(guard, slot, name))
            },
        )
        .await
    }
}

fn slot_name(name: &str, slot: usize) -> String {
    format!("{name}/slot/{slot}")
}

/// A held permit. Renewed automatically; released by
/// [`release`](Self::release) or, in the background, on drop.
#[derive(Debug)]
pub struct Permit {
    guard: LockGuard,
    slot: usize,
    name: String,
}

impl Permit {
    fn new(guard: LockGuard, slot: usize, name: &str) -> Self {
        Permit {
            guard,
            slot,
            name: name.to_string(),
        }
    }
    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Which of the N permits this is (`0..N`).
    pub fn slot(&self) -> usize {
        self.slot
    }
    /// The permit's fencing token: strictly increasing across successive
    /// holders of the same slot.
    pub fn fencing_token(&self) -> u64 {
        self.guard.fencing_token()
    }
    /// The compare for fenced writes: true only while this permit is held.
    pub fn fence(&self) -> Compare {
        Compare::held(&self.guard)
    }
    /// The lock guard behind the permit.
    pub fn lock_guard(&self) -> &LockGuard {
        &self.guard
    }
    /// Completes when the permit can no longer be guaranteed, or after release.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.guard.lost()
    }
    /// True once [`lost`](Self::lost) would complete at once.
    pub fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }
    /// Gives the permit back (idempotent).
    pub async fn release(&self) -> Result<()> {
        self.guard.release().await
    }
    /// Stops renewing without releasing, as a crashed holder would: the
    /// permit is reclaimed after its TTL. For tests and demos.
    pub async fn abandon(&self) {
        self.guard.abandon().await
    }
}
