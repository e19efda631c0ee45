//! `latchkey-faults [--backend B]… [--scenario S]… [--runs K] [--seed S] [--quick]`
//!
//! Runs the fault scenarios of GitHub issue #8 and prints the table; exits 1
//! on any violation. `latchkey-faults holder …` is the holder child (internal).

use latchkey_faults::{BackendKind, RunOptions, Scenario};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: latchkey-faults [--backend B]... [--scenario S]... [--runs K] [--seed S] [--quick] [--unfenced]
                       [--ttl-ms T] [--force-liveness]
  backends:  redis redis-volatile redis-cluster etcd etcd-3 zookeeper zookeeper-3 zookeeper-seq
             consul-sim (redis, etcd, zookeeper, consul select every configuration of that backend)
  scenarios: holder-pause server-pause kill-restart rolling-restart client-partition
             member-partition slow-network conn-resets master-failover (redis-cluster only)
  --unfenced is a self-test: counter writes skip the fence, so the checkers must report violations
  --ttl-ms T (test-only) sets every run's lock TTL; --force-liveness (self-test) checks slow-network
             for spurious losses even when its latency is not under TTL/3 (with a tiny --ttl-ms the
             table must then show them)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("holder") {
        return holder(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("consul-sim") {
        return consul_sim();
    }
    let mut backends = Vec::new();
    let mut scenarios = Vec::new();
    let mut runs = 1u32;
    let mut seed = None;
    let mut quick = false;
    let mut unfenced = false;
    let mut ttl = None;
    let mut force_liveness = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> Result<String, ExitCode> {
            it.next().cloned().ok_or_else(|| {
                eprintln!("{name} needs a value\n{USAGE}");
                ExitCode::from(2)
            })
        };
        match a.as_str() {
            "--backend" | "-b" => match val(a) {
                Ok(v) => {
                    for name in v.split(',') {
                        let sel = BackendKind::select(name);
                        if sel.is_empty() {
                            eprintln!("unknown backend {name:?}\n{USAGE}");
                            return ExitCode::from(2);
                        }
                        backends.extend(sel);
                    }
                }
                Err(c) => return c,
            },
            "--scenario" | "-s" => match val(a) {
                Ok(v) => {
                    for name in v.split(',') {
                        match Scenario::parse(name) {
                            Some(s) => scenarios.push(s),
                            None => {
                                eprintln!("unknown scenario {name:?}\n{USAGE}");
                                return ExitCode::from(2);
                            }
                        }
                    }
                }
                Err(c) => return c,
            },
            "--runs" | "-k" => match val(a).map(|v| v.parse()) {
                Ok(Ok(k)) => runs = k,
                Ok(Err(_)) => {
                    eprintln!("--runs needs a number\n{USAGE}");
                    return ExitCode::from(2);
                }
                Err(c) => return c,
            },
            "--seed" => match val(a).map(|v| v.parse()) {
                Ok(Ok(s)) => seed = Some(s),
                Ok(Err(_)) => {
                    eprintln!("--seed needs a number\n{USAGE}");
                    return ExitCode::from(2);
                }
                Err(c) => return c,
            },
            "--ttl-ms" => match val(a).map(|v| v.parse::<u64>()) {
                Ok(Ok(ms)) if ms > 0 => ttl = Some(Duration::from_millis(ms)),
                Ok(_) => {
                    eprintln!("--ttl-ms needs a positive number\n{USAGE}");
                    return ExitCode::from(2);
                }
                Err(c) => return c,
            },
            "--quick" => quick = true,
            "--unfenced" => unfenced = true,
            "--force-liveness" => force_liveness = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if backends.is_empty() {
        backends = BackendKind::ALL.to_vec();
    }
    // `--backend redis --backend redis-volatile` names redis-volatile twice
    // (a family selects all its configurations): run each pair once.
    let backends = first_of_each(backends);
    if scenarios.is_empty() {
        scenarios = Scenario::ALL.to_vec();
    }
    let scenarios = first_of_each(scenarios);
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let holder_exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "latchkey-faults: seed {seed} (run i uses seed+i; replay one with --seed N --runs 1), {runs} run(s) per pair{}",
        if unfenced { ", FENCING DISABLED (self-test)" } else { "" }
    );
    if let Some(t) = ttl {
        println!("lock TTL {} ms (--ttl-ms, test-only)", t.as_millis());
    }
    if force_liveness {
        println!("spurious-loss check forced on slow-network (self-test)");
    }
    let report = latchkey_faults::run(&RunOptions {
        backends,
        scenarios,
        runs,
        seed,
        quick,
        unfenced,
        ttl,
        force_liveness,
        holder_exe,
        verbose: true,
    });
    println!("{}", report.table());
    if report.violations() > 0 {
        println!("{} violation(s)", report.violations());
        ExitCode::FAILURE
    } else {
        println!("0 violations");
        ExitCode::SUCCESS
    }
}

fn holder(args: &[String]) -> ExitCode {
    let mut url = None;
    let mut ttl = Duration::from_secs(2);
    let mut unfenced = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--url" => url = it.next().cloned(),
            "--ttl-ms" => {
                if let Some(ms) = it.next().and_then(|v| v.parse().ok()) {
                    ttl = Duration::from_millis(ms);
                }
            }
            "--unfenced" => unfenced = true,
            other => {
                eprintln!("holder: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(url) = url else {
        eprintln!("holder: --url is required");
        return ExitCode::from(2);
    };
    latchkey_faults::workload::holder_main(
        url,
        latchkey_faults::workload::RunCfg::new(ttl, unfenced),
    )
}

/// `latchkey-faults consul-sim`: serves the Consul simulator from this process
/// (so the runs can SIGSTOP it) until stdin closes; prints `addr <ip:port>`.
fn consul_sim() -> ExitCode {
    let sim = match latchkey_consul_sim::ConsulSim::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("consul-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("addr {}", sim.addr());
    let mut sink = String::new();
    while std::io::stdin()
        .read_line(&mut sink)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        sink.clear();
    }
    drop(sim);
    ExitCode::SUCCESS
}

/// `v` without repeats, in order of first appearance.
fn first_of_each<T: PartialEq>(v: Vec<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    for x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_named_by_its_family_and_by_itself_runs_once() {
        let mut named = BackendKind::select("redis");
        named.extend(BackendKind::select("redis-volatile"));
        named.extend(BackendKind::select("etcd"));
        let once = first_of_each(named);
        assert_eq!(
            once,
            vec![
                BackendKind::Redis,
                BackendKind::RedisVolatile,
                BackendKind::RedisCluster,
                BackendKind::Etcd,
                BackendKind::Etcd3
            ]
        );
    }
}
