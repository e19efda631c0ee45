//! ACL token enforcement and the unavailability fault hook.

use crate::common::sim;

#[tokio::test]
async fn a_configured_token_is_required_everywhere() {
    let s = sim();
    s.sim.set_acl_token(Some("s3cret".into()));
    let r = s.get("/v1/kv/k").await;
    assert_eq!((r.status, r.text().as_str()), (403, "Permission denied"));
    assert_eq!(s.put("/v1/kv/k", "v").await.status, 403);
    assert_eq!(s.put("/v1/txn", "[]").await.status, 403);
    assert_eq!(s.put("/v1/session/create", "").await.status, 403);
    assert_eq!(s.get("/v1/session/list").await.status, 403);
    let r = s.get("/v1/kv/k?token=wrong").await;
    assert_eq!((r.status, r.text().as_str()), (403, "ACL not found"));
    // ?token=, X-Consul-Token and Authorization: Bearer all work.
    assert!(s.put_bool("/v1/kv/k?token=s3cret", "v").await);
    let r =
        s.c.get(format!("{}/v1/kv/k", s.base))
            .header("X-Consul-Token", "s3cret")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r =
        s.c.get(format!("{}/v1/kv/k", s.base))
            .header("Authorization", "Bearer s3cret")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r =
        s.c.get(format!("{}/v1/kv/k", s.base))
            .header("X-Consul-Token", "nope")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // Turning ACLs off again.
    s.sim.set_acl_token(None);
    assert_eq!(s.get("/v1/kv/k").await.status, 200);
}

#[tokio::test]
async fn unavailable_answers_500_no_cluster_leader() {
    let s = sim();
    s.sim.set_unavailable(true);
    let r = s.get("/v1/kv/k").await;
    assert_eq!((r.status, r.text().as_str()), (500, "No cluster leader"));
    s.sim.set_unavailable(false);
    assert_eq!(s.get("/v1/kv/k").await.status, 404);
}
