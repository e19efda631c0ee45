//! `cargo xtask bench`: the criterion benchmarks (each backend beside its raw
//! client), then lock handoff against the number of waiters (the CLI's W3),
//! then one summary table.

use crate::{cargo, root, services};
use std::process::Command;

const WAITERS: &[usize] = &[2, 16, 64, 256];

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run_all() -> Result<(), String> {
    crate::deps::ensure(None)?;
    eprintln!("xtask: criterion benchmarks (cargo bench -p latchkey-bench)");
    let status = Command::new(cargo())
        .current_dir(root())
        .args(["bench", "-p", "latchkey-bench", "--bench", "ops"])
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("cargo bench failed: {status}"));
    }
    let table = run(Command::new(cargo()).args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "latchkey-bench",
        "--bin",
        "bench-summary",
    ]))?;

    eprintln!("xtask: handoff against waiters (latchkey bench --workload w3)");
    services::up()?;
    let result = handoffs();
    let down = services::down();
    let handoff_table = result?;
    down?;
    println!("\n## Adapter vs raw client (criterion mean)\n\n{table}");
    println!("## Lock handoff (W3) against queued waiters\n\n{handoff_table}");
    Ok(())
}

/// What the handoff table measures: mem, then every running service once
/// (a cluster through its entry point, never one member node on its own).
fn targets(services: &[services::Service]) -> Vec<(String, String)> {
    let mut urls = vec![("mem".to_string(), "mem://".to_string())];
    for s in services.iter().filter(|s| s.is_entry_point()) {
        urls.push((s.name.clone(), s.url.clone()));
    }
    urls
}

fn handoffs() -> Result<String, String> {
    let urls = targets(&services::load()?);
    let mut table = String::from(
        "| backend | waiters | handoffs | p50 µs | p99 µs |\n|---|---:|---:|---:|---:|\n",
    );
    for (name, url) in urls {
        for &w in WAITERS {
            let line = run(Command::new(cargo()).args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "latchkey-cli",
                "--",
                "--url",
                &url,
                "--json",
                "bench",
                "--workload",
                "w3",
                "--waiters",
                &w.to_string(),
                "--ops",
                "200",
            ]))?;
            let v: serde_json::Value = serde_json::from_str(line.trim())
                .map_err(|e| format!("bad JSON from latchkey bench ({e}): {line}"))?;
            table.push_str(&format!(
                "| {name} | {w} | {} | {} | {} |\n",
                v["ops"], v["p50_us"], v["p99_us"]
            ));
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::test_service;

    #[test]
    fn a_cluster_is_benchmarked_once_through_its_entry_point() {
        let running = [
            test_service("redis", "redis://127.0.0.1:6379", "LATCHKEY_TEST_REDIS_URL"),
            test_service(
                "redis-cluster",
                "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
                "LATCHKEY_TEST_REDIS_CLUSTER_URL",
            ),
            test_service("redis-cluster", "redis://127.0.0.1:7001", ""),
        ];
        let names: Vec<String> = targets(&running).into_iter().map(|(_, u)| u).collect();
        assert_eq!(
            names,
            [
                "mem://",
                "redis://127.0.0.1:6379",
                "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
            ]
        );
    }
}
