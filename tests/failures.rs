//! The one failure model, step by step, for HTTP/1.1 and HTTP/2 origins and clients: which
//! step failed and whether the origin may have seen the request decide the refusal, and
//! whether another endpoint of the home region is tried. What no origin can have seen goes to
//! the next endpoint for every method, unless some of its body was already read from the client
//! (a body is streamed, not kept to be sent twice); what one may have seen goes again only when
//! the request is idempotent and bodiless; the client's own failure blames no endpoint.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::h2frames::*;
use common::scripted::scripted;
use common::tls::*;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// How a bad endpoint fails.
#[derive(Debug, Clone, Copy)]
enum Bad {
    /// Nothing listens: connect.
    Closed,
    /// A TLS origin with another region's certificate: TLS identity.
    WrongIdentity,
    /// Reads the request, closes without an answer: read head, after the origin saw it.
    CloseAfterHead,
    /// Reads the request, never answers: timeout.
    Hang,
    /// Answers with a response that breaks the framing rules: framing.
    Malformed,
    /// HTTP/2 only: refuses the stream, or goes away before processing it.
    Unprocessed(H2Script),
}

/// What the client gets from a region whose only endpoint fails so, and whether the request
/// may go to another endpoint: (status, refusal, retried for a POST with a body).
fn expected(bad: Bad) -> (u16, &'static str, bool) {
    match bad {
        Bad::Closed => (503, "region_unavailable", true),
        Bad::WrongIdentity => (502, "upstream_wrong_region", true),
        Bad::CloseAfterHead | Bad::Malformed => (502, "upstream_error", false),
        Bad::Hang => (504, "upstream_timeout", false),
        // Not processed anywhere: the region could not take it.
        Bad::Unprocessed(_) => (503, "region_unavailable", true),
    }
}

/// A bad endpoint speaking `h2` or HTTP/1.1; kept alive by the returned guard.
async fn bad_endpoint(bad: Bad, h2: bool) -> (SocketAddr, Box<dyn std::any::Any>) {
    match (bad, h2) {
        (Bad::Closed, _) => {
            let listener = TcpListener::bind(LOOPBACK).await.unwrap();
            (listener.local_addr().unwrap(), Box::new(()))
        }
        (Bad::WrongIdentity, _) => unreachable!("a TLS region of its own"),
        (Bad::CloseAfterHead, false) => {
            let origin = scripted(|_| (Vec::new(), true)).await;
            (origin.addr, Box::new(origin))
        }
        (Bad::Malformed, false) => {
            let origin = scripted(|_| {
                (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok".to_vec(),
                    false,
                )
            })
            .await;
            (origin.addr, Box::new(origin))
        }
        (Bad::Hang, false) => {
            let origin = common::scripted::scripted_with(
                |_| (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), false),
                Duration::from_secs(60),
                None,
            )
            .await;
            (origin.addr, Box::new(origin))
        }
        (Bad::Unprocessed(_), false) => unreachable!("HTTP/2 only"),
        (Bad::CloseAfterHead, true) => {
            let origin = scripted_h2(H2Script::Close).await;
            (origin.addr, Box::new(origin))
        }
        (Bad::Malformed, true) => {
            let origin = scripted_h2(H2Script::BadHeaders).await;
            (origin.addr, Box::new(origin))
        }
        (Bad::Hang, true) => {
            let origin = scripted_h2(H2Script::Hang).await;
            (origin.addr, Box::new(origin))
        }
        (Bad::Unprocessed(script), true) => {
            let origin = scripted_h2(script).await;
            (origin.addr, Box::new(origin))
        }
    }
}

const SETTINGS_LINES: &str =
    "health = { enabled = false }\nejection = { consecutive_failures = 1000 }\n";

/// A proxy whose region `us` is `endpoints`, with short timeouts.
async fn proxy_over(endpoints: &[SocketAddr], region_extra: &str) -> TestProxy {
    proxy()
        .route_addrs("us", endpoints, &format!("{SETTINGS_LINES}{region_extra}"))
        .limits("upstream_response_timeout = \"300ms\"\nupstream_connect_timeout = \"300ms\"")
        .proxy_section("workers = 1")
        .start()
        .await
}

/// `method` with a body of five bytes, or none when `method` ends in `-`: `"POST-"`.
async fn ask(proxy: &TestProxy, client_h2: bool, method: &str) -> Reply {
    let mut sender = Sender::cleartext(proxy.addr(), client_h2).await;
    let (method, body) = match method.strip_suffix('-') {
        Some(method) => (method, Bytes::new()),
        None if method == "GET" => (method, Bytes::new()),
        None => (method, Bytes::from_static(b"hello")),
    };
    sender.send(method, "acme.localhost", "/f", &[], body).await
}

/// Runs every step against one origin protocol, for both client protocols.
async fn run_steps(origin_h2: bool) {
    let protocol = if origin_h2 {
        "protocol = \"h2c\"\n"
    } else {
        ""
    };
    let mut steps = vec![Bad::Closed, Bad::CloseAfterHead, Bad::Hang, Bad::Malformed];
    if origin_h2 {
        steps.extend([
            Bad::Unprocessed(H2Script::Refuse),
            Bad::Unprocessed(H2Script::GoAway),
        ]);
    }
    let mut failures = Vec::new();
    for bad in steps {
        let (status, code, post_retried) = expected(bad);
        let (bad_addr, _guard) = bad_endpoint(bad, origin_h2).await;
        for client_h2 in [false, true] {
            let what = format!("{bad:?}, origin h2 {origin_h2}, client h2 {client_h2}");
            // Alone in its region: the refusal of the step.
            let alone = proxy_over(&[bad_addr], protocol).await;
            for method in ["GET", "POST"] {
                let reply = ask(&alone, client_h2, method).await;
                if (reply.status, reply.refusal()) != (status, Some(code)) {
                    failures.push(format!(
                        "{what}, {method} alone: {} {:?} {}",
                        reply.status,
                        reply.refusal(),
                        String::from_utf8_lossy(&reply.body)
                    ));
                }
            }
            alone.running.shutdown().await;
            // With a good endpoint after it: a GET always gets through (unseen, or seen and
            // idempotent); a bodiless POST only when the bad one cannot have seen it.
            let good = origin("us").await;
            let pair = proxy_over(&[bad_addr, good.addr], protocol).await;
            for _ in 0..4 {
                let reply = ask(&pair, client_h2, "GET").await;
                if reply.status != 200 {
                    failures.push(format!(
                        "{what}, GET with a good endpoint: {}",
                        reply.status
                    ));
                }
            }
            // In turn over two endpoints, POSTs that are not retried land on both.
            let mut post_statuses = Vec::new();
            for _ in 0..4 {
                post_statuses.push(ask(&pair, client_h2, "POST-").await.status);
            }
            let posts_ok = post_statuses.iter().filter(|&&s| s == 200).count();
            let good_posts = good
                .seen_requests()
                .iter()
                .filter(|s| s.method == "POST")
                .count();
            let ok = if post_retried {
                posts_ok == 4
            } else {
                posts_ok < 4 && post_statuses.iter().all(|&s| s == 200 || s == status)
            };
            if !ok || good_posts != posts_ok {
                failures.push(format!(
                    "{what}, POSTs with a good endpoint: {post_statuses:?}, good saw {good_posts}"
                ));
            }
            pair.running.shutdown().await;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn each_step_of_an_http1_exchange_fails_one_way() {
    run_steps(false).await;
}

#[tokio::test]
async fn each_step_of_an_http2_exchange_fails_one_way() {
    run_steps(true).await;
}

#[tokio::test]
async fn an_origin_without_the_home_region_identity_gets_nothing_on_either_protocol() {
    for origin_h2 in [false, true] {
        let builder = proxy();
        let layout = pki(builder.dir());
        let (impostor, good) = impostor_and_good(&layout).await;
        let protocol = if origin_h2 {
            "protocol = \"h2c\"\n"
        } else {
            ""
        };
        let region = format!(
            "{SETTINGS_LINES}{protocol}{}",
            origin_tls(&layout, "us.region.example.test")
        );
        let alone = builder
            .route_addrs("us", &[impostor.addr], &region)
            .start()
            .await;
        let (status, code, _) = expected(Bad::WrongIdentity);
        for client_h2 in [false, true] {
            let reply = ask(&alone, client_h2, "POST").await;
            assert_eq!((reply.status, reply.refusal()), (status, Some(code)));
        }
        alone.running.shutdown().await;
        let pair = proxy()
            .route_addrs("us", &[impostor.addr, good.addr], &region)
            .start()
            .await;
        for client_h2 in [false, true] {
            for _ in 0..3 {
                // Nothing was sent to the impostor: even a POST goes to the next endpoint.
                let reply = ask(&pair, client_h2, "POST").await;
                assert_eq!(reply.status, 200, "origin h2 {origin_h2}");
            }
        }
        assert!(impostor.seen().is_empty());
        assert_eq!(good.seen_requests().len(), 6);
        pair.running.shutdown().await;
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_client_gone_mid_body_blames_no_endpoint_and_no_origin_gets_a_whole_request() {
    for origin_h2 in [false, true] {
        let us = origin("us").await;
        let protocol = if origin_h2 { "protocol = \"h2c\"" } else { "" };
        let proxy = proxy()
            .route_addrs(
                "us",
                &[us.addr],
                &format!("health = {{ enabled = false }}\nejection = {{ consecutive_failures = 1 }}\n{protocol}"),
            )
            .start()
            .await;
        // HTTP/1.1: half a body, then the connection closes.
        let mut h1 = TcpStream::connect(proxy.addr()).await.unwrap();
        h1.write_all(
            b"POST /cut HTTP/1.1\r\nhost: acme.localhost\r\ncontent-length: 100\r\n\r\nonly ten..",
        )
        .await
        .unwrap();
        // HTTP/2: half a body, then the stream is reset.
        let mut h2 = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut bytes = request_start(b"POST", b"/cut", &[(b"content-length", b"100")], 0);
        bytes.extend(frame(DATA, 0, 1, b"only ten.."));
        h2.write_all(&bytes).await.unwrap();
        drop(h1);
        h2.write_all(&frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()))
            .await
            .unwrap();
        let metrics_url = proxy.admin_url("/metrics");
        let mut text = String::new();
        for _ in 0..100 {
            text = String::from_utf8_lossy(&get(&metrics_url, &[]).await.body).into_owned();
            let cut = "domicile_requests_total{decision=\"bad_request\",region=\"us\"}";
            if metric(&text, cut) == 2.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            metric(
                &text,
                "domicile_requests_total{decision=\"bad_request\",region=\"us\"}"
            ),
            2.0,
            "both cut requests are counted as the client's: {text}"
        );
        assert_eq!(
            metric(&text, "domicile_upstream_ejections_total{region=\"us\"}"),
            0.0,
            "{text}"
        );
        // No origin saw a whole body, and the region still serves on both protocols.
        assert!(
            us.seen().iter().all(|s| s.body_bytes < 100),
            "{:?}",
            us.seen().iter().map(|s| s.body_bytes).collect::<Vec<_>>()
        );
        for client_h2 in [false, true] {
            assert_eq!(ask(&proxy, client_h2, "POST").await.status, 200);
        }
        drop(h2);
        proxy.running.shutdown().await;
    }
}

#[tokio::test]
async fn an_origin_closing_while_the_body_streams_is_an_upstream_error_and_not_retried() {
    for origin_h2 in [false, true] {
        let (bad_addr, _guard) = bad_endpoint(Bad::CloseAfterHead, origin_h2).await;
        let protocol = if origin_h2 {
            "protocol = \"h2c\"\n"
        } else {
            ""
        };
        let proxy = proxy_over(&[bad_addr], protocol).await;
        let (tx, pending) = streaming_post(&proxy.url("/upload"), "acme");
        // 128 KiB: past what the origin's socket takes unread, within what the proxy reads
        // and discards after its refusal so that the client gets to read it.
        let feeder = tokio::spawn(async move {
            for _ in 0..8 {
                let chunk = hyper::body::Frame::data(Bytes::from(vec![b'x'; 16 * 1024]));
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        let response = tokio::time::timeout(Duration::from_secs(10), pending)
            .await
            .expect("answered")
            .unwrap()
            .expect("a response");
        let reply = collect(response).await;
        assert_eq!(reply.status, 502, "origin h2 {origin_h2}");
        assert_eq!(reply.refusal(), Some("upstream_error"));
        feeder.abort();
        proxy.running.shutdown().await;
    }
}
