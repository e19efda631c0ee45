//! The shared conformance suite against a real `redis-server` (the
//! testkit's shared one, or `LATCHKEY_TEST_REDIS_URL`): every case gets a
//! new handle (its own connections) in its own namespace. The harness
//! counts each handle's requests and can delete a lock's key behind its
//! holder's back, so the cases that need those hooks run too.

use latchkey_conformance::harness::Instrumented;
use latchkey_core::BackendUrl;
use latchkey_redis::RedisBackend;
use std::sync::Arc;

/// Percent-encodes a namespace for the URL's query.
fn encode(ns: &str) -> String {
    ns.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn main() -> std::process::ExitCode {
    let base = latchkey_testkit::redis().url().to_string();
    let harness = Instrumented::new(move |ns: String| {
        let base = base.clone();
        async move {
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = BackendUrl::parse(&format!("{base}{sep}namespace={}", encode(&ns)))?;
            Ok(Arc::new(RedisBackend::connect(&url).await?))
        }
    })
    .with_op_count(RedisBackend::op_count)
    .with_revoke_lock(RedisBackend::revoke_lock);
    latchkey_conformance::run("redis", harness)
}
