//! What a case is, the context it runs in, and the helpers cases share:
//! typed failures whose messages name what was expected, capability gates,
//! timing bounds derived from [`Capabilities`], and deadline-bounded polling.

use crate::harness::Harness;
use futures::future::BoxFuture;
use latchkey_core::{
    Backend, Bytes, Capabilities, Compare, Error, KvStore, ListOptions, LockGuard, LockOptions, Op,
    PutOptions, Revision, TxnRequest,
};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A case failed: the message says what was expected and what happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fail(pub String);

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail(format!("unexpected error: {e} ({e:?})"))
    }
}

/// What a case returns.
pub type CaseResult = Result<(), Fail>;

/// Adds what was being done to an unexpected backend error.
pub(crate) trait ErrCtx<T> {
    /// `Err(e)` becomes a [`Fail`] naming `what`.
    fn ctx(self, what: impl fmt::Display) -> Result<T, Fail>;
}

impl<T> ErrCtx<T> for latchkey_core::Result<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T, Fail> {
        self.map_err(|e| Fail(format!("{what}: unexpected error: {e} ({e:?})")))
    }
}

/// Turns a joined task's panic into a [`Fail`].
pub(crate) trait Joined<T> {
    /// `Err(panic)` becomes a [`Fail`] saying that `who` panicked.
    fn joined(self, who: &str) -> Result<T, Fail>;
}

impl<T> Joined<T> for Result<T, tokio::task::JoinError> {
    fn joined(self, who: &str) -> Result<T, Fail> {
        self.map_err(|e| Fail(format!("{who} panicked: {e}")))
    }
}

/// Fails the case with a formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::case::Fail(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;

/// Fails unless `actual == expected`, naming `what`.
macro_rules! ensure_eq {
    ($actual:expr, $expected:expr, $($what:tt)+) => {{
        let (a, e) = (&$actual, &$expected);
        if a != e {
            return Err($crate::case::Fail(format!(
                "expected {} to be {:?}, got {:?}", format!($($what)+), e, a
            )));
        }
    }};
}
pub(crate) use ensure_eq;

/// Fails unless `result` is an `Err` matching `pattern`; names `what`.
macro_rules! expect_err {
    ($result:expr, $pattern:pat, $($what:tt)+) => {{
        match $result {
            Err($pattern) => {}
            Err(e) => {
                return Err($crate::case::Fail(format!(
                    "expected {} from {}, got the error {e} ({e:?})",
                    stringify!($pattern), format!($($what)+)
                )))
            }
            Ok(_) => {
                return Err($crate::case::Fail(format!(
                    "expected {} from {}, but it succeeded",
                    stringify!($pattern), format!($($what)+)
                )))
            }
        }
    }};
}
pub(crate) use expect_err;

/// Says why a case cannot run on a backend (`Some(reason)`), or `None`.
pub type Gate = fn(&Capabilities) -> Option<String>;

/// One conformance case.
#[derive(Clone)]
pub struct Case {
    /// `<area>::<behaviour>`, the trial's name.
    pub name: &'static str,
    /// What the case asserts (its doc comment).
    pub doc: &'static str,
    /// True if the case is unfit for a live deployment: it abandons leases
    /// that then linger until they expire, puts sustained load on the
    /// server, or writes large values. Non-destructive cases only write
    /// small data inside their own fresh namespace and clean it up; the
    /// CLI's `latchkey check` runs only those.
    pub destructive: bool,
    pub(crate) gate: Option<Gate>,
    pub(crate) needs_op_count: bool,
    pub(crate) needs_revoke: bool,
    pub(crate) run: fn(Cx) -> BoxFuture<'static, CaseResult>,
}

impl Case {
    pub(crate) fn new(
        name: &'static str,
        doc: &'static str,
        run: fn(Cx) -> BoxFuture<'static, CaseResult>,
    ) -> Self {
        Case {
            name,
            doc,
            destructive: false,
            gate: None,
            needs_op_count: false,
            needs_revoke: false,
            run,
        }
    }
    pub(crate) fn destructive(mut self, yes: bool) -> Self {
        self.destructive = yes;
        self
    }
    pub(crate) fn gate(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }
    pub(crate) fn needs_op_count(mut self, yes: bool) -> Self {
        self.needs_op_count = yes;
        self
    }
    pub(crate) fn needs_revoke(mut self, yes: bool) -> Self {
        self.needs_revoke = yes;
        self
    }
    /// The area: the part of the name before `::`.
    pub fn area(&self) -> &'static str {
        self.name.split("::").next().unwrap_or(self.name)
    }
    /// Why this case cannot run on a backend with `caps`, if it cannot.
    pub fn ruled_out_by(&self, caps: &Capabilities) -> Option<String> {
        self.gate.and_then(|g| g(caps))
    }
    /// Why this case cannot run with this harness and backend, if it cannot.
    pub fn ruled_out(&self, caps: &Capabilities, harness: &dyn Harness) -> Option<String> {
        if self.needs_op_count && !harness.counts_ops() {
            return Some("needs op counts from the harness".into());
        }
        if self.needs_revoke && !harness.revokes_locks() {
            return Some("needs lock revocation from the harness".into());
        }
        self.ruled_out_by(caps)
    }
    /// The doc text as plain lines (leading spaces of doc comments removed).
    pub fn description(&self) -> String {
        self.doc
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("\n")
            .trim()
            .to_string()
    }
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("destructive", &self.destructive)
            .finish()
    }
}

/// The context a case runs in: its fresh namespace, the harness to open
/// handles with, and the backend's capabilities.
#[derive(Clone)]
pub struct Cx {
    harness: Arc<dyn Harness>,
    ns: String,
    caps: Capabilities,
    used: Arc<Mutex<Vec<String>>>,
}

impl Cx {
    pub(crate) fn new(harness: Arc<dyn Harness>, ns: String, caps: Capabilities) -> Self {
        Cx {
            harness,
            used: Arc::new(Mutex::new(vec![ns.clone()])),
            ns,
            caps,
        }
    }

    /// The case's namespace.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The backend's capabilities.
    pub fn caps(&self) -> &Capabilities {
        &self.caps
    }

    /// Opens a new independent handle in the case's namespace.
    pub async fn open(&self) -> Result<Arc<dyn Backend>, Fail> {
        self.open_ns(&self.ns.clone()).await
    }

    /// Opens `n` independent handles in the case's namespace.
    pub async fn open_n(&self, n: usize) -> Result<Vec<Arc<dyn Backend>>, Fail> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.open().await?);
        }
        Ok(v)
    }

    /// Opens a handle in a second namespace, derived from the case's
    /// (`<ns>-<suffix>`), for isolation cases. It is cleaned up too.
    pub async fn open_other(&self, suffix: &str) -> Result<Arc<dyn Backend>, Fail> {
        let ns = format!("{}-{suffix}", self.ns);
        {
            let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
            if !used.contains(&ns) {
                used.push(ns.clone());
            }
        }
        self.open_ns(&ns).await
    }

    async fn open_ns(&self, ns: &str) -> Result<Arc<dyn Backend>, Fail> {
        self.harness.open(ns).await.map_err(|e| {
            Fail(format!(
                "the harness could not open a handle in {ns:?}: {e}"
            ))
        })
    }

    pub(crate) fn namespaces(&self) -> Vec<String> {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn harness(&self) -> &Arc<dyn Harness> {
        &self.harness
    }

    /// Deletes lock `name`'s entry behind its holder's back (harness hook).
    pub async fn revoke_lock(&self, handle: &Arc<dyn Backend>, name: &str) -> Result<bool, Fail> {
        self.harness
            .revoke_lock(handle, name)
            .await
            .ctx(format!("the harness's revoke_lock({name:?})"))
    }

    /// Requests `handle` has sent so far, if the harness counts them.
    pub fn op_count(&self, handle: &Arc<dyn Backend>) -> Option<u64> {
        self.harness.op_count(handle)
    }

    /// A TTL for KV keys that is short but honoured: `min_ttl`, at least 500 ms.
    pub fn short_kv_ttl(&self) -> Duration {
        self.caps.min_ttl.max(Duration::from_millis(500))
    }

    /// A lock TTL short enough to wait out: `min_ttl`, at least 1 s (the
    /// renewal loop then ticks every ~330 ms, comfortably on a busy machine).
    pub fn short_lock_ttl(&self) -> Duration {
        let t = self.caps.min_ttl.max(Duration::from_secs(1));
        match self.caps.max_lock_ttl {
            Some(max) => t.min(max),
            None => t,
        }
    }

    /// A lock TTL long enough never to expire during a case (30 s, bounded
    /// by `max_lock_ttl`): a lock that is freed early was freed by the
    /// behaviour under test, not by expiry.
    pub fn long_lock_ttl(&self) -> Duration {
        let t = Duration::from_secs(30);
        match self.caps.max_lock_ttl {
            Some(max) => t.min(max),
            None => t,
        }
    }

    /// Lock options with the long TTL.
    pub fn long_lock(&self) -> LockOptions {
        LockOptions::ttl(self.long_lock_ttl())
    }

    /// The latest a thing with this TTL may still be seen: TTL + declared
    /// granularity, plus scheduling slack for a loaded test machine.
    pub fn expiry_bound(&self, ttl: Duration) -> Duration {
        ttl + self.caps.ttl_granularity + Duration::from_millis(750)
    }

    /// How soon a waiter must get a released lock: well under the long TTL
    /// (a waiter that only retried at expiry would miss it), and generous,
    /// since this is not a speed test.
    pub fn wake_bound(&self) -> Duration {
        (self.long_lock_ttl() / 2).min(Duration::from_secs(2))
    }
}

/// `s` as bytes.
pub(crate) fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Puts `value` at `key` (no options) and returns the revision; an error
/// fails the case naming the put.
pub(crate) async fn put_value(h: &dyn KvStore, key: &str, value: &str) -> Result<Revision, Fail> {
    h.put(key, b(value), PutOptions::default())
        .await
        .ctx(format!("put {key}"))
}

/// Puts `value` at `key` with `ttl` and returns the revision; an error
/// fails the case naming the put and the TTL.
pub(crate) async fn put_with_ttl(
    h: &dyn KvStore,
    key: &str,
    value: &str,
    ttl: Duration,
) -> Result<Revision, Fail> {
    h.put(key, b(value), PutOptions::ttl(ttl))
        .await
        .ctx(format!("put {key} with TTL {ttl:?}"))
}

/// The value at `key` (`None` if missing); an error fails the case naming
/// the get.
pub(crate) async fn value_of(h: &dyn KvStore, key: &str) -> Result<Option<Bytes>, Fail> {
    Ok(h.get(key)
        .await
        .ctx(format!("get {key}"))?
        .map(|kv| kv.value))
}

/// Fails unless `key` holds `want`; the failure names `what` and shows the
/// value found (`None` if the key is missing).
pub(crate) async fn expect_value(h: &dyn KvStore, key: &str, want: &str, what: &str) -> CaseResult {
    ensure_eq!(value_of(h, key).await?, Some(b(want)), "{what}");
    Ok(())
}

/// Fails unless `result` is `Err(Conflict)` whose `current` is
/// `want_current`; the failure names `what`, the expected `current` and
/// what came instead. Returns the conflict's key.
pub(crate) fn expect_conflict<T: fmt::Debug>(
    result: latchkey_core::Result<T>,
    want_current: Option<Revision>,
    what: impl fmt::Display,
) -> Result<String, Fail> {
    match result {
        Err(Error::Conflict { key, current }) if current == want_current => Ok(key),
        other => Err(Fail(format!(
            "expected Conflict {{ current: {want_current:?} }} from {what}, got {other:?}"
        ))),
    }
}

/// A stored decimal number (`None` if the bytes are not one): counters
/// kept as text by the workload cases.
pub(crate) fn parse_num<T: std::str::FromStr>(v: &[u8]) -> Option<T> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A fenced write: `put(key, value)` only while `g`'s holding exists.
pub(crate) fn fenced_put(g: &LockGuard, key: &str, value: &str) -> TxnRequest {
    TxnRequest::new()
        .when([Compare::held(g)])
        .then([Op::put(key, value.to_string())])
}

/// Polls `cond` (every 10–20 ms) until it yields `Some`, or fails after
/// `within` with a message naming `what`. For waiting on time passing (TTL
/// expiry) or on eventually visible effects; never a substitute for an event
/// the API offers.
pub(crate) async fn poll_until<T, F, Fut>(
    within: Duration,
    what: &str,
    mut cond: F,
) -> Result<T, Fail>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, Fail>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = cond().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Fail(format!(
                "expected {what} within {within:?}, it did not happen"
            )));
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// Every key visible in the handle's namespace (keys only).
pub(crate) async fn all_keys(h: &dyn KvStore) -> Result<Vec<String>, Fail> {
    Ok(h.list(
        "",
        ListOptions {
            limit: None,
            keys_only: true,
        },
    )
    .await
    .ctx("list(\"\") of the namespace")?
    .into_iter()
    .map(|kv| kv.key)
    .collect())
}

/// Capability gates: each returns the reason a case cannot run.
pub(crate) mod gates {
    use latchkey_core::Capabilities;

    pub fn watch_resume(c: &Capabilities) -> Option<String> {
        (!c.watch_resume).then(|| "needs watch_resume".into())
    }
    pub fn native_ttl(c: &Capabilities) -> Option<String> {
        (!c.native_ttl).then(|| "needs native_ttl".into())
    }
    pub fn watch_expiry(c: &Capabilities) -> Option<String> {
        if !c.native_ttl {
            Some("needs native_ttl".into())
        } else if !c.watch_reports_expiry {
            Some("needs watch_reports_expiry".into())
        } else {
            None
        }
    }
    pub fn global_revision(c: &Capabilities) -> Option<String> {
        (!c.global_revision).then(|| "needs global_revision".into())
    }
    pub fn linearizable_reads(c: &Capabilities) -> Option<String> {
        (!c.linearizable_reads).then(|| "needs linearizable_reads".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflict(current: Option<Revision>) -> latchkey_core::Result<Revision> {
        Err(Error::Conflict {
            key: "k".into(),
            current,
        })
    }

    #[test]
    fn expect_conflict_passes_only_the_expected_current() {
        assert_eq!(
            expect_conflict(conflict(Some(7)), Some(7), "x"),
            Ok("k".into())
        );
        assert_eq!(expect_conflict(conflict(None), None, "x"), Ok("k".into()));
        // A failure says what was expected, from what, and what came.
        let Err(Fail(msg)) = expect_conflict(conflict(Some(8)), Some(7), "a stale CAS") else {
            panic!("a Conflict with another current must fail");
        };
        assert!(
            msg.contains("current: Some(7)")
                && msg.contains("a stale CAS")
                && msg.contains("Some(8)"),
            "{msg}"
        );
        let Err(Fail(msg)) = expect_conflict(Ok(3), None, "a CAS on a missing key") else {
            panic!("a success must fail");
        };
        assert!(
            msg.contains("current: None") && msg.contains("Ok(3)"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn expect_value_names_what_was_expected_and_found() {
        let h = latchkey_mem::MemStore::new().handle("t").unwrap();
        put_value(h.as_ref(), "k", "1").await.unwrap();
        assert_eq!(expect_value(h.as_ref(), "k", "1", "k").await, Ok(()));
        let Err(Fail(msg)) = expect_value(h.as_ref(), "k", "2", "the value after CAS").await else {
            panic!("another value must fail");
        };
        assert_eq!(
            msg,
            format!(
                "expected the value after CAS to be {:?}, got {:?}",
                Some(b("2")),
                Some(b("1"))
            )
        );
        let Err(Fail(msg)) = expect_value(h.as_ref(), "none", "1", "a missing key").await else {
            panic!("a missing key must fail");
        };
        assert!(msg.ends_with("got None"), "{msg}");
    }
}
