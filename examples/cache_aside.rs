//! Cache-aside under a distributed lock, as the blog posts do it — and
//! done right.
//!
//! ```text
//! cargo run --example cache_aside [-- URL]          # mem:// by default
//! cargo run --features redis --example cache_aside -- redis://127.0.0.1:6379
//! ```
//!
//! A "database" prefix and a "cache" prefix live in the store. 8 writers
//! update 4 records; each update takes the record's lock, writes the
//! database, then refreshes the cache. Writer 0 is paused (its process
//! stops, so its lease is not renewed) between its database write and its
//! cache write, until the other writers are done: its lock expires and
//! the others update the same record meanwhile.
//!
//! - **naive**: lock, write DB, write cache, unlock. The paused writer
//!   wakes up and overwrites the cache with its old value: the cache
//!   disagrees with the database for good.
//! - **fenced**: the DB write is fenced with the lock
//!   (`when held(guard)`), and the cache is refilled from the DB *at a
//!   revision*: the cache write commits only if the record's DB revision is
//!   still the one its value was read at. A late writer's refill fails and
//!   can never overwrite a newer value. Ends with 0 mismatches, every time.

use latchkey::prelude::*;
use std::sync::Arc;
use tokio::sync::Notify;

const WRITERS: usize = 8;
const RECORDS: usize = 4;
const UPDATES: usize = 12;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Recipe {
    Naive,
    Fenced,
}

struct Run {
    db: String,
    cache: String,
    lock: String,
    ttl: Duration,
}

impl Run {
    fn db(&self, r: usize) -> String {
        format!("{}{r}", self.db)
    }
    fn cache(&self, r: usize) -> String {
        format!("{}{r}", self.cache)
    }
    fn lock(&self, r: usize) -> String {
        format!("{}{r}", self.lock)
    }
}

/// One update of record `r` to `value`. `pause` is awaited between the
/// database write and the cache write, after the lease stopped renewing.
async fn update(
    c: &Coordinator,
    run: &Run,
    recipe: Recipe,
    r: usize,
    value: String,
    pause: Option<(&Notify, &Notify)>,
) -> latchkey::Result<()> {
    let guard = c.lock(&run.lock(r), LockOptions::ttl(run.ttl)).await?;
    match recipe {
        Recipe::Naive => {
            c.put(
                &run.db(r),
                Bytes::from(value.clone()),
                PutOptions::default(),
            )
            .await?;
            if let Some((paused, resume)) = pause {
                guard.abandon().await; // the process stops: no more renewals
                paused.notify_one();
                resume.notified().await;
            }
            c.put(&run.cache(r), Bytes::from(value), PutOptions::default())
                .await?;
        }
        Recipe::Fenced => {
            let out = c
                .txn(
                    TxnRequest::new()
                        .when([Compare::held(&guard)])
                        .then([Op::put(run.db(r), value)]),
                )
                .await?;
            if let Some((paused, resume)) = pause {
                guard.abandon().await;
                paused.notify_one();
                resume.notified().await;
            }
            if out.succeeded {
                refill(c, run, r).await?;
            }
        }
    }
    guard.release().await
}

/// Refills the cache from the database at the revision read: commits only
/// if the record was not written since.
async fn refill(c: &Coordinator, run: &Run, r: usize) -> latchkey::Result<()> {
    let Some(kv) = c.get(&run.db(r)).await? else {
        return Ok(());
    };
    let out = c
        .txn(
            TxnRequest::new()
                .when([Compare::revision(run.db(r), CmpOp::Equal, kv.revision)])
                .then([Op::put(run.cache(r), kv.value)]),
        )
        .await?;
    if !out.succeeded {
        // Someone wrote the record after our read; their refill wins.
        println!("  fenced: a late cache refill of record {r} was refused");
    }
    Ok(())
}

async fn run_once(
    url: &str,
    recipe: Recipe,
    id: &str,
) -> Result<usize, Box<dyn std::error::Error>> {
    let probe = latchkey::connect(url).await?;
    let caps = probe.capabilities();
    let tag = format!("{recipe:?}").to_lowercase();
    let run = Arc::new(Run {
        db: format!("cache_aside/{id}/{tag}/db/"),
        cache: format!("cache_aside/{id}/{tag}/cache/"),
        lock: format!("cache_aside/{id}/{tag}/lock/"),
        ttl: caps.min_ttl.max(Duration::from_secs(1)),
    });
    let (paused, resume) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let mut others = Vec::new();
    // Writer 0 updates record 0 first and is paused mid-update.
    let w0 = latchkey::connect(url).await?;
    let (run0, paused0, resume0) = (run.clone(), paused.clone(), resume.clone());
    let writer0 = tokio::spawn(async move {
        update(
            &w0,
            &run0,
            recipe,
            0,
            "w0-0".into(),
            Some((&paused0, &resume0)),
        )
        .await
    });
    paused.notified().await;
    for w in 1..WRITERS {
        let c = latchkey::connect(url).await?;
        let run = run.clone();
        others.push(tokio::spawn(async move {
            for i in 0..UPDATES {
                let r = (w + i) % RECORDS;
                update(&c, &run, recipe, r, format!("w{w}-{i}"), None).await?;
            }
            Ok::<_, latchkey::Error>(())
        }));
    }
    for t in others {
        t.await??;
    }
    // The paused writer wakes up, long after its lease expired.
    resume.notify_one();
    writer0.await??;
    let mut mismatches = 0;
    for r in 0..RECORDS {
        let db = probe.get(&run.db(r)).await?.map(|kv| kv.value);
        let cache = probe.get(&run.cache(r)).await?.map(|kv| kv.value);
        if db != cache {
            mismatches += 1;
            println!(
                "  {tag}: record {r}: db = {:?}, cache = {:?}",
                db.map(|b| String::from_utf8_lossy(&b).into_owned()),
                cache.map(|b| String::from_utf8_lossy(&b).into_owned())
            );
        }
        for k in [run.db(r), run.cache(r)] {
            probe.delete(&k, DeleteOptions::default()).await?;
        }
    }
    Ok(mismatches)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var(latchkey::URL_ENV).ok())
        .unwrap_or_else(|| latchkey::DEFAULT_URL.into());
    let id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let backend = latchkey::connect(&url).await?.name();
    println!("backend={backend}: {WRITERS} writers, {RECORDS} records, writer 0 paused past its lock TTL mid-update");
    let naive = run_once(&url, Recipe::Naive, &id).await?;
    println!("naive  (lock, write DB, write cache, unlock): {naive} of {RECORDS} records end with cache != DB");
    let fenced = run_once(&url, Recipe::Fenced, &id).await?;
    println!("fenced (fenced DB write, cache refilled at a revision): {fenced} of {RECORDS} records end with cache != DB");
    if fenced != 0 {
        return Err(format!("the fenced recipe left {fenced} mismatches").into());
    }
    Ok(())
}
