//! The recipes on the mem backend. The conformance suite's `recipes::*`
//! cases prove them on every backend; these cover what needs a handle on
//! the store (killing watches) or is quicker to show here.

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use latchkey_core::{
    Backend, Capabilities, Compare, DeleteOptions, DistributedLock, Error, KeyValue, KvStore,
    ListOptions, LockGuard, LockOptions, Op, PutOptions, Result, Revision, Txn, TxnOutcome,
    TxnRequest, WatchStream,
};
use latchkey_mem::MemStore;
use latchkey_recipes::{Election, Mirror, RwLock, Semaphore, Snapshot};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn handle(store: &MemStore) -> Arc<dyn Backend> {
    store.handle("t").unwrap()
}

const T: Duration = Duration::from_secs(10);

/// The value a task returned, which must come within [`T`] and be `Ok`.
async fn joined<R>(task: tokio::task::JoinHandle<Result<R>>) -> R {
    tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

/// Whether `put(key, value)` fenced by `fence` commits.
async fn fenced_put(h: &dyn Backend, fence: Compare, key: &str, value: &str) -> bool {
    h.txn(
        TxnRequest::new()
            .when([fence])
            .then([Op::put(key, value.to_string())]),
    )
    .await
    .unwrap()
    .succeeded
}

/// Puts `value` at `key` and returns the revision.
async fn put(h: &dyn KvStore, key: &str, value: impl Into<Bytes>) -> Revision {
    h.put(key, value.into(), PutOptions::default())
        .await
        .unwrap()
}

/// Writes `<prefix>final` through `h`, waits (within [`T`]) for the mirror
/// to reach it, and returns the mirror's snapshot then and the store's
/// listing of `prefix`: the two a mirror test compares.
async fn settled(m: &Mirror, h: &dyn Backend, prefix: &str) -> (Arc<Snapshot>, Vec<KeyValue>) {
    let r = put(h, &format!("{prefix}final"), "f").await;
    let s = tokio::time::timeout(T, m.wait_for(r))
        .await
        .unwrap()
        .unwrap();
    let listed = h.list(prefix, ListOptions::default()).await.unwrap();
    (s, listed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_hands_over_in_order_and_observe_follows() {
    let store = MemStore::new();
    let e1 = Election::new(handle(&store), "e").unwrap();
    let e2 = Election::new(handle(&store), "e").unwrap();
    let mut obs = e1.observe().await.unwrap();
    assert_eq!(obs.next().await.unwrap().unwrap(), None);
    let l1 = e1.campaign("one").await.unwrap();
    let seen = obs.next().await.unwrap().unwrap().unwrap();
    assert_eq!((seen.term, seen.value.as_ref()), (l1.term(), &b"one"[..]));
    let waiting = tokio::spawn(async move { e2.campaign("two").await });
    l1.proclaim("one-b").await.unwrap();
    assert_eq!(
        obs.next().await.unwrap().unwrap().unwrap().value,
        Bytes::from("one-b")
    );
    let t1 = l1.term();
    l1.resign().await.unwrap();
    let l2 = joined(waiting).await;
    assert!(l2.term() > t1);
    // Either the vacancy then the new leader, or (coalesced) just the new one.
    let mut next = obs.next().await.unwrap().unwrap();
    if next.is_none() {
        next = obs.next().await.unwrap().unwrap();
    }
    assert_eq!(next.unwrap().term, l2.term());
    assert_eq!(
        Election::new(handle(&store), "e")
            .unwrap()
            .leader()
            .await
            .unwrap()
            .unwrap()
            .value,
        Bytes::from("two")
    );
    drop(l2);
    // Dropping resigns in the background: the record disappears.
    assert_eq!(obs.next().await.unwrap().unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leader_is_replaced_and_fenced_out() {
    let store = MemStore::new();
    let (a, b) = (handle(&store), handle(&store));
    let ttl = Duration::from_millis(300);
    let old = Election::new(a.clone(), "e")
        .unwrap()
        .with_ttl(ttl)
        .campaign("a")
        .await
        .unwrap();
    old.lock_guard().abandon().await;
    let new = tokio::time::timeout(
        T,
        Election::new(b.clone(), "e")
            .unwrap()
            .with_ttl(ttl)
            .campaign("b"),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(new.term() > old.term());
    tokio::time::timeout(T, old.lost()).await.unwrap();
    assert!(!fenced_put(a.as_ref(), old.fence(), "x", "old").await);
    assert!(old.proclaim("still me").await.is_err());
    assert!(fenced_put(b.as_ref(), new.fence(), "x", "new").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_bounds_holders_and_checks_the_count() {
    let store = MemStore::new();
    let sem = Semaphore::new(handle(&store));
    let p1 = sem.acquire("s", 2).await.unwrap();
    let p2 = sem.acquire("s", 2).await.unwrap();
    assert_ne!(p1.slot(), p2.slot());
    assert!(sem.try_acquire("s", 2).await.unwrap().is_none());
    assert!(matches!(
        sem.acquire("s", 3).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        sem.acquire("s", 0).await,
        Err(Error::InvalidArgument(_))
    ));
    // A cancelled waiter leaves nothing behind.
    let other = Semaphore::new(handle(&store));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), other.acquire("s", 2))
            .await
            .is_err()
    );
    let waiter = tokio::spawn(async move { other.acquire("s", 2).await });
    p1.release().await.unwrap();
    let p3 = joined(waiter).await;
    assert_eq!(p3.slot(), p1.slot());
    assert!(p3.fencing_token() > p1.fencing_token());
    drop((p2, p3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rwlock_readers_share_writer_excludes_and_is_preferred() {
    let store = MemStore::new();
    let rw = |s: &MemStore| {
        RwLock::new(handle(s), "rw")
            .unwrap()
            .with_ttl(Duration::from_secs(5))
    };
    let r1 = rw(&store).read().await.unwrap();
    let r2 = rw(&store).read().await.unwrap();
    let w = rw(&store);
    let writing = Arc::new(AtomicBool::new(false));
    let wf = writing.clone();
    let writer = tokio::spawn(async move {
        let g = w.write().await?;
        wf.store(true, Ordering::SeqCst);
        Ok::<_, Error>(g)
    });
    // The writer waits for both readers...
    assert!(tokio::time::timeout(Duration::from_millis(200), async {
        while !writing.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .is_err());
    // ...and, once it claims the lock, new readers wait behind it.
    let late = rw(&store);
    let mut late_read = tokio::spawn(async move { late.read().await });
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut late_read)
            .await
            .is_err()
    );
    r1.release().await.unwrap();
    drop(r2);
    let g = joined(writer).await;
    assert!(!late_read.is_finished());
    let h = handle(&store);
    assert!(fenced_put(h.as_ref(), g.fence(), "data", "w").await);
    g.release().await.unwrap();
    let r3 = joined(late_read).await;
    r3.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_reader_does_not_block_a_writer_forever() {
    let store = MemStore::new();
    let ttl = Duration::from_millis(300);
    let r = RwLock::new(handle(&store), "rw").unwrap().with_ttl(ttl);
    let reader = r.read().await.unwrap();
    reader.abandon().await;
    let g = tokio::time::timeout(T, r.write()).await.unwrap().unwrap();
    assert!(reader.is_lost());
    g.release().await.unwrap();
}

/// A mem handle whose watch streams can be broken on demand.
struct Flaky {
    inner: Arc<dyn Backend>,
    kill: tokio::sync::watch::Sender<u64>,
    watches: AtomicUsize,
}

#[async_trait]
impl KvStore for Flaky {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: Bytes, opts: PutOptions) -> Result<Revision> {
        self.inner.put(key, value, opts).await
    }
    async fn delete(&self, key: &str, opts: DeleteOptions) -> Result<bool> {
        self.inner.delete(key, opts).await
    }
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>> {
        self.inner.list(prefix, opts).await
    }
    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream> {
        self.watches.fetch_add(1, Ordering::SeqCst);
        let mut kill = self.kill.subscribe();
        kill.borrow_and_update();
        let inner = self.inner.watch(prefix, from).await?;
        let killed = futures::stream::once(async move {
            let _ = kill.changed().await;
            Err(Error::Compacted { oldest: 1 })
        });
        Ok(futures::stream::select(inner, killed).boxed())
    }
}
#[async_trait]
impl Txn for Flaky {
    async fn txn(&self, t: TxnRequest) -> Result<TxnOutcome> {
        self.inner.txn(t).await
    }
}
#[async_trait]
impl DistributedLock for Flaky {
    async fn lock(&self, n: &str, o: LockOptions) -> Result<LockGuard> {
        self.inner.lock(n, o).await
    }
    async fn try_lock(&self, n: &str, o: LockOptions) -> Result<Option<LockGuard>> {
        self.inner.try_lock(n, o).await
    }
}
impl Backend for Flaky {
    fn name(&self) -> &'static str {
        "flaky-mem"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_follows_and_resyncs_atomically() {
    let store = MemStore::new();
    let writer = handle(&store);
    put(writer.as_ref(), "cfg/a", "1").await;
    put(writer.as_ref(), "other", "x").await;
    let flaky = Arc::new(Flaky {
        inner: handle(&store),
        kill: tokio::sync::watch::channel(0).0,
        watches: AtomicUsize::new(0),
    });
    let m = Mirror::start(flaky.clone(), "cfg/").await.unwrap();
    assert_eq!(m.get("cfg/a").unwrap().value, Bytes::from("1"));
    assert!(m.get("other").is_none());
    let r = put(writer.as_ref(), "cfg/b", "2").await;
    let s = tokio::time::timeout(T, m.wait_for(r))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.len(), 2);
    // Break the watch; while it is broken, delete a key: the resync must
    // pick the delete up and swap in a state without it.
    flaky.kill.send_modify(|n| *n += 1);
    writer
        .delete("cfg/a", DeleteOptions::default())
        .await
        .unwrap();
    let r = put(writer.as_ref(), "cfg/c", "3").await;
    let s = tokio::time::timeout(T, m.wait_for(r))
        .await
        .unwrap()
        .unwrap();
    assert!(s.get("cfg/a").is_none(), "{s:?}");
    assert_eq!(s.len(), 2);
    tokio::time::timeout(T, async {
        while m.resyncs() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert!(m.snapshot().generation() >= 1);
    assert!(flaky.watches.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_equals_store_after_concurrent_writes() {
    let store = MemStore::new();
    let m = Mirror::start(handle(&store), "k/").await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let h = handle(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..50u64 {
                let key = format!("k/{}", (i * 7 + w) % 10);
                if (i + w) % 3 == 0 {
                    h.delete(&key, DeleteOptions::default()).await.unwrap();
                } else {
                    put(h.as_ref(), &key, format!("{w}-{i}")).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (s, listed) = settled(&m, handle(&store).as_ref(), "k/").await;
    let mine: Vec<_> = s
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    let theirs: Vec<_> = listed.into_iter().map(|kv| (kv.key, kv.value)).collect();
    assert_eq!(mine, theirs);
}

#[derive(Clone, Debug)]
enum MOp {
    Put(u8, u8),
    Delete(u8),
    /// Two keys in one transaction.
    Pair(u8, u8, u8),
    /// Break the mirror's watch (a reconnect or a compaction).
    Break,
}

fn mop() -> impl proptest::strategy::Strategy<Value = MOp> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0u8..8, any::<u8>()).prop_map(|(k, v)| MOp::Put(k, v)),
        2 => (0u8..8).prop_map(MOp::Delete),
        2 => (0u8..8, 0u8..8, any::<u8>()).prop_map(|(a, b, v)| MOp::Pair(a, b, v)),
        1 => Just(MOp::Break),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

    /// Three writers run generated op sequences concurrently while the
    /// mirror's watch is broken at generated points: at the end the
    /// mirror equals the store's listing at the same revision.
    #[test]
    fn mirror_equals_store_after_generated_workload(
        ops in proptest::collection::vec((0usize..3, mop()), 1..60)
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let store = MemStore::new();
            let flaky = Arc::new(Flaky {
                inner: handle(&store),
                kill: tokio::sync::watch::channel(0).0,
                watches: AtomicUsize::new(0),
            });
            let m = Mirror::start(flaky.clone(), "p/").await.unwrap();
            let mut per_writer: Vec<Vec<MOp>> = vec![Vec::new(); 3];
            for (w, op) in ops {
                per_writer[w].push(op);
            }
            let mut tasks = Vec::new();
            for ops in per_writer {
                let (h, flaky) = (handle(&store), flaky.clone());
                tasks.push(tokio::spawn(async move {
                    for op in ops {
                        match op {
                            MOp::Put(k, v) => {
                                put(h.as_ref(), &format!("p/{k}"), vec![v]).await;
                            }
                            MOp::Delete(k) => {
                                h.delete(&format!("p/{k}"), DeleteOptions::default()).await.unwrap();
                            }
                            MOp::Pair(a, b, v) => {
                                let mut t = TxnRequest::new().then([Op::put(format!("p/{a}"), vec![v])]);
                                if a != b {
                                    t = t.then([Op::delete(format!("p/{b}"))]);
                                }
                                h.txn(t).await.unwrap();
                            }
                            MOp::Break => flaky.kill.send_modify(|n| *n += 1),
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let (s, listed) = settled(&m, handle(&store).as_ref(), "p/").await;
            let mine: Vec<_> = s.iter().map(|kv| (kv.key.clone(), kv.value.clone(), kv.revision)).collect();
            let theirs: Vec<_> = listed.into_iter().map(|kv| (kv.key, kv.value, kv.revision)).collect();
            assert_eq!(mine, theirs);
        });
    }
}

/// Mirrors started while a writer commits `p/a = p/b = i` in one txn
/// after another: no snapshot any of them publishes shows `a != b` (a
/// state the store never had), and each ends on the final pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_started_mid_stream_never_shows_half_a_txn() {
    let store = MemStore::new();
    let w = handle(&store);
    let writer = tokio::spawn(async move {
        let mut last = 0;
        for i in 0..400u32 {
            let v = i.to_string();
            last = w
                .txn(TxnRequest::new().then([Op::put("p/a", v.clone()), Op::put("p/b", v)]))
                .await
                .unwrap()
                .revision;
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        last
    });
    let mut checkers = Vec::new();
    for _ in 0..5 {
        let m = Mirror::start(handle(&store), "p/").await.unwrap();
        let mut rx = m.subscribe();
        checkers.push(tokio::spawn(async move {
            loop {
                let s = rx.borrow_and_update().clone();
                let (a, b) = (
                    s.get("p/a").map(|kv| kv.value.clone()),
                    s.get("p/b").map(|kv| kv.value.clone()),
                );
                assert_eq!(a, b, "a published snapshot shows half a txn: {s:?}");
                if a == Some(Bytes::from("399")) {
                    return m;
                }
                tokio::time::timeout(T, rx.changed())
                    .await
                    .unwrap()
                    .unwrap();
            }
        }));
        tokio::task::yield_now().await;
    }
    let last = writer.await.unwrap();
    for c in checkers {
        let m = tokio::time::timeout(T, c).await.unwrap().unwrap();
        assert!(m.revision() >= last);
    }
}
