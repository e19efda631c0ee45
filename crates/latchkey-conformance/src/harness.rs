//! [`Harness`]: how the suite opens handles to the backend under test.

use async_trait::async_trait;
use latchkey_core::{Backend, Result};
use std::future::Future;
use std::sync::Arc;

/// Opens handles to the backend under test.
///
/// Every call must return a **new, independent** handle (its own
/// connection, session or lease), as a separate client process would have:
/// lock and TTL cases open two or more and expect them to compete with each
/// other. All handles opened with the same `namespace` must see the same
/// data; handles of different namespaces must never see each other's.
///
/// Any `Fn(String) -> impl Future<Output = Result<Arc<dyn Backend>>>`
/// closure is a harness, so a backend plugs in with one call:
///
/// ```no_run
/// # use std::sync::Arc;
/// # use latchkey_core::{Backend, Result};
/// # async fn my_connect(_ns: &str) -> Result<Arc<dyn Backend>> { unimplemented!() }
/// let harness = |ns: String| async move { my_connect(&ns).await };
/// # let _ = latchkey_conformance::run("mine", harness);
/// ```
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// Opens a NEW independent handle (its own connection/session/lease) to
    /// the backend under test, in `namespace`.
    async fn open(&self, namespace: &str) -> Result<Arc<dyn Backend>>;
}

#[async_trait]
impl<F, Fut> Harness for F
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Arc<dyn Backend>>> + Send,
{
    async fn open(&self, namespace: &str) -> Result<Arc<dyn Backend>> {
        (self)(namespace.to_string()).await
    }
}
