//! Real servers as child processes: spawning, readiness, fault hooks.

use crate::bins;
use crate::probe;
use crate::process::{self, TempDir};
use crate::{Error, Result};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `leader()` waits for an election to settle.
const LEADER_TIMEOUT: Duration = Duration::from_secs(15);

/// Which server a handle is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `redis-server` (single servers, and the nodes of a Redis Cluster)
    Redis,
    /// `etcd`
    Etcd,
    /// ZooKeeper (`java … ZooKeeperServerMain` / `QuorumPeerMain`)
    ZooKeeper,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Etcd => "etcd",
            Kind::ZooKeeper => "zookeeper",
        }
    }
}

/// TLS files for a server (PEM). Pass them in [`RedisOptions::tls`] / [`EtcdOptions::tls`].
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA certificate that signed `cert` (PEM); clients trust this one.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// Generates, with the `openssl` CLI, a throwaway CA and a server certificate for
    /// `127.0.0.1` and `localhost` (also usable as a client certificate), in a temp
    /// dir removed at process exit. Prefer the shared [`crate::test_tls`].
    pub fn generate() -> Result<TlsFiles> {
        let dir = TempDir::new("tls")?;
        let d = dir.path().to_path_buf();
        // Removed at exit by the registry; the files must outlive this call.
        std::mem::forget(dir);
        let openssl = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&d)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Error::Missing {
                        what: "openssl".into(),
                        install: "apt-get update && apt-get install -y openssl".into(),
                    },
                    _ => Error::io("run openssl", e),
                })?;
            if out.status.success() {
                Ok(())
            } else {
                Err(Error::Invalid(format!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                )))
            }
        };
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "3650",
            "-subj",
            "/CN=latchkey test CA",
        ]);
        openssl(&ca)?;
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(&csr)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "3650",
            "-extfile",
            "server.ext",
        ])?;
        Ok(TlsFiles {
            cert: d.join("server.pem"),
            key: d.join("server.key"),
            ca: d.join("ca.pem"),
        })
    }
}

/// Options for [`spawn_redis`](crate::spawn_redis).
///
/// In `args`, `{port}` and `{dir}` are replaced by the server's port and data dir.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// Extra command-line arguments (e.g. an ACL: `--user default off --user alice on '>pw' '~*' '&*' '+@all'`).
    pub args: Vec<String>,
    /// `--enable-debug-command local`, for `DEBUG SLEEP` fault injection.
    pub debug_command: bool,
    /// Serve TLS only (`--port 0 --tls-port P`, no client certificates); the URL becomes `rediss://`.
    pub tls: Option<TlsFiles>,
    /// How long to wait for readiness (default 60 s).
    pub ready_timeout: Option<Duration>,
}

impl RedisOptions {
    /// Adds one extra argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    /// Enables `DEBUG SLEEP` and friends.
    pub fn with_debug_command(mut self) -> Self {
        self.debug_command = true;
        self
    }
}

/// Options for [`spawn_etcd`](crate::spawn_etcd) and [`spawn_etcd_cluster`](crate::spawn_etcd_cluster).
///
/// In `args`, `{port}` and `{dir}` are replaced by the member's client port and data dir.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// `--heartbeat-interval 50 --election-timeout 500` (always on for clusters): fast
    /// elections, and lease TTLs down to ~1 s are granted as asked.
    pub fast_election: bool,
    /// Serve `https://` client URLs with these files (no client certificates); the URL
    /// becomes `etcds://`.
    pub tls: Option<TlsFiles>,
    /// How long to wait for readiness (default 60 s).
    pub ready_timeout: Option<Duration>,
}

impl EtcdOptions {
    /// Adds one extra argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    /// Fast heartbeats and elections (see the field).
    pub fn fast(mut self) -> Self {
        self.fast_election = true;
        self
    }
}

/// Options for [`spawn_zookeeper`](crate::spawn_zookeeper) and
/// [`spawn_zookeeper_ensemble`](crate::spawn_zookeeper_ensemble).
#[derive(Clone, Debug)]
pub struct ZookeeperOptions {
    /// `tickTime` in ms (default 2000). Session timeouts are clamped to 2–20 ticks:
    /// use 200 ([`ZookeeperOptions::fast`]) for fast session-expiry tests.
    pub tick_time_ms: u32,
    /// `-Dzookeeper.extendedTypesEnabled=true` (TTL nodes); default on.
    pub extended_types: bool,
    /// Extra `zoo.cfg` lines (`{port}`/`{dir}` replaced), e.g. auth providers.
    pub config: Vec<String>,
    /// Extra JVM arguments (`{port}`/`{dir}` replaced), e.g. `-Dzookeeper.authProvider.1=…`.
    pub jvm_args: Vec<String>,
    /// `-Xmx` in MiB (default 128).
    pub heap_mb: u32,
    /// How long to wait for readiness (default 60 s).
    pub ready_timeout: Option<Duration>,
}

impl Default for ZookeeperOptions {
    fn default() -> Self {
        ZookeeperOptions {
            tick_time_ms: 2000,
            extended_types: true,
            config: Vec::new(),
            jvm_args: Vec::new(),
            heap_mb: 128,
            ready_timeout: None,
        }
    }
}

impl ZookeeperOptions {
    /// `tickTime=200`: 1 s sessions work, elections take ~0.6 s.
    pub fn fast() -> Self {
        ZookeeperOptions {
            tick_time_ms: 200,
            ..Default::default()
        }
    }
    /// Adds one `zoo.cfg` line.
    pub fn config_line(mut self, line: impl Into<String>) -> Self {
        self.config.push(line.into());
        self
    }
    /// Adds one JVM argument.
    pub fn jvm_arg(mut self, a: impl Into<String>) -> Self {
        self.jvm_args.push(a.into());
        self
    }
}

/// How readiness is decided.
#[derive(Clone, Debug)]
enum Ready {
    RedisPing(SocketAddr),
    EtcdHealth(SocketAddr),
    ZkMode(SocketAddr),
    /// The port accepts connections and the log (since this start) contains the text:
    /// used for TLS servers, which raw-TCP probes cannot talk to.
    LogLine(SocketAddr, &'static str),
}

impl Ready {
    fn check(&self, log: &Path, log_from: u64) -> bool {
        match self {
            Ready::RedisPing(a) => probe::redis_ping(*a, PROBE_TIMEOUT).is_ok(),
            Ready::EtcdHealth(a) => probe::etcd_health(*a, PROBE_TIMEOUT).is_ok(),
            Ready::ZkMode(a) => probe::zk_mode(*a, PROBE_TIMEOUT).is_ok(),
            Ready::LogLine(a, text) => {
                // Log first: a bare TCP probe makes a TLS server log a rejected handshake.
                read_log(log, log_from).contains(text)
                    && TcpStream::connect_timeout(a, PROBE_TIMEOUT).is_ok()
            }
        }
    }
}

fn read_log(log: &Path, from: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(log) {
        let _ = f.seek(SeekFrom::Start(from));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        s = String::from_utf8_lossy(&buf).into_owned();
    }
    s
}

fn log_tail(log: &Path, from: u64) -> String {
    let s = read_log(log, from);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Everything needed to (re)start one server process.
#[derive(Debug)]
pub(crate) struct NodeSpec {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    cwd: PathBuf,
    log: PathBuf,
    ready: Ready,
    ready_timeout: Duration,
}

#[derive(Debug, Default)]
struct NodeState {
    child: Option<Child>,
    paused: bool,
    /// Log offset where the current run's output begins.
    log_from: u64,
}

/// One spawned process and the way to start it again.
#[derive(Debug)]
pub(crate) struct Node {
    spec: NodeSpec,
    state: Mutex<NodeState>,
}

impl Node {
    fn new(spec: NodeSpec) -> Node {
        Node {
            spec,
            state: Mutex::new(NodeState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the process (killing a previous run first).
    fn start_locked(&self, st: &mut NodeState) -> Result<()> {
        if let Some(child) = st.child.as_mut() {
            process::kill_and_reap(child);
            st.child = None;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .map_err(|e| Error::io(format!("open {}", self.spec.log.display()), e))?;
        let from = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .current_dir(&self.spec.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| Error::io("dup log", e))?)
            .stderr(log);
        let child = process::spawn_tied(cmd)
            .map_err(|e| Error::io(format!("spawn {}", self.spec.program.display()), e))?;
        st.child = Some(child);
        st.paused = false;
        st.log_from = from;
        Ok(())
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + self.spec.ready_timeout;
        let from = self.lock().log_from;
        loop {
            {
                let mut st = self.lock();
                let Some(child) = st.child.as_mut() else {
                    return Err(Error::NotRunning(self.spec.name.clone()));
                };
                if let Ok(Some(status)) = child.try_wait() {
                    process::forget_pid(child.id());
                    st.child = None;
                    return Err(Error::Start {
                        name: self.spec.name.clone(),
                        reason: format!("exited with {status}"),
                        log: log_tail(&self.spec.log, from),
                    });
                }
            }
            if self.spec.ready.check(&self.spec.log, from) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Start {
                    name: self.spec.name.clone(),
                    reason: format!("not ready after {:?}", self.spec.ready_timeout),
                    log: log_tail(&self.spec.log, from),
                });
            }
            // Polling a condition with a deadline (not a sleep used as synchronisation).
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub(crate) fn start(&self, wait: bool) -> Result<()> {
        {
            let mut st = self.lock();
            self.start_locked(&mut st)?;
        }
        if wait {
            self.wait_ready()
        } else {
            Ok(())
        }
    }

    fn pid(&self) -> Option<u32> {
        self.lock().child.as_ref().map(|c| c.id())
    }

    fn signal(&self, sig: libc::c_int, paused: bool) -> Result<()> {
        let mut st = self.lock();
        let pid = st
            .child
            .as_ref()
            .map(|c| c.id())
            .ok_or_else(|| Error::NotRunning(self.spec.name.clone()))?;
        if sig == libc::SIGSTOP {
            process::stop(pid).map_err(|e| Error::io(format!("SIGSTOP {pid}"), e))?;
        } else {
            process::signal(pid, sig).map_err(|e| Error::io(format!("signal {pid}"), e))?;
        }
        st.paused = paused;
        Ok(())
    }

    fn kill(&self) -> Result<()> {
        let mut st = self.lock();
        let mut child = st
            .child
            .take()
            .ok_or_else(|| Error::NotRunning(self.spec.name.clone()))?;
        process::kill_and_reap(&mut child);
        st.paused = false;
        Ok(())
    }

    fn is_running(&self) -> bool {
        let mut st = self.lock();
        match st.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(child) = st.child.as_mut() {
            process::kill_and_reap(child);
        }
    }
}

/// A server: either spawned by the testkit (fault hooks work) or external (from a
/// `LATCHKEY_TEST_*_URL` variable; fault hooks return [`Error::External`]).
///
/// A spawned server is killed (SIGKILL) and its temp dir removed when the handle
/// drops; shared servers (in statics) are killed at process exit.
#[derive(Debug)]
pub struct Server {
    kind: Kind,
    url: String,
    addr: Option<SocketAddr>,
    node: Option<Node>,
    data_dir: Option<PathBuf>,
    // Declared last: removed after the process is dead.
    _dir: Option<TempDir>,
}

impl Server {
    /// A member of a cluster: a started node whose dir belongs to the cluster's root.
    pub(crate) fn member(kind: Kind, url: String, port: u16, node: Node, dir: PathBuf) -> Server {
        Server {
            kind,
            url,
            addr: Some(loopback(port)),
            node: Some(node),
            data_dir: Some(dir),
            _dir: None,
        }
    }

    pub(crate) fn external(kind: Kind, url: String) -> Server {
        Server {
            kind,
            url,
            addr: None,
            node: None,
            data_dir: None,
            _dir: None,
        }
    }

    /// The URL a latchkey adapter connects with, e.g. `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Which server this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The client address (`None` for an external server).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The client port (`None` for an external server).
    pub fn port(&self) -> Option<u16> {
        self.addr.map(|a| a.port())
    }

    /// True when this handle only carries a URL from the environment.
    pub fn is_external(&self) -> bool {
        self.node.is_none()
    }

    /// The server's data directory (its temp dir), if spawned.
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// The server's log file (stdout and stderr), if spawned.
    pub fn log_path(&self) -> Option<&Path> {
        self.node.as_ref().map(|n| n.spec.log.as_path())
    }

    /// The PID of the running process (`None` when external or killed).
    pub fn pid(&self) -> Option<u32> {
        self.node.as_ref().and_then(Node::pid)
    }

    /// True while the process exists (also when paused).
    pub fn is_running(&self) -> bool {
        self.node.as_ref().is_some_and(Node::is_running)
    }

    fn node(&self) -> Result<&Node> {
        self.node
            .as_ref()
            .ok_or_else(|| Error::External(self.url.clone()))
    }

    /// Freezes the server (SIGSTOP) and returns once every thread has stopped:
    /// connections stay open, nothing is answered.
    pub fn pause(&self) -> Result<()> {
        self.node()?.signal(libc::SIGSTOP, true)
    }

    /// Pauses the server until the returned guard drops (then SIGCONT), so a failing
    /// assertion cannot leave a shared server frozen for the other tests.
    pub fn pause_guard(&self) -> Result<PauseGuard<'_>> {
        self.pause()?;
        Ok(PauseGuard { server: self })
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.node()?.signal(libc::SIGCONT, false)
    }

    /// Kills the server (SIGKILL) and reaps it. [`Server::restart`] brings it back.
    pub fn kill(&self) -> Result<()> {
        self.node()?.kill()
    }

    /// Starts the server again with the same command line, data dir and port (killing
    /// it first if it still runs) and waits until it is ready. For a cluster member
    /// that needs a quorum, the other members must be up; else use
    /// [`Server::restart_no_wait`] and [`Cluster::wait_ready`].
    pub fn restart(&self) -> Result<()> {
        self.node()?.start(true)
    }

    /// Like [`Server::restart`] without waiting for readiness.
    pub fn restart_no_wait(&self) -> Result<()> {
        self.node()?.start(false)
    }

    /// Waits (with the server's readiness deadline) until it answers its probe.
    pub fn wait_ready(&self) -> Result<()> {
        self.node()?.wait_ready()
    }
}

/// Resumes its server when dropped; see [`Server::pause_guard`].
#[derive(Debug)]
#[must_use = "the server resumes when the guard drops"]
pub struct PauseGuard<'a> {
    server: &'a Server,
}

impl PauseGuard<'_> {
    /// Resumes now, reporting an error (dropping the guard ignores it).
    pub fn resume(self) -> Result<()> {
        let r = self.server.resume();
        std::mem::forget(self);
        r
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        let _ = self.server.resume();
    }
}

/// A cluster: an etcd cluster, a ZooKeeper ensemble or a Redis Cluster (kind
/// [`Kind::Redis`]; its helpers are in the crate docs' "Redis Cluster" section), or an
/// external one.
#[derive(Debug)]
pub struct Cluster {
    kind: Kind,
    url: String,
    members: Vec<Server>,
    _dir: Option<TempDir>,
}

impl Cluster {
    /// A cluster of started members; the caller waits for readiness.
    pub(crate) fn from_members(
        kind: Kind,
        url: String,
        members: Vec<Server>,
        root: TempDir,
    ) -> Cluster {
        Cluster {
            kind,
            url,
            members,
            _dir: Some(root),
        }
    }

    pub(crate) fn external(kind: Kind, url: String) -> Cluster {
        Cluster {
            kind,
            url,
            members: Vec::new(),
            _dir: None,
        }
    }

    /// The URL listing every member, e.g. `etcd://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Which server this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The members, each with its own fault hooks (empty for an external cluster).
    pub fn members(&self) -> &[Server] {
        &self.members
    }

    /// True when this handle only carries a URL from the environment.
    pub fn is_external(&self) -> bool {
        self.members.is_empty()
    }

    /// The current leader, waiting (up to 15 s) for an election to settle. etcd: the
    /// member whose id is the `leader` of `/v3/maintenance/status` (plain-HTTP
    /// clusters only); ZooKeeper: the member whose `srvr` says `Mode: leader`.
    /// A Redis Cluster has no single leader: this is [`Error::Invalid`] there (use
    /// [`Cluster::master_of_slot`]).
    pub fn leader(&self) -> Result<&Server> {
        if self.is_external() {
            return Err(Error::External(self.url.clone()));
        }
        if self.kind == Kind::Redis {
            return Err(Error::Invalid(
                "a Redis Cluster has one master per slot range, no single leader; \
                 use master_of_slot / master_of_key"
                    .into(),
            ));
        }
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            if let Some(i) = self.find_leader() {
                return Ok(&self.members[i]);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "no {} leader after {LEADER_TIMEOUT:?}",
                    self.kind.label()
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Index of the leader among [`Cluster::members`].
    pub fn leader_index(&self) -> Result<usize> {
        let leader = self.leader()?;
        Ok(self
            .members
            .iter()
            .position(|m| std::ptr::eq(m, leader))
            .expect("leader is a member"))
    }

    fn find_leader(&self) -> Option<usize> {
        match self.kind {
            Kind::Etcd => {
                let mut ids = Vec::new();
                let mut leader = None;
                for m in &self.members {
                    let status = m.is_running().then(|| {
                        probe::http(
                            m.addr?,
                            "POST",
                            "/v3/maintenance/status",
                            Some("{}"),
                            PROBE_TIMEOUT,
                        )
                        .ok()
                    });
                    let body = status.flatten().map(|(_, b)| b).unwrap_or_default();
                    ids.push(probe::json_string_field(&body, "member_id"));
                    if let Some(l) = probe::json_string_field(&body, "leader") {
                        if l != "0" {
                            leader = Some(l);
                        }
                    }
                }
                let leader = leader?;
                ids.iter().position(|id| id.as_deref() == Some(&leader))
            }
            Kind::ZooKeeper => self.members.iter().position(|m| {
                m.is_running()
                    && m.addr
                        .and_then(|a| probe::zk_mode(a, PROBE_TIMEOUT).ok())
                        .is_some_and(|mode| mode == "leader")
            }),
            Kind::Redis => None,
        }
    }

    /// Waits until every running member answers its readiness probe; for a Redis
    /// Cluster also until every running node reports `cluster_state:ok` and all agree
    /// on who owns every slot (see [`Cluster::wait_cluster_ok`]).
    pub fn wait_ready(&self) -> Result<()> {
        for m in &self.members {
            if m.is_running() {
                m.wait_ready()?;
            }
        }
        if self.kind == Kind::Redis && !self.is_external() {
            self.wait_cluster_ok()?;
        }
        Ok(())
    }
}

/// Picks free loopback ports, never handing out one twice in this process.
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::with_capacity(n);
    // Keep the listeners open until all n are chosen so the kernel gives n distinct ports.
    let mut held = Vec::new();
    while out.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind 127.0.0.1:0", e))?;
        let port = l
            .local_addr()
            .map_err(|e| Error::io("local_addr", e))?
            .port();
        held.push(l);
        if !given.contains(&port) {
            given.push(port);
            out.push(port);
        }
    }
    Ok(out)
}

pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn subst(s: &str, port: u16, dir: &Path) -> String {
    s.replace("{port}", &port.to_string())
        .replace("{dir}", &dir.display().to_string())
}

/// Retries a whole spawn a few times: a free port can be taken by another process
/// between choosing it and the server binding it.
pub(crate) fn with_port_retries<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut last = None;
    for _ in 0..3 {
        match f() {
            Ok(v) => return Ok(v),
            Err(e @ Error::Start { .. }) if e.to_string().contains("ddress already in use") => {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

// ---------------------------------------------------------------- Redis

/// The `redis-server` process for one server (or cluster node) on `port` with data in
/// `d`; `extra` goes before the caller's `opts.args` (so those can override it).
pub(crate) fn redis_node(
    program: &Path,
    opts: &RedisOptions,
    port: u16,
    d: &Path,
    extra: &[String],
) -> Node {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |a: &str| args.push(a.into());
    if let Some(tls) = &opts.tls {
        push("--port");
        push("0");
        push("--tls-port");
        push(&port.to_string());
        push("--tls-cert-file");
        push(&tls.cert.display().to_string());
        push("--tls-key-file");
        push(&tls.key.display().to_string());
        push("--tls-ca-cert-file");
        push(&tls.ca.display().to_string());
        push("--tls-auth-clients");
        push("no");
    } else {
        push("--port");
        push(&port.to_string());
    }
    for a in [
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        // Keep argv (with the unique dir) visible to `pgrep -f`.
        "--set-proc-title",
        "no",
    ] {
        push(a);
    }
    push("--dir");
    push(&d.display().to_string());
    push("--logfile");
    push(&d.join("redis.log").display().to_string());
    if opts.debug_command {
        push("--enable-debug-command");
        push("local");
    }
    for a in extra {
        push(a);
    }
    for a in &opts.args {
        push(&subst(a, port, d));
    }
    let addr = loopback(port);
    let ready = if opts.tls.is_some() {
        Ready::LogLine(addr, "Ready to accept connections")
    } else {
        Ready::RedisPing(addr)
    };
    Node::new(NodeSpec {
        name: format!("redis-server on {addr}"),
        program: program.to_path_buf(),
        args,
        cwd: d.to_path_buf(),
        // Redis writes to --logfile; stdout/stderr only catch early startup errors,
        // and readiness by log line reads the --logfile.
        log: d.join("redis.log"),
        ready,
        ready_timeout: opts.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT),
    })
}

pub(crate) fn spawn_redis(opts: &RedisOptions) -> Result<Server> {
    let program = bins::redis_server()?;
    with_port_retries(|| {
        let dir = TempDir::new("redis")?;
        let port = free_ports(1)?[0];
        let d = dir.path().to_path_buf();
        let node = redis_node(&program, opts, port, &d, &[]);
        node.start(true)?;
        let scheme = if opts.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let addr = loopback(port);
        Ok(Server {
            kind: Kind::Redis,
            url: format!("{scheme}://{addr}"),
            addr: Some(addr),
            node: Some(node),
            data_dir: Some(d),
            _dir: Some(dir),
        })
    })
}

// ---------------------------------------------------------------- etcd

struct EtcdMember {
    name: String,
    client: u16,
    peer: u16,
    dir: PathBuf,
}

fn etcd_node(
    program: &Path,
    m: &EtcdMember,
    initial_cluster: &str,
    token: &str,
    opts: &EtcdOptions,
    fast: bool,
) -> Node {
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let client_url = format!("{scheme}://127.0.0.1:{}", m.client);
    let peer_url = format!("http://127.0.0.1:{}", m.peer);
    let mut args: Vec<String> = vec![
        "--name".into(),
        m.name.clone(),
        "--data-dir".into(),
        m.dir.join("data").display().to_string(),
        "--listen-client-urls".into(),
        client_url.clone(),
        "--advertise-client-urls".into(),
        client_url,
        "--listen-peer-urls".into(),
        peer_url.clone(),
        "--initial-advertise-peer-urls".into(),
        peer_url,
        "--initial-cluster".into(),
        initial_cluster.into(),
        "--initial-cluster-token".into(),
        token.into(),
        "--initial-cluster-state".into(),
        "new".into(),
        "--logger".into(),
        "zap".into(),
        "--log-outputs".into(),
        "stderr".into(),
    ];
    if fast {
        args.extend(["--heartbeat-interval", "50", "--election-timeout", "500"].map(String::from));
    }
    if let Some(tls) = &opts.tls {
        args.push("--cert-file".into());
        args.push(tls.cert.display().to_string());
        args.push("--key-file".into());
        args.push(tls.key.display().to_string());
    }
    args.extend(opts.args.iter().map(|a| subst(a, m.client, &m.dir)));
    let addr = loopback(m.client);
    let ready = if opts.tls.is_some() {
        Ready::LogLine(addr, "serving client traffic securely")
    } else {
        Ready::EtcdHealth(addr)
    };
    Node::new(NodeSpec {
        name: format!("etcd {} on {addr}", m.name),
        program: program.to_path_buf(),
        args: args.into_iter().map(OsString::from).collect(),
        cwd: m.dir.clone(),
        log: m.dir.join("etcd.log"),
        ready,
        ready_timeout: opts.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT),
    })
}

pub(crate) fn spawn_etcd(opts: &EtcdOptions) -> Result<Server> {
    let program = bins::etcd()?;
    with_port_retries(|| {
        let dir = TempDir::new("etcd")?;
        let p = free_ports(2)?;
        let m = EtcdMember {
            name: "n1".into(),
            client: p[0],
            peer: p[1],
            dir: dir.path().to_path_buf(),
        };
        let initial = format!("n1=http://127.0.0.1:{}", m.peer);
        let token = format!("latchkey-{}", process::unique_suffix());
        let node = etcd_node(&program, &m, &initial, &token, opts, opts.fast_election);
        node.start(true)?;
        let addr = loopback(m.client);
        let scheme = if opts.tls.is_some() { "etcds" } else { "etcd" };
        Ok(Server {
            kind: Kind::Etcd,
            url: format!("{scheme}://{addr}"),
            addr: Some(addr),
            node: Some(node),
            data_dir: Some(m.dir),
            _dir: Some(dir),
        })
    })
}

/// A cluster of started members (`(node, client port, data dir)`), ready once
/// every member answers. One place for what etcd clusters and ZooKeeper
/// ensembles share.
fn assemble_cluster(
    kind: Kind,
    scheme: &str,
    root: TempDir,
    started: Vec<(Node, u16, PathBuf)>,
) -> Result<Cluster> {
    let hosts: Vec<String> = started
        .iter()
        .map(|(_, client, _)| format!("127.0.0.1:{client}"))
        .collect();
    let members = started
        .into_iter()
        .map(|(node, client, dir)| {
            let addr = loopback(client);
            Server {
                kind,
                url: format!("{scheme}://{addr}"),
                addr: Some(addr),
                node: Some(node),
                data_dir: Some(dir),
                _dir: None,
            }
        })
        .collect();
    let cluster = Cluster {
        kind,
        url: format!("{scheme}://{}", hosts.join(",")),
        members,
        _dir: Some(root),
    };
    cluster.wait_ready()?;
    Ok(cluster)
}

pub(crate) fn spawn_etcd_cluster(size: usize, opts: &EtcdOptions) -> Result<Cluster> {
    let program = bins::etcd()?;
    if size == 0 {
        return Err(Error::Invalid("a cluster needs at least one member".into()));
    }
    with_port_retries(|| {
        let root = TempDir::new("etcd-cluster")?;
        let ports = free_ports(2 * size)?;
        let members: Vec<EtcdMember> = (0..size)
            .map(|i| {
                let dir = root.path().join(format!("n{}", i + 1));
                EtcdMember {
                    name: format!("n{}", i + 1),
                    client: ports[2 * i],
                    peer: ports[2 * i + 1],
                    dir,
                }
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("latchkey-{}", process::unique_suffix());
        let scheme = if opts.tls.is_some() { "etcds" } else { "etcd" };
        let mut started = Vec::new();
        for m in &members {
            std::fs::create_dir_all(&m.dir).map_err(|e| Error::io("create member dir", e))?;
            let node = etcd_node(&program, m, &initial, &token, opts, true);
            // Start all first: a member is only healthy once a quorum is up.
            node.start(false)?;
            started.push((node, m.client, m.dir.clone()));
        }
        assemble_cluster(Kind::Etcd, scheme, root, started)
    })
}

// ---------------------------------------------------------------- ZooKeeper

struct ZkMember {
    id: usize,
    client: u16,
    quorum: u16,
    election: u16,
    dir: PathBuf,
}

fn zk_node(
    java: &Path,
    classpath: &str,
    m: &ZkMember,
    servers: &[String],
    opts: &ZookeeperOptions,
) -> Result<Node> {
    let data = m.dir.join("data");
    std::fs::create_dir_all(&data).map_err(|e| Error::io("create zk data dir", e))?;
    let mut cfg = format!(
        "tickTime={}\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\nmaxClientCnxns=0\nadmin.enableServer=false\n4lw.commands.whitelist=*\n",
        opts.tick_time_ms,
        data.display(),
        m.client
    );
    for s in servers {
        cfg.push_str(s);
        cfg.push('\n');
    }
    for line in &opts.config {
        cfg.push_str(&subst(line, m.client, &m.dir));
        cfg.push('\n');
    }
    let cfg_path = m.dir.join("zoo.cfg");
    std::fs::write(&cfg_path, cfg).map_err(|e| Error::io("write zoo.cfg", e))?;
    let main = if servers.is_empty() {
        "org.apache.zookeeper.server.ZooKeeperServerMain"
    } else {
        std::fs::write(data.join("myid"), format!("{}\n", m.id))
            .map_err(|e| Error::io("write myid", e))?;
        "org.apache.zookeeper.server.quorum.QuorumPeerMain"
    };
    let mut args: Vec<String> = vec![
        format!("-Xmx{}m", opts.heap_mb),
        "-XX:+UseSerialGC".into(),
        "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn".into(),
        "-Dzookeeper.admin.enableServer=false".into(),
    ];
    if opts.extended_types {
        args.push("-Dzookeeper.extendedTypesEnabled=true".into());
    }
    args.extend(opts.jvm_args.iter().map(|a| subst(a, m.client, &m.dir)));
    args.push("-cp".into());
    args.push(classpath.into());
    args.push(main.into());
    args.push(cfg_path.display().to_string());
    let addr = loopback(m.client);
    Ok(Node::new(NodeSpec {
        name: format!("zookeeper {} on {addr}", m.id),
        program: java.to_path_buf(),
        args: args.into_iter().map(OsString::from).collect(),
        cwd: m.dir.clone(),
        log: m.dir.join("zookeeper.log"),
        ready: Ready::ZkMode(addr),
        ready_timeout: opts.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT),
    }))
}

pub(crate) fn spawn_zookeeper(opts: &ZookeeperOptions) -> Result<Server> {
    let java = bins::java()?;
    let cp = bins::zookeeper_classpath()?;
    with_port_retries(|| {
        let dir = TempDir::new("zookeeper")?;
        let port = free_ports(1)?[0];
        let m = ZkMember {
            id: 1,
            client: port,
            quorum: 0,
            election: 0,
            dir: dir.path().to_path_buf(),
        };
        let node = zk_node(&java, &cp, &m, &[], opts)?;
        node.start(true)?;
        let addr = loopback(port);
        Ok(Server {
            kind: Kind::ZooKeeper,
            url: format!("zookeeper://{addr}"),
            addr: Some(addr),
            node: Some(node),
            data_dir: Some(m.dir),
            _dir: Some(dir),
        })
    })
}

pub(crate) fn spawn_zookeeper_ensemble(size: usize, opts: &ZookeeperOptions) -> Result<Cluster> {
    let java = bins::java()?;
    let cp = bins::zookeeper_classpath()?;
    if size == 0 {
        return Err(Error::Invalid(
            "an ensemble needs at least one member".into(),
        ));
    }
    with_port_retries(|| {
        let root = TempDir::new("zookeeper-ensemble")?;
        let ports = free_ports(3 * size)?;
        let members: Vec<ZkMember> = (0..size)
            .map(|i| ZkMember {
                id: i + 1,
                client: ports[3 * i],
                quorum: ports[3 * i + 1],
                election: ports[3 * i + 2],
                dir: root.path().join(format!("zk{}", i + 1)),
            })
            .collect();
        let server_lines: Vec<String> = members
            .iter()
            .map(|m| format!("server.{}=127.0.0.1:{}:{}", m.id, m.quorum, m.election))
            .collect();
        let mut started = Vec::new();
        for m in &members {
            let node = zk_node(&java, &cp, m, &server_lines, opts)?;
            node.start(false)?;
            started.push((node, m.client, m.dir.clone()));
        }
        assemble_cluster(Kind::ZooKeeper, "zookeeper", root, started)
    })
}
