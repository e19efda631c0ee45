//! `latchkey lock NAME -- CMD…`: run a command while holding a lock.

use crate::args::{Cli, LockArgs};
use crate::exit;
use latchkey::prelude::*;
use std::process::ExitCode;
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};

type Res = Result<ExitCode, Box<dyn std::error::Error>>;

fn send_signal(child: &tokio::process::Child, sig: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own; no memory involved.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

fn status_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c.clamp(0, 255) as u8),
        (None, Some(s)) => ExitCode::from((128 + s).clamp(0, 255) as u8),
        _ => ExitCode::from(exit::ERROR),
    }
}

pub async fn run(cli: &Cli, a: &LockArgs) -> Res {
    let coord = latchkey::connect(&cli.url).await?;
    let opts = LockOptions {
        ttl: a.ttl,
        wait: a.wait,
    };
    let guard = if a.wait.is_some_and(|w| w.is_zero()) {
        match coord.try_lock(&a.name, opts).await? {
            Some(g) => g,
            None => {
                eprintln!("latchkey: lock {:?} is held by someone else", a.name);
                return Ok(ExitCode::from(exit::LOCK_TIMEOUT));
            }
        }
    } else {
        match coord.lock(&a.name, opts).await {
            Ok(g) => g,
            Err(Error::Timeout { after, .. }) => {
                eprintln!("latchkey: lock {:?} not acquired within {after:?}", a.name);
                return Ok(ExitCode::from(exit::LOCK_TIMEOUT));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let token = guard.fencing_token();
    let env = [
        ("LATCHKEY_FENCING_TOKEN", token.to_string()),
        ("LATCHKEY_LOCK_NAME", a.name.clone()),
    ];
    let what = format!("lock {:?} (token {token})", a.name);
    let code = supervise(&a.command, &env, guard.lost(), a.grace, &what).await?;
    // A lost lock has nothing left to release (and its server may be gone).
    if !guard.is_lost() {
        guard.release().await?;
    }
    Ok(code)
}

/// Runs `command` with `env` until it exits (its status is returned) or
/// `lost` completes (SIGTERM, SIGKILL after `grace`, exit 75). Our own
/// SIGTERM/SIGINT are passed on to the command. Shared by `lock` and `elect`.
pub async fn supervise(
    command: &[String],
    env: &[(&str, String)],
    lost: impl std::future::Future<Output = ()>,
    grace: std::time::Duration,
    what: &str,
) -> Res {
    let mut child = match Command::new(&command[0])
        .args(&command[1..])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("latchkey: cannot run {:?}: {e}", command[0]);
            return Ok(ExitCode::from(exit::CANNOT_RUN));
        }
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::pin!(lost);
    loop {
        tokio::select! {
            status = child.wait() => return Ok(status_code(status?)),
            _ = &mut lost => {
                eprintln!("latchkey: {what} was lost; terminating the command");
                send_signal(&child, libc::SIGTERM);
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    child.kill().await?;
                }
                return Ok(ExitCode::from(exit::LOCK_LOST));
            }
            // Pass our own termination on to the command.
            _ = term.recv() => send_signal(&child, libc::SIGTERM),
            _ = int.recv() => send_signal(&child, libc::SIGINT),
        }
    }
}
