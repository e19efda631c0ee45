//! The fault scenarios and when each applies.

use crate::env::{BackendKind, Env, ProxyGroup, Servers};
use crate::workload::{RunCfg, Shared, Stale};
use latchkey_testkit::ProxyMode;
use rand::rngs::StdRng;
use rand::Rng;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One fault scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// SIGSTOP the holder's process past the TTL while it holds the lock.
    HolderPause,
    /// SIGSTOP the server (the leader of a cluster) longer than client timeouts.
    ServerPause,
    /// kill -9 and restart the server (the leader of a cluster).
    KillRestart,
    /// kill -9 and restart every member of a cluster in turn.
    RollingRestart,
    /// Black-hole the holder child's network past the TTL while it holds, then heal.
    ClientPartition,
    /// Cut one cluster member off from its peers.
    MemberPartition,
    /// 20–200 ms added latency on every client link.
    SlowNetwork,
    /// Reset client connections at random points.
    ConnectionResets,
    /// Redis Cluster: kill -9 the master of the workload's namespace, wait
    /// for its replica's promotion, later restart the old master (it rejoins
    /// as a replica).
    MasterFailover,
}

impl Scenario {
    /// Every scenario, in table order.
    pub const ALL: &'static [Scenario] = &[
        Scenario::HolderPause,
        Scenario::ServerPause,
        Scenario::KillRestart,
        Scenario::RollingRestart,
        Scenario::ClientPartition,
        Scenario::MemberPartition,
        Scenario::SlowNetwork,
        Scenario::ConnectionResets,
        Scenario::MasterFailover,
    ];

    /// The label in the table and on the command line.
    pub fn label(self) -> &'static str {
        match self {
            Scenario::HolderPause => "holder-pause",
            Scenario::ServerPause => "server-pause",
            Scenario::KillRestart => "kill-restart",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::ClientPartition => "client-partition",
            Scenario::MemberPartition => "member-partition",
            Scenario::SlowNetwork => "slow-network",
            Scenario::ConnectionResets => "conn-resets",
            Scenario::MasterFailover => "master-failover",
        }
    }

    /// Parses a label.
    pub fn parse(s: &str) -> Option<Scenario> {
        Self::ALL.iter().copied().find(|x| x.label() == s)
    }

    /// The latency slow-network adds per direction: (fixed delay, jitter bound).
    pub const SLOW_DELAY: Duration = Duration::from_millis(20);
    /// See [`Scenario::SLOW_DELAY`].
    pub const SLOW_JITTER: Duration = Duration::from_millis(180);

    /// The most this scenario adds to one round trip through the fault
    /// proxies (both directions at their worst: 2 × (delay + jitter), since
    /// the proxy delays each chunk by at most delay + jitter and never
    /// reorders), if it is a latency scenario.
    pub fn max_added_rtt(self) -> Option<Duration> {
        match self {
            Scenario::SlowNetwork => Some((Self::SLOW_DELAY + Self::SLOW_JITTER) * 2),
            _ => None,
        }
    }

    /// Restarts servers (losses are excusable on non-durable backends).
    pub fn restarts(self) -> bool {
        matches!(
            self,
            Scenario::KillRestart | Scenario::RollingRestart | Scenario::MasterFailover
        )
    }

    /// Needs the clients' traffic to pass the fault proxies.
    pub fn needs_proxies(self) -> bool {
        matches!(
            self,
            Scenario::ClientPartition | Scenario::SlowNetwork | Scenario::ConnectionResets
        )
    }

    /// `Err(why)` when the backend cannot express this scenario.
    pub fn applies(self, b: BackendKind) -> Result<(), &'static str> {
        let consul = b == BackendKind::ConsulSim;
        let redis_cluster = b == BackendKind::RedisCluster;
        match self {
            Scenario::MasterFailover if !redis_cluster => {
                Err("Redis Cluster only (a master with replicas to promote)")
            }
            Scenario::MasterFailover => Ok(()),
            s if redis_cluster && s.needs_proxies() => Err(
                "the cluster client follows the node addresses CLUSTER SLOTS announces \
                 (the servers' own ports), so its traffic bypasses the fault proxies",
            ),
            Scenario::ServerPause | Scenario::KillRestart | Scenario::RollingRestart
                if redis_cluster =>
            {
                Err("a master stopped past cluster-node-timeout fails over: covered by master-failover")
            }
            Scenario::MemberPartition if redis_cluster => Err(
                "not wired for Redis Cluster (its bus links would need cutting per member)",
            ),
            Scenario::KillRestart | Scenario::RollingRestart if consul => Err(
                "the Consul simulator keeps its state in memory only (real Consul persists it): \
                 a restart would measure the simulator, not Consul",
            ),
            Scenario::RollingRestart if !b.is_cluster() => {
                Err("single node: covered by kill-restart")
            }
            Scenario::MemberPartition if !b.is_cluster() => Err("single node: no peers"),
            // Members in network namespaces of their own: root (CAP_NET_ADMIN) only.
            Scenario::MemberPartition if b == BackendKind::Etcd3 => crate::etcdnet::available(),
            _ => Ok(()),
        }
    }
}

/// Everything a fault driver acts on.
pub struct Target<'a> {
    /// The servers.
    pub env: &'a Env,
    /// Proxies of the in-process clients.
    pub local: &'a ProxyGroup,
    /// Proxies of the holder child.
    pub child: &'a ProxyGroup,
    /// The run's shared state.
    pub shared: &'a Arc<Shared>,
    /// Lock TTL.
    pub ttl: Duration,
    /// The workload's settings (the bounds of a stale episode).
    pub cfg: &'a RunCfg,
    /// How long the fault phases last (shorter with `--quick`).
    pub phase: Duration,
    /// The run's seed (member-partition: leader-side on even seeds, a
    /// follower on odd ones, so any two consecutive runs cover both).
    pub seed: u64,
    /// The workload's namespace (master-failover kills the master of its slot).
    pub ns: &'a str,
}

/// A cluster whose members can be cut off from their peers while clients
/// still reach every member.
pub trait PeerPartition: Sync {
    /// Index of the current leader, if one is known.
    fn leader(&self) -> Option<usize>;
    /// Cuts member `v` off from its peers; `None` heals.
    fn isolate(&self, v: Option<usize>) -> Result<(), String>;
    /// What each member says about itself (for messages).
    fn describe(&self) -> String;
    /// Waits until every member serves again.
    fn wait_serving(&self, timeout: Duration) -> Result<(), String>;
}

impl PeerPartition for crate::zkpeers::ProxiedEnsemble {
    fn leader(&self) -> Option<usize> {
        crate::zkpeers::ProxiedEnsemble::leader(self)
    }
    fn isolate(&self, v: Option<usize>) -> Result<(), String> {
        crate::zkpeers::ProxiedEnsemble::isolate(self, v);
        Ok(())
    }
    fn describe(&self) -> String {
        crate::zkpeers::ProxiedEnsemble::describe(self)
    }
    fn wait_serving(&self, timeout: Duration) -> Result<(), String> {
        crate::zkpeers::ProxiedEnsemble::wait_serving(self, timeout)
    }
}

impl PeerPartition for crate::etcdnet::NetCluster {
    fn leader(&self) -> Option<usize> {
        crate::etcdnet::NetCluster::leader(self)
    }
    fn isolate(&self, v: Option<usize>) -> Result<(), String> {
        crate::etcdnet::NetCluster::isolate(self, v)
    }
    fn describe(&self) -> String {
        crate::etcdnet::NetCluster::describe(self)
    }
    fn wait_serving(&self, timeout: Duration) -> Result<(), String> {
        crate::etcdnet::NetCluster::wait_serving(self, timeout)
    }
}

fn blocking<R>(f: impl FnOnce() -> R) -> R {
    // Server hooks block (they wait for readiness); the runtime has worker
    // threads to spare, and block_in_place keeps the borrow simple.
    tokio::task::block_in_place(f)
}

async fn wait_stale_episode(t: &Target<'_>, how: Stale) -> Result<(), String> {
    *t.shared
        .stale_request
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(how);
    wait_stale_active(t).await?;
    wait_stale_recorded(t, how).await
}

/// True once the history holds the stale-holder episode.
fn episode_recorded(t: &Target<'_>) -> bool {
    !t.shared
        .hist
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .stale
        .is_empty()
}

/// Waits until the holder child holds the lock and has gone stale as
/// requested (withdrawing the request if it never does).
async fn wait_stale_active(t: &Target<'_>) -> Result<(), String> {
    let deadline = Instant::now() + t.ttl * 8 + Duration::from_secs(30);
    loop {
        if episode_recorded(t) || t.shared.stale_active.load(Ordering::SeqCst) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            t.shared
                .stale_request
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            return Err("the holder child never held the lock long enough to be made stale".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the stale episode (the child is stale now) has been
/// recorded, as long as the child may take for it.
async fn wait_stale_recorded(t: &Target<'_>, how: Stale) -> Result<(), String> {
    let within = t.cfg.stale_recorded_within(how);
    let deadline = Instant::now() + within;
    loop {
        if episode_recorded(t) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the holder child went stale but its episode was not recorded within {within:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the fault of `s` against `t` (the workload runs meanwhile), then heals.
pub async fn inject(s: Scenario, t: &Target<'_>, rng: &mut StdRng) -> Result<(), String> {
    match s {
        Scenario::HolderPause => wait_stale_episode(t, Stale::Stop).await,
        Scenario::ClientPartition => wait_stale_episode(t, Stale::BlackHole).await,
        Scenario::ServerPause => {
            let hold = (t.ttl + Duration::from_secs(1)).max(Duration::from_secs(3));
            if let Servers::Consul { child, .. } = &t.env.servers {
                let signal = |pause: bool| {
                    let c = child.lock().unwrap_or_else(|p| p.into_inner());
                    if pause { c.pause() } else { c.resume() }.map_err(|e| e.to_string())
                };
                signal(true)?;
                tokio::time::sleep(hold).await;
                return signal(false);
            }
            let server = victim(t.env, rng)?;
            with_server(t.env, server, |srv| srv.pause().map_err(|e| e.to_string()))?;
            tokio::time::sleep(hold).await;
            with_server(t.env, server, |srv| srv.resume().map_err(|e| e.to_string()))?;
            Ok(())
        }
        Scenario::KillRestart => {
            let server = victim(t.env, rng)?;
            with_server(t.env, server, |srv| srv.kill().map_err(|e| e.to_string()))?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
            let env = t.env;
            blocking(move || -> Result<(), String> {
                with_server(env, server, |srv| srv.restart().map_err(|e| e.to_string()))?;
                env.wait_ready();
                Ok(())
            })?;
            Ok(())
        }
        Scenario::MasterFailover => {
            let Servers::Cluster(c) = &t.env.servers else {
                return Err("not a cluster".into());
            };
            // Every key of the namespace shares the hash tag {ns} (the
            // namespaces of the runs need no escaping).
            let key = format!("latchkey:{{{}}}:rev", t.ns);
            let old = blocking(|| c.master_of_key(&key)).map_err(|e| e.to_string())?;
            c.members()[old].kill().map_err(|e| e.to_string())?;
            let killed = Instant::now();
            let new = blocking(|| c.wait_for_failover(old)).map_err(|e| e.to_string())?;
            eprintln!(
                "[faults]   master {} of the namespace killed; member {} promoted after {:.1}s",
                old + 1,
                new + 1,
                killed.elapsed().as_secs_f64()
            );
            // The workload runs on the promoted master for a while before
            // the old one comes back (as a replica of the new one).
            tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
            blocking(|| -> Result<(), String> {
                c.members()[old].restart().map_err(|e| e.to_string())?;
                c.wait_cluster_ok().map_err(|e| e.to_string())
            })
        }
        Scenario::RollingRestart => {
            let Servers::Cluster(c) = &t.env.servers else {
                return Err("not a cluster".into());
            };
            for m in c.members() {
                m.kill().map_err(|e| e.to_string())?;
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..1000))).await;
                blocking(|| -> Result<(), String> {
                    m.restart().map_err(|e| e.to_string())?;
                    t.env.wait_ready();
                    Ok(())
                })?;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(())
        }
        Scenario::SlowNetwork => {
            let mode = ProxyMode::Latency {
                delay: Scenario::SLOW_DELAY,
                jitter: Scenario::SLOW_JITTER,
            };
            let set_latency = |on: bool| {
                let mut h = t.shared.hist.lock().unwrap_or_else(|p| p.into_inner());
                let now = crate::history::now_ns();
                h.latency = match (on, h.latency) {
                    (true, _) => Some((now, None)),
                    (false, Some((s, _))) => Some((s, Some(now))),
                    (false, None) => None,
                };
            };
            set_latency(true);
            t.local.set_mode(mode);
            t.child.set_mode(mode);
            t.shared.latency_on.store(true, Ordering::SeqCst);
            tokio::time::sleep(t.phase.max(t.ttl * 2)).await;
            t.shared.latency_on.store(false, Ordering::SeqCst);
            t.local.set_mode(ProxyMode::Pass);
            t.child.set_mode(ProxyMode::Pass);
            set_latency(false);
            Ok(())
        }
        Scenario::ConnectionResets => {
            let end = Instant::now() + t.phase;
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..700))).await;
                if rng.random_bool(0.5) {
                    t.local.reset_connections();
                } else {
                    t.child.reset_connections();
                }
            }
            Ok(())
        }
        Scenario::MemberPartition => {
            let c: &dyn PeerPartition = match &t.env.servers {
                Servers::ZkPeers(e) => e,
                Servers::EtcdNet(c) => c.as_ref(),
                _ => {
                    return Err(
                        "member-partition needs a cluster whose peer links can be cut".into(),
                    )
                }
            };
            let leader = blocking(|| c.leader());
            let victim = match leader {
                Some(l) if t.seed.is_multiple_of(2) => l,
                Some(l) => (l + 1 + rng.random_range(0..2)) % 3,
                None => rng.random_range(0..3),
            };
            // First the holder child takes the lock and is stranded with the
            // victim (its proxies to the other members stall); only then is
            // the victim cut off, so the child holds a lock it cannot renew.
            // (Cutting first would make the child's own lock() fail whenever
            // one of its requests reaches the cut-off member.) Once its TTL
            // has passed and another client acquired through the majority,
            // its write, sent anywhere while the member is still cut off,
            // must be refused by the fence.
            let how = Stale::Minority(victim);
            *t.shared
                .stale_request
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(how);
            wait_stale_active(t).await?;
            if let Err(e) = c.isolate(Some(victim)) {
                let _ = c.isolate(None);
                return Err(format!("cutting member {} off: {e}", victim + 1));
            }
            let cut = Instant::now();
            let hold = (t.ttl * 2).max(Duration::from_secs(4));
            let episode = async {
                wait_stale_recorded(t, how).await?;
                tokio::time::sleep(hold.saturating_sub(cut.elapsed())).await;
                Ok::<(), String>(())
            };
            let report = async {
                tokio::time::sleep(hold / 2).await;
                eprintln!(
                    "[faults]   member {} ({}) cut off from its peers; members now: {}",
                    victim + 1,
                    if Some(victim) == leader {
                        "the leader"
                    } else {
                        "a follower"
                    },
                    blocking(|| c.describe())
                );
            };
            let (episode, ()) = tokio::join!(episode, report);
            c.isolate(None).map_err(|e| format!("healing: {e}"))?;
            episode?;
            blocking(|| c.wait_serving(Duration::from_secs(60)))
        }
    }
}

/// Which server to hit: the single one, or a cluster's leader.
fn victim(env: &Env, _rng: &mut StdRng) -> Result<usize, String> {
    match &env.servers {
        Servers::Single(_) => Ok(0),
        Servers::Cluster(c) => {
            tokio::task::block_in_place(|| c.leader_index()).map_err(|e| e.to_string())
        }
        Servers::Consul { .. } | Servers::ZkPeers(_) | Servers::EtcdNet(_) => Ok(0),
    }
}

fn with_server<R>(
    env: &Env,
    i: usize,
    f: impl FnOnce(&latchkey_testkit::Server) -> Result<R, String>,
) -> Result<R, String> {
    match &env.servers {
        Servers::Single(s) => f(s),
        Servers::Cluster(c) => f(&c.members()[i]),
        Servers::Consul { .. } => Err("the Consul simulator has no testkit server hooks".into()),
        Servers::ZkPeers(_) => Err("the proxied ensemble has no testkit server hooks".into()),
        Servers::EtcdNet(_) => {
            Err("the namespaced etcd cluster has no testkit server hooks".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{BackendKind, Scenario};

    #[test]
    fn master_failover_applies_to_redis_cluster_only_and_proxy_scenarios_skip_there() {
        for &b in BackendKind::ALL {
            assert_eq!(
                Scenario::MasterFailover.applies(b).is_ok(),
                b == BackendKind::RedisCluster,
                "{b:?}"
            );
        }
        let rc = BackendKind::RedisCluster;
        for s in [
            Scenario::ClientPartition,
            Scenario::SlowNetwork,
            Scenario::ConnectionResets,
        ] {
            assert!(s
                .applies(rc)
                .unwrap_err()
                .contains("bypasses the fault proxies"));
        }
        assert!(Scenario::HolderPause.applies(rc).is_ok());
        assert!(Scenario::MasterFailover.restarts());
        assert_eq!(
            Scenario::parse("master-failover"),
            Some(Scenario::MasterFailover)
        );
    }
}
