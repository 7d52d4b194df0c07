//! Relaying HTTP/1.1 origins: every response framing is relayed intact, origin misbehaviour is
//! refused without reusing the connection, a connection carrying requests of every kind is
//! answered in order, and the forwarding fields follow the trust of the peer. (That every
//! client protocol × origin protocol pair sends an origin the same request is in `matrix.rs`.)

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::scripted::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn proxy_to(addr: SocketAddr) -> TestProxy {
    proxy()
        .route_addrs("us", &[addr], "health.enabled = false")
        .proxy_section("workers = 1")
        .start()
        .await
}

fn request(method: &str, extra: &str) -> String {
    format!("{method} /doc?x=1 HTTP/1.1\r\nhost: edge.test\r\nx-workspace-id: acme\r\n{extra}\r\n")
}

#[tokio::test]
async fn chunked_responses_pass_through_with_trailers_and_the_connection_is_reused() {
    let origin = scripted(|_| {
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
            false,
        )
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    // Two pipelined requests on one client connection; the second asks to close.
    let ask = format!(
        "{}{}",
        request("GET", ""),
        request("GET", "connection: close\r\n")
    );
    let answer = raw(proxy.addr(), ask.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{answer}");
    assert_eq!(
        answer
            .matches("5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n")
            .count(),
        2,
        "{answer}"
    );
    assert_eq!(answer.matches("transfer-encoding: chunked\r\n").count(), 2);
    assert_eq!(answer.matches("x-request-id: ").count(), 2);
    // The origin sent no date: the proxy adds the time it received the response.
    assert_eq!(answer.matches("date: ").count(), 2, "{answer}");
    assert!(answer.contains(" GMT\r\n"), "{answer}");
    assert!(answer.ends_with("x-trailer: t\r\n\r\n"), "{answer}");
    assert_eq!(
        origin.accepted.load(Ordering::SeqCst),
        1,
        "one origin connection"
    );
    // What the origin saw: the client's request with the routing fields set.
    let heads = origin.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2);
    assert!(
        heads[0].starts_with("GET /doc?x=1 HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    assert!(heads[0].contains("x-domicile-region: us\r\n"));
    assert!(heads[0].contains("x-domicile-epoch: 3\r\n"));
    assert!(heads[0].contains("x-domicile-map-version: 7\r\n"));
    assert!(
        !heads[1].to_ascii_lowercase().contains("connection:"),
        "connection is hop-by-hop: {}",
        heads[1]
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn a_response_delimited_by_close_ends_the_client_connection_too() {
    let origin = scripted(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it".to_vec(),
            true,
        )
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    for _ in 0..2 {
        // No `connection: close` from the client: the proxy closes because the body ends so.
        let answer = raw(
            proxy.addr(),
            request("GET", "").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nall of it"), "{answer}");
    }
    assert_eq!(origin.accepted.load(Ordering::SeqCst), 2);
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn a_client_that_asked_to_close_is_closed_at_once_unless_it_sent_more() {
    let origin = scripted(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            false,
        )
    })
    .await;
    let proxy = proxy_to(origin.addr).await;

    // Asked to close and sent nothing more: the connection is closed outright, not lingered
    // on (lingering reads on for 300 ms), so bytes sent after the answer meet a closed socket:
    // it resets, and the next write fails.
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(request("GET", "connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the answer, then the close")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    let refused = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            if let Err(e) = stream.write_all(b"x").await {
                break e.kind();
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(
        refused.ok(),
        Some(std::io::ErrorKind::BrokenPipe),
        "nothing lingers on a connection whose client is done"
    );

    // Sent more after asking to close (a pipelined request): the client may still be sending,
    // and a reset could destroy the answer before it reads it, so the connection lingers: the
    // answer, a clean end, and what the client sends next is still read, not reset.
    let ask = format!(
        "{}{}",
        request("GET", "connection: close\r\n"),
        request("GET", "")
    );
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream.write_all(ask.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the answer, then the close")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 1, "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    // Well inside the 300 ms the lingering close reads for.
    for _ in 0..50 {
        stream
            .write_all(b"x")
            .await
            .expect("a lingering connection reads what the client still sends");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn head_204_and_304_responses_have_no_body_and_keep_the_connections() {
    let origin = scripted(|head| {
        let reply: &[u8] = if head.starts_with("HEAD ") {
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
        } else if head.contains("if-none-match") {
            b"HTTP/1.1 304 Not Modified\r\netag: \"a\"\r\n\r\n"
        } else {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        };
        (reply.to_vec(), false)
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    let ask = format!(
        "{}{}{}{}",
        request("HEAD", ""),
        request("GET", "if-none-match: \"a\"\r\n"),
        request("DELETE", ""),
        request("HEAD", "connection: close\r\n"),
    );
    let answer = raw(proxy.addr(), ask.as_bytes(), Duration::from_secs(5)).await;
    let statuses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
    assert_eq!(statuses, ["200", "304", "204", "200"], "{answer}");
    assert_eq!(answer.matches("content-length: 5\r\n").count(), 2);
    assert_eq!(origin.accepted.load(Ordering::SeqCst), 1);
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let origin = scripted(|_| {
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            false,
        )
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    let reply = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"ok");
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn ambiguous_or_broken_origin_responses_are_502_and_their_connections_are_not_reused() {
    let cases: [Script; 6] = [
        |_| {
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(), false)
        },
        |_| {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok".to_vec(),
                false,
            )
        },
        |_| {
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n".to_vec(),
                false,
            )
        },
        |_| {
            (
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n".to_vec(),
                false,
            )
        },
        |_| (b"HTTP/1.1 2x0 OK\r\n\r\n".to_vec(), false),
        |_| {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n".to_vec(),
                false,
            )
        },
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let origin = scripted(case).await;
        let proxy = proxy_to(origin.addr).await;
        for _ in 0..2 {
            let reply = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
            assert_eq!(reply.status, 502, "case {i}");
            assert_eq!(reply.refusal(), Some("upstream_error"), "case {i}");
        }
        assert_eq!(origin.accepted.load(Ordering::SeqCst), 2, "case {i}");
        proxy.running.shutdown().await;
    }
}

#[tokio::test]
async fn a_broken_chunked_body_or_extra_bytes_never_reach_the_next_response() {
    // A chunk size that is not hex, found before anything went to the client: 502, and the
    // connection is not reused.
    let origin = scripted(|_| {
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            false,
        )
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    for _ in 0..2 {
        let reply = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
        assert_eq!(reply.status, 502);
        assert_eq!(reply.refusal(), Some("upstream_error"));
        assert!(reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed chunked body"));
    }
    assert_eq!(origin.accepted.load(Ordering::SeqCst), 2);
    proxy.running.shutdown().await;

    // Bytes after a response's end are not relayed, and the connection is not reused (they
    // would be read as the next response).
    let origin = scripted(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged".to_vec(),
            false,
        )
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    for _ in 0..3 {
        let reply = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(&reply.body[..], b"ok");
    }
    assert_eq!(origin.accepted.load(Ordering::SeqCst), 3);
    proxy.running.shutdown().await;
}

/// What an origin saw of one request, without the request id (fresh each time).
async fn seen_by_origin(trusted: bool, extra: &[(&str, &str)]) -> serde_json::Value {
    let us = origin("us").await;
    let mut section = String::new();
    if trusted {
        section.push_str("\ntrusted_proxies = [\"127.0.0.1/32\"]");
    }
    let proxy = proxy()
        .route("us", &[&us])
        .proxy_section(&section)
        .start()
        .await;
    let mut headers = vec![("host", "edge.test"), ("x-workspace-id", "acme")];
    headers.extend_from_slice(extra);
    let reply = get(&proxy.url("/w?q=1"), &headers).await;
    assert_eq!(reply.status, 200);
    let mut json = reply.json();
    let fields = json["headers"].as_object_mut().unwrap();
    let id = fields.remove("x-request-id").unwrap();
    if let Some((_, chosen)) = extra
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
    {
        assert_eq!(id, *chosen, "a client's request id is kept");
    } else {
        assert_eq!(id.as_str().unwrap().len(), 32);
    }
    proxy.running.shutdown().await;
    json
}

#[tokio::test]
async fn forwarding_fields_follow_the_trust_of_the_peer() {
    let spoofed: &[(&str, &str)] = &[
        ("x-domicile-region", "eu"),
        ("X-Domicile-Epoch", "999"),
        ("x-forwarded-for", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("x-forwarded-host", "globex.example"),
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("connection", "keep-alive"),
        ("x-request-id", "client-chosen-id"),
    ];
    // From an untrusted peer every claim is replaced or dropped.
    let seen = seen_by_origin(false, spoofed).await;
    let fields = &seen["headers"];
    assert_eq!(fields["x-domicile-region"], "us");
    assert_eq!(fields["x-domicile-epoch"], "3");
    assert_eq!(fields["x-forwarded-for"], "127.0.0.1");
    assert_eq!(fields["x-forwarded-proto"], "http");
    for dropped in [
        "x-forwarded-host",
        "x-real-ip",
        "proxy-authorization",
        "connection",
    ] {
        assert!(fields.get(dropped).is_none(), "{dropped}: {seen}");
    }
    assert!(
        !fields["forwarded"].as_str().unwrap().contains("6.6.6.6"),
        "{seen}"
    );
    // A trusted peer's chain is extended, its steering fields and protocol kept.
    let chain: &[(&str, &str)] = &[
        ("x-forwarded-for", "198.51.100.1, 10.1.1.1"),
        ("forwarded", "for=198.51.100.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "app.example"),
    ];
    let seen = seen_by_origin(true, chain).await;
    let fields = &seen["headers"];
    assert_eq!(
        fields["x-forwarded-for"],
        "198.51.100.1, 10.1.1.1, 127.0.0.1"
    );
    assert_eq!(fields["x-forwarded-proto"], "https");
    assert_eq!(fields["x-forwarded-host"], "app.example");
    assert!(
        fields["forwarded"]
            .as_str()
            .unwrap()
            .starts_with("for=198.51.100.1, for=127.0.0.1"),
        "{seen}"
    );
}

#[tokio::test]
async fn a_connection_carrying_requests_of_every_kind_is_answered_in_order() {
    let us = origin("us").await;
    let proxy = proxy().route("us", &[&us]).start().await;
    // A plain GET, a POST with a body, a chunked upload, a GET, a refusal.
    let ask = format!(
        "{}POST /up HTTP/1.1\r\nhost: edge.test\r\nx-workspace-id: acme\r\ncontent-length: 5\r\n\r\nhello{}{}{}",
        request("GET", ""),
        "POST /chunks HTTP/1.1\r\nhost: edge.test\r\nx-workspace-id: acme\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        request("GET", ""),
        "GET / HTTP/1.1\r\nhost: edge.test\r\nx-workspace-id: nobody\r\nconnection: close\r\n\r\n",
    );
    let answer = raw(proxy.addr(), ask.as_bytes(), Duration::from_secs(5)).await;
    let statuses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
    assert_eq!(statuses, ["200", "200", "200", "200", "404"], "{answer}");
    let seen = us.seen_requests();
    let bodies: Vec<(String, u64)> = seen
        .iter()
        .map(|s| (s.path.clone(), s.body_bytes))
        .collect();
    assert_eq!(
        bodies,
        [
            ("/doc".to_owned(), 0),
            ("/up".to_owned(), 5),
            ("/chunks".to_owned(), 3),
            ("/doc".to_owned(), 0)
        ]
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn origin_connections_closed_while_idle_are_not_failures() {
    // An origin that answers after 20 ms and closes a connection 150 ms after its last answer
    // (as servers with a keep-alive timeout do).
    let origin = scripted_with(
        |_| {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                false,
            )
        },
        Duration::from_millis(20),
        Some(Duration::from_millis(150)),
    )
    .await;
    let (addr, accepted) = (origin.addr, origin.accepted);
    let proxy = proxy()
        .route_addrs("us", &[addr], "health.enabled = false")
        .proxy_section("workers = 1")
        .start()
        .await;
    for round in 0..3 {
        // Eight at once: eight origin connections go into the idle list...
        let url = proxy.url("/");
        let replies = futures_util::future::join_all(
            (0..8).map(|_| get(&url, &[("x-workspace-id", "acme")])),
        )
        .await;
        for reply in replies {
            assert_eq!(reply.status, 200, "round {round}: {:?}", reply.refusal());
        }
        // ...and the origin closes them all meanwhile.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(accepted.load(Ordering::SeqCst) >= 16);
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn heads_arriving_in_pieces_are_served_and_endless_lines_are_cut_off() {
    let us = origin("us").await;
    let proxy = proxy().route("us", &[&us]).start().await;
    // A head in three pieces, one of them without a line feed.
    let mut client = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    for piece in [
        "GET /doc HTTP/1.1\r\nhost: edge.test\r\n",
        "x-workspace-id: ac",
        "me\r\nconnection: close\r\n\r\n",
    ] {
        client.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");

    // A line that never ends: refused once it passes the head limit, nothing forwarded.
    let mut endless = b"GET /".to_vec();
    endless.extend(std::iter::repeat_n(b'a', 200 * 1024));
    let answer = raw(proxy.addr(), &endless, Duration::from_secs(5)).await;
    let status = raw_status(&answer);
    assert!(
        matches!(status, Some(400 | 414 | 431)),
        "{:?}",
        &answer[..answer.len().min(200)]
    );
    assert_eq!(us.seen_requests().len(), 1);
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn an_origin_answering_before_the_body_ends_does_not_get_the_next_request_on_that_connection()
{
    // The origin refuses the upload at its head, leaves the body unread and keeps the
    // connection open; a proxy that reused it would hand the next request to an origin still
    // expecting body bytes.
    let origin = scripted(|head| {
        if head.starts_with("POST") {
            (
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n".to_vec(),
                false,
            )
        } else {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                false,
            )
        }
    })
    .await;
    let proxy = proxy_to(origin.addr).await;
    let (tx, pending) = streaming_post(&proxy.url("/upload"), "acme");
    let feeder = tokio::spawn(async move {
        for _ in 0..4 {
            let chunk = hyper::body::Frame::data(bytes::Bytes::from(vec![b'x'; 16 * 1024]));
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
        // The body never ends: the proxy has the answer before it would.
        std::future::pending::<()>().await;
    });
    let response = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("answered before the body ended")
        .unwrap()
        .expect("a response");
    assert_eq!(response.status(), 413);
    feeder.abort();
    for _ in 0..2 {
        let answer = raw(
            proxy.addr(),
            request("GET", "connection: close\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(raw_status(&answer), Some(200), "{answer}");
    }
    // The upload's connection was closed; the two GETs shared one new connection.
    assert_eq!(origin.accepted.load(Ordering::SeqCst), 2);
    assert!(origin
        .heads
        .lock()
        .unwrap()
        .iter()
        .all(|h| h.starts_with("POST") || h.starts_with("GET")));
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn an_unasked_100_continue_in_the_middle_of_a_body_even_cut_in_two_loses_none_of_it() {
    const SIZE: usize = 16 << 20;
    // An origin that reads part of the body slowly, through a small receive window, then says
    // `100 Continue` unasked, so that it arrives while the proxy is in the middle of writing a
    // piece of the body.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind(LOOPBACK).unwrap();
    let listener = socket.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let head_end = loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the head");
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
        };
        let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
        assert!(head.contains(&format!("content-length: {SIZE}")), "{head}");
        // Some of the body first, so that the proxy is blocked writing the rest of a piece.
        let mut body = got.len() - head_end;
        tokio::time::sleep(Duration::from_millis(200)).await;
        while body < 100_000 {
            body += stream.read(&mut buf[..4096]).await.unwrap();
        }
        // Cut in two, as a read may find it.
        stream.write_all(b"HTTP/1.1 100 Con").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(b"tinue\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        while body < SIZE {
            let Ok(n) = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await
            else {
                break;
            };
            match n.unwrap() {
                0 => break,
                n => body += n,
            }
        }
        let text = body.to_string();
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        stream.write_all(answer.as_bytes()).await.unwrap();
    });
    let proxy = proxy_to(addr).await;
    let reply = common::request(
        "POST",
        &proxy.url("/upload"),
        &[("x-workspace-id", "acme")],
        Box::leak(vec![b'b'; SIZE].into_boxed_slice()),
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(String::from_utf8_lossy(&reply.body), SIZE.to_string());
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn an_http2_upload_ending_in_an_empty_frame_ends_its_chunked_body_once() {
    use common::h2frames::*;
    // HTTP/2 clients that do not know a body's length often end it with an empty DATA frame;
    // to an HTTP/1.1 origin the body goes chunked, and an empty piece must not become an
    // early last chunk (the origin would read the real one as the start of the next request).
    // The origin records the exact bytes of its one connection.
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"0\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed inside the upload");
            got.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        // Whatever comes next on this connection: the next request's head, nothing else.
        while !got.ends_with(b"\r\n\r\n") || !got.windows(5).any(|w| w == b"GET /") {
            match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let _ = tx.send(got);
    });
    let proxy = proxy_to(addr).await;
    let mut h2 = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut bytes = request_start(b"POST", b"/up", &[], 0);
    bytes.extend(frame(DATA, 0, 1, b"hello"));
    bytes.extend(frame(DATA, END_STREAM, 1, b""));
    h2.write_all(&bytes).await.unwrap();
    let (frames, _) = read_frames(&mut h2, Duration::from_millis(500)).await;
    assert!(
        frames.iter().any(|f| f.0 == HEADERS && f.2 == 1),
        "{frames:?}"
    );
    // The next request rides the pooled connection.
    let ask = request("GET", "connection: close\r\n");
    let _ = raw(proxy.addr(), ask.as_bytes(), Duration::from_millis(300)).await;
    let got = String::from_utf8(rx.await.unwrap()).unwrap();
    let (_, after_head) = got.split_once("\r\n\r\n").unwrap();
    assert!(
        after_head.starts_with("5\r\nhello\r\n0\r\n\r\nGET /doc"),
        "the origin read: {got:?}"
    );
    drop(h2);
    proxy.running.shutdown().await;
}
