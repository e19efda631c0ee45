//! The shared conformance suite against a standalone ZooKeeper (the
//! testkit's, or `LATCHKEY_TEST_ZOOKEEPER_URL`), with handles in the
//! linearizable read mode so that the suite's linearizability cases run,
//! and request counts so that its no-polling case runs.

mod support;

fn main() -> std::process::ExitCode {
    let url = support::standalone_url();
    latchkey_conformance::run("zookeeper", support::harness(url))
}
