//! Redis Cluster behaviour against a real 3-master cluster (the testkit's
//! shared one, or `LATCHKEY_TEST_REDIS_CLUSTER_URL`): URL validation, the
//! spread of namespaces over the masters (a namespace is one hash slot),
//! the empty namespace, and a slot migration of a live namespace under a
//! lock, fenced-counter, transaction and watch workload.

use bytes::Bytes;
use futures::StreamExt;
use latchkey_conformance::checkers::{check_exclusion, Clock, Holding};
use latchkey_core::{
    BackendUrl, CmpOp, Compare, DistributedLock, Error, EventKind, KvStore, ListOptions,
    LockOptions, Op, PutOptions, Txn, TxnRequest,
};
use latchkey_redis::RedisBackend;
use latchkey_testkit::unique_namespace;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

mod common;
use common::{cluster_url, node_con, OwnCluster};

fn url(base: &str, params: &str) -> BackendUrl {
    let sep = if base.contains('?') { '&' } else { '?' };
    BackendUrl::parse(&format!("{base}{sep}{params}")).expect("test URL")
}

async fn open(ns: &str) -> RedisBackend {
    RedisBackend::connect(&url(&cluster_url(), &format!("namespace={ns}")))
        .await
        .expect("connect to the cluster")
}

/// `host:port` of the URL's first node.
fn first_node() -> String {
    let u = cluster_url();
    let rest = u.split("://").nth(1).expect("scheme");
    let rest = rest.rsplit('@').next().unwrap();
    rest.split(['/', '?', ',']).next().unwrap().to_string()
}

/// A master of the cluster: id, `host:port`, its slot ranges.
#[derive(Clone, Debug)]
struct Master {
    id: String,
    addr: String,
    slots: Vec<(u16, u16)>,
}

fn masters() -> Vec<Master> {
    masters_of(&first_node())
}

fn masters_of(node: &str) -> Vec<Master> {
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut node_con(node))
        .expect("CLUSTER NODES");
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || !f[2].split(',').any(|x| x == "master") || f[2].contains("fail") {
            continue;
        }
        let addr = f[1].split('@').next().unwrap().to_string();
        let slots = f[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .map(|s| match s.split_once('-') {
                Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                None => (s.parse().unwrap(), s.parse().unwrap()),
            })
            .collect();
        out.push(Master {
            id: f[0].to_string(),
            addr,
            slots,
        });
    }
    out
}

fn keyslot(key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut node_con(&first_node()))
        .expect("CLUSTER KEYSLOT")
}

fn owner(masters: &[Master], slot: u16) -> &Master {
    masters
        .iter()
        .find(|m| m.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
        .expect("every slot has an owner")
}

/// Moves `slot` to master `to` the way `redis-cli --cluster reshard` does:
/// IMPORTING/MIGRATING, `MIGRATE` of every key in batches, then `SETSLOT
/// NODE` on every master.
fn migrate_slot(slot: u16, to: &Master) {
    let ms = masters();
    let from = owner(&ms, slot).clone();
    assert_ne!(from.id, to.id, "slot {slot} is already on {}", to.addr);
    let mut src = node_con(&from.addr);
    let mut dst = node_con(&to.addr);
    let setslot = |con: &mut redis::Connection, args: &[&str]| {
        let mut c = redis::cmd("CLUSTER");
        c.arg("SETSLOT").arg(slot);
        for a in args {
            c.arg(*a);
        }
        let _: () = c.query(con).expect("CLUSTER SETSLOT");
    };
    setslot(&mut dst, &["IMPORTING", &from.id]);
    setslot(&mut src, &["MIGRATING", &to.id]);
    let (host, port) = to.addr.rsplit_once(':').unwrap();
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query(&mut src)
            .expect("GETKEYSINSLOT");
        if keys.is_empty() {
            break;
        }
        let _: redis::Value = redis::cmd("MIGRATE")
            .arg(host)
            .arg(port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query(&mut src)
            .expect("MIGRATE");
    }
    setslot(&mut dst, &["NODE", &to.id]);
    setslot(&mut src, &["NODE", &to.id]);
    for m in ms.iter().filter(|m| m.id != from.id && m.id != to.id) {
        setslot(&mut node_con(&m.addr), &["NODE", &to.id]);
    }
}

#[tokio::test]
async fn cluster_urls_are_validated_before_any_io() {
    let bad = [
        ("redis+cluster://127.0.0.1:1/0", "database"),
        (
            "redis+cluster://127.0.0.1:1?ca=/nonexistent",
            "ca= needs rediss+cluster://",
        ),
        ("redis+cluster://127.0.0.1:1?bogus=1", "bogus"),
        ("redis+cluster://127.0.0.1:1?timeout=0s", "timeout"),
        ("redis+cluster://127.0.0.1:1?history=0", "history"),
        (
            "rediss+cluster://127.0.0.1:1?ca=/nonexistent/ca.pem",
            "CA file",
        ),
        ("redis://127.0.0.1:1,127.0.0.1:2", "redis+cluster://"),
    ];
    for (u, why) in bad {
        let parsed = BackendUrl::parse(u).expect("parses as a URL");
        match RedisBackend::connect(&parsed).await {
            Err(Error::InvalidUrl { .. }) => {}
            Err(e) => panic!("{u}: expected InvalidUrl ({why}), got {e}"),
            Ok(_) => panic!("{u}: accepted"),
        }
        let text = RedisBackend::connect(&parsed)
            .await
            .unwrap_err()
            .to_string();
        assert!(text.contains(why), "{u}: {text:?} should say {why:?}");
    }
    // Several seeds, a user and a password are fine (nobody listens on
    // these ports: Unavailable, not InvalidUrl), and the password is never
    // shown.
    let u = BackendUrl::parse("redis+cluster://u:s3cret@127.0.0.1:1,127.0.0.1:2?timeout=300ms")
        .unwrap();
    match RedisBackend::connect(&u).await {
        Err(e @ Error::Unavailable { .. }) => {
            assert!(!e.to_string().contains("s3cret"), "{e}")
        }
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

#[tokio::test]
async fn namespaces_spread_over_the_masters() {
    let ms = masters();
    assert_eq!(ms.len(), 3, "a 3-master cluster: {ms:?}");
    let base = unique_namespace("spread");
    let mut used = BTreeSet::new();
    for n in 0..32 {
        let ns = format!("{base}-{n}");
        let h = open(&ns).await;
        h.put("k", Bytes::from("v"), PutOptions::default())
            .await
            .unwrap();
        let g = h
            .lock("l", LockOptions::ttl(Duration::from_secs(5)))
            .await
            .unwrap();
        // Every key of the namespace is in one slot ...
        let slot = keyslot(&h.kv_key("k"));
        assert_eq!(keyslot(&h.lock_key("l")), slot);
        assert_eq!(keyslot(&h.fence_key("l")), slot);
        // ... on the master that owns it.
        let m = owner(&ms, slot);
        let mut con = node_con(&m.addr);
        let n: u64 = redis::cmd("EXISTS")
            .arg(h.kv_key("k"))
            .arg(h.lock_key("l"))
            .arg(h.fence_key("l"))
            .query(&mut con)
            .unwrap();
        assert_eq!(n, 3, "namespace {ns} lives on {}", m.addr);
        used.insert(m.id.clone());
        g.release().await.unwrap();
    }
    assert_eq!(used.len(), 3, "32 namespaces use every master");
}

#[tokio::test]
async fn empty_namespace_works_on_a_cluster() {
    let h = RedisBackend::connect(&BackendUrl::parse(&cluster_url()).unwrap())
        .await
        .unwrap();
    let k = unique_namespace("empty-ns");
    assert_eq!(h.lock_key(&k), format!("latchkey:{{%}}:lock:{k}"));
    // Same name as on one server; Debug tells the modes apart.
    assert_eq!(latchkey_core::Backend::name(&h), "redis");
    assert!(format!("{h:?}").contains("cluster: true"), "{h:?}");
    let mut w = h.watch(&format!("{k}/"), None).await.unwrap();
    let r1 = h
        .put(&format!("{k}/a"), Bytes::from("1"), PutOptions::default())
        .await
        .unwrap();
    let out = h
        .txn(
            TxnRequest::new()
                .when([Compare::revision(format!("{k}/a"), CmpOp::Equal, r1)])
                .then([Op::put(format!("{k}/b"), "2"), Op::delete(format!("{k}/a"))]),
        )
        .await
        .unwrap();
    assert!(out.succeeded);
    let list = h
        .list(&format!("{k}/"), ListOptions::default())
        .await
        .unwrap();
    assert_eq!(
        list.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        vec![format!("{k}/b").as_str()]
    );
    let g = h
        .lock(&k, LockOptions::ttl(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(g.fencing_token() >= 1);
    g.release().await.unwrap();
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("a watch event")
            .unwrap()
            .unwrap();
        kinds.push((ev.kind, ev.key));
    }
    assert_eq!(
        kinds,
        vec![
            (EventKind::Put, format!("{k}/a")),
            (EventKind::Put, format!("{k}/b")),
            (EventKind::Delete, format!("{k}/a")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_migration_during_locks_txns_and_a_watch() {
    let ns = unique_namespace("migrate");
    let writer = Arc::new(open(&ns).await);
    let slot = keyslot(&writer.lock_key("w"));
    let mut events = writer.watch("ev/", None).await.unwrap();

    const TASKS: usize = 6;
    const ROUNDS: usize = 15;
    const WRITES: usize = 90;
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(Arc::new(open(&ns).await));
    }
    let clock = Clock::new();
    let history = Arc::new(Mutex::new(Vec::<Holding>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (h, history, done) = (handles[t % 3].clone(), history.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let opts =
                    LockOptions::ttl(Duration::from_secs(5)).with_wait(Duration::from_secs(30));
                let g = h.lock("w", opts).await.expect("lock");
                let acquired = clock.now();
                let n: u64 = h.get("counter").await.expect("get").map_or(0, |kv| {
                    std::str::from_utf8(&kv.value).unwrap().parse().unwrap()
                });
                let out = h
                    .txn(
                        TxnRequest::new()
                            .when([Compare::held(&g)])
                            .then([Op::put("counter", (n + 1).to_string())]),
                    )
                    .await
                    .expect("fenced increment");
                assert!(out.succeeded, "the holder's fenced write commits");
                let released = clock.now();
                assert!(!g.is_lost(), "a holding was lost during the migration");
                let token = g.fencing_token();
                g.release().await.expect("release");
                history.lock().unwrap().push(Holding {
                    lock: "w".into(),
                    client: t,
                    token,
                    acquired,
                    released,
                });
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let w = writer.clone();
    let writes = tokio::spawn(async move {
        for i in 0..WRITES {
            w.put(
                &format!("ev/{i:04}"),
                Bytes::from(i.to_string()),
                PutOptions::if_absent(),
            )
            .await
            .expect("put");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });

    // Move the namespace's slot around the cluster three times while the
    // workload runs, each after some progress.
    let ms = masters();
    let mut migrations = 0;
    let mut at = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while migrations < 3 {
        let progress = done.load(Ordering::SeqCst);
        if progress >= at + 8 {
            let cur = owner(&masters(), slot).id.clone();
            let to = ms.iter().find(|m| m.id != cur).unwrap().clone();
            tokio::task::spawn_blocking(move || migrate_slot(slot, &to))
                .await
                .unwrap();
            migrations += 1;
            at = done.load(Ordering::SeqCst);
            eprintln!("migration {migrations} after {at} holdings");
        }
        assert!(
            Instant::now() < deadline,
            "no progress before migration {}",
            migrations + 1
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("the lock workload completes")
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), writes)
        .await
        .expect("the writer completes")
        .unwrap();
    let history = history.lock().unwrap().clone();
    assert_eq!(history.len(), TASKS * ROUNDS);
    check_exclusion(&history).unwrap_or_else(|v| panic!("two holders at once: {v:?}"));
    let tokens: BTreeSet<u64> = history.iter().map(|h| h.token).collect();
    assert_eq!(tokens.len(), TASKS * ROUNDS, "no fencing token repeats");
    let counter = writer.get("counter").await.unwrap().unwrap();
    assert_eq!(
        std::str::from_utf8(&counter.value).unwrap(),
        (TASKS * ROUNDS).to_string(),
        "every fenced increment counted once"
    );

    // The watch saw every create exactly once, in revision order.
    let mut seen = BTreeMap::new();
    let mut last = 0;
    while seen.len() < WRITES {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the watch keeps delivering across the migrations")
            .expect("the watch stays open")
            .expect("no watch error");
        assert!(ev.revision > last, "revisions increase");
        last = ev.revision;
        assert_eq!(ev.kind, EventKind::Put);
        assert!(
            seen.insert(ev.key.clone(), ev.value).is_none(),
            "{} twice",
            ev.key
        );
    }
}

/// Release channels of namespace `ns` that `addr` has subscribers for.
fn release_channels_on(addr: &str, ns: &str) -> Vec<String> {
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(format!("latchkey:{{{ns}}}:released:*"))
        .query(&mut node_con(addr))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_subscribes_on_the_slot_master_and_rides_out_losing_it() {
    // Slots of a dead master without replica stay down; the others keep
    // serving (full coverage not required).
    let cluster = tokio::task::spawn_blocking(|| {
        OwnCluster::spawn(3, &["--cluster-require-full-coverage", "no"])
    })
    .await
    .unwrap();
    let addrs = cluster.addrs();
    let ms = masters_of(&addrs[0]);
    // A namespace on node 0; the waiter's handle lists node 1 first, yet
    // subscribes on node 0, where the releases are published (a message
    // that crosses the cluster bus arrives up to ~45 ms late).
    let ns = (0..)
        .map(|n| format!("{}-{n}", unique_namespace("pubsub")))
        .find(|ns| {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("latchkey:{{{ns}}}:lock:x"))
                .query(&mut node_con(&addrs[0]))
                .unwrap();
            owner(&ms, slot).addr == addrs[0]
        })
        .unwrap();
    let open_with = |order: &[usize]| {
        let u = url(&cluster.url_of(order), &format!("namespace={ns}"));
        async move { RedisBackend::connect(&u).await.unwrap() }
    };
    let holder = open_with(&[0, 1, 2]).await;
    let waiter = Arc::new(open_with(&[1, 2, 0]).await);
    let ttl = LockOptions::ttl(Duration::from_secs(30));
    let g = holder.lock("x", ttl.clone()).await.unwrap();
    let w = waiter.clone();
    let task = tokio::spawn(async move {
        let g = w
            .lock("x", ttl.with_wait(Duration::from_secs(20)))
            .await
            .expect("the waiter gets the lock");
        (Instant::now(), g)
    });
    let poll = |what: &'static str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (a0, a1, a2) = (addrs[0].clone(), addrs[1].clone(), addrs[2].clone());
    let ns2 = ns.clone();
    poll(
        "the waiter subscribes on node 0, the slot's master",
        &|| release_channels_on(&a0, &ns2).len() == 1,
    );
    assert!(release_channels_on(&a1, &ns2).is_empty());
    assert!(release_channels_on(&a2, &ns2).is_empty());
    // Its pub/sub connection dies ...
    let killed: u64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"])
        .query(&mut node_con(&a0))
        .unwrap();
    assert!(killed >= 1);
    // ... it subscribes again, on the master ...
    poll("the waiter subscribes again", &|| {
        release_channels_on(&a0, &ns2).len() == 1
    });
    // ... where the release reaches it: far sooner than its bounded wait
    // (the lock's 30 s TTL).
    let released = Instant::now();
    g.release().await.unwrap();
    let (acquired, g2) = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the waiter finishes")
        .unwrap();
    let after = acquired - released;
    assert!(
        after < Duration::from_secs(3),
        "woken by the release, not by its bounded wait: {after:?}"
    );
    g2.release().await.unwrap();

    // The namespace's master forgets the scripts (as after a restart or a
    // failover) while another master is down: the script is loaded again on
    // the slot's master alone (a `SCRIPT LOAD` to every node would fail).
    cluster.nodes[1].kill().unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut node_con(&a0))
        .unwrap();
    holder
        .put("after-flush", Bytes::from("1"), PutOptions::default())
        .await
        .expect("NOSCRIPT recovers on the slot's master");
    assert!(holder.get("after-flush").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_is_ridden_out() {
    let cluster = tokio::task::spawn_blocking(|| {
        OwnCluster::spawn_with_replicas(3, 1, &["--cluster-node-timeout", "1000"])
    })
    .await
    .unwrap();
    let addrs = cluster.addrs();
    let ms = masters_of(&addrs[1]);
    let ns = (0..)
        .map(|n| format!("{}-{n}", unique_namespace("failover")))
        .find(|ns| {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("latchkey:{{{ns}}}:rev"))
                .query(&mut node_con(&addrs[0]))
                .unwrap();
            owner(&ms, slot).addr == addrs[0]
        })
        .unwrap();
    // The timeout must outlast a failover (node timeout + election) for
    // waiters and watches to ride it out.
    let u = url(&cluster.url(), &format!("namespace={ns}&timeout=5s"));
    let h = RedisBackend::connect(&u).await.unwrap();
    let h2 = Arc::new(RedisBackend::connect(&u).await.unwrap());
    h.put("ev/before", Bytes::from("1"), PutOptions::default())
        .await
        .unwrap();
    let mut events = h.watch("ev/", None).await.unwrap();
    let ttl = LockOptions::ttl(Duration::from_secs(10));
    let g = h.lock("x", ttl.clone()).await.unwrap();
    let w = h2.clone();
    let waiter = tokio::spawn(async move {
        let g = w.lock("x", ttl.with_wait(Duration::from_secs(60))).await;
        g.map(|g| (Instant::now(), g))
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while h2.waiting_channels() == 0 {
        assert!(Instant::now() < deadline, "the waiter never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Everything so far is on the replica too (this test is about riding
    // out the failover, not about what asynchronous replication loses).
    // WAIT counts from the caller's own last write (a client that wrote
    // nothing gets an immediate answer), so write a barrier in the
    // namespace's slot first: the replication stream is ordered, so once
    // the barrier is acknowledged, every earlier write is too.
    let barrier = h.lock_key("wait-barrier");
    let acked = tokio::task::spawn_blocking({
        let a0 = addrs[0].clone();
        move || -> i64 {
            let mut con = node_con(&a0);
            let _: () = redis::cmd("SET")
                .arg(&barrier)
                .arg(1)
                .query(&mut con)
                .unwrap();
            redis::cmd("WAIT").arg(1).arg(5000).query(&mut con).unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(acked, 1);
    cluster.nodes[0].kill().unwrap();
    let killed = Instant::now();
    // Writes fail for a while (Unavailable, or Indeterminate for a write
    // whose reply was lost), then work again on the promoted replica.
    let mut errors = 0;
    let rev = loop {
        match h
            .put("ev/after", Bytes::from("2"), PutOptions::default())
            .await
        {
            Ok(r) => break r,
            Err(e @ (Error::Unavailable { .. } | Error::Indeterminate { .. })) => {
                errors += 1;
                assert!(
                    killed.elapsed() < Duration::from_secs(30),
                    "no recovery: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("unexpected error during the failover: {e}"),
        }
    };
    eprintln!(
        "writes work again {:?} after the kill ({errors} failed attempts)",
        killed.elapsed()
    );
    // Node 1 learns of the promotion through the cluster bus, maybe a
    // little after the promoted replica started serving.
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(h.lock_key("x"))
        .query(&mut node_con(&addrs[1]))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let now_master = loop {
        let ms = masters_of(&addrs[1]);
        if let Some(m) = ms
            .iter()
            .find(|m| m.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
        {
            break m.addr.clone();
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} has no master: {ms:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(now_master, addrs[3], "the replica was promoted");
    // A new handle connects although its first seed is dead, and reads
    // what was written.
    let h3 = RedisBackend::connect(&u)
        .await
        .expect("connect past a dead seed");
    assert_eq!(h3.get("ev/after").await.unwrap().unwrap().revision, rev);
    // The holder still holds (replicated), releases, and the waiter, which
    // waited through the failover, gets the lock.
    assert!(!g.is_lost());
    let released = Instant::now();
    g.release().await.unwrap();
    let (acquired, g2) = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter finishes")
        .unwrap()
        .expect("the waiter gets the lock after the failover");
    // Its pub/sub node died with the master: it subscribed again
    // elsewhere, and the release message reached it there.
    let after = acquired - released;
    assert!(
        after < Duration::from_secs(3),
        "woken by the release, not by its bounded wait: {after:?}"
    );
    g2.release().await.unwrap();
    // The watch delivered the write made after the failover.
    let ev = tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .expect("a watch event after the failover")
        .unwrap()
        .expect("the watch survives the failover");
    assert_eq!((ev.key.as_str(), ev.revision), ("ev/after", rev));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_cluster_with_a_private_ca() {
    let files = latchkey_testkit::test_tls().expect("TLS files").clone();
    let ca = files.ca.display().to_string();
    let cluster =
        tokio::task::spawn_blocking(move || OwnCluster::spawn_full(3, 0, &[], Some(files)))
            .await
            .unwrap();
    let base = cluster.url();
    assert!(base.starts_with("rediss+cluster://"));
    // The system roots do not know the test CA.
    match RedisBackend::connect(&url(&base, "namespace=tls&timeout=1s")).await {
        Err(Error::Unavailable { .. }) => {}
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(_) => panic!("an unknown CA was trusted"),
    }
    let u = url(&base, &format!("namespace=tls&ca={ca}"));
    let h = RedisBackend::connect(&u).await.unwrap();
    let h2 = Arc::new(RedisBackend::connect(&u).await.unwrap());
    let mut events = h.watch("", None).await.unwrap();
    let rev = h
        .put("k", Bytes::from("over tls"), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        h2.get("k").await.unwrap().unwrap().value,
        Bytes::from("over tls")
    );
    let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("a watch event")
        .unwrap()
        .unwrap();
    assert_eq!(ev.revision, rev);
    // A waiter is woken through pub/sub on a TLS node connection.
    waiter_woken_by_release(&h, h2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_credentials_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(|| {
        let c = OwnCluster::spawn(3, &[]);
        for a in c.addrs() {
            let mut con = node_con(&a);
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg("alice")
                .arg("on")
                .arg(">s3cret")
                .arg("~*")
                .arg("&*")
                .arg("+@all")
                .query(&mut con)
                .unwrap();
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg("default")
                .arg("off")
                .query(&mut con)
                .unwrap();
        }
        c
    })
    .await
    .unwrap();
    let hosts = cluster.url().replace("redis+cluster://", "");
    for (creds, what) in [("", "no credentials"), ("alice:wrong@", "a wrong password")] {
        let u = url(&format!("redis+cluster://{creds}{hosts}"), "namespace=acl");
        match RedisBackend::connect(&u).await {
            Err(e @ Error::Auth { .. }) => assert!(!e.to_string().contains("wrong"), "{e}"),
            Err(e) => panic!("{what}: expected Auth, got {e}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
    let u = url(
        &format!("redis+cluster://alice:s3cret@{hosts}"),
        "namespace=acl",
    );
    let h = RedisBackend::connect(&u).await.unwrap();
    let h2 = Arc::new(RedisBackend::connect(&u).await.unwrap());
    h.put("k", Bytes::from("v"), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(h2.get("k").await.unwrap().unwrap().value, Bytes::from("v"));
    // The pub/sub connection authenticates too: a waiter is woken.
    waiter_woken_by_release(&h, h2).await;
}

/// `h` holds lock `x` (TTL 30 s) while `h2` waits for it; the release wakes
/// the waiter through pub/sub, long before the TTL could have freed it.
async fn waiter_woken_by_release(h: &RedisBackend, h2: Arc<RedisBackend>) {
    let ttl = LockOptions::ttl(Duration::from_secs(30));
    let g = h.lock("x", ttl.clone()).await.unwrap();
    let w = h2.clone();
    let waiter =
        tokio::spawn(async move { w.lock("x", ttl.with_wait(Duration::from_secs(20))).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while h2.waiting_channels() == 0 {
        assert!(Instant::now() < deadline, "the waiter never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let released = Instant::now();
    g.release().await.unwrap();
    let g2 = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        released.elapsed() < Duration::from_secs(3),
        "woken by the release"
    );
    g2.release().await.unwrap();
}
