//! # latchkey-recipes
//!
//! Coordination recipes built on latchkey's three traits only —
//! [`KvStore`](latchkey_core::KvStore), [`Txn`](latchkey_core::Txn),
//! [`DistributedLock`](latchkey_core::DistributedLock) and watch — with no
//! backend-specific code, so they run on every backend, ours or a third
//! party's, and are proved by the shared conformance suite (`recipes::*`).
//!
//! | recipe | what it gives |
//! |---|---|
//! | [`Election`] | one leader at a time; the term is a fencing token; `observe()` follows the leader without polling |
//! | [`Semaphore`] | at most N permit holders, each permit a lease with a fencing token |
//! | [`RwLock`] | shared readers or one writer, writer preference, fenced writes |
//! | [`Mirror`] | a local read-only copy of a prefix, resynchronised atomically |
//!
//! Each gives the guarantees of a lock: a fencing token, a `lost()`
//! signal, renewal while held, release on drop, nothing left behind when a
//! waiter is cancelled, and waiting on a watch or a lock queue instead of
//! polling. Keys and lock names a recipe uses are derived from the name
//! you give it and documented per recipe; they are ordinary keys of the
//! namespace, visible to `list`.
//!
//! ```
//! use latchkey_recipes::{Election, Semaphore};
//! use latchkey_core::{Backend, TxnRequest, Op};
//! use std::sync::Arc;
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let backend: Arc<dyn Backend> = latchkey_mem::MemStore::new().handle("app")?;
//! let election = Election::new(backend.clone(), "scheduler")?;
//! let leader = election.campaign("node-1").await?;
//! // Fenced: commits only while this is still the leader.
//! let out = backend.txn(TxnRequest::new().when([leader.fence()])
//!     .then([Op::put("jobs/last-run", leader.term().to_string())])).await?;
//! assert!(out.succeeded);
//! leader.resign().await?;
//!
//! let permit = Semaphore::new(backend.clone()).acquire("uploads", 4).await?;
//! permit.release().await?;
//! # Ok::<(), latchkey_core::Error>(())
//! # }).unwrap();
//! ```

mod election;
mod mirror;
mod rwlock;
mod semaphore;
mod util;

pub use election::{Election, Leader, Leadership};
pub use mirror::{Mirror, Snapshot};
pub use rwlock::{ReadGuard, RwLock, WriteGuard};
pub use semaphore::{Permit, Semaphore, MAX_PERMITS};
