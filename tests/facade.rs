//! The facade: URL selection, registry errors, capability requirements.

use latchkey::prelude::*;
use latchkey::Capability;

#[tokio::test]
async fn mem_url_connects_and_handles_share_one_store() {
    let a = latchkey::connect("mem://facade-test").await.unwrap();
    let b = latchkey::connect("mem://facade-test").await.unwrap();
    assert_eq!(a.name(), "mem");
    a.put("k", Bytes::from("v"), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(b.get("k").await.unwrap().unwrap().value, Bytes::from("v"));
    let other = latchkey::connect("mem://facade-test?namespace=other")
        .await
        .unwrap();
    assert_eq!(other.get("k").await.unwrap(), None);
}

#[tokio::test]
async fn unknown_scheme_lists_compiled_in_schemes() {
    let err = latchkey::connect("nosuch://h:1").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
    assert!(
        msg.contains("unknown scheme") && msg.contains("mem"),
        "{msg}"
    );
}

#[cfg(not(feature = "redis"))]
#[tokio::test]
async fn disabled_feature_is_named_and_password_hidden() {
    for url in [
        "redis://u:hunter2@127.0.0.1:6379",
        "redis+cluster://u:hunter2@127.0.0.1:7000,127.0.0.1:7001",
    ] {
        let err = latchkey::connect(url).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("feature \"redis\""), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
    }
}

#[tokio::test]
async fn bad_urls_are_typed_errors() {
    for bad in ["", "mem", "mem://?namespace=a%00b", "mem://x?bogus=1"] {
        let err = latchkey::connect(bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {err:?}");
    }
}

#[tokio::test]
async fn connect_requiring_fails_early_when_a_capability_is_missing() {
    // mem has every capability.
    latchkey::connect_requiring(
        "mem://",
        &[Capability::WatchResume, Capability::DurableFencing],
    )
    .await
    .unwrap();
    // A registered third-party backend that declares less is refused.
    use futures::FutureExt;
    use std::sync::Arc;
    latchkey::register(
        "weak",
        Arc::new(|_url| {
            async move {
                let inner = latchkey::connect("mem://").await?;
                Ok(Arc::new(Weak(inner)) as Arc<dyn Backend>)
            }
            .boxed()
        }),
    );
    let err = latchkey::connect_requiring("weak://", &[Capability::WatchResume])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unsupported {
                capability: Capability::WatchResume,
                ..
            }
        ),
        "{err:?}"
    );
}

/// A backend that forwards to mem but declares no watch resume.
struct Weak(Coordinator);

#[async_trait::async_trait]
impl KvStore for Weak {
    async fn get(&self, key: &str) -> latchkey::Result<Option<KeyValue>> {
        self.0.get(key).await
    }
    async fn put(&self, key: &str, value: Bytes, opts: PutOptions) -> latchkey::Result<Revision> {
        self.0.put(key, value, opts).await
    }
    async fn delete(&self, key: &str, opts: DeleteOptions) -> latchkey::Result<bool> {
        self.0.delete(key, opts).await
    }
    async fn list(&self, prefix: &str, opts: ListOptions) -> latchkey::Result<Vec<KeyValue>> {
        self.0.list(prefix, opts).await
    }
    async fn watch(
        &self,
        prefix: &str,
        from: Option<Revision>,
    ) -> latchkey::Result<latchkey::WatchStream> {
        self.0.watch(prefix, from).await
    }
}
#[async_trait::async_trait]
impl Txn for Weak {
    async fn txn(&self, txn: TxnRequest) -> latchkey::Result<TxnOutcome> {
        self.0.txn(txn).await
    }
}
#[async_trait::async_trait]
impl DistributedLock for Weak {
    async fn lock(&self, name: &str, opts: LockOptions) -> latchkey::Result<LockGuard> {
        self.0.lock(name, opts).await
    }
    async fn try_lock(&self, name: &str, opts: LockOptions) -> latchkey::Result<Option<LockGuard>> {
        self.0.try_lock(name, opts).await
    }
}
impl Backend for Weak {
    fn name(&self) -> &'static str {
        "weak"
    }
    fn capabilities(&self) -> latchkey::Capabilities {
        let mut c = self.0.capabilities();
        c.watch_resume = false;
        c
    }
}
