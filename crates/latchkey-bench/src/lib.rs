//! Reads criterion's results and prints the one-page summary of
//! `cargo xtask bench`: per backend and operation, latchkey's time, the raw
//! client's time for the same work, and their ratio.

use std::path::Path;

/// Mean time in nanoseconds of one criterion benchmark, if it has run.
pub fn mean_ns(criterion_dir: &Path, group: &str, function: &str) -> Option<f64> {
    let path = criterion_dir
        .join(group)
        .join(function)
        .join("new")
        .join("estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

/// Backends and operations the `ops` benchmark measures, in table order.
pub const BACKENDS: &[&str] = &["mem", "redis", "etcd", "zookeeper", "consul-sim"];
/// Operations of the `ops` benchmark.
pub const OPS: &[&str] = &["lock_release", "get", "put", "cas", "txn4"];

/// The summary table as Markdown (`latchkey µs | raw µs | ratio`).
pub fn summary(criterion_dir: &Path) -> String {
    let mut out = String::from(
        "| backend | operation | latchkey µs | raw client µs | ratio |\n|---|---|---:|---:|---:|\n",
    );
    for b in BACKENDS {
        for op in OPS {
            let group = format!("{b}-{op}");
            let Some(ours) = mean_ns(criterion_dir, &group, "latchkey") else {
                continue;
            };
            let raw = mean_ns(criterion_dir, &group, "raw");
            let (raw_s, ratio) = match raw {
                Some(r) => (format!("{:.1}", r / 1000.0), format!("{:.2}", ours / r)),
                None => ("—".into(), "—".into()),
            };
            out.push_str(&format!(
                "| {b} | {op} | {:.1} | {raw_s} | {ratio} |\n",
                ours / 1000.0
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_estimates() {
        let dir = std::env::temp_dir().join(format!("lk-bench-{}", std::process::id()));
        for (f, ns) in [("latchkey", 2000.0), ("raw", 1000.0)] {
            let p = dir.join("redis-get").join(f).join("new");
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(
                p.join("estimates.json"),
                format!("{{\"mean\":{{\"point_estimate\":{ns}}}}}"),
            )
            .unwrap();
        }
        let s = summary(&dir);
        assert!(s.contains("| redis | get | 2.0 | 1.0 | 2.00 |"), "{s}");
        assert!(!s.contains("| etcd |"), "{s}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
