//! [`Mirror`]: a local, read-only, in-memory copy of a key prefix.
//!
//! It is filled by `list` and kept current by a watch opened *before* the
//! list, so no change falls between the two. Events are applied in order:
//! an event a key's listed state already contains (revision ≤ the key's
//! listed revision) is skipped; an event for a key absent from the listing
//! whose revision is not above the revision read right after the listing
//! is held back until the watch passes that revision (it may predate the
//! listing, and applying it early could resurrect a deleted key).
//!
//! When the watch fails or ends — a reconnect, [`Error::Compacted`], or a
//! backend whose watch cannot resume — the mirror **resynchronises**: it
//! lists again into a fresh copy and swaps it in atomically, counting the
//! resync ([`Mirror::resyncs`], [`Snapshot::generation`]). Readers always
//! see one whole [`Snapshot`]; never a mix of two states.
//!
//! On backends whose watch coalesces events (`!watch_every_revision`,
//! e.g. ZooKeeper) the watch is only a wake-up: each wake-up lists the
//! prefix again (reading the store's revision first) and swaps the copy,
//! so intermediate values may be skipped but every state shown is one the
//! store had.
//!
//! A mirror's reads are as fresh as the backend's watch: stale by the
//! watch's delivery delay. Use [`Mirror::wait_for`] to read your own
//! write through the mirror. Each applied batch of events copies the map
//! (snapshots are immutable): meant for configuration-sized prefixes.

use futures::{FutureExt, StreamExt};
use latchkey_core::{
    validate, Backend, Error, EventKind, KeyValue, Op, Result, Revision, TxnRequest, WatchEvent,
    WatchStream,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// One consistent state of the mirrored prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    entries: BTreeMap<String, KeyValue>,
    revision: Revision,
    generation: u64,
}

impl Snapshot {
    /// The entry of `key`, if it exists in this state.
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.entries.get(key)
    }
    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &KeyValue> {
        self.entries.values()
    }
    /// The entries as a map from key to entry.
    pub fn entries(&self) -> &BTreeMap<String, KeyValue> {
        &self.entries
    }
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True if the prefix is empty in this state.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Every write with a revision ≤ this one is reflected in this state.
    pub fn revision(&self) -> Revision {
        self.revision
    }
    /// How many resynchronisations preceded this state (0 for the first
    /// listing).
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

struct Inner {
    rx: watch::Receiver<Arc<Snapshot>>,
    resyncs: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
    task: tokio::task::AbortHandle,
    prefix: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A live, read-only copy of a key prefix. Cheap to clone (clones share
/// the copy); the background task stops when the last clone is dropped.
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("prefix", &self.inner.prefix)
            .field("revision", &self.revision())
            .field("resyncs", &self.resyncs())
            .finish()
    }
}

impl Mirror {
    /// Lists `prefix`, starts following it, and returns once the first
    /// state is loaded.
    pub async fn start(backend: Arc<dyn Backend>, prefix: impl Into<String>) -> Result<Mirror> {
        let prefix = prefix.into();
        validate::prefix(&prefix)?;
        let (watch, work) = sync(&backend, &prefix).await?;
        let first = Arc::new(work.snapshot(0, 0));
        let (tx, rx) = watch::channel(first);
        let resyncs = Arc::new(AtomicU64::new(0));
        let last_error = Arc::new(Mutex::new(None));
        let task = tokio::spawn(follow(
            backend,
            prefix.clone(),
            watch,
            work,
            tx,
            resyncs.clone(),
            last_error.clone(),
        ));
        Ok(Mirror {
            inner: Arc::new(Inner {
                rx,
                resyncs,
                last_error,
                task: task.abort_handle(),
                prefix,
            }),
        })
    }

    /// The mirrored prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The current state (one consistent snapshot).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.rx.borrow().clone()
    }

    /// The current entry of `key`.
    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.inner.rx.borrow().get(key).cloned()
    }

    /// The revision the current state reflects.
    pub fn revision(&self) -> Revision {
        self.inner.rx.borrow().revision
    }

    /// How many times the mirror resynchronised (listed again and swapped
    /// the copy) after a watch failure, a compaction or a reconnect.
    pub fn resyncs(&self) -> u64 {
        self.inner.resyncs.load(Ordering::SeqCst)
    }

    /// The last error the background task met (it keeps retrying).
    pub fn last_error(&self) -> Option<String> {
        self.inner
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the mirror reflects `revision` (e.g. the revision your
    /// own `put` returned), and returns that state. Wrap it in a timeout
    /// to bound the wait.
    pub async fn wait_for(&self, revision: Revision) -> Result<Arc<Snapshot>> {
        let mut rx = self.inner.rx.clone();
        let snap = rx
            .wait_for(|s| s.revision >= revision)
            .await
            .map_err(|_| Error::unavailable("mirror", "the mirror's task has stopped"))?;
        Ok(snap.clone())
    }

    /// A receiver that is notified of every new state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.rx.clone()
    }
}

/// The mirror's working copy between publications.
struct Working {
    map: BTreeMap<String, KeyValue>,
    /// Last revision applied per key (deletes included).
    seen: HashMap<String, Revision>,
    /// The revision read right after the listing (≥ the listing's).
    listed_at: Revision,
    /// Held-back events (latest per key) of keys absent from the listing.
    pending: HashMap<String, WatchEvent>,
    /// Highest revision applied so far.
    applied: Revision,
}

impl Working {
    fn apply(&mut self, ev: WatchEvent) {
        if let Some(s) = self.seen.get(&ev.key) {
            if ev.revision <= *s {
                return;
            }
        } else if ev.revision <= self.listed_at {
            // Maybe from before the listing: hold it until the watch
            // passes `listed_at` (then the latest one is the state).
            self.pending.insert(ev.key.clone(), ev);
            return;
        }
        if ev.revision > self.listed_at && !self.pending.is_empty() {
            let pending: Vec<_> = self.pending.drain().map(|(_, e)| e).collect();
            for e in pending {
                self.put_event(e);
            }
        }
        self.put_event(ev);
    }

    fn put_event(&mut self, ev: WatchEvent) {
        self.applied = self.applied.max(ev.revision);
        self.seen.insert(ev.key.clone(), ev.revision);
        match ev.kind {
            EventKind::Put => {
                let kv = KeyValue {
                    key: ev.key.clone(),
                    value: ev.value,
                    revision: ev.revision,
                    lease_ttl: None,
                };
                self.map.insert(ev.key, kv);
            }
            EventKind::Delete => {
                self.map.remove(&ev.key);
            }
        }
    }

    fn label(&self) -> Revision {
        let top = self.applied.max(self.listed_at);
        match self.pending.values().map(|e| e.revision).min() {
            Some(p) => top.min(p.saturating_sub(1)),
            None => top,
        }
    }

    fn snapshot(&self, generation: u64, floor: Revision) -> Snapshot {
        Snapshot {
            entries: self.map.clone(),
            revision: self.label().max(floor),
            generation,
        }
    }
}

/// The store's current revision, as a read-only transaction reports it
/// (0 if it cannot say).
async fn store_revision(backend: &Arc<dyn Backend>, prefix: &str) -> Revision {
    let probe = if prefix.is_empty() {
        "latchkey-mirror-probe".to_string()
    } else {
        prefix.to_string()
    };
    match backend.txn(TxnRequest::new().then([Op::get(probe)])).await {
        Ok(o) => o.revision,
        Err(e) => {
            tracing::debug!(error = %e, "mirror: could not read the store revision");
            0
        }
    }
}

/// A fresh copy from one listing, for backends whose watch coalesces: the
/// revision is read *before* the listing, so every write up to it (and up
/// to the newest revision listed) is in the copy.
async fn relist(backend: &Arc<dyn Backend>, prefix: &str) -> Result<Working> {
    let before = store_revision(backend, prefix).await;
    let list = backend.list(prefix, Default::default()).await?;
    let max_listed = list.iter().map(|kv| kv.revision).max().unwrap_or(0);
    let mut work = Working {
        map: BTreeMap::new(),
        seen: HashMap::new(),
        listed_at: before.max(max_listed),
        pending: HashMap::new(),
        applied: 0,
    };
    for kv in list {
        work.seen.insert(kv.key.clone(), kv.revision);
        work.map.insert(kv.key.clone(), kv);
    }
    Ok(work)
}

/// Opens a watch, then lists, then reads the store's revision.
async fn sync(backend: &Arc<dyn Backend>, prefix: &str) -> Result<(WatchStream, Working)> {
    let watch = backend.watch(prefix, None).await?;
    if !backend.capabilities().watch_every_revision {
        return Ok((watch, relist(backend, prefix).await?));
    }
    let list = backend.list(prefix, Default::default()).await?;
    let after = store_revision(backend, prefix).await;
    let max_listed = list.iter().map(|kv| kv.revision).max().unwrap_or(0);
    let mut work = Working {
        map: BTreeMap::new(),
        seen: HashMap::new(),
        listed_at: after.max(max_listed),
        pending: HashMap::new(),
        applied: 0,
    };
    for kv in list {
        work.seen.insert(kv.key.clone(), kv.revision);
        work.map.insert(kv.key.clone(), kv);
    }
    Ok((watch, work))
}

async fn follow(
    backend: Arc<dyn Backend>,
    prefix: String,
    mut watch: WatchStream,
    mut work: Working,
    tx: watch::Sender<Arc<Snapshot>>,
    resyncs: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let mut generation = 0;
    // A coalescing watch is only a wake-up: each wake-up re-lists, so
    // every published state is one the store had.
    let coalesced = !backend.capabilities().watch_every_revision;
    loop {
        // Apply everything that is ready, then publish once. The events of
        // one transaction share a revision and usually arrive together;
        // give the watch one more turn to deliver the rest of them.
        let first = watch.next().await;
        let mut batch = vec![first];
        for round in 0..2 {
            while batch.len() < 1024 {
                match watch.next().now_or_never() {
                    Some(item) => batch.push(item),
                    None => break,
                }
            }
            if round == 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut broken = None;
        let before = work.label();
        let mut woke = false;
        for item in batch {
            match item {
                Some(Ok(ev)) if ev.key.starts_with(&prefix) => {
                    woke = true;
                    if !coalesced {
                        work.apply(ev);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    broken = Some(e.to_string());
                    break;
                }
                None => {
                    broken = Some("the watch ended".into());
                    break;
                }
            }
        }
        if coalesced && woke && broken.is_none() {
            match relist(&backend, &prefix).await {
                Ok(fresh) => work = fresh,
                Err(e) => broken = Some(e.to_string()),
            }
        }
        if broken.is_none() || work.label() != before {
            let floor = tx.borrow().revision;
            let snap = work.snapshot(generation, floor);
            if *tx.borrow().as_ref() != snap {
                tx.send_replace(Arc::new(snap));
            }
        }
        let Some(reason) = broken else { continue };
        tracing::info!(prefix = %prefix, reason = %reason, "mirror: resynchronising");
        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        // List again into a fresh copy; keep serving the old one meanwhile.
        let mut backoff = Duration::from_millis(50);
        loop {
            match sync(&backend, &prefix).await {
                Ok((w, fresh)) => {
                    watch = w;
                    work = fresh;
                    break;
                }
                Err(e) => {
                    *last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        generation += 1;
        resyncs.fetch_add(1, Ordering::SeqCst);
        let floor = tx.borrow().revision;
        tx.send_replace(Arc::new(work.snapshot(generation, floor)));
        if tx.is_closed() {
            return;
        }
    }
}
