//! Adapter tests of the Consul backend.
//!
//! CI runs these against **a simulator of Consul's HTTP API built from
//! HashiCorp's API docs** (`latchkey-consul-sim`), not against Consul: no
//! Consul binary exists on the build machines. Tests named `sim_*` use the
//! simulator's fault hooks (ACL token, session invalidation) and start a
//! private simulator; the others use `latchkey_testkit::consul()`, which is a
//! real agent when `LATCHKEY_TEST_CONSUL_URL` is set:
//!
//! ```text
//! consul agent -dev &
//! LATCHKEY_TEST_CONSUL_URL=consul://127.0.0.1:8500 cargo test -p latchkey-consul
//! ```

use bytes::Bytes;
use latchkey_consul::{ConsulBackend, LOCK_FLAG};
use latchkey_core::{
    Backend, BackendUrl, Compare, Error, KvStore, LockOptions, Op, PutOptions, TxnRequest,
};
use latchkey_core::{DistributedLock, Txn};
use std::sync::Arc;
use std::time::Duration;

fn ns(tag: &str) -> String {
    format!("adapter-{tag}-{:x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

async fn open(base: &str, ns: &str) -> Arc<dyn Backend> {
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = BackendUrl::parse(&format!("{base}{sep}namespace={ns}")).unwrap();
    latchkey_consul::connect(url).await.unwrap()
}

/// `http://host:port` of a `consul://host:port…` URL.
fn http_base(url: &str) -> String {
    let rest = url.strip_prefix("consul://").expect("a consul:// URL");
    let hostport = rest.split(['/', '?']).next().unwrap();
    format!("http://{hostport}")
}

async fn http(method: reqwest::Method, url: String) -> (u16, String) {
    let r = reqwest::Client::new()
        .request(method, url)
        .send()
        .await
        .expect("request to the Consul target");
    let s = r.status().as_u16();
    (s, r.text().await.unwrap_or_default())
}

fn session_of(g: &latchkey_core::LockGuard) -> String {
    g.entry().id.rsplit_once(':').unwrap().0.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_port_is_unavailable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let b = open(&format!("consul://127.0.0.1:{port}?timeout=2s"), "x").await;
    let e = b.get("k").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    let e = b
        .put("k", Bytes::from("v"), PutOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    let e = b.try_lock("l", LockOptions::default()).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
}

#[tokio::test]
async fn urls_are_checked_and_the_token_never_printed() {
    for bad in [
        "consul://",
        "consul://h:8500?bogus=1",
        "consul://a:1,b:2",
        "consul://h?timeout=soon",
    ] {
        let e = match latchkey_consul::connect(BackendUrl::parse(bad).unwrap()).await {
            Ok(_) => panic!("{bad} was accepted"),
            Err(e) => e,
        };
        assert!(matches!(e, Error::InvalidUrl { .. }), "{bad}: {e:?}");
    }
    if !cfg!(feature = "tls") {
        let e = match latchkey_consul::connect(BackendUrl::parse("consuls://h:8501").unwrap()).await
        {
            Ok(_) => panic!("consuls:// accepted without the tls feature"),
            Err(e) => e,
        };
        assert!(e.to_string().contains("\"tls\""), "{e}");
    }
    let url = BackendUrl::parse("consul://127.0.0.1:1?token=s3cret-token&dc=dc9").unwrap();
    let b = ConsulBackend::connect(&url).await.unwrap();
    let shown = format!("{url} {url:?} {b:?}");
    assert!(!shown.contains("s3cret-token"), "{shown}");
    let e = b.get("k").await.unwrap_err();
    assert!(!format!("{e} {e:?}").contains("s3cret-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_key_has_the_api_lock_layout_and_excludes_a_native_holder() {
    let target = latchkey_testkit::consul();
    let n = ns("interop");
    let b = open(target.url(), &n).await;
    let base = http_base(target.url());
    let key = format!("latchkey/ns/{n}/locks/jobs/nightly");

    // Our lock: the key carries api.Lock's flags and our session.
    let g = b
        .lock("jobs/nightly", LockOptions::default())
        .await
        .unwrap();
    let (s, body) = http(reqwest::Method::GET, format!("{base}/v1/kv/{key}")).await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["Flags"].as_u64(), Some(LOCK_FLAG));
    assert_eq!(v[0]["Session"].as_str(), Some(session_of(&g).as_str()));
    assert_eq!(v[0]["ModifyIndex"].as_u64(), Some(g.fencing_token()));
    g.release().await.unwrap();

    // A native holder (what api.Lock does: a session, then ?acquire=).
    let (s, body) = http(reqwest::Method::PUT, format!("{base}/v1/session/create")).await;
    assert_eq!(s, 200, "{body}");
    let sid = serde_json::from_str::<serde_json::Value>(&body).unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, body) = http(
        reqwest::Method::PUT,
        format!("{base}/v1/kv/{key}?acquire={sid}&flags={LOCK_FLAG}"),
    )
    .await;
    assert_eq!((s, body.trim()), (200, "true"));
    assert!(b
        .try_lock("jobs/nightly", LockOptions::default())
        .await
        .unwrap()
        .is_none());
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.lock("jobs/nightly", LockOptions::default()).await })
    };
    let (s, _) = http(
        reqwest::Method::PUT,
        format!("{base}/v1/kv/{key}?release={sid}"),
    )
    .await;
    assert_eq!(s, 200);
    let g = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter acquires after the native holder released")
        .unwrap()
        .unwrap();
    g.release().await.unwrap();
    http(
        reqwest::Method::PUT,
        format!("{base}/v1/session/destroy/{sid}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroyed_session_fires_lost_and_stale_fenced_write_fails() {
    let target = latchkey_testkit::consul();
    let n = ns("destroy");
    let (a, c) = (open(target.url(), &n).await, open(target.url(), &n).await);
    let g = a.lock("x", LockOptions::default()).await.unwrap();
    let (s, _) = http(
        reqwest::Method::PUT,
        format!(
            "{}/v1/session/destroy/{}",
            http_base(target.url()),
            session_of(&g)
        ),
    )
    .await;
    assert_eq!(s, 200);
    // The lock monitor sees the key released; renewal would see 404 too.
    tokio::time::timeout(Duration::from_secs(10), g.lost())
        .await
        .expect("lost() fires after the session was destroyed");
    let g2 = tokio::time::timeout(Duration::from_secs(10), c.lock("x", LockOptions::default()))
        .await
        .expect("another handle acquires")
        .unwrap();
    assert!(g2.fencing_token() > g.fencing_token());
    let fenced = |g: &latchkey_core::LockGuard, v: &'static str| {
        TxnRequest::new()
            .when([Compare::held(g)])
            .then([Op::put("f", v)])
    };
    assert!(!a.txn(fenced(&g, "stale")).await.unwrap().succeeded);
    assert!(c.txn(fenced(&g2, "fresh")).await.unwrap().succeeded);
    assert_eq!(
        c.get("f").await.unwrap().map(|kv| kv.value),
        Some(Bytes::from("fresh"))
    );
    g.release().await.unwrap();
    g2.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_put_and_plain_put_layout() {
    let target = latchkey_testkit::consul();
    let n = ns("ttl");
    let b = open(target.url(), &n).await;
    let r = b
        .put(
            "t",
            Bytes::from("v"),
            PutOptions::ttl(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    let kv = b.get("t").await.unwrap().unwrap();
    assert_eq!(kv.revision, r);
    // Raised to Consul's minimum session TTL.
    assert_eq!(kv.lease_ttl, Some(Duration::from_secs(10)));
    let r2 = b
        .put("t", Bytes::from("w"), PutOptions::default())
        .await
        .unwrap();
    assert!(r2 > r);
    assert_eq!(b.get("t").await.unwrap().unwrap().lease_ttl, None);
    // Odd keys stay path-safe.
    for k in ["a//b", "/", "./..", "~", "x?y#z"] {
        let r = b
            .put(k, Bytes::from(k), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(
            b.get(k).await.unwrap().map(|kv| kv.revision),
            Some(r),
            "{k:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_use_the_raw_kv_path() {
    let target = latchkey_testkit::consul();
    let b = open(target.url(), &ns("large")).await;
    let v = Bytes::from(vec![7u8; 512 * 1024]);
    let r = b
        .put("big", v.clone(), PutOptions::default())
        .await
        .unwrap();
    let kv = b.get("big").await.unwrap().unwrap();
    assert_eq!((kv.value, kv.revision), (v.clone(), r));
    let e = b
        .put("big", v.clone(), PutOptions::if_revision(r - 1))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Conflict { current: Some(c), .. } if c == r),
        "{e:?}"
    );
    let r2 = b.put("big", v, PutOptions::if_revision(r)).await.unwrap();
    assert!(r2 > r);
}

// ---- simulator-only tests (fault hooks of latchkey-consul-sim) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_wrong_acl_token_is_auth() {
    let sim = latchkey_consul_sim::ConsulSim::start().unwrap();
    sim.set_acl_token(Some("right-token".to_string()));
    let wrong = open(&format!("{}?token=wrong-token", sim.url()), "acl").await;
    let e = wrong.get("k").await.unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e:?}");
    assert!(!format!("{e} {e:?}").contains("wrong-token"));
    let e = wrong
        .try_lock("l", LockOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e:?}");
    let right = open(&format!("{}?token=right-token", sim.url()), "acl").await;
    right
        .put("k", Bytes::from("v"), PutOptions::default())
        .await
        .unwrap();
    assert!(right.get("k").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_session_invalidation_fires_lost_and_stale_fenced_write_fails() {
    let sim = latchkey_consul_sim::ConsulSim::start().unwrap();
    let (a, c) = (open(&sim.url(), "inv").await, open(&sim.url(), "inv").await);
    let g = a.lock("x", LockOptions::default()).await.unwrap();
    assert!(
        a.txn(
            TxnRequest::new()
                .when([Compare::held(&g)])
                .then([Op::put("f", "1")])
        )
        .await
        .unwrap()
        .succeeded
    );
    sim.invalidate_session(&session_of(&g));
    tokio::time::timeout(Duration::from_secs(10), g.lost())
        .await
        .expect("lost() fires after the simulator invalidated the session");
    let g2 = c.lock("x", LockOptions::default()).await.unwrap();
    assert!(g2.fencing_token() > g.fencing_token());
    let stale = a
        .txn(
            TxnRequest::new()
                .when([Compare::held(&g)])
                .then([Op::put("f", "2")])
                .otherwise([Op::get("f")]),
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    assert_eq!(
        c.get("f").await.unwrap().map(|kv| kv.value),
        Some(Bytes::from("1"))
    );
    g2.release().await.unwrap();
    // Releasing the lost guard is Ok and gives up its local turn; the dead
    // session is replaced: the first handle can lock again.
    g.release().await.unwrap();
    let g3 = a.lock("x", LockOptions::default()).await.unwrap();
    assert!(g3.fencing_token() > g2.fencing_token());
    g3.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_no_cluster_leader_is_unavailable_and_renewal_survives_a_short_outage() {
    let sim = latchkey_consul_sim::ConsulSim::start().unwrap();
    let b = ConsulBackend::connect(
        &BackendUrl::parse(&format!("{}?namespace=outage", sim.url())).unwrap(),
    )
    .await
    .unwrap();
    let g = b
        .lock("x", LockOptions::ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    sim.set_unavailable(true);
    let e = b.get("k").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert!(e.is_transient());
    let e = b
        .put("k", Bytes::from("v"), PutOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    // Shorter than the TTL: the lock survives (renewals resume after it).
    tokio::time::sleep(Duration::from_secs(4)).await;
    sim.set_unavailable(false);
    assert!(!g.is_lost());
    let o = b
        .txn(
            TxnRequest::new()
                .when([Compare::held(&g)])
                .then([Op::put("f", "1")]),
        )
        .await
        .unwrap();
    assert!(o.succeeded);
    g.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_locks_share_one_session_and_one_renewal_per_tick() {
    let target = latchkey_testkit::consul();
    let url = BackendUrl::parse(&format!("{}?namespace={}", target.url(), ns("many"))).unwrap();
    let b = ConsulBackend::connect(&url).await.unwrap();
    let mut guards = Vec::new();
    for i in 0..300 {
        guards.push(
            b.try_lock(&format!("l{i}"), LockOptions::ttl(Duration::from_secs(10)))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let sessions: std::collections::HashSet<String> = guards.iter().map(session_of).collect();
    assert_eq!(sessions.len(), 1, "one session per (handle, TTL)");
    let before = b.op_count();
    // Two renewal periods (TTL/3 ≈ 3.3 s each).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let during = b.op_count() - before;
    // Renewals (one per tick for all 300 locks) and the lock monitor's
    // blocking query — never one request per lock.
    assert!(
        during <= 6,
        "{during} requests while holding 300 locks for 7 s"
    );
    assert!(guards.iter().all(|g| !g.is_lost()));
    for g in guards {
        g.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_ttl_key_is_deleted_when_its_session_expires() {
    let sim = latchkey_consul_sim::ConsulSim::start().unwrap();
    let b = open(&sim.url(), "ttl").await;
    b.put(
        "gone",
        Bytes::from("v"),
        PutOptions::ttl(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    b.put("stays", Bytes::from("v"), PutOptions::default())
        .await
        .unwrap();
    // The TTL key's session: read it from the simulator's API.
    let (s, body) = http(
        reqwest::Method::GET,
        format!("{}/v1/kv/latchkey/ns/ttl/kv/gone", sim.http_url()),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sid = v[0]["Session"].as_str().unwrap().to_string();
    assert_eq!(v[0]["Flags"].as_u64(), Some(30_000));
    let mut w = b.watch("", None).await.unwrap();
    assert!(sim.expire_session(&sid));
    use futures::StreamExt;
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (ev.kind, ev.key.as_str()),
        (latchkey_core::EventKind::Delete, "gone")
    );
    assert!(b.get("gone").await.unwrap().is_none());
    assert!(b.get("stays").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_write_is_one_request_and_falls_back_when_not_held() {
    let target = latchkey_testkit::consul();
    let url = BackendUrl::parse(&format!("{}?namespace={}", target.url(), ns("fast"))).unwrap();
    let (a, c) = (
        ConsulBackend::connect(&url).await.unwrap(),
        ConsulBackend::connect(&url).await.unwrap(),
    );
    let g = a.lock("x", LockOptions::default()).await.unwrap();
    let fenced = |g: &latchkey_core::LockGuard, v: String| {
        TxnRequest::new()
            .when([Compare::held(g)])
            .then([Op::put("f", v)])
            .otherwise([Op::get("f")])
    };
    // The other handle sends only the txns (no lock monitor, no renewals).
    let before = c.op_count();
    for i in 0..10 {
        assert!(c.txn(fenced(&g, i.to_string())).await.unwrap().succeeded);
    }
    assert_eq!(c.op_count() - before, 10, "one request per fenced write");
    g.release().await.unwrap();
    let o = c.txn(fenced(&g, "late".into())).await.unwrap();
    assert!(!o.succeeded);
    assert!(matches!(&o.results[..], [latchkey_core::OpResult::Get(Some(kv))] if kv.value == "9"));
}
