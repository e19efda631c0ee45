//! The connection: URL → client options, error mapping, retries, request
//! counting and the shared leases of TTL keys.

use crate::layout::Layout;
use crate::BACKEND;
use etcd_client::{Client, ConnectOptions, GetOptions};
use latchkey_core::{BackendUrl, Error, Result};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

/// Default per-request timeout (`?timeout=` overrides it).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a TTL key's lease is shared by later puts with the same TTL:
/// leases are granted `ceil(ttl) + SHARE_WINDOW` long, so a key attached up to
/// this long after the grant still lives at least its TTL (never early; up to
/// this much + 1 s of rounding late).
pub(crate) const SHARE_WINDOW: Duration = Duration::from_secs(1);

/// What kind of failure a client error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Credentials missing or refused.
    Auth,
    /// The request never reached a server (connect refused, no leader):
    /// safe to retry, also for writes.
    NotSent,
    /// The request may have been applied (connection broke, timeout,
    /// leader changed mid-request): retry reads; writes are indeterminate.
    Ambiguous,
    /// Asked for a compacted revision.
    Compacted,
    /// The server rejected the request as malformed or too large.
    Invalid,
    /// Anything else.
    Other,
}

pub(crate) fn classify(e: &etcd_client::Error) -> Fault {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => {
            let m = s.message().to_ascii_lowercase();
            let not_sent = m.contains("tcp connect error")
                || m.contains("error trying to connect")
                || m.contains("connection refused")
                || m.contains("dns error")
                || m.contains("no leader")
                || m.contains("too many requests")
                || m.contains("not capable");
            let auth = m.contains("user name is empty")
                || m.contains("authentication failed")
                || m.contains("invalid auth token")
                || m.contains("permission denied")
                || m.contains("user name not found")
                || m.contains("auth: ");
            match s.code() {
                Code::Unauthenticated | Code::PermissionDenied => Fault::Auth,
                _ if auth => Fault::Auth,
                Code::OutOfRange if m.contains("compacted") => Fault::Compacted,
                Code::Unavailable | Code::Unknown | Code::Internal if not_sent => Fault::NotSent,
                Code::Unavailable
                | Code::Unknown
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::Internal => Fault::Ambiguous,
                Code::InvalidArgument | Code::FailedPrecondition | Code::ResourceExhausted => {
                    Fault::Invalid
                }
                _ => Fault::Other,
            }
        }
        E::TransportError(_) => Fault::NotSent,
        E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => Fault::Ambiguous,
        _ => Fault::Other,
    }
}

fn message(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

/// Maps a client error of a read (or of an operation that is safe to
/// repeat) into latchkey's categories.
pub(crate) fn map_read(e: etcd_client::Error) -> Error {
    match classify(&e) {
        Fault::Auth => Error::Auth {
            backend: BACKEND,
            message: message(&e),
        },
        Fault::NotSent | Fault::Ambiguous => Error::unavailable(BACKEND, message(&e)),
        Fault::Compacted => Error::Compacted { oldest: 0 },
        Fault::Invalid => {
            Error::InvalidArgument(format!("etcd refused the request: {}", message(&e)))
        }
        Fault::Other => Error::backend(BACKEND, e),
    }
}

/// Maps a client error of a write: an ambiguous failure is
/// [`Error::Indeterminate`] (the write may have committed).
pub(crate) fn map_write(e: etcd_client::Error, op: &str) -> Error {
    match classify(&e) {
        Fault::Ambiguous => Error::Indeterminate {
            backend: BACKEND,
            op: op.to_string(),
            message: message(&e),
        },
        _ => map_read(e),
    }
}

/// Everything one handle shares: the client, the layout, counters.
pub(crate) struct Shared {
    client: Client,
    pub(crate) layout: Layout,
    pub(crate) timeout: Duration,
    ops: AtomicU64,
    /// TTL (whole seconds) → (lease, when its grant was sent).
    kv_leases: Mutex<HashMap<u64, (i64, Instant)>>,
    /// Lease id → its granted TTL, for `KeyValue::lease_ttl`.
    lease_ttls: Mutex<HashMap<i64, Duration>>,
    /// The endpoints (for Debug).
    pub(crate) endpoints: Vec<String>,
}

impl Shared {
    /// Connects per the URL (see the crate docs for the parameters).
    pub(crate) async fn connect(url: &BackendUrl) -> Result<Shared> {
        let tls = match url.scheme() {
            "etcd" => false,
            "etcds" => true,
            other => {
                return Err(url.invalid(&format!("scheme {other}:// is not etcd:// or etcds://")))
            }
        };
        url.expect_params(&["timeout", "ca", "connect_timeout"])?;
        url.require_hosts()?;
        if !url.path().is_empty() && url.path() != "/" {
            return Err(url.invalid("etcd URLs take no path; use ?namespace= to separate data"));
        }
        let timeout = url.param_duration("timeout")?.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(url.invalid("timeout must be longer than zero"));
        }
        let connect_timeout = url
            .param_duration("connect_timeout")?
            .unwrap_or(timeout.min(Duration::from_secs(3)));
        let scheme = if tls { "https" } else { "http" };
        let endpoints: Vec<String> = url
            .endpoints(2379)
            .into_iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let mut options = ConnectOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(connect_timeout)
            // Detects a dead connection under a long watch or keepalive
            // stream; etcd refuses pings more often than every 5 s.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_auto_token_refresh(true);
        if let Some(user) = url.username() {
            options = options.with_user(user, url.password().unwrap_or(""));
        } else if url.password().is_some() {
            return Err(url.invalid("a password without a user name"));
        }
        if tls {
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = url.param("ca") {
                let pem = std::fs::read(ca)
                    .map_err(|e| url.invalid(&format!("cannot read the CA file {ca:?}: {e}")))?;
                t = t.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            options = options.with_tls(t);
        } else if url.param("ca").is_some() {
            return Err(url.invalid("?ca= needs the etcds:// scheme"));
        }
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(map_read)?;
        let shared = Shared {
            client,
            layout: Layout::new(url.namespace()),
            timeout,
            ops: AtomicU64::new(0),
            kv_leases: Mutex::new(HashMap::new()),
            lease_ttls: Mutex::new(HashMap::new()),
            endpoints,
        };
        // One cheap linearizable read, so that an unreachable cluster or
        // refused credentials fail here, typed, and not at first use.
        let probe = shared.layout.kv("");
        shared
            .read(|mut c| {
                let probe = probe.clone();
                async move {
                    c.get(
                        probe,
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await
                }
            })
            .await?;
        Ok(shared)
    }

    /// A client for one request, counted.
    pub(crate) fn req(&self) -> Client {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.client.clone()
    }

    /// Counts one request sent on an existing stream.
    pub(crate) fn count(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests sent so far.
    pub(crate) fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    fn retry_budget(&self) -> Duration {
        self.timeout.max(Duration::from_secs(2))
    }

    /// Runs a request that is safe to repeat, retrying transient failures
    /// (the balancer may pick another member) within the retry budget.
    pub(crate) async fn read<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.retrying(
            f,
            |fault| matches!(fault, Fault::NotSent | Fault::Ambiguous),
            map_read,
        )
        .await
    }

    /// Runs a txn that is safe to repeat (its compares make a second run a
    /// no-op, or it only reads), as [`read`](Self::read) does.
    pub(crate) async fn txn_repeatable(
        &self,
        txn: &etcd_client::Txn,
    ) -> Result<etcd_client::TxnResponse> {
        self.read(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// Runs a write: retried only when it surely never reached a server;
    /// an ambiguous failure is [`Error::Indeterminate`].
    pub(crate) async fn write<T, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.retrying(f, |fault| fault == Fault::NotSent, |e| map_write(e, op))
            .await
    }

    async fn retrying<T, F, Fut>(
        &self,
        f: F,
        retry: impl Fn(Fault) -> bool,
        map: impl Fn(etcd_client::Error) -> Error,
    ) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.retry_budget();
        let mut backoff = Duration::from_millis(10);
        loop {
            match f(self.req()).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if retry(classify(&e)) && Instant::now() + backoff < deadline {
                        tracing::debug!(error = %e, "etcd request failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(250));
                        continue;
                    }
                    return Err(map(e));
                }
            }
        }
    }

    /// Grants a lease of `ttl` (rounded up to whole seconds; etcd may raise
    /// it to its minimum). Returns the id and the granted TTL.
    pub(crate) async fn grant(&self, ttl: Duration) -> Result<(i64, Duration)> {
        let secs = ttl_secs(ttl);
        let resp = self
            .read(|mut c| async move { c.lease_grant(secs as i64, None).await })
            .await?;
        let granted = Duration::from_secs(resp.ttl().max(1) as u64);
        self.remember_ttl(resp.id(), granted);
        Ok((resp.id(), granted))
    }

    fn remember_ttl(&self, lease: i64, ttl: Duration) {
        let mut m = self.lease_ttls.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 4096 {
            m.clear();
        }
        m.insert(lease, ttl);
    }

    /// The lease a TTL key written now attaches to: shared with other puts
    /// of the same TTL (whole seconds) for [`SHARE_WINDOW`] after its grant.
    pub(crate) async fn kv_lease(&self, ttl: Duration) -> Result<i64> {
        let secs = ttl_secs(ttl);
        {
            let m = self.kv_leases.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((lease, at)) = m.get(&secs) {
                if at.elapsed() < SHARE_WINDOW {
                    return Ok(*lease);
                }
            }
        }
        let sent = Instant::now();
        let (lease, _) = self.grant(Duration::from_secs(secs) + SHARE_WINDOW).await?;
        let mut m = self.kv_leases.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (_, at)| at.elapsed() < SHARE_WINDOW);
        m.insert(secs, (lease, sent));
        Ok(lease)
    }

    /// The granted TTL of each lease in `leases` (0 = none), asking the
    /// server (once per lease) for leases this handle did not grant.
    pub(crate) async fn lease_ttls(&self, leases: &[i64]) -> Result<HashMap<i64, Duration>> {
        let mut out = HashMap::new();
        let mut unknown = Vec::new();
        {
            let m = self.lease_ttls.lock().unwrap_or_else(|p| p.into_inner());
            for &l in leases {
                if l == 0 || out.contains_key(&l) {
                    continue;
                }
                match m.get(&l) {
                    Some(t) => {
                        out.insert(l, *t);
                    }
                    None => unknown.push(l),
                }
            }
        }
        unknown.sort_unstable();
        unknown.dedup();
        for l in unknown {
            let resp = self
                .read(|mut c| async move { c.lease_time_to_live(l, None).await })
                .await?;
            let t = Duration::from_secs(resp.granted_ttl().max(0) as u64);
            if resp.ttl() > 0 {
                self.remember_ttl(l, t);
            }
            out.insert(l, t);
        }
        Ok(out)
    }
}

/// A TTL in whole seconds, rounded up (etcd leases are second-granular).
pub(crate) fn ttl_secs(ttl: Duration) -> u64 {
    let s = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, msg: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg))
    }

    #[test]
    fn faults_are_classified() {
        let cases = [
            (
                status(Code::InvalidArgument, "etcdserver: user name is empty"),
                Fault::Auth,
            ),
            (
                status(
                    Code::InvalidArgument,
                    "etcdserver: authentication failed, invalid user ID or password",
                ),
                Fault::Auth,
            ),
            (
                status(Code::PermissionDenied, "etcdserver: permission denied"),
                Fault::Auth,
            ),
            (
                status(
                    Code::Unavailable,
                    "error trying to connect: tcp connect error: Connection refused (os error 111)",
                ),
                Fault::NotSent,
            ),
            (
                status(Code::Unavailable, "etcdserver: no leader"),
                Fault::NotSent,
            ),
            (
                status(Code::Unavailable, "etcdserver: leader changed"),
                Fault::Ambiguous,
            ),
            (status(Code::Cancelled, "Timeout expired"), Fault::Ambiguous),
            (
                status(
                    Code::OutOfRange,
                    "etcdserver: mvcc: required revision has been compacted",
                ),
                Fault::Compacted,
            ),
            (
                status(
                    Code::InvalidArgument,
                    "etcdserver: duplicate key given in txn request",
                ),
                Fault::Invalid,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(classify(&e), want, "{e}");
        }
        assert!(matches!(
            map_write(
                status(Code::Unavailable, "etcdserver: request timed out"),
                "put"
            ),
            Error::Indeterminate { .. }
        ));
        assert!(matches!(
            map_read(status(Code::Unavailable, "etcdserver: request timed out")),
            Error::Unavailable { .. }
        ));
    }

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_secs(2)), 2);
        assert_eq!(ttl_secs(Duration::from_millis(2001)), 3);
    }
}
