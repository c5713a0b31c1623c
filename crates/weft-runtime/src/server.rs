//! weft's HTTP surface: `/healthz`, `/readyz`, `/metrics` and the webhook
//! routes of the configured sources.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use weft_connectors::Ingest;
use weft_connectors::webhook::WebhookRoute;

pub fn router(
    ready: Arc<AtomicBool>,
    webhooks: Vec<(WebhookRoute, Arc<dyn Ingest>)>,
    admin: Router,
) -> Router {
    let handle = crate::metrics::install();
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Acquire);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = handle.render();
                async move {
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
                }
            }),
        );
    app = app.merge(admin);
    for (route, ingest) in webhooks {
        app = app.merge(route.router(ingest));
    }
    app
}
