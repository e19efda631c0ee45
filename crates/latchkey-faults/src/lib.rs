//! # latchkey-faults
//!
//! Jepsen-style safety runs for latchkey on real servers (GitHub issue #8).
//!
//! Each run starts 6 clients on a fresh namespace: two fenced-counter clients
//! in this process, one fenced-counter client in a **separate OS process**
//! (the `holder` child, which can be frozen with SIGSTOP), and three KV
//! register clients doing random get / put / CAS on three keys. Every client
//! reaches the servers through a [`FaultProxy`](latchkey_testkit::FaultProxy)
//! (one group for the in-process clients, one for the child). A fault
//! [`Scenario`] is injected while they run; then the faults heal, the clients
//! stop, the final counter is read directly, and the history is checked:
//!
//! - **exclusion + fencing** (`latchkey_conformance::checkers::exclusion`) over
//!   the holdings whose fenced write committed (interval = lock returned → call
//!   of that write); tokens must increase in acquisition order;
//! - **linearizability** of the KV register, per key, with ops of unknown
//!   outcome allowed (`checkers::linearizability`);
//! - the counter's **exact count**: acknowledged increments ≤ final value ≤
//!   acknowledged + unknown ones (a rejected fenced write is no lost update; an
//!   acknowledged increment that is missing is);
//! - for stale-holder scenarios: the stale holder's write did not commit and
//!   its `lost()` fired.
//! - for slow-network, where its latency keeps every round trip under TTL/3:
//!   no spurious loss (no holding saw `lost()` fire before its release or
//!   its fenced write refused).
//!
//! Findings that the backend's declared capabilities allow (KV anomalies of a
//! non-linearizable read mode; data or token loss of a non-durable store after
//! a restart) are reported under their own label, never hidden, and do not
//! fail the run. [`RunOptions::unfenced`] (test-only) replaces the fenced txn
//! with a plain put, to show that the checkers catch the resulting violations.

pub mod env;
pub mod etcdnet;
pub mod history;
pub mod scenario;
pub mod workload;
pub mod zkpeers;

pub use env::{BackendKind, Env};
pub use history::{Findings, Promises};
pub use scenario::Scenario;

use env::ProxyGroup;
use latchkey::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::{RunCfg, Shared};

/// What to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Backend configurations.
    pub backends: Vec<BackendKind>,
    /// Scenarios.
    pub scenarios: Vec<Scenario>,
    /// Runs per (backend, scenario).
    pub runs: u32,
    /// Seed of run 0; run `i` uses `seed + i` (printed, replay with `--seed`).
    pub seed: u64,
    /// Shorter phases.
    pub quick: bool,
    /// Test-only: counter writes are plain puts, not fenced txns.
    pub unfenced: bool,
    /// Test-only: the lock TTL of every run instead of the backend's
    /// default ([`BackendKind::ttl`]).
    pub ttl: Option<Duration>,
    /// Test-only: check for spurious losses under slow-network even where
    /// the injected latency breaks RTT < TTL/3 (with a tiny `ttl`: shows the
    /// check failing on a real run).
    pub force_liveness: bool,
    /// The `latchkey-faults` executable, re-run as the holder child.
    pub holder_exe: PathBuf,
    /// Print progress to stderr.
    pub verbose: bool,
}

/// One line of the table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Backend label.
    pub backend: &'static str,
    /// Scenario label.
    pub scenario: &'static str,
    /// Runs done.
    pub runs: u32,
    /// Ops recorded over all runs.
    pub ops: u64,
    /// Violations over all runs.
    pub violations: u64,
    /// Lost acknowledged increments over all runs.
    pub lost_updates: u64,
    /// Findings the backend's capabilities allow (weak reads, non-durable restart).
    pub allowed: u64,
    /// Why the pair was skipped, if it was.
    pub skipped: Option<String>,
    /// Messages: seeds of failing runs and what failed.
    pub details: Vec<String>,
}

impl Row {
    fn new(backend: &'static str, scenario: &'static str) -> Row {
        Row {
            backend,
            scenario,
            runs: 0,
            ops: 0,
            violations: 0,
            lost_updates: 0,
            allowed: 0,
            skipped: None,
            details: Vec::new(),
        }
    }
}

/// The result of a whole invocation.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// One row per (backend, scenario).
    pub rows: Vec<Row>,
}

impl Report {
    /// Total violations.
    pub fn violations(&self) -> u64 {
        self.rows.iter().map(|r| r.violations).sum()
    }

    /// The table (markdown), then the details.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| backend | scenario | runs | ops | violations | lost updates | allowed by capabilities | note |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|");
        for r in &self.rows {
            match &r.skipped {
                Some(why) => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | - | - | - | - | - | skipped: {} |",
                        r.backend, r.scenario, why
                    );
                }
                None => {
                    let note = if r.violations > 0 {
                        "FAIL"
                    } else if r.allowed > 0 {
                        "ok (see allowed)"
                    } else {
                        "ok"
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} |",
                        r.backend,
                        r.scenario,
                        r.runs,
                        r.ops,
                        r.violations,
                        r.lost_updates,
                        r.allowed,
                        note
                    );
                }
            }
        }
        for r in &self.rows {
            for d in &r.details {
                let _ = writeln!(s, "{} / {}: {}", r.backend, r.scenario, d);
            }
        }
        s
    }
}

/// Runs everything `opts` selects and returns the table.
pub fn run(opts: &RunOptions) -> Report {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut report = Report::default();
    for &b in &opts.backends {
        let env = if opts.scenarios.iter().any(|s| s.applies(b).is_ok()) {
            if opts.verbose {
                eprintln!("[faults] starting {}", b.label());
            }
            Some(Env::start(b, &opts.holder_exe))
        } else {
            None
        };
        for &s in &opts.scenarios {
            let mut row = Row::new(b.label(), s.label());
            if let Err(why) = s.applies(b) {
                row.skipped = Some(why.to_string());
                report.rows.push(row);
                continue;
            }
            let env = match env.as_ref() {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    row.skipped = Some(format!("servers did not start: {e}"));
                    report.rows.push(row);
                    continue;
                }
                None => unreachable!("env started when any scenario applies"),
            };
            for i in 0..opts.runs {
                let seed = opts.seed.wrapping_add(i as u64);
                let started = Instant::now();
                let r = rt.block_on(run_once(env, s, seed, opts));
                row.runs += 1;
                match r {
                    Ok(f) => {
                        row.ops += f.ops;
                        row.violations += f.violations.len() as u64;
                        row.lost_updates += f.lost_updates;
                        row.allowed += f.allowed.len() as u64;
                        for v in &f.violations {
                            row.details.push(format!("seed {seed}: VIOLATION {v}"));
                        }
                        for a in &f.allowed {
                            row.details.push(format!("seed {seed}: allowed {a}"));
                        }
                        for n in &f.notes {
                            row.details.push(format!("seed {seed}: note: {n}"));
                        }
                        if opts.verbose {
                            eprintln!(
                                "[faults] {} {} seed {seed}: {} ops, {} violations, {} lost, {} allowed ({:.1}s)",
                                b.label(),
                                s.label(),
                                f.ops,
                                f.violations.len(),
                                f.lost_updates,
                                f.allowed.len(),
                                started.elapsed().as_secs_f64()
                            );
                            eprintln!("[faults]   {}", f.summary);
                            for v in &f.violations {
                                eprintln!("[faults]   VIOLATION {v}");
                            }
                            for a in &f.allowed {
                                eprintln!("[faults]   allowed {a}");
                            }
                        }
                    }
                    Err(e) => {
                        // A run that could not be carried out proves nothing: count it.
                        row.violations += 1;
                        row.details.push(format!("seed {seed}: run failed: {e}"));
                        if opts.verbose {
                            eprintln!(
                                "[faults] {} {} seed {seed}: run failed: {e}",
                                b.label(),
                                s.label()
                            );
                        }
                    }
                }
            }
            report.rows.push(row);
        }
    }
    report
}

/// One run of `scenario` on `env` with `seed`.
pub async fn run_once(
    env: &Env,
    scenario: Scenario,
    seed: u64,
    opts: &RunOptions,
) -> Result<Findings, String> {
    // Member partitions need peer links that can be cut: a dedicated cluster
    // (ZooKeeper: peer traffic through per-pair proxies; etcd: members in
    // network namespaces of their own). Dropped (deleted) at the end of the run.
    let own_env;
    let env = match (scenario, env.kind) {
        (Scenario::MemberPartition, BackendKind::Zookeeper3) => {
            own_env = tokio::task::block_in_place(|| {
                zkpeers::ProxiedEnsemble::start().map(|e| Env {
                    kind: env.kind,
                    servers: env::Servers::ZkPeers(e),
                })
            })?;
            &own_env
        }
        // A fresh Redis Cluster per run: master-failover leaves the topology
        // changed (the old master a replica now).
        (_, BackendKind::RedisCluster) => {
            own_env = tokio::task::block_in_place(|| Env::start(env.kind, &opts.holder_exe))?;
            &own_env
        }
        (Scenario::MemberPartition, BackendKind::Etcd3) => {
            own_env = tokio::task::block_in_place(|| {
                etcdnet::NetCluster::start().map(|c| Env {
                    kind: env.kind,
                    servers: env::Servers::EtcdNet(Box::new(c)),
                })
            })?;
            &own_env
        }
        _ => env,
    };
    let ttl = opts.ttl.unwrap_or_else(|| env.kind.ttl());
    let cfg = Arc::new(RunCfg::new(ttl, opts.unfenced));
    let ns = latchkey_testkit::unique_namespace(&format!("faults-{seed}"));
    let local = ProxyGroup::start(&env.addrs())?;
    let childg = Arc::new(ProxyGroup::start(&env.addrs())?);
    let direct_url = env.url(&env.addrs(), &ns);
    // The cluster client follows the addresses CLUSTER SLOTS announces, so
    // proxies would only carry its first request: connect directly (the
    // scenarios that need the proxies are skipped on a cluster).
    let (local_url, child_url) = if env.kind == BackendKind::RedisCluster {
        (direct_url.clone(), direct_url.clone())
    } else {
        (env.url(&local.addrs(), &ns), env.url(&childg.addrs(), &ns))
    };
    let shared = Arc::new(Shared::default());
    let phase = if opts.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    };

    // The holder child, driven from its own thread.
    let driver = workload::ChildDriver::start(&opts.holder_exe, &child_url, &cfg)?;
    let child_pid = driver.pid();
    let driver_thread = {
        let (cfg, shared, childg) = (cfg.clone(), shared.clone(), childg.clone());
        std::thread::spawn(move || driver.run(&cfg, &shared, &childg))
    };
    let mut tasks = Vec::new();
    for i in 0..2u64 {
        tasks.push(tokio::spawn(workload::counter_client(
            local_url.clone(),
            cfg.clone(),
            shared.clone(),
            seed.wrapping_mul(31).wrapping_add(i),
        )));
    }
    for i in 0..3u64 {
        tasks.push(tokio::spawn(workload::kv_client(
            local_url.clone(),
            cfg.clone(),
            shared.clone(),
            seed.wrapping_mul(37).wrapping_add(100 + i),
        )));
    }

    // Warm up, inject, let it settle.
    let mut rng = StdRng::seed_from_u64(seed);
    tokio::time::sleep(phase / 2).await;
    let target = scenario::Target {
        env,
        local: &local,
        child: &childg,
        shared: &shared,
        ttl,
        cfg: &cfg,
        phase,
        seed,
        ns: &ns,
    };
    let injected = scenario::inject(scenario, &target, &mut rng).await;
    local.set_mode(latchkey_testkit::ProxyMode::Pass);
    childg.set_mode(latchkey_testkit::ProxyMode::Pass);
    tokio::task::block_in_place(|| env.wait_ready());
    tokio::time::sleep(phase / 2 + ttl).await;

    // Stop: give clients time to finish their op, then abort (their pending
    // ops stay recorded as of unknown outcome).
    shared.stop.store(true, Ordering::SeqCst);
    let grace = Instant::now() + cfg.op_timeout + Duration::from_secs(1);
    for t in &tasks {
        while !t.is_finished() && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for t in &tasks {
        t.abort();
    }
    while !driver_thread.is_finished() && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !driver_thread.is_finished() {
        // SAFETY: plain syscall on our own child's PID (it is reaped by its handle).
        unsafe {
            libc::kill(child_pid as libc::pid_t, libc::SIGCONT);
            libc::kill(child_pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let _ = tokio::task::block_in_place(|| driver_thread.join());
    injected?;

    // The final counter, read directly from the servers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut final_counter = None;
    let mut caps = None;
    while Instant::now() < deadline {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_secs(5), latchkey::connect(&direct_url)).await
        {
            caps = Some(c.capabilities());
            if let Ok(Ok(v)) =
                tokio::time::timeout(Duration::from_secs(5), c.get(&cfg.counter_key)).await
            {
                final_counter = Some(match v {
                    None => 0,
                    Some(kv) => std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| format!("final counter holds {:?}", kv.value))?,
                });
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let caps = caps.ok_or("cannot connect to the servers after healing")?;
    let promises = Promises {
        linearizable_reads: caps.linearizable_reads,
        durable: caps.durable_writes && caps.durable_fencing,
        restarted: scenario.restarts(),
        no_spurious_loss: false,
    };
    let (promises, liveness_note) = liveness(scenario, ttl, opts.force_liveness, promises);
    let hist = std::mem::take(&mut *shared.hist.lock().unwrap_or_else(|p| p.into_inner()));
    let budget = Duration::from_secs(if opts.quick { 20 } else { 60 });
    let mut f =
        tokio::task::block_in_place(|| history::check(&hist, final_counter, promises, budget));
    if hist.counter.is_empty() {
        f.violations
            .push("no counter write was attempted: the run proves nothing".into());
    }
    f.notes.extend(liveness_note);
    Ok(f)
}

/// Whether the run must show no spurious loss (safety.md case 27): only a
/// latency scenario whose worst added round trip stays under a third of the
/// TTL promises that renewals arrive in time. Otherwise the check is off and
/// the note says why (or, with `force`, on anyway and the note says so).
fn liveness(
    scenario: Scenario,
    ttl: Duration,
    force: bool,
    mut p: Promises,
) -> (Promises, Option<String>) {
    let Some(rtt) = scenario.max_added_rtt() else {
        return (p, None);
    };
    let holds = rtt * 3 < ttl;
    p.no_spurious_loss = holds || force;
    let note = match (holds, force) {
        (true, _) => None,
        (false, false) => Some(format!(
            "spurious-loss check not done: the injected latency allows a round trip of up to \
             {} ms, not under TTL/3 = {} ms (TTL {} ms)",
            rtt.as_millis(),
            (ttl / 3).as_millis(),
            ttl.as_millis()
        )),
        (false, true) => Some(format!(
            "spurious-loss check FORCED (self-test): a round trip of up to {} ms is not under \
             TTL/3 = {} ms (TTL {} ms), so losses are expected",
            rtt.as_millis(),
            (ttl / 3).as_millis(),
            ttl.as_millis()
        )),
    };
    (p, note)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Promises = Promises {
        linearizable_reads: true,
        durable: true,
        restarted: false,
        no_spurious_loss: false,
    };

    #[test]
    fn slow_network_checks_spurious_losses_only_where_rtt_stays_under_a_third_of_the_ttl() {
        // 2 × (20 + 180) ms = 400 ms; every backend's default TTL is > 1.2 s.
        assert_eq!(
            Scenario::SlowNetwork.max_added_rtt(),
            Some(Duration::from_millis(400))
        );
        for b in BackendKind::ALL {
            let (p, note) = liveness(Scenario::SlowNetwork, b.ttl(), false, P);
            assert!(p.no_spurious_loss, "{b:?}");
            assert!(note.is_none(), "{b:?}: {note:?}");
        }
        let (p, note) = liveness(Scenario::SlowNetwork, Duration::from_millis(1200), false, P);
        assert!(!p.no_spurious_loss);
        assert!(note.unwrap().contains("not done"));
        let (p, note) = liveness(Scenario::SlowNetwork, Duration::from_millis(300), true, P);
        assert!(p.no_spurious_loss);
        assert!(note.unwrap().contains("FORCED"));
        let (p, note) = liveness(Scenario::HolderPause, Duration::from_secs(2), true, P);
        assert!(!p.no_spurious_loss && note.is_none());
    }
}
