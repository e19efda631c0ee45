//! # latchkey
//!
//! One API for distributed coordination — [`DistributedLock`], [`KvStore`]
//! and [`Txn`] — over Redis, etcd, Consul and ZooKeeper, plus an embedded
//! in-memory backend. Pick backends with Cargo features, pick one at run time
//! with a URL:
//!
//! ```
//! use latchkey::prelude::*;
//!
//! # #[tokio::main] async fn main() -> latchkey::Result<()> {
//! let coord = latchkey::connect("mem://").await?;
//! let guard = coord.lock("jobs/nightly", LockOptions::ttl(Duration::from_secs(10))).await?;
//! // A fenced write: it commits only while this guard still holds the lock.
//! let out = coord
//!     .txn(TxnRequest::new()
//!         .when([Compare::held(&guard)])
//!         .then([Op::put("jobs/nightly/state", "running")]))
//!     .await?;
//! assert!(out.succeeded);
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! | item | what it is |
//! |---|---|
//! | [`connect`], [`from_env`], [`connect_requiring`] | open a [`Coordinator`] from a URL |
//! | [`Coordinator`] | a handle implementing all three traits, whatever the backend |
//! | [`register`] | add a third-party backend's URL scheme |
//! | [`prelude`] | the traits and types most code needs |
//! | [`core`] | everything of `latchkey-core` |
//! | [`mem`] | the embedded backend (always compiled in) |
//! | [`recipes`] | leader election, semaphore, read-write lock, replicated map — on the traits, so on every backend |
//!
//! | URL | Cargo feature |
//! |---|---|
//! | `mem://[name]` | always |
//! | `redis://`, `rediss://`, `redis+cluster://`, `rediss+cluster://` | `redis` |
//! | `etcd://`, `etcds://` | `etcd` (needs `protoc` to build) |
//! | `consul://`, `consuls://` | `consul` |
//! | `zookeeper://` | `zookeeper` |

mod coordinator;
mod registry;

pub use coordinator::Coordinator;
pub use latchkey_core as core;
pub use latchkey_core::{
    Backend, BackendUrl, Capabilities, Capability, CmpOp, Compare, DeleteOptions, DistributedLock,
    Error, EventKind, KeyValue, KvStore, ListOptions, LockGuard, LockOptions, Op, OpResult,
    PutOptions, Result, Revision, Txn, TxnOutcome, TxnRequest, WatchEvent, WatchStream,
};
pub use latchkey_mem as mem;
pub use latchkey_recipes as recipes;
pub use registry::{
    connect, connect_requiring, connect_url, from_env, register, schemes, DEFAULT_URL, URL_ENV,
};

#[cfg(feature = "consul")]
pub use latchkey_consul as consul;
#[cfg(feature = "etcd")]
pub use latchkey_etcd as etcd;
#[cfg(feature = "redis")]
pub use latchkey_redis as redis;
#[cfg(feature = "zookeeper")]
pub use latchkey_zookeeper as zookeeper;

/// The traits and types most code needs: `use latchkey::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Backend, Bytes, CmpOp, Compare, Coordinator, DeleteOptions, DistributedLock, Error,
        EventKind, KeyValue, KvStore, ListOptions, LockGuard, LockOptions, Op, OpResult,
        PutOptions, Revision, Txn, TxnOutcome, TxnRequest, WatchEvent,
    };
    pub use std::time::Duration;
}

pub use bytes::Bytes;
