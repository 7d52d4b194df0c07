//! Admin listener: `/healthz` (the process is up), `/readyz` (it can route: a map is loaded
//! and every region the map lists has a route here) and `/metrics` (Prometheus text format).
//! It never touches customer traffic.

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

use crate::pipeline::Pipeline;

/// Readiness as the admin listener reports it.
#[derive(Debug, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub map_loaded: bool,
    pub map_version: Option<u64>,
    pub map_entries: usize,
    /// Regions the map lists that this edge has no route for.
    pub unroutable_regions: Vec<String>,
    pub draining: bool,
}

pub fn readiness(pipeline: &Pipeline, draining: bool) -> Readiness {
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
    Readiness {
        ready: map_loaded && unroutable_regions.is_empty() && !draining,
        map_loaded,
        map_version: replica.version(),
        map_entries: replica.len(),
        unroutable_regions,
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

async fn handle(
    req: Request<Incoming>,
    pipeline: Arc<Pipeline>,
    draining: Arc<AtomicBool>,
) -> Response<Full<Bytes>> {
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
            let ready = readiness(&pipeline, draining.load(Ordering::Relaxed));
            let status = if ready.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = serde_json::to_vec(&ready).unwrap_or_default();
            body.push(b'\n');
            respond(status, "application/json", body)
        }
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            pipeline
                .metrics
                .render(&pipeline.replica, &pipeline.upstreams),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    }
}

/// Serves the admin endpoints until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    pipeline: Arc<Pipeline>,
    draining: Arc<AtomicBool>,
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
            _ = crate::listener::stopped(&mut shutdown) => return,
        };
        let pipeline = pipeline.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let pipeline = pipeline.clone();
                let draining = draining.clone();
                async move { Ok::<_, Infallible>(handle(req, pipeline, draining).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
