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
    /// Runs the cleanup now and waits for it. It runs on its own task, so
    /// dropping this call's future does not cut it short.
    pub async fn run_now(self) {
        let cleanup = self.take();
        if let Some(c) = cleanup {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let _ = rt.spawn(c).await;
                }
                Err(_) => c.await,
            }
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

/// The requests of one acquisition that may still change server state.
///
/// Dropping a request future mid-flight does not stop the server from
/// applying it, and a cleanup sent at drop time may overtake it (another
/// connection, another member, a retry still under way). An adapter runs
/// each such request through [`InFlight::run`], which carries it to its
/// answer on its own task, and has its [`CancelOnDrop`] cleanup await
/// [`InFlight::settled`] first: the cleanup then sees whatever the
/// requests did. Holding the handle's local turn until the cleanup is done
/// keeps the handle's next task from meeting the leftover.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use latchkey_core::InFlight;
/// let requests = InFlight::new();
/// let answer = requests.run(async { 7 }).await.unwrap();
/// assert_eq!(answer, 7);
/// requests.settled().await; // nothing is in flight any more
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct InFlight {
    count: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new()
    }
}

impl InFlight {
    /// No request in flight.
    pub fn new() -> Self {
        InFlight {
            count: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Runs `request` to its answer on its own task, even if this call is
    /// dropped meanwhile, and returns the answer.
    ///
    /// # Errors
    /// [`Error::Unavailable`] (backend `latchkey`) if the request panicked
    /// or the runtime is shutting down.
    pub async fn run<T, R>(&self, request: R) -> Result<T>
    where
        T: Send + 'static,
        R: Future<Output = T> + Send + 'static,
    {
        /// Counts the request as settled however its task ends.
        struct Done(std::sync::Arc<tokio::sync::watch::Sender<usize>>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.send_modify(|n| *n = n.saturating_sub(1));
            }
        }
        self.count.send_modify(|n| *n += 1);
        let done = Done(self.count.clone());
        let task = tokio::spawn(async move {
            let _done = done;
            request.await
        });
        task.await.map_err(|_| {
            Error::unavailable("latchkey", "a lock request's task ended without an answer")
        })
    }

    /// The cleanup of an acquisition whose requests run here: should it be
    /// dropped while armed, it waits until every request has answered,
    /// runs `undo`, and only then gives up `turn` (if any).
    pub fn undo_on_drop(
        &self,
        undo: impl Future<Output = ()> + Send + 'static,
        turn: Option<&crate::lock::local::SharedTurn>,
    ) -> CancelOnDrop {
        let (requests, turn) = (self.clone(), turn.cloned());
        CancelOnDrop::new(async move {
            requests.settled().await;
            undo.await;
            drop(turn.and_then(|t| t.take()));
        })
    }

    /// Waits until no request started by [`run`](Self::run) is in flight.
    pub async fn settled(&self) {
        let mut rx = self.count.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
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

    #[tokio::test]
    async fn in_flight_requests_outlive_their_caller_and_settle_after() {
        let requests = InFlight::new();
        let (ans_tx, ans_rx) = tokio::sync::oneshot::channel::<u32>();
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<u32>();
        let r = requests.clone();
        let caller = tokio::spawn(async move {
            r.run(async move {
                let v = ans_rx.await.unwrap_or(0);
                let _ = seen_tx.send(v);
                v
            })
            .await
        });
        tokio::task::yield_now().await;
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        // The caller is gone but the request is not: settled() waits for it.
        let settled = tokio::spawn({
            let r = requests.clone();
            async move { r.settled().await }
        });
        tokio::task::yield_now().await;
        assert!(
            !settled.is_finished(),
            "settled before the request answered"
        );
        ans_tx.send(9).unwrap();
        assert_eq!(seen_rx.await.unwrap(), 9, "the request ran to its answer");
        settled.await.unwrap();
        // A panicking request is an error, and settles too.
        let err = requests.run(async { panic!("boom") }).await;
        assert!(matches!(err, Err::<(), _>(Error::Unavailable { .. })));
        requests.settled().await;
    }

    #[tokio::test]
    async fn undo_waits_for_the_requests_and_gives_up_the_turn_last() {
        use crate::lock::local::{LocalQueues, SharedTurn};
        let q = Arc::new(LocalQueues::new());
        let turn = SharedTurn::new(q.turn("x").await);
        let requests = InFlight::new();
        let (ans_tx, ans_rx) = tokio::sync::oneshot::channel::<()>();
        let (undone_tx, undone_rx) = tokio::sync::oneshot::channel::<(bool, bool)>();
        let answered = Arc::new(AtomicBool::new(false));
        let caller = tokio::spawn({
            let (requests, answered) = (requests.clone(), answered.clone());
            async move {
                requests
                    .run(async move {
                        let ok = ans_rx.await.is_ok();
                        answered.store(true, Ordering::SeqCst);
                        ok
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        let q2 = q.clone();
        let cleanup = requests.undo_on_drop(
            async move {
                // The request has answered, and the turn is still held.
                let _ =
                    undone_tx.send((answered.load(Ordering::SeqCst), q2.try_turn("x").is_none()));
            },
            Some(&turn),
        );
        drop(turn);
        drop(cleanup);
        tokio::task::yield_now().await;
        assert!(
            q.try_turn("x").is_none(),
            "the turn was given up before the undo"
        );
        ans_tx.send(()).unwrap();
        assert!(caller.await.unwrap().unwrap(), "the request answered");
        let (after_answer, turn_held) = undone_rx.await.unwrap();
        assert!(after_answer, "the undo ran before the request answered");
        assert!(turn_held, "the undo ran after the turn was given up");
        // Then the turn is free.
        let _next = tokio::time::timeout(Duration::from_secs(5), q.turn("x"))
            .await
            .expect("the turn is given up after the undo");
    }

    #[tokio::test]
    async fn run_now_finishes_even_if_its_caller_is_dropped() {
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let c = CancelOnDrop::new(async move {
            let _ = go_rx.await;
            let _ = done_tx.send(());
        });
        let caller = tokio::spawn(c.run_now());
        tokio::task::yield_now().await;
        caller.abort();
        let _ = caller.await;
        go_tx.send(()).unwrap();
        done_rx.await.expect("the cleanup ran to its end");
    }
}
