//! Redis Clusters for the cluster tests: the testkit's shared one
//! ([`cluster_url`]), and private ones assembled here from testkit servers
//! (`CLUSTER ADDSLOTSRANGE` + `CLUSTER MEET`, explicit bus ports) for the
//! tests that kill nodes or need TLS or ACL users (the testkit's
//! `spawn_redis_cluster` has no TLS).

#![allow(dead_code)]

use latchkey_testkit::{spawn_redis, RedisOptions, Server, TlsFiles};
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A cluster of testkit servers (killed when dropped).
pub struct OwnCluster {
    pub nodes: Vec<Server>,
    /// Set when the nodes serve TLS only (bus included).
    pub tls: Option<TlsFiles>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub fn node_con(addr: &str) -> redis::Connection {
    node_con_tls(addr, None)
}

fn node_con_tls(addr: &str, tls: Option<&TlsFiles>) -> redis::Connection {
    let client = match tls {
        None => redis::Client::open(format!("redis://{addr}")),
        Some(t) => redis::Client::build_with_tls(
            format!("rediss://{addr}"),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(&t.ca).expect("the CA file")),
            },
        ),
    };
    let con = client
        .expect("node client")
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("node connection");
    let _ = con.set_read_timeout(Some(Duration::from_secs(5)));
    con
}

impl OwnCluster {
    /// `masters` masters, slots split evenly; `extra` server arguments.
    pub fn spawn(masters: usize, extra: &[&str]) -> OwnCluster {
        Self::spawn_with_replicas(masters, 0, extra)
    }

    /// `masters` masters (nodes `0..masters`) with `replicas` replicas each
    /// (node `masters + i * replicas + r` replicates master `i`).
    pub fn spawn_with_replicas(masters: usize, replicas: usize, extra: &[&str]) -> OwnCluster {
        Self::spawn_full(masters, replicas, extra, None)
    }

    /// Like [`spawn_with_replicas`](Self::spawn_with_replicas); with `tls`,
    /// clients and the cluster bus speak TLS only.
    pub fn spawn_full(
        masters: usize,
        replicas: usize,
        extra: &[&str],
        tls: Option<TlsFiles>,
    ) -> OwnCluster {
        let node_con = |a: &str| node_con_tls(a, tls.as_ref());
        let total = masters * (1 + replicas);
        let mut nodes = Vec::new();
        let mut buses = Vec::new();
        for _ in 0..total {
            let bus = free_port();
            buses.push(bus);
            let mut o = RedisOptions::default()
                .arg("--cluster-enabled")
                .arg("yes")
                .arg("--cluster-config-file")
                .arg("{dir}/nodes.conf")
                .arg("--cluster-port")
                .arg(bus.to_string());
            for a in extra {
                o = o.arg(*a);
            }
            if let Some(t) = &tls {
                o.tls = Some(t.clone());
                o = o
                    .arg("--tls-cluster")
                    .arg("yes")
                    .arg("--tls-replication")
                    .arg("yes");
            }
            nodes.push(spawn_redis(o).expect("spawn a cluster node"));
        }
        let c = OwnCluster {
            nodes,
            tls: tls.clone(),
        };
        let addrs = c.addrs();
        let per = 16384 / masters;
        for (i, a) in addrs.iter().enumerate().take(masters) {
            let lo = i * per;
            let hi = if i + 1 == masters {
                16383
            } else {
                lo + per - 1
            };
            let _: () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(lo)
                .arg(hi)
                .query(&mut node_con(a))
                .expect("ADDSLOTSRANGE");
        }
        let mut first = node_con(&addrs[0]);
        for (a, bus) in addrs.iter().zip(&buses).skip(1) {
            let (h, p) = a.rsplit_once(':').unwrap();
            // Without the bus port, MEET assumes port + 10000.
            let _: () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg(h)
                .arg(p)
                .arg(bus)
                .query(&mut first)
                .expect("CLUSTER MEET");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        if replicas > 0 {
            let id = |a: &str| -> String {
                redis::cmd("CLUSTER")
                    .arg("MYID")
                    .query(&mut node_con(a))
                    .unwrap()
            };
            let master_ids: Vec<String> = addrs[..masters].iter().map(|a| id(a)).collect();
            for i in 0..masters {
                for r in 0..replicas {
                    let a = &addrs[masters + i * replicas + r];
                    // A replica can follow a master only once it knows it.
                    loop {
                        assert!(Instant::now() < deadline, "{a} never met its master");
                        let r: redis::RedisResult<()> = redis::cmd("CLUSTER")
                            .arg("REPLICATE")
                            .arg(&master_ids[i])
                            .query(&mut node_con(a));
                        if r.is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        'ready: loop {
            assert!(Instant::now() < deadline, "the cluster never became ready");
            std::thread::sleep(Duration::from_millis(50));
            for a in &addrs {
                let mut con = node_con(a);
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap();
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut con).unwrap();
                let known = nodes.lines().filter(|l| l.contains("connected")).count();
                let replicas_up = nodes
                    .lines()
                    .filter(|l| l.contains("slave") && l.contains("connected"))
                    .count();
                if !info.contains("cluster_state:ok")
                    || known != total
                    || replicas_up != masters * replicas
                {
                    continue 'ready;
                }
            }
            // Replicas synchronised with their masters.
            for a in &addrs[masters..] {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut node_con(a))
                    .unwrap();
                if !info.contains("master_link_status:up") {
                    continue 'ready;
                }
            }
            break;
        }
        c
    }

    /// `host:port` of every node.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|s| s.addr().expect("a spawned node").to_string())
            .collect()
    }

    /// `redis+cluster://` (`rediss+cluster://` with TLS) with the nodes in
    /// this order.
    pub fn url_of(&self, order: &[usize]) -> String {
        let addrs = self.addrs();
        let hosts: Vec<&str> = order.iter().map(|i| addrs[*i].as_str()).collect();
        let scheme = if self.tls.is_some() {
            "rediss+cluster"
        } else {
            "redis+cluster"
        };
        format!("{scheme}://{}", hosts.join(","))
    }

    pub fn url(&self) -> String {
        self.url_of(&(0..self.nodes.len()).collect::<Vec<_>>())
    }
}

/// The cluster every test of the binary shares: the testkit's shared
/// 3-master cluster (or `LATCHKEY_TEST_REDIS_CLUSTER_URL`).
pub fn cluster_url() -> String {
    latchkey_testkit::redis_cluster().url().to_string()
}
