//! `latchkey lock` end to end, with the real binary.

use std::process::Command;

fn latchkey() -> Command {
    Command::new(env!("CARGO_BIN_EXE_latchkey"))
}

#[test]
fn child_exit_status_and_token_pass_through() {
    let out = latchkey()
        .args([
            "--url",
            "mem://",
            "lock",
            "job",
            "--",
            "sh",
            "-c",
            "echo token=$LATCHKEY_FENCING_TOKEN; exit 7",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let token: u64 = stdout
        .trim()
        .strip_prefix("token=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(token > 0, "{stdout}");
}

#[test]
fn missing_command_is_reported() {
    let out = latchkey()
        .args(["--url", "mem://", "lock", "job", "--", "/no/such/program"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{out:?}");
}

#[test]
fn bad_url_is_a_clear_error_without_password() {
    let out = latchkey()
        .args(["--url", "nosuch://u:hunter2@h:1", "kv", "get", "k"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown scheme"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn bench_w2_json_line_on_mem() {
    let out = latchkey()
        .args([
            "--url",
            "mem://",
            "--json",
            "bench",
            "--workload",
            "w2",
            "--clients",
            "4",
            "--ops",
            "20",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["peer"], "latchkey");
    assert_eq!(v["workload"], "W2");
    assert_eq!(v["final_count"], 80);
    assert_eq!(v["expected_count"], 80);
}

#[test]
fn check_passes_on_mem() {
    let out = latchkey()
        .args(["--url", "mem://", "check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("mem: ") && stdout.contains(" 0 failed"),
        "{stdout}"
    );
}

#[test]
fn elect_runs_the_command_with_a_term() {
    let out = latchkey()
        .args([
            "--url",
            "mem://",
            "elect",
            "leaders",
            "--",
            "sh",
            "-c",
            "echo term=$LATCHKEY_LEADER_TERM; exit 3",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let term: u64 = stdout
        .trim()
        .strip_prefix("term=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(term > 0);
}
