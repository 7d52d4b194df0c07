//! TLS helpers for the tests: a development PKI per test, and an HTTPS client that reports
//! which certificate the server presented.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use domicile_certs::dev::{self, DevLayout, DevOptions};
use domicile_certs::rustls;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::{collect, Reply};

/// The test PKI: `certs dev` for regions us and eu and the proxy `test-edge`.
pub fn pki(dir: &Path) -> DevLayout {
    let certs = dir.join("certs");
    dev::generate(
        &certs,
        &DevOptions {
            domain: "example.test".into(),
            regions: vec!["us".into(), "eu".into()],
            proxies: vec!["test-edge".into()],
            edge_names: ["acme", "initech", "globex", "umbrella"]
                .iter()
                .map(|w| format!("{w}.localhost"))
                .collect(),
            days: 30,
            force: false,
        },
    )
    .expect("dev certificates");
    DevLayout::new(certs)
}

/// Two TLS origins answering as region `us`: an impostor with the eu certificate (the right CA,
/// the wrong region), and one with the us certificate.
pub async fn impostor_and_good(
    layout: &DevLayout,
) -> (domicile::origin::Origin, domicile::origin::Origin) {
    use domicile::origin::Origin;
    let (us_cert, us_key) = layout.origin("us");
    let (eu_cert, eu_key) = layout.origin("eu");
    let ca = layout.ca();
    let impostor = Origin::start_tls("us", super::LOOPBACK, &eu_cert, &eu_key, Some(&ca))
        .await
        .unwrap();
    let good = Origin::start_tls("us", super::LOOPBACK, &us_cert, &us_key, Some(&ca))
        .await
        .unwrap();
    (impostor, good)
}

/// A `[tls]` section serving `certs` (in order; the first is the default) on port 0.
pub fn tls_section(certs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let mut text =
        format!("[tls]\nlisten = \"127.0.0.1:0\"\nreload_interval = \"100ms\"\n{extra}\n");
    for (cert, key) in certs {
        text.push_str(&format!(
            "[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    text
}

/// A `[regions.X.tls]` table: trust `ca`, expect `identity`, present the proxy certificate.
pub fn origin_tls(layout: &DevLayout, identity: &str) -> String {
    let (cert, key) = layout.proxy("test-edge");
    format!(
        "tls = {{ ca = \"{}\", identity = \"{identity}\", cert = \"{}\", key = \"{}\" }}\n",
        layout.ca().display(),
        cert.display(),
        key.display()
    )
}

/// A client configuration trusting `ca`, offering `alpn`.
pub fn client_config(ca: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let roots = domicile_certs::pem::load_roots(ca).expect("roots");
    let mut config = rustls::ClientConfig::builder_with_provider(domicile_certs::pem::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// An open TLS connection and what its handshake settled.
#[derive(Debug)]
pub struct Session {
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
}

impl Session {
    /// The DNS names of the certificate the server presented.
    pub fn names(&self) -> Vec<String> {
        let leaf = &self
            .stream
            .get_ref()
            .1
            .peer_certificates()
            .expect("certificate")[0];
        domicile_certs::CertInfo::parse(leaf)
            .expect("parses")
            .dns_names
    }

    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
    }

    pub fn resumed(&self) -> bool {
        self.stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }
}

/// A TLS handshake with `addr` for the name `sni`.
pub async fn handshake(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Session, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("server name");
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(Session { stream })
}

/// The rustls error inside a failed handshake.
pub fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// A request over an open session, HTTP/2 if ALPN chose it, else HTTP/1.1; the connection
/// stays usable through the returned sender.
pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    /// With the `:scheme` of the connection.
    H2(
        hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        &'static str,
    ),
}

impl Sender {
    pub async fn open(session: Session) -> Sender {
        let h2 = session.alpn().as_deref() == Some(b"h2");
        Self::over(session.stream, h2, "https").await
    }

    /// A cleartext connection to `addr`: HTTP/2 with prior knowledge when `h2`.
    pub async fn cleartext(addr: SocketAddr, h2: bool) -> Sender {
        Self::over(TcpStream::connect(addr).await.expect("connect"), h2, "http").await
    }

    async fn over<I>(io: I, h2: bool, scheme: &'static str) -> Sender
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        if h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2 handshake");
            tokio::spawn(conn);
            Sender::H2(sender, scheme)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("http1 handshake");
            tokio::spawn(conn);
            Sender::H1(sender)
        }
    }

    pub async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", host, path, headers, Bytes::new()).await
    }

    /// A request with `body` (sent with its length), the host as `Host` in HTTP/1.1 and as
    /// `:authority` in HTTP/2.
    pub async fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(path);
        match self {
            Sender::H1(_) => builder = builder.header("host", host),
            Sender::H2(_, scheme) => builder = builder.uri(format!("{scheme}://{host}{path}")),
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(body)).expect("request");
        let response = match self {
            Sender::H1(s) => s.send_request(request).await,
            Sender::H2(s, _) => s.send_request(request).await,
        };
        collect(response.expect("response")).await
    }
}
