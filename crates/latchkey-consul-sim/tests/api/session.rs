//! `/v1/session`: create/renew/destroy/info/list, TTL expiry, locks held by
//! sessions, invalidation behaviours and lock-delay.

use crate::common::{b64, sim, Sim};
use serde_json::json;
use std::time::{Duration, Instant};

fn no_checks(extra: serde_json::Value) -> serde_json::Value {
    let mut v = json!({ "Checks": [], "LockDelay": "0s" });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    v
}

/// Waits (blocking queries, no polling) until `key`'s Session differs from
/// `holder` or the key is gone; returns when that was seen.
async fn wait_released(s: &Sim, key: &str, holder: &str, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    let mut idx = 0;
    loop {
        let r = s.get(&format!("/v1/kv/{key}?index={idx}&wait=30s")).await;
        if r.status == 404 || r.entry().get("Session").and_then(|v| v.as_str()) != Some(holder) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{key} still held after {limit:?}"
        );
        idx = r.index();
    }
}

#[tokio::test]
async fn create_returns_an_id_and_info_shows_the_session() {
    let s = sim();
    let id = s
        .session(json!({"Name": "n", "TTL": "15s", "LockDelay": "2s", "Behavior": "delete", "Checks": []}))
        .await;
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let r = s.get(&format!("/v1/session/info/{id}")).await;
    assert_eq!(r.status, 200);
    let v = &r.json()[0];
    assert_eq!(v["ID"], id.as_str());
    assert_eq!(v["Name"], "n");
    assert_eq!(v["TTL"], "15s");
    assert_eq!(v["LockDelay"], 2_000_000_000u64);
    assert_eq!(v["Behavior"], "delete");
    assert_eq!(v["NodeChecks"], json!([]));
    assert_eq!(v["CreateIndex"], v["ModifyIndex"]);
    assert_eq!(r.index(), v["CreateIndex"].as_u64().unwrap());
}

#[tokio::test]
async fn create_defaults_follow_consul() {
    let s = sim();
    // No body at all.
    let r = s.put("/v1/session/create", "").await;
    assert_eq!(r.status, 200);
    let id = r.json()["ID"].as_str().unwrap().to_string();
    let v = &s.get(&format!("/v1/session/info/{id}")).await.json()[0];
    assert_eq!(v["LockDelay"], 15_000_000_000u64);
    assert_eq!(v["Behavior"], "release");
    assert_eq!(v["TTL"], "");
    assert_eq!(v["NodeChecks"], json!(["serfHealth"]));
    // Case-insensitive field names, numeric lock delays under 1000 are
    // seconds; a lock delay over 60 s is kept as given (the cap applies when
    // the session is invalidated).
    let id = s.session(json!({"lockdelay": 5, "ttl": "20s"})).await;
    let v = &s.get(&format!("/v1/session/info/{id}")).await.json()[0];
    assert_eq!(v["LockDelay"], 5_000_000_000u64);
    assert_eq!(v["TTL"], "20s");
    let id = s.session(json!({"LockDelay": "5m"})).await;
    let v = &s.get(&format!("/v1/session/info/{id}")).await.json()[0];
    assert_eq!(v["LockDelay"], 300_000_000_000u64);
}

#[tokio::test]
async fn ttl_must_be_between_10s_and_24h() {
    let s = sim();
    for ok in ["10s", "86400s", "24h", "0s"] {
        let r = s
            .put("/v1/session/create", json!({ "TTL": ok }).to_string())
            .await;
        assert_eq!(r.status, 200, "{ok}: {}", r.text());
    }
    let r = s
        .put("/v1/session/create", json!({"TTL": "9s"}).to_string())
        .await;
    assert_eq!(r.status, 500, "Consul raises this in its RPC layer");
    assert_eq!(
        r.text(),
        "Invalid Session TTL '9000000000', must be between [10s=24h0m0s]"
    );
    let r = s
        .put("/v1/session/create", json!({"TTL": "86401s"}).to_string())
        .await;
    assert_eq!(r.status, 500);
    let r = s
        .put("/v1/session/create", json!({"TTL": "soon"}).to_string())
        .await;
    assert_eq!(r.status, 500);
    assert!(r
        .text()
        .starts_with("Session TTL 'soon' invalid: time: invalid duration"));
}

#[tokio::test]
async fn invalid_session_requests() {
    let s = sim();
    let r = s
        .put(
            "/v1/session/create",
            json!({"Behavior": "explode"}).to_string(),
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (500, "Invalid Behavior setting 'explode'")
    );
    let r = s.put("/v1/session/create", "{not json").await;
    assert_eq!(r.status, 400);
    assert!(r.text().starts_with("Request decode failed: "));
    let r = s
        .put(
            "/v1/session/create",
            json!({"LockDelay": "later"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = s
        .put(
            "/v1/session/create",
            json!({"Checks": ["nope"]}).to_string(),
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (500, "Missing check 'nope' registration")
    );
    let r = s
        .put("/v1/session/create", json!({"Node": "other"}).to_string())
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(s.put("/v1/session/destroy/", "").await.status, 400);
    assert_eq!(s.put("/v1/session/renew/", "").await.status, 400);
    assert_eq!(s.get("/v1/session/info/").await.status, 400);
    assert_eq!(s.get("/v1/session/list").await.json(), json!([]));
}

#[tokio::test]
async fn renew_returns_the_session_with_its_ttl_or_404() {
    let s = sim();
    let id = s.session(no_checks(json!({"TTL": "30s"}))).await;
    let r = s.put(&format!("/v1/session/renew/{id}"), "").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["ID"], id.as_str());
    assert_eq!(v[0]["TTL"], "30s");
    let r = s
        .put("/v1/session/renew/00000000-0000-0000-0000-000000000000", "")
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.text(),
        "Session id '00000000-0000-0000-0000-000000000000' not found"
    );
}

#[tokio::test]
async fn destroy_list_info_and_node() {
    let s = sim();
    let a = s.session(json!({"Name": "a"})).await;
    let b = s.session(json!({"Name": "b"})).await;
    let list = s.get("/v1/session/list").await;
    assert_eq!(list.json().as_array().unwrap().len(), 2);
    let node = s.get("/v1/session/node/latchkey-consul-sim").await.json();
    assert_eq!(node.as_array().unwrap().len(), 2);
    let r = s.put(&format!("/v1/session/destroy/{a}"), "").await;
    assert_eq!((r.status, r.json()), (200, json!(true)));
    assert_eq!(
        s.get(&format!("/v1/session/info/{a}")).await.json(),
        json!([])
    );
    let list = s.get("/v1/session/list").await;
    assert_eq!(list.json()[0]["ID"], b.as_str());
    assert!(list.index() > 1);
    // Destroying again is harmless.
    assert_eq!(
        s.put(&format!("/v1/session/destroy/{a}"), "").await.status,
        200
    );
}

#[tokio::test]
async fn acquire_sets_session_and_lock_index() {
    let s = sim();
    let a = s.session(no_checks(json!({}))).await;
    let b = s.session(no_checks(json!({}))).await;
    assert!(s.put_bool(&format!("/v1/kv/l?acquire={a}"), "va").await);
    let e = s.get("/v1/kv/l").await.entry();
    assert_eq!(e["Session"], a.as_str());
    assert_eq!(e["LockIndex"], 1);
    assert_eq!(e["Value"], b64("va"));
    // Another session cannot take it.
    assert!(!s.put_bool(&format!("/v1/kv/l?acquire={b}"), "vb").await);
    // The holder re-acquires: value updated, LockIndex unchanged.
    assert!(s.put_bool(&format!("/v1/kv/l?acquire={a}"), "va2").await);
    let e = s.get("/v1/kv/l").await.entry();
    assert_eq!(
        (e["LockIndex"].as_u64(), e["Value"].clone()),
        (Some(1), json!(b64("va2")))
    );
    // Release by a non-holder fails; by the holder clears Session.
    assert!(!s.put_bool(&format!("/v1/kv/l?release={b}"), "").await);
    assert!(s.put_bool(&format!("/v1/kv/l?release={a}"), "").await);
    let e = s.get("/v1/kv/l").await.entry();
    assert!(e.get("Session").is_none());
    assert_eq!(e["LockIndex"], 1);
    // A new holder increments LockIndex; release never starts lock-delay.
    assert!(s.put_bool(&format!("/v1/kv/l?acquire={b}"), "vb").await);
    let e = s.get("/v1/kv/l").await.entry();
    assert_eq!(
        (e["LockIndex"].as_u64(), e["Session"].clone()),
        (Some(2), json!(b))
    );
    // Release of an absent key is false.
    assert!(!s.put_bool(&format!("/v1/kv/absent?release={b}"), "").await);
}

#[tokio::test]
async fn lock_index_restarts_after_delete() {
    let s = sim();
    let a = s.session(no_checks(json!({}))).await;
    s.put_bool(&format!("/v1/kv/l?acquire={a}"), "").await;
    s.put_bool(&format!("/v1/kv/l?release={a}"), "").await;
    s.put_bool(&format!("/v1/kv/l?acquire={a}"), "").await;
    assert_eq!(s.get("/v1/kv/l").await.entry()["LockIndex"], 2);
    s.delete("/v1/kv/l").await;
    s.put_bool(&format!("/v1/kv/l?acquire={a}"), "").await;
    assert_eq!(s.get("/v1/kv/l").await.entry()["LockIndex"], 1);
}

#[tokio::test]
async fn acquire_needs_an_existing_session() {
    let s = sim();
    let r = s
        .put("/v1/kv/l?acquire=00000000-0000-0000-0000-000000000000", "")
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.text(),
        "invalid session \"00000000-0000-0000-0000-000000000000\""
    );
    let r = s.put("/v1/kv/l?acquire=", "").await;
    assert_eq!((r.status, r.text().as_str()), (500, "missing session"));
    assert_eq!(s.get("/v1/kv/l").await.status, 404);
}

#[tokio::test]
async fn plain_put_keeps_the_holder() {
    let s = sim();
    let a = s.session(no_checks(json!({}))).await;
    s.put_bool(&format!("/v1/kv/l?acquire={a}"), "v").await;
    s.put_bool("/v1/kv/l", "overwritten").await;
    let e = s.get("/v1/kv/l").await.entry();
    assert_eq!(e["Session"], a.as_str());
    assert_eq!(e["Value"], b64("overwritten"));
    // kvsSetTxn keeps Session and CreateIndex but takes LockIndex from the
    // request (0): a Consul quirk the simulator keeps.
    assert_eq!(e["LockIndex"], 0);
}

#[tokio::test]
async fn destroy_releases_held_keys() {
    let s = sim();
    let a = s.session(no_checks(json!({}))).await;
    s.put_bool(&format!("/v1/kv/l?acquire={a}"), "v").await;
    let before = s.get("/v1/kv/l").await.entry();
    s.put(&format!("/v1/session/destroy/{a}"), "").await;
    let e = s.get("/v1/kv/l").await.entry();
    assert!(e.get("Session").is_none());
    assert_eq!(e["Value"], b64("v"));
    assert_eq!(e["LockIndex"], before["LockIndex"]);
    assert!(e["ModifyIndex"].as_u64() > before["ModifyIndex"].as_u64());
}

#[tokio::test]
async fn behavior_delete_deletes_held_keys() {
    let s = sim();
    let a = s.session(no_checks(json!({"Behavior": "delete"}))).await;
    s.put_bool(&format!("/v1/kv/eph?acquire={a}"), "v").await;
    s.put_bool("/v1/kv/keep", "v").await;
    assert!(s.sim.invalidate_session(&a));
    assert_eq!(s.get("/v1/kv/eph").await.status, 404);
    assert_eq!(s.get("/v1/kv/keep").await.status, 200);
}

#[tokio::test]
async fn lock_delay_blocks_acquire_after_invalidation() {
    let s = sim();
    let delay = Duration::from_millis(1500);
    let a = s
        .session(json!({"Checks": [], "LockDelay": "1500ms"}))
        .await;
    let b = s.session(no_checks(json!({}))).await;
    s.put_bool(&format!("/v1/kv/ld?acquire={a}"), "").await;
    let idx_before = s.sim.raft_index();
    let t0 = Instant::now();
    assert!(s.sim.expire_session(&a));
    let idx_after_expiry = s.sim.raft_index();
    assert!(!s.put_bool(&format!("/v1/kv/ld?acquire={b}"), "").await);
    assert_eq!(
        s.sim.raft_index(),
        idx_after_expiry,
        "an acquire refused by lock-delay uses no index"
    );
    assert!(idx_after_expiry > idx_before);
    // Poll the condition with a deadline until the delay is over.
    let deadline = t0 + delay + Duration::from_secs(3);
    loop {
        if s.put_bool(&format!("/v1/kv/ld?acquire={b}"), "").await {
            break;
        }
        assert!(Instant::now() < deadline, "lock-delay never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    assert!(
        took >= delay,
        "acquired after {took:?}, before the lock-delay"
    );
    // Only the invalidated session's keys get a lock-delay.
    s.put_bool("/v1/kv/free", "").await;
    assert!(s.put_bool(&format!("/v1/kv/free?acquire={b}"), "").await);
}

#[tokio::test]
async fn release_does_not_start_lock_delay() {
    let s = sim();
    let a = s.session(json!({"Checks": [], "LockDelay": "60s"})).await;
    let b = s.session(no_checks(json!({}))).await;
    s.put_bool(&format!("/v1/kv/r?acquire={a}"), "").await;
    s.put_bool(&format!("/v1/kv/r?release={a}"), "").await;
    assert!(s.put_bool(&format!("/v1/kv/r?acquire={b}"), "").await);
}

#[tokio::test]
async fn hooks_report_unknown_sessions() {
    let s = sim();
    assert!(!s.sim.expire_session("nope"));
    assert!(!s.sim.invalidate_session("nope"));
}

#[tokio::test]
async fn ttl_expiry_releases_locks_at_ttl_times_multiplier() {
    let s = sim();
    // 10 s TTL × 0.2 = 2 s, to keep the test short.
    s.sim.set_ttl_multiplier(0.2);
    let expect = Duration::from_secs(2);
    let t0 = Instant::now();
    let a = s.session(no_checks(json!({"TTL": "10s"}))).await;
    s.put_bool(&format!("/v1/kv/ttl?acquire={a}"), "").await;
    let seen = wait_released(&s, "ttl", &a, Duration::from_secs(10)).await;
    let took = seen - t0;
    assert!(took >= expect, "invalidated after {took:?}, before TTL");
    assert!(
        took < expect + Duration::from_secs(1),
        "invalidated late: {took:?}"
    );
    assert_eq!(
        s.get(&format!("/v1/session/info/{a}")).await.json(),
        json!([])
    );
    assert_eq!(
        s.put(&format!("/v1/session/renew/{a}"), "").await.status,
        404
    );
}

#[tokio::test]
async fn ttl_expiry_with_the_default_multiplier_is_at_ttl() {
    let s = sim();
    let ttl = Duration::from_secs(10);
    let t0 = Instant::now();
    let a = s
        .session(no_checks(json!({"TTL": "10s", "Behavior": "delete"})))
        .await;
    s.put_bool(&format!("/v1/kv/ttl10?acquire={a}"), "").await;
    let seen = wait_released(&s, "ttl10", &a, Duration::from_secs(30)).await;
    let took = seen - t0;
    assert!(took >= ttl, "deleted after {took:?}, before the TTL");
    assert!(
        took < ttl + Duration::from_millis(1500),
        "deleted late: {took:?}"
    );
    assert_eq!(s.get("/v1/kv/ttl10").await.status, 404);
}

#[tokio::test]
async fn renew_extends_the_ttl() {
    let s = sim();
    s.sim.set_ttl_multiplier(0.2); // 10 s TTL -> 2 s
    let a = s.session(no_checks(json!({"TTL": "10s"}))).await;
    s.put_bool(&format!("/v1/kv/rn?acquire={a}"), "").await;
    // The scenario's clock: renew 1.2 s in (not a synchronization).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let renewed = Instant::now();
    assert_eq!(
        s.put(&format!("/v1/session/renew/{a}"), "").await.status,
        200
    );
    let seen = wait_released(&s, "rn", &a, Duration::from_secs(10)).await;
    let took = seen - renewed;
    assert!(
        took >= Duration::from_millis(1900),
        "expired {took:?} after renew"
    );
    assert!(took < Duration::from_secs(3));
}
