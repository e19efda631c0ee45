//! TTL cases: expiry within TTL + granularity, never early, TTL removal by
//! a plain put, TTLs via CAS and txn, and revisions after expiry.

use crate::case::{
    all_keys, b, ensure, ensure_eq, gates, poll_until, put_value, put_with_ttl, CaseResult, Cx,
    ErrCtx, Fail,
};
use latchkey_core::{Op, PutOptions, TxnRequest};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Waits until `key` is gone (polling, bounded by TTL + granularity +
/// slack from `since`), checking it is still there before `ttl / 2`.
async fn expect_expiry(
    cx: &Cx,
    h: &Arc<dyn latchkey_core::Backend>,
    key: &str,
    ttl: Duration,
    since: Instant,
) -> CaseResult {
    let bound = cx.expiry_bound(ttl);
    let early = ttl / 2;
    let left = bound.saturating_sub(since.elapsed());
    poll_until(left, &format!("{key:?} (TTL {ttl:?}) to expire"), || {
        let h = h.clone();
        async move {
            let gone = h.get(key).await.ctx(format!("get {key:?}"))?.is_none();
            let at = since.elapsed();
            ensure!(!gone || at >= early, "expected {key:?} with TTL {ttl:?} to exist for at least {early:?}, it was gone after {at:?}");
            Ok(gone.then_some(()))
        }
    })
    .await
}

/// Checks `key` exists all along the old TTL's expiry bound from `since`
/// (time passing is what is tested): the key must `live`, as the failure
/// says.
async fn expect_outlives(
    cx: &Cx,
    h: &Arc<dyn latchkey_core::Backend>,
    key: &str,
    old_ttl: Duration,
    since: Instant,
    live: &str,
) -> CaseResult {
    let bound = cx.expiry_bound(old_ttl);
    while since.elapsed() < bound {
        ensure!(
            h.get(key).await.ctx("get")?.is_some(),
            "expected {key} to {live}, it was gone after {:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

cases! {
    /// A key put with a TTL exists (with `lease_ttl` set) until at least
    /// half its TTL, and is gone — from get and from list — within TTL +
    /// granularity.
    #[case("ttl::key_expires", gate = gates::native_ttl)]
    async fn key_expires(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let ttl = cx.short_kv_ttl();
        let t = Instant::now();
        put_with_ttl(h.as_ref(), "k", "v", ttl).await?;
        put_value(h.as_ref(), "stay", "v").await?;
        let kv = h
            .get("k")
            .await
            .ctx("get k")?
            .ok_or_else(|| Fail("expected a TTL key to exist right after its put".into()))?;
        ensure!(
            kv.lease_ttl.is_some(),
            "expected lease_ttl to be set on a key put with a TTL, got None"
        );
        expect_expiry(&cx, &h, "k", ttl, t).await?;
        ensure_eq!(
            all_keys(h.as_ref()).await?,
            vec!["stay"],
            "keys listed after the TTL key expired"
        );
        Ok(())
    }

    /// A put without TTL over a TTL key removes the TTL: `lease_ttl` is None
    /// and the key outlives the old TTL + granularity.
    #[case("ttl::put_without_ttl_removes_ttl", gate = gates::native_ttl)]
    async fn put_clears_ttl(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let ttl = cx.short_kv_ttl();
        put_with_ttl(h.as_ref(), "k", "1", ttl).await?;
        put_value(h.as_ref(), "k", "2").await?;
        let t = Instant::now();
        let kv = h
            .get("k")
            .await
            .ctx("get")?
            .ok_or_else(|| Fail("expected k to exist".into()))?;
        ensure_eq!(kv.lease_ttl, None, "lease_ttl after a put without TTL");
        expect_outlives(&cx, &h, "k", ttl, t, "survive its removed TTL").await
    }

    /// A TTL key recreated after it expired gets a larger revision than
    /// before (expiry does not reset revisions), and `if_absent` succeeds.
    #[case("ttl::recreate_after_expiry_gets_new_revision", gate = gates::native_ttl)]
    async fn recreate(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let ttl = cx.short_kv_ttl();
        let t = Instant::now();
        let r1 = put_with_ttl(h.as_ref(), "k", "v", ttl).await?;
        expect_expiry(&cx, &h, "k", ttl, t).await?;
        let r2 = h
            .put("k", b("v"), PutOptions::if_absent())
            .await
            .ctx("if_absent put after expiry")?;
        ensure!(
            r2 > r1,
            "expected the recreated key's revision > {r1}, got {r2}"
        );
        Ok(())
    }

    /// A CAS put with a TTL sets it: the key expires within TTL + granularity.
    #[case("ttl::cas_put_with_ttl_expires", gate = gates::native_ttl)]
    async fn cas_ttl(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let ttl = cx.short_kv_ttl();
        let r = put_value(h.as_ref(), "k", "1").await?;
        let t = Instant::now();
        h.put("k", b("2"), PutOptions::if_revision(r).with_ttl(ttl))
            .await
            .ctx("CAS with TTL")?;
        expect_expiry(&cx, &h, "k", ttl, t).await
    }

    /// A txn put with a TTL sets it: the key expires within TTL +
    /// granularity, while the same txn's put without TTL stays.
    #[case("ttl::txn_put_with_ttl_expires", gate = gates::native_ttl)]
    async fn txn_ttl(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let ttl = cx.short_kv_ttl();
        let t = Instant::now();
        h.txn(TxnRequest::new().then([Op::put_with_ttl("k", "v", ttl), Op::put("stay", "v")]))
            .await
            .ctx("txn")?;
        expect_expiry(&cx, &h, "k", ttl, t).await?;
        ensure!(
            h.get("stay").await.ctx("get stay")?.is_some(),
            "expected the txn's put without TTL to stay"
        );
        Ok(())
    }

    /// Overwriting a TTL key with a much longer TTL extends its life past
    /// the first TTL + granularity.
    #[case("ttl::longer_ttl_extends", gate = gates::native_ttl)]
    async fn extend(cx: Cx) -> CaseResult {
        let h = cx.open().await?;
        let ttl = cx.short_kv_ttl();
        put_with_ttl(h.as_ref(), "k", "1", ttl).await?;
        let t = Instant::now();
        put_with_ttl(h.as_ref(), "k", "2", Duration::from_secs(60)).await?;
        expect_outlives(&cx, &h, "k", ttl, t, "live on with its new 60 s TTL").await
    }
}
