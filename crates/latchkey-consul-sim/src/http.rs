//! The simulator's HTTP layer: routing, parameters, status codes and error
//! texts as Consul's agent has them (agent/http.go, kvs_endpoint.go,
//! session_endpoint.go, txn_endpoint.go; sources cited in the crate docs).

// Early-return `Result<_, Response>` is the shape of every handler step
// here; a Response is built at most once per request, so boxing it would
// only add noise.
#![allow(clippy::result_large_err)]

use crate::godur;
use crate::state::{
    Behavior, Entry, OpFail, Session, Store, SERF_CHECK, SESSION_TTL_MAX, SESSION_TTL_MIN,
};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// `kv_max_value_size` and `txn_max_req_len` defaults (the suggested Raft
/// entry size, 512 KiB).
pub const MAX_VALUE_SIZE: usize = 512 * 1024;
/// `maxTxnOps` of agent/txn_endpoint.go since Consul 1.14 (PR #14599; 64
/// before).
pub const MAX_TXN_OPS: usize = 128;
/// Blocking queries: default and maximum `wait` (agent/consul/rpc.go).
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// `structs.JitterFraction`: up to wait/16 is added to a blocking wait.
const JITTER_FRACTION: u32 = 16;

/// State shared by the HTTP handlers, the TTL reaper and the test hooks.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    /// Bumped (under the store lock) after every change; blocking queries
    /// wait on it, so nothing polls.
    pub changed: watch::Sender<u64>,
    /// Wakes the TTL reaper when a deadline may have moved earlier.
    pub timers: Notify,
    pub acl_token: Mutex<Option<String>>,
    pub ttl_multiplier: Mutex<f64>,
    pub unavailable: AtomicBool,
    /// Apply recent agents' KV key-name validation (see
    /// [`validate_kv_key`]); off by default.
    pub strict_keys: AtomicBool,
    /// Requests answered under `/v1/` (for "no polling" assertions).
    pub requests: std::sync::atomic::AtomicU64,
    pub datacenter: String,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            store: Mutex::new(Store::new()),
            changed: watch::channel(0).0,
            timers: Notify::new(),
            acl_token: Mutex::new(None),
            ttl_multiplier: Mutex::new(1.0),
            unavailable: AtomicBool::new(false),
            strict_keys: AtomicBool::new(false),
            requests: std::sync::atomic::AtomicU64::new(0),
            datacenter: "dc1".into(),
        }
    }

    /// The store, with expired sessions already invalidated.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the store half
        // written (mutations are single steps or undone), so keep going.
        let mut st = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if st.reap(Instant::now()) {
            self.notify(&st);
        }
        st
    }

    /// Wakes every blocking query; call while holding the store lock.
    pub fn notify(&self, st: &Store) {
        self.changed.send_replace(st.raft_index());
    }

    pub fn multiplier(&self) -> f64 {
        *self
            .ttl_multiplier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Invalidates a session now (destroy, TTL expiry, test hooks).
    pub fn invalidate(&self, id: &str) -> bool {
        let mut st = self.store();
        let found = st.invalidate_session(id, Instant::now());
        if found {
            self.notify(&st);
        }
        found
    }
}

/// The TTL reaper: sleeps until the next session deadline (or until told
/// that deadlines changed) and invalidates what has expired.
pub(crate) async fn reaper(sh: Arc<Shared>) {
    loop {
        // `store()` reaps what has expired.
        let next = sh.store().next_deadline();
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = sh.timers.notified() => {}
                }
            }
            None => sh.timers.notified().await,
        }
    }
}

// ---------------------------------------------------------------- helpers

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut r = (status, msg.into()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_body(status: StatusCode, v: &impl Serialize, pretty: bool) -> Response {
    let body = if pretty {
        let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
        s.push('\n');
        s
    } else {
        serde_json::to_string(v).unwrap_or_default()
    };
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Query-string parameters with Go's `url.Values` semantics (first value
/// wins for `Get`, a bare `?recurse` is present with value "").
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Query {
        let dec = |s: &str| {
            let s = s.replace('+', " ");
            percent_encoding::percent_decode_str(&s)
                .decode_utf8_lossy()
                .into_owned()
        };
        Query(
            raw.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (dec(k), dec(v)),
                    None => (dec(p), String::new()),
                })
                .collect(),
        )
    }
    fn has(&self, k: &str) -> bool {
        self.0.iter().any(|(n, _)| n == k)
    }
    fn get(&self, k: &str) -> &str {
        self.0
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
    /// Go's `url.Values.Encode` (sorted by key).
    fn encode(&self) -> String {
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let mut v: Vec<&(String, String)> = self.0.iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.iter()
            .map(|(k, val)| format!("{}={}", enc(k), enc(val)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// Parsed read options (`parseConsistency` + `parseWait`).
struct ReadOpts {
    min_index: u64,
    wait: Duration,
}

fn parse_read_opts(q: &Query) -> Result<ReadOpts, Response> {
    if q.has("stale") && q.has("consistent") {
        return Err(text(
            StatusCode::BAD_REQUEST,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ));
    }
    let mut wait = Duration::ZERO;
    let w = q.get("wait");
    if !w.is_empty() {
        match godur::parse(w) {
            Ok(ns) => wait = Duration::from_nanos(ns.max(0) as u64),
            Err(_) => return Err(text(StatusCode::BAD_REQUEST, "Invalid wait time")),
        }
    }
    let mut min_index = 0;
    let i = q.get("index");
    if !i.is_empty() {
        match i.parse::<u64>() {
            Ok(v) => min_index = v,
            Err(_) => return Err(text(StatusCode::BAD_REQUEST, "Invalid index")),
        }
    }
    Ok(ReadOpts { min_index, wait })
}

/// Consul's blocking query loop (agent/consul/rpc.go `blockingQuery`):
/// answer at once unless `index` was given and the result's index is not
/// past it; then wait for a change (re-evaluating on each) or for `wait`
/// plus up to wait/16 of jitter, and answer with what is current.
async fn blocking<T>(sh: &Shared, opts: &ReadOpts, f: impl Fn(&Store) -> (T, u64)) -> (T, u64) {
    let deadline = (opts.min_index > 0).then(|| {
        let mut wait = if opts.wait.is_zero() {
            DEFAULT_WAIT
        } else {
            opts.wait.min(MAX_WAIT)
        };
        let jitter_max = wait / JITTER_FRACTION;
        if !jitter_max.is_zero() {
            wait += jitter_max.mul_f64(rand::random::<f64>());
        }
        Instant::now() + wait
    });
    loop {
        let (res, idx, mut rx) = {
            let st = sh.store();
            let (r, i) = f(&st);
            // Subscribed under the lock: no change can slip in between.
            (r, i.max(1), sh.changed.subscribe())
        };
        let Some(deadline) = deadline else {
            return (res, idx);
        };
        if idx > opts.min_index {
            return (res, idx);
        }
        tokio::select! {
            r = rx.changed() => { if r.is_err() { return (res, idx); } }
            _ = tokio::time::sleep_until(deadline) => return (res, idx),
        }
    }
}

/// `setMeta`: the query index (never 0) and leader headers.
fn with_meta(mut r: Response, index: u64) -> Response {
    let h = r.headers_mut();
    h.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    h.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    r
}

/// Go's `path.Clean` as `http.ServeMux` applies it (a trailing slash is
/// kept); an unclean path is answered with a 301 to the clean one.
fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return "/".into();
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut c = format!("/{}", out.join("/"));
    if p.ends_with('/') && c != "/" {
        c.push('/');
    }
    c
}

fn encode_path(p: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'%')
        .add(b'<')
        .add(b'>')
        .add(b'?')
        .add(b'`')
        .add(b'{')
        .add(b'}');
    percent_encoding::utf8_percent_encode(p, SET).to_string()
}

fn method_not_allowed(m: &Method, allowed: &[&str]) -> Response {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {m} not allowed"),
    );
    if let Ok(v) = HeaderValue::from_str(&allowed.join(",")) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

fn token_of(headers: &HeaderMap, q: &Query) -> Option<String> {
    if let Some(t) = headers.get("X-Consul-Token").and_then(|v| v.to_str().ok()) {
        if !t.is_empty() {
            return Some(t.to_string());
        }
    }
    if let Some(a) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = a.strip_prefix("Bearer ") {
            return Some(t.trim().to_string());
        }
    }
    let t = q.get("token");
    (!t.is_empty()).then(|| t.to_string())
}

/// Reads a body of at most `limit` bytes; `Err(n)` when it is larger (n =
/// its full size). An oversized body is still read to its end (up to 64
/// MiB) before the answer, so the client is not cut off mid-send: a broken
/// pipe would look like a lost write to it.
async fn read_body(mut body: Body, limit: usize) -> Result<Vec<u8>, usize> {
    use axum::body::HttpBody as _;
    const DRAIN_MAX: usize = 64 * 1024 * 1024;
    let mut out = Vec::new();
    let mut total = 0usize;
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Err(_)) => return Err(total.max(limit + 1)),
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    total += data.len();
                    if total <= limit {
                        out.extend_from_slice(&data);
                    } else if total > DRAIN_MAX {
                        break;
                    }
                }
            }
        }
    }
    if total > limit {
        Err(total)
    } else {
        Ok(out)
    }
}

/// Drops what is left of an oversized body before answering (see
/// [`read_body`]).
async fn drain(body: Body) {
    let _ = read_body(body, 0).await;
}

fn content_length(h: &HeaderMap) -> Option<usize> {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Go's error text for a bad `strconv.ParseUint` (Consul answers it 500).
fn parse_u64(s: &str) -> Result<u64, Response> {
    s.parse::<u64>().map_err(|_| {
        let why = if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
            "value out of range"
        } else {
            "invalid syntax"
        };
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("strconv.ParseUint: parsing {}: {why}", godur::go_quote(s)),
        )
    })
}

// ---------------------------------------------------------------- JSON shapes

/// `structs.DirEntry` as the HTTP API renders it (field order as Consul's).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct EntryJson {
    lock_index: u64,
    key: String,
    flags: u64,
    value: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    session: String,
    create_index: u64,
    modify_index: u64,
}

fn entry_json(e: &Entry, with_value: bool) -> EntryJson {
    EntryJson {
        lock_index: e.lock_index,
        key: e.key.clone(),
        flags: e.flags,
        value: (with_value && !e.value.is_empty()).then(|| B64.encode(&e.value)),
        session: e.session.clone(),
        create_index: e.create_index,
        modify_index: e.modify_index,
    }
}

fn session_json(s: &Session) -> Value {
    serde_json::json!({
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": s.lock_delay.as_nanos() as u64,
        "Behavior": s.behavior.as_str(),
        "TTL": s.ttl_text,
        "NodeChecks": s.node_checks,
        "ServiceChecks": Value::Null,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

// ---------------------------------------------------------------- routing

/// The one handler: Consul's mux, by hand, so unknown paths, methods and
/// unclean paths are answered the way Go's `http.ServeMux` does.
pub(crate) async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = percent_encoding::percent_decode_str(parts.uri.path())
        .decode_utf8_lossy()
        .into_owned();
    let raw_query = parts.uri.query().unwrap_or("");
    let q = Query::parse(raw_query);
    let pretty = q.has("pretty");

    let clean = clean_path(&path);
    if clean != path || path == "/v1/kv" {
        let mut to = if path == "/v1/kv" {
            "/v1/kv/".to_string()
        } else {
            encode_path(&clean)
        };
        if !raw_query.is_empty() {
            to.push('?');
            to.push_str(raw_query);
        }
        let mut r = StatusCode::MOVED_PERMANENTLY.into_response();
        if let Ok(v) = HeaderValue::from_str(&to) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return r;
    }

    if path == "/v1/status/leader" {
        return json_body(StatusCode::OK, &"127.0.0.1:8300", pretty);
    }
    if path == "/v1/status/peers" {
        return json_body(StatusCode::OK, &["127.0.0.1:8300"], pretty);
    }

    if path.starts_with("/v1/") {
        sh.requests.fetch_add(1, Ordering::SeqCst);
    }
    let known =
        path.starts_with("/v1/kv/") || path == "/v1/txn" || path.starts_with("/v1/session/");
    if !known {
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    }

    if sh.unavailable.load(Ordering::SeqCst) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader");
    }

    // ACLs: with a token configured, every request must carry it.
    let required = sh
        .acl_token
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(required) = required {
        match token_of(&parts.headers, &q) {
            None => return text(StatusCode::FORBIDDEN, "Permission denied"),
            Some(t) if t != required => return text(StatusCode::FORBIDDEN, "ACL not found"),
            Some(_) => {}
        }
    }

    let dc = q.get("dc");
    if !dc.is_empty() && dc != sh.datacenter {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
    }

    let m = &parts.method;
    if let Some(key) = path.strip_prefix("/v1/kv/") {
        if !matches!(*m, Method::GET | Method::PUT | Method::DELETE) {
            return method_not_allowed(m, &["GET", "PUT", "DELETE"]);
        }
        return kv(&sh, m, key, &q, &parts.headers, body, pretty).await;
    }
    if path == "/v1/txn" {
        if *m != Method::PUT {
            return method_not_allowed(m, &["PUT"]);
        }
        return txn(&sh, &q, &parts.headers, body, pretty).await;
    }
    let rest = &path["/v1/session/".len()..];
    let (verb, arg) = match rest.split_once('/') {
        Some((v, a)) => (v, Some(a)),
        None => (rest, None),
    };
    match (verb, arg) {
        ("create", None) => {
            if *m != Method::PUT {
                return method_not_allowed(m, &["PUT"]);
            }
            session_create(&sh, body, pretty).await
        }
        ("destroy", Some(id)) => {
            if *m != Method::PUT {
                return method_not_allowed(m, &["PUT"]);
            }
            if id.is_empty() {
                return text(StatusCode::BAD_REQUEST, "Missing session");
            }
            {
                let mut st = sh.store();
                if st.invalidate_session(id, Instant::now()) {
                    sh.notify(&st);
                }
            }
            json_body(StatusCode::OK, &true, pretty)
        }
        ("renew", Some(id)) => {
            if *m != Method::PUT {
                return method_not_allowed(m, &["PUT"]);
            }
            if let Err(r) = parse_read_opts(&q) {
                return r;
            }
            if id.is_empty() {
                return text(StatusCode::BAD_REQUEST, "Missing session");
            }
            let mult = sh.multiplier();
            let renewed = sh.store().renew_session(id, Instant::now(), mult);
            // The multiplier may have shrunk since: let the reaper re-plan.
            sh.timers.notify_one();
            match renewed {
                Some(s) => json_body(StatusCode::OK, &vec![session_json(&s)], pretty),
                None => text(
                    StatusCode::NOT_FOUND,
                    format!("Session id '{id}' not found"),
                ),
            }
        }
        ("info", Some(id)) | ("node", Some(id)) => {
            if *m != Method::GET {
                return method_not_allowed(m, &["GET"]);
            }
            let opts = match parse_read_opts(&q) {
                Ok(o) => o,
                Err(r) => return r,
            };
            if id.is_empty() {
                let what = if verb == "info" {
                    "Missing session"
                } else {
                    "Missing node name"
                };
                return text(StatusCode::BAD_REQUEST, what);
            }
            let by_node = verb == "node";
            let (list, idx) = blocking(&sh, &opts, |st| {
                let l: Vec<Value> = st
                    .sessions()
                    .filter(|s| if by_node { s.node == id } else { s.id == id })
                    .map(session_json)
                    .collect();
                (l, st.sessions_table_index())
            })
            .await;
            with_meta(json_body(StatusCode::OK, &list, pretty), idx)
        }
        ("list", None) => {
            if *m != Method::GET {
                return method_not_allowed(m, &["GET"]);
            }
            let opts = match parse_read_opts(&q) {
                Ok(o) => o,
                Err(r) => return r,
            };
            let (list, idx) = blocking(&sh, &opts, |st| {
                let l: Vec<Value> = st.sessions().map(session_json).collect();
                (l, st.sessions_table_index())
            })
            .await;
            with_meta(json_body(StatusCode::OK, &list, pretty), idx)
        }
        _ => text(StatusCode::NOT_FOUND, "404 page not found\n"),
    }
}

// ---------------------------------------------------------------- /v1/kv

async fn kv(
    sh: &Shared,
    m: &Method,
    key: &str,
    q: &Query,
    headers: &HeaderMap,
    body: Body,
    pretty: bool,
) -> Response {
    // `s.parse` runs for every method of the KV endpoint.
    let opts = match parse_read_opts(q) {
        Ok(o) => o,
        Err(r) => return r,
    };
    if sh.strict_keys.load(Ordering::SeqCst) && !key.is_empty() {
        if let Err(why) = validate_kv_key(key) {
            return text(StatusCode::BAD_REQUEST, why);
        }
    }
    match *m {
        Method::GET => kv_get(sh, key, q, &opts, pretty).await,
        Method::PUT => kv_put(sh, key, q, headers, body, pretty).await,
        _ => kv_delete(sh, key, q, pretty),
    }
}

async fn kv_get(sh: &Shared, key: &str, q: &Query, opts: &ReadOpts, pretty: bool) -> Response {
    if q.has("keys") {
        let sep = if q.has("separator") {
            q.get("separator")
        } else {
            q.get("seperator")
        };
        let (keys, idx) = blocking(sh, opts, |st| st.kv_keys(key, sep)).await;
        if keys.is_empty() && !key.is_empty() {
            return with_meta(StatusCode::NOT_FOUND.into_response(), idx);
        }
        return with_meta(json_body(StatusCode::OK, &keys, pretty), idx);
    }
    if q.has("recurse") {
        let (entries, idx) = blocking(sh, opts, |st| st.kv_list(key)).await;
        if entries.is_empty() {
            return with_meta(StatusCode::NOT_FOUND.into_response(), idx);
        }
        let out: Vec<EntryJson> = entries.iter().map(|e| entry_json(e, true)).collect();
        return with_meta(json_body(StatusCode::OK, &out, pretty), idx);
    }
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let (entry, idx) = blocking(sh, opts, |st| st.kv_get(key)).await;
    let Some(e) = entry else {
        return with_meta(StatusCode::NOT_FOUND.into_response(), idx);
    };
    if q.has("raw") {
        let mut r = (StatusCode::OK, e.value).into_response();
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(
            "X-Content-Type-Options",
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            "Content-Security-Policy",
            HeaderValue::from_static("sandbox"),
        );
        return with_meta(r, idx);
    }
    with_meta(
        json_body(StatusCode::OK, &vec![entry_json(&e, true)], pretty),
        idx,
    )
}

/// The key-name validation that Consul 1.21.5 added to the KV endpoint
/// (hashicorp/consul PR #22682; issues #22822, #22835; being reworked in
/// PR #22863), as `validateKVKey` in agent/kvs_endpoint.go has it at the
/// newest version we read: ASCII letters, digits and `,-_./` only, no
/// leading `/`, no `../`, and no "suspicious" file extension at the end.
/// Released versions differ in the details (1.21.5 itself answered 500 with
/// a regex in the message); this is opt-in so adapters can check their key
/// encoding against the strictest rules.
pub(crate) fn validate_kv_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key cannot be empty".into());
    }
    if key.starts_with('/') {
        return Err("key must not begin with a '/'".into());
    }
    for (i, c) in key.char_indices() {
        if !(c.is_ascii_alphanumeric() || matches!(c, ',' | '-' | '_' | '.' | '/')) {
            return Err(format!(
                "key contains invalid character '{c}' at position {i}. Only alphanumeric characters and ,-_./ are allowed"
            ));
        }
    }
    if key.contains("../") || key.contains("..\\") {
        return Err("key contains path traversal sequence".into());
    }
    const SUSPICIOUS: &[&str] = &[
        ".js", ".css", ".html", ".htm", ".xml", ".json", ".txt", ".log", ".php", ".asp", ".jsp",
        ".cgi", ".pl", ".py", ".rb", ".sh", ".exe", ".dll", ".bat", ".cmd", ".com", ".scr", ".vbs",
        ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".ppt", ".pptx", ".zip", ".rar", ".tar", ".gz",
        ".7z", ".bz2", ".jpg", ".jpeg", ".png", ".gif", ".svg", ".ico", ".bmp", ".mp3", ".mp4",
        ".avi", ".mov", ".wmv", ".flv", ".swf", ".woff", ".woff2", ".ttf", ".eot", ".otf",
    ];
    let lower = key.to_ascii_lowercase();
    if let Some(ext) = SUSPICIOUS.iter().find(|e| lower.ends_with(*e)) {
        return Err(format!(
            "key contains suspicious file extension '{ext}' that may be cached by proxies"
        ));
    }
    Ok(())
}

/// `conflictingFlags`.
fn conflicting(q: &Query, flags: &[&str]) -> Option<Response> {
    if flags.iter().filter(|f| q.has(f)).count() > 1 {
        return Some(text(
            StatusCode::BAD_REQUEST,
            format!("Conflicting flags: {}\n", q.encode()),
        ));
    }
    None
}

fn too_large_value(len: usize) -> Response {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "Request body({len} bytes) too large, max size: {MAX_VALUE_SIZE} bytes. See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
        ),
    )
}

async fn kv_put(
    sh: &Shared,
    key: &str,
    q: &Query,
    headers: &HeaderMap,
    body: Body,
    pretty: bool,
) -> Response {
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if let Some(r) = conflicting(q, &["cas", "acquire", "release"]) {
        return r;
    }
    let mut e = Entry::new(key);
    if q.has("flags") {
        match parse_u64(q.get("flags")) {
            Ok(f) => e.flags = f,
            Err(r) => return r,
        }
    }
    enum Op {
        Set,
        Cas(u64),
        Lock,
        Unlock,
    }
    let mut op = Op::Set;
    if q.has("cas") {
        match parse_u64(q.get("cas")) {
            Ok(c) => op = Op::Cas(c),
            Err(r) => return r,
        }
    }
    if q.has("acquire") {
        e.session = q.get("acquire").to_string();
        op = Op::Lock;
    }
    if q.has("release") {
        e.session = q.get("release").to_string();
        op = Op::Unlock;
    }
    if let Some(len) = content_length(headers) {
        if len > MAX_VALUE_SIZE {
            drain(body).await;
            return too_large_value(len);
        }
    }
    e.value = match read_body(body, MAX_VALUE_SIZE).await {
        Ok(b) => b,
        Err(n) => return too_large_value(n),
    };

    let mut st = sh.store();
    // Lock-delay is enforced before Raft (KVS.Apply): no index is used.
    if matches!(op, Op::Lock) && st.lock_delay_until(key, Instant::now()).is_some() {
        tracing::debug!(
            key,
            "consul simulator: rejecting lock of key due to lock-delay"
        );
        return json_body(StatusCode::OK, &false, pretty);
    }
    let idx = st.next_index();
    let result = match op {
        Op::Set => {
            st.kv_set(idx, e);
            Ok(true)
        }
        Op::Cas(c) => st.kv_cas(idx, e, c).map(|_| true),
        Op::Lock => st.kv_lock(idx, e).map(|_| true),
        Op::Unlock => st.kv_unlock(idx, e).map(|_| true),
    };
    sh.notify(&st);
    drop(st);
    match result {
        Ok(_) => json_body(StatusCode::OK, &true, pretty),
        Err(OpFail::False) => json_body(StatusCode::OK, &false, pretty),
        Err(OpFail::Error(msg)) => text(StatusCode::INTERNAL_SERVER_ERROR, msg),
    }
}

fn kv_delete(sh: &Shared, key: &str, q: &Query, pretty: bool) -> Response {
    if let Some(r) = conflicting(q, &["recurse", "cas"]) {
        return r;
    }
    let recurse = q.has("recurse");
    if !recurse && key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let cas = if q.has("cas") {
        match parse_u64(q.get("cas")) {
            Ok(c) => Some(c),
            Err(r) => return r,
        }
    } else {
        None
    };
    let mut st = sh.store();
    let idx = st.next_index();
    let ok = if recurse {
        st.kv_delete_tree(idx, key);
        true
    } else if let Some(c) = cas {
        st.kv_delete_cas(idx, key, c)
    } else {
        st.kv_delete(idx, key);
        true
    };
    sh.notify(&st);
    json_body(StatusCode::OK, &ok, pretty)
}

// ---------------------------------------------------------------- /v1/session

/// Case-insensitive field lookup, as Go's JSON decoding matches names.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-{:x}{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        (b[8] & 0x3) | 0x8,
        &h[17..20],
        &h[20..32]
    )
}

async fn session_create(sh: &Shared, body: Body, pretty: bool) -> Response {
    let bad = |msg: String| {
        text(
            StatusCode::BAD_REQUEST,
            format!("Request decode failed: {msg}"),
        )
    };
    let raw = match read_body(body, MAX_VALUE_SIZE).await {
        Ok(b) => b,
        Err(_) => return bad("http: request body too large".into()),
    };
    let st_node = sh.store().node_name.clone();
    let mut name = String::new();
    let mut node = st_node.clone();
    let mut lock_delay = Duration::from_secs(15);
    let mut behavior = "release".to_string();
    let mut ttl_text = String::new();
    let mut checks: Vec<String> = vec![SERF_CHECK.to_string()];
    if !raw.is_empty() {
        let v: Value = match serde_json::from_slice(&raw) {
            Ok(v) => v,
            Err(e) => return bad(e.to_string()),
        };
        let obj = match v {
            Value::Object(o) => o,
            Value::Null => Map::new(),
            other => return bad(format!("cannot decode {other} into a session")),
        };
        let string = |n: &str| -> Result<Option<String>, Response> {
            match field(&obj, n) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(bad(format!(
                    "json: cannot unmarshal {other} into Go struct field Session.{n} of type string"
                ))),
            }
        };
        match string("Name") {
            Ok(Some(s)) => name = s,
            Ok(None) => {}
            Err(r) => return r,
        }
        match string("Node") {
            Ok(Some(s)) if !s.is_empty() => node = s,
            Ok(_) => {}
            Err(r) => return r,
        }
        match string("Behavior") {
            Ok(Some(s)) => behavior = s,
            Ok(None) => {}
            Err(r) => return r,
        }
        match string("TTL") {
            Ok(Some(s)) => ttl_text = s,
            Ok(None) => {}
            Err(r) => return r,
        }
        // FixupLockDelay: a string is a Go duration, a number is
        // nanoseconds; values under 1000 (ns) are taken as seconds.
        match field(&obj, "LockDelay") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => match godur::parse(s) {
                Ok(ns) => {
                    let ns = if ns < 1000 { ns * 1_000_000_000 } else { ns };
                    lock_delay = Duration::from_nanos(ns.max(0) as u64);
                }
                Err(e) => return bad(e),
            },
            Some(Value::Number(n)) => {
                let ns = n.as_f64().unwrap_or(0.0) as i128;
                let ns = if ns < 1000 { ns * 1_000_000_000 } else { ns };
                lock_delay = Duration::from_nanos(ns.max(0) as u64);
            }
            Some(other) => return bad(format!("cannot decode LockDelay {other}")),
        }
        // FixupChecks: giving `Checks` (or `NodeChecks`) at all replaces
        // the default serfHealth check, so `[]` means no checks.
        let mut given: Option<Vec<String>> = None;
        for n in ["Checks", "NodeChecks"] {
            match field(&obj, n) {
                None => {}
                Some(Value::Null) => {
                    given.get_or_insert_with(Vec::new);
                }
                Some(Value::Array(a)) => {
                    let g = given.get_or_insert_with(Vec::new);
                    for c in a {
                        match c {
                            Value::String(s) => g.push(s.clone()),
                            other => return bad(format!("cannot decode check ID {other}")),
                        }
                    }
                }
                Some(other) => return bad(format!("cannot decode {n} {other}")),
            }
        }
        if let Some(g) = given {
            checks = g;
        }
        if let Some(Value::Array(a)) = field(&obj, "ServiceChecks") {
            if let Some(c) = a.first() {
                let id = c
                    .as_object()
                    .and_then(|o| field(o, "ID"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Missing check '{id}' registration"),
                );
            }
        }
    }
    let err500 = |msg: String| text(StatusCode::INTERNAL_SERVER_ERROR, msg);
    // Session.Apply's checks, in its order; Consul answers these 500.
    let behavior = match behavior.as_str() {
        "" | "release" => Behavior::Release,
        "delete" => Behavior::Delete,
        other => return err500(format!("Invalid Behavior setting '{other}'")),
    };
    let mut ttl = None;
    if !ttl_text.is_empty() {
        let ns = match godur::parse(&ttl_text) {
            Ok(ns) => ns,
            Err(e) => return err500(format!("Session TTL '{ttl_text}' invalid: {e}")),
        };
        if ns != 0 {
            let min = SESSION_TTL_MIN.as_nanos() as i128;
            let max = SESSION_TTL_MAX.as_nanos() as i128;
            if ns < min || ns > max {
                return err500(format!(
                    "Invalid Session TTL '{ns}', must be between [{}={}]",
                    godur::format_nanos(min as u128),
                    godur::format_nanos(max as u128)
                ));
            }
            ttl = Some(Duration::from_nanos(ns as u64));
        }
    }
    if node != st_node {
        return err500("Missing node registration".into());
    }
    for c in &checks {
        if c != SERF_CHECK {
            return err500(format!("Missing check '{c}' registration"));
        }
    }
    let mult = sh.multiplier();
    let id = {
        let mut st = sh.store();
        let mut id = new_uuid();
        while st.session(&id).is_some() {
            id = new_uuid();
        }
        let idx = st.next_index();
        let now = Instant::now();
        st.insert_session(Session {
            id: id.clone(),
            name,
            node,
            lock_delay,
            behavior,
            ttl_text,
            ttl,
            node_checks: checks,
            create_index: idx,
            modify_index: idx,
            deadline: ttl.map(|t| now + t.mul_f64(mult)),
        });
        sh.notify(&st);
        id
    };
    sh.timers.notify_one();
    json_body(StatusCode::OK, &serde_json::json!({ "ID": id }), pretty)
}

// ---------------------------------------------------------------- /v1/txn

struct TxnOp {
    verb: String,
    key: String,
    value: Vec<u8>,
    flags: u64,
    index: u64,
    session: String,
}

fn is_write(verb: &str) -> bool {
    matches!(
        verb,
        "set" | "delete" | "delete-cas" | "delete-tree" | "cas" | "lock" | "unlock"
    )
}

fn parse_txn(raw: &[u8]) -> Result<Vec<TxnOp>, String> {
    let v: Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    let arr = match v {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        other => {
            return Err(format!(
                "json: cannot unmarshal {other} into Go value of type api.TxnOps"
            ))
        }
    };
    let mut ops = Vec::with_capacity(arr.len());
    for item in arr {
        let Value::Object(o) = item else {
            return Err(
                "json: cannot unmarshal a non-object into Go value of type api.TxnOp".into(),
            );
        };
        let Some(kv) = field(&o, "KV") else {
            if ["Node", "Service", "Check"]
                .iter()
                .any(|n| field(&o, n).is_some())
            {
                return Err("the Consul simulator supports only KV operations in /v1/txn".into());
            }
            return Err("operation has no KV member".into());
        };
        let Value::Object(kv) = kv else {
            return Err("json: cannot unmarshal KV into Go struct field TxnOp.KV".into());
        };
        let s = |n: &str| -> Result<String, String> {
            match field(kv, n) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!(
                    "json: cannot unmarshal {other} into Go struct field KVTxnOp.KV.{n} of type string"
                )),
            }
        };
        let u = |n: &str| -> Result<u64, String> {
            match field(kv, n) {
                None | Some(Value::Null) => Ok(0),
                Some(Value::Number(x)) => x.as_u64().ok_or_else(|| {
                    format!("json: cannot unmarshal number {x} into Go struct field KVTxnOp.KV.{n} of type uint64")
                }),
                Some(other) => Err(format!(
                    "json: cannot unmarshal {other} into Go struct field KVTxnOp.KV.{n} of type uint64"
                )),
            }
        };
        let value = match field(kv, "Value") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(b)) => B64
                .decode(b)
                .map_err(|e| format!("failed to decode value: {e}"))?,
            Some(other) => return Err(format!("unexpected value type: {other}")),
        };
        ops.push(TxnOp {
            verb: s("Verb")?,
            key: s("Key")?,
            value,
            flags: u("Flags")?,
            index: u("Index")?,
            session: s("Session")?,
        });
    }
    Ok(ops)
}

type TxnResults = Vec<Value>;
type TxnErrors = Vec<(usize, String)>;

fn result_kv(e: &Entry, with_value: bool) -> Value {
    serde_json::json!({ "KV": entry_json(e, with_value) })
}

/// `txnKVS` for one op: its results, or Consul's error text.
fn txn_kv_op(st: &mut Store, idx: u64, op: &TxnOp) -> Result<TxnResults, String> {
    let q = godur::go_quote(&op.key);
    let entry = || {
        let mut e = Entry::new(&op.key);
        e.value = op.value.clone();
        e.flags = op.flags;
        e.session = op.session.clone();
        e
    };
    let one = |e: &Entry, v: bool| Ok(vec![result_kv(e, v)]);
    match op.verb.as_str() {
        "set" => {
            let e = st.kv_set(idx, entry());
            one(&e, false)
        }
        "delete" => {
            st.kv_delete(idx, &op.key);
            Ok(vec![])
        }
        "delete-cas" => {
            if st.kv_delete_cas(idx, &op.key, op.index) {
                Ok(vec![])
            } else {
                Err(format!("failed to delete key {q}, index is stale"))
            }
        }
        "delete-tree" => {
            st.kv_delete_tree(idx, &op.key);
            Ok(vec![])
        }
        "cas" => match st.kv_cas(idx, entry(), op.index) {
            Ok(e) => one(&e, false),
            Err(OpFail::False) => Err(format!("failed to set key {q}, index is stale")),
            Err(OpFail::Error(m)) => Err(m),
        },
        "lock" => match st.kv_lock(idx, entry()) {
            Ok(e) => one(&e, false),
            Err(OpFail::False) => Err(format!("failed to lock key {q}, lock is already held")),
            Err(OpFail::Error(m)) => Err(m),
        },
        "unlock" => match st.kv_unlock(idx, entry()) {
            Ok(e) => one(&e, false),
            Err(OpFail::False) => Err(format!(
                "failed to unlock key {q}, lock isn't held, or is held by another session"
            )),
            Err(OpFail::Error(m)) => Err(m),
        },
        "get" => match st.get(&op.key) {
            Some(e) => one(&e.clone(), true),
            None => Err(format!("key {q} doesn't exist")),
        },
        // An absent key answers the op's own entry with no value.
        "get-or-empty" => match st.get(&op.key) {
            Some(e) => one(&e.clone(), true),
            None => {
                let mut e = entry();
                e.value.clear();
                one(&e, true)
            }
        },
        "get-tree" => {
            let (entries, _) = st.kv_list(&op.key);
            Ok(entries.iter().map(|e| result_kv(e, true)).collect())
        }
        "check-session" => match st.get(&op.key) {
            None => Err(format!("failed to check session, key {q} doesn't exist")),
            Some(e) if e.session != op.session => Err(format!(
                "failed session check for key {q}, current session {} != {}",
                godur::go_quote(&e.session),
                godur::go_quote(&op.session)
            )),
            Some(e) => one(&e.clone(), false),
        },
        "check-index" => match st.get(&op.key) {
            None => Err(format!("failed to check index, key {q} doesn't exist")),
            Some(e) if e.modify_index != op.index => Err(format!(
                "failed index check for key {q}, current modify index {} != {}",
                e.modify_index, op.index
            )),
            Some(e) => one(&e.clone(), false),
        },
        "check-not-exists" => match st.get(&op.key) {
            Some(_) => Err(format!("key {q} exists")),
            None => Ok(vec![]),
        },
        other => Err(format!("unknown KV verb {}", godur::go_quote(other))),
    }
}

/// `txnDispatch`: every op runs (collecting all errors); any error rolls
/// the whole txn back.
fn txn_dispatch(st: &mut Store, idx: u64, ops: &[TxnOp]) -> Result<TxnResults, TxnErrors> {
    st.atomically(|st| {
        let mut results = Vec::new();
        let mut errors = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match txn_kv_op(st, idx, op) {
                Ok(r) => results.extend(r),
                Err(what) => errors.push((i, what)),
            }
        }
        if errors.is_empty() {
            Ok(results)
        } else {
            Err(errors)
        }
    })
}

fn txn_conflict(errors: TxnErrors, pretty: bool) -> Response {
    let errs: Vec<Value> = errors
        .into_iter()
        .map(|(i, w)| serde_json::json!({ "OpIndex": i, "What": w }))
        .collect();
    json_body(
        StatusCode::CONFLICT,
        &serde_json::json!({ "Results": Value::Null, "Errors": errs }),
        pretty,
    )
}

async fn txn(sh: &Shared, q: &Query, headers: &HeaderMap, body: Body, pretty: bool) -> Response {
    const DOCS: &str = "https://www.consul.io/docs/agent/config/config-files#txn_max_req_len";
    if let Some(len) = content_length(headers) {
        if len > MAX_VALUE_SIZE {
            drain(body).await;
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body({len} bytes) too large, max size: {MAX_VALUE_SIZE} bytes. See {DOCS}."),
            );
        }
    }
    let raw = match read_body(body, MAX_VALUE_SIZE).await {
        Ok(b) => b,
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body too large, max size: {MAX_VALUE_SIZE} bytes. See {DOCS}."),
            )
        }
    };
    let ops = match parse_txn(&raw) {
        Ok(o) => o,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Failed to parse body: {e}"),
            )
        }
    };
    if ops.len() > MAX_TXN_OPS {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Transaction contains too many operations ({} > {MAX_TXN_OPS})",
                ops.len()
            ),
        );
    }
    for op in &ops {
        if op.value.len() > MAX_VALUE_SIZE {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "Value for key {} is too large ({} > {MAX_VALUE_SIZE} bytes)",
                    godur::go_quote(&op.key),
                    op.value.len()
                ),
            );
        }
    }
    let writes = ops.iter().any(|o| is_write(&o.verb));
    if !writes {
        // Txn.Read: consistency modes apply, no blocking, no Raft index.
        if let Err(r) = parse_read_opts(q) {
            return r;
        }
        let mut st = sh.store();
        let idx = st.raft_index();
        let out = txn_dispatch(&mut st, idx, &ops);
        drop(st);
        let r = match out {
            Ok(results) => json_body(
                StatusCode::OK,
                &serde_json::json!({ "Results": results, "Errors": Value::Null }),
                pretty,
            ),
            Err(errors) => txn_conflict(errors, pretty),
        };
        let mut r = r;
        r.headers_mut()
            .insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
        r.headers_mut()
            .insert("X-Consul-LastContact", HeaderValue::from_static("0"));
        return r;
    }
    let mut st = sh.store();
    // Txn.Apply's preCheck (before Raft): missing keys and lock-delay.
    let now = Instant::now();
    let mut pre: TxnErrors = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if op.key.is_empty() && op.verb != "delete-tree" {
            pre.push((i, "Must provide key".into()));
        } else if op.verb == "lock" && st.lock_delay_until(&op.key, now).is_some() {
            pre.push((
                i,
                format!(
                    "failed to lock key {} due to lock delay",
                    godur::go_quote(&op.key)
                ),
            ));
        }
    }
    if !pre.is_empty() {
        return txn_conflict(pre, pretty);
    }
    let idx = st.next_index();
    let out = txn_dispatch(&mut st, idx, &ops);
    sh.notify(&st);
    drop(st);
    match out {
        Ok(results) => json_body(
            StatusCode::OK,
            &serde_json::json!({ "Results": results, "Errors": Value::Null }),
            pretty,
        ),
        Err(errors) => txn_conflict(errors, pretty),
    }
}
