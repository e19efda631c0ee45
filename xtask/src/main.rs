//! `cargo xtask`: the workspace's task runner.
//!
//! ```text
//! cargo xtask deps [--backend B]      check (and as root on Debian, install) server binaries
//! cargo xtask test [--backend B] [-- <cargo test args>]
//!                                     deps, then the workspace's tests (all features), then
//!                                     one conformance line per backend
//! cargo xtask services up|down|status long-running local servers for manual work
//! cargo xtask bench                   criterion benches (adapter vs raw client) + handoff table
//! cargo xtask faults [ARGS]           the fault-injection runs (latchkey-faults ARGS)
//! ```
//! B is one of mem, redis, redis-cluster, etcd, zookeeper, consul. `redis-cluster` is
//! the Redis adapter (`-p latchkey-redis`) on a real 3-master Redis Cluster: only its
//! cluster test targets (`tests/*cluster*.rs`, e.g. the `redis/cluster` conformance
//! suite) run.

mod bench;
mod deps;
mod services;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

/// The backends `--backend` accepts.
pub const BACKENDS: &[&str] = &[
    "mem",
    "redis",
    "redis-cluster",
    "etcd",
    "zookeeper",
    "consul",
];

/// The crate `crates/latchkey-<name>` that holds a backend's adapter and tests:
/// `redis-cluster` is the Redis adapter on a Redis Cluster.
pub fn crate_of(backend: &str) -> &str {
    match backend {
        "redis-cluster" => "redis",
        b => b,
    }
}

const USAGE: &str = "\
usage:
  cargo xtask deps [--backend B]
  cargo xtask test [--backend B] [-- <extra cargo test args>]
  cargo xtask services up|down|status
  cargo xtask bench
  cargo xtask faults [--backend B] [--runs K] [--seed S]
B: mem | redis | redis-cluster | etcd | zookeeper | consul
   (redis-cluster: the Redis crate's cluster tests against a real 3-master Redis Cluster)";

/// The workspace root (this crate lives in `<root>/xtask`).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// The `cargo` that runs us (so toolchain overrides carry over).
pub fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// True when `CI=true` (or `1`).
pub fn is_ci() -> bool {
    matches!(
        std::env::var("CI")
            .map(|v| v.to_ascii_lowercase())
            .as_deref(),
        Ok("true") | Ok("1")
    )
}

fn parse_backend(args: &mut Vec<String>) -> Result<Option<String>, String> {
    let mut backend = None;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let value = if a == "--backend" || a == "-b" {
            if i + 1 >= args.len() {
                return Err(format!("{a} needs a value"));
            }
            let v = args.remove(i + 1);
            args.remove(i);
            v
        } else if let Some(v) = a.strip_prefix("--backend=") {
            let v = v.to_string();
            args.remove(i);
            v
        } else {
            i += 1;
            continue;
        };
        if !BACKENDS.contains(&value.as_str()) {
            return Err(format!(
                "unknown backend {value:?}; expected one of {BACKENDS:?}"
            ));
        }
        backend = Some(value);
    }
    Ok(backend)
}

fn run() -> Result<(), String> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let extra = match args.iter().position(|a| a == "--") {
        Some(i) => {
            let rest = args.split_off(i);
            rest[1..].to_vec()
        }
        None => Vec::new(),
    };
    if args.is_empty() {
        return Err(USAGE.into());
    }
    let cmd = args.remove(0);
    match cmd.as_str() {
        "deps" => {
            let backend = parse_backend(&mut args)?;
            no_more(&args)?;
            deps::ensure(backend.as_deref())
        }
        "test" => {
            let backend = parse_backend(&mut args)?;
            no_more(&args)?;
            test::run(backend.as_deref(), &extra)
        }
        "services" => {
            let sub = args.first().cloned().ok_or_else(|| USAGE.to_string())?;
            no_more(&args[1..])?;
            match sub.as_str() {
                "up" => services::up(),
                "down" => services::down(),
                "status" => services::status(),
                other => Err(format!("unknown services command {other:?}\n{USAGE}")),
            }
        }
        "bench" => {
            no_more(&args)?;
            bench::run_all()
        }
        "faults" => {
            // Everything after `faults` goes to the fault runner as it is.
            crate::deps::ensure(None)?;
            let mut all = args.clone();
            if !extra.is_empty() {
                all.push("--".into());
                all.extend(extra.iter().cloned());
            }
            let status = std::process::Command::new(cargo())
                .current_dir(root())
                .args(["run", "--quiet", "-p", "latchkey-faults", "--"])
                .args(&all)
                .status()
                .map_err(|e| e.to_string())?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("fault runs failed: {status}"))
            }
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}

fn no_more(args: &[String]) -> Result<(), String> {
    match args.first() {
        Some(a) => Err(format!("unexpected argument {a:?}\n{USAGE}")),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
