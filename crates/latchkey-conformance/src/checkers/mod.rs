//! History checkers: mutual exclusion + fencing monotonicity over lock
//! histories ([`exclusion`]), and linearizability of KV register histories
//! ([`linearizability`], Wing–Gong–Lowe search with memoization, partitioned
//! per key, as Porcupine does).
//!
//! Histories carry times as `u64` ticks from one monotonic [`Clock`], so
//! hand-built histories in tests can use small integers.

pub mod exclusion;
pub mod linearizability;

pub use exclusion::{check_exclusion, ExclusionViolation, Holding};
pub use linearizability::{
    check_kv, check_kv_with, check_operations, Budget, KvInput, KvModel, KvOperation, KvOutput,
    Model, Operation, Verdict,
};

use std::time::Instant;

/// A monotonic clock shared by the recorders of one history: nanoseconds
/// since it was made.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Clock {
            origin: Instant::now(),
        }
    }
    /// Ticks (ns) since the clock was made.
    pub fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
