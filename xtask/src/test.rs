//! `cargo xtask test`: the one command that runs every test against every backend.
//!
//! Steps: make sure the server binaries are there (installing them as root on
//! Debian), build all test targets once, run them (each test binary spawns its own
//! servers through `latchkey-testkit`), then print one line per backend from the
//! output of its `conformance` test binary.

use crate::{cargo, crate_of, deps, root, BACKENDS};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// A backend package with a conformance suite: `crates/latchkey-<b>/tests/conformance*.rs`.
#[derive(Debug)]
struct Suite {
    backend: String,
    /// Test target name: `conformance`, `conformance_ensemble`, ...
    target: String,
}

impl Suite {
    /// `redis`, or `zookeeper/ensemble` for a second suite of one backend.
    fn label(&self) -> String {
        match self.target.strip_prefix("conformance") {
            Some("") | None => self.backend.clone(),
            Some(rest) => format!("{}/{}", self.backend, rest.trim_start_matches(['_', '-'])),
        }
    }
}

/// Backend packages present in the tree that have a `tests/conformance.rs`.
fn discover(root: &Path) -> Vec<Suite> {
    let mut out = Vec::new();
    let mut crates: Vec<&str> = BACKENDS.iter().map(|b| crate_of(b)).collect();
    crates.dedup();
    for b in crates {
        let tests = root.join(format!("crates/latchkey-{b}/tests"));
        if !tests.join("conformance.rs").is_file() {
            continue;
        }
        for target in test_stems(&tests, |stem| stem.starts_with("conformance")) {
            out.push(Suite {
                backend: b.to_string(),
                target,
            });
        }
    }
    out
}

/// True when `cargo xtask test --backend <backend>` runs suite `s`: the suites of
/// the backend's crate; for `redis-cluster` only the Redis crate's cluster suites.
fn selects(backend: Option<&str>, s: &Suite) -> bool {
    match backend {
        None => true,
        Some("redis-cluster") => s.backend == "redis" && is_cluster_target(&s.target),
        Some(b) => s.backend == b,
    }
}

/// A test target of a cluster deployment (`conformance_cluster`, `cluster`, ...).
fn is_cluster_target(target: &str) -> bool {
    target.contains("cluster")
}

/// `--test <stem>` for every `tests/*cluster*.rs` of the Redis crate (sorted).
fn cluster_test_targets(root: &Path) -> Vec<String> {
    test_stems(&root.join("crates/latchkey-redis/tests"), is_cluster_target)
}

/// The sorted names of the test targets (`<dir>/<stem>.rs`) whose stem passes `keep`.
fn test_stems(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut stems: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".rs")?.to_string();
            keep(&stem).then_some(stem)
        })
        .collect();
    stems.sort();
    stems
}

fn package_args(root: &Path, backend: Option<&str>) -> Result<Vec<String>, String> {
    match backend {
        None => Ok(vec!["--workspace".into()]),
        Some("redis-cluster") => {
            if !root.join("crates/latchkey-redis/Cargo.toml").is_file() {
                return Err("there is no crate crates/latchkey-redis".into());
            }
            let mut v = vec!["-p".to_string(), "latchkey-redis".to_string()];
            // Only the cluster test targets; without any, the whole package.
            for stem in cluster_test_targets(root) {
                v.extend(["--test".to_string(), stem]);
            }
            Ok(v)
        }
        Some(b) => {
            if !root
                .join(format!("crates/latchkey-{b}/Cargo.toml"))
                .is_file()
            {
                return Err(format!("there is no crate crates/latchkey-{b}"));
            }
            let mut v = vec!["-p".to_string(), format!("latchkey-{b}")];
            if b == "mem" {
                v.extend(["-p".to_string(), "latchkey-conformance".to_string()]);
            }
            Ok(v)
        }
    }
}

/// Builds every test target once; returns executable file name → (package dir name, target name).
fn build(root: &Path, pkgs: &[String]) -> Result<HashMap<String, (String, String)>, String> {
    let started = Instant::now();
    eprintln!(
        "xtask: building the tests (cargo test {} --all-features --no-run)",
        pkgs.join(" ")
    );
    let mut child = Command::new(cargo())
        .current_dir(root)
        .args([
            "test",
            "--all-features",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .args(pkgs)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let mut exes = HashMap::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let Ok(line) = line else { break };
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(exe), Some(manifest), Some(target)) = (
            msg["executable"].as_str(),
            msg["manifest_path"].as_str(),
            msg["target"]["name"].as_str(),
        ) else {
            continue;
        };
        let package_dir = Path::new(manifest)
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = Path::new(exe)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        exes.insert(file, (package_dir, target.to_string()));
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("the build failed ({status})"));
    }
    eprintln!("xtask: build done in {:.0?}", started.elapsed());
    Ok(exes)
}

/// What the output told so far.
#[derive(Default)]
struct Parsed {
    results: HashMap<(String, String), Counts>,
    failed_binaries: Vec<String>,
}

/// `N passed; F failed; M ignored` from a libtest `test result:` line.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

fn parse_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result:")?;
    let mut c = Counts::default();
    for part in rest.split([';', '.']) {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => c.passed = n,
            "failed" => c.failed = n,
            "ignored" => c.ignored = n,
            _ => {}
        }
    }
    Some(c)
}

/// The test binary named by a cargo `Running <src> (<path>)` line.
fn running_binary(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix("Running ")?;
    let inner = rest.rsplit_once('(')?.1.strip_suffix(')')?;
    Path::new(inner)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// Follows cargo's output line by line: a `Running` line names the binary
/// whose `test result:` comes next; a `Doc-tests` line starts results that
/// belong to no test binary (they must not be taken for the last one's).
fn attribute(line: &str, current: &mut Option<String>) -> Option<(String, Counts)> {
    if let Some(bin) = running_binary(line) {
        *current = Some(bin);
        return None;
    }
    if line.trim_start().starts_with("Doc-tests ") {
        *current = None;
        return None;
    }
    let counts = parse_result(line)?;
    Some((current.clone()?, counts))
}

pub fn run(backend: Option<&str>, extra: &[String]) -> Result<(), String> {
    let started = Instant::now();
    let root = root();
    deps::ensure(backend)?;
    let pkgs = package_args(&root, backend)?;
    let suites: Vec<Suite> = discover(&root)
        .into_iter()
        .filter(|s| selects(backend, s))
        .collect();
    let exes = build(&root, &pkgs)?;

    // Run: stdout and stderr of cargo (its `Running` lines) and of the test binaries
    // (their `test result:` lines) merged in one pipe, so the order tells which
    // binary a result belongs to. Everything is echoed as it comes.
    eprintln!(
        "xtask: running cargo test {} --all-features --no-fail-fast",
        pkgs.join(" ")
    );
    let (reader, writer) = std::io::pipe().map_err(|e| e.to_string())?;
    let writer2 = writer.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(cargo());
    cmd.current_dir(&root)
        .args(["test", "--all-features", "--no-fail-fast"])
        .args(&pkgs);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    let mut child = cmd
        .stdout(writer)
        .stderr(writer2)
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    drop(cmd); // closes our copies of the pipe's write end

    // Parse in a thread: if a process spawned by a test leaks the pipe's write
    // end, cargo's exit must still end the run (after a grace period to drain).
    let parsed: Arc<Mutex<Parsed>> = Arc::default();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    {
        let parsed = parsed.clone();
        let exes = exes.clone();
        std::thread::spawn(move || {
            let mut current: Option<String> = None;
            let out = std::io::stdout();
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                {
                    let mut o = out.lock();
                    let _ = writeln!(o, "{line}");
                }
                if let Some((bin, counts)) = attribute(&line, &mut current) {
                    let (pkg, target) = exes
                        .get(&bin)
                        .cloned()
                        .unwrap_or_else(|| (String::from("?"), bin));
                    let mut p = parsed.lock().unwrap_or_else(|e| e.into_inner());
                    if counts.failed > 0 {
                        p.failed_binaries.push(format!("{pkg} {target}"));
                    }
                    p.results.insert((pkg, target), counts);
                }
            }
            let _ = done_tx.send(());
        });
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if done_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        eprintln!(
            "xtask: a process started by the tests still holds their output; not waiting for it"
        );
    }
    let Parsed {
        results,
        failed_binaries,
    } = std::mem::take(&mut *parsed.lock().unwrap_or_else(|e| e.into_inner()));

    println!();
    println!("==== conformance (per backend) ====");
    let mut ok = status.success();
    if suites.is_empty() {
        println!("no backend has a tests/conformance.rs yet");
    }
    for s in &suites {
        match results.get(&(format!("latchkey-{}", s.backend), s.target.clone())) {
            Some(c) => {
                println!(
                    "conformance {}: {} passed, {} failed, {} ignored",
                    s.label(),
                    c.passed,
                    c.failed,
                    c.ignored
                );
                ok &= c.failed == 0;
                if c.passed == 0 && c.failed == 0 && extra.is_empty() {
                    println!(
                        "conformance {}: ran no case: that proves nothing",
                        s.label()
                    );
                    ok = false;
                }
            }
            None if !extra.is_empty() => {
                println!(
                    "conformance {}: not run (filtered by the extra arguments)",
                    s.label()
                )
            }
            None => {
                println!(
                    "conformance {}: NO RESULT (did the binary crash or not build?)",
                    s.label()
                );
                ok = false;
            }
        }
    }
    for b in BACKENDS {
        if backend.is_none_or(|x| x == *b) && !suites.iter().any(|s| selects(Some(b), s)) {
            let c = crate_of(b);
            if *b == "redis-cluster" {
                println!("conformance {b}: no crates/latchkey-{c}/tests/conformance_cluster.rs yet (not run)");
            } else {
                println!(
                    "conformance {b}: no crates/latchkey-{c}/tests/conformance.rs yet (not run)"
                );
            }
        }
    }
    if !failed_binaries.is_empty() {
        println!("failing test binaries: {}", failed_binaries.join(", "));
    }
    println!("total time {:.0?}", started.elapsed());
    if ok {
        Ok(())
    } else {
        Err(format!("tests failed (cargo test: {status})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_summaries() {
        let c = parse_result(
            "test result: ok. 41 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 2.50s",
        )
        .unwrap();
        assert_eq!((c.passed, c.failed, c.ignored), (41, 0, 3));
        let c = parse_result(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        )
        .unwrap();
        assert_eq!((c.passed, c.failed, c.ignored), (1, 2, 0));
        assert!(parse_result("running 3 tests").is_none());
    }

    #[test]
    fn finds_the_running_binary() {
        assert_eq!(
            running_binary(
                "     Running tests/conformance.rs (target/debug/deps/conformance-0123abcd)"
            )
            .as_deref(),
            Some("conformance-0123abcd")
        );
        assert_eq!(running_binary("   Doc-tests latchkey"), None);
    }

    #[test]
    fn doc_test_results_are_not_taken_for_the_last_binarys() {
        let lines = [
            "     Running tests/conformance_cluster.rs (target/debug/deps/conformance_cluster-0a1b)",
            "test result: ok. 107 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 52.83s",
            "   Doc-tests latchkey_etcd",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ];
        let mut current = None;
        let got: Vec<(String, u64)> = lines
            .iter()
            .filter_map(|l| attribute(l, &mut current))
            .map(|(bin, c)| (bin, c.passed))
            .collect();
        assert_eq!(got, vec![("conformance_cluster-0a1b".to_string(), 107)]);
    }

    #[test]
    fn labels_second_suites() {
        let s = Suite {
            backend: "zookeeper".into(),
            target: "conformance_ensemble".into(),
        };
        assert_eq!(s.label(), "zookeeper/ensemble");
        let s = Suite {
            backend: "redis".into(),
            target: "conformance".into(),
        };
        assert_eq!(s.label(), "redis");
        let s = Suite {
            backend: "redis".into(),
            target: "conformance_cluster".into(),
        };
        assert_eq!(s.label(), "redis/cluster");
    }

    /// A throwaway tree with a Redis crate that has these test files.
    fn tree(files: &[&str]) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!(
            "xtask-test-{}-{}",
            std::process::id(),
            files.join("-").replace(['.', '/'], "_")
        ));
        let tests = root.join("crates/latchkey-redis/tests");
        std::fs::create_dir_all(&tests).unwrap();
        std::fs::write(root.join("crates/latchkey-redis/Cargo.toml"), "").unwrap();
        for f in files {
            std::fs::write(tests.join(f), "").unwrap();
        }
        root
    }

    #[test]
    fn redis_cluster_runs_the_redis_crates_cluster_suites_only() {
        assert!(crate::BACKENDS.contains(&"redis-cluster"));
        assert_eq!(crate_of("redis-cluster"), "redis");
        assert_eq!(crate_of("etcd"), "etcd");
        let root = tree(&[
            "conformance.rs",
            "conformance_cluster.rs",
            "cluster.rs",
            "adapter.rs",
        ]);
        let suites = discover(&root);
        let labels: Vec<String> = suites.iter().map(Suite::label).collect();
        // Listed once, under the Redis crate.
        assert_eq!(labels, vec!["redis", "redis/cluster"]);
        let picked = |b| -> Vec<String> {
            suites
                .iter()
                .filter(|s| selects(b, s))
                .map(Suite::label)
                .collect()
        };
        assert_eq!(picked(Some("redis-cluster")), vec!["redis/cluster"]);
        assert_eq!(picked(Some("redis")), vec!["redis", "redis/cluster"]);
        assert_eq!(picked(None).len(), 2);
        assert!(picked(Some("etcd")).is_empty());
        assert_eq!(
            package_args(&root, Some("redis-cluster")).unwrap(),
            [
                "-p",
                "latchkey-redis",
                "--test",
                "cluster",
                "--test",
                "conformance_cluster"
            ]
        );
        assert_eq!(
            package_args(&root, Some("redis")).unwrap(),
            ["-p", "latchkey-redis"]
        );
        std::fs::remove_dir_all(&root).unwrap();

        // Without cluster test files: the whole Redis package.
        let root = tree(&["conformance.rs"]);
        assert_eq!(
            package_args(&root, Some("redis-cluster")).unwrap(),
            ["-p", "latchkey-redis"]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
