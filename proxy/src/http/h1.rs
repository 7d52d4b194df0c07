//! HTTP/1.1 connections from clients, over a plain socket or TLS.
//!
//! Heads are read into one buffer and judged in place by the strict framing rules
//! ([`framing::check_request_head_with`]), which also yield the fields as slices of that
//! buffer: no header map, no copy. A head the rules refuse never reaches the engine: it is
//! answered 400 (431 when it outgrows the buffer) with the connection closed, after the
//! responses to requests pipelined before it. A request body is read as the engine asks for
//! it, by its length or chunk by chunk (chunks checked as they pass), from what arrived with
//! the head and then from a second buffer, so the head's slices stay valid while the body
//! streams. Responses are written as the engine hands them over, the head and the first body
//! bytes in one write.
//!
//! Timeouts: `idle_timeout` for the first byte of a request and for any read or write that
//! makes no progress, `header_read_timeout` from a head's first byte to its end (408 then).
//! An idle connection holds no buffers: they go back to the worker's pool.

use std::io;
use std::task::Poll;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::framing::{self, BodyFraming, ChunkedBody, Violation};
use super::io::{self as conn_io, Deadline, PooledBuf, Transport};
use super::{
    BodyError, ClientSide, Fields, Handler, RequestBody, RequestHead, ResponseBody, Served, Version,
};
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::refusal::{Refusal, RefusalCode};

/// Fields kept on the stack per head; a head with more is parsed again onto the heap.
const STACK_FIELDS: usize = 32;

/// What an HTTP/1.1 connection needs to know beyond its bytes.
pub(crate) struct Settings<'a> {
    pub limits: &'a Limits,
    pub metrics: &'a Metrics,
}

/// Serves HTTP/1.1 on `io` until the client closes, a timeout or a refusal ends the
/// connection, or `shutdown` turns true between requests. `prefix` holds bytes already read
/// (they begin the first request).
pub(crate) async fn serve<T: Transport, H: Handler>(
    mut io: T,
    prefix: Vec<u8>,
    handler: &H,
    settings: &Settings<'_>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = settings.limits;
    let mut buf = PooledBuf(prefix);
    let mut more = PooledBuf::empty();
    let mut out = PooledBuf::empty();
    let mut deadline = Deadline::new();
    let head_cap = limits.head_buffer_cap();
    // One wait for shutdown for the connection's life: registered once, polled between
    // requests (making it anew for every idle wait would cost a registration each time).
    let mut stop = std::pin::pin!(conn_io::stopped(&mut shutdown));
    // A head found whose chunked body's first size line has not arrived yet.
    let mut found: Option<usize> = None;
    let mut head_deadline_set = false;
    loop {
        // Wait for a whole head.
        let mut scanned = 0;
        if found.is_none() {
            head_deadline_set = false;
        }
        let head_len = loop {
            if let Some(len) = found {
                // The head was judged; more bytes came for its chunked body's first line.
                break len;
            }
            if !buf.0.is_empty() {
                match framing::find_head_end(&buf.0, &mut scanned) {
                    Ok(Some(len)) => break len,
                    Ok(None) => {}
                    Err(violation) => {
                        Box::pin(refuse_malformed(
                            &mut io,
                            violation,
                            settings,
                            &mut deadline,
                        ))
                        .await;
                        return Box::pin(linger(&mut io)).await;
                    }
                }
                if buf.0.len() > head_cap {
                    Box::pin(refuse_malformed(
                        &mut io,
                        Violation::HeadTooLarge,
                        settings,
                        &mut deadline,
                    ))
                    .await;
                    return Box::pin(linger(&mut io)).await;
                }
                if !head_deadline_set {
                    head_deadline_set = true;
                    deadline.after(limits.header_read_timeout);
                }
                match read_more(&mut io, buf.ensure(), &mut deadline).await {
                    Ok(0) | Err(Read::Failed) => return,
                    Ok(_) => continue,
                    Err(Read::TimedOut) => {
                        Box::pin(answer_timeout(&mut io, &mut deadline)).await;
                        return;
                    }
                }
            }
            // Idle: the buffers go back to the worker until the next request arrives, so an
            // idle connection holds none.
            buf.release();
            more.release();
            out.release();
            deadline.after(limits.idle_timeout);
            loop {
                if !io.holds_input() {
                    let ready = tokio::select! {
                        biased;
                        _ = stop.as_mut() => return,
                        ready = deadline.run(io.socket().readable()) => ready,
                    };
                    match ready {
                        Some(Ok(())) => {}
                        // Idle for `idle_timeout`, or the socket failed: closed without a word.
                        None | Some(Err(_)) => return,
                    }
                }
                // Readiness can be stale (bytes taken earlier, a TLS record with no data):
                // a buffer is held only once bytes are really here.
                match conn_io::read_now(&mut io, buf.ensure()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return,
                    Poll::Ready(Ok(_)) => break,
                    Poll::Pending => buf.release(),
                }
            }
            deadline.after(limits.header_read_timeout);
            head_deadline_set = true;
        };

        // The request itself lives on the heap for its lifetime only: an idle connection's
        // task keeps room for nothing of it (its fields, the engine's state).
        let request = one_request(
            &mut io,
            &buf.0,
            head_len,
            more.ensure(),
            out.ensure(),
            &mut deadline,
            handler,
            settings,
        );
        let request = Box::pin(request);
        let done = match request.await {
            Request::Done(done) => done,
            Request::Refused => return Box::pin(linger(&mut io)).await,
            Request::FirstChunkLine => {
                // Read on (within the head's deadline), then judge the head again.
                found = Some(head_len);
                match read_more(&mut io, buf.ensure(), &mut deadline).await {
                    Ok(0) | Err(Read::Failed) => return,
                    Ok(_) => continue,
                    Err(Read::TimedOut) => {
                        Box::pin(answer_timeout(&mut io, &mut deadline)).await;
                        return;
                    }
                }
            }
        };
        found = None;
        match done.served {
            Served::Tunneled => return,
            Served::KeepAlive if done.reusable => {}
            Served::Close | Served::KeepAlive if done.quiet => {
                return Box::pin(close_quietly(&mut io)).await
            }
            Served::Close | Served::KeepAlive => return Box::pin(linger(&mut io)).await,
        }
        // What the exchange did not consume begins the next request.
        match done.rest {
            Rest::InHead(taken) => {
                buf.0.drain(..head_len + taken);
            }
            Rest::InMore(from) => {
                std::mem::swap(&mut buf.0, &mut more.0);
                buf.0.drain(..from);
            }
        }
    }
}

/// What became of a request handed to [`one_request`].
enum Request {
    Done(Done),
    /// The head broke the rules (answered) or its chunked body's first size line did.
    Refused,
    /// The head asks for a chunked body whose first size line has not arrived yet: judged
    /// before anything goes to an origin, so the head is read again when more has arrived.
    FirstChunkLine,
}

/// How an exchange on a connection ended.
struct Done {
    served: Served,
    /// The connection may serve another request: the body was read to its end, the response
    /// written whole, and nobody asked to close.
    reusable: bool,
    /// The client asked to close (so it sends nothing more), its request was read to the end
    /// and answered whole, and nothing past it arrived: the connection closes without
    /// lingering.
    quiet: bool,
    rest: Rest,
}

/// Where the bytes after the exchange (the next request's) are.
enum Rest {
    /// In the head buffer, this far past the head.
    InHead(usize),
    /// In the body buffer, from here.
    InMore(usize),
}

/// Judges a complete head (`buf[..head_len]`), takes its fields as slices of `buf`, and hands
/// the request to the engine.
#[allow(clippy::too_many_arguments)]
async fn one_request<T: Transport, H: Handler>(
    io: &mut T,
    buf: &[u8],
    head_len: usize,
    more: &mut Vec<u8>,
    out: &mut Vec<u8>,
    deadline: &mut Deadline,
    handler: &H,
    settings: &Settings<'_>,
) -> Request {
    let head_bytes = &buf[..head_len];
    let mut stack = [httparse::EMPTY_HEADER; STACK_FIELDS];
    let mut count = 0;
    let mut overflow = false;
    let parsed = framing::check_request_head_with(head_bytes, |name, value| {
        if count < STACK_FIELDS {
            stack[count] = httparse::Header { name, value };
            count += 1;
        } else {
            overflow = true;
        }
    });
    let parsed = match parsed {
        Ok(parsed) => parsed,
        Err(violation) => {
            refuse_malformed(io, violation, settings, deadline).await;
            return Request::Refused;
        }
    };
    // A chunked body's first size line is judged before the request goes anywhere (unless
    // the client waits for `100 Continue` to send it), so a body malformed from its first
    // line never reaches an origin.
    if parsed.head.body == BodyFraming::Chunked && !parsed.head.expect_continue {
        let mut chunks = ChunkedBody::default();
        let mut rest = &buf[head_len..];
        let passed = loop {
            if rest.is_empty() {
                break false;
            }
            match chunks.decode(rest) {
                Ok(step) if step.end || chunks.first_line_done() => break true,
                Ok(step) => rest = &rest[step.consumed..],
                Err(violation) => {
                    refuse_malformed(io, violation, settings, deadline).await;
                    return Request::Refused;
                }
            }
        };
        if !passed {
            return Request::FirstChunkLine;
        }
    }
    let heap: Vec<httparse::Header<'_>>;
    let fields: &[httparse::Header<'_>] = if overflow {
        let mut all = Vec::with_capacity(count * 2);
        let _ = framing::check_request_head_with(head_bytes, |name, value| {
            all.push(httparse::Header { name, value })
        });
        heap = all;
        &heap
    } else {
        &stack[..count]
    };
    let head = request_head(&parsed, fields, head_len);
    let body = match parsed.head.body {
        BodyFraming::None => Body::Done,
        BodyFraming::Length(n) => Body::Length(n),
        BodyFraming::Chunked => Body::Chunked(ChunkedBody::default()),
    };
    more.clear();
    let mut exchange = Exchange {
        io,
        pending: &buf[head_len..],
        taken: 0,
        more,
        more_pos: 0,
        body,
        expect_continue: parsed.head.expect_continue,
        out,
        deadline,
        stall: settings.limits.idle_timeout,
        http10: parsed.http10,
        metrics: settings.metrics,
        head_request: head.method == "HEAD",
        close: parsed.close,
        response: Response::NotStarted,
    };
    let served = handler.serve(&head, &mut exchange).await;
    let reusable = exchange.body.is_done()
        && exchange.response == Response::Done
        && !exchange.close
        && served == Served::KeepAlive;
    let rest = if exchange.taken < exchange.pending.len() {
        Rest::InHead(exchange.taken)
    } else {
        Rest::InMore(exchange.more_pos)
    };
    let nothing_after = matches!(rest, Rest::InMore(from) if from >= exchange.more.len())
        && !exchange.io.holds_input();
    let quiet = parsed.close
        && exchange.body.is_done()
        && exchange.response == Response::Done
        && nothing_after;
    Request::Done(Done {
        served,
        reusable,
        quiet,
        rest,
    })
}

/// The engine's view of a request head, from a head that passed the framing rules.
fn request_head<'a>(
    parsed: &framing::ParsedHead<'a>,
    fields: &'a [httparse::Header<'a>],
    head_len: usize,
) -> RequestHead<'a> {
    let target = parsed.target;
    // absolute-form: the authority is the target's (framing checked that it equals Host).
    let (authority, rest) = match strip_scheme(target) {
        Some(rest) => {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let path = &rest[end..];
            (Some(&rest[..end]), if path.is_empty() { "/" } else { path })
        }
        None => (
            fields
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case("host"))
                .and_then(|f| std::str::from_utf8(f.value).ok()),
            target,
        ),
    };
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    let body = match parsed.head.body {
        BodyFraming::None => RequestBody::None,
        BodyFraming::Length(n) => RequestBody::Length(n),
        BodyFraming::Chunked => RequestBody::Chunked,
    };
    let upgrade = parsed.head.tunnel && parsed.method != "CONNECT";
    RequestHead {
        version: if parsed.http10 {
            Version::Http10
        } else {
            Version::Http11
        },
        method: parsed.method,
        path,
        query,
        authority,
        host_mismatch: false,
        fields: Fields::Raw(fields),
        body,
        upgrade,
        head_bytes: head_len,
    }
}

fn strip_scheme(target: &str) -> Option<&str> {
    let b = target.as_bytes();
    if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"http://") {
        Some(&target[7..])
    } else if b.len() > 8 && b[..8].eq_ignore_ascii_case(b"https://") {
        Some(&target[8..])
    } else {
        None
    }
}

enum Read {
    Failed,
    TimedOut,
}

async fn read_more<T: Transport>(
    io: &mut T,
    buf: &mut Vec<u8>,
    deadline: &mut Deadline,
) -> Result<usize, Read> {
    conn_io::read_some(io, buf, deadline)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => Read::TimedOut,
            _ => Read::Failed,
        })
}

/// The request body as it is read.
enum Body {
    Length(u64),
    Chunked(ChunkedBody),
    Done,
    /// Reading failed; nothing more can be read from this connection.
    Failed,
}

impl Body {
    fn is_done(&self) -> bool {
        matches!(self, Body::Done)
    }
}

/// How far the response has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Response {
    NotStarted,
    /// The head went out; the body goes as this says.
    Body(Writing),
    Done,
    /// A write failed: nothing more can be written.
    Failed,
}

/// How response body bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// As they are: a length, an origin's chunks, or until the connection closes.
    Plain,
    /// Each piece as a chunk of its own.
    Chunked,
}

/// One exchange on an HTTP/1.1 connection: the engine's [`ClientSide`].
pub(crate) struct Exchange<'c, T> {
    io: &'c mut T,
    /// What arrived with the head, after it: the body's start, perhaps the next requests.
    pending: &'c [u8],
    /// How many of `pending` the body took.
    taken: usize,
    /// Bytes read once `pending` ran out, from `more_pos` on not yet taken.
    more: &'c mut Vec<u8>,
    more_pos: usize,
    body: Body,
    expect_continue: bool,
    out: &'c mut Vec<u8>,
    deadline: &'c mut Deadline,
    stall: Duration,
    http10: bool,
    /// Where a chunk that breaks the rules is counted.
    metrics: &'c Metrics,
    head_request: bool,
    /// The connection ends with this exchange.
    close: bool,
    response: Response,
}

impl<T: Transport> Exchange<'_, T> {
    async fn write(&mut self, parts: &mut [&[u8]]) -> io::Result<()> {
        let written = conn_io::write_all(self.io, parts, self.deadline, self.stall).await;
        if written.is_err() {
            self.response = Response::Failed;
        }
        written
    }

    async fn flush(&mut self) -> io::Result<()> {
        let flushed = conn_io::flush(self.io, self.deadline, self.stall).await;
        if flushed.is_err() {
            self.response = Response::Failed;
        }
        flushed
    }
}

/// A chunk-size line for `len` bytes: hex digits and CRLF.
pub(crate) fn chunk_line(len: usize, line: &mut [u8; 20]) -> &[u8] {
    let mut n = len;
    let mut i = line.len() - 2;
    line[i] = b'\r';
    line[i + 1] = b'\n';
    loop {
        i -= 1;
        line[i] = b"0123456789abcdef"[n % 16];
        n /= 16;
        if n == 0 {
            break;
        }
    }
    &line[i..]
}

impl<T: Transport> ClientSide for Exchange<'_, T> {
    fn takes_chunked(&self) -> bool {
        !self.http10
    }

    async fn send_continue(&mut self) -> io::Result<()> {
        if !self.expect_continue {
            return Ok(());
        }
        self.expect_continue = false;
        if self.body.is_done() || self.response != Response::NotStarted {
            return Ok(());
        }
        self.write(&mut [b"HTTP/1.1 100 Continue\r\n\r\n"]).await?;
        self.flush().await
    }

    async fn read_body(&mut self) -> Result<Option<&[u8]>, BodyError> {
        loop {
            match self.body {
                Body::Done => return Ok(None),
                Body::Failed => return Err(BodyError::Gone),
                _ => {}
            }
            let in_pending = self.taken < self.pending.len();
            let avail: &[u8] = if in_pending {
                &self.pending[self.taken..]
            } else {
                &self.more[self.more_pos..]
            };
            if avail.is_empty() {
                // Everything read is taken: read on, into the body buffer from its start.
                self.more.clear();
                self.more_pos = 0;
                if self.more.capacity() < conn_io::BODY_CHUNK {
                    self.more.reserve(conn_io::BODY_CHUNK);
                }
                match conn_io::read_stalling(self.io, self.more, self.deadline, self.stall).await {
                    Ok(0) => {
                        self.body = Body::Failed;
                        return Err(BodyError::Gone);
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        self.body = Body::Failed;
                        return Err(BodyError::Stalled);
                    }
                    Err(_) => {
                        self.body = Body::Failed;
                        return Err(BodyError::Gone);
                    }
                }
            }
            let (consumed, data, end) = match &mut self.body {
                Body::Length(left) => {
                    let take = avail
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    (take, 0..take, *left == 0)
                }
                Body::Chunked(chunks) => match chunks.decode(avail) {
                    Ok(step) => (step.consumed, step.data, step.end),
                    Err(violation) => {
                        self.metrics.count_malformed(violation.index());
                        self.body = Body::Failed;
                        return Err(BodyError::Malformed);
                    }
                },
                Body::Done | Body::Failed => unreachable!("handled above"),
            };
            if end {
                self.body = Body::Done;
            }
            let start = if in_pending {
                self.taken
            } else {
                self.more_pos
            };
            if in_pending {
                self.taken += consumed;
            } else {
                self.more_pos += consumed;
            }
            if !data.is_empty() {
                let all: &[u8] = if in_pending { self.pending } else { self.more };
                return Ok(Some(&all[start + data.start..start + data.end]));
            }
        }
    }

    fn start_head(&mut self, status: u16, reason: &str) {
        let out = &mut *self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(digits.format(status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    fn head_field(&mut self, name: &[u8], value: &[u8]) {
        crate::http::push_field(self.out, name, value);
    }

    async fn send_head(&mut self, body: ResponseBody, first: &[u8], end: bool) -> io::Result<()> {
        let writing = match body {
            ResponseBody::None => Writing::Plain,
            ResponseBody::Length(n) => {
                self.out.extend_from_slice(b"content-length: ");
                let mut digits = itoa::Buffer::new();
                self.out.extend_from_slice(digits.format(n).as_bytes());
                self.out.extend_from_slice(b"\r\n");
                Writing::Plain
            }
            ResponseBody::RawChunked => {
                self.out
                    .extend_from_slice(b"transfer-encoding: chunked\r\n");
                Writing::Plain
            }
            ResponseBody::UntilClose => {
                // The origin's body ends when its connection does; so does the client's.
                self.close = true;
                Writing::Plain
            }
            ResponseBody::Stream if self.head_request => Writing::Plain,
            ResponseBody::Stream if self.http10 => {
                // No chunks for HTTP/1.0: the body ends when the connection does.
                self.close = true;
                Writing::Plain
            }
            ResponseBody::Stream => {
                self.out
                    .extend_from_slice(b"transfer-encoding: chunked\r\n");
                Writing::Chunked
            }
        };
        // A body not read to its end leaves the connection unusable for a next request.
        if !self.body.is_done() {
            self.close = true;
        }
        if self.close {
            self.out.extend_from_slice(b"connection: close\r\n");
        } else if self.http10 {
            self.out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        self.response = Response::Body(writing);
        let out = std::mem::take(self.out);
        let mut line = [0u8; 20];
        let written = if writing == Writing::Chunked && !first.is_empty() {
            let size = chunk_line(first.len(), &mut line);
            let tail: &[u8] = if end { b"\r\n0\r\n\r\n" } else { b"\r\n" };
            self.write(&mut [&out, size, first, tail]).await
        } else if writing == Writing::Chunked && end {
            self.write(&mut [&out, b"0\r\n\r\n"]).await
        } else {
            self.write(&mut [&out, first]).await
        };
        *self.out = out;
        written?;
        if end {
            self.flush().await?;
            self.response = Response::Done;
        }
        Ok(())
    }

    async fn send_data(&mut self, data: &[u8], end: bool) -> io::Result<()> {
        let Response::Body(writing) = self.response else {
            return Err(io::Error::other("no response head was sent"));
        };
        let mut line = [0u8; 20];
        if writing == Writing::Chunked && !data.is_empty() {
            let size = chunk_line(data.len(), &mut line);
            let tail: &[u8] = if end { b"\r\n0\r\n\r\n" } else { b"\r\n" };
            self.write(&mut [size, data, tail]).await?;
        } else if writing == Writing::Chunked && end {
            self.write(&mut [b"0\r\n\r\n"]).await?;
        } else {
            self.write(&mut [data]).await?;
        }
        if end {
            self.flush().await?;
            self.response = Response::Done;
        }
        Ok(())
    }

    async fn send_end(&mut self, _trailers: Option<http::HeaderMap>) -> io::Result<()> {
        // Trailers from an HTTP/2 origin are not carried to HTTP/1.1 clients.
        self.send_data(&[], true).await
    }

    fn can_upgrade(&self) -> bool {
        true
    }

    async fn tunnel<O: Transport>(&mut self, origin: &mut O, from_origin: &[u8]) {
        // What each side sent after its head goes first, then bytes flow both ways.
        let client_sent: &[u8] = if self.taken < self.pending.len() {
            &self.pending[self.taken..]
        } else {
            &self.more[self.more_pos..]
        };
        self.taken = self.pending.len();
        self.more_pos = self.more.len();
        let mut origin_deadline = Deadline::new();
        let relayed = async {
            conn_io::write_all(self.io, &mut [from_origin], self.deadline, self.stall).await?;
            conn_io::flush(self.io, self.deadline, self.stall).await?;
            conn_io::write_all(origin, &mut [client_sent], &mut origin_deadline, self.stall)
                .await?;
            conn_io::flush(origin, &mut origin_deadline, self.stall).await?;
            tokio::io::copy_bidirectional(self.io, origin).await
        };
        if let Err(e) = relayed.await {
            tracing::debug!("tunnel ended: {e}");
        }
        self.response = Response::Done;
    }

    async fn send_refusal(&mut self, refusal: &Refusal<'_>, close: bool) -> io::Result<()> {
        if !self.body.is_done() {
            self.close = true;
        }
        self.close |= close;
        let mut out = std::mem::take(self.out);
        out.clear();
        refusal.write_http1(&mut out, self.close, self.head_request);
        let written = self.write(&mut [&out]).await;
        *self.out = out;
        written?;
        self.flush().await?;
        self.response = Response::Done;
        Ok(())
    }
}

/// Answers a head the framing rules refused: 400 (431 for a head too large), JSON, and the
/// connection closes. Not a routing decision, so not audited; counted by reason in
/// `domicile_malformed_requests_total`.
async fn refuse_malformed<T: Transport>(
    io: &mut T,
    violation: Violation,
    settings: &Settings<'_>,
    deadline: &mut Deadline,
) {
    settings.metrics.count_malformed(violation.index());
    let code = match violation {
        Violation::HeadTooLarge => RefusalCode::HeadersTooLarge,
        _ => RefusalCode::BadRequest,
    };
    let request_id = super::RequestId::new();
    let refusal = Refusal::new(code)
        .message(violation.message())
        .request_id(Some(request_id.as_str()));
    let mut out = Vec::with_capacity(512);
    refusal.write_http1(&mut out, true, false);
    let stall = settings.limits.idle_timeout.min(Duration::from_secs(5));
    if conn_io::write_all(io, &mut [&out], deadline, stall)
        .await
        .is_ok()
    {
        let _ = conn_io::flush(io, deadline, stall).await;
    }
}

/// Answers a head that did not arrive in time with 408 and closes (at most a second of
/// trying: the client may not be reading either).
async fn answer_timeout<T: Transport>(io: &mut T, deadline: &mut Deadline) {
    let bytes = Refusal::new(RefusalCode::RequestTimeout)
        .message("the request head was not received in time")
        .raw_http1();
    let stall = Duration::from_secs(1);
    if conn_io::write_all(io, &mut [&bytes], deadline, stall)
        .await
        .is_ok()
    {
        let _ = conn_io::flush(io, deadline, stall).await;
    }
    let _ = tokio::time::timeout(stall, io.shutdown()).await;
}

/// Closes a connection whose client said it would send nothing more, and did not: the
/// kernel sends what is queued and then the FIN, so there is nothing to linger for (a TLS
/// session sends its `close_notify` first).
async fn close_quietly<T: Transport>(io: &mut T) {
    if io.ends_in_band() {
        let _ = tokio::time::timeout(Duration::from_millis(300), io.shutdown()).await;
    }
}

/// Lingering close. When this side closes a connection the client is still sending on (a body
/// refused with 413 halfway, say), closing at once would make the kernel answer the client's
/// next bytes with a reset, which can destroy the response before the client reads it. So:
/// half-close, then read and discard for a moment (at most 256 KiB or 300 ms) until the client
/// closes too. A client that already closed costs one read.
pub(crate) async fn linger<T: Transport>(io: &mut T) {
    const BUDGET: usize = 256 * 1024;
    let window = Duration::from_millis(300);
    let _ = tokio::time::timeout(window, io.shutdown()).await;
    let drain = async {
        let mut discarded = 0;
        let mut scratch = conn_io::take_buffer();
        while discarded < BUDGET {
            scratch.clear();
            match tokio::io::AsyncReadExt::read_buf(io, &mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
        conn_io::release(&mut scratch);
    };
    let _ = tokio::time::timeout(window, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_lines_are_hex() {
        let mut line = [0u8; 20];
        assert_eq!(chunk_line(0, &mut line), b"0\r\n");
        assert_eq!(chunk_line(255, &mut line), b"ff\r\n");
        assert_eq!(chunk_line(65536, &mut line), b"10000\r\n");
    }

    #[test]
    fn absolute_targets_name_their_authority() {
        assert_eq!(strip_scheme("http://a.example/x"), Some("a.example/x"));
        assert_eq!(strip_scheme("HTTPS://a.example"), Some("a.example"));
        assert_eq!(strip_scheme("/x"), None);
    }
}
