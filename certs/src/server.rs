//! A TLS server's material as one object: its certificates (chosen by SNI), its rustls
//! configuration, and their reload when the files change on disk.
//!
//! A reload builds a whole new [`CertSet`] from every file and swaps it in at once, so a
//! handshake sees either the old set or the new one, never a mix. Connections already open
//! keep the certificate they were established with: nothing about them changes. A reload that
//! fails (a file that does not parse, a key that does not match its certificate, a certificate
//! that has expired or is not valid yet) keeps the current set, is logged, and is counted in
//! [`TlsStats::reloads_failed`]; the error stays readable in [`ServerTls::last_error`] until a
//! reload succeeds.
//!
//! Changes are noticed through filesystem events on the files' directories (which also catches
//! the symlink swap Kubernetes does for mounted secrets) and, as a backstop for filesystems
//! without events, by re-reading the files every `poll` interval. A reload happens only when
//! the bytes differ from the last attempt, so a broken file is reported once, not every poll.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::ServerConfig;

use crate::pem::{self, CertError, LoadedCert};
use crate::sni::{CertSet, SniResolver, TlsStats, UnknownName};

/// One certificate chain and its key, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How the server's rustls configuration is built.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// ALPN protocols offered, most preferred first (`h2`, `http/1.1`).
    pub alpn: Vec<Vec<u8>>,
    /// Sessions kept for resumption by session ID (TLS 1.2) or stateful ticket.
    pub session_cache: usize,
    /// Stateless session tickets (TLS 1.2 and 1.3), with keys rotated every 6 hours.
    pub tickets: bool,
    /// CA certificates whose client certificates are accepted; a certificate from any other
    /// CA is refused in the handshake.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse clients without a certificate too (otherwise they are let in
    /// to authenticate another way).
    pub require_client_cert: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            session_cache: 16 * 1024,
            tickets: true,
            client_ca: None,
            require_client_cert: false,
        }
    }
}

/// A TLS server's certificates and configuration.
#[derive(Debug)]
pub struct ServerTls {
    sources: Vec<CertSource>,
    unknown: UnknownName,
    resolver: Arc<SniResolver>,
    config: Arc<ServerConfig>,
    last_error: Mutex<Option<String>>,
    /// Hash of every file's bytes at the last load attempt.
    fingerprint: Mutex<u64>,
}

fn load_all(sources: &[CertSource]) -> Result<Vec<LoadedCert>, CertError> {
    let provider = pem::provider();
    sources
        .iter()
        .map(|s| pem::load_pair(&s.cert, &s.key, &provider))
        .collect()
}

/// A hash of the files' current bytes (an unreadable file hashes its error kind).
fn fingerprint(sources: &[CertSource]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for source in sources {
        for path in [&source.cert, &source.key] {
            match std::fs::read(path) {
                Ok(bytes) => bytes.hash(&mut hasher),
                Err(e) => (e.kind() as u32).hash(&mut hasher),
            }
        }
    }
    hasher.finish()
}

impl ServerTls {
    /// Loads every certificate. A certificate outside its validity period is served anyway,
    /// with a warning (clients will refuse it; refusing to start would take the listener down
    /// for every name), but a reload never replaces a valid certificate with such a one.
    pub fn load(
        sources: Vec<CertSource>,
        unknown: UnknownName,
        options: &ServerOptions,
    ) -> Result<Arc<Self>, CertError> {
        let print = fingerprint(&sources);
        let certs = load_all(&sources)?;
        let now = SystemTime::now();
        for cert in &certs {
            if let Some(problem) = cert.info.validity_problem(now) {
                tracing::warn!(cert = %cert.cert_path.display(), "{problem}; clients will refuse it");
            }
        }
        let stats = Arc::new(TlsStats::default());
        let resolver = Arc::new(SniResolver::new(CertSet::new(certs, unknown)?, stats));
        let config = Arc::new(build_config(resolver.clone(), options)?);
        Ok(Arc::new(Self {
            sources,
            unknown,
            resolver,
            config,
            last_error: Mutex::new(None),
            fingerprint: Mutex::new(print),
        }))
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    pub fn stats(&self) -> &Arc<TlsStats> {
        self.resolver.stats()
    }

    pub fn certs(&self) -> Arc<CertSet> {
        self.resolver.current()
    }

    /// Why the last reload failed, until one succeeds.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// Reloads the files if their bytes changed since the last attempt. `Ok(true)`: a new set
    /// is being served; `Ok(false)`: nothing changed; `Err`: the current set stays.
    pub fn reload(&self) -> Result<bool, CertError> {
        let print = fingerprint(&self.sources);
        {
            let mut last = self.fingerprint.lock();
            if *last == print {
                return Ok(false);
            }
            *last = print;
        }
        let stats = self.stats();
        let result = load_all(&self.sources).and_then(|certs| {
            let now = SystemTime::now();
            for cert in &certs {
                if let Some(detail) = cert.info.validity_problem(now) {
                    return Err(CertError::Validity {
                        path: cert.cert_path.clone(),
                        detail,
                    });
                }
            }
            CertSet::new(certs, self.unknown)
        });
        match result {
            Ok(set) => {
                let names: Vec<String> = set.names().collect();
                self.resolver.replace(set);
                stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock() = None;
                tracing::info!(?names, "TLS certificates reloaded");
                Ok(true)
            }
            Err(e) => {
                stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock() = Some(e.to_string());
                tracing::error!(
                    "TLS certificate reload rejected, keeping the current certificates: {e}"
                );
                Err(e)
            }
        }
    }

    /// Reloads on every change to the files, until the returned [`Watcher`] is dropped.
    pub fn watch(self: &Arc<Self>, poll: Duration) -> Result<Watcher, CertError> {
        use notify::{RecursiveMode, Watcher as _};
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let events = tx.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event {
                    if !matches!(event.kind, notify::EventKind::Access(_)) {
                        let _ = events.send(());
                    }
                }
            })
            .map_err(|e| CertError::Setup(format!("cannot watch the certificate files: {e}")))?;
        let mut dirs: Vec<PathBuf> = Vec::new();
        for source in &self.sources {
            for path in [&source.cert, &source.key] {
                let dir = parent_dir(path);
                if !dirs.contains(&dir) {
                    watcher
                        .watch(&dir, RecursiveMode::NonRecursive)
                        .map_err(|e| {
                            CertError::Setup(format!("cannot watch {}: {e}", dir.display()))
                        })?;
                    dirs.push(dir);
                }
            }
        }
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("domicile-certs".into())
            .spawn(move || loop {
                match rx.recv_timeout(poll) {
                    // Debounce: writing a certificate and then its key is one change.
                    Ok(()) => while rx.recv_timeout(Duration::from_millis(100)).is_ok() {},
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                let Some(tls) = weak.upgrade() else { return };
                let _ = tls.reload();
            })
            .map_err(|e| CertError::Setup(format!("cannot start the reload thread: {e}")))?;
        Ok(Watcher {
            _notify: watcher,
            _stop: tx,
        })
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Keeps a [`ServerTls`] reloading; dropping it stops the reload thread.
pub struct Watcher {
    _notify: notify::RecommendedWatcher,
    /// The reload thread stops once every sender is gone (this one and the event callback's).
    _stop: std::sync::mpsc::Sender<()>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

fn build_config(
    resolver: Arc<SniResolver>,
    options: &ServerOptions,
) -> Result<ServerConfig, CertError> {
    let provider = pem::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(pem::VERSIONS)
        .map_err(|e| CertError::Setup(e.to_string()))?;
    let builder = match &options.client_ca {
        Some(ca) => {
            let roots = pem::load_roots(ca)?;
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !options.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| CertError::Setup(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = options.alpn.clone();
    config.session_storage = ServerSessionMemoryCache::new(options.session_cache.max(1));
    if options.tickets {
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| CertError::Setup(format!("session tickets: {e}")))?;
    }
    Ok(config)
}
