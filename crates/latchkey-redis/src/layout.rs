//! Where everything of one namespace lives in Redis (see the crate docs for
//! the table). All keys of a namespace share the hash tag `{<namespace>}`,
//! so every script touches one hash slot: on a Redis Cluster a namespace is
//! one slot.

/// Key names of one namespace.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    /// `latchkey:{<ns>}:`
    prefix: String,
}

/// Escapes the characters that would end (or start) a hash tag early, and
/// the escape character itself, so that two namespaces never produce the
/// same prefix and the tag always covers the whole namespace.
fn escape_tag(ns: &str) -> String {
    let mut out = String::with_capacity(ns.len());
    for c in ns.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

/// The tag of the empty namespace on a Redis Cluster, where `{}` is no
/// hash tag (Cluster hashes the whole key when the braces are empty, so the
/// keys of one namespace would spread over slots and every script would
/// fail with `CROSSSLOT`). No other namespace escapes to a bare `%`: `%`
/// itself always becomes `%25`.
const CLUSTER_EMPTY_TAG: &str = "%";

impl Layout {
    /// The layout of `namespace`; `cluster` gives the empty namespace a
    /// real hash tag (single-node key names stay `latchkey:{}:…`).
    pub(crate) fn new(namespace: &str, cluster: bool) -> Self {
        let tag = if namespace.is_empty() && cluster {
            CLUSTER_EMPTY_TAG.to_string()
        } else {
            escape_tag(namespace)
        };
        Layout {
            prefix: format!("latchkey:{{{tag}}}:"),
        }
    }

    /// The namespace's revision counter (a string key bumped by `INCR`).
    pub(crate) fn rev(&self) -> String {
        format!("{}rev", self.prefix)
    }

    /// The sorted set of the namespace's keys (score 0, ordered by bytes).
    pub(crate) fn index(&self) -> String {
        format!("{}idx", self.prefix)
    }

    /// The expiry schedule: user key -> deadline (ms, server time) of every
    /// key with a TTL, so expiries become delete events.
    pub(crate) fn ttl(&self) -> String {
        format!("{}ttl", self.prefix)
    }

    /// The change stream watches read (entry id `<revision>-<n>`).
    pub(crate) fn log(&self) -> String {
        format!("{}log", self.prefix)
    }

    /// A random id of the namespace's data, created by the first watch: a
    /// different one means the data (and the watch history) was lost.
    pub(crate) fn epoch(&self) -> String {
        format!("{}epoch", self.prefix)
    }

    /// Prefix of the hashes holding the user keys.
    pub(crate) fn kv_prefix(&self) -> String {
        format!("{}kv:", self.prefix)
    }

    /// The hash `{v, r, t}` of one user key.
    pub(crate) fn kv(&self, key: &str) -> String {
        format!("{}kv:{key}", self.prefix)
    }

    /// The lock key: holds the owner id, as `SET key <owner> NX PX ttl` would.
    pub(crate) fn lock(&self, name: &str) -> String {
        format!("{}lock:{name}", self.prefix)
    }

    /// The lock's fencing counter (`INCR` at every acquisition).
    pub(crate) fn fence(&self, name: &str) -> String {
        format!("{}fence:{name}", self.prefix)
    }

    /// The lock's wait queue: owner id -> ticket (arrival order).
    pub(crate) fn queue(&self, name: &str) -> String {
        format!("{}queue:{name}", self.prefix)
    }

    /// The lock's waiter leases: owner id -> deadline (ms, server time).
    pub(crate) fn waiters(&self, name: &str) -> String {
        format!("{}waiters:{name}", self.prefix)
    }

    /// The counter that numbers queue tickets (one per namespace).
    pub(crate) fn qseq(&self) -> String {
        format!("{}qseq", self.prefix)
    }

    /// Prefix of the pub/sub channels that tell a waiter it is its turn:
    /// the waiter's owner id follows.
    pub(crate) fn released(&self, name: &str) -> String {
        format!("{}released:{name}:", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_never_share_a_prefix() {
        assert_eq!(Layout::new("ns", false).lock("x"), "latchkey:{ns}:lock:x");
        assert_eq!(Layout::new("", false).lock("x"), "latchkey:{}:lock:x");
        // Without escaping, namespace "a}:kv:b" would collide with "a".
        let a = Layout::new("a", false).kv("b}:kv:c");
        let b = Layout::new("a}:kv:b", false).kv("c");
        assert_ne!(a, b);
        assert_eq!(
            Layout::new("a{b}%", false).rev(),
            "latchkey:{a%7Bb%7D%25}:rev"
        );
    }

    #[test]
    fn cluster_keys_of_the_empty_namespace_share_a_tag() {
        assert_eq!(Layout::new("", true).lock("x"), "latchkey:{%}:lock:x");
        assert_eq!(Layout::new("ns", true).lock("x"), "latchkey:{ns}:lock:x");
        // No namespace escapes to the reserved tag.
        assert_ne!(Layout::new("%", true).rev(), Layout::new("", true).rev());
        assert_eq!(Layout::new("%", true).rev(), "latchkey:{%25}:rev");
    }
}
