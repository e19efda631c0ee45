//! [`Coordinator`]: one handle to whichever backend the URL chose.

use async_trait::async_trait;
use bytes::Bytes;
use latchkey_core::{
    Backend, Capabilities, DeleteOptions, DistributedLock, KeyValue, KvStore, ListOptions,
    LockGuard, LockOptions, PutOptions, Result, Revision, Txn, TxnOutcome, TxnRequest, WatchStream,
};
use std::fmt;
use std::sync::Arc;

/// A connected backend. Cheap to clone (clones share the connection). It
/// implements [`KvStore`], [`Txn`], [`DistributedLock`] and [`Backend`], so
/// code written against it runs unchanged on every backend.
#[derive(Clone)]
pub struct Coordinator {
    backend: Arc<dyn Backend>,
}

impl Coordinator {
    /// Wraps any backend, e.g. one built by hand or a third party's.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Coordinator { backend }
    }

    /// The backend behind this handle.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator")
            .field("backend", &self.backend.name())
            .finish()
    }
}

#[async_trait]
impl KvStore for Coordinator {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.backend.get(key).await
    }
    async fn put(&self, key: &str, value: Bytes, opts: PutOptions) -> Result<Revision> {
        self.backend.put(key, value, opts).await
    }
    async fn delete(&self, key: &str, opts: DeleteOptions) -> Result<bool> {
        self.backend.delete(key, opts).await
    }
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>> {
        self.backend.list(prefix, opts).await
    }
    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream> {
        self.backend.watch(prefix, from).await
    }
}

#[async_trait]
impl Txn for Coordinator {
    async fn txn(&self, txn: TxnRequest) -> Result<TxnOutcome> {
        self.backend.txn(txn).await
    }
}

#[async_trait]
impl DistributedLock for Coordinator {
    async fn lock(&self, name: &str, opts: LockOptions) -> Result<LockGuard> {
        self.backend.lock(name, opts).await
    }
    async fn try_lock(&self, name: &str, opts: LockOptions) -> Result<Option<LockGuard>> {
        self.backend.try_lock(name, opts).await
    }
}

impl Backend for Coordinator {
    fn name(&self) -> &'static str {
        self.backend.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.backend.capabilities()
    }
}
