//! Admin listener: `/healthz` (the process is up), `/readyz` (it can route: a map is loaded,
//! every region the map lists has a route here, and the audit log takes records),
//! `/metrics` (Prometheus text format), and for auditors `/audit/public-key` (the key
//! checkpoints verify with) and `/audit/checkpoint` (the latest signed checkpoint, a witness
//! for `domicile audit verify --checkpoint`). It never touches customer traffic.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::forward::Engine;

/// Readiness as the admin listener reports it.
#[derive(Debug, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub map_loaded: bool,
    pub map_version: Option<u64>,
    pub map_entries: usize,
    /// Regions the map lists that this edge has no route for.
    pub unroutable_regions: Vec<String>,
    /// Whether the audit log takes records (absent when there is no audit log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_writable: Option<bool>,
    pub draining: bool,
}

pub fn readiness(pipeline: &Engine, draining: bool) -> Readiness {
    let replica = &pipeline.replica;
    let unroutable_regions: Vec<String> = replica
        .regions()
        .snapshot()
        .iter()
        .enumerate()
        .filter(|(i, r)| r.in_map && pipeline.upstreams.pool(*i as u8).is_none())
        .map(|(_, r)| r.id.to_string())
        .collect();
    let map_loaded = replica.is_loaded();
    let audit_writable = pipeline.audit.as_ref().map(|a| a.is_healthy());
    Readiness {
        ready: map_loaded
            && unroutable_regions.is_empty()
            && audit_writable != Some(false)
            && !draining,
        map_loaded,
        map_version: replica.version(),
        map_entries: replica.len(),
        unroutable_regions,
        audit_writable,
        draining,
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// What the admin listener reports on.
pub(crate) struct Admin {
    pub engine: Arc<Engine>,
    pub edge_tls: Option<Arc<domicile_certs::ServerTls>>,
    pub draining: Arc<AtomicBool>,
}

async fn handle(req: Request<Incoming>, admin: Arc<Admin>) -> Response<Full<Bytes>> {
    let pipeline = &admin.engine;
    let draining = &admin.draining;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n",
        );
    }
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let ready = readiness(pipeline, draining.load(Ordering::Relaxed));
            let status = if ready.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = serde_json::to_vec(&ready).unwrap_or_default();
            body.push(b'\n');
            respond(status, "application/json", body)
        }
        "/metrics" => {
            let mut text =
                super::metrics::render(&pipeline.metrics, &pipeline.replica, &pipeline.upstreams);
            if let Some(audit) = &pipeline.audit {
                audit.render_metrics(&mut text);
            }
            if let Some(tls) = &admin.edge_tls {
                super::metrics::render_edge_tls(&mut text, tls);
            }
            respond(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        "/audit/public-key" | "/audit/checkpoint" => match &pipeline.audit {
            None => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "this proxy keeps no audit log ([audit] is not configured)\n",
            ),
            Some(audit) if req.uri().path() == "/audit/public-key" => respond(
                StatusCode::OK,
                "application/x-pem-file",
                audit.public_key_pem().to_owned(),
            ),
            Some(audit) => respond(
                StatusCode::OK,
                "application/json",
                format!("{}\n", audit.latest_checkpoint()),
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz, /metrics, /audit/public-key or /audit/checkpoint\n",
        ),
    }
}

/// Serves the admin endpoints until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::http::io::stopped(&mut shutdown) => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(req, admin).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
