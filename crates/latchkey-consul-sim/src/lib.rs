//! # A SIMULATOR of Consul's HTTP API — not Consul
//!
//! No Consul binary can be installed where latchkey is developed, so the
//! Consul adapter's tests run against this in-process **simulator** of the
//! parts of Consul's HTTP API that latchkey uses. It was written from
//! HashiCorp's API documentation (`api-docs/kv`, `api-docs/session`,
//! `api-docs/txn`, `api-docs/features/blocking` and `consistency`) and from
//! the agent's endpoint and state-store code for exact status codes and
//! error texts (`agent/kvs_endpoint.go`, `agent/session_endpoint.go`,
//! `agent/txn_endpoint.go`, `agent/http.go`, `agent/consul/state/kvs.go`,
//! `agent/consul/state/txn.go`, `agent/consul/session_ttl.go`,
//! `agent/consul/kvs_endpoint.go`). Passing tests against it is evidence,
//! not proof, that an adapter works with a real agent: run the same tests
//! with `LATCHKEY_TEST_CONSUL_URL` pointing at `consul agent -dev` for that.
//!
//! ## What it serves
//! - `/v1/kv/<key>`: `GET` (`recurse`, `keys` + `separator`, `raw`,
//!   blocking `index` + `wait`, `consistent`/`stale`), `PUT` (`flags`,
//!   `cas`, `acquire`, `release`; body = raw value, at most 512 KiB),
//!   `DELETE` (`cas`, `recurse`).
//! - `/v1/session/{create,destroy/<id>,renew/<id>,info/<id>,list,node/<n>}`
//!   with `TTL` (10 s … 24 h), `LockDelay` (default 15 s, applied capped at
//!   60 s),
//!   `Behavior` (`release` | `delete`), `Checks`/`NodeChecks` (only
//!   `serfHealth` exists, always passing).
//! - `/v1/txn` with the KV verbs `set, cas, lock, unlock, get, get-or-empty,
//!   get-tree, check-index, check-session, check-not-exists, delete,
//!   delete-tree, delete-cas`; all-or-nothing; at most 128 ops (Consul 1.14+,
//!   `maxTxnOps` in agent/txn_endpoint.go, hashicorp/consul PR #14599).
//! - `/v1/status/leader`, `/v1/status/peers` (for readiness checks).
//!
//! ## Semantics kept from Consul
//! - One Raft-like index, strictly increasing and never reused: every
//!   write request takes the next one (also a CAS that fails, as in Consul
//!   where the apply still goes through Raft); all writes of one txn share it.
//! - `X-Consul-Index`: a present key reports its `ModifyIndex`; an absent
//!   key the KV table index; a listing the highest `ModifyIndex` of its
//!   entries and tombstones under the prefix (else the table index).
//!   Never 0. Deleted keys leave tombstones (kept forever here; Consul
//!   reaps them after `tombstone_ttl`).
//! - Blocking queries return as soon as the result's index passes `index`,
//!   else after `wait` (default 5 min, at most 10 min) plus up to wait/16
//!   of random jitter; they are woken by every change (no polling).
//! - A `set` that changes nothing keeps the entry's `ModifyIndex`
//!   (`DirEntry.Equal` in kvsSetTxn); a plain `set` keeps the holder
//!   (`Session`) but, like Consul, takes `LockIndex` from the request (0).
//! - `acquire`: `LockIndex` + 1 when a new session takes the key,
//!   unchanged when the holder re-acquires; during a key's lock-delay the
//!   acquire answers `false` (a txn `lock` fails with "due to lock delay")
//!   without using an index. Lock-delay starts only when a session is
//!   invalidated (destroy, TTL, test hook), never on `release`.
//! - Session TTL: invalidated exactly `TTL × multiplier` after the last
//!   create/renew. Consul's contract is "not before TTL, possibly up to
//!   2×TTL" and its implementation uses exactly 2×TTL
//!   (`SessionTTLMultiplier`). The simulator's default multiplier is
//!   **1.0**, the earliest the contract allows, so a holder that renews
//!   late is caught; [`ConsulSim::set_ttl_multiplier`] sets 2.0 to mimic
//!   the implementation's latest.
//! - Status codes follow the agent code, not intuition: errors that Consul
//!   raises inside its RPC layer are `500` there and here (an invalid or
//!   out-of-range session `TTL`, an invalid `Behavior`, `?acquire=` with a
//!   missing or unknown session, an unparsable `flags`/`cas`); request
//!   decoding errors are `400`; sizes are `413`; failed txns `409`;
//!   ACL failures `403` (`Permission denied` without a token, `ACL not
//!   found` with a wrong one).
//!
//! ## Not simulated
//! Multiple servers, leader changes, stale reads (`?stale` is accepted and
//! answers like `?consistent`), ACL policies (one all-powerful token),
//! catalog/health/agent endpoints and node/service/check txn ops. Tombstones
//! are kept until [`ConsulSim::reap_tombstones`] and snapshot restores happen
//! only through [`ConsulSim::restore`]: those two hooks produce the
//! documented cases of a blocking query's index going backwards.
//!
//! ## Key names
//! By default any key is accepted, as the API docs describe (paths are
//! percent-decoded; `//`, `/./` and `/../` are redirected as Go's
//! `http.ServeMux` does). Consul 1.21.5 started rejecting many characters in
//! KV key names (hashicorp/consul PR #22682, issues #22822 and #22835; PR
//! #22863 reworks the rules); [`ConsulSim::set_strict_key_validation`]
//! applies the strictest version of those rules so an adapter can check its
//! key encoding against them.

#![warn(missing_docs)]

mod godur;
mod http;
mod state;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use http::{MAX_TXN_OPS, MAX_VALUE_SIZE};

/// A running Consul HTTP-API **simulator** (not Consul) on a loopback port.
///
/// It serves on its own thread with its own tokio runtime, so it works from
/// any test, async or not; dropping the handle stops it and frees the port.
pub struct ConsulSim {
    addr: SocketAddr,
    shared: Arc<http::Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ConsulSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulSim (simulator)")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ConsulSim {
    /// Starts a simulator on `127.0.0.1` on a free port.
    pub fn start() -> std::io::Result<ConsulSim> {
        ConsulSim::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts a simulator on `addr` (port 0 = any free port).
    pub fn start_on(addr: SocketAddr) -> std::io::Result<ConsulSim> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = Arc::new(http::Shared::new());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        // Registered on the runtime's reactor inside its thread.
        let thread = std::thread::Builder::new()
            .name(format!("consul-sim-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("consul simulator: cannot serve: {e}");
                            return;
                        }
                    };
                    let reaper = tokio::spawn(http::reaper(sh.clone()));
                    let app = axum::Router::new().fallback(http::handle).with_state(sh);
                    tokio::select! {
                        r = axum::serve(listener, app) => {
                            if let Err(e) = r {
                                tracing::error!("consul simulator: server stopped: {e}");
                            }
                        }
                        _ = stop_rx => {}
                    }
                    reaper.abort();
                });
                // Dropping the runtime here cancels open connections,
                // including blocking queries still waiting.
                drop(runtime);
            })?;
        tracing::info!(
            "Consul HTTP-API SIMULATOR (not a real Consul agent) listening on http://{addr}"
        );
        Ok(ConsulSim {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `consul://127.0.0.1:PORT`, the URL a latchkey handle connects with.
    pub fn url(&self) -> String {
        format!("consul://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT`, for talking HTTP to the simulator directly.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Test hook: the session's TTL runs out now (its keys are released or
    /// deleted and their lock-delay starts). False if no such session.
    pub fn expire_session(&self, id: &str) -> bool {
        self.shared.invalidate(id)
    }

    /// Test hook: the session is invalidated now, as when one of its health
    /// checks fails. Same effect as [`ConsulSim::expire_session`].
    pub fn invalidate_session(&self, id: &str) -> bool {
        self.shared.invalidate(id)
    }

    /// Requires this ACL token on every `/v1/kv`, `/v1/session` and
    /// `/v1/txn` request (header `X-Consul-Token`, `Authorization: Bearer`,
    /// or `?token=`); others get `403`. `None` turns ACLs off (the default).
    pub fn set_acl_token(&self, token: Option<String>) {
        *self
            .shared
            .acl_token
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = token;
    }

    /// Session TTL multiplier: a session is invalidated `TTL × m` after its
    /// last renewal. Default 1.0 (Consul's lower bound); Consul's own
    /// implementation uses 2.0. Applies from each session's next renewal.
    pub fn set_ttl_multiplier(&self, m: f64) {
        let m = if m.is_finite() && m > 0.0 { m } else { 1.0 };
        *self
            .shared
            .ttl_multiplier
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = m;
    }

    /// Fault hook: while on, every API request answers `500 No cluster
    /// leader`, as an agent does during a leader election.
    pub fn set_unavailable(&self, on: bool) {
        self.shared
            .unavailable
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Applies the KV key-name validation of recent agents (Consul 1.21.5
    /// added it in a patch release, hashicorp/consul PR #22682; later
    /// versions rework it): keys with characters other than ASCII letters,
    /// digits and `,-_./`, a leading `/`, `../`, or a file-like extension
    /// such as `.json` are answered `400`. Off by default, as the API docs
    /// allow any key.
    pub fn set_strict_key_validation(&self, on: bool) {
        self.shared
            .strict_keys
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Test hook: drops all KV tombstones now, as Consul does after
    /// `tombstone_ttl`. A listing whose newest entry was deleted then
    /// reports a lower `X-Consul-Index` than before (blocking-query clients
    /// must reset their index when it goes backwards).
    pub fn reap_tombstones(&self) {
        let mut st = self.shared.store();
        st.reap_tombstones();
        self.shared.notify(&st);
    }

    /// Test hook: a copy of the whole state, for [`ConsulSim::restore`].
    pub fn snapshot(&self) -> SimSnapshot {
        SimSnapshot(Box::new(self.shared.store().clone()))
    }

    /// Test hook: restores a [`ConsulSim::snapshot`], as `consul snapshot
    /// restore` does: keys, sessions and their indexes go back to what they
    /// were (so `X-Consul-Index` goes backwards), new writes still get new,
    /// higher indexes, session TTL timers restart.
    pub fn restore(&self, snap: &SimSnapshot) {
        let mult = self.shared.multiplier();
        {
            let mut st = self.shared.store();
            st.restore_from(&snap.0, tokio::time::Instant::now(), mult);
            self.shared.notify(&st);
        }
        self.shared.timers.notify_one();
    }

    /// How many `/v1/...` requests it has received (counted on arrival, so
    /// a blocking query counts once), for asserting that a client waits
    /// with blocking queries instead of polling.
    pub fn requests(&self) -> u64 {
        self.shared
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The current Raft-like index (for tests that check monotonicity).
    pub fn raft_index(&self) -> u64 {
        self.shared.store().raft_index()
    }
}

/// A copy of a simulator's state ([`ConsulSim::snapshot`]).
pub struct SimSnapshot(Box<state::Store>);

impl std::fmt::Debug for SimSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimSnapshot")
    }
}

impl Drop for ConsulSim {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
