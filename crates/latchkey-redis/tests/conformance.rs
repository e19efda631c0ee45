//! The shared conformance suite against a real `redis-server` (the
//! testkit's shared one, or `LATCHKEY_TEST_REDIS_URL`): every case gets a
//! new handle (its own connections) in its own namespace.

use latchkey_core::{Backend, BackendUrl};
use std::sync::Arc;

fn main() -> std::process::ExitCode {
    let base = latchkey_testkit::redis().url().to_string();
    latchkey_conformance::run("redis", move |ns: String| {
        let base = base.clone();
        async move {
            let sep = if base.contains('?') { '&' } else { '?' };
            let ns: String = ns
                .bytes()
                .map(|b| match b {
                    b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            let url = BackendUrl::parse(&format!("{base}{sep}namespace={ns}"))?;
            Ok(Arc::new(latchkey_redis::RedisBackend::connect(&url).await?) as Arc<dyn Backend>)
        }
    })
}
