//! Key, value and argument rules, checked here so they are identical on
//! every backend. Adapters call these before touching the network.

use crate::error::{shorten, Error, Result};
use crate::txn::{Compare, Op, TxnRequest};
use std::time::Duration;

/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value, in bytes (Consul's KV limit is the common bound).
pub const MAX_VALUE_BYTES: usize = 512 * 1024;
/// Longest namespace, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 128;

fn check_chars(s: &str) -> std::result::Result<(), String> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!("contains the control character {:?}", c));
    }
    Ok(())
}

/// A key: 1..=512 bytes of UTF-8, no NUL or other control character.
/// `/` is an ordinary character.
pub fn key(key: &str) -> Result<()> {
    let bad = |reason: String| Error::InvalidKey {
        key: shorten(key),
        reason,
    };
    if key.is_empty() {
        return Err(bad("a key may not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(bad(format!(
            "a key is at most {MAX_KEY_BYTES} bytes, this one has {}",
            key.len()
        )));
    }
    check_chars(key).map_err(bad)
}

/// A prefix for `list` or `watch`: like a key, but may be empty.
pub fn prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    key(prefix)
}

/// A lock name: the same rules as a key.
pub fn lock_name(name: &str) -> Result<()> {
    key(name)
}

/// A value: at most 512 KiB.
pub fn value(key: &str, value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::InvalidValue {
            key: shorten(key),
            reason: format!(
                "a value is at most {MAX_VALUE_BYTES} bytes, this one has {}",
                value.len()
            ),
        });
    }
    Ok(())
}

/// A TTL: more than zero. Backends raise it to their minimum themselves.
pub fn ttl(ttl: Duration) -> Result<()> {
    if ttl.is_zero() {
        return Err(Error::InvalidArgument(
            "a TTL must be longer than zero".into(),
        ));
    }
    if ttl > Duration::from_secs(365 * 24 * 3600) {
        return Err(Error::InvalidArgument(format!(
            "a TTL of {ttl:?} is longer than a year"
        )));
    }
    Ok(())
}

/// A namespace: up to 128 bytes, no control characters; may be empty.
pub fn namespace(ns: &str) -> Result<()> {
    if ns.len() > MAX_NAMESPACE_BYTES {
        return Err(Error::InvalidArgument(format!(
            "a namespace is at most {MAX_NAMESPACE_BYTES} bytes, {:?} has {}",
            shorten(ns),
            ns.len()
        )));
    }
    check_chars(ns).map_err(|r| Error::InvalidArgument(format!("namespace {:?} {r}", shorten(ns))))
}

/// A whole transaction: every key, value and TTL, and no branch longer than
/// `max_ops`. Checked before anything is sent.
pub fn txn(txn: &TxnRequest, max_ops: usize) -> Result<()> {
    for (branch, ops) in [("then", &txn.then), ("otherwise", &txn.otherwise)] {
        if ops.len() > max_ops {
            return Err(Error::InvalidArgument(format!(
                "the {branch} branch has {} ops; this backend allows at most {max_ops}",
                ops.len()
            )));
        }
        for op in ops.iter() {
            key(op.key())?;
            if let Op::Put {
                key: k,
                value: v,
                ttl: t,
            } = op
            {
                value(k, v)?;
                if let Some(t) = t {
                    ttl(*t)?;
                }
            }
        }
    }
    if txn.when.len() > max_ops {
        return Err(Error::InvalidArgument(format!(
            "the transaction has {} compares; this backend allows at most {max_ops}",
            txn.when.len()
        )));
    }
    for cmp in &txn.when {
        if let Some(k) = cmp.key() {
            key(k)?;
        }
        if let Compare::Value { key: k, value: v } = cmp {
            value(k, v)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(key("a").is_ok());
        assert!(key("/a/b/").is_ok());
        assert!(key("with space and ünïcode ✓").is_ok());
        assert!(key(&"x".repeat(512)).is_ok());
        assert!(matches!(key(""), Err(Error::InvalidKey { .. })));
        assert!(matches!(
            key(&"x".repeat(513)),
            Err(Error::InvalidKey { .. })
        ));
        assert!(matches!(key("a\0b"), Err(Error::InvalidKey { .. })));
        assert!(matches!(key("a\nb"), Err(Error::InvalidKey { .. })));
        assert!(prefix("").is_ok());
    }

    #[test]
    fn values_and_ttls() {
        assert!(value("k", &vec![0u8; MAX_VALUE_BYTES]).is_ok());
        assert!(matches!(
            value("k", &vec![0u8; MAX_VALUE_BYTES + 1]),
            Err(Error::InvalidValue { .. })
        ));
        assert!(matches!(
            ttl(Duration::ZERO),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn txn_limits() {
        let big = TxnRequest::new().then((0..65).map(|i| Op::put(format!("k{i}"), "v")));
        assert!(txn(&big, 64).is_err());
        assert!(txn(&big, 128).is_ok());
        let bad = TxnRequest::new().when([Compare::exists("")]);
        assert!(matches!(txn(&bad, 64), Err(Error::InvalidKey { .. })));
    }
}
