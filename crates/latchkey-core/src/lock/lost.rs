//! The lease-loss signal: fired once, observed by any number of waiters.

use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;

/// Fires a [`LostSignal`]. Cloning shares the same signal.
#[derive(Clone, Debug)]
pub struct LostTrigger {
    tx: Arc<watch::Sender<bool>>,
}

/// Completes once the lock can no longer be guaranteed (or was released).
#[derive(Clone, Debug)]
pub struct LostSignal {
    rx: watch::Receiver<bool>,
}

impl LostTrigger {
    /// A new, unfired trigger.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        LostTrigger { tx: Arc::new(tx) }
    }
    /// Fires the signal (idempotent).
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }
    /// True once fired.
    pub fn is_fired(&self) -> bool {
        *self.tx.borrow()
    }
    /// A signal observing this trigger.
    pub fn signal(&self) -> LostSignal {
        LostSignal {
            rx: self.tx.subscribe(),
        }
    }
}

impl Default for LostTrigger {
    fn default() -> Self {
        Self::new()
    }
}

impl LostSignal {
    /// True once the signal fired.
    pub fn is_lost(&self) -> bool {
        *self.rx.borrow()
    }
    /// A future that completes when the signal fires. It owns what it needs,
    /// so it can be moved into `select!` or a spawned task.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            // An error means every trigger is gone: nobody can vouch for
            // the lock any more, which is a loss too.
            let _ = rx.wait_for(|lost| *lost).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_once_for_every_observer() {
        let t = LostTrigger::new();
        let (a, b) = (t.signal(), t.signal());
        assert!(!a.is_lost());
        let waiter = tokio::spawn(a.wait());
        t.fire();
        t.fire();
        waiter.await.unwrap();
        assert!(b.is_lost());
        b.wait().await;
    }
}
