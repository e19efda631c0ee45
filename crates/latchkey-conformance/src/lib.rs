//! # latchkey-conformance
//!
//! latchkey's shared conformance suite, as a library. It defines what
//! "works" means for a latchkey backend — ours or a third party's — in
//! over 80 cases over the KV, Txn and lock APIs, plus two history
//! checkers (mutual exclusion with fencing, and linearizability).
//!
//! ## Plugging a backend in: one call
//!
//! Give the suite an async factory that opens a **new, independent** handle
//! (its own connection, session or lease) in a given namespace. In your
//! backend crate, add a test target without libtest's harness:
//!
//! ```toml
//! [[test]]
//! name = "conformance"
//! harness = false
//!
//! [dev-dependencies]
//! latchkey-conformance = "0.1"
//! ```
//!
//! and make `tests/conformance.rs` one call to [`run`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use latchkey_core::{Backend, BackendUrl, Result};
//!
//! # mod my_backend {
//! #     use super::*;
//! #     pub async fn connect(_url: BackendUrl) -> Result<Arc<dyn Backend>> { unimplemented!() }
//! # }
//! // `my_backend::connect` stands for your crate's connector.
//! fn main() -> std::process::ExitCode {
//!     latchkey_conformance::run("mine", |ns: String| async move {
//!         my_backend::connect(BackendUrl::parse(&format!("mine://127.0.0.1?namespace={ns}"))?).await
//!     })
//! }
//! ```
//!
//! `cargo test --test conformance` then runs every case as its own trial
//! named `<area>::<behaviour>` (`kv::cas_conflict_reports_current`,
//! `lock::abandoned_lease_expires`, ...): filter by name as usual
//! (`cargo test --test conformance -- lock::`), list with `--list`;
//! `cargo nextest` works too. A case that the backend's declared
//! [`Capabilities`](latchkey_core::Capabilities) rule out is reported as
//! **ignored, with its reason** in brackets (`test [needs watch_resume]
//! watch::resume_replays_missed ... ignored`), never as passed. Each case
//! runs in a fresh random namespace and deletes what it wrote.
//!
//! A few cases need more than handles: a count of each handle's requests
//! (a lock waiter must not poll) and a fault hook that deletes a lock entry
//! behind its holder's back (`lost()` must fire). A plain closure has
//! neither, so those cases are reported ignored with that reason; wrap the
//! factory in [`harness::Instrumented`] and give it the two functions where
//! your backend can provide them.
//!
//! ## Modules
//!
//! | module | what it holds |
//! |---|---|
//! | [`harness`] | [`Harness`]: how the suite opens handles (closures are harnesses); [`harness::Instrumented`] also counts each handle's requests |
//! | [`runner`] | [`run`], [`trials`] (libtest-mimic, one shared runtime), [`run_case`] / [`run_case_within`] / [`run_cases`] (programmatic, per-case [`Outcome`]s) |
//! | [`case`] | [`Case`] (name, doc, destructive flag, capability gate), the case context [`Cx`] |
//! | `cases::{kv, txn, lock, fence, watch, ttl, input}` | the cases, one module per area |
//! | [`checkers`] | [`checkers::exclusion`] (mutual exclusion + fencing monotonicity), [`checkers::linearizability`] (Wing–Gong–Lowe, per key) |
//!
//! ## Programmatic use
//!
//! [`run_cases`] runs a selection of cases on the caller's runtime and
//! returns one [`CaseReport`] per case; the CLI's `latchkey check` runs the
//! cases that are not `destructive` (see [`Case`]) against a live deployment.
//!
//! ## Rules the cases follow
//!
//! Every case states in its doc comment what it asserts (see
//! [`Case::description`]); failures name what was expected and what
//! happened. No sleep is used as synchronization: cases wait on events or
//! poll a condition with a deadline (as when waiting for a TTL to pass).
//! Timing bounds come from the capabilities (`min_ttl`,
//! `ttl_granularity`, `max_lock_ttl`); every case has an overall timeout
//! ([`case_timeout`], 120 s by default), so a broken backend fails rather
//! than hangs.

pub mod case;
mod cases;
pub mod checkers;
pub mod harness;
pub mod runner;

pub use case::{Case, CaseResult, Cx, Fail};
pub use harness::Harness;
pub use runner::{
    all_cases, case as find_case, case_timeout, catalogue, fresh_namespace, run, run_case,
    run_case_within, run_cases, shared_runtime, trials, CaseReport, Outcome,
};
