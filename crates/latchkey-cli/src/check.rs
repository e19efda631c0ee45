//! `latchkey check`: the conformance suite's non-destructive cases against a
//! live deployment, each in a throwaway namespace, as a table per area.

use crate::args::Cli;
use latchkey::BackendUrl;
use latchkey_conformance::{run_cases, Outcome};
use serde_json::json;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

type Res = Result<ExitCode, Box<dyn std::error::Error>>;

pub async fn run(cli: &Cli) -> Res {
    let base = BackendUrl::parse(&cli.url)?;
    // Fail fast on a bad URL or a dead server, before running anything.
    let probe = latchkey::connect_url(base.clone()).await?;
    let backend = latchkey::Backend::name(&probe);
    let prefix = match base.namespace() {
        "" => String::new(),
        ns => format!("{ns}/"),
    };
    let harness = move |ns: String| {
        let url = base.with_namespace(&format!("{prefix}latchkey-check/{ns}"));
        async move { Ok(latchkey::connect_url(url?).await?.backend().clone()) }
    };
    let reports = run_cases(Arc::new(harness), |c| !c.destructive).await;
    let mut areas: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for r in &reports {
        let area = r.name.split("::").next().unwrap_or(r.name);
        let e = areas.entry(area).or_default();
        match &r.outcome {
            Outcome::Passed => e.0 += 1,
            Outcome::Failed(msg) => {
                e.1 += 1;
                failures.push((r.name, msg.clone()));
            }
            Outcome::Ignored(_) => e.2 += 1,
        }
    }
    if cli.json {
        let cases: Vec<_> = reports
            .iter()
            .map(|r| {
                let (outcome, detail) = match &r.outcome {
                    Outcome::Passed => ("passed", String::new()),
                    Outcome::Failed(m) => ("failed", m.clone()),
                    Outcome::Ignored(m) => ("ignored", m.clone()),
                };
                json!({"case": r.name, "outcome": outcome, "detail": detail, "ms": r.elapsed.as_millis() as u64})
            })
            .collect();
        println!(
            "{}",
            json!({"backend": backend, "cases": cases, "failed": failures.len()})
        );
    } else {
        println!(
            "{:<10} {:>6} {:>6} {:>8}",
            "area", "passed", "failed", "ignored"
        );
        for (area, (p, f, i)) in &areas {
            println!("{area:<10} {p:>6} {f:>6} {i:>8}");
        }
        for (name, msg) in &failures {
            println!("FAILED {name}: {msg}");
        }
        let passed: usize = areas.values().map(|v| v.0).sum();
        let ignored: usize = areas.values().map(|v| v.2).sum();
        println!(
            "{backend}: {passed} passed, {} failed, {ignored} ignored",
            failures.len()
        );
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::NOT_FOUND_OR_CONFLICT)
    })
}
