//! `Cluster::migrate_slot` under a live workload: a writer keeps setting and reading
//! keys of the migrating slot the way a cluster client does (following `MOVED`,
//! `ASK` + `ASKING`, retrying `TRYAGAIN`) while the slot moves back and forth. No
//! command fails with anything but a redirection, and every acknowledged write is
//! readable from the slot's final owner.

use latchkey_testkit::probe::{self, RedisConn, Resp};
use latchkey_testkit::RedisOptions;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(5);
const KEYS: usize = 40;

/// What the workload saw.
#[derive(Debug, Default)]
struct Seen {
    moved: u64,
    ask: u64,
    tryagain: u64,
    /// Key index → last acknowledged value.
    acked: HashMap<usize, String>,
}

/// A minimal cluster client for single-key commands: one connection per node,
/// the believed owner of the (single) slot updated on `MOVED`.
struct Router {
    owner: SocketAddr,
    conns: HashMap<SocketAddr, RedisConn>,
}

impl Router {
    fn conn(&mut self, a: SocketAddr) -> &mut RedisConn {
        self.conns
            .entry(a)
            .or_insert_with(|| RedisConn::connect(a, LONG).unwrap())
    }

    fn run(&mut self, args: &[&str], seen: &mut Seen) -> Resp {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut target = self.owner;
        let mut asking = false;
        loop {
            assert!(Instant::now() < deadline, "{args:?} kept being redirected");
            let c = self.conn(target);
            if asking {
                assert_eq!(c.query(&["ASKING"]).unwrap(), Resp::Simple("OK".into()));
            }
            match c.query(args).unwrap() {
                Resp::Error(e) if e.starts_with("MOVED ") => {
                    seen.moved += 1;
                    self.owner = e.split_whitespace().nth(2).unwrap().parse().unwrap();
                    target = self.owner;
                    asking = false;
                }
                Resp::Error(e) if e.starts_with("ASK ") => {
                    seen.ask += 1;
                    target = e.split_whitespace().nth(2).unwrap().parse().unwrap();
                    asking = true;
                }
                Resp::Error(e) if e.starts_with("TRYAGAIN") => {
                    seen.tryagain += 1;
                    target = self.owner;
                    asking = false;
                    std::thread::yield_now();
                }
                Resp::Error(e) => panic!("{args:?} failed during the migration: {e}"),
                v => return v,
            }
        }
    }
}

fn key(i: usize) -> String {
    format!("{{load}}-{i}")
}

#[test]
fn migrate_slot_under_a_live_workload_loses_no_acknowledged_write() {
    let c = latchkey_testkit::spawn_redis_cluster(2, 0, RedisOptions::default()).unwrap();
    let slot = probe::redis_key_slot(b"{load}");
    let first = c.master_of_slot(slot).unwrap();
    let other = 1 - first;
    let start = c.members()[first].addr().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, ops) = (stop.clone(), ops.clone());
        std::thread::spawn(move || {
            let mut r = Router {
                owner: start,
                conns: HashMap::new(),
            };
            let mut seen = Seen::default();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let i = n % KEYS;
                let k = key(i);
                let v = format!("v{n}");
                assert_eq!(
                    r.run(&["SET", &k, &v], &mut seen),
                    Resp::Simple("OK".into())
                );
                seen.acked.insert(i, v.clone());
                // Read-your-write through the same routing.
                assert_eq!(
                    r.run(&["GET", &k], &mut seen),
                    Resp::Bulk(Some(v.into_bytes()))
                );
                n += 1;
                ops.fetch_add(1, Ordering::Relaxed);
            }
            seen
        })
    };
    let wait_ops = |at_least: u64| {
        let deadline = Instant::now() + LONG;
        while ops.load(Ordering::Relaxed) < at_least {
            assert!(Instant::now() < deadline, "the workload made no progress");
            std::thread::yield_now();
        }
    };

    // Every key exists before the first move, so MIGRATE has keys to carry.
    wait_ops(KEYS as u64 * 2);
    let mut owner = first;
    for round in 0..4 {
        let to = if owner == first { other } else { first };
        let moved = c.migrate_slot(slot, owner, to).unwrap();
        assert!(moved <= KEYS, "round {round}: {moved} keys");
        owner = to;
        // Let the workload run against the new owner before moving again.
        let now = ops.load(Ordering::Relaxed);
        wait_ops(now + 20);
    }
    c.wait_cluster_ok().unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = writer.join().expect("the workload failed (see its panic)");

    eprintln!(
        "workload: {} ops, {} MOVED, {} ASK, {} TRYAGAIN",
        ops.load(Ordering::Relaxed),
        seen.moved,
        seen.ask,
        seen.tryagain
    );
    assert_eq!(c.master_of_slot(slot).unwrap(), owner);
    assert!(
        seen.moved > 0,
        "the workload followed the slot's moves: {seen:?}"
    );
    assert_eq!(seen.acked.len(), KEYS);
    let mut dst = RedisConn::connect(c.members()[owner].addr().unwrap(), LONG).unwrap();
    for (i, v) in &seen.acked {
        assert_eq!(
            dst.query(&["GET", &key(*i)]).unwrap(),
            Resp::Bulk(Some(v.clone().into_bytes())),
            "key {i} after {} MOVED, {} ASK, {} TRYAGAIN",
            seen.moved,
            seen.ask,
            seen.tryagain
        );
    }
    // The old owner holds none of them any more.
    let old = c.members()[1 - owner].addr().unwrap();
    match RedisConn::connect(old, LONG)
        .unwrap()
        .query(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
        .unwrap()
    {
        Resp::Int(n) => assert_eq!(n, 0),
        v => panic!("{v:?}"),
    }
}
