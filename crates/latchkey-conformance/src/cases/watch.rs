//! Watch cases: order, revisions, prefixes, resume, coalescing where the
//! backend declares it, namespaces, txn writes and expiry.

use crate::case::{
    b, ensure, ensure_eq, gates, put_value, put_with_ttl, CaseResult, Cx, ErrCtx, Fail,
};
use bytes::Bytes;
use futures::StreamExt;
use latchkey_core::{
    DeleteOptions, EventKind, Op, PutOptions, Revision, TxnRequest, WatchEvent, WatchStream,
};
use std::time::Duration;

/// How long a case waits for an event that must come.
const EVENT_WAIT: Duration = Duration::from_secs(10);

async fn next_event(s: &mut WatchStream, what: &str) -> Result<WatchEvent, Fail> {
    match tokio::time::timeout(EVENT_WAIT, s.next()).await {
        Err(_) => Err(Fail(format!(
            "expected {what} within {EVENT_WAIT:?}, no event came"
        ))),
        Ok(None) => Err(Fail(format!("expected {what}, but the watch stream ended"))),
        Ok(Some(Err(e))) => Err(Fail(format!(
            "expected {what}, the watch failed: {e} ({e:?})"
        ))),
        Ok(Some(Ok(ev))) => Ok(ev),
    }
}

/// A write the watch should report: kind, key, value, and revision if known.
#[derive(Clone, Debug, PartialEq)]
struct Expect {
    kind: EventKind,
    key: String,
    value: Bytes,
    rev: Option<Revision>,
}

fn put(key: &str, value: &str, rev: Revision) -> Expect {
    Expect {
        kind: EventKind::Put,
        key: key.into(),
        value: b(value),
        rev: Some(rev),
    }
}
fn del(key: &str) -> Expect {
    Expect {
        kind: EventKind::Delete,
        key: key.into(),
        value: Bytes::new(),
        rev: None,
    }
}

fn matches(ev: &WatchEvent, ex: &Expect) -> bool {
    ev.kind == ex.kind
        && ev.key == ex.key
        && ev.value == ex.value
        && ex.rev.is_none_or_eq(ev.revision)
}

trait RevExt {
    fn is_none_or_eq(&self, r: Revision) -> bool;
}
impl RevExt for Option<Revision> {
    fn is_none_or_eq(&self, r: Revision) -> bool {
        self.is_none_or(|x| x == r)
    }
}

/// Reads events until one matches the last expected write, then checks the
/// events seen: with `watch_every_revision`, exactly `expected` in order;
/// without (coalesced), an in-order subsequence of it ending with the last
/// write. Revisions must strictly increase either way.
async fn expect_events(cx: &Cx, s: &mut WatchStream, expected: &[Expect]) -> CaseResult {
    let last = expected.last().expect("at least one expected event");
    let mut seen: Vec<WatchEvent> = Vec::new();
    loop {
        let what = format!("an event for {:?} {:?}", last.kind, last.key);
        let ev = next_event(s, &what).await.map_err(|Fail(m)| {
            Fail(format!(
                "{m}; events seen: {seen:?}; writes made: {expected:?}"
            ))
        })?;
        let done = matches(&ev, last);
        seen.push(ev);
        if done || seen.len() > expected.len() * 4 + 10 {
            break;
        }
    }
    for w in seen.windows(2) {
        ensure!(
            w[1].revision > w[0].revision,
            "expected watch revisions to strictly increase, saw {} then {}: {seen:?}",
            w[0].revision,
            w[1].revision
        );
    }
    if cx.caps().watch_every_revision {
        ensure_eq!(
            seen.len(),
            expected.len(),
            "number of events (every revision is reported) — seen {seen:?}, expected {expected:?}"
        );
        for (i, (ev, ex)) in seen.iter().zip(expected).enumerate() {
            ensure!(
                matches(ev, ex),
                "expected event {i} to be {ex:?}, got {ev:?}"
            );
        }
    } else {
        let mut it = expected.iter();
        for ev in &seen {
            ensure!(it.any(|ex| matches(ev, ex)), "expected every (coalesced) event to match a write, in order; {ev:?} does not (expected a subsequence of {expected:?}, saw {seen:?})");
        }
    }
    Ok(())
}

cases! {
    /// A watch (on one handle) reports another handle's puts and deletes
    /// under its prefix, in order, with the revisions the puts returned and
    /// empty values for deletes (coalesced to an in-order subsequence ending
    /// with the last write where `!watch_every_revision`).
    #[case("watch::sees_puts_and_deletes_in_order")]
    async fn in_order(cx: Cx) -> CaseResult {
        let (w, h) = (cx.open().await?, cx.open().await?);
        let mut s = w.watch("w/", None).await.ctx("watch w/")?;
        let r1 = put_value(h.as_ref(), "w/a", "1").await?;
        let r2 = put_value(h.as_ref(), "w/b", "2").await?;
        h.delete("w/a", DeleteOptions::default())
            .await
            .ctx("delete")?;
        let r4 = put_value(h.as_ref(), "w/a", "3").await?;
        expect_events(
            &cx,
            &mut s,
            &[
                put("w/a", "1", r1),
                put("w/b", "2", r2),
                del("w/a"),
                put("w/a", "3", r4),
            ],
        )
        .await
    }

    /// A watch of the (non-`/`-aligned) prefix `app` reports `apple` and
    /// `app/1` and nothing of `ap`, `aq`, `b`, `xapp`.
    #[case("watch::prefix_ignores_other_prefixes")]
    async fn prefix_only(cx: Cx) -> CaseResult {
        let (w, h) = (cx.open().await?, cx.open().await?);
        let mut s = w.watch("app", None).await.ctx("watch app")?;
        let mut expected = Vec::new();
        for k in ["ap", "b", "apple", "aq", "xapp", "app/1"] {
            let r = put_value(h.as_ref(), k, k).await?;
            if k.starts_with("app") {
                expected.push(put(k, k, r));
            }
        }
        expect_events(&cx, &mut s, &expected).await
    }

    /// A watch of `""` reports writes to every key of the namespace,
    /// including keys with leading `/`, spaces and unicode, exactly as written.
    #[case("watch::empty_prefix_sees_all_keys")]
    async fn all_keys_watch(cx: Cx) -> CaseResult {
        let (w, h) = (cx.open().await?, cx.open().await?);
        let mut s = w.watch("", None).await.ctx("watch \"\"")?;
        let mut expected = Vec::new();
        for k in ["/lead", "with space", "ünï/✓", "z"] {
            let r = put_value(h.as_ref(), k, "v").await?;
            expected.push(put(k, "v", r));
        }
        expect_events(&cx, &mut s, &expected).await
    }

    /// A watch from an earlier revision replays what it missed: starting at
    /// the 3rd of 5 writes it reports writes 3, 4, 5 exactly once, in order,
    /// then live writes.
    #[case("watch::resume_replays_missed", gate = gates::watch_resume)]
    async fn resume(cx: Cx) -> CaseResult {
        let (w, h) = (cx.open().await?, cx.open().await?);
        let mut revs = Vec::new();
        for i in 0..5 {
            revs.push(
                put_value(h.as_ref(), &format!("rs/{i}"), &i.to_string()).await?,
            );
        }
        let mut s = w
            .watch("rs/", Some(revs[2]))
            .await
            .ctx(format!("watch rs/ from revision {}", revs[2]))?;
        let r5 = put_value(h.as_ref(), "rs/5", "5").await?;
        let mut expected: Vec<Expect> = (2..5)
            .map(|i| put(&format!("rs/{i}"), &i.to_string(), revs[i]))
            .collect();
        expected.push(put("rs/5", "5", r5));
        // Replay is every revision by definition of resume; compare exactly.
        let mut seen = Vec::new();
        for ex in &expected {
            let ev = next_event(&mut s, &format!("the replayed or live event {ex:?}")).await?;
            ensure!(
                matches(&ev, ex),
                "expected {ex:?}, got {ev:?} (events so far {seen:?})"
            );
            seen.push(ev);
        }
        Ok(())
    }

    /// A watch from the revision after the latest write reports only later
    /// writes.
    #[case("watch::resume_from_next_revision_sees_only_new", gate = gates::watch_resume)]
    async fn resume_next(cx: Cx) -> CaseResult {
        let (w, h) = (cx.open().await?, cx.open().await?);
        let r = put_value(h.as_ref(), "rn/old", "old").await?;
        let mut s = w
            .watch("rn/", Some(r + 1))
            .await
            .ctx("watch from the next revision")?;
        let r2 = put_value(h.as_ref(), "rn/new", "new").await?;
        let ev = next_event(&mut s, "the first event after the resume point").await?;
        ensure!(
            matches(&ev, &put("rn/new", "new", r2)),
            "expected the first event to be the new write (revision {r2}), got {ev:?}"
        );
        Ok(())
    }

    /// 100 rapid puts to one key: the watch's revisions strictly increase,
    /// it ends on the final value, and with `watch_every_revision` it reports
    /// all 100 with their revisions.
    #[case("watch::rapid_puts_end_on_final_value")]
    async fn churn(cx: Cx) -> CaseResult {
        let (w, h) = (cx.open().await?, cx.open().await?);
        let mut s = w.watch("c", None).await.ctx("watch c")?;
        let mut expected = Vec::new();
        for i in 0..100 {
            let r = put_value(h.as_ref(), "c", &i.to_string()).await?;
            expected.push(put("c", &i.to_string(), r));
        }
        expect_events(&cx, &mut s, &expected).await
    }

    /// Two watchers of one prefix on different handles both report the
    /// same writes (identical sequences where every revision is reported).
    #[case("watch::two_watchers_agree")]
    async fn two_watchers(cx: Cx) -> CaseResult {
        let (w1, w2, h) = (cx.open().await?, cx.open().await?, cx.open().await?);
        let mut s1 = w1.watch("tw/", None).await.ctx("watch 1")?;
        let mut s2 = w2.watch("tw/", None).await.ctx("watch 2")?;
        let mut expected = Vec::new();
        for i in 0..10 {
            let k = format!("tw/{}", i % 3);
            let r = put_value(h.as_ref(), &k, &i.to_string()).await?;
            expected.push(put(&k, &i.to_string(), r));
        }
        expect_events(&cx, &mut s1, &expected).await?;
        expect_events(&cx, &mut s2, &expected).await
    }

    /// A watch never reports writes of another namespace: after a write to
    /// the same key in another namespace, the first event is this
    /// namespace's marker write.
    #[case("watch::namespace_isolation")]
    async fn ns(cx: Cx) -> CaseResult {
        let w = cx.open().await?;
        let o = cx.open_other("other").await?;
        let mut s = w.watch("", None).await.ctx("watch")?;
        o.put("k", b("other-namespace"), PutOptions::default())
            .await
            .ctx("put in other namespace")?;
        let r = put_value(w.as_ref(), "marker", "m").await?;
        let ev = next_event(&mut s, "the marker event").await?;
        ensure!(
            matches(&ev, &put("marker", "m", r)),
            "expected the first event to be this namespace's marker, got {ev:?}"
        );
        Ok(())
    }

    /// Writes made by a txn are reported: each put and delete of the branch
    /// that ran appears (in some order within the txn), with the final values.
    #[case("watch::txn_writes_reported")]
    async fn txn_writes(cx: Cx) -> CaseResult {
        let (w, h) = (cx.open().await?, cx.open().await?);
        put_value(h.as_ref(), "t/c", "old").await?;
        let mut s = w.watch("t/", None).await.ctx("watch")?;
        h.txn(TxnRequest::new().then([Op::put("t/a", "A"), Op::put("t/b", "B"), Op::delete("t/c")]))
            .await
            .ctx("txn")?;
        let marker = put_value(h.as_ref(), "t/z", "marker").await?;
        let mut seen = Vec::new();
        loop {
            let ev = next_event(&mut s, "events of the txn and the marker").await?;
            let done = matches(&ev, &put("t/z", "marker", marker));
            seen.push(ev);
            if done || seen.len() > 10 {
                break;
            }
        }
        let has = |kind: EventKind, key: &str, v: &str| {
            seen.iter()
                .any(|e| e.kind == kind && e.key == key && e.value == b(v))
        };
        if cx.caps().watch_every_revision {
            for (k, key, v) in [
                (EventKind::Put, "t/a", "A"),
                (EventKind::Put, "t/b", "B"),
                (EventKind::Delete, "t/c", ""),
            ] {
                ensure!(
                    has(k, key, v),
                    "expected a {k:?} event for {key} from the txn, saw {seen:?}"
                );
            }
            ensure_eq!(
                seen.len(),
                4,
                "number of events (3 txn writes + marker): {seen:?}"
            );
        } else {
            ensure!(
                seen.len() >= 2,
                "expected the txn's writes to be reported before the marker, saw only {seen:?}"
            );
        }
        Ok(())
    }

    /// The expiry of a TTL key is reported as a delete event within
    /// TTL + granularity.
    #[case("watch::expiry_reported", gate = gates::watch_expiry)]
    async fn expiry(cx: Cx) -> CaseResult {
        let (w, h) = (cx.open().await?, cx.open().await?);
        let ttl = cx.short_kv_ttl();
        let mut s = w.watch("e/", None).await.ctx("watch")?;
        let r = put_with_ttl(h.as_ref(), "e/k", "v", ttl).await?;
        let ev = next_event(&mut s, "the put event").await?;
        ensure!(
            matches(&ev, &put("e/k", "v", r)),
            "expected the put event, got {ev:?}"
        );
        let bound = cx.expiry_bound(ttl);
        let ev = tokio::time::timeout(bound, s.next()).await.map_err(|_| {
            Fail(format!(
                "expected a delete event for the expired key within {bound:?}"
            ))
        })?;
        match ev {
            Some(Ok(ev)) => ensure!(
                ev.kind == EventKind::Delete && ev.key == "e/k" && ev.revision > r,
                "expected a delete event for e/k after revision {r}, got {ev:?}"
            ),
            other => {
                return Err(Fail(format!(
                    "expected a delete event for the expired key, got {other:?}"
                )))
            }
        }
        Ok(())
    }
}
