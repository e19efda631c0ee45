//! Linearizability checking: Wing & Gong's search with Lowe's memoization,
//! over a doubly linked list of call/return entries, as Porcupine's
//! `checkSingle` does; histories of independent keys are checked apart
//! (P-compositionality).
//!
//! The search takes, at the head of the list, a call whose op may take
//! effect now, applies the model; if legal and the pair (set of linearized
//! ops, state) was not seen before, it "lifts" the call and its return out
//! of the list and starts over; reaching a return means some earlier choice
//! was wrong, so it backtracks. An op whose outcome is unknown (a timeout,
//! a reset connection) has no return: it may take effect at any point after
//! its call, or never (Knossos' `:info`).
//!
//! Models may be nondeterministic (an unknown outcome allows several next
//! states); the checker runs them as power-set models, as Porcupine does.

use bytes::Bytes;
use latchkey_core::Revision;
use std::collections::{BTreeMap, HashSet};
use std::fmt::{self, Debug};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A sequential specification.
pub trait Model {
    /// The model's state.
    type State: Clone + Eq + Hash + Ord + Debug;
    /// What an op asks for.
    type Input: Debug;
    /// What an op answered.
    type Output: Debug;
    /// The state before any op.
    fn init(&self) -> Self::State;
    /// The states the model may be in after `input` answered `output` in
    /// `state` (`None`: the answer is unknown). Empty: not a legal step.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Vec<Self::State>;
}

/// One op of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation<I, O> {
    /// The client that issued it (a client issues one op at a time).
    pub client: usize,
    /// What it asked for.
    pub input: I,
    /// When it was called.
    pub call: u64,
    /// Its answer and when it arrived; `None` if the outcome is unknown.
    pub output: Option<(O, u64)>,
}

impl<I, O> Operation<I, O> {
    /// An op that completed with `output` at `ret`.
    pub fn completed(client: usize, input: I, call: u64, output: O, ret: u64) -> Self {
        Operation {
            client,
            input,
            call,
            output: Some((output, ret)),
        }
    }
    /// An op whose outcome is unknown.
    pub fn indeterminate(client: usize, input: I, call: u64) -> Self {
        Operation {
            client,
            input,
            call,
            output: None,
        }
    }
}

/// What the checker concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists.
    Linearizable,
    /// No linearization exists; `detail` shows the longest linearizable
    /// prefix found and the ops that could not follow it.
    NotLinearizable {
        /// The partition (key) that failed, if partitioned.
        partition: Option<String>,
        /// A human-readable account.
        detail: String,
    },
    /// The search ran out of budget: neither proved nor refuted. Treat as
    /// failure to prove.
    Unknown {
        /// Why it stopped.
        reason: String,
    },
}

impl Verdict {
    /// True for [`Verdict::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Linearizable => f.write_str("linearizable"),
            Verdict::NotLinearizable { partition, detail } => match partition {
                Some(p) => write!(f, "not linearizable (key {p:?}): {detail}"),
                None => write!(f, "not linearizable: {detail}"),
            },
            Verdict::Unknown { reason } => write!(f, "linearizability unknown: {reason}"),
        }
    }
}

/// Limits of one search.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Wall time for the search.
    pub time: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            time: Duration::from_secs(60),
        }
    }
}

const NIL: usize = usize::MAX;

#[derive(Clone, Hash, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

fn step_all<M: Model>(
    model: &M,
    states: &[M::State],
    input: &M::Input,
    output: Option<&M::Output>,
) -> Vec<M::State> {
    let mut next: Vec<M::State> = states
        .iter()
        .flat_map(|s| model.step(s, input, output))
        .collect();
    next.sort();
    next.dedup();
    next
}

/// Checks one history (one partition) against `model`.
pub fn check_operations<M: Model>(
    model: &M,
    ops: &[Operation<M::Input, M::Output>],
    budget: Budget,
) -> Verdict {
    let n = ops.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Entries 0..n are calls, n..2n returns (entry n+i returns op i).
    // Sorted by time, calls before returns at equal times (equal times are
    // taken as overlapping: the permissive reading).
    let mut order: Vec<usize> = (0..2 * n).collect();
    let time = |e: usize| -> (u64, u8) {
        if e < n {
            (ops[e].call, 0)
        } else {
            (ops[e - n].output.as_ref().map_or(u64::MAX, |o| o.1), 1)
        }
    };
    order.sort_by_key(|&e| time(e));
    for op in ops {
        if let Some((_, ret)) = &op.output {
            if *ret < op.call {
                return Verdict::Unknown {
                    reason: format!("malformed history: an op returns before its call: {op:?}"),
                };
            }
        }
    }
    let head = 2 * n;
    let mut next = vec![NIL; 2 * n + 1];
    let mut prev = vec![NIL; 2 * n + 1];
    let mut last = head;
    for &e in &order {
        next[last] = e;
        prev[e] = last;
        last = e;
    }

    let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        for x in [e, e + n] {
            next[prev[x]] = next[x];
            if next[x] != NIL {
                prev[next[x]] = prev[x];
            }
        }
    };
    let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        for x in [e + n, e] {
            if next[x] != NIL {
                prev[next[x]] = x;
            }
            next[prev[x]] = x;
        }
    };

    let started = Instant::now();
    let mut linearized = Bits::new(n);
    let mut cache: HashSet<(Bits, Vec<M::State>)> = HashSet::new();
    let mut calls: Vec<(usize, Vec<M::State>)> = Vec::new();
    let mut state = vec![model.init()];
    let mut best: Vec<usize> = Vec::new();
    let mut steps: u64 = 0;
    let mut entry = next[head];
    while next[head] != NIL {
        steps += 1;
        if steps.is_multiple_of(4096) && started.elapsed() > budget.time {
            return Verdict::Unknown {
                reason: format!(
                    "search of {n} ops gave up after {:?} ({steps} steps)",
                    budget.time
                ),
            };
        }
        if entry < n {
            let op = &ops[entry];
            let out = op.output.as_ref().map(|o| &o.0);
            let new_state = step_all(model, &state, &op.input, out);
            if !new_state.is_empty() {
                let mut lin2 = linearized.clone();
                lin2.set(entry);
                if cache.insert((lin2.clone(), new_state.clone())) {
                    calls.push((entry, std::mem::replace(&mut state, new_state)));
                    linearized = lin2;
                    lift(&mut next, &mut prev, entry);
                    if calls.len() > best.len() {
                        best = calls.iter().map(|c| c.0).collect();
                    }
                    entry = next[head];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            // A return: the op it closes must have taken effect already.
            let Some((e, s)) = calls.pop() else {
                return Verdict::NotLinearizable {
                    partition: None,
                    detail: describe_failure(model, ops, &best),
                };
            };
            state = s;
            linearized.clear(e);
            unlift(&mut next, &mut prev, e);
            entry = next[e];
        }
    }
    Verdict::Linearizable
}

fn describe_failure<M: Model>(
    model: &M,
    ops: &[Operation<M::Input, M::Output>],
    best: &[usize],
) -> String {
    let show = |i: usize| {
        let op = &ops[i];
        match &op.output {
            Some((o, r)) => format!(
                "client {} {:?} -> {:?} [{}..{}]",
                op.client, op.input, o, op.call, r
            ),
            None => format!(
                "client {} {:?} -> unknown [{}..]",
                op.client, op.input, op.call
            ),
        }
    };
    let mut state = vec![model.init()];
    for &i in best {
        state = step_all(
            model,
            &state,
            &ops[i].input,
            ops[i].output.as_ref().map(|o| &o.0),
        );
    }
    let done: HashSet<usize> = best.iter().copied().collect();
    let mut rest: Vec<usize> = (0..ops.len()).filter(|i| !done.contains(i)).collect();
    rest.sort_by_key(|&i| ops[i].call);
    let mut s = format!(
        "{} ops; the longest linearizable prefix has {} ops:\n",
        ops.len(),
        best.len()
    );
    for &i in best.iter().rev().take(8).collect::<Vec<_>>().iter().rev() {
        s.push_str(&format!("  .. {}\n", show(*i)));
    }
    s.push_str(&format!(
        "reaching state {state:?}; none of these can follow it:\n"
    ));
    for &i in rest.iter().take(8) {
        s.push_str(&format!("  !! {}\n", show(i)));
    }
    s
}

// ---------------------------------------------------------------------------
// The KV register model.

/// What a register op asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvInput {
    /// `get(key)`.
    Get,
    /// `put(key, value)` without conditions.
    Put {
        /// The value written.
        value: Bytes,
    },
    /// `put(key, value, if_revision = expected)`.
    Cas {
        /// The revision the writer expects the key to have.
        expected: Revision,
        /// The value written.
        value: Bytes,
    },
}

/// What a register op answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOutput {
    /// A get's result: value and revision, or absent.
    Got(Option<(Bytes, Revision)>),
    /// A put or successful CAS, with the revision written.
    Written(Revision),
    /// A CAS that failed with `Conflict { current }`.
    Conflict(Option<Revision>),
}

/// One op on a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvOperation {
    /// The key (histories are partitioned by key).
    pub key: String,
    /// The op.
    pub op: Operation<KvInput, KvOutput>,
}

/// What the model knows of a key's revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RevKnowledge {
    /// Exactly this.
    Known(Revision),
    /// Written by an op whose answer is unknown: greater than this.
    After(Revision),
}

/// A register's state: absent, or a value with its revision.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KvState {
    /// The key does not exist (it starts so).
    Absent,
    /// The key holds `value`.
    Present {
        /// The value.
        value: Bytes,
        /// Its revision.
        rev: RevKnowledge,
    },
}

impl KvState {
    fn floor(&self) -> Revision {
        match self {
            KvState::Absent => 0,
            KvState::Present {
                rev: RevKnowledge::Known(r) | RevKnowledge::After(r),
                ..
            } => *r,
        }
    }
}

/// A register with revisions, get/put/CAS, the semantics of latchkey's KV:
/// a put's revision is greater than the key's previous one; a CAS succeeds
/// only if the key's revision equals the expected one, else it reports the
/// current revision.
#[derive(Clone, Copy, Debug, Default)]
pub struct KvModel;

impl Model for KvModel {
    type State = KvState;
    type Input = KvInput;
    type Output = KvOutput;

    fn init(&self) -> KvState {
        KvState::Absent
    }

    fn step(&self, s: &KvState, input: &KvInput, output: Option<&KvOutput>) -> Vec<KvState> {
        use KvState::*;
        use RevKnowledge::*;
        let present = |value: &Bytes, rev| Present {
            value: value.clone(),
            rev,
        };
        match (input, output) {
            // Unknown outcomes: no effect, or the write happened.
            (KvInput::Get, None) => vec![s.clone()],
            (KvInput::Put { value }, None) => vec![s.clone(), present(value, After(s.floor()))],
            (KvInput::Cas { expected, value }, None) => {
                let mut v = vec![s.clone()];
                match s {
                    Present { rev: Known(r), .. } if r == expected => {
                        v.push(present(value, After(*r)))
                    }
                    Present { rev: After(g), .. } if expected > g => {
                        v.push(present(value, After(*expected)))
                    }
                    _ => {}
                }
                v
            }
            (KvInput::Get, Some(KvOutput::Got(None))) => match s {
                Absent => vec![Absent],
                _ => vec![],
            },
            (KvInput::Get, Some(KvOutput::Got(Some((v, r))))) => match s {
                Present {
                    value,
                    rev: Known(x),
                } if value == v && x == r => vec![s.clone()],
                Present {
                    value,
                    rev: After(g),
                } if value == v && r > g => {
                    vec![present(v, Known(*r))]
                }
                _ => vec![],
            },
            (KvInput::Put { value }, Some(KvOutput::Written(r))) if *r > s.floor() => {
                vec![present(value, Known(*r))]
            }
            (KvInput::Cas { expected, value }, Some(KvOutput::Written(r))) => match s {
                Present { rev: Known(x), .. } if x == expected && r > x => {
                    vec![present(value, Known(*r))]
                }
                Present { rev: After(g), .. } if expected > g && r > expected => {
                    vec![present(value, Known(*r))]
                }
                _ => vec![],
            },
            (KvInput::Cas { expected, .. }, Some(KvOutput::Conflict(cur))) => match (s, cur) {
                (Absent, None) => vec![Absent],
                (Present { rev: Known(x), .. }, Some(c)) if x == c && x != expected => {
                    vec![s.clone()]
                }
                (
                    Present {
                        value,
                        rev: After(g),
                    },
                    Some(c),
                ) if c > g && c != expected => {
                    vec![present(value, Known(*c))]
                }
                _ => vec![],
            },
            _ => vec![],
        }
    }
}

/// Checks a KV history: each key's ops alone against [`KvModel`] (keys
/// start absent). Returns the first key's failure, naming the key.
pub fn check_kv(history: &[KvOperation]) -> Verdict {
    check_kv_with(history, Budget::default())
}

/// [`check_kv`] with an explicit search budget (shared by all keys).
pub fn check_kv_with(history: &[KvOperation], budget: Budget) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<Operation<KvInput, KvOutput>>> = BTreeMap::new();
    for op in history {
        by_key
            .entry(op.key.as_str())
            .or_default()
            .push(op.op.clone());
    }
    let started = Instant::now();
    for (key, ops) in by_key {
        let left = budget.time.saturating_sub(started.elapsed());
        match check_operations(&KvModel, &ops, Budget { time: left }) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable { detail, .. } => {
                return Verdict::NotLinearizable {
                    partition: Some(key.to_string()),
                    detail,
                }
            }
            Verdict::Unknown { reason } => {
                return Verdict::Unknown {
                    reason: format!("key {key:?}: {reason}"),
                }
            }
        }
    }
    Verdict::Linearizable
}
