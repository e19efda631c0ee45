//! `/v1/kv`: reads, writes, CAS, deletes, listing, limits, paths, errors.

use crate::common::{b64, sim};
use serde_json::json;

#[tokio::test]
async fn absent_key_is_404_with_index_and_leader_headers() {
    let s = sim();
    let r = s.get("/v1/kv/nope").await;
    assert_eq!(r.status, 404);
    assert!(r.index() >= 1, "X-Consul-Index is never 0");
    assert_eq!(r.header("X-Consul-KnownLeader").as_deref(), Some("true"));
    assert_eq!(r.header("X-Consul-LastContact").as_deref(), Some("0"));
}

#[tokio::test]
async fn put_then_get_returns_consul_entry_shape() {
    let s = sim();
    assert!(s.put_bool("/v1/kv/app/cfg", "hello").await);
    let r = s.get("/v1/kv/app/cfg").await;
    let e = r.entry();
    assert_eq!(e["Key"], "app/cfg");
    assert_eq!(e["Value"], b64("hello"));
    assert_eq!(e["Flags"], 0);
    assert_eq!(e["LockIndex"], 0);
    assert!(e.get("Session").is_none(), "no Session field when unheld");
    let mi = e["ModifyIndex"].as_u64().unwrap();
    assert_eq!(e["CreateIndex"].as_u64().unwrap(), mi);
    assert_eq!(r.index(), mi, "a present key reports its ModifyIndex");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
}

#[tokio::test]
async fn update_keeps_create_index_and_bumps_modify_index() {
    let s = sim();
    s.put_bool("/v1/kv/k", "1").await;
    let e1 = s.get("/v1/kv/k").await.entry();
    s.put_bool("/v1/kv/k", "2").await;
    let e2 = s.get("/v1/kv/k").await.entry();
    assert_eq!(e1["CreateIndex"], e2["CreateIndex"]);
    assert!(e2["ModifyIndex"].as_u64() > e1["ModifyIndex"].as_u64());
}

#[tokio::test]
async fn unchanged_set_keeps_modify_index() {
    // kvsSetTxn skips the write when DirEntry.Equal holds.
    let s = sim();
    s.put_bool("/v1/kv/k", "same").await;
    let e1 = s.get("/v1/kv/k").await.entry();
    s.put_bool("/v1/kv/k", "same").await;
    let e2 = s.get("/v1/kv/k").await.entry();
    assert_eq!(e1["ModifyIndex"], e2["ModifyIndex"]);
}

#[tokio::test]
async fn flags_are_stored() {
    let s = sim();
    s.put_bool("/v1/kv/f?flags=3304740253564472344", "x").await;
    let e = s.get("/v1/kv/f").await.entry();
    assert_eq!(e["Flags"].as_u64(), Some(3304740253564472344));
}

#[tokio::test]
async fn empty_value_is_null() {
    let s = sim();
    s.put_bool("/v1/kv/empty", "").await;
    let e = s.get("/v1/kv/empty").await.entry();
    assert!(e["Value"].is_null());
}

#[tokio::test]
async fn raw_returns_the_bare_value() {
    let s = sim();
    s.put_bool("/v1/kv/r", vec![0u8, 1, 2, 255]).await;
    let r = s.get("/v1/kv/r?raw").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, vec![0u8, 1, 2, 255]);
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
    assert!(r.index() > 1);
}

#[tokio::test]
async fn recurse_lists_the_prefix_in_key_order() {
    let s = sim();
    for k in ["p/b", "p/a", "p/c/d", "q/x", "p"] {
        s.put_bool(&format!("/v1/kv/{k}"), k).await;
    }
    let r = s.get("/v1/kv/p/?recurse").await;
    assert_eq!(r.status, 200);
    let keys: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["p/a", "p/b", "p/c/d"]);
    let max = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ModifyIndex"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(r.index(), max, "a listing reports its highest ModifyIndex");
    // A string prefix, not a path prefix.
    let all = s.get("/v1/kv/p?recurse").await.json();
    assert_eq!(all.as_array().unwrap().len(), 4);
    assert_eq!(s.get("/v1/kv/zzz/?recurse").await.status, 404);
    assert_eq!(
        s.get("/v1/kv/?recurse")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[tokio::test]
async fn keys_lists_names_and_separator_folds_them() {
    let s = sim();
    for k in ["a/1", "a/2/x", "a/2/y", "a/3", "b"] {
        s.put_bool(&format!("/v1/kv/{k}"), "v").await;
    }
    let r = s.get("/v1/kv/a/?keys").await;
    assert_eq!(r.json(), json!(["a/1", "a/2/x", "a/2/y", "a/3"]));
    let r = s.get("/v1/kv/a/?keys&separator=/").await;
    assert_eq!(r.json(), json!(["a/1", "a/2/", "a/3"]));
    let r = s.get("/v1/kv/?keys&separator=/").await;
    assert_eq!(r.json(), json!(["a/", "b"]));
    // Absent prefix: 404; root of an empty store: [] (KVSGetKeys).
    assert_eq!(s.get("/v1/kv/nope/?keys").await.status, 404);
    let empty = sim();
    let r = empty.get("/v1/kv/?keys").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!([]));
}

#[tokio::test]
async fn cas_zero_creates_only() {
    let s = sim();
    assert!(s.put_bool("/v1/kv/c?cas=0", "first").await);
    assert!(!s.put_bool("/v1/kv/c?cas=0", "second").await);
    assert_eq!(s.get("/v1/kv/c").await.entry()["Value"], b64("first"));
}

#[tokio::test]
async fn cas_index_must_match_modify_index() {
    let s = sim();
    s.put_bool("/v1/kv/c", "v1").await;
    let mi = s.get("/v1/kv/c").await.entry()["ModifyIndex"]
        .as_u64()
        .unwrap();
    assert!(!s.put_bool(&format!("/v1/kv/c?cas={}", mi + 100), "x").await);
    assert!(!s.put_bool(&format!("/v1/kv/absent?cas={mi}"), "x").await);
    assert!(s.put_bool(&format!("/v1/kv/c?cas={mi}"), "v2").await);
    assert!(
        !s.put_bool(&format!("/v1/kv/c?cas={mi}"), "v3").await,
        "stale"
    );
    assert_eq!(s.get("/v1/kv/c").await.entry()["Value"], b64("v2"));
}

#[tokio::test]
async fn cas_aba_fails_after_delete_and_recreate() {
    let s = sim();
    s.put_bool("/v1/kv/k", "v").await;
    let r1 = s.get("/v1/kv/k").await.entry()["ModifyIndex"]
        .as_u64()
        .unwrap();
    assert!(s.delete("/v1/kv/k").await.json().as_bool().unwrap());
    s.put_bool("/v1/kv/k", "v").await;
    let e = s.get("/v1/kv/k").await.entry();
    assert!(
        e["ModifyIndex"].as_u64().unwrap() > r1,
        "indexes are never reused"
    );
    assert!(!s.put_bool(&format!("/v1/kv/k?cas={r1}"), "w").await);
}

#[tokio::test]
async fn delete_removes_the_key() {
    let s = sim();
    s.put_bool("/v1/kv/d", "v").await;
    let r = s.delete("/v1/kv/d").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!(true));
    assert_eq!(s.get("/v1/kv/d").await.status, 404);
    // Deleting an absent key is fine too.
    assert_eq!(s.delete("/v1/kv/d").await.json(), json!(true));
}

#[tokio::test]
async fn delete_cas_checks_the_index() {
    let s = sim();
    s.put_bool("/v1/kv/d", "v").await;
    let mi = s.get("/v1/kv/d").await.entry()["ModifyIndex"]
        .as_u64()
        .unwrap();
    assert_eq!(
        s.delete(&format!("/v1/kv/d?cas={}", mi + 1)).await.json(),
        json!(false)
    );
    assert_eq!(s.get("/v1/kv/d").await.status, 200);
    assert_eq!(
        s.delete(&format!("/v1/kv/d?cas={mi}")).await.json(),
        json!(true)
    );
    assert_eq!(s.get("/v1/kv/d").await.status, 404);
}

#[tokio::test]
async fn delete_recurse_removes_the_subtree() {
    let s = sim();
    for k in ["t/a", "t/b/c", "tx", "u"] {
        s.put_bool(&format!("/v1/kv/{k}"), "v").await;
    }
    assert_eq!(s.delete("/v1/kv/t/?recurse").await.json(), json!(true));
    assert_eq!(s.get("/v1/kv/t/?recurse").await.status, 404);
    assert_eq!(s.get("/v1/kv/tx").await.status, 200);
    // The empty prefix deletes everything.
    s.delete("/v1/kv/?recurse").await;
    assert_eq!(s.get("/v1/kv/?recurse").await.status, 404);
}

#[tokio::test]
async fn deleted_subtree_index_does_not_go_backwards() {
    // Tombstones keep a listing's index from sliding back after a delete.
    let s = sim();
    s.put_bool("/v1/kv/g/a", "v").await;
    let before = s.get("/v1/kv/g/?recurse").await.index();
    s.delete("/v1/kv/g/a").await;
    let after = s.get("/v1/kv/g/?recurse").await;
    assert_eq!(after.status, 404);
    assert!(after.index() > before);
}

#[tokio::test]
async fn values_up_to_512_kib_are_accepted_larger_are_413() {
    let s = sim();
    let max = latchkey_consul_sim::MAX_VALUE_SIZE;
    assert_eq!(max, 512 * 1024);
    assert!(s.put_bool("/v1/kv/big", vec![b'x'; max]).await);
    let r = s.put("/v1/kv/big2", vec![b'x'; max + 1]).await;
    assert_eq!(r.status, 413);
    assert!(r.text().contains("too large"), "{}", r.text());
    assert_eq!(s.get("/v1/kv/big2").await.status, 404);
    let e = s.get("/v1/kv/big?raw").await;
    assert_eq!(e.body.len(), max);
}

#[tokio::test]
async fn keys_may_hold_any_character_percent_decoded() {
    let s = sim();
    let key = "we ird/ü✓/?q=1&r#frag%2F~+";
    let enc: String = key
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'/' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    assert!(s.put_bool(&format!("/v1/kv/{enc}"), "v").await);
    let e = s.get(&format!("/v1/kv/{enc}")).await.entry();
    assert_eq!(e["Key"], key);
    let keys = s.get("/v1/kv/?keys").await.json();
    assert_eq!(keys, json!([key]));
}

#[tokio::test]
async fn unclean_paths_are_redirected_like_go_servemux() {
    let s = sim();
    let r = s.get("/v1/kv/a//b").await;
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location").as_deref(), Some("/v1/kv/a/b"));
    // Go cleans the decoded path, so encoded slashes count too.
    let r = s.get("/v1/kv/a%2F%2Fb?raw").await;
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location").as_deref(), Some("/v1/kv/a/b?raw"));
    let r = s.get("/v1/kv").await;
    assert_eq!(r.status, 301);
}

#[tokio::test]
async fn global_index_strictly_increases_across_keys() {
    let s = sim();
    let mut last = 0;
    for i in 0..20 {
        let k = format!("/v1/kv/k{}", i % 3);
        s.put_bool(&k, format!("{i}")).await;
        let mi = s.get(&k).await.entry()["ModifyIndex"].as_u64().unwrap();
        assert!(mi > last, "{mi} after {last}");
        last = mi;
    }
    assert!(s.sim.raft_index() >= last);
}

#[tokio::test]
async fn consistency_modes_are_accepted_but_not_together() {
    let s = sim();
    s.put_bool("/v1/kv/k", "v").await;
    assert_eq!(s.get("/v1/kv/k?consistent").await.status, 200);
    assert_eq!(s.get("/v1/kv/k?stale").await.status, 200);
    let r = s.get("/v1/kv/k?stale&consistent").await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.text(),
        "Cannot specify ?stale with ?consistent, conflicting semantics."
    );
}

#[tokio::test]
async fn bad_parameters_get_consul_status_and_text() {
    let s = sim();
    let r = s.get("/v1/kv/k?index=abc").await;
    assert_eq!((r.status, r.text().as_str()), (400, "Invalid index"));
    let r = s.get("/v1/kv/k?index=1&wait=forever").await;
    assert_eq!((r.status, r.text().as_str()), (400, "Invalid wait time"));
    let r = s.get("/v1/kv/").await;
    assert_eq!((r.status, r.text().as_str()), (400, "Missing key name"));
    let r = s.put("/v1/kv/", "v").await;
    assert_eq!((r.status, r.text().as_str()), (400, "Missing key name"));
    let r = s.delete("/v1/kv/").await;
    assert_eq!((r.status, r.text().as_str()), (400, "Missing key name"));
    let r = s.put("/v1/kv/k?cas=0&acquire=x", "v").await;
    assert_eq!(r.status, 400);
    assert!(r.text().starts_with("Conflicting flags: "), "{}", r.text());
    let r = s.delete("/v1/kv/k?cas=0&recurse").await;
    assert_eq!(r.status, 400);
    // strconv errors escape Consul's KV endpoint as 500s.
    let r = s.put("/v1/kv/k?flags=x", "v").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.text(), "strconv.ParseUint: parsing \"x\": invalid syntax");
    let r = s.put("/v1/kv/k?cas=-1", "v").await;
    assert_eq!(r.status, 500);
    assert_eq!(s.get("/v1/kv/k").await.status, 404, "nothing written");
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let s = sim();
    assert_eq!(s.get("/v1/nope").await.status, 404);
    assert_eq!(s.get("/v1/session/bogus").await.status, 404);
    let r = s
        .req(reqwest::Method::POST, "/v1/kv/k", Some(b"v".to_vec()))
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(s.get("/v1/txn").await.status, 405);
    assert_eq!(s.get("/v1/session/create").await.status, 405);
    // Readiness helpers.
    assert_eq!(
        s.get("/v1/status/leader").await.json(),
        json!("127.0.0.1:8300")
    );
}

#[tokio::test]
async fn pretty_prints_when_asked() {
    let s = sim();
    s.put_bool("/v1/kv/k", "v").await;
    let r = s.get("/v1/kv/k?pretty").await;
    assert!(r.text().contains("\n    "), "{}", r.text());
}

#[tokio::test]
async fn datacenter_parameter() {
    let s = sim();
    assert!(s.put_bool("/v1/kv/k?dc=dc1", "v").await);
    let r = s.get("/v1/kv/k?dc=elsewhere").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (500, "No path to datacenter")
    );
}

#[tokio::test]
async fn url_addr_and_drop_frees_the_port() {
    let s = latchkey_consul_sim::ConsulSim::start().unwrap();
    let addr = s.addr();
    assert_eq!(s.url(), format!("consul://127.0.0.1:{}", addr.port()));
    assert!(format!("{s:?}").contains("simulator"));
    drop(s);
    let again = latchkey_consul_sim::ConsulSim::start_on(addr).expect("port free after drop");
    assert_eq!(again.addr(), addr);
}

#[tokio::test]
async fn strict_key_validation_rejects_what_recent_agents_reject() {
    let s = sim();
    // Off by default: anything goes.
    assert!(s.put_bool("/v1/kv/a~b%20c", "v").await);
    s.sim.set_strict_key_validation(true);
    let r = s.put("/v1/kv/a~b", "v").await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.text(),
        "key contains invalid character '~' at position 1. Only alphanumeric characters and ,-_./ are allowed"
    );
    assert_eq!(s.get("/v1/kv/a~b%20c").await.status, 400, "reads too");
    let r = s.get("/v1/kv/cfg/app.json").await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("'.json'"), "{}", r.text());
    assert!(s.put_bool("/v1/kv/ok/Key-1_2,3.v", "v").await);
    // Listing the root needs no key.
    assert_eq!(s.get("/v1/kv/?keys").await.status, 200);
    s.sim.set_strict_key_validation(false);
    assert_eq!(s.get("/v1/kv/a~b%20c").await.status, 200);
}
