//! Hostile input: request framing that could desynchronise the proxy and an origin. Every
//! case goes over a raw socket to a proxy whose origin parses strictly and records every
//! request it completes, so each case asserts both what the client got and what the origin saw.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::tls::*;
use common::*;
use domicile_certs::rustls;
use domicile_proxy::framing::{self, BodyFraming, ChunkedBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a strict origin saw.
#[derive(Debug, Default)]
struct Seen {
    /// Requests received whole and well-formed: "METHOD target body-bytes".
    complete: Vec<String>,
    /// Connections that ended inside a request, or sent one that breaks the rules.
    broken: Vec<String>,
}

/// An origin that parses each request with the strict framing rules, answers `200 ok` to each,
/// and records what it saw.
struct StrictOrigin {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl StrictOrigin {
    async fn start() -> Self {
        let listener = TcpListener::bind(LOOPBACK).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_strictly(stream, record.clone()));
            }
        });
        StrictOrigin { addr, seen }
    }

    fn take(&self) -> Seen {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

async fn serve_strictly(mut stream: TcpStream, seen: Arc<Mutex<Seen>>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    let broken = |why: String| seen.lock().unwrap().broken.push(why);
    loop {
        // The head.
        let mut scanned = 0;
        let end = loop {
            match framing::find_head_end(&pending, &mut scanned) {
                Ok(Some(end)) => break end,
                Ok(None) => {}
                Err(v) => return broken(format!("head: {v}")),
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    if !pending.is_empty() {
                        broken("closed inside a head".into());
                    }
                    return;
                }
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let head = match framing::check_request_head(&pending[..end]) {
            Ok(head) => head,
            Err(v) => return broken(format!("head: {v}")),
        };
        let text = String::from_utf8_lossy(&pending[..end]).into_owned();
        let line = text
            .trim_start()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        pending.drain(..end);
        // The body.
        let mut body_bytes = 0u64;
        match head.body {
            BodyFraming::None => {}
            BodyFraming::Length(n) => {
                while (pending.len() as u64) < n {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return broken(format!("{line}: closed inside its body")),
                        Ok(k) => pending.extend_from_slice(&buf[..k]),
                    }
                }
                pending.drain(..n as usize);
                body_bytes = n;
            }
            BodyFraming::Chunked => {
                let mut chunks = ChunkedBody::default();
                loop {
                    match chunks.feed(&pending) {
                        Ok(Some(end)) => {
                            body_bytes += end as u64;
                            pending.drain(..end);
                            break;
                        }
                        Ok(None) => {
                            body_bytes += pending.len() as u64;
                            pending.clear();
                        }
                        Err(v) => return broken(format!("{line}: body: {v}")),
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            return broken(format!("{line}: closed inside its chunked body"))
                        }
                        Ok(k) => pending.extend_from_slice(&buf[..k]),
                    }
                }
            }
        }
        let words: Vec<&str> = line.split(' ').collect();
        seen.lock().unwrap().complete.push(format!(
            "{} {} {body_bytes}",
            words[0],
            words.get(1).unwrap_or(&"")
        ));
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
    }
}

/// How the table reaches the proxy.
enum Transport {
    Plain(SocketAddr),
    Tls(SocketAddr, Arc<rustls::ClientConfig>),
}

/// Sends `bytes` on a fresh connection and reads until the proxy closes it (or 3 s).
async fn exchange(transport: &Transport, bytes: &[u8]) -> (String, bool) {
    let mut out = Vec::new();
    let closed = match transport {
        Transport::Plain(addr) => {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(bytes).await.expect("write");
            tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await
        }
        Transport::Tls(addr, config) => {
            let mut stream = handshake(*addr, "acme.localhost", config.clone())
                .await
                .expect("handshake")
                .stream;
            stream.write_all(bytes).await.expect("write");
            tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await
        }
    };
    // A TLS peer that closes without close_notify reads as an error, still a close.
    (String::from_utf8_lossy(&out).into_owned(), closed.is_ok())
}

fn statuses(answer: &str) -> Vec<u16> {
    answer
        .match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| answer[at + 9..].get(..3)?.parse().ok())
        .collect()
}

const H: &str = "Host: a.test\r\nx-workspace-id: acme\r\n";

/// One case: the bytes sent, the statuses answered in order, and how many requests the origin
/// completes (refused requests: none; every case ends with the connection closed, as a refused
/// one must, because the cases close it or are refused).
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    statuses: &'static [u16],
    reason: Option<&'static str>,
    origin_completes: usize,
}

fn case(
    name: &'static str,
    bytes: impl Into<Vec<u8>>,
    statuses: &'static [u16],
    reason: Option<&'static str>,
    origin_completes: usize,
) -> Case {
    Case {
        name,
        bytes: bytes.into(),
        statuses,
        reason,
        origin_completes,
    }
}

fn refused(name: &'static str, bytes: impl Into<Vec<u8>>, reason: &'static str) -> Case {
    case(name, bytes, &[400], Some(reason), 0)
}

fn cases() -> Vec<Case> {
    let close = "Connection: close\r\n";
    let huge = "v".repeat(200_000);
    vec![
        // Controls: well-formed requests go through, whole, once.
        case("plain GET", format!("GET /x HTTP/1.1\r\n{H}{close}\r\n"), &[200], None, 1),
        case("length body", format!("POST /x HTTP/1.1\r\n{H}{close}Content-Length: 5\r\n\r\nhello"), &[200], None, 1),
        case("chunked body", format!("POST /x HTTP/1.1\r\n{H}{close}Transfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n\r\n"), &[200], None, 1),
        case("absolute form that agrees with Host", format!("GET http://a.test/x HTTP/1.1\r\n{H}{close}\r\n"), &[200], None, 1),
        case("pipelined good then bad", format!("GET /1 HTTP/1.1\r\n{H}\r\nGET /2 HTTP/1.1\r\n{H}Content-Length: 1\r\nContent-Length: 1\r\n\r\nx"), &[200, 400], Some("repeated_content_length"), 1),
        // Content-Length and Transfer-Encoding.
        refused("CL.TE smuggling", format!("POST / HTTP/1.1\r\n{H}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n{H}\r\n"), "content_length_with_transfer_encoding"),
        refused("TE.CL smuggling", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n{H}\r\n"), "content_length_with_transfer_encoding"),
        refused("repeated equal Content-Length", format!("POST / HTTP/1.1\r\n{H}Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc"), "repeated_content_length"),
        refused("repeated different Content-Length", format!("POST / HTTP/1.1\r\n{H}Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"), "repeated_content_length"),
        refused("Content-Length list", format!("POST / HTTP/1.1\r\n{H}Content-Length: 3, 3\r\n\r\nabc"), "invalid_content_length"),
        refused("signed Content-Length", format!("POST / HTTP/1.1\r\n{H}Content-Length: +3\r\n\r\nabc"), "invalid_content_length"),
        refused("non-decimal Content-Length", format!("POST / HTTP/1.1\r\n{H}Content-Length: 0x3\r\n\r\nabc"), "invalid_content_length"),
        refused("overflowing Content-Length", format!("POST / HTTP/1.1\r\n{H}Content-Length: 99999999999999999999\r\n\r\n"), "invalid_content_length"),
        refused("Transfer-Encoding gzip", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: gzip\r\n\r\n"), "unsupported_transfer_encoding"),
        refused("Transfer-Encoding gzip, chunked", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"), "unsupported_transfer_encoding"),
        refused("Transfer-Encoding chunked, identity", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"), "unsupported_transfer_encoding"),
        refused("Transfer-Encoding xchunked", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"), "unsupported_transfer_encoding"),
        refused("repeated Transfer-Encoding", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), "repeated_transfer_encoding"),
        refused("HTTP/1.0 with Transfer-Encoding", format!("POST / HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), "transfer_encoding_on_http10"),
        // Line structure.
        refused("obsolete line folding", format!("GET / HTTP/1.1\r\n{H}x-folded: a\r\n b\r\n\r\n"), "obs_fold"),
        refused("folded Transfer-Encoding", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"), "obs_fold"),
        refused("bare LF line endings", format!("GET / HTTP/1.1\n{}\n", H.replace("\r\n", "\n")), "bare_lf"),
        refused("one bare LF", "GET / HTTP/1.1\r\nHost: a.test\nx-workspace-id: acme\r\n\r\n", "bare_lf"),
        refused("bare CR", format!("GET / HTTP/1.1\r\n{H}x-a: 1\rx-b: 2\r\n\r\n"), "bare_cr"),
        refused("NUL in a value", format!("GET / HTTP/1.1\r\n{H}x-a: a\0b\r\n\r\n"), "invalid_field_value"),
        refused("control byte in a value", format!("GET / HTTP/1.1\r\n{H}x-a: a\x07b\r\n\r\n"), "invalid_field_value"),
        refused("DEL in a value", format!("GET / HTTP/1.1\r\n{H}x-a: a\x7fb\r\n\r\n"), "invalid_field_value"),
        refused("NUL in a name", format!("GET / HTTP/1.1\r\n{H}x\0a: 1\r\n\r\n"), "invalid_field_name"),
        refused("space before the colon", format!("GET / HTTP/1.1\r\n{H}Content-Length : 0\r\n\r\n"), "whitespace_before_colon"),
        refused("tab before the colon", format!("GET / HTTP/1.1\r\n{H}Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n"), "whitespace_before_colon"),
        refused("line without a colon", format!("GET / HTTP/1.1\r\n{H}just words\r\n\r\n"), "field_without_colon"),
        refused("garbage request line", "GARBAGE\r\n\r\n", "invalid_request_line"),
        refused("two spaces in the request line", format!("GET  / HTTP/1.1\r\n{H}\r\n"), "invalid_request_line"),
        refused("HTTP/1.2", format!("GET / HTTP/1.2\r\n{H}\r\n"), "unsupported_version"),
        refused("raw UTF-8 in the target", format!("GET /caf\u{e9} HTTP/1.1\r\n{H}\r\n"), "invalid_target"),
        refused("asterisk form with GET", format!("GET * HTTP/1.1\r\n{H}\r\n"), "invalid_target"),
        // Host.
        refused("duplicate Host", format!("GET / HTTP/1.1\r\nHost: acme.localhost\r\n{H}\r\n"), "repeated_host"),
        refused("missing Host", "GET / HTTP/1.1\r\nx-workspace-id: acme\r\n\r\n", "missing_host"),
        refused("Host with user information", "GET / HTTP/1.1\r\nHost: globex.localhost@acme.localhost\r\n\r\n", "host_userinfo"),
        refused("Host with a space", "GET / HTTP/1.1\r\nHost: acme .localhost\r\n\r\n", "invalid_host"),
        refused("Host with a path", "GET / HTTP/1.1\r\nHost: acme.localhost/x\r\n\r\n", "invalid_host"),
        refused("Host with unicode", "GET / HTTP/1.1\r\nHost: \u{430}cme.localhost\r\n\r\n", "invalid_host"),
        refused("absolute form that disagrees with Host", format!("GET http://globex.localhost/x HTTP/1.1\r\n{H}\r\n"), "absolute_form_mismatch"),
        refused("absolute form with user information", format!("GET http://x@a.test/ HTTP/1.1\r\n{H}\r\n"), "host_userinfo"),
        // Chunked bodies.
        refused("chunk size not hex", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"), "invalid_chunk_size"),
        refused("chunk size with 0x", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"), "invalid_chunk_size"),
        refused("negative chunk size", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"), "invalid_chunk_size"),
        refused("overflowing chunk size", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n"), "chunk_size_too_large"),
        refused("chunk size line ended by LF", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"), "invalid_chunk_size"),
        refused("empty chunk extension", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n5;\r\nhello\r\n0\r\n\r\n"), "invalid_chunk_extension"),
        refused("control byte in a chunk extension", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n5;a=\x01\r\nhello\r\n0\r\n\r\n"), "invalid_chunk_extension"),
        refused("unterminated quoted chunk extension", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n5;a=\"x\r\nhello\r\n0\r\n\r\n"), "invalid_chunk_extension"),
        // A later chunk goes wrong after the request went on: the origin's copy is cut off,
        // never completed.
        case("bad second chunk", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n"), &[400], None, 0),
        case("chunk data longer than its size", format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n5\r\nhello, world\r\n0\r\n\r\n"), &[400], None, 0),
        // Reserved names and sizes.
        refused("the screen's own field", format!("GET / HTTP/1.1\r\n{H}x-domicile-internal-malformed: bare_lf\r\n\r\n"), "reserved_field"),
        case("a head past every buffer", format!("GET / HTTP/1.1\r\n{H}x-big: {huge}\r\n\r\n"), &[431], Some("head_too_large"), 0),
    ]
}

async fn run_table(fast_path: bool, tls: bool) {
    let origin = StrictOrigin::start().await;
    let mut builder = proxy()
        .route_addrs("us", &[origin.addr], "health.enabled = false")
        .proxy_section(&format!("workers = 1\nfast_path = {fast_path}"));
    let mut ca = None;
    if tls {
        let layout = pki(builder.dir());
        builder = builder.section(&tls_section(&[layout.edge()], ""));
        ca = Some(layout.ca());
    }
    let proxy = builder.start().await;
    let transport = match ca {
        Some(ca) => Transport::Tls(
            proxy.running.tls_addr.expect("https address"),
            client_config(&ca, &[b"http/1.1"]),
        ),
        None => Transport::Plain(proxy.addr()),
    };
    let mut failures = Vec::new();
    for case in cases() {
        let (answer, closed) = exchange(&transport, &case.bytes).await;
        // The origin has answered (or never will) before the proxy answers the client.
        let seen = origin.take();
        let got = statuses(&answer);
        let mut problems = Vec::new();
        if got != case.statuses {
            problems.push(format!("statuses {got:?}, want {:?}", case.statuses));
        }
        if !closed {
            problems.push("connection left open".to_owned());
        }
        if case.statuses.iter().any(|&s| s >= 400) {
            let refusal_code = if case.statuses.contains(&431) {
                "headers_too_large"
            } else {
                "bad_request"
            };
            if !answer.contains(&format!("x-domicile-refusal: {refusal_code}"))
                || !answer.contains("{\"error\":{\"code\":")
            {
                problems.push("refusal without its code and JSON body".to_owned());
            }
        }
        if let Some(reason) = case.reason {
            let message = domicile_proxy::framing::Violation::from_name(reason.as_bytes())
                .expect("known reason")
                .message();
            if !answer.contains(message) {
                problems.push(format!("message for {reason} missing"));
            }
        }
        if seen.complete.len() != case.origin_completes {
            problems.push(format!("origin completed {:?}", seen.complete));
        }
        if !seen.broken.is_empty() && case.origin_completes > 0 {
            problems.push(format!("origin saw broken requests {:?}", seen.broken));
        }
        if seen.broken.iter().any(|b| b.starts_with("head")) {
            problems.push(format!(
                "a malformed head reached the origin: {:?}",
                seen.broken
            ));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} (fast path {fast_path}, TLS {tls}): {}\n  answer: {answer:?}",
                case.name,
                problems.join("; ")
            ));
        }
    }
    let counted: u64 = {
        let metrics = scrape_metrics(&proxy).await;
        metrics
            .lines()
            .filter(|l| l.starts_with("domicile_malformed_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let refused_cases = cases()
        .iter()
        .filter(|c| c.statuses.iter().any(|&s| s >= 400))
        .count() as u64;
    if counted != refused_cases {
        failures.push(format!(
            "domicile_malformed_requests_total sums to {counted}, want {refused_cases}"
        ));
    }
    proxy.running.shutdown().await;
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

async fn scrape_metrics(proxy: &TestProxy) -> String {
    let reply = get(&proxy.admin_url("/metrics"), &[]).await;
    String::from_utf8_lossy(&reply.body).into_owned()
}

#[tokio::test]
async fn ambiguous_framing_is_refused_before_any_origin_sees_it() {
    run_table(true, false).await;
}

#[tokio::test]
async fn ambiguous_framing_is_refused_without_the_fast_path_too() {
    run_table(false, false).await;
}

#[tokio::test]
async fn ambiguous_framing_is_refused_over_tls_too() {
    run_table(true, true).await;
}
