//! Listen: where a request's journey starts. Accepts TCP connections on the cleartext and
//! HTTPS ports, turns away those over `limits.max_connections`, tells HTTP/1.1 from HTTP/2
//! (the preface on the cleartext port, ALPN over TLS), does the TLS handshake within its
//! timeout, and counts connections for metrics and graceful shutdown. Nothing here reads a
//! request; an accepted connection goes to the protocol it speaks ([`crate::http`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::metrics::Metrics;
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

/// Where and how one listener accepts.
pub(crate) struct Accepting<'a> {
    pub max_connections: u64,
    pub tracker: &'a Arc<ConnectionTracker>,
    pub metrics: &'a Arc<Metrics>,
    /// Over-limit connections of a cleartext port get a 503; a TLS port's are closed (a
    /// handshake would cost more than the refusal is worth).
    pub cleartext: bool,
}

/// Accepts connections until `shutdown` turns true, each served by `serve` as a task of its
/// own on this worker.
pub(crate) async fn accept<F, Fut>(
    listener: TcpListener,
    accepting: Accepting<'_>,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = crate::http::io::stopped(&mut shutdown) => return,
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
        if accepting.tracker.live() >= accepting.max_connections {
            refuse(&stream, &accepting);
            continue;
        }
        // Linux accepted sockets inherit `TCP_NODELAY` from the listener (`server::bind_std`).
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let guard = accepting.tracker.enter();
        let metrics = accepting.metrics.clone();
        metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
        metrics.connections_active.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(Tracked {
            connection: serve(stream, peer),
            metrics,
            _guard: guard,
        });
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: its future, counted as active until it ends (or is dropped with
    /// its worker). A named future rather than an `async` block around the connection, which
    /// would keep the connection's whole state twice in every task.
    struct Tracked<F> {
        #[pin]
        connection: F,
        metrics: Arc<Metrics>,
        _guard: TrackerGuard,
    }

    impl<F> PinnedDrop for Tracked<F> {
        fn drop(this: Pin<&mut Self>) {
            this.project()
                .metrics
                .connections_active
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<F: Future<Output = ()>> Future for Tracked<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().connection.poll(cx)
    }
}

/// Turns away a connection over `limits.max_connections`, without a task or a wait: a
/// cleartext client gets 503 `overloaded` if its socket takes the answer at once, a TLS client
/// a closed connection.
fn refuse(stream: &TcpStream, accepting: &Accepting<'_>) {
    accepting
        .metrics
        .connections_refused
        .fetch_add(1, Ordering::Relaxed);
    if accepting.cleartext {
        let answer = Refusal::new(RefusalCode::Overloaded)
            .message(format!(
                "this edge holds its limit of {} connections; retry shortly",
                accepting.max_connections
            ))
            .retry_after(Some(1))
            .raw_http1();
        let _ = stream.try_write(&answer);
        let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    }
    // Dropping the socket closes it.
}

/// What a cleartext connection's first bytes say.
pub(crate) enum Sniffed {
    /// The HTTP/2 preface (prior knowledge): these bytes are it.
    Http2(Vec<u8>),
    /// Anything else is HTTP/1.1: these bytes begin the first request.
    Http1(Vec<u8>),
    /// The client closed, failed, sent nothing in time, or shutdown came first.
    Gone,
}

/// Reads a cleartext connection's first bytes until they tell the protocol (the first byte
/// that differs from the HTTP/2 preface, or the whole preface), within `timeout`. A
/// connection that has sent nothing holds no request: on shutdown it is dropped.
pub(crate) async fn sniff(
    stream: &TcpStream,
    timeout: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Sniffed {
    let mut prefix: Vec<u8> = Vec::with_capacity(2048);
    let read = async {
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
    };
    let sniffed = tokio::select! {
        sniffed = tokio::time::timeout(timeout, read) => sniffed,
        _ = crate::http::io::stopped(shutdown) => return Sniffed::Gone,
    };
    match sniffed {
        Ok(Ok(Some(true))) => Sniffed::Http2(prefix),
        Ok(Ok(Some(false))) => Sniffed::Http1(prefix),
        // A prefix of the preface and then silence: HTTP/1.1 answers it (408) as a head that
        // did not arrive in time.
        Err(_) if !prefix.is_empty() => Sniffed::Http1(prefix),
        _ => Sniffed::Gone,
    }
}

/// The HTTPS listener's handshake: within `timeout`, counted full or resumed; `None` when it
/// failed, timed out, or shutdown came first.
pub(crate) async fn handshake(
    stream: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    timeout: Duration,
    stats: &domicile_certs::TlsStats,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, bool)> {
    let peer = stream.peer_addr().ok();
    let handshake = tokio::time::timeout(timeout, acceptor.accept(stream));
    let accepted = tokio::select! {
        accepted = handshake => accepted,
        _ = crate::http::io::stopped(shutdown) => return None,
    };
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(?peer, "TLS handshake failed: {e}");
            return None;
        }
        Err(_elapsed) => {
            stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(?peer, "TLS handshake timed out");
            return None;
        }
    };
    let (_, session) = stream.get_ref();
    match session.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => &stats.handshakes_resumed,
        _ => &stats.handshakes_full,
    }
    .fetch_add(1, Ordering::Relaxed);
    let is_h2 = session.alpn_protocol() == Some(b"h2");
    Some((stream, is_h2))
}
