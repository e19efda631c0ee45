//! Input cases: every invalid key, value or argument yields its typed error
//! and changes nothing.

use crate::case::{all_keys, b, ensure, ensure_eq, expect_err, put_value, CaseResult, Cx, ErrCtx};
use latchkey_core::{
    Backend, Bytes, Compare, DeleteOptions, Error, ListOptions, LockOptions, Op, PutOptions,
    TxnRequest,
};
use std::sync::Arc;
use std::time::Duration;

const BAD_KEYS: &[&str] = &[
    "",
    "a\0b",
    "\0",
    "line\nbreak",
    "tab\there",
    "del\u{7f}",
    "esc\u{1b}[0m",
    "c1\u{85}",
];

fn too_long() -> String {
    "k".repeat(513)
}

/// Seeds one key so that "changes nothing" can be checked afterwards.
async fn seed(cx: &Cx) -> Result<(Arc<dyn Backend>, u64), crate::case::Fail> {
    let h = cx.open().await?;
    let r = put_value(h.as_ref(), "seed", "seed").await?;
    Ok((h, r))
}

/// The namespace holds only the seed key, unchanged.
async fn unchanged(h: &Arc<dyn Backend>, rev: u64) -> CaseResult {
    ensure_eq!(
        all_keys(h.as_ref()).await?,
        vec!["seed"],
        "the keys of the namespace after rejected calls"
    );
    let kv = h.get("seed").await.ctx("get seed")?;
    ensure_eq!(
        kv.map(|kv| (kv.value, kv.revision)),
        Some((b("seed"), rev)),
        "the seed key after rejected calls"
    );
    Ok(())
}

cases! {
    /// Empty keys, and keys with NUL or other control characters, are
    /// `InvalidKey` for get, put, delete and if_absent put; nothing changes.
    #[case("input::bad_keys_rejected")]
    async fn bad_keys(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        for k in BAD_KEYS {
            expect_err!(h.get(k).await, Error::InvalidKey { .. }, "get({k:?})");
            expect_err!(
                h.put(k, b("v"), PutOptions::default()).await,
                Error::InvalidKey { .. },
                "put({k:?})"
            );
            expect_err!(
                h.put(k, b("v"), PutOptions::if_absent()).await,
                Error::InvalidKey { .. },
                "if_absent put({k:?})"
            );
            expect_err!(
                h.delete(k, DeleteOptions::default()).await,
                Error::InvalidKey { .. },
                "delete({k:?})"
            );
        }
        unchanged(&h, r).await
    }

    /// A key of 513 bytes (one over the limit; also as multi-byte UTF-8) is
    /// `InvalidKey`; nothing changes.
    #[case("input::key_too_long_rejected")]
    async fn key_too_long(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        let multi = format!("{}k", "é".repeat(256)); // 513 bytes, 257 chars
        for k in [too_long(), multi] {
            expect_err!(
                h.put(&k, b("v"), PutOptions::default()).await,
                Error::InvalidKey { .. },
                "put of a {}-byte key",
                k.len()
            );
            expect_err!(
                h.get(&k).await,
                Error::InvalidKey { .. },
                "get of a {}-byte key",
                k.len()
            );
            expect_err!(
                h.delete(&k, DeleteOptions::default()).await,
                Error::InvalidKey { .. },
                "delete of a {}-byte key",
                k.len()
            );
        }
        unchanged(&h, r).await
    }

    /// A value one byte over 512 KiB is `InvalidValue`, also when it would
    /// overwrite an existing key; nothing changes.
    #[case("input::value_too_large_rejected")]
    async fn value_too_large(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        let v = Bytes::from(vec![7u8; 512 * 1024 + 1]);
        expect_err!(
            h.put("big", v.clone(), PutOptions::default()).await,
            Error::InvalidValue { .. },
            "put of 512 KiB + 1"
        );
        expect_err!(
            h.put("seed", v.clone(), PutOptions::if_revision(r)).await,
            Error::InvalidValue { .. },
            "CAS of 512 KiB + 1 over the seed key"
        );
        unchanged(&h, r).await
    }

    /// A TTL of zero or over a year is `InvalidArgument` for put and CAS;
    /// nothing changes.
    #[case("input::bad_ttl_rejected")]
    async fn bad_ttl(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        for ttl in [Duration::ZERO, Duration::from_secs(366 * 24 * 3600)] {
            expect_err!(
                h.put("t", b("v"), PutOptions::ttl(ttl)).await,
                Error::InvalidArgument(_),
                "put with TTL {ttl:?}"
            );
            expect_err!(
                h.put("seed", b("v"), PutOptions::if_revision(r).with_ttl(ttl))
                    .await,
                Error::InvalidArgument(_),
                "CAS with TTL {ttl:?}"
            );
        }
        unchanged(&h, r).await
    }

    /// A list or watch prefix with control characters, or over 512 bytes, is
    /// `InvalidKey`; the empty prefix is valid.
    #[case("input::bad_prefix_rejected")]
    async fn bad_prefix(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        for p in ["a\0", "\n", &too_long()] {
            expect_err!(
                h.list(p, ListOptions::default()).await,
                Error::InvalidKey { .. },
                "list({p:?})"
            );
            expect_err!(
                h.watch(p, None).await,
                Error::InvalidKey { .. },
                "watch({p:?})"
            );
        }
        ensure!(
            h.list("", ListOptions::default()).await.is_ok(),
            "expected list(\"\") to be valid"
        );
        unchanged(&h, r).await
    }

    /// Lock names follow the key rules: empty, control characters or 513
    /// bytes are `InvalidKey` for lock and try_lock, and nothing is held
    /// afterwards.
    #[case("input::bad_lock_name_rejected")]
    async fn bad_lock_names(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        let opts = LockOptions::ttl(Duration::from_secs(10)).with_wait(Duration::from_secs(1));
        let long = too_long();
        for n in BAD_KEYS.iter().copied().chain([long.as_str()]) {
            expect_err!(
                h.lock(n, opts.clone()).await,
                Error::InvalidKey { .. },
                "lock({n:?})"
            );
            expect_err!(
                h.try_lock(n, opts.clone()).await,
                Error::InvalidKey { .. },
                "try_lock({n:?})"
            );
        }
        unchanged(&h, r).await
    }

    /// A lock TTL of zero is `InvalidArgument`, and the lock stays free.
    #[case("input::zero_lock_ttl_rejected")]
    async fn zero_lock_ttl(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        let bad = LockOptions {
            ttl: Duration::ZERO,
            wait: Some(Duration::from_secs(1)),
        };
        expect_err!(
            h.lock("x", bad.clone()).await,
            Error::InvalidArgument(_),
            "lock with TTL 0"
        );
        expect_err!(
            h.try_lock("x", bad).await,
            Error::InvalidArgument(_),
            "try_lock with TTL 0"
        );
        let g = h.try_lock("x", cx.long_lock()).await.ctx("try_lock x")?;
        ensure!(
            g.is_some(),
            "expected lock x to be free after the rejected attempts"
        );
        if let Some(g) = g {
            g.release().await.ctx("release")?;
        }
        unchanged(&h, r).await
    }

    /// A txn with one invalid key (in a put, get, delete or compare) is
    /// `InvalidKey` and applies none of its valid ops.
    #[case("input::txn_bad_key_applies_nothing")]
    async fn txn_bad_key(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        let ok = || Op::put("written", "v");
        for t in [
            TxnRequest::new().then([ok(), Op::put("", "v")]),
            TxnRequest::new().then([ok(), Op::get("a\0")]),
            TxnRequest::new().then([ok(), Op::delete(too_long())]),
            TxnRequest::new().when([Compare::exists("\n")]).then([ok()]),
            TxnRequest::new()
                .when([Compare::absent("x")])
                .then([ok()])
                .otherwise([Op::put("", "v")]),
            TxnRequest::new()
                .then([ok(), Op::delete("seed")])
                .otherwise([Op::get("\0")]),
        ] {
            expect_err!(
                h.txn(t.clone()).await,
                Error::InvalidKey { .. },
                "txn {t:?}"
            );
        }
        unchanged(&h, r).await
    }

    /// A txn with a value over 512 KiB (in a put or a value compare) is
    /// `InvalidValue` and applies nothing.
    #[case("input::txn_bad_value_applies_nothing")]
    async fn txn_bad_value(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        let big = Bytes::from(vec![1u8; 512 * 1024 + 1]);
        let t = TxnRequest::new().then([Op::put("written", "v"), Op::put("big", big.clone())]);
        expect_err!(
            h.txn(t).await,
            Error::InvalidValue { .. },
            "txn with a 512 KiB + 1 put"
        );
        let t = TxnRequest::new()
            .when([Compare::value("seed", big)])
            .then([Op::put("written", "v")]);
        expect_err!(
            h.txn(t).await,
            Error::InvalidValue { .. },
            "txn comparing with a 512 KiB + 1 value"
        );
        unchanged(&h, r).await
    }

    /// A txn put with a zero TTL is `InvalidArgument` and applies nothing.
    #[case("input::txn_zero_ttl_applies_nothing")]
    async fn txn_zero_ttl(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        let t = TxnRequest::new().then([
            Op::put("written", "v"),
            Op::put_with_ttl("t", "v", Duration::ZERO),
        ]);
        expect_err!(
            h.txn(t).await,
            Error::InvalidArgument(_),
            "txn with a zero TTL"
        );
        unchanged(&h, r).await
    }

    /// A txn with more compares than `max_txn_ops` is `InvalidArgument` and
    /// applies nothing.
    #[case("input::txn_too_many_compares")]
    async fn txn_compares(cx: Cx) -> CaseResult {
        let (h, r) = seed(&cx).await?;
        let max = cx.caps().max_txn_ops;
        let t = TxnRequest::new()
            .when((0..=max).map(|i| Compare::absent(format!("c{i}"))))
            .then([Op::put("written", "v")]);
        expect_err!(
            h.txn(t).await,
            Error::InvalidArgument(_),
            "txn with {} compares (max_txn_ops {max})",
            max + 1
        );
        unchanged(&h, r).await
    }
}
