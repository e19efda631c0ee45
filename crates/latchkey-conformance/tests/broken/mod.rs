//! Deliberately broken backends: wrappers over the mem backend with one bug
//! each, for the suite's self-test.

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use latchkey_conformance::harness::Instrumented;
use latchkey_conformance::Harness;
use latchkey_core::{
    Backend, Capabilities, Compare, DeleteOptions, DistributedLock, Error, GuardOps, KeyValue,
    KvStore, ListOptions, LockEntry, LockGuard, LockOptions, LostTrigger, Op, OpResult, PutOptions,
    Result, Revision, Txn, TxnOutcome, TxnRequest, WatchStream,
};
use latchkey_mem::{MemBackend, MemStore};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The one bug a [`Broken`] backend has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// No bug: a pass-through wrapper (control).
    None,
    /// Conditional writes read, check, then write: not atomic.
    NonAtomicCas,
    /// A key recreated after delete (or expiry) restarts at its first
    /// revision, as per-key version counters do.
    ReusedRevision,
    /// Fencing tokens decrease from holder to holder.
    NonMonotonicToken,
    /// Every lock call takes a private lock: nobody is ever excluded.
    NonExcludingLock,
    /// Watches drop every second event.
    WatchDropsEvents,
    /// Puts ignore their TTL.
    TtlIgnored,
    /// Guards' `lost()` never fires when the lease expires.
    LostNeverFires,
    /// Reads never answer.
    Hang,
    /// `lock()` polls `try_lock` every 10 ms instead of waiting for a wake-up.
    PollingWaiter,
}

#[derive(Default)]
struct Shared {
    /// Per full key: (first revision ever reported, current offset).
    revs: Mutex<HashMap<String, (Revision, Revision)>>,
    /// Fake lock entry id -> real entry.
    entries: Mutex<HashMap<String, LockEntry>>,
    private_names: AtomicU64,
}

/// A harness opening [`Broken`] handles over one mem store.
pub fn harness(bug: Bug) -> Arc<dyn Harness> {
    harness_with_caps(bug, None)
}

/// Like [`harness`], with capabilities declared as `caps` instead of mem's.
/// The harness counts each handle's requests to the mem store.
pub fn harness_with_caps(bug: Bug, caps: Option<Capabilities>) -> Arc<dyn Harness> {
    Arc::new(instrumented(bug, caps))
}

/// The counting harness itself, for `latchkey_conformance::run`.
pub fn instrumented(bug: Bug, caps: Option<Capabilities>) -> Instrumented<Broken> {
    let store = MemStore::new();
    let shared = Arc::new(Shared::default());
    Instrumented::new(move |ns: String| {
        let (store, shared, caps) = (store.clone(), shared.clone(), caps.clone());
        async move { Broken::open(&store, ns, bug, shared, caps).map(Arc::new) }
    })
    .with_op_count(|b: &Broken| b.inner.op_count())
    .with_revoke_lock(|b: &Broken, name: &str| b.inner.revoke_lock(name))
}

/// Like [`harness`], but a plain closure: it cannot count requests.
pub fn uncounted_harness(bug: Bug) -> Arc<dyn Harness> {
    let store = MemStore::new();
    let shared = Arc::new(Shared::default());
    Arc::new(move |ns: String| {
        let (store, shared) = (store.clone(), shared.clone());
        async move {
            let b = Broken::open(&store, ns, bug, shared, None)?;
            Ok(Arc::new(b) as Arc<dyn Backend>)
        }
    })
}

/// A mem handle with one bug.
pub struct Broken {
    inner: Arc<MemBackend>,
    bug: Bug,
    shared: Arc<Shared>,
    ns: String,
    caps: Option<Capabilities>,
}

impl Broken {
    /// A handle on namespace `ns` of `store` with `bug`; `shared` is the
    /// bug state all handles of one harness see.
    fn open(
        store: &MemStore,
        ns: String,
        bug: Bug,
        shared: Arc<Shared>,
        caps: Option<Capabilities>,
    ) -> Result<Self> {
        Ok(Broken {
            inner: store.handle(&ns)?,
            bug,
            shared,
            ns,
            caps,
        })
    }
    fn full(&self, key: &str) -> String {
        format!("{}\u{1}{key}", self.ns)
    }
    fn offset(&self, key: &str) -> Revision {
        if self.bug != Bug::ReusedRevision {
            return 0;
        }
        self.shared
            .revs
            .lock()
            .unwrap()
            .get(&self.full(key))
            .map_or(0, |e| e.1)
    }
    fn out_rev(&self, key: &str, r: Revision) -> Revision {
        r - self.offset(key)
    }
    fn in_rev(&self, key: &str, r: Revision) -> Revision {
        r + self.offset(key)
    }
    /// Records a write that created `key` at real revision `r`; returns the
    /// revision to report.
    fn created(&self, key: &str, r: Revision) -> Revision {
        let mut revs = self.shared.revs.lock().unwrap();
        let e = revs.entry(self.full(key)).or_insert((r, 0));
        e.1 = r - e.0;
        e.0
    }
    fn fix_kv(&self, mut kv: KeyValue) -> KeyValue {
        kv.revision = self.out_rev(&kv.key, kv.revision);
        kv
    }
    fn fix_err(&self, e: Error) -> Error {
        match e {
            Error::Conflict { key, current } => {
                let current = current.map(|c| self.out_rev(&key, c));
                Error::Conflict { key, current }
            }
            e => e,
        }
    }
    async fn pause() {
        // Widens the window between check and write of the non-atomic bug.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    fn wrap_guard(&self, name: &str, g: LockGuard) -> LockGuard {
        let real = g.entry().clone();
        let mut fake = real.clone();
        fake.name = name.to_string();
        if self.bug == Bug::NonMonotonicToken {
            fake.token = 1_000_000u64.saturating_sub(real.token);
        }
        self.shared
            .entries
            .lock()
            .unwrap()
            .insert(fake.id.clone(), real);
        let trigger = LostTrigger::new();
        if self.bug != Bug::LostNeverFires {
            let (t, lost) = (trigger.clone(), g.lost());
            tokio::spawn(async move {
                lost.await;
                t.fire();
            });
        }
        let ops = Arc::new(WrappedOps {
            inner: Mutex::new(Some(Arc::new(g))),
        });
        LockGuard::new(fake, trigger, ops, None)
    }

    fn fix_txn(&self, mut t: TxnRequest) -> TxnRequest {
        for c in t.when.iter_mut() {
            match c {
                Compare::Held(e) => {
                    if let Some(real) = self.shared.entries.lock().unwrap().get(&e.id) {
                        *e = real.clone();
                    }
                }
                Compare::Revision { key, revision, .. } => *revision = self.in_rev(key, *revision),
                _ => {}
            }
        }
        for op in t.then.iter_mut().chain(t.otherwise.iter_mut()) {
            if let (Op::Put { ttl, .. }, Bug::TtlIgnored) = (op, self.bug) {
                *ttl = None;
            }
        }
        t
    }
}

struct WrappedOps {
    inner: Mutex<Option<Arc<LockGuard>>>,
}

#[async_trait]
impl GuardOps for WrappedOps {
    async fn release(&self, _entry: &LockEntry) -> Result<()> {
        let g = self.inner.lock().unwrap().take();
        if let Some(g) = g {
            g.release().await?;
        }
        Ok(())
    }
    fn abandon(&self, _entry: &LockEntry) {
        if let Some(g) = self.inner.lock().unwrap().take() {
            tokio::spawn(async move {
                g.abandon().await;
                // Keep the guard alive (abandoned, not released) until it expires.
                g.lost().await;
            });
        }
    }
}

#[async_trait]
impl KvStore for Broken {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        if self.bug == Bug::Hang {
            futures::future::pending::<()>().await;
        }
        Ok(self.inner.get(key).await?.map(|kv| self.fix_kv(kv)))
    }

    async fn put(&self, key: &str, value: Bytes, mut opts: PutOptions) -> Result<Revision> {
        if self.bug == Bug::TtlIgnored {
            opts.ttl = None;
        }
        if self.bug == Bug::NonAtomicCas && (opts.if_absent || opts.if_revision.is_some()) {
            latchkey_core::validate::key(key)?;
            latchkey_core::validate::value(key, &value)?;
            if let Some(t) = opts.ttl {
                latchkey_core::validate::ttl(t)?;
            }
            let cur = self.inner.get(key).await?;
            let cur_rev = cur.as_ref().map(|kv| kv.revision);
            let ok = if opts.if_absent {
                cur.is_none()
            } else {
                cur_rev == opts.if_revision
            };
            if !ok {
                return Err(Error::conflict(key, cur_rev));
            }
            Self::pause().await;
            let plain = PutOptions {
                ttl: opts.ttl,
                ..Default::default()
            };
            return self.inner.put(key, value, plain).await;
        }
        if self.bug == Bug::ReusedRevision {
            let existed = self.inner.get(key).await.ok().flatten().is_some();
            opts.if_revision = opts.if_revision.map(|r| self.in_rev(key, r));
            let r = self
                .inner
                .put(key, value, opts)
                .await
                .map_err(|e| self.fix_err(e))?;
            return Ok(if existed {
                self.out_rev(key, r)
            } else {
                self.created(key, r)
            });
        }
        self.inner.put(key, value, opts).await
    }

    async fn delete(&self, key: &str, mut opts: DeleteOptions) -> Result<bool> {
        opts.if_revision = opts.if_revision.map(|r| self.in_rev(key, r));
        self.inner
            .delete(key, opts)
            .await
            .map_err(|e| self.fix_err(e))
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>> {
        Ok(self
            .inner
            .list(prefix, opts)
            .await?
            .into_iter()
            .map(|kv| self.fix_kv(kv))
            .collect())
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream> {
        let s = self.inner.watch(prefix, from).await?;
        if self.bug == Bug::WatchDropsEvents {
            let mut n = 0u64;
            return Ok(s
                .filter(move |_| {
                    n += 1;
                    futures::future::ready(n % 2 == 1)
                })
                .boxed());
        }
        Ok(s)
    }
}

#[async_trait]
impl Txn for Broken {
    async fn txn(&self, txn: TxnRequest) -> Result<TxnOutcome> {
        let txn = self.fix_txn(txn);
        if self.bug == Bug::NonAtomicCas && !txn.when.is_empty() {
            latchkey_core::validate::txn(&txn, self.capabilities().max_txn_ops)?;
            // Check the compares in one txn, then run the branch in another.
            let check = self
                .inner
                .txn(TxnRequest::new().when(txn.when.clone()))
                .await?;
            Self::pause().await;
            let ops = if check.succeeded {
                txn.then
            } else {
                txn.otherwise
            };
            let mut out = self.inner.txn(TxnRequest::new().then(ops)).await?;
            out.succeeded = check.succeeded;
            return Ok(out);
        }
        let mut out = self.inner.txn(txn).await?;
        if self.bug == Bug::ReusedRevision {
            for r in out.results.iter_mut() {
                if let OpResult::Get(Some(kv)) = r {
                    kv.revision = self.out_rev(&kv.key, kv.revision);
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl DistributedLock for Broken {
    async fn lock(&self, name: &str, opts: LockOptions) -> Result<LockGuard> {
        if self.bug == Bug::PollingWaiter {
            let deadline = opts.wait.map(|w| tokio::time::Instant::now() + w);
            loop {
                if let Some(g) = self.inner.try_lock(name, opts.clone()).await? {
                    return Ok(self.wrap_guard(name, g));
                }
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    return Err(Error::Timeout {
                        what: format!("lock {name}"),
                        after: opts.wait.unwrap_or_default(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let private = self.lock_name(name);
        let g = self.inner.lock(&private, opts).await?;
        Ok(self.wrap_guard(name, g))
    }

    async fn try_lock(&self, name: &str, opts: LockOptions) -> Result<Option<LockGuard>> {
        let private = self.lock_name(name);
        Ok(self
            .inner
            .try_lock(&private, opts)
            .await?
            .map(|g| self.wrap_guard(name, g)))
    }
}

impl Broken {
    fn lock_name(&self, name: &str) -> String {
        if self.bug == Bug::NonExcludingLock && latchkey_core::validate::lock_name(name).is_ok() {
            let n = self.shared.private_names.fetch_add(1, Ordering::SeqCst);
            format!("{name}#{n}")
        } else {
            name.to_string()
        }
    }
}

impl Backend for Broken {
    fn name(&self) -> &'static str {
        "broken-mem"
    }
    fn capabilities(&self) -> Capabilities {
        self.caps
            .clone()
            .unwrap_or_else(|| self.inner.capabilities())
    }
}
