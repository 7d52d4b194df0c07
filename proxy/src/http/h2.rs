//! HTTP/2 connections from clients (prior knowledge on the cleartext port, ALPN `h2` over
//! TLS), served with the `h2` crate: each stream is one request for the engine.
//!
//! The `h2` crate enforces the protocol's own rules (connection-specific fields, CR, LF or NUL
//! in values, `te` other than `trailers`, the header list size, the rapid-reset and error-reset
//! bounds): a stream that breaks them is reset before it is accepted. Streams of one
//! connection are served concurrently inside the connection's task. A connection with no
//! stream for `idle_timeout` is closed with GOAWAY; one whose client stops answering PINGs is
//! dropped. On shutdown, GOAWAY, and the streams in flight finish.

use std::future::{poll_fn, Future};
use std::io;
use std::time::Duration;

use bytes::Bytes;
use std::task::Poll;

use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{Ping, RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tokio::sync::watch;

use super::io::Transport;
use super::{
    BodyError, ClientSide, Fields, Handler, RequestBody, RequestHead, ResponseBody, Version,
};
use crate::config::Limits;
use crate::refusal::Refusal;

/// Flow-control windows advertised to clients: large enough that an upload over one stream
/// is not held to 64 KiB per round trip.
const WINDOW: u32 = 1024 * 1024;

/// Serves HTTP/2 on `io` until the client closes, the connection idles out, or `shutdown`
/// turns true (then GOAWAY, and the streams in flight finish).
pub(crate) async fn serve<T: Transport, H: Handler>(
    io: T,
    handler: &H,
    limits: &Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(limits.max_concurrent_streams)
        // Also bounds a header block's CONTINUATION frames: a block that grows past it is
        // refused, not buffered.
        .max_header_list_size(limits.max_header_bytes.min(u64::from(u32::MAX)) as u32)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_local_error_reset_streams(Some(limits.h2_max_local_error_resets))
        .max_send_buffer_size(limits.h2_max_send_buffer as usize)
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW);
    let handshake = tokio::time::timeout(limits.header_read_timeout, builder.handshake(io));
    let mut conn = match handshake.await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!("http2 handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let mut ping = conn.ping_pong();
    let mut streams = FuturesUnordered::new();
    let idle_timeout = limits.idle_timeout;
    let mut idle = Box::pin(tokio::time::sleep(idle_timeout));
    let mut draining = false;
    let mut stop = std::pin::pin!(super::io::stopped(&mut shutdown));
    // A PING sent and not yet answered, and when the answer is due.
    let mut pong_due: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        // One pass per wake-up: every stream that can move does (what they write is only
        // buffered), then the connection reads what arrived and flushes everything in one
        // write. Polling the connection after each stream would cost a write per response.
        let event = poll_fn(|cx| {
            let had_streams = !streams.is_empty();
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            if had_streams && streams.is_empty() {
                idle.as_mut()
                    .reset(tokio::time::Instant::now() + idle_timeout);
            }
            let conn_event = if draining {
                conn.poll_closed(cx).map(ConnEvent::Closed)
            } else {
                conn.poll_accept(cx).map(ConnEvent::Accepted)
            };
            if let Poll::Ready(event) = conn_event {
                return Poll::Ready(event);
            }
            if !draining {
                if stop.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(ConnEvent::Stop);
                }
                if idle.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(ConnEvent::Idle);
                }
            }
            if let Some(due) = pong_due.as_mut() {
                if let Some(ping) = ping.as_mut() {
                    if let Poll::Ready(pong) = ping.poll_pong(cx) {
                        return Poll::Ready(ConnEvent::Pong(pong.is_ok()));
                    }
                }
                if due.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(ConnEvent::PongLate);
                }
            }
            Poll::Pending
        })
        .await;
        match event {
            ConnEvent::Accepted(Some(Ok((request, respond)))) => {
                streams.push(serve_stream(handler, request, respond, limits));
            }
            ConnEvent::Accepted(Some(Err(e))) | ConnEvent::Closed(Err(e)) => {
                tracing::debug!("http2 connection ended: {e}");
                break;
            }
            ConnEvent::Accepted(None) | ConnEvent::Closed(Ok(())) => break,
            ConnEvent::Stop => {
                draining = true;
                conn.graceful_shutdown();
            }
            ConnEvent::Idle if streams.is_empty() => {
                draining = true;
                conn.graceful_shutdown();
            }
            ConnEvent::Idle => {
                // Streams are open: ask the client whether it is still there.
                idle.as_mut()
                    .reset(tokio::time::Instant::now() + idle_timeout);
                if pong_due.is_none() {
                    if let Some(ping) = ping.as_mut() {
                        if ping.send_ping(Ping::opaque()).is_ok() {
                            pong_due =
                                Some(Box::pin(tokio::time::sleep(limits.h2_keep_alive_timeout)));
                        }
                    }
                }
            }
            ConnEvent::Pong(true) => pong_due = None,
            ConnEvent::Pong(false) => break,
            ConnEvent::PongLate => {
                tracing::debug!("http2 client did not answer a PING in time; closing");
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                break;
            }
        }
    }
    // The streams still in flight finish with the connection driven alongside them.
    poll_fn(|cx| {
        while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
        if streams.is_empty() {
            return Poll::Ready(());
        }
        conn.poll_closed(cx).map(|_| ())
    })
    .await;
}

/// A stream the client opened: its request and the handle to answer it.
type Accepted = (http::Request<RecvStream>, SendResponse<Bytes>);

// Accepted streams are the common event; boxing them would allocate for each.
#[allow(clippy::large_enum_variant)]
enum ConnEvent {
    Accepted(Option<Result<Accepted, h2::Error>>),
    Closed(Result<(), h2::Error>),
    /// Shutdown: GOAWAY, and the streams in flight finish.
    Stop,
    /// No stream for `idle_timeout`, or streams and silence.
    Idle,
    /// The answer to our PING (`false`: the connection failed).
    Pong(bool),
    /// No answer to our PING in time.
    PongLate,
}

/// One stream: its request head for the engine, its body and its answer.
async fn serve_stream<H: Handler>(
    handler: &H,
    request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    limits: &Limits,
) {
    let (parts, body) = request.into_parts();
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok());
    let authority = parts.uri.authority().map(|a| a.as_str()).or(host);
    let host_mismatch = match (parts.uri.authority(), host) {
        (Some(authority), Some(host)) => !authority.as_str().eq_ignore_ascii_case(host),
        _ => false,
    };
    let fields = Fields::Map(&parts.headers);
    let length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let request_body = if body.is_end_stream() {
        RequestBody::None
    } else {
        RequestBody::Frames(length)
    };
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let head_bytes = path_and_query.len()
        + authority.map_or(0, str::len)
        + parts
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    let head = RequestHead {
        version: Version::Http2,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        authority,
        host_mismatch,
        fields,
        body: request_body,
        upgrade: false,
        head_bytes,
    };
    let mut exchange = Exchange {
        body,
        body_done: request_body.is_none(),
        data: Bytes::new(),
        respond: Some(respond),
        stream: None,
        head: None,
        head_only: parts.method == http::Method::HEAD,
        stall: limits.idle_timeout,
    };
    let _ = handler.serve(&head, &mut exchange).await;
}

/// One stream's end of an exchange: the engine's [`ClientSide`].
pub(crate) struct Exchange {
    body: RecvStream,
    body_done: bool,
    /// The body data last handed to the engine.
    data: Bytes,
    respond: Option<SendResponse<Bytes>>,
    stream: Option<SendStream<Bytes>>,
    /// The response head being built.
    head: Option<Response<()>>,
    head_only: bool,
    stall: Duration,
}

fn broken(e: h2::Error) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, e)
}

/// Sends `data` on `stream` as the client's flow-control window allows, failing when no
/// window opens for `stall` or the client reset the stream.
async fn send_flow(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    stall: Duration,
) -> io::Result<()> {
    if data.is_empty() {
        return stream.send_data(data, end).map_err(broken);
    }
    stream.reserve_capacity(data.len());
    while !data.is_empty() {
        let capacity = tokio::time::timeout(stall, poll_fn(|cx| stream.poll_capacity(cx))).await;
        let granted = match capacity {
            Ok(Some(Ok(n))) => n,
            Ok(Some(Err(e))) => return Err(broken(e)),
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the client closed the stream",
                ))
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client stopped reading",
                ))
            }
        };
        if granted == 0 {
            continue;
        }
        let piece = data.split_to(granted.min(data.len()));
        stream
            .send_data(piece, end && data.is_empty())
            .map_err(broken)?;
    }
    Ok(())
}

impl Exchange {
    fn respond(&mut self, head: Response<()>, end: bool) -> io::Result<()> {
        let Some(mut respond) = self.respond.take() else {
            return Err(io::Error::other("the response was sent already"));
        };
        let stream = respond.send_response(head, end).map_err(broken)?;
        if !end {
            self.stream = Some(stream);
        }
        Ok(())
    }

    async fn data(&mut self, data: Bytes, end: bool) -> io::Result<()> {
        let stall = self.stall;
        match self.stream.as_mut() {
            Some(stream) => {
                let sent = send_flow(stream, data, end, stall).await;
                if end || sent.is_err() {
                    self.stream = None;
                }
                sent
            }
            // HEAD: the head ended the stream; the body is not sent.
            None if self.head_only => Ok(()),
            None => Err(io::Error::other("no response stream is open")),
        }
    }
}

impl ClientSide for Exchange {
    fn takes_chunked(&self) -> bool {
        false
    }

    async fn send_continue(&mut self) -> io::Result<()> {
        if let Some(respond) = self.respond.as_mut() {
            let mut interim = Response::new(());
            *interim.status_mut() = StatusCode::CONTINUE;
            respond.send_informational(interim).map_err(broken)?;
        }
        Ok(())
    }

    async fn read_body(&mut self) -> Result<Option<&[u8]>, BodyError> {
        if self.body_done {
            return Ok(None);
        }
        match tokio::time::timeout(self.stall, self.body.data()).await {
            Err(_) => Err(BodyError::Stalled),
            Ok(None) => {
                self.body_done = true;
                Ok(None)
            }
            Ok(Some(Err(e))) => {
                tracing::debug!("http2 request body failed: {e}");
                Err(if e.is_reset() || e.is_go_away() {
                    BodyError::Gone
                } else {
                    BodyError::Malformed
                })
            }
            Ok(Some(Ok(data))) => {
                let _ = self.body.flow_control().release_capacity(data.len());
                if self.body.is_end_stream() {
                    self.body_done = true;
                }
                self.data = data;
                Ok(Some(&self.data))
            }
        }
    }

    fn start_head(&mut self, status: u16, _reason: &str) {
        let mut head = Response::new(());
        *head.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        self.head = Some(head);
    }

    fn head_field(&mut self, name: &[u8], value: &[u8]) {
        let Some(head) = self.head.as_mut() else {
            return;
        };
        super::append_h2_field(head.headers_mut(), name, value);
    }

    async fn send_head(&mut self, body: ResponseBody, first: &[u8], end: bool) -> io::Result<()> {
        let Some(mut head) = self.head.take() else {
            return Err(io::Error::other("no response head was begun"));
        };
        if let ResponseBody::Length(n) = body {
            head.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        let no_body = self.head_only || body == ResponseBody::None;
        self.respond(head, no_body || (end && first.is_empty()))?;
        if no_body || first.is_empty() {
            return Ok(());
        }
        self.data(Bytes::copy_from_slice(first), end).await
    }

    async fn send_data(&mut self, data: &[u8], end: bool) -> io::Result<()> {
        self.data(Bytes::copy_from_slice(data), end).await
    }

    async fn send_end(&mut self, trailers: Option<HeaderMap>) -> io::Result<()> {
        match (self.stream.as_mut(), trailers) {
            (Some(stream), Some(trailers)) if !trailers.is_empty() => {
                let sent = stream.send_trailers(trailers).map_err(broken);
                self.stream = None;
                sent
            }
            _ => self.data(Bytes::new(), true).await,
        }
    }

    fn can_upgrade(&self) -> bool {
        false
    }

    async fn tunnel<O: Transport>(&mut self, _origin: &mut O, _from_origin: &[u8]) {}

    async fn send_refusal(&mut self, refusal: &Refusal<'_>, _close: bool) -> io::Result<()> {
        let body = refusal.body_bytes();
        let head = refusal.h2_head(body.len());
        if self.head_only {
            return self.respond(head, true);
        }
        self.respond(head, false)?;
        self.data(Bytes::from(body), true).await
    }
}

/// Bytes read before HTTP/2 took the connection (the preface, sniffed on the cleartext port)
/// and then the connection itself.
pub(crate) struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    pub(crate) fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<T: Transport> tokio::io::AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Transport> tokio::io::AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Transport> Transport for Prefixed<T> {
    fn socket(&self) -> &tokio::net::TcpStream {
        self.inner.socket()
    }

    fn holds_input(&self) -> bool {
        self.pos < self.prefix.len() || self.inner.holds_input()
    }

    fn ends_in_band(&self) -> bool {
        self.inner.ends_in_band()
    }
}
