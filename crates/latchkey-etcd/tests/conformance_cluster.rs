//! The shared conformance suite against a real 3-member etcd cluster (the testkit's shared
//! cluster, or `LATCHKEY_TEST_ETCD_CLUSTER_URL`), with every member in the URL: every case gets a new handle
//! (its own channel and leases) in its own namespace. The harness counts
//! each handle's requests (so "a waiter does not poll" runs) and can delete
//! a lock entry behind its holder's back.

use latchkey_conformance::harness::Instrumented;
use latchkey_core::BackendUrl;
use latchkey_etcd::EtcdBackend;
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
    let base = latchkey_testkit::etcd_cluster().url().to_string();
    let harness = Instrumented::new(move |ns: String| {
        let base = base.clone();
        async move {
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = BackendUrl::parse(&format!("{base}{sep}namespace={}", encode(&ns)))?;
            Ok(Arc::new(EtcdBackend::connect(&url).await?))
        }
    })
    .with_op_count(EtcdBackend::op_count)
    .with_revoke_lock(EtcdBackend::revoke_lock);
    latchkey_conformance::run("etcd-cluster", harness)
}
