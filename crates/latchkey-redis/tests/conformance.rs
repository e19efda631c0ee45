//! The shared conformance suite against a real `redis-server` (the
//! testkit's shared one, or `LATCHKEY_TEST_REDIS_URL`): every case gets a
//! new handle (its own connections) in its own namespace. The harness
//! counts each handle's requests and can delete a lock's key behind its
//! holder's back, so the cases that need those hooks run too.

use latchkey_conformance::harness::Instrumented;
use latchkey_core::BackendUrl;
use latchkey_redis::RedisBackend;
use std::sync::Arc;

fn main() -> std::process::ExitCode {
    let base = BackendUrl::parse(latchkey_testkit::redis().url()).expect("the testkit's URL");
    let harness = Instrumented::new(move |ns: String| {
        let url = base.with_namespace(&ns);
        async move { Ok(Arc::new(RedisBackend::connect(&url?).await?)) }
    })
    .with_op_count(RedisBackend::op_count)
    .with_revoke_lock(RedisBackend::revoke_lock);
    latchkey_conformance::run("redis", harness)
}
