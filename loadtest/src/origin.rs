//! The shared upstream of `compare`: a small, fast static origin that every proxy (and the
//! direct baseline) talks to, so that differences between rows are the proxies' own.
//!
//! One process listens on one port per upstream group (`eu` and `us`); each answers with the
//! same bodies and says which group it is in `x-origin-pool`, which is how `compare` checks
//! that each proxy routes as configured before it measures anything. Bodies are built once and
//! shared: a response costs a reference count, not a copy.
//!
//! With `--tls-pool`, a group also listens for TLS with its region's certificate
//! (`origin-<group>.pem` from `domicile certs dev`, naming `<group>.region.<domain>`), for the
//! rows whose proxies must reach origins over TLS and check the region's identity.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// The small body: what a typical JSON API answer to a cheap GET looks like in size.
pub const SMALL_BODY: &[u8] = b"{\"ok\":true,\"from\":\"origin\"}\n";
/// Response sizes of the larger GET workloads, by path.
pub const SIZED_PATHS: [(&str, usize); 2] = [("/16k", 16 * 1024), ("/1m", 1024 * 1024)];

#[derive(Clone)]
struct Bodies {
    small: Bytes,
    k16: Bytes,
    m1: Bytes,
    pool: HeaderValue,
}

impl Bodies {
    fn new(pool: &str) -> anyhow::Result<Self> {
        let filled =
            |n: usize| Bytes::from((0..n).map(|i| b'a' + (i % 26) as u8).collect::<Vec<_>>());
        Ok(Self {
            small: Bytes::from_static(SMALL_BODY),
            k16: filled(SIZED_PATHS[0].1),
            m1: filled(SIZED_PATHS[1].1),
            pool: HeaderValue::from_str(pool)?,
        })
    }

    fn body_for(&self, path: &str) -> Bytes {
        match path {
            "/16k" => self.k16.clone(),
            "/1m" => self.m1.clone(),
            _ => self.small.clone(),
        }
    }
}

async fn answer(
    bodies: Bodies,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if req.method() == Method::POST || req.method() == Method::PUT {
        // Read the upload to the end, as a real origin would, then answer small.
        let mut incoming = req.into_body();
        while let Some(frame) = incoming.frame().await {
            if frame.is_err() {
                break;
            }
        }
        bodies.small.clone()
    } else {
        bodies.body_for(req.uri().path())
    };
    let mut response = Response::new(Full::new(body));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("x-origin-pool", bodies.pool.clone());
    Ok(response)
}

async fn serve(listener: TcpListener, bodies: Bodies, tls: Option<tokio_rustls::TlsAcceptor>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("origin: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let bodies = bodies.clone();
        let tls = tls.clone();
        tokio::task::spawn_local(async move {
            let service = service_fn(move |req| answer(bodies.clone(), req));
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).keep_alive(true);
            match tls {
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), service).await;
                }
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
            }
        });
    }
}

/// Serves the groups named in `pools` (one listener each, port 0 unless given), and those in
/// `tls_pools` over TLS with the certificates in `certs`, on the current thread until the
/// process is killed. Prints one line, `origin <pool>=<addr> ... <pool>+tls=<addr> ...`, when
/// ready.
pub fn run(
    pools: &[(String, SocketAddr)],
    tls_pools: &[(String, SocketAddr)],
    certs: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let mut line = String::from("origin");
        for (pool, addr) in pools {
            let listener = TcpListener::bind(addr).await?;
            line.push_str(&format!(" {pool}={}", listener.local_addr()?));
            tokio::task::spawn_local(serve(listener, Bodies::new(pool)?, None));
        }
        for (pool, addr) in tls_pools {
            let certs = certs.ok_or_else(|| anyhow::anyhow!("--tls-pool needs --certs"))?;
            let layout = domicile_certs::dev::DevLayout::new(certs);
            let (cert, key) = layout.origin(pool);
            let tls = domicile_certs::ServerTls::load(
                vec![domicile_certs::CertSource { cert, key }],
                domicile_certs::UnknownName::Default,
                &domicile_certs::ServerOptions::default(),
            )?;
            let mut config = (*tls.config()).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
            let listener = TcpListener::bind(addr).await?;
            line.push_str(&format!(" {pool}+tls={}", listener.local_addr()?));
            tokio::task::spawn_local(serve(listener, Bodies::new(pool)?, Some(acceptor)));
        }
        println!("{line}");
        std::future::pending::<()>().await;
        Ok(())
    })
}
