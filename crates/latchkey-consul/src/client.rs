//! A thin typed client for the parts of Consul's HTTP API latchkey uses:
//! `/v1/kv` (reads, blocking queries, raw puts), `/v1/txn` and
//! `/v1/session`. It keeps every response's status, `X-Consul-Index` and
//! body, also for 404 and 409 answers (which carry data), and maps failures
//! into latchkey's error categories. The ACL token travels in the
//! `X-Consul-Token` header only, never in a URL or a message.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use latchkey_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The backend's name in errors.
pub const NAME: &str = "consul";

/// A KV entry as Consul returns it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Entry {
    /// The Consul key.
    pub key: String,
    /// Base64 value (`null` for empty values and for value-less results).
    #[serde(default)]
    pub value: Option<String>,
    /// Opaque flags (latchkey: TTL in ms for TTL keys; the `api.Lock` magic for locks).
    #[serde(default)]
    pub flags: u64,
    /// The session holding the key, if any.
    #[serde(default)]
    pub session: Option<String>,
    /// Index of the write that last changed the key (its revision).
    #[serde(default)]
    pub modify_index: u64,
}

impl Entry {
    /// The decoded value.
    pub fn bytes(&self) -> Result<Bytes> {
        match &self.value {
            None => Ok(Bytes::new()),
            Some(v) => B64.decode(v).map(Bytes::from).map_err(|e| {
                Error::backend(NAME, format!("bad base64 value of {:?}: {e}", self.key))
            }),
        }
    }
    /// The holding session, `None` when unheld.
    pub fn holder(&self) -> Option<&str> {
        self.session.as_deref().filter(|s| !s.is_empty())
    }
}

/// A `/v1/txn` KV verb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Set,
    Cas,
    Lock,
    Unlock,
    Get,
    Delete,
    DeleteCas,
    CheckIndex,
    CheckSession,
    CheckNotExists,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Set => "set",
            Verb::Cas => "cas",
            Verb::Lock => "lock",
            Verb::Unlock => "unlock",
            Verb::Get => "get",
            Verb::Delete => "delete",
            Verb::DeleteCas => "delete-cas",
            Verb::CheckIndex => "check-index",
            Verb::CheckSession => "check-session",
            Verb::CheckNotExists => "check-not-exists",
        }
    }
    /// How many entries a successful op of this verb adds to `Results`
    /// (agent/consul/state/txn.go: ops that end with an entry return it).
    pub fn results(self) -> usize {
        match self {
            Verb::Delete | Verb::DeleteCas | Verb::CheckNotExists => 0,
            _ => 1,
        }
    }
    /// True if the verb writes (so the txn goes through Raft).
    pub fn writes(self) -> bool {
        matches!(
            self,
            Verb::Set | Verb::Cas | Verb::Lock | Verb::Unlock | Verb::Delete | Verb::DeleteCas
        )
    }
}

/// One KV op of a `/v1/txn` request.
#[derive(Clone, Debug)]
pub struct KvOp {
    pub verb: Verb,
    pub key: String,
    pub value: Option<Bytes>,
    pub flags: u64,
    pub index: u64,
    pub session: Option<String>,
}

impl KvOp {
    pub fn new(verb: Verb, key: impl Into<String>) -> Self {
        KvOp {
            verb,
            key: key.into(),
            value: None,
            flags: 0,
            index: 0,
            session: None,
        }
    }
    pub fn value(mut self, v: Bytes) -> Self {
        self.value = Some(v);
        self
    }
    pub fn flags(mut self, f: u64) -> Self {
        self.flags = f;
        self
    }
    pub fn index(mut self, i: u64) -> Self {
        self.index = i;
        self
    }
    pub fn session(mut self, s: impl Into<String>) -> Self {
        self.session = Some(s.into());
        self
    }
}

#[derive(Serialize)]
struct TxnOpJson {
    #[serde(rename = "KV")]
    kv: KvOpJson,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct KvOpJson {
    verb: &'static str,
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    flags: u64,
    index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct TxnResultJson {
    #[serde(rename = "KV")]
    kv: Option<Entry>,
}

/// One failed op of a txn.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TxnError {
    /// Index of the op in the request.
    #[serde(default)]
    pub op_index: usize,
    /// Consul's words.
    #[serde(default)]
    pub what: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct TxnResponseJson {
    #[serde(default)]
    results: Option<Vec<TxnResultJson>>,
    #[serde(default)]
    errors: Option<Vec<TxnError>>,
}

/// What a txn did: committed with these result entries, or rolled back.
#[derive(Debug)]
pub enum TxnReply {
    Committed(Vec<Entry>),
    RolledBack(Vec<TxnError>),
}

/// A response kept whole.
pub struct Resp {
    pub status: u16,
    pub index: Option<u64>,
    pub body: Bytes,
}

/// The HTTP client of one handle.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    dc: Option<String>,
    timeout: Duration,
    ops: Arc<AtomicU64>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("dc", &self.dc)
            .finish()
    }
}

fn enc_q(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl Client {
    /// A client for `base` (`http://host:port` or `https://…`).
    pub fn new(
        base: String,
        token: Option<String>,
        dc: Option<String>,
        timeout: Duration,
    ) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::backend(NAME, e))?;
        Ok(Client {
            http,
            base,
            token,
            dc,
            timeout,
            ops: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A client with the same settings and its own connection pool (for
    /// use from another runtime).
    pub fn fresh(&self) -> Result<Self> {
        Client::new(
            self.base.clone(),
            self.token.clone(),
            self.dc.clone(),
            self.timeout,
        )
    }

    /// Requests this client (and its clones) sent so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    fn url(&self, path: &str, query: &[(&str, String)]) -> String {
        let mut u = format!("{}{}", self.base, path);
        let mut first = true;
        let dc = self.dc.as_ref().map(|d| ("dc", d.clone()));
        for (k, v) in query.iter().cloned().chain(dc) {
            u.push(if first { '?' } else { '&' });
            first = false;
            u.push_str(k);
            if !v.is_empty() {
                u.push('=');
                u.push_str(&enc_q(&v));
            }
        }
        u
    }

    /// Sends a request and keeps status, index and body of any answer.
    /// `write`: the request may change state, so a failure after sending
    /// is [`Error::Indeterminate`].
    async fn send(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<Vec<u8>>,
        timeout: Duration,
        what: &str,
        write: bool,
    ) -> Result<Resp> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let mut req = self.http.request(method, &url).timeout(timeout);
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Err(transport(e, what, write, timeout)),
        };
        let status = resp.status().as_u16();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Err(transport(e, what, write, timeout)),
        };
        Ok(Resp {
            status,
            index,
            body,
        })
    }

    /// Reads one key. `Ok((None, index))` when absent.
    pub async fn kv_get(&self, key: &str, consistent: bool) -> Result<(Option<Entry>, u64)> {
        let mut q = Vec::new();
        if consistent {
            q.push(("consistent", String::new()));
        }
        let url = self.url(&format!("/v1/kv/{}", crate::keys::url_path(key)), &q);
        let what = format!("reading key {key:?}");
        let r = self
            .send(reqwest::Method::GET, url, None, self.timeout, &what, false)
            .await?;
        match r.status {
            200 => {
                let mut v: Vec<Entry> = json(&r.body, &what)?;
                Ok((v.pop(), r.index.unwrap_or(0)))
            }
            404 => Ok((None, r.index.unwrap_or(0))),
            s => Err(status_error(s, &r.body, &what)),
        }
    }

    /// Lists every entry under `prefix`; with `block = Some((index, wait))`
    /// a blocking query that returns when the subtree's index passes
    /// `index` or after about `wait`.
    pub async fn kv_list(
        &self,
        prefix: &str,
        consistent: bool,
        block: Option<(u64, Duration)>,
    ) -> Result<(Vec<Entry>, u64)> {
        let mut q = vec![("recurse", String::new())];
        if consistent {
            q.push(("consistent", String::new()));
        }
        let mut timeout = self.timeout;
        if let Some((index, wait)) = block {
            q.push(("index", index.to_string()));
            q.push(("wait", format!("{}ms", wait.as_millis())));
            // Consul adds up to wait/16 of jitter.
            timeout = wait + wait / 16 + self.timeout;
        }
        let url = self.url(&format!("/v1/kv/{}", crate::keys::url_path(prefix)), &q);
        let what = format!("listing {prefix:?}");
        let r = self
            .send(reqwest::Method::GET, url, None, timeout, &what, false)
            .await?;
        match r.status {
            200 => Ok((json(&r.body, &what)?, r.index.unwrap_or(0))),
            404 => Ok((Vec::new(), r.index.unwrap_or(0))),
            s => Err(status_error(s, &r.body, &what)),
        }
    }

    /// Blocking read of one key (for lock waiters).
    pub async fn kv_get_blocking(
        &self,
        key: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Option<Entry>, u64)> {
        let q = vec![
            ("consistent", String::new()),
            ("index", index.to_string()),
            ("wait", format!("{}ms", wait.as_millis())),
        ];
        let url = self.url(&format!("/v1/kv/{}", crate::keys::url_path(key)), &q);
        let what = format!("waiting on key {key:?}");
        let timeout = wait + wait / 16 + self.timeout;
        let r = self
            .send(reqwest::Method::GET, url, None, timeout, &what, false)
            .await?;
        match r.status {
            200 => {
                let mut v: Vec<Entry> = json(&r.body, &what)?;
                Ok((v.pop(), r.index.unwrap_or(0)))
            }
            404 => Ok((None, r.index.unwrap_or(0))),
            s => Err(status_error(s, &r.body, &what)),
        }
    }

    /// `PUT /v1/kv/<key>` with a raw body (values too large for a txn),
    /// optionally `?cas=`. Returns Consul's true/false.
    pub async fn kv_put_raw(
        &self,
        key: &str,
        value: Bytes,
        flags: u64,
        cas: Option<u64>,
    ) -> Result<bool> {
        let mut q = vec![("flags", flags.to_string())];
        if let Some(c) = cas {
            q.push(("cas", c.to_string()));
        }
        let url = self.url(&format!("/v1/kv/{}", crate::keys::url_path(key)), &q);
        let what = format!("writing key {key:?}");
        let r = self
            .send(
                reqwest::Method::PUT,
                url,
                Some(value.to_vec()),
                self.timeout,
                &what,
                true,
            )
            .await?;
        match r.status {
            200 => json(&r.body, &what),
            s => Err(status_error(s, &r.body, &what)),
        }
    }

    /// Runs a `/v1/txn`. A read-only txn is sent `?consistent`.
    pub async fn txn(&self, ops: &[KvOp], what: &str) -> Result<TxnReply> {
        let writes = ops.iter().any(|o| o.verb.writes());
        let body: Vec<TxnOpJson> = ops
            .iter()
            .map(|o| TxnOpJson {
                kv: KvOpJson {
                    verb: o.verb.as_str(),
                    key: o.key.clone(),
                    value: o.value.as_ref().map(|v| B64.encode(v)),
                    flags: o.flags,
                    index: o.index,
                    session: o.session.clone(),
                },
            })
            .collect();
        let body = serde_json::to_vec(&body).map_err(|e| Error::backend(NAME, e))?;
        let q = if writes {
            Vec::new()
        } else {
            vec![("consistent", String::new())]
        };
        let url = self.url("/v1/txn", &q);
        let r = self
            .send(
                reqwest::Method::PUT,
                url,
                Some(body),
                self.timeout,
                what,
                writes,
            )
            .await?;
        match r.status {
            200 => {
                let t: TxnResponseJson = json(&r.body, what)?;
                Ok(TxnReply::Committed(
                    t.results
                        .unwrap_or_default()
                        .into_iter()
                        .map(|r| r.kv.unwrap_or_default())
                        .collect(),
                ))
            }
            409 => {
                let t: TxnResponseJson = json(&r.body, what)?;
                Ok(TxnReply::RolledBack(t.errors.unwrap_or_default()))
            }
            s => Err(status_error(s, &r.body, what)),
        }
    }

    /// Creates a session; returns its ID.
    pub async fn session_create(
        &self,
        ttl: Duration,
        behavior: &str,
        name: &str,
    ) -> Result<String> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Body<'a> {
            name: &'a str,
            #[serde(rename = "TTL")]
            ttl: String,
            lock_delay: &'a str,
            behavior: &'a str,
            checks: [String; 0],
            node_checks: [String; 0],
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let body = serde_json::to_vec(&Body {
            name,
            ttl: format!("{}s", ttl.as_secs()),
            lock_delay: LOCK_DELAY,
            behavior,
            checks: [],
            node_checks: [],
        })
        .map_err(|e| Error::backend(NAME, e))?;
        let what = "creating a session";
        let r = self
            .send(
                reqwest::Method::PUT,
                self.url("/v1/session/create", &[]),
                Some(body),
                self.timeout,
                what,
                true,
            )
            .await?;
        match r.status {
            200 => Ok(json::<Created>(&r.body, what)?.id),
            s => Err(status_error(s, &r.body, what)),
        }
    }

    /// Renews a session: `Ok(Some(ttl))` with the TTL the server now grants,
    /// `Ok(None)` if the session no longer exists.
    pub async fn session_renew(&self, id: &str) -> Result<Option<Option<Duration>>> {
        #[derive(Deserialize)]
        struct S {
            #[serde(rename = "TTL", default)]
            ttl: String,
        }
        let what = "renewing a session";
        let r = self
            .send(
                reqwest::Method::PUT,
                self.url(&format!("/v1/session/renew/{}", enc_q(id)), &[]),
                None,
                self.timeout,
                what,
                false,
            )
            .await?;
        match r.status {
            200 => {
                let v: Vec<S> = json(&r.body, what).unwrap_or_default();
                Ok(Some(
                    v.first()
                        .and_then(|s| latchkey_core::url::parse_duration(&s.ttl)),
                ))
            }
            404 => Ok(None),
            s => Err(status_error(s, &r.body, what)),
        }
    }

    /// Destroys a session (its locks are released, its TTL keys deleted).
    pub async fn session_destroy(&self, id: &str) -> Result<()> {
        let what = "destroying a session";
        let r = self
            .send(
                reqwest::Method::PUT,
                self.url(&format!("/v1/session/destroy/{}", enc_q(id)), &[]),
                None,
                self.timeout,
                what,
                true,
            )
            .await?;
        match r.status {
            200 | 404 => Ok(()),
            s => Err(status_error(s, &r.body, what)),
        }
    }
}

/// Lock-delay of every session latchkey creates. Consul's default is 15 s:
/// after a session is invalidated, nobody may acquire its locks for that
/// long. latchkey holders learn of their loss from their own renewal
/// deadline (measured from the renewal's send, so before the server can
/// invalidate) and every holder's writes can be fenced, so the delay would
/// only stall successors: it is 0.
pub const LOCK_DELAY: &str = "0s";

fn json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        Error::backend(
            NAME,
            format!(
                "unexpected answer while {what}: {e}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        )
    })
}

fn transport(e: reqwest::Error, what: &str, write: bool, timeout: Duration) -> Error {
    // reqwest's messages carry the URL, which holds no secret (the token is
    // a header).
    let msg = format!("{what}: {e}");
    if e.is_connect() {
        return Error::unavailable(NAME, msg);
    }
    if write {
        return Error::Indeterminate {
            backend: NAME,
            op: what.to_string(),
            message: e.to_string(),
        };
    }
    if e.is_timeout() {
        return Error::Timeout {
            what: format!("{what} on consul"),
            after: timeout,
        };
    }
    Error::unavailable(NAME, msg)
}

/// Maps a non-success status into latchkey's categories.
pub fn status_error(status: u16, body: &[u8], what: &str) -> Error {
    let text = String::from_utf8_lossy(&body[..body.len().min(500)])
        .trim()
        .to_string();
    match status {
        401 | 403 => Error::Auth {
            backend: NAME,
            message: format!("{what}: {text}"),
        },
        413 => Error::InvalidArgument(format!(
            "{what}: consul refused the request as too large: {text}"
        )),
        400 => Error::InvalidArgument(format!("{what}: consul answered 400: {text}")),
        429 | 500..=599 => Error::unavailable(NAME, format!("{what}: HTTP {status}: {text}")),
        _ => Error::backend(NAME, format!("{what}: HTTP {status}: {text}")),
    }
}
