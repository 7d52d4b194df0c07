//! The framing screens: every byte hyper reads from an HTTP/1.1 client, and from an HTTP/1.1
//! origin, passes through one.
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
//!
//! [`ResponseScreen`] does the same for responses on hyper's origin connections, with the fast
//! path's response rules.
//!
//! Both are one reader ([`Screen`]) over a [`Framer`] that judges bytes. Bytes are read
//! straight into hyper's buffer and judged there; only what must wait (a head not yet
//! complete, a chunked head before its first size line) is copied aside, so a body is never
//! copied and hyper's reads stay as large as it asks for.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::framing::{self, BodyFraming, ChunkedBody, Violation, MALFORMED_FIELD};
use crate::pipeline::Pipeline;

/// Held-back buffers up to this size are kept between messages; larger ones are freed, so an
/// idle connection does not keep a large head's buffer.
const KEEP_CAPACITY: usize = 1024;
/// Bytes read per step while a head is held back.
const HOLD_READ: usize = 4096;

/// What a [`Framer`] makes of the bytes it has not judged yet.
pub(crate) enum Step {
    /// More bytes are needed: hold these.
    Wait,
    /// This many bytes may go on (the framer has moved on past them).
    Release(usize),
    /// Hand on these bytes in place of everything from here; nothing more is read.
    Replace(Vec<u8>),
    /// The bytes from here broke the rules: reads fail (as [`Framer::ended`] says).
    Fail,
}

/// Judges a byte stream message by message for [`Screen`].
pub(crate) trait Framer {
    /// Judges `avail`: the bytes after those already released, from the start of what is held.
    fn step(&mut self, avail: &[u8]) -> Step;
    /// What reads return once the stream was refused or failed; `None` while it goes on.
    fn ended(&self) -> Option<Poll<io::Result<()>>>;
    /// Notes bytes written the other way (a request, for a response framer).
    fn wrote(&mut self, _data: &[u8]) {}
}

/// Where a chunked head held back with its body so far stands.
enum FirstChunk {
    /// The first size line is not complete yet.
    Wait,
    /// The whole message (head and body) is this long.
    Whole(usize),
    /// The head and the first size line are this long and have passed; the rest follows.
    Begun(usize),
    Bad(Violation),
}

/// Feeds the body bytes of `avail` after a held chunked head of `head` bytes (`fed` of them
/// already seen) to `chunks`.
fn first_chunk(head: usize, fed: &mut usize, chunks: &mut ChunkedBody, avail: &[u8]) -> FirstChunk {
    let body = &avail[head + *fed..];
    if body.is_empty() {
        return FirstChunk::Wait;
    }
    match chunks.feed(body) {
        Err(violation) => FirstChunk::Bad(violation),
        Ok(Some(end)) => FirstChunk::Whole(head + *fed + end),
        Ok(None) => {
            *fed += body.len();
            if chunks.first_line_done() {
                FirstChunk::Begun(head + *fed)
            } else {
                FirstChunk::Wait
            }
        }
    }
}

/// Takes as much of `avail` as the `left` bytes of a body still to come.
fn take_length(left: &mut u64, avail: &[u8]) -> usize {
    let n = avail
        .len()
        .min(usize::try_from(*left).unwrap_or(usize::MAX));
    *left -= n as u64;
    n
}

/// A connection as hyper reads it, through a [`Framer`].
pub(crate) struct Screen<I, F> {
    inner: I,
    /// Bytes read and not yet handed to hyper.
    held: Vec<u8>,
    /// `held[..ready]` has passed and may be handed on.
    ready: usize,
    framer: F,
}

/// An HTTP/1.1 client connection as hyper's server reads it.
pub(crate) type Screened<I> = Screen<I, RequestFramer>;

/// An origin connection as hyper's client reads it: each response head is held back until it
/// is complete and passes the same framing rules as on the fast path
/// ([`framing::check_response_fields`], at most [`framing::MAX_INTERIM`] interim responses, a
/// head within [`framing::MAX_RESPONSE_HEAD`]); the body's framing is followed so the next head
/// is found. A response that breaks them fails the read: hyper fails the exchange (502 before
/// the head went on, a cut stream after) and never reuses the connection. To know whether a
/// response may have a body or switch protocols, it notes each request's method and `Upgrade`
/// as hyper writes them.
pub(crate) type ResponseScreen<I> = Screen<I, ResponseFramer>;

impl<I, F: Framer> Screen<I, F> {
    fn with(inner: I, framer: F) -> Self {
        Screen {
            inner,
            held: Vec::new(),
            ready: 0,
            framer,
        }
    }

    /// Hands `held[..ready]` (as much as `buf` takes) on to hyper; false when nothing is ready.
    fn release(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.ready == 0 {
            return false;
        }
        let n = self.ready.min(buf.remaining());
        buf.put_slice(&self.held[..n]);
        self.held.drain(..n);
        self.ready -= n;
        if self.held.is_empty() && self.held.capacity() > KEEP_CAPACITY {
            self.held = Vec::new();
        }
        true
    }

    /// Works through the unjudged bytes in `held` as far as they go.
    fn advance(&mut self) {
        while self.ready < self.held.len() {
            match self.framer.step(&self.held[self.ready..]) {
                Step::Wait => return,
                Step::Release(n) => self.ready += n,
                Step::Replace(bytes) => {
                    self.held.truncate(self.ready);
                    self.held.extend_from_slice(&bytes);
                    self.ready = self.held.len();
                    return;
                }
                Step::Fail => {
                    self.held.truncate(self.ready);
                    return;
                }
            }
        }
    }

    /// Judges `buf.filled()[before..]`, bytes just read into hyper's buffer with nothing held,
    /// where they lie: what passes stays, what must wait moves into `held`, and a refusal or
    /// failure cuts the buffer where it starts.
    fn judge_in_place(&mut self, buf: &mut ReadBuf<'_>, before: usize) {
        let mut at = before;
        while at < buf.filled().len() {
            match self.framer.step(&buf.filled()[at..]) {
                Step::Release(n) => at += n,
                Step::Wait => {
                    // The framer has taken what it can of these bytes: they wait in `held`.
                    self.held.extend_from_slice(&buf.filled()[at..]);
                    buf.set_filled(at);
                    return;
                }
                Step::Replace(bytes) => {
                    buf.set_filled(at);
                    self.held = bytes;
                    self.ready = self.held.len();
                    return;
                }
                Step::Fail => {
                    buf.set_filled(at);
                    return;
                }
            }
        }
    }
}

impl<I: AsyncRead + Unpin, F: Framer + Unpin> AsyncRead for Screen<I, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.release(buf) {
                return Poll::Ready(Ok(()));
            }
            if let Some(ended) = this.framer.ended() {
                return ended;
            }
            if this.held.is_empty() {
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                if buf.filled().len() == before {
                    return Poll::Ready(Ok(()));
                }
                this.judge_in_place(buf, before);
                if buf.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // A head is held back: read in small steps, so that the body after it is not
            // copied through `held` but read straight into hyper's buffer once it has gone on.
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

impl<I: AsyncWrite + Unpin, F: Framer + Unpin> AsyncWrite for Screen<I, F> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
        self.framer.wrote(&data[..n]);
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
            self.framer.wrote(&slice[..take]);
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

/// The request framing rules, for [`Screened`].
pub(crate) struct RequestFramer {
    state: State,
    pipeline: Arc<Pipeline>,
}

#[derive(Debug)]
enum State {
    /// Waiting for a complete head; `scanned` as [`framing::find_head_end`] keeps it.
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
        Screen::with(
            inner,
            RequestFramer {
                state: State::Head { scanned: 0 },
                pipeline,
            },
        )
    }
}

impl RequestFramer {
    /// The synthetic request hyper reads in place of a refused head.
    fn refuse(&mut self, violation: Violation) -> Step {
        self.count(violation);
        self.state = State::Refused;
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(
            b"GET / HTTP/1.1\r\nhost: malformed.invalid\r\nconnection: close\r\n",
        );
        bytes.extend_from_slice(MALFORMED_FIELD.as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(violation.as_str().as_bytes());
        bytes.extend_from_slice(b"\r\n\r\n");
        Step::Replace(bytes)
    }

    fn fail(&mut self, violation: Violation) -> Step {
        self.count(violation);
        tracing::debug!(
            reason = violation.as_str(),
            "malformed chunked request body"
        );
        self.state = State::Failed(violation);
        Step::Fail
    }

    fn count(&self, violation: Violation) {
        self.pipeline.metrics.malformed[violation.index()].fetch_add(1, Ordering::Relaxed);
    }
}

impl Framer for RequestFramer {
    fn step(&mut self, avail: &[u8]) -> Step {
        let cap = self.pipeline.config.limits.head_buffer_cap();
        match &mut self.state {
            State::Head { scanned } => match framing::find_head_end(avail, scanned) {
                Ok(Some(end)) if end > cap => self.refuse(Violation::HeadTooLarge),
                Ok(Some(end)) => match framing::check_request_head(&avail[..end]) {
                    Err(violation) => self.refuse(violation),
                    Ok(head) => {
                        if head.body == BodyFraming::Chunked
                            && !head.expect_continue
                            && !head.tunnel
                        {
                            self.state = State::FirstChunk {
                                head: end,
                                fed: 0,
                                chunks: ChunkedBody::default(),
                            };
                            return self.step(avail);
                        }
                        self.state = match head.body {
                            _ if head.tunnel => State::Tunnel,
                            BodyFraming::None | BodyFraming::Length(0) => {
                                State::Head { scanned: 0 }
                            }
                            BodyFraming::Length(n) => State::Length(n),
                            BodyFraming::Chunked => State::Chunked(ChunkedBody::default()),
                        };
                        Step::Release(end)
                    }
                },
                Ok(None) if avail.len() > cap => self.refuse(Violation::HeadTooLarge),
                Ok(None) => Step::Wait,
                Err(violation) => self.refuse(violation),
            },
            State::FirstChunk { head, fed, chunks } => match first_chunk(*head, fed, chunks, avail)
            {
                FirstChunk::Wait => Step::Wait,
                FirstChunk::Bad(violation) => self.refuse(violation),
                FirstChunk::Whole(n) => {
                    self.state = State::Head { scanned: 0 };
                    Step::Release(n)
                }
                FirstChunk::Begun(n) => {
                    self.state = State::Chunked(std::mem::take(chunks));
                    Step::Release(n)
                }
            },
            State::Length(left) => {
                let n = take_length(left, avail);
                if *left == 0 {
                    self.state = State::Head { scanned: 0 };
                }
                Step::Release(n)
            }
            State::Chunked(chunks) => match chunks.feed(avail) {
                Ok(Some(end)) => {
                    self.state = State::Head { scanned: 0 };
                    Step::Release(end)
                }
                Ok(None) => Step::Release(avail.len()),
                Err(violation) => self.fail(violation),
            },
            State::Tunnel => Step::Release(avail.len()),
            State::Refused | State::Failed(_) => Step::Wait,
        }
    }

    fn ended(&self) -> Option<Poll<io::Result<()>>> {
        match self.state {
            // hyper closes the connection after the refusal and reads no further.
            State::Refused => Some(Poll::Pending),
            State::Failed(violation) => Some(Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                violation,
            )))),
            _ => None,
        }
    }
}

/// The response framing rules, for [`ResponseScreen`].
pub(crate) struct ResponseFramer {
    state: ResponseState,
    /// The head of the request being written, until it is complete.
    request_head: Vec<u8>,
    request: Option<RequestSeen>,
    /// The body of the request being written, until it is through.
    writing: WrittenBody,
    interim: usize,
}

#[derive(Debug, Clone, Copy)]
struct RequestSeen {
    head: bool,
    upgrade: bool,
}

impl RequestSeen {
    /// What matters of a request head (without its blank line) for framing its response, and
    /// the framing of the body hyper writes after it.
    fn of(head: &[u8]) -> (Self, WrittenBody) {
        let mut upgrade = false;
        let mut body = WrittenBody::None;
        for line in head.split(|&b| b == b'\n').skip(1) {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"upgrade") {
                upgrade = true;
            } else if name.eq_ignore_ascii_case(b"content-length") {
                if let Some(n) = framing::parse_content_length(value).filter(|&n| n > 0) {
                    body = WrittenBody::Length(n);
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                body = WrittenBody::Chunked(ChunkedBody::default());
            }
        }
        let seen = RequestSeen {
            head: head.starts_with(b"HEAD "),
            upgrade,
        };
        (seen, body)
    }
}

/// The rest of a request body hyper is writing: skipped when looking for the next request
/// head, also when the origin answered before the body was through.
#[derive(Debug)]
enum WrittenBody {
    None,
    Length(u64),
    Chunked(ChunkedBody),
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
        Screen::with(
            inner,
            ResponseFramer {
                state: ResponseState::Head,
                request_head: Vec::new(),
                request: None,
                writing: WrittenBody::None,
                interim: 0,
            },
        )
    }
}

impl ResponseFramer {
    fn fail(&mut self, reason: String) -> Step {
        self.state = ResponseState::Failed(reason);
        Step::Fail
    }

    fn noted(&mut self, head: &[u8]) {
        let (seen, body) = RequestSeen::of(head);
        self.request = Some(seen);
        self.writing = body;
    }

    /// The response is over: the next bytes are the next response's head.
    fn done(&mut self) {
        self.state = ResponseState::Head;
        self.request = None;
        self.interim = 0;
    }
}

impl Framer for ResponseFramer {
    fn step(&mut self, avail: &[u8]) -> Step {
        match &mut self.state {
            ResponseState::Head => {
                let Some(request) = self.request else {
                    return self.fail("the origin sent bytes with no request outstanding".into());
                };
                let mut fields = [httparse::EMPTY_HEADER; 100];
                let mut response = httparse::Response::new(&mut fields);
                let len = match response.parse(avail) {
                    Ok(httparse::Status::Complete(n)) if n > framing::MAX_RESPONSE_HEAD => {
                        return self.fail(format!(
                            "response head larger than {} bytes",
                            framing::MAX_RESPONSE_HEAD
                        ));
                    }
                    Ok(httparse::Status::Complete(n)) => n,
                    Ok(httparse::Status::Partial) => {
                        if avail.len() > framing::MAX_RESPONSE_HEAD {
                            return self.fail(format!(
                                "response head larger than {} bytes",
                                framing::MAX_RESPONSE_HEAD
                            ));
                        }
                        return Step::Wait;
                    }
                    Err(e) => return self.fail(format!("malformed response head: {e}")),
                };
                let code = response.code.unwrap_or(0);
                let checked =
                    framing::check_response_fields(code, request.upgrade, response.headers);
                let (chunked, length) = match checked {
                    Ok(framing) => framing,
                    Err(e) => return self.fail(e),
                };
                if chunked && code >= 200 && !request.head && code != 204 && code != 304 {
                    // Held with its first chunk-size line, so that a body broken from its
                    // start is a 502 rather than a cut stream.
                    self.state = ResponseState::FirstChunk {
                        head: len,
                        fed: 0,
                        chunks: ChunkedBody::default(),
                    };
                    return self.step(avail);
                }
                if code == 101 {
                    self.state = ResponseState::Tunnel;
                } else if (100..200).contains(&code) {
                    self.interim += 1;
                    if self.interim > framing::MAX_INTERIM {
                        return self.fail(format!(
                            "more than {} interim responses",
                            framing::MAX_INTERIM
                        ));
                    }
                } else if request.head || code == 204 || code == 304 || length == Some(0) {
                    self.done();
                } else if chunked {
                    self.state = ResponseState::Chunked(ChunkedBody::default());
                } else if let Some(n) = length {
                    self.state = ResponseState::Length(n);
                } else {
                    self.state = ResponseState::UntilClose;
                }
                Step::Release(len)
            }
            ResponseState::FirstChunk { head, fed, chunks } => {
                match first_chunk(*head, fed, chunks, avail) {
                    FirstChunk::Wait => Step::Wait,
                    FirstChunk::Bad(v) => self.fail(format!("malformed chunked body: {v}")),
                    FirstChunk::Whole(n) => {
                        self.done();
                        Step::Release(n)
                    }
                    FirstChunk::Begun(n) => {
                        self.state = ResponseState::Chunked(std::mem::take(chunks));
                        Step::Release(n)
                    }
                }
            }
            ResponseState::Length(left) => {
                let n = take_length(left, avail);
                if *left == 0 {
                    self.done();
                }
                Step::Release(n)
            }
            ResponseState::Chunked(chunks) => match chunks.feed(avail) {
                Ok(Some(end)) => {
                    self.done();
                    Step::Release(end)
                }
                Ok(None) => Step::Release(avail.len()),
                Err(v) => self.fail(format!("malformed chunked body: {v}")),
            },
            ResponseState::UntilClose | ResponseState::Tunnel => Step::Release(avail.len()),
            ResponseState::Failed(_) => Step::Wait,
        }
    }

    fn ended(&self) -> Option<Poll<io::Result<()>>> {
        match &self.state {
            ResponseState::Failed(reason) => Some(Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                reason.clone(),
            )))),
            _ => None,
        }
    }

    /// Notes each request as hyper writes it: its head, then its body to skip.
    fn wrote(&mut self, data: &[u8]) {
        let data = match &mut self.writing {
            WrittenBody::None => data,
            WrittenBody::Length(left) => {
                let n = take_length(left, data);
                if *left == 0 {
                    self.writing = WrittenBody::None;
                }
                &data[n..]
            }
            WrittenBody::Chunked(chunks) => match chunks.feed(data) {
                Ok(Some(end)) => {
                    self.writing = WrittenBody::None;
                    &data[end..]
                }
                Ok(None) => return,
                Err(_) => {
                    // Not hyper's framing: stop following it.
                    self.writing = WrittenBody::None;
                    return;
                }
            },
        };
        if data.is_empty() || self.request.is_some() || !matches!(self.state, ResponseState::Head) {
            return;
        }
        // hyper writes a request head in one piece: judged in place, without a copy.
        if self.request_head.is_empty() {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                self.noted(&data[..end]);
                return self.wrote(&data[end + 4..]);
            }
        }
        let room = framing::MAX_RESPONSE_HEAD.saturating_sub(self.request_head.len());
        let taken = data.len().min(room);
        self.request_head.extend_from_slice(&data[..taken]);
        let Some(end) = self.request_head.windows(4).position(|w| w == b"\r\n\r\n") else {
            if room == 0 {
                // A head this large was not written by hyper's client; judge it as a GET.
                self.noted(b"GET");
                self.request_head = Vec::new();
            }
            return;
        };
        let head = std::mem::take(&mut self.request_head);
        self.noted(&head[..end]);
        self.wrote(&head[end + 4..]);
        self.wrote(&data[taken..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An origin connection in memory: each read gets the next of `input` (as much as fits),
    /// writes go to `output`.
    struct Pipe {
        input: std::collections::VecDeque<Vec<u8>>,
        output: Vec<u8>,
    }

    impl AsyncRead for Pipe {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut next) = self.input.pop_front() {
                let n = next.len().min(buf.remaining());
                buf.put_slice(&next[..n]);
                if n < next.len() {
                    self.input.push_front(next.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Pipe {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.output).poll_write(cx, data)
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn origin(response: Vec<u8>) -> ResponseScreen<Pipe> {
        origin_reads(vec![response])
    }

    fn origin_reads(reads: Vec<Vec<u8>>) -> ResponseScreen<Pipe> {
        ResponseScreen::new(Pipe {
            input: reads.into(),
            output: Vec::new(),
        })
    }

    #[tokio::test]
    async fn a_head_and_its_body_are_handed_on_in_one_read_as_large_as_asked() {
        let mut response = b"HTTP/1.1 200 OK\r\ncontent-length: 65536\r\n\r\n".to_vec();
        let head = response.len();
        response.resize(head + 65536, b'x');
        let mut screen = origin(response.clone());
        screen
            .write_all(b"GET / HTTP/1.1\r\nhost: o\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 256 * 1024];
        let n = screen.read(&mut buf).await.unwrap();
        // Judged in hyper's buffer: not handed on in small held-back steps.
        assert_eq!(n, response.len());
        assert_eq!(&buf[..n], &response[..]);
        assert!(screen.held.capacity() == 0, "nothing was copied aside");
        assert_eq!(screen.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn bytes_after_a_body_fail_the_next_read_and_are_never_handed_on() {
        let mut screen = origin(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n".to_vec(),
        );
        screen
            .write_all(b"GET / HTTP/1.1\r\nhost: o\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 4096];
        let n = screen.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        let err = screen.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("no request outstanding"), "{err}");
    }

    #[tokio::test]
    async fn a_chunked_head_is_held_until_its_first_size_line_then_goes_on_whole() {
        let body = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let mut screen = origin(body.to_vec());
        screen
            .write_all(b"GET / HTTP/1.1\r\nhost: o\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0; 4096];
        loop {
            let n = screen.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, body);
        // And a broken first size line is a failure before any byte of the head goes on.
        let mut screen =
            origin(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec());
        screen
            .write_all(b"GET / HTTP/1.1\r\nhost: o\r\n\r\n")
            .await
            .unwrap();
        let err = screen.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("malformed chunked body"), "{err}");
    }

    /// An origin that answers before the request body is through: the rest of the body is
    /// not taken for the next request's head, so the next response is judged against the
    /// right request (here a HEAD, whose response has no body).
    #[tokio::test]
    async fn a_body_written_after_an_early_answer_is_not_taken_for_the_next_head() {
        let mut screen = origin_reads(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nHTTP/1.1 200 OK\r\n\r\n".to_vec(),
        ]);
        screen
            .write_all(b"POST / HTTP/1.1\r\nhost: o\r\ncontent-length: 10\r\n\r\nhello")
            .await
            .unwrap();
        let mut buf = vec![0; 4096];
        let n = screen.read(&mut buf).await.unwrap();
        assert!(buf[..n].ends_with(b"ok"));
        screen.write_all(b"world").await.unwrap();
        screen
            .write_all(b"HEAD / HTTP/1.1\r\nhost: o\r\n\r\n")
            .await
            .unwrap();
        let n = screen.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n");
        // A HEAD response ends with its head: what follows is answered to no request.
        let err = screen.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("no request outstanding"), "{err}");
        assert_eq!(
            screen.inner.output.len(),
            b"POST / HTTP/1.1\r\nhost: o\r\ncontent-length: 10\r\n\r\nhelloworld".len()
                + b"HEAD / HTTP/1.1\r\nhost: o\r\n\r\n".len()
        );
    }

    /// A chunked request body is followed to its end the same way.
    #[tokio::test]
    async fn a_chunked_body_written_after_an_early_answer_is_skipped_too() {
        let mut screen = origin_reads(vec![
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(),
        ]);
        screen
            .write_all(b"POST / HTTP/1.1\r\nhost: o\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
            .await
            .unwrap();
        let mut buf = vec![0; 4096];
        let n = screen.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 204 No Content\r\n\r\n");
        screen.write_all(b"lo\r\n0\r\n\r\n").await.unwrap();
        screen
            .write_all(b"HEAD / HTTP/1.1\r\nhost: o\r\n\r\n")
            .await
            .unwrap();
        let n = screen.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n");
        assert!(matches!(screen.framer.state, ResponseState::Head));
        assert!(screen.framer.request.is_none());
    }

    /// A head over the limit fails whether it arrives in one read or trickles in.
    #[tokio::test]
    async fn a_response_head_over_the_limit_fails_also_when_it_arrives_whole() {
        let mut head = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        head.resize(framing::MAX_RESPONSE_HEAD + 100, b'a');
        head.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
        let mut screen = origin(head);
        screen
            .write_all(b"GET / HTTP/1.1\r\nhost: o\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 256 * 1024];
        let err = screen.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }
}
