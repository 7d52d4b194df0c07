//! Hostile input: request framing that could desynchronise the proxy and an origin. Every
//! case goes over a raw socket to a proxy whose origin parses strictly and records every
//! request it completes, so each case asserts both what the client got and what the origin saw.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::h2frames::*;
use common::tls::*;
use common::*;
use domicile_certs::rustls;
use domicile_proxy::http::framing::{self, BodyFraming, ChunkedBody};
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
        refused("the proxy's reserved field", format!("GET / HTTP/1.1\r\n{H}x-domicile-internal-malformed: bare_lf\r\n\r\n"), "reserved_field"),
        case("a head past every buffer", format!("GET / HTTP/1.1\r\n{H}x-big: {huge}\r\n\r\n"), &[431], Some("head_too_large"), 0),
    ]
}

async fn run_table(tls: bool) {
    let origin = StrictOrigin::start().await;
    let mut builder = proxy()
        .route_addrs("us", &[origin.addr], "health.enabled = false")
        .proxy_section("workers = 1");
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
            let message = domicile_proxy::http::framing::Violation::from_name(reason.as_bytes())
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
                "{} (TLS {tls}): {}\n  answer: {answer:?}",
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
    run_table(false).await;
}

#[tokio::test]
async fn ambiguous_framing_is_refused_over_tls_too() {
    run_table(true).await;
}

/// A client that writes HTTP/2 frames by hand, so it can send what no well-behaved client
/// library would.
struct RawH2 {
    stream: TcpStream,
}

/// A header field as raw bytes.
type Field<'a> = (&'a [u8], &'a [u8]);

fn get_request(extra: &[Field]) -> Vec<u8> {
    let mut fields: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"acme.localhost"),
        (b":path", b"/h2"),
    ];
    fields.extend_from_slice(extra);
    header_block(&fields)
}

impl RawH2 {
    async fn open(addr: SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        stream.write_all(&hello).await.expect("preface");
        RawH2 { stream }
    }

    /// Writes `bytes`; false once the server has closed the connection.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Reads frames until the connection closes or `wait` passes without one.
    async fn frames(&mut self, wait: Duration) -> (Vec<Frame>, bool) {
        read_frames(&mut self.stream, wait).await
    }
}

fn error_code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        payload[at],
        payload[at + 1],
        payload[at + 2],
        payload[at + 3],
    ])
}

const PROTOCOL_ERROR: u32 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

async fn h2_proxy() -> (StrictOrigin, TestProxy) {
    let origin = StrictOrigin::start().await;
    let proxy = proxy()
        .route_addrs("us", &[origin.addr], "health.enabled = false")
        .proxy_section("workers = 1")
        .start()
        .await;
    (origin, proxy)
}

/// A well-formed request on a new HTTP/2 connection gets its 200: the proxy is still serving.
async fn h2_still_serves(proxy: &TestProxy) {
    let reply = send_h2(
        http::Request::get(proxy.url("/after"))
            .header("x-workspace-id", "acme")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn http2_connection_specific_fields_and_line_breaks_in_values_never_reach_an_origin() {
    let (origin, proxy) = h2_proxy().await;
    let cases: [(&str, &[Field]); 6] = [
        ("connection", &[(b"connection", b"keep-alive")]),
        ("transfer-encoding", &[(b"transfer-encoding", b"chunked")]),
        ("upgrade", &[(b"upgrade", b"websocket")]),
        ("te other than trailers", &[(b"te", b"gzip")]),
        ("CR LF in a value", &[(b"x-evil", b"a\r\nx-injected: 1")]),
        ("NUL in a value", &[(b"x-evil", b"a\0b")]),
    ];
    for (name, extra) in cases {
        let mut client = RawH2::open(proxy.addr()).await;
        let block = get_request(extra);
        assert!(
            client
                .send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
                .await
        );
        let (frames, _) = client.frames(Duration::from_millis(500)).await;
        let reset = frames.iter().any(|(kind, _, stream, payload)| {
            (*kind == RST_STREAM && *stream == 1 && error_code(payload, 0) == PROTOCOL_ERROR)
                || (*kind == GOAWAY && error_code(payload, 4) == PROTOCOL_ERROR)
        });
        assert!(reset, "{name}: no PROTOCOL_ERROR in {frames:?}");
        assert!(
            !frames
                .iter()
                .any(|(kind, _, stream, _)| *kind == HEADERS && *stream == 1),
            "{name}: answered as if valid"
        );
    }
    let seen = origin.take();
    assert!(
        seen.complete.is_empty() && seen.broken.is_empty(),
        "{seen:?}"
    );
    h2_still_serves(&proxy).await;
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn http2_rapid_reset_gets_goaway() {
    let (origin, proxy) = h2_proxy().await;
    let mut client = RawH2::open(proxy.addr()).await;
    let block = get_request(&[(b"x-workspace-id", b"acme")]);
    let mut burst = Vec::new();
    for i in 0..2_000u32 {
        let stream = 1 + 2 * i;
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
        burst.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes())); // CANCEL
    }
    // The server may close before the burst is all written.
    let _ = client.send(&burst).await;
    let (frames, closed) = client.frames(Duration::from_secs(3)).await;
    let calm = frames.iter().any(|(kind, _, _, payload)| {
        *kind == GOAWAY && error_code(payload, 4) == ENHANCE_YOUR_CALM
    });
    assert!(calm && closed, "no GOAWAY ENHANCE_YOUR_CALM: {frames:?}");
    let forwarded = origin.take().complete.len();
    eprintln!("rapid reset: {forwarded} of 2000 reset streams reached the origin");
    assert!(
        forwarded < 2_000,
        "all {forwarded} reset streams were forwarded"
    );
    h2_still_serves(&proxy).await;
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn http2_continuation_flood_is_cut_off() {
    let (origin, proxy) = h2_proxy().await;
    let mut client = RawH2::open(proxy.addr()).await;
    let block = get_request(&[(b"x-workspace-id", b"acme")]);
    assert!(client.send(&frame(HEADERS, END_STREAM, 1, &block)).await);
    // Header block fragments that never end: 64 MiB if nobody stops them.
    let filler = header_block(&[(b"x-filler", &[b'a'; 16_000])]);
    let piece = frame(CONTINUATION, 0, 1, &filler);
    let mut sent = 0usize;
    let mut cut = false;
    for _ in 0..4_096 {
        match tokio::time::timeout(Duration::from_secs(2), client.send(&piece)).await {
            Ok(true) => sent += piece.len(),
            Ok(false) | Err(_) => {
                cut = true;
                break;
            }
        }
    }
    let (frames, closed) = client.frames(Duration::from_secs(3)).await;
    eprintln!(
        "continuation flood: cut after {sent} bytes; frames {:?}",
        frames
            .iter()
            .map(|f| (f.0, f.2, f.3.len()))
            .collect::<Vec<_>>()
    );
    assert!(
        cut || closed,
        "the proxy took {sent} bytes of one header block: {frames:?}"
    );
    assert!(
        sent < 16 * 1024 * 1024,
        "the proxy took {sent} bytes of one header block"
    );
    assert!(origin.take().complete.is_empty());
    h2_still_serves(&proxy).await;
    proxy.running.shutdown().await;
}

/// Reads what a connection has until it closes, or `wait` passes: (bytes, closed).
async fn drain(stream: &mut TcpStream, wait: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_greedy_clients_are_cut_at_their_limits_while_others_are_served() {
    let us = origin("us").await;
    let builder = proxy()
        .route("us", &[&us])
        .proxy_section("workers = 1")
        .limits("header_read_timeout = \"600ms\"\nidle_timeout = \"1s\"");
    let layout = pki(builder.dir());
    let proxy = builder
        .section(&tls_section(
            &[layout.edge()],
            "handshake_timeout = \"600ms\"",
        ))
        .start()
        .await;
    let addr = proxy.addr();
    let tls_addr = proxy.running.tls_addr.expect("https address");

    // Slowloris: heads that trickle in and never end.
    let mut slowloris = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: acme.localhost\r\nx-a: ")
            .await
            .unwrap();
        slowloris.push(s);
    }
    let trickle = {
        let mut streams: Vec<TcpStream> = std::mem::take(&mut slowloris);
        tokio::spawn(async move {
            for _ in 0..30 {
                for s in streams.iter_mut() {
                    let _ = s.write_all(b"a").await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            streams
        })
    };
    // Slow bodies: a length promised, one byte sent.
    let mut slow_bodies = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /upload HTTP/1.1\r\nHost: acme.localhost\r\nContent-Length: 1000\r\n\r\nx",
        )
        .await
        .unwrap();
        slow_bodies.push(s);
    }
    // Slow readers: 64 MiB asked for, nothing read.
    let mut slow_readers = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /bytes/67108864 HTTP/1.1\r\nHost: acme.localhost\r\n\r\n")
            .await
            .unwrap();
        slow_readers.push(s);
    }
    // Idle keep-alive: one request answered, then silence.
    let mut idle = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /idle HTTP/1.1\r\nHost: acme.localhost\r\n\r\n")
            .await
            .unwrap();
        idle.push(s);
    }
    // Stalled TLS handshakes: connected, nothing sent.
    let mut stalled_tls = Vec::new();
    for _ in 0..10 {
        stalled_tls.push(TcpStream::connect(tls_addr).await.unwrap());
    }

    // Meanwhile everyone else is served, over both listeners.
    let config = client_config(&layout.ca(), &[b"http/1.1"]);
    for i in 0..20 {
        let reply = get(
            &proxy.url(&format!("/ok/{i}")),
            &[("x-workspace-id", "acme")],
        )
        .await;
        assert_eq!(
            reply.status, 200,
            "request {i} while slow clients hold connections"
        );
    }
    let mut sender = Sender::open(
        handshake(tls_addr, "acme.localhost", config)
            .await
            .expect("handshake"),
    )
    .await;
    assert_eq!(
        sender.get("acme.localhost", "/ok/tls", &[]).await.status,
        200
    );

    // Each slow client is cut at its own limit, with its own answer.
    let mut slowloris = trickle.await.unwrap();
    for s in slowloris.iter_mut() {
        let (answer, closed) = drain(s, Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            closed && answer.starts_with("HTTP/1.1 408"),
            "slowloris: {answer}"
        );
    }
    for s in slow_bodies.iter_mut() {
        let (answer, closed) = drain(s, Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            closed && answer.starts_with("HTTP/1.1 408"),
            "slow body: {answer}"
        );
    }
    // An idle keep-alive connection is closed after its one answer, with nothing more.
    for s in idle.iter_mut() {
        let (answer, closed) = drain(s, Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(closed, "an idle keep-alive connection was kept");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "idle: {answer}");
        assert!(answer.starts_with("HTTP/1.1 200"), "idle: {answer}");
    }
    // A slow reader is cut once its writes have stalled for the idle timeout, a stalled
    // handshake at the handshake timeout: wait until the proxy holds no more than the TLS
    // client above (and perhaps the plain client's pooled connection), then look.
    let engine = proxy.running.engine.clone();
    let cut = eventually(Duration::from_secs(15), || {
        engine
            .metrics
            .connections_active
            .load(std::sync::atomic::Ordering::Relaxed)
            <= 2
    })
    .await;
    assert!(cut, "slow readers and stalled handshakes still held");
    // The slow reader finds a truncated response, never all 64 MiB.
    for s in slow_readers.iter_mut() {
        let (got, closed) = drain(s, Duration::from_secs(10)).await;
        assert!(closed, "a slow reader was not cut");
        assert!(got.starts_with(b"HTTP/1.1 200"));
        assert!(
            got.len() < 64 << 20,
            "all of it was buffered for a reader that never read"
        );
    }
    for s in stalled_tls.iter_mut() {
        let (got, closed) = drain(s, Duration::from_secs(5)).await;
        assert!(
            closed && got.is_empty(),
            "a stalled handshake was not dropped"
        );
    }
    let metrics = get(&proxy.admin_url("/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("domicile_tls_handshake_failures_total ") && !l.ends_with(" 0")),
        "stalled handshakes are counted"
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn encoded_and_look_alike_workspace_ids_are_refused_or_normalised_never_remapped() {
    let (us, eu, proxy) = two_regions().await;
    // (host, target, extra header lines, expected: "acme" when forwarded, else the refusal code)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("ACME.localhost", "/x", "", "acme"),
        ("acme.localhost.", "/x", "", "acme"),
        ("acme.localhost:8080", "/x", "", "acme"),
        ("%61cme.localhost", "/x", "", "invalid_workspace"),
        ("acme%2eglobex.localhost", "/x", "", "invalid_workspace"),
        ("xn--cme-8cd.localhost", "/x", "", "unknown_workspace"),
        ("\u{430}cme.localhost", "/x", "", "bad_request"),
        ("acme\u{ff0e}localhost", "/x", "", "bad_request"),
        ("edge.test", "/w/ACME/x", "", "acme"),
        ("edge.test", "/w/%61cme/x", "", "acme"),
        // An origin that decodes %2F reads acme, one that does not reads no valid id: never globex.
        ("edge.test", "/w/acme%2fglobex/x", "", "acme"),
        ("edge.test", "/w/acme%00/x", "", "invalid_workspace"),
        ("edge.test", "/w/acme%20/x", "", "invalid_workspace"),
        ("edge.test", "/w/%D0%B0cme/x", "", "invalid_workspace"),
        ("edge.test", "/w/%EF%BD%81cme/x", "", "invalid_workspace"),
        ("edge.test", "/w/ac.me/x", "", "invalid_workspace"),
        ("edge.test", "/w/%2e%2e/x", "", "missing_workspace"),
        (
            "edge.test",
            "/w/acme/%2e%2e/%2e%2e/w/globex/",
            "",
            "conflicting_workspace",
        ),
        (
            "edge.test",
            "/w/acme/..%2f..%2fw/globex/",
            "",
            "conflicting_workspace",
        ),
        (
            "edge.test",
            "/w/acme/..%5c..%5cw/globex/",
            "",
            "conflicting_workspace",
        ),
        ("edge.test", "/w/acme/projects/group%2Fproject", "", "acme"),
        ("edge.test", "/w/\u{430}cme/x", "", "bad_request"),
        (
            "edge.test",
            "/x?workspace=acme&workspace=globex",
            "",
            "conflicting_workspace",
        ),
        ("edge.test", "/x?workspace=%61cme", "", "acme"),
        (
            "edge.test",
            "/x",
            "x-workspace-id: acme, globex\r\n",
            "invalid_workspace",
        ),
        (
            "edge.test",
            "/x",
            "x-workspace-id: acme\r\nx-workspace-id: globex\r\n",
            "conflicting_workspace",
        ),
        ("globex.localhost", "/w/acme/x", "", "conflicting_workspace"),
        (
            "acme.localhost",
            "/x",
            "x-domicile-workspace: globex\r\nx-domicile-region: eu\r\n",
            "acme",
        ),
    ];
    let mut failures = Vec::new();
    for (host, target, extra, want) in cases {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
        let answer = raw(proxy.addr(), request.as_bytes(), Duration::from_secs(3)).await;
        let got = match raw_status(&answer) {
            Some(200) => {
                let seen = us.seen_requests();
                match seen.last() {
                    Some(s) => s
                        .headers
                        .get("x-domicile-workspace")
                        .cloned()
                        .unwrap_or_default(),
                    None => "forwarded elsewhere".to_owned(),
                }
            }
            _ => answer
                .lines()
                .find_map(|l| l.strip_prefix("x-domicile-refusal: "))
                .unwrap_or("no refusal code")
                .to_owned(),
        };
        if got != *want {
            failures.push(format!("{host} {target} {extra:?}: got {got}, want {want}"));
        }
    }
    assert!(
        eu.seen_requests().is_empty(),
        "globex's region was reached: {:?}",
        eu.seen_requests()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    proxy.running.shutdown().await;
}

/// A case of a misbehaving origin: its reply script, and what the client must get.
struct OriginCase {
    name: &'static str,
    script: common::scripted::Script,
    /// The status, or `None` for a cut stream (head relayed, body cut short).
    status: Option<u16>,
    refusal: Option<&'static str>,
}

fn origin_cases() -> Vec<OriginCase> {
    let bad = |name, script, refusal| OriginCase {
        name,
        script,
        status: Some(if refusal == "upstream_timeout" {
            504
        } else {
            502
        }),
        refusal: Some(refusal),
    };
    vec![
        bad(
            "Content-Length with Transfer-Encoding",
            |_| {
                (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(), false)
            },
            "upstream_error",
        ),
        bad(
            "two Content-Lengths",
            |_| {
                (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok".to_vec(),
                    false,
                )
            },
            "upstream_error",
        ),
        bad(
            "negative Content-Length",
            |_| {
                (
                    b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n".to_vec(),
                    false,
                )
            },
            "upstream_error",
        ),
        bad(
            "Transfer-Encoding gzip, chunked",
            |_| {
                (
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n".to_vec(),
                    false,
                )
            },
            "upstream_error",
        ),
        bad(
            "101 to a request that asked no upgrade",
            |_| {
                (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n".to_vec(), false)
            },
            "upstream_error",
        ),
        bad(
            "a status line that does not parse",
            |_| (b"HTTP/1.1 2x0 OK\r\n\r\n".to_vec(), false),
            "upstream_error",
        ),
        bad(
            "a response head of 1 MiB",
            |_| {
                let mut r = b"HTTP/1.1 200 OK\r\nx-huge: ".to_vec();
                r.resize(r.len() + (1 << 20), b'h');
                r.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
                (r, false)
            },
            "upstream_error",
        ),
        bad(
            // Cut off at the limit, not read until the response timeout.
            "a response head that never ends",
            |_| {
                let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
                r.extend(
                    b"x-more: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
                        .repeat(2_000),
                );
                (r, false)
            },
            "upstream_error",
        ),
        bad(
            "a flood of interim responses",
            |_| {
                let mut r = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(1_000);
                r.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                (r, false)
            },
            "upstream_error",
        ),
        bad(
            "a broken chunk size before the body began",
            |_| {
                (
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
                    false,
                )
            },
            "upstream_error",
        ),
        bad(
            "closed without an answer",
            |_| (Vec::new(), true),
            "upstream_error",
        ),
        bad(
            "never answering",
            |_| (Vec::new(), false),
            "upstream_timeout",
        ),
        OriginCase {
            name: "closed in the middle of its body",
            script: |_| {
                (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..".to_vec(),
                    true,
                )
            },
            status: None,
            refusal: None,
        },
    ]
}

/// Sends one GET on a fresh connection; returns the status (if a head came) and whether the
/// body arrived whole by its own framing.
async fn get_raw(addr: SocketAddr) -> (Option<u16>, String, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /o HTTP/1.1\r\nHost: acme.localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (bytes, _) = drain(&mut stream, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = raw_status(&text);
    let whole = match text.split_once("\r\n\r\n") {
        Some((head, body)) => head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .and_then(|n| n.trim().parse::<usize>().ok())
            .is_some_and(|n| body.len() == n),
        None => false,
    };
    (status, text, whole)
}

/// As [`get_raw`] over HTTP/2 with prior knowledge: a cut body is a reset stream.
async fn get_h2(addr: SocketAddr) -> (Option<u16>, String, bool) {
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("http://acme.localhost/o")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let Ok(response) = sender.send_request(request).await else {
        return (None, String::new(), false);
    };
    let status = response.status().as_u16();
    let refusal = response
        .headers()
        .get("x-domicile-refusal")
        .map(|v| format!("x-domicile-refusal: {}", v.to_str().unwrap()))
        .unwrap_or_default();
    let length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    use http_body_util::BodyExt;
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect()).await;
    let whole = match body {
        Ok(Ok(body)) => length.is_none_or(|n| body.to_bytes().len() == n),
        _ => false,
    };
    (Some(status), refusal, whole)
}

/// Runs the misbehaving origins' table with an HTTP/1.1 client, or with an HTTP/2 one.
async fn run_origin_table(h2: bool) {
    let mut failures = Vec::new();
    for case in origin_cases() {
        let origin = common::scripted::scripted(case.script).await;
        let proxy = proxy()
            .route_addrs("us", &[origin.addr], "health.enabled = false")
            .proxy_section("workers = 1")
            .limits("upstream_response_timeout = \"500ms\"\nretries = 0")
            .start()
            .await;
        for attempt in 0..2 {
            let (status, answer, whole) = if h2 {
                get_h2(proxy.addr()).await
            } else {
                get_raw(proxy.addr()).await
            };
            let short: String = answer.chars().take(300).collect();
            match case.status {
                Some(want) => {
                    let code_ok = case
                        .refusal
                        .is_none_or(|code| answer.contains(&format!("x-domicile-refusal: {code}")));
                    if status != Some(want) || !code_ok || !whole {
                        failures.push(format!(
                            "{} (HTTP/2 client {h2}, attempt {attempt}): {short:?}",
                            case.name
                        ));
                    }
                }
                None => {
                    if status != Some(200) || whole {
                        failures.push(format!(
                            "{} (HTTP/2 client {h2}): not cut: {short:?}",
                            case.name
                        ));
                    }
                }
            }
        }
        // Nothing is reused after a misbehaving response: each attempt had its own connection.
        let accepted = origin.accepted.load(std::sync::atomic::Ordering::SeqCst);
        if accepted != 2 {
            failures.push(format!(
                "{} (HTTP/2 client {h2}): {accepted} origin connections for 2 requests",
                case.name
            ));
        }
        proxy.running.shutdown().await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn misbehaving_origins_get_502_or_504_or_a_cut_stream_and_are_not_reused() {
    run_origin_table(false).await;
}

#[tokio::test]
async fn http2_clients_of_misbehaving_origins_get_the_same_answers_or_a_reset_stream() {
    run_origin_table(true).await;
}
