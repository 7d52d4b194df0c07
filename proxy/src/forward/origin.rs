//! One attempt at one endpoint: the request out (head, then the body as the client sends
//! it), the response head back, and, once it is here, the answer relayed to the client. For
//! HTTP/1.1 origins (cleartext or TLS) over this worker's pooled connections, for HTTP/2
//! origins (h2c or TLS) over this worker's multiplexed connection.
//!
//! Until a response head arrives nothing has reached the client, and a failure goes back to
//! the retry driver as a [`Failure`]; after it, a failure cuts the client's response (its
//! connection closes, or its stream is reset), and the record says the exchange did not
//! complete.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::failure::{Failure, Step};
use super::headers::{self, FieldSink};
use super::retry::{Attempt, Exchange};
use crate::config::UpstreamProtocol;
use crate::http::h1::chunk_line;
use crate::http::io::{self as conn_io, Deadline, PooledBuf};
use crate::http::{BodyError, ClientSide, Fields, RequestBody, ResponseBody, Served};
use crate::upstream::connect::OriginIo;
use crate::upstream::h1::{self as origin_h1, BodyEnd, Framing, Parsed};
use crate::upstream::{pool, Endpoint};

/// The client's response head as a [`FieldSink`].
struct ClientHead<'c, C>(&'c mut C);

impl<C: ClientSide> FieldSink for ClientHead<'_, C> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.0.head_field(name, value);
    }
}

/// Bytes of origin response watched for while a request body is still going out.
const WATCH: usize = 2048;

/// How sending a request body ended.
enum Pumped {
    /// Every byte went out.
    Whole,
    /// The origin began to answer (or closed) before the body was whole: its bytes are in the
    /// response buffer, and no more of the body goes.
    Answered,
}

impl<C: ClientSide> Exchange<'_, C> {
    /// One attempt at `endpoint`, in the protocol of the pool.
    pub(crate) async fn attempt(&mut self, endpoint: &Endpoint) -> Attempt {
        match self.pool.protocol {
            UpstreamProtocol::Http1 => self.attempt_h1(endpoint).await,
            // Boxed: its state (HTTP/2 streams, flow control) would otherwise make every
            // request's future larger, and the HTTP/1.1 path is the common one.
            UpstreamProtocol::H2c => Box::pin(self.attempt_h2(endpoint)).await,
        }
    }

    fn stall(&self) -> std::time::Duration {
        self.engine.config.limits.idle_timeout
    }

    /// Whether no body will follow the response head (the request was HEAD, or the status
    /// forbids one): then its `Content-Length` only informs.
    fn bodiless_answer(&self, status: u16) -> bool {
        self.head.method == "HEAD" || status == 204 || status == 304
    }

    /// Counts request body bytes against the route's limit and into the record.
    fn count_in(&mut self, n: usize) -> Result<(), Failure> {
        self.body_read += n as u64;
        if self.body_read > self.pool.max_body_bytes {
            return Err(Failure::client(BodyError::TooLarge));
        }
        if let Some(entry) = self.audit.as_mut() {
            entry.add_bytes_in(n as u64);
        }
        Ok(())
    }

    /// The response is the origin's from here on: its record and the metrics say so.
    fn commit(&mut self, status: u16) {
        let region = self.pool.region;
        if let Some(entry) = self.audit.as_mut() {
            entry.status(status);
            entry.upstream(region, self.endpoint);
        }
        self.engine
            .metrics
            .record(None, Some(region), self.started.elapsed());
    }

    /// Counts relayed response bytes into the record, and queues the record when they are the
    /// last: before they are written, so a client never holds a whole response whose record is
    /// not queued.
    fn count_out(&mut self, n: usize, last: bool) {
        if let Some(entry) = self.audit.as_mut() {
            entry.add_bytes_out(n as u64);
        }
        if last {
            if let Some(entry) = self.audit.take() {
                entry.complete();
            }
        }
    }

    /// The request head for HTTP/1.1 origins: request line, `Host` (the authority the request
    /// named, else the endpoint's), the fields by the header rules, the body's framing.
    fn write_h1_head(&mut self, endpoint: &Endpoint) {
        let head = self.head;
        let out = self.h1_head.ensure();
        out.clear();
        out.extend_from_slice(head.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(head.path.as_bytes());
        if let Some(query) = head.query {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        let host = head.authority.unwrap_or(&endpoint.target.authority);
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
        headers::request_fields(head.fields, self.forwarding, out);
        match head.body {
            RequestBody::None => {}
            RequestBody::Length(n) | RequestBody::Frames(Some(n)) => {
                out.extend_from_slice(b"content-length: ");
                let mut digits = itoa::Buffer::new();
                out.extend_from_slice(digits.format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            RequestBody::Chunked | RequestBody::Frames(None) => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
        }
        out.extend_from_slice(b"\r\n");
    }

    async fn attempt_h1(&mut self, endpoint: &Endpoint) -> Attempt {
        let limits = &self.engine.config.limits;
        let target = &endpoint.target;
        let stall = self.stall();
        if self.h1_head.0.is_empty() || self.head.authority.is_none() {
            self.write_h1_head(endpoint);
        }
        let idempotent = self.head.is_idempotent();
        let bodiless = self.head.body.is_none();
        let mut rbuf = PooledBuf::empty();
        // A pooled connection can turn out closed by the origin (many close idle connections
        // after a while); the request then goes out again on another, as long as the origin
        // cannot have acted on it. Only a new connection's failure counts as the endpoint's.
        let mut stale = 0;
        loop {
            let pooled = if stale < 4 {
                pool::take_http1(target.key)
            } else {
                None
            };
            let (mut conn, reused) = match pooled {
                Some(conn) => (conn, true),
                // Boxed: connecting is the rare path, and its state would otherwise make every
                // request's future larger.
                None => match Box::pin(target.connect()).await {
                    Ok(io) => (pool::Http1::new(io), false),
                    Err(e) => return Attempt::Failed(Failure::connect(e)),
                },
            };
            let pool::Http1 { io, deadline } = &mut conn;
            let sent = conn_io::write_all(io, &mut [&self.h1_head.0], deadline, stall).await;
            if let Err(e) = sent {
                if reused {
                    stale += 1;
                    continue;
                }
                return Attempt::Failed(Failure::new(
                    Step::Write,
                    true,
                    format!("sending the request: {e}"),
                ));
            }
            let rbuf = rbuf.ensure();
            rbuf.clear();
            // An origin that answers before the body's end may not have read the rest: the
            // connection cannot carry another request.
            let mut body_cut = false;
            if !bodiless {
                if self.client.send_continue().await.is_err() {
                    return Attempt::Failed(Failure::client(BodyError::Gone));
                }
                match self.pump_h1(io, rbuf, deadline).await {
                    Ok(Pumped::Whole) => {}
                    Ok(Pumped::Answered) => body_cut = true,
                    Err(failure) => return Attempt::Failed(failure),
                }
            }
            if let Err(e) = conn_io::flush(io, deadline, stall).await {
                return Attempt::Failed(Failure::new(
                    Step::Write,
                    true,
                    format!("sending the request: {e}"),
                ));
            }
            // `upstream_response_timeout` runs from when the request was sent in full: a long
            // upload that keeps moving is not a slow origin.
            deadline.after(limits.upstream_response_timeout);
            let head_request = self.head.method == "HEAD";
            let upgrade = self.forwarding.upgrade;
            // The response head, written to the client as it is read.
            let (status, framing, reusable, body_start) = loop {
                if !rbuf.is_empty() {
                    let mut fields = [httparse::EMPTY_HEADER; origin_h1::MAX_FIELDS];
                    match origin_h1::parse_response(rbuf, &mut fields, head_request, upgrade) {
                        Ok(Parsed::Final(head)) => {
                            let keep_length = self.bodiless_answer(head.status);
                            self.client.start_head(head.status, head.reason);
                            headers::response_fields(
                                Fields::Raw(head.fields),
                                head.status,
                                keep_length,
                                self.request_id,
                                &mut ClientHead(self.client),
                            );
                            let reusable = head.reusable && !body_cut;
                            break (head.status, head.framing, reusable, head.body_start);
                        }
                        Ok(Parsed::Partial) => {}
                        Err(detail) => {
                            return Attempt::Failed(Failure::new(Step::Framing, true, detail))
                        }
                    }
                }
                match conn_io::read_some(io, rbuf, deadline).await {
                    Ok(0) if rbuf.is_empty() && reused && bodiless && idempotent => {
                        // Closed as it was taken, before a byte of answer: not the endpoint's
                        // failure, and the request can go out again.
                        stale += 1;
                        break (0, Framing::None, false, 0);
                    }
                    Ok(0) if rbuf.is_empty() => {
                        return Attempt::Failed(Failure::new(
                            Step::ReadHead,
                            true,
                            "connection closed before the response head",
                        ))
                    }
                    Ok(0) => {
                        return Attempt::Failed(Failure::new(
                            Step::Framing,
                            true,
                            "connection closed inside the response head",
                        ))
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        return Attempt::Failed(Failure::new(
                            Step::Timeout,
                            true,
                            "no response in time",
                        ))
                    }
                    Err(e) if rbuf.is_empty() && reused && bodiless && idempotent => {
                        tracing::debug!("pooled connection failed before the response: {e}");
                        stale += 1;
                        break (0, Framing::None, false, 0);
                    }
                    Err(e) => {
                        return Attempt::Failed(Failure::new(
                            Step::ReadHead,
                            true,
                            format!("reading the response: {e}"),
                        ))
                    }
                }
            };
            if status == 0 {
                continue;
            }
            return self
                .relay_h1(
                    conn, target.key, rbuf, status, framing, reusable, body_start,
                )
                .await;
        }
    }

    /// Sends the request body to an HTTP/1.1 origin as the client sends it, by length or in
    /// chunks, watching the origin: once it begins to answer (or closes), no more goes.
    async fn pump_h1(
        &mut self,
        io: &mut OriginIo,
        rbuf: &mut Vec<u8>,
        deadline: &mut Deadline,
    ) -> Result<Pumped, Failure> {
        let chunked = self.head.body.length().is_none();
        let stall = self.stall();
        loop {
            let next = {
                let news = io.read_buf(rbuf);
                let piece = self.client.read_body();
                tokio::select! {
                    biased;
                    news = news => Err(news),
                    piece = piece => Ok(piece),
                }
            };
            let piece = match next {
                Err(Ok(0)) => {
                    return Err(Failure::new(
                        Step::ReadHead,
                        true,
                        "the origin closed the connection during the request body",
                    ))
                }
                Err(Ok(_)) => {
                    if skip_interim(rbuf) {
                        continue;
                    }
                    return Ok(self.answered(chunked));
                }
                Err(Err(e)) => {
                    return Err(Failure::new(
                        Step::Write,
                        true,
                        format!("sending the request body: {e}"),
                    ))
                }
                Ok(Err(error)) => return Err(Failure::client(error)),
                Ok(Ok(None)) => {
                    if chunked {
                        let mut last: [&[u8]; 1] = [b"0\r\n\r\n"];
                        let written = loop {
                            match write_watching(io, &mut last, rbuf, deadline, stall).await {
                                Ok(Watched::Answered) if skip_interim(rbuf) => continue,
                                other => break other,
                            }
                        };
                        return match written {
                            Ok(Watched::Written) => Ok(Pumped::Whole),
                            // Answered before the last chunk went: the origin's view of the
                            // body is unfinished.
                            Ok(Watched::Answered) => Ok(Pumped::Answered),
                            Err(e) => Err(Failure::new(
                                Step::Write,
                                true,
                                format!("sending the request body: {e}"),
                            )),
                        };
                    }
                    return Ok(Pumped::Whole);
                }
                Ok(Ok(Some(data))) => data,
            };
            // `piece` borrows the client; what follows touches other fields only.
            let n = piece.len();
            if n == 0 {
                // An empty piece (an HTTP/2 client's empty DATA frame) carries nothing, and as
                // a chunk it would be the body's end.
                continue;
            }
            self.body_read += n as u64;
            if self.body_read > self.pool.max_body_bytes {
                return Err(Failure::client(BodyError::TooLarge));
            }
            if let Some(entry) = self.audit.as_mut() {
                entry.add_bytes_in(n as u64);
            }
            let mut line = [0u8; 20];
            let mut framed: [&[u8]; 3] = if chunked {
                [chunk_line(n, &mut line), piece, b"\r\n"]
            } else {
                [piece, &[], &[]]
            };
            // An interim answer interrupts the write, not the piece: the rest of it still goes.
            let written = loop {
                match write_watching(io, &mut framed, rbuf, deadline, stall).await {
                    Ok(Watched::Answered) if skip_interim(rbuf) => continue,
                    other => break other,
                }
            };
            match written {
                Ok(Watched::Written) => {}
                // Part of this piece is still unsent: the body is unfinished, whatever was
                // counted.
                Ok(Watched::Answered) => return Ok(Pumped::Answered),
                Err(e) => {
                    return Err(Failure::new(
                        Step::Write,
                        true,
                        format!("sending the request body: {e}"),
                    ))
                }
            }
        }
    }

    /// What an origin's answer between two pieces of the body means (every piece before it
    /// went whole): a body by length whose last byte has gone was sent whole (the origin
    /// answering the moment it has it is the common case); otherwise the origin answered early
    /// and may not read the rest.
    fn answered(&self, chunked: bool) -> Pumped {
        if !chunked && self.head.body.length() == Some(self.body_read) {
            Pumped::Whole
        } else {
            Pumped::Answered
        }
    }

    /// Relays an HTTP/1.1 origin's response (its head already given to the client) and its
    /// body; the connection goes back to the pool when the body ended cleanly.
    #[allow(clippy::too_many_arguments)]
    async fn relay_h1(
        &mut self,
        mut conn: pool::Http1,
        key: crate::upstream::connect::EndpointKey,
        rbuf: &mut Vec<u8>,
        status: u16,
        framing: Framing,
        mut reusable: bool,
        body_start: usize,
    ) -> Attempt {
        self.commit(status);
        if status == 101 {
            // The protocol switches: the head goes, then bytes flow both ways.
            self.count_out(0, true);
            if self
                .client
                .send_head(ResponseBody::None, &[], true)
                .await
                .is_err()
            {
                return Attempt::Done(Served::Close);
            }
            let from_origin = &rbuf[body_start..];
            self.client.tunnel(&mut conn.io, from_origin).await;
            return Attempt::Done(Served::Tunneled);
        }
        let raw = framing == Framing::Chunked && self.client.takes_chunked();
        let kind = match framing {
            Framing::None => ResponseBody::None,
            Framing::Length(n) => ResponseBody::Length(n),
            Framing::Chunked if raw => ResponseBody::RawChunked,
            Framing::Chunked => ResponseBody::Stream,
            Framing::UntilClose => ResponseBody::UntilClose,
        };
        let mut body = BodyEnd::new(framing, raw);
        let mut done = body.is_empty();
        let mut head_sent = false;
        let mut pos = body_start;
        let stall = self.stall();
        loop {
            // Everything read so far, one run at a time.
            while !done && pos < rbuf.len() {
                let taken = match body.take(&rbuf[pos..]) {
                    Ok(taken) => taken,
                    Err(violation) if !head_sent => {
                        return Attempt::Failed(Failure::new(
                            Step::Framing,
                            true,
                            format!("malformed chunked body: {violation}"),
                        ))
                    }
                    Err(_) => return Attempt::Done(Served::Close),
                };
                let out = pos + taken.out.start..pos + taken.out.end;
                pos += taken.consumed;
                done = taken.end;
                if done {
                    // Bytes after the end would be read as the next response.
                    reusable &= pos == rbuf.len();
                }
                self.count_out(out.len(), done);
                let sent = if head_sent {
                    self.client.send_data(&rbuf[out], done).await
                } else {
                    head_sent = true;
                    self.client.send_head(kind, &rbuf[out], done).await
                };
                if sent.is_err() {
                    return Attempt::Done(Served::Close);
                }
            }
            if !head_sent {
                head_sent = true;
                self.count_out(0, done);
                if self.client.send_head(kind, &[], done).await.is_err() {
                    return Attempt::Done(Served::Close);
                }
            }
            if done {
                break;
            }
            rbuf.clear();
            pos = 0;
            if rbuf.capacity() < conn_io::BODY_CHUNK {
                rbuf.reserve(conn_io::BODY_CHUNK);
            }
            match conn_io::read_stalling(&mut conn.io, rbuf, &mut conn.deadline, stall).await {
                Ok(n) if n > 0 => {}
                // The origin closed: the end of a body delimited by close, a cut in any other.
                Ok(_) if framing == Framing::UntilClose => {
                    self.count_out(0, true);
                    if self.client.send_end(None).await.is_err() {
                        return Attempt::Done(Served::Close);
                    }
                    return Attempt::Done(Served::Close);
                }
                _ => return Attempt::Done(Served::Close),
            }
        }
        if reusable {
            pool::give_back_http1(key, conn);
        }
        Attempt::Done(Served::KeepAlive)
    }

    async fn attempt_h2(&mut self, endpoint: &Endpoint) -> Attempt {
        let limits = &self.engine.config.limits;
        let target = &endpoint.target;
        let bodiless = self.head.body.is_none();
        // One new connection at most when this worker's turns out closed.
        let mut stale = 0;
        loop {
            let pooled = if stale == 0 {
                pool::h2_sender(target.key)
            } else {
                None
            };
            let (sender, fresh) = match pooled {
                Some(sender) => (sender, false),
                None => match Box::pin(crate::upstream::h2::connect(target)).await {
                    Ok(sender) => {
                        pool::keep_h2(target.key, sender.clone());
                        (sender, true)
                    }
                    Err(e) => return Attempt::Failed(Failure::connect(e)),
                },
            };
            let mut sender = match sender.ready().await {
                Ok(sender) => sender,
                Err(e) => {
                    pool::drop_h2(target.key);
                    if !fresh && stale == 0 {
                        stale += 1;
                        continue;
                    }
                    return Attempt::Failed(Failure::new(
                        Step::Connect,
                        false,
                        format!("the HTTP/2 connection closed: {e}"),
                    ));
                }
            };
            let request = match self.h2_request(endpoint) {
                Ok(request) => request,
                Err(detail) => return Attempt::Failed(Failure::new(Step::Write, false, detail)),
            };
            let (response, mut stream) = match sender.send_request(request, bodiless) {
                Ok(sent) => sent,
                Err(e) => {
                    pool::drop_h2(target.key);
                    if !fresh && stale == 0 {
                        stale += 1;
                        continue;
                    }
                    return Attempt::Failed(Failure::new(
                        Step::Write,
                        false,
                        format!("sending the request: {e}"),
                    ));
                }
            };
            let mut response = std::pin::pin!(response);
            if !bodiless {
                if self.client.send_continue().await.is_err() {
                    return Attempt::Failed(Failure::client(BodyError::Gone));
                }
                let early = {
                    let pump = self.pump_h2(&mut stream);
                    tokio::select! {
                        biased;
                        answered = response.as_mut() => Some(answered),
                        pumped = pump => match pumped {
                            Ok(()) => None,
                            Err(failure) => return Attempt::Failed(failure),
                        },
                    }
                };
                if let Some(answered) = early {
                    return self.relay_answer(answered, target.key).await;
                }
            }
            let answered =
                tokio::time::timeout(limits.upstream_response_timeout, response.as_mut()).await;
            return match answered {
                Ok(answered) => self.relay_answer(answered, target.key).await,
                Err(_) => Attempt::Failed(Failure::new(Step::Timeout, true, "no response in time")),
            };
        }
    }

    /// The origin's answer to an HTTP/2 request: relayed, or the failure it is.
    async fn relay_answer(
        &mut self,
        answered: Result<http::Response<h2::RecvStream>, h2::Error>,
        key: crate::upstream::connect::EndpointKey,
    ) -> Attempt {
        match answered {
            Ok(response) => self.relay_h2(response).await,
            // A stream the origin refused was not processed: safe anywhere.
            Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => Attempt::Failed(
                Failure::new(Step::ReadHead, false, format!("stream refused: {e}")),
            ),
            // The origin's GOAWAY reaches only the streams above its last processed one
            // (RFC 9113 section 6.8): this one was not processed either.
            Err(e) if e.is_go_away() && e.is_remote() => {
                pool::drop_h2(key);
                Attempt::Failed(Failure::new(
                    Step::ReadHead,
                    false,
                    format!("the origin went away before processing the request: {e}"),
                ))
            }
            Err(e) => {
                if e.is_io() || e.is_go_away() {
                    pool::drop_h2(key);
                }
                Attempt::Failed(Failure::new(
                    Step::ReadHead,
                    true,
                    format!("reading the response: {e}"),
                ))
            }
        }
    }

    /// The request for an HTTP/2 origin: the client's authority as `:authority` (else the
    /// endpoint's), the fields by the header rules.
    fn h2_request(&self, endpoint: &Endpoint) -> Result<http::Request<()>, String> {
        let head = self.head;
        let scheme = if endpoint.target.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        let authority = head.authority.unwrap_or(&endpoint.target.authority);
        let path_and_query = match head.query {
            Some(query) => format!("{}?{query}", head.path),
            None => head.path.to_owned(),
        };
        let uri = http::Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| format!("the request cannot be written in HTTP/2: {e}"))?;
        let method = http::Method::from_bytes(head.method.as_bytes())
            .map_err(|e| format!("the request cannot be written in HTTP/2: {e}"))?;
        let mut request = http::Request::new(());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = http::Version::HTTP_2;
        let fields = request.headers_mut();
        headers::request_fields(head.fields, self.forwarding, fields);
        if let Some(n) = head.body.length().filter(|&n| n > 0) {
            fields.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
        }
        Ok(request)
    }

    /// Sends the request body on an HTTP/2 stream as the client sends it.
    async fn pump_h2(&mut self, stream: &mut h2::SendStream<Bytes>) -> Result<(), Failure> {
        let stall = self.stall();
        loop {
            let piece = match self.client.read_body().await {
                Ok(Some(piece)) => Bytes::copy_from_slice(piece),
                Ok(None) => {
                    return stream.send_data(Bytes::new(), true).map_err(|e| {
                        Failure::new(Step::Write, true, format!("sending the request body: {e}"))
                    })
                }
                Err(error) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    return Err(Failure::client(error));
                }
            };
            if let Err(failure) = self.count_in(piece.len()) {
                stream.send_reset(h2::Reason::CANCEL);
                return Err(failure);
            }
            if let Err(e) = send_flow(stream, piece, stall).await {
                return Err(Failure::new(
                    Step::Write,
                    true,
                    format!("sending the request body: {e}"),
                ));
            }
        }
    }

    /// Relays an HTTP/2 origin's response: head, data as it arrives, trailers.
    async fn relay_h2(&mut self, response: http::Response<h2::RecvStream>) -> Attempt {
        let (parts, mut body) = response.into_parts();
        let status = parts.status.as_u16();
        let keep_length = self.bodiless_answer(status);
        self.commit(status);
        self.client
            .start_head(status, parts.status.canonical_reason().unwrap_or(""));
        headers::response_fields(
            Fields::Map(&parts.headers),
            status,
            keep_length,
            self.request_id,
            &mut ClientHead(self.client),
        );
        let length = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let kind = if keep_length {
            ResponseBody::None
        } else if let Some(n) = length {
            ResponseBody::Length(n)
        } else if body.is_end_stream() {
            ResponseBody::Length(0)
        } else {
            ResponseBody::Stream
        };
        if kind == ResponseBody::None || body.is_end_stream() {
            self.count_out(0, true);
            return match self.client.send_head(kind, &[], true).await {
                Ok(()) => Attempt::Done(Served::KeepAlive),
                Err(_) => Attempt::Done(Served::Close),
            };
        }
        // The first data goes with the head when it is already here.
        let mut first = body.data().now_or_never();
        let mut head_sent = false;
        let stall = self.stall();
        loop {
            let next = match first.take() {
                Some(next) => next,
                None if !head_sent => {
                    head_sent = true;
                    if self.client.send_head(kind, &[], false).await.is_err() {
                        return Attempt::Done(Served::Close);
                    }
                    continue;
                }
                None => match tokio::time::timeout(stall, body.data()).await {
                    Ok(next) => next,
                    Err(_) => return Attempt::Done(Served::Close),
                },
            };
            match next {
                Some(Ok(data)) => {
                    let _ = body.flow_control().release_capacity(data.len());
                    let end = body.is_end_stream();
                    self.count_out(data.len(), end);
                    let sent = if head_sent {
                        self.client.send_data(&data, end).await
                    } else {
                        head_sent = true;
                        self.client.send_head(kind, &data, end).await
                    };
                    if sent.is_err() {
                        return Attempt::Done(Served::Close);
                    }
                    if end {
                        return Attempt::Done(Served::KeepAlive);
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!("origin response body failed: {e}");
                    return Attempt::Done(Served::Close);
                }
                None => break,
            }
        }
        if !head_sent && self.client.send_head(kind, &[], false).await.is_err() {
            return Attempt::Done(Served::Close);
        }
        let trailers = match tokio::time::timeout(stall, body.trailers()).await {
            Ok(Ok(trailers)) => trailers,
            _ => return Attempt::Done(Served::Close),
        };
        self.count_out(0, true);
        match self.client.send_end(trailers).await {
            Ok(()) => Attempt::Done(Served::KeepAlive),
            Err(_) => Attempt::Done(Served::Close),
        }
    }
}

/// Sends `data` on an origin's HTTP/2 stream as its flow-control window allows.
async fn send_flow(
    stream: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    stall: std::time::Duration,
) -> io::Result<()> {
    stream.reserve_capacity(data.len());
    while !data.is_empty() {
        let granted =
            match tokio::time::timeout(stall, poll_fn(|cx| stream.poll_capacity(cx))).await {
                Ok(Some(Ok(n))) => n,
                Ok(Some(Err(e))) => return Err(io::Error::other(e)),
                Ok(None) => return Err(io::Error::other("the origin closed the stream")),
                Err(_) => return Err(conn_io::timed_out("the origin stopped reading")),
            };
        if granted == 0 {
            continue;
        }
        let piece = data.split_to(granted.min(data.len()));
        stream.send_data(piece, false).map_err(io::Error::other)?;
    }
    Ok(())
}

/// How a watched write ended.
enum Watched {
    Written,
    /// The origin sent bytes (now in the response buffer) before taking them all.
    Answered,
}

/// Writes `parts` to an origin while watching it: an origin that begins to answer (or closes)
/// before taking every byte ends the write, so that a request body it will not read cannot
/// stall the exchange.
async fn write_watching(
    io: &mut OriginIo,
    parts: &mut [&[u8]],
    rbuf: &mut Vec<u8>,
    deadline: &mut Deadline,
    stall: std::time::Duration,
) -> io::Result<Watched> {
    let mut first = 0;
    loop {
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
        if first == parts.len() {
            return Ok(Watched::Written);
        }
        let live = &parts[first..];
        let step = poll_fn(|cx| {
            let start = rbuf.len();
            rbuf.resize(start + WATCH, 0);
            let mut read = ReadBuf::new(&mut rbuf[start..]);
            let polled = Pin::new(&mut *io).poll_read(cx, &mut read);
            let got = read.filled().len();
            rbuf.truncate(start + got);
            match polled {
                Poll::Ready(Ok(())) if got == 0 => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the origin closed the connection",
                    )))
                }
                Poll::Ready(Ok(())) => return Poll::Ready(Ok(None)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            let slices = [
                io::IoSlice::new(live.first().copied().unwrap_or_default()),
                io::IoSlice::new(live.get(1).copied().unwrap_or_default()),
                io::IoSlice::new(live.get(2).copied().unwrap_or_default()),
            ];
            Pin::new(&mut *io)
                .poll_write_vectored(cx, &slices[..live.len().min(3)])
                .map(|written| written.map(Some))
        });
        let written = match deadline.within(stall, step).await {
            Some(Ok(Some(n))) => n,
            Some(Ok(None)) => return Ok(Watched::Answered),
            Some(Err(e)) => return Err(e),
            None => return Err(conn_io::timed_out("the origin stopped reading")),
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let part = &mut parts[first];
            let n = part.len().min(left);
            *part = &part[n..];
            left -= n;
            if part.is_empty() {
                first += 1;
            }
        }
    }
}

/// When the response buffer holds nothing but complete interim (`1xx`, not `101`) responses,
/// drops them and says so: an origin may say `100 Continue` unasked while the body goes on.
fn skip_interim(rbuf: &mut Vec<u8>) -> bool {
    let mut start = 0;
    while start < rbuf.len() {
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut fields);
        match response.parse(&rbuf[start..]) {
            Ok(httparse::Status::Complete(n))
                if response
                    .code
                    .is_some_and(|c| (100..200).contains(&c) && c != 101) =>
            {
                start += n
            }
            // The start of what can still be an interim head, cut by the read: drop what came
            // before it and go on; the rest of it comes with a later read.
            Ok(httparse::Status::Partial) if may_be_interim(&rbuf[start..]) => {
                rbuf.drain(..start);
                return true;
            }
            _ => return false,
        }
    }
    rbuf.clear();
    true
}

/// Whether `head`, the start of a response head, can still turn out to be an interim one
/// (`1xx` other than `101`).
fn may_be_interim(head: &[u8]) -> bool {
    const LINE: &[u8] = b"HTTP/1.? 1";
    let prefix = head.iter().zip(LINE).all(|(&b, &p)| p == b'?' || b == p);
    prefix && head.get(9..12) != Some(b"101".as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_head_is_kept_only_while_it_can_be_interim() {
        for head in [
            &b"H"[..],
            b"HTTP/1.",
            b"HTTP/1.1 ",
            b"HTTP/1.1 1",
            b"HTTP/1.0 103 Ea",
        ] {
            assert!(may_be_interim(head), "{}", String::from_utf8_lossy(head));
        }
        for head in [&b"X"[..], b"HTTP/2", b"HTTP/1.1 2", b"HTTP/1.1 101 Sw"] {
            assert!(!may_be_interim(head), "{}", String::from_utf8_lossy(head));
        }
        let mut rbuf = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Con".to_vec();
        assert!(skip_interim(&mut rbuf));
        assert_eq!(rbuf, b"HTTP/1.1 100 Con");
        rbuf.extend_from_slice(b"tinue\r\n\r\nHTTP/1.1 200 OK\r\n");
        assert!(!skip_interim(&mut rbuf), "a final head is an answer");
    }
}
