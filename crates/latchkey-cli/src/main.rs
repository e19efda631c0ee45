//! `latchkey`: run a command under a distributed lock, inspect a store,
//! measure a backend — the same on every backend.
//!
//! | module | what it holds |
//! |---|---|
//! | [`args`] | the command line (clap) |
//! | [`run_locked`] | `latchkey lock NAME -- CMD…` |
//! | [`elect`] | `latchkey elect NAME -- CMD…` |
//! | [`kv`] | `latchkey kv get|put|del|ls|watch` |
//! | [`check`] | `latchkey check`: the non-destructive conformance cases against a live deployment |
//! | [`bench`](mod@bench) | `latchkey bench --workload W1|W2|W3` |
//! | [`exit`] | exit codes |

mod args;
mod bench;
mod check;
mod elect;
mod exit;
mod kv;
mod run_locked;

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let result = match &cli.command {
        args::Command::Lock(a) => run_locked::run(&cli, a).await,
        args::Command::Elect(a) => elect::run(&cli, a).await,
        args::Command::Kv(a) => kv::run(&cli, a).await,
        args::Command::Bench(a) => bench::run(&cli, a).await,
        args::Command::Check => check::run(&cli).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            } else {
                eprintln!("latchkey: {e}");
            }
            ExitCode::from(exit::ERROR)
        }
    }
}
