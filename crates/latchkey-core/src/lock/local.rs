//! A FIFO queue per lock name inside one handle.
//!
//! Backends whose lock entry is keyed by the handle's session or lease (etcd
//! `<name>/<lease>`, a Consul session, a Redis owner id) would let two tasks
//! of one handle "share" a held lock. Every adapter therefore queues its own
//! tasks here first and only the head contends remotely; the remote entry is
//! deleted before the next local task takes over, so each holder gets a new
//! entry and a larger fencing token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// Per-name local queues of one handle.
#[derive(Default, Debug)]
pub struct LocalQueues {
    names: Mutex<Names>,
}

#[derive(Default, Debug)]
struct Names {
    map: HashMap<String, Arc<AsyncMutex<()>>>,
    /// Size after the last prune; pruning again only once the map doubled
    /// keeps the cost per call amortised O(1) with many live names.
    pruned_at: usize,
}

/// The head-of-queue position for one name; dropping it lets the next local
/// task in.
#[derive(Debug)]
pub struct LocalTurn {
    _guard: OwnedMutexGuard<()>,
}

/// A [`LocalTurn`] that a cleanup can keep until it is done: the acquiring
/// call takes it back when it succeeds, a cancelled call's cleanup drops it
/// only after undoing what the call left on the server, so the handle's
/// next task never meets that leftover.
#[derive(Clone, Debug)]
pub struct SharedTurn(Arc<Mutex<Option<LocalTurn>>>);

impl SharedTurn {
    /// Shares `turn`.
    pub fn new(turn: LocalTurn) -> Self {
        SharedTurn(Arc::new(Mutex::new(Some(turn))))
    }

    /// Takes the turn out, if nobody took it yet.
    pub fn take(&self) -> Option<LocalTurn> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl LocalQueues {
    /// Empty queues.
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self, name: &str) -> Arc<AsyncMutex<()>> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        // Forget names nobody holds or waits for, so the map does not grow
        // with every name ever locked.
        if names.map.len() >= 2 * names.pruned_at.max(16) {
            names.map.retain(|_, m| Arc::strong_count(m) > 1);
            names.pruned_at = names.map.len();
        }
        names.map.entry(name.to_string()).or_default().clone()
    }

    /// Waits (FIFO) until this task is the head for `name`. Cancel-safe.
    pub async fn turn(&self, name: &str) -> LocalTurn {
        LocalTurn {
            _guard: self.slot(name).lock_owned().await,
        }
    }

    /// The head position if no other local task has it now.
    pub fn try_turn(&self, name: &str) -> Option<LocalTurn> {
        self.slot(name)
            .try_lock_owned()
            .ok()
            .map(|g| LocalTurn { _guard: g })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_head_per_name() {
        let q = LocalQueues::new();
        let a = q.turn("x").await;
        assert!(q.try_turn("x").is_none());
        assert!(q.try_turn("y").is_some());
        drop(a);
        assert!(q.try_turn("x").is_some());
    }

    #[tokio::test]
    async fn a_shared_turn_is_held_until_taken_and_dropped() {
        let q = LocalQueues::new();
        let shared = SharedTurn::new(q.turn("x").await);
        let kept = shared.clone();
        drop(shared);
        assert!(q.try_turn("x").is_none(), "a clone still holds the turn");
        let t = kept.take().expect("the turn");
        assert!(kept.take().is_none(), "taken once");
        assert!(q.try_turn("x").is_none());
        drop(t);
        assert!(q.try_turn("x").is_some());
    }
}
