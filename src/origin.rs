//! A demo origin: answers any request with JSON describing what it received, so a reader (or a
//! test) can see which region served a request and with which headers.
//!
//! `{"region": ..., "method": ..., "path": ..., "authority": ..., "headers": {...}, "body_bytes": N}`
//! (`authority` is the request target's authority: HTTP/2's `:authority`, else null).
//!
//! Request bodies are read as a stream and counted, never held. WebSocket upgrades are accepted
//! and echoed. Every request is also kept in a log that tests can read, with the time it was
//! processed; `x-origin-delay-ms: N` makes processing take N ms.
//!
//! An origin can serve TLS ([`Origin::start_tls`]) with its region's certificate, requiring a
//! client certificate from the CA it is given (mTLS); its JSON then also says
//! `"tls": {"client": "<identity of the client certificate>"}`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// One request as an origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body_bytes: u64,
    /// When the origin had the whole request, in microseconds since the Unix epoch (always
    /// before its answer left).
    pub at_us: i64,
}

/// A running origin.
#[derive(Debug)]
pub struct Origin {
    pub region: String,
    pub addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    stop: watch::Sender<bool>,
}

impl Origin {
    /// Starts an origin for `region` on `addr` (port 0 for any free port).
    pub async fn start(region: &str, addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(region, addr, None).await
    }

    /// Starts an origin serving TLS with `cert`/`key`; with `client_ca`, it requires a client
    /// certificate signed by that CA (mTLS) and refuses the handshake without one.
    pub async fn start_tls(
        region: &str,
        addr: SocketAddr,
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> Result<Self, domicile_certs::CertError> {
        let config = origin_tls_config(cert, key, client_ca)?;
        Self::start_with(region, addr, Some(tokio_rustls::TlsAcceptor::from(config)))
            .await
            .map_err(|e| domicile_certs::CertError::Setup(format!("origin {region}: {e}")))
    }

    async fn start_with(
        region: &str,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, mut stop_rx) = watch::channel(false);
        let region_name: Arc<str> = Arc::from(region);
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                    _ = stop_rx.wait_for(|s| *s) => return,
                };
                let _ = stream.set_nodelay(true);
                let region = region_name.clone();
                let log = log.clone();
                let conn_stop = stop_rx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_conn(stream, None, region, log, conn_stop).await,
                        Some(acceptor) => {
                            let Ok(Ok(stream)) = tokio::time::timeout(
                                std::time::Duration::from_secs(10),
                                acceptor.accept(stream),
                            )
                            .await
                            else {
                                return;
                            };
                            let client = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first())
                                .map(|leaf| {
                                    domicile_certs::identity::of_certificate(leaf)
                                        .map_or_else(|| "(no identity)".to_owned(), |id| id.uri())
                                });
                            serve_conn(stream, Some(client), region, log, conn_stop).await
                        }
                    }
                });
            }
        });
        Ok(Self {
            region: region.to_owned(),
            addr,
            seen,
            stop,
        })
    }

    /// Every request this origin received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Requests received, not counting health checks.
    pub fn seen_requests(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| {
                s.headers.get("user-agent").map(String::as_str) != Some("domicile-health-check")
            })
            .collect()
    }

    /// Stops accepting and drops every open connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The rustls configuration of a TLS origin: its certificate, and with `client_ca` a client
/// certificate required from every client.
fn origin_tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ServerConfig>, domicile_certs::CertError> {
    let source = domicile_certs::CertSource {
        cert: cert.to_owned(),
        key: key.to_owned(),
    };
    let options = domicile_certs::ServerOptions {
        client_ca: client_ca.map(ToOwned::to_owned),
        require_client_cert: true,
        ..Default::default()
    };
    let tls = domicile_certs::ServerTls::load(
        vec![source],
        domicile_certs::UnknownName::Default,
        &options,
    )?;
    Ok(tls.config())
}

/// Serves one connection until it ends or the origin stops. `tls`: the identity of the client
/// certificate of a TLS connection (`None` inside: no certificate).
async fn serve_conn<I>(
    io: I,
    tls: Option<Option<String>>,
    region: Arc<str>,
    log: Arc<std::sync::Mutex<Vec<Seen>>>,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let tls: Option<Arc<Option<String>>> = tls.map(Arc::new);
    let service = service_fn(move |req| handle(req, region.clone(), log.clone(), tls.clone()));
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::select! {
        _ = conn => {}
        // Stopping drops every connection: the region is gone.
        _ = stop.wait_for(|s| *s) => {}
    }
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(
    mut req: Request<Incoming>,
    region: Arc<str>,
    log: Arc<std::sync::Mutex<Vec<Seen>>>,
    tls: Option<Arc<Option<String>>>,
) -> Result<Response<Body>, Infallible> {
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    // A field sent several times is reported once, its values joined as a recipient may
    // combine them (`; ` for cookies, RFC 9113 section 8.2.3; `, ` for the rest).
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in req.headers() {
        let value = String::from_utf8_lossy(v.as_bytes());
        match headers.entry(k.as_str().to_owned()) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(value.into_owned());
            }
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                let joined = slot.get_mut();
                joined.push_str(if k == header::COOKIE { "; " } else { ", " });
                joined.push_str(&value);
            }
        }
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();

    if let Some(accept) = websocket_accept(&req) {
        log_seen(&log, &method, &path, &headers, 0);
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if (msg.is_text() || msg.is_binary()) && tx.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()).boxed_unsync());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        return Ok(response);
    }

    // Stream the body through, counting it.
    let mut body = req.into_body();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => body_bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    // `x-origin-delay-ms: N` makes the origin take N ms (at most 10 s) to process the request
    // before it logs and answers it: a slow write, for tests of what is in flight.
    if let Some(ms) = headers
        .get("x-origin-delay-ms")
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms.min(10_000))).await;
    }
    log_seen(&log, &method, &path, &headers, body_bytes);

    // `/bytes/N` streams N bytes back (for download tests and demos of large bodies).
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        return Ok(stream_bytes(n));
    }
    let mut value = serde_json::json!({
        "region": &*region,
        "method": method,
        "path": path,
        "authority": authority,
        "headers": headers,
        "body_bytes": body_bytes,
    });
    if let Some(tls) = tls {
        value["tls"] = serde_json::json!({ "client": tls.as_deref() });
    }
    Ok(json_response(StatusCode::OK, &value))
}

fn log_seen(
    log: &std::sync::Mutex<Vec<Seen>>,
    method: &str,
    path: &str,
    headers: &BTreeMap<String, String>,
    body_bytes: u64,
) {
    if let Ok(mut log) = log.lock() {
        log.push(Seen {
            method: method.to_owned(),
            path: path.to_owned(),
            headers: headers.clone(),
            body_bytes,
            at_us: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64),
        });
    }
}

fn stream_bytes(total: u64) -> Response<Body> {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let frames = futures_util::stream::unfold(total, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(CHUNK as u64);
            Some((
                Ok::<_, Infallible>(Frame::data(chunk.slice(..n as usize))),
                left - n,
            ))
        }
    });
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    response
}

fn websocket_accept<B>(req: &Request<B>) -> Option<HeaderValue> {
    let upgrade = req.headers().get(header::UPGRADE)?;
    if !upgrade.as_bytes().eq_ignore_ascii_case(b"websocket") {
        return None;
    }
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY)?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    HeaderValue::from_str(&accept).ok()
}
