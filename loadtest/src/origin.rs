//! The shared upstream of `compare`: a small, fast static origin that every proxy (and the
//! direct baseline) talks to, so that differences between rows are the proxies' own.
//!
//! One process listens on one port per upstream group (`eu` and `us`); each answers with the
//! same bodies and says which group it is in `x-origin-pool`, which is how `compare` checks
//! that each proxy routes as configured before it measures anything. Bodies are built once and
//! shared: a response costs a reference count, not a copy.

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

async fn serve(listener: TcpListener, bodies: Bodies) {
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
        tokio::task::spawn_local(async move {
            let service = service_fn(move |req| answer(bodies.clone(), req));
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).keep_alive(true);
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Serves the groups named in `pools` (one listener each, port 0 unless given) on the current
/// thread until the process is killed. Prints one line, `origin <pool>=<addr> ...`, when ready.
pub fn run(pools: &[(String, SocketAddr)]) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let mut line = String::from("origin");
        for (pool, addr) in pools {
            let listener = TcpListener::bind(addr).await?;
            line.push_str(&format!(" {pool}={}", listener.local_addr()?));
            tokio::task::spawn_local(serve(listener, Bodies::new(pool)?));
        }
        println!("{line}");
        std::future::pending::<()>().await;
        Ok(())
    })
}
