//! How latchkey keys become znodes, and what a key's znode holds.
//!
//! # Key → znode name
//! Every key becomes **one** path segment under the namespace's data dir
//! (`<base>/kv/<escaped key>`), so a key may contain `/`, `.`, `..`,
//! spaces or any Unicode and still map to a legal, unique znode:
//!
//! - `%` and `/` are percent-encoded (`%25`, `%2F`);
//! - characters ZooKeeper refuses in paths (U+007F–U+009F, U+E000–U+F8FF,
//!   U+FFF0–U+FFFF; control characters never reach here, core rejects them)
//!   are percent-encoded byte by byte (UTF-8), and so is every character
//!   outside the BMP (the server validates UTF-16, where such a character is
//!   a surrogate pair, which it refuses);
//! - a key that is exactly `.` or `..` has its dots encoded (`%2E`), since
//!   ZooKeeper refuses those as segments.
//!
//! Decoding reverses this exactly ([`decode_key`] ∘ [`encode_key`] = id).
//! Since no key is ever split into segments, `list(prefix)` works for any
//! string prefix: it lists the data dir's children, decodes them, and keeps
//! those that start with the prefix, in key order. **Cost:** every `list`
//! and `watch` start reads the names of *all* keys of the namespace
//! (one `getChildren`), then the data of the matching ones.
//!
//! # A key's znode
//! The first byte says what the node is; the rest is the value:
//!
//! | first byte | meaning | then |
//! |---|---|---|
//! | `v` | a live key | the value |
//! | `t` | a key with a TTL | TTL in ms (u64, big-endian), the value |
//! | `x` | a tombstone: the key was deleted | nothing |
//!
//! Key znodes are never deleted: a delete writes a tombstone. A znode's
//! `dataVersion` restarts at 0 when it is recreated, so deleting znodes would
//! make version-pinned writes ABA-prone; with tombstones the version of a
//! key's znode only ever grows, and every conditional write pins it.
//!
//! A key with a TTL also has a child `t`, a ZooKeeper TTL node created in
//! the same `multi`. The server deletes that child once the TTL has passed
//! (at its next container/TTL sweep); a `t` key whose znode has no child is
//! expired, i.e. absent. So expiry is decided by the server alone, never by
//! comparing clocks.

use bytes::Bytes;
use std::fmt::Write as _;
use std::time::Duration;

/// Name of the TTL child of a key's znode.
pub(crate) const TTL_CHILD: &str = "t";

fn must_escape(c: char) -> bool {
    let u = u32::from(c);
    c == '%'
        || c == '/'
        || u <= 0x1f
        || (0x7f..=0x9f).contains(&u)
        || (0xd800..=0xf8ff).contains(&u)
        || (0xfff0..=0xffff).contains(&u)
        // Outside the BMP: the server checks UTF-16 code units, and a
        // surrogate pair falls in the refused U+D800–U+F8FF range.
        || u > 0xffff
}

fn push_escaped(out: &mut String, c: char) {
    let mut buf = [0u8; 4];
    for b in c.encode_utf8(&mut buf).bytes() {
        let _ = write!(out, "%{b:02X}");
    }
}

/// Encodes a key (or namespace, or lock name) into one legal znode name.
pub fn encode_key(key: &str) -> String {
    if key.is_empty() {
        // Never a key (core rejects empty keys); kept total so the result
        // is always a legal segment. Decodes to no key.
        return "%".to_string();
    }
    if key == "." || key == ".." {
        return "%2E".repeat(key.len());
    }
    let mut out = String::with_capacity(key.len() + 8);
    for c in key.chars() {
        if must_escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// Decodes a znode name made by [`encode_key`]. `None` for names that no
/// key encodes to (foreign nodes in the data dir are ignored).
pub fn decode_key(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = name.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let key = String::from_utf8(out).ok()?;
    // Only canonical encodings are keys: this rejects foreign names such as
    // "%61" that would otherwise alias the key "a".
    (encode_key(&key) == name).then_some(key)
}

/// What a key's znode holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NodeData {
    /// A live key, with the TTL it was written with.
    Live { value: Bytes, ttl: Option<Duration> },
    /// A deleted key.
    Tombstone,
}

/// The bytes of a live key's znode.
pub(crate) fn encode_live(value: &[u8], ttl: Option<Duration>) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 9);
    match ttl {
        None => out.push(b'v'),
        Some(t) => {
            out.push(b't');
            out.extend_from_slice(&(t.as_millis() as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(value);
    out
}

/// The bytes of a tombstone.
pub(crate) const TOMBSTONE: &[u8] = b"x";

/// Parses a key's znode data. Data that latchkey did not write is read as
/// a plain live value, so foreign writers' nodes are still visible.
pub(crate) fn decode_data(data: Vec<u8>) -> NodeData {
    match data.first() {
        Some(b'v') => NodeData::Live {
            value: Bytes::from(data).slice(1..),
            ttl: None,
        },
        Some(b't') if data.len() >= 9 => {
            let mut ms = [0u8; 8];
            ms.copy_from_slice(&data[1..9]);
            NodeData::Live {
                value: Bytes::from(data).slice(9..),
                ttl: Some(Duration::from_millis(u64::from_be_bytes(ms))),
            }
        }
        Some(b'x') if data.len() == 1 => NodeData::Tombstone,
        _ => NodeData::Live {
            value: Bytes::from(data),
            ttl: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for k in [
            "a",
            "/",
            "//",
            "/a/b/",
            ".",
            "..",
            "...",
            "a/./b/../c",
            "100%",
            "%2F",
            "with space",
            "ünïcödé ✓",
            "emoji🔒",
            "\u{e000}\u{f8ff}\u{fff0}\u{fffd}\u{ffff}",
            "\u{7f}\u{85}",
            "zookeeper",
        ] {
            let e = encode_key(k);
            assert!(!e.contains('/'), "{e}");
            assert!(e != "." && e != "..");
            assert_eq!(decode_key(&e).as_deref(), Some(k), "{k:?} -> {e:?}");
        }
        assert_eq!(decode_key("%61"), None);
        assert_eq!(decode_key("%2f"), None);
        assert_eq!(decode_key("%"), None);
        assert_eq!(encode_key(""), "%");
    }

    #[test]
    fn data_round_trips() {
        let d = decode_data(encode_live(b"hi", Some(Duration::from_millis(1500))));
        assert_eq!(
            d,
            NodeData::Live {
                value: Bytes::from_static(b"hi"),
                ttl: Some(Duration::from_millis(1500))
            }
        );
        assert_eq!(
            decode_data(encode_live(b"", None)),
            NodeData::Live {
                value: Bytes::new(),
                ttl: None
            }
        );
        assert_eq!(decode_data(TOMBSTONE.to_vec()), NodeData::Tombstone);
    }
}
