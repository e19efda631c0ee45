//! The `recipes::*` cases tested against deliberately broken recipes:
//! the recipes crate is used as is, over a mem wrapper that breaks exactly
//! what one recipe relies on, giving a semaphore that admits N+1 holders,
//! an election with two leaders at once, and a mirror that drops deletes.
//! Each bug must make its cases fail, while the same cases pass on the
//! pass-through wrapper (so the failure is the bug's, not the wrapper's).

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
mod bug_check;

use latchkey_conformance::Harness;
use latchkey_core::{
    Backend, Capabilities, DeleteOptions, DistributedLock, EventKind, KeyValue, KvStore,
    ListOptions, LockGuard, LockOptions, PutOptions, Result, Revision, Txn, TxnOutcome, TxnRequest,
    WatchStream,
};
use latchkey_mem::{MemBackend, MemStore};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The one thing a [`Bent`] backend breaks for the recipes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecipeBug {
    /// None: a pass-through wrapper (control).
    None,
    /// Permit 0 of every semaphore (`<name>/slot/0`) never excludes: the
    /// semaphore admits N+1 holders.
    SemaphoreAdmitsExtra,
    /// Locks without a `/` in their name (the election locks of the cases)
    /// never exclude: two leaders at once.
    TwoLeaders,
    /// Watches drop every delete: a mirror keeps deleted keys.
    MirrorDropsDeletes,
}

static PRIVATE: AtomicU64 = AtomicU64::new(0);

struct Bent {
    inner: Arc<MemBackend>,
    bug: RecipeBug,
}

impl Bent {
    fn lock_name(&self, name: &str) -> String {
        let shared = match self.bug {
            RecipeBug::SemaphoreAdmitsExtra => name.ends_with("/slot/0"),
            RecipeBug::TwoLeaders => !name.contains('/'),
            _ => false,
        };
        if shared {
            format!("{name}#{}", PRIVATE.fetch_add(1, Ordering::SeqCst))
        } else {
            name.to_string()
        }
    }
}

#[async_trait]
impl KvStore for Bent {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: Bytes, opts: PutOptions) -> Result<Revision> {
        self.inner.put(key, value, opts).await
    }
    async fn delete(&self, key: &str, opts: DeleteOptions) -> Result<bool> {
        self.inner.delete(key, opts).await
    }
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<Vec<KeyValue>> {
        self.inner.list(prefix, opts).await
    }
    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream> {
        let s = self.inner.watch(prefix, from).await?;
        if self.bug == RecipeBug::MirrorDropsDeletes {
            return Ok(s
                .filter(|ev| {
                    futures::future::ready(!matches!(ev, Ok(e) if e.kind == EventKind::Delete))
                })
                .boxed());
        }
        Ok(s)
    }
}

#[async_trait]
impl Txn for Bent {
    async fn txn(&self, txn: TxnRequest) -> Result<TxnOutcome> {
        self.inner.txn(txn).await
    }
}

#[async_trait]
impl DistributedLock for Bent {
    async fn lock(&self, name: &str, opts: LockOptions) -> Result<LockGuard> {
        self.inner.lock(&self.lock_name(name), opts).await
    }
    async fn try_lock(&self, name: &str, opts: LockOptions) -> Result<Option<LockGuard>> {
        self.inner.try_lock(&self.lock_name(name), opts).await
    }
}

impl Backend for Bent {
    fn name(&self) -> &'static str {
        "bent-mem"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

fn harness(bug: RecipeBug) -> Arc<dyn Harness> {
    let store = MemStore::new();
    Arc::new(move |ns: String| {
        let store = store.clone();
        async move {
            Ok(Arc::new(Bent {
                inner: store.handle(&ns)?,
                bug,
            }) as Arc<dyn Backend>)
        }
    })
}

/// Each named case passes on the pass-through wrapper and fails with `bug`.
async fn caught(bug: RecipeBug, names: &[&str]) {
    bug_check::assert_caught(harness, RecipeBug::None, bug, names).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_admitting_n_plus_1_is_caught() {
    caught(
        RecipeBug::SemaphoreAdmitsExtra,
        &[
            "recipes::semaphore_count_checked",
            "recipes::semaphore_at_most_n_under_churn",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_leaders_at_once_is_caught() {
    caught(
        RecipeBug::TwoLeaders,
        &[
            "recipes::election_one_leader_among_8",
            "recipes::election_cancel_and_drop_leave_nothing",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_dropping_a_delete_is_caught() {
    caught(
        RecipeBug::MirrorDropsDeletes,
        &[
            "recipes::mirror_follows_own_writes",
            "recipes::mirror_equals_store_after_random_workload",
        ],
    )
    .await;
}
