//! `cargo xtask services up|down|status`: long-running local servers for manual work
//! (examples, the CLI, running tests against servers that outlive the test run).
//!
//! `up` starts Redis, a 3-master Redis Cluster (client ports 7000–7002 and bus ports
//! 17000–17002 when free, `--cluster-node-timeout 1000`, formed with `CLUSTER
//! ADDSLOTSRANGE`/`SET-CONFIG-EPOCH`/`MEET`, no `redis-cli`), etcd, ZooKeeper and the
//! Consul simulator on loopback (default ports when free), each detached in its own
//! session with its data under
//! `target/latchkey-services/<name>`, records them in `target/latchkey-services.json`
//! and prints `LATCHKEY_TEST_*_URL=` lines on stdout (progress goes to stderr, so
//! `eval "$(cargo xtask services up)"` works). `down` stops exactly the recorded PIDs.

use crate::deps::{find_on_path, ZOOKEEPER_JAR};
use crate::{cargo, root};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub(crate) struct Service {
    pub(crate) name: String,
    pid: u32,
    port: u16,
    pub(crate) url: String,
    /// Empty for a process that is not a service of its own (cluster nodes 2..).
    env: String,
    dir: PathBuf,
    /// Cluster bus port of a Redis Cluster node (0 otherwise).
    bus: u16,
}

impl Service {
    /// False for the member nodes of a cluster (2..): they are reached
    /// through the cluster's own service, never on their own.
    pub(crate) fn is_entry_point(&self) -> bool {
        !self.env.is_empty()
    }
}

fn state_file() -> PathBuf {
    root().join("target/latchkey-services.json")
}

fn services_dir() -> PathBuf {
    root().join("target/latchkey-services")
}

fn save(services: &[Service]) -> Result<(), String> {
    let list: Vec<serde_json::Value> = services
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name, "pid": s.pid, "port": s.port, "url": s.url,
                "env": s.env, "dir": s.dir.display().to_string(), "bus": s.bus,
            })
        })
        .collect();
    let text = serde_json::to_string_pretty(&serde_json::json!({ "services": list }))
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(root().join("target")).map_err(|e| e.to_string())?;
    std::fs::write(state_file(), text + "\n").map_err(|e| format!("write state: {e}"))
}

pub(crate) fn load() -> Result<Vec<Service>, String> {
    let text = match std::fs::read_to_string(state_file()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("read {}: {e}", state_file().display())),
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", state_file().display()))?;
    let mut out = Vec::new();
    for s in v["services"].as_array().into_iter().flatten() {
        out.push(Service {
            name: s["name"].as_str().unwrap_or_default().into(),
            pid: s["pid"].as_u64().unwrap_or(0) as u32,
            port: s["port"].as_u64().unwrap_or(0) as u16,
            url: s["url"].as_str().unwrap_or_default().into(),
            env: s["env"].as_str().unwrap_or_default().into(),
            dir: s["dir"].as_str().unwrap_or_default().into(),
            bus: s["bus"].as_u64().unwrap_or(0) as u16,
        });
    }
    Ok(out)
}

/// True if `pid` runs and its command line mentions `dir` (guards against PID reuse).
fn is_ours(s: &Service) -> bool {
    if s.pid == 0 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", s.pid)) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains(&s.dir.display().to_string())
        || cmdline.contains(&format!("--port\0{}", s.port))
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The preferred port if free, else any free one (never one in `taken`).
fn pick_port(preferred: u16, taken: &mut Vec<u16>) -> Result<u16, String> {
    let port = if !taken.contains(&preferred) && port_free(preferred) {
        preferred
    } else {
        loop {
            let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            let p = l.local_addr().map_err(|e| e.to_string())?.port();
            if !taken.contains(&p) {
                break p;
            }
        }
    };
    taken.push(port);
    Ok(port)
}

fn spawn_detached(program: &Path, args: &[String], dir: &Path, log: &str) -> Result<u32, String> {
    let log = std::fs::File::create(dir.join(log)).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe. A new session: the server survives this
    // process and the terminal that started it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    Ok(child.id())
}

fn exchange(port: u16, request: &[u8]) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.starts_with(b"+PONG") {
                    break;
                }
            }
            Err(e) if out.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn http_get(port: u16, path: &str) -> String {
    exchange(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap_or_default()
}

/// Does the service answer its protocol's health probe?
fn ready(name: &str, port: u16) -> bool {
    match name {
        "redis" => exchange(port, b"*1\r\n$4\r\nPING\r\n").is_ok_and(|r| r.starts_with("+PONG")),
        "redis-cluster" => {
            resp(port, &["CLUSTER", "INFO"]).is_ok_and(|r| r.contains("cluster_state:ok"))
        }
        "etcd" => http_get(port, "/health").contains("\"health\":\"true\""),
        "zookeeper" => exchange(port, b"srvr").is_ok_and(|r| r.contains("Mode:")),
        "consul-sim" => {
            http_get(port, "/v1/status/leader").starts_with("HTTP/1.1 200")
                || TcpStream::connect(("127.0.0.1", port)).is_ok()
        }
        _ => false,
    }
}

fn wait_ready(s: &Service) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if ready(&s.name, s.port) {
            return Ok(());
        }
        if !Path::new(&format!("/proc/{}", s.pid)).exists() || is_zombie(s.pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{} did not become ready; see its log in {}",
        s.name,
        s.dir.display()
    ))
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        == Some('Z')
}

/// A throwaway redis-server on loopback: no persistence, data and log in `dir`.
fn redis_args(port: u16, dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--set-proc-title",
        "no",
        "--dir",
        &d,
        "--logfile",
        &format!("{d}/redis.log"),
    ]
    .map(String::from)
    .to_vec()
}

fn start_redis(dir: &Path, port: u16) -> Result<Service, String> {
    let bin = find_on_path("redis-server").ok_or("redis-server is not installed")?;
    let args = redis_args(port, dir);
    let pid = spawn_detached(&bin, &args, dir, "stdout.log")?;
    Ok(service(
        "redis",
        pid,
        port,
        format!("redis://127.0.0.1:{port}"),
        "LATCHKEY_TEST_REDIS_URL",
        dir,
    ))
}

fn start_etcd(dir: &Path, port: u16, peer: u16) -> Result<Service, String> {
    let bin = find_on_path("etcd").ok_or("etcd is not installed")?;
    let client = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let args: Vec<String> = vec![
        "--name".into(),
        "n1".into(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--listen-client-urls".into(),
        client.clone(),
        "--advertise-client-urls".into(),
        client,
        "--listen-peer-urls".into(),
        peer_url.clone(),
        "--initial-advertise-peer-urls".into(),
        peer_url.clone(),
        "--initial-cluster".into(),
        format!("n1={peer_url}"),
        "--logger".into(),
        "zap".into(),
        "--log-outputs".into(),
        "stderr".into(),
    ];
    let pid = spawn_detached(&bin, &args, dir, "etcd.log")?;
    Ok(service(
        "etcd",
        pid,
        port,
        format!("etcd://127.0.0.1:{port}"),
        "LATCHKEY_TEST_ETCD_URL",
        dir,
    ))
}

fn start_zookeeper(dir: &Path, port: u16) -> Result<Service, String> {
    let java = find_on_path("java").ok_or("java is not installed")?;
    if !Path::new(ZOOKEEPER_JAR).is_file() {
        return Err(format!("{ZOOKEEPER_JAR} is not installed"));
    }
    let data = dir.join("data");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let cfg = dir.join("zoo.cfg");
    std::fs::write(
        &cfg,
        format!(
            "tickTime=2000\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\nmaxClientCnxns=0\nadmin.enableServer=false\n4lw.commands.whitelist=*\n",
            data.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let args: Vec<String> = vec![
        "-Xmx128m".into(),
        "-XX:+UseSerialGC".into(),
        "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn".into(),
        "-Dzookeeper.extendedTypesEnabled=true".into(),
        "-cp".into(),
        format!("{ZOOKEEPER_JAR}:/usr/share/java/slf4j-simple.jar"),
        "org.apache.zookeeper.server.ZooKeeperServerMain".into(),
        cfg.display().to_string(),
    ];
    let pid = spawn_detached(&java, &args, dir, "zookeeper.log")?;
    Ok(service(
        "zookeeper",
        pid,
        port,
        format!("zookeeper://127.0.0.1:{port}"),
        "LATCHKEY_TEST_ZOOKEEPER_URL",
        dir,
    ))
}

fn start_consul_sim(dir: &Path, port: u16) -> Result<Service, String> {
    eprintln!("xtask: building the Consul simulator (cargo build -p latchkey-consul-sim)");
    let status = Command::new(cargo())
        .current_dir(root())
        .args([
            "build",
            "--quiet",
            "-p",
            "latchkey-consul-sim",
            "--bin",
            "latchkey-consul-sim",
        ])
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err("the Consul simulator binary did not build".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let bin = target.join("debug/latchkey-consul-sim");
    let args = vec!["--port".to_string(), port.to_string()];
    let pid = spawn_detached(&bin, &args, dir, "consul-sim.log")?;
    Ok(service(
        "consul-sim",
        pid,
        port,
        format!("consul://127.0.0.1:{port}"),
        "LATCHKEY_TEST_CONSUL_URL",
        dir,
    ))
}

fn service(name: &str, pid: u32, port: u16, url: String, env: &str, dir: &Path) -> Service {
    Service {
        name: name.into(),
        pid,
        port,
        url,
        env: env.into(),
        dir: dir.to_path_buf(),
        bus: 0,
    }
}

/// One Redis command in RESP; returns the reply (simple line, or a bulk's payload).
fn resp(port: u16, args: &[&str]) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        let Some(eol) = text.find("\r\n") else {
            continue;
        };
        if let Some(len) = text.strip_prefix('$') {
            let len: usize = len[..eol - 1].parse().unwrap_or(0);
            if text.len() >= eol + 2 + len {
                return Ok(text[eol + 2..eol + 2 + len].to_string());
            }
            continue;
        }
        if let Some(e) = text.strip_prefix('-') {
            return Err(std::io::Error::other(e[..eol - 1].to_string()));
        }
        return Ok(text[..eol].to_string());
    }
}

/// Nodes of the local Redis Cluster (client and bus ports).
const CLUSTER_PORTS: [(u16, u16); 3] = [(7000, 17000), (7001, 17001), (7002, 17002)];

/// Starts the cluster's nodes (not yet a cluster: see [`form_cluster`]). Node 1 carries
/// the cluster URL and its variable; the others are only recorded for `down`.
fn start_redis_cluster(base: &Path, taken: &mut Vec<u16>) -> Result<Vec<Service>, String> {
    let bin = find_on_path("redis-server").ok_or("redis-server is not installed")?;
    let mut ports = Vec::new();
    for (port, bus) in CLUSTER_PORTS {
        ports.push((pick_port(port, taken)?, pick_port(bus, taken)?));
    }
    let hosts: Vec<String> = ports
        .iter()
        .map(|(p, _)| format!("127.0.0.1:{p}"))
        .collect();
    let url = format!("redis+cluster://{}", hosts.join(","));
    let mut out = Vec::new();
    for (i, (port, bus)) in ports.into_iter().enumerate() {
        let dir = base.join(format!("n{}", i + 1));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let d = dir.display().to_string();
        let mut args = redis_args(port, &dir);
        args.extend(
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &format!("{d}/nodes.conf"),
                "--cluster-port",
                &bus.to_string(),
                "--cluster-node-timeout",
                "1000",
            ]
            .map(String::from),
        );
        let pid = spawn_detached(&bin, &args, &dir, "stdout.log")?;
        let (node_url, env) = if i == 0 {
            (url.clone(), "LATCHKEY_TEST_REDIS_CLUSTER_URL")
        } else {
            (format!("redis://127.0.0.1:{port}"), "")
        };
        let mut s = service("redis-cluster", pid, port, node_url, env, &dir);
        s.bus = bus;
        out.push(s);
    }
    Ok(out)
}

/// Makes the started nodes one cluster: the 16384 slots split evenly, distinct
/// config epochs, `CLUSTER MEET` from node 1 (with the bus port). `wait_ready` then
/// waits for `cluster_state:ok` on each.
fn form_cluster(nodes: &[Service]) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for n in nodes {
        while !resp(n.port, &["PING"]).is_ok_and(|r| r == "+PONG") {
            if Instant::now() >= deadline || !Path::new(&format!("/proc/{}", n.pid)).exists() {
                return Err(format!(
                    "redis-cluster node on port {} did not start; see its log in {}",
                    n.port,
                    n.dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let per = 16384 / nodes.len();
    let cmd = |port: u16, args: &[&str]| {
        resp(port, args).map_err(|e| format!("{} on port {port}: {e}", args.join(" ")))
    };
    for (i, n) in nodes.iter().enumerate() {
        let lo = i * per;
        let hi = if i + 1 == nodes.len() {
            16383
        } else {
            lo + per - 1
        };
        cmd(
            n.port,
            &["CLUSTER", "ADDSLOTSRANGE", &lo.to_string(), &hi.to_string()],
        )?;
        cmd(
            n.port,
            &["CLUSTER", "SET-CONFIG-EPOCH", &(i + 1).to_string()],
        )?;
    }
    for n in &nodes[1..] {
        cmd(
            nodes[0].port,
            &[
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                &n.port.to_string(),
                &n.bus.to_string(),
            ],
        )?;
    }
    Ok(())
}

fn print_env(services: &[Service]) {
    for s in services.iter().filter(|s| s.is_entry_point()) {
        println!("{}={}", s.env, s.url);
    }
}

pub fn up() -> Result<(), String> {
    let existing = load()?;
    let alive: Vec<Service> = existing.iter().filter(|s| is_ours(s)).cloned().collect();
    if !alive.is_empty() {
        eprintln!("xtask: services already up (`cargo xtask services down` stops them):");
        print_env(&alive);
        return Ok(());
    }
    let base = services_dir();
    let _ = std::fs::remove_dir_all(&base);
    let mut taken = Vec::new();
    let mut started: Vec<Service> = Vec::new();
    let mut failures = Vec::new();
    type Starter = Box<dyn Fn(&Path, &mut Vec<u16>) -> Result<Vec<Service>, String>>;
    let one = |r: Result<Service, String>| r.map(|s| vec![s]);
    let starters: Vec<(&str, Starter)> = vec![
        (
            "redis",
            Box::new(move |d, t| one(start_redis(d, pick_port(6379, t)?))),
        ),
        ("redis-cluster", Box::new(start_redis_cluster)),
        (
            "etcd",
            Box::new(move |d, t| one(start_etcd(d, pick_port(2379, t)?, pick_port(2380, t)?))),
        ),
        (
            "zookeeper",
            Box::new(move |d, t| one(start_zookeeper(d, pick_port(2181, t)?))),
        ),
        (
            "consul-sim",
            Box::new(move |d, t| one(start_consul_sim(d, pick_port(8500, t)?))),
        ),
    ];
    for (name, start) in starters {
        let dir = base.join(name);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            failures.push(format!("{name}: {e}"));
            continue;
        }
        match start(&dir, &mut taken) {
            Ok(s) => {
                started.extend(s);
                // Record at once so `down` finds it even if a later one fails.
                save(&started)?;
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    let cluster: Vec<Service> = started
        .iter()
        .filter(|s| s.name == "redis-cluster")
        .cloned()
        .collect();
    let mut cluster_formed = true;
    if !cluster.is_empty() {
        if let Err(e) = form_cluster(&cluster) {
            failures.push(format!("redis-cluster: {e}"));
            cluster_formed = false;
        }
    }
    let mut ready_ones = Vec::new();
    for s in &started {
        if s.name == "redis-cluster" && !cluster_formed {
            continue;
        }
        match wait_ready(s) {
            Ok(()) => {
                eprintln!("xtask: {} ready at {} (pid {})", s.name, s.url, s.pid);
                ready_ones.push(s.clone());
            }
            Err(e) => failures.push(e),
        }
    }
    print_env(&ready_ones);
    if failures.is_empty() {
        eprintln!("xtask: state in {}", state_file().display());
        Ok(())
    } else {
        Err(format!(
            "some services did not start:\n  {}",
            failures.join("\n  ")
        ))
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall on a PID we recorded and verified.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

pub fn down() -> Result<(), String> {
    let services = load()?;
    if services.is_empty() {
        eprintln!("xtask: no services recorded in {}", state_file().display());
        return Ok(());
    }
    for s in &services {
        if !is_ours(s) {
            eprintln!("xtask: {} (pid {}) is not running", s.name, s.pid);
            continue;
        }
        signal(s.pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_ours(s) && !is_zombie(s.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if is_ours(s) && !is_zombie(s.pid) {
            signal(s.pid, libc::SIGKILL);
        }
        eprintln!("xtask: stopped {} (pid {})", s.name, s.pid);
    }
    let _ = std::fs::remove_file(state_file());
    let _ = std::fs::remove_dir_all(services_dir());
    Ok(())
}

pub fn status() -> Result<(), String> {
    let services = load()?;
    if services.is_empty() {
        eprintln!("xtask: no services recorded (`cargo xtask services up` starts them)");
        return Ok(());
    }
    let mut all_up = true;
    for s in &services {
        let state = if !is_ours(s) {
            all_up = false;
            "not running"
        } else if ready(&s.name, s.port) {
            "up"
        } else {
            all_up = false;
            "running, not answering"
        };
        eprintln!(
            "xtask: {:<10} pid {:<7} {:<28} {state}",
            s.name, s.pid, s.url
        );
    }
    print_env(&services);
    if all_up {
        Ok(())
    } else {
        Err("not every service is up".into())
    }
}

#[cfg(test)]
pub(crate) fn test_service(name: &str, url: &str, env: &str) -> Service {
    service(name, 0, 0, url.into(), env, Path::new("/nonexistent"))
}
