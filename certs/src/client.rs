//! TLS from the edge to an origin or to the control plane: trust one CA, optionally present a
//! client certificate, and check the peer's identity.
//!
//! An origin is checked against the identity of its region (`eu.region.example.com`, say), not
//! against the address dialled: the name sent as SNI and verified in the certificate is that
//! identity. An origin of another region, even one signed by the same CA and listening at the
//! right address, presents a certificate without it and the handshake fails before a byte of
//! the request is written. [`classify`] tells that case apart from other TLS failures.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig};

use crate::pem::{self, CertError};
use crate::server::CertSource;

/// A client configuration trusting only the CAs in `ca`, presenting `client` if given, and
/// offering `alpn`. Sessions are resumed (rustls keeps 256 per configuration).
pub fn client_config(
    ca: &Path,
    client: Option<&CertSource>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ClientConfig>, CertError> {
    let roots = pem::load_roots(ca)?;
    let builder = ClientConfig::builder_with_provider(pem::provider())
        .with_protocol_versions(pem::VERSIONS)
        .map_err(|e| CertError::Setup(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match client {
        Some(source) => {
            let loaded = pem::load_pair(&source.cert, &source.key, &pem::provider())?;
            let key = pem::load_key(&source.key)?;
            builder
                .with_client_auth_cert(loaded.key.cert.clone(), key)
                .map_err(|e| CertError::BadKey {
                    path: source.key.clone(),
                    detail: e.to_string(),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// A configuration that trusts no server: for a connector that is only ever given `http://`
/// URLs but must be built with one.
pub fn trusting_nothing() -> ClientConfig {
    ClientConfig::builder_with_provider(pem::provider())
        .with_protocol_versions(pem::VERSIONS)
        .unwrap_or_else(|e| unreachable!("aws-lc-rs supports TLS 1.3 and 1.2: {e}"))
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

/// A DNS name or IP address to verify a peer against.
pub fn server_name(identity: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(identity.to_owned())
        .map_err(|_| format!("{identity:?} is not a DNS name or IP address"))
}

/// Why a TLS handshake with a peer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The peer's certificate is valid but not for the identity expected: for an origin, it
    /// is not in the region it should be in.
    WrongIdentity {
        expected: String,
        presented: Vec<String>,
    },
    /// The peer's certificate was refused for another reason (expired, not yet valid, an
    /// unknown CA, revoked, a bad signature).
    Certificate(String),
    /// The handshake failed otherwise (an alert from the peer, no common protocol version,
    /// the connection closed).
    Other(String),
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeFailure::WrongIdentity {
                expected,
                presented,
            } if presented.is_empty() => write!(f, "the certificate is not for {expected}"),
            HandshakeFailure::WrongIdentity {
                expected,
                presented,
            } => write!(
                f,
                "the certificate is for {} and not for {expected}",
                presented.join(", ")
            ),
            HandshakeFailure::Certificate(detail) => write!(f, "certificate refused: {detail}"),
            HandshakeFailure::Other(detail) => write!(f, "TLS handshake failed: {detail}"),
        }
    }
}

/// What a failed `tokio_rustls` connect means.
pub fn classify(error: &io::Error, expected: &str) -> HandshakeFailure {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    classify_tls(tls, expected).unwrap_or_else(|| HandshakeFailure::Other(error.to_string()))
}

/// The TLS failure somewhere in an error's source chain (a client library's error wrapping
/// the handshake's), if there is one.
pub fn find_in_chain(
    error: &(dyn std::error::Error + 'static),
    expected: &str,
) -> Option<HandshakeFailure> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return classify_tls(Some(tls), expected);
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            let tls = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            if tls.is_some() {
                return classify_tls(tls, expected);
            }
        }
        next = e.source();
    }
    None
}

/// `DnsName("eu.region.example.test")` (rustls's rendering of a presented name) ->
/// `eu.region.example.test`.
fn presented_name(rendered: &str) -> String {
    let inner = rendered
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or(rendered);
    inner.trim_matches('"').to_owned()
}

fn classify_tls(tls: Option<&rustls::Error>, expected: &str) -> Option<HandshakeFailure> {
    Some(match tls? {
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => {
            HandshakeFailure::WrongIdentity {
                expected: expected.to_owned(),
                presented: Vec::new(),
            }
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            presented,
            ..
        }) => HandshakeFailure::WrongIdentity {
            expected: expected.to_owned(),
            presented: presented.iter().map(|p| presented_name(p)).collect(),
        },
        rustls::Error::InvalidCertificate(e) => HandshakeFailure::Certificate(e.to_string()),
        e => HandshakeFailure::Other(e.to_string()),
    })
}
