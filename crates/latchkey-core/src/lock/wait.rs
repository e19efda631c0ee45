//! Bounding waits and cleaning up after cancelled ones.

use crate::error::{Error, Result};
use futures::future::BoxFuture;
use std::future::Future;
use std::time::Duration;

/// Runs `fut` for at most `wait` (`None`: unbounded). Running out of time is
/// [`Error::Timeout`] naming `what`.
pub async fn with_wait<T>(
    wait: Option<Duration>,
    what: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match wait {
        None => fut.await,
        Some(w) => match tokio::time::timeout(w, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                what: what(),
                after: w,
            }),
        },
    }
}

/// Runs a cleanup future in the background if dropped while armed. Adapters
/// arm it after creating a waiter entry and disarm it once the entry became a
/// held lock, so a cancelled `lock()` leaves no orphan entry.
pub struct CancelOnDrop {
    // A Mutex makes the guard `Sync`, so a `Send` future may hold it
    // across an `.await` while borrowing it.
    cleanup: std::sync::Mutex<Option<BoxFuture<'static, ()>>>,
}

impl CancelOnDrop {
    /// Arms `cleanup`.
    pub fn new(cleanup: impl Future<Output = ()> + Send + 'static) -> Self {
        CancelOnDrop {
            cleanup: std::sync::Mutex::new(Some(Box::pin(cleanup))),
        }
    }
    /// Drops the cleanup without running it.
    pub fn disarm(self) {
        self.take();
    }
    fn take(&self) -> Option<BoxFuture<'static, ()>> {
        self.cleanup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
    /// Runs the cleanup now and waits for it.
    pub async fn run_now(self) {
        let cleanup = self.take();
        if let Some(c) = cleanup {
            c.await;
        }
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(c);
            } else {
                tracing::warn!("a cancelled lock wait could not clean up: no tokio runtime");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn timeout_is_typed() {
        let r: Result<()> = with_wait(
            Some(Duration::from_millis(10)),
            || "x".into(),
            futures::future::pending(),
        )
        .await;
        assert!(matches!(r, Err(Error::Timeout { .. })));
    }

    #[tokio::test]
    async fn cleanup_runs_on_drop_only_when_armed() {
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        drop(CancelOnDrop::new(async move {
            r.store(true, Ordering::SeqCst);
            let _ = tx.send(());
        }));
        rx.await.unwrap();
        assert!(ran.load(Ordering::SeqCst));
        let r2 = Arc::new(AtomicBool::new(false));
        let r3 = r2.clone();
        CancelOnDrop::new(async move { r3.store(true, Ordering::SeqCst) }).disarm();
        tokio::task::yield_now().await;
        assert!(!r2.load(Ordering::SeqCst));
    }
}
