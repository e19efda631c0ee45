//! The process-wide URL scheme registry: mem always, each adapter behind
//! its Cargo feature, and whatever third-party backends register.

use crate::Coordinator;
use futures::FutureExt;
use latchkey_core::{Backend, Capability, Connector, Error, Registry, Result};
use std::sync::{Arc, OnceLock, RwLock};

/// The environment variable [`from_env`] reads.
pub const URL_ENV: &str = "LATCHKEY_URL";
/// The URL [`from_env`] uses when [`URL_ENV`] is unset.
pub const DEFAULT_URL: &str = "mem://";

fn registry() -> &'static RwLock<Registry> {
    static REGISTRY: OnceLock<RwLock<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| RwLock::new(default_registry()))
}

fn connector<F, Fut>(f: F) -> Connector
where
    F: Fn(latchkey_core::BackendUrl) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Arc<dyn Backend>>> + Send + 'static,
{
    Arc::new(move |url| f(url).boxed())
}

#[allow(unused_mut)]
fn default_registry() -> Registry {
    let mut r = Registry::new();
    for s in latchkey_mem::SCHEMES {
        r.register(s, connector(latchkey_mem::connect));
    }
    #[cfg(feature = "redis")]
    for s in latchkey_redis::SCHEMES {
        r.register(s, connector(latchkey_redis::connect));
    }
    #[cfg(feature = "etcd")]
    for s in latchkey_etcd::SCHEMES {
        r.register(s, connector(latchkey_etcd::connect));
    }
    #[cfg(feature = "consul")]
    for s in latchkey_consul::SCHEMES {
        r.register(s, connector(latchkey_consul::connect));
    }
    #[cfg(feature = "zookeeper")]
    for s in latchkey_zookeeper::SCHEMES {
        r.register(s, connector(latchkey_zookeeper::connect));
    }
    // Schemes that exist but may be compiled out: the error names the feature.
    for (scheme, feature) in [
        ("redis", "redis"),
        ("rediss", "redis"),
        ("redis+cluster", "redis"),
        ("rediss+cluster", "redis"),
        ("etcd", "etcd"),
        ("etcds", "etcd"),
        ("consul", "consul"),
        ("consuls", "consul"),
        ("zookeeper", "zookeeper"),
    ] {
        r.register_disabled(scheme, feature);
    }
    r
}

/// Registers a backend for `scheme`, e.g. a third-party crate's:
///
/// ```
/// use std::sync::Arc;
/// use futures::FutureExt;
/// latchkey::register("mymem", Arc::new(|url: latchkey::BackendUrl| {
///     async move { latchkey::mem::connect(latchkey::BackendUrl::parse("mem://")?).await }.boxed()
/// }));
/// assert!(latchkey::schemes().contains(&"mymem".to_string()));
/// ```
pub fn register(scheme: &str, connector: Connector) {
    registry()
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .register(scheme, connector);
}

/// The schemes that can be connected to in this build.
pub fn schemes() -> Vec<String> {
    registry()
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .schemes()
        .into_iter()
        .map(String::from)
        .collect()
}

/// Connects to the backend named by `url` (see the crate docs for schemes).
/// A scheme whose Cargo feature is off is [`Error::InvalidUrl`] naming the
/// feature; an unknown one lists the schemes compiled in.
pub async fn connect(url: &str) -> Result<Coordinator> {
    let reg = registry().read().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Coordinator::new(reg.connect(url).await?))
}

/// Like [`connect`], for a URL parsed (and perhaps adjusted) already.
pub async fn connect_url(url: latchkey_core::BackendUrl) -> Result<Coordinator> {
    let reg = registry().read().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Coordinator::new(reg.connect_url(url).await?))
}

/// Connects to `$LATCHKEY_URL`, or `mem://` when it is unset.
pub async fn from_env() -> Result<Coordinator> {
    let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_string());
    connect(&url).await
}

/// Connects, then fails early with [`Error::Unsupported`] if the backend
/// lacks any of `required` (so a program that needs, say, resumable watches
/// learns at start-up, not in production).
pub async fn connect_requiring(url: &str, required: &[Capability]) -> Result<Coordinator> {
    let c = connect(url).await?;
    if let Some(missing) = c.capabilities().missing(required).first() {
        return Err(Error::Unsupported {
            capability: *missing,
            backend: c.name(),
        });
    }
    Ok(c)
}
