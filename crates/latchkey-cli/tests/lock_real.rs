//! `latchkey lock` across processes on a real Redis (spawned by the testkit):
//! two runs never overlap, and a lost lock terminates the command.
#![cfg(feature = "redis")]

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn latchkey() -> Command {
    Command::new(env!("CARGO_BIN_EXE_latchkey"))
}

#[test]
fn concurrent_runs_never_overlap() {
    let url = format!(
        "{}?namespace={}",
        latchkey_testkit::redis().url(),
        latchkey_testkit::unique_namespace("cli-overlap")
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    // Each run appends "start <ns>" and "end <ns>" with a pause in between.
    let script = format!(
        "for i in 1 2 3; do echo \"start $(date +%s%N)\" >> {0}; sleep 0.05; echo \"end $(date +%s%N)\" >> {0}; done",
        log.display()
    );
    let runs: Vec<_> = (0..3)
        .map(|_| {
            latchkey()
                .args([
                    "--url", &url, "lock", "job", "--ttl", "5s", "--", "sh", "-c", &script,
                ])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut r in runs {
        assert!(r.wait().unwrap().success());
    }
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 18, "{lines:?}");
    // Under the lock, each run's three start/end pairs are contiguous: the
    // log alternates start, end, start, end ... and never has two starts
    // in a row, and each run's block of six lines is unbroken.
    for (i, l) in lines.iter().enumerate() {
        let want = if i % 2 == 0 { "start" } else { "end" };
        assert!(
            l.starts_with(want),
            "line {i} is {l:?}, expected {want}: {lines:?}"
        );
    }
    let stamps: Vec<u128> = lines
        .iter()
        .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
}

#[test]
fn lost_lock_terminates_the_command() {
    let server = latchkey_testkit::spawn_redis(Default::default()).unwrap();
    let url = server.url().to_string();
    let mut child = latchkey()
        .args([
            "--url",
            &url,
            "lock",
            "job",
            "--ttl",
            "1s",
            "--grace",
            "1s",
            "--",
            "sh",
            "-c",
            "echo running; exec sleep 120",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the command runs under the lock.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "running");
    // The server dies: renewal fails, and the lease deadline passes.
    server.kill().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "latchkey did not stop the command after losing the lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(75), "{status:?}");
}
