//! Recipes (`latchkey-recipes`) on the backend under test: leader
//! election, counting semaphore, read-write lock and replicated map. They
//! are built on the three traits only, so every backend must run them
//! with the same guarantees as a lock; histories are checked with the
//! exclusion checker and a generalised "at most N at once" checker.

use crate::case::{
    b, ensure, ensure_eq, expect_err, expect_value, poll_until, put_value, CaseResult, Cx, ErrCtx,
    Fail, Joined,
};
use crate::checkers::{check_exclusion, Clock, Holding};
use futures::StreamExt;
use latchkey_core::{
    Backend, Capabilities, CmpOp, Compare, DeleteOptions, Error, ListOptions, Op, PutOptions,
    TxnRequest,
};
use latchkey_recipes::{Election, Leader, Mirror, RwLock, Semaphore};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Why FIFO cases cannot run.
fn fifo(c: &Capabilities) -> Option<String> {
    (!c.fifo_locks).then(|| "needs fifo_locks".into())
}

/// Generalised exclusion: at no instant do more than `limit` of the
/// holdings overlap (touching ends allowed). Returns the first instant
/// where `limit + 1` were held, with the holdings involved.
pub(crate) fn check_at_most(limit: usize, history: &[Holding]) -> Result<(), String> {
    // Ends sort before starts at the same tick: touching is not overlap.
    let mut events: Vec<(u64, u8, usize)> = Vec::new();
    for (i, h) in history.iter().enumerate() {
        if h.released < h.acquired {
            return Err(format!("malformed holding {h:?}"));
        }
        events.push((h.acquired, 1, i));
        events.push((h.released, 0, i));
    }
    events.sort();
    let mut open: Vec<usize> = Vec::new();
    for (t, kind, i) in events {
        if kind == 0 {
            open.retain(|x| *x != i);
        } else {
            open.push(i);
            if open.len() > limit {
                let who: Vec<String> = open
                    .iter()
                    .map(|j| {
                        let h = &history[*j];
                        format!(
                            "client {} token {} [{}, {}]",
                            h.client, h.token, h.acquired, h.released
                        )
                    })
                    .collect();
                return Err(format!(
                    "{} holders at once (limit {limit}) at tick {t}: {}",
                    open.len(),
                    who.join("; ")
                ));
            }
        }
    }
    Ok(())
}

fn election(cx: &Cx, h: &Arc<dyn Backend>, name: &str) -> Result<Election, Fail> {
    Ok(Election::new(h.clone(), name)
        .ctx("Election::new")?
        .with_ttl(cx.long_lock_ttl()))
}

/// Joins spawned tasks; the first failure (or panic) wins.
async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<Result<T, Fail>>>) -> Result<Vec<T>, Fail> {
    let mut out = Vec::new();
    let mut first_err = None;
    for t in tasks {
        match t.await.joined("a task").and_then(|r| r) {
            Ok(v) => out.push(v),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// A write of key `f` through `h` fenced by `fence` (a recipe guard's
/// compare); `what` names it should the backend error. Whether it committed.
async fn fenced_write(
    h: &dyn Backend,
    fence: Compare,
    value: &str,
    what: &str,
) -> Result<bool, Fail> {
    let txn = TxnRequest::new()
        .when([fence])
        .then([Op::put("f", value.to_string())]);
    Ok(h.txn(txn).await.ctx(what)?.succeeded)
}

async fn next_leader(
    s: &mut futures::stream::BoxStream<'static, latchkey_core::Result<Option<Leader>>>,
    what: &str,
) -> Result<Option<Leader>, Fail> {
    match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
        Err(_) => Err(Fail(format!(
            "expected {what} from observe() within 10 s, nothing came"
        ))),
        Ok(None) => Err(Fail(format!(
            "expected {what}, but the observe stream ended"
        ))),
        Ok(Some(Err(e))) => Err(Fail(format!("expected {what}, observe failed: {e}"))),
        Ok(Some(Ok(l))) => Ok(l),
    }
}

/// The backend under test with watches that the case can break on
/// demand (each live watch ends with an `Unavailable` error, as after a
/// dropped connection), to drive a mirror's resynchronisation through the
/// backend's real `list` and `watch`.
struct BreakableWatches {
    inner: Arc<dyn Backend>,
    kill: tokio::sync::watch::Sender<u64>,
}

#[async_trait::async_trait]
impl latchkey_core::KvStore for BreakableWatches {
    async fn get(&self, key: &str) -> latchkey_core::Result<Option<latchkey_core::KeyValue>> {
        self.inner.get(key).await
    }
    async fn put(
        &self,
        key: &str,
        value: bytes::Bytes,
        opts: PutOptions,
    ) -> latchkey_core::Result<latchkey_core::Revision> {
        self.inner.put(key, value, opts).await
    }
    async fn delete(&self, key: &str, opts: DeleteOptions) -> latchkey_core::Result<bool> {
        self.inner.delete(key, opts).await
    }
    async fn list(
        &self,
        prefix: &str,
        opts: ListOptions,
    ) -> latchkey_core::Result<Vec<latchkey_core::KeyValue>> {
        self.inner.list(prefix, opts).await
    }
    async fn watch(
        &self,
        prefix: &str,
        from: Option<latchkey_core::Revision>,
    ) -> latchkey_core::Result<latchkey_core::WatchStream> {
        let mut kill = self.kill.subscribe();
        kill.borrow_and_update();
        let name = self.inner.name();
        let live = self.inner.watch(prefix, from).await?;
        let broken = futures::stream::once(async move {
            let _ = kill.changed().await;
            Err(Error::unavailable(name, "watch broken by the case"))
        });
        Ok(futures::stream::select(live, broken).boxed())
    }
}

#[async_trait::async_trait]
impl latchkey_core::Txn for BreakableWatches {
    async fn txn(&self, txn: TxnRequest) -> latchkey_core::Result<latchkey_core::TxnOutcome> {
        self.inner.txn(txn).await
    }
}

#[async_trait::async_trait]
impl latchkey_core::DistributedLock for BreakableWatches {
    async fn lock(
        &self,
        name: &str,
        opts: latchkey_core::LockOptions,
    ) -> latchkey_core::Result<latchkey_core::LockGuard> {
        self.inner.lock(name, opts).await
    }
    async fn try_lock(
        &self,
        name: &str,
        opts: latchkey_core::LockOptions,
    ) -> latchkey_core::Result<Option<latchkey_core::LockGuard>> {
        self.inner.try_lock(name, opts).await
    }
}

impl Backend for BreakableWatches {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

cases! {
    /// 8 candidates on 8 handles campaign 3 times each: the recorded
    /// leaderships (from `campaign` returning to `resign`) never overlap
    /// and their terms strictly increase (exclusion checker); at most one
    /// candidate is ever inside its term.
    #[case("recipes::election_one_leader_among_8")]
    async fn election_one_leader(cx: Cx) -> CaseResult {
        let hs = cx.open_n(8).await?;
        let clock = Clock::new();
        let inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (i, h) in hs.into_iter().enumerate() {
            let (e, inside) = (election(&cx, &h, "leader")?, inside.clone());
            tasks.push(tokio::spawn(async move {
                let mut hist = Vec::new();
                for round in 0..3 {
                    let l = e.campaign(format!("c{i}-{round}")).await.ctx("campaign")?;
                    let acquired = clock.now();
                    let others = inside.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    let released = clock.now();
                    hist.push(Holding { lock: "leader".into(), client: i, token: l.term(), acquired, released });
                    l.resign().await.ctx("resign")?;
                    ensure!(others == 0, "expected candidate {i} to lead alone, {others} other leader(s) at the same time");
                }
                Ok::<_, Fail>(hist)
            }));
        }
        let history: Vec<Holding> = join_all(tasks).await?.into_iter().flatten().collect();
        ensure_eq!(history.len(), 24, "the number of recorded leaderships");
        check_exclusion(&history).map_err(|v| Fail(format!(
            "expected one leader at a time with strictly increasing terms: {v}"
        )))
    }

    /// `leader()` reads the published (value, term): `None` before anyone
    /// campaigns, the leader's value and term while it leads, the new
    /// value after `proclaim`, `None` again after `resign`.
    #[case("recipes::election_leader_reads_record")]
    async fn election_leader_reads(cx: Cx) -> CaseResult {
        let (a, o) = (cx.open().await?, cx.open().await?);
        let (ea, eo) = (election(&cx, &a, "e")?, election(&cx, &o, "e")?);
        ensure_eq!(eo.leader().await.ctx("leader()")?, None, "the leader before any campaign");
        let l = ea.campaign("node-a").await.ctx("campaign")?;
        let seen = eo.leader().await.ctx("leader()")?
            .ok_or_else(|| Fail("expected a leader after campaign, got None".into()))?;
        ensure_eq!((seen.term, seen.value.clone()), (l.term(), b("node-a")), "(term, value) read by another handle");
        l.proclaim("node-a2").await.ctx("proclaim")?;
        let seen = eo.leader().await.ctx("leader()")?.map(|l| l.value);
        ensure_eq!(seen, Some(b("node-a2")), "the value after proclaim");
        l.resign().await.ctx("resign")?;
        ensure_eq!(eo.leader().await.ctx("leader()")?, None, "the leader after resign");
        Ok(())
    }

    /// An observer sees every change of leader and value, in order, with
    /// strictly increasing terms: 5 successive leaders on 3 handles, each
    /// proclaiming once (each change is awaited before the next, so this
    /// holds also where the backend's watch coalesces).
    #[case("recipes::election_observe_every_change_in_order")]
    async fn election_observe(cx: Cx) -> CaseResult {
        let hs = cx.open_n(3).await?;
        let obs_h = cx.open().await?;
        let mut obs = election(&cx, &obs_h, "e")?.observe().await.ctx("observe")?;
        ensure_eq!(next_leader(&mut obs, "the initial state").await?, None, "the initial observation");
        let mut last_term = 0;
        for i in 0..5 {
            let e = election(&cx, &hs[i % 3], "e")?;
            let l = e.campaign(format!("v{i}")).await.ctx("campaign")?;
            ensure!(l.term() > last_term, "expected leader {i}'s term > {last_term}, got {}", l.term());
            last_term = l.term();
            let seen = next_leader(&mut obs, &format!("leader {i}")).await?;
            ensure_eq!(seen.map(|s| (s.term, s.value)), Some((l.term(), b(&format!("v{i}")))), "observation of leader {i}");
            l.proclaim(format!("v{i}-b")).await.ctx("proclaim")?;
            let seen = next_leader(&mut obs, &format!("leader {i}'s new value")).await?;
            ensure_eq!(seen.map(|s| (s.term, s.value)), Some((l.term(), b(&format!("v{i}-b")))), "observation of leader {i}'s proclaim");
            l.resign().await.ctx("resign")?;
            let seen = next_leader(&mut obs, &format!("the vacancy after leader {i}")).await?;
            ensure_eq!(seen, None, "observation after leader {i} resigned");
        }
        Ok(())
    }

    /// A leader whose lease expires (it stops renewing, as if it crashed)
    /// is replaced by a waiting candidate within TTL + granularity, with a
    /// larger term; the old leader's `lost()` fires and its fenced write
    /// and `proclaim` fail, while the new leader's fenced write commits.
    #[case("recipes::election_expired_leader_replaced_and_fenced", destructive = true)]
    async fn election_expiry(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let ttl = cx.short_lock_ttl();
        let bound = cx.expiry_bound(ttl);
        let old = Election::new(a.clone(), "e").ctx("new")?.with_ttl(ttl).campaign("a").await.ctx("campaign")?;
        let ec = Election::new(c.clone(), "e").ctx("new")?.with_ttl(cx.long_lock_ttl()).with_wait(bound * 2);
        let waiting = tokio::spawn(async move { ec.campaign("c").await });
        let t = Instant::now();
        old.lock_guard().abandon().await;
        let new = waiting.await.joined("campaign")?
            .ctx(format!("campaign of the waiting candidate within {:?}", bound * 2))?;
        ensure!(t.elapsed() <= bound + Duration::from_millis(500), "expected the replacement within {bound:?}, it took {:?}", t.elapsed());
        ensure!(new.term() > old.term(), "expected the new term > {}, got {}", old.term(), new.term());
        tokio::time::timeout(bound, old.lost()).await
            .map_err(|_| Fail(format!("expected the expired leader's lost() to fire within {bound:?}")))?;
        let stale = fenced_write(c.as_ref(), old.fence(), "old", "fenced write of the old leader").await?;
        ensure!(!stale, "expected the expired leader's fenced write to fail");
        ensure!(old.proclaim("still a").await.is_err(), "expected the expired leader's proclaim to fail");
        let fresh = fenced_write(c.as_ref(), new.fence(), "new", "fenced write of the new leader").await?;
        ensure!(fresh, "expected the new leader's fenced write to commit");
        let seen = Election::new(c.clone(), "e").ctx("new")?.leader().await.ctx("leader()")?;
        ensure_eq!(seen.map(|l| (l.term, l.value)), Some((new.term(), b("c"))), "the published leader");
        new.resign().await.ctx("resign")?;
        Ok(())
    }

    /// Candidates are served in arrival order: 3 candidates queued behind
    /// a leader become leaders in the order they started campaigning.
    #[case("recipes::election_arrival_order", gate = fifo)]
    async fn election_fifo(cx: Cx) -> CaseResult {
        let hs = cx.open_n(4).await?;
        let first = election(&cx, &hs[0], "e")?.campaign("first").await.ctx("campaign")?;
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, h) in hs.iter().enumerate().skip(1) {
            let (e, order) = (election(&cx, h, "e")?, order.clone());
            let mut t = tokio::spawn(async move {
                let l = e.campaign(format!("c{i}")).await.ctx("campaign")?;
                order.lock().unwrap_or_else(|p| p.into_inner()).push(i);
                l.resign().await.ctx("resign")?;
                Ok::<_, Fail>(())
            });
            ensure!(tokio::time::timeout(Duration::from_millis(300), &mut t).await.is_err(),
                "expected candidate {i} to wait while another leads");
            tasks.push(t);
        }
        first.resign().await.ctx("resign")?;
        join_all(tasks).await?;
        ensure_eq!(order.lock().unwrap_or_else(|p| p.into_inner()).clone(), vec![1, 2, 3], "the order in which the queued candidates led");
        Ok(())
    }

    /// A cancelled campaign leaves nothing behind, and dropping a
    /// leadership resigns: after the leader is dropped, another candidate
    /// leads within the wake bound (far below the TTL).
    #[case("recipes::election_cancel_and_drop_leave_nothing")]
    async fn election_cancel(cx: Cx) -> CaseResult {
        let (a, c, d) = (cx.open().await?, cx.open().await?, cx.open().await?);
        let l = election(&cx, &a, "e")?.campaign("a").await.ctx("campaign")?;
        let ec = election(&cx, &c, "e")?;
        for i in 0..3 {
            ensure!(tokio::time::timeout(Duration::from_millis(150), ec.campaign("c")).await.is_err(),
                "expected cancelled campaign {i} to be waiting");
        }
        drop(l);
        let ed = election(&cx, &d, "e")?.with_wait(cx.wake_bound());
        let l2 = ed.campaign("d").await.ctx(format!(
            "campaign within {:?} after the leader dropped its leadership (TTL {:?})", cx.wake_bound(), cx.long_lock_ttl()))?;
        let seen = ed.leader().await.ctx("leader()")?.map(|l| l.value);
        ensure_eq!(seen, Some(b("d")), "the published leader");
        l2.resign().await.ctx("resign")?;
        Ok(())
    }

    /// A permit count disagreeing with the recorded one is
    /// `InvalidArgument`, as are 0 permits; the agreeing count works.
    #[case("recipes::semaphore_count_checked")]
    async fn semaphore_count(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let sa = Semaphore::new(a).with_ttl(cx.long_lock_ttl());
        let sc = Semaphore::new(c).with_ttl(cx.long_lock_ttl());
        let p = sa.acquire("s", 2).await.ctx("acquire 1 of 2")?;
        expect_err!(sc.acquire("s", 3).await, Error::InvalidArgument(_), "acquire with 3 permits where 2 are recorded");
        expect_err!(sc.try_acquire("s", 1).await, Error::InvalidArgument(_), "try_acquire with 1 permit where 2 are recorded");
        expect_err!(sc.acquire("t", 0).await, Error::InvalidArgument(_), "acquire with 0 permits");
        let q = sc.acquire("s", 2).await.ctx("acquire 2 of 2")?;
        ensure!(p.slot() != q.slot(), "expected two holders to have different permits, both have {}", p.slot());
        ensure!(sc.try_acquire("s", 2).await.ctx("try_acquire")?.is_none(), "expected no third permit of 2");
        p.release().await.ctx("release")?;
        q.release().await.ctx("release")?;
        Ok(())
    }

    /// Never more than N = 3 permit holders while 8 tasks on 4 handles
    /// churn: holding and releasing, cancelling waits, and abandoning
    /// permits (as crashed holders) that are reclaimed after their TTL.
    /// Checked over the recorded history with the generalised ("at most
    /// N") checker, per permit with the exclusion checker, and live.
    #[case("recipes::semaphore_at_most_n_under_churn", destructive = true)]
    async fn semaphore_churn(cx: Cx) -> CaseResult {
        const N: usize = 3;
        let hs = cx.open_n(4).await?;
        let clock = Clock::new();
        let inside = Arc::new(AtomicUsize::new(0));
        let abandons = Arc::new(AtomicUsize::new(0));
        // The most holders ever seen inside at once, live.
        let crowd = Arc::new(AtomicUsize::new(0));
        let ttl = cx.short_lock_ttl();
        let mut tasks = Vec::new();
        for task in 0..8usize {
            let sem = Semaphore::new(hs[task % 4].clone()).with_ttl(ttl);
            let (inside, abandons, crowd) = (inside.clone(), abandons.clone(), crowd.clone());
            let seed: u64 = rand::random();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut hist = Vec::new();
                for _ in 0..8 {
                    if rng.random_range(0..10) < 2 {
                        // A waiter that gives up (its future is dropped).
                        let _ = tokio::time::timeout(Duration::from_millis(20), sem.acquire("s", N)).await;
                        continue;
                    }
                    let p = sem.acquire("s", N).await.ctx("acquire")?;
                    let acquired = clock.now();
                    let others = inside.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    let released = clock.now();
                    hist.push(Holding { lock: format!("slot-{}", p.slot()), client: task, token: p.fencing_token(), acquired, released });
                    crowd.fetch_max(others + 1, Ordering::SeqCst);
                    if rng.random_range(0..10) == 0 && abandons.fetch_add(1, Ordering::SeqCst) < 2 {
                        // Crash: stop renewing; the permit must come back after its TTL.
                        p.abandon().await;
                    } else {
                        p.release().await.ctx("release")?;
                    }
                }
                Ok::<_, Fail>(hist)
            }));
        }
        let history: Vec<Holding> = join_all(tasks).await?.into_iter().flatten().collect();
        check_at_most(N, &history).map_err(|m| Fail(format!("expected at most {N} permit holders at once: {m}")))?;
        check_exclusion(&history).map_err(|v| Fail(format!("expected each permit to have one holder at a time with increasing tokens: {v}")))?;
        let most = crowd.load(Ordering::SeqCst);
        ensure!(most <= N, "expected at most {N} holders inside at once, saw {most}");
        // Every permit is free again (abandoned ones after their TTL).
        let sem = Semaphore::new(cx.open().await?).with_ttl(cx.long_lock_ttl()).with_wait(cx.expiry_bound(ttl) * 2);
        let mut all = Vec::new();
        for i in 0..N {
            all.push(sem.acquire("s", N).await.ctx(format!("acquiring permit {i} of {N} after the churn"))?);
        }
        for p in all {
            p.release().await.ctx("release")?;
        }
        Ok(())
    }

    /// The permit of a holder that stops renewing (crashed) is reclaimed
    /// within TTL + granularity by a waiter, with a larger token; the old
    /// permit's `lost()` fires and its fenced write fails.
    #[case("recipes::semaphore_expired_permit_reclaimed", destructive = true)]
    async fn semaphore_expiry(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let ttl = cx.short_lock_ttl();
        let bound = cx.expiry_bound(ttl);
        let old = Semaphore::new(a).with_ttl(ttl).acquire("s", 1).await.ctx("acquire")?;
        let t = Instant::now();
        old.abandon().await;
        let new = Semaphore::new(c.clone()).with_ttl(cx.long_lock_ttl()).with_wait(bound)
            .acquire("s", 1).await.ctx(format!("acquire within {bound:?} of the holder's crash"))?;
        ensure!(t.elapsed() >= ttl / 4, "expected the abandoned permit to stay held for a while, it was free after {:?}", t.elapsed());
        ensure!(new.fencing_token() > old.fencing_token(), "expected the new token > {}, got {}", old.fencing_token(), new.fencing_token());
        tokio::time::timeout(bound, old.lost()).await
            .map_err(|_| Fail(format!("expected the abandoned permit's lost() within {bound:?}")))?;
        let stale = fenced_write(c.as_ref(), old.fence(), "old", "fenced write").await?;
        ensure!(!stale, "expected the reclaimed permit's fenced write to fail");
        let fresh = fenced_write(c.as_ref(), new.fence(), "new", "fenced write").await?;
        ensure!(fresh, "expected the new holder's fenced write to commit");
        new.release().await.ctx("release")?;
        Ok(())
    }

    /// Waiters for a full semaphore get permits in arrival order, and a
    /// cancelled waiter leaves nothing behind (the next one still gets in
    /// at once).
    #[case("recipes::semaphore_fifo_and_cancel", gate = fifo)]
    async fn semaphore_fifo(cx: Cx) -> CaseResult {
        let hs = cx.open_n(5).await?;
        let sem = |i: usize| Semaphore::new(hs[i].clone()).with_ttl(cx.long_lock_ttl());
        let p0 = sem(0).acquire("s", 2).await.ctx("acquire")?;
        let p1 = sem(0).acquire("s", 2).await.ctx("acquire")?;
        ensure!(tokio::time::timeout(Duration::from_millis(200), sem(4).acquire("s", 2)).await.is_err(),
            "expected a waiter while both permits are held");
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 1..4 {
            let (s, order) = (sem(i), order.clone());
            let mut t = tokio::spawn(async move {
                let p = s.acquire("s", 2).await.ctx("acquire")?;
                order.lock().unwrap_or_else(|p| p.into_inner()).push(i);
                Ok::<_, Fail>(p)
            });
            ensure!(tokio::time::timeout(Duration::from_millis(300), &mut t).await.is_err(),
                "expected waiter {i} to wait while both permits are held");
            tasks.push(t);
        }
        // Free one permit at a time: each must go to the longest waiter.
        let mut held = vec![p1, p0];
        let mut got = Vec::new();
        for (i, t) in tasks.iter_mut().enumerate() {
            let freed = held.pop().ok_or_else(|| Fail("no permit left to free".into()))?;
            freed.release().await.ctx("release")?;
            let p = tokio::time::timeout(cx.wake_bound() * 2, &mut *t).await
                .map_err(|_| Fail(format!("expected waiter {} (the longest waiting) to get the freed permit", i + 1)))?
                .joined(&format!("waiter {}", i + 1))??;
            held.insert(0, p);
            got.push(i + 1);
            ensure_eq!(order.lock().unwrap_or_else(|p| p.into_inner()).clone(), got, "the waiters served so far");
        }
        for p in held {
            p.release().await.ctx("release")?;
        }
        Ok(())
    }

    /// Readers share: 3 readers on 3 handles hold read guards at once;
    /// a writer waits until all of them release.
    #[case("recipes::rwlock_readers_share_writer_waits")]
    async fn rw_share(cx: Cx) -> CaseResult {
        let hs = cx.open_n(4).await?;
        let rw = |i: usize| RwLock::new(hs[i].clone(), "rw").map(|r| r.with_ttl(cx.long_lock_ttl())).ctx("RwLock::new");
        let mut readers = Vec::new();
        for i in 0..3 {
            readers.push(tokio::time::timeout(Duration::from_secs(10), rw(i)?.read()).await
                .map_err(|_| Fail(format!("expected reader {i} to get in while the others read")))?.ctx("read")?);
        }
        let w = rw(3)?;
        let mut writer = tokio::spawn(async move { w.write().await });
        ensure!(tokio::time::timeout(Duration::from_millis(300), &mut writer).await.is_err(),
            "expected the writer to wait while 3 readers hold the lock");
        for r in &readers {
            r.release().await.ctx("release a read guard")?;
        }
        let g = tokio::time::timeout(cx.wake_bound() * 2, writer).await
            .map_err(|_| Fail("expected the writer to get in once the readers released".into()))?
            .joined("the writer")?.ctx("write")?;
        g.release().await.ctx("release")?;
        Ok(())
    }

    /// 4 reader and 2 writer tasks on 3 handles × 8 rounds: no reader's
    /// interval overlaps a writer's, writers exclude each other with
    /// increasing tokens (exclusion checker), and a non-atomic counter
    /// bumped by writers ends at 16.
    #[case("recipes::rwlock_no_reader_overlaps_writer")]
    async fn rw_exclusion(cx: Cx) -> CaseResult {
        let hs = cx.open_n(3).await?;
        let clock = Clock::new();
        let counter = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for task in 0..6usize {
            let rw = RwLock::new(hs[task % 3].clone(), "rw").ctx("RwLock::new")?.with_ttl(cx.long_lock_ttl());
            let counter = counter.clone();
            tasks.push(tokio::spawn(async move {
                let mut hist = Vec::new();
                for _ in 0..8 {
                    if task < 2 {
                        let g = rw.write().await.ctx("write")?;
                        let acquired = clock.now();
                        let v = counter.load(Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        counter.store(v + 1, Ordering::SeqCst);
                        let released = clock.now();
                        hist.push((true, Holding { lock: "w".into(), client: task, token: g.fencing_token(), acquired, released }));
                        g.release().await.ctx("release")?;
                    } else {
                        let g = rw.read().await.ctx("read")?;
                        let acquired = clock.now();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        let released = clock.now();
                        hist.push((false, Holding { lock: "r".into(), client: task, token: 0, acquired, released }));
                        g.release().await.ctx("release")?;
                    }
                }
                Ok::<_, Fail>(hist)
            }));
        }
        let all: Vec<(bool, Holding)> = join_all(tasks).await?.into_iter().flatten().collect();
        let writes: Vec<Holding> = all.iter().filter(|(w, _)| *w).map(|(_, h)| h.clone()).collect();
        check_exclusion(&writes).map_err(|v| Fail(format!("expected writers to exclude each other: {v}")))?;
        for (_, r) in all.iter().filter(|(w, _)| !*w) {
            for w in &writes {
                ensure!(r.released <= w.acquired || w.released <= r.acquired,
                    "expected no reader to overlap a writer: reader {} held [{}, {}], writer {} (token {}) held [{}, {}]",
                    r.client, r.acquired, r.released, w.client, w.token, w.acquired, w.released);
            }
        }
        ensure_eq!(counter.load(Ordering::SeqCst), 16, "the counter bumped by 2 writers × 8");
        Ok(())
    }

    /// Writer preference: while 3 readers keep arriving (each new read
    /// overlapping the previous), a writer still gets in within 10 s, and
    /// no reader got in after the writer claimed the lock until it released.
    #[case("recipes::rwlock_writer_not_starved")]
    async fn rw_starve(cx: Cx) -> CaseResult {
        let hs = cx.open_n(4).await?;
        let clock = Clock::new();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for h in hs.iter().take(3) {
            let rw = RwLock::new(h.clone(), "rw").ctx("RwLock::new")?.with_ttl(cx.long_lock_ttl());
            let stop = stop.clone();
            readers.push(tokio::spawn(async move {
                let mut hist = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let g = rw.read().await.ctx("read")?;
                    let acquired = clock.now();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    hist.push((acquired, clock.now()));
                    g.release().await.ctx("release")?;
                }
                Ok::<_, Fail>(hist)
            }));
        }
        let w = RwLock::new(hs[3].clone(), "rw").ctx("RwLock::new")?.with_ttl(cx.long_lock_ttl())
            .with_wait(Duration::from_secs(10));
        let t = Instant::now();
        let g = w.write().await.ctx("write while readers keep arriving (waited up to 10 s)")?;
        let (w_acq, took) = (clock.now(), t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let w_rel = clock.now();
        g.release().await.ctx("release")?;
        stop.store(true, Ordering::SeqCst);
        let hist: Vec<(u64, u64)> = join_all(readers).await?.into_iter().flatten().collect();
        for (a, r) in &hist {
            ensure!(*r <= w_acq || *a >= w_rel, "expected no read during the write [{w_acq}, {w_rel}], a reader held [{a}, {r}]");
        }
        ensure!(took < Duration::from_secs(10), "expected the writer in within 10 s, it took {took:?}");
        Ok(())
    }

    /// The write guard fences writes: a txn `when [guard.fence()]` commits
    /// while it is held and fails after release, when the next writer's
    /// commits; tokens increase from writer to writer.
    #[case("recipes::rwlock_fenced_writes")]
    async fn rw_fenced(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let ra = RwLock::new(a.clone(), "rw").ctx("new")?.with_ttl(cx.long_lock_ttl());
        let rc = RwLock::new(c.clone(), "rw").ctx("new")?.with_ttl(cx.long_lock_ttl());
        let g1 = ra.write().await.ctx("write")?;
        let fenced = |g: &latchkey_recipes::WriteGuard, v: &str| TxnRequest::new().when([g.fence()]).then([Op::put("data", v.to_string())]);
        ensure!(a.txn(fenced(&g1, "1")).await.ctx("fenced write")?.succeeded, "expected the writer's fenced write to commit");
        g1.release().await.ctx("release")?;
        let g2 = rc.write().await.ctx("write by the second handle")?;
        ensure!(g2.fencing_token() > g1.fencing_token(), "expected the second writer's token > {}, got {}", g1.fencing_token(), g2.fencing_token());
        ensure!(!a.txn(fenced(&g1, "stale")).await.ctx("stale fenced write")?.succeeded, "expected the released writer's fenced write to fail");
        ensure!(c.txn(fenced(&g2, "2")).await.ctx("fenced write")?.succeeded, "expected the current writer's fenced write to commit");
        expect_value(c.as_ref(), "data", "2", "the fenced key").await?;
        g2.release().await.ctx("release")?;
        Ok(())
    }

    /// A reader that stops renewing (crashed) does not block writers
    /// forever: a writer gets in within TTL + granularity (+ the re-check
    /// bound), and the reader's `lost()` fires.
    #[case("recipes::rwlock_dead_reader_reclaimed", destructive = true)]
    async fn rw_dead_reader(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let ttl = cx.short_lock_ttl();
        let r = RwLock::new(a, "rw").ctx("new")?.with_ttl(ttl).read().await.ctx("read")?;
        r.abandon().await;
        let bound = cx.expiry_bound(ttl) * 2 + cx.caps().ttl_granularity;
        let w = RwLock::new(c, "rw").ctx("new")?.with_ttl(ttl).with_wait(bound)
            .write().await.ctx(format!("write within {bound:?} of the reader's crash"))?;
        tokio::time::timeout(bound, r.lost()).await
            .map_err(|_| Fail("expected the dead reader's lost() to fire".into()))?;
        w.release().await.ctx("release")?;
        Ok(())
    }

    /// A mirror of `cfg/` starts with the listed state, ignores keys
    /// outside the prefix, and `wait_for(rev)` of one's own put, delete
    /// (followed by a put) and txn returns a state showing them.
    #[case("recipes::mirror_follows_own_writes")]
    async fn mirror_follows(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        put_value(a.as_ref(), "cfg/a", "1").await?;
        put_value(a.as_ref(), "cfgx", "outside").await?;
        let m = Mirror::start(c.clone(), "cfg/").await.ctx("Mirror::start")?;
        let s = m.snapshot();
        ensure_eq!(s.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect::<Vec<_>>(), vec![("cfg/a".to_string(), b("1"))], "the initial mirror");
        let wait = |r| { let m = m.clone(); async move {
            tokio::time::timeout(Duration::from_secs(10), m.wait_for(r)).await
                .map_err(|_| Fail(format!("expected the mirror to reach revision {r} within 10 s, it is at {}", m.revision())))?
                .ctx("wait_for") } };
        let r = put_value(a.as_ref(), "cfg/b", "2").await?;
        ensure_eq!(wait(r).await?.get("cfg/b").map(|kv| kv.value.clone()), Some(b("2")), "cfg/b in the mirror after its put");
        a.delete("cfg/a", DeleteOptions::default()).await.ctx("delete")?;
        let r = put_value(a.as_ref(), "cfg/c", "3").await?;
        let s = wait(r).await?;
        ensure!(s.get("cfg/a").is_none(), "expected the deleted cfg/a to be gone from the mirror, got {:?}", s.get("cfg/a"));
        let o = a.txn(TxnRequest::new().then([Op::put("cfg/d", "4"), Op::delete("cfg/b")])).await.ctx("txn")?;
        let s = wait(o.revision).await?;
        ensure_eq!(s.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(), vec!["cfg/c".to_string(), "cfg/d".to_string()], "the mirrored keys after the txn");
        ensure!(m.get("cfgx").is_none(), "expected a key outside the prefix not to be mirrored");
        Ok(())
    }

    /// After a random concurrent workload (seeded; puts, deletes, CAS and
    /// multi-key txns from 4 handles, on 12 keys), a mirror started before
    /// it equals the store's listing at the same revision: every key, value
    /// and revision.
    #[case("recipes::mirror_equals_store_after_random_workload")]
    async fn mirror_random(cx: Cx) -> CaseResult {
        let hs = cx.open_n(4).await?;
        let m = Mirror::start(cx.open().await?, "m/").await.ctx("Mirror::start")?;
        let seed: u64 = rand::random();
        let mut tasks = Vec::new();
        for (w, h) in hs.iter().cloned().enumerate() {
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(w as u64));
                for i in 0..40 {
                    let k = format!("m/{}", rng.random_range(0..12));
                    let v = b(&format!("{w}-{i}"));
                    match rng.random_range(0..10) {
                        0..=3 => { h.put(&k, v, PutOptions::default()).await.ctx("put")?; }
                        4..=5 => { h.delete(&k, DeleteOptions::default()).await.ctx("delete")?; }
                        6..=7 => {
                            let cur = h.get(&k).await.ctx("get")?;
                            let opts = match cur { Some(kv) => PutOptions::if_revision(kv.revision), None => PutOptions::if_absent() };
                            match h.put(&k, v, opts).await {
                                Ok(_) | Err(Error::Conflict { .. }) => {}
                                Err(e) => return Err(Fail(format!("CAS put: {e}"))),
                            }
                        }
                        _ => {
                            let k2 = format!("m/{}", rng.random_range(0..12));
                            let ops = if k2 == k { vec![Op::put(k.clone(), v)] } else { vec![Op::put(k.clone(), v), Op::delete(k2.clone())] };
                            h.txn(TxnRequest::new().when([Compare::revision(k2.clone(), CmpOp::Greater, 0)]).then(ops).otherwise([Op::put(k2, "t")])).await.ctx("txn")?;
                        }
                    }
                }
                Ok::<_, Fail>(())
            }));
        }
        join_all(tasks).await?;
        let h = cx.open().await?;
        let r = put_value(h.as_ref(), "m/final", "f").await?;
        let s = tokio::time::timeout(Duration::from_secs(20), m.wait_for(r)).await
            .map_err(|_| Fail(format!("expected the mirror to reach revision {r} (seed {seed})")))?.ctx("wait_for")?;
        let listed = h.list("m/", ListOptions::default()).await.ctx("list")?;
        let theirs: Vec<_> = listed.into_iter().map(|kv| (kv.key, kv.value, kv.revision)).collect();
        let mine: Vec<_> = s.iter().map(|kv| (kv.key.clone(), kv.value.clone(), kv.revision)).collect();
        ensure_eq!(mine, theirs, "the mirror at revision {} vs the store's listing (seed {seed})", s.revision());
        Ok(())
    }

    /// Every snapshot a mirror publishes is a state the store had: with a
    /// writer bumping `m/a` then `m/b` to the same value in one txn, no
    /// snapshot shows `b` ahead of `a`, and revisions never go back.
    #[case("recipes::mirror_snapshots_consistent")]
    async fn mirror_consistent(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        let m = Mirror::start(c, "m/").await.ctx("Mirror::start")?;
        let mut rx = m.subscribe();
        let writer = tokio::spawn(async move {
            let mut last = 0;
            for i in 1..=30u32 {
                // Two separate writes: a first, then b; b may never lead.
                put_value(a.as_ref(), "m/a", &i.to_string()).await?;
                last = put_value(a.as_ref(), "m/b", &i.to_string()).await?;
            }
            Ok::<_, Fail>(last)
        });
        let num = |s: &latchkey_recipes::Snapshot, k: &str| s.get(k).and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<u32>().ok()).unwrap_or(0);
        let mut prev_rev = 0;
        loop {
            let s = rx.borrow_and_update().clone();
            ensure!(num(&s, "m/b") <= num(&s, "m/a"), "expected no snapshot with b ({}) ahead of a ({})", num(&s, "m/b"), num(&s, "m/a"));
            ensure!(s.revision() >= prev_rev, "expected snapshot revisions never to go back: {} after {prev_rev}", s.revision());
            prev_rev = s.revision();
            if num(&s, "m/b") == 30 { break; }
            tokio::time::timeout(Duration::from_secs(10), rx.changed()).await
                .map_err(|_| Fail("expected the mirror to reach b = 30 within 10 s".into()))?
                .map_err(|_| Fail("the mirror stopped".into()))?;
        }
        writer.await.joined("writer")??;
        ensure_eq!(m.resyncs(), 0, "resyncs of a mirror whose watch never failed");
        Ok(())
    }

    /// A mirror whose watch fails (as after a dropped connection)
    /// resynchronises: writes and a delete made while its watch was broken
    /// all show in the new state, swapped in whole (`resyncs()` and the
    /// snapshot's generation count it), and it keeps following afterwards.
    #[case("recipes::mirror_resyncs_after_watch_failure")]
    async fn mirror_resync(cx: Cx) -> CaseResult {
        let (a, c) = (cx.open().await?, cx.open().await?);
        put_value(a.as_ref(), "m/keep", "1").await?;
        put_value(a.as_ref(), "m/gone", "1").await?;
        let kill = tokio::sync::watch::channel(0u64).0;
        let flaky: Arc<dyn Backend> = Arc::new(BreakableWatches { inner: c, kill: kill.clone() });
        let m = Mirror::start(flaky, "m/").await.ctx("Mirror::start")?;
        ensure_eq!(m.snapshot().len(), 2, "keys in the first mirror state");
        kill.send_modify(|n| *n += 1);
        a.delete("m/gone", DeleteOptions::default()).await.ctx("delete")?;
        let r = put_value(a.as_ref(), "m/new", "2").await?;
        let s = tokio::time::timeout(Duration::from_secs(20), m.wait_for(r)).await
            .map_err(|_| Fail(format!("expected the mirror to resynchronise to revision {r} within 20 s (last error: {:?})", m.last_error())))?
            .ctx("wait_for")?;
        let keys: Vec<String> = s.iter().map(|kv| kv.key.clone()).collect();
        ensure_eq!(keys, vec!["m/keep".to_string(), "m/new".to_string()], "the mirrored keys after the resync");
        let resyncs = poll_until(Duration::from_secs(10), "the resync to be counted", || {
            let m = m.clone();
            async move { Ok(Some(m.resyncs()).filter(|n| *n > 0)) }
        }).await?;
        ensure!(resyncs >= 1 && m.snapshot().generation() >= 1, "expected the resync to be counted, resyncs = {resyncs}, generation = {}", m.snapshot().generation());
        let r = put_value(a.as_ref(), "m/after", "3").await?;
        let s = tokio::time::timeout(Duration::from_secs(10), m.wait_for(r)).await
            .map_err(|_| Fail("expected the mirror to keep following after the resync".into()))?.ctx("wait_for")?;
        ensure_eq!(s.get("m/after").map(|kv| kv.value.clone()), Some(b("3")), "m/after in the mirror");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::check_at_most;
    use crate::checkers::Holding;

    fn h(client: usize, acquired: u64, released: u64) -> Holding {
        Holding {
            lock: "s".into(),
            client,
            token: client as u64,
            acquired,
            released,
        }
    }

    #[test]
    fn at_most_n_accepts_n_and_touching_ends() {
        let ok = [h(0, 0, 10), h(1, 5, 15), h(2, 10, 20), h(3, 15, 25)];
        assert!(check_at_most(2, &ok).is_ok());
        assert!(check_at_most(1, &ok).is_err());
    }

    #[test]
    fn at_most_n_rejects_n_plus_1_and_malformed() {
        let bad = [h(0, 0, 10), h(1, 1, 10), h(2, 2, 10)];
        let msg = check_at_most(2, &bad).unwrap_err();
        assert!(msg.contains("3 holders"), "{msg}");
        assert!(check_at_most(3, &bad).is_ok());
        assert!(check_at_most(5, &[h(0, 5, 1)]).is_err());
    }
}
