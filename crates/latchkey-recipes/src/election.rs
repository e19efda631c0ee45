//! Leader election on a [`DistributedLock`](latchkey_core::DistributedLock)
//! plus one KV record, like etcd's `concurrency.Election` or Curator's
//! `LeaderSelector`.
//!
//! - **Campaign** = take the lock named after the election. The lock's
//!   fencing token is the **term**: strictly increasing from leader to
//!   leader, usable in fenced writes through [`Leadership::fence`].
//!   Candidates are served in arrival order where the backend's locks are
//!   FIFO ([`Capabilities::fifo_locks`](latchkey_core::Capabilities)).
//! - The leader publishes `(term, value)` in the KV key `<name>/leader`,
//!   always with a fenced write (only the current holder can write it).
//!   Where the backend has TTL keys the record carries the lock's TTL and
//!   is refreshed by the leader, so a dead leader's record disappears even
//!   if no candidate replaces it.
//! - [`Election::observe`] follows that key with a watch (no polling): one
//!   item per change of leader or value, terms never going back.
//! - A leader that dies is replaced when its lock expires: within the TTL
//!   plus the backend's TTL granularity.

use crate::util::{
    delete_if_value, lock_lost, publish_owned_record, txn_fenced_delete, txn_fenced_put,
};
use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;
use latchkey_core::{
    validate, Backend, Compare, Error, EventKind, LockGuard, LockOptions, Op, Result, Revision,
    TxnRequest, WatchStream,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex as AsyncMutex;
use tokio::task::JoinHandle;

/// The current leader as published in the election's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// What the leader proclaimed (e.g. its address).
    pub value: Bytes,
    /// The leader's term: its lock's fencing token.
    pub term: u64,
    /// The revision of the record this was read from.
    pub revision: Revision,
}

/// One election, by name. Cheap to clone.
#[derive(Clone)]
pub struct Election {
    backend: Arc<dyn Backend>,
    name: String,
    key: String,
    ttl: Duration,
    wait: Option<Duration>,
}

fn encode(term: u64, value: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(value.len() + 21);
    b.put_slice(term.to_string().as_bytes());
    b.put_u8(b'\n');
    b.put_slice(value);
    b.freeze()
}

fn decode(raw: &Bytes, revision: Revision) -> Option<Leader> {
    let nl = raw.iter().position(|c| *c == b'\n')?;
    let term = std::str::from_utf8(&raw[..nl]).ok()?.parse().ok()?;
    Some(Leader {
        value: raw.slice(nl + 1..),
        term,
        revision,
    })
}

impl Election {
    /// The election `name` on `backend`. The lock `name` and the KV key
    /// `<name>/leader` belong to it. Default TTL 15 s, unbounded wait.
    pub fn new(backend: Arc<dyn Backend>, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        validate::lock_name(&name)?;
        let key = format!("{name}/leader");
        validate::key(&key)?;
        Ok(Election {
            backend,
            name,
            key,
            ttl: Duration::from_secs(15),
            wait: None,
        })
    }

    /// Sets the leader's lease TTL: a dead leader is replaced after about
    /// this long. The lease is renewed automatically while leading.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Bounds how long [`campaign`](Self::campaign) waits
    /// ([`Error::Timeout`] after that).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The KV key holding the leader's record (`<term>\n<value>`).
    pub fn leader_key(&self) -> &str {
        &self.key
    }

    /// Waits until this candidate leads (in arrival order where the
    /// backend's locks are FIFO), publishes `value` with its term and
    /// returns the leadership. Dropping the future while waiting leaves
    /// nothing behind.
    pub async fn campaign(&self, value: impl Into<Bytes>) -> Result<Leadership> {
        let value = value.into();
        validate::ttl(self.ttl)?;
        let record = encode(0, &value);
        validate::value(&self.key, &record)?;
        let guard = self
            .backend
            .lock(
                &self.name,
                LockOptions {
                    ttl: self.ttl,
                    wait: self.wait,
                },
            )
            .await?;
        let term = guard.fencing_token();
        let record = encode(term, &value);
        let key_ttl = self.backend.capabilities().native_ttl.then_some(self.ttl);
        // Cancelled while publishing, the guard is dropped (the lock
        // released) and the record removed if it is still ours.
        publish_owned_record(
            &self.backend,
            &guard,
            &self.name,
            &self.key,
            record.clone(),
            key_ttl,
        )
        .await?
        .disarm();
        let record = Arc::new(AsyncMutex::new(record));
        let keepalive = key_ttl.map(|ttl| {
            let (backend, key, record, entry) = (
                self.backend.clone(),
                self.key.clone(),
                record.clone(),
                guard.entry().clone(),
            );
            crate::util::spawn_keepalive(ttl, latchkey_core::LostTrigger::new(), move || {
                let (backend, key, record, entry) =
                    (backend.clone(), key.clone(), record.clone(), entry.clone());
                Box::pin(async move {
                    let rec = record.lock().await;
                    let out = backend
                        .txn(
                            TxnRequest::new()
                                .when([Compare::Held(entry)])
                                .then([Op::put_with_ttl(key, rec.clone(), ttl)]),
                        )
                        .await?;
                    Ok(out.succeeded)
                })
            })
        });
        Ok(Leadership {
            guard: Some(guard),
            backend: self.backend.clone(),
            name: self.name.clone(),
            key: self.key.clone(),
            term,
            record,
            key_ttl,
            keepalive,
        })
    }

    /// The current leader, read once (`None` when nobody leads).
    pub async fn leader(&self) -> Result<Option<Leader>> {
        Ok(self
            .backend
            .get(&self.key)
            .await?
            .and_then(|kv| decode(&kv.value, kv.revision)))
    }

    /// The current leader (first item), then one item per change of leader
    /// or proclaimed value, in order, without polling: `None` while nobody
    /// leads. Terms never go back. On backends whose watch coalesces
    /// (`!watch_every_revision`) a leader that came and went between two
    /// wake-ups may be skipped; what is shown is always the state the
    /// store had. A watch error is retried once (re-reading the record);
    /// if that fails too, the error is the stream's last item.
    pub async fn observe(&self) -> Result<BoxStream<'static, Result<Option<Leader>>>> {
        let (watch, first) = open_observer(&self.backend, &self.key).await?;
        let st = ObsState {
            backend: self.backend.clone(),
            key: self.key.clone(),
            watch,
            last_rev: first.as_ref().map_or(0, |l| l.revision),
            first: Some(first),
            last: None,
            done: false,
        };
        Ok(futures::stream::unfold(st, next_observation).boxed())
    }
}

/// Opens the watch first, then reads, so no change between the two is missed.
async fn open_observer(
    backend: &Arc<dyn Backend>,
    key: &str,
) -> Result<(WatchStream, Option<Leader>)> {
    let watch = backend.watch(key, None).await?;
    let first = backend
        .get(key)
        .await?
        .and_then(|kv| decode(&kv.value, kv.revision));
    Ok((watch, first))
}

struct ObsState {
    backend: Arc<dyn Backend>,
    key: String,
    watch: WatchStream,
    first: Option<Option<Leader>>,
    /// The last (term, value) emitted; `Some(None)` = "no leader" emitted.
    last: Option<Option<(u64, Bytes)>>,
    last_rev: Revision,
    done: bool,
}

impl ObsState {
    /// Whether `cur` is news: not the same leader and value as the last
    /// item, and not an older term.
    fn accept(&mut self, cur: &Option<Leader>) -> bool {
        let now = cur.as_ref().map(|l| (l.term, l.value.clone()));
        if let Some(last) = &self.last {
            if *last == now {
                return false;
            }
            if let (Some((old_term, _)), Some((new_term, _))) = (last, &now) {
                if new_term < old_term {
                    return false;
                }
            }
        }
        self.last = Some(now);
        true
    }
}

async fn next_observation(mut st: ObsState) -> Option<(Result<Option<Leader>>, ObsState)> {
    if st.done {
        return None;
    }
    if let Some(first) = st.first.take() {
        st.accept(&first);
        return Some((Ok(first), st));
    }
    let mut retried = false;
    loop {
        match st.watch.next().await {
            Some(Ok(ev)) => {
                if ev.key != st.key || ev.revision <= st.last_rev {
                    continue;
                }
                st.last_rev = ev.revision;
                let cur = match ev.kind {
                    EventKind::Put => match decode(&ev.value, ev.revision) {
                        Some(l) => Some(l),
                        None => {
                            tracing::warn!(key = %st.key, "ignoring a malformed leader record");
                            continue;
                        }
                    },
                    EventKind::Delete => None,
                };
                if st.accept(&cur) {
                    return Some((Ok(cur), st));
                }
            }
            other => {
                let err = match other {
                    Some(Err(e)) => e,
                    _ => Error::unavailable(st.backend.name(), "the watch ended"),
                };
                if retried {
                    st.done = true;
                    return Some((Err(err), st));
                }
                retried = true;
                match open_observer(&st.backend, &st.key).await {
                    Ok((watch, cur)) => {
                        st.watch = watch;
                        if let Some(l) = &cur {
                            st.last_rev = st.last_rev.max(l.revision);
                        }
                        if st.accept(&cur) {
                            return Some((Ok(cur), st));
                        }
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
            }
        }
    }
}

/// Leading an election. The lock behind it is renewed automatically;
/// dropping the leadership resigns in the background.
pub struct Leadership {
    guard: Option<LockGuard>,
    backend: Arc<dyn Backend>,
    name: String,
    key: String,
    term: u64,
    record: Arc<AsyncMutex<Bytes>>,
    key_ttl: Option<Duration>,
    keepalive: Option<JoinHandle<()>>,
}

impl Leadership {
    fn guard(&self) -> &LockGuard {
        // Only `resign` (which consumes self) and Drop take the guard.
        self.guard
            .as_ref()
            .expect("a leadership always has its guard")
    }

    /// The term: this leadership's fencing token, strictly greater than
    /// every earlier leader's.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// The same as [`term`](Self::term).
    pub fn fencing_token(&self) -> u64 {
        self.term
    }

    /// The compare for fenced writes: true only while this leadership
    /// holds. `TxnRequest::new().when([leadership.fence()]).then(...)`
    /// commits only if this is still the leader, on every backend.
    pub fn fence(&self) -> Compare {
        Compare::held(self.guard())
    }

    /// The lock guard behind the leadership.
    pub fn lock_guard(&self) -> &LockGuard {
        self.guard()
    }

    /// Completes when leadership can no longer be guaranteed (lease
    /// lost) or after resigning. A leader must stop acting as one then.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.guard().lost()
    }

    /// True once [`lost`](Self::lost) would complete at once.
    pub fn is_lost(&self) -> bool {
        self.guard().is_lost()
    }

    /// Publishes a new value under the same term (a fenced write).
    /// [`Error::LockLost`] if leadership was lost.
    pub async fn proclaim(&self, value: impl Into<Bytes>) -> Result<()> {
        let record = encode(self.term, &value.into());
        validate::value(&self.key, &record)?;
        let mut cur = self.record.lock().await;
        let out = self
            .backend
            .txn(txn_fenced_put(
                self.guard(),
                &self.key,
                record.clone(),
                self.key_ttl,
            ))
            .await?;
        if !out.succeeded {
            return Err(lock_lost(&self.name));
        }
        *cur = record;
        Ok(())
    }

    /// Steps down: removes the record (fenced) and releases the lock, so
    /// the next candidate in line takes over at once.
    pub async fn resign(mut self) -> Result<()> {
        let guard = self
            .guard
            .take()
            .expect("a leadership always has its guard");
        let _rec = self.record.lock().await;
        if let Some(k) = self.keepalive.take() {
            k.abort();
        }
        let deleted = self.backend.txn(txn_fenced_delete(&guard, &self.key)).await;
        let released = guard.release().await;
        deleted?;
        released
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let keepalive = self.keepalive.take();
        let (backend, key, record) = (self.backend.clone(), self.key.clone(), self.record.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let rec = record.lock().await;
                    if let Some(k) = keepalive {
                        k.abort();
                    }
                    delete_if_value(backend, key, rec.clone()).await;
                    let _ = guard.release().await;
                });
            }
            Err(_) => {
                if let Some(k) = keepalive {
                    k.abort();
                }
                drop(guard);
            }
        }
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("election", &self.name)
            .field("term", &self.term)
            .finish()
    }
}
