//! weft's HTTP surface, on two listeners:
//!
//! - the **public** one (`server.listen`): the webhook routes of the
//!   configured sources, `/healthz` and `/readyz`;
//! - the **admin** one (`server.admin_listen`, loopback by default): the
//!   admin API under `/api/v1`, `/metrics`, `/healthz` and `/readyz`.
//!
//! Both are served by [`serve`] with the same limits, so a slow or greedy
//! client cannot hold the process: headers must arrive within
//! [`HEADER_READ_TIMEOUT`], a body may pause at most [`BODY_IDLE_TIMEOUT`]
//! between chunks, a whole request (body read, ingest, answer) takes at
//! most [`REQUEST_TIMEOUT`] (then `408`), at most
//! `server.max_concurrent_requests` webhook (or admin API) requests are
//! handled at once per listener (more get `503` with `Retry-After: 1`;
//! health and metrics are never refused for being busy), and at most [`MAX_CONNECTIONS`]
//! connections are open per listener (more wait in the kernel's backlog).
//! Webhook bodies held in memory are bounded across all routes by
//! `server.max_inflight_bytes` (see [`weft_connectors::webhook::BodyBudget`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
use weft_connectors::Ingest;
use weft_connectors::webhook::{BodyBudget, WebhookRoute};
use weft_core::config::ServerConfig;

/// Time for a client to send the request line and headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two chunks of a request body.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time for a whole request, from its headers to the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections per listener.
pub const MAX_CONNECTIONS: usize = 4096;
/// Time given to open connections to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// The routers of the two listeners.
pub struct Routers {
    /// `server.listen`: webhooks, `/healthz`, `/readyz`.
    pub public: Router,
    /// `server.admin_listen`: `/api/v1`, `/metrics`, `/healthz`, `/readyz`.
    pub admin: Router,
}

pub fn routers(
    server: &ServerConfig,
    health: Arc<crate::health::Health>,
    webhooks: Vec<(WebhookRoute, Arc<dyn Ingest>)>,
    admin: Router,
    gauges: Option<Arc<crate::gauges::Gauges>>,
) -> Routers {
    let handle = crate::metrics::install();
    let health = || {
        let health = health.clone();
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || {
                    let ready = health.readiness();
                    async move {
                        match ready {
                            Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                        }
                    }
                }),
            )
    };
    let budget = BodyBudget::new(server.max_inflight_bytes);
    let mut hooks = Router::new();
    for (route, ingest) in webhooks {
        hooks = hooks.merge(route.router_with_budget(ingest, budget.clone()));
    }
    // health and metrics are never refused for being busy: a probe that
    // fails under load would restart a hub that is only working hard
    let public = health().merge(capped(hooks, server.max_concurrent_requests));
    let admin = health()
        .route(
            "/metrics",
            get(move || {
                let (handle, gauges) = (handle.clone(), gauges.clone());
                async move {
                    // gauges of stored state as they are now; a slow store
                    // gives the values of the last refresh
                    if let Some(g) = gauges {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(2), g.refresh_for_scrape())
                                .await;
                    }
                    let body = handle.render();
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
                }
            }),
        )
        .merge(capped(admin, server.max_concurrent_requests));
    Routers {
        public: timed(public),
        admin: timed(admin),
    }
}

/// A cap on requests in progress that answers `503` instead of queueing.
fn capped(router: Router, max_requests: usize) -> Router {
    let permits = Arc::new(Semaphore::new(max_requests.max(1)));
    router.layer(middleware::from_fn(move |req: Request, next: Next| {
        let permits = permits.clone();
        async move {
            match permits.try_acquire_owned() {
                Ok(_permit) => next.run(req).await,
                Err(_) => busy(),
            }
        }
    }))
}

/// A total timeout per request and an idle timeout on its body.
fn timed(router: Router) -> Router {
    router
        .layer(RequestBodyTimeoutLayer::new(BODY_IDLE_TIMEOUT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

fn busy() -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({"error": "too many requests in progress; retry later"})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Serve `app` on `listener` until `stop` is cancelled, then let open
/// connections finish for up to 10 s. Headers must arrive within
/// [`HEADER_READ_TIMEOUT`]; at most [`MAX_CONNECTIONS`] are open at once.
pub async fn serve(listener: TcpListener, app: Router, stop: CancellationToken) {
    // HTTP/1.1, as axum was built with; the header timeout needs a timer
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // out of file descriptors and the like: wait, do not spin
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN:?}; closing them");
    }
}
