//! Blocking queries (`index` + `wait`): wake on change, time out on none.

use crate::common::sim;
use std::time::{Duration, Instant};

/// Consul adds up to wait/16 of jitter; allow scheduling slack on top.
fn upper(wait: Duration) -> Duration {
    wait + wait / 16 + Duration::from_millis(500)
}

#[tokio::test]
async fn blocking_get_wakes_on_change() {
    let s = std::sync::Arc::new(sim());
    s.put_bool("/v1/kv/w", "1").await;
    let idx = s.get("/v1/kv/w").await.index();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let r = s2.get(&format!("/v1/kv/w?index={idx}&wait=30s")).await;
        (t.elapsed(), r)
    });
    // The waiter is parked until the write; the write's index passes idx.
    s.put_bool("/v1/kv/w", "2").await;
    let (took, r) = waiter.await.unwrap();
    assert!(took < Duration::from_secs(10), "woke after {took:?}");
    assert!(r.index() > idx);
    // It may also have been answered before the write was seen (level
    // triggered); then the value is the old one and the index the same.
    if r.index() > idx {
        assert_eq!(r.entry()["Value"], crate::common::b64("2"));
    }
}

#[tokio::test]
async fn blocking_get_returns_after_wait_without_change() {
    let s = sim();
    s.put_bool("/v1/kv/w", "1").await;
    let idx = s.get("/v1/kv/w").await.index();
    let wait = Duration::from_millis(1500);
    let t = Instant::now();
    let r = s.get(&format!("/v1/kv/w?index={idx}&wait=1500ms")).await;
    let took = t.elapsed();
    assert!(took >= wait, "returned early: {took:?}");
    assert!(took <= upper(wait), "returned late: {took:?}");
    assert_eq!(r.status, 200);
    assert_eq!(r.index(), idx, "no change: same index");
}

#[tokio::test]
async fn requests_are_counted_once_per_blocking_query() {
    let s = sim();
    let before = s.sim.requests();
    s.put_bool("/v1/kv/w", "1").await;
    let idx = s.get("/v1/kv/w").await.index();
    s.get(&format!("/v1/kv/w?index={idx}&wait=300ms")).await;
    assert_eq!(s.sim.requests() - before, 3);
}

#[tokio::test]
async fn blocking_get_on_a_key_ignores_other_keys_while_present() {
    let s = sim();
    s.put_bool("/v1/kv/mine", "1").await;
    let idx = s.get("/v1/kv/mine").await.index();
    let s = std::sync::Arc::new(s);
    let s2 = s.clone();
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let r = s2.get(&format!("/v1/kv/mine?index={idx}&wait=1s")).await;
        (t.elapsed(), r.index())
    });
    for i in 0..5 {
        s.put_bool("/v1/kv/other", format!("{i}")).await;
    }
    let (took, index) = waiter.await.unwrap();
    assert!(took >= Duration::from_secs(1), "woke early: {took:?}");
    assert_eq!(index, idx);
}

#[tokio::test]
async fn blocking_get_on_absent_key_wakes_when_created() {
    let s = std::sync::Arc::new(sim());
    let r = s.get("/v1/kv/later").await;
    assert_eq!(r.status, 404);
    let idx = r.index();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move {
        let mut idx = idx;
        // Level triggered: an absent key reports the table index, so
        // loop like a client until the key shows up.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = s2.get(&format!("/v1/kv/later?index={idx}&wait=20s")).await;
            if r.status == 200 {
                return r;
            }
            assert!(Instant::now() < deadline, "never created");
            idx = r.index();
        }
    });
    s.put_bool("/v1/kv/later", "now").await;
    let r = waiter.await.unwrap();
    assert_eq!(r.entry()["Value"], crate::common::b64("now"));
    assert!(r.index() > idx);
}

#[tokio::test]
async fn blocking_get_wakes_on_delete() {
    let s = std::sync::Arc::new(sim());
    s.put_bool("/v1/kv/gone", "1").await;
    let idx = s.get("/v1/kv/gone").await.index();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let r = s2.get(&format!("/v1/kv/gone?index={idx}&wait=30s")).await;
        (t.elapsed(), r)
    });
    s.delete("/v1/kv/gone").await;
    let (took, r) = waiter.await.unwrap();
    assert!(took < Duration::from_secs(10));
    assert_eq!(r.status, 404);
    assert!(r.index() > idx);
}

#[tokio::test]
async fn blocking_recurse_wakes_on_change_under_the_prefix_only() {
    let s = std::sync::Arc::new(sim());
    s.put_bool("/v1/kv/dir/a", "1").await;
    let idx = s.get("/v1/kv/dir/?recurse").await.index();
    // A write elsewhere does not wake it.
    let s2 = s.clone();
    let quiet = tokio::spawn(async move {
        let t = Instant::now();
        let r = s2
            .get(&format!("/v1/kv/dir/?recurse&index={idx}&wait=1s"))
            .await;
        (t.elapsed(), r.index())
    });
    s.put_bool("/v1/kv/elsewhere", "x").await;
    let (took, index) = quiet.await.unwrap();
    assert!(took >= Duration::from_secs(1));
    assert_eq!(index, idx);
    // A write under it does.
    let s3 = s.clone();
    let woken = tokio::spawn(async move {
        let t = Instant::now();
        let r = s3
            .get(&format!("/v1/kv/dir/?recurse&index={idx}&wait=30s"))
            .await;
        (t.elapsed(), r)
    });
    s.put_bool("/v1/kv/dir/b", "2").await;
    let (took, r) = woken.await.unwrap();
    assert!(took < Duration::from_secs(10));
    assert!(r.index() > idx);
    assert_eq!(r.json().as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn blocking_keys_listing_wakes_on_change() {
    let s = std::sync::Arc::new(sim());
    s.put_bool("/v1/kv/ks/a", "1").await;
    let idx = s.get("/v1/kv/ks/?keys").await.index();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move {
        s2.get(&format!("/v1/kv/ks/?keys&index={idx}&wait=30s"))
            .await
    });
    s.put_bool("/v1/kv/ks/b", "2").await;
    let r = waiter.await.unwrap();
    assert!(r.index() > idx);
    assert_eq!(r.json(), serde_json::json!(["ks/a", "ks/b"]));
}

#[tokio::test]
async fn index_zero_or_past_never_blocks() {
    let s = sim();
    s.put_bool("/v1/kv/k", "v").await;
    let idx = s.get("/v1/kv/k").await.index();
    let t = Instant::now();
    s.get("/v1/kv/k?index=0&wait=10s").await;
    s.get(&format!("/v1/kv/k?index={}&wait=10s", idx - 1)).await;
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn blocking_session_list_wakes_on_create() {
    let s = std::sync::Arc::new(sim());
    let idx = s.get("/v1/session/list").await.index();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move {
        s2.get(&format!("/v1/session/list?index={idx}&wait=30s"))
            .await
    });
    let id = s.session(serde_json::json!({})).await;
    let r = waiter.await.unwrap();
    assert!(r.index() > idx);
    assert_eq!(r.json()[0]["ID"], id.as_str());
}

#[tokio::test]
async fn reaped_tombstones_make_a_listing_index_go_backwards() {
    let s = sim();
    s.put_bool("/v1/kv/tb/1", "a").await;
    let i1 = s.get("/v1/kv/tb/?recurse").await.index();
    s.put_bool("/v1/kv/tb/2", "b").await;
    s.delete("/v1/kv/tb/2").await;
    let i3 = s.get("/v1/kv/tb/?recurse").await.index();
    assert!(i3 > i1, "the tombstone holds the index up");
    s.sim.reap_tombstones();
    let r = s.get("/v1/kv/tb/?recurse").await;
    assert_eq!(r.index(), i1, "index went backwards after the reap");
    // A blocking query from the old index waits out its time, then answers
    // with the lower index (clients must then reset to 0).
    let t = Instant::now();
    let r = s
        .get(&format!("/v1/kv/tb/?recurse&index={i3}&wait=500ms"))
        .await;
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert_eq!(r.index(), i1);
    let r = s.get("/v1/kv/tb/?recurse&index=0").await;
    assert_eq!(r.index(), i1);
}

#[tokio::test]
async fn snapshot_restore_brings_old_data_and_indexes_back() {
    let s = sim();
    let sess = s
        .session(serde_json::json!({"TTL": "60s", "Checks": []}))
        .await;
    s.put_bool(&format!("/v1/kv/sr/lock?acquire={sess}"), "")
        .await;
    s.put_bool("/v1/kv/sr/k", "old").await;
    let old = s.get("/v1/kv/sr/k").await.entry();
    let snap = s.sim.snapshot();
    s.put_bool("/v1/kv/sr/k", "new").await;
    s.put_bool("/v1/kv/sr/extra", "x").await;
    let before_restore = s.sim.raft_index();
    s.sim.restore(&snap);
    let e = s.get("/v1/kv/sr/k").await.entry();
    assert_eq!(e, old, "the old entry, with its old ModifyIndex");
    assert_eq!(s.get("/v1/kv/sr/extra").await.status, 404);
    assert_eq!(
        s.get("/v1/kv/sr/lock").await.entry()["Session"],
        sess.as_str()
    );
    assert_eq!(
        s.put(&format!("/v1/session/renew/{sess}"), "").await.status,
        200
    );
    // New writes still get new, higher indexes.
    s.put_bool("/v1/kv/sr/k", "after").await;
    let e = s.get("/v1/kv/sr/k").await.entry();
    assert!(e["ModifyIndex"].as_u64().unwrap() > before_restore);
}
