//! The admin REST API (axum): regions, workspaces, the map feed, the fleet, tokens.
//! JSON in and out; every error is `{"error": {"code", "message"}}` with a fitting status.
//! `docs/control-plane.md` and `GET /v1/openapi.json` describe every route.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use domicile_wire::{
    is_country_code, is_valid_region_id, normalize_workspace_id, ErrorBody, ErrorDetail, Fleet,
    FleetMember, Heartbeat, HeartbeatReply, LineError, Region, SyncStatus,
};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::auth::{is_valid_token_name, Role};
use crate::config::ControlPlaneConfig;
use crate::store::{now_ms, Actor, ImportLine, Store, StoreError, MAX_LINE_ERRORS};

/// The OpenAPI description served at `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Every route the API serves, as `(method, path)`: the router is built from the same paths,
/// and a test checks `openapi.json` lists exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/regions"),
    ("get", "/v1/regions/{id}"),
    ("put", "/v1/regions/{id}"),
    ("delete", "/v1/regions/{id}"),
    ("get", "/v1/workspaces"),
    ("get", "/v1/workspaces/{id}"),
    ("put", "/v1/workspaces/{id}"),
    ("delete", "/v1/workspaces/{id}"),
    ("post", "/v1/workspaces:import"),
    ("get", "/v1/map/snapshot"),
    ("get", "/v1/map/changes"),
    ("get", "/v1/map/history"),
    ("post", "/v1/fleet/heartbeat"),
    ("get", "/v1/fleet"),
    ("delete", "/v1/fleet/{proxy_id}"),
    ("get", "/v1/tokens"),
    ("post", "/v1/tokens"),
    ("delete", "/v1/tokens/{name}"),
    ("post", "/v1/moves"),
    ("get", "/v1/moves"),
    ("get", "/v1/moves/{id}"),
    ("post", "/v1/moves/{id}/complete"),
    ("post", "/v1/moves/{id}/abort"),
    ("get", "/v1/audit/admin"),
    ("get", "/v1/openapi.json"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub forbidden: AtomicU64,
    pub feed_streams_open: AtomicU64,
    pub feed_lines_sent: AtomicU64,
    pub heartbeats: AtomicU64,
    pub snapshots: AtomicU64,
}

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<ControlPlaneConfig>,
    pub metrics: Arc<Metrics>,
    /// Becomes true when the replica stops: open change streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// The move driver (woken by heartbeats and move requests).
    pub moves: crate::moves::Driver,
    /// The newest changes, read once for every change stream of this replica.
    pub tail: crate::feed::Tail,
    /// The NATS fan-out tier's counters (zero without `[nats]`).
    pub nats: Arc<crate::fanout::NatsMetrics>,
}

/// An API error: status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    lines: Vec<LineError>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            lines: Vec::new(),
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::NotFound { .. } => Self::new(StatusCode::NOT_FOUND, "not_found", message),
            StoreError::Conflict { code, .. } => Self::new(StatusCode::CONFLICT, code, message),
            StoreError::Invalid { code, .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
            }
            StoreError::Lines { lines, .. } => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "invalid_import",
                message,
                lines,
            },
            StoreError::Gone { .. } => Self::new(StatusCode::GONE, "changes_expired", message),
            StoreError::Db(_)
            | StoreError::Migrate(_)
            | StoreError::BadUrl(_)
            | StoreError::Unavailable(_) => {
                tracing::error!("store error: {message}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the control plane's store is unavailable; try again",
                )
            }
        }
    }
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON body the error is answered with.
    pub(crate) fn body(self) -> Vec<u8> {
        serde_json::to_vec(&ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                lines: self.lines,
            },
        })
        .expect("error bodies serialise")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: ErrorDetail {
                    code: self.code.to_owned(),
                    message: self.message,
                    lines: self.lines,
                },
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"domicile\""),
            );
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The caller behind a valid token or client certificate.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    /// Authenticated by a client certificate (mTLS) rather than a token.
    pub by_certificate: bool,
}

/// The request header that carries a verified client certificate's identity from the TLS
/// listener to [`authorize`]. Any value a client sends is removed before the router sees the
/// request ([`client_certificate`]); only the TLS listener's extension sets it.
pub(crate) static CLIENT_CERTIFICATE: HeaderName =
    HeaderName::from_static("x-domicile-internal-client-certificate");

/// Middleware: drops a client-sent [`CLIENT_CERTIFICATE`] header, and sets it from the
/// connection's verified certificate (the TLS listener's extension), `role:name` or empty for a
/// certificate without a Domicile identity.
async fn client_certificate(mut request: axum::extract::Request) -> axum::extract::Request {
    request.headers_mut().remove(&CLIENT_CERTIFICATE);
    let value = request
        .extensions()
        .get::<crate::tls::ClientCertificate>()
        .map(|cert| match &cert.0 {
            Some(id) => format!("{}:{}", id.role, id.name),
            None => String::new(),
        });
    if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
        request
            .headers_mut()
            .insert(CLIENT_CERTIFICATE.clone(), value);
    }
    request
}

impl Caller {
    fn actor(&self, reason: Option<String>) -> Actor {
        Actor {
            name: self.name.clone(),
            reason,
        }
    }
}

/// Checks the bearer token: 401 without a valid one, 403 when its role is not in `allowed`.
pub async fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    allowed: &[Role],
) -> ApiResult<Caller> {
    let unauthenticated = |message: &str| {
        state
            .metrics
            .unauthenticated
            .fetch_add(1, Ordering::Relaxed);
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        if let Some(cert) = headers.get(&CLIENT_CERTIFICATE) {
            return authorize_certificate(state, cert, allowed);
        }
        return Err(unauthenticated(
            "this endpoint needs a bearer token (Authorization: Bearer <token>) or a client certificate",
        ));
    };
    let secret = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| unauthenticated("the Authorization header is not `Bearer <token>`"))?;
    let Some((name, role)) = state.store.authenticate(secret).await? else {
        return Err(unauthenticated("the bearer token is not valid"));
    };
    if !allowed.contains(&role) || allowed.is_empty() {
        return Err(forbidden_role(
            state,
            &format!("token {name:?}"),
            role,
            allowed,
        ));
    }
    Ok(Caller {
        name,
        role,
        by_certificate: false,
    })
}

/// 403 for `who` (a token or a certificate), whose `role` is not among `allowed`; counted.
fn forbidden_role(state: &AppState, who: &str, role: Role, allowed: &[Role]) -> ApiError {
    state.metrics.forbidden.fetch_add(1, Ordering::Relaxed);
    let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "{who} has role {role}; this endpoint needs {}",
            names.join(" or ")
        ),
    )
}

/// A caller authenticated by its client certificate (see [`client_certificate`]).
fn authorize_certificate(
    state: &AppState,
    value: &HeaderValue,
    allowed: &[Role],
) -> ApiResult<Caller> {
    let text = value.to_str().unwrap_or("");
    let Some((role, name)) = text.split_once(':') else {
        state
            .metrics
            .unauthenticated
            .fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the client certificate carries no Domicile identity (a URI name urn:domicile:<role>:<name>); send a bearer token",
        ));
    };
    let Some(role) = Role::parse(role) else {
        state.metrics.forbidden.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "the client certificate names role {role:?}, which is not a control-plane role"
            ),
        ));
    };
    if !allowed.contains(&role) {
        return Err(forbidden_role(
            state,
            &format!("client certificate {name:?}"),
            role,
            allowed,
        ));
    }
    Ok(Caller {
        name: name.to_owned(),
        role,
        by_certificate: true,
    })
}

const READERS: &[Role] = &[Role::Admin, Role::Operator, Role::Auditor];
const ADMIN: &[Role] = &[Role::Admin];
const FEED: &[Role] = &[Role::Proxy, Role::Admin, Role::Auditor];
const OPERATORS: &[Role] = &[Role::Admin, Role::Operator];

/// Parses a JSON body with a clear error naming what is wrong.
fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("invalid JSON body: {e}")))
}

fn region_id(id: &str) -> ApiResult<&str> {
    if is_valid_region_id(id) {
        Ok(id)
    } else {
        Err(ApiError::bad_request(
            "invalid_region_id",
            format!("region id {id:?} is not valid (expected [a-z][a-z0-9-]{{0,31}})"),
        ))
    }
}

fn workspace_id(id: &str) -> ApiResult<String> {
    normalize_workspace_id(id).map_err(|why| {
        ApiError::bad_request(
            "invalid_workspace_id",
            format!("workspace id {id:?} is not valid: {why}"),
        )
    })
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn router(state: AppState) -> Router {
    let router = Router::new()
        .route("/v1/regions", get(list_regions))
        .route(
            "/v1/regions/{id}",
            get(get_region).put(put_region).delete(delete_region),
        )
        .route("/v1/workspaces", get(list_workspaces))
        .route(
            "/v1/workspaces/{id}",
            get(get_workspace)
                .put(put_workspace)
                .delete(delete_workspace),
        )
        .route("/v1/workspaces:import", post(import_workspaces))
        .route("/v1/map/snapshot", get(snapshot))
        .route("/v1/map/changes", get(changes))
        .route("/v1/map/history", get(history))
        .route("/v1/fleet/heartbeat", post(heartbeat))
        .route("/v1/fleet", get(fleet))
        .route("/v1/fleet/{proxy_id}", axum::routing::delete(forget_proxy))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}", axum::routing::delete(delete_token))
        .route("/v1/moves", post(start_move).get(list_moves))
        .route("/v1/moves/{id}", get(get_move))
        .route("/v1/moves/{id}/complete", post(complete_move))
        .route("/v1/moves/{id}/abort", post(abort_move))
        .route("/v1/audit/admin", get(admin_audit))
        .route("/v1/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method (see /v1/openapi.json)",
            )
        });
    let metrics = state.metrics.clone();
    router
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                metrics.requests.fetch_add(1, Ordering::Relaxed);
                next.run(req)
            },
        ))
        .layer(axum::middleware::map_request(client_certificate))
        .with_state(state)
}

// ---- regions ----

async fn list_regions(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    authorize(&s, &headers, READERS).await?;
    let regions = s.store.regions().await?;
    Ok(Json(serde_json::json!({ "regions": regions })).into_response())
}

async fn get_region(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&s, &headers, READERS).await?;
    Ok(Json(s.store.region(region_id(&id)?).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionPut {
    name: Option<String>,
    #[serde(default)]
    jurisdiction: Vec<String>,
    #[serde(default)]
    reason: Option<String>,
}

async fn put_region(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, ADMIN).await?;
    let id = region_id(&id)?.to_owned();
    let put: RegionPut = json_body(&body)?;
    let name = put.name.unwrap_or_else(|| id.clone());
    if name.trim().is_empty() || name.len() > 200 {
        return Err(ApiError::bad_request(
            "invalid_body",
            "name must be 1 to 200 characters",
        ));
    }
    let mut jurisdiction = Vec::new();
    for code in &put.jurisdiction {
        if !is_country_code(code) {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("jurisdiction {code:?} is not an ISO 3166-1 alpha-2 country code"),
            ));
        }
        let code = code.to_ascii_uppercase();
        if !jurisdiction.contains(&code) {
            jurisdiction.push(code);
        }
    }
    let written = s
        .store
        .put_region(
            Region {
                id,
                name,
                jurisdiction,
            },
            &caller.actor(put.reason),
        )
        .await?;
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(serde_json::json!({ "region": written.value, "version": written.version })),
    )
        .into_response())
}

async fn delete_region(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, ADMIN).await?;
    let version = s
        .store
        .delete_region(region_id(&id)?, &caller.actor(None))
        .await?;
    Ok(Json(serde_json::json!({ "deleted": id, "version": version })).into_response())
}

// ---- workspaces ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    region: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

async fn list_workspaces(
    State(s): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    authorize(&s, &headers, READERS).await?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request(
            "invalid_query",
            "limit must be between 1 and 1000",
        ));
    }
    if let Some(region) = &q.region {
        region_id(region)?;
    }
    let cursor = q.cursor.as_deref().map(workspace_id).transpose()?;
    let items = s
        .store
        .workspaces(q.region.as_deref(), cursor.as_deref(), limit)
        .await?;
    let next_cursor = (items.len() == limit as usize)
        .then(|| items.last().map(|w| w.id.clone()))
        .flatten();
    Ok(
        Json(serde_json::json!({ "workspaces": items, "next_cursor": next_cursor }))
            .into_response(),
    )
}

async fn get_workspace(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&s, &headers, READERS).await?;
    Ok(Json(s.store.workspace(&workspace_id(&id)?).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkspacePut {
    region: String,
    /// Change the region of an existing workspace without a move.
    #[serde(default)]
    force: bool,
    #[serde(default)]
    reason: Option<String>,
}

async fn put_workspace(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, ADMIN).await?;
    let id = workspace_id(&id)?;
    let put: WorkspacePut = json_body(&body)?;
    region_id(&put.region)?;
    let written = s
        .store
        .put_workspace(&id, &put.region, put.force, &caller.actor(put.reason))
        .await?;
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(written.value)).into_response())
}

async fn delete_workspace(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, ADMIN).await?;
    let id = workspace_id(&id)?;
    let version = s.store.delete_workspace(&id, &caller.actor(None)).await?;
    Ok(Json(serde_json::json!({ "deleted": id, "version": version })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportRecord<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    region: std::borrow::Cow<'a, str>,
}

/// Parses one NDJSON import line.
fn import_line(
    line_no: u64,
    text: &[u8],
    seen: &mut std::collections::HashMap<String, u64>,
) -> Result<ImportLine, LineError> {
    let bad = |code: &str, message: String| LineError {
        line: line_no,
        code: code.to_owned(),
        message,
    };
    let record: ImportRecord<'_> = serde_json::from_slice(text).map_err(|e| {
        bad(
            "invalid_json",
            format!("not a {{\"id\", \"region\"}} object: {e}"),
        )
    })?;
    let id = normalize_workspace_id(&record.id).map_err(|why| {
        bad(
            "invalid_workspace_id",
            format!("workspace id {:?}: {why}", record.id),
        )
    })?;
    if !is_valid_region_id(&record.region) {
        return Err(bad(
            "invalid_region_id",
            format!("region id {:?} is not valid", record.region),
        ));
    }
    if let Some(first) = seen.insert(id.clone(), line_no) {
        seen.insert(id.clone(), first);
        return Err(bad(
            "duplicate_workspace",
            format!("workspace {id:?} is already on line {first}"),
        ));
    }
    Ok(ImportLine {
        line: line_no,
        id,
        region: record.region.into_owned(),
    })
}

async fn import_workspaces(
    State(s): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ImportQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, ADMIN).await?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let mut stream = body.into_data_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut total_errors = 0usize;
    let mut seen = std::collections::HashMap::new();
    let mut line_no = 0u64;
    let mut received = 0u64;
    let mut handle = |text: &[u8], line_no: u64, lines: &mut Vec<ImportLine>| {
        let text = text.trim_ascii();
        if text.is_empty() {
            return;
        }
        match import_line(line_no, text, &mut seen) {
            Ok(line) => lines.push(line),
            Err(e) => {
                total_errors += 1;
                if errors.len() < MAX_LINE_ERRORS {
                    errors.push(e);
                }
            }
        }
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("invalid_body", format!("cannot read the import body: {e}"))
        })?;
        received += chunk.len() as u64;
        if received > s.config.max_import_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "import_too_large",
                format!(
                    "the import is larger than {} bytes (max_import_bytes); split it",
                    s.config.max_import_bytes
                ),
            ));
        }
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(nl) = memchr(b'\n', &pending[start..]) {
            line_no += 1;
            handle(&pending[start..start + nl], line_no, &mut lines);
            start += nl + 1;
        }
        pending.drain(..start);
    }
    if !pending.is_empty() {
        line_no += 1;
        handle(&pending, line_no, &mut lines);
    }
    if total_errors > 0 {
        return Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_import",
            message: format!(
                "{total_errors} line(s) of the import are invalid; nothing was imported"
            ),
            lines: errors,
        });
    }
    let outcome = s
        .store
        .import(lines, q.force, &caller.actor(q.reason))
        .await?;
    Ok(Json(outcome).into_response())
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

// ---- the map feed ----

fn ndjson(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response {
    let mut rx = rx;
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn snapshot(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    authorize(&s, &headers, FEED).await?;
    s.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
    let mut chunks = s.store.snapshot();
    // The first chunk carries the header line; a store error before it is a clean 503.
    let first = match chunks.recv().await {
        Some(Ok(first)) => first,
        Some(Err(e)) => return Err(e.into()),
        None => return Err(ApiError::from(StoreError::BadUrl("closed".into()))),
    };
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        while let Some(chunk) = chunks.recv().await {
            let item = chunk.map_err(|e| {
                tracing::error!("snapshot cut short: {e}");
                std::io::Error::other(e.to_string())
            });
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    Ok(ndjson(rx))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesQuery {
    after: u64,
}

async fn changes(
    State(s): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    authorize(&s, &headers, FEED).await?;
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("`after` must be a map version: {}", e.body_text()),
        )
    })?;
    if q.after > i64::MAX as u64 {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`after` {} is larger than any map version", q.after),
        ));
    }
    // A position the tail's window holds streams from memory; any other is read from the
    // store before the stream starts, so a position past the retained log is a plain 410.
    let window = s.tail.current();
    let first = if window.holds(q.after, s.store.change_floor(window.end())) {
        None
    } else {
        Some(s.store.changes(q.after, crate::feed::FEED_BATCH).await?)
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(crate::feed::stream(s, q.after, first, tx));
    Ok(ndjson(rx))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    workspace: String,
}

async fn history(
    State(s): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    authorize(&s, &headers, READERS).await?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let id = workspace_id(&q.workspace)?;
    let records = s.store.history(&id).await?;
    let history: Vec<_> = records
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "version": r.version,
                "op": r.op,
                "region": r.region,
                "state": r.state,
                "epoch": r.epoch,
                "actor": r.actor,
                "reason": r.reason,
                "at": rfc3339(r.at_ms),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "workspace": id, "history": history })).into_response())
}

// ---- fleet ----

async fn heartbeat(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    Ok(Json(take_heartbeat(&s, &headers, &body).await?).into_response())
}

/// A heartbeat, from `POST /v1/fleet/heartbeat` or from the NATS fan-out tier: authorized
/// (role `proxy`), checked, written, and answered with the replica's head once written.
pub(crate) async fn take_heartbeat(
    s: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<HeartbeatReply> {
    let caller = authorize(s, headers, &[Role::Proxy]).await?;
    let hb: Heartbeat = json_body(body)?;
    if !domicile_wire::is_valid_proxy_id(&hb.proxy_id) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!(
                "proxy_id {:?} is not valid (1 to 128 printable characters without spaces)",
                hb.proxy_id
            ),
        ));
    }
    if !is_valid_region_id(&hb.edge_region) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("edge_region {:?} is not a region id", hb.edge_region),
        ));
    }
    // A certificate names one proxy: it may report for that proxy only.
    if caller.by_certificate && caller.name != hb.proxy_id {
        s.metrics.forbidden.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "the client certificate is proxy {:?}'s; it cannot report for proxy {:?}",
                caller.name, hb.proxy_id
            ),
        ));
    }
    s.store.heartbeat(&hb, &caller.name).await?;
    s.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
    s.moves.heard();
    Ok(HeartbeatReply {
        epoch: s.store.epoch().to_owned(),
        head: *s.store.subscribe().borrow(),
    })
}

/// The fleet as `GET /v1/fleet` reports it.
pub async fn fleet_status(store: &Store, config: &ControlPlaneConfig) -> Result<Fleet, StoreError> {
    let (stale_after, behind_after) = (config.stale_after, config.behind_after);
    let head = store.head().await?;
    let now = now_ms();
    // What every member should have reported by now: proxies report a change at their next
    // periodic heartbeat (a move's freeze and switch at once).
    let expected = if behind_after.is_zero() {
        head.version
    } else {
        let cutoff = now - i64::try_from(behind_after.as_millis()).unwrap_or(i64::MAX);
        store.version_at(cutoff).await?.min(head.version)
    };
    let members = store
        .fleet()
        .await?
        .into_iter()
        .map(|m| {
            let age_ms = (now - m.last_seen_ms).max(0);
            let same_epoch = m.epoch == head.epoch;
            let status = if age_ms as u128 > stale_after.as_millis() {
                SyncStatus::Stale
            } else if !same_epoch || m.applied_version < expected {
                SyncStatus::Behind
            } else {
                SyncStatus::Synced
            };
            FleetMember {
                checksum_ok: (same_epoch && m.applied_version == head.version)
                    .then(|| m.checksum == head.checksum.to_hex()),
                proxy_id: m.proxy_id,
                edge_region: m.edge_region,
                applied_version: m.applied_version,
                drained_version: m.drained_version,
                checksum: m.checksum,
                last_seen: rfc3339(m.last_seen_ms),
                seconds_since_seen: age_ms as f64 / 1000.0,
                status,
            }
        })
        .collect();
    Ok(Fleet {
        head: head.version,
        epoch: head.epoch,
        stale_after_seconds: stale_after.as_secs(),
        behind_after_seconds: behind_after.as_secs_f64(),
        expected_version: expected,
        members,
    })
}

async fn fleet(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    authorize(&s, &headers, READERS).await?;
    Ok(Json(fleet_status(&s.store, &s.config).await?).into_response())
}

async fn forget_proxy(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(proxy_id): Path<String>,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, OPERATORS).await?;
    if s.store.forget_proxy(&proxy_id).await? {
        s.store
            .record_event(&caller.name, "fleet.remove", &proxy_id, None)
            .await?;
        // A move waiting for this proxy may go on now.
        s.moves.wake();
        Ok(Json(serde_json::json!({ "removed": proxy_id })).into_response())
    } else {
        Err(StoreError::NotFound {
            what: "proxy",
            id: proxy_id,
        }
        .into())
    }
}

// ---- tokens ----

async fn list_tokens(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    authorize(&s, &headers, ADMIN).await?;
    Ok(Json(serde_json::json!({ "tokens": s.store.tokens().await? })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenCreate {
    name: String,
    role: String,
}

async fn create_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, ADMIN).await?;
    let req: TokenCreate = json_body(&body)?;
    if !is_valid_token_name(&req.name) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!(
                "token name {:?} is not valid ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})",
                req.name
            ),
        ));
    }
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_body",
            format!(
                "role {:?} is not one of admin, operator, auditor, proxy",
                req.role
            ),
        )
    })?;
    let token = s.store.create_token(&req.name, role).await?;
    s.store
        .record_event(
            &caller.name,
            "token.create",
            &req.name,
            Some(format!("role {role}")),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "name": req.name, "role": role, "token": token })),
    )
        .into_response())
}

async fn delete_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, ADMIN).await?;
    if caller.name == name {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "token_in_use",
            "a token cannot delete itself; use another admin token",
        ));
    }
    if s.store.delete_token(&name).await? {
        s.store
            .record_event(&caller.name, "token.delete", &name, None)
            .await?;
        Ok(Json(serde_json::json!({ "deleted": name })).into_response())
    } else {
        Err(StoreError::NotFound {
            what: "token",
            id: name,
        }
        .into())
    }
}

// ---- moves ----

/// Default time a convergence phase may take before a move reports itself stalled.
const MOVE_TIMEOUT_DEFAULT_SECS: f64 = 120.0;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveStart {
    workspace: String,
    to: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    webhook: Option<String>,
    /// Seconds a convergence phase may take before the move reports itself stalled.
    #[serde(default)]
    timeout_seconds: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MoveAction {
    #[serde(default)]
    reason: Option<String>,
}

fn move_id(id: &str) -> ApiResult<u64> {
    id.parse::<u64>()
        .ok()
        .filter(|&n| n > 0 && n <= i64::MAX as u64)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_move_id",
                format!("move id {id:?} is not a move number"),
            )
        })
}

fn reason(reason: Option<String>) -> ApiResult<Option<String>> {
    match reason {
        Some(r) if r.len() > 1024 => Err(ApiError::bad_request(
            "invalid_body",
            "reason is longer than 1024 bytes",
        )),
        Some(r) if r.trim().is_empty() => Ok(None),
        r => Ok(r),
    }
}

async fn start_move(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, OPERATORS).await?;
    let req: MoveStart = json_body(&body)?;
    let workspace = workspace_id(&req.workspace)?;
    let to = region_id(&req.to)?.to_owned();
    if let Some(url) = &req.webhook {
        crate::moves::check_webhook(url)
            .map_err(|m| ApiError::bad_request("invalid_webhook", m))?;
    }
    let timeout = req.timeout_seconds.unwrap_or(MOVE_TIMEOUT_DEFAULT_SECS);
    if !(0.1..=604_800.0).contains(&timeout) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("timeout_seconds {timeout} is out of range (0.1 to 604800)"),
        ));
    }
    let request = crate::store::MoveRequest {
        workspace,
        to,
        webhook: req.webhook,
        timeout_ms: (timeout * 1000.0) as u64,
    };
    let m = s
        .store
        .create_move(&request, &caller.actor(reason(req.reason)?))
        .await?;
    s.moves.announce(&m, None);
    s.moves.wake();
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/moves/{}", m.id))],
        Json(crate::moves::view(&m, None)),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveList {
    workspace: Option<String>,
    #[serde(default)]
    open: bool,
    limit: Option<u32>,
}

async fn list_moves(
    State(s): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<MoveList>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    authorize(&s, &headers, READERS).await?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let workspace = q.workspace.as_deref().map(workspace_id).transpose()?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let moves = s.store.moves(workspace.as_deref(), q.open, limit).await?;
    let mut views = Vec::with_capacity(moves.len());
    for m in &moves {
        views.push(crate::moves::current_view(&s.store, m).await?);
    }
    Ok(Json(serde_json::json!({ "moves": views })).into_response())
}

async fn get_move(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&s, &headers, READERS).await?;
    let m = s.store.get_move(move_id(&id)?).await?;
    Ok(Json(crate::moves::current_view(&s.store, &m).await?).into_response())
}

fn action_body(body: &Bytes) -> ApiResult<MoveAction> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(MoveAction::default())
    } else {
        json_body(body)
    }
}

async fn complete_move(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, OPERATORS).await?;
    let id = move_id(&id)?;
    let action = action_body(&body)?;
    let before = s.store.get_move(id).await?.phase;
    let m = s
        .store
        .move_complete(id, &caller.actor(reason(action.reason)?))
        .await?;
    if m.phase != before {
        s.moves.announce(&m, None);
    }
    s.moves.wake();
    Ok(Json(crate::moves::current_view(&s.store, &m).await?).into_response())
}

async fn abort_move(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = authorize(&s, &headers, OPERATORS).await?;
    let id = move_id(&id)?;
    let action = action_body(&body)?;
    let before = s.store.get_move(id).await?.phase;
    let m = s
        .store
        .move_abort(id, &caller.actor(reason(action.reason)?))
        .await?;
    if m.phase != before {
        s.moves.announce(&m, None);
    }
    Ok(Json(crate::moves::current_view(&s.store, &m).await?).into_response())
}

// ---- the admin audit trail ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    since: Option<String>,
    until: Option<String>,
    workspace: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

/// A time given as RFC 3339 or as milliseconds since the Unix epoch.
fn parse_time(name: &str, value: &str) -> ApiResult<i64> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(value)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("{name}={value:?} is not an RFC 3339 time or milliseconds since 1970"),
            )
        })
}

async fn admin_audit(
    State(s): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    authorize(&s, &headers, READERS).await?;
    let Query(p) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let after = p
        .after
        .as_deref()
        .map(|a| {
            crate::store::AuditCursor::parse(a).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("after={a:?} is not a cursor from an earlier page's `next`"),
                )
            })
        })
        .transpose()?;
    let limit = p.limit.unwrap_or(1000).clamp(1, 10_000);
    let q = crate::store::AuditQuery {
        since_ms: p
            .since
            .as_deref()
            .map(|v| parse_time("since", v))
            .transpose()?,
        until_ms: p
            .until
            .as_deref()
            .map(|v| parse_time("until", v))
            .transpose()?,
        workspace: p.workspace.as_deref().map(workspace_id).transpose()?,
        after,
        limit,
    };
    let entries = s.store.admin_audit(&q).await?;
    let next = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.cursor.to_string()))
        .flatten();
    let entries: Vec<_> = entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "id": e.cursor.to_string(),
                "at": rfc3339(e.cursor.at_ms),
                "actor": e.actor,
                "action": e.action,
                "subject": e.subject,
                "version": e.version,
                "move": e.move_id,
                "reason": e.reason,
                "detail": e.detail,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "entries": entries, "next": next })).into_response())
}

// ---- operations ----

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.store.head().await {
        Ok(head) => Json(serde_json::json!({
            "ready": true,
            "store": s.store.backend_name(),
            "head": head.version,
            "epoch": head.epoch,
        }))
        .into_response(),
        Err(e) => {
            tracing::warn!("readiness: the store is unreachable: {e}");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the store is unreachable (the control plane's log has the details)",
            )
            .into_response()
        }
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    use std::fmt::Write;
    let m = &s.metrics;
    let mut out = String::new();
    let head = *s.store.subscribe().borrow();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let series = [
        (
            "domicile_cp_head_version",
            "Newest committed map version.",
            "gauge",
            head,
        ),
        (
            "domicile_cp_requests_total",
            "API requests.",
            "counter",
            load(&m.requests),
        ),
        (
            "domicile_cp_unauthenticated_total",
            "Requests refused with 401.",
            "counter",
            load(&m.unauthenticated),
        ),
        (
            "domicile_cp_forbidden_total",
            "Requests refused with 403.",
            "counter",
            load(&m.forbidden),
        ),
        (
            "domicile_cp_feed_streams",
            "Open change streams.",
            "gauge",
            load(&m.feed_streams_open),
        ),
        (
            "domicile_cp_feed_changes_sent_total",
            "Changes sent on change streams.",
            "counter",
            load(&m.feed_lines_sent),
        ),
        (
            "domicile_cp_heartbeats_total",
            "Fleet heartbeats received.",
            "counter",
            load(&m.heartbeats),
        ),
        (
            "domicile_cp_snapshots_total",
            "Snapshots served.",
            "counter",
            load(&m.snapshots),
        ),
        (
            "domicile_cp_nats_connected",
            "1 while connected to the NATS fan-out tier (0 without one).",
            "gauge",
            load(&s.nats.connected),
        ),
        (
            "domicile_cp_nats_published_total",
            "Changes the NATS stream stored from this replica.",
            "counter",
            load(&s.nats.published),
        ),
        (
            "domicile_cp_nats_duplicates_total",
            "Changes this replica published that the stream already held (from the other replica).",
            "counter",
            load(&s.nats.duplicates),
        ),
        (
            "domicile_cp_nats_stream_version",
            "The newest version this replica knows the NATS stream holds.",
            "gauge",
            load(&s.nats.stream_version),
        ),
        (
            "domicile_cp_nats_heartbeats_total",
            "Heartbeats received through NATS and written.",
            "counter",
            load(&s.nats.heartbeats),
        ),
        (
            "domicile_cp_nats_errors_total",
            "NATS publishing and setup errors (each retried).",
            "counter",
            load(&s.nats.errors),
        ),
        (
            "domicile_cp_store_operations_total",
            "Store operations begun (each one statement or one transaction).",
            "counter",
            s.store.operations(),
        ),
        (
            "domicile_cp_moves_started_total",
            "Moves whose freeze this replica wrote.",
            "counter",
            load(&s.moves.metrics.started),
        ),
        (
            "domicile_cp_moves_done_total",
            "Moves this replica finished.",
            "counter",
            load(&s.moves.metrics.done),
        ),
        (
            "domicile_cp_moves_aborted_total",
            "Moves aborted through this replica.",
            "counter",
            load(&s.moves.metrics.aborted),
        ),
        (
            "domicile_cp_moves_stalled_total",
            "Move phases that outlived their timeout.",
            "counter",
            load(&s.moves.metrics.stalled),
        ),
        (
            "domicile_cp_move_webhooks_sent_total",
            "Move webhook calls answered with 2xx.",
            "counter",
            load(&s.moves.metrics.webhooks_sent),
        ),
        (
            "domicile_cp_move_webhooks_failed_total",
            "Move webhook calls that failed after their retries, or were dropped.",
            "counter",
            load(&s.moves.metrics.webhooks_failed),
        ),
    ];
    for (name, help, kind, value) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    if let Ok(fleet) = fleet_status(&s.store, &s.config).await {
        let _ = writeln!(
            out,
            "# HELP domicile_cp_fleet_members Proxies by sync status.\n# TYPE domicile_cp_fleet_members gauge"
        );
        for status in [SyncStatus::Synced, SyncStatus::Behind, SyncStatus::Stale] {
            let n = fleet.members.iter().filter(|m| m.status == status).count();
            let _ = writeln!(
                out,
                "domicile_cp_fleet_members{{status=\"{}\"}} {n}",
                status.as_str()
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_describes_exactly_the_routes_served() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let mut described: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                    described.push((method.clone(), path.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        described.sort();
        served.sort();
        assert_eq!(described, served);
        // Every operation says who may call it and what its errors look like.
        for (method, path) in &served {
            let op = &doc["paths"][path][method];
            assert!(op["operationId"].is_string(), "{method} {path}");
            assert!(op["responses"].is_object(), "{method} {path}");
        }
    }
}
