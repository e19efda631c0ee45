//! Multi-key transactions: compares, then one of two branches of ops, all
//! atomic and isolated on every backend.
//!
//! ```
//! use latchkey_core::{Compare, Op, TxnRequest, Bytes};
//! // Mark a session inactive only if it is still active.
//! let txn = TxnRequest::new()
//!     .when([Compare::value("session/42", "active")])
//!     .then([Op::put("session/42", "inactive")])
//!     .otherwise([Op::get("session/42")]);
//! assert_eq!(txn.then.len(), 1);
//! ```

use crate::lock::guard::{LockEntry, LockGuard};
use crate::types::{KeyValue, Revision};
use bytes::Bytes;
use std::time::Duration;

/// How a revision compare compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `<`
    Less,
    /// `>`
    Greater,
}

impl CmpOp {
    /// Applies the comparison `actual OP expected`.
    pub fn holds(self, actual: Revision, expected: Revision) -> bool {
        match self {
            CmpOp::Equal => actual == expected,
            CmpOp::NotEqual => actual != expected,
            CmpOp::Less => actual < expected,
            CmpOp::Greater => actual > expected,
        }
    }
}

/// A condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key's revision compared with `revision`. An absent key has
    /// revision 0 for this purpose (so `Less(r)` holds for absent keys).
    Revision {
        /// The key.
        key: String,
        /// The comparison.
        op: CmpOp,
        /// The revision to compare with.
        revision: Revision,
    },
    /// The key exists and its value equals `value`.
    Value {
        /// The key.
        key: String,
        /// The expected value.
        value: Bytes,
    },
    /// The key exists.
    Exists(String),
    /// The key does not exist.
    Absent(String),
    /// The lock entry is still held with this token (a fenced write).
    Held(LockEntry),
}

impl Compare {
    /// `revision(key) OP revision`.
    pub fn revision(key: impl Into<String>, op: CmpOp, revision: Revision) -> Self {
        Compare::Revision {
            key: key.into(),
            op,
            revision,
        }
    }
    /// `value(key) == value`.
    pub fn value(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Compare::Value {
            key: key.into(),
            value: value.into(),
        }
    }
    /// The key exists.
    pub fn exists(key: impl Into<String>) -> Self {
        Compare::Exists(key.into())
    }
    /// The key does not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Compare::Absent(key.into())
    }
    /// True only while `guard`'s lock entry still exists with its token.
    pub fn held(guard: &LockGuard) -> Self {
        Compare::Held(guard.entry().clone())
    }
    /// The user key this compare reads, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Compare::Revision { key, .. }
            | Compare::Value { key, .. }
            | Compare::Exists(key)
            | Compare::Absent(key) => Some(key),
            Compare::Held(_) => None,
        }
    }
}

/// An operation of a transaction branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write `value` to `key`, with an optional TTL.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Bytes,
        /// Optional expiry.
        ttl: Option<Duration>,
    },
    /// Delete `key` (no error if absent).
    Delete {
        /// The key.
        key: String,
    },
    /// Read `key`.
    Get {
        /// The key.
        key: String,
    },
}

impl Op {
    /// A put without TTL.
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            ttl: None,
        }
    }
    /// A put with a TTL.
    pub fn put_with_ttl(key: impl Into<String>, value: impl Into<Bytes>, ttl: Duration) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            ttl: Some(ttl),
        }
    }
    /// A delete.
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }
    /// A read.
    pub fn get(key: impl Into<String>) -> Self {
        Op::Get { key: key.into() }
    }
    /// The key of this op.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => key,
        }
    }
}

/// A transaction: if every compare of `when` holds, run `then`, else
/// `otherwise`. An empty `when` always holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnRequest {
    /// Conditions, all of which must hold.
    pub when: Vec<Compare>,
    /// Ops run when all conditions hold.
    pub then: Vec<Op>,
    /// Ops run otherwise.
    pub otherwise: Vec<Op>,
}

impl TxnRequest {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds conditions.
    pub fn when(mut self, cmps: impl IntoIterator<Item = Compare>) -> Self {
        self.when.extend(cmps);
        self
    }
    /// Adds ops to the success branch.
    pub fn then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.then.extend(ops);
        self
    }
    /// Adds ops to the failure branch.
    pub fn otherwise(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.otherwise.extend(ops);
        self
    }
}

/// The result of one op of the branch that ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// A put, with the revision it wrote.
    Put {
        /// Revision of the write.
        revision: Revision,
    },
    /// A delete: whether something was deleted.
    Delete {
        /// True if the key existed.
        deleted: bool,
    },
    /// A read.
    Get(Option<KeyValue>),
}

/// What a transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    /// True if `when` held and `then` ran; false if `otherwise` ran.
    pub succeeded: bool,
    /// One result per op of the branch that ran, in order.
    pub results: Vec<OpResult>,
    /// The store's revision after the transaction (the revision of its
    /// writes if it wrote anything).
    pub revision: Revision,
}
