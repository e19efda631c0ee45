//! Txn cases: every compare kind, both branches, results, atomicity and
//! isolation under concurrency, and the op limit.

use crate::case::{
    all_keys, b, ensure, ensure_eq, expect_err, expect_value, parse_num, put_value, CaseResult, Cx,
    ErrCtx, Fail, Joined,
};
use latchkey_core::{CmpOp, Compare, Error, Op, OpResult, Txn, TxnOutcome, TxnRequest};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn got(o: &TxnOutcome, i: usize) -> Result<Option<(bytes::Bytes, u64)>, Fail> {
    match o.results.get(i) {
        Some(OpResult::Get(kv)) => Ok(kv.as_ref().map(|kv| (kv.value.clone(), kv.revision))),
        other => Err(Fail(format!(
            "expected result {i} of the txn to be a Get, got {other:?}"
        ))),
    }
}

async fn branch(h: &dyn Txn, cmp: Compare) -> Result<bool, Fail> {
    let what = format!("txn when [{cmp:?}]");
    let o = h
        .txn(
            TxnRequest::new()
                .when([cmp])
                .then([Op::get("marker")])
                .otherwise([Op::get("marker")]),
        )
        .await
        .ctx(&what)?;
    ensure_eq!(o.results.len(), 1, "number of results of {what}");
    Ok(o.succeeded)
}

cases! {
    /// A txn with no compares runs its `then` branch: its puts are visible
    /// and each put result carries the revision the key then has.
    #[case("txn::empty_when_runs_then")]
    async fn empty_when(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let o = h
            .txn(TxnRequest::new().then([Op::put("a", "1"), Op::put("b", "2")]))
            .await
            .ctx("txn")?;
        ensure!(o.succeeded, "expected a txn without compares to succeed");
        ensure_eq!(o.results.len(), 2, "number of results");
        for (i, k) in ["a", "b"].iter().enumerate() {
            let rev = match &o.results[i] {
                OpResult::Put { revision } => *revision,
                other => {
                    return Err(Fail(format!(
                        "expected result {i} to be a Put, got {other:?}"
                    )))
                }
            };
            let kv = h
                .get(k)
                .await
                .ctx("get")?
                .ok_or_else(|| Fail(format!("expected {k} to exist after the txn")))?;
            ensure_eq!(
                kv.revision,
                rev,
                "the revision of {k} (its put result said so)"
            );
            ensure!(
                o.revision >= rev,
                "expected TxnOutcome.revision ({}) to be at least the revision of its writes ({rev})",
                o.revision
            );
        }
        Ok(())
    }

    /// `Compare::value` holds when the value is equal, not when it differs;
    /// each case runs the matching branch's ops only.
    #[case("txn::compare_value_both_branches")]
    async fn compare_value(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        put_value(h.as_ref(), "s", "active").await?;
        let t = |expect: &str| {
            TxnRequest::new()
                .when([Compare::value("s", expect.to_string())])
                .then([Op::put("branch", "then")])
                .otherwise([Op::put("branch", "otherwise")])
        };
        let o = h.txn(t("active")).await.ctx("txn value == active")?;
        ensure!(o.succeeded, "expected value(s) == \"active\" to hold");
        expect_value(h.as_ref(), "branch", "then", "the key written by the then branch").await?;
        let o = h.txn(t("inactive")).await.ctx("txn value == inactive")?;
        ensure!(
            !o.succeeded,
            "expected value(s) == \"inactive\" not to hold"
        );
        expect_value(h.as_ref(), "branch", "otherwise", "the key written by the otherwise branch")
            .await?;
        Ok(())
    }

    /// `Compare::value` on a missing key is false, even against an empty value.
    #[case("txn::compare_value_on_missing_key_is_false")]
    async fn compare_value_missing(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        ensure!(
            !branch(h.as_ref(), Compare::value("missing", "")).await?,
            "expected value(missing) == \"\" to be false"
        );
        ensure!(
            !branch(h.as_ref(), Compare::value("missing", "x")).await?,
            "expected value(missing) == \"x\" to be false"
        );
        Ok(())
    }

    /// `exists` and `absent` hold exactly when the key exists / does not,
    /// including after a delete.
    #[case("txn::compare_exists_and_absent")]
    async fn exists_absent(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        ensure!(
            !branch(h.as_ref(), Compare::exists("e")).await?,
            "expected exists(e) to be false before any write"
        );
        ensure!(
            branch(h.as_ref(), Compare::absent("e")).await?,
            "expected absent(e) to be true before any write"
        );
        put_value(h.as_ref(), "e", "").await?;
        ensure!(
            branch(h.as_ref(), Compare::exists("e")).await?,
            "expected exists(e) after a put (of an empty value)"
        );
        ensure!(
            !branch(h.as_ref(), Compare::absent("e")).await?,
            "expected absent(e) to be false after a put"
        );
        h.delete("e", Default::default()).await.ctx("delete e")?;
        ensure!(
            !branch(h.as_ref(), Compare::exists("e")).await?,
            "expected exists(e) to be false after delete"
        );
        ensure!(
            branch(h.as_ref(), Compare::absent("e")).await?,
            "expected absent(e) after delete"
        );
        Ok(())
    }

    /// Revision compares `=`, `≠`, `<`, `>` hold exactly as the arithmetic
    /// says, for an existing key and for a missing one (revision 0).
    #[case("txn::compare_revision_all_ops")]
    async fn compare_revision(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let r = put_value(h.as_ref(), "r", "v").await?;
        let table = [
            (CmpOp::Equal, r, true),
            (CmpOp::Equal, r + 1, false),
            (CmpOp::NotEqual, r, false),
            (CmpOp::NotEqual, r - 1, true),
            (CmpOp::Less, r + 1, true),
            (CmpOp::Less, r, false),
            (CmpOp::Greater, r - 1, true),
            (CmpOp::Greater, r, false),
        ];
        for (op, rev, want) in table {
            let got = branch(h.as_ref(), Compare::revision("r", op, rev)).await?;
            ensure_eq!(got, want, "revision(r) {op:?} {rev} with r at revision {r}");
        }
        for (op, rev, want) in [
            (CmpOp::Equal, 0, true),
            (CmpOp::Less, 1, true),
            (CmpOp::Greater, 0, false),
            (CmpOp::NotEqual, 0, false),
        ] {
            let got = branch(h.as_ref(), Compare::revision("missing", op, rev)).await?;
            ensure_eq!(
                got,
                want,
                "revision(missing) {op:?} {rev} (a missing key has revision 0)"
            );
        }
        Ok(())
    }

    /// Get ops return the key's value and revision (or None) in the results,
    /// in op order, alongside put and delete results.
    #[case("txn::get_ops_in_results")]
    async fn get_results(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let ra = put_value(h.as_ref(), "a", "A").await?;
        put_value(h.as_ref(), "d", "D").await?;
        let o = h
            .txn(TxnRequest::new().when([Compare::exists("a")]).then([
                Op::get("a"),
                Op::get("none"),
                Op::delete("d"),
                Op::delete("none"),
                Op::put("n", "N"),
            ]))
            .await
            .ctx("txn")?;
        ensure!(o.succeeded, "expected exists(a) to hold");
        ensure_eq!(o.results.len(), 5, "number of results");
        ensure_eq!(got(&o, 0)?, Some((b("A"), ra)), "the get of a");
        ensure_eq!(got(&o, 1)?, None, "the get of a missing key");
        ensure_eq!(
            o.results[2],
            OpResult::Delete { deleted: true },
            "the delete of an existing key"
        );
        ensure_eq!(
            o.results[3],
            OpResult::Delete { deleted: false },
            "the delete of a missing key"
        );
        ensure!(
            matches!(o.results[4], OpResult::Put { .. }),
            "expected result 4 to be a Put, got {:?}",
            o.results[4]
        );
        ensure_eq!(
            h.get("d").await.ctx("get d")?,
            None,
            "d after the txn deleted it"
        );
        Ok(())
    }

    /// When a compare fails, the `otherwise` ops run (here a get, a put and
    /// a delete) and none of the `then` ops do.
    #[case("txn::otherwise_branch_runs_its_ops")]
    async fn otherwise_ops(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let rx = put_value(h.as_ref(), "x", "X").await?;
        put_value(h.as_ref(), "gone", "G").await?;
        let o = h
            .txn(
                TxnRequest::new()
                    .when([Compare::absent("x")])
                    .then([Op::put("then1", "t"), Op::delete("x")])
                    .otherwise([Op::get("x"), Op::put("other", "o"), Op::delete("gone")]),
            )
            .await
            .ctx("txn")?;
        ensure!(!o.succeeded, "expected absent(x) to fail");
        ensure_eq!(
            o.results.len(),
            3,
            "number of results of the otherwise branch"
        );
        ensure_eq!(
            got(&o, 0)?,
            Some((b("X"), rx)),
            "the get in the otherwise branch"
        );
        ensure_eq!(
            all_keys(h.as_ref()).await?,
            vec!["other", "x"],
            "keys after the otherwise branch ran"
        );
        Ok(())
    }

    /// All compares must hold: one false compare among true ones runs the
    /// `otherwise` branch, and nothing of `then` is written.
    #[case("txn::all_compares_must_hold")]
    async fn all_compares(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let r = put_value(h.as_ref(), "a", "1").await?;
        // Three compares on a that hold, and `last`.
        let t = |last: Compare| {
            TxnRequest::new()
                .when([
                    Compare::exists("a"),
                    Compare::value("a", "1"),
                    Compare::revision("a", CmpOp::Equal, r),
                    last,
                ])
                .then((0..5).map(|i| Op::put(format!("w{i}"), "x")))
        };
        let o = h
            .txn(t(Compare::exists("b")))
            .await
            .ctx("txn with one false compare")?;
        ensure!(
            !o.succeeded,
            "expected a txn with one false compare (exists(b)) to fail"
        );
        ensure_eq!(
            all_keys(h.as_ref()).await?,
            vec!["a"],
            "keys after a failed txn (nothing of then may be written)"
        );
        let o = h
            .txn(t(Compare::absent("b")))
            .await
            .ctx("txn with all compares true")?;
        ensure!(
            o.succeeded,
            "expected a txn whose compares all hold to succeed"
        );
        ensure_eq!(
            all_keys(h.as_ref()).await?.len(),
            6,
            "number of keys after the successful txn"
        );
        Ok(())
    }

    /// The backend accepts a branch of `max_txn_ops` ops, which is at least
    /// 64 on every backend, and applies all of them.
    #[case("txn::max_ops_accepted")]
    async fn max_ops(cx: Cx) -> CaseResult {
        let max = cx.caps().max_txn_ops;
        ensure!(
            max >= 64,
            "expected max_txn_ops to be at least 64 (every backend must accept 64), it is {max}"
        );
        let h = cx.open().await?;
        let o = h
            .txn(TxnRequest::new().then((0..max).map(|i| Op::put(format!("m/{i:04}"), "v"))))
            .await
            .ctx(format!("txn of {max} puts"))?;
        ensure!(o.succeeded, "expected the txn of {max} puts to succeed");
        ensure_eq!(o.results.len(), max, "number of results");
        ensure_eq!(
            all_keys(h.as_ref()).await?.len(),
            max,
            "number of keys written by the txn"
        );
        Ok(())
    }

    /// A branch of `max_txn_ops + 1` ops is `InvalidArgument` before
    /// anything is sent: none of its writes appear.
    #[case("txn::over_max_ops_rejected")]
    async fn over_max(cx: Cx) -> CaseResult {
        let max = cx.caps().max_txn_ops;
        let h = cx.open().await?;
        let t = TxnRequest::new().then((0..=max).map(|i| Op::put(format!("o/{i:04}"), "v")));
        expect_err!(
            h.txn(t).await,
            Error::InvalidArgument(_),
            "a txn of {} puts (max_txn_ops {max})",
            max + 1
        );
        let t = TxnRequest::new()
            .when([Compare::absent("x")])
            .then([Op::put("y", "v")])
            .otherwise((0..=max).map(|i| Op::put(format!("o/{i:04}"), "v")));
        expect_err!(
            h.txn(t).await,
            Error::InvalidArgument(_),
            "a txn whose otherwise branch has {} ops",
            max + 1
        );
        ensure_eq!(
            all_keys(h.as_ref()).await?.len(),
            0,
            "number of keys after rejected txns"
        );
        Ok(())
    }

    /// 8 tasks on 4 handles × 50 increments of one counter, each a txn
    /// `when revision(counter) = r then put(n+1)` retried on failure, end at
    /// exactly 400: txn compares and writes are atomic.
    #[case("txn::concurrent_increments_8x50", destructive = true)]
    async fn concurrent_increments(cx: Cx) -> CaseResult {
        let handles = cx.open_n(4).await?;
        put_value(handles[0].as_ref(), "n", "0").await?;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let h = handles[i % 4].clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0;
                while done < 50 {
                    let kv = h
                        .get("n")
                        .await?
                        .ok_or_else(|| Error::InvalidArgument("counter vanished".into()))?;
                    let n: u64 = parse_num(&kv.value).unwrap_or(u64::MAX / 2);
                    let o = h
                        .txn(
                            TxnRequest::new()
                                .when([Compare::revision("n", CmpOp::Equal, kv.revision)])
                                .then([Op::put("n", (n + 1).to_string())]),
                        )
                        .await?;
                    if o.succeeded {
                        done += 1;
                    }
                }
                Ok::<_, Error>(())
            }));
        }
        for t in tasks {
            t.await
                .joined("a task")?
                .ctx("an increment task")?;
        }
        expect_value(handles[0].as_ref(), "n", "400", "the counter after 8×50 txn increments")
            .await?;
        Ok(())
    }

    /// Transfers between 5 accounts (4 writers, txn with revision compares
    /// on both accounts) keep the total at 500; a reader reading all
    /// accounts in one txn of gets always sees a total of 500 (isolation).
    #[case("txn::isolated_reads_see_invariant")]
    async fn isolation(cx: Cx) -> CaseResult {
        let handles = cx.open_n(5).await?;
        let accounts: Vec<String> = (0..5).map(|i| format!("acct/{i}")).collect();
        handles[0]
            .txn(TxnRequest::new().then(accounts.iter().map(|a| Op::put(a.clone(), "100"))))
            .await
            .ctx("seed accounts")?;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (h, accounts, stop) = (handles[4].clone(), accounts.clone(), stop.clone());
            tokio::spawn(async move {
                let mut reads = 0u32;
                while !stop.load(Ordering::SeqCst) || reads < 5 {
                    let o = h
                        .txn(TxnRequest::new().then(accounts.iter().map(|a| Op::get(a.clone()))))
                        .await
                        .map_err(Fail::from)?;
                    let mut total = 0i64;
                    for r in &o.results {
                        if let OpResult::Get(Some(kv)) = r {
                            total += parse_num::<i64>(&kv.value).unwrap_or(-1_000_000);
                        } else {
                            return Err(Fail(format!(
                                "expected every account to exist in a read txn, got {r:?}"
                            )));
                        }
                    }
                    ensure!(
                        total == 500,
                        "expected a txn reading all accounts to see a total of 500, saw {total}: {:?}",
                        o.results
                    );
                    reads += 1;
                }
                Ok(())
            })
        };
        let mut writers = Vec::new();
        for (w, h) in handles.iter().take(4).enumerate() {
            let (h, accounts) = (h.clone(), accounts.clone());
            writers.push(tokio::spawn(async move {
                for t in 0..20usize {
                    let (from, to) = ((w + t) % 5, (w + 2 * t + 1) % 5);
                    if from == to {
                        continue;
                    }
                    loop {
                        let o = h
                            .txn(TxnRequest::new().then([
                                Op::get(accounts[from].clone()),
                                Op::get(accounts[to].clone()),
                            ]))
                            .await?;
                        let (OpResult::Get(Some(f)), OpResult::Get(Some(tk))) =
                            (&o.results[0], &o.results[1])
                        else {
                            return Err(Error::InvalidArgument(format!(
                                "an account vanished: {:?}",
                                o.results
                            )));
                        };
                        let fv: i64 = parse_num(&f.value).unwrap_or(0);
                        let tv: i64 = parse_num(&tk.value).unwrap_or(0);
                        let o = h
                            .txn(
                                TxnRequest::new()
                                    .when([
                                        Compare::revision(
                                            accounts[from].clone(),
                                            CmpOp::Equal,
                                            f.revision,
                                        ),
                                        Compare::revision(
                                            accounts[to].clone(),
                                            CmpOp::Equal,
                                            tk.revision,
                                        ),
                                    ])
                                    .then([
                                        Op::put(accounts[from].clone(), (fv - 7).to_string()),
                                        Op::put(accounts[to].clone(), (tv + 7).to_string()),
                                    ]),
                            )
                            .await?;
                        if o.succeeded {
                            break;
                        }
                    }
                }
                Ok::<_, Error>(())
            }));
        }
        let mut result = Ok(());
        for w in writers {
            if let Err(e) = w
                .await
                .joined("a writer")
                .and_then(|r| r.ctx("a transfer writer"))
            {
                result = Err(e);
            }
        }
        stop.store(true, Ordering::SeqCst);
        reader
            .await
            .joined("the reader")??;
        result?;
        let mut total = 0i64;
        for a in &accounts {
            let kv = handles[0]
                .get(a)
                .await
                .ctx("get account")?
                .ok_or_else(|| Fail(format!("expected {a} to exist")))?;
            total += parse_num::<i64>(&kv.value).unwrap_or(-1_000_000);
        }
        ensure_eq!(total, 500, "the total of all accounts after the transfers");
        Ok(())
    }
}
