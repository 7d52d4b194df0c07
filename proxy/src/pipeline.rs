//! The request path: identify -> map -> decide -> forward, one request at a time.
//!
//! [`Pipeline::handle`] is the whole data plane for one request and can be called without any
//! socket (tests and benchmarks do). `forward` only ever sends to endpoints of the region that
//! `decide` chose; when that region cannot answer, the client gets a refusal, never another
//! region.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::audit::{Audit, Begin, Description, Entry, Identity as AuditIdentity};
use crate::body::{BodyFate, Fate, Guarded};
use crate::config::{ProxyConfig, Unidentified, UpstreamProtocol};
use crate::connpool::{PooledBody, SendError};
use crate::decide::{decide, Decision, Forward, Policy, RequestFacts};
use crate::framing::Violation;
use crate::geoip::GeoIp;
use crate::headers::{
    self, Peer, X_DOMICILE_EPOCH, X_DOMICILE_MAP_VERSION, X_DOMICILE_REGION, X_DOMICILE_WORKSPACE,
    X_REQUEST_ID,
};
use crate::identify::{normalized_path, Headers, Identifier, Identity, RequestView};
use crate::inflight::InFlightGuard;
use crate::map::{Lookup, RegionIdx, Replica};
use crate::metrics::Metrics;
use crate::refusal::{ProxyBody, Refusal, RefusalCode};
use crate::upstream::{RegionPool, RouteView, Upstreams};

/// Everything the request path needs, shared by every connection.
pub struct Pipeline {
    pub config: Arc<ProxyConfig>,
    pub identifier: Identifier,
    pub replica: Arc<Replica>,
    pub upstreams: Upstreams,
    pub geoip: Option<Arc<GeoIp>>,
    pub policy: Policy,
    pub metrics: Metrics,
    /// The routing audit log, when `[audit]` is configured.
    pub audit: Option<Audit>,
    /// The HTTPS listener's certificates and rustls configuration, when `[tls]` is configured.
    pub edge_tls: Option<Arc<domicile_certs::ServerTls>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").finish_non_exhaustive()
    }
}

/// [`is_safe`] for a method token as received.
pub(crate) fn is_safe_method(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS")
}

/// [`is_idempotent`] for a method token as received.
pub(crate) fn is_idempotent_method(method: &str) -> bool {
    is_safe_method(method) || matches!(method, "PUT" | "DELETE" | "TRACE")
}

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn is_idempotent(method: &Method) -> bool {
    is_safe(method) || matches!(*method, Method::PUT | Method::DELETE | Method::TRACE)
}

/// What routing reads of a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteInput<'a> {
    /// Host without port (see [`host_without_port`]).
    pub host: Option<&'a str>,
    /// The path as received, before normalisation.
    pub raw_path: &'a str,
    pub query: Option<&'a str>,
    pub headers: Headers<'a>,
    pub method: &'a str,
    pub safe_method: bool,
}

/// The request's host without port: URI authority (HTTP/2, absolute form) or `Host`.
fn host_of<B>(req: &Request<B>) -> Option<&str> {
    let raw = match req.uri().authority() {
        Some(authority) => authority.as_str(),
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    Some(host_without_port(raw))
}

/// `Acme.example.com:8080` -> `Acme.example.com`, `[::1]:80` -> `[::1]`; a trailing dot goes.
pub(crate) fn host_without_port(raw: &str) -> &str {
    if raw.starts_with('[') {
        return raw
            .split_once(']')
            .map_or(raw, |(h, _)| &raw[..h.len() + 1]);
    }
    let host = raw.split_once(':').map_or(raw, |(h, _)| h);
    // `acme.example.com.` is the same host as `acme.example.com`.
    host.strip_suffix('.').unwrap_or(host)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Why forwarding failed, mapped to exactly one refusal code in [`ForwardError::code`].
#[derive(Debug)]
enum ForwardError {
    /// No endpoint of the home region could be reached.
    RegionUnavailable,
    Timeout,
    Upstream(String),
    BodyTooLarge,
    ClientStalled,
    /// The client's request body was malformed or cut off.
    ClientBody,
    /// The TLS handshake with the origin failed: nothing of the request reached it.
    OriginTls(domicile_certs::client::HandshakeFailure),
}

impl ForwardError {
    fn code(&self) -> RefusalCode {
        match self {
            ForwardError::RegionUnavailable => RefusalCode::RegionUnavailable,
            ForwardError::Timeout => RefusalCode::UpstreamTimeout,
            ForwardError::Upstream(_) => RefusalCode::UpstreamError,
            ForwardError::BodyTooLarge => RefusalCode::BodyTooLarge,
            ForwardError::ClientStalled => RefusalCode::RequestTimeout,
            ForwardError::ClientBody => RefusalCode::BadRequest,
            ForwardError::OriginTls(domicile_certs::client::HandshakeFailure::WrongIdentity {
                ..
            }) => RefusalCode::UpstreamWrongRegion,
            ForwardError::OriginTls(_) => RefusalCode::UpstreamTls,
        }
    }
}

impl Pipeline {
    /// Builds the pipeline (pools and health checks start; needs a Tokio runtime).
    pub fn new(config: Arc<ProxyConfig>, replica: Arc<Replica>) -> Result<Self, String> {
        let identifier = Identifier::new(&config.identify.rules)?;
        let edge_region = replica
            .regions()
            .intern(&config.proxy.edge_region)
            .map_err(|e| e.to_string())?;
        let upstreams = Upstreams::start(&config.regions, &config.limits, replica.regions())?;
        let geoip = match &config.proxy.geoip_database {
            Some(path) => Some(Arc::new(GeoIp::open(path).map_err(|e| e.to_string())?)),
            None => None,
        };
        let audit = match &config.audit {
            Some(section) => {
                // Endpoint names by region index, as records name them.
                let mut endpoints: Vec<Vec<Arc<str>>> = Vec::new();
                for pool in upstreams.pools() {
                    let slot = usize::from(pool.region);
                    if endpoints.len() <= slot {
                        endpoints.resize(slot + 1, Vec::new());
                    }
                    endpoints[slot] = pool
                        .endpoints
                        .iter()
                        .map(|e| Arc::from(e.authority.as_str()))
                        .collect();
                }
                let identity = AuditIdentity {
                    proxy_id: config.proxy_id(),
                    edge_region: &config.proxy.edge_region,
                };
                Some(
                    Audit::start(section, identity, replica.clone(), endpoints, geoip.clone())
                        .map_err(|e| e.to_string())?,
                )
            }
            None => None,
        };
        let edge_tls = match &config.tls {
            Some(tls) => {
                let sources = tls
                    .certificates
                    .iter()
                    .map(|files| domicile_certs::CertSource {
                        cert: files.cert.clone(),
                        key: files.key.clone(),
                    })
                    .collect();
                let unknown = match tls.unknown_name {
                    crate::config::UnknownNamePolicy::Default => {
                        domicile_certs::UnknownName::Default
                    }
                    crate::config::UnknownNamePolicy::Refuse => domicile_certs::UnknownName::Refuse,
                };
                let options = domicile_certs::ServerOptions {
                    session_cache: tls.session_cache,
                    tickets: tls.session_tickets,
                    ..Default::default()
                };
                Some(
                    domicile_certs::ServerTls::load(sources, unknown, &options)
                        .map_err(|e| format!("tls: {e}"))?,
                )
            }
            None => None,
        };
        let policy = Policy {
            unidentified: config.identify.unidentified,
            edge_region,
            strict_regional_hosts: config.identify.strict_regional_hosts,
        };
        Ok(Self {
            config,
            identifier,
            replica,
            upstreams,
            geoip,
            policy,
            metrics: Metrics::default(),
            audit,
            edge_tls,
        })
    }

    /// Reserves the request's audit record. `Err` when the log cannot take it and the request
    /// must be refused (`audit_unavailable`); `Ok(None)` when there is no log, or it cannot take
    /// the record and `on_failure = "serve"`.
    pub(crate) fn audit_begin(&self) -> Result<Option<Entry>, ()> {
        match self.audit.as_ref().map(Audit::begin) {
            None | Some(Begin::Unrecorded) => Ok(None),
            Some(Begin::Record(entry)) => Ok(Some(entry)),
            Some(Begin::Refuse) => Err(()),
        }
    }

    /// The refusal for a request the audit log cannot record; counted for the next checkpoint.
    fn audit_unavailable(&self, request_id: &HeaderValue, started: Instant) -> Response<ProxyBody> {
        if let Some(audit) = &self.audit {
            audit.count_refusal();
        }
        let refusal = Refusal::new(RefusalCode::AuditUnavailable).message(
            "the routing decision cannot be recorded in the audit log; nothing was forwarded",
        );
        self.refuse(refusal, None, None, request_id, started, None)
    }

    /// Fills in a routed request's record: what it is and what was decided.
    pub(crate) fn audit_describe(
        &self,
        entry: &mut Entry,
        input: &RouteInput<'_>,
        request_id: &[u8],
        peer: &Peer,
        decision: &Decision,
        lookup: Lookup,
    ) {
        let found = match lookup {
            Lookup::Found { entry, version } => Some((entry, version)),
            _ => None,
        };
        let (workspace, home_region, map_version, epoch, refusal) = match decision {
            Decision::Forward(forward) => (
                forward.workspace.as_ref(),
                forward.workspace.as_ref().map(|_| forward.region),
                forward.map_version,
                forward.epoch,
                None,
            ),
            Decision::Refuse {
                code,
                workspace,
                home_region,
            } => (
                workspace.as_ref(),
                *home_region,
                found.map(|(_, version)| version),
                found.map(|(entry, _)| entry.epoch),
                Some(*code),
            ),
        };
        entry.describe(&Description {
            request_id,
            method: input.method,
            host: input.host,
            path: input.raw_path,
            client_ip: headers::client_ip(
                peer.addr.ip(),
                input.headers,
                &self.config.proxy.trusted_proxies,
            ),
            workspace,
            home_region,
            map_version,
            epoch,
            refusal,
        });
    }

    /// Handles one request from `peer`.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
        self.handle_body(req, peer).await
    }

    /// Answers a request the framing screen refused (`None`: a reason it did not name, which
    /// cannot happen unless the screen and this build disagree). Not a routing decision, so not
    /// audited; counted by reason in `domicile_malformed_requests_total`. The connection closes.
    pub fn refuse_malformed(&self, violation: Option<Violation>) -> Response<ProxyBody> {
        let (code, message) = match violation {
            Some(Violation::HeadTooLarge) => (
                RefusalCode::HeadersTooLarge,
                Violation::HeadTooLarge.message(),
            ),
            Some(violation) => (RefusalCode::BadRequest, violation.message()),
            None => (
                RefusalCode::BadRequest,
                RefusalCode::BadRequest.default_message(),
            ),
        };
        let request_id = headers::new_request_id();
        let mut response = self.refuse(
            Refusal::new(code).message(message),
            None,
            None,
            &request_id,
            Instant::now(),
            None,
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }

    /// As [`Pipeline::handle`], for any request body type.
    pub async fn handle_body<B>(&self, req: Request<B>, peer: &Peer) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<crate::refusal::BoxError>,
    {
        let started = Instant::now();
        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(v) if headers::valid_request_id(v.as_bytes()) => v.clone(),
            _ => headers::new_request_id(),
        };
        let Ok(mut audit) = self.audit_begin() else {
            return self.audit_unavailable(&request_id, started);
        };
        let host = host_of(&req);
        let request = RouteInput {
            host,
            raw_path: req.uri().path(),
            query: req.uri().query(),
            headers: Headers::Map(req.headers()),
            method: req.method().as_str(),
            safe_method: is_safe(req.method()),
        };
        if let Some(refusal) = self.check_request(&req) {
            if let Some(entry) = audit.as_mut() {
                let decision = Decision::Refuse {
                    code: refusal.code,
                    workspace: None,
                    home_region: None,
                };
                let id = request_id.as_bytes();
                self.audit_describe(entry, &request, id, peer, &decision, Lookup::NoMap);
            }
            return self.refuse(refusal, None, None, &request_id, started, audit);
        }

        let (decision, identity, lookup, in_flight) = self.route(&request, peer);
        if let Some(entry) = audit.as_mut() {
            let id = request_id.as_bytes();
            self.audit_describe(entry, &request, id, peer, &decision, lookup);
        }
        match decision {
            Decision::Forward(forward) => {
                self.forward(req, forward, peer, request_id, started, in_flight, audit)
                    .await
            }
            Decision::Refuse {
                code,
                workspace,
                home_region,
            } => {
                let message = self.explain(code, &identity, lookup, home_region);
                let refusal = Refusal::new(code).message(message).retry_after(
                    (code == RefusalCode::WorkspaceMoving)
                        .then_some(self.config.proxy.moving_retry_after),
                );
                let ws = workspace.as_ref().map(|w| w.as_str());
                self.refuse(refusal, ws, home_region, &request_id, started, audit)
            }
        }
    }

    /// Identify, look up, decide: where a request goes, or why it may not go anywhere. A
    /// request routed by a workspace's entry comes with its in-flight registration, to be held
    /// until the origin's answer is complete (moves wait for it; see [`crate::inflight`]).
    pub(crate) fn route(
        &self,
        request: &RouteInput<'_>,
        peer: &Peer,
    ) -> (Decision, Identity, Lookup, Option<InFlightGuard>) {
        let path = normalized_path(request.raw_path);
        let mut view = RequestView {
            host: request.host,
            path: &path,
            query: request.query,
            headers: request.headers,
        };
        let mut identity = self.identifier.identify(&view);
        if *path != *request.raw_path {
            // An origin may read the raw path or the normalized one: both must name the same
            // workspace (`/w/globex/%2e%2e/acme/` names two).
            view.path = request.raw_path;
            identity = Identity::agree(identity, self.identifier.identify(&view));
        }
        let (lookup, in_flight) = match identity {
            Identity::Workspace(id) => self.replica.lookup_tracked(&id),
            _ => match self.replica.version() {
                Some(version) => (Lookup::Unknown { version }, None),
                None => (Lookup::NoMap, None),
            },
        };
        let arrived_on = match (self.policy.strict_regional_hosts, request.host) {
            (true, Some(host)) => self.upstreams.region_of_host(host),
            _ => None,
        };
        let client_country = match (identity, self.policy.unidentified, &self.geoip) {
            (Identity::None, Unidentified::NearestRegion, Some(geoip)) => {
                let ip = headers::client_ip(
                    peer.addr.ip(),
                    request.headers,
                    &self.config.proxy.trusted_proxies,
                );
                geoip.country(ip)
            }
            _ => None,
        };
        let facts = RequestFacts {
            identity,
            safe_method: request.safe_method,
            arrived_on,
            client_country,
        };
        let routes = RouteView {
            upstreams: &self.upstreams,
            regions: self.replica.regions(),
        };
        let decision = decide(&facts, &self.policy, lookup, &routes);
        // Only a forwarded request has anything in flight.
        let in_flight = in_flight.filter(|_| matches!(decision, Decision::Forward(_)));
        (decision, identity, lookup, in_flight)
    }

    /// Limits hyper does not enforce with a JSON answer.
    fn check_request<B>(&self, req: &Request<B>) -> Option<Refusal<'static>> {
        let limits = &self.config.limits;
        // A host with user information (`globex.example@acme.example`) would be identified by
        // one part while an origin may read the other: refuse it outright.
        let userinfo = req
            .uri()
            .authority()
            .is_some_and(|a| a.as_str().contains('@'))
            || req
                .headers()
                .get_all(header::HOST)
                .iter()
                .any(|h| h.as_bytes().contains(&b'@'));
        if userinfo {
            return Some(
                Refusal::new(RefusalCode::BadRequest)
                    .message("the host must not contain user information ('@')"),
            );
        }
        if req.method() == Method::CONNECT {
            return Some(
                Refusal::new(RefusalCode::BadRequest)
                    .message("CONNECT is not supported by this edge"),
            );
        }
        let headers = req.headers();
        if headers.len() > limits.max_headers {
            return Some(Refusal::new(RefusalCode::HeadersTooLarge).message(format!(
                "the request has {} header fields; the limit is {}",
                headers.len(),
                limits.max_headers
            )));
        }
        let uri = req.uri();
        let head_bytes: usize = uri.path_and_query().map_or(1, |p| p.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len())
            + headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if head_bytes as u64 > limits.max_header_bytes {
            return Some(Refusal::new(RefusalCode::HeadersTooLarge).message(format!(
                "the request head is {head_bytes} bytes; the limit is {}",
                limits.max_header_bytes
            )));
        }
        None
    }

    fn explain(
        &self,
        code: RefusalCode,
        identity: &Identity,
        lookup: Lookup,
        home: Option<RegionIdx>,
    ) -> String {
        let region = || {
            home.and_then(|r| self.replica.regions().id(r))
                .map_or_else(|| "?".to_owned(), |id| id.to_string())
        };
        match (code, identity) {
            (RefusalCode::InvalidWorkspace, Identity::Invalid { source, reason }) => {
                format!("the workspace id in {} is not valid: {reason}", self.identifier.describe(*source))
            }
            (RefusalCode::ConflictingWorkspace, Identity::Conflict { first, second }) => format!(
                "the request names two workspaces, {first} and {second}; one request must touch one workspace"
            ),
            (RefusalCode::UnknownWorkspace, Identity::Workspace(id)) => match lookup {
                Lookup::Unknown { version } => format!("workspace {id} is not in the routing map (map version {version})"),
                _ => format!("workspace {id} is not in the routing map"),
            },
            (RefusalCode::RegionUnroutable, _) => format!(
                "home region {} has no route at this edge; the request is not sent to any other region",
                region()
            ),
            (RefusalCode::RegionUnavailable, _) => format!(
                "no healthy endpoint in home region {}; the request is not sent to any other region",
                region()
            ),
            (RefusalCode::WrongRegionEndpoint, Identity::Workspace(id)) => format!(
                "workspace {id} lives in region {}; use that region's hostname",
                region()
            ),
            (RefusalCode::WorkspaceMoving, Identity::Workspace(id)) => format!(
                "workspace {id} is moving between regions; retry writes shortly (reads continue)"
            ),
            _ => code.default_message().to_owned(),
        }
    }

    /// Answers with `refusal`; its record (if any) goes to the audit queue first.
    fn refuse(
        &self,
        refusal: Refusal<'_>,
        workspace: Option<&str>,
        region: Option<RegionIdx>,
        request_id: &HeaderValue,
        started: Instant,
        audit: Option<Entry>,
    ) -> Response<ProxyBody> {
        self.metrics
            .record(Some(refusal.code), region, started.elapsed());
        let code = refusal.code;
        if let Some(mut entry) = audit {
            entry.decide(Some(code));
            entry.status(code.status().as_u16());
            entry.complete();
        }
        let mut response = refusal
            .workspace(workspace)
            .request_id(request_id.to_str().ok())
            .into_response();
        if code == RefusalCode::BadRequest {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward<B>(
        &self,
        mut req: Request<B>,
        forward: Forward,
        peer: &Peer,
        request_id: HeaderValue,
        started: Instant,
        in_flight: Option<InFlightGuard>,
        mut audit: Option<Entry>,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<crate::refusal::BoxError>,
    {
        let workspace = forward.workspace;
        let ws_str = workspace.as_ref().map(|w| w.as_str());
        let Some(pool) = self.upstreams.pool(forward.region) else {
            // decide() only forwards to routed regions; keep the invariant explicit anyway.
            return self.refuse(
                Refusal::new(RefusalCode::RegionUnroutable),
                ws_str,
                Some(forward.region),
                &request_id,
                started,
                audit,
            );
        };
        if let Some(len) = content_length(req.headers()) {
            if len > pool.max_body_bytes {
                let refusal = Refusal::new(RefusalCode::BodyTooLarge).message(format!(
                    "the request body is {len} bytes; the limit for region {} is {}",
                    pool.region_id, pool.max_body_bytes
                ));
                return self.refuse(
                    refusal,
                    ws_str,
                    Some(forward.region),
                    &request_id,
                    started,
                    audit,
                );
            }
        }
        // hyper hands over upgraded connections for HTTP/1.1 only, and an HTTP/2 origin cannot
        // take an HTTP/1.1 upgrade: there the request goes on as a plain request.
        let upgrade = req.version() == Version::HTTP_11
            && pool.protocol == UpstreamProtocol::Http1
            && headers::is_upgrade_request(req.headers());
        let client_version = req.version();
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        // The host the request was identified by: the request target's authority when there is
        // one (absolute form, HTTP/2), which RFC 9112 3.2.2 says overrides `Host`, else `Host`.
        // The origin is sent that same host, never a different `Host` the client also sent.
        let original_host = match parts.uri.authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => parts.headers.get(header::HOST).cloned(),
        };
        let h2_authority = match pool.protocol {
            UpstreamProtocol::H2c => original_host
                .as_ref()
                .and_then(|h| Authority::try_from(h.as_bytes()).ok()),
            UpstreamProtocol::Http1 => None,
        };
        self.prepare_headers(
            &mut parts.headers,
            &forward,
            peer,
            &request_id,
            upgrade,
            original_host.as_ref(),
        );
        match pool.protocol {
            UpstreamProtocol::Http1 => {
                parts.version = Version::HTTP_11;
                if client_version == Version::HTTP_2 {
                    headers::join_cookies(&mut parts.headers);
                }
                if let Some(host) = original_host {
                    parts.headers.insert(header::HOST, host);
                }
            }
            UpstreamProtocol::H2c => {
                // The client's host travels as :authority (set in `send`), not as `Host`.
                parts.version = Version::HTTP_2;
                parts.headers.remove(header::HOST);
            }
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));

        let body_is_empty = body.is_end_stream();
        // Only a body that can fail needs somewhere to say why.
        let fate = (!body_is_empty).then(|| Arc::new(BodyFate::default()));
        if let (Some(entry), Some(fate)) = (audit.as_mut(), &fate) {
            entry.request_body(fate.clone());
        }
        let upstream_body: ProxyBody = if body_is_empty {
            Empty::new().map_err(|never| match never {}).boxed_unsync()
        } else {
            Guarded::new(
                body,
                pool.max_body_bytes,
                self.config.limits.idle_timeout,
                fate.clone(),
            )
            .without_trailers()
            .boxed_unsync()
        };
        let retries = if body_is_empty && is_idempotent(&parts.method) && !upgrade {
            self.config
                .limits
                .retries
                .min(pool.endpoints.len().saturating_sub(1) as u32)
        } else {
            0
        };
        let retry_template =
            (retries > 0).then(|| (parts.method.clone(), parts.version, parts.headers.clone()));

        let mut endpoint = None;
        let result = self
            .send(
                pool,
                parts,
                upstream_body,
                &path_and_query,
                h2_authority.as_ref(),
                retries,
                retry_template,
                fate.as_deref(),
                &mut endpoint,
            )
            .await;
        // Where the request went: the endpoint of the last attempt, unless no attempt reached
        // any origin (region_unavailable: nothing was sent anywhere).
        let reached = !matches!(
            result,
            Err(ForwardError::RegionUnavailable | ForwardError::OriginTls(_))
        );
        if let (Some(entry), Some(index), true) = (audit.as_mut(), endpoint, reached) {
            entry.upstream(forward.region, index);
        }
        let mut response = match result {
            Ok(response) => response,
            Err(error) => {
                let code = error.code();
                let mut refusal = Refusal::new(code);
                if let ForwardError::Upstream(detail) = &error {
                    refusal = refusal.message(format!(
                        "home region {} failed to answer: {detail}",
                        pool.region_id
                    ));
                } else if let ForwardError::OriginTls(failure) = &error {
                    refusal = refusal.message(format!(
                        "an origin of home region {} was refused, nothing was sent to it: {failure}",
                        pool.region_id
                    ));
                } else if code == RefusalCode::BadRequest {
                    refusal = refusal.message("the request body was malformed or cut off");
                } else if code == RefusalCode::RegionUnavailable {
                    refusal = refusal.message(format!(
                        "no endpoint of home region {} could be reached; the request is not sent to any other region",
                        pool.region_id
                    ));
                }
                return self.refuse(
                    refusal,
                    ws_str,
                    Some(forward.region),
                    &request_id,
                    started,
                    audit,
                );
            }
        };
        if let Some(entry) = audit.as_mut() {
            entry.status(response.status().as_u16());
        }

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                // The tunnel is the request going on: it stays in flight until it closes.
                let tunnel_in_flight = in_flight.as_ref().map(InFlightGuard::duplicate);
                tokio::spawn(async move {
                    let _in_flight = tunnel_in_flight;
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((client, upstream)) => {
                            let mut client = TokioIo::new(client);
                            let mut upstream = TokioIo::new(upstream);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                        Err(e) => tracing::debug!("upgrade failed: {e}"),
                    }
                });
            }
        }
        self.metrics
            .record(None, Some(forward.region), started.elapsed());
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(
            &mut parts.headers,
            parts.status == StatusCode::SWITCHING_PROTOCOLS,
        );
        parts.headers.insert(X_REQUEST_ID.clone(), request_id);
        // The request stays in flight until the origin's answer has been relayed whole (or the
        // client went away): the response body holds the registration.
        let body = Guarded::new(body, u64::MAX, self.config.limits.idle_timeout, None)
            .holding(in_flight)
            .recording(audit)
            .boxed_unsync();
        Response::from_parts(parts, body)
    }

    fn prepare_headers(
        &self,
        headers: &mut HeaderMap,
        forward: &Forward,
        peer: &Peer,
        request_id: &HeaderValue,
        upgrade: bool,
        host: Option<&HeaderValue>,
    ) {
        headers::strip_hop_by_hop(headers, upgrade);
        headers::strip_domicile(headers);
        // Room for the fields added below, so the map grows once rather than once per insert.
        headers.reserve(8);
        headers::set_forwarded(headers, peer, host.and_then(|h| h.to_str().ok()));
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        if let Some(workspace) = &forward.workspace {
            if let Ok(value) = HeaderValue::from_bytes(workspace.as_bytes()) {
                headers.insert(X_DOMICILE_WORKSPACE.clone(), value);
            }
        }
        if let Some(region) = self.replica.regions().header_value(forward.region) {
            headers.insert(X_DOMICILE_REGION.clone(), region);
        }
        if let Some(epoch) = forward.epoch {
            headers.insert(X_DOMICILE_EPOCH.clone(), HeaderValue::from(epoch));
        }
        if let Some(version) = forward.map_version {
            headers.insert(X_DOMICILE_MAP_VERSION.clone(), HeaderValue::from(version));
        }
    }

    /// Waits for the origin's response head. `upstream_response_timeout` runs from the moment
    /// the request body has been sent in full: a long upload that keeps moving is not a slow
    /// origin (a stalled one is ended by the body's own idle timeout).
    async fn await_response<F, T>(
        &self,
        response: F,
        fate: Option<&BodyFate>,
    ) -> Result<T, tokio::time::error::Elapsed>
    where
        F: std::future::Future<Output = T>,
    {
        let timeout = self.config.limits.upstream_response_timeout;
        tokio::pin!(response);
        loop {
            match tokio::time::timeout(timeout, &mut response).await {
                Ok(output) => return Ok(output),
                Err(elapsed) => {
                    let uploading = fate.is_some_and(|f| f.get() == Fate::Running);
                    if !uploading {
                        return Err(elapsed);
                    }
                }
            }
        }
    }

    /// Sends to endpoints of `pool` only, retrying within the pool when allowed.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        pool: &RegionPool,
        parts: http::request::Parts,
        body: ProxyBody,
        path_and_query: &PathAndQuery,
        h2_authority: Option<&Authority>,
        retries: u32,
        template: Option<(Method, Version, HeaderMap)>,
        fate: Option<&BodyFate>,
        endpoint_used: &mut Option<usize>,
    ) -> Result<Response<PooledBody>, ForwardError> {
        let mut tried: u64 = 0;
        let mut next = Some(Request::from_parts(parts, body));
        let mut attempt = 0u32;
        // The most telling error that was not a connection failure, if any.
        let mut served_error: Option<ForwardError> = None;
        loop {
            let Some((index, endpoint)) = pool.pick(tried) else {
                return Err(served_error.unwrap_or(ForwardError::RegionUnavailable));
            };
            tried |= 1u64.checked_shl(index as u32).unwrap_or(0);
            *endpoint_used = Some(index);
            let mut request = match next.take() {
                Some(request) => request,
                None => {
                    let Some((method, version, headers)) = &template else {
                        return Err(served_error.unwrap_or(ForwardError::RegionUnavailable));
                    };
                    let mut request =
                        Request::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
                    *request.method_mut() = method.clone();
                    *request.version_mut() = *version;
                    *request.headers_mut() = headers.clone();
                    request
                }
            };
            *request.uri_mut() = match pool.protocol {
                // HTTP/1.1 origins get the origin form (`/path?query`) and the client's `Host`.
                UpstreamProtocol::Http1 => Uri::from(path_and_query.clone()),
                UpstreamProtocol::H2c => {
                    let authority = h2_authority.unwrap_or(&endpoint.authority).clone();
                    match Uri::builder()
                        .scheme(Scheme::HTTP)
                        .authority(authority)
                        .path_and_query(path_and_query.clone())
                        .build()
                    {
                        Ok(uri) => uri,
                        Err(e) => return Err(ForwardError::Upstream(e.to_string())),
                    }
                }
            };
            let outcome = self
                .await_response(endpoint.target.send(request), fate)
                .await;
            let error = match outcome {
                Ok(Ok(response)) => {
                    pool.record_success(endpoint);
                    return Ok(response);
                }
                Ok(Err(e)) => {
                    match fate.map_or(Fate::Running, BodyFate::get) {
                        Fate::TooLarge => return Err(ForwardError::BodyTooLarge),
                        Fate::Stalled => return Err(ForwardError::ClientStalled),
                        Fate::Broken => return Err(ForwardError::ClientBody),
                        Fate::Running | Fate::Done => {}
                    }
                    pool.record_failure(endpoint);
                    match e {
                        SendError::Connect(_) => None,
                        SendError::Tls(failure) => {
                            pool.count_tls_failure(endpoint, &failure);
                            Some(ForwardError::OriginTls(failure))
                        }
                        SendError::Http(_) => Some(ForwardError::Upstream(e.to_string())),
                    }
                }
                Err(_elapsed) => {
                    pool.record_failure(endpoint);
                    Some(ForwardError::Timeout)
                }
            };
            tracing::debug!(region = %pool.region_id, endpoint = %endpoint.authority, ?error, attempt, "upstream attempt failed");
            if let Some(error) = error {
                served_error = Some(error);
            }
            if attempt >= retries {
                // Only connection failures: nothing reached the region, so it is unavailable.
                return Err(served_error.unwrap_or(ForwardError::RegionUnavailable));
            }
            attempt += 1;
            self.metrics
                .upstream_retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_taken_without_port() {
        let req = Request::get("/")
            .header("host", "Acme.localhost:8080")
            .body(())
            .unwrap();
        assert_eq!(host_of(&req), Some("Acme.localhost"));
        let req = Request::get("http://globex.localhost/x").body(()).unwrap();
        assert_eq!(host_of(&req), Some("globex.localhost"));
        let req = Request::get("/")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert_eq!(host_of(&req), Some("[::1]"));
        let req = Request::get("/").body(()).unwrap();
        assert_eq!(host_of(&req), None);
    }

    #[test]
    fn method_classes() {
        assert!(is_safe(&Method::GET) && is_safe(&Method::OPTIONS));
        assert!(!is_safe(&Method::POST) && !is_safe(&Method::PUT));
        assert!(is_idempotent(&Method::PUT) && is_idempotent(&Method::DELETE));
        assert!(!is_idempotent(&Method::POST) && !is_idempotent(&Method::PATCH));
    }
}
