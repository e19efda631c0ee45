//! The shared conformance suite against a 3-member ZooKeeper ensemble (the
//! testkit's, or `LATCHKEY_TEST_ZOOKEEPER_ENSEMBLE_URL`), handles connected
//! to all members, in the linearizable read mode.

mod support;

fn main() -> std::process::ExitCode {
    let url = support::ensemble_url();
    latchkey_conformance::run("zookeeper-ensemble", support::harness(url))
}
