//! Watches: every write script appends its change to the namespace's
//! stream (entry id `<revision>-<n>`); a watch reads it with `XREAD BLOCK`
//! on a connection of its own (a blocking read would stall the shared
//! command connection), filters by prefix, and resumes where it stopped
//! after a reconnect.
//!
//! A watch also runs the expiry sweep when the namespace's next TTL key is
//! due (it learns deadlines from the sweep and from put events that carry
//! a TTL), bounding each blocking read by that deadline: expiries become
//! delete events without anyone polling.
//!
//! Revisions in the stream are contiguous (each write script takes the next
//! revision and appends at least one entry for it), so a watch notices
//! history that was trimmed under it: a revision it expected is missing.

use crate::backend::Shared;
use crate::conn::{is_connection_failure, is_redirect, map_err, Connection, Target, NAME};
use crate::scripts::scripts;
use bytes::Bytes;
use futures::StreamExt;
use latchkey_core::{Error, EventKind, Result, Revision, WatchEvent, WatchStream};
use redis::streams::StreamReadReply;
use redis::Value;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long one `XREAD` blocks; after an empty one the watch checks that
/// the server still has its history (a restart without persistence resets
/// the revision counter).
const BLOCK: Duration = Duration::from_secs(2);
const BATCH: usize = 512;
/// When no key of the namespace has a TTL, look again this late (a new TTL
/// key is noticed earlier, from its put event).
const NO_TTL_KEYS: Duration = Duration::from_secs(3600);

struct State {
    target: Target,
    ops: Arc<AtomicU64>,
    timeout: Duration,
    con: Option<Connection>,
    rev_key: String,
    log_key: String,
    epoch_key: String,
    idx_key: String,
    ttl_key: String,
    kv_prefix: String,
    history: u64,
    /// When the next TTL key of the namespace is due: then this watch runs
    /// the sweep that turns expiries into delete events.
    sweep_at: Instant,
    /// The epoch of the data this watch stands on.
    epoch: String,
    prefix: String,
    /// Id after which to read.
    last_id: String,
    /// Highest revision known to exist (read, or current at the start).
    seen: Revision,
    /// The next revision the stream must deliver; anything higher first
    /// means entries were trimmed.
    next: Revision,
    buf: VecDeque<WatchEvent>,
    done: bool,
}

/// A connection of the watch's own, without a reply timeout (the blocking
/// `XREAD` would trip it). On a cluster it is a cluster connection of its
/// own: it sends the `XREAD` to the master of the namespace's slot and
/// follows the slot after a migration (`MOVED`/`ASK`) or a failover.
async fn blocking_connection(target: &Target, timeout: Duration) -> Result<Connection> {
    target.connect(timeout, None).await
}

fn new_epoch() -> String {
    use rand::Rng;
    format!("{:032x}", rand::rng().random::<u128>())
}

/// `{current revision, highest trimmed revision, epoch}`.
async fn start_point(
    con: &mut Connection,
    keys: [&str; 3],
    timeout: Duration,
) -> Result<(Revision, Revision, String)> {
    let mut inv = scripts().watch_start.prepare_invoke();
    inv.key(&keys[..]).arg(new_epoch());
    match tokio::time::timeout(timeout, inv.invoke_async::<(u64, u64, String)>(con)).await {
        Ok(r) => r.map_err(|e| map_err(&e)),
        Err(_) => Err(Error::unavailable(NAME, "watch start timed out")),
    }
}

pub(crate) async fn open(
    shared: &Shared,
    prefix: &str,
    from: Option<Revision>,
) -> Result<WatchStream> {
    let target = shared.conn.target().clone();
    let timeout = shared.conn.timeout();
    let mut con = blocking_connection(&target, timeout).await?;
    let (rev_key, log_key, epoch_key) = (
        shared.layout.rev(),
        shared.layout.log(),
        shared.layout.epoch(),
    );
    let (current, trimmed, epoch) =
        start_point(&mut con, [&rev_key, &log_key, &epoch_key], timeout).await?;
    let start = match from {
        None => current + 1,
        Some(r) => {
            let r = r.max(1);
            if r <= trimmed {
                return Err(Error::Compacted {
                    oldest: trimmed + 1,
                });
            }
            r
        }
    };
    let last_id = if start <= 1 {
        "0-0".to_string()
    } else {
        format!("{}-{}", start - 1, u64::MAX)
    };
    let mut state = State {
        target,
        ops: shared.conn.ops().clone(),
        timeout,
        con: Some(con),
        rev_key,
        log_key,
        epoch_key,
        idx_key: shared.layout.index(),
        ttl_key: shared.layout.ttl(),
        kv_prefix: shared.layout.kv_prefix(),
        history: shared.history,
        sweep_at: Instant::now(),
        epoch,
        prefix: prefix.to_string(),
        last_id,
        seen: current,
        next: start,
        buf: VecDeque::new(),
        done: false,
    };
    // Expiries that happened while nobody watched become events now.
    state.sweep().await?;
    Ok(futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.buf.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            if let Err(e) = st.fill().await {
                st.done = true;
                return Some((Err(e), st));
            }
        }
    })
    .boxed())
}

fn field<'a>(map: &'a std::collections::HashMap<String, Value>, f: &str) -> Option<&'a Value> {
    map.get(f)
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

impl State {
    /// Reads the next batch into `buf` (possibly nothing).
    async fn fill(&mut self) -> Result<()> {
        if self.con.is_none() {
            self.reconnect().await?;
        }
        if Instant::now() >= self.sweep_at {
            if let Err(e) = self.sweep().await {
                if e.is_transient() {
                    self.con = None;
                    return Ok(());
                }
                return Err(e);
            }
        }
        // Block until the next key is due at the latest (0 would block
        // forever: at least 1 ms).
        let block = self
            .sweep_at
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), BLOCK);
        let con = self.con.as_mut().expect("connected above");
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.log_key)
            .arg(&self.last_id);
        self.ops.fetch_add(1, Ordering::Relaxed);
        let read = cmd.query_async::<Option<StreamReadReply>>(con);
        let reply = match tokio::time::timeout(BLOCK + self.timeout, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if is_connection_failure(&e) || is_redirect(&e) => {
                self.con = None;
                return Ok(());
            }
            Ok(Err(e)) => return Err(map_err(&e)),
            Err(_) => {
                // The server did not answer a blocking read in time: it is
                // frozen or gone; try a fresh connection.
                self.con = None;
                return Ok(());
            }
        };
        let Some(reply) = reply else {
            return self.check_history().await;
        };
        for sk in reply.keys {
            for entry in sk.ids {
                let rev: Revision = entry
                    .id
                    .split('-')
                    .next()
                    .and_then(|r| r.parse().ok())
                    .ok_or_else(|| {
                        Error::backend(NAME, format!("unexpected stream id {:?}", entry.id))
                    })?;
                if rev > self.next {
                    return Err(Error::Compacted { oldest: rev });
                }
                self.next = self.next.max(rev + 1);
                self.seen = self.seen.max(rev);
                self.last_id = entry.id.clone();
                if let Some(t) = text(field(&entry.map, "t")).and_then(|t| t.parse().ok()) {
                    // A key with a TTL: sweep when it is due.
                    let due = Instant::now() + Duration::from_millis(t);
                    self.sweep_at = self.sweep_at.min(due);
                }
                let Some(key) = text(field(&entry.map, "k")) else {
                    continue;
                };
                if !key.starts_with(&self.prefix) {
                    continue;
                }
                let kind = match text(field(&entry.map, "e")).as_deref() {
                    Some("d") => EventKind::Delete,
                    _ => EventKind::Put,
                };
                let value = match (kind, field(&entry.map, "v")) {
                    (EventKind::Put, Some(Value::BulkString(b))) => Bytes::copy_from_slice(b),
                    _ => Bytes::new(),
                };
                self.buf.push_back(WatchEvent {
                    kind,
                    key,
                    value,
                    revision: rev,
                });
            }
        }
        Ok(())
    }

    async fn reconnect(&mut self) -> Result<()> {
        // Ride out a short outage (a restart) for up to one timeout before
        // ending the watch with the error.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut con = loop {
            match blocking_connection(&self.target, self.timeout).await {
                Ok(c) => break c,
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.con = None;
        let (current, trimmed, epoch) = start_point(&mut con, self.keys(), self.timeout).await?;
        self.con = Some(con);
        self.verify(current, trimmed, &epoch)
    }

    async fn check_history(&mut self) -> Result<()> {
        let Some(con) = self.con.as_mut() else {
            return Ok(());
        };
        let keys = [
            self.rev_key.as_str(),
            self.log_key.as_str(),
            self.epoch_key.as_str(),
        ];
        match start_point(con, keys, self.timeout).await {
            Ok((current, trimmed, epoch)) => self.verify(current, trimmed, &epoch),
            Err(_) => {
                self.con = None;
                Ok(())
            }
        }
    }

    /// Runs the expiry sweep (see `scripts.rs`) and schedules the next.
    async fn sweep(&mut self) -> Result<()> {
        let Some(con) = self.con.as_mut() else {
            return Ok(());
        };
        let mut inv = scripts().sweep.prepare_invoke();
        inv.key(&self.rev_key)
            .key(&self.idx_key)
            .key(&self.log_key)
            .key(&self.ttl_key)
            .arg(&self.kv_prefix)
            .arg(self.history);
        self.ops.fetch_add(1, Ordering::Relaxed);
        let next: i64 = match tokio::time::timeout(self.timeout, inv.invoke_async(con)).await {
            Ok(r) => r.map_err(|e| map_err(&e))?,
            Err(_) => return Err(Error::unavailable(NAME, "expiry sweep timed out")),
        };
        self.sweep_at = Instant::now()
            + if next < 0 {
                NO_TTL_KEYS
            } else {
                Duration::from_millis(next as u64)
            };
        Ok(())
    }

    fn keys(&self) -> [&str; 3] {
        [&self.rev_key, &self.log_key, &self.epoch_key]
    }

    /// Fails if the server no longer has the history this watch stands on.
    fn verify(&self, current: Revision, trimmed: Revision, epoch: &str) -> Result<()> {
        if epoch != self.epoch || current < self.seen {
            // The revision counter went back: the server lost its data
            // (restart without persistence, failover). Nothing after our
            // position can be trusted to come.
            return Err(Error::Compacted {
                oldest: trimmed + 1,
            });
        }
        if trimmed >= self.next {
            return Err(Error::Compacted {
                oldest: trimmed + 1,
            });
        }
        Ok(())
    }
}
