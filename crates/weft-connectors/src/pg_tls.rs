//! TLS to PostgreSQL (review P2-3), with rustls (ring), the one TLS stack of
//! the house style. The URL's `sslmode` decides, as in libpq:
//!
//! - `disable`: no TLS;
//! - `prefer` (the default) and `require`: TLS when the server offers it
//!   (`require`: or fail), the server's certificate **not** verified, like
//!   libpq without a root certificate: encryption against a passive
//!   listener, not against a man in the middle;
//! - `verify-full`: TLS required, the certificate verified against
//!   `sslrootcert` (a PEM file) or, without it, the Mozilla roots
//!   (webpki-roots), and the host name checked.
//!
//! `verify-full` and `sslrootcert` are read here and taken out of the URL
//! before tokio-postgres parses it (its parser knows `disable`, `prefer` and
//! `require` only). `verify-ca` is refused: rustls checks names; use
//! `verify-full`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A URL ready for tokio-postgres, and the TLS connector its `sslmode` asks for.
pub struct PgTls {
    pub url: String,
    pub connector: MakeRustlsConnect,
}

/// Read `sslmode` / `sslrootcert` from a `postgresql://` URL (a key=value
/// connection string is passed through: `disable`, `prefer`, `require`).
pub fn connector(url: &str) -> Result<PgTls, String> {
    let mut verify = false;
    let mut root: Option<String> = None;
    let mut out = url.to_owned();
    if let Ok(mut u) = reqwest::Url::parse(url)
        && matches!(u.scheme(), "postgres" | "postgresql")
    {
        let mut kept: Vec<(String, String)> = Vec::new();
        for (k, v) in u.query_pairs() {
            match (k.as_ref(), v.as_ref()) {
                ("sslmode", "verify-full") => {
                    verify = true;
                    kept.push(("sslmode".into(), "require".into()));
                }
                ("sslmode", "verify-ca") => {
                    return Err(
                        "sslmode=verify-ca is not supported: use verify-full (the host name is checked too)"
                            .into(),
                    );
                }
                ("sslrootcert", path) => root = Some(path.to_owned()),
                _ => kept.push((k.into_owned(), v.into_owned())),
            }
        }
        if kept.is_empty() {
            u.set_query(None);
        } else {
            u.query_pairs_mut().clear().extend_pairs(&kept);
        }
        out = u.to_string();
    }
    if root.is_some() && !verify {
        return Err("sslrootcert is used with sslmode=verify-full only".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let config = if verify {
        let mut roots = rustls::RootCertStore::empty();
        match &root {
            Some(path) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("sslrootcert `{path}`: {e}"))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("sslrootcert `{path}`: {e}"))?;
                if certs.is_empty() {
                    return Err(format!("sslrootcert `{path}` holds no certificate"));
                }
                for c in certs {
                    roots
                        .add(c)
                        .map_err(|e| format!("sslrootcert `{path}`: {e}"))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth()
    };
    Ok(PgTls {
        url: out,
        connector: MakeRustlsConnect::new(config),
    })
}

/// `prefer` / `require`: the handshake's signatures are checked (so the
/// session is encrypted to whoever holds the key), the certificate chain
/// and name are not (libpq's behaviour without a root certificate).
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
