//! # latchkey-core
//!
//! The contract every latchkey backend implements, and the machinery that is
//! written once so that backends only translate:
//!
//! | module | what it holds |
//! |---|---|
//! | [`error`] | the one [`Error`] enum and [`Result`] |
//! | [`types`] | [`KeyValue`], [`Revision`], put/delete/list options, [`WatchEvent`] |
//! | [`txn`] | [`TxnRequest`], [`Compare`], [`Op`], [`TxnOutcome`] |
//! | [`traits`] | [`KvStore`], [`Txn`], [`DistributedLock`], [`Backend`] |
//! | [`capabilities`] | [`Capabilities`]: what a backend can and cannot promise |
//! | [`validate`] | key, value, prefix, TTL and namespace checks, identical everywhere |
//! | [`url`] | [`BackendUrl`]: parsing of connection URLs, password redaction |
//! | [`lock`] | [`LockGuard`], [`LostSignal`], the renewal loop, wait/cancel helpers |
//! | [`registry`] | URL scheme → connector table, so third-party backends plug in |
//!
//! Adapter crates depend on this crate only (plus their client library).

pub mod capabilities;
pub mod error;
pub mod lock;
pub mod registry;
pub mod traits;
pub mod txn;
pub mod types;
pub mod url;
pub mod validate;

pub use async_trait::async_trait;
pub use bytes::Bytes;

pub use capabilities::{Capabilities, Capability};
pub use error::{Error, Result};
pub use lock::{
    guard::{GuardOps, LockEntry, LockGuard},
    lost::{LostSignal, LostTrigger},
    renew::{RenewOutcome, RenewalGroup, Renewer},
    wait::{with_wait, CancelOnDrop, InFlight},
};
pub use registry::{Connector, Registry};
pub use traits::{Backend, DistributedLock, KvStore, Txn, WatchStream};
pub use txn::{CmpOp, Compare, Op, OpResult, TxnOutcome, TxnRequest};
pub use types::{
    DeleteOptions, EventKind, KeyValue, ListOptions, LockOptions, PutOptions, Revision, WatchEvent,
};
pub use url::BackendUrl;
