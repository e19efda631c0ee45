//! The shared conformance suite against a real 3-master Redis Cluster (the
//! testkit's shared one, or `LATCHKEY_TEST_REDIS_CLUSTER_URL`): every case
//! gets a new handle in its own namespace, so the cases spread over the
//! masters (a namespace is one hash slot).

mod common;

use latchkey_conformance::harness::Instrumented;
use latchkey_core::BackendUrl;
use latchkey_redis::RedisBackend;
use std::sync::Arc;

fn main() -> std::process::ExitCode {
    let base = BackendUrl::parse(&common::cluster_url()).expect("the cluster's URL");
    let harness = Instrumented::new(move |ns: String| {
        let url = base.with_namespace(&ns);
        async move { Ok(Arc::new(RedisBackend::connect(&url?).await?)) }
    })
    .with_op_count(RedisBackend::op_count)
    .with_revoke_lock(RedisBackend::revoke_lock);
    latchkey_conformance::run("redis-cluster", harness)
}
