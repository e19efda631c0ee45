//! Small pieces shared by the recipes: unique ids, a keep-alive loop for
//! TTL keys, the fenced puts that publish a holder's record, and the
//! guarded deletes that remove a recipe's own records.

use bytes::Bytes;
use futures::future::BoxFuture;
use latchkey_core::{
    Backend, CancelOnDrop, Compare, Error, InFlight, LockGuard, LostTrigger, Op, Result, TxnRequest,
};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// An id unique across processes and calls (no shared state needed): the
/// process id, a per-process counter and a randomly seeded hash of the time.
pub(crate) fn unique_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u64(n);
    format!("{:x}-{:x}-{:016x}", std::process::id(), n, h.finish())
}

/// Keeps something alive every `ttl / 3`: `renew` returns `Ok(true)` while
/// it is still ours, `Ok(false)` once it is gone (then `trigger` fires and
/// the loop ends). Failed renewals are retried; when `ttl` has passed since
/// the *send* time of the last successful renewal, `trigger` fires too —
/// the thing may have expired on the server by then.
pub(crate) fn spawn_keepalive(
    ttl: Duration,
    trigger: LostTrigger,
    mut renew: impl FnMut() -> BoxFuture<'static, Result<bool>> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let period = (ttl / 3).max(Duration::from_millis(1));
        let mut deadline = Instant::now() + ttl;
        let mut next = Instant::now() + period;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.min(deadline)) => {}
                _ = trigger.signal().wait() => return,
            }
            if Instant::now() >= deadline {
                tracing::warn!("recipe lease not renewed before its deadline: lost");
                trigger.fire();
                return;
            }
            let sent = Instant::now();
            match tokio::time::timeout_at(deadline, renew()).await {
                Ok(Ok(true)) => {
                    deadline = sent + ttl;
                    next = sent + period;
                }
                Ok(Ok(false)) => {
                    trigger.fire();
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "recipe lease renewal failed; retrying");
                    next = Instant::now() + (period / 4).max(Duration::from_millis(5));
                }
                Err(_) => {}
            }
        }
    })
}

/// Deletes `key` only while its value is still `value`: removes a record
/// this recipe wrote, never one that has replaced it since.
pub(crate) fn txn_delete_if_value(key: &str, value: Bytes) -> TxnRequest {
    TxnRequest::new()
        .when([Compare::value(key, value)])
        .then([Op::delete(key)])
}

/// Deletes `key` only while `guard` holds (a fenced delete).
pub(crate) fn txn_fenced_delete(guard: &LockGuard, key: &str) -> TxnRequest {
    TxnRequest::new()
        .when([Compare::held(guard)])
        .then([Op::delete(key)])
}

/// Puts `record` at `key` only while `guard` holds (a fenced write), with
/// `ttl` where the key should expire with its writer.
pub(crate) fn txn_fenced_put(
    guard: &LockGuard,
    key: &str,
    record: Bytes,
    ttl: Option<Duration>,
) -> TxnRequest {
    TxnRequest::new()
        .when([Compare::held(guard)])
        .then([match ttl {
            Some(t) => Op::put_with_ttl(key, record, t),
            None => Op::put(key, record),
        }])
}

/// Writes the record a new holder of lock `name` keeps at `key`, fenced by
/// its `guard`. Returns the armed cleanup that deletes the record again
/// (if it is still this one) should the caller be dropped before it
/// disarms it. If the fence fails, the lock was lost before the record
/// was written: the guard is released and the error is
/// [`Error::LockLost`].
pub(crate) async fn publish_owned_record(
    backend: &Arc<dyn Backend>,
    guard: &LockGuard,
    name: &str,
    key: &str,
    record: Bytes,
    ttl: Option<Duration>,
) -> Result<CancelOnDrop> {
    let (out, cleanup) = txn_undoable(
        backend,
        txn_fenced_put(guard, key, record.clone(), ttl),
        key,
        record,
    )
    .await?;
    if !out.succeeded {
        cleanup.disarm();
        let _ = guard.release().await;
        return Err(lock_lost(name));
    }
    Ok(cleanup)
}

/// Runs `txn`, which writes `record` at `key` when it succeeds, and returns
/// its outcome with an armed cleanup that deletes the record again (if it
/// is still this one): disarm it once the record is owned, or when the txn
/// did not write. The txn runs to its answer even if the caller is dropped
/// meanwhile, and the cleanup waits for that answer, since a delete sent
/// earlier could reach the server first. On an error (which may still
/// have written the record) the cleanup runs at once.
pub(crate) async fn txn_undoable(
    backend: &Arc<dyn Backend>,
    txn: TxnRequest,
    key: &str,
    record: Bytes,
) -> Result<(latchkey_core::TxnOutcome, CancelOnDrop)> {
    let requests = InFlight::new();
    let cleanup = requests.undo_on_drop(
        delete_if_value(backend.clone(), key.to_string(), record),
        None,
    );
    let b = backend.clone();
    let out = requests.run(async move { b.txn(txn).await }).await??;
    Ok((out, cleanup))
}

/// [`Error::LockLost`] for the recipe's lock `name`.
pub(crate) fn lock_lost(name: &str) -> Error {
    Error::LockLost {
        name: name.to_string(),
    }
}

/// [`txn_delete_if_value`], best effort: for a cancelled waiter's or a
/// dropped guard's cleanup, where nobody is left to see an error (a record
/// left behind is judged by its lease later).
pub(crate) async fn delete_if_value(backend: Arc<dyn Backend>, key: String, value: Bytes) {
    let _ = backend.txn(txn_delete_if_value(&key, value)).await;
}

/// `[Error::InvalidArgument]` with a message.
pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}
