//! Starting and stopping one control-plane replica: open the store, make the first admin
//! token if asked, serve the API until told to stop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState, Metrics};
use crate::auth::Role;
use crate::config::ControlPlaneConfig;
use crate::store::{Store, StoreOptions};

/// A running replica.
pub struct RunningControlPlane {
    pub addr: SocketAddr,
    /// `https` when the API is served over TLS, else `http`.
    pub scheme: &'static str,
    pub store: Store,
    /// The admin token made at this start (first start with `admin_token_file` set).
    pub bootstrap_token: Option<String>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _tls_watcher: Option<domicile_certs::Watcher>,
}

impl RunningControlPlane {
    /// Stops accepting, ends open change streams and snapshots, and closes the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        // Open streams end at once; a client that keeps a plain request open cannot hold the
        // replica up for long.
        if tokio::time::timeout(std::time::Duration::from_secs(10), &mut task)
            .await
            .is_err()
        {
            tracing::warn!("connections still open 10 s after stopping; closing them");
            task.abort();
        }
        self.store.close().await;
    }
}

/// Writes a secret to a new file only its owner may read.
pub fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Opens the store and serves the API on `config.listen`.
pub async fn start(config: ControlPlaneConfig) -> anyhow::Result<RunningControlPlane> {
    config.validate()?;
    let store = Store::open(
        &config.store,
        StoreOptions {
            poll_interval: config.poll_interval,
            change_retention: config.change_retention,
            ..StoreOptions::default()
        },
    )
    .await
    .with_context(|| format!("cannot open the store {}", redact(&config.store)))?;
    let mut bootstrap_token = None;
    if let Some(path) = &config.admin_token_file {
        if !store.has_admin().await? {
            let name = if store.tokens().await?.iter().any(|t| t.name == "admin") {
                format!("admin-{}", crate::store::now_ms())
            } else {
                "admin".to_owned()
            };
            let token = store.create_token(&name, Role::Admin).await?;
            write_secret(path, &token)
                .with_context(|| format!("cannot write the admin token to {}", path.display()))?;
            tracing::info!(path = %path.display(), name, "created the first admin token");
            bootstrap_token = Some(token);
        }
    }
    let listener =
        bind(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::default());
    let config = Arc::new(config);
    let (stop, mut stopped) = watch::channel(false);

    let moves = crate::moves::Driver::spawn(store.clone(), stopped.clone());
    let state = AppState {
        store: store.clone(),
        config: config.clone(),
        metrics,
        stopping: stopped.clone(),
        moves,
        tail: crate::feed::Tail::spawn(store.clone(), stopped.clone()),
        nats: Arc::default(),
    };
    if let Some(nats) = &config.nats {
        crate::fanout::start(state.clone(), nats.clone())
            .await
            .context("nats")?;
        tracing::info!(url = %redact(&nats.url), prefix = nats.prefix, "publishing the change feed to NATS");
    }
    let app = api::router(state);
    let tls = match &config.tls {
        Some(tls) => {
            let options = domicile_certs::ServerOptions {
                client_ca: tls.client_ca.clone(),
                ..Default::default()
            };
            let source = domicile_certs::CertSource {
                cert: tls.cert.clone(),
                key: tls.key.clone(),
            };
            let server = domicile_certs::ServerTls::load(
                vec![source],
                domicile_certs::UnknownName::Default,
                &options,
            )
            .context("tls")?;
            let watcher = server
                .watch(std::time::Duration::from_secs(10))
                .context("tls")?;
            Some((server, watcher))
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, store = store.backend_name(), epoch = store.epoch(), "control plane listening");
    let (task, tls_watcher) = match tls {
        Some((server, watcher)) => (
            tokio::spawn(crate::tls::serve(listener, app, server, stopped)),
            Some(watcher),
        ),
        None => (
            tokio::spawn(async move {
                // A make-service that clones the router (an `Arc`) per connection: serving
                // the `Router` itself rebuilds its route table for every connection, 12 KiB
                // each (heaptrack), which a fleet of proxies holding streams open pays per
                // proxy.
                let serve = axum::serve(listener, app.into_make_service()).with_graceful_shutdown(
                    async move {
                        let _ = stopped.changed().await;
                    },
                );
                if let Err(e) = serve.await {
                    tracing::error!("control-plane listener failed: {e}");
                }
            }),
            None,
        ),
    };
    Ok(RunningControlPlane {
        addr,
        scheme,
        store,
        bootstrap_token,
        stop,
        task,
        _tls_watcher: tls_watcher,
    })
}

/// A store URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// How many connections may wait to be accepted (the kernel caps it at `net.core.somaxconn`).
/// A fleet reconnects all at once after a replica restarts: with the usual 1,024, the
/// connections past it were dropped and their proxies retried a second or more later.
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
