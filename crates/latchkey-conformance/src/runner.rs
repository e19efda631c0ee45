//! Running cases: as libtest-mimic trials (one shared runtime for the whole
//! binary), or programmatically with per-case outcomes.

use crate::case::{Case, Cx, Fail};
use crate::cases;
use crate::harness::Harness;
use latchkey_core::{Capabilities, DeleteOptions, ListOptions};
use libtest_mimic::{Arguments, Failed, Trial};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The outcome of one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every assertion held.
    Passed,
    /// An assertion failed (the message says what was expected), the case
    /// panicked, or it ran out of time.
    Failed(String),
    /// A capability of the backend rules the case out; the reason says which.
    Ignored(String),
}

impl Outcome {
    /// True for [`Outcome::Failed`].
    pub fn is_failed(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }
    /// True for [`Outcome::Passed`].
    pub fn is_passed(&self) -> bool {
        matches!(self, Outcome::Passed)
    }
}

/// A case's name with its outcome and how long it took.
#[derive(Clone, Debug)]
pub struct CaseReport {
    /// The case's `<area>::<behaviour>` name.
    pub name: &'static str,
    /// What happened.
    pub outcome: Outcome,
    /// Wall time of the case (cleanup excluded).
    pub elapsed: Duration,
}

/// Every case of the suite, in registration order.
pub fn all_cases() -> Vec<Case> {
    cases::all()
}

/// The case named `name`, if there is one.
pub fn case(name: &str) -> Option<Case> {
    cases::all().into_iter().find(|c| c.name == name)
}

/// A Markdown table of every case: name, whether it is destructive, and
/// what it asserts. For a `CONFORMANCE.md`, or `latchkey check --list`.
pub fn catalogue() -> String {
    let mut out = String::from("| case | destructive | asserts |\n|---|---|---|\n");
    for c in cases::all() {
        let about = c.description().replace('\n', " ").replace('|', "\\|");
        let d = if c.destructive { "yes" } else { "" };
        out.push_str(&format!("| `{}` | {d} | {about} |\n", c.name));
    }
    out
}

/// How long one case may run before it fails (`LATCHKEY_CONFORMANCE_TIMEOUT_SECS`, default 120 s).
pub fn case_timeout() -> Duration {
    std::env::var("LATCHKEY_CONFORMANCE_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(120))
}

fn run_id() -> u32 {
    static ID: OnceLock<u32> = OnceLock::new();
    *ID.get_or_init(rand::random)
}

/// A namespace unique to this case and this run (a random run id and a
/// counter), made of characters every backend accepts in a path.
pub fn fresh_namespace(case_name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let area: String = case_name
        .split("::")
        .next()
        .unwrap_or("case")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    format!("lkc-{:08x}-{area}-{n}", run_id())
}

async fn probe(harness: &Arc<dyn Harness>, ns: &str) -> Result<Capabilities, String> {
    match tokio::time::timeout(Duration::from_secs(60), harness.open(ns)).await {
        Ok(Ok(h)) => Ok(h.capabilities()),
        Ok(Err(e)) => Err(format!("the harness could not open a handle: {e}")),
        Err(_) => Err("the harness did not open a handle within 60 s".into()),
    }
}

/// Runs one case against the backend the harness opens, on the caller's
/// tokio runtime: reads the backend's capabilities (from a first handle),
/// reports the case ignored if they rule it out, else runs it in a fresh
/// namespace with the [`case_timeout`], then deletes what it left behind.
/// Panics inside the case become [`Outcome::Failed`].
pub async fn run_case(case: &Case, harness: Arc<dyn Harness>) -> Outcome {
    run_case_with(case, harness, None, case_timeout()).await
}

/// [`run_case`] with an explicit overall time limit instead of
/// [`case_timeout`]: past it the case is aborted and fails.
pub async fn run_case_within(case: &Case, harness: Arc<dyn Harness>, limit: Duration) -> Outcome {
    run_case_with(case, harness, None, limit).await
}

/// Runs every case that `select` accepts, one after the other (e.g.
/// `|c| !c.destructive` for a check of a live deployment).
pub async fn run_cases(
    harness: Arc<dyn Harness>,
    select: impl Fn(&Case) -> bool,
) -> Vec<CaseReport> {
    let mut reports = Vec::new();
    let mut caps = None;
    for case in cases::all().into_iter().filter(|c| select(c)) {
        if caps.is_none() {
            caps = probe(&harness, &fresh_namespace("probe")).await.ok();
        }
        let start = std::time::Instant::now();
        let outcome = run_case_with(&case, harness.clone(), caps.clone(), case_timeout()).await;
        reports.push(CaseReport {
            name: case.name,
            outcome,
            elapsed: start.elapsed(),
        });
    }
    reports
}

async fn run_case_with(
    case: &Case,
    harness: Arc<dyn Harness>,
    caps: Option<Capabilities>,
    limit: Duration,
) -> Outcome {
    let caps = match caps {
        Some(c) => c,
        None => match probe(&harness, &fresh_namespace("probe")).await {
            Ok(c) => c,
            Err(e) => return Outcome::Failed(e),
        },
    };
    if let Some(reason) = case.ruled_out(&caps, harness.as_ref()) {
        return Outcome::Ignored(reason);
    }
    run_case_forced(case, harness, caps, limit).await
}

/// Runs the case whatever its gate says.
async fn run_case_forced(
    case: &Case,
    harness: Arc<dyn Harness>,
    caps: Capabilities,
    limit: Duration,
) -> Outcome {
    let ns = fresh_namespace(case.name);
    let cx = Cx::new(harness, ns, caps);
    // Spawned, so that a panic is caught as a JoinError and a timeout can
    // abort the case's task (and everything it owns) instead of leaking it.
    let task = tokio::spawn((case.run)(cx.clone()));
    let abort = task.abort_handle();
    let outcome = match tokio::time::timeout(limit, task).await {
        Ok(Ok(Ok(()))) => Outcome::Passed,
        Ok(Ok(Err(Fail(msg)))) => Outcome::Failed(msg),
        Ok(Err(join)) if join.is_panic() => {
            let p = join.into_panic();
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic payload".into());
            Outcome::Failed(format!("the case panicked: {msg}"))
        }
        Ok(Err(join)) => Outcome::Failed(format!("the case's task ended abnormally: {join}")),
        Err(_) => {
            abort.abort();
            Outcome::Failed(format!(
                "the case did not finish within {limit:?} (the limit is \
                 LATCHKEY_CONFORMANCE_TIMEOUT_SECS, default 120 s)"
            ))
        }
    };
    cleanup(&cx).await;
    outcome
}

/// Best effort: deletes every key the case left in its namespaces. Never
/// fails the case (a broken backend may not even list correctly).
async fn cleanup(cx: &Cx) {
    let work = async {
        for ns in cx.namespaces() {
            let Ok(h) = cx.harness().open(&ns).await else {
                continue;
            };
            let Ok(kvs) = h
                .list(
                    "",
                    ListOptions {
                        limit: None,
                        keys_only: true,
                    },
                )
                .await
            else {
                continue;
            };
            for kv in kvs {
                let _ = h.delete(&kv.key, DeleteOptions::default()).await;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), work).await;
}

/// The one runtime of a conformance binary. Handles opened by the harness
/// (and servers it starts) live as long as the process, so every trial must
/// run on the same runtime: a handle's background tasks die with the
/// runtime that spawned them.
pub fn shared_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("latchkey-conformance")
            .build()
            .expect("building the conformance suite's tokio runtime")
    })
}

/// One libtest-mimic trial per case, named `<area>::<behaviour>`. Opens one
/// handle first to read the backend's capabilities: a case they rule out is
/// registered as ignored, with its reason as the trial's kind (shown in
/// brackets in the output and in `--list`), so it is reported ignored (or
/// skipped, by nextest), never passed. Asked to run ignored trials
/// (`--include-ignored`), the case really runs and reports what it finds;
/// a failure then names the capability that rules it out. If no handle can
/// be opened, every trial fails with the reason.
pub fn trials<H: Harness>(label: &str, harness: Arc<H>) -> Vec<Trial> {
    let harness: Arc<dyn Harness> = harness;
    let rt = shared_runtime();
    let caps = rt.block_on(probe(&harness, &fresh_namespace("probe")));
    if let Err(e) = &caps {
        eprintln!("latchkey-conformance [{label}]: {e}; every case will fail");
    }
    cases::all()
        .into_iter()
        .map(|case| {
            let reason = caps
                .as_ref()
                .ok()
                .and_then(|c| case.ruled_out(c, harness.as_ref()));
            let name = case.name;
            let (harness, caps, reason2) = (harness.clone(), caps.clone(), reason.clone());
            // Runs only when asked to (`--ignored`, `--include-ignored`,
            // nextest's `--run-ignored`): then the case really runs, with
            // the gate lifted, and its failure says it was ruled out.
            let trial = Trial::test(name, move || {
                let caps = caps.map_err(Failed::from)?;
                match shared_runtime().block_on(run_case_forced(
                    &case,
                    harness,
                    caps,
                    case_timeout(),
                )) {
                    Outcome::Passed => Ok(()),
                    Outcome::Ignored(r) => Err(Failed::from(format!("ignored: {r}"))),
                    Outcome::Failed(msg) => {
                        let msg = match &reason2 {
                            Some(r) => format!(
                                "(run although the backend's capabilities rule it out: {r}) {msg}"
                            ),
                            None => msg,
                        };
                        let about = case.description().replace('\n', " ");
                        Err(Failed::from(format!("{msg}\n\nThis case asserts: {about}")))
                    }
                }
            });
            match reason {
                Some(r) => trial.with_ignored_flag(true).with_kind(r),
                None => trial,
            }
        })
        .collect()
}

/// Runs the whole suite against the backend `harness` opens, as a test
/// binary's `main`: parses the libtest arguments (filters, `--list`,
/// `--exact`, `--ignored`, `--format`, ...), runs the trials and prints
/// libtest's summary. `label` names the backend in messages.
pub fn run<H: Harness>(label: &str, harness: H) -> ExitCode {
    let args = Arguments::from_args();
    let trials = trials(label, Arc::new(harness));
    libtest_mimic::run(&args, trials).exit_code()
}
