//! Redis Cluster on loopback: spawning with explicit bus ports, forming the cluster
//! over raw RESP (no `redis-cli`), readiness, and the slot / failover / migration
//! helpers fault tests need.
//!
//! Formation is what `redis-cli --cluster create` does, minus the tool:
//! `CLUSTER ADDSLOTSRANGE` on each master (16384 slots split evenly, in member
//! order), `CLUSTER SET-CONFIG-EPOCH i+1` on every node (distinct epochs, so no
//! epoch-collision round is needed), `CLUSTER MEET` from the first node to every
//! other (with the explicit bus port: without it MEET assumes port + 10000), then
//! `CLUSTER REPLICATE <master id>` on each replica once it knows its master.
//!
//! Every node runs with `--cluster-node-timeout 1000` (1 s; Redis' default is 15 s)
//! so that a killed master is marked failed and its replica promoted in about 2–3 s.
//! A caller's `RedisOptions::args` come after it and can override it.

use crate::probe::{self, RedisConn, Resp};
use crate::process::TempDir;
use crate::server::{free_ports, redis_node, with_port_retries, Cluster, Kind, Server};
use crate::{bins, Error, RedisOptions, Result};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;
/// `--cluster-node-timeout` of every spawned node, in ms (see the module docs).
pub const NODE_TIMEOUT_MS: u64 = 1000;
/// Bound of each admin command.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long formation, `wait_cluster_ok` and `wait_for_failover` wait.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys per `MIGRATE` batch in [`Cluster::migrate_slot`].
const MIGRATE_BATCH: usize = 100;

/// One line of `CLUSTER NODES`, as seen by one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLine {
    /// The node id (40 hex characters).
    pub id: String,
    /// Its client port (0 while unknown, e.g. during a handshake).
    pub port: u16,
    /// Flags: `myself`, `master`, `slave`, `fail?`, `fail`, `handshake`, `noaddr`, ...
    pub flags: Vec<String>,
    /// The id of its master (replicas only).
    pub master_id: Option<String>,
    /// `true` when the link to it is `connected` (always for `myself`).
    pub connected: bool,
    /// Slot ranges it serves (inclusive), without the `[slot->-id]` migration entries.
    pub slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
    /// A master (also a failed one).
    pub fn is_master(&self) -> bool {
        self.has("master")
    }
    /// Marked failed (`fail`) or suspected (`fail?`) by the node that reported it.
    pub fn is_failing(&self) -> bool {
        self.has("fail") || self.has("fail?")
    }
}

/// Parses the text of `CLUSTER NODES`.
pub fn parse_cluster_nodes(text: &str) -> Vec<NodeLine> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        // `ip:port@cport[,hostname]`
        let port = f[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0);
        let slots = f[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|v| (v, v)),
            })
            .collect();
        out.push(NodeLine {
            id: f[0].to_string(),
            port,
            flags: f[2].split(',').map(String::from).collect(),
            master_id: (f[3] != "-").then(|| f[3].to_string()),
            connected: f[7] == "connected" || f[2].contains("myself"),
            slots,
        });
    }
    out
}

fn admin(addr: SocketAddr) -> io::Result<RedisConn> {
    RedisConn::connect(addr, ADMIN_TIMEOUT)
}

fn ctx(what: String) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// The last `n` lines of every member's log, for error messages.
fn logs(c: &Cluster, n: usize) -> String {
    let mut out = String::new();
    for (i, m) in c.members().iter().enumerate() {
        let Some(path) = m.log_path() else { continue };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!(
            "--- member {i} ({}):\n{}\n",
            path.display(),
            lines[lines.len().saturating_sub(n)..].join("\n")
        ));
    }
    out
}

pub(crate) fn spawn_redis_cluster(
    masters: usize,
    replicas_per_master: usize,
    opts: &RedisOptions,
) -> Result<Cluster> {
    if masters == 0 {
        return Err(Error::Invalid(
            "a Redis Cluster needs at least one master".into(),
        ));
    }
    if opts.tls.is_some() {
        // Formation and the helpers speak plain RESP over TCP.
        return Err(Error::Invalid(
            "spawn_redis_cluster does not support TLS (the testkit forms the cluster over plain TCP)"
                .into(),
        ));
    }
    let program = bins::redis_server()?;
    let total = masters * (1 + replicas_per_master);
    with_port_retries(|| {
        let root = TempDir::new("redis-cluster")?;
        let ports = free_ports(2 * total)?;
        let mut members = Vec::with_capacity(total);
        let mut hosts = Vec::new();
        for i in 0..total {
            let (port, bus) = (ports[2 * i], ports[2 * i + 1]);
            let dir = root.path().join(format!("n{}", i + 1));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("create node dir", e))?;
            let extra: Vec<String> = vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                dir.join("nodes.conf").display().to_string(),
                "--cluster-port".into(),
                bus.to_string(),
                "--cluster-node-timeout".into(),
                NODE_TIMEOUT_MS.to_string(),
            ];
            let node = redis_node(&program, opts, port, &dir, &extra);
            node.start(false)?;
            let url = format!("redis://127.0.0.1:{port}");
            members.push(Server::member(Kind::Redis, url, port, node, dir));
            if i < masters {
                hosts.push(format!("127.0.0.1:{port}"));
            }
        }
        // Masters first in the URL: they are the seeds that own slots.
        for i in masters..total {
            hosts.push(format!("127.0.0.1:{}", ports[2 * i]));
        }
        let url = format!("redis+cluster://{}", hosts.join(","));
        // From here on, dropping `cluster` kills every node.
        let cluster = Cluster::from_members(Kind::Redis, url, members, root);
        for m in cluster.members() {
            m.wait_ready()?;
        }
        let buses: Vec<u16> = (0..total).map(|i| ports[2 * i + 1]).collect();
        form(&cluster, masters, replicas_per_master, &buses).map_err(|e| Error::Start {
            name: "redis cluster".into(),
            reason: e.to_string(),
            log: logs(&cluster, 10),
        })?;
        cluster.wait_ready()?;
        Ok(cluster)
    })
}

fn form(c: &Cluster, masters: usize, replicas: usize, buses: &[u16]) -> Result<()> {
    let addrs: Vec<SocketAddr> = c.members().iter().filter_map(|m| m.addr()).collect();
    let per = SLOTS as usize / masters;
    for (i, a) in addrs.iter().enumerate().take(masters) {
        let lo = i * per;
        let hi = if i + 1 == masters {
            SLOTS as usize - 1
        } else {
            lo + per - 1
        };
        admin(*a)
            .and_then(|mut con| {
                con.query_ok(&["CLUSTER", "ADDSLOTSRANGE", &lo.to_string(), &hi.to_string()])
            })
            .map_err(ctx(format!("CLUSTER ADDSLOTSRANGE {lo} {hi} on {a}")))?;
    }
    for (i, a) in addrs.iter().enumerate() {
        admin(*a)
            .and_then(|mut con| {
                con.query_ok(&["CLUSTER", "SET-CONFIG-EPOCH", &(i + 1).to_string()])
            })
            .map_err(ctx(format!("CLUSTER SET-CONFIG-EPOCH on {a}")))?;
    }
    let mut first = admin(addrs[0]).map_err(ctx(format!("connect {}", addrs[0])))?;
    for (a, bus) in addrs.iter().zip(buses).skip(1) {
        first
            .query_ok(&[
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                &a.port().to_string(),
                &bus.to_string(),
            ])
            .map_err(ctx(format!("CLUSTER MEET {a} (bus {bus})")))?;
    }
    if replicas == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + CLUSTER_TIMEOUT;
    for i in 0..masters {
        let master_id = c.node_id(i)?;
        for r in 0..replicas {
            let a = addrs[masters + i * replicas + r];
            // A replica can follow a master only once gossip has told it about it.
            loop {
                let reply = admin(a)
                    .and_then(|mut con| con.query(&["CLUSTER", "REPLICATE", &master_id]))
                    .map_err(ctx(format!("CLUSTER REPLICATE on {a}")))?;
                match reply {
                    Resp::Error(_) if Instant::now() < deadline => {
                        // Polling a condition with a deadline.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Resp::Error(e) => {
                        return Err(Error::Timeout(format!(
                            "{a} never learned its master {master_id}: {e}"
                        )))
                    }
                    _ => break,
                }
            }
        }
    }
    Ok(())
}

/// Who owns every slot, as all checked members agree: member index per slot.
type Owners = Vec<usize>;

impl Cluster {
    fn redis_only(&self) -> Result<()> {
        if self.kind() != Kind::Redis {
            return Err(Error::Invalid(format!(
                "a Redis Cluster helper called on a {:?} cluster",
                self.kind()
            )));
        }
        if self.is_external() {
            return Err(Error::External(self.url().to_string()));
        }
        Ok(())
    }

    fn member_addr(&self, member: usize) -> Result<SocketAddr> {
        self.members()
            .get(member)
            .and_then(Server::addr)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no member {member} (the cluster has {})",
                    self.members().len()
                ))
            })
    }

    fn member_of_port(&self, port: u16) -> Option<usize> {
        self.members().iter().position(|m| m.port() == Some(port))
    }

    /// `CLUSTER NODES` as member `member` sees it.
    pub fn cluster_nodes(&self, member: usize) -> Result<Vec<NodeLine>> {
        self.redis_only()?;
        let a = self.member_addr(member)?;
        let text = admin(a)
            .and_then(|mut con| con.query_text(&["CLUSTER", "NODES"]))
            .map_err(ctx(format!("CLUSTER NODES on {a}")))?;
        Ok(parse_cluster_nodes(&text))
    }

    /// The cluster node id of a member (`CLUSTER MYID`; it must be running). Ids
    /// survive a restart (they live in the member's `nodes.conf`).
    pub fn node_id(&self, member: usize) -> Result<String> {
        self.redis_only()?;
        let a = self.member_addr(member)?;
        admin(a)
            .and_then(|mut con| con.query_text(&["CLUSTER", "MYID"]))
            .map_err(ctx(format!("CLUSTER MYID on {a}")))
    }

    /// The first running member's view of the cluster (skipping members that do not
    /// answer, e.g. paused ones).
    fn any_view(&self) -> Result<Vec<NodeLine>> {
        let mut last = None;
        for (i, m) in self.members().iter().enumerate() {
            if !m.is_running() {
                continue;
            }
            match self.cluster_nodes(i) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::NotRunning("every member of the Redis Cluster".into())))
    }

    /// The member that serves hash slot `slot` now, in the view of the first running
    /// member that answers (a master not marked failed). During a failover or a
    /// migration, views can differ for a moment: use [`Cluster::wait_cluster_ok`]
    /// first for a settled answer.
    pub fn master_of_slot(&self, slot: u16) -> Result<usize> {
        self.redis_only()?;
        if slot >= SLOTS {
            return Err(Error::Invalid(format!("slot {slot} is not below {SLOTS}")));
        }
        let view = self.any_view()?;
        let line = view
            .iter()
            .find(|n| {
                n.is_master()
                    && !n.is_failing()
                    && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
            .ok_or_else(|| Error::Invalid(format!("no live master serves slot {slot}")))?;
        self.member_of_port(line.port).ok_or_else(|| {
            Error::Invalid(format!(
                "slot {slot} is served by {}, not a member",
                line.id
            ))
        })
    }

    /// The member that serves `key`'s slot now (see [`Cluster::master_of_slot`]).
    pub fn master_of_key(&self, key: impl AsRef<[u8]>) -> Result<usize> {
        self.master_of_slot(probe::redis_key_slot(key.as_ref()))
    }

    /// The members that are masters serving at least one slot, in member order.
    pub fn masters(&self) -> Result<Vec<usize>> {
        self.redis_only()?;
        let mut out: Vec<usize> = self
            .any_view()?
            .iter()
            .filter(|n| n.is_master() && !n.is_failing() && !n.slots.is_empty())
            .filter_map(|n| self.member_of_port(n.port))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The members replicating `master` now, in member order.
    pub fn replicas_of(&self, master: usize) -> Result<Vec<usize>> {
        self.redis_only()?;
        let view = self.any_view()?;
        let port = self.member_addr(master)?.port();
        let Some(id) = view.iter().find(|n| n.port == port).map(|n| n.id.clone()) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<usize> = view
            .iter()
            .filter(|n| n.master_id.as_deref() == Some(id.as_str()) && !n.is_failing())
            .filter_map(|n| self.member_of_port(n.port))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// One check of "settled": every running member (but `skip`) reports
    /// `cluster_state:ok`, sees every other checked member as connected and not
    /// failing, agrees with the others on the owner of every slot (all covered), and,
    /// if a replica, has its replication link up. `Err` says what is not yet so.
    fn settled(&self, skip: Option<usize>) -> Result<Owners, String> {
        let checked: Vec<usize> = (0..self.members().len())
            .filter(|i| Some(*i) != skip && self.members()[*i].is_running())
            .collect();
        if checked.is_empty() {
            return Err("no running member".into());
        }
        let mut agreed: Option<Owners> = None;
        for &i in &checked {
            let a = self.members()[i].addr().expect("a spawned member");
            let mut con = admin(a).map_err(|e| format!("member {i} ({a}): {e}"))?;
            let info = con
                .query_text(&["CLUSTER", "INFO"])
                .map_err(|e| format!("member {i} ({a}) CLUSTER INFO: {e}"))?;
            if !info.contains("cluster_state:ok") {
                return Err(format!("member {i} ({a}) is not cluster_state:ok"));
            }
            let view = parse_cluster_nodes(
                &con.query_text(&["CLUSTER", "NODES"])
                    .map_err(|e| format!("member {i} ({a}) CLUSTER NODES: {e}"))?,
            );
            for &j in &checked {
                let port = self.members()[j].port().expect("a spawned member");
                match view.iter().find(|n| n.port == port) {
                    Some(n) if n.connected && !n.is_failing() && !n.has("handshake") => {}
                    Some(n) => {
                        return Err(format!(
                            "member {i} sees member {j} as {} ({})",
                            n.flags.join(","),
                            if n.connected {
                                "connected"
                            } else {
                                "disconnected"
                            }
                        ))
                    }
                    None => return Err(format!("member {i} does not know member {j} yet")),
                }
            }
            let mut owners = vec![usize::MAX; SLOTS as usize];
            for n in view.iter().filter(|n| n.is_master()) {
                let Some(m) = self.member_of_port(n.port) else {
                    return Err(format!("member {i} lists an unknown node {}", n.id));
                };
                for &(lo, hi) in &n.slots {
                    for s in lo..=hi.min(SLOTS - 1) {
                        owners[s as usize] = m;
                    }
                }
            }
            if let Some(s) = owners.iter().position(|o| *o == usize::MAX) {
                return Err(format!("member {i} sees slot {s} unassigned"));
            }
            if let Some(prev) = &agreed {
                if let Some(s) = (0..SLOTS as usize).find(|s| prev[*s] != owners[*s]) {
                    return Err(format!(
                        "members disagree on slot {s}: member {} vs member {}",
                        prev[s], owners[s]
                    ));
                }
            } else {
                agreed = Some(owners);
            }
            let me = view.iter().find(|n| n.has("myself"));
            if me.is_some_and(|n| n.has("slave")) {
                let repl = con
                    .query_text(&["INFO", "replication"])
                    .map_err(|e| format!("member {i} INFO replication: {e}"))?;
                if !repl.contains("master_link_status:up") {
                    return Err(format!("replica member {i}: replication link not up yet"));
                }
            }
        }
        Ok(agreed.expect("at least one member checked"))
    }

    fn wait_settled(&self, skip: Option<usize>, done: impl Fn(&Owners) -> bool) -> Result<Owners> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let why = match self.settled(skip) {
                Ok(owners) if done(&owners) => return Ok(owners),
                Ok(_) => "the condition does not hold yet".to_string(),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "the Redis Cluster {} did not settle within {CLUSTER_TIMEOUT:?}: {why}\n{}",
                    self.url(),
                    logs(self, 8)
                )));
            }
            // Polling a condition with a deadline (not a sleep used as synchronisation).
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to 30 s) until every running member reports `cluster_state:ok`, sees
    /// the other running members connected, all agree on the owner of every slot, and
    /// every replica's replication link is up. A paused member makes this time out.
    /// Fails with [`Error::Timeout`] naming what did not hold, with log tails.
    pub fn wait_cluster_ok(&self) -> Result<()> {
        self.redis_only()?;
        self.wait_settled(None, |_| true).map(|_| ())
    }

    /// After master `old` was killed (or paused), waits (up to 30 s) until one of its
    /// replicas is promoted (serves every slot `old` served) and the other members are
    /// settled as in [`Cluster::wait_cluster_ok`]; returns the new master's index.
    ///
    /// Call it soon after the kill: the slots of `old` are read from the running
    /// members' views, which forget them once the failover is done. With
    /// `--cluster-node-timeout 1000` the promotion takes about 2–3 s.
    pub fn wait_for_failover(&self, old: usize) -> Result<usize> {
        self.redis_only()?;
        let port = self.member_addr(old)?.port();
        let view = self.any_view()?;
        let slots: Vec<(u16, u16)> = view
            .iter()
            .find(|n| n.port == port)
            .map(|n| n.slots.clone())
            .unwrap_or_default();
        let Some(&(first, _)) = slots.first() else {
            // Already failed over, or never a master: the new owner is not knowable.
            return Err(Error::Invalid(format!(
                "member {old} serves no slot in the cluster's view (not a master, or \
                 the failover already finished)"
            )));
        };
        let owners = self.wait_settled(Some(old), |owners| {
            slots
                .iter()
                .all(|&(lo, hi)| (lo..=hi).all(|s| owners[s as usize] != old))
        })?;
        Ok(owners[first as usize])
    }

    /// Moves hash slot `slot` (and its keys) from member `from` to member `to`, the
    /// documented way (as `redis-cli --cluster reshard` does): `SETSLOT IMPORTING` on
    /// `to`, `SETSLOT MIGRATING` on `from`, `MIGRATE` of the keys in batches of 100
    /// listed by `CLUSTER GETKEYSINSLOT`, then `SETSLOT NODE` on `to`, `from` and every
    /// other running master. Safe while a workload runs: clients get `ASK`/`MOVED` and
    /// `TRYAGAIN` meanwhile. Returns how many keys were moved. Does not wait for the
    /// other nodes' views to converge ([`Cluster::wait_cluster_ok`] does).
    pub fn migrate_slot(&self, slot: u16, from: usize, to: usize) -> Result<usize> {
        self.redis_only()?;
        if slot >= SLOTS {
            return Err(Error::Invalid(format!("slot {slot} is not below {SLOTS}")));
        }
        if from == to {
            return Err(Error::Invalid(format!(
                "slot {slot}: from and to are both member {to}"
            )));
        }
        let (src_addr, dst_addr) = (self.member_addr(from)?, self.member_addr(to)?);
        let from_id = self.node_id(from)?;
        let to_id = self.node_id(to)?;
        let slot_s = slot.to_string();
        let setslot = |a: SocketAddr, args: &[&str]| -> Result<()> {
            let mut cmd = vec!["CLUSTER", "SETSLOT", &slot_s];
            cmd.extend_from_slice(args);
            admin(a)
                .and_then(|mut con| con.query_ok(&cmd))
                .map(|_| ())
                .map_err(ctx(format!("{} on {a}", cmd.join(" "))))
        };
        setslot(dst_addr, &["IMPORTING", &from_id])?;
        setslot(src_addr, &["MIGRATING", &to_id])?;
        let mut src = admin(src_addr).map_err(ctx(format!("connect {src_addr}")))?;
        let to_port = dst_addr.port().to_string();
        let mut moved = 0;
        loop {
            let keys = match src
                .query_ok(&[
                    "CLUSTER",
                    "GETKEYSINSLOT",
                    &slot_s,
                    &MIGRATE_BATCH.to_string(),
                ])
                .map_err(ctx(format!("CLUSTER GETKEYSINSLOT {slot} on {src_addr}")))?
            {
                Resp::Array(Some(items)) => items
                    .into_iter()
                    .filter_map(|k| match k {
                        Resp::Bulk(Some(b)) => Some(b),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
                other => {
                    return Err(Error::Invalid(format!(
                        "CLUSTER GETKEYSINSLOT replied {other:?}"
                    )))
                }
            };
            if keys.is_empty() {
                break;
            }
            let mut cmd: Vec<Vec<u8>> = ["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"]
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect();
            moved += keys.len();
            cmd.extend(keys);
            src.query_ok(&cmd).map_err(ctx(format!(
                "MIGRATE of slot {slot} from {src_addr} to {dst_addr} (the slot stays \
                 MIGRATING/IMPORTING)"
            )))?;
        }
        setslot(dst_addr, &["NODE", &to_id])?;
        setslot(src_addr, &["NODE", &to_id])?;
        for (i, m) in self.members().iter().enumerate() {
            if i == from || i == to || !m.is_running() {
                continue;
            }
            let Some(a) = m.addr() else { continue };
            let Ok(view) = self.cluster_nodes(i) else {
                continue; // paused or dying: gossip tells it later
            };
            if view.iter().any(|n| n.has("myself") && n.is_master()) {
                setslot(a, &["NODE", &to_id])?;
            }
        }
        Ok(moved)
    }
}
