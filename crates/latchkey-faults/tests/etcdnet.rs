//! The etcd cluster in network namespaces that member-partition runs on:
//! a member cut off from its peers loses its leader while clients still
//! reach it, healing restores the cluster, and nothing is left behind.
//! Needs root with CAP_NET_ADMIN; without it each test says so and passes
//! (the fault table then lists the pair as skipped with that reason).

use latchkey_faults::etcdnet::{self, NetCluster};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `NetCluster::start` sweeps stale resources: one test at a time, so it
/// never sweeps what the sweep test planted before that test looks.
static SERIAL: Mutex<()> = Mutex::new(());

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn can_run() -> bool {
    match etcdnet::available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("not run: {why}");
            false
        }
    }
}

/// Polls `cond` every 50 ms until `timeout`.
fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_member_cut_off_from_its_peers_loses_its_leader_and_heals() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !can_run() {
        return;
    }
    let c = NetCluster::start().expect("cluster in network namespaces");
    let names = c.namespaces();
    assert_eq!(names.len(), 3);
    for n in &names {
        assert!(ip(&["netns", "list"]).contains(n.as_str()), "{n} missing");
    }
    let leader = c.leader().expect("a leader once serving");
    for victim in [leader, (leader + 1) % 3] {
        c.isolate(Some(victim)).expect("isolate");
        // The victim answers its clients but has no leader; the other two
        // agree on one of themselves.
        let ok = eventually(Duration::from_secs(10), || {
            let d = c.describe();
            let me = format!("{}=no-leader", victim + 1);
            d.contains(&me) && c.leader().is_some_and(|l| l != victim) && !d.contains("down")
        });
        assert!(ok, "victim {}: {}", victim + 1, c.describe());
        c.isolate(None).expect("heal");
        c.wait_serving(Duration::from_secs(30))
            .expect("serving after healing");
    }
    drop(c);
    let left = ip(&["netns", "list"]);
    for n in &names {
        assert!(!left.contains(n.as_str()), "{n} left behind:\n{left}");
    }
    let pid = format!("lk{}-", std::process::id());
    let links = ip(&["-o", "link", "show"]);
    assert!(!links.contains(&pid), "links left behind:\n{links}");
}

#[test]
fn what_a_killed_run_left_behind_is_deleted() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !can_run() {
        return;
    }
    // A PID that is surely gone: a child that has exited and been reaped.
    let mut child = Command::new("true").spawn().expect("true");
    let dead = child.id();
    child.wait().expect("wait");
    let ns = format!("latchkey-{dead}-0-m0");
    let br = format!("lk{dead}-0b");
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("ip")
        .success());
    assert!(Command::new("ip")
        .args(["link", "add", &br, "type", "bridge"])
        .status()
        .expect("ip")
        .success());
    // A live owner's (ours) resources stay.
    let mine = format!("latchkey-{}-999-m0", std::process::id());
    assert!(Command::new("ip")
        .args(["netns", "add", &mine])
        .status()
        .expect("ip")
        .success());
    let gone = etcdnet::sweep_stale();
    let _ = Command::new("ip").args(["netns", "del", &mine]).status();
    assert!(gone.contains(&format!("netns {ns}")), "{gone:?}");
    assert!(gone.contains(&format!("link {br}")), "{gone:?}");
    assert!(!gone.iter().any(|g| g.contains(&mine)), "{gone:?}");
    assert!(!ip(&["netns", "list"]).contains(&ns));
    assert!(!ip(&["-o", "link", "show"]).contains(&br));
}
