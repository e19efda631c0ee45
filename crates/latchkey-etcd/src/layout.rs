//! Where a namespace's keys and locks live in etcd (the table is in the
//! crate docs).
//!
//! - root: `latchkey/` for the empty namespace, `latchkey@<ns>/` otherwise,
//!   with `%` and `/` of the namespace percent-escaped so that no two
//!   namespaces share a prefix (and no namespace's prefix is another's);
//! - user keys: `<root>kv/<key>` (keys verbatim, so any string prefix of a
//!   user key is a byte prefix of its etcd key and `list`/`watch` are plain
//!   etcd prefix ranges);
//! - lock entries: `<root>lock/<name>/<lease id in hex>` — the layout of
//!   etcd's `concurrency.Mutex` and of the server's Lock RPC for the lock
//!   name `<root>lock/<name>`, with `%` and `/` of the name escaped so that
//!   lock `a` never sees the entries of lock `a/b`.

/// Escapes `%` and `/` (the only characters that could make two different
/// names share a prefix segment).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

/// Key names of one namespace.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    kv: String,
    lock: String,
}

impl Layout {
    pub(crate) fn new(namespace: &str) -> Self {
        let root = if namespace.is_empty() {
            "latchkey/".to_string()
        } else {
            format!("latchkey@{}/", escape(namespace))
        };
        Layout {
            kv: format!("{root}kv/"),
            lock: format!("{root}lock/"),
        }
    }

    /// The etcd key of a user key (or the etcd prefix of a user prefix).
    pub(crate) fn kv(&self, key: &str) -> String {
        format!("{}{key}", self.kv)
    }

    /// The user key of an etcd key of this namespace, if it is one.
    pub(crate) fn user_key(&self, etcd_key: &[u8]) -> Option<String> {
        let rest = etcd_key.strip_prefix(self.kv.as_bytes())?;
        String::from_utf8(rest.to_vec()).ok()
    }

    /// The name passed to etcd's Mutex / Lock RPC for lock `name`:
    /// `<root>lock/<escaped name>` (entries live under it plus `/`).
    pub(crate) fn lock_name(&self, name: &str) -> String {
        format!("{}{}", self.lock, escape(name))
    }

    /// The directory of lock `name`'s entries (ends with `/`).
    pub(crate) fn lock_dir(&self, name: &str) -> String {
        format!("{}/", self.lock_name(name))
    }

    /// The entry of lock `name` held under `lease`.
    pub(crate) fn lock_entry(&self, name: &str, lease: i64) -> String {
        format!("{}{:x}", self.lock_dir(name), lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_the_documented_one() {
        let root = Layout::new("");
        assert_eq!(root.kv("a/b"), "latchkey/kv/a/b");
        assert_eq!(
            root.lock_entry("x", 0x694d7e8b0c2a1f05),
            "latchkey/lock/x/694d7e8b0c2a1f05"
        );
        let app = Layout::new("app");
        assert_eq!(app.kv("k"), "latchkey@app/kv/k");
        assert_eq!(app.lock_dir("a/b%"), "latchkey@app/lock/a%2Fb%25/");
        assert_eq!(app.user_key(b"latchkey@app/kv/k").as_deref(), Some("k"));
        assert_eq!(app.user_key(b"latchkey/kv/k"), None);
    }

    #[test]
    fn namespaces_never_share_a_prefix() {
        // Without escaping, namespace "a/kv" would see keys "kv/…" of "a".
        let a = Layout::new("a").kv("kv/x");
        let b = Layout::new("a/kv").kv("x");
        assert_ne!(a, b);
        assert!(!Layout::new("ab")
            .kv("")
            .starts_with(&Layout::new("a").kv("")));
        // Lock `a` never ranges over the entries of lock `a/b`.
        let l = Layout::new("");
        assert!(!l.lock_entry("a/b", 1).starts_with(&l.lock_dir("a")));
    }
}
