//! A map replicated across "servers" through the store: three handles each
//! keep a [`Mirror`](latchkey::recipes::Mirror) of `config/`; one writes,
//! the others report when they see each write — the lag in revisions and
//! milliseconds — and all end on the same state.
//!
//! ```text
//! cargo run --example replicated_map [-- URL]       # mem:// by default
//! ```
//!
//! This replaces the "sync a HashMap through Redis and a message queue"
//! recipe: a mirror is filled by one listing and kept current by a watch
//! from that point, resynchronises (list again, swap atomically) after a
//! reconnect or a compaction, and never shows a mix of two states.

use latchkey::prelude::*;
use latchkey::recipes::Mirror;
use std::time::Instant;

const PREFIX: &str = "config/";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var(latchkey::URL_ENV).ok())
        .unwrap_or_else(|| latchkey::DEFAULT_URL.into());
    let mut servers = Vec::new();
    for name in ["a", "b", "c"] {
        let c = latchkey::connect(&url).await?;
        let mirror = Mirror::start(c.backend().clone(), PREFIX).await?;
        servers.push((name, c, mirror));
    }
    println!(
        "backend={}: 3 mirrors of {PREFIX:?}, {} keys at revision {}",
        servers[0].1.name(),
        servers[0].2.snapshot().len(),
        servers[0].2.revision()
    );
    let writer = servers[0].1.clone();
    let run = std::process::id();
    for (i, (key, value)) in [
        ("config/greeting", format!("hello from {run}")),
        ("config/max-connections", "128".to_string()),
        ("config/greeting", format!("hello again from {run}")),
        ("config/feature-x", "on".to_string()),
    ]
    .into_iter()
    .enumerate()
    {
        let sent = Instant::now();
        let rev = writer
            .put(key, Bytes::from(value.clone()), PutOptions::default())
            .await?;
        // Where each mirror stands when the write is acknowledged.
        let at_ack: Vec<u64> = servers.iter().map(|s| s.2.revision()).collect();
        println!("write {i}: a puts {key} = {value:?} at revision {rev}");
        let mut waits = Vec::new();
        for (j, (name, _, mirror)) in servers.iter().enumerate().skip(1) {
            let (mirror, name, behind) = (mirror.clone(), *name, rev.saturating_sub(at_ack[j]));
            waits.push(tokio::spawn(async move {
                let snap = tokio::time::timeout(Duration::from_secs(10), mirror.wait_for(rev))
                    .await
                    .map_err(|_| format!("mirror {name} did not reach revision {rev}"))?
                    .map_err(|e| e.to_string())?;
                let seen = snap.get(key).map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                Ok::<_, String>(format!(
                    "  {name} sees {key} = {:?} after {:.2} ms ({behind} revision(s) behind when the write was acknowledged)",
                    seen.unwrap_or_default(),
                    sent.elapsed().as_secs_f64() * 1000.0
                ))
            }));
        }
        for w in waits {
            println!("{}", w.await??);
        }
    }
    // Delete one key: every mirror drops it too.
    writer
        .delete("config/feature-x", DeleteOptions::default())
        .await?;
    let last = writer
        .put(
            "config/last-change",
            Bytes::from(run.to_string()),
            PutOptions::default(),
        )
        .await?;
    let mut states = Vec::new();
    for (name, _, mirror) in &servers {
        let snap = mirror.wait_for(last).await?;
        states.push((name, snap));
    }
    let converged = states
        .windows(2)
        .all(|w| w[0].1.entries() == w[1].1.entries());
    println!("converged: {converged} (revision {last}); the mirrored map:");
    for kv in states[0].1.iter() {
        println!("  {} = {:?}", kv.key, String::from_utf8_lossy(&kv.value));
    }
    for (name, _, mirror) in &servers {
        println!("  mirror {name}: {} resync(s)", mirror.resyncs());
    }
    if !converged {
        return Err("the mirrors did not converge".into());
    }
    Ok(())
}
