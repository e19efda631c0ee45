//! Model-based test: random sequences of KV operations and transactions on a
//! `MemBackend`, checked step by step against a plain sequential model
//! (a `BTreeMap` and a revision counter), and the watch stream checked
//! against the model's list of changes at the end.

use futures::StreamExt;
use latchkey_core::{
    Bytes, CmpOp, Compare, DeleteOptions, Error, EventKind, KeyValue, KvStore, ListOptions, Op,
    OpResult, PutOptions, Revision, Txn, TxnRequest, WatchEvent,
};
use latchkey_mem::MemStore;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::time::Duration;

const KEYS: &[&str] = &["a", "ab", "abc", "b", "ba", "c/d"];
const PREFIXES: &[&str] = &["", "a", "ab", "b", "c", "c/", "z"];
const VALUES: &[&str] = &["", "x", "y", "zz"];

/// How a conditional op picks the revision it expects.
#[derive(Clone, Debug)]
enum RevPick {
    /// The key's current revision (0 if absent): the condition holds.
    Current,
    /// Any small number: usually a stale or future revision.
    Fixed(u64),
}

#[derive(Clone, Debug)]
enum Cmp {
    Rev(usize, CmpOp, RevPick),
    Value(usize, usize),
    Exists(usize),
    Absent(usize),
}

#[derive(Clone, Debug)]
enum TOp {
    Put(usize, usize),
    Delete(usize),
    Get(usize),
}

#[derive(Clone, Debug)]
enum Step {
    Put(usize, usize),
    PutCas(usize, usize, RevPick),
    PutIfAbsent(usize, usize),
    Delete(usize),
    DeleteCas(usize, RevPick),
    Get(usize),
    List(usize, Option<usize>, bool),
    Txn(Vec<Cmp>, Vec<TOp>, Vec<TOp>),
}

fn key() -> impl Strategy<Value = usize> {
    0..KEYS.len()
}
fn val() -> impl Strategy<Value = usize> {
    0..VALUES.len()
}
fn rev_pick() -> impl Strategy<Value = RevPick> {
    prop_oneof![Just(RevPick::Current), (0u64..12).prop_map(RevPick::Fixed)]
}
fn cmp_op() -> impl Strategy<Value = CmpOp> {
    prop_oneof![
        Just(CmpOp::Equal),
        Just(CmpOp::NotEqual),
        Just(CmpOp::Less),
        Just(CmpOp::Greater)
    ]
}
fn cmp() -> impl Strategy<Value = Cmp> {
    prop_oneof![
        (key(), cmp_op(), rev_pick()).prop_map(|(k, o, r)| Cmp::Rev(k, o, r)),
        (key(), val()).prop_map(|(k, v)| Cmp::Value(k, v)),
        key().prop_map(Cmp::Exists),
        key().prop_map(Cmp::Absent),
    ]
}
fn top() -> impl Strategy<Value = TOp> {
    prop_oneof![
        (key(), val()).prop_map(|(k, v)| TOp::Put(k, v)),
        key().prop_map(TOp::Delete),
        key().prop_map(TOp::Get),
    ]
}
fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (key(), val()).prop_map(|(k, v)| Step::Put(k, v)),
        2 => (key(), val(), rev_pick()).prop_map(|(k, v, r)| Step::PutCas(k, v, r)),
        1 => (key(), val()).prop_map(|(k, v)| Step::PutIfAbsent(k, v)),
        2 => key().prop_map(Step::Delete),
        1 => (key(), rev_pick()).prop_map(|(k, r)| Step::DeleteCas(k, r)),
        2 => key().prop_map(Step::Get),
        2 => (0..PREFIXES.len(), proptest::option::of(0usize..4), any::<bool>())
            .prop_map(|(p, l, ko)| Step::List(p, l, ko)),
        3 => (
            proptest::collection::vec(cmp(), 0..3),
            proptest::collection::vec(top(), 0..4),
            proptest::collection::vec(top(), 0..3)
        )
            .prop_map(|(c, t, o)| Step::Txn(c, t, o)),
    ]
}

/// The sequential model.
#[derive(Default)]
struct Model {
    rev: Revision,
    kv: BTreeMap<String, (Bytes, Revision)>,
    events: Vec<WatchEvent>,
}

impl Model {
    fn cur(&self, k: &str) -> Option<Revision> {
        self.kv.get(k).map(|e| e.1)
    }
    fn pick(&self, k: &str, p: &RevPick) -> Revision {
        match p {
            RevPick::Current => self.cur(k).unwrap_or(0),
            RevPick::Fixed(r) => *r,
        }
    }
    fn kv(&self, k: &str) -> Option<KeyValue> {
        self.kv.get(k).map(|(v, r)| KeyValue {
            key: k.to_string(),
            value: v.clone(),
            revision: *r,
            lease_ttl: None,
        })
    }
    fn write(&mut self, k: &str, v: Bytes, rev: Revision) {
        self.kv.insert(k.to_string(), (v.clone(), rev));
        self.events.push(WatchEvent {
            kind: EventKind::Put,
            key: k.to_string(),
            value: v,
            revision: rev,
        });
    }
    fn remove(&mut self, k: &str, rev: Revision) {
        self.kv.remove(k);
        self.events.push(WatchEvent {
            kind: EventKind::Delete,
            key: k.to_string(),
            value: Bytes::new(),
            revision: rev,
        });
    }
    fn holds(&self, c: &Cmp) -> bool {
        match c {
            Cmp::Rev(k, op, p) => {
                let k = KEYS[*k];
                op.holds(self.cur(k).unwrap_or(0), self.pick(k, p))
            }
            Cmp::Value(k, v) => self.kv.get(KEYS[*k]).is_some_and(|e| e.0 == VALUES[*v]),
            Cmp::Exists(k) => self.kv.contains_key(KEYS[*k]),
            Cmp::Absent(k) => !self.kv.contains_key(KEYS[*k]),
        }
    }
}

fn b(i: usize) -> Bytes {
    Bytes::from_static(VALUES[i].as_bytes())
}

fn conflict(r: Result<impl std::fmt::Debug, Error>, key: &str, current: Option<Revision>) {
    match r {
        Err(Error::Conflict { key: k, current: c }) => {
            assert_eq!((k.as_str(), c), (key, current));
        }
        other => panic!("expected a conflict on {key}, got {other:?}"),
    }
}

async fn run(steps: Vec<Step>) {
    let store = MemStore::new();
    let h = store.handle("model").unwrap();
    // A second namespace of the same store must see nothing of this one.
    let other = store.handle("model2").unwrap();
    let mut watch = h.watch("", Some(1)).await.unwrap();
    let mut m = Model::default();
    for s in steps {
        match s {
            Step::Put(k, v) => {
                let k = KEYS[k];
                let r = h.put(k, b(v), PutOptions::default()).await.unwrap();
                m.rev += 1;
                assert_eq!(r, m.rev);
                m.write(k, b(v), r);
            }
            Step::PutCas(k, v, p) => {
                let k = KEYS[k];
                let want = m.pick(k, &p);
                let res = h.put(k, b(v), PutOptions::if_revision(want)).await;
                if m.cur(k).unwrap_or(0) == want {
                    m.rev += 1;
                    assert_eq!(res.unwrap(), m.rev);
                    m.write(k, b(v), m.rev);
                } else {
                    conflict(res, k, m.cur(k));
                }
            }
            Step::PutIfAbsent(k, v) => {
                let k = KEYS[k];
                let res = h.put(k, b(v), PutOptions::if_absent()).await;
                if m.cur(k).is_none() {
                    m.rev += 1;
                    assert_eq!(res.unwrap(), m.rev);
                    m.write(k, b(v), m.rev);
                } else {
                    conflict(res, k, m.cur(k));
                }
            }
            Step::Delete(k) => {
                let k = KEYS[k];
                let res = h.delete(k, DeleteOptions::default()).await.unwrap();
                assert_eq!(res, m.cur(k).is_some());
                if res {
                    m.rev += 1;
                    m.remove(k, m.rev);
                }
            }
            Step::DeleteCas(k, p) => {
                let k = KEYS[k];
                let want = m.pick(k, &p);
                let res = h
                    .delete(
                        k,
                        DeleteOptions {
                            if_revision: Some(want),
                        },
                    )
                    .await;
                if m.cur(k).unwrap_or(0) == want {
                    let existed = m.cur(k).is_some();
                    assert_eq!(res.unwrap(), existed);
                    if existed {
                        m.rev += 1;
                        m.remove(k, m.rev);
                    }
                } else {
                    conflict(res, k, m.cur(k));
                }
            }
            Step::Get(k) => {
                let k = KEYS[k];
                assert_eq!(h.get(k).await.unwrap(), m.kv(k));
            }
            Step::List(p, limit, keys_only) => {
                let p = PREFIXES[p];
                let got = h.list(p, ListOptions { limit, keys_only }).await.unwrap();
                let want: Vec<KeyValue> =
                    m.kv.keys()
                        .filter(|k| k.starts_with(p))
                        .take(limit.unwrap_or(usize::MAX))
                        .map(|k| {
                            let mut kv = m.kv(k).unwrap();
                            if keys_only {
                                kv.value = Bytes::new();
                            }
                            kv
                        })
                        .collect();
                assert_eq!(got, want);
            }
            Step::Txn(cmps, then, otherwise) => {
                let when: Vec<Compare> = cmps
                    .iter()
                    .map(|c| match c {
                        Cmp::Rev(k, op, p) => Compare::revision(KEYS[*k], *op, m.pick(KEYS[*k], p)),
                        Cmp::Value(k, v) => Compare::value(KEYS[*k], b(*v)),
                        Cmp::Exists(k) => Compare::exists(KEYS[*k]),
                        Cmp::Absent(k) => Compare::absent(KEYS[*k]),
                    })
                    .collect();
                let ops = |v: &[TOp]| -> Vec<Op> {
                    v.iter()
                        .map(|o| match o {
                            TOp::Put(k, val) => Op::put(KEYS[*k], b(*val)),
                            TOp::Delete(k) => Op::delete(KEYS[*k]),
                            TOp::Get(k) => Op::get(KEYS[*k]),
                        })
                        .collect()
                };
                let req = TxnRequest::new()
                    .when(when)
                    .then(ops(&then))
                    .otherwise(ops(&otherwise));
                let out = h.txn(req).await.unwrap();
                let ok = cmps.iter().all(|c| m.holds(c));
                assert_eq!(out.succeeded, ok);
                let branch = if ok { &then } else { &otherwise };
                let mut rev = None;
                let mut want = vec![];
                for op in branch {
                    match op {
                        TOp::Put(k, v) => {
                            let r = *rev.get_or_insert_with(|| {
                                m.rev += 1;
                                m.rev
                            });
                            m.write(KEYS[*k], b(*v), r);
                            want.push(OpResult::Put { revision: r });
                        }
                        TOp::Delete(k) => {
                            let existed = m.cur(KEYS[*k]).is_some();
                            if existed {
                                let r = *rev.get_or_insert_with(|| {
                                    m.rev += 1;
                                    m.rev
                                });
                                m.remove(KEYS[*k], r);
                            }
                            want.push(OpResult::Delete { deleted: existed });
                        }
                        TOp::Get(k) => want.push(OpResult::Get(m.kv(KEYS[*k]))),
                    }
                }
                assert_eq!(out.results, want);
                assert_eq!(out.revision, m.rev);
            }
        }
        assert_eq!(store.revision(), m.rev, "one revision per write, none lost");
    }
    assert!(other
        .list("", ListOptions::default())
        .await
        .unwrap()
        .is_empty());
    // The watch saw every change, in order, exactly once.
    for want in &m.events {
        let got = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("event in time")
            .expect("stream open")
            .expect("no error");
        assert_eq!(&got, want);
    }
    // And a watch resumed from any revision replays exactly the tail.
    if let Some(mid) = m.events.get(m.events.len() / 2) {
        let mut w = h.watch("a", Some(mid.revision)).await.unwrap();
        for want in m
            .events
            .iter()
            .filter(|e| e.revision >= mid.revision && e.key.starts_with('a'))
        {
            let got = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(&got, want);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn mem_matches_the_sequential_model(steps in proptest::collection::vec(step(), 1..60)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(steps));
    }
}
