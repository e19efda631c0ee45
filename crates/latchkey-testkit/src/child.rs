//! Running part of a test in a separate OS process that can be frozen with SIGSTOP.
//!
//! A lock holder that runs in its own process models a GC pause faithfully: the
//! holder (and its renewal task) stops, while the rest of the test goes on. The
//! usual pattern re-runs the test binary itself with one test selected:
//!
//! ```no_run
//! use latchkey_testkit::child::{self, ChildProcess};
//! use std::time::Duration;
//!
//! #[test]
//! fn holder_role() {
//!     // Does nothing in the normal run; does the holder's work in the child.
//!     if !child::is_child() { return; }
//!     child::send("ready");
//!     while let Some(cmd) = child::recv() {
//!         if cmd == "quit" { break; }
//!         child::send(&format!("echo {cmd}"));
//!     }
//! }
//!
//! #[test]
//! fn holder_pause() {
//!     let mut holder = ChildProcess::spawn_test("holder_role", &[]).unwrap();
//!     holder.expect("ready", Duration::from_secs(10)).unwrap();
//!     holder.pause().unwrap();   // SIGSTOP: the holder is frozen
//!     holder.resume().unwrap();  // SIGCONT
//!     holder.send("quit").unwrap();
//! }
//! ```
//!
//! The child is tied to the test process like the servers (`PR_SET_PDEATHSIG`, kill
//! on drop, kill at exit).

use crate::process;
use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Environment variable that marks a process started by [`ChildProcess::spawn_test`].
pub const CHILD_ENV: &str = "LATCHKEY_TESTKIT_CHILD";
/// Prefix of protocol lines on the child's stdout (libtest prints its own lines too).
pub const LINE_PREFIX: &str = "@latchkey-child@ ";

/// True in a process started by [`ChildProcess::spawn_test`].
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// The value given as `role` to [`ChildProcess::spawn_test_role`] (empty if none).
pub fn role() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

/// Child side: sends one line to the parent.
pub fn send(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{LINE_PREFIX}{line}");
    let _ = out.flush();
}

/// Child side: the next line from the parent (`None` when stdin closes).
pub fn recv() -> Option<String> {
    let mut line = String::new();
    match io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_string()),
    }
}

/// A child process with a line-based protocol on stdin/stdout, and fault hooks.
/// Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    exited: Option<ExitStatus>,
}

impl ChildProcess {
    /// Spawns `cmd` with piped stdin/stdout/stderr. Every stdout line is a message
    /// for [`ChildProcess::recv`]; stderr lines are forwarded to the test's stderr
    /// (captured by libtest like the test's own output).
    pub fn spawn(cmd: Command) -> io::Result<ChildProcess> {
        Self::spawn_filtered(cmd, None)
    }

    /// Re-runs the current test binary with only the test `test_name` (exact name,
    /// e.g. `holder_role` or `module::holder_role`), `--nocapture`, and
    /// [`CHILD_ENV`] set. Only lines the child writes with [`send`] are messages.
    pub fn spawn_test(test_name: &str, env: &[(&str, &str)]) -> io::Result<ChildProcess> {
        Self::spawn_test_role(test_name, "1", env)
    }

    /// Like [`ChildProcess::spawn_test`], with [`role`] returning `role` in the child.
    pub fn spawn_test_role(
        test_name: &str,
        role: &str,
        env: &[(&str, &str)],
    ) -> io::Result<ChildProcess> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, role);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn_filtered(cmd, Some(LINE_PREFIX))
    }

    fn spawn_filtered(mut cmd: Command, prefix: Option<&'static str>) -> io::Result<ChildProcess> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = process::spawn_tied(cmd)?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let pid = child.id();
        // Forwarded with eprintln! from a thread spawned by the calling test, so
        // libtest's output capture applies: shown only when that test fails.
        std::thread::Builder::new()
            .name(format!("latchkey-child-{pid}-stderr"))
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[child {pid}] {line}");
                }
            })?;
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("latchkey-child-{}", child.id()))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let msg = match prefix {
                        // libtest may have written `test name ... ` before it on the same line.
                        Some(p) => match line.find(p) {
                            Some(i) => line[i + p.len()..].to_string(),
                            None => continue,
                        },
                        None => line,
                    };
                    if tx.send(msg).is_err() {
                        break;
                    }
                }
            })?;
        Ok(ChildProcess {
            child,
            stdin,
            lines: rx,
            exited: None,
        })
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one line to the child's stdin.
    pub fn send(&mut self, line: &str) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stdin closed"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()
    }

    /// Closes the child's stdin (its [`recv`] then returns `None`).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next message, waiting at most `timeout` (`TimedOut`), or `UnexpectedEof`
    /// when the child closed its stdout.
    pub fn recv(&self, timeout: Duration) -> io::Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no line from child {} within {timeout:?}", self.child.id()),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("child {} closed its stdout", self.child.id()),
            )),
        }
    }

    /// Waits for the message `expected`, skipping others, within `timeout`.
    pub fn expect(&self, expected: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.recv(left)?;
            if line == expected {
                return Ok(());
            }
        }
    }

    /// Freezes the child (SIGSTOP) and returns once every thread has stopped.
    pub fn pause(&self) -> io::Result<()> {
        process::stop(self.child.id())
    }

    /// Thaws the child (SIGCONT).
    pub fn resume(&self) -> io::Result<()> {
        process::signal(self.child.id(), libc::SIGCONT)
    }

    /// Kills the child (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> io::Result<()> {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = Some(self.child.wait()?);
            process::forget_pid(self.child.id());
        }
        Ok(())
    }

    /// Waits for the child to exit by itself, at most `timeout` (`TimedOut`).
    pub fn wait(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        if let Some(s) = self.exited {
            return Ok(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                process::forget_pid(self.child.id());
                self.exited = Some(s);
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("child {} still running after {timeout:?}", self.child.id()),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            process::kill_and_reap(&mut self.child);
        }
    }
}
