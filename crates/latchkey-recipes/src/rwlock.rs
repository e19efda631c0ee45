//! A distributed read-write lock with writer preference and fenced writes.
//!
//! Layout for a lock named `n` (lock names and KV keys are separate spaces):
//!
//! | what | where |
//! |---|---|
//! | writers' mutex | lock `n/write` (FIFO among writers where locks are) |
//! | the writer's claim | KV key `n/writer` = the writer's lock entry |
//! | each reader | lock `n/reader/<id>` (its lease) + KV key `n/readers/<id>` = that entry |
//!
//! A **reader** takes its own (uncontended) lock, then registers with one
//! transaction `when absent(n/writer) then put(n/readers/<id>)`. If a
//! writer's claim is there it waits on a watch of `n/writer` and retries.
//! A **writer** takes the mutex, writes its claim (fenced with the mutex),
//! and from then on no new reader gets in (**writer preference**: a steady
//! stream of readers cannot starve it); it then waits, on a watch of
//! `n/readers/`, until every registered reader is gone. Readers and
//! writers are leases: a reader or writer that dies stops renewing its
//! lock, and whoever waits on it checks `held(entry)` and removes the dead
//! registration. Because a dead lease produces no watch event on every
//! backend, a waiter re-checks once per TTL (plus the backend's TTL
//! granularity) besides waking on every change: a bounded re-check, not a
//! polling loop.
//!
//! Every guard has `lost()`: a holder must stop when it fires (a reader
//! paused past its TTL may be overtaken by a writer). The write guard's
//! writes should be fenced with [`WriteGuard::fence`].

use crate::util::{
    lock_lost, publish_owned_record, txn_delete_if_value, txn_fenced_delete, txn_undoable,
    unique_id,
};
use bytes::Bytes;
use futures::StreamExt;
use latchkey_core::{
    validate, with_wait, Backend, Compare, LockEntry, LockGuard, LockOptions, Op, Result,
    TxnRequest, WatchStream,
};
use std::sync::Arc;
use std::time::Duration;

/// A named read-write lock on one backend. Cheap to clone.
#[derive(Clone)]
pub struct RwLock {
    backend: Arc<dyn Backend>,
    name: String,
    ttl: Duration,
    wait: Option<Duration>,
}

fn encode_entry(e: &LockEntry) -> Bytes {
    Bytes::from(format!("{}\n{}\n{}", e.token, e.id, e.name))
}

fn decode_entry(b: &[u8]) -> Option<LockEntry> {
    let s = std::str::from_utf8(b).ok()?;
    let mut it = s.splitn(3, '\n');
    let token = it.next()?.parse().ok()?;
    let id = it.next()?.to_string();
    let name = it.next()?.to_string();
    Some(LockEntry { name, token, id })
}

impl RwLock {
    /// The read-write lock `name` on `backend`; default TTL 15 s,
    /// unbounded wait.
    pub fn new(backend: Arc<dyn Backend>, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        validate::lock_name(&name)?;
        // The longest derived name must be valid too.
        validate::key(&format!("{name}/reader/{}", unique_id()))?;
        Ok(RwLock {
            backend,
            name,
            ttl: Duration::from_secs(15),
            wait: None,
        })
    }

    /// Sets the lease TTL of readers and writers.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Bounds how long `read`/`write` wait ([`latchkey_core::Error::Timeout`]).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    fn writer_key(&self) -> String {
        format!("{}/writer", self.name)
    }
    fn readers_prefix(&self) -> String {
        format!("{}/readers/", self.name)
    }
    fn recheck(&self) -> Duration {
        self.ttl + self.backend.capabilities().ttl_granularity
    }
    fn opts(&self) -> LockOptions {
        LockOptions {
            ttl: self.ttl,
            wait: None,
        }
    }

    /// Removes the registration at `key` if the lease recorded in it is
    /// no longer held. Returns true if that lease is still alive.
    async fn alive_or_remove(&self, key: &str, value: &Bytes) -> Result<bool> {
        let Some(entry) = decode_entry(value) else {
            // Not ours to judge: treat as alive (never delete foreign data).
            return Ok(true);
        };
        let out = self
            .backend
            .txn(
                TxnRequest::new()
                    .when([Compare::Held(entry)])
                    .then([Op::get(key)]),
            )
            .await?;
        if out.succeeded {
            return Ok(true);
        }
        // Once not held, a lease is never held again: safe to remove.
        self.backend
            .txn(txn_delete_if_value(key, value.clone()))
            .await?;
        Ok(false)
    }

    /// Runs `acquire` (once the TTL is checked) within the configured wait;
    /// a timeout names the `mode` ("read", "write") and the lock.
    async fn bounded<G>(
        &self,
        mode: &str,
        acquire: impl std::future::Future<Output = Result<G>>,
    ) -> Result<G> {
        validate::ttl(self.ttl)?;
        with_wait(
            self.wait,
            || format!("waiting to {mode}-lock {:?}", self.name),
            acquire,
        )
        .await
    }

    /// Shared access: waits while a writer holds or claims the lock.
    /// Dropping the future leaves nothing behind.
    pub async fn read(&self) -> Result<ReadGuard> {
        self.bounded("read", self.read_inner()).await
    }

    async fn read_inner(&self) -> Result<ReadGuard> {
        let id = unique_id();
        let guard = self
            .backend
            .lock(&format!("{}/reader/{id}", self.name), self.opts())
            .await?;
        let key = format!("{}{id}", self.readers_prefix());
        let value = encode_entry(guard.entry());
        let writer_key = self.writer_key();
        loop {
            // Watch first, so a release between the txn and the wait is seen.
            let mut watch = self.backend.watch(&writer_key, None).await?;
            let (out, cleanup) = txn_undoable(
                &self.backend,
                TxnRequest::new()
                    .when([Compare::absent(&writer_key), Compare::held(&guard)])
                    .then([Op::put(&key, value.clone())])
                    .otherwise([Op::get(&writer_key)]),
                &key,
                value.clone(),
            )
            .await?;
            if out.succeeded {
                cleanup.disarm();
                let unregister = txn_delete_if_value(&key, value);
                return Ok(ReadGuard {
                    reg: Registration::new(guard, self.backend.clone(), key, unregister),
                });
            }
            cleanup.disarm();
            if guard.is_lost() {
                return Err(lock_lost(&self.name));
            }
            // A writer claims the lock: if its lease is dead, clear it;
            // else wait for a change of the claim (or the re-check bound).
            // No claim means our own lease is gone: `lost()` fires soon.
            match out.results.first() {
                Some(latchkey_core::OpResult::Get(Some(kv))) => {
                    if !self.alive_or_remove(&writer_key, &kv.value).await? {
                        continue;
                    }
                }
                _ => {
                    let _ = tokio::time::timeout(self.recheck(), guard.lost()).await;
                    return Err(lock_lost(&self.name));
                }
            }
            wait_change(&mut watch, &writer_key, self.recheck()).await?;
        }
    }

    /// Exclusive access: waits for other writers (FIFO where locks are),
    /// then blocks new readers and waits until the current ones are gone.
    /// Dropping the future leaves nothing behind.
    pub async fn write(&self) -> Result<WriteGuard> {
        self.bounded("write", self.write_inner()).await
    }

    async fn write_inner(&self) -> Result<WriteGuard> {
        let guard = self
            .backend
            .lock(&format!("{}/write", self.name), self.opts())
            .await?;
        let writer_key = self.writer_key();
        // Dropped before the readers are gone: the claim is removed again.
        let cleanup = publish_owned_record(
            &self.backend,
            &guard,
            &self.name,
            &writer_key,
            encode_entry(guard.entry()),
            None,
        )
        .await?;
        let prefix = self.readers_prefix();
        loop {
            let mut watch = self.backend.watch(&prefix, None).await?;
            let readers = self.backend.list(&prefix, Default::default()).await?;
            let mut live = 0;
            for r in &readers {
                if self.alive_or_remove(&r.key, &r.value).await? {
                    live += 1;
                }
            }
            if live == 0 {
                break;
            }
            tokio::select! {
                r = wait_change(&mut watch, &prefix, self.recheck()) => r?,
                _ = guard.lost() => {
                    return Err(lock_lost(&self.name));
                }
            }
        }
        cleanup.disarm();
        let unregister = txn_fenced_delete(&guard, &writer_key);
        Ok(WriteGuard {
            reg: Registration::new(guard, self.backend.clone(), writer_key, unregister),
        })
    }
}

/// Waits for one event on keys starting with `prefix`, or `bound`.
async fn wait_change(watch: &mut WatchStream, prefix: &str, bound: Duration) -> Result<()> {
    let ev = tokio::time::timeout(bound, async {
        loop {
            match watch.next().await {
                Some(Ok(ev)) if ev.key.starts_with(prefix) => return Ok(()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e),
                // The watch ended: re-read and re-open.
                None => return Ok(()),
            }
        }
    })
    .await;
    match ev {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

/// What a read or write guard holds: its lock, and the KV record that
/// registers it (a reader's entry, the writer's claim) with the txn that
/// removes that record. Release and drop both remove the record, then
/// release the lock.
struct Registration {
    guard: Option<LockGuard>,
    backend: Arc<dyn Backend>,
    key: String,
    unregister: TxnRequest,
}

impl Registration {
    fn new(
        guard: LockGuard,
        backend: Arc<dyn Backend>,
        key: String,
        unregister: TxnRequest,
    ) -> Self {
        Registration {
            guard: Some(guard),
            backend,
            key,
            unregister,
        }
    }

    fn guard(&self) -> &LockGuard {
        // Only Drop takes it.
        self.guard
            .as_ref()
            .expect("a read or write guard has its lock until dropped")
    }

    /// Removes the record, then releases the lock (idempotent); the
    /// removal's error wins. Once the lock is lost the record is left to
    /// whoever waits on it, who clears a dead registration.
    async fn release(&self) -> Result<()> {
        let g = self.guard();
        let unregistered = if g.is_lost() {
            Ok(())
        } else {
            self.backend.txn(self.unregister.clone()).await.map(|_| ())
        };
        let released = g.release().await;
        unregistered?;
        released
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        if guard.is_lost() {
            return;
        }
        let (backend, unregister) = (self.backend.clone(), std::mem::take(&mut self.unregister));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = backend.txn(unregister).await;
                let _ = guard.release().await;
            });
        }
    }
}

/// Shared access. Released by [`release`](Self::release) or on drop.
pub struct ReadGuard {
    reg: Registration,
}

impl ReadGuard {
    /// Completes when shared access can no longer be guaranteed (the
    /// reader's lease was lost), or after release.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.reg.guard().lost()
    }
    /// True once [`lost`](Self::lost) would complete at once.
    pub fn is_lost(&self) -> bool {
        self.reg.guard().is_lost()
    }
    /// Stops renewing without releasing, as a crashed reader would. For
    /// tests and demos: a writer gets in after the TTL.
    pub async fn abandon(&self) {
        self.reg.guard().abandon().await
    }
    /// Gives up shared access (idempotent).
    pub async fn release(&self) -> Result<()> {
        self.reg.release().await
    }
}

impl std::fmt::Debug for ReadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGuard")
            .field("key", &self.reg.key)
            .finish()
    }
}

/// Exclusive access. Released by [`release`](Self::release) or on drop.
pub struct WriteGuard {
    reg: Registration,
}

impl WriteGuard {
    fn g(&self) -> &LockGuard {
        self.reg.guard()
    }
    /// The fencing token: strictly increasing across writers.
    pub fn fencing_token(&self) -> u64 {
        self.g().fencing_token()
    }
    /// The compare for fenced writes: true only while this writer holds.
    pub fn fence(&self) -> Compare {
        Compare::held(self.g())
    }
    /// The writers' mutex guard behind this write guard.
    pub fn lock_guard(&self) -> &LockGuard {
        self.g()
    }
    /// Completes when exclusive access can no longer be guaranteed, or
    /// after release.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.g().lost()
    }
    /// True once [`lost`](Self::lost) would complete at once.
    pub fn is_lost(&self) -> bool {
        self.g().is_lost()
    }
    /// Stops renewing without releasing, as a crashed writer would.
    pub async fn abandon(&self) {
        self.g().abandon().await
    }
    /// Gives up exclusive access (idempotent): removes the claim, then
    /// releases the mutex.
    pub async fn release(&self) -> Result<()> {
        self.reg.release().await
    }
}

impl std::fmt::Debug for WriteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteGuard")
            .field("key", &self.reg.key)
            .finish()
    }
}
