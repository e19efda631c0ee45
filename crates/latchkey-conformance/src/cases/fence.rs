//! Fenced writes: `Compare::held(&guard)` commits a write only while that
//! guard's holding still exists.

use crate::case::{
    b, ensure, ensure_eq, expect_value, fenced_put, parse_num, put_value, CaseResult, Cx, ErrCtx,
    Fail, Joined,
};
use latchkey_core::{Backend, Compare, LockGuard, Op, OpResult, TxnRequest};

/// [`fenced_put`] that reads the key back when the fence refuses it.
fn fenced(g: &LockGuard, key: &str, value: &str) -> TxnRequest {
    fenced_put(g, key, value).otherwise([Op::get(key)])
}

/// Sends [`fenced`] of key `f` through `h` (`what` names it should the
/// backend error) and says whether it committed.
async fn committed(h: &dyn Backend, g: &LockGuard, value: &str, what: &str) -> Result<bool, Fail> {
    Ok(h.txn(fenced(g, "f", value)).await.ctx(what)?.succeeded)
}

cases! {
    /// While a guard is held, a txn `when held(guard)` commits its writes.
    #[case("fence::held_guard_write_commits")]
    async fn held_commits(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let g = h.lock("x", cx.long_lock()).await.ctx("lock")?;
        ensure!(
            committed(h.as_ref(), &g, "1", "fenced write").await?,
            "expected a fenced write with a held guard to commit"
        );
        expect_value(h.as_ref(), "f", "1", "the fenced key").await?;
        g.release().await.ctx("release")?;
        Ok(())
    }

    /// After the holder released and another handle took the lock, the old
    /// guard's fenced write fails (running its `otherwise` branch, writing
    /// nothing) and the new holder's commits.
    #[case("fence::released_guard_write_fails")]
    async fn released_fails(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let old = a.lock("x", cx.long_lock()).await.ctx("lock")?;
        ensure!(
            committed(a.as_ref(), &old, "old-1", "fenced write").await?,
            "expected the holder's fenced write to commit"
        );
        old.release().await.ctx("release")?;
        let new = c
            .lock("x", cx.long_lock())
            .await
            .ctx("lock by the second handle")?;
        let o = a
            .txn(fenced(&old, "f", "old-2"))
            .await
            .ctx("fenced write with the released guard")?;
        ensure!(
            !o.succeeded,
            "expected a fenced write with a released guard to fail"
        );
        match o.results.first() {
            Some(OpResult::Get(Some(kv))) => ensure_eq!(
                kv.value,
                b("old-1"),
                "the value read by the otherwise branch"
            ),
            other => {
                return Err(Fail(format!(
                    "expected the otherwise branch's get of f, got {other:?}"
                )))
            }
        }
        ensure!(
            committed(c.as_ref(), &new, "new", "fenced write with the new guard").await?,
            "expected the new holder's fenced write to commit"
        );
        expect_value(c.as_ref(), "f", "new", "the fenced key").await?;
        new.release().await.ctx("release")?;
        Ok(())
    }

    /// A guard's holding is data, not a connection: a fenced write with
    /// `held(guard)` sent through another handle of the namespace commits
    /// while the guard is held and fails after its release.
    #[case("fence::held_checked_from_another_handle")]
    async fn other_handle(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let g = a.lock("x", cx.long_lock()).await.ctx("lock")?;
        ensure!(
            committed(c.as_ref(), &g, "1", "fenced write via another handle").await?,
            "expected a fenced write with a held guard to commit when sent through another handle"
        );
        g.release().await.ctx("release")?;
        ensure!(
            !committed(c.as_ref(), &g, "2", "fenced write via another handle").await?,
            "expected a fenced write with a released guard to fail through another handle"
        );
        Ok(())
    }

    /// Re-locking on the same handle makes a new holding: the old guard's
    /// `held` is false, the new one's true, and the new token is larger.
    #[case("fence::reacquire_makes_old_guard_stale")]
    async fn reacquire(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let g1 = h.lock("x", cx.long_lock()).await.ctx("lock")?;
        g1.release().await.ctx("release")?;
        let g2 = h.lock("x", cx.long_lock()).await.ctx("lock again")?;
        ensure!(
            g2.fencing_token() > g1.fencing_token(),
            "expected the second holding's token > {}, got {}",
            g1.fencing_token(),
            g2.fencing_token()
        );
        ensure!(
            !committed(h.as_ref(), &g1, "1", "fenced write, old guard").await?,
            "expected the released first guard's fenced write to fail while the same handle holds the lock again"
        );
        ensure!(
            committed(h.as_ref(), &g2, "2", "fenced write, new guard").await?,
            "expected the current guard's fenced write to commit"
        );
        g2.release().await.ctx("release")?;
        Ok(())
    }

    /// `held` combines with other compares: the write commits only if the
    /// guard is held AND the value compare holds.
    #[case("fence::held_with_value_compare")]
    async fn held_and_value(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        put_value(h.as_ref(), "state", "active").await?;
        let g = h.lock("x", cx.long_lock()).await.ctx("lock")?;
        let t = |v: &str| {
            TxnRequest::new()
                .when([Compare::held(&g), Compare::value("state", v.to_string())])
                .then([Op::put("state", "inactive")])
        };
        ensure!(
            !h.txn(t("other")).await.ctx("txn")?.succeeded,
            "expected held ∧ value(state) = \"other\" to fail"
        );
        ensure!(
            h.txn(t("active")).await.ctx("txn")?.succeeded,
            "expected held ∧ value(state) = \"active\" to commit"
        );
        expect_value(h.as_ref(), "state", "inactive", "state after the fenced write").await?;
        g.release().await.ctx("release")?;
        Ok(())
    }

    /// 4 workers on 4 handles × 10 increments of a counter, each under the
    /// lock with a fenced write (`held ∧ revision unchanged`), end at exactly
    /// 40, and no fenced write of a current holder is ever refused.
    #[case("fence::counter_under_lock_4x10")]
    async fn counter(cx: Cx) -> CaseResult {
        let hs = cx.open_n(4).await?;
        let mut tasks = Vec::new();
        for h in hs.clone() {
            let opts = cx.long_lock();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    let g = h.lock("counter-lock", opts.clone()).await.ctx("lock")?;
                    let cur = h.get("counter").await.ctx("get counter")?;
                    let (n, cmp) = match &cur {
                        None => (0, Compare::absent("counter")),
                        Some(kv) => (
                            parse_num::<u64>(&kv.value).unwrap_or(1_000_000),
                            Compare::revision("counter", latchkey_core::CmpOp::Equal, kv.revision),
                        ),
                    };
                    let o = h
                        .txn(
                            TxnRequest::new()
                                .when([Compare::held(&g), cmp])
                                .then([Op::put("counter", (n + 1).to_string())]),
                        )
                        .await
                        .ctx("fenced increment")?;
                    ensure!(
                        o.succeeded,
                        "expected the fenced increment of the current holder (token {}) to commit",
                        g.fencing_token()
                    );
                    g.release().await.ctx("release")?;
                }
                Ok::<_, Fail>(())
            }));
        }
        for t in tasks {
            t.await
                .joined("a worker")??;
        }
        expect_value(hs[0].as_ref(), "counter", "40", "the counter after 4×10 fenced increments")
            .await?;
        Ok(())
    }
}
