//! Starting and stopping a proxy: bind, load the map, serve, drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::listener::{self, ConnectionTracker};
use crate::map::Replica;
use crate::mapfile;
use crate::pipeline::Pipeline;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Map(#[from] mapfile::MapFileError),
}

/// A running proxy. Dropping it does not stop it: call [`RunningProxy::shutdown`].
#[derive(Debug)]
pub struct RunningProxy {
    /// The client-traffic address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    /// The admin address actually bound, if configured.
    pub admin_addr: Option<SocketAddr>,
    pub pipeline: Arc<Pipeline>,
    shutdown: watch::Sender<bool>,
    admin_shutdown: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    tracker: Arc<ConnectionTracker>,
    grace: std::time::Duration,
    _watcher: Option<notify::RecommendedWatcher>,
}

/// Binds the listeners, loads the map file (if any), starts health checks and serves.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    let config = Arc::new(config);
    let replica = Arc::new(Replica::new());
    let pipeline =
        Arc::new(Pipeline::new(config.clone(), replica.clone()).map_err(StartError::Setup)?);

    let mut watcher = None;
    if let Some(path) = &config.map.file {
        let (version, entries) = mapfile::load_into(path, &replica)?;
        pipeline
            .metrics
            .map_reloads_ok
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(path = %path.display(), version, entries, "map loaded");
        if config.map.watch {
            let metrics_pipeline = pipeline.clone();
            let w = mapfile::watch(path.clone(), replica.clone(), move |result| match result {
                Ok((version, entries)) => {
                    metrics_pipeline
                        .metrics
                        .map_reloads_ok
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(version, entries, "map reloaded");
                }
                Err(e) => {
                    metrics_pipeline
                        .metrics
                        .map_reloads_failed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!("map reload rejected, keeping the current map: {e}");
                }
            })
            .map_err(|e| StartError::Setup(format!("cannot watch the map file: {e}")))?;
            watcher = Some(w);
        }
    }

    let listen = config.proxy.listen;
    let listener = bind(listen)?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: listen,
        source,
    })?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    // The admin listener outlives the drain, so probes see `/readyz` fail rather than vanish.
    let (admin_shutdown, admin_shutdown_rx) = watch::channel(false);
    let draining = Arc::new(AtomicBool::new(false));
    let tracker = Arc::new(ConnectionTracker::default());

    let admin_addr = match config.proxy.admin_listen {
        Some(admin) => {
            let admin_listener = bind(admin)?;
            let bound = admin_listener
                .local_addr()
                .map_err(|source| StartError::Bind {
                    addr: admin,
                    source,
                })?;
            tokio::spawn(crate::admin::serve(
                admin_listener,
                pipeline.clone(),
                draining.clone(),
                admin_shutdown_rx,
            ));
            Some(bound)
        }
        None => None,
    };
    tokio::spawn(listener::serve(
        listener,
        pipeline.clone(),
        shutdown_rx,
        tracker.clone(),
    ));
    tracing::info!(%addr, ?admin_addr, proxy_id = config.proxy_id(), "proxy listening");
    Ok(RunningProxy {
        addr,
        admin_addr,
        pipeline,
        shutdown,
        admin_shutdown,
        draining,
        grace: config.proxy.shutdown_grace,
        tracker,
        _watcher: watcher,
    })
}

fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|source| StartError::Bind { addr, source })?;
    socket
        .set_reuseaddr(true)
        .and_then(|()| socket.bind(addr))
        .and_then(|()| socket.listen(4096))
        .map_err(|source| StartError::Bind { addr, source })
}

impl RunningProxy {
    /// Stops accepting, lets in-flight requests finish up to the grace period, then returns.
    /// Returns the number of connections still open when the grace period ran out.
    pub async fn shutdown(self) -> u64 {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(self.grace, self.tracker.drained()).await;
        let _ = self.admin_shutdown.send(true);
        match drained {
            Ok(()) => 0,
            Err(_) => {
                let left = self.tracker.live();
                tracing::warn!(
                    left,
                    "shutdown grace period over; closing remaining connections"
                );
                left
            }
        }
    }

    /// Connections currently open.
    pub fn live_connections(&self) -> u64 {
        self.tracker.live()
    }
}
