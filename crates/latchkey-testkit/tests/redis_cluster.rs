//! Redis Cluster: the shared 3-master cluster forms and serves (through `MOVED`
//! redirections), the key-slot function matches `CLUSTER KEYSLOT`, a replica is
//! promoted when its master dies, `migrate_slot` moves a slot with its keys, and
//! dropping a cluster leaves no process behind.

use latchkey_testkit::child::{self, ChildProcess};
use latchkey_testkit::probe::{self, RedisConn, Resp};
use latchkey_testkit::{Kind, RedisOptions, SLOTS};
use std::net::SocketAddr;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(5);

fn conn(addr: SocketAddr) -> RedisConn {
    RedisConn::connect(addr, LONG).unwrap()
}

/// A command for `key`, sent to `first` and then wherever `MOVED`/`ASK` point
/// (as a cluster client does), with the number of redirections it took.
fn routed(first: SocketAddr, args: &[&str]) -> (Resp, usize) {
    let mut addr = first;
    let mut asking = false;
    for hops in 0..5 {
        let mut c = conn(addr);
        if asking {
            assert_eq!(c.query(&["ASKING"]).unwrap(), Resp::Simple("OK".into()));
        }
        match c.query(args).unwrap() {
            Resp::Error(e) if e.starts_with("MOVED ") || e.starts_with("ASK ") => {
                asking = e.starts_with("ASK ");
                addr = e.split_whitespace().nth(2).unwrap().parse().unwrap();
            }
            v => return (v, hops),
        }
    }
    panic!("too many redirections for {args:?}");
}

/// Polls `cond` until it holds, failing after 20 s.
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        // Polling a condition with a deadline (not a sleep used as synchronisation).
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn shared_redis_cluster_forms_and_serves_through_redirections() {
    let c = latchkey_testkit::redis_cluster();
    assert!(std::ptr::eq(c, latchkey_testkit::redis_cluster()));
    assert_eq!(c.kind(), Kind::Redis);
    assert_eq!(c.members().len(), 3);
    let hosts: Vec<String> = c
        .members()
        .iter()
        .map(|m| m.addr().unwrap().to_string())
        .collect();
    assert_eq!(c.url(), format!("redis+cluster://{}", hosts.join(",")));
    assert_eq!(c.masters().unwrap(), vec![0, 1, 2]);
    for i in 0..3 {
        let info = conn(c.members()[i].addr().unwrap())
            .query_text(&["CLUSTER", "INFO"])
            .unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_known_nodes:3"), "{info}");
        // Explicit bus ports, not port + 10000.
        let cmdline =
            std::fs::read(format!("/proc/{}/cmdline", c.members()[i].pid().unwrap())).unwrap();
        assert!(String::from_utf8_lossy(&cmdline).contains("--cluster-port"));
    }
    assert!(c.leader().is_err(), "a Redis Cluster has no single leader");

    // Keys on every master, written and read from member 0 through MOVED.
    let first = c.members()[0].addr().unwrap();
    let ns = latchkey_testkit::unique_namespace("rc");
    let mut owners = std::collections::BTreeSet::new();
    let mut redirected = 0;
    for n in 0..30 {
        let key = format!("{ns}-{n}");
        let slot = probe::redis_key_slot(key.as_bytes());
        let served: i64 = match conn(first).query(&["CLUSTER", "KEYSLOT", &key]).unwrap() {
            Resp::Int(s) => s,
            v => panic!("{v:?}"),
        };
        assert_eq!(slot as i64, served, "{key}");
        let owner = c.master_of_key(&key).unwrap();
        assert_eq!(owner, c.master_of_slot(slot).unwrap());
        owners.insert(owner);
        let (set, hops) = routed(first, &["SET", &key, &format!("v{n}")]);
        assert_eq!(set, Resp::Simple("OK".into()));
        assert_eq!(hops, usize::from(owner != 0), "{key} on member {owner}");
        redirected += hops;
        let direct = conn(c.members()[owner].addr().unwrap())
            .query(&["GET", &key])
            .unwrap();
        assert_eq!(direct, Resp::Bulk(Some(format!("v{n}").into_bytes())));
    }
    assert_eq!(owners.len(), 3, "30 keys land on every master");
    assert!(redirected > 0);
    // Hash tags put keys in one slot.
    assert_eq!(
        probe::redis_key_slot(b"{tag}a"),
        probe::redis_key_slot(b"x{tag}")
    );
    assert_ne!(probe::redis_key_slot(b"{}a"), probe::redis_key_slot(b"{}b"));
}

#[test]
fn a_replica_is_promoted_when_its_master_dies() {
    let c = latchkey_testkit::spawn_redis_cluster(3, 1, RedisOptions::default()).unwrap();
    assert_eq!(c.members().len(), 6);
    assert_eq!(c.masters().unwrap(), vec![0, 1, 2]);
    for m in 0..3 {
        assert_eq!(c.replicas_of(m).unwrap(), vec![3 + m]);
    }
    let ids: Vec<String> = (0..6).map(|i| c.node_id(i).unwrap()).collect();
    assert!(ids.iter().all(|id| id.len() == 40), "{ids:?}");

    // A key on master 1, replicated before the kill (WAIT for one replica).
    let key = (0..)
        .map(|n| format!("failover-{n}"))
        .find(|k| c.master_of_key(k).unwrap() == 1)
        .unwrap();
    let mut m1 = conn(c.members()[1].addr().unwrap());
    assert_eq!(
        m1.query(&["SET", &key, "kept"]).unwrap(),
        Resp::Simple("OK".into())
    );
    assert_eq!(m1.query(&["WAIT", "1", "5000"]).unwrap(), Resp::Int(1));

    c.members()[1].kill().unwrap();
    let promoted = c.wait_for_failover(1).unwrap();
    assert_eq!(promoted, 4, "the replica of member 1 takes over");
    assert_eq!(c.master_of_key(&key).unwrap(), 4);
    assert_eq!(
        conn(c.members()[4].addr().unwrap())
            .query(&["GET", &key])
            .unwrap(),
        Resp::Bulk(Some(b"kept".to_vec()))
    );

    // The old master comes back (same nodes.conf) as a replica of the new one.
    c.members()[1].restart().unwrap();
    c.wait_cluster_ok().unwrap();
    assert_eq!(c.replicas_of(4).unwrap(), vec![1]);
    assert_eq!(c.node_id(1).unwrap(), ids[1], "node ids survive a restart");
}

#[test]
fn migrate_slot_moves_a_slot_with_its_keys() {
    let c = latchkey_testkit::spawn_redis_cluster(2, 0, RedisOptions::default()).unwrap();
    let slot = probe::redis_key_slot(b"{mig}");
    let from = c.master_of_slot(slot).unwrap();
    let to = 1 - from;
    let keys: Vec<String> = (0..250).map(|n| format!("{{mig}}-{n}")).collect();
    let mut src = conn(c.members()[from].addr().unwrap());
    for k in &keys {
        assert_eq!(
            src.query(&["SET", k, k]).unwrap(),
            Resp::Simple("OK".into())
        );
    }
    assert_eq!(c.migrate_slot(slot, from, to).unwrap(), keys.len());
    c.wait_cluster_ok().unwrap();
    assert_eq!(c.master_of_slot(slot).unwrap(), to);
    // Neighbouring slots did not move.
    assert_eq!(c.master_of_slot((slot + 1) % SLOTS).unwrap(), from);
    let mut dst = conn(c.members()[to].addr().unwrap());
    for k in &keys {
        assert_eq!(
            dst.query(&["GET", k]).unwrap(),
            Resp::Bulk(Some(k.clone().into_bytes()))
        );
    }
    match src.query(&["GET", &keys[0]]).unwrap() {
        Resp::Error(e) => assert!(e.starts_with("MOVED "), "{e}"),
        v => panic!("the old owner still serves the slot: {v:?}"),
    }
    // And back, with an empty slot too.
    assert_eq!(c.migrate_slot(slot, to, from).unwrap(), keys.len());
    let empty = probe::redis_key_slot(b"{nothing-here}");
    let owner = c.master_of_slot(empty).unwrap();
    assert_eq!(c.migrate_slot(empty, owner, 1 - owner).unwrap(), 0);
    c.wait_cluster_ok().unwrap();
    assert_eq!(c.master_of_slot(empty).unwrap(), 1 - owner);
    assert!(c.migrate_slot(slot, 0, 0).is_err());
}

#[test]
fn dropping_a_redis_cluster_kills_every_node_and_removes_its_dirs() {
    let c = latchkey_testkit::spawn_redis_cluster(3, 1, RedisOptions::default()).unwrap();
    let pids: Vec<u32> = c.members().iter().map(|m| m.pid().unwrap()).collect();
    let dirs: Vec<_> = c
        .members()
        .iter()
        .map(|m| m.data_dir().unwrap().to_path_buf())
        .collect();
    assert!(dirs.iter().all(|d| d.join("nodes.conf").is_file()));
    drop(c);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "node {pid} outlived its cluster"
        );
    }
    assert!(dirs.iter().all(|d| !d.exists()));
}

#[test]
fn a_cluster_without_masters_or_with_tls_is_refused() {
    assert!(latchkey_testkit::spawn_redis_cluster(0, 0, RedisOptions::default()).is_err());
    let tls = RedisOptions {
        tls: Some(latchkey_testkit::TlsFiles {
            cert: "/nonexistent".into(),
            key: "/nonexistent".into(),
            ca: "/nonexistent".into(),
        }),
        ..Default::default()
    };
    assert!(latchkey_testkit::spawn_redis_cluster(3, 0, tls).is_err());
}

#[test]
fn migrate_slot_works_while_a_workload_runs() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let c = latchkey_testkit::spawn_redis_cluster(3, 0, RedisOptions::default()).unwrap();
    let slot = probe::redis_key_slot(b"{load}");
    let from = c.master_of_slot(slot).unwrap();
    let to = (from + 1) % 3;
    let keys: Vec<String> = (0..300).map(|n| format!("{{load}}-{n}")).collect();
    let mut src = conn(c.members()[from].addr().unwrap());
    for k in &keys {
        assert_eq!(
            src.query(&["SET", k, "0"]).unwrap(),
            Resp::Simple("OK".into())
        );
    }
    // Two clients increment the slot's keys (following MOVED/ASK) during the move.
    let stop = Arc::new(AtomicBool::new(false));
    let entry = c.members()[from].addr().unwrap();
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (stop, keys) = (stop.clone(), keys.clone());
            std::thread::spawn(move || {
                let mut done = vec![0i64; keys.len()];
                let mut n = w;
                while !stop.load(Ordering::SeqCst) {
                    let i = n % keys.len();
                    match routed(entry, &["INCR", &keys[i]]) {
                        (Resp::Int(_), _) => done[i] += 1,
                        (v, _) => panic!("INCR {}: {v:?}", keys[i]),
                    }
                    n += 7;
                }
                done
            })
        })
        .collect();
    // Let the workload get going before the move starts (a condition, not a sleep).
    let mut watch = conn(c.members()[from].addr().unwrap());
    until("the workload starts", || {
        watch.query(&["GET", &keys[0]]).unwrap() != Resp::Bulk(Some(b"0".to_vec()))
    });
    assert_eq!(c.migrate_slot(slot, from, to).unwrap(), keys.len());
    c.wait_cluster_ok().unwrap();
    // And some work after the move, served by the new owner.
    let after = conn(c.members()[to].addr().unwrap())
        .query(&["GET", &keys[1]])
        .unwrap();
    let mut dst = conn(c.members()[to].addr().unwrap());
    until("the workload reaches the new owner", || {
        dst.query(&["GET", &keys[1]]).unwrap() != after
    });
    stop.store(true, Ordering::SeqCst);
    let mut expected = vec![0i64; keys.len()];
    for w in workers {
        for (i, d) in w.join().unwrap().into_iter().enumerate() {
            expected[i] += d;
        }
    }
    assert_eq!(c.master_of_slot(slot).unwrap(), to);
    for (k, want) in keys.iter().zip(&expected) {
        // No increment lost or doubled by the move.
        assert_eq!(
            dst.query(&["GET", k]).unwrap(),
            Resp::Bulk(Some(want.to_string().into_bytes())),
            "{k}"
        );
    }
    // The workload ran before the move (keys[0] changed) and after it (keys[1]
    // changed on the new owner), so it spanned the move.
    assert!(expected[0] > 0 && expected[1] > 0);
}

// ------------------------------------------------------------ process hygiene

/// PIDs whose command line contains `pattern` (`pgrep -f`).
fn pgrep(pattern: &str) -> Vec<String> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Child body: starts the shared cluster (a static, never dropped), reports its
/// root dir, then exits or waits to be killed, as told.
#[test]
fn role_shared_cluster_then_exit() {
    if !child::is_child() {
        return;
    }
    let c = latchkey_testkit::redis_cluster();
    let root = c.members()[0].data_dir().unwrap().parent().unwrap();
    child::send(&format!("root {}", root.display()));
    match child::recv().as_deref() {
        Some("exit") => {}
        _ => loop {
            std::thread::park();
        },
    }
}

fn cluster_dies_with_its_test_binary(how: &str) {
    let mut c = ChildProcess::spawn_test("role_shared_cluster_then_exit", &[]).unwrap();
    let line = c.recv(Duration::from_secs(60)).unwrap();
    let root = line.strip_prefix("root ").unwrap().to_string();
    assert!(root.contains("/latchkey-"), "{root}");
    assert_eq!(pgrep(&root).len(), 3, "three nodes run under {root}");
    match how {
        "kill" => c.kill().unwrap(),
        _ => {
            c.send("exit").unwrap();
            c.wait(Duration::from_secs(30)).unwrap();
        }
    }
    until("the nodes exit with their test binary", || {
        pgrep(&root).is_empty()
    });
    if how == "kill" {
        let _ = std::fs::remove_dir_all(&root);
    } else {
        assert!(!std::path::Path::new(&root).exists(), "{root} left behind");
    }
}

#[test]
fn no_cluster_node_survives_its_test_binary() {
    cluster_dies_with_its_test_binary("exit");
    cluster_dies_with_its_test_binary("kill");
}

/// Child body: the environment variable replaces spawning; helpers refuse.
#[test]
fn role_external_cluster() {
    if !child::is_child() {
        return;
    }
    let c = latchkey_testkit::redis_cluster();
    assert_eq!(c.url(), "redis+cluster://a:1,b:2");
    assert!(c.is_external());
    assert!(matches!(
        c.master_of_slot(0),
        Err(latchkey_testkit::Error::External(_))
    ));
    assert!(matches!(
        c.migrate_slot(0, 0, 1),
        Err(latchkey_testkit::Error::External(_))
    ));
    child::send("ok");
}

#[test]
fn the_env_url_replaces_the_shared_cluster() {
    let mut c = ChildProcess::spawn_test(
        "role_external_cluster",
        &[("LATCHKEY_TEST_REDIS_CLUSTER_URL", "redis+cluster://a:1,b:2")],
    )
    .unwrap();
    c.expect("ok", Duration::from_secs(30)).unwrap();
    assert!(c.wait(Duration::from_secs(30)).unwrap().success());
}

/// Child body: without redis-server the shared cluster is an error, fatal with CI=true.
#[test]
fn role_missing_cluster() {
    if !child::is_child() {
        return;
    }
    if latchkey_testkit::is_ci() {
        let _ = latchkey_testkit::try_redis_cluster(); // must panic
        child::send("did-not-panic");
    } else {
        let e = latchkey_testkit::try_redis_cluster().unwrap_err();
        assert!(e.contains("apt-get install -y redis-server"), "{e}");
        child::send("soft-error");
    }
}

#[test]
fn a_missing_cluster_is_fatal_in_ci() {
    let missing = ("LATCHKEY_REDIS_SERVER", "/nonexistent/redis-server");
    let mut c =
        ChildProcess::spawn_test("role_missing_cluster", &[missing, ("CI", "false")]).unwrap();
    c.expect("soft-error", Duration::from_secs(30)).unwrap();
    assert!(c.wait(Duration::from_secs(30)).unwrap().success());
    let mut c =
        ChildProcess::spawn_test("role_missing_cluster", &[missing, ("CI", "true")]).unwrap();
    assert!(c.recv(Duration::from_secs(30)).is_err(), "expected a panic");
    assert!(!c.wait(Duration::from_secs(30)).unwrap().success());
}
