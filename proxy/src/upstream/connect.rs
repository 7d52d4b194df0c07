//! Opening a connection to one origin endpoint: TCP, and for a TLS route the handshake in
//! which the origin must prove the region's identity before a byte of any request is written.
//! Client traffic and health checks both connect here, with the same ALPN and the same checks.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use domicile_certs::client::HandshakeFailure;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{OriginTlsSection, UpstreamProtocol};
use crate::http::io::Transport;

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// A pool key: unique per endpoint for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct EndpointKey(u64);

impl EndpointKey {
    pub(crate) fn new() -> Self {
        Self(NEXT_KEY.fetch_add(1, Ordering::Relaxed))
    }
}

/// TLS to a region's origins: the region's client configuration and the identity every origin
/// of the region must prove.
pub struct OriginTls {
    connector: tokio_rustls::TlsConnector,
    /// Sent as SNI and verified in the origin's certificate.
    identity: ServerName<'static>,
    pub identity_text: Arc<str>,
}

impl std::fmt::Debug for OriginTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginTls")
            .field("identity", &self.identity_text)
            .finish()
    }
}

impl OriginTls {
    /// The route's TLS: trust its CA, present its client certificate if any, offer the ALPN of
    /// the route's protocol.
    pub(crate) fn new(
        region: &str,
        tls: &OriginTlsSection,
        protocol: UpstreamProtocol,
    ) -> Result<Arc<Self>, String> {
        let client = match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => Some(domicile_certs::CertSource {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        let alpn = match protocol {
            UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
            UpstreamProtocol::H2c => vec![b"h2".to_vec()],
        };
        let config = domicile_certs::client::client_config(&tls.ca, client.as_ref(), alpn)
            .map_err(|e| format!("regions.{region}.tls: {e}"))?;
        let identity = domicile_certs::client::server_name(&tls.identity)
            .map_err(|e| format!("regions.{region}.tls.identity: {e}"))?;
        Ok(Arc::new(Self {
            connector: tokio_rustls::TlsConnector::from(config),
            identity,
            identity_text: Arc::from(tls.identity.as_str()),
        }))
    }
}

/// Why no connection could be had.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// TCP failed or timed out: nothing reached the origin.
    Tcp(io::Error),
    /// The TLS handshake failed (the origin did not prove the region's identity, or its
    /// certificate was refused): nothing of any request reached it.
    Tls(HandshakeFailure),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Tcp(e) => write!(f, "connect: {e}"),
            ConnectError::Tls(e) => write!(f, "{e}"),
        }
    }
}

/// A connection to an origin, cleartext or TLS.
pub(crate) enum OriginIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// How to reach one endpoint.
#[derive(Debug)]
pub(crate) struct Target {
    pub key: EndpointKey,
    /// `host:port`, resolved at each new connection when it is not an address.
    pub authority: Arc<str>,
    addr: Option<SocketAddr>,
    connect_timeout: Duration,
    /// TLS to the origin; cleartext when `None`.
    pub tls: Option<Arc<OriginTls>>,
}

impl Target {
    pub(crate) fn new(
        authority: &str,
        connect_timeout: Duration,
        tls: Option<Arc<OriginTls>>,
    ) -> Self {
        Self {
            key: EndpointKey::new(),
            authority: Arc::from(authority),
            addr: authority.parse().ok(),
            connect_timeout,
            tls,
        }
    }

    async fn tcp(&self) -> io::Result<TcpStream> {
        let stream = match self.addr {
            Some(addr) => TcpStream::connect(addr).await?,
            None => TcpStream::connect(&*self.authority).await?,
        };
        stream.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
        Ok(stream)
    }

    /// A new connection, with the TLS handshake done for a TLS route; `connect_timeout` covers
    /// both.
    pub(crate) async fn connect(&self) -> Result<OriginIo, ConnectError> {
        let started = Instant::now();
        let stream = match tokio::time::timeout(self.connect_timeout, self.tcp()).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ConnectError::Tcp(e)),
            Err(_) => {
                return Err(ConnectError::Tcp(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                )))
            }
        };
        let Some(tls) = &self.tls else {
            return Ok(OriginIo::Plain(stream));
        };
        let left = self.connect_timeout.saturating_sub(started.elapsed());
        let handshake = tls.connector.connect(tls.identity.clone(), stream);
        match tokio::time::timeout(left, handshake).await {
            Ok(Ok(stream)) => Ok(OriginIo::Tls(Box::new(stream))),
            Ok(Err(e)) => Err(ConnectError::Tls(domicile_certs::client::classify(
                &e,
                &tls.identity_text,
            ))),
            Err(_) => Err(ConnectError::Tcp(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {:?}", self.connect_timeout),
            ))),
        }
    }
}

impl AsyncRead for OriginIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            OriginIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for OriginIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            OriginIo::Plain(s) => Pin::new(s).poll_write(cx, data),
            OriginIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            OriginIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            OriginIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginIo::Plain(s) => Pin::new(s).poll_flush(cx),
            OriginIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            OriginIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Transport for OriginIo {
    fn socket(&self) -> &TcpStream {
        match self {
            OriginIo::Plain(s) => s,
            OriginIo::Tls(s) => s.get_ref().0,
        }
    }

    fn holds_input(&self) -> bool {
        match self {
            OriginIo::Plain(_) => false,
            OriginIo::Tls(s) => s.holds_input(),
        }
    }

    fn ends_in_band(&self) -> bool {
        matches!(self, OriginIo::Tls(_))
    }
}
