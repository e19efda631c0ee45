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

use latchkey_core::{Backend, BackendUrl};
use std::sync::Arc;

fn main() -> std::process::ExitCode {
    latchkey_conformance::run("consul", |ns: String| async move {
        let base = latchkey_testkit::consul().url().to_string();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = BackendUrl::parse(&format!("{base}{sep}namespace={ns}"))?;
        Ok(latchkey_consul::connect(url).await? as Arc<dyn Backend>)
    })
}
