//! Choosing the edge certificate for a handshake by its SNI name.
//!
//! Names come from each certificate's subject alternative names. An exact name beats a
//! wildcard; a wildcard `*.example.com` covers exactly one label (`a.example.com`, not
//! `example.com` nor `b.a.example.com`), as RFC 6125 and every browser have it. When two
//! certificates claim the same name, the first one configured keeps it.
//!
//! A name no certificate covers (or no SNI at all, as from a client dialling an IP address)
//! gets the default certificate (the first configured) or a handshake refusal, as configured.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::pem::{CertError, LoadedCert};

/// What a handshake for a name no certificate covers gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownName {
    /// The first configured certificate.
    #[default]
    Default,
    /// A fatal alert: the handshake is refused and counted.
    Refuse,
}

/// The certificates of one generation, indexed by name.
pub struct CertSet {
    exact: HashMap<String, usize>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, usize>,
    certs: Vec<LoadedCert>,
    unknown: UnknownName,
}

impl fmt::Debug for CertSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSet")
            .field("names", &self.names().collect::<Vec<_>>())
            .field("unknown", &self.unknown)
            .finish()
    }
}

impl CertSet {
    pub fn new(certs: Vec<LoadedCert>, unknown: UnknownName) -> Result<Self, CertError> {
        if certs.is_empty() {
            return Err(CertError::Setup(
                "at least one certificate is needed to serve TLS".into(),
            ));
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (index, cert) in certs.iter().enumerate() {
            if cert.info.dns_names.is_empty() && cert.info.ip_addresses.is_empty() {
                return Err(CertError::NoNames {
                    path: cert.cert_path.clone(),
                });
            }
            for name in &cert.info.dns_names {
                let (table, key) = match name.strip_prefix("*.") {
                    Some(suffix) => (&mut wildcard, suffix.to_owned()),
                    None => (&mut exact, name.clone()),
                };
                table.entry(key).or_insert(index);
            }
            for ip in &cert.info.ip_addresses {
                exact.entry(ip.to_string()).or_insert(index);
            }
        }
        Ok(Self {
            exact,
            wildcard,
            certs,
            unknown,
        })
    }

    /// The certificate for `name` (an SNI name, or `None` when the client sent none).
    pub fn lookup(&self, name: Option<&str>) -> Option<&LoadedCert> {
        let index = name
            .and_then(|name| self.index_of(name))
            .or(match self.unknown {
                UnknownName::Default => Some(0),
                UnknownName::Refuse => None,
            })?;
        Some(&self.certs[index])
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        let name = name.trim_end_matches('.');
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        if let Some(&index) = self.exact.get(name) {
            return Some(index);
        }
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.wildcard.get(parent).copied()
    }

    pub fn certs(&self) -> &[LoadedCert] {
        &self.certs
    }

    /// Every name served, wildcards as `*.suffix`.
    pub fn names(&self) -> impl Iterator<Item = String> + '_ {
        self.certs.iter().flat_map(|c| {
            c.info
                .dns_names
                .iter()
                .cloned()
                .chain(c.info.ip_addresses.iter().map(|ip| ip.to_string()))
        })
    }

    /// Seconds until the soonest certificate expiry (negative once one has expired).
    pub fn soonest_expiry(&self, now: SystemTime) -> i64 {
        self.certs
            .iter()
            .map(|c| c.info.seconds_left(now))
            .min()
            .unwrap_or(0)
    }
}

/// Handshake counters of one TLS listener.
#[derive(Debug, Default)]
pub struct TlsStats {
    pub handshakes_full: AtomicU64,
    pub handshakes_resumed: AtomicU64,
    /// Handshakes that failed or timed out (a bad client, an unknown name, a scan).
    pub handshake_failures: AtomicU64,
    /// Handshakes for a name no certificate covers that were refused.
    pub unknown_name_refused: AtomicU64,
    /// Handshakes for a name no certificate covers that got the default certificate.
    pub unknown_name_default: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

/// The edge's [`ResolvesServerCert`]: the current [`CertSet`], swapped whole on reload.
pub struct SniResolver {
    set: ArcSwap<CertSet>,
    stats: Arc<TlsStats>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("set", &self.set.load())
            .finish()
    }
}

impl SniResolver {
    pub fn new(set: CertSet, stats: Arc<TlsStats>) -> Self {
        Self {
            set: ArcSwap::from_pointee(set),
            stats,
        }
    }

    pub fn current(&self) -> Arc<CertSet> {
        self.set.load_full()
    }

    pub(crate) fn replace(&self, set: CertSet) {
        self.set.store(Arc::new(set));
    }

    pub fn stats(&self) -> &Arc<TlsStats> {
        &self.stats
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.set.load();
        let name = hello.server_name();
        if let Some(index) = name.and_then(|n| set.index_of(n)) {
            return Some(set.certs[index].key.clone());
        }
        match set.unknown {
            UnknownName::Default => {
                self.stats
                    .unknown_name_default
                    .fetch_add(1, Ordering::Relaxed);
                Some(set.certs[0].key.clone())
            }
            UnknownName::Refuse => {
                self.stats
                    .unknown_name_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(sni = ?name, "TLS handshake refused: no certificate for the name");
                None
            }
        }
    }
}
