//! TODO(helper): the webhook source.

use std::sync::Arc;

use weft_core::config::SourceSpec;

use crate::source::{Ingest, SourceError};

/// A webhook endpoint to mount on weft's HTTP server.
pub struct WebhookRoute {
    pub system: String,
    pub path: String,
}

impl WebhookRoute {
    pub fn new(system: &str, spec: &SourceSpec) -> Result<Self, SourceError> {
        let SourceSpec::Webhook { cfg, .. } = spec else {
            return Err(SourceError {
                system: system.into(),
                message: "not a webhook source".into(),
            });
        };
        Ok(WebhookRoute {
            system: system.into(),
            path: cfg.path.clone(),
        })
    }

    /// The axum router serving this endpoint, writing through `ingest`.
    pub fn router(self, _ingest: Arc<dyn Ingest>) -> axum::Router {
        axum::Router::new()
    }
}
