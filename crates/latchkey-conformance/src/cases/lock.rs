//! Lock cases: exclusion (checked over recorded histories), try/wait/cancel
//! semantics, fencing tokens, release, renewal and expiry of abandoned leases.

use crate::case::{
    all_keys, ensure, ensure_eq, expect_err, expect_value, fenced_put, put_value, CaseResult, Cx,
    ErrCtx, Fail, Joined,
};
use crate::checkers::{check_exclusion, Clock, Holding};
use latchkey_core::{Backend, Error, LockGuard, LockOptions};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// True if `name` is free for `h` right now (takes and releases it).
async fn is_free(h: &dyn Backend, name: &str, opts: &LockOptions) -> Result<bool, Fail> {
    match h
        .try_lock(name, opts.clone())
        .await
        .ctx(format!("try_lock {name:?}"))?
    {
        Some(g) => {
            g.release().await.ctx(format!("release {name:?}"))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

async fn must_lock(h: &dyn Backend, name: &str, opts: LockOptions) -> Result<LockGuard, Fail> {
    h.lock(name, opts).await.ctx(format!("lock {name:?}"))
}

/// `new` took lock `x` after `old` lost it (`how`: "expired", "revoked"):
/// `new`'s token is larger, and through `h` a fenced write with `old`
/// fails while one with `new` commits (both write key `f`).
async fn expect_successor(
    h: &dyn Backend,
    old: &LockGuard,
    new: &LockGuard,
    how: &str,
) -> CaseResult {
    ensure!(
        new.fencing_token() > old.fencing_token(),
        "expected the new holder's token > {}, got {}",
        old.fencing_token(),
        new.fencing_token()
    );
    let stale = h
        .txn(fenced_put(old, "f", "old"))
        .await
        .ctx(format!("fenced write with the {how} guard"))?;
    ensure!(
        !stale.succeeded,
        "expected a fenced write with the {how} guard to fail"
    );
    let fresh = h
        .txn(fenced_put(new, "f", "new"))
        .await
        .ctx("fenced write with the new guard")?;
    ensure!(
        fresh.succeeded,
        "expected the new holder's fenced write to commit"
    );
    Ok(())
}

cases! {
    /// `try_lock` on a free lock returns a guard (with a token > 0); on a
    /// held one, from another handle, it returns `None` without waiting.
    #[case("lock::try_lock_free_then_held")]
    async fn try_lock_held(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let g = a
            .try_lock("x", cx.long_lock())
            .await
            .ctx("try_lock a free lock")?
            .ok_or_else(|| {
                Fail("expected try_lock of a free lock to return a guard, got None".into())
            })?;
        ensure!(
            g.fencing_token() > 0,
            "expected a fencing token > 0, got {}",
            g.fencing_token()
        );
        ensure_eq!(g.name(), "x", "the guard's name");
        let t = Instant::now();
        let other = c
            .try_lock("x", cx.long_lock())
            .await
            .ctx("try_lock a held lock")?;
        ensure!(
            other.is_none(),
            "expected try_lock of a lock held by another handle to return None, got {other:?}"
        );
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "expected try_lock not to wait, it took {:?}",
            t.elapsed()
        );
        g.release().await.ctx("release")?;
        Ok(())
    }

    /// Two tasks of one handle exclude each other: `try_lock` by the second
    /// returns `None`, and its `lock()` acquires only after the first
    /// releases, with a larger token.
    #[case("lock::same_handle_tasks_exclude")]
    async fn same_handle(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let g1 = must_lock(h.as_ref(), "x", cx.long_lock()).await?;
        let again = h
            .try_lock("x", cx.long_lock())
            .await
            .ctx("try_lock from the same handle")?;
        ensure!(again.is_none(), "expected try_lock from the holder's own handle to return None (locks are not shared by handle), got {again:?}");
        let (h2, opts) = (h.clone(), cx.long_lock());
        let mut waiter = tokio::spawn(async move { h2.lock("x", opts).await });
        ensure!(
            tokio::time::timeout(Duration::from_millis(300), &mut waiter)
                .await
                .is_err(),
            "expected a second task of the same handle to wait while the first holds the lock"
        );
        let t1 = g1.fencing_token();
        g1.release().await.ctx("release")?;
        let g2 = tokio::time::timeout(cx.wake_bound(), waiter)
            .await
            .map_err(|_| {
                Fail(format!(
                    "expected the second task to acquire within {:?} of the release",
                    cx.wake_bound()
                ))
            })?
            .joined("waiter")?
            .ctx("lock by the second task")?;
        ensure!(
            g2.fencing_token() > t1,
            "expected the second holder's token > {t1}, got {}",
            g2.fencing_token()
        );
        g2.release().await.ctx("release")?;
        Ok(())
    }

    /// `lock` with a `wait` on a held lock fails with `Timeout` after about
    /// that long, and leaves no orphan entry: once the holder releases, a
    /// new `lock` succeeds at once (well before any TTL could free it).
    #[case("lock::wait_timeout_leaves_no_orphan")]
    async fn wait_timeout(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let g = must_lock(a.as_ref(), "x", cx.long_lock()).await?;
        let t = Instant::now();
        let wait = Duration::from_millis(300);
        expect_err!(
            c.lock("x", cx.long_lock().with_wait(wait)).await,
            Error::Timeout { .. },
            "lock with wait {wait:?} on a held lock"
        );
        let took = t.elapsed();
        ensure!(
            took >= wait - Duration::from_millis(50),
            "expected the wait to last about {wait:?}, it returned after {took:?}"
        );
        ensure!(
            took < wait + Duration::from_secs(5),
            "expected the wait to end about {wait:?}, it took {took:?}"
        );
        g.release().await.ctx("release")?;
        let g2 = c.lock("x", cx.long_lock().with_wait(cx.wake_bound())).await
            .ctx(format!("lock after the holder released (an orphan entry of the timed-out waiter would block it for the {:?} TTL)", cx.long_lock_ttl()))?;
        g2.release().await.ctx("release")?;
        Ok(())
    }

    /// `lock` with `wait = 0` on a held lock fails with `Timeout` at once;
    /// on a free lock it acquires.
    #[case("lock::wait_zero_tries_once")]
    async fn wait_zero(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let g = c
            .lock("y", cx.long_lock().with_wait(Duration::ZERO))
            .await
            .ctx("lock with wait 0 on a free lock")?;
        g.release().await.ctx("release")?;
        let g = must_lock(a.as_ref(), "x", cx.long_lock()).await?;
        expect_err!(
            c.lock("x", cx.long_lock().with_wait(Duration::ZERO)).await,
            Error::Timeout { .. },
            "lock with wait 0 on a held lock"
        );
        g.release().await.ctx("release")?;
        ensure!(
            is_free(c.as_ref(), "x", &cx.long_lock()).await?,
            "expected x to be free after release (no orphan from the wait-0 attempt)"
        );
        Ok(())
    }

    /// Dropping a pending `lock()` future leaves nothing behind: after the
    /// holder releases, another handle's `lock` succeeds at once.
    #[case("lock::cancelled_waiter_leaves_nothing")]
    async fn cancelled(cx: Cx) -> CaseResult {
        let (a, c, d) = (cx.open().await?, cx.open().await?, cx.open().await?);
        let g = must_lock(a.as_ref(), "x", cx.long_lock()).await?;
        for i in 0..3 {
            let pending = c.lock("x", cx.long_lock());
            ensure!(
                tokio::time::timeout(Duration::from_millis(200), pending)
                    .await
                    .is_err(),
                "expected waiter {i} to still be waiting while x is held (it acquired)"
            );
        }
        g.release().await.ctx("release")?;
        let g2 = d.lock("x", cx.long_lock().with_wait(cx.wake_bound())).await
            .ctx(format!("lock by a third handle after the holder released (a cancelled waiter's orphan entry would block it for the {:?} TTL)", cx.long_lock_ttl()))?;
        g2.release().await.ctx("release")?;
        Ok(())
    }

    /// Dropping a `lock()` or `try_lock()` future in the middle of its
    /// request (while the server may be creating its entry) leaves nothing
    /// behind either. 24 fresh handles (kept open, so their leases and
    /// sessions live on, and none of them acquires again, which could tidy
    /// up its own leftovers) each drop a `lock()` of a held lock, a
    /// `try_lock()` of a free one and a `lock()` of another free one after
    /// a random delay of up to two uncontended acquire+release times.
    /// Afterwards a third handle gets all three locks within the wake
    /// bound; an entry created after its cleanup ran would hold them for
    /// the whole renewed (or 30 s) TTL.
    #[case("lock::cancelled_mid_request_leaves_nothing")]
    async fn cancelled_mid_request(cx: Cx) -> CaseResult {
        use rand::{Rng, SeedableRng};
        let (a, d) = (cx.open().await?, cx.open().await?);
        let t = Instant::now();
        ensure!(is_free(d.as_ref(), "calibrate", &cx.long_lock()).await?, "expected a fresh lock to be free");
        let round = t.elapsed().max(Duration::from_micros(200));
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut delay = || Duration::from_micros(rng.random_range(0..=2 * round.as_micros() as u64));
        let g = must_lock(a.as_ref(), "held", cx.long_lock()).await?;
        let mut handles = Vec::new();
        for i in 0..24 {
            let c = cx.open().await?;
            let dl = delay();
            if let Ok(r) = tokio::time::timeout(dl, c.lock("held", cx.long_lock())).await {
                return Err(Fail(format!("expected lock() {i} (cancelled after {dl:?}, seed {seed}) to wait while the lock is held, it returned {:?}", r.map(|g| g.fencing_token()))));
            }
            let dl = delay();
            if let Ok(r) = tokio::time::timeout(dl, c.try_lock("free-try", cx.long_lock())).await {
                if let Some(g) = r.ctx("try_lock a free lock")? {
                    g.release().await.ctx("release")?;
                }
            }
            let dl = delay();
            if let Ok(g) = tokio::time::timeout(dl, c.lock("free-lock", cx.long_lock())).await {
                g.ctx("lock a free lock")?.release().await.ctx("release")?;
            }
            // The same handle at once: its new holding must not be taken
            // for the cancelled request's leftover and given back.
            if i % 4 == 0 {
                let dl = delay();
                let _ = tokio::time::timeout(dl, c.lock("relock", cx.long_lock())).await;
                let g = must_lock(c.as_ref(), "relock", cx.long_lock()).await?;
                let out = d.txn(fenced_put(&g, "relock-fenced", &i.to_string())).await.ctx("a write fenced by the re-taken lock")?;
                ensure!(out.succeeded, "expected the lock re-taken by handle {i} after a cancelled lock() (after {dl:?}, seed {seed}) to be held by it");
                ensure!(d.try_lock("relock", cx.long_lock()).await.ctx("try_lock")?.is_none(), "expected a lock re-taken after a cancelled lock() (after {dl:?}, seed {seed}) to stay held");
                g.release().await.ctx("release")?;
            }
            handles.push(c);
        }
        g.release().await.ctx("release")?;
        for name in ["held", "free-try", "free-lock", "relock"] {
            let g = d.lock(name, cx.long_lock().with_wait(cx.wake_bound() * 2)).await
                .ctx(format!("lock {name:?} by another handle after 24 cancelled requests on it (seed {seed}, delays up to {:?}): an orphan entry would block it", 2 * round))?;
            g.release().await.ctx("release")?;
        }
        drop(handles);
        Ok(())
    }

    /// Fencing tokens strictly increase across 100 successive holders
    /// (three handles taking turns, and the same handle re-locking).
    #[case("lock::tokens_increase_100_holders")]
    async fn tokens_increase(cx: Cx) -> CaseResult {
        let hs = cx.open_n(3).await?;
        let mut last = 0u64;
        for i in 0..100 {
            let h = &hs[(i / 2) % 3];
            let g = must_lock(h.as_ref(), "t", cx.long_lock()).await?;
            let t = g.fencing_token();
            ensure!(
                t > last,
                "expected holder {i}'s token to be > {last} (the previous holder's), got {t}"
            );
            last = t;
            g.release().await.ctx("release")?;
        }
        Ok(())
    }

    /// `release` is idempotent: a second call is `Ok`, and releasing a
    /// guard again after someone else took the lock releases nobody else's
    /// lock.
    #[case("lock::release_is_idempotent")]
    async fn release_idempotent(cx: Cx) -> CaseResult {
        let (a, c, d) = (cx.open().await?, cx.open().await?, cx.open().await?);
        let g = must_lock(a.as_ref(), "x", cx.long_lock()).await?;
        g.release().await.ctx("first release")?;
        g.release().await.ctx("second release")?;
        let g2 = c
            .try_lock("x", cx.long_lock())
            .await
            .ctx("try_lock after release")?
            .ok_or_else(|| Fail("expected x to be free after release".into()))?;
        g.release()
            .await
            .ctx("third release, while another handle holds the lock")?;
        ensure!(
            !is_free(d.as_ref(), "x", &cx.long_lock()).await?,
            "expected x to stay held by the new holder after the old guard released again"
        );
        g2.release().await.ctx("release")?;
        Ok(())
    }

    /// `lost()` completes once the guard is released, and `is_lost()`
    /// reports it; a held guard is not lost.
    #[case("lock::lost_completes_after_release")]
    async fn lost_after_release(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let g = must_lock(h.as_ref(), "x", cx.long_lock()).await?;
        ensure!(
            !g.is_lost(),
            "expected a freshly acquired guard not to be lost"
        );
        let lost = g.lost();
        g.release().await.ctx("release")?;
        tokio::time::timeout(Duration::from_secs(5), lost)
            .await
            .map_err(|_| Fail("expected lost() to complete after release".into()))?;
        ensure!(g.is_lost(), "expected is_lost() after release");
        Ok(())
    }

    /// Dropping a guard releases the lock (in the background): another
    /// handle gets it well before its TTL.
    #[case("lock::drop_releases")]
    async fn drop_releases(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let g = must_lock(a.as_ref(), "x", cx.long_lock()).await?;
        drop(g);
        let g2 = c
            .lock("x", cx.long_lock().with_wait(cx.wake_bound()))
            .await
            .ctx(format!(
                "lock within {:?} after the holder dropped its guard (TTL {:?})",
                cx.wake_bound(),
                cx.long_lock_ttl()
            ))?;
        g2.release().await.ctx("release")?;
        Ok(())
    }

    /// A waiter blocked in `lock()` is woken by the release, not by expiry
    /// or slow polling: it acquires within a small bound after `release()`
    /// returns (the lock's TTL is far longer).
    #[case("lock::waiter_woken_by_release")]
    async fn waiter_woken(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let g = must_lock(a.as_ref(), "x", cx.long_lock()).await?;
        let opts = cx.long_lock();
        let mut waiter = tokio::spawn(async move {
            let g = c.lock("x", opts).await;
            (g, Instant::now())
        });
        ensure!(
            tokio::time::timeout(Duration::from_millis(300), &mut waiter)
                .await
                .is_err(),
            "expected the waiter to wait while x is held"
        );
        g.release().await.ctx("release")?;
        let released = Instant::now();
        let bound = cx.wake_bound();
        let (g2, at) = tokio::time::timeout(bound + Duration::from_secs(1), waiter)
            .await
            .map_err(|_| {
                Fail(format!(
                    "expected the waiter to acquire within {bound:?} of the release"
                ))
            })?
            .joined("waiter")?;
        let g2 = g2.ctx("the waiter's lock")?;
        let took = at.saturating_duration_since(released);
        ensure!(
            took <= bound,
            "expected the waiter to acquire within {bound:?} of the release, it took {took:?}"
        );
        g2.release().await.ctx("release")?;
        Ok(())
    }

    /// A waiting `lock()` does not poll: while the lock stays held for
    /// 1.5 s, the waiter's handle sends at most 3 requests (counted by the
    /// harness), and it still acquires promptly after the release.
    #[case("lock::waiter_does_not_poll", needs_op_count = true)]
    async fn no_polling(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let g = must_lock(a.as_ref(), "x", cx.long_lock()).await?;
        let (c2, opts) = (c.clone(), cx.long_lock());
        let mut waiter = tokio::spawn(async move { c2.lock("x", opts).await });
        ensure!(
            tokio::time::timeout(Duration::from_millis(300), &mut waiter)
                .await
                .is_err(),
            "expected the waiter to wait while x is held"
        );
        let count = |what: &str| {
            cx.op_count(&c).ok_or_else(|| {
                Fail(format!("expected the harness to count the waiter's requests ({what})"))
            })
        };
        let before = count("before")?;
        let hold = Duration::from_millis(1500);
        ensure!(
            tokio::time::timeout(hold, &mut waiter).await.is_err(),
            "expected the waiter to keep waiting while x is held"
        );
        let sent = count("after")? - before;
        ensure!(
            sent <= 3,
            "expected a waiting lock() to send at most 3 requests in {hold:?}, it sent {sent} (it polls)"
        );
        g.release().await.ctx("release")?;
        let g2 = tokio::time::timeout(cx.wake_bound(), waiter)
            .await
            .map_err(|_| Fail(format!("expected the waiter to acquire within {:?}", cx.wake_bound())))?
            .joined("waiter")?
            .ctx("the waiter's lock")?;
        g2.release().await.ctx("release")?;
        Ok(())
    }

    /// Automatic renewal keeps a lock with a short TTL alive across 5× its
    /// TTL: another handle waiting that long times out, the guard is not
    /// lost, and a fenced write with it still commits.
    #[case("lock::renewal_keeps_alive_5x_ttl")]
    async fn renewal(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let ttl = cx.short_lock_ttl();
        let g = must_lock(a.as_ref(), "x", LockOptions::ttl(ttl)).await?;
        expect_err!(
            c.lock("x", LockOptions::ttl(ttl).with_wait(ttl * 5)).await,
            Error::Timeout { .. },
            "another handle's lock with wait 5×TTL ({:?}) while the holder renews",
            ttl * 5
        );
        ensure!(
            !g.is_lost(),
            "expected the renewed guard not to be lost after 5×TTL"
        );
        let o = a
            .txn(fenced_put(&g, "f", "a"))
            .await
            .ctx("fenced write")?;
        ensure!(
            o.succeeded,
            "expected a fenced write with the renewed guard to commit"
        );
        g.release().await.ctx("release")?;
        Ok(())
    }

    /// An abandoned lease (holder stops renewing, as if it crashed) frees
    /// the lock: another handle acquires it within TTL + granularity, with
    /// a larger token; the old guard's `lost()` fires; a fenced write with
    /// the old guard fails while the new holder's commits.
    #[case("lock::abandoned_lease_expires", destructive = true)]
    async fn abandoned(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let ttl = cx.short_lock_ttl();
        let bound = cx.expiry_bound(ttl);
        let old = must_lock(a.as_ref(), "x", LockOptions::ttl(ttl)).await?;
        let t = Instant::now();
        old.abandon().await;
        let new = c
            .lock("x", LockOptions::ttl(cx.long_lock_ttl()).with_wait(bound))
            .await
            .ctx(format!(
                "lock by another handle within TTL + granularity + slack ({bound:?}) of abandoning"
            ))?;
        let took = t.elapsed();
        ensure!(took >= ttl / 4, "expected the abandoned lock to stay held for a while (TTL {ttl:?}), another handle got it after {took:?}");
        tokio::time::timeout(
            bound.saturating_sub(t.elapsed()) + Duration::from_millis(100),
            old.lost(),
        )
        .await
        .map_err(|_| {
            Fail(format!(
                "expected the abandoned guard's lost() to fire within {bound:?}"
            ))
        })?;
        expect_successor(c.as_ref(), &old, &new, "expired").await?;
        expect_value(c.as_ref(), "f", "new", "the fenced key").await?;
        new.release().await.ctx("release")?;
        Ok(())
    }

    /// A lock entry deleted behind its holder's back (an operator, a
    /// server-side session expiry) fires the holder's `lost()` within TTL +
    /// granularity; another handle then acquires it with a larger token,
    /// and the old guard's fenced write fails while the new one's commits.
    #[case("lock::revoked_entry_fires_lost", needs_revoke = true)]
    async fn revoked(cx: Cx) -> CaseResult {
        let (a, c, ops) = (cx.open().await?, cx.open().await?, cx.open().await?);
        let ttl = cx.short_lock_ttl();
        let old = must_lock(a.as_ref(), "x", LockOptions::ttl(ttl)).await?;
        let was_held = cx.revoke_lock(&ops, "x").await?;
        ensure!(was_held, "expected the harness to find lock x held when revoking it");
        let bound = cx.expiry_bound(ttl);
        tokio::time::timeout(bound, old.lost()).await.map_err(|_| {
            Fail(format!(
                "expected lost() to fire within {bound:?} of the entry's deletion"
            ))
        })?;
        let new = c
            .lock("x", cx.long_lock().with_wait(bound))
            .await
            .ctx("lock by another handle after the revocation")?;
        expect_successor(c.as_ref(), &old, &new, "revoked").await?;
        old.release().await.ctx("release of the revoked guard")?;
        ensure!(
            !is_free(ops.as_ref(), "x", &cx.long_lock()).await?,
            "expected the revoked guard's release to leave the new holder's lock alone"
        );
        new.release().await.ctx("release")?;
        Ok(())
    }

    /// After an abandoned lease expired and another handle took the lock,
    /// releasing the old guard is `Ok` and does not free the new holder's lock.
    #[case("lock::stale_release_spares_successor", destructive = true)]
    async fn stale_release(cx: Cx) -> CaseResult {
        let (a, c, d) = (cx.open().await?, cx.open().await?, cx.open().await?);
        let ttl = cx.short_lock_ttl();
        let old = must_lock(a.as_ref(), "x", LockOptions::ttl(ttl)).await?;
        old.abandon().await;
        let new = c
            .lock(
                "x",
                LockOptions::ttl(cx.long_lock_ttl()).with_wait(cx.expiry_bound(ttl)),
            )
            .await
            .ctx("lock after the old lease expired")?;
        old.release().await.ctx("release of the stale guard")?;
        ensure!(
            !is_free(d.as_ref(), "x", &cx.long_lock()).await?,
            "expected x to stay held by the new holder after the stale guard's release"
        );
        let o = c
            .txn(fenced_put(&new, "f", "new"))
            .await
            .ctx("fenced write")?;
        ensure!(
            o.succeeded,
            "expected the new holder's fenced write to commit after the stale release"
        );
        new.release().await.ctx("release")?;
        Ok(())
    }

    /// 8 tasks (4 handles × 2) × 25 acquisitions of one lock: the recorded
    /// history has no overlapping holdings and strictly increasing tokens
    /// (exclusion checker), at most one task is ever inside the critical
    /// section, and a non-atomic counter incremented under the lock ends at
    /// exactly 200.
    #[case("lock::exclusion_8_tasks_checked")]
    async fn exclusion(cx: Cx) -> CaseResult {
        let hs = cx.open_n(4).await?;
        let clock = Clock::new();
        let inside = Arc::new(AtomicUsize::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for task in 0..8usize {
            let (h, inside, counter, opts) = (
                hs[task % 4].clone(),
                inside.clone(),
                counter.clone(),
                cx.long_lock(),
            );
            tasks.push(tokio::spawn(async move {
                let mut hist = Vec::new();
                for _ in 0..25 {
                    let g = h.lock("x", opts.clone()).await.ctx("lock")?;
                    let acquired = clock.now();
                    let others = inside.fetch_add(1, Ordering::SeqCst);
                    // A deliberately non-atomic read-modify-write.
                    let v = counter.load(Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    counter.store(v + 1, Ordering::SeqCst);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    let released = clock.now();
                    hist.push(Holding { lock: "x".into(), client: task, token: g.fencing_token(), acquired, released });
                    g.release().await.ctx("release")?;
                    ensure!(others == 0, "expected task {task} to be alone in the critical section, {others} other(s) were inside");
                }
                Ok::<_, Fail>(hist)
            }));
        }
        let mut history = Vec::new();
        let mut first_err = None;
        for t in tasks {
            match t
                .await
                .joined("a task")
                .and_then(|r| r)
            {
                Ok(h) => history.extend(h),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        check_exclusion(&history).map_err(|v| {
            Fail(format!(
                "expected the lock history of 8 tasks to show exclusion and increasing tokens: {v}"
            ))
        })?;
        if let Some(e) = first_err {
            return Err(e);
        }
        ensure_eq!(
            counter.load(Ordering::SeqCst),
            200,
            "the counter incremented under the lock 8×25 times"
        );
        Ok(())
    }

    /// Locks of different names are independent: holding one never blocks
    /// another, and one handle can hold 50 locks at once, each excluding
    /// another handle.
    #[case("lock::names_are_independent")]
    async fn names_independent(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let mut guards = Vec::new();
        for i in 0..50 {
            guards.push(
                a.try_lock(&format!("n{i}"), cx.long_lock())
                    .await
                    .ctx("try_lock")?
                    .ok_or_else(|| {
                        Fail(format!(
                            "expected free lock n{i} to be taken while n0..n{i} are held"
                        ))
                    })?,
            );
        }
        for i in [0, 17, 49] {
            ensure!(
                !is_free(c.as_ref(), &format!("n{i}"), &cx.long_lock()).await?,
                "expected n{i} to be held"
            );
        }
        ensure!(
            is_free(c.as_ref(), "n50", &cx.long_lock()).await?,
            "expected n50 to be free"
        );
        for g in guards {
            g.release().await.ctx("release")?;
        }
        Ok(())
    }

    /// Lock names with `/`, spaces and unicode work and are distinct from
    /// similar names (`a/b`, `a`, `a/`).
    #[case("lock::odd_names")]
    async fn odd_names(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let names = ["a/b", "a", "a/", "/a", "with space", "ünï/✓", "/"];
        let mut guards = Vec::new();
        for n in names {
            guards.push(
                a.try_lock(n, cx.long_lock())
                    .await
                    .ctx(format!("try_lock {n:?}"))?
                    .ok_or_else(|| {
                        Fail(format!(
                            "expected lock {n:?} to be free while the other odd names are held"
                        ))
                    })?,
            );
        }
        for n in names {
            ensure!(
                !is_free(c.as_ref(), n, &cx.long_lock()).await?,
                "expected {n:?} to be held by the first handle"
            );
        }
        for g in guards {
            g.release().await.ctx("release")?;
        }
        Ok(())
    }

    /// Lock entries are invisible to the KV API: a held lock adds no key to
    /// `list("")`, and a user key with the lock's name is unaffected.
    #[case("lock::entries_hidden_from_kv")]
    async fn hidden(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        put_value(h.as_ref(), "k", "mine").await?;
        let g1 = must_lock(h.as_ref(), "k", cx.long_lock()).await?;
        let g2 = must_lock(h.as_ref(), "other", cx.long_lock()).await?;
        ensure_eq!(
            all_keys(h.as_ref()).await?,
            vec!["k"],
            "keys listed while two locks are held"
        );
        expect_value(h.as_ref(), "k", "mine", "the user key named like a held lock").await?;
        g1.release().await.ctx("release")?;
        g2.release().await.ctx("release")?;
        ensure_eq!(
            all_keys(h.as_ref()).await?,
            vec!["k"],
            "keys listed after release"
        );
        Ok(())
    }

    /// A lock held in one namespace does not block the same name in another.
    #[case("lock::namespace_isolation")]
    async fn lock_ns(cx: Cx) -> CaseResult {
        let a = cx.open().await?;
        let o = cx.open_other("other").await?;
        let g = must_lock(a.as_ref(), "x", cx.long_lock()).await?;
        ensure!(
            is_free(o.as_ref(), "x", &cx.long_lock()).await?,
            "expected lock x of another namespace to be free while x is held here"
        );
        g.release().await.ctx("release")?;
        Ok(())
    }
}
