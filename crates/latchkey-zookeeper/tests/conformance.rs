//! The shared conformance suite against a standalone ZooKeeper, in the
//! linearizable read mode (so the suite's linearizability cases run).

use latchkey_core::{Backend, BackendUrl};
use std::sync::Arc;

fn main() -> std::process::ExitCode {
    let base = std::env::var("LATCHKEY_TEST_ZOOKEEPER_URL").expect("LATCHKEY_TEST_ZOOKEEPER_URL");
    latchkey_conformance::run("zookeeper", move |ns: String| {
        let base = base.clone();
        async move {
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = BackendUrl::parse(&format!("{base}{sep}namespace={ns}&reads=linearizable&ttl_check_interval=100ms"))?;
            Ok(latchkey_zookeeper::connect(url).await? as Arc<dyn Backend>)
        }
    })
}
