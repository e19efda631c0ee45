//! Watches: one persistent recursive watch on the namespace's data dir.
//!
//! ZooKeeper watch events carry a path only and no history, and changes
//! made while the session was disconnected may arrive as fewer events (or
//! none). So the stream re-reads a key after each event on it and delivers
//! its state *then*, skipping states it already delivered, and delivers
//! the states read for the events queued meanwhile in revision order (a
//! read may return a newer write than another key's pending event); after a
//! reconnect it re-reads every matching key and delivers what differs. It
//! therefore always ends on each key's latest state, but may skip
//! intermediate revisions (`watch_every_revision = false`) and cannot
//! replay from a revision (`watch_resume = false`).

use crate::backend::ZookeeperBackend;
use crate::error::{map, Kind, NAME};
use crate::keys::decode_key;
use crate::kv::{logical, KeyState};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use latchkey_core::{Error, EventKind, Result, Revision, WatchEvent, WatchStream};
use std::collections::BTreeMap;
use tokio::sync::mpsc::UnboundedSender;
use zookeeper_client as zk;

/// What the stream last delivered (or saw at its start) for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    Alive(Revision),
    Gone(Revision),
}

impl Known {
    fn revision(self) -> Revision {
        match self {
            Known::Alive(r) | Known::Gone(r) => r,
        }
    }
}

type Tx = UnboundedSender<Result<WatchEvent>>;

/// Starts a watch of keys beginning with `prefix`, from now on.
pub(crate) async fn start(b: ZookeeperBackend, prefix: String) -> Result<WatchStream> {
    let kv_dir = b.inner.kv_dir.clone();
    // Register first, then take the baseline: nothing falls in between.
    let client = b.zk().await?;
    b.count();
    let watcher = client
        .watch(&kv_dir, zk::AddWatchMode::PersistentRecursive)
        .await
        .map_err(|e| map(e, Kind::Read, &format!("watch {prefix:?}")))?;
    let known = snapshot(&b, &prefix).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(run(b, prefix, watcher, known, tx));
    Ok(
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
            .boxed(),
    )
}

/// Every matching key's state now.
async fn snapshot(
    b: &ZookeeperBackend,
    prefix: &str,
) -> Result<BTreeMap<String, (Known, KeyState)>> {
    let keys = b.matching_keys(prefix).await?;
    let mut out = BTreeMap::new();
    for chunk in keys.chunks(64) {
        let paths: Vec<String> = chunk
            .iter()
            .map(|(_, n)| format!("{}/{}", b.inner.kv_dir, n))
            .collect();
        let states = b.read_many(&paths, &format!("watch {prefix:?}")).await?;
        for ((k, _), st) in chunk.iter().zip(states) {
            let known = match logical(k, &st, true) {
                Some(kv) => Known::Alive(kv.revision),
                None => Known::Gone(st.as_ref().map_or(0, |n| n.gone_revision())),
            };
            out.insert(k.clone(), (known, st));
        }
    }
    Ok(out)
}

/// The event that delivers `key`'s state `st`, if it differs from what was
/// last delivered (which it then becomes).
fn event_for(known: &mut BTreeMap<String, Known>, key: &str, st: &KeyState) -> Option<WatchEvent> {
    let prev = known.get(key).copied();
    match (logical(key, st, false), prev) {
        (Some(kv), Some(p)) if kv.revision <= p.revision() => None,
        (Some(kv), _) => {
            known.insert(key.to_string(), Known::Alive(kv.revision));
            Some(WatchEvent {
                kind: EventKind::Put,
                key: key.to_string(),
                value: kv.value,
                revision: kv.revision,
            })
        }
        (None, Some(Known::Alive(r))) => {
            // A znode that vanished entirely (deleted by someone else than
            // latchkey) leaves no zxid to read: report the next one.
            let rev = st.as_ref().map_or(r + 1, |n| n.gone_revision().max(r + 1));
            known.insert(key.to_string(), Known::Gone(rev));
            Some(WatchEvent {
                kind: EventKind::Delete,
                key: key.to_string(),
                value: Bytes::new(),
                revision: rev,
            })
        }
        (None, _) => None,
    }
}

/// Sends `batch` in revision order. False once the receiver is gone.
fn deliver(tx: &Tx, mut batch: Vec<WatchEvent>) -> bool {
    batch.sort_by_key(|e| e.revision);
    batch.into_iter().all(|ev| tx.send(Ok(ev)).is_ok())
}

/// The key and znode path an event on `path` is about, if it is watched.
fn watched_key(kv_dir: &str, prefix: &str, path: &str) -> Option<(String, String)> {
    let name = key_of(kv_dir, path)?;
    let key = decode_key(name)?;
    key.starts_with(prefix)
        .then(|| (key, format!("{kv_dir}/{name}")))
}

fn key_of<'a>(kv_dir: &str, path: &'a str) -> Option<&'a str> {
    let rest = path.strip_prefix(kv_dir)?.strip_prefix('/')?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// How long the stream keeps retrying a read that fails for a transient
/// reason (a connection being re-established) before it reports the error.
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `f` until it succeeds, retrying transient failures for up to
/// [`RETRY_FOR`]. `None` once the receiver is gone.
async fn retrying<T, F, Fut>(tx: &Tx, mut f: F) -> Option<Result<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let give_up = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        match f().await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() < give_up => {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                    _ = tx.closed() => return None,
                }
            }
            r => return Some(r),
        }
    }
}

async fn run(
    b: ZookeeperBackend,
    prefix: String,
    mut watcher: zk::PersistentWatcher,
    baseline: BTreeMap<String, (Known, KeyState)>,
    tx: Tx,
) {
    let mut known: BTreeMap<String, Known> =
        baseline.into_iter().map(|(k, (kn, _))| (k, kn)).collect();
    let kv_dir = b.inner.kv_dir.clone();
    let what = format!("watch {prefix:?}");
    let mut resync = false;
    let mut pending: Option<zk::WatchedEvent> = None;
    loop {
        let ev = match pending.take() {
            Some(ev) => ev,
            None => tokio::select! {
                ev = watcher.changed() => ev,
                _ = tx.closed() => return,
            },
        };
        match ev.event_type {
            zk::EventType::Session => match ev.session_state {
                zk::SessionState::Disconnected => resync = true,
                zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                    if !std::mem::take(&mut resync) {
                        continue;
                    }
                    // Events of changes made while disconnected may be
                    // missing: re-read every watched key.
                    let now = match retrying(&tx, || snapshot(&b, &prefix)).await {
                        None => return,
                        Some(Ok(now)) => now,
                        Some(Err(e)) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    // Keys whose znode vanished entirely first, then every
                    // current state.
                    let gone: Vec<String> = known
                        .keys()
                        .filter(|k| !now.contains_key(*k))
                        .cloned()
                        .collect();
                    let mut batch: Vec<WatchEvent> = gone
                        .iter()
                        .filter_map(|k| event_for(&mut known, k, &None))
                        .collect();
                    batch.extend(
                        now.iter()
                            .filter_map(|(k, (_, st))| event_for(&mut known, k, st)),
                    );
                    if !deliver(&tx, batch) {
                        return;
                    }
                }
                _ => {
                    let _ = tx.send(Err(Error::unavailable(
                        NAME,
                        format!("{what}: the session ended ({})", ev.session_state),
                    )));
                    return;
                }
            },
            _ => {
                // Read the key of each event, then deliver in revision
                // order. One session carries the events and the reads'
                // answers in order, so when a read returns revision R, the
                // events of every write up to R are already queued: take
                // them all (their keys may have older revisions than R)
                // before delivering anything.
                let mut batch = Vec::new();
                let mut next = Some(ev);
                while let Some(ev) = next.take() {
                    if ev.event_type == zk::EventType::Session {
                        pending = Some(ev);
                        break;
                    }
                    if let Some((key, path)) = watched_key(&kv_dir, &prefix, &ev.path) {
                        match retrying(&tx, || b.read_key(&path, &what)).await {
                            None => return,
                            Some(Ok(st)) => batch.extend(event_for(&mut known, &key, &st)),
                            Some(Err(e)) => {
                                let _ = deliver(&tx, batch);
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    next = watcher.changed().now_or_never();
                }
                if !deliver(&tx, batch) {
                    return;
                }
            }
        }
    }
}
