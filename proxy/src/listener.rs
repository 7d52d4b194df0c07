//! Listener: accepts TCP connections and serves HTTP/1.1 and HTTP/2 (prior knowledge) on one
//! port, and HTTPS (HTTP/1.1 and HTTP/2 by ALPN, certificates by SNI) on another, with the
//! connection-level limits (header read timeout, idle timeout, write stalls) and graceful
//! shutdown.
//!
//! On the cleartext port the protocol is chosen by sniffing the HTTP/2 connection preface. HTTP/1.1 connections run
//! with upgrades enabled (WebSocket). Requests go to the [`Pipeline`]; nothing here looks at a
//! request's workspace.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::pipeline::Pipeline;
use crate::refusal::{Refusal, RefusalCode};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Counts live connections so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct ConnectionTracker {
    live: AtomicU64,
    idle: tokio::sync::Notify,
}

impl ConnectionTracker {
    fn enter(self: &Arc<Self>) -> TrackerGuard {
        self.live.fetch_add(1, Ordering::SeqCst);
        TrackerGuard(self.clone())
    }

    pub fn live(&self) -> u64 {
        self.live.load(Ordering::SeqCst)
    }

    /// Resolves when no connection is left.
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct TrackerGuard(Arc<ConnectionTracker>);

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Accepts connections until `shutdown` turns true; over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    pipeline: Arc<Pipeline>,
    mut shutdown: watch::Receiver<bool>,
    tracker: Arc<ConnectionTracker>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped(&mut shutdown) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if tracker.live() >= pipeline.config.limits.max_connections {
            refuse_connection(&stream, tls.is_none(), &pipeline);
            continue;
        }
        let guard = tracker.enter();
        let pipeline = pipeline.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            pipeline
                .metrics
                .connections_accepted
                .fetch_add(1, Ordering::Relaxed);
            pipeline
                .metrics
                .connections_active
                .fetch_add(1, Ordering::Relaxed);
            match tls {
                Some(acceptor) => {
                    Box::pin(serve_tls_connection(
                        stream, peer, acceptor, &pipeline, shutdown,
                    ))
                    .await
                }
                None => serve_connection(stream, peer, &pipeline, shutdown).await,
            }
            pipeline
                .metrics
                .connections_active
                .fetch_sub(1, Ordering::Relaxed);
            drop(guard);
        });
    }
}

/// Turns away a connection over `limits.max_connections`, without a task or a wait: a
/// cleartext client gets 503 `overloaded` if its socket takes the answer at once, a TLS client
/// a closed connection (a handshake would cost more than the refusal is worth).
fn refuse_connection(stream: &TcpStream, cleartext: bool, pipeline: &Pipeline) {
    pipeline
        .metrics
        .connections_refused
        .fetch_add(1, Ordering::Relaxed);
    if cleartext {
        let answer = Refusal::new(RefusalCode::Overloaded)
            .message(format!(
                "this edge holds its limit of {} connections; retry shortly",
                pipeline.config.limits.max_connections
            ))
            .retry_after(Some(1))
            .raw_http1();
        let _ = stream.try_write(&answer);
        let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    }
    // Dropping the socket closes it.
}

/// Activity of one connection, shared by its IO, its service and its idle watcher.
#[derive(Debug)]
struct Activity {
    started: Instant,
    /// Microseconds since `started` of the last byte read (`u64::MAX`: none yet).
    last_read_us: AtomicU64,
    /// Microseconds since `started` when the last response head was handed to hyper.
    last_response_us: AtomicU64,
    requests_started: AtomicU64,
    requests_finished: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            started: Instant::now(),
            last_read_us: AtomicU64::new(u64::MAX),
            last_response_us: AtomicU64::new(u64::MAX),
            requests_started: AtomicU64::new(0),
            requests_finished: AtomicU64::new(0),
        })
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    fn mark_read(&self) {
        self.last_read_us.store(self.now_us(), Ordering::Relaxed);
    }

    fn mark_response(&self) {
        self.last_response_us
            .store(self.now_us(), Ordering::Relaxed);
    }

    /// Whether bytes arrived after the last response: a request head was begun and not finished.
    fn has_partial_head(&self) -> bool {
        let read = self.last_read_us.load(Ordering::Relaxed);
        let response = self.last_response_us.load(Ordering::Relaxed);
        read != u64::MAX && (response == u64::MAX || read > response)
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    pipeline: &Arc<Pipeline>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let limits = &pipeline.config.limits;
    let stream = Arc::new(stream);

    // Sniff the HTTP/2 preface. The bytes read (often a whole HTTP/1.1 request head) go on to
    // the fast path or are replayed to hyper.
    let mut prefix: Vec<u8> = Vec::with_capacity(2048);
    let sniff = tokio::time::timeout(limits.header_read_timeout, async {
        loop {
            stream.readable().await?;
            match stream.try_read_buf(&mut prefix) {
                Ok(0) => return Ok::<_, io::Error>(None),
                Ok(_) => {
                    let n = prefix.len().min(H2_PREFACE.len());
                    if prefix[..n] != H2_PREFACE[..n] {
                        return Ok(Some(false));
                    }
                    if n == H2_PREFACE.len() {
                        return Ok(Some(true));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    });
    // A connection that has not sent its first bytes yet holds no request: drop it on shutdown.
    let sniffed = tokio::select! {
        sniffed = sniff => sniffed,
        _ = stopped(&mut shutdown) => return,
    };
    let is_h2 = match sniffed {
        Ok(Ok(Some(is_h2))) => is_h2,
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_elapsed) => {
            if !prefix.is_empty() {
                answer_timeout(&stream).await;
            }
            return;
        }
    };
    let peer_info = Arc::new(crate::headers::Peer::new(
        peer,
        &pipeline.config.proxy.trusted_proxies,
    ));
    if !is_h2 && pipeline.config.proxy.fast_path {
        match crate::fastpath::serve(&stream, prefix, pipeline, &peer_info, &mut shutdown).await {
            crate::fastpath::Outcome::Closed { linger: true } => {
                linger(&stream).await;
                return;
            }
            crate::fastpath::Outcome::Closed { linger: false } => return,
            // hyper serves the rest of the connection, starting with these bytes.
            crate::fastpath::Outcome::Fallback(rest) => prefix = rest,
        }
    }
    // hyper's connection state is large: boxed, so that connections on the fast path (the
    // common case) do not carry room for it.
    Box::pin(serve_hyper(
        stream, prefix, is_h2, peer_info, pipeline, shutdown,
    ))
    .await;
}

/// Serves the rest of a connection with hyper: HTTP/2, or HTTP/1.1 from a request the fast path
/// did not take (or every request, with the fast path off). `prefix` holds bytes already read.
async fn serve_hyper(
    stream: Arc<TcpStream>,
    prefix: Vec<u8>,
    is_h2: bool,
    peer_info: Arc<crate::headers::Peer>,
    pipeline: &Arc<Pipeline>,
    shutdown: watch::Receiver<bool>,
) {
    let activity = Activity::new();
    if !prefix.is_empty() {
        activity.mark_read();
    }
    let io = ConnIo {
        stream: stream.clone(),
        prefix,
        prefix_pos: 0,
        activity: activity.clone(),
        write_stall: pipeline.config.limits.idle_timeout,
        write_timer: None,
    };
    let peer = peer_info.addr;
    let result = drive_hyper(io, is_h2, &activity, peer_info, pipeline, shutdown).await;
    if let Err(e) = result {
        if e.is_timeout() && activity.has_partial_head() {
            // A head was started and not finished in time.
            answer_timeout(&stream).await;
        } else {
            tracing::debug!(%peer, "http1 connection ended: {e}");
        }
    }
    // hyper has let go of the connection, unless it was upgraded (a WebSocket tunnel holds
    // it now and closes it itself).
    if !is_h2 && Arc::strong_count(&stream) == 1 {
        linger(&stream).await;
    }
}

/// A TLS connection: the handshake (within `tls.handshake_timeout`), then hyper with the
/// protocol ALPN chose. TLS connections do not take the fast path, which relays between plain
/// sockets.
async fn serve_tls_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    pipeline: &Arc<Pipeline>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (Some(edge), Some(section)) = (&pipeline.edge_tls, &pipeline.config.tls) else {
        return;
    };
    let stats = edge.stats();
    let handshake = tokio::time::timeout(section.handshake_timeout, acceptor.accept(stream));
    let accepted = tokio::select! {
        accepted = handshake => accepted,
        _ = stopped(&mut shutdown) => return,
    };
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_elapsed) => {
            stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let (_, session) = stream.get_ref();
    match session.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => &stats.handshakes_resumed,
        _ => &stats.handshakes_full,
    }
    .fetch_add(1, Ordering::Relaxed);
    let is_h2 = session.alpn_protocol() == Some(b"h2");
    let peer_info = Arc::new(crate::headers::Peer::with_scheme(
        peer,
        &pipeline.config.proxy.trusted_proxies,
        true,
    ));
    let activity = Activity::new();
    let io = WatchedIo {
        inner: stream,
        activity: activity.clone(),
        write_stall: pipeline.config.limits.idle_timeout,
        write_timer: None,
    };
    let result = drive_hyper(io, is_h2, &activity, peer_info, pipeline, shutdown).await;
    if let Err(e) = result {
        tracing::debug!(%peer, "https connection ended: {e}");
    }
}

/// Runs hyper on a connection until it ends, drains on shutdown and closes it when idle.
/// Returns how an HTTP/1.1 connection ended (HTTP/2 errors are logged here).
async fn drive_hyper<I>(
    io: I,
    is_h2: bool,
    activity: &Arc<Activity>,
    peer_info: Arc<crate::headers::Peer>,
    pipeline: &Arc<Pipeline>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &pipeline.config.limits;
    let peer = peer_info.addr;
    let service_activity = activity.clone();
    let service_pipeline = pipeline.clone();
    let service = service_fn(move |req| {
        let pipeline = service_pipeline.clone();
        let activity = service_activity.clone();
        let peer = peer_info.clone();
        activity.requests_started.fetch_add(1, Ordering::Relaxed);
        // On HTTP/1.1 this field comes only from the framing screen, in place of a refused head.
        let malformed = if is_h2 {
            None
        } else {
            req.headers()
                .get(crate::framing::MALFORMED_FIELD)
                .map(|v| crate::framing::Violation::from_name(v.as_bytes()))
        };
        // After an upgrade or CONNECT head the screen no longer follows the framing: unless the
        // protocol does switch, the connection must end with the response.
        let tunnel_asked = !is_h2
            && (req.method() == hyper::Method::CONNECT
                || crate::headers::is_upgrade_request(req.headers()));
        async move {
            let _finished = FinishGuard(activity.clone());
            if let Some(violation) = malformed {
                activity.mark_response();
                return Ok::<_, Infallible>(pipeline.refuse_malformed(violation));
            }
            // The request's state (identification, the upstream exchange) lives on the heap
            // for the request's lifetime only: hyper keeps room for this future in every
            // connection, idle or not, so it must stay small.
            let mut response = Box::pin(pipeline.handle(req, &peer)).await;
            if tunnel_asked && response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            activity.mark_response();
            Ok::<_, Infallible>(response)
        }
    });

    let idle_timeout = limits.idle_timeout;
    let idle = watch_idle(activity.clone(), idle_timeout);
    tokio::pin!(idle);

    if is_h2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            // Also bounds a header block's CONTINUATION frames: h2 refuses a block that grows
            // past it instead of buffering it.
            .max_header_list_size(limits.max_header_bytes.min(u32::MAX as u64) as u32)
            .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
            .max_local_error_reset_streams(limits.h2_max_local_error_resets)
            .max_send_buf_size(limits.h2_max_send_buffer as usize)
            .keep_alive_interval(Some(idle_timeout))
            .keep_alive_timeout(limits.h2_keep_alive_timeout);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, "http2 connection ended: {e}");
                    }
                    return Ok(());
                }
                _ = stopped(&mut shutdown), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = &mut idle, if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's own cap is a backstop above ours, so that our 431 (with its JSON body)
        // answers heads between the two.
        .max_buf_size(limits.head_buffer_cap())
        .keep_alive(true);
    if limits.max_headers > 100 {
        // hyper parses up to 100 fields on the stack; past that it needs to be told (and
        // parses on the heap). Up to 100 its default stays, for speed.
        builder.max_headers(limits.max_headers + 1);
    }
    let io = crate::screen::Screened::new(io, pipeline.clone());
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = stopped(&mut shutdown), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut idle, if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Counts a request as finished when its service future ends, also when the client cancels it
/// (an HTTP/2 reset drops the future), so the idle watcher never waits on a request that is gone.
struct FinishGuard(Arc<Activity>);

impl Drop for FinishGuard {
    fn drop(&mut self) {
        self.0.requests_finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Resolves once the connection has had no request in flight and none started for `timeout`.
async fn watch_idle(activity: Arc<Activity>, timeout: Duration) {
    let mut seen = u64::MAX;
    loop {
        tokio::time::sleep(timeout).await;
        let started = activity.requests_started.load(Ordering::Relaxed);
        let finished = activity.requests_finished.load(Ordering::Relaxed);
        if started == finished && started == seen {
            return;
        }
        seen = started;
    }
}

/// Lingering close. When this side closes a connection the client is still sending on (a body
/// refused with 413 halfway, say), closing at once would make the kernel answer the client's
/// next bytes with a reset, which can destroy the response before the client reads it. So:
/// half-close, then read and discard for a moment (at most 256 KiB or 300 ms) until the client
/// closes too. A client that already closed costs one read.
async fn linger(stream: &TcpStream) {
    const BUDGET: usize = 256 * 1024;
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    let drain = async {
        let mut discarded = 0;
        while discarded < BUDGET {
            if stream.readable().await.is_err() {
                return;
            }
            // Into the worker's scratch buffer: a buffer here would sit in every connection's
            // state, idle or not.
            let read = SCRATCH.with(|scratch| stream.try_read(&mut scratch.borrow_mut()[..]));
            match read {
                Ok(0) => return,
                Ok(n) => discarded += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(300), drain).await;
}

pub(crate) async fn answer_timeout(stream: &TcpStream) {
    let bytes = Refusal::new(RefusalCode::RequestTimeout)
        .message("the request head was not received in time")
        .raw_http1();
    let mut written = 0;
    let deadline = Instant::now() + Duration::from_secs(1);
    while written < bytes.len() && Instant::now() < deadline {
        if tokio::time::timeout_at(deadline, stream.writable())
            .await
            .is_err()
        {
            break;
        }
        match stream.try_write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        }
    }
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}

/// The connection's IO as hyper sees it: replays the sniffed prefix, records read activity,
/// and fails a write that makes no progress for the idle timeout (a client that stopped reading).
/// The stream is shared so the listener can still answer after hyper gives up on a connection.
struct ConnIo {
    stream: Arc<TcpStream>,
    /// Bytes read before hyper took over (the sniffed preface, or what the fast path passed on).
    prefix: Vec<u8>,
    prefix_pos: usize,
    activity: Arc<Activity>,
    write_stall: Duration,
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl ConnIo {
    fn write_blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let stall = self.write_stall;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn write_progressed(&mut self) {
        self.write_timer = None;
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix_pos < self.prefix.len() {
            let n = (self.prefix.len() - self.prefix_pos).min(buf.remaining());
            let start = self.prefix_pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.prefix_pos += n;
            if self.prefix_pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.prefix_pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            // hyper hands a fresh, uninitialised buffer to every read, and safe code would have to
            // zero all of it (8 KiB or more) before offering it to the kernel. Instead the kernel
            // fills this worker's scratch buffer, zeroed once per thread, and only the bytes that
            // arrived are copied on.
            let want = buf.remaining().min(SCRATCH_BYTES);
            let read = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let n = self.stream.try_read(&mut scratch[..want])?;
                buf.put_slice(&scratch[..n]);
                Ok::<usize, io::Error>(n)
            });
            match read {
                Ok(n) => {
                    if n > 0 {
                        self.activity.mark_read();
                        if n < want {
                            // A short read drained the socket (epoll is edge-triggered): mark
                            // it not ready now rather than learn it from an EAGAIN read, as
                            // tokio's own TcpStream does. Data arriving meanwhile raises a new
                            // edge, so nothing is missed.
                            let _ = self.stream.try_io(Interest::READABLE, || {
                                Err::<(), _>(io::ErrorKind::WouldBlock.into())
                            });
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Size of each worker's read scratch buffer: the most one read takes from a client socket.
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    ready!(self.write_blocked(cx))?;
                    continue;
                }
            }
            match self.stream.try_write(data) {
                Ok(n) => {
                    self.write_progressed();
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    ready!(self.write_blocked(cx))?;
                    continue;
                }
            }
            match self.stream.try_write_vectored(bufs) {
                Ok(n) => {
                    self.write_progressed();
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = socket2::SockRef::from(&*self.stream).shutdown(std::net::Shutdown::Write);
        match result {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// A stream other than a plain socket (a TLS session) as hyper sees it: records read activity
/// and fails a write that makes no progress for the idle timeout, as [`ConnIo`] does.
struct WatchedIo<S> {
    inner: S,
    activity: Arc<Activity>,
    write_stall: Duration,
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl<S> WatchedIo<S> {
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let stall = self.write_stall;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading",
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    fn written<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(result) => {
                self.write_timer = None;
                Poll::Ready(result)
            }
            Poll::Pending => match self.stalled(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if buf.filled().len() > before {
            self.activity.mark_read();
        }
        Poll::Ready(result)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        self.written(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.written(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.written(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
