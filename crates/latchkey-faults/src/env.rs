//! The servers a run talks to, the fault proxies in front of them, and the URLs.

use latchkey_testkit::ChildProcess;
use latchkey_testkit::{
    Cluster, EtcdOptions, FaultProxy, ProxyMode, RedisOptions, Server, ZookeeperOptions,
};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// A backend configuration the runs cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// One `redis-server` with `appendonly yes`, `appendfsync always`.
    Redis,
    /// One `redis-server` without persistence (the testkit's default).
    RedisVolatile,
    /// A Redis Cluster of 3 masters with 1 replica each (`redis+cluster://`,
    /// `cluster-node-timeout 1000`), a fresh one per run.
    RedisCluster,
    /// One etcd member (fast elections).
    Etcd,
    /// A 3-member etcd cluster.
    Etcd3,
    /// A standalone ZooKeeper (`tickTime=200`), linearizable read mode.
    Zookeeper,
    /// A 3-member ZooKeeper ensemble, linearizable read mode.
    Zookeeper3,
    /// The same standalone ZooKeeper in its default sequential read mode.
    ZookeeperSeq,
    /// The in-process Consul HTTP-API simulator.
    ConsulSim,
}

impl BackendKind {
    /// Every configuration, in table order.
    pub const ALL: &'static [BackendKind] = &[
        BackendKind::Redis,
        BackendKind::RedisVolatile,
        BackendKind::RedisCluster,
        BackendKind::Etcd,
        BackendKind::Etcd3,
        BackendKind::Zookeeper,
        BackendKind::Zookeeper3,
        BackendKind::ZookeeperSeq,
        BackendKind::ConsulSim,
    ];

    /// The label in the table and on the command line.
    pub fn label(self) -> &'static str {
        match self {
            BackendKind::Redis => "redis",
            BackendKind::RedisVolatile => "redis-volatile",
            BackendKind::RedisCluster => "redis-cluster",
            BackendKind::Etcd => "etcd",
            BackendKind::Etcd3 => "etcd-3",
            BackendKind::Zookeeper => "zookeeper",
            BackendKind::Zookeeper3 => "zookeeper-3",
            BackendKind::ZookeeperSeq => "zookeeper-seq",
            BackendKind::ConsulSim => "consul-sim",
        }
    }

    /// Parses a label; `redis`, `etcd`, `zookeeper`, `consul` also select
    /// every configuration of that backend when `family` is true.
    pub fn select(name: &str) -> Vec<BackendKind> {
        // Cluster labels without the dash are accepted too.
        let name = match name {
            "etcd3" => "etcd-3",
            "redis+cluster" | "redis-cluster" => "redis-cluster",
            "zookeeper3" | "zk3" => "zookeeper-3",
            other => other,
        };
        let exact: Vec<BackendKind> = Self::ALL
            .iter()
            .copied()
            .filter(|b| b.label() == name)
            .collect();
        if !exact.is_empty() && !matches!(name, "redis" | "etcd" | "zookeeper") {
            return exact;
        }
        let family = match name {
            "zk" => "zookeeper",
            "consul" => "consul",
            other => other,
        };
        Self::ALL
            .iter()
            .copied()
            .filter(|b| b.label().starts_with(family))
            .collect()
    }

    /// A cluster of several members.
    pub fn is_cluster(self) -> bool {
        matches!(self, BackendKind::Etcd3 | BackendKind::Zookeeper3)
    }

    /// The lock TTL of the workload: as short as the backend honours with room
    /// for renewals on a loaded 2-core machine.
    pub fn ttl(self) -> Duration {
        match self {
            BackendKind::Redis | BackendKind::RedisVolatile | BackendKind::RedisCluster => {
                Duration::from_millis(1500)
            }
            BackendKind::Etcd | BackendKind::Etcd3 => Duration::from_secs(2),
            BackendKind::Zookeeper | BackendKind::Zookeeper3 | BackendKind::ZookeeperSeq => {
                Duration::from_secs(2)
            }
            // Consul's minimum session TTL.
            BackendKind::ConsulSim => Duration::from_secs(10),
        }
    }

    /// URL parameters (besides the namespace) the clients use.
    fn params(self) -> &'static str {
        match self {
            BackendKind::Redis | BackendKind::RedisVolatile => "timeout=1s",
            // Longer than a failover (node timeout 1 s + election), as the
            // adapter's docs ask: commands ride out the promotion.
            BackendKind::RedisCluster => "timeout=5s",
            BackendKind::Etcd | BackendKind::Etcd3 => "timeout=2s",
            BackendKind::Zookeeper | BackendKind::Zookeeper3 => {
                "reads=linearizable&session_timeout=2s&connect_timeout=2s"
            }
            BackendKind::ZookeeperSeq => "session_timeout=2s&connect_timeout=2s",
            BackendKind::ConsulSim => "timeout=2s",
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            BackendKind::Redis | BackendKind::RedisVolatile => "redis",
            BackendKind::RedisCluster => "redis+cluster",
            BackendKind::Etcd | BackendKind::Etcd3 => "etcd",
            BackendKind::Zookeeper | BackendKind::Zookeeper3 | BackendKind::ZookeeperSeq => {
                "zookeeper"
            }
            BackendKind::ConsulSim => "consul",
        }
    }
}

/// The server side of one backend configuration.
pub enum Servers {
    /// One process with fault hooks.
    Single(Box<Server>),
    /// Several members with fault hooks.
    Cluster(Cluster),
    /// A ZooKeeper ensemble with peer traffic through per-pair fault proxies
    /// (member-partition runs only).
    ZkPeers(crate::zkpeers::ProxiedEnsemble),
    /// An etcd cluster whose members run in network namespaces of their own
    /// (member-partition runs only).
    EtcdNet(Box<crate::etcdnet::NetCluster>),
    /// The Consul simulator in a child process of its own (`latchkey-faults
    /// consul-sim`), so it can be paused; its state lives in memory only.
    Consul {
        /// The simulator process.
        child: Mutex<ChildProcess>,
        /// Where it serves.
        addr: SocketAddr,
    },
}

/// Servers plus what is needed to reach them.
pub struct Env {
    /// Which configuration.
    pub kind: BackendKind,
    /// The servers.
    pub servers: Servers,
}

impl Env {
    /// Starts the servers of `kind` (private instances: the runs kill and pause
    /// them). `exe` is this crate's binary (it serves the Consul simulator).
    pub fn start(kind: BackendKind, exe: &Path) -> Result<Env, String> {
        let e = |e: latchkey_testkit::Error| e.to_string();
        let servers = match kind {
            BackendKind::Redis => Servers::Single(Box::new(
                latchkey_testkit::spawn_redis(
                    RedisOptions::default()
                        .arg("--appendonly")
                        .arg("yes")
                        .arg("--appendfsync")
                        .arg("always"),
                )
                .map_err(e)?,
            )),
            BackendKind::RedisVolatile => Servers::Single(Box::new(
                latchkey_testkit::spawn_redis(RedisOptions::default()).map_err(e)?,
            )),
            BackendKind::RedisCluster => Servers::Cluster(
                latchkey_testkit::spawn_redis_cluster(3, 1, RedisOptions::default()).map_err(e)?,
            ),
            BackendKind::Etcd => Servers::Single(Box::new(
                latchkey_testkit::spawn_etcd(EtcdOptions::default().fast()).map_err(e)?,
            )),
            BackendKind::Etcd3 => Servers::Cluster(
                latchkey_testkit::spawn_etcd_cluster(3, EtcdOptions::default()).map_err(e)?,
            ),
            BackendKind::Zookeeper | BackendKind::ZookeeperSeq => Servers::Single(Box::new(
                latchkey_testkit::spawn_zookeeper(ZookeeperOptions::fast()).map_err(e)?,
            )),
            BackendKind::Zookeeper3 => Servers::Cluster(
                latchkey_testkit::spawn_zookeeper_ensemble(3, ZookeeperOptions::fast())
                    .map_err(e)?,
            ),
            BackendKind::ConsulSim => {
                let mut cmd = std::process::Command::new(exe);
                cmd.arg("consul-sim");
                let child = ChildProcess::spawn(cmd)
                    .map_err(|e| format!("Consul simulator process: {e}"))?;
                let line = child
                    .recv(Duration::from_secs(20))
                    .map_err(|e| format!("Consul simulator process: {e}"))?;
                let addr = line
                    .strip_prefix("addr ")
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| format!("Consul simulator process said {line:?}"))?;
                Servers::Consul {
                    child: Mutex::new(child),
                    addr,
                }
            }
        };
        Ok(Env { kind, servers })
    }

    /// The client addresses of every member.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        match &self.servers {
            Servers::Single(s) => s.addr().into_iter().collect(),
            Servers::Cluster(c) => c.members().iter().filter_map(|m| m.addr()).collect(),
            Servers::Consul { addr, .. } => vec![*addr],
            Servers::ZkPeers(e) => e.client_addrs.clone(),
            Servers::EtcdNet(c) => c.client_addrs(),
        }
    }

    /// The URL for `addrs` (proxies or the servers) in namespace `ns`.
    pub fn url(&self, addrs: &[SocketAddr], ns: &str) -> String {
        let hosts: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        format!(
            "{}://{}/?namespace={ns}&{}",
            self.kind.scheme(),
            hosts.join(","),
            self.kind.params()
        )
    }

    /// Waits until every running server answers (after restarts).
    pub fn wait_ready(&self) {
        match &self.servers {
            Servers::Single(s) => {
                let _ = s.wait_ready();
            }
            Servers::Cluster(c) if self.kind == BackendKind::RedisCluster => {
                let _ = c.wait_ready();
                // Every slot served and every view agreeing (after a failover).
                let _ = c.wait_cluster_ok();
            }
            Servers::Cluster(c) => {
                let _ = c.wait_ready();
                let _ = c.leader();
            }
            Servers::Consul { .. } => {}
            Servers::ZkPeers(e) => {
                let _ = e.wait_serving(Duration::from_secs(60));
            }
            Servers::EtcdNet(c) => {
                let _ = c.wait_serving(Duration::from_secs(60));
            }
        }
    }
}

/// A group of proxies, one per member, that some clients connect through.
pub struct ProxyGroup {
    /// One per member, in member order.
    pub proxies: Vec<FaultProxy>,
}

impl ProxyGroup {
    /// One proxy per address.
    pub fn start(addrs: &[SocketAddr]) -> Result<ProxyGroup, String> {
        let proxies = addrs
            .iter()
            .map(|a| FaultProxy::start(*a).map_err(|e| format!("fault proxy: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProxyGroup { proxies })
    }
    /// The proxies' addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.proxies.iter().map(|p| p.addr()).collect()
    }
    /// Sets every proxy's mode.
    pub fn set_mode(&self, mode: ProxyMode) {
        for p in &self.proxies {
            p.set_mode(mode);
        }
    }
    /// Resets every connection through the group.
    pub fn reset_connections(&self) {
        for p in &self.proxies {
            p.reset_connections();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BackendKind;

    #[test]
    fn labels_select_one_configuration_or_a_family() {
        assert_eq!(BackendKind::select("etcd-3"), vec![BackendKind::Etcd3]);
        assert_eq!(BackendKind::select("etcd3"), vec![BackendKind::Etcd3]);
        assert_eq!(BackendKind::select("zk3"), vec![BackendKind::Zookeeper3]);
        assert_eq!(
            BackendKind::select("etcd"),
            vec![BackendKind::Etcd, BackendKind::Etcd3]
        );
        assert!(BackendKind::select("etcd4").is_empty());
        assert_eq!(
            BackendKind::select("redis-cluster"),
            vec![BackendKind::RedisCluster]
        );
        assert!(BackendKind::select("redis").contains(&BackendKind::RedisCluster));
    }
}
