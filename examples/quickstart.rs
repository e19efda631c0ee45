//! The main job in one file: KV with revisions and compare-and-swap, a
//! transaction, and a lock whose fencing token guards a write.
//!
//! Runs on the embedded `mem://` backend with no server. Give another URL as
//! the first argument or in `LATCHKEY_URL`:
//! `cargo run --features redis --example quickstart -- redis://127.0.0.1:6379`.

use latchkey::prelude::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var(latchkey::URL_ENV).ok())
        .unwrap_or_else(|| latchkey::DEFAULT_URL.to_string());
    let coord = latchkey::connect(&url).await?;
    println!(
        "connected to {} ({})",
        coord.name(),
        latchkey::BackendUrl::parse(&url)?
    );

    // KV: every write returns a revision that is never reused.
    let r1 = coord
        .put(
            "config/greeting",
            Bytes::from("hello"),
            PutOptions::default(),
        )
        .await?;
    let kv = coord.get("config/greeting").await?.expect("just written");
    println!("put config/greeting = {:?} at revision {r1}", kv.value);

    // Compare-and-swap: succeeds against the revision we read ...
    let r2 = coord
        .put(
            "config/greeting",
            Bytes::from("hello, world"),
            PutOptions::if_revision(kv.revision),
        )
        .await?;
    println!("CAS from revision {r1} to {r2}: ok");
    // ... and fails with a typed Conflict (carrying the current revision) against a stale one.
    match coord
        .put(
            "config/greeting",
            Bytes::from("lost update"),
            PutOptions::if_revision(r1),
        )
        .await
    {
        Err(Error::Conflict { current, .. }) => {
            println!("stale CAS refused: current revision is {current:?}")
        }
        other => return Err(format!("expected a conflict, got {other:?}").into()),
    }

    // A transaction: both keys change, or neither.
    let out = coord
        .txn(
            TxnRequest::new()
                .when([Compare::revision("config/greeting", CmpOp::Equal, r2)])
                .then([
                    Op::put("config/greeting", "hi"),
                    Op::put("config/updated-by", "quickstart"),
                ])
                .otherwise([Op::get("config/greeting")]),
        )
        .await?;
    println!(
        "txn succeeded={} at revision {}",
        out.succeeded, out.revision
    );

    // A lock with a fencing token, and a write fenced by it.
    let guard = coord
        .lock("jobs/report", LockOptions::ttl(Duration::from_secs(10)))
        .await?;
    println!(
        "locked jobs/report with fencing token {}",
        guard.fencing_token()
    );
    let fenced = coord
        .txn(
            TxnRequest::new()
                .when([Compare::held(&guard)])
                .then([Op::put(
                    "jobs/report/last-run",
                    guard.fencing_token().to_string(),
                )]),
        )
        .await?;
    println!("fenced write while holding: committed={}", fenced.succeeded);
    guard.release().await?;
    let after = coord
        .txn(
            TxnRequest::new()
                .when([Compare::held(&guard)])
                .then([Op::put("jobs/report/last-run", "stale")]),
        )
        .await?;
    println!("fenced write after release: committed={}", after.succeeded);
    if !fenced.succeeded || after.succeeded {
        return Err("fencing did not behave".into());
    }
    println!("done");
    Ok(())
}
