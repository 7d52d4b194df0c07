//! The framing screen: every byte hyper reads from an HTTP/1.1 client passes through it.
//!
//! hyper's parser is lenient where the RFC lets it be (it takes the last of two equal
//! `Content-Length`s, lets `Transfer-Encoding` win over `Content-Length`, accepts LF alone as a
//! line ending). Leniency is where smuggling starts, so [`Screened`] holds each request head
//! back until it is complete and has passed [`framing::check_request_head`], then follows the
//! body's framing (a length, or chunks checked by [`ChunkedBody`]) to know where the next head
//! begins. hyper never sees a byte of a refused head: in its place it reads one synthetic
//! request carrying the reason in the reserved field [`MALFORMED_FIELD`] and
//! `Connection: close`, which the service answers with a JSON refusal. So a refusal takes its
//! turn after the responses to earlier pipelined requests, and the connection closes after it.
//!
//! A chunked head is held until its first chunk-size line has arrived and passed too (unless
//! the client waits for `100 Continue`), so a body malformed from its first line never reaches
//! an origin. A chunk that breaks the rules later fails the read: hyper fails the request body,
//! the origin's request is cut off (never completed), and the client gets 400.
//!
//! After an upgrade or CONNECT head the screen steps aside: the bytes that follow may not be
//! HTTP, and an upgrade that an origin declines ends its connection (see the pipeline).

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::framing::{self, BodyFraming, ChunkedBody, Violation, MALFORMED_FIELD};
use crate::pipeline::Pipeline;

/// Held-back buffers up to this size are kept between requests; larger ones are freed, so an
/// idle connection does not keep a large head's buffer.
const KEEP_CAPACITY: usize = 1024;
/// Bytes read per step while a head is held back.
const HOLD_READ: usize = 4096;

/// Hands `held[..*ready]` (as much as `buf` takes) on to hyper; false when nothing is ready.
fn release(held: &mut Vec<u8>, ready: &mut usize, buf: &mut ReadBuf<'_>) -> bool {
    if *ready == 0 {
        return false;
    }
    let n = (*ready).min(buf.remaining());
    buf.put_slice(&held[..n]);
    held.drain(..n);
    *ready -= n;
    if held.is_empty() && held.capacity() > KEEP_CAPACITY {
        *held = Vec::new();
    }
    true
}

/// An HTTP/1.1 client connection as hyper reads it: screened (see the module documentation).
pub(crate) struct Screened<I> {
    inner: I,
    /// Bytes read from the client and not yet handed to hyper.
    held: Vec<u8>,
    /// `held[..ready]` has passed and may be handed on.
    ready: usize,
    state: State,
    pipeline: Arc<Pipeline>,
}

#[derive(Debug)]
enum State {
    /// Waiting for a complete head at `held[ready..]`; `scanned` as [`framing::find_head_end`]
    /// keeps it.
    Head {
        scanned: usize,
    },
    /// A chunked head of `head` bytes, held until its first size line is complete; `fed` body
    /// bytes after it have gone through `chunks`.
    FirstChunk {
        head: usize,
        fed: usize,
        chunks: ChunkedBody,
    },
    /// This many body bytes are still to come.
    Length(u64),
    Chunked(ChunkedBody),
    /// An upgrade or CONNECT: no more framing to follow.
    Tunnel,
    /// A refusal has been handed on in place of a head; nothing more is read.
    Refused,
    /// A body broke the rules after its head had gone on: reads fail.
    Failed(Violation),
}

impl<I> Screened<I> {
    pub(crate) fn new(inner: I, pipeline: Arc<Pipeline>) -> Self {
        Screened {
            inner,
            held: Vec::new(),
            ready: 0,
            state: State::Head { scanned: 0 },
            pipeline,
        }
    }

    /// Works through the unchecked bytes in `held` as far as they go.
    fn advance(&mut self) {
        let cap = self.pipeline.config.limits.head_buffer_cap();
        while self.ready < self.held.len() {
            let avail = &self.held[self.ready..];
            let step = match &mut self.state {
                State::Head { scanned } => match framing::find_head_end(avail, scanned) {
                    Ok(Some(end)) if end > cap => Step::Refuse(Violation::HeadTooLarge),
                    Ok(Some(end)) => match framing::check_request_head(&avail[..end]) {
                        Err(violation) => Step::Refuse(violation),
                        Ok(head) => match head.body {
                            BodyFraming::Chunked if !head.expect_continue && !head.tunnel => {
                                Step::Hold(State::FirstChunk {
                                    head: end,
                                    fed: 0,
                                    chunks: ChunkedBody::default(),
                                })
                            }
                            _ if head.tunnel => Step::Release(end, Some(State::Tunnel)),
                            BodyFraming::None => {
                                Step::Release(end, Some(State::Head { scanned: 0 }))
                            }
                            BodyFraming::Length(n) => Step::Release(end, Some(State::Length(n))),
                            BodyFraming::Chunked => {
                                Step::Release(end, Some(State::Chunked(ChunkedBody::default())))
                            }
                        },
                    },
                    Ok(None) if avail.len() > cap => Step::Refuse(Violation::HeadTooLarge),
                    Ok(None) => Step::Wait,
                    Err(violation) => Step::Refuse(violation),
                },
                State::FirstChunk { head, fed, chunks } => {
                    let body = &avail[*head + *fed..];
                    if body.is_empty() {
                        Step::Wait
                    } else {
                        match chunks.feed(body) {
                            Err(violation) => Step::Refuse(violation),
                            Ok(Some(end)) => {
                                Step::Release(*head + *fed + end, Some(State::Head { scanned: 0 }))
                            }
                            Ok(None) => {
                                *fed += body.len();
                                if chunks.first_line_done() {
                                    let chunks = std::mem::take(chunks);
                                    Step::Release(*head + *fed, Some(State::Chunked(chunks)))
                                } else {
                                    Step::Wait
                                }
                            }
                        }
                    }
                }
                State::Length(left) => {
                    let n = avail
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    Step::Release(n, (*left == 0).then_some(State::Head { scanned: 0 }))
                }
                State::Chunked(chunks) => match chunks.feed(avail) {
                    Ok(Some(end)) => Step::Release(end, Some(State::Head { scanned: 0 })),
                    Ok(None) => Step::Release(avail.len(), None),
                    Err(violation) => Step::Fail(violation),
                },
                State::Tunnel => Step::Release(avail.len(), None),
                State::Refused | State::Failed(_) => Step::Wait,
            };
            match step {
                Step::Wait => return,
                Step::Refuse(violation) => return self.refuse(violation),
                Step::Fail(violation) => return self.fail(violation),
                Step::Hold(state) => self.state = state,
                Step::Release(n, next) => {
                    self.ready += n;
                    if let Some(state) = next {
                        self.state = state;
                    }
                }
            }
        }
    }

    /// Replaces everything from the refused head on with the synthetic refusal request.
    fn refuse(&mut self, violation: Violation) {
        self.count(violation);
        self.held.truncate(self.ready);
        self.held.extend_from_slice(
            b"GET / HTTP/1.1\r\nhost: malformed.invalid\r\nconnection: close\r\n",
        );
        self.held.extend_from_slice(MALFORMED_FIELD.as_bytes());
        self.held.extend_from_slice(b": ");
        self.held.extend_from_slice(violation.as_str().as_bytes());
        self.held.extend_from_slice(b"\r\n\r\n");
        self.ready = self.held.len();
        self.state = State::Refused;
    }

    fn fail(&mut self, violation: Violation) {
        self.count(violation);
        tracing::debug!(
            reason = violation.as_str(),
            "malformed chunked request body"
        );
        self.held.truncate(self.ready);
        self.state = State::Failed(violation);
    }

    fn count(&self, violation: Violation) {
        self.pipeline.metrics.malformed[violation.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes `buf.filled()[before..]`, bytes just read into hyper's buffer, as body bytes of
    /// the current state: keeps in `buf` what belongs to the body and moves the rest (the
    /// start of the next head) into `held`.
    fn take_body(&mut self, buf: &mut ReadBuf<'_>, before: usize) {
        let new = &buf.filled()[before..];
        let keep = match &mut self.state {
            State::Length(left) => {
                let n = new.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    self.state = State::Head { scanned: 0 };
                }
                n
            }
            State::Chunked(chunks) => match chunks.feed(new) {
                Ok(Some(end)) => {
                    self.state = State::Head { scanned: 0 };
                    end
                }
                Ok(None) => new.len(),
                Err(violation) => {
                    buf.set_filled(before);
                    return self.fail(violation);
                }
            },
            _ => new.len(),
        };
        if keep < new.len() {
            self.held.extend_from_slice(&new[keep..]);
            buf.set_filled(before + keep);
            self.advance();
        }
    }
}

/// What [`Screened::advance`] does next.
enum Step {
    /// More bytes are needed.
    Wait,
    Refuse(Violation),
    Fail(Violation),
    /// Keep holding the bytes, in this state.
    Hold(State),
    /// This many more bytes may go on; then this state, if any.
    Release(usize, Option<State>),
}

impl<I: AsyncRead + Unpin> AsyncRead for Screened<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if release(&mut this.held, &mut this.ready, buf) {
                return Poll::Ready(Ok(()));
            }
            match this.state {
                // hyper closes the connection after the refusal and reads no further.
                State::Refused => return Poll::Pending,
                State::Failed(violation) => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, violation)))
                }
                _ => {}
            }
            if this.held.is_empty()
                && matches!(
                    this.state,
                    State::Length(_) | State::Chunked(_) | State::Tunnel
                )
            {
                // Body bytes go straight through, checked in place.
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                if buf.filled().len() == before {
                    return Poll::Ready(Ok(()));
                }
                this.take_body(buf, before);
                if buf.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // Held back: read in small steps, so that the body after a head is not copied
            // through `held` but read straight into hyper's buffer once the head has gone on.
            let mut step = buf.take(HOLD_READ);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut step))?;
            if step.filled().is_empty() {
                // End of stream; a head begun and not finished is dropped with it.
                return Poll::Ready(Ok(()));
            }
            this.held.extend_from_slice(step.filled());
            this.advance();
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Screened<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An origin connection as hyper's client reads it: each response head is held back until it is
/// complete and passes the same framing rules as on the fast path
/// ([`framing::check_response_fields`], at most [`framing::MAX_INTERIM`] interim responses, a
/// head within [`framing::MAX_RESPONSE_HEAD`]); the body's framing is followed so the next head
/// is found. A response that breaks them fails the read: hyper fails the exchange (502 before
/// the head went on, a cut stream after) and never reuses the connection. To know whether a
/// response may have a body or switch protocols, it notes each request's method and `Upgrade`
/// as hyper writes them.
pub(crate) struct ResponseScreen<I> {
    inner: I,
    held: Vec<u8>,
    ready: usize,
    state: ResponseState,
    /// The head of the request being written, until it is complete.
    request_head: Vec<u8>,
    request: Option<RequestSeen>,
    interim: usize,
}

#[derive(Debug, Clone, Copy)]
struct RequestSeen {
    head: bool,
    upgrade: bool,
}

impl RequestSeen {
    /// What matters of a request head (without its blank line) for framing its response.
    fn of(head: &[u8]) -> Self {
        let upgrade = head
            .split(|&b| b == b'\n')
            .skip(1)
            .any(|line| line.len() > 8 && line[..8].eq_ignore_ascii_case(b"upgrade:"));
        RequestSeen {
            head: head.starts_with(b"HEAD "),
            upgrade,
        }
    }
}

#[derive(Debug)]
enum ResponseState {
    Head,
    Length(u64),
    /// A chunked head of `head` bytes, held until its first size line is complete.
    FirstChunk {
        head: usize,
        fed: usize,
        chunks: ChunkedBody,
    },
    Chunked(ChunkedBody),
    UntilClose,
    Tunnel,
    Failed(String),
}

impl<I> ResponseScreen<I> {
    pub(crate) fn new(inner: I) -> Self {
        ResponseScreen {
            inner,
            held: Vec::new(),
            ready: 0,
            state: ResponseState::Head,
            request_head: Vec::new(),
            request: None,
            interim: 0,
        }
    }

    /// Notes the start of a request as hyper writes it.
    fn saw_written(&mut self, data: &[u8]) {
        if self.request.is_some() || !matches!(self.state, ResponseState::Head) {
            return;
        }
        // hyper writes a request head in one piece: judged in place, without a copy.
        if self.request_head.is_empty() {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                self.request = Some(RequestSeen::of(&data[..end]));
                return;
            }
        }
        let room = framing::MAX_RESPONSE_HEAD.saturating_sub(self.request_head.len());
        self.request_head
            .extend_from_slice(&data[..data.len().min(room)]);
        let Some(end) = self.request_head.windows(4).position(|w| w == b"\r\n\r\n") else {
            if room == 0 {
                // A head this large was not written by hyper's client; judge it as a GET.
                self.request = Some(RequestSeen::of(b"GET"));
            }
            return;
        };
        self.request = Some(RequestSeen::of(&self.request_head[..end]));
        self.request_head = Vec::new();
    }

    fn advance(&mut self) {
        while self.ready < self.held.len() {
            let avail = &self.held[self.ready..];
            match &mut self.state {
                ResponseState::Head => {
                    let Some(request) = self.request else {
                        self.state = ResponseState::Failed(
                            "the origin sent bytes with no request outstanding".into(),
                        );
                        return;
                    };
                    let mut fields = [httparse::EMPTY_HEADER; 100];
                    let mut response = httparse::Response::new(&mut fields);
                    let len = match response.parse(avail) {
                        Ok(httparse::Status::Complete(n)) => n,
                        Ok(httparse::Status::Partial) => {
                            if avail.len() > framing::MAX_RESPONSE_HEAD {
                                self.state = ResponseState::Failed(format!(
                                    "response head larger than {} bytes",
                                    framing::MAX_RESPONSE_HEAD
                                ));
                            }
                            return;
                        }
                        Err(e) => {
                            self.state =
                                ResponseState::Failed(format!("malformed response head: {e}"));
                            return;
                        }
                    };
                    let code = response.code.unwrap_or(0);
                    let checked =
                        framing::check_response_fields(code, request.upgrade, response.headers);
                    let (chunked, length) = match checked {
                        Ok(framing) => framing,
                        Err(e) => {
                            self.state = ResponseState::Failed(e);
                            return;
                        }
                    };
                    if chunked && code >= 200 && !request.head && code != 204 && code != 304 {
                        // Held with its first chunk-size line, so that a body broken from its
                        // start is a 502 rather than a cut stream.
                        self.state = ResponseState::FirstChunk {
                            head: len,
                            fed: 0,
                            chunks: ChunkedBody::default(),
                        };
                        continue;
                    }
                    self.ready += len;
                    if code == 101 {
                        self.state = ResponseState::Tunnel;
                    } else if (100..200).contains(&code) {
                        self.interim += 1;
                        if self.interim > framing::MAX_INTERIM {
                            self.state = ResponseState::Failed(format!(
                                "more than {} interim responses",
                                framing::MAX_INTERIM
                            ));
                            return;
                        }
                    } else if request.head || code == 204 || code == 304 || length == Some(0) {
                        self.response_done();
                    } else if chunked {
                        self.state = ResponseState::Chunked(ChunkedBody::default());
                    } else if let Some(n) = length {
                        self.state = ResponseState::Length(n);
                    } else {
                        self.state = ResponseState::UntilClose;
                    }
                }
                ResponseState::FirstChunk { head, fed, chunks } => {
                    let body = &avail[*head + *fed..];
                    if body.is_empty() {
                        return;
                    }
                    match chunks.feed(body) {
                        Err(v) => {
                            self.state =
                                ResponseState::Failed(format!("malformed chunked body: {v}"));
                            return;
                        }
                        Ok(Some(end)) => {
                            self.ready += *head + *fed + end;
                            self.response_done();
                        }
                        Ok(None) => {
                            *fed += body.len();
                            if !chunks.first_line_done() {
                                return;
                            }
                            self.ready += *head + *fed;
                            self.state = ResponseState::Chunked(std::mem::take(chunks));
                        }
                    }
                }
                ResponseState::Length(left) => {
                    let n = avail
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    self.ready += n;
                    *left -= n as u64;
                    if *left == 0 {
                        self.response_done();
                    }
                }
                ResponseState::Chunked(chunks) => match chunks.feed(avail) {
                    Ok(Some(end)) => {
                        self.ready += end;
                        self.response_done();
                    }
                    Ok(None) => self.ready = self.held.len(),
                    Err(v) => {
                        self.state = ResponseState::Failed(format!("malformed chunked body: {v}"));
                        return;
                    }
                },
                ResponseState::UntilClose | ResponseState::Tunnel => self.ready = self.held.len(),
                ResponseState::Failed(_) => return,
            }
        }
    }

    /// As [`Screened::take_body`], for a response body.
    fn take_body(&mut self, buf: &mut ReadBuf<'_>, before: usize) {
        let new = &buf.filled()[before..];
        let keep = match &mut self.state {
            ResponseState::Length(left) => {
                let n = new.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    self.response_done();
                }
                n
            }
            ResponseState::Chunked(chunks) => match chunks.feed(new) {
                Ok(Some(end)) => {
                    self.response_done();
                    end
                }
                Ok(None) => new.len(),
                Err(v) => {
                    buf.set_filled(before);
                    self.state = ResponseState::Failed(format!("malformed chunked body: {v}"));
                    return;
                }
            },
            _ => new.len(),
        };
        if keep < new.len() {
            self.held.extend_from_slice(&new[keep..]);
            buf.set_filled(before + keep);
            self.advance();
        }
    }

    fn response_done(&mut self) {
        self.state = ResponseState::Head;
        self.request = None;
        self.interim = 0;
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ResponseScreen<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if release(&mut this.held, &mut this.ready, buf) {
                return Poll::Ready(Ok(()));
            }
            if let ResponseState::Failed(reason) = &this.state {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    reason.clone(),
                )));
            }
            if this.held.is_empty()
                && matches!(
                    this.state,
                    ResponseState::Length(_)
                        | ResponseState::Chunked(_)
                        | ResponseState::UntilClose
                        | ResponseState::Tunnel
                )
            {
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                if buf.filled().len() == before {
                    return Poll::Ready(Ok(()));
                }
                this.take_body(buf, before);
                if buf.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let mut step = buf.take(HOLD_READ);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut step))?;
            if step.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.held.extend_from_slice(step.filled());
            this.advance();
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ResponseScreen<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
        self.saw_written(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for slice in bufs {
            if left == 0 {
                break;
            }
            let take = slice.len().min(left);
            self.saw_written(&slice[..take]);
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
