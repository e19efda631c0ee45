//! Two clients race to mark a session `inactive` only if it is `active`.
//! Exactly one wins, atomically, on every backend.
//!
//! `cargo run --example session_txn [-- URL]`

use latchkey::prelude::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var(latchkey::URL_ENV).ok())
        .unwrap_or_else(|| latchkey::DEFAULT_URL.to_string());
    let key = format!("sessions/{}", std::process::id());
    let setup = latchkey::connect(&url).await?;
    setup
        .put(&key, Bytes::from("active"), PutOptions::default())
        .await?;

    let mut racers = Vec::new();
    for name in ["alice", "bob"] {
        // Each racer is its own client, as two servers would be.
        let client = latchkey::connect(&url).await?;
        let key = key.clone();
        racers.push(tokio::spawn(async move {
            let out = client
                .txn(
                    TxnRequest::new()
                        .when([Compare::value(key.as_str(), "active")])
                        .then([Op::put(key.as_str(), format!("inactive (by {name})"))])
                        .otherwise([Op::get(key.as_str())]),
                )
                .await?;
            Ok::<_, latchkey::Error>((name, out.succeeded))
        }));
    }
    let mut winners = 0;
    for r in racers {
        let (name, won) = r.await??;
        println!(
            "{name}: {}",
            if won {
                "marked it inactive"
            } else {
                "found it already inactive"
            }
        );
        winners += won as usize;
    }
    let final_value = setup.get(&key).await?.map(|kv| kv.value);
    println!("final: {final_value:?}");
    setup.delete(&key, DeleteOptions::default()).await?;
    if winners != 1 {
        return Err(format!("{winners} winners; exactly one expected").into());
    }
    Ok(())
}
