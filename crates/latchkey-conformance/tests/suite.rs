//! The suite's own shape and runner: case names and docs, capability gates
//! reported as ignored with their reason, and the programmatic API.

#[allow(dead_code)]
mod broken;

use broken::{harness_with_caps, Bug};
use latchkey_conformance::{
    all_cases, catalogue, find_case, run_case, run_case_within, run_cases, trials, Outcome,
};
use latchkey_core::Capabilities;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

const AREAS: &[&str] = &["kv", "txn", "lock", "fence", "watch", "ttl", "input"];
/// Areas that may be registered too (the recipes' cases live beside ours).
const OPTIONAL_AREAS: &[&str] = &["recipes"];

#[test]
fn at_least_50_cases_with_unique_area_names_and_docs() {
    let cases = all_cases();
    assert!(cases.len() >= 50, "only {} cases", cases.len());
    let mut names = HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name), "duplicate case name {}", c.name);
        let (area, behaviour) = c
            .name
            .split_once("::")
            .unwrap_or_else(|| panic!("{} is not <area>::<behaviour>", c.name));
        assert!(
            AREAS.contains(&area) || OPTIONAL_AREAS.contains(&area),
            "{} has an unknown area",
            c.name
        );
        assert!(
            !behaviour.is_empty()
                && behaviour
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'),
            "{}: behaviour must be snake_case",
            c.name
        );
        assert!(
            c.description().len() > 30,
            "{} must state what it asserts",
            c.name
        );
    }
    for area in AREAS {
        assert!(
            cases.iter().any(|c| c.area() == *area),
            "no case in area {area}"
        );
    }
    assert!(cases.iter().any(|c| c.destructive) && cases.iter().any(|c| !c.destructive));
}

fn stripped() -> Capabilities {
    let mut caps = Capabilities::full();
    caps.watch_resume = false;
    caps.native_ttl = false;
    caps.max_txn_ops = 64;
    caps
}

#[test]
fn gated_cases_are_ignored_trials_with_their_reason() {
    let h = harness_with_caps(Bug::None, Some(stripped()));
    let trials = trials(
        "stripped",
        Arc::new(move |ns: String| {
            let h = h.clone();
            async move { h.open(&ns).await }
        }),
    );
    let find = |n: &str| {
        trials
            .iter()
            .find(|t| t.name() == n)
            .unwrap_or_else(|| panic!("no trial {n}"))
    };
    let resume = find("watch::resume_replays_missed");
    assert!(resume.has_ignored_flag());
    assert_eq!(resume.kind(), "needs watch_resume");
    let ttl = find("ttl::key_expires");
    assert!(ttl.has_ignored_flag());
    assert_eq!(ttl.kind(), "needs native_ttl");
    let kv = find("kv::cas_success");
    assert!(!kv.has_ignored_flag());
    assert_eq!(kv.kind(), "");
    assert_eq!(trials.len(), all_cases().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_case_reports_ignored_never_passed() {
    let h = harness_with_caps(Bug::None, Some(stripped()));
    let case = find_case("watch::resume_replays_missed").unwrap();
    assert_eq!(
        run_case(&case, h.clone()).await,
        Outcome::Ignored("needs watch_resume".into())
    );
    let case = find_case("txn::max_ops_accepted").unwrap();
    assert_eq!(
        run_case(&case, h).await,
        Outcome::Passed,
        "adapts to max_txn_ops = 64"
    );
}

/// What `latchkey check` does: every non-destructive case, on the
/// caller's runtime, with per-case outcomes. All pass on mem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_cases_non_destructive_pass_on_mem() {
    let reports = run_cases(harness_with_caps(Bug::None, None), |c| !c.destructive).await;
    assert_eq!(
        reports.len(),
        all_cases().iter().filter(|c| !c.destructive).count()
    );
    let failed: Vec<_> = reports.iter().filter(|r| !r.outcome.is_passed()).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

/// A harness whose handles never open makes every case fail, naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_errors_fail_cases() {
    let h: Arc<dyn latchkey_conformance::Harness> = Arc::new(|_ns: String| async move {
        Err::<Arc<dyn latchkey_core::Backend>, _>(latchkey_core::Error::unavailable(
            "nowhere", "refused",
        ))
    });
    let case = find_case("kv::cas_success").unwrap();
    match run_case(&case, h).await {
        Outcome::Failed(msg) => assert!(msg.contains("refused"), "{msg}"),
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// A case that never finishes fails at its time limit instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_case_fails_at_its_limit() {
    let case = find_case("kv::missing_key").unwrap();
    let started = std::time::Instant::now();
    let out = run_case_within(&case, broken::harness(Bug::Hang), Duration::from_secs(1)).await;
    match out {
        Outcome::Failed(msg) => assert!(msg.contains("did not finish within 1s"), "{msg}"),
        other => panic!("expected a timeout failure, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "took {:?}",
        started.elapsed()
    );
}

/// A case that measures requests is ignored, with its reason, when the
/// harness cannot count them (a plain closure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op_count_cases_need_a_counting_harness() {
    let case = find_case("lock::waiter_does_not_poll").unwrap();
    assert_eq!(
        run_case(&case, broken::uncounted_harness(Bug::None)).await,
        Outcome::Ignored("needs op counts from the harness".into())
    );
    assert_eq!(
        run_case(&case, broken::harness(Bug::None)).await,
        Outcome::Passed
    );
}

#[test]
fn catalogue_lists_every_case() {
    let md = catalogue();
    for c in all_cases() {
        assert!(
            md.contains(&format!("| `{}` |", c.name)),
            "{} missing",
            c.name
        );
    }
    assert_eq!(md.lines().count(), all_cases().len() + 2);
}
