//! The connection URL, the command connection (one multiplexed connection
//! per handle, or one cluster connection on a Redis Cluster; either is
//! re-established after a failure), the retry of commands a cluster
//! refused without running them, and the mapping of client errors to
//! latchkey's categories.

use latchkey_core::{BackendUrl, Error, Result};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, RedisFuture, RedisResult, Value,
};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub(crate) const NAME: &str = "redis";

/// Default for `?timeout=`: connecting and every reply on the command
/// connection.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default for `?history=`: how many change events the stream keeps for
/// watches that resume (approximately: trimming is `MAXLEN ~`).
pub const DEFAULT_HISTORY: u64 = 10_000;

/// What a URL asks for.
pub(crate) struct Config {
    pub target: Target,
    pub timeout: Duration,
    pub history: u64,
    pub namespace: String,
}

/// Where a handle's connections go: one Redis primary, or a Redis Cluster.
#[derive(Clone)]
pub(crate) enum Target {
    /// `redis://`, `rediss://`.
    Single(Box<Client>),
    /// `redis+cluster://`, `rediss+cluster://`.
    Cluster(Arc<ClusterTarget>),
}

/// A Redis Cluster: its seed nodes and the two cluster clients built from
/// them.
pub(crate) struct ClusterTarget {
    /// The nodes of the URL, with credentials and TLS settings.
    seeds: Vec<ConnectionInfo>,
    /// The CA certificates of `?ca=` (PEM), if any.
    ca: Option<Vec<u8>>,
    /// For commands: every reply within the timeout, and no retries by the
    /// library (see [`Conn::run`]: a library retry after a lost reply would
    /// run a write twice).
    commands: ClusterClient,
    /// For blocking reads of watches: no reply timeout; the library
    /// follows redirections and retries (every command a watch sends is a
    /// read or may be repeated).
    blocking: ClusterClient,
}

impl ClusterTarget {
    fn new(
        seeds: Vec<ConnectionInfo>,
        ca: Option<Vec<u8>>,
        timeout: Duration,
    ) -> RedisResult<Self> {
        let builder = |retries: u32| {
            let mut b = ClusterClientBuilder::new(seeds.clone())
                .connection_timeout(timeout)
                .retries(retries)
                // The library's default waits at least 1.28 s before each
                // retry of TRYAGAIN or CLUSTERDOWN; a slot migration is over
                // much sooner.
                .min_retry_wait(10)
                .max_retry_wait(200);
            if let Some(pem) = &ca {
                b = b.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                });
            }
            b
        };
        let commands = builder(0).response_timeout(timeout).build()?;
        let blocking = builder(16).overall_response_timeout(None).build()?;
        Ok(ClusterTarget {
            seeds,
            ca,
            commands,
            blocking,
        })
    }

    /// The seed nodes as `(host, port)`.
    pub(crate) fn seed_addrs(&self) -> Vec<(String, u16)> {
        self.seeds
            .iter()
            .filter_map(|i| match i.addr() {
                ConnectionAddr::Tcp(h, p)
                | ConnectionAddr::TcpTls {
                    host: h, port: p, ..
                } => Some((h.clone(), *p)),
                _ => None,
            })
            .collect()
    }

    /// A single-node client of one node of the cluster (pub/sub).
    pub(crate) fn node_client(&self, host: &str, port: u16) -> RedisResult<Client> {
        let first = &self.seeds[0];
        let addr = match first.addr() {
            ConnectionAddr::TcpTls { .. } => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: false,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host.to_string(), port),
        };
        let info = addr
            .into_connection_info()?
            .set_redis_settings(first.redis_settings().clone());
        match &self.ca {
            None => Client::open(info),
            Some(pem) => Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
        }
    }

    /// A blocking (sync) cluster connection, for [`crate::RedisBackend::revoke_lock`].
    pub(crate) fn sync_connection(&self) -> RedisResult<redis::cluster::ClusterConnection> {
        self.commands.get_connection()
    }
}

impl Target {
    /// A connection whose replies are awaited at most `response_timeout`
    /// (`None`: a connection for blocking reads).
    pub(crate) async fn connect(
        &self,
        timeout: Duration,
        response_timeout: Option<Duration>,
    ) -> Result<Connection> {
        let fut = async {
            match self {
                Target::Single(client) => {
                    let cfg = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(response_timeout);
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await
                        .map(Connection::Single)
                }
                Target::Cluster(c) => {
                    let client = if response_timeout.is_some() {
                        &c.commands
                    } else {
                        &c.blocking
                    };
                    client
                        .get_async_connection()
                        .await
                        .map(|con| Connection::Cluster(Box::new(ClusterScripts { con })))
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(map_err(&e)),
            Err(_) => Err(Error::unavailable(
                NAME,
                format!("no connection within {timeout:?}"),
            )),
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }
}

/// A command connection: to the one primary, or to the cluster (which
/// routes each command by the hash slot of its first key and follows the
/// slot after redirections). Scripts and commands take either.
#[derive(Clone)]
pub(crate) enum Connection {
    Single(MultiplexedConnection),
    Cluster(Box<ClusterScripts>),
}

/// A cluster connection that runs a script the slot's master does not know
/// (`NOSCRIPT`: after a failover, a restart, a migration to a node that
/// never ran it) with `EVAL` of its source, routed by the same key as the
/// `EVALSHA`, so it loads and runs on the one node that owns the slot.
///
/// `redis::Script` would answer `NOSCRIPT` with `SCRIPT LOAD` and
/// `EVALSHA` again: a cluster connection sends a keyless `SCRIPT LOAD` to
/// every node (failing while any node is down), and even routed by the
/// script's key it can land elsewhere than the `EVALSHA`: while the
/// library's slot map names a master it has no connection to (a failover
/// in progress), each command goes to a random node, so the script was
/// loaded on one node and `NOSCRIPT` came back from another.
#[derive(Clone)]
pub(crate) struct ClusterScripts {
    con: ClusterConnection,
}

fn simple_args(cmd: &redis::Cmd) -> Vec<&[u8]> {
    cmd.args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect()
}

/// Whether a reply is `NOSCRIPT`: the library returns a server's error
/// reply as an `Ok` value (turned into an error only when it is converted),
/// or as an error.
fn is_noscript(reply: &RedisResult<Value>) -> bool {
    match reply {
        Ok(Value::ServerError(e)) => e.kind() == Some(redis::ServerErrorKind::NoScript),
        Ok(_) => false,
        Err(e) => e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript),
    }
}

impl ClusterScripts {
    fn command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        let args = simple_args(cmd);
        let source = match args.as_slice() {
            // EVALSHA <sha> <numkeys> <key>…
            [word, sha, _numkeys, ..] if word.eq_ignore_ascii_case(b"EVALSHA") => {
                crate::scripts::scripts().source(sha)
            }
            _ => None,
        };
        let Some(source) = source else {
            return self.con.req_packed_command(cmd);
        };
        Box::pin(async move {
            let reply = self.con.req_packed_command(cmd).await;
            if !is_noscript(&reply) {
                return reply;
            }
            let mut eval = redis::cmd("EVAL");
            eval.arg(source);
            for a in &args[2..] {
                eval.arg(*a);
            }
            self.con.req_packed_command(&eval).await
        })
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.con.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.con.get_db(),
        }
    }
}

fn tls_provider() {
    // rustls needs one process-wide crypto provider; if the application
    // installed one already, that one is used.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_ca(url: &BackendUrl, tls: bool) -> Result<Option<Vec<u8>>> {
    match url.param("ca") {
        None => Ok(None),
        Some(_) if !tls => Err(url.invalid(&format!(
            "ca= needs {}",
            if url.scheme().ends_with("+cluster") {
                "rediss+cluster://"
            } else {
                "rediss://"
            }
        ))),
        Some(path) => std::fs::read(path)
            .map(Some)
            .map_err(|e| url.invalid(&format!("cannot read the CA file {path:?}: {e}"))),
    }
}

impl Config {
    pub(crate) fn from_url(url: &BackendUrl) -> Result<Config> {
        let (tls, cluster) = match url.scheme() {
            "redis" => (false, false),
            "rediss" => (true, false),
            "redis+cluster" => (false, true),
            "rediss+cluster" => (true, true),
            _ => {
                return Err(url.invalid(
                    "the redis backend handles redis://, rediss://, redis+cluster:// and rediss+cluster://",
                ))
            }
        };
        url.expect_params(&["timeout", "history", "ca"])?;
        let timeout = url.param_duration("timeout")?.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(url.invalid("timeout must be longer than zero"));
        }
        let history = match url.param("history") {
            None => DEFAULT_HISTORY,
            Some(h) => h
                .parse::<u64>()
                .ok()
                .filter(|h| *h >= 1)
                .ok_or_else(|| url.invalid("history must be a positive number of events"))?,
        };
        if tls {
            tls_provider();
        }
        let mut redis_info = RedisConnectionInfo::default();
        if let Some(u) = url.username() {
            redis_info = redis_info.set_username(u);
        }
        if let Some(p) = url.password() {
            redis_info = redis_info.set_password(p);
        }
        let info_of = |host: &latchkey_core::url::HostPort, redis_info: RedisConnectionInfo| {
            let port = host.port.unwrap_or(6379);
            let addr = if tls {
                ConnectionAddr::TcpTls {
                    host: host.host.clone(),
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host.host.clone(), port)
            };
            addr.into_connection_info()
                .map(|i| i.set_redis_settings(redis_info))
                .map_err(|e| url.invalid(&e.to_string()))
        };
        let target = if cluster {
            if url.hosts().is_empty() {
                return Err(url.invalid("no host given"));
            }
            if !url.path().trim_start_matches('/').is_empty() {
                return Err(url.invalid(
                    "a Redis Cluster has only database 0: no /db path in redis+cluster:// URLs",
                ));
            }
            let seeds = url
                .hosts()
                .iter()
                .map(|h| info_of(h, redis_info.clone()))
                .collect::<Result<Vec<_>>>()?;
            let ca = read_ca(url, tls)?;
            Target::Cluster(Arc::new(
                ClusterTarget::new(seeds, ca, timeout).map_err(|e| url.invalid(&e.to_string()))?,
            ))
        } else {
            let host = match url.hosts() {
                [h] => h.clone(),
                [] => return Err(url.invalid("no host given")),
                _ => {
                    return Err(url.invalid(
                        "one Redis primary only (for a Redis Cluster use redis+cluster://; Sentinel is not supported)",
                    ))
                }
            };
            let db: i64 = match url.path().trim_start_matches('/') {
                "" => 0,
                p => p
                    .parse()
                    .ok()
                    .filter(|d| *d >= 0)
                    .ok_or_else(|| url.invalid("the path must be a database number, as /0"))?,
            };
            let info = info_of(&host, redis_info.set_db(db))?;
            let client = match read_ca(url, tls)? {
                None => Client::open(info),
                Some(pem) => Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                ),
            }
            .map_err(|e| url.invalid(&e.to_string()))?;
            Target::Single(Box::new(client))
        };
        Ok(Config {
            target,
            timeout,
            history,
            namespace: url.namespace().to_string(),
        })
    }
}

/// True if the connection a command ran on can no longer be trusted.
pub(crate) fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || is_dropped_request(e)
}

/// A cluster connection's task that dropped a request (its reply channel)
/// answers with this client error: whether the command was sent is
/// unknown, exactly as when a connection breaks under it.
fn is_dropped_request(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Client && e.to_string().contains("internal failure")
}

/// True if a cluster refused to run a command without running it: the
/// slot lives elsewhere (`MOVED`, `ASK`), is being migrated (`TRYAGAIN`),
/// the cluster is (briefly) down or the node was just demoted
/// (`CLUSTERDOWN`, `READONLY`), or the client had no connection for the
/// slot yet. Sending it again is safe, even for a write.
pub(crate) fn is_redirect(e: &RedisError) -> bool {
    matches!(
        e.code(),
        Some("MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "READONLY")
    ) || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
}

/// True if the server refused the credentials. The cluster client wraps a
/// refusal during its first connections into an I/O error whose text
/// still names it.
fn is_auth(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
        || (e.kind() == redis::ErrorKind::Io && {
            let t = e.to_string();
            t.contains("AuthenticationFailed") || t.contains("WRONGPASS") || t.contains("NOAUTH")
        })
}

/// Maps a client error to latchkey's categories.
pub(crate) fn map_err(e: &RedisError) -> Error {
    if is_auth(e) {
        return Error::Auth {
            backend: NAME,
            message: e.to_string(),
        };
    }
    let code = e.code().unwrap_or("");
    if matches!(
        code,
        "LOADING"
            | "MASTERDOWN"
            | "TRYAGAIN"
            | "CLUSTERDOWN"
            | "READONLY"
            | "BUSY"
            | "MOVED"
            | "ASK"
    ) || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
    {
        return Error::unavailable(NAME, e);
    }
    if is_connection_failure(e) {
        let text = e.to_string();
        if text.contains("certificate") {
            return Error::unavailable(NAME, format!("TLS handshake refused: {text}"));
        }
        return Error::unavailable(NAME, text);
    }
    Error::backend(NAME, e.clone())
}

/// How a command may be retried after the connection failed under it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// A read, or a write whose repetition does no harm (the lock scripts
    /// are idempotent per owner id): retried once on a fresh connection.
    Safe,
    /// A write that may have been applied: its failure is `Indeterminate`.
    Unsafe,
}

/// The command connection of a handle: one multiplexed connection shared by
/// every task (in a cluster: one cluster connection, which keeps one
/// multiplexed connection per master), re-established on the next call
/// after it failed.
pub(crate) struct Conn {
    target: Target,
    timeout: Duration,
    current: Mutex<Option<(u64, Connection)>>,
    connecting: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    /// Requests sent by this handle on any of its connections.
    ops: Arc<AtomicU64>,
}

impl Conn {
    pub(crate) fn new(target: Target, timeout: Duration) -> Self {
        Conn {
            target,
            timeout,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            ops: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The handle's request counter (shared with its other connections).
    pub(crate) fn ops(&self) -> &Arc<AtomicU64> {
        &self.ops
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn cached(&self) -> Option<(u64, Connection)> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The live connection, connecting first if there is none.
    pub(crate) async fn get(&self) -> Result<(u64, Connection)> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        // One task connects; the others wait for its result.
        let _connecting = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let con = self
            .target
            .connect(self.timeout, Some(self.timeout))
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((generation, con.clone()));
        Ok((generation, con))
    }

    /// Forgets connection `generation` (if still current) so the next call
    /// connects anew.
    pub(crate) fn invalidate(&self, generation: u64) {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if cur.as_ref().is_some_and(|(g, _)| *g == generation) {
            *cur = None;
        }
    }

    /// Whether the connection must be replaced after `e`. A cluster
    /// connection reconnects to its nodes and refreshes the slot map by
    /// itself, and knows every node (the URL's seeds may all be gone): it is
    /// replaced only if its own task ended.
    fn must_reconnect(&self, e: &RedisError) -> bool {
        match self.target {
            Target::Single(_) => true,
            Target::Cluster(_) => e.to_string().contains("redis_cluster: Unable to"),
        }
    }

    /// Runs `f` on the connection, mapping errors; see [`Retry`]. In a
    /// cluster, a command refused without being run ([`is_redirect`]: a
    /// slot being migrated or failed over) is sent again, with a short
    /// back-off, for up to one timeout: the client library refreshes its
    /// slot map meanwhile. (The library's own retries are off: it would
    /// also resend a write whose reply was lost.)
    pub(crate) async fn run<T, F, Fut>(&self, retry: Retry, what: &str, f: F) -> Result<T>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut retried = false;
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(5);
        loop {
            let (generation, con) = self.get().await?;
            self.ops.fetch_add(1, Ordering::Relaxed);
            match f(con).await {
                Ok(v) => return Ok(v),
                Err(e) if self.target.is_cluster() && is_redirect(&e) => {
                    if started.elapsed() + backoff >= self.timeout {
                        return Err(map_err(&e));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                Err(e) if is_connection_failure(&e) && !is_auth(&e) => {
                    if self.must_reconnect(&e) {
                        self.invalidate(generation);
                    }
                    match retry {
                        Retry::Safe if !retried && !e.is_timeout() => {
                            retried = true;
                            continue;
                        }
                        Retry::Safe => return Err(map_err(&e)),
                        Retry::Unsafe => {
                            return Err(Error::Indeterminate {
                                backend: NAME,
                                op: what.to_string(),
                                message: e.to_string(),
                            })
                        }
                    }
                }
                Err(e) => return Err(map_err(&e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_the_cluster_client_dropped_is_a_connection_failure() {
        let dropped = RedisError::from((
            redis::ErrorKind::Client,
            "request wasn't handled due to internal failure",
        ));
        assert!(is_connection_failure(&dropped));
        // So a write is Indeterminate (see Conn::run), a read Unavailable.
        assert!(matches!(map_err(&dropped), Error::Unavailable { .. }));
        let other = RedisError::from((redis::ErrorKind::Client, "empty command"));
        assert!(!is_connection_failure(&other));
    }
}
