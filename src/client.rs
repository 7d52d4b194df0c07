//! A small client for the control plane's admin API, used by the admin commands
//! (`domicile region|workspace|fleet|token`) and by tests.

use anyhow::Context;
use bytes::Bytes;
use domicile_wire::ErrorBody;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The default control-plane URL (what `domicile control-plane` listens on by default).
pub const DEFAULT_URL: &str = "http://127.0.0.1:7700";

/// An API error the control plane answered with.
#[derive(Debug, thiserror::Error)]
#[error("{status} {code}: {message}{}", lines_text(.lines))]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub lines: Vec<domicile_wire::LineError>,
}

fn lines_text(lines: &[domicile_wire::LineError]) -> String {
    lines
        .iter()
        .map(|l| format!("\n  line {}: {} ({})", l.line, l.message, l.code))
        .collect()
}

#[derive(Clone)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

fn connector(tls: rustls::ClientConfig) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http)
}

impl AdminClient {
    /// A client for a cleartext (`http://`) control plane.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let tls = domicile_certs::client::trusting_nothing();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            client: Client::builder(TokioExecutor::new()).build(connector(tls)),
        }
    }

    /// A client for an `https://` control plane whose certificate `ca` signed, presenting
    /// `client` (mTLS) when given.
    pub fn with_tls(
        base: &str,
        token: Option<String>,
        ca: &std::path::Path,
        client: Option<&domicile_certs::CertSource>,
    ) -> anyhow::Result<Self> {
        let config = domicile_certs::client::client_config(ca, client, Vec::new())?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            client: Client::builder(TokioExecutor::new()).build(connector((*config).clone())),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request; a non-2xx answer becomes an [`ApiError`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> anyhow::Result<Bytes> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some((bytes, content_type)) => {
                request = request.header(header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body)).context("invalid request")?;
        let response = self
            .client
            .request(request)
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{method} {path}: the answer was cut off"))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => ApiError {
                status,
                code: e.error.code,
                message: e.error.message,
                lines: e.error.lines,
            }
            .into(),
            Err(_) => anyhow::anyhow!(
                "{method} {path}: {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ),
        })
    }

    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let bytes = self.send(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).context("the control plane answered with invalid JSON")
    }

    pub async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let bytes = self
            .send(
                method,
                path,
                Some((Bytes::from(body.to_string()), "application/json")),
            )
            .await?;
        serde_json::from_slice(&bytes).context("the control plane answered with invalid JSON")
    }
}

/// Percent-encodes a query value.
pub fn q(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}
