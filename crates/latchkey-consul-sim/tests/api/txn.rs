//! `/v1/txn`: verbs, atomicity, error shapes, limits.

use crate::common::{b64, sim};
use serde_json::{json, Value};

fn op(verb: &str, key: &str) -> Value {
    json!({"KV": {"Verb": verb, "Key": key}})
}
fn op_with(verb: &str, key: &str, fields: Value) -> Value {
    let mut o = op(verb, key);
    for (k, v) in fields.as_object().unwrap() {
        o["KV"][k] = v.clone();
    }
    o
}

#[tokio::test]
async fn set_and_get_return_results_and_share_one_index() {
    let s = sim();
    let r = s
        .txn(json!([
            op_with("set", "t/a", json!({"Value": b64("A"), "Flags": 7})),
            op_with("set", "t/b", json!({"Value": b64("B")})),
            op("get", "t/a"),
        ]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["Errors"].is_null());
    let res = v["Results"].as_array().unwrap();
    assert_eq!(res.len(), 3);
    // Write results carry no value; the get does.
    assert!(res[0]["KV"]["Value"].is_null());
    assert_eq!(res[0]["KV"]["Flags"], 7);
    assert_eq!(res[2]["KV"]["Value"], b64("A"));
    let i0 = res[0]["KV"]["ModifyIndex"].as_u64().unwrap();
    assert_eq!(
        res[1]["KV"]["ModifyIndex"].as_u64().unwrap(),
        i0,
        "one Raft index per txn"
    );
    assert_eq!(
        s.get("/v1/kv/t/b").await.entry()["ModifyIndex"]
            .as_u64()
            .unwrap(),
        i0
    );
}

#[tokio::test]
async fn failed_check_rolls_back_every_write_with_409() {
    let s = sim();
    s.put_bool("/v1/kv/acct/a", "100").await;
    let ia = s.get("/v1/kv/acct/a").await.entry()["ModifyIndex"]
        .as_u64()
        .unwrap();
    let r = s
        .txn(json!([
            op_with("set", "acct/a", json!({"Value": b64("50")})),
            op_with("set", "acct/b", json!({"Value": b64("50")})),
            op("delete", "acct/a"),
            op_with("check-index", "acct/a", json!({"Index": ia + 1000})),
        ]))
        .await;
    assert_eq!(r.status, 409);
    let v = r.json();
    assert!(v["Results"].is_null());
    let errs = v["Errors"].as_array().unwrap();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0]["OpIndex"], 3);
    assert!(errs[0]["What"].as_str().unwrap().contains("acct/a"), "{v}");
    // Nothing was applied.
    let e = s.get("/v1/kv/acct/a").await.entry();
    assert_eq!(e["Value"], b64("100"));
    assert_eq!(e["ModifyIndex"].as_u64().unwrap(), ia);
    assert_eq!(s.get("/v1/kv/acct/b").await.status, 404);
}

#[tokio::test]
async fn all_failing_ops_are_reported() {
    let s = sim();
    let r = s
        .txn(json!([
            op("check-index", "x"),
            op_with("set", "y", json!({"Value": b64("v")})),
            op("get", "z"),
        ]))
        .await;
    assert_eq!(r.status, 409);
    let errs = r.json()["Errors"].clone();
    assert_eq!(errs[0]["OpIndex"], 0);
    assert_eq!(
        errs[0]["What"],
        "failed to check index, key \"x\" doesn't exist"
    );
    assert_eq!(errs[1]["OpIndex"], 2);
    assert_eq!(errs[1]["What"], "key \"z\" doesn't exist");
    assert_eq!(s.get("/v1/kv/y").await.status, 404);
}

#[tokio::test]
async fn cas_and_check_index() {
    let s = sim();
    s.put_bool("/v1/kv/c", "v1").await;
    let i = s.get("/v1/kv/c").await.entry()["ModifyIndex"]
        .as_u64()
        .unwrap();
    let r = s
        .txn(json!([op_with(
            "cas",
            "c",
            json!({"Index": i + 1, "Value": b64("x")})
        )]))
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json()["Errors"][0]["What"],
        "failed to set key \"c\", index is stale"
    );
    let r = s
        .txn(json!([
            op_with("check-index", "c", json!({"Index": i})),
            op_with("cas", "c", json!({"Index": i, "Value": b64("v2")})),
            op_with("cas", "new", json!({"Index": 0, "Value": b64("n")})),
        ]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.get("/v1/kv/c").await.entry()["Value"], b64("v2"));
    assert_eq!(s.get("/v1/kv/new").await.entry()["Value"], b64("n"));
    let r = s
        .txn(json!([op_with("check-index", "c", json!({"Index": i}))]))
        .await;
    assert_eq!(r.status, 409);
    assert!(r.json()["Errors"][0]["What"]
        .as_str()
        .unwrap()
        .starts_with("failed index check for key \"c\", current modify index "));
}

#[tokio::test]
async fn check_not_exists() {
    let s = sim();
    let r = s
        .txn(json!([
            op("check-not-exists", "n"),
            op_with("set", "n", json!({"Value": b64("1")}))
        ]))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["Results"].as_array().unwrap().len(),
        1,
        "check-not-exists adds no result"
    );
    let r = s
        .txn(json!([
            op("check-not-exists", "n"),
            op_with("set", "n", json!({"Value": b64("2")}))
        ]))
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["Errors"][0]["What"], "key \"n\" exists");
    assert_eq!(s.get("/v1/kv/n").await.entry()["Value"], b64("1"));
}

#[tokio::test]
async fn lock_op_modify_index_is_a_fencing_token_and_unlock_releases() {
    let s = sim();
    let a = s.session(json!({"Checks": [], "LockDelay": "0s"})).await;
    let b = s.session(json!({"Checks": [], "LockDelay": "0s"})).await;
    let mut tokens = Vec::new();
    for (i, sess) in [&a, &b, &a, &b].iter().enumerate() {
        let r = s
            .txn(json!([op_with(
                "lock",
                "lk",
                json!({"Session": sess, "Value": b64("h"), "Flags": 3304740253564472344u64})
            )]))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let kv = r.json()["Results"][0]["KV"].clone();
        assert_eq!(kv["Session"], sess.as_str());
        assert_eq!(kv["LockIndex"], (i + 1) as u64);
        tokens.push(kv["ModifyIndex"].as_u64().unwrap());
        // While held, the other session's lock fails.
        let other = if *sess == &a { &b } else { &a };
        let r = s
            .txn(json!([op_with("lock", "lk", json!({"Session": other}))]))
            .await;
        assert_eq!(r.status, 409);
        assert_eq!(
            r.json()["Errors"][0]["What"],
            "failed to lock key \"lk\", lock is already held"
        );
        // check-session passes for the holder only.
        let r = s
            .txn(json!([op_with(
                "check-session",
                "lk",
                json!({"Session": sess})
            )]))
            .await;
        assert_eq!(r.status, 200);
        let r = s
            .txn(json!([op_with(
                "check-session",
                "lk",
                json!({"Session": other})
            )]))
            .await;
        assert_eq!(r.status, 409);
        assert!(r.json()["Errors"][0]["What"]
            .as_str()
            .unwrap()
            .starts_with("failed session check for key \"lk\""));
        // Unlock by the non-holder fails, by the holder succeeds.
        let r = s
            .txn(json!([op_with("unlock", "lk", json!({"Session": other}))]))
            .await;
        assert_eq!(r.status, 409);
        let r = s
            .txn(json!([op_with("unlock", "lk", json!({"Session": sess}))]))
            .await;
        assert_eq!(r.status, 200);
        assert!(r.json()["Results"][0]["KV"].get("Session").is_none());
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens increase: {tokens:?}"
    );
    let r = s.txn(json!([op("lock", "lk")])).await;
    assert_eq!(r.json()["Errors"][0]["What"], "missing session");
}

#[tokio::test]
async fn lock_op_during_lock_delay_fails() {
    let s = sim();
    let a = s.session(json!({"Checks": [], "LockDelay": "30s"})).await;
    let b = s.session(json!({"Checks": [], "LockDelay": "0s"})).await;
    s.txn(json!([op_with("lock", "d", json!({"Session": a}))]))
        .await;
    s.sim.expire_session(&a);
    let before = s.sim.raft_index();
    let r = s
        .txn(json!([op_with("lock", "d", json!({"Session": b}))]))
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json()["Errors"][0]["What"],
        "failed to lock key \"d\" due to lock delay"
    );
    assert_eq!(s.sim.raft_index(), before, "refused before Raft");
}

#[tokio::test]
async fn get_tree_delete_tree_delete_and_delete_cas() {
    let s = sim();
    for k in ["g/a", "g/b", "h"] {
        s.put_bool(&format!("/v1/kv/{k}"), k).await;
    }
    let r = s.txn(json!([op("get-tree", "g/")])).await;
    let res = r.json()["Results"].as_array().unwrap().clone();
    assert_eq!(res.len(), 2);
    assert_eq!(res[1]["KV"]["Value"], b64("g/b"));
    let ih = s.get("/v1/kv/h").await.entry()["ModifyIndex"]
        .as_u64()
        .unwrap();
    let r = s
        .txn(json!([op_with(
            "delete-cas",
            "h",
            json!({"Index": ih + 1})
        )]))
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json()["Errors"][0]["What"],
        "failed to delete key \"h\", index is stale"
    );
    let r = s
        .txn(json!([
            op("delete-tree", "g/"),
            op_with("delete-cas", "h", json!({"Index": ih})),
            op("delete", "nothing-here"),
        ]))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["Results"], json!([]));
    assert_eq!(s.get("/v1/kv/?recurse").await.status, 404);
}

#[tokio::test]
async fn read_only_txn_uses_no_index() {
    let s = sim();
    s.put_bool("/v1/kv/r", "v").await;
    let before = s.sim.raft_index();
    let r = s
        .put("/v1/txn?consistent", json!([op("get", "r")]).to_string())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Consul-KnownLeader").as_deref(), Some("true"));
    assert_eq!(s.sim.raft_index(), before);
    let r = s
        .put(
            "/v1/txn?stale&consistent",
            json!([op("get", "r")]).to_string(),
        )
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn max_128_ops_and_more_is_413_with_nothing_applied() {
    let s = sim();
    let max = latchkey_consul_sim::MAX_TXN_OPS;
    assert_eq!(max, 128);
    let ops: Vec<Value> = (0..max)
        .map(|i| op_with("set", &format!("m/{i}"), json!({"Value": b64("v")})))
        .collect();
    let r = s.txn(Value::Array(ops)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ops: Vec<Value> = (0..=max)
        .map(|i| op_with("set", &format!("n/{i}"), json!({"Value": b64("v")})))
        .collect();
    let r = s.txn(Value::Array(ops)).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.text(),
        "Transaction contains too many operations (129 > 128)"
    );
    assert_eq!(s.get("/v1/kv/n/?keys").await.status, 404);
}

#[tokio::test]
async fn malformed_and_oversized_txns() {
    let s = sim();
    let r = s.put("/v1/txn", "not json").await;
    assert_eq!(r.status, 400);
    assert!(r.text().starts_with("Failed to parse body: "));
    let r = s
        .txn(json!([{"KV": {"Verb": "set", "Key": "k", "Value": "***"}}]))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("failed to decode value"), "{}", r.text());
    let r = s.txn(json!([op("explode", "k")])).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["Errors"][0]["What"], "unknown KV verb \"explode\"");
    let r = s
        .txn(json!([op_with("set", "", json!({"Value": b64("v")}))]))
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["Errors"][0]["What"], "Must provide key");
    // The request body limit (txn_max_req_len, 512 KiB) applies to the
    // whole JSON, so a 400 KiB value (base64: 533 KiB) is too large.
    let big = "x".repeat(400 * 1024);
    let r = s
        .txn(json!([op_with("set", "big", json!({"Value": b64(&big)}))]))
        .await;
    assert_eq!(r.status, 413);
    assert!(r.text().starts_with("Request body("), "{}", r.text());
    // Field names are case-insensitive, as Go decodes them.
    let r = s
        .txn(json!([{"kv": {"verb": "set", "key": "lc", "value": b64("v")}}]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.get("/v1/kv/lc").await.entry()["Value"], b64("v"));
}

#[tokio::test]
async fn empty_txn_succeeds_with_no_results() {
    let s = sim();
    let r = s.txn(json!([])).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"Results": [], "Errors": null}));
}

#[tokio::test]
async fn get_or_empty_answers_absent_keys_with_an_empty_entry() {
    let s = sim();
    s.put_bool("/v1/kv/here", "v").await;
    let r = s
        .txn(json!([
            op("get-or-empty", "here"),
            op("get-or-empty", "absent")
        ]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let res = r.json()["Results"].clone();
    assert_eq!(res[0]["KV"]["Value"], b64("v"));
    assert_eq!(res[1]["KV"]["Key"], "absent");
    assert!(res[1]["KV"]["Value"].is_null());
    assert_eq!(res[1]["KV"]["ModifyIndex"], 0);
}
