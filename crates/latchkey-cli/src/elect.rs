//! `latchkey elect NAME -- CMD…`: run a command only while this process
//! leads (the election recipe), with `LATCHKEY_LEADER_TERM` in its
//! environment; the term is a fencing token.

use crate::args::{Cli, ElectArgs};
use crate::run_locked::supervise;
use latchkey::recipes::Election;
use std::process::ExitCode;

type Res = Result<ExitCode, Box<dyn std::error::Error>>;

pub async fn run(cli: &Cli, a: &ElectArgs) -> Res {
    let coord = latchkey::connect(&cli.url).await?;
    let election = Election::new(coord.backend().clone(), a.name.clone())?.with_ttl(a.ttl);
    let value = a
        .value
        .clone()
        .unwrap_or_else(|| format!("pid {}", std::process::id()));
    let leadership = election.campaign(value).await?;
    let term = leadership.term();
    let env = [
        ("LATCHKEY_LEADER_TERM", term.to_string()),
        ("LATCHKEY_ELECTION", a.name.clone()),
    ];
    let what = format!("leadership of {:?} (term {term})", a.name);
    let code = supervise(&a.command, &env, leadership.lost(), a.grace, &what).await?;
    if !leadership.is_lost() {
        leadership.resign().await?;
    }
    Ok(code)
}
