//! `latchkey bench`: the three lock workloads, against any URL.
//!
//! - W1 uncontended: one client, sequential acquire+release of one lock.
//! - W2 contended counter: C clients × N iterations of lock → get → fenced
//!   put counter+1 → release; the final count must equal C × N.
//! - W3 handoff: clients pass one lock along; latency from the holder's
//!   `release()` call to the next waiter's `lock()` returning.

use crate::args::{BenchArgs, Cli, Workload};
use latchkey::prelude::*;
use serde_json::json;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

type Res = Result<ExitCode, Box<dyn std::error::Error>>;

const TTL: Duration = Duration::from_secs(15);

struct Report {
    workload: &'static str,
    params: serde_json::Value,
    ops: u64,
    seconds: f64,
    latencies_us: Vec<u64>,
    final_count: Option<u64>,
    expected_count: Option<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn unique(prefix: &str) -> String {
    format!(
        "bench/{prefix}/{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    )
}

pub async fn run(cli: &Cli, a: &BenchArgs) -> Res {
    let coord = latchkey::connect(&cli.url).await?;
    let backend = coord.name();
    let report = match a.workload {
        Workload::W1 => w1(&coord, a.ops.unwrap_or(2000)).await?,
        Workload::W2 => w2(&cli.url, a.clients, a.ops.unwrap_or(100)).await?,
        Workload::W3 => {
            if !(2..=256).contains(&a.waiters) {
                return Err("--waiters must be between 2 and 256".into());
            }
            w3(&cli.url, a.waiters, a.ops.unwrap_or(200)).await?
        }
    };
    let mut lat = report.latencies_us.clone();
    lat.sort_unstable();
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    let ops_per_sec = report.ops as f64 / report.seconds.max(1e-9);
    let counts_ok = report.final_count == report.expected_count;
    if cli.json {
        println!(
            "{}",
            json!({
                "peer": "latchkey",
                "backend": backend,
                "workload": report.workload,
                "params": report.params,
                "ops": report.ops,
                "seconds": report.seconds,
                "ops_per_sec": ops_per_sec,
                "p50_us": p50,
                "p99_us": p99,
                "final_count": report.final_count,
                "expected_count": report.expected_count,
            })
        );
    } else {
        println!(
            "{backend} {}: {} ops in {:.3} s = {:.0} ops/s, p50 {p50} µs, p99 {p99} µs{}",
            report.workload,
            report.ops,
            report.seconds,
            ops_per_sec,
            match (report.final_count, report.expected_count) {
                (Some(f), Some(e)) => format!(", final {f} / expected {e}"),
                _ => String::new(),
            }
        );
    }
    Ok(if counts_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::ERROR)
    })
}

async fn w1(coord: &Coordinator, n: u64) -> Result<Report, Error> {
    let name = unique("w1");
    let mut lat = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let g = coord.lock(&name, LockOptions::ttl(TTL)).await?;
        g.release().await?;
        lat.push(t.elapsed().as_micros() as u64);
    }
    Ok(Report {
        workload: "W1",
        params: json!({"iterations": n}),
        ops: n,
        seconds: start.elapsed().as_secs_f64(),
        latencies_us: lat,
        final_count: None,
        expected_count: None,
    })
}

async fn w2(url: &str, clients: usize, n: u64) -> Result<Report, Error> {
    let key = unique("w2");
    let lock = format!("{key}.lock");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let c = latchkey::connect(url).await?;
        let (key, lock) = (key.clone(), lock.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let t = Instant::now();
                loop {
                    let g = c.lock(&lock, LockOptions::ttl(TTL)).await?;
                    let cur = match c.get(&key).await? {
                        Some(kv) => String::from_utf8_lossy(&kv.value)
                            .parse::<u64>()
                            .unwrap_or(0),
                        None => 0,
                    };
                    let out = c
                        .txn(
                            TxnRequest::new()
                                .when([Compare::held(&g)])
                                .then([Op::put(key.as_str(), (cur + 1).to_string())]),
                        )
                        .await?;
                    g.release().await?;
                    if out.succeeded {
                        break;
                    }
                }
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, Error>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(
            t.await
                .map_err(|e| Error::InvalidArgument(e.to_string()))??,
        );
    }
    let seconds = start.elapsed().as_secs_f64();
    let c = latchkey::connect(url).await?;
    let final_count = c
        .get(&key)
        .await?
        .map(|kv| {
            String::from_utf8_lossy(&kv.value)
                .parse::<u64>()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    Ok(Report {
        workload: "W2",
        params: json!({"clients": clients, "iterations": n}),
        ops: clients as u64 * n,
        seconds,
        latencies_us: lat,
        final_count: Some(final_count),
        expected_count: Some(clients as u64 * n),
    })
}

async fn w3(url: &str, waiters: usize, handoffs: u64) -> Result<Report, Error> {
    let name = unique("w3");
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let waiting = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let lat: Arc<Mutex<Vec<u64>>> = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..waiters {
        let c = latchkey::connect(url).await?;
        let (name, released_at, waiting, done, lat) = (
            name.clone(),
            released_at.clone(),
            waiting.clone(),
            done.clone(),
            lat.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                waiting.fetch_add(1, Ordering::SeqCst);
                let g = c.lock(&name, LockOptions::ttl(TTL)).await?;
                let now = Instant::now();
                waiting.fetch_sub(1, Ordering::SeqCst);
                if let Some(t) = released_at.lock().unwrap().take() {
                    lat.lock()
                        .unwrap()
                        .push(now.saturating_duration_since(t).as_micros() as u64);
                }
                let finished = done.fetch_add(1, Ordering::SeqCst) as u64 >= handoffs;
                // Hand over only once someone is queued, so every release is a handoff.
                let deadline = Instant::now() + Duration::from_secs(5);
                while !finished && waiting.load(Ordering::SeqCst) == 0 && Instant::now() < deadline
                {
                    tokio::task::yield_now().await;
                }
                // Stamped before the call, so a waiter that wins before our
                // release() returns still yields a sample (this includes the
                // release round trip: it is the conservative measure).
                *released_at.lock().unwrap() = (!finished).then(Instant::now);
                g.release().await?;
                if finished || done.load(Ordering::SeqCst) as u64 > handoffs {
                    return Ok::<_, Error>(());
                }
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::InvalidArgument(e.to_string()))??;
    }
    let lat = std::mem::take(&mut *lat.lock().unwrap());
    Ok(Report {
        workload: "W3",
        params: json!({"waiters": waiters, "handoffs": handoffs}),
        ops: lat.len() as u64,
        seconds: start.elapsed().as_secs_f64(),
        latencies_us: lat,
        final_count: None,
        expected_count: None,
    })
}
