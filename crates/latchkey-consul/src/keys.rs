//! How latchkey keys, lock names and namespaces become Consul KV keys.
//!
//! # Layout
//! | what | Consul key |
//! |---|---|
//! | key `k`, no namespace | `latchkey/default/kv/<E(k)>` |
//! | key `k` in namespace `ns` | `latchkey/ns/<N(ns)>/kv/<E(k)>` |
//! | lock `x` (an `api.Lock` key) | `latchkey/…/locks/<E(x)>` |
//! | revision marker of delete-only txns | `latchkey/…/rev` |
//!
//! # Key encoding `E`
//! Consul keys travel in URL paths (`/v1/kv/<key>`), where Go's HTTP
//! server cleans `//`, `/./` and `/../`. `E` keeps a key readable and
//! path-safe: every character is itself except
//! - `~` → `~7E` (the escape character),
//! - `/` at the start or right after another `/` → `~2F` (no empty segment),
//! - `.` at the start of a segment → `~2E` (no `.` or `..` segment).
//!
//! The encoding of a character depends only on the character before it, so
//! `E(p)` is a prefix of `E(k)` whenever `p` is a prefix of `k`: a listing of
//! any string prefix is one `?recurse` query on `E(prefix)`. The codes form a
//! prefix-free set, so decoding is unique ([`decode`] ∘ [`encode`] = id).
//! Results are sorted again after decoding (`~` sorts differently).
//!
//! Namespaces (`N`) escape every `/` as well, so a namespace is always one
//! segment and `ns=a` can never see into `ns=a/kv/b`.

use std::fmt::Write as _;

fn escape(out: &mut String, c: char) {
    let mut buf = [0u8; 4];
    for b in c.encode_utf8(&mut buf).bytes() {
        let _ = write!(out, "~{b:02X}");
    }
}

/// Encodes a key or lock name (see the module docs).
pub fn encode(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut prev: Option<char> = None;
    for c in key.chars() {
        let seg_start = prev.is_none() || prev == Some('/');
        match c {
            '~' => escape(&mut out, c),
            '/' if seg_start => escape(&mut out, c),
            '.' if seg_start => escape(&mut out, c),
            _ => out.push(c),
        }
        prev = Some(c);
    }
    out
}

/// Decodes what [`encode`] produced; `None` for a key latchkey did not write.
pub fn decode(enc: &str) -> Option<String> {
    let bytes = enc.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'~' {
            let hex = enc.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The Consul key prefix of a namespace, ending in `/`.
pub fn namespace_base(ns: &str) -> String {
    if ns.is_empty() {
        return "latchkey/default/".into();
    }
    let mut out = String::from("latchkey/ns/");
    for c in ns.chars() {
        match c {
            '~' | '/' => escape(&mut out, c),
            '.' if out.ends_with('/') => escape(&mut out, c),
            _ => out.push(c),
        }
    }
    out.push('/');
    out
}

/// Percent-encodes a Consul key for a URL path: unreserved characters and
/// `/` stay, everything else is `%XX` (Consul decodes it back).
pub fn url_path(key: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    percent_encoding::utf8_percent_encode(key, SET).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_path_safe() {
        for k in [
            "/",
            "/lead",
            "trail/",
            "/both/",
            "a//b",
            "a/b",
            ".",
            "..",
            "./x",
            "a/./b",
            "a/../b",
            "~",
            "%2F",
            "a~2Fb",
            "ünï/✓",
            "emoji🔒",
            "?q=1&r",
            "#frag",
            " pad ",
        ] {
            let e = encode(k);
            assert_eq!(decode(&e).as_deref(), Some(k), "{k:?} -> {e:?}");
            assert!(!e.starts_with('/') && !e.contains("//"), "{e:?}");
            for seg in e.split('/') {
                assert!(seg != "." && seg != "..", "{k:?} -> {e:?}");
            }
        }
    }

    #[test]
    fn prefixes_are_preserved() {
        let keys = ["app", "app/", "app//x", "apple", "app/.", "a", "ap~"];
        for k in keys {
            for p in keys {
                assert_eq!(
                    encode(k).starts_with(&encode(p)),
                    k.starts_with(p),
                    "{p:?} {k:?}"
                );
            }
        }
    }

    #[test]
    fn namespaces_are_one_segment() {
        assert_eq!(namespace_base(""), "latchkey/default/");
        assert_eq!(namespace_base("a/kv/b"), "latchkey/ns/a~2Fkv~2Fb/");
        assert_eq!(namespace_base(".."), "latchkey/ns/~2E./");
        assert_eq!(url_path("a b/ü?"), "a%20b/%C3%BC%3F");
    }
}
