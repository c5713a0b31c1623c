//! Webhook signature schemes.
//!
//! Today there is one scheme, [`Scheme::HmacSha256Hex`]: a header carries
//! the hex HMAC-SHA256 of the raw request body keyed with a shared secret,
//! optionally prefixed `sha256=` (the form GitHub's `X-Hub-Signature-256`
//! uses). Other schemes (Standard Webhooks, Stripe, ...) read more than one
//! header or sign more than the body, so a [`Verifier`] gets the whole
//! header map.
//!
//! Comparison is constant-time (`hmac::Mac::verify_slice`). Nothing here
//! logs, and errors never contain the secret or the body.

use axum::http::{HeaderMap, HeaderName};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use weft_core::config::Secret;

type HmacSha256 = Hmac<Sha256>;

/// How a sender signs its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Hex HMAC-SHA256 of the raw body in one header, optionally prefixed
    /// `sha256=`.
    HmacSha256Hex,
}

/// Why a request's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature header is absent.
    #[error("missing signature header `{0}`")]
    Missing(String),
    /// The header is there but is not in the scheme's format.
    #[error("malformed signature in header `{0}`: {1}")]
    Malformed(String, &'static str),
    /// Well formed, but not the signature of this body with our secret.
    #[error("signature in header `{0}` does not match the body")]
    Mismatch(String),
}

/// Checks requests against one secret with one scheme.
pub struct Verifier {
    scheme: Scheme,
    header: HeaderName,
    secret: Secret,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("scheme", &self.scheme)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier reading the signature from `header` (any case).
    pub fn new(scheme: Scheme, header: &str, secret: Secret) -> Result<Self, String> {
        let header = HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("`{header}` is not a valid header name"))?;
        Ok(Verifier {
            scheme,
            header,
            secret,
        })
    }

    /// The header the signature is read from.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Accept or reject a request given its headers and raw body.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), SignatureError> {
        match self.scheme {
            Scheme::HmacSha256Hex => {
                let name = self.header.as_str();
                let value = headers
                    .get(&self.header)
                    .ok_or_else(|| SignatureError::Missing(name.to_owned()))?;
                let value = value
                    .to_str()
                    .map_err(|_| SignatureError::Malformed(name.to_owned(), "not ASCII"))?;
                verify_hmac_sha256_hex(self.secret.expose().as_bytes(), body, value)
                    .map_err(|e| e.for_header(name))
            }
        }
    }
}

/// Check `signature` (hex, optionally prefixed `sha256=`, surrounding
/// whitespace ignored, hex digits in either case) against the HMAC-SHA256
/// of `body` keyed with `secret`. Errors name the header as `""`; callers
/// with a header name use [`Verifier`].
pub fn verify_hmac_sha256_hex(
    secret: &[u8],
    body: &[u8],
    signature: &str,
) -> Result<(), SignatureError> {
    let s = signature.trim();
    let s = s.strip_prefix("sha256=").unwrap_or(s);
    if s.is_empty() {
        return Err(SignatureError::Malformed(String::new(), "empty"));
    }
    let expected =
        hex::decode(s).map_err(|_| SignatureError::Malformed(String::new(), "not hexadecimal"))?;
    if expected.len() != 32 {
        return Err(SignatureError::Malformed(
            String::new(),
            "not 32 bytes (64 hex digits)",
        ));
    }
    let mut mac = HmacSha256::new_from_slice(secret)
        .map_err(|_| SignatureError::Malformed(String::new(), "unusable secret"))?;
    mac.update(body);
    mac.verify_slice(&expected)
        .map_err(|_| SignatureError::Mismatch(String::new()))
}

/// The hex HMAC-SHA256 of `body` keyed with `secret`, as a sender would
/// compute it (for tests and tooling).
pub fn sign_hmac_sha256_hex(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail; fall back to an
    // empty signature rather than panic.
    match HmacSha256::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

impl SignatureError {
    fn for_header(self, name: &str) -> Self {
        match self {
            SignatureError::Missing(_) => SignatureError::Missing(name.to_owned()),
            SignatureError::Malformed(_, why) => SignatureError::Malformed(name.to_owned(), why),
            SignatureError::Mismatch(_) => SignatureError::Mismatch(name.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";
    // GitHub's documented example for X-Hub-Signature-256.
    const GITHUB_EXAMPLE: &str = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn known_vector() {
        assert_eq!(sign_hmac_sha256_hex(SECRET, BODY), GITHUB_EXAMPLE);
        assert_eq!(verify_hmac_sha256_hex(SECRET, BODY, GITHUB_EXAMPLE), Ok(()));
    }

    #[test]
    fn prefix_case_and_whitespace_accepted() {
        let prefixed = format!("sha256={GITHUB_EXAMPLE}");
        assert_eq!(verify_hmac_sha256_hex(SECRET, BODY, &prefixed), Ok(()));
        let upper = GITHUB_EXAMPLE.to_ascii_uppercase();
        assert_eq!(verify_hmac_sha256_hex(SECRET, BODY, &upper), Ok(()));
        assert_eq!(
            verify_hmac_sha256_hex(SECRET, BODY, &format!(" {prefixed} ")),
            Ok(())
        );
    }

    #[test]
    fn wrong_body_secret_or_format_rejected() {
        assert!(matches!(
            verify_hmac_sha256_hex(SECRET, b"Hello, World?", GITHUB_EXAMPLE),
            Err(SignatureError::Mismatch(_))
        ));
        assert!(matches!(
            verify_hmac_sha256_hex(b"other", BODY, GITHUB_EXAMPLE),
            Err(SignatureError::Mismatch(_))
        ));
        assert!(matches!(
            verify_hmac_sha256_hex(SECRET, BODY, "zz"),
            Err(SignatureError::Malformed(..))
        ));
        assert!(matches!(
            verify_hmac_sha256_hex(SECRET, BODY, &GITHUB_EXAMPLE[..62]),
            Err(SignatureError::Malformed(..))
        ));
        assert!(matches!(
            verify_hmac_sha256_hex(SECRET, BODY, "sha256="),
            Err(SignatureError::Malformed(..))
        ));
        assert!(matches!(
            verify_hmac_sha256_hex(SECRET, BODY, &format!("sha1={GITHUB_EXAMPLE}")),
            Err(SignatureError::Malformed(..))
        ));
    }

    #[test]
    fn verifier_reads_its_header() {
        let v = Verifier::new(
            Scheme::HmacSha256Hex,
            "X-Signature-256",
            Secret::new("It's a Secret to Everybody"),
        )
        .unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(
            v.verify(&h, BODY),
            Err(SignatureError::Missing("x-signature-256".into()))
        );
        h.insert("x-signature-256", HeaderValue::from_static("sha256=00"));
        assert!(
            matches!(v.verify(&h, BODY), Err(SignatureError::Malformed(n, _)) if n == "x-signature-256")
        );
        h.insert(
            "x-signature-256",
            HeaderValue::from_str(&format!("sha256={GITHUB_EXAMPLE}")).unwrap(),
        );
        assert_eq!(v.verify(&h, BODY), Ok(()));
        assert_eq!(
            v.verify(&h, b"tampered"),
            Err(SignatureError::Mismatch("x-signature-256".into()))
        );
        // the secret never shows in Debug
        assert!(!format!("{v:?}").contains("Secret to"));
    }

    #[test]
    fn invalid_header_name_rejected() {
        assert!(Verifier::new(Scheme::HmacSha256Hex, "bad header", Secret::new("s")).is_err());
    }
}
