//! The classic "workers increment a number under a distributed lock" job,
//! done right: every increment is a fenced write, so a worker that lost its
//! lock (paused past the TTL, partitioned) can never overwrite a newer value.
//!
//! ```text
//! cargo run --example counter [-- URL] [--workers W] [--iterations N] [--key K --processes P]
//! ```
//! Prints the final and expected counts and exits non-zero if they differ.
//! To share one counter between P processes, start each with the same
//! `--key` and `--processes P`: each waits for the others and checks the total.

use latchkey::prelude::*;
use std::sync::Arc;

struct Args {
    url: String,
    workers: usize,
    iterations: u64,
    key: Option<String>,
    processes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        url: std::env::var(latchkey::URL_ENV).unwrap_or_else(|_| latchkey::DEFAULT_URL.into()),
        workers: 8,
        iterations: 50,
        key: None,
        processes: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--workers" => {
                args.workers = value("--workers")?
                    .parse()
                    .map_err(|e| format!("--workers: {e}"))?
            }
            "--iterations" => {
                args.iterations = value("--iterations")?
                    .parse()
                    .map_err(|e| format!("--iterations: {e}"))?
            }
            "--key" => args.key = Some(value("--key")?),
            "--processes" => {
                args.processes = value("--processes")?
                    .parse()
                    .map_err(|e| format!("--processes: {e}"))?
            }
            s if !s.starts_with("--") => args.url = s.to_string(),
            s => return Err(format!("unknown option {s}")),
        }
    }
    Ok(args)
}

async fn increment(coord: &Coordinator, key: &str, lock: &str) -> latchkey::Result<bool> {
    let guard = coord
        .lock(lock, LockOptions::ttl(Duration::from_secs(10)))
        .await?;
    let current = match coord.get(key).await? {
        Some(kv) => String::from_utf8_lossy(&kv.value)
            .parse::<u64>()
            .unwrap_or(0),
        None => 0,
    };
    let out = coord
        .txn(
            TxnRequest::new()
                .when([Compare::held(&guard)])
                .then([Op::put(key, (current + 1).to_string())]),
        )
        .await?;
    guard.release().await?;
    Ok(out.succeeded)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let run_id = format!("{}-{}", std::process::id(), rand_suffix());
    let key = args
        .key
        .clone()
        .unwrap_or_else(|| format!("counter/{run_id}"));
    let lock = format!("{key}.lock");
    let started = std::time::Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.workers {
        // Each worker is its own client (its own connection and lease).
        let coord = latchkey::connect(&args.url).await?;
        let (key, lock, done, n) = (key.clone(), lock.clone(), done.clone(), args.iterations);
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                // A refused fenced write means the lock was lost before the
                // write: nothing was written, so the increment is retried.
                while !increment(&coord, &key, &lock).await? {}
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Ok::<_, latchkey::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let mine = done.load(std::sync::atomic::Ordering::SeqCst);
    let coord = latchkey::connect(&args.url).await?;
    let expected = if args.processes > 1 {
        // Publish this process's count, then wait for every process's.
        coord
            .put(
                &format!("{key}.done/{run_id}"),
                Bytes::from(mine.to_string()),
                PutOptions::default(),
            )
            .await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        loop {
            let done = coord
                .list(&format!("{key}.done/"), ListOptions::default())
                .await?;
            if done.len() >= args.processes {
                break done
                    .iter()
                    .map(|kv| {
                        String::from_utf8_lossy(&kv.value)
                            .parse::<u64>()
                            .unwrap_or(0)
                    })
                    .sum::<u64>();
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "only {} of {} processes finished",
                    done.len(),
                    args.processes
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    } else {
        args.workers as u64 * args.iterations
    };
    let final_count = match coord.get(&key).await? {
        Some(kv) => String::from_utf8_lossy(&kv.value).parse::<u64>()?,
        None => 0,
    };
    println!(
        "backend={} workers={} iterations={} final={} expected={} ({:.2?})",
        coord.name(),
        args.workers,
        args.iterations,
        final_count,
        expected,
        started.elapsed()
    );
    if final_count != expected {
        return Err(format!("final count {final_count} != expected {expected}").into());
    }
    Ok(())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
