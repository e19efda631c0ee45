//! `latchkey kv …`.

use crate::args::{Cli, KvCommand};
use crate::exit;
use futures::StreamExt;
use latchkey::prelude::*;
use serde_json::json;
use std::process::ExitCode;

type Res = Result<ExitCode, Box<dyn std::error::Error>>;

fn kv_json(kv: &KeyValue) -> serde_json::Value {
    json!({
        "key": kv.key,
        "value": String::from_utf8_lossy(&kv.value),
        "revision": kv.revision,
        "ttl_ms": kv.lease_ttl.map(|t| t.as_millis() as u64),
    })
}

fn conflict(cli: &Cli, key: &str, current: Option<u64>) -> ExitCode {
    if cli.json {
        println!(
            "{}",
            json!({"key": key, "conflict": true, "current_revision": current})
        );
    } else {
        eprintln!("conflict on {key:?}: current revision is {current:?}");
    }
    ExitCode::from(exit::NOT_FOUND_OR_CONFLICT)
}

pub async fn run(cli: &Cli, cmd: &KvCommand) -> Res {
    let coord = latchkey::connect(&cli.url).await?;
    match cmd {
        KvCommand::Get { key } => match coord.get(key).await? {
            Some(kv) => {
                if cli.json {
                    println!("{}", kv_json(&kv));
                } else {
                    println!("{}", String::from_utf8_lossy(&kv.value));
                }
                Ok(ExitCode::SUCCESS)
            }
            None => {
                if cli.json {
                    println!("{}", json!({"key": key, "found": false}));
                } else {
                    eprintln!("{key:?} not found");
                }
                Ok(ExitCode::from(exit::NOT_FOUND_OR_CONFLICT))
            }
        },
        KvCommand::Put {
            key,
            value,
            ttl,
            if_revision,
            if_absent,
        } => {
            let opts = PutOptions {
                ttl: *ttl,
                if_revision: *if_revision,
                if_absent: *if_absent,
            };
            match coord.put(key, Bytes::from(value.clone()), opts).await {
                Ok(rev) => {
                    if cli.json {
                        println!("{}", json!({"key": key, "revision": rev}));
                    } else {
                        println!("{rev}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(Error::Conflict { current, .. }) => Ok(conflict(cli, key, current)),
                Err(e) => Err(e.into()),
            }
        }
        KvCommand::Del { key, if_revision } => {
            match coord
                .delete(
                    key,
                    DeleteOptions {
                        if_revision: *if_revision,
                    },
                )
                .await
            {
                Ok(deleted) => {
                    if cli.json {
                        println!("{}", json!({"key": key, "deleted": deleted}));
                    } else if !deleted {
                        eprintln!("{key:?} not found");
                    }
                    Ok(if deleted {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(exit::NOT_FOUND_OR_CONFLICT)
                    })
                }
                Err(Error::Conflict { current, .. }) => Ok(conflict(cli, key, current)),
                Err(e) => Err(e.into()),
            }
        }
        KvCommand::Ls {
            prefix,
            limit,
            keys_only,
        } => {
            let kvs = coord
                .list(
                    prefix,
                    ListOptions {
                        limit: *limit,
                        keys_only: *keys_only,
                    },
                )
                .await?;
            for kv in &kvs {
                if cli.json {
                    println!("{}", kv_json(kv));
                } else if *keys_only {
                    println!("{}\t{}", kv.key, kv.revision);
                } else {
                    println!(
                        "{}\t{}\t{}",
                        kv.key,
                        kv.revision,
                        String::from_utf8_lossy(&kv.value)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        KvCommand::Watch {
            prefix,
            mirror: true,
            ..
        } => {
            let m =
                latchkey::recipes::Mirror::start(coord.backend().clone(), prefix.clone()).await?;
            let mut rx = m.subscribe();
            loop {
                let snap = rx.borrow_and_update().clone();
                if cli.json {
                    let entries: Vec<_> = snap.iter().map(kv_json).collect();
                    println!(
                        "{}",
                        json!({"revision": snap.revision(), "entries": entries})
                    );
                } else {
                    println!("--- revision {} ({} keys)", snap.revision(), snap.len());
                    for kv in snap.iter() {
                        println!("{}\t{}", kv.key, String::from_utf8_lossy(&kv.value));
                    }
                }
                if rx.changed().await.is_err() {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        KvCommand::Watch { prefix, from, .. } => {
            let mut events = coord.watch(prefix, *from).await?;
            while let Some(ev) = events.next().await {
                let ev = ev?;
                let kind = match ev.kind {
                    EventKind::Put => "put",
                    EventKind::Delete => "delete",
                };
                if cli.json {
                    println!(
                        "{}",
                        json!({"kind": kind, "key": ev.key, "value": String::from_utf8_lossy(&ev.value), "revision": ev.revision})
                    );
                } else {
                    println!(
                        "{kind}\t{}\t{}\t{}",
                        ev.revision,
                        ev.key,
                        String::from_utf8_lossy(&ev.value)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
