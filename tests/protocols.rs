//! End-to-end protocol behaviour: HTTP/2, upgrades, limits, malformed input, upstream failures,
//! retries and graceful shutdown.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn http2_clients_are_routed_like_http1() {
    let (_us, _eu, proxy) = two_regions().await;
    let by_header = send_h2(
        Request::get(proxy.url("/h2"))
            .header("x-workspace-id", "globex")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(by_header.status, 200);
    assert_eq!(by_header.region(), "eu");
    // :authority carries the host for HTTP/2.
    let authority = format!("http://acme.localhost:{}/x", proxy.addr().port());
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(ForcedConnector(proxy.addr()));
    let reply = collect(
        client
            .request(
                Request::get(authority)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.region(), "us");
    assert_eq!(
        reply.json()["headers"]["host"],
        format!("acme.localhost:{}", proxy.addr().port())
    );
    // Many concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let client = client.clone();
        let url = format!(
            "http://{}.localhost:{}/{i}",
            if i % 2 == 0 { "acme" } else { "globex" },
            proxy.addr().port()
        );
        tasks.push(tokio::spawn(async move {
            collect(
                client
                    .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
                    .await
                    .unwrap(),
            )
            .await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let reply = task.await.unwrap();
        assert_eq!(reply.region(), if i % 2 == 0 { "us" } else { "eu" });
    }
    proxy.running.shutdown().await;
}

/// Connects every request to one address whatever its host (like curl --resolve).
#[derive(Clone)]
struct ForcedConnector(SocketAddr);

impl tower_service::Service<http::Uri> for ForcedConnector {
    type Response = hyper_util::rt::TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                TcpStream::connect(addr).await?,
            ))
        })
    }
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let eu = origin("eu").await;
    let proxy = proxy().route("eu", &[&eu]).start().await;
    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let request = http::Request::get(format!("ws://{}/w/globex/socket", proxy.addr()))
        .header("host", proxy.addr().to_string())
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .body(())
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("handshake through the proxy");
    assert_eq!(response.status(), 101);
    for text in ["hello", "residency", "ünïcødé"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
        0u8, 1, 2, 255,
    ]))
    .await
    .unwrap();
    let data: Vec<u8> = ws.next().await.unwrap().unwrap().into_data().to_vec();
    assert_eq!(data, [0u8, 1, 2, 255]);
    let seen = eu.seen_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["x-domicile-workspace"], "globex");
    assert_eq!(seen[0].headers["upgrade"], "websocket");
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn body_limits_answer_413() {
    let us = origin("us").await;
    let proxy = proxy()
        .route_addrs("us", &[us.addr], "max_body_bytes = \"64KiB\"")
        .start()
        .await;
    // Declared too large: refused before anything is sent.
    let big = vec![b'x'; 100 * 1024];
    let reply = send(
        Request::post(proxy.url("/upload"))
            .header("x-workspace-id", "acme")
            .body(Full::new(Bytes::from(big)))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.refusal(), Some("body_too_large"));
    assert!(us.seen_requests().is_empty());

    // Chunked, no length: cut off when it passes the limit.
    let chunks = (0..40)
        .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'y'; 4096]))));
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let client: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(
            Request::post(proxy.url("/upload"))
                .header("x-workspace-id", "acme")
                .body(body)
                .unwrap(),
        )
        .await
        .unwrap();
    let reply = collect(response).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.refusal(), Some("body_too_large"));

    // Within the limit passes.
    let ok = send(
        Request::post(proxy.url("/upload"))
            .header("x-workspace-id", "acme")
            .body(Full::new(Bytes::from(vec![b'z'; 60 * 1024])))
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["body_bytes"], 60 * 1024);
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn heads_over_the_limits_get_the_right_status_and_never_reach_an_origin() {
    let us = origin("us").await;
    let proxy = proxy()
        .route("us", &[&us])
        .limits("max_header_bytes = 2048\nmax_headers = 20\nheader_read_timeout = \"400ms\"")
        .start()
        .await;
    let addr = proxy.addr();
    let long_value = "v".repeat(3000);
    let huge_value = "v".repeat(40_000);
    let many: String = (0..30).map(|i| format!("x-h{i}: 1\r\n")).collect();
    let too_many_for_hyper: String = (0..150).map(|i| format!("x-h{i}: 1\r\n")).collect();
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "CONNECT",
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".into(),
            400,
        ),
        (
            "header over our limit",
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nx-workspace-id: acme\r\nx-long: {long_value}\r\n\r\n"
            ),
            431,
        ),
        (
            "header over hyper's backstop",
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nx-workspace-id: acme\r\nx-long: {huge_value}\r\n\r\n"
            ),
            431,
        ),
        (
            "too many headers",
            format!("GET / HTTP/1.1\r\nHost: a\r\nx-workspace-id: acme\r\n{many}\r\n"),
            431,
        ),
        (
            "far too many headers",
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nx-workspace-id: acme\r\n{too_many_for_hyper}\r\n"
            ),
            431,
        ),
        (
            "slow headers",
            "GET / HTTP/1.1\r\nHost: a\r\nx-workspace-id: ac".into(),
            408,
        ),
    ];
    for (name, bytes, want) in &cases {
        let answer = raw(addr, bytes.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(raw_status(&answer), Some(*want), "{name}: {answer:?}");
        if answer.contains("x-domicile-refusal") {
            assert!(
                answer.contains("{\"error\":{\"code\":"),
                "{name}: refusal without JSON body: {answer}"
            );
        }
    }
    assert!(
        us.seen_requests().is_empty(),
        "a malformed request reached the origin: {:?}",
        us.seen_requests()
    );

    // An idle connection that never sends a byte is closed silently after the timeout.
    let answer = raw(addr, b"", Duration::from_secs(3)).await;
    assert_eq!(answer, "");
    proxy.running.shutdown().await;
}

/// An upstream that accepts connections and then does `behaviour` with each.
async fn bad_upstream(hang: bool) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            if hang {
                held.push(stream);
            } else {
                drop(stream);
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn upstream_timeout_is_504_and_broken_upstream_is_502() {
    let (hanging, _h) = bad_upstream(true).await;
    let (closing, _c) = bad_upstream(false).await;
    let proxy = proxy()
        .route_addrs("us", &[hanging], "health = { enabled = false }")
        .route_addrs("eu", &[closing], "health = { enabled = false }")
        .limits("upstream_response_timeout = \"300ms\"")
        .start()
        .await;
    let slow = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
    assert_eq!(slow.status, 504);
    assert_eq!(slow.refusal(), Some("upstream_timeout"));
    let broken = get(&proxy.url("/"), &[("x-workspace-id", "globex")]).await;
    assert_eq!(broken.status, 502);
    assert_eq!(broken.refusal(), Some("upstream_error"));
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn idempotent_requests_retry_within_the_home_region_only() {
    let us = origin("us").await;
    let eu = origin("eu").await;
    let (closing, _c) = bad_upstream(false).await;
    let proxy = proxy()
        .route_addrs(
            "us",
            &[closing, us.addr],
            "health = { enabled = false }\nejection = { consecutive_failures = 100 }",
        )
        .route("eu", &[&eu])
        .start()
        .await;
    for i in 0..6 {
        let reply = get(&proxy.url(&format!("/{i}")), &[("x-workspace-id", "acme")]).await;
        assert_eq!(
            reply.status, 200,
            "GET {i} retried on the other us endpoint"
        );
        assert_eq!(reply.region(), "us");
    }
    // POST is not idempotent: never retried, so some land on the broken endpoint.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            request("POST", &proxy.url("/"), &[("x-workspace-id", "acme")], b"x")
                .await
                .status,
        );
    }
    assert!(
        statuses.contains(&502) && statuses.contains(&200),
        "{statuses:?}"
    );
    assert!(
        eu.seen_requests().is_empty(),
        "never retried in another region"
    );
    let metrics =
        String::from_utf8_lossy(&get(&proxy.admin_url("/metrics"), &[]).await.body).into_owned();
    assert!(
        !metrics.contains("domicile_upstream_retries_total 0"),
        "{metrics}"
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn passive_ejection_takes_a_failing_endpoint_out() {
    let us = origin("us").await;
    let (closing, _c) = bad_upstream(false).await;
    let proxy = proxy()
        .route_addrs("us", &[closing, us.addr], "health = { enabled = false }\nejection = { consecutive_failures = 2, duration = \"1m\" }")
        .limits("retries = 0")
        .start()
        .await;
    let mut failures = 0;
    for _ in 0..12 {
        if get(&proxy.url("/"), &[("x-workspace-id", "acme")])
            .await
            .status
            != 200
        {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 2,
        "two failures eject the endpoint, then all requests succeed"
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_stops_accepting() {
    let us = origin("us").await;
    let proxy = proxy().route("us", &[&us]).start().await;
    let addr = proxy.addr();
    let (tx, in_flight) = streaming_post(&format!("http://{addr}/upload"), "acme");
    tx.send(Ok(Frame::data(Bytes::from_static(b"first half,"))))
        .await
        .unwrap();
    // Wait until the proxy has the request in hand.
    proxy.wait_for_connections(1).await;
    let shutdown = tokio::spawn(proxy.running.shutdown());
    // New connections are refused once the listener is gone.
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect(
            addr
        )
        .is_err())
        .await,
        "listener closed"
    );
    tx.send(Ok(Frame::data(Bytes::from_static(b" second half"))))
        .await
        .unwrap();
    drop(tx);
    let response = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes");
    let reply = collect(response).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["body_bytes"], 23);
    assert_eq!(
        shutdown.await.unwrap(),
        0,
        "drained within the grace period"
    );
}

#[tokio::test]
async fn responses_stream_and_keep_alive_is_reused() {
    let us = origin("us").await;
    let proxy = proxy().route("us", &[&us]).start().await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    for i in 0..3 {
        stream
            .write_all(b"GET /bytes/100000 HTTP/1.1\r\nHost: acme.localhost\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{i}: {head}");
        assert!(
            head.to_ascii_lowercase().contains("content-length: 100000"),
            "{head}"
        );
        let mut body = vec![0u8; 100_000];
        stream.read_exact(&mut body).await.unwrap();
        assert!(body.iter().all(|&b| b == b'x'));
    }
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(
            Request::get(proxy.url("/bytes/5000000"))
                .header("x-workspace-id", "acme")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let total = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len();
    assert_eq!(total, 5_000_000);
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn h2c_upstreams_are_spoken_to_in_http2() {
    let eu = origin("eu").await;
    let proxy = proxy()
        .route_addrs("eu", &[eu.addr], "protocol = \"h2c\"")
        .start()
        .await;
    let reply = get(
        &proxy.url("/over-h2"),
        &[("x-workspace-id", "globex"), ("host", "globex.example")],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.region(), "eu");
    let headers = reply.json()["headers"].clone();
    // HTTP/2 carries the client's host as :authority (not the endpoint's address), and it is
    // in Forwarded too.
    assert!(headers.get("host").is_none(), "{headers}");
    assert_eq!(reply.json()["authority"], "globex.example");
    assert!(
        headers["forwarded"]
            .as_str()
            .unwrap()
            .contains("host=\"globex.example\""),
        "{headers}"
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn idle_connections_are_closed_without_a_response() {
    let us = origin("us").await;
    let proxy = proxy()
        .route("us", &[&us])
        .limits("header_read_timeout = \"300ms\"\nidle_timeout = \"300ms\"")
        .start()
        .await;

    // HTTP/1.1: a complete exchange, then silence: closed, and no unsolicited 408.
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: acme.localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "idle keep-alive connection closed");
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    // HTTP/2: one request, then no streams for the idle timeout: the proxy says GOAWAY.
    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::get(format!("http://{}/", proxy.addr()))
                .header("x-workspace-id", "acme")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection closed by the proxy");
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn readyz_reports_draining_during_shutdown() {
    let us = origin("us").await;
    let eu = origin("eu").await;
    // A map without unroutable regions, so the proxy is ready before shutdown.
    let map = MAP.replace("{\"type\":\"region\",\"id\":\"au\",\"name\":\"Australia\",\"jurisdiction\":[\"AU\"]}\n", "").replace("{\"type\":\"workspace\",\"id\":\"wombat\",\"region\":\"au\",\"epoch\":1,\"version\":7}\n", "");
    let proxy = proxy()
        .route("us", &[&us])
        .route("eu", &[&eu])
        .map(Some(&map))
        .start()
        .await;
    let admin = proxy.admin_url("/readyz");
    assert_eq!(get(&admin, &[]).await.status, 200);
    // A request whose body is still arriving keeps the drain going.
    let (tx, in_flight) = streaming_post(&proxy.url("/upload"), "acme");
    tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
        .await
        .unwrap();
    proxy.wait_for_connections(1).await;
    let shutdown = tokio::spawn(proxy.running.shutdown());
    let mut saw_draining = false;
    for _ in 0..50 {
        let reply = get(&admin, &[]).await;
        if reply.status == 503 && reply.json()["draining"] == true {
            saw_draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        saw_draining,
        "/readyz said draining while requests finished"
    );
    drop(tx);
    let reply = collect(in_flight.await.unwrap().unwrap()).await;
    assert_eq!(reply.status, 200, "in-flight request finished");
    assert_eq!(shutdown.await.unwrap(), 0);
}

#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    let us = origin("us").await;
    let proxy = proxy()
        .route("us", &[&us])
        .limits("idle_timeout = \"300ms\"")
        .start()
        .await;
    let (tx, pending) = streaming_post(&proxy.url("/upload"), "acme");
    tx.send(Ok(Frame::data(Bytes::from_static(
        b"a few bytes, then nothing",
    ))))
    .await
    .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("answered")
        .unwrap()
        .unwrap();
    let reply = collect(response).await;
    assert_eq!(reply.status, 408);
    assert_eq!(reply.refusal(), Some("request_timeout"));
    drop(tx);
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_connections_that_never_sent_a_byte() {
    let us = origin("us").await;
    // The default 10 s header read timeout would hold the drain if silent connections counted.
    let proxy = proxy().route("us", &[&us]).start().await;
    let _silent = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.wait_for_connections(1).await;
    let drained = tokio::time::timeout(Duration::from_secs(3), proxy.running.shutdown()).await;
    assert_eq!(drained.expect("drained promptly"), 0);
}

#[tokio::test]
async fn a_long_upload_is_not_an_upstream_timeout_and_a_stalled_one_ejects_nothing() {
    let us = origin("us").await;
    let proxy = proxy()
        .route_addrs("us", &[us.addr], "ejection = { consecutive_failures = 1 }")
        // Margins wide enough for a loaded 2-core machine: frames 100 ms apart against a 1 s
        // stall limit, and half a second for the origin to answer once the upload is done.
        .limits("upstream_response_timeout = \"500ms\"\nidle_timeout = \"1s\"")
        .start()
        .await;
    // An upload that keeps moving for longer than the response timeout.
    let (tx, pending) = streaming_post(&proxy.url("/upload"), "acme");
    for _ in 0..12 {
        tx.send(Ok(Frame::data(Bytes::from_static(b"0123456789"))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(tx);
    let reply = collect(pending.await.unwrap().unwrap()).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["body_bytes"], 120);

    // A client that stalls its upload is the client's fault: 408, and the endpoint stays in.
    let (tx, pending) = streaming_post(&proxy.url("/upload"), "acme");
    tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
        .await
        .unwrap();
    let reply = collect(pending.await.unwrap().unwrap()).await;
    assert_eq!(reply.status, 408);
    drop(tx);
    let after = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
    assert_eq!(after.status, 200, "the endpoint was not ejected");
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn hosts_with_user_information_are_refused_and_a_trailing_dot_is_the_same_host() {
    let (us, eu, proxy) = two_regions().await;
    let answer = raw(
        proxy.addr(),
        b"GET / HTTP/1.1\r\nHost: globex.localhost@acme.localhost\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(raw_status(&answer), Some(400), "{answer}");
    assert!(answer.contains("bad_request"), "{answer}");
    let dotted = get(&proxy.url("/"), &[("host", "globex.localhost.")]).await;
    assert_eq!(dotted.region(), "eu");
    assert!(us.seen_requests().is_empty());
    assert_eq!(eu.seen_requests().len(), 1);
    proxy.running.shutdown().await;
}

/// A raw HTTP/1.1 origin that counts the connections it accepts and answers every request
/// `200 ok`; with `close_after_each`, it closes each connection after one response without
/// saying so (no `Connection: close`), as an origin with a short keep-alive timeout does.
async fn counting_upstream(
    close_after_each: bool,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                        if close_after_each {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn upstream_connections_are_reused_and_closed_ones_are_replaced() {
    use std::sync::atomic::Ordering;
    // A keep-alive origin: 50 sequential requests through one worker share one connection.
    let (addr, accepted) = counting_upstream(false).await;
    let keeping = proxy()
        .route_addrs("us", &[addr], "health.enabled = false")
        .proxy_section("workers = 1")
        .start()
        .await;
    for i in 0..50 {
        let reply = get(&keeping.url("/"), &[("x-workspace-id", "acme")]).await;
        assert_eq!(reply.status, 200, "request {i}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection");
    keeping.running.shutdown().await;

    // An origin that closes every connection after one response: each request still succeeds
    // (on a new connection), none is refused, none is sent twice.
    let (addr, accepted) = counting_upstream(true).await;
    let proxy = proxy()
        .route_addrs("us", &[addr], "health.enabled = false")
        .proxy_section("workers = 1")
        .start()
        .await;
    for i in 0..20 {
        let reply = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
        assert_eq!(reply.status, 200, "request {i}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 20);
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn several_workers_share_the_port_and_drain_together() {
    let us = origin("us").await;
    let proxy = proxy()
        .route("us", &[&us])
        .proxy_section("workers = 3")
        .start()
        .await;
    // Many connections at once: the kernel spreads them over the workers' sockets.
    let replies =
        futures_util::future::join_all((0..60).map(|_| get_owned(proxy.url("/spread"), "acme")))
            .await;
    assert!(replies.iter().all(|status| *status == 200), "{replies:?}");
    assert_eq!(proxy.running.shutdown().await, 0);
}

async fn get_owned(url: String, workspace: &'static str) -> u16 {
    get(&url, &[("x-workspace-id", workspace)]).await.status
}

#[tokio::test]
async fn upgrades_pass_between_http1_ends_only() {
    use common::h2frames::*;
    let us = origin("us").await;
    let eu = origin("eu").await;
    let proxy = proxy()
        .route("us", &[&us])
        .route_addrs("eu", &[eu.addr], "protocol = \"h2c\"")
        .start()
        .await;
    let upgrade = |workspace: &str| {
        format!(
            "GET /w/{workspace}/socket HTTP/1.1\r\nhost: edge.test\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    // HTTP/1.1 on both sides: the origin's 101 comes back and the connection is a tunnel.
    let answer = raw(
        proxy.addr(),
        upgrade("acme").as_bytes(),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(raw_status(&answer), Some(101), "{answer}");
    assert_eq!(us.seen_requests()[0].headers["upgrade"], "websocket");
    // To an HTTP/2 origin there is no upgrade: the request goes as a plain one, without the
    // upgrade fields, and the client gets the origin's ordinary answer (RFC 9110 section 7.8
    // lets a server ignore Upgrade).
    let answer = raw(
        proxy.addr(),
        upgrade("globex").as_bytes(),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    let seen = eu.seen_requests();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].headers.contains_key("upgrade"),
        "{:?}",
        seen[0].headers
    );
    assert!(!seen[0].headers.contains_key("connection"));
    // HTTP/2 clients have no Upgrade (RFC 9113 section 8.2.2), and the proxy does not offer
    // WebSockets over HTTP/2 (RFC 8441): its SETTINGS leave SETTINGS_ENABLE_CONNECT_PROTOCOL
    // unset, and a CONNECT is refused.
    let mut h2 = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &header_block(&[
            (b":method", b"CONNECT"),
            (b":authority", b"acme.localhost:443"),
        ]),
    ));
    h2.write_all(&hello).await.unwrap();
    let (frames, _) = read_frames(&mut h2, Duration::from_millis(500)).await;
    let settings = frames
        .iter()
        .find(|(kind, flags, _, _)| *kind == SETTINGS && flags & ACK == 0)
        .expect("the proxy's SETTINGS");
    let enable_connect = settings
        .3
        .chunks(6)
        .any(|s| s[..2] == [0, 8] && s[2..] != [0, 0, 0, 0]);
    assert!(!enable_connect, "{:?}", settings.3);
    assert!(
        frames
            .iter()
            .any(|(kind, _, stream, _)| *kind == HEADERS && *stream == 1),
        "an answer to the CONNECT: {frames:?}"
    );
    let body: Vec<u8> = frames
        .iter()
        .filter(|(kind, _, stream, _)| *kind == DATA && *stream == 1)
        .flat_map(|f| f.3.clone())
        .collect();
    let body: serde_json::Value = serde_json::from_slice(&body).expect("a JSON refusal");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("CONNECT"),
        "{body}"
    );
    assert_eq!(us.seen_requests().len(), 1, "the CONNECT reached no origin");
    drop(h2);
    // An idle HTTP/2 client that answers the GOAWAY's PING does not hold shutdown for the
    // grace period (5 s here).
    let mut idle = common::tls::Sender::cleartext(proxy.addr(), true).await;
    assert_eq!(idle.get("acme.localhost", "/", &[]).await.status, 200);
    tokio::time::timeout(Duration::from_secs(3), proxy.running.shutdown())
        .await
        .expect("shutdown closes idle HTTP/2 connections");
}
