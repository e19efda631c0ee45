//! Watches: native etcd watches that survive reconnects and leader changes
//! by resuming from the last revision seen + 1.

use crate::conn::{classify, map_read, Fault, Shared};
use bytes::Bytes;
use etcd_client::{EventType, GetOptions, WatchOptions};
use futures::StreamExt;
use latchkey_core::{validate, Error, EventKind, Result, Revision, WatchEvent, WatchStream};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The store's revision as of now: the header of a linearizable read, which
/// covers every write that completed before it. A watch created without a
/// start revision would instead start at the revision the *member* has
/// applied, and a lagging follower would replay writes that completed
/// before `watch()` was called.
async fn now(sh: &Shared, key: &str) -> Result<i64> {
    let resp = sh
        .read(|mut c| {
            let key = key.to_string();
            async move { c.get(key, Some(GetOptions::new().with_count_only())).await }
        })
        .await?;
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// Opens one etcd watch on the prefix `key` from revision `start` and waits
/// for its `created` answer.
async fn open(sh: &Shared, key: &str, start: i64) -> Result<etcd_client::WatchStream> {
    let o = WatchOptions::new().with_prefix().with_start_revision(start);
    let mut c = sh.req();
    let mut s = c.watch(key, Some(o)).await.map_err(map_read)?;
    // The first answer is the creation (or the refusal) of the watch.
    let first = tokio::time::timeout(sh.timeout, s.message())
        .await
        .map_err(|_| Error::unavailable(crate::BACKEND, "no answer to a watch request"))?
        .map_err(map_read)?
        .ok_or_else(|| Error::unavailable(crate::BACKEND, "the watch stream closed at once"))?;
    if first.canceled() {
        if first.compact_revision() > 0 {
            return Err(Error::Compacted {
                oldest: first.compact_revision() as u64,
            });
        }
        return Err(Error::unavailable(
            crate::BACKEND,
            format!("watch refused: {}", first.cancel_reason()),
        ));
    }
    Ok(s)
}

pub(crate) async fn watch(
    sh: Arc<Shared>,
    prefix: &str,
    from: Option<Revision>,
) -> Result<WatchStream> {
    validate::prefix(prefix)?;
    let key = sh.layout.kv(prefix);
    let start = match from {
        Some(r) => i64::try_from(r.max(1)).unwrap_or(i64::MAX),
        None => now(&sh, &key).await? + 1,
    };
    // Opened before returning, so that every write after `watch()` returns
    // is seen.
    let stream = match open(&sh, &key, start).await {
        Ok(x) => x,
        // A compacted start is reported in the stream, as its only item.
        Err(e @ Error::Compacted { .. }) => {
            return Ok(futures::stream::once(async move { Err(e) }).boxed())
        }
        Err(e) => return Err(e),
    };
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(run(sh, key, stream, start, tx));
    Ok(tokio_stream_from(rx))
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Result<WatchEvent>>) -> WatchStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// Pumps events into `tx` until the receiver is dropped or a final error.
async fn run(
    sh: Arc<Shared>,
    key: String,
    mut stream: etcd_client::WatchStream,
    mut next: i64,
    tx: mpsc::Sender<Result<WatchEvent>>,
) {
    loop {
        // Read until the stream breaks.
        loop {
            let msg = tokio::select! {
                _ = tx.closed() => return,
                m = stream.message() => m,
            };
            match msg {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            let _ = tx
                                .send(Err(Error::Compacted {
                                    oldest: resp.compact_revision() as u64,
                                }))
                                .await;
                            return;
                        }
                        tracing::debug!(
                            reason = resp.cancel_reason(),
                            "etcd cancelled a watch; resuming"
                        );
                        break;
                    }
                    let mut last = 0;
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        last = last.max(kv.mod_revision());
                        let Some(k) = sh.layout.user_key(kv.key()) else {
                            continue;
                        };
                        let (kind, value) = match ev.event_type() {
                            EventType::Put => (EventKind::Put, Bytes::copy_from_slice(kv.value())),
                            EventType::Delete => (EventKind::Delete, Bytes::new()),
                        };
                        let e = WatchEvent {
                            kind,
                            key: k,
                            value,
                            revision: kv.mod_revision().max(0) as u64,
                        };
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    // All events of one revision come in one answer (no
                    // fragmenting), so the next one to ask for is last + 1.
                    if last > 0 {
                        next = next.max(last + 1);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if classify(&e) == Fault::Auth {
                        let _ = tx.send(Err(map_read(e))).await;
                        return;
                    }
                    tracing::debug!(error = %e, "etcd watch stream broke; resuming");
                    break;
                }
            }
        }
        // Reconnect (possibly to another member) and resume at `next`.
        let mut backoff = Duration::from_millis(20);
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            match open(&sh, &key, next).await {
                Ok(s) => {
                    stream = s;
                    break;
                }
                Err(e @ (Error::Compacted { .. } | Error::Auth { .. })) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "re-opening an etcd watch failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}
