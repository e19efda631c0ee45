//! A 3-member etcd cluster whose members each run in a Linux network
//! namespace of their own, so one member can be cut off from its peers
//! (member-partition) while clients still reach every member.
//!
//! Per-pair peer proxies (what [`zkpeers`](crate::zkpeers) does for
//! ZooKeeper) cannot work for etcd: member ids derive from the advertised
//! peer URLs, so every member must dial a peer at the one URL that peer
//! advertises. Here every member has an address of its own instead, and the
//! partition is made by routes:
//!
//! - a bridge in the root namespace holds `198.18.N.1/24` (198.18.0.0/15 is
//!   reserved for network benchmarks, RFC 2544, so it is unlikely to clash;
//!   `N` is a /24 no interface or route of this machine uses, chosen under a
//!   file lock so concurrent runs never share one);
//! - member `i` runs as `ip netns exec <ns> etcd …` (`ip` execs in place: the
//!   PID is etcd's) in namespace `latchkey-<pid>-<k>-m<i>`, whose `eth0` is
//!   one end of a veth pair, the other end a port of the bridge; it listens
//!   for clients and peers on `198.18.N.(11+i)`. Members reach each other
//!   over the bridge (layer 2: no `ip_forward`, no machine-wide setting is
//!   changed); this process reaches them directly from the root namespace;
//! - cutting member `v` off: in `v`'s namespace a `blackhole` route to every
//!   peer, in every peer's namespace a `blackhole` route to `v` (routes are
//!   looked up per packet, so established peer connections stall at once);
//!   client traffic (to and from `198.18.N.1`) is untouched. Healing deletes
//!   the routes.
//!
//! Cleanup: on drop the members are killed, the namespaces (and with them
//! the veth pairs) and the bridge deleted; whatever a process could not
//! delete (it was killed) carries its PID in the name and is deleted by the
//! next [`NetCluster::start`] on this machine once that PID is gone. An
//! `atexit` hook also deletes what is left when the process exits without
//! unwinding (`std::process::exit`).

use latchkey_testkit::{probe, ChildProcess};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The client and peer ports (every member has an address of its own).
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// Serializes subnet choice and stale cleanup between processes on one machine.
const LOCK_FILE: &str = "/tmp/latchkey-faults-netns.lock";
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Why the scenario cannot run here, if it cannot: the result of actually
/// creating (and deleting) a namespace and a bridge, once per process.
pub fn available() -> Result<(), &'static str> {
    static PROBED: OnceLock<Result<(), &'static str>> = OnceLock::new();
    *PROBED.get_or_init(probe_once)
}

/// Creates and deletes each kind of thing [`NetCluster::start`] creates: a
/// namespace (CAP_SYS_ADMIN), a bridge and a veth pair into the namespace
/// (CAP_NET_ADMIN).
fn probe_once() -> Result<(), &'static str> {
    const NOT_PERMITTED: &str = "needs root with CAP_NET_ADMIN for network namespaces";
    let pid = std::process::id();
    let ns = format!("latchkey-{pid}-probe");
    let br = format!("lk{pid}-pb");
    let veth = format!("lk{pid}-pv");
    match Command::new("ip").args(["netns", "add", &ns]).output() {
        Err(_) => return Err("needs the `ip` command (iproute2) for network namespaces"),
        Ok(o) if !o.status.success() => return Err(NOT_PERMITTED),
        Ok(_) => {}
    }
    let steps: [&[&str]; 2] = [
        &["link", "add", &br, "type", "bridge"],
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ],
    ];
    let mut verdict = Ok(());
    for step in steps {
        if let Err(e) = ip(step) {
            let denied = ["not permitted", "Permission denied"]
                .iter()
                .any(|w| e.contains(w));
            verdict = Err(if denied {
                NOT_PERMITTED
            } else {
                "needs the kernel's bridge and veth link types for network namespaces"
            });
            break;
        }
    }
    let _ = ip(&["link", "del", &veth]);
    let _ = ip(&["link", "del", &br]);
    let _ = ip(&["netns", "del", &ns]);
    verdict
}

/// Runs `ip args…`; the error names the command and what `ip` said.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces and links this process created and has not deleted yet,
/// deleted by the `atexit` hook.
static LEFT: Mutex<Vec<Resource>> = Mutex::new(Vec::new());

#[derive(Clone, Debug, PartialEq, Eq)]
enum Resource {
    Netns(String),
    Link(String),
}

impl Resource {
    fn delete(&self) {
        let _ = match self {
            Resource::Netns(n) => ip(&["netns", "del", n]),
            Resource::Link(l) => ip(&["link", "del", l]),
        };
    }
}

extern "C" fn delete_left_at_exit() {
    let left = std::mem::take(&mut *LEFT.lock().unwrap_or_else(|p| p.into_inner()));
    for r in left {
        r.delete();
    }
}

fn remember(r: Resource) {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        // SAFETY: registers a plain `extern "C" fn()`; failure only loses the hook.
        unsafe {
            libc::atexit(delete_left_at_exit);
        }
    });
    LEFT.lock().unwrap_or_else(|p| p.into_inner()).push(r);
}

fn forget(r: &Resource) {
    LEFT.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|x| x != r);
}

/// An exclusive `flock` on [`LOCK_FILE`], released on drop.
struct FileLock(std::fs::File);

impl FileLock {
    fn take() -> Result<FileLock, String> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .map_err(|e| format!("{LOCK_FILE}: {e}"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "flock {LOCK_FILE}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlock of a descriptor we own (closing it would also unlock).
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// The PID in the name of a namespace or link this module creates, `None`
/// for any other name (so nothing else is ever deleted): namespaces
/// `latchkey-<pid>-<k>-m<i>` and `latchkey-<pid>-probe`, links
/// `lk<pid>-<k>b`, `lk<pid>-<k>r<i>`, `lk<pid>-pb`, `lk<pid>-pv`.
fn owner_pid(name: &str) -> Option<i32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (pid, tail) = if let Some(rest) = name.strip_prefix("latchkey-") {
        let (pid, tail) = rest.split_once('-')?;
        let ok = tail == "probe"
            || tail
                .split_once("-m")
                .is_some_and(|(k, i)| digits(k) && digits(i));
        (pid, ok)
    } else {
        let (pid, tail) = name.strip_prefix("lk")?.split_once('-')?;
        let ok = matches!(tail, "pb" | "pv")
            || tail.strip_suffix('b').is_some_and(digits)
            || tail
                .split_once('r')
                .is_some_and(|(k, i)| digits(k) && digits(i));
        (pid, ok)
    };
    if tail && digits(pid) {
        pid.parse().ok()
    } else {
        None
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH))
}

/// Deletes namespaces and links left by processes that are gone (killed
/// before they could clean up). Returns what it deleted.
pub fn sweep_stale() -> Vec<String> {
    let mut gone = Vec::new();
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if owner_pid(name).is_some_and(|p| !pid_alive(p)) && ip(&["netns", "del", name]).is_ok()
            {
                gone.push(format!("netns {name}"));
            }
        }
    }
    if let Ok(list) = ip(&["-o", "link", "show"]) {
        for line in list.lines() {
            // `7: lk123-0b: <BROADCAST,…` or `8: lk123-0r1@if2: …`
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if owner_pid(name).is_some_and(|p| !pid_alive(p)) && ip(&["link", "del", name]).is_ok()
            {
                gone.push(format!("link {name}"));
            }
        }
    }
    gone
}

/// A free /24 of 198.18.0.0/15 (no address or route of this machine in it),
/// starting the search at a PID-derived place; returns its first three octets.
fn free_subnet() -> Result<[u8; 3], String> {
    let used = format!(
        "{}\n{}",
        ip(&["-4", "-o", "addr", "show"])?,
        ip(&["-4", "route", "show", "table", "all"])?
    );
    let start = std::process::id() as usize % 512;
    for k in 0..512 {
        let n = (start + k) % 512;
        let net = [198, 18 + (n / 256) as u8, (n % 256) as u8];
        let prefix = format!("{}.{}.{}.", net[0], net[1], net[2]);
        if !used.contains(&prefix) {
            return Ok(net);
        }
    }
    Err("no free /24 in 198.18.0.0/15".into())
}

fn etcd_program() -> PathBuf {
    std::env::var_os("LATCHKEY_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

struct Member {
    ns: String,
    addr: Ipv4Addr,
    /// `None` until its etcd started.
    proc: Mutex<Option<ChildProcess>>,
}

/// The cluster. Everything it created is deleted on drop.
pub struct NetCluster {
    members: Vec<Member>,
    /// What to delete on drop, in reverse order of creation (veths before
    /// their namespaces, the bridge last).
    resources: Vec<Resource>,
    /// The member currently cut off, if any.
    isolated: Mutex<Option<usize>>,
    dir: PathBuf,
}

impl NetCluster {
    /// Starts 3 members (`--heartbeat-interval 50 --election-timeout 500`, as
    /// the testkit's clusters) and waits until all are healthy with a leader.
    pub fn start() -> Result<NetCluster, String> {
        available().map_err(String::from)?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let k = NEXT.fetch_add(1, Ordering::SeqCst) % 1000;
        let mut c = NetCluster {
            members: Vec::new(),
            resources: Vec::new(),
            isolated: Mutex::new(None),
            dir: std::env::temp_dir().join(latchkey_testkit::unique_namespace(
                "latchkey-faults-etcd-netns",
            )),
        };
        // `c` deletes whatever was created so far if a step fails.
        {
            let _lock = FileLock::take()?;
            for g in sweep_stale() {
                eprintln!("[faults] deleted stale {g}");
            }
            let net = free_subnet()?;
            let br = format!("lk{pid}-{k}b");
            ip(&["link", "add", &br, "type", "bridge"])?;
            c.track(Resource::Link(br.clone()));
            let gw = format!("{}.{}.{}.1/24", net[0], net[1], net[2]);
            ip(&["addr", "add", &gw, "dev", &br])?;
            ip(&["link", "set", &br, "up"])?;
            for i in 0..3 {
                let ns = format!("latchkey-{pid}-{k}-m{i}");
                ip(&["netns", "add", &ns])?;
                c.track(Resource::Netns(ns.clone()));
                let host = format!("lk{pid}-{k}r{i}");
                ip(&[
                    "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ])?;
                // Deleted explicitly: a namespace's links vanish only once
                // the kernel has torn it down, which happens later.
                c.track(Resource::Link(host.clone()));
                ip(&["link", "set", &host, "master", &br])?;
                ip(&["link", "set", &host, "up"])?;
                let addr = Ipv4Addr::new(net[0], net[1], net[2], 11 + i);
                ip(&["-n", &ns, "link", "set", "lo", "up"])?;
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
                c.members.push(Member {
                    ns,
                    addr,
                    proc: Mutex::new(None),
                });
            }
        }
        let initial = c
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("n{}=http://{}:{PEER_PORT}", i + 1, m.addr))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("latchkey-{pid}-{k}");
        for (i, m) in c.members.iter().enumerate() {
            let d = c.dir.join(format!("n{}", i + 1));
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            let client = format!("http://{}:{CLIENT_PORT}", m.addr);
            let peer = format!("http://{}:{PEER_PORT}", m.addr);
            // etcd's stderr (its log, and warnings of packages that ignore
            // `--log-outputs`, e.g. every failed /health probe) goes to a
            // file, not ours. `ip` and `sh` exec in place: the PID is etcd's.
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &m.ns])
                .args(["sh", "-c", "exec 2>>\"$0\"; exec \"$@\""])
                .arg(d.join("etcd.log"))
                .arg(etcd_program())
                .args(["--name", &format!("n{}", i + 1)])
                .arg("--data-dir")
                .arg(d.join("data"))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-token", &token])
                .args(["--initial-cluster-state", "new"])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .current_dir(&d);
            let child = ChildProcess::spawn(cmd).map_err(|e| format!("etcd in {}: {e}", m.ns))?;
            *m.proc.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        }
        c.wait_serving(Duration::from_secs(60))?;
        Ok(c)
    }

    fn track(&mut self, r: Resource) {
        remember(r.clone());
        self.resources.push(r);
    }

    /// Client address of each member.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.members
            .iter()
            .map(|m| SocketAddr::from((m.addr, CLIENT_PORT)))
            .collect()
    }

    /// `/v3/maintenance/status` of member `i`: (its id, the leader it knows).
    fn status(&self, i: usize) -> Option<(String, Option<String>)> {
        let (code, body) = probe::http(
            SocketAddr::from((self.members[i].addr, CLIENT_PORT)),
            "POST",
            "/v3/maintenance/status",
            Some("{}"),
            PROBE_TIMEOUT,
        )
        .ok()?;
        if code != 200 {
            return None;
        }
        let id = probe::json_string_field(&body, "member_id")?;
        let leader = probe::json_string_field(&body, "leader").filter(|l| l != "0");
        Some((id, leader))
    }

    /// Index of the leader the members that can reach a quorum agree on.
    pub fn leader(&self) -> Option<usize> {
        let st: Vec<_> = (0..self.members.len()).map(|i| self.status(i)).collect();
        let ids: Vec<Option<&str>> = st
            .iter()
            .map(|s| s.as_ref().map(|(id, _)| id.as_str()))
            .collect();
        // A leader that a majority names: an isolated old leader may still
        // name itself for an election timeout.
        (0..self.members.len()).find(|&i| {
            let Some(id) = ids[i] else { return false };
            st.iter()
                .filter(|s| {
                    s.as_ref()
                        .and_then(|(_, l)| l.as_deref())
                        .is_some_and(|l| l == id)
                })
                .count()
                * 2
                > self.members.len()
        })
    }

    /// Waits until every member reports itself healthy and a leader is agreed on.
    pub fn wait_serving(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let health: Vec<bool> = self
                .client_addrs()
                .iter()
                .map(|a| probe::etcd_health(*a, PROBE_TIMEOUT).is_ok())
                .collect();
            if health.iter().all(|h| *h) && self.leader().is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd cluster in network namespaces not serving after {timeout:?}: \
                     healthy {health:?}; {}",
                    self.describe()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Cuts member `v` off from its peers, or with `None` heals (deletes the
    /// blackhole routes). Client traffic to every member keeps flowing.
    pub fn isolate(&self, v: Option<usize>) -> Result<(), String> {
        let mut cur = self.isolated.lock().unwrap_or_else(|p| p.into_inner());
        let routes = |v: usize, add: bool| -> Result<(), String> {
            let verb = if add { "add" } else { "del" };
            let mut first_err = None;
            for (j, peer) in self.members.iter().enumerate() {
                if j == v {
                    continue;
                }
                let me = &self.members[v];
                for (ns, to) in [(&me.ns, peer.addr), (&peer.ns, me.addr)] {
                    let dst = format!("{to}/32");
                    if let Err(e) = ip(&["-n", ns, "route", verb, "blackhole", &dst]) {
                        first_err.get_or_insert(e);
                    }
                }
            }
            first_err.map_or(Ok(()), Err)
        };
        if let Some(old) = cur.take() {
            routes(old, false)?;
        }
        if let Some(v) = v {
            *cur = Some(v);
            routes(v, true)?;
        }
        Ok(())
    }

    /// What each member says about itself (for messages): `i=leader`,
    /// `i=follower`, `i=no-leader` or `i=down`.
    pub fn describe(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                let s = match self.status(i) {
                    None => "down",
                    Some((_, None)) => "no-leader",
                    Some((id, Some(l))) if id == l => "leader",
                    Some(_) => "follower",
                };
                format!("{}={s}", i + 1)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// PID of member `i` (etcd itself: `ip netns exec` execs in place).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i]
            .proc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.pid())
    }

    /// The namespace names (for tests).
    pub fn namespaces(&self) -> Vec<String> {
        self.members.iter().map(|m| m.ns.clone()).collect()
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        for m in &self.members {
            if let Some(c) = m.proc.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                let _ = c.kill();
            }
        }
        // Veths before their namespaces, the bridge last.
        for r in self.resources.iter().rev() {
            r.delete();
            forget(r);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn only_names_this_module_creates_carry_an_owner() {
        for (name, pid) in [
            ("latchkey-123-0-m2", Some(123)),
            ("latchkey-123-probe", Some(123)),
            ("lk123-7b", Some(123)),
            ("lk123-7r0", Some(123)),
            ("lk123-pb", Some(123)),
            ("lk123-pv", Some(123)),
            ("latchkey-123-other", None),
            ("latchkey-x-0-m1", None),
            ("lk123-eth", None),
            ("lkx-7b", None),
            ("lk123", None),
            ("eth0", None),
        ] {
            assert_eq!(owner_pid(name), pid, "{name}");
        }
    }
}
