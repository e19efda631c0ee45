//! Servers for this crate's tests: the testkit's, or `LATCHKEY_TEST_*_URL`.
#![allow(dead_code)]

use latchkey_conformance::harness::Instrumented;
use latchkey_core::{BackendUrl, Result};
use latchkey_testkit::{Cluster, Server, ZookeeperOptions};
use latchkey_zookeeper::ZookeeperBackend;
use std::sync::{Arc, OnceLock};

/// How often the test servers sweep expired TTL nodes. The testkit's
/// shared servers keep ZooKeeper's default (60 s), which would make every
/// TTL case wait a minute, so these tests run their own servers with
/// `tickTime=200` (sessions of 0.4–4 s) and a 100 ms sweep.
pub const TTL_CHECK_MS: u64 = 100;

/// Options of the servers these tests spawn.
pub fn options() -> ZookeeperOptions {
    ZookeeperOptions::fast().jvm_arg(format!("-Dznode.container.checkIntervalMs={TTL_CHECK_MS}"))
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// The standalone server's URL (spawned once per test binary).
pub fn standalone_url() -> String {
    static S: OnceLock<Server> = OnceLock::new();
    if let Some(u) = env("LATCHKEY_TEST_ZOOKEEPER_URL") {
        return u;
    }
    let s =
        S.get_or_init(|| latchkey_testkit::spawn_zookeeper(options()).expect("spawn zookeeper"));
    with_param(s.url(), &format!("ttl_check_interval={TTL_CHECK_MS}ms"))
}

/// The 3-member ensemble's URL (spawned once per test binary).
pub fn ensemble_url() -> String {
    static C: OnceLock<Cluster> = OnceLock::new();
    if let Some(u) = env("LATCHKEY_TEST_ZOOKEEPER_ENSEMBLE_URL") {
        return u;
    }
    let c = C.get_or_init(|| {
        latchkey_testkit::spawn_zookeeper_ensemble(3, options()).expect("spawn ensemble")
    });
    with_param(c.url(), &format!("ttl_check_interval={TTL_CHECK_MS}ms"))
}

/// `url` with one more query parameter.
pub fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// A handle on `url` in namespace `ns` with extra parameters.
pub async fn open(url: &str, ns: &str, extra: &str) -> Result<ZookeeperBackend> {
    let mut u = with_param(url, &format!("namespace={ns}"));
    if !extra.is_empty() {
        u = with_param(&u, extra);
    }
    ZookeeperBackend::connect(&BackendUrl::parse(&u)?).await
}

/// The conformance harness: each call opens a new linearizable-mode handle,
/// whose requests the suite can count.
pub fn harness(url: String) -> Instrumented<ZookeeperBackend> {
    Instrumented::new(move |ns: String| {
        let url = url.clone();
        async move { Ok(Arc::new(open(&url, &ns, "reads=linearizable").await?)) }
    })
    .with_op_count(ZookeeperBackend::requests)
    .with_revoke_lock(revoke_lock)
}

/// The suite's revocation hook is synchronous; the runner's runtime is
/// multi-threaded, so block this worker on the async revocation.
fn revoke_lock(b: &ZookeeperBackend, name: &str) -> Result<bool> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(b.revoke_lock(name)))
}
