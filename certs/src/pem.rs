//! Reading certificates and keys from PEM files, and what a certificate says of itself (names,
//! validity) as the rest of the crate needs it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

/// Why TLS material could not be used. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no PEM certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no PEM private key in the file (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: {detail}", path.display())]
    BadPem { path: PathBuf, detail: String },
    #[error("{}: the certificate does not parse: {detail}", path.display())]
    BadCertificate { path: PathBuf, detail: String },
    #[error("{}: the private key cannot be used: {detail}", path.display())]
    BadKey { path: PathBuf, detail: String },
    #[error("{} and {}: the private key does not belong to the certificate", cert.display(), key.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: {detail}", path.display())]
    Validity { path: PathBuf, detail: String },
    #[error("{}: the certificate names no DNS name or IP address to serve", path.display())]
    NoNames { path: PathBuf },
    #[error("TLS setup: {0}")]
    Setup(String),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Generate(String),
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoKey {
            path: path.to_owned(),
        },
        e => CertError::BadPem {
            path: path.to_owned(),
            detail: e.to_string(),
        },
    })
}

/// Trust anchors from a PEM file of CA certificates.
pub fn load_roots(path: &Path) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| CertError::BadCertificate {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// What a leaf certificate says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names, lowercase, wildcards kept as `*.example.com`.
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    /// URI names (the role of a client certificate, see [`crate::identity`]).
    pub uris: Vec<String>,
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Result<Self, String> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
        let mut info = CertInfo {
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: Vec::new(),
            subject: cert.subject().to_string(),
            not_before: to_system_time(cert.validity().not_before.timestamp()),
            not_after: to_system_time(cert.validity().not_after.timestamp()),
        };
        if let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => info.dns_names.push(dns.to_ascii_lowercase()),
                    GeneralName::URI(uri) => info.uris.push((*uri).to_owned()),
                    GeneralName::IPAddress(bytes) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                            info.ip_addresses.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                            info.ip_addresses.push(IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(info)
    }

    /// Why the certificate cannot be used at `now`, if it cannot: expired or not yet valid.
    pub fn validity_problem(&self, now: SystemTime) -> Option<String> {
        if now > self.not_after {
            Some(format!(
                "the certificate expired at {}",
                humantime_like(self.not_after)
            ))
        } else if now < self.not_before {
            Some(format!(
                "the certificate is not valid until {}",
                humantime_like(self.not_before)
            ))
        } else {
            None
        }
    }

    /// Seconds until `not_after`, negative once expired (for the expiry gauge).
    pub fn seconds_left(&self, now: SystemTime) -> i64 {
        match self.not_after.duration_since(now) {
            Ok(left) => left.as_secs() as i64,
            Err(past) => -(past.duration().as_secs() as i64),
        }
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

/// RFC 3339 in UTC, to the second.
pub(crate) fn humantime_like(at: SystemTime) -> String {
    let unix = match at.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix} (unix time)"),
    }
}

/// A certificate chain with its private key, checked to belong together, and what the leaf says.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// Loads `cert` (a PEM chain, leaf first) and `key`, and checks that they belong together.
pub fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<LoadedCert, CertError> {
    let chain = load_certs(cert)?;
    let info = CertInfo::parse(&chain[0]).map_err(|detail| CertError::BadCertificate {
        path: cert.to_owned(),
        detail,
    })?;
    let private = load_key(key)?;
    let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => CertError::KeyMismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
        },
        e => CertError::BadKey {
            path: key.to_owned(),
            detail: e.to_string(),
        },
    })?;
    Ok(LoadedCert {
        key: Arc::new(certified),
        info,
        cert_path: cert.to_owned(),
        key_path: key.to_owned(),
    })
}

/// The crypto provider every Domicile TLS endpoint uses: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// TLS 1.3 and 1.2, nothing older.
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
