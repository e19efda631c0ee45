//! [`LockGuard`]: what `lock()` returns. Written once; adapters plug in
//! their release and abandon operations through [`GuardOps`].

use super::local::LocalTurn;
use super::lost::{LostSignal, LostTrigger};
use crate::error::Result;
use async_trait::async_trait;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::Mutex;

/// Identifies one holding of a lock: what fenced writes compare against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LockEntry {
    /// The lock's name as the user gave it.
    pub name: String,
    /// The fencing token: strictly increasing across successive holders.
    pub token: u64,
    /// The backend's identity of this holding (etcd key, znode path, Redis
    /// owner id, Consul session, ...). Opaque to callers.
    pub id: String,
}

/// What an adapter does for a guard.
#[async_trait]
pub trait GuardOps: Send + Sync + 'static {
    /// Releases the entry if (and only if) it is still this holding's: never
    /// someone else's. Releasing an entry that is already gone is `Ok`.
    async fn release(&self, entry: &LockEntry) -> Result<()>;

    /// Stops keeping the entry alive without releasing it, as if the holder
    /// had died: it expires after its TTL and `lost()` fires then.
    fn abandon(&self, entry: &LockEntry);
}

enum State {
    Held,
    Released,
    Abandoned,
}

/// A held lock. Renewed automatically while it lives; released by
/// [`release`](LockGuard::release) or, in the background, on drop.
///
/// A holder must stop work that relies on the lock when
/// [`lost`](LockGuard::lost) completes, and should make its writes fenced with
/// [`Compare::held`](crate::Compare::held) so that even a paused holder can
/// never overwrite its successor's work.
pub struct LockGuard {
    entry: LockEntry,
    lost: LostSignal,
    trigger: LostTrigger,
    ops: Arc<dyn GuardOps>,
    state: Arc<Mutex<State>>,
    local: Arc<std::sync::Mutex<Option<LocalTurn>>>,
}

impl LockGuard {
    /// A guard for `entry`. `trigger` fires when the holding is lost (the
    /// adapter's renewal group or session watcher holds a clone); `local` is
    /// the handle's local queue position, given up after release.
    pub fn new(
        entry: LockEntry,
        trigger: LostTrigger,
        ops: Arc<dyn GuardOps>,
        local: Option<LocalTurn>,
    ) -> Self {
        LockGuard {
            lost: trigger.signal(),
            entry,
            trigger,
            ops,
            state: Arc::new(Mutex::new(State::Held)),
            local: Arc::new(std::sync::Mutex::new(local)),
        }
    }

    /// The fencing token: strictly greater than every earlier holder's.
    pub fn fencing_token(&self) -> u64 {
        self.entry.token
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// The holding's identity, for fenced writes.
    pub fn entry(&self) -> &LockEntry {
        &self.entry
    }

    /// Completes when the lock can no longer be guaranteed: renewal failed
    /// up to the TTL deadline, the session expired, the entry was deleted
    /// behind our back — or the guard was released.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.lost.wait()
    }

    /// True once [`lost`](LockGuard::lost) would complete at once.
    pub fn is_lost(&self) -> bool {
        self.lost.is_lost()
    }

    /// Releases the lock. Idempotent: a second call, or a call after the
    /// lock was lost, is `Ok` and releases nobody else's lock.
    pub async fn release(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        if let State::Held = *state {
            self.ops.release(&self.entry).await?;
            *state = State::Released;
            self.trigger.fire();
            self.local.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        Ok(())
    }

    /// Stops renewing the lock without releasing it, as a crashed holder
    /// would. The lock expires after its TTL; `lost()` fires then. Used to
    /// test expiry; also for handing a lock's remaining lifetime to nobody.
    pub async fn abandon(&self) {
        let mut state = self.state.lock().await;
        if let State::Held = *state {
            self.ops.abandon(&self.entry);
            *state = State::Abandoned;
            // Local waiters may contend remotely now: the remote entry
            // decides who gets the lock next.
            self.local.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let Ok(state) = self.state.try_lock() else {
            return;
        };
        if !matches!(*state, State::Held) {
            return;
        }
        drop(state);
        let (ops, entry, trigger, local) = (
            self.ops.clone(),
            self.entry.clone(),
            self.trigger.clone(),
            self.local.clone(),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = ops.release(&entry).await {
                        tracing::warn!(lock = %entry.name, error = %e,
                            "releasing a dropped lock guard failed; the lock expires after its TTL");
                    }
                    trigger.fire();
                    local.lock().unwrap_or_else(|p| p.into_inner()).take();
                });
            }
            Err(_) => {
                ops.abandon(&entry);
                tracing::warn!(lock = %entry.name,
                    "lock guard dropped outside a tokio runtime; the lock expires after its TTL");
            }
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.entry.name)
            .field("token", &self.entry.token)
            .field("lost", &self.is_lost())
            .finish()
    }
}
