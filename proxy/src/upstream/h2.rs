//! HTTP/2 as the origin's client (h2c with prior knowledge, or `h2` by ALPN over TLS): one
//! connection per endpoint and worker, its driver a task on the worker's runtime.

use std::io;

use bytes::Bytes;

use super::connect::{ConnectError, OriginIo, Target};

/// Flow-control windows towards origins: an upload over one stream is not held to 64 KiB per
/// round trip.
const WINDOW: u32 = 1024 * 1024;

/// A new HTTP/2 connection to `target`, handshake done, its driver running.
pub(crate) async fn connect(
    target: &Target,
) -> Result<h2::client::SendRequest<Bytes>, ConnectError> {
    let io = target.connect().await?;
    if let OriginIo::Tls(tls) = &io {
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ConnectError::Tcp(io::Error::new(
                io::ErrorKind::InvalidData,
                "the origin did not agree to HTTP/2 (ALPN h2)",
            )));
        }
    }
    let handshake = h2::client::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .handshake::<_, Bytes>(io);
    let (sender, connection) = handshake
        .await
        .map_err(|e| ConnectError::Tcp(io::Error::other(e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("origin http2 connection closed: {e}");
        }
    });
    Ok(sender)
}
