//! [`Harness`]: how the suite opens handles to the backend under test, and
//! [`Instrumented`], a harness that also reports per-handle request counts.

use async_trait::async_trait;
use futures::future::BoxFuture;
use latchkey_core::{Backend, Result};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};

/// Opens handles to the backend under test.
///
/// Every call must return a **new, independent** handle (its own
/// connection, session or lease), as a separate client process would have:
/// lock and TTL cases open two or more and expect them to compete with each
/// other. All handles opened with the same `namespace` must see the same
/// data; handles of different namespaces must never see each other's.
///
/// Any `Fn(String) -> impl Future<Output = Result<Arc<dyn Backend>>>`
/// closure is a harness, so a backend plugs in with one call:
///
/// ```no_run
/// # use std::sync::Arc;
/// # use latchkey_core::{Backend, Result};
/// # async fn my_connect(_ns: &str) -> Result<Arc<dyn Backend>> { unimplemented!() }
/// let harness = |ns: String| async move { my_connect(&ns).await };
/// # let _ = latchkey_conformance::run("mine", harness);
/// ```
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// Opens a NEW independent handle (its own connection/session/lease) to
    /// the backend under test, in `namespace`.
    async fn open(&self, namespace: &str) -> Result<Arc<dyn Backend>>;

    /// True if [`op_count`](Harness::op_count) answers. Cases that measure
    /// requests (a lock waiter must not poll) are ignored otherwise, with
    /// that reason.
    fn counts_ops(&self) -> bool {
        false
    }

    /// How many requests `handle` (opened by this harness) has sent to the
    /// server so far, where the backend can tell.
    fn op_count(&self, handle: &Arc<dyn Backend>) -> Option<u64> {
        let _ = handle;
        None
    }

    /// True if [`revoke_lock`](Harness::revoke_lock) works. Cases that
    /// delete a lock entry behind its holder's back are ignored otherwise,
    /// with that reason.
    fn revokes_locks(&self) -> bool {
        false
    }

    /// Deletes lock `name`'s current entry behind its holder's back, as an
    /// operator (or a server-side session expiry) would, through `handle`'s
    /// backend. Returns whether it was held.
    async fn revoke_lock(&self, handle: &Arc<dyn Backend>, name: &str) -> Result<bool> {
        let _ = (handle, name);
        Err(latchkey_core::Error::InvalidArgument(
            "this harness cannot revoke locks".into(),
        ))
    }
}

#[async_trait]
impl<F, Fut> Harness for F
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Arc<dyn Backend>>> + Send,
{
    async fn open(&self, namespace: &str) -> Result<Arc<dyn Backend>> {
        (self)(namespace.to_string()).await
    }
}

type Opener<B> = Box<dyn Fn(String) -> BoxFuture<'static, Result<Arc<B>>> + Send + Sync>;

/// A harness over a concrete backend type `B` that can count each handle's
/// requests and revoke lock entries, enabling the cases that need them
/// (a lock waiter does not poll; `lost()` fires when the entry is deleted
/// behind the holder's back). With the mem backend:
///
/// ```no_run
/// use latchkey_conformance::harness::Instrumented;
/// use latchkey_mem::{MemBackend, MemStore};
///
/// fn main() -> std::process::ExitCode {
///     let store = MemStore::new();
///     let harness = Instrumented::new(move |ns: String| {
///         let store = store.clone();
///         async move { store.handle(&ns) }
///     })
///     .with_op_count(MemBackend::op_count)
///     .with_revoke_lock(MemBackend::revoke_lock);
///     latchkey_conformance::run("mem", harness)
/// }
/// ```
pub struct Instrumented<B> {
    open: Opener<B>,
    count: Option<fn(&B) -> u64>,
    revoke: Option<fn(&B, &str) -> Result<bool>>,
    handles: Mutex<HashMap<usize, Weak<B>>>,
}

impl<B: Backend + 'static> Instrumented<B> {
    /// A harness opening handles with `open`.
    pub fn new<F, Fut>(open: F) -> Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<B>>> + Send + 'static,
    {
        Instrumented {
            open: Box::new(move |ns| Box::pin(open(ns))),
            count: None,
            revoke: None,
            handles: Mutex::new(HashMap::new()),
        }
    }

    /// Reads a handle's request count with `count`.
    pub fn with_op_count(mut self, count: fn(&B) -> u64) -> Self {
        self.count = Some(count);
        self
    }

    /// Revokes a lock entry (a fault hook) with `revoke`.
    pub fn with_revoke_lock(mut self, revoke: fn(&B, &str) -> Result<bool>) -> Self {
        self.revoke = Some(revoke);
        self
    }

    fn handle(&self, handle: &Arc<dyn Backend>) -> Option<Arc<B>> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles.get(&Self::key(handle))?.upgrade()
    }

    fn key<T: ?Sized>(p: &Arc<T>) -> usize {
        Arc::as_ptr(p) as *const () as usize
    }
}

#[async_trait]
impl<B: Backend + 'static> Harness for Instrumented<B> {
    async fn open(&self, namespace: &str) -> Result<Arc<dyn Backend>> {
        let b = (self.open)(namespace.to_string()).await?;
        let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles.retain(|_, w| w.strong_count() > 0);
        handles.insert(Self::key(&b), Arc::downgrade(&b));
        Ok(b)
    }

    fn counts_ops(&self) -> bool {
        self.count.is_some()
    }

    fn op_count(&self, handle: &Arc<dyn Backend>) -> Option<u64> {
        let count = self.count?;
        let b = self.handle(handle)?;
        Some(count(&b))
    }

    fn revokes_locks(&self) -> bool {
        self.revoke.is_some()
    }

    async fn revoke_lock(&self, handle: &Arc<dyn Backend>, name: &str) -> Result<bool> {
        let unknown =
            || latchkey_core::Error::InvalidArgument("not a handle of this harness".into());
        let revoke = self.revoke.ok_or_else(|| {
            latchkey_core::Error::InvalidArgument("this harness cannot revoke locks".into())
        })?;
        let b = self.handle(handle).ok_or_else(unknown)?;
        revoke(&b, name)
    }
}
