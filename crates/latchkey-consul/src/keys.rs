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
//! server cleans `//`, `/./` and `/../`, and Consul 1.21.5+ validates KV
//! keys on that endpoint (hashicorp/consul PR #22682: only ASCII letters,
//! digits and `,-_./`, no `../`, no file-like extension such as `.json` at
//! the end). `E` keeps a key readable and acceptable to all of these:
//! letters, digits, `-` and `_` are themselves, and
//! - `/` is itself, except at the start or right after another `/`
//!   (no empty segment), where it is `,2F`;
//! - every other byte (`.`, `,`, space, `~`, `%`, non-ASCII UTF-8 bytes, …)
//!   is `,XX` (upper-case hex), so there is no `.`/`..` segment and no
//!   extension.
//!
//! The encoding of a character depends only on the character before it, so
//! `E(p)` is a prefix of `E(k)` whenever `p` is a prefix of `k`: a listing of
//! any string prefix is one `?recurse` query on `E(prefix)`. The codes form a
//! prefix-free set (`,` is never literal), so decoding is unique
//! ([`decode`] ∘ [`encode`] = id). Results are sorted again after decoding.
//!
//! Namespaces (`N`) escape every `/` as well, so a namespace is always one
//! segment and `ns=a` can never see into `ns=a/kv/b`.

use std::fmt::Write as _;

fn escape(out: &mut String, c: char) {
    let mut buf = [0u8; 4];
    for b in c.encode_utf8(&mut buf).bytes() {
        let _ = write!(out, ",{b:02X}");
    }
}

fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Encodes a key or lock name (see the module docs).
pub fn encode(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut prev: Option<char> = None;
    for c in key.chars() {
        let seg_start = prev.is_none() || prev == Some('/');
        match c {
            '/' if !seg_start => out.push(c),
            c if plain(c) => out.push(c),
            _ => escape(&mut out, c),
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
        if bytes[i] == b',' {
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
        if plain(c) {
            out.push(c);
        } else {
            escape(&mut out, c);
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
        .remove(b',')
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
            // Consul 1.21.5+'s KV key rules: ASCII letters, digits, ,-_./
            // and no dots at all here (no `..`, no extension).
            assert!(
                e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ",-_/".contains(c)),
                "{k:?} -> {e:?}"
            );
        }
    }

    #[test]
    fn prefixes_are_preserved() {
        let keys = [
            "app", "app/", "app//x", "apple", "app/.", "a", "ap~", "ap,", "a.b",
        ];
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
        assert_eq!(namespace_base("a/kv/b"), "latchkey/ns/a,2Fkv,2Fb/");
        assert_eq!(namespace_base(".."), "latchkey/ns/,2E,2E/");
        assert_eq!(encode("jobs/nightly"), "jobs/nightly");
        assert_eq!(encode("/a//b.json"), ",2Fa/,2Fb,2Ejson");
        assert_eq!(url_path("a,b/c"), "a,b/c");
    }
}
