//! A 3-member ZooKeeper ensemble whose peer traffic runs through fault
//! proxies, one per ordered pair of members, so one member can be cut off
//! from its peers (member-partition) while clients still reach it.
//!
//! This works for ZooKeeper because each member reads the peer addresses
//! from its own `zoo.cfg` (`server.N=` lines, member ids are explicit):
//! member i's line for member j names the proxy i→j. (etcd derives member
//! ids from the advertised peer URLs, so per-pair URLs are impossible there.)

use latchkey_testkit::{ChildProcess, FaultProxy, ProxyMode};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The ensemble. Members are killed (and their directory removed) on drop.
pub struct ProxiedEnsemble {
    members: Vec<Mutex<ChildProcess>>,
    /// Client address of each member.
    pub client_addrs: Vec<SocketAddr>,
    /// `peer[i][j]`: the proxies i dials to reach j (quorum, election); `None` for i == j.
    peer: Vec<Vec<Option<(FaultProxy, FaultProxy)>>>,
    dir: PathBuf,
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

fn java() -> PathBuf {
    if let Some(home) = std::env::var_os("JAVA_HOME") {
        let p = PathBuf::from(home).join("bin/java");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("java")
}

impl ProxiedEnsemble {
    /// Starts 3 members (`tickTime=200`) and waits until all serve.
    pub fn start() -> Result<ProxiedEnsemble, String> {
        let n = 3;
        let jar = latchkey_testkit::ZOOKEEPER_JAR;
        if !std::path::Path::new(jar).is_file() {
            return Err(format!("{jar} is missing (apt-get install -y zookeeper)"));
        }
        let slf4j = "/usr/share/java/slf4j-simple.jar";
        let cp = if std::path::Path::new(slf4j).is_file() {
            format!("{jar}:{slf4j}")
        } else {
            jar.to_string()
        };
        let dir = std::env::temp_dir().join(latchkey_testkit::unique_namespace(
            "latchkey-faults-zk-peers",
        ));
        let mut client = Vec::new();
        let mut quorum = Vec::new();
        let mut election = Vec::new();
        for _ in 0..n {
            client.push(free_port()?);
            quorum.push(free_port()?);
            election.push(free_port()?);
        }
        let mut peer: Vec<Vec<Option<(FaultProxy, FaultProxy)>>> = Vec::new();
        for i in 0..n {
            let mut row = Vec::new();
            for j in 0..n {
                row.push(if i == j {
                    None
                } else {
                    let q = FaultProxy::start(("127.0.0.1", quorum[j]))
                        .map_err(|e| format!("proxy: {e}"))?;
                    let e = FaultProxy::start(("127.0.0.1", election[j]))
                        .map_err(|e| format!("proxy: {e}"))?;
                    Some((q, e))
                });
            }
            peer.push(row);
        }
        let mut members = Vec::new();
        for i in 0..n {
            let d = dir.join(format!("zk{}", i + 1));
            let data = d.join("data");
            std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
            std::fs::write(data.join("myid"), format!("{}\n", i + 1))
                .map_err(|e| format!("myid: {e}"))?;
            let mut cfg = format!(
                "tickTime=200\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={}\n\
                 clientPortAddress=127.0.0.1\nmaxClientCnxns=0\nadmin.enableServer=false\n\
                 4lw.commands.whitelist=*\n",
                data.display(),
                client[i]
            );
            for (j, cell) in peer[i].iter().enumerate() {
                let (q, e) = match cell {
                    None => (quorum[i], election[i]),
                    Some((q, e)) => (q.port(), e.port()),
                };
                cfg.push_str(&format!("server.{}=127.0.0.1:{q}:{e}\n", j + 1));
            }
            let cfg_path = d.join("zoo.cfg");
            std::fs::write(&cfg_path, cfg).map_err(|e| format!("zoo.cfg: {e}"))?;
            let mut cmd = std::process::Command::new(java());
            cmd.args([
                "-Xmx128m",
                "-XX:+UseSerialGC",
                "-Dorg.slf4j.simpleLogger.defaultLogLevel=off",
                "-Dzookeeper.admin.enableServer=false",
                "-Dzookeeper.extendedTypesEnabled=true",
                "-cp",
                &cp,
                "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            ])
            .arg(&cfg_path)
            .current_dir(&d);
            let child = ChildProcess::spawn(cmd).map_err(|e| format!("java: {e}"))?;
            members.push(Mutex::new(child));
        }
        let e = ProxiedEnsemble {
            members,
            client_addrs: client
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect(),
            peer,
            dir,
        };
        e.wait_serving(Duration::from_secs(90))?;
        Ok(e)
    }

    fn mode(&self, i: usize) -> Option<String> {
        latchkey_testkit::probe::zk_mode(self.client_addrs[i], Duration::from_millis(500)).ok()
    }

    /// Waits until every member is a leader or follower.
    pub fn wait_serving(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let modes: Vec<Option<String>> =
                (0..self.members.len()).map(|i| self.mode(i)).collect();
            if modes
                .iter()
                .all(|m| matches!(m.as_deref(), Some("leader") | Some("follower")))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("ZooKeeper ensemble not serving: modes {modes:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Index of the current leader, if one is known.
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| self.mode(i).as_deref() == Some("leader"))
    }

    /// Cuts member `v` off from its peers (stalls every proxy to or from it:
    /// nothing is forwarded, TCP holds the bytes, as in a real partition), or,
    /// with `None`, heals: every proxy passes again and its connections are
    /// reset, so members reconnect.
    ///
    /// Not [`ProxyMode::BlackHole`]: with connections that accept and
    /// silently drop bytes, the majority of a cut-off leader never elected a
    /// new one (ZooKeeper 3.8, seen for 40 s), so leader-side runs measured a
    /// dead ensemble instead of a partition.
    pub fn isolate(&self, v: Option<usize>) {
        for (i, row) in self.peer.iter().enumerate() {
            for (j, cell) in row.iter().enumerate() {
                if let Some((q, e)) = cell {
                    match v {
                        Some(v) if i == v || j == v => {
                            q.set_mode(ProxyMode::Stall);
                            e.set_mode(ProxyMode::Stall);
                        }
                        Some(_) => {}
                        None => {
                            q.set_mode(ProxyMode::Pass);
                            e.set_mode(ProxyMode::Pass);
                            q.reset_connections();
                            e.reset_connections();
                        }
                    }
                }
            }
        }
    }

    /// Mode of member `i` as `srvr` reports it (for messages).
    pub fn describe(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                format!(
                    "{}={}",
                    i + 1,
                    self.mode(i).unwrap_or_else(|| "down".into())
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for ProxiedEnsemble {
    fn drop(&mut self) {
        for m in &self.members {
            let mut c = m.lock().unwrap_or_else(|p| p.into_inner());
            let _ = c.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
