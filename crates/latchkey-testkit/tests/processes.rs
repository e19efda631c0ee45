//! Process hygiene and the child-process helper. The "role" tests do nothing in a
//! normal run: they are the bodies of child processes started by the other tests
//! (`ChildProcess::spawn_test_role` re-runs this binary with one test selected).

use latchkey_testkit::child::{self, ChildProcess};
use latchkey_testkit::{probe, EtcdOptions, RedisOptions};
use std::process::Command;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(30);

/// PIDs whose command line contains `pattern` (`pgrep -f`).
fn pgrep(pattern: &str) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn assert_gone_within(dirs: &[String], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for d in dirs {
        loop {
            let left = pgrep(d);
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "processes {left:?} still run with {d}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Child body: starts a shared server (a static, never dropped), an own server kept
/// alive by a leaked handle, and one spawned from a short-lived thread; reports
/// their temp dirs, then exits, panics or waits to be killed, as told.
#[test]
fn role_spawn_servers_then_exit() {
    if !child::is_child() {
        return;
    }
    let shared = latchkey_testkit::redis();
    let own: &'static _ = Box::leak(Box::new(
        latchkey_testkit::spawn_etcd(EtcdOptions::default()).unwrap(),
    ));
    // Spawned from a thread that ends at once: the server must outlive the thread.
    let from_thread: &'static _ = std::thread::spawn(|| {
        Box::leak(Box::new(
            latchkey_testkit::spawn_redis(RedisOptions::default()).unwrap(),
        ))
    })
    .join()
    .unwrap();
    let dirs: Vec<String> = [shared, own, from_thread]
        .iter()
        .map(|s| s.data_dir().unwrap().display().to_string())
        .collect();
    child::send(&format!("dirs {}", dirs.join(" ")));
    match child::recv().as_deref() {
        Some("exit") => {}
        Some("panic") => panic!("(expected) told to panic by the parent test"),
        _ => loop {
            std::thread::park();
        },
    }
}

fn run_and_check(how: &str) {
    let mut c = ChildProcess::spawn_test("role_spawn_servers_then_exit", &[]).unwrap();
    let line = c.recv(LONG).unwrap();
    let dirs: Vec<String> = line
        .strip_prefix("dirs ")
        .unwrap()
        .split(' ')
        .map(String::from)
        .collect();
    assert_eq!(dirs.len(), 3);
    for d in &dirs {
        assert!(d.contains("/latchkey-"), "{d}");
        assert_eq!(pgrep(d).len(), 1, "exactly one server runs with {d}");
    }
    match how {
        "kill" => c.kill().unwrap(),
        other => {
            c.send(other).unwrap();
            c.wait(LONG).unwrap();
        }
    }
    assert_gone_within(&dirs, Duration::from_secs(10));
    if how != "kill" {
        // atexit removed the temp dirs too (SIGKILL leaves them: nothing runs then).
        for d in &dirs {
            assert!(!std::path::Path::new(d).exists(), "{d} left behind");
        }
    } else {
        for d in &dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[test]
fn no_server_survives_a_normal_exit() {
    run_and_check("exit");
}

#[test]
fn no_server_survives_a_panicking_test_binary() {
    run_and_check("panic");
}

#[test]
fn no_server_survives_a_killed_test_binary() {
    run_and_check("kill");
}

/// Child body: an echo loop.
#[test]
fn role_echo() {
    if !child::is_child() {
        return;
    }
    child::send("ready");
    while let Some(cmd) = child::recv() {
        if cmd == "quit" {
            break;
        }
        child::send(&format!("echo {cmd}"));
    }
}

#[test]
fn a_paused_child_does_not_answer_until_resumed() {
    let mut c = ChildProcess::spawn_test("role_echo", &[]).unwrap();
    c.expect("ready", LONG).unwrap();
    c.send("one").unwrap();
    assert_eq!(c.recv(LONG).unwrap(), "echo one");
    c.pause().unwrap();
    c.send("two").unwrap();
    let err = c.recv(Duration::from_millis(300)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    c.resume().unwrap();
    assert_eq!(c.recv(LONG).unwrap(), "echo two");
    c.send("quit").unwrap();
    assert!(c.wait(LONG).unwrap().success());
}

#[test]
fn a_plain_command_speaks_lines() {
    let mut cmd = Command::new("cat");
    cmd.arg("-");
    let mut c = ChildProcess::spawn(cmd).unwrap();
    c.send("hello").unwrap();
    assert_eq!(c.recv(LONG).unwrap(), "hello");
    c.close_stdin();
    assert!(c.wait(LONG).unwrap().success());
}

/// Child body: checks the environment overrides.
#[test]
fn role_external_urls() {
    if !child::is_child() {
        return;
    }
    let r = latchkey_testkit::redis();
    assert_eq!(r.url(), "redis://external.invalid:6379");
    assert!(r.is_external());
    assert!(matches!(
        r.pause(),
        Err(latchkey_testkit::Error::External(_))
    ));
    let c = latchkey_testkit::etcd_cluster();
    assert_eq!(c.url(), "etcd://a:1,b:2,c:3");
    assert!(c.leader().is_err());
    child::send("ok");
}

#[test]
fn env_urls_replace_spawning() {
    let mut c = ChildProcess::spawn_test(
        "role_external_urls",
        &[
            ("LATCHKEY_TEST_REDIS_URL", "redis://external.invalid:6379"),
            ("LATCHKEY_TEST_ETCD_CLUSTER_URL", "etcd://a:1,b:2,c:3"),
        ],
    )
    .unwrap();
    c.expect("ok", LONG).unwrap();
    assert!(c.wait(LONG).unwrap().success());
}

/// Child body: a missing binary is an error with the apt-get command, and with
/// `CI=true` the shared accessor panics.
#[test]
fn role_missing_binary() {
    if !child::is_child() {
        return;
    }
    let err = latchkey_testkit::spawn_redis(RedisOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("apt-get update && apt-get install -y redis-server"),
        "{msg}"
    );
    child::send("error-ok");
    if latchkey_testkit::is_ci() {
        let _ = latchkey_testkit::try_redis(); // must panic
        child::send("did-not-panic");
    } else {
        assert!(latchkey_testkit::try_redis().is_err());
        child::send("soft-error");
    }
}

#[test]
fn a_missing_server_is_an_error_and_fatal_in_ci() {
    let missing = ("LATCHKEY_REDIS_SERVER", "/nonexistent/redis-server");
    let mut c =
        ChildProcess::spawn_test("role_missing_binary", &[missing, ("CI", "false")]).unwrap();
    c.expect("error-ok", LONG).unwrap();
    assert_eq!(c.recv(LONG).unwrap(), "soft-error");
    assert!(c.wait(LONG).unwrap().success());

    let mut c =
        ChildProcess::spawn_test("role_missing_binary", &[missing, ("CI", "true")]).unwrap();
    c.expect("error-ok", LONG).unwrap();
    let next = c.recv(LONG);
    assert!(next.is_err(), "expected a panic, got {next:?}");
    assert!(!c.wait(LONG).unwrap().success());
}

#[test]
fn a_server_that_cannot_start_reports_its_log() {
    let err =
        latchkey_testkit::spawn_redis(RedisOptions::default().arg("--no-such-option")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("did not start"), "{msg}");
    assert!(msg.contains("no-such-option"), "{msg}");
    // And a healthy one still comes up afterwards.
    let s = latchkey_testkit::spawn_redis(RedisOptions::default()).unwrap();
    probe::redis_ping(s.addr().unwrap(), LONG).unwrap();
}
