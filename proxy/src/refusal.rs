//! Refusal codes: the public interface of every request Domicile does not forward.
//!
//! Every error on the request path maps to exactly one [`RefusalCode`] here, and every refusal
//! is answered the same way: the code's status, header `x-domicile-refusal`, and the JSON body
//! `{"error":{"code", "message", "workspace", "request_id"}}`.

use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

/// Header carrying the refusal code on every refusal.
pub const REFUSAL_HEADER: &str = "x-domicile-refusal";

macro_rules! refusal_codes {
    ($( $variant:ident => $code:literal, $status:expr; )*) => {
        /// Why a request was not forwarded (or why forwarding failed).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum RefusalCode { $( $variant, )* }

        impl RefusalCode {
            /// Every code, in a fixed order (used to index metrics).
            pub const ALL: &'static [RefusalCode] = &[$( RefusalCode::$variant, )*];

            /// The wire name of the code.
            pub const fn as_str(self) -> &'static str {
                match self { $( RefusalCode::$variant => $code, )* }
            }

            /// The HTTP status a refusal with this code is answered with.
            pub const fn status(self) -> StatusCode {
                match self { $( RefusalCode::$variant => $status, )* }
            }
        }
    };
}

refusal_codes! {
    MissingWorkspace => "missing_workspace", StatusCode::BAD_REQUEST;
    InvalidWorkspace => "invalid_workspace", StatusCode::BAD_REQUEST;
    ConflictingWorkspace => "conflicting_workspace", StatusCode::BAD_REQUEST;
    UnknownWorkspace => "unknown_workspace", StatusCode::NOT_FOUND;
    MapUnavailable => "map_unavailable", StatusCode::SERVICE_UNAVAILABLE;
    RegionUnroutable => "region_unroutable", StatusCode::SERVICE_UNAVAILABLE;
    RegionUnavailable => "region_unavailable", StatusCode::SERVICE_UNAVAILABLE;
    WorkspaceMoving => "workspace_moving", StatusCode::SERVICE_UNAVAILABLE;
    WrongRegionEndpoint => "wrong_region_endpoint", StatusCode::MISDIRECTED_REQUEST;
    AuditUnavailable => "audit_unavailable", StatusCode::SERVICE_UNAVAILABLE;
    UpstreamError => "upstream_error", StatusCode::BAD_GATEWAY;
    UpstreamTimeout => "upstream_timeout", StatusCode::GATEWAY_TIMEOUT;
    UpstreamWrongRegion => "upstream_wrong_region", StatusCode::BAD_GATEWAY;
    UpstreamTls => "upstream_tls", StatusCode::BAD_GATEWAY;
    // Protocol-level refusals: the request itself breaks a limit or the HTTP rules.
    BadRequest => "bad_request", StatusCode::BAD_REQUEST;
    RequestTimeout => "request_timeout", StatusCode::REQUEST_TIMEOUT;
    BodyTooLarge => "body_too_large", StatusCode::PAYLOAD_TOO_LARGE;
    HeadersTooLarge => "headers_too_large", StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    Overloaded => "overloaded", StatusCode::SERVICE_UNAVAILABLE;
}

impl RefusalCode {
    /// Index of this code in [`RefusalCode::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The default human-readable message for this code.
    pub const fn default_message(self) -> &'static str {
        match self {
            RefusalCode::MissingWorkspace => "the request names no workspace",
            RefusalCode::InvalidWorkspace => "the workspace id is not valid",
            RefusalCode::ConflictingWorkspace => {
                "the request names more than one workspace; one request must touch one workspace"
            }
            RefusalCode::UnknownWorkspace => "no such workspace in the routing map",
            RefusalCode::MapUnavailable => "the routing map has not been loaded yet",
            RefusalCode::RegionUnroutable => {
                "the workspace's home region has no route at this edge"
            }
            RefusalCode::RegionUnavailable => {
                "no healthy endpoint in the workspace's home region; requests are never sent to another region"
            }
            RefusalCode::WorkspaceMoving => {
                "the workspace is moving to another region; writes resume shortly"
            }
            RefusalCode::WrongRegionEndpoint => {
                "the request reached another region's regional hostname"
            }
            RefusalCode::AuditUnavailable => "the routing decision cannot be audited",
            RefusalCode::UpstreamError => "the home region failed to answer",
            RefusalCode::UpstreamTimeout => "the home region did not answer in time",
            RefusalCode::UpstreamWrongRegion => {
                "the origin could not prove it is in the workspace's home region; nothing was sent to it"
            }
            RefusalCode::UpstreamTls => {
                "the TLS handshake with the home region's origin failed; nothing was sent to it"
            }
            RefusalCode::BadRequest => "the request is malformed",
            RefusalCode::RequestTimeout => "the request was not received in time",
            RefusalCode::BodyTooLarge => "the request body is larger than this route allows",
            RefusalCode::HeadersTooLarge => "the request headers are too large or too many",
            RefusalCode::Overloaded => "this edge is at its connection limit; retry shortly",
        }
    }
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal ready to be sent.
#[derive(Debug, Clone)]
pub struct Refusal<'a> {
    pub code: RefusalCode,
    pub message: std::borrow::Cow<'static, str>,
    pub workspace: Option<&'a str>,
    pub request_id: Option<&'a str>,
    /// Seconds for `Retry-After`, when the client should come back.
    pub retry_after: Option<u32>,
}

impl<'a> Refusal<'a> {
    pub fn new(code: RefusalCode) -> Self {
        Self {
            code,
            message: code.default_message().into(),
            workspace: None,
            request_id: None,
            retry_after: None,
        }
    }

    pub fn message(mut self, message: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        self.message = message.into();
        self
    }

    pub fn workspace(mut self, workspace: Option<&'a str>) -> Self {
        self.workspace = workspace;
        self
    }

    pub fn request_id(mut self, request_id: Option<&'a str>) -> Self {
        self.request_id = request_id;
        self
    }

    pub fn retry_after(mut self, seconds: Option<u32>) -> Self {
        self.retry_after = seconds;
        self
    }

    /// The JSON body bytes.
    pub fn body_bytes(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error": {
                "code": self.code.as_str(),
                "message": self.message,
                "workspace": self.workspace,
                "request_id": self.request_id,
            }
        });
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// The response's fields, the same in every protocol: content type, the refusal code, the
    /// request id and `Retry-After` when there are.
    fn fields(&self, mut field: impl FnMut(&'static str, &[u8])) {
        field("content-type", b"application/json");
        field(REFUSAL_HEADER, self.code.as_str().as_bytes());
        if let Some(id) = self.request_id {
            field("x-request-id", id.as_bytes());
        }
        if let Some(seconds) = self.retry_after {
            let mut digits = itoa::Buffer::new();
            field("retry-after", digits.format(seconds).as_bytes());
        }
    }

    /// The full HTTP/1.1 response as raw bytes, for refusals sent before a request was read
    /// (a connection over the limit, a head that never completed). Always closes.
    pub fn raw_http1(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_http1(&mut out, true, false);
        out
    }

    /// Appends the full HTTP/1.1 response to `out`; `close` adds `connection: close`,
    /// `head_only` leaves the body out (the answer to a HEAD request).
    pub fn write_http1(&self, out: &mut Vec<u8>, close: bool, head_only: bool) {
        let body = self.body_bytes();
        let status = self.code.status();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        self.fields(|name, value| {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        });
        out.extend_from_slice(b"content-length: ");
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(digits.format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&body);
        }
    }

    /// The response head for HTTP/2 (the body is [`Refusal::body_bytes`]).
    pub fn h2_head(&self, body_len: usize) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() = self.code.status();
        let headers: &mut HeaderMap = response.headers_mut();
        self.fields(|name, value| {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.append(HeaderName::from_static(name), value);
            }
        });
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_indexed() {
        let mut names: Vec<_> = RefusalCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RefusalCode::ALL.len());
        for (i, code) in RefusalCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i);
        }
    }

    #[test]
    fn responses_carry_code_status_and_json() {
        let refusal = Refusal::new(RefusalCode::WorkspaceMoving)
            .workspace(Some("acme"))
            .request_id(Some("r1"))
            .retry_after(Some(5));
        let body = refusal.body_bytes();
        let response = refusal.h2_head(body.len());
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[REFUSAL_HEADER], "workspace_moving");
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        assert_eq!(response.headers()["x-request-id"], "r1");
        let mut h1 = Vec::new();
        refusal.write_http1(&mut h1, false, false);
        let text = String::from_utf8(h1).unwrap();
        assert!(
            text.contains("x-domicile-refusal: workspace_moving\r\n"),
            "{text}"
        );
        assert!(text.contains("retry-after: 5\r\n"), "{text}");
        assert!(!text.contains("connection: close"), "{text}");
        let mut head_only = Vec::new();
        refusal.write_http1(&mut head_only, true, true);
        assert!(String::from_utf8(head_only)
            .unwrap()
            .ends_with("connection: close\r\n\r\n"));
        let body = Refusal::new(RefusalCode::UnknownWorkspace)
            .workspace(Some("nope"))
            .body_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "unknown_workspace");
        assert_eq!(v["error"]["workspace"], "nope");
        assert!(v["error"]["request_id"].is_null());
    }

    #[test]
    fn raw_http1_is_a_complete_response() {
        let raw = Refusal::new(RefusalCode::RequestTimeout).raw_http1();
        let text = String::from_utf8(raw).unwrap();
        assert!(text.starts_with("HTTP/1.1 408 Request Timeout\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(body.contains("request_timeout"));
    }
}
