//! Watches with blocking queries.
//!
//! A blocking query on the prefix (`?recurse&index=<last>&wait=…`) returns
//! the subtree's whole state once anything under it changed. The stream
//! diffs each answer against the previous one and delivers a `Put` for every
//! key that is new or has a new `ModifyIndex` (its revision), and a
//! `Delete` for every key that vanished (revision: the answer's
//! `X-Consul-Index`, the index of the newest change under the prefix). So
//! it always ends on each key's latest state but coalesces changes made
//! between two answers (`watch_every_revision = false`), and it cannot
//! replay history (`watch_resume = false`). Expiry of a TTL key (its
//! session invalidated with `Behavior=delete`) shows as a `Delete`.
//!
//! Index handling follows Consul's blocking-query docs: an index that goes
//! backwards (a snapshot restore, a new leader with an older state) resets
//! the wait index to 0, and the next answer is diffed as usual.

use crate::backend::Inner;
use crate::client::NAME;
use futures::StreamExt;
use latchkey_core::{Error, EventKind, Result, WatchEvent, WatchStream};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

type Snapshot = HashMap<String, (u64, bytes::Bytes)>;

fn snapshot(inner: &Inner, entries: Vec<crate::client::Entry>, prefix: &str) -> Result<Snapshot> {
    let mut out = HashMap::new();
    for e in entries {
        if let Some(kv) = inner.to_kv(&e, false)? {
            if kv.key.starts_with(prefix) {
                out.insert(kv.key, (kv.revision, kv.value));
            }
        }
    }
    Ok(out)
}

/// Starts a watch of keys beginning with `prefix`, from now on.
pub(crate) async fn start(inner: Arc<Inner>, prefix: String) -> Result<WatchStream> {
    let cprefix = format!("{}{}", inner.kv_prefix, crate::keys::encode(&prefix));
    let (entries, index) = inner.client.kv_list(&cprefix, true, None).await?;
    let known = snapshot(&inner, entries, &prefix)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<WatchEvent>>();
    tokio::spawn(async move {
        let closed = tx.clone();
        tokio::select! {
            _ = closed.closed() => {}
            _ = run(inner, prefix, cprefix, known, index, tx) => {}
        }
    });
    Ok(
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
            .boxed(),
    )
}

async fn run(
    inner: Arc<Inner>,
    prefix: String,
    cprefix: String,
    mut known: Snapshot,
    mut index: u64,
    tx: tokio::sync::mpsc::UnboundedSender<Result<WatchEvent>>,
) {
    let mut failures = 0u32;
    loop {
        let res = inner
            .client
            .kv_list(&cprefix, true, Some((index.max(1), WAIT)))
            .await;
        let (entries, idx) = match res {
            Ok(r) => r,
            Err(e) if e.is_transient() && failures < 20 => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(100 * u64::from(failures))).await;
                continue;
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        failures = 0;
        let backwards = idx < index;
        index = if backwards { 0 } else { idx };
        let now = match snapshot(&inner, entries, &prefix) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let mut events: Vec<WatchEvent> = Vec::new();
        for (k, (rev, v)) in &now {
            if known.get(k).map(|(r, _)| *r) != Some(*rev) {
                events.push(WatchEvent {
                    kind: EventKind::Put,
                    key: k.clone(),
                    value: v.clone(),
                    revision: *rev,
                });
            }
        }
        for k in known.keys() {
            if !now.contains_key(k) {
                events.push(WatchEvent {
                    kind: EventKind::Delete,
                    key: k.clone(),
                    value: bytes::Bytes::new(),
                    revision: idx,
                });
            }
        }
        // Deletes sort after puts of the same index (a txn's puts and deletes
        // share it; the delete's own index is at most the answer's).
        events.sort_by(|a, b| {
            (a.revision, a.kind == EventKind::Delete, &a.key).cmp(&(
                b.revision,
                b.kind == EventKind::Delete,
                &b.key,
            ))
        });
        known = now;
        for ev in events {
            if tx.send(Ok(ev)).is_err() {
                return;
            }
        }
    }
}

/// The error for `watch(prefix, Some(rev))`.
pub(crate) fn no_resume() -> Error {
    Error::Unsupported {
        capability: latchkey_core::Capability::WatchResume,
        backend: NAME,
    }
}
