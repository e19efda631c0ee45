//! Small pieces shared by the recipes: unique ids, the leader record
//! encoding and a keep-alive loop for TTL keys.

use futures::future::BoxFuture;
use latchkey_core::{Error, LostTrigger, Result};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// `[Error::InvalidArgument]` with a message.
pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}
