//! Authentication of the REST source's requests, with the OAuth2 client
//! credentials token cached until it expires.

use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{RequestBuilder, Url};
use serde_json::Value;
use tokio::sync::Mutex;
use weft_core::config::Secret;
use weft_core::config::raw::{RestAuth, RestClientAuth};

/// Renew a token this long before the server says it expires (at most a
/// tenth of its lifetime).
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

pub(crate) enum Auth {
    None,
    HeaderKey { name: String, value: Secret },
    QueryKey { name: String, value: Secret },
    Bearer(Secret),
    Basic { username: String, password: Secret },
    OAuth2(OAuth2),
}

pub(crate) struct OAuth2 {
    token_url: Url,
    client_id: String,
    client_secret: Secret,
    scope: Option<String>,
    client_auth: RestClientAuth,
    cached: Mutex<Option<Token>>,
}

#[derive(Clone)]
struct Token {
    value: Secret,
    /// `None`: the server gave no lifetime; used until a 401.
    expires: Option<Instant>,
}

/// Why no token could be had.
pub(crate) struct TokenError {
    pub retryable: bool,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl Auth {
    pub(crate) fn from_config(a: Option<&RestAuth>) -> Result<Auth, String> {
        Ok(match a {
            None => Auth::None,
            Some(RestAuth::ApiKey(k)) => match (&k.header, &k.query) {
                (Some(h), _) => Auth::HeaderKey {
                    name: h.clone(),
                    value: k.value.clone(),
                },
                (None, Some(q)) => Auth::QueryKey {
                    name: q.clone(),
                    value: k.value.clone(),
                },
                (None, None) => return Err("api_key needs `header` or `query`".into()),
            },
            Some(RestAuth::Bearer(t)) => Auth::Bearer(t.clone()),
            Some(RestAuth::Basic(b)) => Auth::Basic {
                username: b.username.clone(),
                password: b.password.clone(),
            },
            Some(RestAuth::Oauth2ClientCredentials(o)) => Auth::OAuth2(OAuth2 {
                token_url: Url::parse(o.token_url.value.trim())
                    .map_err(|e| format!("token_url `{}`: {e}", o.token_url.value))?,
                client_id: o.client_id.clone(),
                client_secret: o.client_secret.clone(),
                scope: o.scope.clone(),
                client_auth: o.client_auth.unwrap_or(RestClientAuth::Basic),
                cached: Mutex::new(None),
            }),
        })
    }

    /// The query parameter carrying an API key, to add to every URL.
    pub(crate) fn query_param(&self) -> Option<(&str, &str)> {
        match self {
            Auth::QueryKey { name, value } => Some((name, value.expose())),
            _ => None,
        }
    }

    /// Add the credentials to a request; `token` is the OAuth2 access token.
    pub(crate) fn apply(
        &self,
        rb: RequestBuilder,
        token: Option<&Secret>,
    ) -> Result<RequestBuilder, String> {
        Ok(match self {
            Auth::None | Auth::QueryKey { .. } => rb,
            Auth::HeaderKey { name, value } => rb.header(
                name.as_str(),
                sensitive(value.expose()).map_err(|_| {
                    format!("the API key for header `{name}` is not a valid header value")
                })?,
            ),
            Auth::Bearer(t) => rb.header(
                AUTHORIZATION,
                sensitive(&format!("Bearer {}", t.expose()))
                    .map_err(|_| "the bearer token is not a valid header value".to_owned())?,
            ),
            Auth::Basic { username, password } => rb.basic_auth(username, Some(password.expose())),
            Auth::OAuth2(_) => match token {
                Some(t) => rb.header(
                    AUTHORIZATION,
                    sensitive(&format!("Bearer {}", t.expose()))
                        .map_err(|_| "the access token is not a valid header value".to_owned())?,
                ),
                None => rb,
            },
        })
    }
}

fn sensitive(v: &str) -> Result<HeaderValue, reqwest::header::InvalidHeaderValue> {
    let mut h = HeaderValue::from_str(v)?;
    h.set_sensitive(true);
    Ok(h)
}

impl OAuth2 {
    /// The cached token, or a new one from the token endpoint.
    pub(crate) async fn token(&self, client: &reqwest::Client) -> Result<Secret, TokenError> {
        let mut cached = self.cached.lock().await;
        if let Some(t) = cached.as_ref()
            && t.expires.is_none_or(|e| Instant::now() < e)
        {
            return Ok(t.value.clone());
        }
        let t = self.fetch(client).await?;
        let v = t.value.clone();
        *cached = Some(t);
        Ok(v)
    }

    /// Forget `used` (the server refused it); a later `token` fetches anew.
    pub(crate) async fn invalidate(&self, used: &Secret) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|t| &t.value == used) {
            *cached = None;
        }
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<Token, TokenError> {
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        if let Some(s) = &self.scope {
            form.push(("scope", s));
        }
        let mut rb = client.post(self.token_url.clone());
        match self.client_auth {
            RestClientAuth::Basic => {
                rb = rb.basic_auth(
                    form_encode(&self.client_id),
                    Some(form_encode(self.client_secret.expose())),
                );
            }
            RestClientAuth::Body => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", self.client_secret.expose()));
            }
        }
        let started = Instant::now();
        let url = super::client::display_url(&self.token_url, None);
        let resp = rb
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| TokenError {
                retryable: true,
                message: format!(
                    "token request to {url} failed: {}",
                    super::client::error_chain(&e)
                ),
                retry_after: None,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = super::client::parse_retry_after(resp.headers());
            let body = super::client::snippet(&resp.bytes().await.unwrap_or_default());
            return Err(TokenError {
                retryable: status.is_server_error() || status.as_u16() == 429,
                message: format!("token endpoint {url} answered {status}: {body}"),
                retry_after,
            });
        }
        let bytes = resp.bytes().await.map_err(|e| TokenError {
            retryable: true,
            message: format!("reading the token response from {url} failed: {e}"),
            retry_after: None,
        })?;
        let bad = |m: String| TokenError {
            retryable: false,
            message: format!("token endpoint {url}: {m}"),
            retry_after: None,
        };
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("the response is not JSON: {e}")))?;
        let token = match v.get("access_token") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(bad("the response has no `access_token`".into())),
        };
        let lifetime = match v.get("expires_in") {
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.parse::<f64>().ok(),
            _ => None,
        }
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64);
        let expires = lifetime.map(|l| started + l - EXPIRY_MARGIN.min(l / 10));
        tracing::debug!(token_url = %url, lifetime = ?lifetime, "fetched an OAuth2 access token");
        Ok(Token {
            value: Secret::new(token),
            expires,
        })
    }
}

/// RFC 6749 §2.3.1: client id and secret are form-encoded before basic auth.
fn form_encode(s: &str) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const FORM: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'*');
    utf8_percent_encode(s, FORM).to_string()
}
