//! The clients: fenced-counter clients and KV register clients in this
//! process, and a fenced-counter client in a separate OS process (the
//! "holder" child, driven over a line protocol) that can be frozen.
//!
//! Every op is recorded *before* it is sent, as of unknown outcome, and
//! filled in when it returns: a client aborted at the end of a run (or a
//! child killed) leaves an honest indeterminate op, never a missing write.

use crate::env::ProxyGroup;
use crate::history::{now_ns, CounterAttempt, History, HoldingEnd, StaleHolder, WriteOutcome};
use latchkey::prelude::*;
use latchkey_conformance::checkers::{KvInput, KvOperation, KvOutput, Operation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The names every client of one run shares.
#[derive(Clone, Debug)]
pub struct RunCfg {
    /// The counter's lock.
    pub lock: String,
    /// The counter's key.
    pub counter_key: String,
    /// The register keys.
    pub kv_keys: Vec<String>,
    /// Lock TTL.
    pub ttl: Duration,
    /// Bound of every single request.
    pub op_timeout: Duration,
    /// How long `lock()` may wait.
    pub lock_wait: Duration,
    /// Test-only: write the counter with a plain put instead of the fenced txn.
    pub unfenced: bool,
}

impl RunCfg {
    /// The defaults for a lock TTL.
    pub fn new(ttl: Duration, unfenced: bool) -> Self {
        RunCfg {
            lock: "faults-counter".into(),
            counter_key: "faults/counter".into(),
            kv_keys: (0..3).map(|i| format!("faults/reg/{i}")).collect(),
            ttl,
            op_timeout: Duration::from_secs(4).max(ttl),
            lock_wait: ttl * 2 + Duration::from_secs(3),
            unfenced,
        }
    }

    /// The longest the holder child stays stale in an episode staged `how`:
    /// past the TTL and until another client took the lock. A cut-off leader
    /// gets 30 s more: the majority first has to elect a new one (a
    /// ZooKeeper ensemble under load took over 15 s).
    pub fn stale_window(&self, how: Stale) -> Duration {
        let extra = match how {
            Stale::Minority(_) => Duration::from_secs(30),
            _ => Duration::ZERO,
        };
        self.ttl * 4 + self.lock_wait + extra
    }

    /// How soon after the child went stale its episode is recorded at the
    /// latest: the window, then the write and the release (each bounded by
    /// twice the op timeout), and a margin.
    pub fn stale_recorded_within(&self, how: Stale) -> Duration {
        self.stale_window(how) + self.op_timeout * 4 + Duration::from_secs(5)
    }

    /// How long a long holding waits between its read and its write: a third
    /// longer than the TTL (about four renewal periods of TTL/3).
    pub fn long_hold(&self) -> Duration {
        self.ttl * 4 / 3
    }
}

/// Sleeps `d`, in steps, ending early when the run stops.
async fn hold_for(d: Duration, shared: &Shared) {
    let end = Instant::now() + d;
    while !shared.stopped() && Instant::now() < end {
        let left = end.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_millis(50))).await;
    }
}

/// How the scenario wants the holder child made stale while it holds the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// SIGSTOP the child process.
    Stop,
    /// Black-hole the child's network (its fault proxies).
    BlackHole,
    /// Stall the child's proxies to every member but this one, which the
    /// scenario has cut off from its peers: a holder stranded on the
    /// minority side of a member partition.
    Minority(usize),
}

impl Stale {
    fn label(self) -> &'static str {
        match self {
            Stale::Stop => "holder SIGSTOP",
            Stale::BlackHole => "client black-hole",
            Stale::Minority(_) => "holder stranded with the cut-off member",
        }
    }
}

/// State shared by the clients and the fault driver of one run.
#[derive(Default)]
pub struct Shared {
    /// The recorded history.
    pub hist: Mutex<History>,
    /// Set at the end of the run.
    pub stop: AtomicBool,
    /// Latest time an in-process counter client's `lock()` returned.
    pub last_local_acquire: AtomicU64,
    /// A stale-holder episode the child driver should stage at its next hold.
    pub stale_request: Mutex<Option<Stale>>,
    /// True while slow-network's latency is on. Then about every 4th
    /// holding of a counter client lasts [`RunCfg::long_hold`]: a holding
    /// that outlives its TTL survives only if its renewals worked, so the
    /// spurious-loss check covers renewal under latency, not just the
    /// acquisition. (Only then: the rest of the run keeps its throughput.)
    pub latency_on: AtomicBool,
    /// True while the holder child is held stale (it holds the lock and the
    /// requested fault is applied), so a scenario can add its own fault then.
    pub stale_active: AtomicBool,
    /// Client ids.
    next_client: AtomicUsize,
}

impl Shared {
    /// A fresh client id.
    pub fn client_id(&self) -> usize {
        self.next_client.fetch_add(1, Ordering::SeqCst)
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    fn with<R>(&self, f: impl FnOnce(&mut History) -> R) -> R {
        f(&mut self.hist.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

async fn connect_retry(url: &str, shared: &Shared) -> Option<Coordinator> {
    while !shared.stopped() {
        match tokio::time::timeout(Duration::from_secs(5), latchkey::connect(url)).await {
            Ok(Ok(c)) => return Some(c),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    None
}

fn parse_counter(v: Option<KeyValue>) -> Result<u64, String> {
    match v {
        None => Ok(0),
        Some(kv) => std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("counter holds {:?}", kv.value)),
    }
}

/// The fenced write of the counter (or, with `unfenced`, a plain put).
async fn write_counter(
    c: &Coordinator,
    guard: &LockGuard,
    cfg: &RunCfg,
    value: u64,
) -> WriteOutcome {
    write_counter_why(c, guard, cfg, value).await.0
}

/// [`write_counter`], with the error behind an unknown outcome.
async fn write_counter_why(
    c: &Coordinator,
    guard: &LockGuard,
    cfg: &RunCfg,
    value: u64,
) -> (WriteOutcome, String) {
    let v = Bytes::from(value.to_string());
    if cfg.unfenced {
        return match tokio::time::timeout(
            cfg.op_timeout,
            c.put(&cfg.counter_key, v, PutOptions::default()),
        )
        .await
        {
            Ok(Ok(_)) => (WriteOutcome::Committed, String::new()),
            Ok(Err(e)) => (WriteOutcome::Indeterminate, e.to_string()),
            Err(_) => (WriteOutcome::Indeterminate, "timed out".into()),
        };
    }
    let txn = TxnRequest::new()
        .when([Compare::held(guard)])
        .then([Op::put(cfg.counter_key.clone(), v)]);
    match tokio::time::timeout(cfg.op_timeout, c.txn(txn)).await {
        Ok(Ok(out)) if out.succeeded => (WriteOutcome::Committed, String::new()),
        Ok(Ok(_)) => (WriteOutcome::Rejected, String::new()),
        // A lost lock reported as an error by the held() compare: nothing was written.
        Ok(Err(Error::LockLost { .. })) => (WriteOutcome::Rejected, String::new()),
        Ok(Err(e)) => (WriteOutcome::Indeterminate, e.to_string()),
        Err(_) => (WriteOutcome::Indeterminate, "timed out".into()),
    }
}

/// An in-process fenced-counter client: lock → read → fenced write of
/// read+1 → release, until the run stops.
pub async fn counter_client(url: String, cfg: Arc<RunCfg>, shared: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Some(c) = connect_retry(&url, &shared).await else {
        return;
    };
    let client = shared.client_id();
    while !shared.stopped() {
        shared.with(|h| h.ops += 1);
        let opts = LockOptions::ttl(cfg.ttl).with_wait(cfg.lock_wait);
        let guard =
            match tokio::time::timeout(cfg.lock_wait + cfg.op_timeout, c.lock(&cfg.lock, opts))
                .await
            {
                Ok(Ok(g)) => g,
                Ok(Err(e)) => {
                    shared.with(|h| h.note(format!("lock: {e}")));
                    tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
                    continue;
                }
                Err(_) => continue,
            };
        let acquired = now_ns();
        shared
            .last_local_acquire
            .fetch_max(acquired, Ordering::SeqCst);
        shared.with(|h| h.ops += 1);
        let read = tokio::time::timeout(cfg.op_timeout, c.get(&cfg.counter_key)).await;
        let n = match read {
            Ok(Ok(v)) => match parse_counter(v) {
                Ok(n) => Some(n),
                Err(e) => {
                    shared.with(|h| h.note(e));
                    None
                }
            },
            _ => None,
        };
        if shared.latency_on.load(Ordering::SeqCst) && rng.random_range(0..4) == 0 {
            hold_for(cfg.long_hold(), &shared).await;
        }
        let mut write = None;
        if let Some(n) = n {
            let write_call = now_ns();
            let idx = shared.with(|h| {
                h.ops += 1;
                h.counter.push(CounterAttempt {
                    client,
                    token: guard.fencing_token(),
                    acquired,
                    value: n + 1,
                    write_call,
                    outcome: WriteOutcome::Indeterminate,
                });
                h.counter.len() - 1
            });
            let outcome = write_counter(&c, &guard, &cfg, n + 1).await;
            shared.with(|h| h.counter[idx].outcome = outcome);
            write = Some(outcome);
        }
        // Read before the release, which fires lost() itself.
        let end = HoldingEnd {
            client,
            process: "in-process",
            token: guard.fencing_token(),
            acquired,
            released: now_ns(),
            lost: guard.is_lost(),
            write,
            staged: false,
        };
        shared.with(|h| {
            h.ops += 1;
            h.holdings.push(end);
        });
        let _ = tokio::time::timeout(cfg.op_timeout, guard.release()).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
    }
}

/// An in-process KV register client: random get / put / CAS on a few keys.
/// After an op of unknown outcome it continues under a new client id (a
/// client with a pending op never issues another, as Knossos requires).
pub async fn kv_client(url: String, cfg: Arc<RunCfg>, shared: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Some(c) = connect_retry(&url, &shared).await else {
        return;
    };
    let mut client = shared.client_id();
    let mut seq = 0u64;
    let mut known: HashMap<String, Revision> = HashMap::new();
    while !shared.stopped() {
        let key = cfg.kv_keys[rng.random_range(0..cfg.kv_keys.len())].clone();
        seq += 1;
        let value = Bytes::from(format!("c{client}-{seq}"));
        let roll: u32 = rng.random_range(0..10);
        let input = match (roll, known.get(&key)) {
            (0..=3, _) | (7.., None) => KvInput::Get,
            (4..=6, _) => KvInput::Put { value },
            (_, Some(r)) => KvInput::Cas {
                expected: *r,
                value,
            },
        };
        let call = now_ns();
        let idx = shared.with(|h| {
            h.ops += 1;
            h.kv.push(KvOperation {
                key: key.clone(),
                op: Operation::indeterminate(client, input.clone(), call),
            });
            h.kv.len() - 1
        });
        let t = cfg.op_timeout;
        let out: Option<KvOutput> = match &input {
            KvInput::Get => match tokio::time::timeout(t, c.get(&key)).await {
                Ok(Ok(v)) => Some(KvOutput::Got(v.map(|kv| (kv.value, kv.revision)))),
                _ => None,
            },
            KvInput::Put { value } => {
                match tokio::time::timeout(t, c.put(&key, value.clone(), PutOptions::default()))
                    .await
                {
                    Ok(Ok(r)) => Some(KvOutput::Written(r)),
                    _ => None,
                }
            }
            KvInput::Cas { expected, value } => {
                match tokio::time::timeout(
                    t,
                    c.put(&key, value.clone(), PutOptions::if_revision(*expected)),
                )
                .await
                {
                    Ok(Ok(r)) => Some(KvOutput::Written(r)),
                    Ok(Err(Error::Conflict { current, .. })) => Some(KvOutput::Conflict(current)),
                    _ => None,
                }
            }
        };
        let ret = now_ns();
        match out {
            Some(o) => {
                match &o {
                    KvOutput::Got(Some((_, r))) | KvOutput::Written(r) => {
                        known.insert(key.clone(), *r);
                    }
                    KvOutput::Conflict(Some(r)) => {
                        known.insert(key.clone(), *r);
                    }
                    _ => {
                        known.remove(&key);
                    }
                }
                shared.with(|h| h.kv[idx].op.output = Some((o, ret.max(call))));
            }
            None => {
                // Unknown outcome: the op stays pending to the end; retire the client.
                client = shared.client_id();
                known.remove(&key);
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
    }
}

// ------------------------------------------------------------------ holder child

/// The child side: `latchkey-faults holder --url U [--unfenced] --ttl-ms T`.
/// Commands on stdin are `<seq> <cmd> [arg]`; every reply is `<seq> <payload>`
/// on stdout. Nothing else is written to stdout.
pub fn holder_main(url: String, cfg: RunCfg) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("holder: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match std::io::BufRead::read_line(&mut stdin.lock(), &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(line.trim_end().to_string()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rt.block_on(async move {
        let say = |s: String| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{s}");
            let _ = out.flush();
        };
        say("0 ready".into());
        let mut coord: Option<Coordinator> = None;
        let mut guard: Option<LockGuard> = None;
        while let Some(line) = rx.recv().await {
            let mut parts = line.split_whitespace();
            let seq = parts.next().unwrap_or("0").to_string();
            let cmd = parts.next().unwrap_or("");
            let arg = parts.next().unwrap_or("");
            if cmd == "quit" {
                break;
            }
            if coord.is_none() {
                if let Ok(Ok(c)) =
                    tokio::time::timeout(cfg.op_timeout, latchkey::connect(&url)).await
                {
                    coord = Some(c);
                }
            }
            let Some(c) = coord.as_ref() else {
                say(format!("{seq} err cannot connect"));
                continue;
            };
            let reply = match cmd {
                "lock" => {
                    if let Some(g) = guard.take() {
                        let _ = tokio::time::timeout(cfg.op_timeout, g.release()).await;
                    }
                    let opts = LockOptions::ttl(cfg.ttl).with_wait(cfg.lock_wait);
                    match tokio::time::timeout(
                        cfg.lock_wait + cfg.op_timeout,
                        c.lock(&cfg.lock, opts),
                    )
                    .await
                    {
                        Ok(Ok(g)) => {
                            let r = format!("locked {} {}", g.fencing_token(), now_ns());
                            guard = Some(g);
                            r
                        }
                        Ok(Err(e)) => format!("err {e}"),
                        Err(_) => "err lock timed out".into(),
                    }
                }
                "read" => match tokio::time::timeout(cfg.op_timeout, c.get(&cfg.counter_key)).await
                {
                    Ok(Ok(v)) => match parse_counter(v) {
                        Ok(n) => format!("read {n}"),
                        Err(e) => format!("err {e}"),
                    },
                    Ok(Err(e)) => format!("err {e}"),
                    Err(_) => "err read timed out".into(),
                },
                "write" => match (guard.as_ref(), arg.parse::<u64>()) {
                    (Some(g), Ok(v)) if cfg.unfenced => {
                        // Unfenced, the write goes through a fresh connection, as
                        // to a store of its own: on ZooKeeper a paused holder's own
                        // session has expired, which would refuse the write even
                        // without a fence and hide what the checkers must catch.
                        match tokio::time::timeout(cfg.op_timeout, latchkey::connect(&url)).await {
                            Ok(Ok(store)) => {
                                let (o, why) = write_counter_why(&store, g, &cfg, v).await;
                                format!("write {} {} {why}", o.as_str(), u8::from(g.is_lost()))
                            }
                            _ => format!(
                                "write {} {} cannot connect",
                                WriteOutcome::Rejected.as_str(),
                                u8::from(g.is_lost())
                            ),
                        }
                    }
                    (Some(g), Ok(v)) => {
                        let (o, why) = write_counter_why(c, g, &cfg, v).await;
                        format!("write {} {} {why}", o.as_str(), u8::from(g.is_lost()))
                    }
                    _ => "err no guard".into(),
                },
                "waitlost" => match guard.as_ref() {
                    Some(g) => {
                        let ms = arg.parse().unwrap_or(1000);
                        let fired = tokio::time::timeout(Duration::from_millis(ms), g.lost())
                            .await
                            .is_ok();
                        format!("lost {}", u8::from(fired))
                    }
                    None => "err no guard".into(),
                },
                "release" => {
                    // `released <lost> <ns>`: whether lost() had fired, read
                    // right before the release (which fires it itself).
                    let mut lost = 0;
                    let at = now_ns();
                    if let Some(g) = guard.take() {
                        lost = u8::from(g.is_lost());
                        let _ = tokio::time::timeout(cfg.op_timeout, g.release()).await;
                    }
                    format!("released {lost} {at}")
                }
                other => format!("err unknown command {other:?}"),
            };
            say(format!("{seq} {reply}"));
        }
    });
    std::process::ExitCode::SUCCESS
}

/// The parent side of the holder child: runs the counter loop through it,
/// and stages a stale-holder episode when the scenario asks for one.
pub struct ChildDriver {
    child: latchkey_testkit::ChildProcess,
    seq: u64,
}

impl ChildDriver {
    /// Starts `exe holder …` and waits for it to be ready.
    pub fn start(exe: &std::path::Path, url: &str, cfg: &RunCfg) -> Result<ChildDriver, String> {
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("holder")
            .arg("--url")
            .arg(url)
            .arg("--ttl-ms")
            .arg(cfg.ttl.as_millis().to_string());
        if cfg.unfenced {
            cmd.arg("--unfenced");
        }
        let child = latchkey_testkit::ChildProcess::spawn(cmd)
            .map_err(|e| format!("holder child {}: {e}", exe.display()))?;
        child
            .expect("0 ready", Duration::from_secs(20))
            .map_err(|e| format!("holder child not ready: {e}"))?;
        Ok(ChildDriver { child, seq: 0 })
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn ask(&mut self, cmd: &str, timeout: Duration) -> Result<String, String> {
        self.seq += 1;
        let seq = self.seq;
        self.child
            .send(&format!("{seq} {cmd}"))
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.child.recv(left).map_err(|e| e.to_string())?;
            if let Some(rest) = line.strip_prefix(&format!("{seq} ")) {
                return Ok(rest.to_string());
            }
            // A late answer to an earlier command that timed out: skip it.
        }
    }

    /// The counter loop, until the run stops (blocking; run it on its own thread).
    pub fn run(mut self, cfg: &RunCfg, shared: &Shared, proxies: &ProxyGroup) {
        let client = shared.client_id();
        let long = cfg.lock_wait + cfg.op_timeout * 2;
        // Holdings during the latency (the 1st, 5th, 9th … is a long one).
        let mut holdings = 3u64;
        while !shared.stopped() {
            shared.with(|h| h.ops += 1);
            let (token, acquired) = match self.ask("lock", long) {
                Ok(r) if r.starts_with("locked ") => {
                    let mut it = r.split_whitespace().skip(1);
                    let t = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                    let a = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                    (t, a)
                }
                Ok(_) => continue,
                Err(e) => {
                    if e.contains("closed") {
                        return;
                    }
                    continue;
                }
            };
            shared.with(|h| h.ops += 1);
            let n = match self.ask("read", cfg.op_timeout * 2) {
                Ok(r) => r.strip_prefix("read ").and_then(|s| s.parse::<u64>().ok()),
                Err(_) => None,
            };
            let Some(n) = n else {
                self.release(cfg, shared, client, token, acquired, None, false);
                continue;
            };
            if shared.latency_on.load(Ordering::SeqCst) {
                holdings += 1;
            }
            if shared.latency_on.load(Ordering::SeqCst) && holdings.is_multiple_of(4) {
                let end = Instant::now() + cfg.long_hold();
                while !shared.stopped() && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let stale = shared
                .stale_request
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let mut other_acquired = false;
            if let Some(how) = stale {
                let start = now_ns();
                let ok = match how {
                    Stale::Stop => self.child.pause().is_ok(),
                    Stale::BlackHole => {
                        proxies.set_mode(latchkey_testkit::ProxyMode::BlackHole);
                        true
                    }
                    Stale::Minority(v) => {
                        // Stall, not black-hole: like the routes that cut the
                        // member off, a partition TCP survives (bytes held,
                        // delivered on healing), not one with holes in streams.
                        for (i, p) in proxies.proxies.iter().enumerate() {
                            if i != v {
                                p.set_mode(latchkey_testkit::ProxyMode::Stall);
                            }
                        }
                        true
                    }
                };
                shared.stale_active.store(ok, Ordering::SeqCst);
                // Stay stale past the TTL and until another client has taken the lock.
                let deadline = Instant::now() + cfg.stale_window(how);
                let min = Instant::now() + cfg.ttl + Duration::from_millis(500);
                while ok && Instant::now() < deadline {
                    other_acquired = shared.last_local_acquire.load(Ordering::SeqCst) > start;
                    if other_acquired && Instant::now() >= min {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                match how {
                    Stale::Stop => {
                        let _ = self.child.resume();
                    }
                    Stale::BlackHole => proxies.set_mode(latchkey_testkit::ProxyMode::Pass),
                    Stale::Minority(v) => {
                        // The stranded holder fails over to the majority: its
                        // links to the others pass again, the one to the
                        // cut-off member breaks (RST, also for reconnects), so
                        // its write reaches a member that could commit it.
                        // (Sent to the cut-off member it could only time out.)
                        for (i, p) in proxies.proxies.iter().enumerate() {
                            p.set_mode(if i == v {
                                latchkey_testkit::ProxyMode::Reset
                            } else {
                                latchkey_testkit::ProxyMode::Pass
                            });
                        }
                        let until = Instant::now() + Duration::from_secs(1);
                        while proxies.proxies[v].open_connections() > 0 && Instant::now() < until {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                shared.stale_active.store(false, Ordering::SeqCst);
            }
            let write_call = now_ns();
            let idx = shared.with(|h| {
                h.ops += 1;
                h.counter.push(CounterAttempt {
                    client,
                    token,
                    acquired,
                    value: n + 1,
                    write_call,
                    outcome: WriteOutcome::Indeterminate,
                });
                h.counter.len() - 1
            });
            let (outcome, mut lost, why) =
                match self.ask(&format!("write {}", n + 1), cfg.op_timeout * 2) {
                    Ok(r) => {
                        let mut it = r.splitn(4, ' ');
                        match (
                            it.next(),
                            it.next().and_then(WriteOutcome::parse),
                            it.next(),
                        ) {
                            (Some("write"), Some(o), l) => {
                                (o, l == Some("1"), it.next().unwrap_or("").to_string())
                            }
                            _ => (WriteOutcome::Indeterminate, false, r.clone()),
                        }
                    }
                    Err(e) => (WriteOutcome::Indeterminate, false, e),
                };
            shared.with(|h| h.counter[idx].outcome = outcome);
            if let Some(how) = stale {
                if !lost {
                    let ms = (cfg.ttl + Duration::from_secs(2)).as_millis();
                    lost = matches!(
                        self.ask(&format!("waitlost {ms}"), cfg.ttl + Duration::from_secs(5)),
                        Ok(ref r) if r == "lost 1"
                    );
                }
                shared.with(|h| {
                    h.stale.push(StaleHolder {
                        how: how.label(),
                        other_acquired,
                        outcome,
                        error: why,
                        lost_fired: lost,
                    })
                });
            }
            self.release(
                cfg,
                shared,
                client,
                token,
                acquired,
                Some(outcome),
                stale.is_some(),
            );
        }
        let _ = self.child.send("0 quit");
    }

    /// Releases the child's guard and records the holding (with whether its
    /// `lost()` had fired before the release).
    #[allow(clippy::too_many_arguments)]
    fn release(
        &mut self,
        cfg: &RunCfg,
        shared: &Shared,
        client: usize,
        token: u64,
        acquired: u64,
        write: Option<WriteOutcome>,
        staged: bool,
    ) {
        shared.with(|h| h.ops += 1);
        let Ok(r) = self.ask("release", cfg.op_timeout * 2) else {
            // No answer (the child is gone or stuck): nothing known to record.
            return;
        };
        let mut it = r.split_whitespace();
        if it.next() != Some("released") {
            return;
        }
        let lost = it.next() == Some("1");
        let released = it
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(now_ns);
        shared.with(|h| {
            h.holdings.push(HoldingEnd {
                client,
                process: "holder child",
                token,
                acquired,
                released,
                lost,
                write,
                staged,
            })
        });
    }
}
