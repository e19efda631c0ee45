//! The self-tests' one check: a case fails on a backend with a bug and
//! passes on the pass-through control, so the failure is the bug's.

use latchkey_conformance::{find_case, run_case, Harness, Outcome};
use std::fmt::Debug;
use std::sync::Arc;

/// Asserts that each named case passes on `harness(control)` and fails on
/// `harness(bug)`; prints the failure messages so the output shows why.
pub async fn assert_caught<B: Copy + Debug>(
    harness: impl Fn(B) -> Arc<dyn Harness>,
    control: B,
    bug: B,
    names: &[&str],
) {
    for name in names {
        let case = find_case(name).unwrap_or_else(|| panic!("no case named {name}"));
        assert_eq!(
            run_case(&case, harness(control)).await,
            Outcome::Passed,
            "{name} must pass on the pass-through wrapper"
        );
        match run_case(&case, harness(bug)).await {
            Outcome::Failed(msg) => {
                let first = msg.lines().next().unwrap_or("");
                println!("{bug:?} caught by {name}: {first}");
            }
            other => panic!("expected {name} to fail with bug {bug:?}, got {other:?}"),
        }
    }
}
