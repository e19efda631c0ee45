//! Spawning children whose life is tied to the test process.
//!
//! Three layers make sure no server outlives the test binary that started it:
//! 1. `prctl(PR_SET_PDEATHSIG, SIGKILL)` in every child (set in `pre_exec`), so the
//!    kernel kills it when its parent goes away, even on SIGKILL of the test binary.
//!    The "parent" of that signal is the *thread* that forked: libtest runs every test
//!    on a short-lived thread, so all children are forked by one dedicated spawner
//!    thread that lives as long as the process.
//! 2. Handles kill their process on `Drop`.
//! 3. Shared servers live in statics, which never drop: an `atexit` handler kills
//!    (and reaps) every child still registered and removes the registered temp dirs.

use std::collections::HashMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, Once, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("latchkey-testkit-spawner".into())
            .spawn(move || {
                // The sender lives in a static, so this loop (and the thread that is the
                // PDEATHSIG parent of every child) lasts until the process exits.
                for mut req in rx {
                    let result = req.cmd.spawn();
                    let _ = req.reply.send(result);
                }
            })
            .expect("latchkey-testkit: cannot start the spawner thread");
        tx
    })
}

/// Registry of what the `atexit` handler must clean up.
#[derive(Default)]
struct Registry {
    pids: HashMap<u32, ()>,
    dirs: HashMap<PathBuf, ()>,
}

fn registry() -> &'static Mutex<Registry> {
    static REG: OnceLock<Mutex<Registry>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut guard = registry().lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard)
}

extern "C" fn cleanup_at_exit() {
    // Never block forever at exit: another thread may hold the lock while the
    // process exits (it only ever holds it for a map operation).
    let mut guard = None;
    for _ in 0..200 {
        match registry().try_lock() {
            Ok(g) => {
                guard = Some(g);
                break;
            }
            Err(std::sync::TryLockError::Poisoned(p)) => {
                guard = Some(p.into_inner());
                break;
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
        }
    }
    let Some(mut reg) = guard else { return };
    let pids: Vec<u32> = reg.pids.drain().map(|(p, _)| p).collect();
    for &pid in &pids {
        // SAFETY: plain syscalls on PIDs this process spawned and has not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    for &pid in &pids {
        let mut status = 0;
        // SAFETY: see above; reaping our own child.
        unsafe {
            libc::waitpid(pid as libc::pid_t, &mut status, 0);
        }
    }
    for (dir, _) in reg.dirs.drain() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn ensure_atexit() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registering a plain `extern "C" fn()`.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
    });
}

/// Spawns `cmd` from the long-lived spawner thread with `PR_SET_PDEATHSIG = SIGKILL`
/// and records its PID for the exit-time cleanup. Call [`forget_pid`] after reaping it.
pub(crate) fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    ensure_atexit();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would
            // send the signal, so give up instead of running as an orphan.
            if libc::getppid() != parent {
                return Err(io::Error::other("parent exited before exec"));
            }
            // A process group of its own: when any process of the test's group exits
            // and that group is orphaned (common under CI runners), the kernel sends
            // SIGHUP + SIGCONT to every stopped member, which would thaw a paused
            // server or kill it. Terminal Ctrl-C still works through PDEATHSIG.
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .send(SpawnRequest { cmd, reply: tx })
        .map_err(|_| io::Error::other("latchkey-testkit spawner thread is gone"))?;
    let child = rx
        .recv()
        .map_err(|_| io::Error::other("latchkey-testkit spawner thread is gone"))??;
    with_registry(|r| r.pids.insert(child.id(), ()));
    Ok(child)
}

/// Kills (SIGKILL) and reaps a child spawned by [`spawn_tied`], and forgets its PID.
pub(crate) fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
    forget_pid(child.id());
}

/// Removes a PID from the exit-time cleanup (after it has been reaped).
pub(crate) fn forget_pid(pid: u32) {
    with_registry(|r| r.pids.remove(&pid));
}

/// Sends a signal to a process.
pub(crate) fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends SIGSTOP and waits until every thread of `pid` has stopped.
///
/// `kill(SIGSTOP)` returns before the stop happens: one thread dequeues the signal
/// and then stops the others, so a thread woken by I/O in the meantime can still run
/// (seen on a loaded 2-core machine). A pause that is not yet in effect would make
/// fault tests flaky, so wait for `/proc/<pid>/task/*/stat` to show `T` everywhere.
pub(crate) fn stop(pid: u32) -> io::Result<()> {
    signal(pid, libc::SIGSTOP)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if all_threads_stopped(pid)? {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("process {pid} did not stop within 5 s of SIGSTOP"),
            ));
        }
        std::thread::yield_now();
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

fn all_threads_stopped(pid: u32) -> io::Result<bool> {
    let mut any = false;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(entry) = entry else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue; // the thread just exited
        };
        // The state follows the parenthesised command name, which may contain spaces.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        match state {
            Some('T') | Some('t') | Some('Z') | Some('X') => any = true,
            Some(_) => return Ok(false),
            None => {}
        }
    }
    Ok(any)
}

/// A temporary directory, removed on drop and, if still present, at process exit.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/latchkey-<label>-<pid>-<unique>`; the name is unique so that
    /// `pgrep -f <name>` finds exactly the processes started with it.
    pub(crate) fn new(label: &str) -> io::Result<TempDir> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale_dirs);
        let path = std::env::temp_dir().join(format!("latchkey-{label}-{}", unique_suffix()));
        std::fs::create_dir_all(&path)?;
        ensure_atexit();
        with_registry(|r| r.dirs.insert(path.clone(), ()));
        Ok(TempDir { path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        with_registry(|r| r.dirs.remove(&self.path));
    }
}

/// Removes temp dirs left by test processes that died by SIGKILL (the only way to
/// skip both `Drop` and `atexit`): `latchkey-<label>-<pid>-<hex>-<n>` whose `<pid>`
/// no longer exists. Runs once per process.
fn sweep_stale_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("latchkey-") else {
            continue;
        };
        let parts: Vec<&str> = rest.rsplitn(4, '-').collect();
        let [n, hex, pid, _label] = parts[..] else {
            continue;
        };
        let ours = n.parse::<u64>().is_ok()
            && hex.len() >= 8
            && u64::from_str_radix(hex, 16).is_ok()
            && pid.parse::<u32>().is_ok();
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// `<pid>-<time-based>-<counter>`: unique within and across processes on this host.
pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{}-{:x}-{n}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

/// A cheap pseudo-random number (jitter, names); not for anything secure.
pub(crate) fn pseudo_random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ seed;
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
