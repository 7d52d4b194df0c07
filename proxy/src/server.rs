//! Starting and stopping a proxy: the assembly of every part. Builds the engine, loads the
//! map, waits for the first health checks, binds the listeners, runs one worker per thread,
//! and hands each accepted connection to the protocol it speaks; on shutdown, drains.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::forward::Engine;
use crate::http::peer::Peer;
use crate::listen::{self, Accepting, ConnectionTracker, Sniffed};
use crate::metrics::Metrics;
use crate::ops::admin::{self, Admin};
use crate::route::map::Replica;
use crate::route::mapfile;
use crate::sync::SyncHandle;

/// The files other parts read, opened by their owners.
struct Owners;

impl crate::config::FileChecks for Owners {
    fn geoip_database(&self, path: &std::path::Path) -> Result<(), String> {
        crate::route::geoip::GeoIp::open(path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn signing_key(&self, path: &std::path::Path) -> Result<(), String> {
        crate::audit::keys::load_signing_key(path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Reads and validates a configuration file and opens the files it names (the GeoIP
/// database, the audit signing key, certificates): every problem at once.
pub fn check_config(path: &std::path::Path) -> Result<ProxyConfig, crate::config::ConfigErrors> {
    ProxyConfig::from_file_with(path, Some(&Owners))
}

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

/// Raises the soft open-file limit towards what `max_connections` needs (a client socket and
/// an origin socket per connection, and room for listeners, files and health checks), as far
/// as the hard limit allows, and says so when that is not enough: past the limit `accept`
/// fails with EMFILE, which is a worse refusal than the 503 at `max_connections`.
fn raise_open_file_limit(max_connections: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let want = max_connections.saturating_mul(2).saturating_add(512);
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), hard) = (limit.current, limit.maximum) else {
        return; // unlimited
    };
    if soft < want {
        let raised = hard.map_or(want, |hard| want.min(hard));
        if raised > soft {
            let new = Rlimit {
                current: Some(raised),
                maximum: hard,
            };
            if let Err(e) = setrlimit(Resource::Nofile, new) {
                tracing::warn!("cannot raise the open-file limit from {soft} to {raised}: {e}");
            }
        }
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if now < want {
        tracing::warn!(
            "the open-file limit is {now}, below the {want} that limits.max_connections = {max_connections} needs; raise it (ulimit -n, LimitNOFILE=) or lower max_connections"
        );
    }
}

/// A running proxy. Dropping it does not stop it: call [`RunningProxy::shutdown`].
#[derive(Debug)]
pub struct RunningProxy {
    /// The client-traffic address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    /// The admin address actually bound, if configured.
    pub admin_addr: Option<SocketAddr>,
    /// The HTTPS address actually bound, if `[tls]` is configured.
    pub tls_addr: Option<SocketAddr>,
    /// The request path's shared state: the map replica, the pools, the metrics, the audit log.
    pub engine: Arc<Engine>,
    /// The HTTPS listener's certificates, when `[tls]` is configured.
    pub edge_tls: Option<Arc<domicile_certs::ServerTls>>,
    shutdown: watch::Sender<bool>,
    admin_shutdown: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    tracker: Arc<ConnectionTracker>,
    grace: std::time::Duration,
    threads: Vec<std::thread::JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
    /// Reloads the edge certificates when their files change.
    _tls_watcher: Option<domicile_certs::Watcher>,
    /// Following the control plane, when the map comes from it.
    pub sync: Option<SyncHandle>,
}

/// Binds the listeners, loads the map file (if any), starts health checks and serves.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    let config = Arc::new(config);
    // A file-size limit (RLIMIT_FSIZE, `ulimit -f`) must make the audit writer's writes fail
    // with EFBIG, which it handles as a failing disk, rather than kill the process with
    // SIGXFSZ. The handler stays installed once registered.
    #[cfg(unix)]
    if config.audit.is_some() {
        use tokio::signal::unix::{signal, SignalKind};
        if let Err(e) = signal(SignalKind::from_raw(libc::SIGXFSZ)) {
            tracing::warn!("cannot catch SIGXFSZ: {e}");
        }
    }
    raise_open_file_limit(config.limits.max_connections);
    let replica = Arc::new(Replica::new());
    let metrics = Arc::new(Metrics::default());
    let engine = Arc::new(
        Engine::new(config.clone(), replica.clone(), metrics.clone()).map_err(StartError::Setup)?,
    );
    let edge_tls = match &config.tls {
        Some(tls) => Some(edge_tls(tls)?),
        None => None,
    };

    let mut watcher = None;
    if let Some(path) = &config.map.file {
        let (version, entries) = mapfile::load_into(path, &replica)?;
        metrics.map_reloads_ok.fetch_add(1, Ordering::Relaxed);
        tracing::info!(path = %path.display(), version, entries, "map loaded");
        if config.map.watch {
            let metrics_pipeline = metrics.clone();
            let w = mapfile::watch(path.clone(), replica.clone(), move |result| match result {
                Ok((version, entries)) => {
                    metrics_pipeline
                        .map_reloads_ok
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(version, entries, "map reloaded");
                }
                Err(e) => {
                    metrics_pipeline
                        .map_reloads_failed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!("map reload rejected, keeping the current map: {e}");
                }
            })
            .map_err(|e| StartError::Setup(format!("cannot watch the map file: {e}")))?;
            watcher = Some(w);
        }
    }

    // The map from the control plane: the last-known-good copy is installed before the
    // listeners open, so a restart with the control plane down routes at once.
    let sync = config.control_plane.as_ref().map(|cp| {
        crate::sync::start(
            cp.clone(),
            replica.clone(),
            metrics.clone(),
            config.proxy_id().to_owned(),
            config.proxy.edge_region.clone(),
        )
    });

    // Listeners open knowing which endpoints may be used: an endpoint with health checks is
    // not used before one passes.
    engine.upstreams.first_checks().await;

    let listen = config.proxy.listen;
    let workers = config.proxy.worker_count().max(1);
    // One listening socket per worker (SO_REUSEPORT: the kernel spreads connections over them),
    // the first one resolving port 0 for the others.
    let first = bind_std(listen, workers > 1)?;
    let addr = first.local_addr().map_err(|source| StartError::Bind {
        addr: listen,
        source,
    })?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(bind_std(addr, true)?);
    }
    // The HTTPS port, likewise one socket per worker.
    let mut tls_sockets: Vec<Option<std::net::TcpListener>> = (0..workers).map(|_| None).collect();
    let mut tls_addr = None;
    let mut tls_watcher = None;
    if let (Some(section), Some(edge)) = (&config.tls, &edge_tls) {
        let first = bind_std(section.listen, workers > 1)?;
        let bound = first.local_addr().map_err(|source| StartError::Bind {
            addr: section.listen,
            source,
        })?;
        tls_sockets[0] = Some(first);
        for slot in tls_sockets.iter_mut().skip(1) {
            *slot = Some(bind_std(bound, true)?);
        }
        tls_addr = Some(bound);
        tls_watcher = Some(
            edge.watch(section.reload_interval)
                .map_err(|e| StartError::Setup(format!("tls: {e}")))?,
        );
    }
    let acceptor = edge_tls
        .as_ref()
        .map(|edge| tokio_rustls::TlsAcceptor::from(edge.config()));
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
            let admin = Arc::new(Admin {
                engine: engine.clone(),
                edge_tls: edge_tls.clone(),
                draining: draining.clone(),
            });
            tokio::spawn(admin::serve(admin_listener, admin, admin_shutdown_rx));
            Some(bound)
        }
        None => None,
    };
    let mut threads = Vec::with_capacity(workers);
    let mut started = Vec::with_capacity(workers);
    for (index, (socket, tls_socket)) in sockets.into_iter().zip(tls_sockets).enumerate() {
        let (ready, ready_rx) = tokio::sync::oneshot::channel();
        let worker = Worker {
            socket,
            tls: tls_socket.zip(acceptor.clone()),
            engine: engine.clone(),
            edge_tls: edge_tls.clone(),
            shutdown: shutdown_rx.clone(),
            stop: admin_shutdown.subscribe(),
            tracker: tracker.clone(),
            ready,
        };
        let thread = std::thread::Builder::new()
            .name(format!("domicile-worker-{index}"))
            .spawn(move || worker.run())
            .map_err(|e| StartError::Setup(format!("cannot start worker thread {index}: {e}")))?;
        threads.push(thread);
        started.push(ready_rx);
    }
    // Every worker must be serving before the proxy says it is listening.
    for (index, ready) in started.into_iter().enumerate() {
        match ready.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(StartError::Setup(format!("worker {index}: {e}"))),
            Err(_) => {
                return Err(StartError::Setup(format!(
                    "worker {index} stopped while starting"
                )))
            }
        }
    }
    tracing::info!(%addr, ?tls_addr, ?admin_addr, workers, proxy_id = config.proxy_id(), "proxy listening");
    Ok(RunningProxy {
        addr,
        admin_addr,
        tls_addr,
        _tls_watcher: tls_watcher,
        engine,
        edge_tls,
        shutdown,
        admin_shutdown,
        draining,
        grace: config.proxy.shutdown_grace,
        tracker,
        threads,
        _watcher: watcher,
        sync,
    })
}

/// The HTTPS listener's certificates, loaded and checked.
fn edge_tls(tls: &crate::config::TlsSection) -> Result<Arc<domicile_certs::ServerTls>, StartError> {
    let sources = tls
        .certificates
        .iter()
        .map(|files| domicile_certs::CertSource {
            cert: files.cert.clone(),
            key: files.key.clone(),
        })
        .collect();
    let unknown = match tls.unknown_name {
        crate::config::UnknownNamePolicy::Default => domicile_certs::UnknownName::Default,
        crate::config::UnknownNamePolicy::Refuse => domicile_certs::UnknownName::Refuse,
    };
    let options = domicile_certs::ServerOptions {
        session_cache: tls.session_cache,
        tickets: tls.session_tickets,
        ..Default::default()
    };
    domicile_certs::ServerTls::load(sources, unknown, &options)
        .map_err(|e| StartError::Setup(format!("tls: {e}")))
}

/// One thread serving client traffic on its own single-threaded runtime: the connections it
/// accepts, their requests and their upstream exchanges all stay on this thread.
struct Worker {
    socket: std::net::TcpListener,
    /// The HTTPS socket and its acceptor, when `[tls]` is configured.
    tls: Option<(std::net::TcpListener, tokio_rustls::TlsAcceptor)>,
    engine: Arc<Engine>,
    edge_tls: Option<Arc<domicile_certs::ServerTls>>,
    /// Stop accepting and drain.
    shutdown: watch::Receiver<bool>,
    /// The grace period is over: drop whatever is still open.
    stop: watch::Receiver<bool>,
    tracker: Arc<ConnectionTracker>,
    /// Told once the worker serves, or why it cannot.
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl Worker {
    fn run(self) {
        let Worker {
            socket,
            tls,
            engine,
            edge_tls,
            shutdown,
            mut stop,
            tracker,
            ready,
        } = self;
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = ready.send(Err(format!("cannot start its runtime: {e}")));
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match TcpListener::from_std(socket) {
                Ok(listener) => listener,
                Err(e) => {
                    let _ = ready.send(Err(format!("cannot register its listener: {e}")));
                    return;
                }
            };
            let tls = match tls.map(|(socket, acceptor)| (TcpListener::from_std(socket), acceptor))
            {
                None => None,
                Some((Ok(listener), acceptor)) => Some((listener, acceptor)),
                Some((Err(e), _)) => {
                    let _ = ready.send(Err(format!("cannot register its HTTPS listener: {e}")));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            let max_connections = engine.config.limits.max_connections;
            let metrics = engine.metrics.clone();
            let plain = listen::accept(
                listener,
                Accepting {
                    max_connections,
                    tracker: &tracker,
                    metrics: &metrics,
                    cleartext: true,
                },
                shutdown.clone(),
                |stream, peer| serve_cleartext(stream, peer, engine.clone(), shutdown.clone()),
            );
            match (tls, edge_tls) {
                (Some((tls_listener, acceptor)), Some(edge)) => {
                    let secure = listen::accept(
                        tls_listener,
                        Accepting {
                            max_connections,
                            tracker: &tracker,
                            metrics: &metrics,
                            cleartext: false,
                        },
                        shutdown.clone(),
                        |stream, peer| {
                            serve_tls(
                                stream,
                                peer,
                                engine.clone(),
                                acceptor.clone(),
                                edge.clone(),
                                shutdown.clone(),
                            )
                        },
                    );
                    tokio::join!(plain, secure);
                }
                _ => plain.await,
            }
            // Accepting has stopped; the connections this worker owns finish on its runtime.
            tokio::select! {
                () = tracker.drained() => {}
                _ = stop.wait_for(|stop| *stop) => {}
            }
        });
    }
}

/// A connection on the cleartext port: HTTP/2 with prior knowledge, or HTTP/1.1.
async fn serve_cleartext(
    stream: TcpStream,
    addr: SocketAddr,
    engine: Arc<Engine>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = &engine.config.limits;
    let sniffed = listen::sniff(&stream, limits.header_read_timeout, &mut shutdown).await;
    let peer = Peer::new(addr, &engine.config.proxy.trusted_proxies, false);
    let handler = engine.for_peer(&peer);
    match sniffed {
        Sniffed::Http1(prefix) => {
            let settings = crate::http::h1::Settings {
                limits,
                metrics: &engine.metrics,
            };
            crate::http::h1::serve(stream, prefix, &handler, &settings, shutdown).await;
        }
        Sniffed::Http2(prefix) => {
            // HTTP/2's connection state is large: boxed, so that HTTP/1.1 connections do not
            // carry room for it.
            let io = crate::http::h2::Prefixed::new(prefix, stream);
            Box::pin(crate::http::h2::serve(io, &handler, limits, shutdown)).await;
        }
        Sniffed::Gone => {}
    }
}

/// A connection on the HTTPS port: the handshake, then the protocol ALPN chose.
async fn serve_tls(
    stream: TcpStream,
    addr: SocketAddr,
    engine: Arc<Engine>,
    acceptor: tokio_rustls::TlsAcceptor,
    edge: Arc<domicile_certs::ServerTls>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(section) = &engine.config.tls else {
        return;
    };
    let Some((stream, is_h2)) = listen::handshake(
        stream,
        &acceptor,
        section.handshake_timeout,
        edge.stats(),
        &mut shutdown,
    )
    .await
    else {
        return;
    };
    let limits = &engine.config.limits;
    let peer = Peer::new(addr, &engine.config.proxy.trusted_proxies, true);
    let handler = engine.for_peer(&peer);
    if is_h2 {
        Box::pin(crate::http::h2::serve(stream, &handler, limits, shutdown)).await;
    } else {
        let settings = crate::http::h1::Settings {
            limits,
            metrics: &engine.metrics,
        };
        let prefix = crate::http::io::take_buffer();
        Box::pin(crate::http::h1::serve(
            stream, prefix, &handler, &settings, shutdown,
        ))
        .await;
    }
}

/// A non-blocking listening socket, to be registered with a worker's runtime.
fn bind_std(addr: SocketAddr, reuse_port: bool) -> Result<std::net::TcpListener, StartError> {
    use socket2::{Domain, Socket, Type};
    let err = |source| StartError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    // Client connections answer as soon as an answer is written. On Linux an accepted socket
    // inherits this from its listener, which saves a system call per connection
    // (`listen::accept` sets it per connection elsewhere).
    socket.set_nodelay(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(4096).map_err(err)?;
    Ok(socket.into())
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
    pub async fn shutdown(mut self) -> u64 {
        if let Some(sync) = self.sync.take() {
            sync.stop().await;
        }
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(self.grace, self.tracker.drained()).await;
        // Also tells the workers to drop what is still open.
        let _ = self.admin_shutdown.send(true);
        let threads = self.threads;
        let engine = self.engine.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
            // No request can begin now: the audit log drains, closes with a signed checkpoint.
            if let Some(audit) = &engine.audit {
                audit.stop();
            }
        })
        .await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_delay() {
        let listener = bind_std("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        if cfg!(target_os = "linux") {
            // Inherited from the listener: the accept loop does not set it again.
            assert!(
                accepted.nodelay().unwrap(),
                "TCP_NODELAY on the accepted socket"
            );
        }
    }
}
