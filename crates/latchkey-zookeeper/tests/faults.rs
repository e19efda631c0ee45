//! Fault tests on private servers (the testkit spawns them; these tests kill
//! members and cut connections, so they never use a shared or external
//! server): leader failover under a lock workload, an expired holder
//! session, and a lock entry created just before the connection broke.

mod support;

use latchkey_conformance::checkers::{check_exclusion, Holding};
use latchkey_core::{
    Bytes, CmpOp, Compare, Error, KvStore, LockOptions, Op, PutOptions, Txn, TxnRequest,
};
use latchkey_core::{DistributedLock, LockGuard};
use latchkey_testkit::{spawn_zookeeper, spawn_zookeeper_ensemble, unique_namespace, FaultProxy};
use latchkey_zookeeper::ZookeeperBackend;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{open, options};
use tokio::time::{timeout, Instant};

/// Retries `f` while it fails with a transient error (a failover in progress).
async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = latchkey_core::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e)
                if (e.is_transient() || matches!(e, Error::Indeterminate { .. }))
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

async fn read_counter(h: &ZookeeperBackend) -> (u64, u64) {
    let kv = retry("read counter", || h.get("n"))
        .await
        .expect("counter exists");
    let n = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
    (n, kv.revision)
}

/// One increment of `n` under `g`, fenced: commits only while `g` holds the
/// lock and nobody else wrote `n`. `Ok(false)` when the guard was lost.
async fn fenced_increment(h: &ZookeeperBackend, g: &LockGuard) -> bool {
    loop {
        let (n, rev) = read_counter(h).await;
        let txn = TxnRequest::new()
            .when([Compare::held(g), Compare::revision("n", CmpOp::Equal, rev)])
            .then([Op::put("n", (n + 1).to_string())]);
        match h.txn(txn).await {
            Ok(o) if o.succeeded => return true,
            Ok(_) => {
                // Either the lock is gone, or (impossible under exclusion)
                // someone else wrote n.
                let (now, _) = read_counter(h).await;
                assert_eq!(now, n, "n changed under the lock");
                return false;
            }
            Err(e) if e.is_transient() || matches!(e, Error::Indeterminate { .. }) => {
                // Outcome unknown: under the lock only we write n, so the
                // counter tells whether it committed.
                let (now, _) = read_counter(h).await;
                if now == n + 1 {
                    return true;
                }
                assert_eq!(now, n, "n moved by someone else under the lock");
            }
            Err(e) => panic!("fenced increment: {e}"),
        }
    }
}

/// Kills the ensemble leader while 4 handles take turns on one lock and
/// increment a counter with fenced writes: exclusion and token order hold
/// (checker), every task finishes, and the counter equals the number of
/// increments that committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_during_lock_workload() {
    let cluster = spawn_zookeeper_ensemble(3, options()).expect("ensemble");
    let url = cluster.url().to_string();
    let ns = unique_namespace("zk-failover");
    let base = Instant::now();
    let micros = move || base.elapsed().as_micros() as u64;
    let handles: Vec<ZookeeperBackend> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(open(&url, &ns, "session_timeout=4s").await.expect("open"));
        }
        v
    };
    handles[0]
        .put("n", Bytes::from("0"), PutOptions::default())
        .await
        .unwrap();
    const ITER: usize = 12;
    let history = Arc::new(Mutex::new(Vec::<Holding>::new()));
    let committed = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for (client, h) in handles.iter().cloned().enumerate() {
        let (history, committed, progress) = (history.clone(), committed.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ITER {
                let g = retry("lock", || {
                    h.lock("w", LockOptions::ttl(Duration::from_secs(4)))
                })
                .await;
                let acquired = micros();
                if fenced_increment(&h, &g).await {
                    committed.fetch_add(1, Ordering::SeqCst);
                    progress.notify_one();
                }
                let released = micros();
                history.lock().unwrap().push(Holding {
                    lock: "w".into(),
                    client,
                    token: g.fencing_token(),
                    acquired,
                    released,
                });
                let _ = g.release().await;
            }
        }));
    }
    // Kill the leader once the workload is well under way.
    while committed.load(Ordering::SeqCst) < ITER {
        progress.notified().await;
    }
    let leader = cluster.leader_index().expect("leader");
    cluster.members()[leader].kill().expect("kill leader");
    for t in tasks {
        timeout(Duration::from_secs(90), t)
            .await
            .expect("workload must complete after the failover")
            .expect("task");
    }
    let history = history.lock().unwrap().clone();
    assert_eq!(history.len(), 4 * ITER);
    if let Err(v) = check_exclusion(&history) {
        panic!("{v}");
    }
    let survivor = &handles[(leader + 1) % handles.len()];
    let (n, _) = read_counter(survivor).await;
    assert_eq!(n as usize, committed.load(Ordering::SeqCst));
    assert!(n as usize >= 4 * ITER - 4, "most increments commit ({n})");
}

/// A holder cut off (black-holed) past its session timeout: its `lost()`
/// fires, the next waiter gets the lock with a larger token, and the old
/// holder's fenced write fails once it is reconnected, while the
/// successor's succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_holder_session() {
    let server = spawn_zookeeper(options()).expect("zookeeper");
    let proxy = FaultProxy::start(server.addr().unwrap()).expect("proxy");
    let via = format!("zookeeper://{}", proxy.addr());
    let ns = unique_namespace("zk-expiry");
    // The main session (4 s) outlives the cut; the lock session (1 s) not.
    let holder = open(&via, &ns, "session_timeout=4s").await.expect("holder");
    let other = open(server.url(), &ns, "").await.expect("other");
    let ttl = Duration::from_secs(1);
    let g = holder
        .lock("job", LockOptions::ttl(ttl))
        .await
        .expect("lock");
    let t1 = g.fencing_token();
    let first = holder
        .txn(
            TxnRequest::new()
                .when([Compare::held(&g)])
                .then([Op::put("out", "holder")]),
        )
        .await
        .unwrap();
    assert!(first.succeeded, "a fenced write while held commits");
    let waiter = {
        let other = other.clone();
        tokio::spawn(async move {
            other
                .lock("job", LockOptions::ttl(Duration::from_secs(4)))
                .await
        })
    };
    proxy.black_hole();
    let cut = Instant::now();
    timeout(ttl * 3, g.lost())
        .await
        .expect("lost() fires once the session timeout passed");
    assert!(
        cut.elapsed() <= ttl + Duration::from_millis(500),
        "lost() after {:?}",
        cut.elapsed()
    );
    let g2 = timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter gets the lock after the server expired the holder")
        .unwrap()
        .expect("lock");
    assert!(
        g.is_lost(),
        "the old holder knew before the successor got the lock"
    );
    assert!(g2.fencing_token() > t1);
    proxy.pass();
    let stale = retry("stale fenced write", || {
        holder.txn(
            TxnRequest::new()
                .when([Compare::held(&g)])
                .then([Op::put("out", "stale")]),
        )
    })
    .await;
    assert!(
        !stale.succeeded,
        "the expired holder's fenced write must fail"
    );
    let fresh = other
        .txn(
            TxnRequest::new()
                .when([Compare::held(&g2)])
                .then([Op::put("out", "successor")]),
        )
        .await
        .unwrap();
    assert!(fresh.succeeded);
    g.release().await.expect("releasing a lost guard is Ok");
    let still = other
        .txn(
            TxnRequest::new()
                .when([Compare::held(&g2)])
                .then([Op::get("out")]),
        )
        .await
        .unwrap();
    assert!(still.succeeded, "the stale release spared the successor");
    assert_eq!(
        other.get("out").await.unwrap().unwrap().value,
        Bytes::from("successor")
    );
    g2.release().await.unwrap();
}

/// Lists the entries of lock `name` as the server has them.
async fn entries(observer: &ZookeeperBackend, name: &str) -> Vec<String> {
    match observer
        .client()
        .list_children(&observer.lock_path(name))
        .await
    {
        Ok(c) => c,
        Err(zookeeper_client::Error::NoNode) => Vec::new(),
        Err(e) => panic!("list entries: {e}"),
    }
}

async fn wait_entries(observer: &ZookeeperBackend, name: &str, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = entries(observer, name).await;
        if e.len() == want || Instant::now() > deadline {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The lock entry is created on the server but the reply is lost (the
/// connection is reset while the reply is delayed): the adapter finds its
/// entry again by its uuid, or removes it, so no orphan ever blocks the
/// lock. Checked for `try_lock` (own recipe) and `lock` (the crate's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_then_disconnect_leaves_no_orphan() {
    let server = spawn_zookeeper(options()).expect("zookeeper");
    let proxy = FaultProxy::start(server.addr().unwrap()).expect("proxy");
    let via = format!("zookeeper://{}", proxy.addr());
    let ns = unique_namespace("zk-orphan");
    let h = open(&via, &ns, "session_timeout=4s").await.expect("handle");
    let observer = open(server.url(), &ns, "").await.expect("observer");
    let opts = LockOptions::ttl(Duration::from_secs(4));
    // Open the 4 s lock session now, so the cut hits only the create.
    h.try_lock("warmup", opts.clone())
        .await
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
    for (round, blocking) in [(0, false), (1, true)] {
        let name = format!("c{round}");
        proxy.latency(Duration::from_millis(400), Duration::ZERO);
        let pending = {
            let (h, name, opts) = (h.clone(), name.clone(), opts.clone());
            tokio::spawn(async move {
                if blocking {
                    h.lock(&name, opts).await.map(Some)
                } else {
                    h.try_lock(&name, opts).await
                }
            })
        };
        let seen = wait_entries(&observer, &name, 1).await;
        assert_eq!(seen.len(), 1, "the create reached the server");
        // The reply is still on its way back: cut it off.
        proxy.reset_connections();
        proxy.pass();
        let outcome = timeout(Duration::from_secs(20), pending)
            .await
            .expect("returns")
            .unwrap();
        match outcome {
            Ok(Some(g)) => {
                let e = entries(&observer, &name).await;
                assert_eq!(e.len(), 1, "exactly one entry while held, no orphan: {e:?}");
                assert!(
                    g.entry().id.ends_with(&e[0]),
                    "the guard owns the entry it created"
                );
                g.release().await.unwrap();
                let left = wait_entries(&observer, &name, 0).await;
                assert!(left.is_empty(), "released: nothing left ({left:?})");
            }
            Ok(None) => panic!("the lock was free, the retried try_lock must not report it busy"),
            Err(e) => {
                // Giving up is allowed; leaving an entry behind is not.
                let left = wait_entries(&observer, &name, 0).await;
                assert!(left.is_empty(), "after {e}: orphan entries {left:?}");
            }
        }
        // The lock is usable by others at once.
        let g = observer
            .try_lock(&name, opts.clone())
            .await
            .unwrap()
            .expect("free");
        g.release().await.unwrap();
    }
}

/// The handle's main session expires (cut off longer than its timeout):
/// calls fail with `Unavailable` meanwhile, and once the network heals the
/// handle opens a new session by itself and works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn main_session_expiry_recovers() {
    let server = spawn_zookeeper(options()).expect("zookeeper");
    let proxy = FaultProxy::start(server.addr().unwrap()).expect("proxy");
    let via = format!("zookeeper://{}", proxy.addr());
    let ns = unique_namespace("zk-reopen");
    let h = open(&via, &ns, "session_timeout=1s").await.expect("handle");
    h.put("k", Bytes::from("v"), PutOptions::default())
        .await
        .unwrap();
    let old = h.session_id();
    proxy.black_hole();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.client().state() != zookeeper_client::SessionState::Expired {
        assert!(
            Instant::now() < deadline,
            "the client never declared its session expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.pass();
    let kv = retry("get after the session expired", || h.get("k")).await;
    assert_eq!(kv.unwrap().value, Bytes::from("v"));
    assert_ne!(
        h.session_id(),
        old,
        "a new session replaced the expired one"
    );
}

/// Child side of [`paused_holder_process`]: holds lock `job` with a 1 s TTL
/// until told to go on, then reports whether `lost()` fired and whether a
/// fenced write still commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_role() {
    use latchkey_testkit::child;
    if !child::is_child() {
        return;
    }
    let url = std::env::var("ZK_HOLDER_URL").unwrap();
    let ns = std::env::var("ZK_HOLDER_NS").unwrap();
    let h = open(&url, &ns, "session_timeout=4s").await.unwrap();
    let g = h
        .lock("job", LockOptions::ttl(Duration::from_secs(1)))
        .await
        .unwrap();
    let w = h
        .txn(
            TxnRequest::new()
                .when([Compare::held(&g)])
                .then([Op::put("out", "holder")]),
        )
        .await
        .unwrap();
    assert!(w.succeeded);
    child::send(&format!("held {}", g.fencing_token()));
    let go = tokio::task::spawn_blocking(child::recv).await.unwrap();
    assert_eq!(go.as_deref(), Some("go"));
    // Resumed after a pause longer than the TTL: lost() completes at once.
    let lost = timeout(Duration::from_secs(2), g.lost()).await.is_ok();
    let stale = retry("stale fenced write", || {
        h.txn(
            TxnRequest::new()
                .when([Compare::held(&g)])
                .then([Op::put("out", "stale")]),
        )
    })
    .await;
    child::send(&format!("lost={lost} stale_committed={}", stale.succeeded));
    let _ = tokio::task::spawn_blocking(child::recv).await;
}

/// The holder's *process* is frozen (SIGSTOP) past its session timeout, as a
/// GC pause would: the next waiter gets the lock with a larger token; when
/// the holder resumes, its `lost()` has fired and its fenced write fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_holder_process() {
    use latchkey_testkit::child::ChildProcess;
    let server = spawn_zookeeper(options()).expect("zookeeper");
    let ns = unique_namespace("zk-pause");
    let mut holder = ChildProcess::spawn_test(
        "holder_role",
        &[
            ("ZK_HOLDER_URL", server.url()),
            ("ZK_HOLDER_NS", ns.as_str()),
        ],
    )
    .expect("spawn holder");
    let held = holder
        .recv(Duration::from_secs(30))
        .expect("holder reports");
    let t1: u64 = held
        .strip_prefix("held ")
        .expect("held <token>")
        .parse()
        .unwrap();
    let other = open(server.url(), &ns, "").await.expect("other");
    let waiter = {
        let other = other.clone();
        tokio::spawn(async move {
            other
                .lock("job", LockOptions::ttl(Duration::from_secs(4)))
                .await
        })
    };
    holder.pause().expect("SIGSTOP");
    let g2 = timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter gets the lock while the holder is frozen")
        .unwrap()
        .expect("lock");
    assert!(g2.fencing_token() > t1);
    let fresh = other
        .txn(
            TxnRequest::new()
                .when([Compare::held(&g2)])
                .then([Op::put("out", "successor")]),
        )
        .await
        .unwrap();
    assert!(fresh.succeeded);
    holder.resume().expect("SIGCONT");
    holder.send("go").unwrap();
    let report = holder
        .recv(Duration::from_secs(30))
        .expect("holder reports again");
    assert_eq!(report, "lost=true stale_committed=false");
    assert_eq!(
        other.get("out").await.unwrap().unwrap().value,
        Bytes::from("successor")
    );
    g2.release().await.unwrap();
    let _ = holder.send("quit");
}

/// Changes made while a watcher's connection is down are not replayed by
/// ZooKeeper (persistent watches carry no history): after the reconnect the
/// stream re-reads every watched key and delivers the latest state of each,
/// including keys deleted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_resyncs_after_reconnect() {
    use futures::StreamExt;
    use latchkey_core::{DeleteOptions, EventKind};
    let server = spawn_zookeeper(options()).expect("zookeeper");
    let proxy = FaultProxy::start(server.addr().unwrap()).expect("proxy");
    let via = format!("zookeeper://{}", proxy.addr());
    let ns = unique_namespace("zk-resync");
    let writer = open(server.url(), &ns, "").await.expect("writer");
    writer
        .put("w/gone", Bytes::from("x"), PutOptions::default())
        .await
        .unwrap();
    writer
        .put("w/kept", Bytes::from("0"), PutOptions::default())
        .await
        .unwrap();
    let watcher = open(&via, &ns, "session_timeout=4s")
        .await
        .expect("watcher");
    let mut stream = watcher.watch("w/", None).await.unwrap();
    // Cut the watcher off; it cannot reconnect until the proxy passes again.
    proxy.refuse();
    proxy.reset_connections();
    let mut last_rev = 0;
    for i in 1..=5 {
        last_rev = writer
            .put("w/kept", Bytes::from(i.to_string()), PutOptions::default())
            .await
            .unwrap();
    }
    writer
        .put("w/new", Bytes::from("n"), PutOptions::default())
        .await
        .unwrap();
    assert!(writer
        .delete("w/gone", DeleteOptions::default())
        .await
        .unwrap());
    proxy.pass();
    let mut kept = None;
    let mut new = false;
    let mut gone = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(kept == Some(last_rev) && new && gone) {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = timeout(left, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!("no final states after reconnect: kept={kept:?} new={new} gone={gone}")
            })
            .expect("stream open")
            .expect("no error: the session survived");
        match (ev.key.as_str(), ev.kind) {
            ("w/kept", EventKind::Put) => {
                assert!(
                    kept.is_none_or(|r| ev.revision > r),
                    "revisions increase per key"
                );
                kept = Some(ev.revision);
            }
            ("w/new", EventKind::Put) => new = true,
            ("w/gone", EventKind::Delete) => gone = true,
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(
        watcher.get("w/kept").await.unwrap().unwrap().value,
        Bytes::from("5")
    );
}

/// `Compare::held` decides from the server state, not from a lagging
/// member's copy: a follower that was paused while a lock was taken, and
/// answers a txn right after it resumes, must still see the holder's
/// entry. (Found in CI: an election's first fenced write right after
/// `lock()` failed on the ensemble because the txn's read of the entry
/// went to a member that had not applied its create yet.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_compare_on_a_lagging_member_sees_a_fresh_entry() {
    let cluster = spawn_zookeeper_ensemble(3, options()).expect("ensemble");
    let leader = cluster.leader_index().expect("leader");
    let follower = (leader + 1) % 3;
    let at = |i: usize| format!("zookeeper://{}", cluster.members()[i].addr().unwrap());
    let ns = unique_namespace("zk-lagging");
    let holder = open(&at(leader), &ns, "").await.expect("open holder");
    let checker = open(&at(follower), &ns, "").await.expect("open checker");
    for round in 0..50 {
        let paused = cluster.members()[follower].pause_guard().expect("pause");
        let g = holder
            .lock("l", LockOptions::ttl(Duration::from_secs(4)))
            .await
            .expect("the lock is taken on the other two members");
        drop(paused);
        let out = checker
            .txn(
                TxnRequest::new()
                    .when([Compare::held(&g)])
                    .then([Op::put("x", round.to_string())]),
            )
            .await
            .expect("txn");
        assert!(
            out.succeeded,
            "round {round}: the guard holds, its fenced write must commit"
        );
        g.release().await.expect("release");
    }
}
