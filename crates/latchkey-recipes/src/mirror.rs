//! [`Mirror`]: a local, read-only, in-memory copy of a key prefix.
//!
//! It is filled by `list` and kept current by a watch opened *before* the
//! list, so no change falls between the two. The listing is bracketed by
//! two reads of the store's revision; events the listing may or may not
//! contain are held back until the watch has passed the second one (or
//! the copy is rebuilt from a new listing if the watch goes quiet first),
//! so a published state is always one the store had and its
//! [`revision`](Snapshot::revision) is sound: every write up to it is
//! reflected. This needs revisions from one global sequence
//! ([`Capabilities::global_revision`](latchkey_core::Capabilities)) and a
//! read-only transaction that reports the store's revision; without the
//! latter every event is applied as it comes (a key deleted just before
//! the listing may then show briefly).
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
///
/// A listing is bracketed by two reads of the store's revision: `r0`
/// after the watch is open and before the listing, `r1` after it. Every
/// write up to `r0` (and up to the newest revision listed) is in the
/// listing, so that is a sound label for it. Events up to `r0` are already
/// in it and are skipped; events in `(r0, r1]` may or may not be (the
/// listing happened somewhere in between), so they are held back and the
/// listing alone is shown; once the watch passes `r1` they are all applied
/// in order — each key's last event is its state — and from then on every
/// event is applied as it comes. If the watch goes quiet while events are
/// held back, the copy is rebuilt from a new listing instead.
struct Working {
    map: BTreeMap<String, KeyValue>,
    /// Last revision applied per key (deletes included).
    seen: HashMap<String, Revision>,
    r0: Revision,
    r1: Revision,
    held: Vec<WatchEvent>,
    /// The watch has passed `r1`: every event is applied as it comes.
    passed: bool,
    /// Every write up to this revision is reflected.
    label: Revision,
}

impl Working {
    fn apply(&mut self, ev: WatchEvent) {
        if !self.passed {
            if ev.revision <= self.r0 {
                return;
            }
            if ev.revision <= self.r1 {
                self.held.push(ev);
                return;
            }
            self.passed = true;
            for h in std::mem::take(&mut self.held) {
                self.put_event(h);
            }
        }
        self.put_event(ev);
    }

    fn put_event(&mut self, ev: WatchEvent) {
        if self.seen.get(&ev.key).is_some_and(|s| ev.revision <= *s) {
            return;
        }
        self.label = self.label.max(ev.revision);
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

    /// Events are held back and the watch is quiet: re-list.
    fn needs_rebase(&self) -> bool {
        !self.passed && !self.held.is_empty()
    }

    fn snapshot(&self, generation: u64, floor: Revision) -> Snapshot {
        Snapshot {
            entries: self.map.clone(),
            revision: self.label.max(floor),
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

/// A copy from one listing, bracketed by two revision reads (see
/// [`Working`]). With `coalesced`, the watch is only a wake-up and the
/// copy never waits for it to pass `r1`.
async fn list_copy(backend: &Arc<dyn Backend>, prefix: &str, coalesced: bool) -> Result<Working> {
    let r0 = store_revision(backend, prefix).await;
    let list = backend.list(prefix, Default::default()).await?;
    let r1 = if coalesced {
        r0
    } else {
        store_revision(backend, prefix).await
    };
    let max_listed = list.iter().map(|kv| kv.revision).max().unwrap_or(0);
    let mut work = Working {
        map: BTreeMap::new(),
        seen: HashMap::new(),
        r0,
        r1: r1.max(r0),
        held: Vec::new(),
        // A backend that cannot tell its revision (0): apply every event.
        passed: coalesced || r1 == 0,
        label: r0.max(max_listed),
    };
    for kv in list {
        work.seen.insert(kv.key.clone(), kv.revision);
        work.map.insert(kv.key.clone(), kv);
    }
    Ok(work)
}

/// Opens a watch, then lists.
async fn sync(backend: &Arc<dyn Backend>, prefix: &str) -> Result<(WatchStream, Working)> {
    let watch = backend.watch(prefix, None).await?;
    let coalesced = !backend.capabilities().watch_every_revision;
    Ok((watch, list_copy(backend, prefix, coalesced).await?))
}

/// How long the watch must stay quiet before the events of the newest
/// revision are published: the events of one transaction share a revision
/// and may be delivered one by one; publishing only whole revisions keeps
/// every state one the store had.
const GRACE: Duration = Duration::from_millis(2);

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
    // Received, not yet applied (in revision order).
    let mut buf: Vec<WatchEvent> = Vec::new();
    loop {
        let mut broken: Option<String> = None;
        let take = |item: Option<Result<WatchEvent>>,
                    buf: &mut Vec<WatchEvent>,
                    broken: &mut Option<String>| match item {
            Some(Ok(ev)) if ev.key.starts_with(&prefix) => buf.push(ev),
            Some(Ok(_)) => {}
            Some(Err(e)) => *broken = Some(e.to_string()),
            None => *broken = Some("the watch ended".into()),
        };
        if buf.is_empty() {
            let item = watch.next().await;
            take(item, &mut buf, &mut broken);
        }
        while broken.is_none() && buf.len() < 4096 {
            match watch.next().now_or_never() {
                Some(item) => take(item, &mut buf, &mut broken),
                None => break,
            }
        }
        let quiet = broken.is_some()
            || match tokio::time::timeout(GRACE, watch.next()).await {
                Ok(item) => {
                    take(item, &mut buf, &mut broken);
                    broken.is_some()
                }
                Err(_) => true,
            };
        if coalesced {
            if !buf.is_empty() && broken.is_none() {
                buf.clear();
                // Everything received so far happened before this listing.
                match list_copy(&backend, &prefix, true).await {
                    Ok(fresh) => work = fresh,
                    Err(e) => broken = Some(e.to_string()),
                }
            }
        } else {
            // Apply whole revisions only: the newest one waits for the
            // watch to be quiet (or for a newer revision).
            let cut = if quiet {
                buf.len()
            } else {
                let newest = buf.last().map_or(0, |e| e.revision);
                buf.iter().take_while(|e| e.revision < newest).count()
            };
            for ev in buf.drain(..cut) {
                work.apply(ev);
            }
            if quiet && broken.is_none() && work.needs_rebase() {
                // Everything received so far happened before this listing.
                match list_copy(&backend, &prefix, false).await {
                    Ok(fresh) => work = fresh,
                    Err(e) => broken = Some(e.to_string()),
                }
            }
        }
        let Some(reason) = broken else {
            let floor = tx.borrow().revision;
            let snap = work.snapshot(generation, floor);
            if *tx.borrow().as_ref() != snap {
                tx.send_replace(Arc::new(snap));
            }
            continue;
        };
        buf.clear();
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
    }
}
