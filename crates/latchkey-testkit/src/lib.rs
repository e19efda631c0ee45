//! Test support for latchkey: real servers, fault hooks, a fault proxy and a
//! child-process helper. A dev-dependency of tests only.
//!
//! # Shared servers
//! [`redis`], [`etcd`], [`zookeeper`], [`etcd_cluster`], [`zookeeper_ensemble`],
//! [`redis_cluster`] and [`consul`] each start their server **once per test binary** (on first use), on free
//! loopback ports with its own temp data dir, wait until it is ready, and share it
//! with every test of the binary; tests isolate themselves with
//! [`unique_namespace`]. When `LATCHKEY_TEST_<NAME>_URL` is set (`REDIS`, `ETCD`,
//! `ETCD_CLUSTER`, `ZOOKEEPER`, `ZOOKEEPER_ENSEMBLE`, `REDIS_CLUSTER`, `CONSUL`), the handle just
//! carries that URL and nothing is spawned (fault hooks then return
//! [`Error::External`]).
//!
//! # Own servers for destructive tests
//! [`spawn_redis`], [`spawn_etcd`], [`spawn_zookeeper`], [`spawn_etcd_cluster`],
//! [`spawn_zookeeper_ensemble`] and [`spawn_redis_cluster`] start a private instance,
//! killed when its handle drops.
//! Fault hooks: [`Server::pause`]/[`Server::resume`] (SIGSTOP/SIGCONT),
//! [`Server::kill`] (SIGKILL), [`Server::restart`] (same data dir and port),
//! [`Cluster::leader`]. Network faults: [`FaultProxy`]. A lock holder in its own
//! process: [`child::ChildProcess`].
//!
//! # Redis Cluster
//! [`spawn_redis_cluster`] / [`redis_cluster`] (URL `redis+cluster://…`, masters
//! first; explicit bus ports; formed over raw RESP, no `redis-cli`; node timeout
//! [`NODE_TIMEOUT_MS`] = 1 s for fast failover). Helpers on its [`Cluster`]:
//! [`Cluster::node_id`], [`Cluster::cluster_nodes`] (parsed `CLUSTER NODES`),
//! [`Cluster::masters`], [`Cluster::replicas_of`], [`Cluster::master_of_slot`],
//! [`Cluster::master_of_key`] (slot from [`probe::redis_key_slot`]),
//! [`Cluster::wait_cluster_ok`], [`Cluster::wait_for_failover`] (after killing a
//! master) and [`Cluster::migrate_slot`] (the documented IMPORTING/MIGRATING/
//! `MIGRATE`/`SETSLOT NODE` procedure, usable under load). Raw RESP for tests:
//! [`probe::RedisConn`].
//!
//! # No orphans
//! Every child gets `PR_SET_PDEATHSIG = SIGKILL` (forked from one long-lived spawner
//! thread, because the signal follows the forking *thread*), is killed when its handle
//! drops, and an `atexit` handler kills whatever is still registered (the shared
//! servers live in statics, which never drop) and removes their temp dirs.
//!
//! # Missing servers
//! A missing binary is [`Error::Missing`], whose message has the exact `apt-get`
//! command. The shared accessors panic with that message (a test that needs a server
//! cannot run without it); with `CI=true` the `try_*` accessors panic too, so a
//! missing server is never a silent skip in CI.

#![warn(missing_docs)]

mod bins;
pub mod child;
mod consul;
pub mod probe;
mod process;
mod proxy;
mod redis_cluster;
mod server;

pub use bins::{is_ci, APT_INSTALL_ALL, ZOOKEEPER_JAR};
pub use child::ChildProcess;
pub use consul::{spawn_consul_sim, ConsulTarget};
pub use proxy::{FaultProxy, ProxyMode};
pub use redis_cluster::{parse_cluster_nodes, NodeLine, NODE_TIMEOUT_MS, SLOTS};
pub use server::{Cluster, EtcdOptions, Kind, RedisOptions, Server, TlsFiles, ZookeeperOptions};

use std::sync::OnceLock;

/// Why the testkit could not do something.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A server binary or jar is not installed.
    Missing {
        /// What is missing (binary name or path).
        what: String,
        /// The exact command that installs it.
        install: String,
    },
    /// A server did not start or did not become ready.
    Start {
        /// Which server.
        name: String,
        /// Exit status or timeout.
        reason: String,
        /// The last lines of its log.
        log: String,
    },
    /// A fault hook on a server the testkit did not spawn (its URL came from the environment).
    External(String),
    /// The process is not running (killed, or never started).
    NotRunning(String),
    /// Waiting for a condition (e.g. a leader) timed out.
    Timeout(String),
    /// Bad argument.
    Invalid(String),
    /// An I/O error, with what was being done.
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Error {
        Error::io("I/O", source)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Missing { what, install } => write!(
                f,
                "{what} is not installed; install it with `{install}` (as root), or point the \
                 tests at a running server with LATCHKEY_TEST_<BACKEND>_URL"
            ),
            Error::Start { name, reason, log } => {
                write!(f, "{name} did not start: {reason}; last log lines:\n{log}")
            }
            Error::External(url) => write!(
                f,
                "fault hooks need a server spawned by the testkit, not the external {url}"
            ),
            Error::NotRunning(name) => write!(f, "{name} is not running"),
            Error::Timeout(what) => write!(f, "timed out: {what}"),
            Error::Invalid(what) => write!(f, "invalid argument: {what}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The testkit's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A namespace no other test (in this or another process) uses: `<prefix>-<pid>-<unique>`.
/// Only ASCII letters, digits and `-`, so it is valid in every backend's keys and paths.
pub fn unique_namespace(prefix: &str) -> String {
    let clean: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(48)
        .collect();
    format!(
        "{clean}-{}-{:x}",
        process::unique_suffix(),
        process::pseudo_random() & 0xffff
    )
}

// ------------------------------------------------------------ spawning own instances

/// Spawns a private `redis-server`; killed when the handle drops.
pub fn spawn_redis(options: RedisOptions) -> Result<Server> {
    server::spawn_redis(&options)
}

/// Spawns a private single-node etcd; killed when the handle drops.
pub fn spawn_etcd(options: EtcdOptions) -> Result<Server> {
    server::spawn_etcd(&options)
}

/// Spawns a private standalone ZooKeeper; killed when the handle drops.
pub fn spawn_zookeeper(options: ZookeeperOptions) -> Result<Server> {
    server::spawn_zookeeper(&options)
}

/// Spawns a private etcd cluster of `size` members (always with
/// `--heartbeat-interval 50 --election-timeout 500`); waits until all are healthy.
pub fn spawn_etcd_cluster(size: usize, options: EtcdOptions) -> Result<Cluster> {
    server::spawn_etcd_cluster(size, &options)
}

/// Spawns a private Redis Cluster of `masters` masters (members `0..masters`, the
/// 16384 slots split evenly in member order) and `replicas_per_master` replicas each
/// (member `masters + i * replicas_per_master + r` replicates master `i`), every node
/// with an explicit cluster bus port and `--cluster-node-timeout 1000` (fast
/// failover; `options.args` can override it). The cluster is formed without
/// `redis-cli` and is returned once every node reports `cluster_state:ok`, all agree
/// on the owner of every slot and every replica is in sync. The URL is
/// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...` (masters first). TLS is not
/// supported ([`Error::Invalid`]). Killed when the handle drops.
pub fn spawn_redis_cluster(
    masters: usize,
    replicas_per_master: usize,
    options: RedisOptions,
) -> Result<Cluster> {
    redis_cluster::spawn_redis_cluster(masters, replicas_per_master, &options)
}

/// Spawns a private ZooKeeper ensemble of `size` members; waits until all serve.
/// Use [`ZookeeperOptions::fast`] (`tickTime=200`) for fault tests.
pub fn spawn_zookeeper_ensemble(size: usize, options: ZookeeperOptions) -> Result<Cluster> {
    server::spawn_zookeeper_ensemble(size, &options)
}

// ------------------------------------------------------------ shared instances

/// Throwaway TLS files (CA, and a certificate for `127.0.0.1`/`localhost`), made once
/// per test binary with the `openssl` CLI. See [`TlsFiles::generate`].
pub fn test_tls() -> Result<&'static TlsFiles> {
    static CELL: OnceLock<Result<TlsFiles, String>> = OnceLock::new();
    CELL.get_or_init(|| TlsFiles::generate().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Invalid(e.clone()))
}

fn env_url(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// Panics (with the install command) in CI; else hands the error back.
fn ci_fatal<T>(what: &str, r: &Result<T, String>) {
    if let Err(e) = r {
        if is_ci() {
            panic!("latchkey-testkit: cannot start the shared {what} server (CI=true makes this a failure): {e}");
        }
    }
}

fn shared<T: Send + Sync>(
    cell: &'static OnceLock<Result<T, String>>,
    what: &str,
    make: impl FnOnce() -> Result<T>,
) -> Result<&'static T, String> {
    let r = cell.get_or_init(|| make().map_err(|e| e.to_string()));
    ci_fatal(what, r);
    r.as_ref().map_err(Clone::clone)
}

fn must<T>(what: &str, r: Result<&'static T, String>) -> &'static T {
    r.unwrap_or_else(|e| panic!("latchkey-testkit: the shared {what} server is unavailable: {e}"))
}

/// The shared Redis of this test binary (or `LATCHKEY_TEST_REDIS_URL`); panics if it
/// cannot start. See [`try_redis`].
pub fn redis() -> &'static Server {
    must("redis", try_redis())
}

/// Like [`redis`], returning the reason (as text) instead of panicking, except with
/// `CI=true`. The first attempt's outcome is cached.
pub fn try_redis() -> Result<&'static Server, String> {
    static CELL: OnceLock<Result<Server, String>> = OnceLock::new();
    shared(&CELL, "redis", || {
        match env_url("LATCHKEY_TEST_REDIS_URL") {
            Some(url) => Ok(Server::external(Kind::Redis, url)),
            None => spawn_redis(RedisOptions::default()),
        }
    })
}

/// The shared single-node etcd (or `LATCHKEY_TEST_ETCD_URL`); panics if it cannot start.
pub fn etcd() -> &'static Server {
    must("etcd", try_etcd())
}

/// Like [`etcd`], returning the reason instead of panicking (except with `CI=true`).
pub fn try_etcd() -> Result<&'static Server, String> {
    static CELL: OnceLock<Result<Server, String>> = OnceLock::new();
    shared(&CELL, "etcd", || match env_url("LATCHKEY_TEST_ETCD_URL") {
        Some(url) => Ok(Server::external(Kind::Etcd, url)),
        None => spawn_etcd(EtcdOptions::default()),
    })
}

/// The shared standalone ZooKeeper with TTL nodes enabled (or
/// `LATCHKEY_TEST_ZOOKEEPER_URL`); panics if it cannot start.
pub fn zookeeper() -> &'static Server {
    must("zookeeper", try_zookeeper())
}

/// Like [`zookeeper`], returning the reason instead of panicking (except with `CI=true`).
pub fn try_zookeeper() -> Result<&'static Server, String> {
    static CELL: OnceLock<Result<Server, String>> = OnceLock::new();
    shared(&CELL, "zookeeper", || {
        match env_url("LATCHKEY_TEST_ZOOKEEPER_URL") {
            Some(url) => Ok(Server::external(Kind::ZooKeeper, url)),
            None => spawn_zookeeper(ZookeeperOptions::default()),
        }
    })
}

/// The shared 3-member etcd cluster (or `LATCHKEY_TEST_ETCD_CLUSTER_URL`); panics if it
/// cannot start.
pub fn etcd_cluster() -> &'static Cluster {
    must("etcd cluster", try_etcd_cluster())
}

/// Like [`etcd_cluster`], returning the reason instead of panicking (except with `CI=true`).
pub fn try_etcd_cluster() -> Result<&'static Cluster, String> {
    static CELL: OnceLock<Result<Cluster, String>> = OnceLock::new();
    shared(&CELL, "etcd cluster", || {
        match env_url("LATCHKEY_TEST_ETCD_CLUSTER_URL") {
            Some(url) => Ok(Cluster::external(Kind::Etcd, url)),
            None => spawn_etcd_cluster(3, EtcdOptions::default()),
        }
    })
}

/// The shared 3-member ZooKeeper ensemble (or `LATCHKEY_TEST_ZOOKEEPER_ENSEMBLE_URL`);
/// panics if it cannot start.
pub fn zookeeper_ensemble() -> &'static Cluster {
    must("zookeeper ensemble", try_zookeeper_ensemble())
}

/// Like [`zookeeper_ensemble`], returning the reason instead of panicking (except with `CI=true`).
pub fn try_zookeeper_ensemble() -> Result<&'static Cluster, String> {
    static CELL: OnceLock<Result<Cluster, String>> = OnceLock::new();
    shared(&CELL, "zookeeper ensemble", || {
        match env_url("LATCHKEY_TEST_ZOOKEEPER_ENSEMBLE_URL") {
            Some(url) => Ok(Cluster::external(Kind::ZooKeeper, url)),
            None => spawn_zookeeper_ensemble(3, ZookeeperOptions::default()),
        }
    })
}

/// The shared 3-master Redis Cluster without replicas (or
/// `LATCHKEY_TEST_REDIS_CLUSTER_URL`, a `redis+cluster://` URL); panics if it cannot
/// start. See [`spawn_redis_cluster`]; for failover tests spawn your own with replicas.
pub fn redis_cluster() -> &'static Cluster {
    must("redis cluster", try_redis_cluster())
}

/// Like [`redis_cluster`], returning the reason instead of panicking (except with `CI=true`).
pub fn try_redis_cluster() -> Result<&'static Cluster, String> {
    static CELL: OnceLock<Result<Cluster, String>> = OnceLock::new();
    shared(&CELL, "redis cluster", || {
        match env_url("LATCHKEY_TEST_REDIS_CLUSTER_URL") {
            Some(url) => Ok(Cluster::external(Kind::Redis, url)),
            None => spawn_redis_cluster(3, 0, RedisOptions::default()),
        }
    })
}

/// The shared Consul target: a real agent from `LATCHKEY_TEST_CONSUL_URL`, else the
/// in-process Consul HTTP-API **simulator** (`latchkey_consul_sim::ConsulSim`).
pub fn consul() -> &'static ConsulTarget {
    must("consul", try_consul())
}

/// Like [`consul`], returning the reason instead of panicking (except with `CI=true`).
pub fn try_consul() -> Result<&'static ConsulTarget, String> {
    static CELL: OnceLock<Result<ConsulTarget, String>> = OnceLock::new();
    shared(&CELL, "consul", || {
        match env_url("LATCHKEY_TEST_CONSUL_URL") {
            Some(url) => Ok(ConsulTarget::external(url)),
            None => spawn_consul_sim(),
        }
    })
}
