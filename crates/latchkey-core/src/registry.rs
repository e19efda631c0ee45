//! URL scheme → connector. The facade fills a registry with one entry per
//! enabled backend; third-party backends register their own schemes.

use crate::error::{Error, Result};
use crate::traits::Backend;
use crate::url::BackendUrl;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Opens a backend for a parsed URL.
pub type Connector =
    Arc<dyn Fn(BackendUrl) -> BoxFuture<'static, Result<Arc<dyn Backend>>> + Send + Sync>;

/// A table of URL schemes. Also records schemes that exist but are compiled
/// out, so the error can name the Cargo feature to enable.
#[derive(Clone, Default)]
pub struct Registry {
    connectors: BTreeMap<String, Connector>,
    disabled: BTreeMap<String, String>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `scheme` (replacing an earlier entry).
    pub fn register(&mut self, scheme: &str, connector: Connector) {
        self.disabled.remove(scheme);
        self.connectors
            .insert(scheme.to_ascii_lowercase(), connector);
    }

    /// Records that `scheme` exists but needs Cargo `feature` to be enabled.
    pub fn register_disabled(&mut self, scheme: &str, feature: &str) {
        if !self.connectors.contains_key(scheme) {
            self.disabled
                .insert(scheme.to_string(), feature.to_string());
        }
    }

    /// Schemes that can be connected to.
    pub fn schemes(&self) -> Vec<&str> {
        self.connectors.keys().map(String::as_str).collect()
    }

    /// Parses `url` and opens the backend registered for its scheme.
    pub async fn connect(&self, url: &str) -> Result<Arc<dyn Backend>> {
        self.connect_url(BackendUrl::parse(url)?).await
    }

    /// Opens the backend registered for an already parsed URL's scheme.
    pub async fn connect_url(&self, parsed: BackendUrl) -> Result<Arc<dyn Backend>> {
        let scheme = parsed.scheme().to_string();
        match self.connectors.get(&scheme) {
            Some(c) => c(parsed).await,
            None => Err(match self.disabled.get(&scheme) {
                Some(feature) => Error::InvalidUrl {
                    url: parsed.to_string(),
                    reason: format!(
                        "the {scheme}:// backend is not compiled in: enable the Cargo feature \"{feature}\" of latchkey"
                    ),
                },
                None => Error::InvalidUrl {
                    url: parsed.to_string(),
                    reason: format!(
                        "unknown scheme {scheme:?}; compiled-in schemes: {}",
                        self.schemes().join(", ")
                    ),
                },
            }),
        }
    }
}
