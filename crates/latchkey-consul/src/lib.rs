//! # latchkey-consul
//!
//! The Consul backend of latchkey, on Consul's HTTP API (`/v1/kv`,
//! `/v1/txn`, `/v1/session`).
//!
//! ```text
//! consul://host:8500[?namespace=…&token=…&dc=…&timeout=10s]
//! consuls://host:8501[?…]            (HTTPS; Cargo feature "tls")
//! ```
//!
//! - `token`: the ACL token, sent as `X-Consul-Token`; without it, the
//!   environment variable `CONSUL_HTTP_TOKEN` is used. It is never printed
//!   (URLs are redacted, the client's `Debug` hides it, errors never carry it).
//! - `dc`: the datacenter every request is sent to (`?dc=`).
//! - `timeout`: the timeout of each non-blocking request (default 10 s);
//!   blocking queries wait up to their `wait` plus this.
//! - `namespace`: latchkey's namespace (a key prefix, see below), not a
//!   Consul Enterprise namespace.
//!
//! **How this crate is tested.** No Consul binary can be installed on the
//! machines that build latchkey, so CI checks this adapter against
//! `latchkey-consul-sim`, **a simulator of Consul's HTTP API built from
//! HashiCorp's API docs** — not against Consul itself. The same test binaries
//! run against a real agent when `LATCHKEY_TEST_CONSUL_URL` is set; with a
//! dev agent that is one command:
//!
//! ```text
//! consul agent -dev &   # then:
//! LATCHKEY_TEST_CONSUL_URL=consul://127.0.0.1:8500 cargo test -p latchkey-consul
//! ```
//!
//! ## Data layout
//! | what | Consul key |
//! |---|---|
//! | key `k` | `latchkey/default/kv/<E(k)>`, or `latchkey/ns/<ns>/kv/<E(k)>` with a namespace |
//! | lock `x` (`api.Lock` layout, flags `0x2ddccbc058a50c18`) | `latchkey/…/locks/<E(x)>` |
//! | index marker of delete-only txns | `latchkey/…/rev` |
//!
//! `E` keeps keys readable, URL-path-safe and within the KV key rules of
//! Consul 1.21.5+ (letters, digits, `,-_./`; see [`keys`]): the lock named
//! `jobs/nightly` with no namespace is the Consul key
//! `latchkey/default/locks/jobs/nightly`, which a Go program locks with
//! `client.LockKey("latchkey/default/locks/jobs/nightly")` (or `consul lock`
//! on the same key): the two exclude each other.
//!
//! ## Semantics
//! - **Revisions** are `ModifyIndex` (a Raft index: global, never reused,
//!   also across delete-and-recreate). Conditional writes pin it with
//!   `check-index` / `cas` / `check-not-exists` inside a `/v1/txn`.
//! - **Reads** use `?consistent` (a quorum round per read: default mode can
//!   be stale across a leader change, Jepsen 2014), so `linearizable_reads`.
//! - **Lists** use `?recurse` on the encoded prefix, then decode and sort.
//!   (`?keys` would save the values but carries no `ModifyIndex`, which a
//!   `keys_only` listing must return.)
//! - **Transactions** read what they compare, decide locally and commit the
//!   chosen branch in one `/v1/txn` that pins what was read, retrying when a
//!   pin fails — atomic, isolated, never split (see the `backend` module).
//!   When every compare has a native check (`held`, `revision =`, `absent`)
//!   and `then` only puts, the first attempt is checks + writes in one
//!   request (a fenced write is one round trip).
//! - **Cost**: a put is one request; a put with a TTL two (a session, then
//!   the txn); a general txn two (read, commit).
//! - **TTL keys** are held by a session with `Behavior=delete` created for
//!   the put; Consul deletes the key between TTL and 2×TTL later. TTLs are
//!   whole seconds, at least 10 s (`min_ttl`), at most 24 h.
//! - **Watches** are blocking queries delivering the latest state after
//!   each change (coalesced; no replay) — see the `watch` module.
//! - **Locks** follow `api.Lock`; fencing tokens are the `ModifyIndex` of
//!   the `/v1/txn` `lock` op; see the `lock` module.
//!
//! ## Capabilities (and why)
//! | capability | value | reason |
//! |---|---|---|
//! | `watch_every_revision` | false | blocking queries return snapshots |
//! | `watch_resume` | false | Consul keeps no KV history |
//! | `watch_reports_expiry` | true | an expired TTL key is deleted by the server |
//! | `global_revision` | true | `ModifyIndex` is the Raft index |
//! | `min_ttl` | 10 s | Consul's minimum session TTL |
//! | `ttl_granularity` | 10 s | sessions are reaped up to 2×TTL late (for a TTL of T, up to T late) |
//! | `max_txn_ops` | 128 | Consul 1.14+ (64 before); see [`MAX_TXN_OPS`] |
//! | `fifo_locks` | false | waiters race for the key on each release, as in `api.Lock` |
//! | `linearizable_reads` | true | `?consistent` on every read |
//! | `durable_fencing` | true | Raft index (a snapshot restore can move it back) |
//! | `max_lock_ttl` | 24 h | Consul's default `session_ttl_max` |
//!
//! ## Dependencies
//! | crate | why |
//! |---|---|
//! | `reqwest` 0.13 (`default-features = false`, `http2`; `rustls` under feature `tls`) | HTTP client. A thin typed client (`client.rs`) is used instead of `consulrs`, the named choice: consulrs 0.1 has no `/v1/txn` (needed for atomic multi-key writes with compares and for the `lock` op's `ModifyIndex`, our fencing token), drops the response headers on every non-2xx (a blocking read answered 404 loses `X-Consul-Index`), `unwrap`s header parsing, and pulls reqwest 0.11 + hyper 0.14 + native-tls/OpenSSL (141 crates) beside the workspace's hyper 1. reqwest 0.13 without default features reuses hyper 1 / h2 and adds few crates. |
//! | `serde`, `serde_json` | the API's JSON |
//! | `base64` | KV values are base64 in JSON |
//! | `percent-encoding` | keys in URL paths and query values |
//! | `rand` | nonces for raw puts, retry jitter |
//!
//! The `tls` feature is off by default because reqwest's rustls pulls
//! aws-lc-rs (a C build); `consuls://` without it is an `InvalidUrl` error
//! naming the feature.
//!
//! ## Errors
//! 403/401 → `Auth`; connection refused → `Unavailable`; 5xx and 429 →
//! `Unavailable`; 413 → `InvalidValue` (a put) or `InvalidArgument`; a write
//! whose connection failed after it was sent → `Indeterminate`.

#![warn(missing_docs)]

mod backend;
mod client;
pub mod keys;
mod lock;
mod watch;

pub use backend::{ConsulBackend, CONSUL_MAX_TXN_OPS, MAX_TXN_OPS, RAW_VALUE_BYTES};
pub use client::LOCK_DELAY;
pub use lock::LOCK_FLAG;

use latchkey_core::{Backend, BackendUrl, Result};
use std::sync::Arc;

/// URL schemes this backend serves.
pub const SCHEMES: &[&str] = &["consul", "consuls"];

/// Opens a Consul handle for `url` (see the crate docs for the URL form).
pub async fn connect(url: BackendUrl) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(ConsulBackend::connect(&url).await?))
}
