//! The HTTP/1.1 fast path.
//!
//! Most edge traffic is plain keep-alive HTTP/1.1: a request without a body, a response with a
//! length or chunked body. For those, building hyper messages on both sides (two parses into
//! header maps, a request object, a response object, two encodings, a connection task per
//! origin connection) costs more than routing itself. The fast path forwards such requests as
//! bytes: it parses the client's head in place with `httparse`, routes it through the same
//! [`Pipeline::route`] as every other request, writes the origin's head straight from the
//! client's fields (hop-by-hop and `x-domicile-*` fields dropped, forwarding fields set as
//! [`crate::headers`] describes), and relays the origin's response the same way.
//!
//! It takes only what it fully handles. Anything else ends the fast path for the connection and
//! hands the unconsumed bytes to hyper, which serves the rest of it exactly as before:
//! a request with a body, `Transfer-Encoding`, `Expect`, `Upgrade`, `TE`, a `Connection` option
//! other than `keep-alive`/`close`, HTTP/1.0, a target that is not a plain origin-form path, a
//! head that does not parse or is over the limits, a request the pipeline refuses, and a region
//! whose origins speak h2c or TLS. Responses cannot be handed over (the request has gone out), so every
//! response framing is handled here: length, chunked (checked chunk by chunk), none (HEAD, 204,
//! 304), delimited by close, and interim 1xx responses (skipped); a response whose framing is
//! ambiguous is answered with 502 and its connection is closed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::audit::Entry;
use crate::config::UpstreamProtocol;
use crate::connpool::{EndpointKey, SendError, IDLE_TIMEOUT, MAX_IDLE_PER_ENDPOINT};
use crate::decide::Decision;
use crate::framing::{self, ChunkedBody, Violation, MAX_INTERIM, MAX_RESPONSE_HEAD};
use crate::headers::{self, Peer};
use crate::identify::Headers;
use crate::inflight::InFlightGuard;
use crate::pipeline::{host_without_port, RouteInput};
use crate::pipeline::{is_idempotent_method, is_safe_method, Pipeline};
use crate::refusal::{Refusal, RefusalCode};
use crate::upstream::{Endpoint, RegionPool};
use crate::workspace_id::WorkspaceId;

/// Header fields parsed per message; a head with more goes to hyper (requests) or is refused
/// with 502 (responses).
const MAX_FIELDS: usize = 100;
/// Read buffers grow by at least this much when nearly full.
const READ_RESERVE: usize = 4096;
/// Response bodies are relayed in reads of up to this many bytes.
const BODY_CHUNK: usize = 64 * 1024;

/// How the fast path left a connection.
pub(crate) enum Outcome {
    /// The connection is finished: closed by the client, timed out, or closed after a response
    /// that had to end it. `linger` says whether the client may still be sending.
    Closed { linger: bool },
    /// A request the fast path does not take: these bytes (its start, and anything after it)
    /// go to hyper, which serves the rest of the connection.
    Fallback(Vec<u8>),
}

/// Serves `stream` until it closes or a request needs hyper. `prefix` holds bytes already read
/// (and becomes the connection's read buffer).
pub(crate) async fn serve(
    stream: &TcpStream,
    prefix: Vec<u8>,
    pipeline: &Pipeline,
    peer: &Peer,
    shutdown: &mut watch::Receiver<bool>,
) -> Outcome {
    let limits = &pipeline.config.limits;
    let mut conn = Conn {
        client: stream,
        pipeline,
        buf: prefix,
        out: Vec::new(),
        rbuf: Vec::new(),
        client_deadline: Deadline::new(),
        upstream_deadline: Deadline::new(),
    };
    // Heads larger than this are hyper's to refuse (with the pipeline's 431).
    let head_cap = limits.head_buffer_cap();
    loop {
        let mut head_deadline_set = false;
        // How much of the buffer an earlier parse found incomplete: a head can only complete
        // with a line feed, so bytes without one need no new parse (a head sent a byte at a
        // time is not parsed once per byte).
        let mut incomplete = 0;
        let mut plan = loop {
            if conn.buf.len() > incomplete && conn.buf[incomplete..].contains(&b'\n') {
                if conn.out.capacity() == 0 {
                    conn.out = take_buffer();
                }
                match prepare(&conn.buf, pipeline, peer, &mut conn.out) {
                    Prep::Forward(plan) => break plan,
                    Prep::Fallback => return Outcome::Fallback(std::mem::take(&mut conn.buf)),
                    Prep::Partial => incomplete = conn.buf.len(),
                }
            }
            if conn.buf.len() > head_cap {
                return Outcome::Fallback(std::mem::take(&mut conn.buf));
            }
            let partial = !conn.buf.is_empty();
            let read = if partial {
                if !head_deadline_set {
                    head_deadline_set = true;
                    conn.client_deadline
                        .set(Instant::now() + limits.header_read_timeout);
                }
                read_some(conn.client, &mut conn.buf, &mut conn.client_deadline).await
            } else {
                if *shutdown.borrow() {
                    return Outcome::Closed { linger: false };
                }
                conn.client_deadline
                    .set(Instant::now() + limits.idle_timeout);
                // Idle: the buffers go back to the worker until the next request arrives, so an
                // idle connection holds none.
                release(&mut conn.buf);
                release(&mut conn.out);
                release(&mut conn.rbuf);
                let ready = tokio::select! {
                    ready = conn.client_deadline.run(conn.client.readable()) => ready,
                    _ = crate::listener::stopped(shutdown) => return Outcome::Closed { linger: false },
                };
                match ready {
                    Some(Ok(())) => {}
                    // Idle for `idle_timeout`, or the socket failed.
                    None | Some(Err(_)) => return Outcome::Closed { linger: false },
                }
                conn.buf = take_buffer();
                read_some(conn.client, &mut conn.buf, &mut conn.client_deadline).await
            };
            match read {
                Ok(Some(0)) | Err(_) => return Outcome::Closed { linger: false },
                Ok(Some(_)) => {}
                Ok(None) => {
                    if partial {
                        crate::listener::answer_timeout(conn.client).await;
                    }
                    return Outcome::Closed { linger: false };
                }
            }
        };
        let head_len = plan.head_len;
        let next = conn.exchange(&mut plan).await;
        if matches!(next, Next::Close) {
            return Outcome::Closed { linger: true };
        }
        conn.buf.drain(..head_len);
    }
}

/// One client connection on the fast path and its reusable buffers.
struct Conn<'a> {
    client: &'a TcpStream,
    pipeline: &'a Pipeline,
    /// Client bytes read and not yet consumed.
    buf: Vec<u8>,
    /// The head being written: to the origin, then to the client.
    out: Vec<u8>,
    /// Origin bytes.
    rbuf: Vec<u8>,
    client_deadline: Deadline,
    upstream_deadline: Deadline,
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        release(&mut self.buf);
        release(&mut self.out);
        release(&mut self.rbuf);
    }
}

/// What the connection does after an exchange.
enum Next {
    KeepAlive,
    Close,
}

/// Why an attempt at one endpoint failed, before anything reached the client.
enum Failure {
    /// Nothing reached the origin (no connection).
    Connect(String),
    /// The origin failed to answer properly.
    Upstream(String),
    Timeout,
}

/// How an attempt at one endpoint ended.
enum Attempt {
    /// The response went to the client.
    Done(Next),
    /// Nothing went to the client; another endpoint may be tried.
    Failed(Failure),
}

/// A request the fast path forwards.
struct Plan<'p> {
    head_len: usize,
    pool: &'p RegionPool,
    workspace: Option<WorkspaceId>,
    request_id: RequestId,
    head_request: bool,
    idempotent: bool,
    client_close: bool,
    started: std::time::Instant,
    /// Held until the exchange is over (the plan lives until then).
    _in_flight: Option<InFlightGuard>,
    /// The request's audit record: taken and queued just before the response's last bytes
    /// are written; if the exchange ends otherwise, dropping the plan queues it as cut off.
    audit: Option<Entry>,
    /// The endpoint (index in the pool) of the current attempt.
    endpoint: usize,
}

impl Plan<'_> {
    /// Updates the audit record, if there is one.
    fn record(&mut self, update: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.audit.as_mut() {
            update(entry);
        }
    }

    /// Queues the audit record as complete (before the last bytes go to the client).
    fn complete(&mut self, update: impl FnOnce(&mut Entry)) {
        if let Some(mut entry) = self.audit.take() {
            update(&mut entry);
            entry.complete();
        }
    }
}

// The plan is moved once per request; boxing it would allocate per request instead.
#[allow(clippy::large_enum_variant)]
enum Prep<'p> {
    /// The head is not complete yet.
    Partial,
    /// hyper takes it from here.
    Fallback,
    /// The origin's head is in `out`.
    Forward(Plan<'p>),
}

/// Request fields the fast path treats specially (names compared without case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Host,
    ContentLength,
    Connection,
    RequestId,
    Forwarded,
    XForwardedFor,
    XForwardedProto,
    /// `X-Forwarded-Host`, `X-Forwarded-Port`, `X-Real-IP`: kept from trusted peers only.
    Steering,
    /// `x-domicile-*`: only this proxy sets them.
    Domicile,
    /// Hop-by-hop fields dropped on the way: `Proxy-Authorization`, `Proxy-Authenticate`.
    Dropped,
    /// Fields whose semantics need hyper: `Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`,
    /// `Expect`, `Keep-Alive`, `Proxy-Connection`.
    Unsupported,
    Other,
}

fn classify(name: &str) -> Field {
    let b = name.as_bytes();
    if b.len() > 11 && b[..11].eq_ignore_ascii_case(b"x-domicile-") {
        return Field::Domicile;
    }
    let is = |s: &str| b.eq_ignore_ascii_case(s.as_bytes());
    match b.len() {
        2 if is("te") => Field::Unsupported,
        4 if is("host") => Field::Host,
        6 if is("expect") => Field::Unsupported,
        7 if is("upgrade") || is("trailer") => Field::Unsupported,
        9 if is("forwarded") => Field::Forwarded,
        9 if is("x-real-ip") => Field::Steering,
        10 if is("connection") => Field::Connection,
        10 if is("keep-alive") => Field::Unsupported,
        12 if is("x-request-id") => Field::RequestId,
        14 if is("content-length") => Field::ContentLength,
        15 if is("x-forwarded-for") => Field::XForwardedFor,
        16 if is("x-forwarded-host") || is("x-forwarded-port") => Field::Steering,
        16 if is("proxy-connection") => Field::Unsupported,
        17 if is("x-forwarded-proto") => Field::XForwardedProto,
        17 if is("transfer-encoding") => Field::Unsupported,
        18 if is("proxy-authenticate") => Field::Dropped,
        19 if is("proxy-authorization") => Field::Dropped,
        _ => Field::Other,
    }
}

/// Bytes an origin-form target may hold here (RFC 3986 pchar, `/`, `?`, `%`); anything else
/// (including what some parsers tolerate) is left to hyper.
fn plain_target(target: &str) -> bool {
    target.starts_with('/')
        && target.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'@'
                        | b'/'
                        | b'?'
                        | b'%'
                )
        })
}

/// Whether `value` is one `HeaderValue::to_str` accepts (visible ASCII, space, tab).
fn is_text(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t')
}

/// Whether a line of `head` ends with LF alone.
fn has_bare_lf(head: &[u8]) -> bool {
    let mut from = 0;
    while let Some(at) = head[from..].iter().position(|&b| b == b'\n') {
        let at = from + at;
        if at == 0 || head[at - 1] != b'\r' {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Parses the request head in `buf` and, when the fast path takes the request, writes the
/// origin's head into `out`.
fn prepare<'p>(buf: &[u8], pipeline: &'p Pipeline, peer: &Peer, out: &mut Vec<u8>) -> Prep<'p> {
    let limits = &pipeline.config.limits;
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Prep::Partial,
        Err(_) => return Prep::Fallback,
    };
    // httparse takes LF alone as a line ending; the framing screen refuses it.
    if has_bare_lf(&buf[..head_len]) {
        return Prep::Fallback;
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Prep::Fallback;
    };
    if method == "CONNECT" || !plain_target(target) {
        return Prep::Fallback;
    }
    let fields: &[httparse::Header<'_>] = req.headers;
    if fields.len() > limits.max_headers {
        return Prep::Fallback;
    }

    let mut host: Option<&str> = None;
    let mut request_id: Option<&[u8]> = None;
    let mut client_close = false;
    let mut has_length = false;
    let mut has_forwarding = false;
    let mut has_proto = false;
    let mut head_bytes = target.len();
    for field in fields {
        head_bytes += field.name.len() + field.value.len() + 4;
        match classify(field.name) {
            Field::Host => {
                if host.is_some() {
                    return Prep::Fallback;
                }
                match std::str::from_utf8(field.value) {
                    Ok(value) if framing::check_host(value.trim_ascii().as_bytes()).is_ok() => {
                        host = Some(value.trim_matches([' ', '\t']));
                    }
                    _ => return Prep::Fallback,
                }
            }
            Field::ContentLength => {
                // Only requests without a body come this way, with one length at most.
                if has_length || field.value.trim_ascii() != b"0" {
                    return Prep::Fallback;
                }
                has_length = true;
            }
            Field::Connection => {
                for token in field.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        client_close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        return Prep::Fallback;
                    }
                }
            }
            Field::RequestId => {
                if request_id.is_none() {
                    request_id = Some(field.value);
                }
            }
            Field::Forwarded | Field::XForwardedFor => has_forwarding = true,
            Field::XForwardedProto => has_proto = true,
            Field::Unsupported => return Prep::Fallback,
            // The framing screen's own field: refused there.
            Field::Domicile if field.name.eq_ignore_ascii_case(framing::MALFORMED_FIELD) => {
                return Prep::Fallback
            }
            Field::Steering | Field::Domicile | Field::Dropped | Field::Other => {}
        }
    }
    let Some(host) = host else {
        return Prep::Fallback;
    };
    if head_bytes as u64 > limits.max_header_bytes {
        return Prep::Fallback;
    }

    let (raw_path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let input = RouteInput {
        host: Some(host_without_port(host)),
        raw_path,
        query,
        headers: Headers::Raw(fields),
        method,
        safe_method: is_safe_method(method),
    };
    let (decision, _, lookup, in_flight) = pipeline.route(&input, peer);
    let Decision::Forward(forward) = decision else {
        // Refusals are rare; the pipeline answers them through hyper.
        return Prep::Fallback;
    };
    let Some(pool) = pipeline.upstreams.pool(forward.region) else {
        return Prep::Fallback;
    };
    // h2c and TLS origins are hyper's: the fast path relays bytes between two plain sockets.
    if pool.protocol != UpstreamProtocol::Http1 || pool.tls.is_some() {
        return Prep::Fallback;
    }
    let request_id = match request_id {
        Some(id) if headers::valid_request_id(id) => RequestId::from_client(id),
        _ => RequestId::new(),
    };
    // A decision the audit log cannot take is hyper's to refuse.
    let Ok(mut audit) = pipeline.audit_begin() else {
        return Prep::Fallback;
    };
    if let Some(entry) = audit.as_mut() {
        pipeline.audit_describe(
            entry,
            &input,
            request_id.as_bytes(),
            peer,
            &decision,
            lookup,
        );
    }
    // No fallback past this point: the record is begun, and hyper would begin another.

    // The origin's head.
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let trusted = peer.trusted;
    for field in fields {
        let keep = match classify(field.name) {
            Field::Host | Field::ContentLength | Field::Other => true,
            Field::Steering | Field::XForwardedProto => trusted,
            // Forwarding fields from a trusted peer are appended to below.
            Field::Forwarded | Field::XForwardedFor => false,
            Field::Connection
            | Field::RequestId
            | Field::Domicile
            | Field::Dropped
            | Field::Unsupported => false,
        };
        if keep {
            put_field(out, field.name.as_bytes(), field.value);
        }
    }
    let forwarded_host = Some(host)
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        })
        .filter(|h| !h.is_empty());
    // Forwarded: the peer's element, after the trusted peer's own list.
    out.extend_from_slice(b"forwarded: ");
    if trusted && has_forwarding {
        append_existing(out, fields, Field::Forwarded);
    }
    out.extend_from_slice(peer.forwarded_element().as_bytes());
    if let Some(host) = forwarded_host {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(host.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"\r\nx-forwarded-for: ");
    if trusted && has_forwarding {
        append_existing(out, fields, Field::XForwardedFor);
    }
    out.extend_from_slice(peer.xff_value());
    out.extend_from_slice(b"\r\n");
    if !(trusted && has_proto) {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    put_field(out, b"x-request-id", request_id.as_bytes());
    if let Some(workspace) = &forward.workspace {
        put_field(out, b"x-domicile-workspace", workspace.as_bytes());
    }
    if let Some(region) = pipeline.replica.regions().header_value(forward.region) {
        put_field(out, b"x-domicile-region", region.as_bytes());
    }
    if let Some(epoch) = forward.epoch {
        out.extend_from_slice(b"x-domicile-epoch: ");
        put_decimal(out, u64::from(epoch));
        out.extend_from_slice(b"\r\n");
    }
    if let Some(version) = forward.map_version {
        out.extend_from_slice(b"x-domicile-map-version: ");
        put_decimal(out, version);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");

    Prep::Forward(Plan {
        head_len,
        pool,
        workspace: forward.workspace,
        request_id,
        head_request: method == "HEAD",
        idempotent: is_idempotent_method(method),
        client_close,
        started: std::time::Instant::now(),
        _in_flight: in_flight,
        audit,
        endpoint: 0,
    })
}

fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn put_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes the text values of every `kind` field, each followed by `, ` (the caller appends its
/// own element), as `headers::set_forwarded` joins them.
fn append_existing(out: &mut Vec<u8>, fields: &[httparse::Header<'_>], kind: Field) {
    for field in fields {
        if classify(field.name) == kind && is_text(field.value) {
            out.extend_from_slice(field.value);
            out.extend_from_slice(b", ");
        }
    }
}

/// A request id kept inline: the client's (up to 128 visible characters) or 32 new hex digits.
struct RequestId {
    len: u8,
    bytes: [u8; 128],
}

impl RequestId {
    fn from_client(id: &[u8]) -> Self {
        let mut bytes = [0u8; 128];
        bytes[..id.len()].copy_from_slice(id);
        Self {
            len: id.len() as u8,
            bytes,
        }
    }

    fn new() -> Self {
        let mut bytes = [0u8; 128];
        bytes[..32].copy_from_slice(&headers::request_id_digits());
        Self { len: 32, bytes }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

/// How the origin frames its response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// An origin's final response head, already rewritten for the client into `out`.
struct ResponseHead {
    /// Where the body starts in `rbuf`.
    body_start: usize,
    framing: Framing,
    /// Whether the origin connection may serve another request afterwards.
    reusable: bool,
    client_close: bool,
    status: u16,
}

enum Parsed {
    Partial,
    /// An interim (1xx) response of this many bytes, to skip.
    Interim(usize),
    Final(ResponseHead),
}

thread_local! {
    /// The current second as an HTTP date, formatted once per second per worker.
    static HTTP_DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
}

/// Appends the current time as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn put_http_date(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    HTTP_DATE.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second || cached.1.is_empty() {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(cached.1.as_bytes());
    });
}

/// Hop-by-hop fields of a response, not passed to the client (RFC 9110 7.6.1).
fn response_hop_by_hop(name: &str) -> bool {
    let b = name.as_bytes();
    let is = |s: &str| b.eq_ignore_ascii_case(s.as_bytes());
    match b.len() {
        2 => is("te"),
        7 => is("trailer") || is("upgrade"),
        10 => is("connection") || is("keep-alive"),
        12 => is("x-request-id"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        18 => is("proxy-authenticate"),
        19 => is("proxy-authorization"),
        _ => false,
    }
}

/// Parses the origin's response head at `rbuf[start..]`; a final one is rewritten into `out`.
fn parse_response(
    rbuf: &[u8],
    start: usize,
    plan: &Plan<'_>,
    out: &mut Vec<u8>,
) -> Result<Parsed, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(&rbuf[start..]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let (Some(version), Some(code)) = (resp.version, resp.code) else {
        return Err("malformed response head".into());
    };
    if code != 101 && (100..200).contains(&code) {
        return Ok(Parsed::Interim(len));
    }
    let fields: &[httparse::Header<'_>] = resp.headers;
    let (chunked, length) = framing::check_response_fields(code, false, fields)?;
    // HTTP/1.0 origins close unless told otherwise; not worth reusing.
    let mut origin_close = version == 0;
    let mut named: Vec<&[u8]> = Vec::new();
    let mut has_date = false;
    for field in fields {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"date") {
            has_date = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in field.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    origin_close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    named.push(token);
                }
            }
        }
    }
    let framing = if plan.head_request || code == 204 || code == 304 {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let client_close = plan.client_close || framing == Framing::UntilClose;

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    put_decimal(out, u64::from(code));
    out.push(b' ');
    if let Some(reason) = resp.reason {
        out.extend_from_slice(reason.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    for field in fields {
        let name = field.name;
        if response_hop_by_hop(name)
            || named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        put_field(out, name.as_bytes(), field.value);
    }
    if !has_date {
        // RFC 9110 section 6.6.1: a response forwarded without a date gets the time it was
        // received.
        out.extend_from_slice(b"date: ");
        put_http_date(out);
        out.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if client_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    put_field(out, b"x-request-id", plan.request_id.as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(Parsed::Final(ResponseHead {
        body_start: start + len,
        status: code,
        framing,
        reusable: !origin_close && framing != Framing::UntilClose,
        client_close,
    }))
}

impl Conn<'_> {
    /// Sends the planned request to the home region's endpoints (retrying within the region
    /// when allowed) and relays the response, or answers with a refusal.
    async fn exchange(&mut self, plan: &mut Plan<'_>) -> Next {
        let limits = &self.pipeline.config.limits;
        let pool = plan.pool;
        let retries = if plan.idempotent {
            limits
                .retries
                .min(pool.endpoints.len().saturating_sub(1) as u32)
        } else {
            0
        };
        let mut tried: u64 = 0;
        let mut attempt = 0u32;
        let mut served_error: Option<Failure> = None;
        loop {
            let Some((index, endpoint)) = pool.pick(tried) else {
                return self.refuse(plan, served_error).await;
            };
            tried |= 1u64.checked_shl(index as u32).unwrap_or(0);
            plan.endpoint = index;
            match self.attempt(plan, endpoint).await {
                Attempt::Done(next) => return next,
                Attempt::Failed(failure) => {
                    pool.record_failure(endpoint);
                    let detail = match &failure {
                        Failure::Connect(detail) | Failure::Upstream(detail) => detail.as_str(),
                        Failure::Timeout => "no response in time",
                    };
                    tracing::debug!(region = %pool.region_id, endpoint = %endpoint.authority, attempt, detail, "upstream attempt failed");
                    if !matches!(failure, Failure::Connect(_)) {
                        served_error = Some(failure);
                    }
                    if attempt >= retries {
                        return self.refuse(plan, served_error).await;
                    }
                    attempt += 1;
                    self.pipeline
                        .metrics
                        .upstream_retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// Answers a request no endpoint served: `error` is the most telling failure, `None` when
    /// no endpoint could be reached at all.
    async fn refuse(&mut self, plan: &mut Plan<'_>, error: Option<Failure>) -> Next {
        let pool = plan.pool;
        let refusal = match error {
            None | Some(Failure::Connect(_)) => Refusal::new(RefusalCode::RegionUnavailable)
                .message(format!(
                    "no endpoint of home region {} could be reached; the request is not sent to any other region",
                    pool.region_id
                )),
            Some(Failure::Upstream(detail)) => Refusal::new(RefusalCode::UpstreamError).message(
                format!("home region {} failed to answer: {detail}", pool.region_id),
            ),
            Some(Failure::Timeout) => Refusal::new(RefusalCode::UpstreamTimeout),
        };
        let code = refusal.code;
        self.pipeline
            .metrics
            .record(Some(code), Some(pool.region), plan.started.elapsed());
        // Something reached the region unless every attempt failed to connect.
        let reached = code != RefusalCode::RegionUnavailable;
        let endpoint = plan.endpoint;
        plan.complete(|entry| {
            entry.decide(Some(code));
            entry.status(code.status().as_u16());
            if reached {
                entry.upstream(pool.region, endpoint);
            }
        });
        let refusal = refusal
            .workspace(plan.workspace.as_ref().map(|w| w.as_str()))
            .request_id(Some(plan.request_id.as_str()));
        self.out.clear();
        refusal.write_http1(&mut self.out, plan.client_close);
        let stall = self.pipeline.config.limits.idle_timeout;
        match write_all(
            self.client,
            &self.out,
            &[],
            &mut self.client_deadline,
            stall,
        )
        .await
        {
            Ok(()) if !plan.client_close => Next::KeepAlive,
            _ => Next::Close,
        }
    }

    /// One endpoint: a pooled or new connection, the request, the response.
    async fn attempt(&mut self, plan: &mut Plan<'_>, endpoint: &Endpoint) -> Attempt {
        let limits = &self.pipeline.config.limits;
        let key = endpoint.target.key;
        // A pooled connection can turn out closed by the origin (many close idle connections
        // after a while); the request then goes out again on another, as long as the origin
        // cannot have acted on it. Only a new connection's failure counts against the endpoint.
        let mut stale = 0;
        loop {
            // Past a few dead ones, a new connection rather than the rest of the idle list.
            let pooled = if stale < 4 { take_idle(key) } else { None };
            let (upstream, reused) = match pooled {
                Some(stream) => (stream, true),
                None => match Box::pin(endpoint.target.connect()).await {
                    Ok(stream) => (stream, false),
                    Err(SendError::Connect(e)) => {
                        return Attempt::Failed(Failure::Connect(e.to_string()))
                    }
                    Err(e) => return Attempt::Failed(Failure::Connect(e.to_string())),
                },
            };
            // A request that is not idempotent is sent only on a connection known to be open.
            if reused && !plan.idempotent && !still_open(&upstream) {
                stale += 1;
                continue;
            }
            let sent = write_all(
                &upstream,
                &self.out,
                &[],
                &mut self.upstream_deadline,
                limits.idle_timeout,
            )
            .await;
            if let Err(e) = sent {
                if reused {
                    stale += 1;
                    continue;
                }
                return Attempt::Failed(Failure::Upstream(format!("sending the request: {e}")));
            }
            if self.rbuf.capacity() == 0 {
                self.rbuf = take_buffer();
            }
            self.rbuf.clear();
            self.upstream_deadline
                .set(Instant::now() + limits.upstream_response_timeout);
            let head = match self.read_response_head(&upstream, plan).await {
                Ok(head) => head,
                Err(HeadError::Closed) if reused && plan.idempotent => {
                    stale += 1;
                    continue;
                }
                Err(HeadError::Closed) => {
                    return Attempt::Failed(Failure::Upstream(
                        "connection closed before the response head".into(),
                    ))
                }
                Err(HeadError::Timeout) => return Attempt::Failed(Failure::Timeout),
                Err(HeadError::Bad(detail)) => return Attempt::Failed(Failure::Upstream(detail)),
            };
            let elapsed = plan.started.elapsed();
            return match self.relay_body(plan, upstream, key, head).await {
                Ok(next) => {
                    plan.pool.record_success(endpoint);
                    self.pipeline
                        .metrics
                        .record(None, Some(plan.pool.region), elapsed);
                    Attempt::Done(next)
                }
                Err(failure) => Attempt::Failed(failure),
            };
        }
    }

    async fn read_response_head(
        &mut self,
        upstream: &TcpStream,
        plan: &Plan<'_>,
    ) -> Result<ResponseHead, HeadError> {
        let mut start = 0;
        let mut interim = 0;
        loop {
            if self.rbuf.len() > start {
                match parse_response(&self.rbuf, start, plan, &mut self.out) {
                    Ok(Parsed::Final(head)) => return Ok(head),
                    Ok(Parsed::Interim(len)) => {
                        interim += 1;
                        if interim > MAX_INTERIM {
                            return Err(HeadError::Bad("too many interim (1xx) responses".into()));
                        }
                        start += len;
                        continue;
                    }
                    Ok(Parsed::Partial) => {}
                    Err(detail) => return Err(HeadError::Bad(detail)),
                }
                if self.rbuf.len() - start > MAX_RESPONSE_HEAD {
                    return Err(HeadError::Bad("response head too large".into()));
                }
            }
            match read_some(upstream, &mut self.rbuf, &mut self.upstream_deadline).await {
                Ok(Some(0)) | Err(_) if self.rbuf.is_empty() => return Err(HeadError::Closed),
                Ok(Some(0)) | Err(_) => {
                    return Err(HeadError::Bad(
                        "connection closed inside the response head".into(),
                    ))
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err(HeadError::Timeout),
            }
        }
    }

    /// Writes the response head and relays the body. A body that is broken before anything was
    /// written to the client is a failure of the attempt; later failures cut the client's
    /// connection, as its response has begun.
    async fn relay_body(
        &mut self,
        plan: &mut Plan<'_>,
        upstream: TcpStream,
        key: EndpointKey,
        head: ResponseHead,
    ) -> Result<Next, Failure> {
        let stall = self.pipeline.config.limits.idle_timeout;
        let mut body = match head.framing {
            Framing::None => BodyEnd::Length(0),
            Framing::Length(n) => BodyEnd::Length(n),
            Framing::Chunked => BodyEnd::Chunked(ChunkedBody::default()),
            Framing::UntilClose => BodyEnd::Close,
        };
        // What arrived with the head goes out with the client's head, in one write.
        let buffered = &self.rbuf[head.body_start..];
        let (take, mut done) = body
            .take(buffered)
            .map_err(|e| Failure::Upstream(format!("malformed chunked body: {e}")))?;
        // Bytes after the end would be read as the next response: the connection is not reused.
        let mut reusable = head.reusable && take == buffered.len();
        let end = head.body_start + take;
        let client = self.client;
        // The response is the origin's from here on: its record says so, and goes to the queue
        // before the last bytes go to the client.
        let region = plan.pool.region;
        let endpoint = plan.endpoint;
        let update = |entry: &mut Entry| {
            entry.status(head.status);
            entry.upstream(region, endpoint);
            entry.add_bytes_out(take as u64);
        };
        if done {
            plan.complete(update);
        } else {
            plan.record(update);
        }
        if write_all(
            client,
            &self.out,
            &self.rbuf[head.body_start..end],
            &mut self.client_deadline,
            stall,
        )
        .await
        .is_err()
        {
            return Ok(Next::Close);
        }
        while !done {
            let Some(n) = self.read_body(&upstream).await else {
                // The origin closed (or failed, or stalled): the end of a body delimited by
                // close, a cut in any other.
                if matches!(body, BodyEnd::Close) {
                    break;
                }
                return Ok(Next::Close);
            };
            let Ok((take, end)) = body.take(&self.rbuf[..n]) else {
                return Ok(Next::Close);
            };
            let count = |entry: &mut Entry| entry.add_bytes_out(take as u64);
            if end {
                reusable &= take == n;
                done = true;
                plan.complete(count);
            } else {
                plan.record(count);
            }
            let sent = write_all(
                client,
                &self.rbuf[..take],
                &[],
                &mut self.client_deadline,
                stall,
            )
            .await;
            if sent.is_err() {
                return Ok(Next::Close);
            }
        }
        // A body delimited by close ends here; the client learns so when its connection closes.
        plan.complete(|_| {});
        if reusable {
            give_back(key, upstream);
        }
        Ok(if head.client_close {
            Next::Close
        } else {
            Next::KeepAlive
        })
    }

    /// Reads the next piece of a response body into `rbuf[..n]`; `None` when the origin closed,
    /// failed or stalled.
    async fn read_body(&mut self, upstream: &TcpStream) -> Option<usize> {
        self.rbuf.clear();
        if self.rbuf.capacity() < BODY_CHUNK {
            self.rbuf.reserve(BODY_CHUNK);
        }
        let stall = self.pipeline.config.limits.idle_timeout;
        self.upstream_deadline.set(Instant::now() + stall);
        match read_some(upstream, &mut self.rbuf, &mut self.upstream_deadline).await {
            Ok(Some(0)) | Ok(None) | Err(_) => None,
            Ok(Some(n)) => Some(n),
        }
    }
}

enum HeadError {
    /// Closed before a single byte of response: the origin may have closed an idle connection.
    Closed,
    Timeout,
    Bad(String),
}

/// Where a response body ends, followed as its bytes pass through.
enum BodyEnd {
    /// After this many more bytes.
    Length(u64),
    Chunked(ChunkedBody),
    /// When the origin closes the connection.
    Close,
}

impl BodyEnd {
    /// How many of `bytes` belong to the body, and whether it ends with them.
    fn take(&mut self, bytes: &[u8]) -> Result<(usize, bool), Violation> {
        match self {
            BodyEnd::Length(left) => {
                let n = bytes
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                Ok((n, *left == 0))
            }
            BodyEnd::Chunked(chunks) => Ok(match chunks.feed(bytes)? {
                Some(end) => (end, true),
                None => (bytes.len(), false),
            }),
            BodyEnd::Close => Ok((bytes.len(), false)),
        }
    }
}

/// A deadline for one kind of wait on a connection, kept as one timer that is re-armed only
/// when it fires before the current deadline. Moving the deadline later (every request does)
/// then costs nothing: no timer-wheel work per request.
struct Deadline {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
}

impl Deadline {
    fn new() -> Self {
        let at = Instant::now() + Duration::from_secs(86_400);
        Self {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    fn set(&mut self, at: Instant) {
        self.at = at;
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
    }

    /// Runs `work` until it finishes (`Some`) or the deadline passes (`None`).
    async fn run<F: Future>(&mut self, work: F) -> Option<F::Output> {
        let mut work = pin!(work);
        poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            while self.sleep.as_mut().poll(cx).is_ready() {
                if Instant::now() >= self.at {
                    return Poll::Ready(None);
                }
                let at = self.at;
                self.sleep.as_mut().reset(at);
            }
            Poll::Pending
        })
        .await
    }
}

/// Reads what has arrived into `buf`'s spare room: `Some(0)` at end of stream, `None` when the
/// deadline passed first.
async fn read_some(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    deadline: &mut Deadline,
) -> io::Result<Option<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_RESERVE);
    }
    loop {
        match deadline.run(stream.readable()).await {
            None => return Ok(None),
            Some(ready) => ready?,
        }
        let room = buf.capacity() - buf.len();
        match stream.try_read_buf(buf) {
            Ok(n) => {
                if n > 0 && n < room {
                    // A short read drained the socket (epoll is edge-triggered): mark it not
                    // ready now rather than learn it from a failed read.
                    let _ = stream.try_io(Interest::READABLE, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                }
                return Ok(Some(n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes `a` then `b` (in one system call when they fit), failing after `stall` without
/// progress.
async fn write_all(
    stream: &TcpStream,
    mut a: &[u8],
    mut b: &[u8],
    deadline: &mut Deadline,
    stall: Duration,
) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let written = if b.is_empty() {
            stream.try_write(a)
        } else if a.is_empty() {
            stream.try_write(b)
        } else {
            stream.try_write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
        };
        match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) if n >= a.len() => {
                b = &b[n - a.len()..];
                a = &[];
            }
            Ok(n) => a = &a[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                deadline.set(Instant::now() + stall);
                match deadline.run(stream.writable()).await {
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the peer stopped reading",
                        ))
                    }
                    Some(ready) => ready?,
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether an idle connection is still open: nothing to read and no end of stream yet.
fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Buffers of idle connections, kept per worker for the next busy one.
const POOLED_BUFFERS: usize = 256;
/// Buffers larger than this (grown by a large body) are freed rather than kept.
const MAX_POOLED_BUFFER: usize = 2 * BODY_CHUNK + READ_RESERVE;

thread_local! {
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Vec<u8> {
    BUFFERS
        .try_with(|buffers| buffers.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(READ_RESERVE))
}

/// Gives `buf` back to the worker (or frees it); `buf` is left empty, without capacity.
fn release(buf: &mut Vec<u8>) {
    if buf.capacity() == 0 {
        return;
    }
    let mut buf = std::mem::take(buf);
    if buf.capacity() <= MAX_POOLED_BUFFER {
        buf.clear();
        let _ = BUFFERS.try_with(|buffers| {
            let mut buffers = buffers.borrow_mut();
            if buffers.len() < POOLED_BUFFERS {
                buffers.push(buf);
            }
        });
    }
}

/// Idle origin connections of the fast path, per worker thread (see `connpool` for why).
type Idle = HashMap<EndpointKey, Vec<(TcpStream, std::time::Instant)>, foldhash::fast::RandomState>;

thread_local! {
    static IDLE: RefCell<Idle> = RefCell::new(Idle::default());
}

/// The most recently used idle connection to `key` that still looks open.
fn take_idle(key: EndpointKey) -> Option<TcpStream> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&key)?;
        let now = std::time::Instant::now();
        while let Some((stream, since)) = list.pop() {
            if now.duration_since(since) < IDLE_TIMEOUT && looks_open(&stream) {
                return Some(stream);
            }
        }
        None
    })
}

/// Whether an idle connection looks open, without a system call in the common case: nothing
/// has arrived on it since its last response was read (an idle origin connection only becomes
/// readable when the origin closes it). When something has, a non-blocking read decides.
fn looks_open(stream: &TcpStream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Ok(())) => still_open(stream),
        Poll::Ready(Err(_)) => false,
    }
}

fn give_back(key: EndpointKey, stream: TcpStream) {
    let _ = IDLE.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push((stream, std::time::Instant::now()));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_classified_without_case() {
        assert_eq!(classify("HOST"), Field::Host);
        assert_eq!(classify("X-Domicile-Region"), Field::Domicile);
        assert_eq!(classify("x-domicile-"), Field::Other);
        assert_eq!(classify("Transfer-Encoding"), Field::Unsupported);
        assert_eq!(classify("X-Forwarded-Port"), Field::Steering);
        assert_eq!(classify("accept"), Field::Other);
    }

    #[test]
    fn targets_outside_origin_form_go_to_hyper() {
        assert!(plain_target("/w/acme/docs?x=1&y=%20"));
        assert!(!plain_target("http://acme.example/"));
        assert!(!plain_target("*"));
        assert!(!plain_target("/a b"));
        assert!(!plain_target("/a#frag"));
        assert!(!plain_target("/caf\u{e9}"));
    }

    #[test]
    fn decimals() {
        let mut out = Vec::new();
        put_decimal(&mut out, 0);
        out.push(b' ');
        put_decimal(&mut out, u64::MAX);
        assert_eq!(out, b"0 18446744073709551615");
    }
}
