//! The shared conformance suite over one shared [`MemStore`]: every case
//! gets a fresh handle in its own namespace, as a separate client would.
//! Instrumented, so the cases that count requests (no polling) and revoke a
//! holder's entry behind its back run too.

use latchkey_conformance::harness::Instrumented;
use latchkey_mem::{MemBackend, MemStore};

fn main() -> std::process::ExitCode {
    let store = MemStore::new();
    latchkey_conformance::run(
        "mem",
        Instrumented::new(move |ns: String| {
            let store = store.clone();
            async move { store.handle(&ns) }
        })
        .with_op_count(MemBackend::op_count)
        .with_revoke_lock(MemBackend::revoke_lock),
    )
}
