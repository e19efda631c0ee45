//! The connection URL, the command connection (one multiplexed connection
//! per handle, re-established after a failure), and the mapping of client
//! errors to latchkey's categories.

use latchkey_core::{BackendUrl, Error, Result};
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo,
    RedisError,
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
    pub client: Client,
    pub timeout: Duration,
    pub history: u64,
    pub namespace: String,
}

impl Config {
    pub(crate) fn from_url(url: &BackendUrl) -> Result<Config> {
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            _ => return Err(url.invalid("the redis backend handles redis:// and rediss://")),
        };
        url.expect_params(&["timeout", "history", "ca"])?;
        let host = match url.hosts() {
            [h] => h.clone(),
            [] => return Err(url.invalid("no host given")),
            _ => {
                return Err(
                    url.invalid("one Redis primary only (Sentinel and Cluster are not supported)")
                )
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
        let port = host.port.unwrap_or(6379);
        if tls {
            // rustls needs one process-wide crypto provider; if the
            // application installed one already, that one is used.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
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
        let mut redis_info = RedisConnectionInfo::default().set_db(db);
        if let Some(u) = url.username() {
            redis_info = redis_info.set_username(u);
        }
        if let Some(p) = url.password() {
            redis_info = redis_info.set_password(p);
        }
        let info = addr
            .into_connection_info()
            .map_err(|e| url.invalid(&e.to_string()))?
            .set_redis_settings(redis_info);
        let client = match url.param("ca") {
            None => Client::open(info),
            Some(_) if !tls => return Err(url.invalid("ca= needs rediss://")),
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| url.invalid(&format!("cannot read the CA file {path:?}: {e}")))?;
                Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
        }
        .map_err(|e| url.invalid(&e.to_string()))?;
        Ok(Config {
            client,
            timeout,
            history,
            namespace: url.namespace().to_string(),
        })
    }
}

/// True if the connection a command ran on can no longer be trusted.
pub(crate) fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

/// Maps a client error to latchkey's categories.
pub(crate) fn map_err(e: &RedisError) -> Error {
    let code = e.code().unwrap_or("");
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
    {
        return Error::Auth {
            backend: NAME,
            message: e.to_string(),
        };
    }
    if matches!(
        code,
        "LOADING" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "READONLY" | "BUSY"
    ) {
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
/// every task, re-established on the next call after it failed.
pub(crate) struct Conn {
    client: Client,
    timeout: Duration,
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    connecting: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    /// Requests sent by this handle on any of its connections.
    ops: Arc<AtomicU64>,
}

impl Conn {
    pub(crate) fn new(client: Client, timeout: Duration) -> Self {
        Conn {
            client,
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

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn cached(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The live connection, connecting first if there is none.
    pub(crate) async fn get(&self) -> Result<(u64, MultiplexedConnection)> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        // One task connects; the others wait for its result.
        let _connecting = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let con = match tokio::time::timeout(
            self.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&cfg),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(map_err(&e)),
            Err(_) => {
                return Err(Error::unavailable(
                    NAME,
                    format!("no connection within {:?}", self.timeout),
                ))
            }
        };
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

    /// Runs `f` on the connection, mapping errors; see [`Retry`].
    pub(crate) async fn run<T, F, Fut>(&self, retry: Retry, what: &str, f: F) -> Result<T>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (generation, con) = self.get().await?;
            self.ops.fetch_add(1, Ordering::Relaxed);
            match f(con).await {
                Ok(v) => return Ok(v),
                Err(e)
                    if is_connection_failure(&e)
                        && e.kind() != redis::ErrorKind::AuthenticationFailed =>
                {
                    self.invalidate(generation);
                    match retry {
                        Retry::Safe if attempt == 1 && !e.is_timeout() => continue,
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
