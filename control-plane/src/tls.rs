//! The API over HTTPS: a TLS handshake per connection (HTTP/2 or HTTP/1.1 by ALPN), then the
//! same router as the cleartext listener.
//!
//! A verified client certificate's identity (`urn:domicile:<role>:<name>`) travels with every
//! request of its connection as a [`ClientCertificate`] extension, which only this module sets;
//! [`crate::api::authorize`] grants its role as it would a token's.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The identity of the verified client certificate of a request's connection; `None` inside
/// when the certificate carries no Domicile identity.
#[derive(Debug, Clone)]
pub struct ClientCertificate(pub Option<domicile_certs::identity::Identity>);

/// Serves `app` over TLS until `stopped` turns true; open connections then finish their
/// requests (change streams end at once, as on the cleartext listener).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Arc<domicile_certs::ServerTls>,
    mut stopped: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let mut stop = stopped.clone();
        connections.spawn(async move {
            let stream = match tokio::time::timeout(
                Duration::from_secs(10),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => return,
            };
            let certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| ClientCertificate(domicile_certs::identity::of_certificate(leaf)));
            let service = hyper::service::service_fn(
                move |mut request: http::Request<hyper::body::Incoming>| {
                    if let Some(certificate) = &certificate {
                        request.extensions_mut().insert(certificate.clone());
                    }
                    let mut app = app.clone();
                    async move { tower_service::Service::call(&mut app, request).await }
                },
            );
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let mut draining = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, "https connection ended: {e}");
                        }
                        return;
                    }
                    _ = stop.wait_for(|s| *s), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
        // Reap finished connections as we go.
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}
