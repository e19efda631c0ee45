//! Unit tests of the tricky parts: revisions, TTL expiry, watch history,
//! transactions, lock hand-over, cancellation and leases.

use crate::{connect, MemStore};
use futures::StreamExt;
use latchkey_core::{
    BackendUrl, Bytes, CmpOp, Compare, DeleteOptions, DistributedLock, Error, EventKind, KvStore,
    ListOptions, LockOptions, Op, OpResult, PutOptions, Txn, TxnRequest, WatchStream,
};
use std::time::Duration;
use tokio::time::timeout;

const LONG: Duration = Duration::from_secs(5);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn next(w: &mut WatchStream) -> latchkey_core::WatchEvent {
    timeout(LONG, w.next())
        .await
        .expect("a watch event in time")
        .expect("stream open")
        .expect("no error")
}

#[tokio::test]
async fn revisions_cas_and_aba() {
    let s = MemStore::new();
    let h = s.handle("").unwrap();
    let r1 = h.put("k", b("a"), PutOptions::default()).await.unwrap();
    assert_eq!(r1, 1);
    let kv = h.get("k").await.unwrap().unwrap();
    assert_eq!((kv.value, kv.revision, kv.lease_ttl), (b("a"), r1, None));
    // if_absent on an existing key.
    match h.put("k", b("x"), PutOptions::if_absent()).await {
        Err(Error::Conflict { key, current }) => {
            assert_eq!((key.as_str(), current), ("k", Some(r1)))
        }
        other => panic!("{other:?}"),
    }
    let r2 = h
        .put("k", b("b"), PutOptions::if_revision(r1))
        .await
        .unwrap();
    assert!(r2 > r1);
    assert!(matches!(
        h.put("k", b("c"), PutOptions::if_revision(r1)).await,
        Err(Error::Conflict { current: Some(c), .. }) if c == r2
    ));
    // Delete and re-create with the same value: the old revision never matches again.
    assert!(matches!(
        h.delete(
            "k",
            DeleteOptions {
                if_revision: Some(r1)
            }
        )
        .await,
        Err(Error::Conflict { .. })
    ));
    assert!(h
        .delete(
            "k",
            DeleteOptions {
                if_revision: Some(r2)
            }
        )
        .await
        .unwrap());
    assert!(!h.delete("k", DeleteOptions::default()).await.unwrap());
    let r3 = h.put("k", b("a"), PutOptions::if_absent()).await.unwrap();
    assert!(r3 > r2 + 1, "the delete used a revision too");
    assert!(matches!(
        h.put("k", b("z"), PutOptions::if_revision(r1)).await,
        Err(Error::Conflict { .. })
    ));
    assert_eq!(h.get("k").await.unwrap().unwrap().value, b("a"));
    // Absent keys have revision 0 for CAS.
    assert!(h
        .put("new", b("v"), PutOptions::if_revision(0))
        .await
        .is_ok());
    assert!(matches!(
        h.delete(
            "absent",
            DeleteOptions {
                if_revision: Some(7)
            }
        )
        .await,
        Err(Error::Conflict { current: None, .. })
    ));
}

#[tokio::test]
async fn invalid_input_is_typed() {
    let h = MemStore::new().handle("").unwrap();
    assert!(matches!(h.get("").await, Err(Error::InvalidKey { .. })));
    assert!(matches!(
        h.put("a\0", b(""), PutOptions::default()).await,
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        h.put(
            "k",
            Bytes::from(vec![0; 512 * 1024 + 1]),
            PutOptions::default()
        )
        .await,
        Err(Error::InvalidValue { .. })
    ));
    assert!(matches!(
        h.put("k", b(""), PutOptions::ttl(Duration::ZERO)).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        h.lock("", LockOptions::default()).await,
        Err(Error::InvalidKey { .. })
    ));
    let big = TxnRequest::new().then((0..129).map(|i| Op::put(format!("k{i}"), "v")));
    assert!(matches!(h.txn(big).await, Err(Error::InvalidArgument(_))));
    assert!(MemStore::new().handle("bad\nns").is_err());
    assert_eq!(h.store().revision(), 0, "nothing was written");
}

#[tokio::test]
async fn list_prefix_limit_keys_only_and_namespaces() {
    let s = MemStore::new();
    let a = s.handle("a").unwrap();
    let other = s.handle("ab").unwrap();
    for k in ["x1", "x2", "x10", "y", "xa/b"] {
        a.put(k, b(k), PutOptions::default()).await.unwrap();
    }
    other
        .put("x3", b("o"), PutOptions::default())
        .await
        .unwrap();
    let keys = |v: Vec<latchkey_core::KeyValue>| v.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
    assert_eq!(
        keys(a.list("x", ListOptions::default()).await.unwrap()),
        ["x1", "x10", "x2", "xa/b"]
    );
    assert_eq!(
        keys(a.list("", ListOptions::default()).await.unwrap()).len(),
        5
    );
    let l = a
        .list(
            "x",
            ListOptions {
                limit: Some(2),
                keys_only: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(keys(l.clone()), ["x1", "x10"]);
    assert!(l.iter().all(|kv| kv.value.is_empty() && kv.revision > 0));
    assert_eq!(
        keys(other.list("", ListOptions::default()).await.unwrap()),
        ["x3"]
    );
    assert!(other.get("x1").await.unwrap().is_none());
}

#[tokio::test]
async fn ttl_expiry_deletes_with_event_and_plain_put_clears_ttl() {
    let s = MemStore::new();
    let h = s.handle("t").unwrap();
    let mut w = h.watch("", None).await.unwrap();
    let r1 = h
        .put("e", b("v"), PutOptions::ttl(Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(
        h.get("e").await.unwrap().unwrap().lease_ttl,
        Some(Duration::from_millis(50))
    );
    assert_eq!(next(&mut w).await.revision, r1);
    let ev = next(&mut w).await;
    assert_eq!((ev.kind, ev.key.as_str()), (EventKind::Delete, "e"));
    assert!(ev.revision > r1);
    assert!(h.get("e").await.unwrap().is_none());

    h.put("p", b("v"), PutOptions::ttl(Duration::from_millis(30)))
        .await
        .unwrap();
    h.put("p", b("w"), PutOptions::default()).await.unwrap();
    assert_eq!(h.get("p").await.unwrap().unwrap().lease_ttl, None);
    // Wait past the old deadline using a key that does expire as the clock.
    h.put("clock", b(""), PutOptions::ttl(Duration::from_millis(60)))
        .await
        .unwrap();
    loop {
        let ev = next(&mut w).await;
        assert!(
            !(ev.key == "p" && ev.kind == EventKind::Delete),
            "p must not expire: {ev:?}"
        );
        if ev.key == "clock" && ev.kind == EventKind::Delete {
            break;
        }
    }
    assert_eq!(h.get("p").await.unwrap().unwrap().value, b("w"));
}

#[tokio::test]
async fn watch_replays_history_and_reports_compaction() {
    let s = MemStore::with_history_limit(5);
    let h = s.handle("w").unwrap();
    let mut revs = vec![];
    for i in 0..10 {
        revs.push(
            h.put(&format!("k{i}"), b("v"), PutOptions::default())
                .await
                .unwrap(),
        );
    }
    let mut w = h.watch("k", Some(revs[6])).await.unwrap();
    for r in &revs[6..] {
        assert_eq!(next(&mut w).await.revision, *r);
    }
    match h.watch("", Some(revs[2])).await {
        Err(Error::Compacted { oldest }) => assert_eq!(oldest, revs[5]),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // A live watch without `from` starts after the current revision.
    let mut live = h.watch("k1", None).await.unwrap();
    h.put("zz", b(""), PutOptions::default()).await.unwrap();
    let r = h.put("k1", b("new"), PutOptions::default()).await.unwrap();
    let ev = next(&mut live).await;
    assert_eq!(
        (ev.key.as_str(), ev.revision, ev.value),
        ("k1", r, b("new"))
    );
}

#[tokio::test]
async fn txn_atomic_branches_and_shared_revision() {
    let s = MemStore::new();
    let h = s.handle("x").unwrap();
    let r = h.put("a", b("1"), PutOptions::default()).await.unwrap();
    let out = h
        .txn(
            TxnRequest::new()
                .when([
                    Compare::value("a", "1"),
                    Compare::absent("b"),
                    Compare::revision("b", CmpOp::Equal, 0),
                ])
                .then([
                    Op::put("b", "2"),
                    Op::delete("a"),
                    Op::delete("nothing"),
                    Op::get("b"),
                ])
                .otherwise([Op::get("a")]),
        )
        .await
        .unwrap();
    assert!(out.succeeded);
    assert_eq!(out.revision, r + 1);
    assert_eq!(out.results[0], OpResult::Put { revision: r + 1 });
    assert_eq!(out.results[1], OpResult::Delete { deleted: true });
    assert_eq!(out.results[2], OpResult::Delete { deleted: false });
    assert!(matches!(&out.results[3], OpResult::Get(Some(kv)) if kv.value == b("2")));
    let out = h
        .txn(
            TxnRequest::new()
                .when([Compare::exists("a")])
                .then([Op::put("c", "x")])
                .otherwise([Op::get("b")]),
        )
        .await
        .unwrap();
    assert!(!out.succeeded);
    assert_eq!(out.revision, r + 1, "a read-only branch writes nothing");
    assert!(h.get("c").await.unwrap().is_none());
}

#[tokio::test]
async fn locks_exclude_hand_over_fifo_and_fence() {
    let s = MemStore::new();
    let a = s.handle("l").unwrap();
    let bh = s.handle("l").unwrap();
    let c = s.handle("l").unwrap();
    let opts = LockOptions::ttl(Duration::from_secs(5));
    let g1 = a.lock("m", opts.clone()).await.unwrap();
    assert!(bh.try_lock("m", opts.clone()).await.unwrap().is_none());
    assert_eq!(a.lock_queue_len("m").unwrap(), 0, "try_lock leaves nothing");
    let (bo, co) = (opts.clone(), opts.clone());
    let b2 = bh.clone();
    let wb = tokio::spawn(async move { b2.lock("m", bo).await });
    while a.lock_queue_len("m").unwrap() < 1 {
        tokio::task::yield_now().await;
    }
    let c2 = c.clone();
    let wc = tokio::spawn(async move { c2.lock("m", co).await });
    while a.lock_queue_len("m").unwrap() < 2 {
        tokio::task::yield_now().await;
    }
    // Waiters make no requests while they wait.
    let before = (bh.op_count(), c.op_count());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!((bh.op_count(), c.op_count()), before);
    // A fenced write by the holder commits.
    let fenced = TxnRequest::new()
        .when([Compare::held(&g1)])
        .then([Op::put("data", "a")]);
    assert!(a.txn(fenced.clone()).await.unwrap().succeeded);
    let t1 = g1.fencing_token();
    g1.release().await.unwrap();
    g1.release().await.unwrap();
    assert!(
        !a.txn(fenced).await.unwrap().succeeded,
        "released: not held"
    );
    let g2 = timeout(LONG, wb).await.unwrap().unwrap().unwrap();
    assert!(g2.fencing_token() > t1);
    assert!(!wc.is_finished());
    drop(g2); // background release hands over to c
    let g3 = timeout(LONG, wc).await.unwrap().unwrap().unwrap();
    assert!(g3.fencing_token() > t1);
    assert_eq!(c.lock_holder_token("m").unwrap(), Some(g3.fencing_token()));
}

#[tokio::test]
async fn cancelled_and_timed_out_waiters_leave_nothing() {
    let s = MemStore::new();
    let a = s.handle("").unwrap();
    let bh = s.handle("").unwrap();
    let g = a
        .lock("m", LockOptions::ttl(Duration::from_secs(5)))
        .await
        .unwrap();
    let r = bh
        .lock(
            "m",
            LockOptions::ttl(Duration::from_secs(5)).with_wait(Duration::from_millis(30)),
        )
        .await;
    assert!(matches!(r, Err(Error::Timeout { .. })));
    assert_eq!(a.lock_queue_len("m").unwrap(), 0);
    let b2 = bh.clone();
    let w =
        tokio::spawn(async move { b2.lock("m", LockOptions::ttl(Duration::from_secs(5))).await });
    while a.lock_queue_len("m").unwrap() < 1 {
        tokio::task::yield_now().await;
    }
    w.abort();
    let _ = w.await;
    assert_eq!(a.lock_queue_len("m").unwrap(), 0);
    g.release().await.unwrap();
    assert_eq!(a.lock_holder_token("m").unwrap(), None, "nobody got it");
    // Zero wait on a free lock still takes it.
    let g = bh
        .lock(
            "m",
            LockOptions::ttl(Duration::from_secs(5)).with_wait(Duration::ZERO),
        )
        .await
        .unwrap();
    assert!(g.fencing_token() > 0);
}

#[tokio::test]
async fn abandoned_lock_expires_to_the_next_waiter_and_lost_fires() {
    let s = MemStore::new();
    let a = s.handle("").unwrap();
    let bh = s.handle("").unwrap();
    let ttl = Duration::from_millis(100);
    let g = a.lock("m", LockOptions::ttl(ttl)).await.unwrap();
    // Held well past the TTL while renewed.
    tokio::time::sleep(ttl * 3).await;
    assert!(!g.is_lost());
    assert_eq!(a.lock_holder_token("m").unwrap(), Some(g.fencing_token()));
    let b2 = bh.clone();
    let w = tokio::spawn(async move { b2.lock("m", LockOptions::ttl(ttl)).await });
    g.abandon().await;
    timeout(LONG, g.lost()).await.unwrap();
    let g2 = timeout(LONG, w).await.unwrap().unwrap().unwrap();
    assert!(g2.fencing_token() > g.fencing_token());
    let stale = TxnRequest::new()
        .when([Compare::held(&g)])
        .then([Op::put("d", "old")]);
    assert!(!a.txn(stale).await.unwrap().succeeded);
    let fresh = TxnRequest::new()
        .when([Compare::held(&g2)])
        .then([Op::put("d", "new")]);
    assert!(bh.txn(fresh).await.unwrap().succeeded);
}

#[tokio::test]
async fn revoked_lock_fires_lost_at_next_renewal() {
    let s = MemStore::new();
    let a = s.handle("").unwrap();
    let g = a
        .lock("m", LockOptions::ttl(Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(a.revoke_lock("m").unwrap());
    timeout(LONG, g.lost()).await.unwrap();
    g.release().await.unwrap();
}

#[tokio::test]
async fn tasks_of_one_handle_exclude_each_other() {
    let s = MemStore::new();
    let a = s.handle("").unwrap();
    let opts = LockOptions::ttl(Duration::from_secs(5));
    let g = a.lock("m", opts.clone()).await.unwrap();
    assert!(a.try_lock("m", opts.clone()).await.unwrap().is_none());
    let a2 = a.clone();
    let o2 = opts.clone();
    let w = tokio::spawn(async move { a2.lock("m", o2).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!w.is_finished());
    let t = g.fencing_token();
    g.release().await.unwrap();
    let g2 = timeout(LONG, w).await.unwrap().unwrap().unwrap();
    assert!(g2.fencing_token() > t);
}

#[tokio::test]
async fn urls() {
    let h = connect(BackendUrl::parse("mem://unit-url?namespace=n1").unwrap())
        .await
        .unwrap();
    h.put("k", b("v"), PutOptions::default()).await.unwrap();
    let same = MemStore::named("unit-url").handle("n1").unwrap();
    assert_eq!(same.get("k").await.unwrap().unwrap().value, b("v"));
    let other_ns = connect(BackendUrl::parse("mem://unit-url").unwrap())
        .await
        .unwrap();
    assert!(other_ns.get("k").await.unwrap().is_none());
    assert_eq!(h.name(), "mem");
    for bad in [
        "mem://x?foo=1",
        "mem://a:1",
        "mem://u:p@x",
        "mem://x/path",
        "mem://a,b",
        "redis://x",
    ] {
        let r = connect(BackendUrl::parse(bad).unwrap()).await;
        assert!(matches!(r, Err(Error::InvalidUrl { .. })), "{bad}");
        if let Err(e) = r {
            assert!(!e.to_string().contains(":p@"), "{e}");
        }
    }
    assert!(connect(BackendUrl::parse("mem://").unwrap()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_locks_renew_in_one_request_per_tick() {
    let s = MemStore::new();
    let h = s.handle("many").unwrap();
    let ttl = Duration::from_millis(300);
    let mut guards = Vec::new();
    for i in 0..2000 {
        guards.push(
            h.try_lock(&format!("l{i}"), LockOptions::ttl(ttl))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let before = h.op_count();
    tokio::time::sleep(ttl * 3).await;
    let renewals = h.op_count() - before;
    // About 9 ticks (every TTL/3), one request each: far fewer than 2000.
    assert!((3..=30).contains(&renewals), "{renewals} requests");
    assert!(guards.iter().all(|g| !g.is_lost()));
    let other = s.handle("many").unwrap();
    assert!(other
        .try_lock("l1999", LockOptions::ttl(ttl))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_slow_watcher_never_blocks_writers_nor_loses_events() {
    let h = MemStore::new().handle("").unwrap();
    let mut w = h.watch("k", None).await.unwrap();
    let mut last = 0;
    for i in 0..20_000u32 {
        last = h
            .put(
                "k",
                Bytes::from(i.to_be_bytes().to_vec()),
                PutOptions::default(),
            )
            .await
            .unwrap();
    }
    for i in 0..20_000u32 {
        let ev = next(&mut w).await;
        assert_eq!(ev.value, Bytes::from(i.to_be_bytes().to_vec()));
    }
    assert_eq!(last, 20_000);
}

#[tokio::test]
async fn dropped_watch_is_forgotten() {
    let h = MemStore::new().handle("").unwrap();
    for _ in 0..10 {
        drop(h.watch("", None).await.unwrap());
    }
    h.put("k", b("v"), PutOptions::default()).await.unwrap();
    let n = h.store().shared().run(|st, _| st.watcher_count());
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusion_and_increasing_tokens_under_contention() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let s = MemStore::new();
    let counter = Arc::new(AtomicU64::new(0));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..8 {
        // Two tasks per handle: local queueing and remote queueing both used.
        let h = s.handle("c").unwrap();
        for _ in 0..2 {
            let (h, counter, tokens) = (h.clone(), counter.clone(), tokens.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let g = h
                        .lock("ctr", LockOptions::ttl(Duration::from_secs(5)))
                        .await
                        .unwrap();
                    // A non-atomic read-modify-write: only exclusion keeps it exact.
                    let v = counter.load(Ordering::SeqCst);
                    tokens.lock().unwrap().push(g.fencing_token());
                    if t % 2 == 0 {
                        tokio::task::yield_now().await;
                    }
                    counter.store(v + 1, Ordering::SeqCst);
                    g.release().await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        timeout(Duration::from_secs(30), t).await.unwrap().unwrap();
    }
    assert_eq!(counter.load(Ordering::SeqCst), 800);
    let tokens = tokens.lock().unwrap();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens increase in acquisition order"
    );
}
