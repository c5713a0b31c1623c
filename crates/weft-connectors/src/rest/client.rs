//! One page request with the source's auth, rate limit and retries.
//!
//! - Network errors, timeouts, 408 and 5xx: wait (exponential backoff from
//!   [`INITIAL_BACKOFF`], doubled per attempt, capped at `max_backoff`) and
//!   send the same request again, up to [`MAX_ATTEMPTS`] attempts; then the
//!   poll fails and the next poll starts again from the checkpoint.
//! - 429 and 503 with `Retry-After` (delay seconds or an HTTP date): wait
//!   exactly that long (capped at [`MAX_RETRY_AFTER`]); without it, back off.
//! - 401 with OAuth2: drop the cached token, get a new one, and send once
//!   more; a second 401 fails the poll.
//! - Other statuses fail the poll with the status and the start of the body.
//!
//! Every wait ends early on shutdown.

use std::num::NonZeroU32;
use std::time::{Duration, SystemTime};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::{ACCEPT, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use weft_core::config::raw::RestRateLimit;

use super::PollError;
use super::auth::Auth;

/// Attempts per page before the poll gives up.
pub const MAX_ATTEMPTS: u32 = 10;
/// First retry delay.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Longest `Retry-After` honoured as given.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Largest response body read.
pub const MAX_BODY_BYTES: usize = 64 << 20;

pub(crate) struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) method: Method,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Option<Value>,
    pub(crate) auth: Auth,
    pub(crate) limiter: Option<DefaultDirectRateLimiter>,
    pub(crate) max_backoff: Duration,
}

/// A successful response.
pub(crate) struct Fetched {
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

enum Attempt {
    Done(Fetched),
    /// Wait this long (or the backoff when `None`) and try again.
    Retry(Option<Duration>, String),
    /// Get a new token and try again at once (once).
    Reauth(weft_core::config::Secret),
}

impl Client {
    pub(crate) fn build_headers(
        headers: &std::collections::BTreeMap<String, weft_core::config::Secret>,
    ) -> Result<HeaderMap, String> {
        let mut map = HeaderMap::new();
        map.insert(ACCEPT, HeaderValue::from_static("application/json"));
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("`{k}` is not a header name"))?;
            let mut value = HeaderValue::from_str(v.expose())
                .map_err(|_| format!("the value of header `{k}` is not a valid header value"))?;
            value.set_sensitive(true);
            map.insert(name, value);
        }
        Ok(map)
    }

    pub(crate) fn limiter(rl: Option<&RestRateLimit>) -> Option<DefaultDirectRateLimiter> {
        let rl = rl?;
        let burst = NonZeroU32::new(rl.burst.unwrap_or(1)).unwrap_or(NonZeroU32::MIN);
        let quota = match (rl.per_second, rl.per_minute) {
            (Some(n), _) => Quota::per_second(NonZeroU32::new(n)?),
            (None, Some(n)) => Quota::per_minute(NonZeroU32::new(n)?),
            (None, None) => return None,
        };
        Some(RateLimiter::direct(quota.allow_burst(burst)))
    }

    /// GET (or POST) `url` until it succeeds, the attempts run out, the
    /// answer is a permanent failure, or `shutdown` is cancelled.
    pub(crate) async fn fetch(
        &self,
        url: &Url,
        shutdown: &CancellationToken,
    ) -> Result<Fetched, PollError> {
        let shown = display_url(url, self.auth.query_param().map(|q| q.0));
        let mut reauthed = false;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if let Some(l) = &self.limiter {
                tokio::select! {
                    _ = l.until_ready() => {}
                    _ = shutdown.cancelled() => return Err(PollError::Shutdown),
                }
            }
            let outcome = tokio::select! {
                a = self.attempt(url, &shown) => a?,
                _ = shutdown.cancelled() => return Err(PollError::Shutdown),
            };
            let (wait, why) = match outcome {
                Attempt::Done(f) => return Ok(f),
                Attempt::Reauth(used) if !reauthed => {
                    reauthed = true;
                    if let Auth::OAuth2(o) = &self.auth {
                        o.invalidate(&used).await;
                    }
                    tracing::info!(url = %shown, "401 with a cached OAuth2 token: fetching a new token and retrying once");
                    attempt -= 1;
                    continue;
                }
                Attempt::Reauth(_) => {
                    return Err(PollError::Http(format!(
                        "{} {shown} answered 401 Unauthorized again with a fresh OAuth2 token",
                        self.method
                    )));
                }
                Attempt::Retry(wait, why) => (wait, why),
            };
            if attempt >= MAX_ATTEMPTS {
                return Err(PollError::Http(format!(
                    "{} {shown}: giving up after {attempt} attempts: {why}",
                    self.method
                )));
            }
            let wait = match wait {
                Some(w) => w.min(MAX_RETRY_AFTER),
                None => backoff(attempt, self.max_backoff),
            };
            tracing::warn!(url = %shown, attempt, wait_ms = wait.as_millis() as u64, error = %why, "request failed; retrying the same page");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return Err(PollError::Shutdown),
            }
        }
    }

    /// One attempt, no retry (`weft check`): the page, or why not.
    pub(crate) async fn fetch_once(&self, url: &Url) -> Result<Fetched, String> {
        let shown = display_url(url, self.auth.query_param().map(|q| q.0));
        match self.attempt(url, &shown).await {
            Ok(Attempt::Done(f)) => Ok(f),
            Ok(Attempt::Retry(_, why)) => Err(why),
            Ok(Attempt::Reauth(_)) => Err(format!(
                "{} {shown} answered 401 Unauthorized with the OAuth2 token",
                self.method
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn attempt(&self, url: &Url, shown: &str) -> Result<Attempt, PollError> {
        let token = match &self.auth {
            Auth::OAuth2(o) => match o.token(&self.http).await {
                Ok(t) => Some(t),
                Err(e) if e.retryable => return Ok(Attempt::Retry(e.retry_after, e.message)),
                Err(e) => return Err(PollError::Http(e.message)),
            },
            _ => None,
        };
        let mut rb = self
            .http
            .request(self.method.clone(), url.clone())
            .headers(self.headers.clone());
        if let Some(b) = &self.body {
            rb = rb.json(b);
        }
        let rb = self
            .auth
            .apply(rb, token.as_ref())
            .map_err(PollError::Http)?;
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => {
                return Ok(Attempt::Retry(
                    None,
                    format!("{} {shown} failed: {}", self.method, error_chain(&e)),
                ));
            }
        };
        let status = resp.status();
        if status.is_success() {
            return match read_limited(resp).await {
                Ok((headers, body)) => Ok(Attempt::Done(Fetched { headers, body })),
                Err(m) => Ok(Attempt::Retry(
                    None,
                    format!("{} {shown}: reading the body failed: {m}", self.method),
                )),
            };
        }
        if status == StatusCode::UNAUTHORIZED
            && let Some(t) = token
        {
            return Ok(Attempt::Reauth(t));
        }
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                parse_retry_after(resp.headers())
            }
            _ => None,
        };
        let body = snippet(&resp.bytes().await.unwrap_or_default());
        let why = format!("{} {shown} answered {status}: {body}", self.method);
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            Ok(Attempt::Retry(retry_after, why))
        } else {
            Err(PollError::Http(why))
        }
    }
}

/// Exponential backoff for attempt `n` (from 1), capped.
pub(crate) fn backoff(n: u32, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(20));
    INITIAL_BACKOFF.saturating_mul(factor).min(max)
}

async fn read_limited(mut resp: reqwest::Response) -> Result<(HeaderMap, bytes::Bytes), String> {
    let headers = std::mem::take(resp.headers_mut());
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if buf.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(format!("the body is larger than {MAX_BODY_BYTES} bytes"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((headers, buf.freeze()))
}

/// `Retry-After` as delay seconds or an HTTP date (a past date is zero).
pub(crate) fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// At most 200 characters of a body, on one line.
pub(crate) fn snippet(b: &[u8]) -> String {
    let text = String::from_utf8_lossy(b);
    let t = text.trim();
    let mut out: String = t
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if t.chars().count() > 200 {
        out.push('…');
    }
    if out.is_empty() {
        out.push_str("(empty body)");
    }
    out
}

/// A URL fit for logs: no user info, and the API key parameter masked.
pub(crate) fn display_url(url: &Url, secret_param: Option<&str>) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if let Some(p) = secret_param
        && u.query_pairs().any(|(k, _)| k == p)
    {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == p {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// An error and its causes, `: `-separated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let max = Duration::from_secs(2);
        assert_eq!(backoff(1, max), Duration::from_millis(250));
        assert_eq!(backoff(2, max), Duration::from_millis(500));
        assert_eq!(backoff(4, max), Duration::from_secs(2));
        assert_eq!(backoff(100, max), Duration::from_secs(2));
    }

    #[test]
    fn urls_in_logs_hide_secrets() {
        let u = Url::parse("https://u:p@h/x?a=1&api_key=SECRET").unwrap();
        let s = display_url(&u, Some("api_key"));
        assert!(!s.contains("SECRET") && !s.contains("u:p"), "{s}");
        assert!(s.contains("a=1"), "{s}");
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(3)));
        let at = SystemTime::now() + Duration::from_secs(120);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(at)).unwrap(),
        );
        let d = parse_retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h), None);
    }
}
