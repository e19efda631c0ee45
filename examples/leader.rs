//! Leader election: three candidates, one leader at a time; the leader
//! drops out (first by resigning, then by crashing) and another takes
//! over. Prints each term and the handover time.
//!
//! ```text
//! cargo run --example leader [-- URL]               # mem:// by default
//! ```
//!
//! The term is a fencing token: the leader's writes are fenced with
//! `leadership.fence()`, so a leader that was paused past its TTL can
//! never write after its successor took over.

use futures::StreamExt;
use latchkey::prelude::*;
use latchkey::recipes::Election;
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var(latchkey::URL_ENV).ok())
        .unwrap_or_else(|| latchkey::DEFAULT_URL.into());
    let name = format!("leader-example-{}", std::process::id());
    let observer = latchkey::connect(&url).await?;
    let ttl = observer.capabilities().min_ttl.max(Duration::from_secs(1));
    println!(
        "backend={}: election {name:?}, 3 candidates, lease TTL {ttl:?}",
        observer.name()
    );
    let mut watch = Election::new(observer.backend().clone(), name.as_str())?
        .observe()
        .await?;
    let printer = tokio::spawn(async move {
        while let Some(item) = watch.next().await {
            match item {
                Ok(Some(l)) => println!(
                    "  observe: leader {:?}, term {}",
                    String::from_utf8_lossy(&l.value),
                    l.term
                ),
                Ok(None) => println!("  observe: no leader"),
                Err(e) => println!("  observe: {e}"),
            }
        }
    });

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for candidate in ["alpha", "beta", "gamma"] {
        let c = latchkey::connect(&url).await?;
        let election = Election::new(c.backend().clone(), name.as_str())?.with_ttl(ttl);
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = election.campaign(candidate).await;
            let _ = tx.send((candidate, result, Instant::now(), c));
        });
    }
    drop(tx);

    let mut dropped_out: Option<Instant> = None;
    let mut last_term = 0;
    for round in 0..3 {
        let Some((who, leadership, at, c)) = rx.recv().await else {
            break;
        };
        let leadership = leadership?;
        let handover = dropped_out
            .map(|t| {
                format!(
                    "{:.1} ms after the previous leader dropped out",
                    at.duration_since(t).as_secs_f64() * 1000.0
                )
            })
            .unwrap_or_else(|| "first leader".into());
        println!("{who} leads, term {} ({handover})", leadership.term());
        assert!(leadership.term() > last_term, "terms increase");
        last_term = leadership.term();
        // Work as the leader: fenced writes commit only while it leads.
        let out = c
            .txn(
                TxnRequest::new()
                    .when([leadership.fence()])
                    .then([Op::put(format!("{name}/work"), format!("done by {who}"))]),
            )
            .await?;
        println!("  {who}: fenced write committed: {}", out.succeeded);
        tokio::time::sleep(Duration::from_millis(200)).await;
        dropped_out = Some(Instant::now());
        if round == 0 {
            println!("  {who} resigns");
            leadership.resign().await?;
        } else if round == 1 {
            println!("  {who} crashes (stops renewing; its lease expires after {ttl:?})");
            leadership.lock_guard().abandon().await;
            let crashed = leadership;
            tokio::spawn(async move {
                crashed.lost().await;
                let out = c
                    .txn(
                        TxnRequest::new()
                            .when([crashed.fence()])
                            .then([Op::put(format!("{}/work", crashed.term()), "late")]),
                    )
                    .await;
                println!(
                    "  the crashed leader's late fenced write committed: {}",
                    out.map(|o| o.succeeded).unwrap_or(false)
                );
            });
        } else {
            leadership.resign().await?;
        }
    }
    // Let the observer print the last change, then clean up.
    tokio::time::sleep(Duration::from_millis(100)).await;
    printer.abort();
    observer
        .delete(&format!("{name}/work"), DeleteOptions::default())
        .await?;
    println!("handover complete: 3 leaders, terms strictly increasing, last term {last_term}");
    Ok(())
}
