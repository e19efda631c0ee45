//! The whole suite over mem with capabilities declared absent
//! (`watch_resume`, `native_ttl`, `global_revision`, `linearizable_reads`): shows gated cases reported as ignored with their
//! reason and the adapting cases passing.
//! `cargo test -p latchkey-conformance --test gated`

#[allow(dead_code)]
mod broken;

use broken::{instrumented, Bug};
use latchkey_core::Capabilities;

fn main() -> std::process::ExitCode {
    let mut caps = Capabilities::full();
    caps.watch_resume = false;
    caps.native_ttl = false;
    caps.global_revision = false;
    caps.linearizable_reads = false;
    latchkey_conformance::run("mem-stripped", instrumented(Bug::None, Some(caps)))
}
