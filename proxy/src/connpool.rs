//! Upstream connections, pooled per worker thread.
//!
//! Every worker runs its own single-threaded runtime (see `server`), so each keeps its own idle
//! connections in a thread-local list: taking and returning one is a `Vec` pop and push, with
//! no lock and no cross-thread wake-up. Connections are `hyper::client::conn` connections:
//!
//! - HTTP/1.1: one request at a time. A connection goes back to the idle list when its response
//!   body has been read to the end ([`PooledBody`]); a connection whose response was cut off, or
//!   that switched protocols, is closed instead.
//! - h2c: one multiplexed connection per endpoint and worker, shared by every request.
//!
//! A request that hyper hands back unsent (the idle connection was closed by the origin just as
//! it was taken) is sent again on a new connection: it never reached the origin.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use domicile_certs::client::HandshakeFailure;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::UpstreamProtocol;
use crate::refusal::ProxyBody;

/// Idle HTTP/1.1 connections kept per endpoint and worker; more are closed.
pub(crate) const MAX_IDLE_PER_ENDPOINT: usize = 512;
/// An idle connection older than this is closed rather than reused (origins commonly close
/// idle connections after 60 s or more; reusing one they are closing costs a retry).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A pool key: unique per endpoint for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndpointKey(u64);

impl EndpointKey {
    pub fn new() -> Self {
        Self(NEXT_ID.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for EndpointKey {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Default)]
struct Idle {
    http1: HashMap<EndpointKey, Vec<(http1::SendRequest<ProxyBody>, Instant)>, Fast>,
    h2: HashMap<EndpointKey, http2::SendRequest<ProxyBody>, Fast>,
}

/// Keys are process-unique counters, not attacker input: a fast hash will do.
type Fast = foldhash::fast::RandomState;

thread_local! {
    static IDLE: RefCell<Idle> = RefCell::new(Idle::default());
}

/// Why an exchange with an origin failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing reached the origin.
    Connect(io::Error),
    /// The TLS handshake failed (the origin did not prove the region's identity, or its
    /// certificate was refused): nothing of the request reached it.
    Tls(HandshakeFailure),
    /// The connection failed during the exchange.
    Http(hyper::Error),
}

/// TLS to a region's origins: the region's client configuration and the identity every origin
/// of the region must prove.
pub struct OriginTls {
    pub connector: tokio_rustls::TlsConnector,
    /// Sent as SNI and verified in the origin's certificate.
    pub identity: ServerName<'static>,
    pub identity_text: Arc<str>,
}

impl std::fmt::Debug for OriginTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginTls")
            .field("identity", &self.identity_text)
            .finish()
    }
}

/// A connection to an origin, cleartext or TLS.
pub(crate) enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, data),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Tls(e) => write!(f, "{e}"),
            SendError::Http(e) => {
                write!(f, "{e}")?;
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
        }
    }
}

/// How to reach one endpoint.
#[derive(Debug)]
pub struct Target {
    pub key: EndpointKey,
    /// `host:port`, resolved at each new connection when it is not an address.
    pub authority: String,
    pub addr: Option<SocketAddr>,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    /// TLS to the origin; cleartext when `None`.
    pub tls: Option<Arc<OriginTls>>,
}

impl Target {
    pub(crate) async fn connect(&self) -> Result<TcpStream, SendError> {
        let connect = async {
            let stream = match self.addr {
                Some(addr) => TcpStream::connect(addr).await?,
                None => TcpStream::connect(self.authority.as_str()).await?,
            };
            stream.set_nodelay(true)?;
            let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
            socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
            Ok::<_, io::Error>(stream)
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(SendError::Connect(e)),
            Err(_) => Err(SendError::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {:?}", self.connect_timeout),
            ))),
        }
    }

    /// A new connection, with the TLS handshake done for a TLS route. The connect timeout
    /// covers both.
    pub(crate) async fn connect_io(&self) -> Result<UpstreamIo, SendError> {
        let Some(tls) = &self.tls else {
            return self.connect().await.map(UpstreamIo::Plain);
        };
        let started = Instant::now();
        let stream = self.connect().await?;
        let left = self.connect_timeout.saturating_sub(started.elapsed());
        let handshake = tls.connector.connect(tls.identity.clone(), stream);
        match tokio::time::timeout(left, handshake).await {
            Ok(Ok(stream)) => Ok(UpstreamIo::Tls(Box::new(stream))),
            Ok(Err(e)) => Err(SendError::Tls(domicile_certs::client::classify(
                &e,
                &tls.identity_text,
            ))),
            Err(_) => Err(SendError::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {:?}", self.connect_timeout),
            ))),
        }
    }

    /// Sends `request` and returns the response head; the body streams from the connection.
    /// Must be called on a worker's runtime (the connection task is spawned there).
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        match self.protocol {
            UpstreamProtocol::Http1 => self.send_http1(request).await,
            UpstreamProtocol::H2c => self.send_h2(request).await,
        }
    }

    fn take_idle_http1(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let now = Instant::now();
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle.http1.get_mut(&self.key)?;
            while let Some((sender, since)) = list.pop() {
                if !sender.is_closed() && now.duration_since(since) < IDLE_TIMEOUT {
                    return Some(sender);
                }
            }
            None
        })
    }

    async fn new_http1(&self) -> Result<http1::SendRequest<ProxyBody>, SendError> {
        let stream = crate::screen::ResponseScreen::new(self.connect_io().await?);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!("upstream connection closed: {e}");
            }
        });
        Ok(sender)
    }

    async fn new_h2(&self) -> Result<http2::SendRequest<ProxyBody>, SendError> {
        let stream = self.connect_io().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("upstream h2 connection closed: {e}");
            }
        });
        Ok(sender)
    }

    async fn send_http1(
        &self,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        // A pooled connection can turn out closed between the check and the send; hyper then
        // hands the request back unsent and it goes out on a fresh connection. A fresh
        // connection that fails the same way is an error.
        for _ in 0..3 {
            let (mut sender, fresh) = match self.take_idle_http1() {
                Some(sender) => (sender, false),
                // Boxed: connecting is the rare path, and its state would otherwise make every
                // request's future (moved several times on the way) larger.
                None => (Box::pin(self.new_http1()).await?, true),
            };
            if sender.ready().await.is_err() {
                if fresh {
                    return Err(SendError::Connect(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the new connection closed before the request was sent",
                    )));
                }
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let switching = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                    let ticket = (!switching).then(|| Ticket {
                        key: self.key,
                        sender,
                    });
                    return Ok(response.map(|body| PooledBody {
                        inner: body,
                        ticket,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => request = unsent,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
        Err(SendError::Connect(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "pooled connections kept closing before the request was sent",
        )))
    }

    async fn send_h2(
        &self,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        for _ in 0..2 {
            let existing = IDLE.with(|idle| {
                let mut idle = idle.borrow_mut();
                match idle.h2.get(&self.key) {
                    Some(sender) if !sender.is_closed() => Some(sender.clone()),
                    Some(_) => {
                        idle.h2.remove(&self.key);
                        None
                    }
                    None => None,
                }
            });
            let (mut sender, fresh) = match existing {
                Some(sender) => (sender, false),
                None => {
                    let sender = Box::pin(self.new_h2()).await?;
                    IDLE.with(|idle| idle.borrow_mut().h2.insert(self.key, sender.clone()));
                    (sender, true)
                }
            };
            if sender.ready().await.is_err() {
                IDLE.with(|idle| idle.borrow_mut().h2.remove(&self.key));
                if fresh {
                    return Err(SendError::Connect(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the new h2 connection closed before the request was sent",
                    )));
                }
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok(response.map(|body| PooledBody {
                        inner: body,
                        ticket: None,
                    }))
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        IDLE.with(|idle| idle.borrow_mut().h2.remove(&self.key));
                        request = unsent;
                    }
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
        Err(SendError::Connect(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "the h2 connection closed before the request was sent",
        )))
    }
}

/// The right to put an HTTP/1.1 connection back in its worker's idle list.
struct Ticket {
    key: EndpointKey,
    sender: http1::SendRequest<ProxyBody>,
}

impl Ticket {
    fn give_back(self) {
        let _ = IDLE.try_with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle.http1.entry(self.key).or_default();
            if list.len() < MAX_IDLE_PER_ENDPOINT {
                list.push((self.sender, Instant::now()));
            }
        });
    }
}

/// An origin's response body. When it has been read to the end, its HTTP/1.1 connection goes
/// back to the idle list; dropped earlier, the connection is closed with it.
pub struct PooledBody {
    inner: Incoming,
    ticket: Option<Ticket>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = polled {
            // A broken connection is not reused.
            this.ticket = None;
        } else if matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream() {
            if let Some(ticket) = this.ticket.take() {
                ticket.give_back();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
