//! A development PKI: one CA and every certificate a Domicile deployment uses, signed by it.
//!
//! `domicile certs dev DIR --domain example.test` writes (ECDSA P-256 keys, PEM):
//!
//! | file | for | names |
//! | --- | --- | --- |
//! | `ca.pem`, `ca-key.pem` | the CA every other file is signed by | |
//! | `edge.pem`, `edge-key.pem` | the edge listener | `DOMAIN`, `*.DOMAIN`, `localhost`, `*.localhost`, 127.0.0.1, ::1, and `--edge-names` |
//! | `origin-REGION.pem`, `-key.pem` | each region's origins | `REGION.region.DOMAIN` |
//! | `proxy-ID.pem`, `-key.pem` | each proxy, as a client of origins and control plane | `urn:domicile:proxy:ID` |
//! | `control-plane.pem`, `-key.pem` | the control plane's HTTPS listener | `control-plane.DOMAIN`, `localhost`, 127.0.0.1, ::1 |
//!
//! Private keys are written with mode 0600, every file through a temporary file and a rename
//! (a watching server never reads half a file).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::identity::Identity;
use crate::pem::CertError;

fn gen_err(what: &str) -> impl Fn(rcgen::Error) -> CertError + '_ {
    move |e| CertError::Generate(format!("{what}: {e}"))
}

/// A certificate authority held in memory, to sign with.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCa")
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A leaf certificate to issue.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub common_name: String,
    /// DNS names (wildcards allowed) and IP addresses.
    pub names: Vec<String>,
    /// Identities carried as URI names (client certificates).
    pub identities: Vec<Identity>,
    pub usage: Usage,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Leaf {
    /// A certificate valid from an hour ago for `days` days.
    pub fn new(common_name: &str, usage: Usage, days: u64) -> Self {
        let now = SystemTime::now();
        Self {
            common_name: common_name.to_owned(),
            names: Vec::new(),
            identities: Vec::new(),
            usage,
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(days * 86_400),
        }
    }

    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(mut self, names: I) -> Self {
        self.names.extend(names.into_iter().map(Into::into));
        self
    }

    pub fn identity(mut self, role: &str, name: &str) -> Self {
        self.identities.push(Identity {
            role: role.to_owned(),
            name: name.to_owned(),
        });
        self
    }

    pub fn valid(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }
}

/// An issued certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn offset(at: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(at)
}

impl DevCa {
    /// A new CA, valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = offset(now - Duration::from_secs(3600));
        params.not_after = offset(now + Duration::from_secs(3650 * 86_400));
        let cert = params
            .self_signed(&key)
            .map_err(gen_err("CA certificate"))?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues `leaf`, signed by this CA.
    pub fn issue(&self, leaf: &Leaf) -> Result<Issued, CertError> {
        let key = KeyPair::generate().map_err(gen_err("key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, leaf.common_name.as_str());
        params.distinguished_name = dn;
        for name in &leaf.names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into().map_err(gen_err("a DNS name"))?),
            };
            params.subject_alt_names.push(san);
        }
        for identity in &leaf.identities {
            params.subject_alt_names.push(SanType::URI(
                identity.uri().try_into().map_err(gen_err("a URI name"))?,
            ));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match leaf.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset(leaf.not_before);
        params.not_after = offset(leaf.not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err(&leaf.common_name))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What `domicile certs dev` generates.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub domain: String,
    pub regions: Vec<String>,
    pub proxies: Vec<String>,
    /// More names for the edge certificate (hosts clients will use). `*.localhost` is in it,
    /// but TLS clients (webpki, OpenSSL, browsers) do not honour a wildcard directly under a
    /// single-label name, so `acme.localhost` needs to be named.
    pub edge_names: Vec<String>,
    /// Days the leaf certificates are valid.
    pub days: u64,
    /// Replace files that exist (otherwise existing files are an error).
    pub force: bool,
}

/// The name an origin of `region` proves in its certificate: `REGION.region.DOMAIN`.
pub fn region_identity(region: &str, domain: &str) -> String {
    format!("{region}.region.{domain}")
}

/// The files of a development PKI in `dir`.
#[derive(Debug, Clone)]
pub struct DevLayout {
    pub dir: PathBuf,
}

impl DevLayout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    fn pair(&self, stem: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{stem}.pem")),
            self.dir.join(format!("{stem}-key.pem")),
        )
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    pub fn edge(&self) -> (PathBuf, PathBuf) {
        self.pair("edge")
    }
    pub fn origin(&self, region: &str) -> (PathBuf, PathBuf) {
        self.pair(&format!("origin-{region}"))
    }
    pub fn proxy(&self, id: &str) -> (PathBuf, PathBuf) {
        self.pair(&format!("proxy-{id}"))
    }
    pub fn control_plane(&self) -> (PathBuf, PathBuf) {
        self.pair("control-plane")
    }
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks the options: a DNS domain, region ids and proxy ids usable in names.
pub fn check(options: &DevOptions) -> Result<(), CertError> {
    let domain = options.domain.trim_end_matches('.');
    if domain.is_empty() || !domain.split('.').all(valid_label) {
        return Err(CertError::Generate(format!(
            "--domain {:?} is not a lowercase DNS name (like example.test)",
            options.domain
        )));
    }
    for region in &options.regions {
        if !valid_label(region) {
            return Err(CertError::Generate(format!(
                "region {region:?} cannot be a DNS label (lowercase letters, digits, '-')"
            )));
        }
    }
    for proxy in &options.proxies {
        if Identity::from_uri(&format!("{}proxy:{proxy}", crate::identity::URI_PREFIX)).is_none() {
            return Err(CertError::Generate(format!(
                "proxy id {proxy:?} must be 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
    }
    for name in &options.edge_names {
        let bare = name.strip_prefix("*.").unwrap_or(name);
        if name.parse::<IpAddr>().is_err() && (bare.is_empty() || !bare.split('.').all(valid_label))
        {
            return Err(CertError::Generate(format!(
                "edge name {name:?} is not a lowercase DNS name or IP address"
            )));
        }
    }
    if options.days == 0 {
        return Err(CertError::Generate("--days must be at least 1".into()));
    }
    Ok(())
}

/// Generates the development PKI into `dir` and returns the files written.
pub fn generate(dir: &Path, options: &DevOptions) -> Result<Vec<PathBuf>, CertError> {
    check(options)?;
    let domain = options.domain.trim_end_matches('.');
    let layout = DevLayout::new(dir);
    std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut planned: Vec<(PathBuf, PathBuf, Issued)> = Vec::new();
    let ca = DevCa::generate(&format!("Domicile development CA ({domain})"))?;
    let days = options.days;
    let local = ["localhost", "127.0.0.1", "::1"];
    let edge = Leaf::new(&format!("edge.{domain}"), Usage::Server, days).names(
        [
            domain.to_owned(),
            format!("*.{domain}"),
            "*.localhost".into(),
        ]
        .into_iter()
        .chain(local.iter().map(|s| s.to_string()))
        .chain(options.edge_names.iter().cloned()),
    );
    let (c, k) = layout.edge();
    planned.push((c, k, ca.issue(&edge)?));
    for region in &options.regions {
        let identity = region_identity(region, domain);
        let leaf = Leaf::new(&identity, Usage::Server, days).names([identity.clone()]);
        let (c, k) = layout.origin(region);
        planned.push((c, k, ca.issue(&leaf)?));
    }
    for proxy in &options.proxies {
        let leaf =
            Leaf::new(&format!("proxy {proxy}"), Usage::Client, days).identity("proxy", proxy);
        let (c, k) = layout.proxy(proxy);
        planned.push((c, k, ca.issue(&leaf)?));
    }
    let cp = Leaf::new(&format!("control-plane.{domain}"), Usage::Server, days).names(
        [format!("control-plane.{domain}")]
            .into_iter()
            .chain(local.iter().map(|s| s.to_string())),
    );
    let (c, k) = layout.control_plane();
    planned.push((c, k, ca.issue(&cp)?));

    let mut files = vec![layout.ca(), layout.ca_key()];
    for (cert, key, _) in &planned {
        files.push(cert.clone());
        files.push(key.clone());
    }
    if !options.force {
        if let Some(existing) = files.iter().find(|f| f.exists()) {
            return Err(CertError::Generate(format!(
                "{} exists; pass --force to replace the development certificates",
                existing.display()
            )));
        }
    }
    write_file(&layout.ca(), ca.cert_pem(), false)?;
    write_file(&layout.ca_key(), ca.key_pem(), true)?;
    for (cert, key, issued) in &planned {
        write_file(key, &issued.key_pem, true)?;
        write_file(cert, &issued.cert_pem, false)?;
    }
    Ok(files)
}

/// Writes `contents` to `path` through a temporary file and a rename; a private key gets mode
/// 0600 from the moment it exists.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(err)?;
    #[cfg(unix)]
    {
        // The mode given to open() applies only to a file it creates, and is masked by umask.
        use std::os::unix::fs::PermissionsExt;
        let mode = if private { 0o600 } else { 0o644 };
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(err)?;
    }
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err)
}
