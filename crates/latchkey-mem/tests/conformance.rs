//! The shared conformance suite over one shared [`MemStore`]: every case
//! gets a fresh handle in its own namespace, as a separate client would.

use latchkey_core::Backend;
use latchkey_mem::MemStore;
use std::sync::Arc;

fn main() -> std::process::ExitCode {
    let store = MemStore::new();
    latchkey_conformance::run("mem", move |ns: String| {
        let store = store.clone();
        async move { Ok(store.handle(&ns)? as Arc<dyn Backend>) }
    })
}
