//! The checkers on hand-built good and bad histories.

use bytes::Bytes;
use latchkey_conformance::checkers::linearizability::{check_kv_with, Budget, KvState, Model};
use latchkey_conformance::checkers::{
    check_exclusion, check_kv, check_operations, ExclusionViolation, Holding, KvInput, KvOperation,
    KvOutput, Operation, Verdict,
};
use std::time::Duration;

fn h(lock: &str, client: usize, token: u64, acquired: u64, released: u64) -> Holding {
    Holding {
        lock: lock.into(),
        client,
        token,
        acquired,
        released,
    }
}

/// Fails (showing what the checker said) unless `check_exclusion` rejects
/// the history with a violation matching the pattern.
macro_rules! assert_rejects {
    ($hist:expr, $violation:pat) => {
        match check_exclusion($hist) {
            Err($violation) => {}
            other => panic!("expected {}, got {other:?}", stringify!($violation)),
        }
    };
}

#[test]
fn exclusion_accepts_disjoint_increasing() {
    let hist = vec![
        h("x", 0, 1, 0, 10),
        h("x", 1, 2, 10, 20),
        h("x", 0, 5, 25, 30),
        h("y", 2, 1, 5, 40),
        h("y", 3, 7, 41, 42),
    ];
    assert_eq!(check_exclusion(&hist), Ok(()));
    assert_eq!(check_exclusion(&[]), Ok(()));
}

#[test]
fn exclusion_accepts_any_recording_order() {
    let hist = vec![
        h("x", 2, 3, 50, 60),
        h("x", 0, 1, 0, 10),
        h("x", 1, 2, 20, 30),
    ];
    assert_eq!(check_exclusion(&hist), Ok(()));
}

#[test]
fn exclusion_rejects_overlap() {
    let hist = vec![h("x", 0, 1, 0, 10), h("x", 1, 2, 5, 20)];
    match check_exclusion(&hist) {
        Err(ExclusionViolation::Overlap { first, second }) => {
            assert_eq!((first.client, second.client), (0, 1));
        }
        other => panic!("expected an overlap, got {other:?}"),
    }
}

#[test]
fn exclusion_rejects_overlap_with_a_long_earlier_holding() {
    // c overlaps a (not its neighbour b): the checker must remember a's end.
    let hist = vec![
        h("x", 0, 1, 0, 100),
        h("x", 1, 2, 10, 20),
        h("x", 2, 3, 30, 40),
    ];
    assert_rejects!(&hist, ExclusionViolation::Overlap { .. });
    let hist = vec![h("x", 0, 1, 0, 100), h("x", 2, 3, 99, 120)];
    assert_rejects!(&hist, ExclusionViolation::Overlap { .. });
}

#[test]
fn exclusion_rejects_repeated_or_decreasing_tokens() {
    let same = vec![h("x", 0, 4, 0, 10), h("x", 1, 4, 11, 20)];
    assert_rejects!(&same, ExclusionViolation::TokenNotIncreasing { .. });
    let down = vec![h("x", 0, 9, 0, 10), h("x", 1, 3, 11, 20)];
    match check_exclusion(&down) {
        Err(v @ ExclusionViolation::TokenNotIncreasing { .. }) => {
            let msg = v.to_string();
            assert!(msg.contains("token 9") && msg.contains("token 3"), "{msg}");
        }
        other => panic!("expected a token violation, got {other:?}"),
    }
    // Different locks have independent token sequences.
    assert_eq!(
        check_exclusion(&[h("x", 0, 9, 0, 10), h("y", 1, 3, 11, 20)]),
        Ok(())
    );
}

#[test]
fn exclusion_rejects_malformed() {
    assert_rejects!(&[h("x", 0, 1, 10, 5)], ExclusionViolation::Malformed(_));
}

// --- linearizability -------------------------------------------------------

/// Fails (showing the verdict) unless the checker found a violation.
#[track_caller]
fn assert_violation(verdict: Verdict) {
    assert!(
        matches!(verdict, Verdict::NotLinearizable { .. }),
        "expected a violation, got {verdict:?}"
    );
}

fn v(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}
fn op(key: &str, client: usize, input: KvInput, call: u64, out: KvOutput, ret: u64) -> KvOperation {
    KvOperation {
        key: key.into(),
        op: Operation::completed(client, input, call, out, ret),
    }
}
/// A write by `client` called at `call` whose outcome is unknown (no return).
fn indeterminate(key: &str, client: usize, input: KvInput, call: u64) -> KvOperation {
    KvOperation {
        key: key.into(),
        op: Operation::indeterminate(client, input, call),
    }
}
fn put(x: &str) -> KvInput {
    KvInput::Put { value: v(x) }
}
fn cas(expected: u64, x: &str) -> KvInput {
    KvInput::Cas {
        expected,
        value: v(x),
    }
}
fn got(x: &str, r: u64) -> KvOutput {
    KvOutput::Got(Some((v(x), r)))
}

#[test]
fn sequential_history_is_linearizable() {
    let hist = vec![
        op("k", 0, KvInput::Get, 0, KvOutput::Got(None), 1),
        op("k", 0, put("a"), 2, KvOutput::Written(5), 3),
        op("k", 1, KvInput::Get, 4, got("a", 5), 5),
        op("k", 1, cas(5, "b"), 6, KvOutput::Written(7), 7),
        op("k", 0, cas(5, "c"), 8, KvOutput::Conflict(Some(7)), 9),
        op("k", 0, KvInput::Get, 10, got("b", 7), 11),
    ];
    assert_eq!(check_kv(&hist), Verdict::Linearizable);
    assert_eq!(check_kv(&[]), Verdict::Linearizable);
}

#[test]
fn concurrent_ops_may_take_effect_in_either_order() {
    // Two overlapping puts: a read overlapping both sees a (so a took effect
    // first), a read after both sees b (revision 4, the later one).
    let hist = vec![
        op("k", 0, put("a"), 0, KvOutput::Written(3), 10),
        op("k", 1, put("b"), 1, KvOutput::Written(4), 9),
        op("k", 2, KvInput::Get, 2, got("a", 3), 8), // between the two puts
        op("k", 2, KvInput::Get, 11, got("b", 4), 12),
    ];
    assert_eq!(check_kv(&hist), Verdict::Linearizable);
}

#[test]
fn stale_read_is_not_linearizable() {
    let hist = vec![
        op("k", 0, put("a"), 0, KvOutput::Written(1), 1),
        op("k", 0, put("b"), 2, KvOutput::Written(2), 3),
        op("k", 1, KvInput::Get, 4, got("a", 1), 5), // b completed before this read began
    ];
    match check_kv(&hist) {
        Verdict::NotLinearizable { partition, detail } => {
            assert_eq!(partition.as_deref(), Some("k"));
            assert!(detail.contains("Get"), "{detail}");
        }
        other => panic!("expected a violation, got {other:?}"),
    }
}

#[test]
fn two_winning_cas_from_one_revision_is_not_linearizable() {
    let hist = vec![
        op("k", 0, put("a"), 0, KvOutput::Written(1), 1),
        op("k", 1, cas(1, "b"), 2, KvOutput::Written(2), 6),
        op("k", 2, cas(1, "c"), 3, KvOutput::Written(3), 5),
    ];
    assert_violation(check_kv(&hist));
}

#[test]
fn read_of_unwritten_value_or_wrong_conflict_is_not_linearizable() {
    let phantom = vec![
        op("k", 0, put("a"), 0, KvOutput::Written(1), 1),
        op("k", 1, KvInput::Get, 2, got("zzz", 1), 3),
    ];
    assert_violation(check_kv(&phantom));
    let wrong_current = vec![
        op("k", 0, put("a"), 0, KvOutput::Written(4), 1),
        op("k", 1, cas(2, "b"), 2, KvOutput::Conflict(Some(3)), 3),
    ];
    assert_violation(check_kv(&wrong_current));
    let absent_conflict = vec![op("k", 1, cas(2, "b"), 2, KvOutput::Conflict(None), 3)];
    assert_eq!(check_kv(&absent_conflict), Verdict::Linearizable);
}

#[test]
fn reused_or_decreasing_revision_is_not_linearizable() {
    let hist = vec![
        op("k", 0, put("a"), 0, KvOutput::Written(5), 1),
        op("k", 0, put("b"), 2, KvOutput::Written(5), 3),
    ];
    assert_violation(check_kv(&hist));
    let hist = vec![
        op("k", 0, put("a"), 0, KvOutput::Written(5), 1),
        op("k", 0, put("b"), 2, KvOutput::Written(3), 3),
    ];
    assert_violation(check_kv(&hist));
}

#[test]
fn indeterminate_write_may_or_may_not_take_effect() {
    // Seen later: it took effect (after its call), its revision learned from the read.
    let seen = vec![
        op("k", 0, put("a"), 0, KvOutput::Written(1), 1),
        indeterminate("k", 1, put("x"), 2),
        op("k", 2, KvInput::Get, 5, got("x", 9), 6),
        op("k", 2, cas(9, "y"), 7, KvOutput::Written(10), 8),
    ];
    assert_eq!(check_kv(&seen), Verdict::Linearizable);
    // Never seen: it never took effect.
    let unseen = vec![
        indeterminate("k", 1, put("x"), 0),
        op("k", 0, put("a"), 2, KvOutput::Written(3), 3),
        op("k", 2, KvInput::Get, 5, got("a", 3), 6),
    ];
    assert_eq!(check_kv(&unseen), Verdict::Linearizable);
    // But it cannot take effect before it was called.
    let early = vec![
        op("k", 2, KvInput::Get, 0, got("x", 1), 1),
        indeterminate("k", 1, put("x"), 5),
    ];
    assert_violation(check_kv(&early));
}

#[test]
fn keys_are_checked_apart_and_the_bad_one_is_named() {
    let hist = vec![
        op("good", 0, put("a"), 0, KvOutput::Written(1), 1),
        op("bad", 0, put("a"), 0, KvOutput::Written(2), 1),
        op("bad", 1, KvInput::Get, 2, KvOutput::Got(None), 3),
        op("good", 1, KvInput::Get, 2, got("a", 1), 3),
    ];
    match check_kv(&hist) {
        Verdict::NotLinearizable { partition, .. } => assert_eq!(partition.as_deref(), Some("bad")),
        other => panic!("expected a violation on key bad, got {other:?}"),
    }
}

/// A long history of many overlapping clients on a correct (simulated,
/// atomic) register is proved linearizable quickly: memoization works.
#[test]
fn large_concurrent_history_is_checked_quickly() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut hist = Vec::new();
    let (mut value, mut rev): (Option<Bytes>, u64) = (None, 0);
    let mut t = 0u64;
    let clients = 6;
    // Each op takes effect at a random point inside a window where all
    // clients' ops overlap; ops are grouped in "rounds" of `clients` ops.
    for round in 0..200 {
        let base = t;
        for c in 0..clients {
            let input = match rng.random_range(0..3) {
                0 => KvInput::Get,
                1 => put(&format!("{round}-{c}")),
                _ => cas(rev.max(1), &format!("{round}-{c}")),
            };
            let out = match &input {
                KvInput::Get => KvOutput::Got(value.clone().map(|v| (v, rev))),
                KvInput::Put { value: x } => {
                    rev += 1;
                    value = Some(x.clone());
                    KvOutput::Written(rev)
                }
                KvInput::Cas { expected, value: x } => {
                    if value.is_some() && *expected == rev {
                        rev += 1;
                        value = Some(x.clone());
                        KvOutput::Written(rev)
                    } else {
                        KvOutput::Conflict(value.as_ref().map(|_| rev))
                    }
                }
            };
            hist.push(op("k", c, input, base, out, base + 2 * clients as u64 + 1));
        }
        t = base + 2 * clients as u64 + 2;
    }
    let started = std::time::Instant::now();
    let verdict = check_kv_with(
        &hist,
        Budget {
            time: Duration::from_secs(30),
        },
    );
    assert_eq!(verdict, Verdict::Linearizable);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );

    // The same history with one read made stale (a value from 50 rounds
    // earlier) is refuted, also quickly.
    let mut bad = hist.clone();
    let stale = bad[..300]
        .iter()
        .find_map(|o| match &o.op.output {
            Some((KvOutput::Got(Some(vr)), _)) => Some(vr.clone()),
            _ => None,
        })
        .expect("a read in the first rounds");
    let i = (900..bad.len())
        .find(|&i| matches!(bad[i].op.input, KvInput::Get))
        .expect("a late read");
    bad[i].op.output.as_mut().unwrap().0 = KvOutput::Got(Some(stale));
    let started = std::time::Instant::now();
    assert_violation(check_kv_with(
        &bad,
        Budget {
            time: Duration::from_secs(30),
        },
    ));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

/// A user-defined model through the generic entry point: a counter.
struct Counter;
impl Model for Counter {
    type State = i64;
    type Input = i64; // add
    type Output = i64; // value after
    fn init(&self) -> i64 {
        0
    }
    fn step(&self, s: &i64, add: &i64, out: Option<&i64>) -> Vec<i64> {
        match out {
            Some(o) if *o == s + add => vec![*o],
            Some(_) => vec![],
            None => vec![*s, s + add],
        }
    }
}

#[test]
fn generic_model_and_budget() {
    let ok = vec![
        Operation::completed(0, 1, 0, 2, 10),
        Operation::completed(1, 1, 1, 1, 9),
    ];
    assert_eq!(
        check_operations(&Counter, &ok, Budget::default()),
        Verdict::Linearizable
    );
    let bad = vec![
        Operation::completed(0, 1, 0, 1, 1),
        Operation::completed(1, 1, 2, 1, 3),
    ];
    assert_violation(check_operations(&Counter, &bad, Budget::default()));
    let _ = KvState::Absent;
}
