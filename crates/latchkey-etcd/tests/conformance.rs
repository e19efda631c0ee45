//! The shared conformance suite against one real etcd (the testkit's shared
//! single node, or `LATCHKEY_TEST_ETCD_URL`): every case gets a new handle
//! (its own channel and leases) in its own namespace. The harness counts
//! each handle's requests (so "a waiter does not poll" runs) and can delete
//! a lock entry behind its holder's back.

use latchkey_conformance::harness::Instrumented;
use latchkey_core::BackendUrl;
use latchkey_etcd::EtcdBackend;
use std::sync::Arc;

fn main() -> std::process::ExitCode {
    let base = BackendUrl::parse(latchkey_testkit::etcd().url()).expect("the testkit's URL");
    let harness = Instrumented::new(move |ns: String| {
        let url = base.with_namespace(&ns);
        async move { Ok(Arc::new(EtcdBackend::connect(&url?).await?)) }
    })
    .with_op_count(EtcdBackend::op_count)
    .with_revoke_lock(EtcdBackend::revoke_lock);
    latchkey_conformance::run("etcd", harness)
}
