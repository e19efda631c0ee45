//! The shared conformance suite against Consul.
//!
//! By default this runs against **a simulator of Consul's HTTP API built
//! from HashiCorp's API docs** (`latchkey-consul-sim`, via
//! `latchkey_testkit::consul()`), because no Consul binary exists on the
//! machines that build latchkey. The same binary runs against a real agent:
//!
//! ```text
//! consul agent -dev &
//! LATCHKEY_TEST_CONSUL_URL=consul://127.0.0.1:8500 cargo test -p latchkey-consul
//! ```
//!
//! The harness counts each handle's HTTP requests (so the suite can check
//! that a lock waiter does not poll) and revokes locks by deleting their key,
//! as an operator would.

use latchkey_conformance::harness::Instrumented;
use latchkey_consul::ConsulBackend;
use latchkey_core::BackendUrl;
use std::sync::Arc;

fn main() -> std::process::ExitCode {
    latchkey_conformance::run(
        "consul",
        Instrumented::new(|ns: String| async move {
            let base = latchkey_testkit::consul().url().to_string();
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = BackendUrl::parse(&format!("{base}{sep}namespace={ns}"))?;
            Ok(Arc::new(ConsulBackend::connect(&url).await?))
        })
        .with_op_count(ConsulBackend::op_count)
        .with_revoke_lock(ConsulBackend::revoke_lock),
    )
}
