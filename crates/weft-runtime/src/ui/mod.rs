//! The web dashboard under `/ui/` on the admin listener: server-rendered
//! HTML (`maud`, escaped by default), inline CSS, inline SVG sparklines, a
//! few lines of inline JavaScript (a job's progress, the payload editor's
//! JSON check). No build step, nothing loaded from elsewhere.
//!
//! Access: `/ui/login` takes the admin token (`server.admin_token`) and
//! opens a session (see [`session`]); every other page redirects there
//! without one. Every POST needs the session's CSRF token as well (form
//! field `csrf` or header `x-csrf-token`) and, when the browser sends an
//! `Origin`, one naming this host. Without an admin token the dashboard is
//! off and says how to turn it on.
//!
//! Screens (the `NAV` entries): flows overview, record inspector, DLQ
//! (filter, preview, bulk jobs, edit and replay), system (drift, sources
//! and their positions, destinations and their breakers), queues (manual
//! conflicts and fuzzy matches, read-only; sagas will add theirs there).
//! Store reads run on blocking threads; replays, discards and jobs go
//! through [`crate::dlq`] and [`crate::dlq_jobs`], as the API's do.

// Handlers answer with a `Response` either way.
#![allow(clippy::result_large_err)]

mod pages;
pub mod series;
pub mod session;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use weft_core::config::Config;
use weft_store::Journal;

pub use series::Series;

use crate::dlq_jobs::Jobs;
use crate::guard::Guard;
use crate::health::Health;
use session::{Session, Sessions};

/// Largest form body (an edited payload included).
pub const MAX_FORM_BYTES: usize = 8 * 1024 * 1024;

/// What the dashboard reads besides the store.
pub struct Parts {
    pub config: Arc<Config>,
    pub journal: Arc<dyn Journal>,
    pub jobs: Arc<Jobs>,
    pub guards: Vec<(String, Arc<Guard>)>,
    pub health: Arc<Health>,
    pub series: Arc<Series>,
}

#[derive(Clone)]
pub(crate) struct Ui(Arc<Inner>);

pub(crate) struct Inner {
    pub parts: Parts,
    pub sessions: Sessions,
    pub started_ms: i64,
}

impl std::ops::Deref for Ui {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The nav: (path, label). Later queues get an entry here.
const NAV: &[(&str, &str)] = &[
    ("/ui/", "Flows"),
    ("/ui/records", "Records"),
    ("/ui/dlq", "DLQ"),
    ("/ui/system", "System"),
    ("/ui/queues", "Queues"),
];

/// The `/ui` routes.
pub fn router(parts: Parts) -> Router {
    let ui = Ui(Arc::new(Inner {
        parts,
        sessions: Sessions::default(),
        started_ms: weft_store::now_ms(),
    }));
    let open = Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/login", get(login_page).post(login))
        .with_state(ui.clone());
    let guarded = Router::new()
        .route("/ui/", get(pages::overview))
        .route("/ui/records", get(pages::records))
        .route("/ui/dlq", get(pages::dlq))
        .route("/ui/dlq/jobs", post(pages::job_start))
        .route("/ui/dlq/jobs/{id}", get(pages::job_page))
        .route("/ui/dlq/jobs/{id}/progress", get(pages::job_progress))
        .route("/ui/dlq/jobs/{id}/cancel", post(pages::job_cancel))
        .route("/ui/dlq/{id}", get(pages::dlq_entry))
        .route("/ui/dlq/{id}/replay", post(pages::dlq_replay))
        .route("/ui/dlq/{id}/discard", post(pages::dlq_discard))
        .route("/ui/system", get(pages::system))
        .route("/ui/drift/{id}/accept", post(pages::drift_accept))
        .route("/ui/queues", get(pages::queues))
        .route("/ui/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(ui.clone(), guard))
        .with_state(ui);
    open.merge(guarded)
}

/// Sessions and CSRF: a GET without a session goes to the login page; a
/// POST without one, or without its CSRF token, is refused.
async fn guard(State(ui): State<Ui>, req: Request, next: Next) -> Response {
    if ui.parts.config.server.admin_token.is_none() {
        return Redirect::to("/ui/login").into_response();
    }
    let cookie = req
        .headers()
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok());
    let Some((id, session)) = ui.sessions.get(cookie) else {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            return Redirect::to("/ui/login").into_response();
        }
        return refuse(StatusCode::FORBIDDEN, "not logged in: open /ui/login");
    };
    let mut req = req;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        if !same_origin(req.headers()) {
            return refuse(
                StatusCode::FORBIDDEN,
                "a request from another origin is refused",
            );
        }
        let from_header = req
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_FORM_BYTES).await {
            Ok(b) => b,
            Err(_) => {
                return refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the form is larger than 8 MiB",
                );
            }
        };
        let from_form = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .ok()
            .and_then(|kv| kv.into_iter().find(|(k, _)| k == "csrf").map(|(_, v)| v));
        let given = from_header.or(from_form).unwrap_or_default();
        if !session::same(&session.csrf, &given) {
            return refuse(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token: reload the page and try again",
            );
        }
        req = Request::from_parts(parts, axum::body::Body::from(bytes));
    }
    req.extensions_mut().insert(SessionId(id));
    req.extensions_mut().insert(session);
    let mut r = next.run(req).await;
    // pages show stored data: never cached, never framed
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

/// Inline style and script only; nothing from elsewhere; no framing.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'";

#[derive(Clone)]
pub(crate) struct SessionId(pub String);

/// `Origin`, when sent, names the host the request came to.
fn same_origin(h: &HeaderMap) -> bool {
    let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o == h)
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (
        status,
        Html(
            layout_bare(
                "Refused",
                html! { p.error { (why) } p { a href="/ui/login" { "Log in" } } },
            )
            .into_string(),
        ),
    )
        .into_response()
}

async fn login_page(State(ui): State<Ui>) -> Response {
    let body = if ui.parts.config.server.admin_token.is_none() {
        html! {
            p.error { "The dashboard is disabled: no admin token is configured." }
            p { "Set " code { "server.admin_token" } " (at least 32 bytes, e.g. "
                code { "admin_token: ${WEFT_ADMIN_TOKEN}" } ") and restart weft; then log in here with that token." }
        }
    } else {
        login_form(None)
    };
    Html(layout_bare("Log in", body).into_string()).into_response()
}

fn login_form(error: Option<&str>) -> Markup {
    html! {
        @if let Some(e) = error { p.error #login-error { (e) } }
        form method="post" action="/ui/login" {
            label for="token" { "Admin token (" code { "server.admin_token" } ")" }
            input #token type="password" name="token" autocomplete="current-password" required autofocus;
            button type="submit" { "Log in" }
        }
    }
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(ui): State<Ui>, body: axum::body::Bytes) -> Response {
    let Some(token) = &ui.parts.config.server.admin_token else {
        return refuse(
            StatusCode::FORBIDDEN,
            "the dashboard is disabled: set server.admin_token",
        );
    };
    let given = serde_urlencoded::from_bytes::<LoginForm>(&body)
        .map(|f| f.token)
        .unwrap_or_default();
    if !session::same(token.expose(), &given) {
        let page = layout_bare("Log in", login_form(Some("Wrong token.")));
        return (StatusCode::UNAUTHORIZED, Html(page.into_string())).into_response();
    }
    let id = ui.sessions.create();
    let mut r = Redirect::to("/ui/").into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{}={id}; Path=/ui; HttpOnly; SameSite=Strict",
        session::COOKIE
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(
    State(ui): State<Ui>,
    axum::Extension(SessionId(id)): axum::Extension<SessionId>,
) -> Response {
    ui.sessions.remove(&id);
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("weft_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// A page with the nav and the logout button.
pub(crate) fn layout(title: &str, active: &str, s: &Session, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · weft" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    span.brand { "weft" }
                    nav {
                        @for (path, label) in NAV {
                            a href=(path) class=[(*path == active).then_some("active")] { (label) }
                        }
                    }
                    form.logout method="post" action="/ui/logout" {
                        input type="hidden" name="csrf" value=(s.csrf);
                        button type="submit" { "Log out" }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn layout_bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · weft" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header { span.brand { "weft" } }
                main.narrow { h1 { (title) } (body) }
            }
        }
    }
}

const CSS: &str = r#"
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330;background:#f5f6f8}
header{display:flex;align-items:center;gap:24px;padding:10px 20px;background:#1d2330;color:#fff}
.brand{font-weight:700;font-size:18px;letter-spacing:.5px}
nav a{color:#c9d1e0;text-decoration:none;margin-right:16px;padding:4px 0}
nav a.active,nav a:hover{color:#fff;border-bottom:2px solid #6ea8fe}
form.logout{margin-left:auto}
main{padding:16px 20px;max-width:1400px}
main.narrow{max-width:520px}
h1{font-size:20px;margin:4px 0 14px}
h2{font-size:16px;margin:22px 0 8px}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.08)}
th,td{text-align:left;padding:6px 9px;border-bottom:1px solid #e6e8ec;vertical-align:top}
th{background:#eef0f4;font-weight:600;font-size:12px;text-transform:uppercase;color:#4a5264}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#137333}.late,.error,.bad{color:#b3261e}.warn{color:#a15c00}
.pill{display:inline-block;white-space:nowrap;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.pill.ok{background:#e6f4ea}.pill.bad{background:#fce8e6}.pill.warn{background:#fef7e0}
svg.spark{vertical-align:middle}svg.spark path{fill:none;stroke:#3b6fd8;stroke-width:1.5}
svg.spark circle{fill:#3b6fd8}svg.spark line.flat{stroke:#c0c4cc}
pre{background:#fff;border:1px solid #e6e8ec;padding:8px;overflow:auto;max-height:320px;font-size:12px}
form.inline{display:inline}
form.filters{display:flex;gap:8px;flex-wrap:wrap;align-items:end;margin-bottom:12px}
label{display:block;font-size:12px;color:#4a5264}
input,select,textarea,button{font:inherit}
input[type=text],input[type=password],input[type=number],textarea{padding:5px 7px;border:1px solid #c0c4cc;border-radius:4px}
textarea{width:100%;min-height:200px;font-family:ui-monospace,monospace;font-size:12px}
button{padding:5px 12px;border:1px solid #3b6fd8;background:#3b6fd8;color:#fff;border-radius:4px;cursor:pointer}
button.secondary{background:#fff;color:#3b6fd8}button.danger{background:#b3261e;border-color:#b3261e}
.bar{height:14px;background:#e6e8ec;border-radius:7px;overflow:hidden;width:100%;max-width:600px}
.bar>div{height:100%;background:#3b6fd8}
.muted{color:#6b7385}.small{font-size:12px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:14px}
.card{background:#fff;padding:10px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08);min-width:140px}
.card b{display:block;font-size:20px}
ol.path{padding-left:18px}ol.path li{margin-bottom:6px}
"#;
