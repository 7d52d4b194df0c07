//! Control-plane configuration (TOML, unknown keys refused). Every setting has a default, so
//! `domicile control-plane` runs with no file at all; flags override the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// Address of the admin API. Default: 127.0.0.1:7700.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// `sqlite://PATH` (created on first start) or `postgres://...`.
    /// Default: `sqlite://domicile.db`.
    #[serde(default = "defaults::store")]
    pub store: String,
    /// When no admin token exists yet, create one and write its secret here (mode 0600).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// How often an idle change stream carries a heartbeat. Default: 5 s.
    #[serde(default = "defaults::feed_heartbeat", with = "humantime_serde")]
    pub feed_heartbeat: Duration,
    /// A proxy not heard from for this long is STALE. Default: 30 s.
    #[serde(default = "defaults::stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
    /// A proxy that has not reported a version committed this long ago is BEHIND. Proxies
    /// report most changes at their next periodic heartbeat (every 5 s by default) and only
    /// a move's freeze and switch at once, so a proxy a few seconds short of the head has
    /// fallen behind nothing yet. Zero compares with the head alone. Default: 10 s.
    #[serde(default = "defaults::behind_after", with = "humantime_serde")]
    pub behind_after: Duration,
    /// How many of the newest versions `GET /v1/map/changes` serves; a proxy further behind
    /// gets 410 and fetches a snapshot (cheaper than replaying that many changes). The history
    /// itself is kept whole. Default: 1,000,000.
    #[serde(default = "defaults::change_retention")]
    pub change_retention: u64,
    /// How often the head version is re-read from the store (PostgreSQL replicas also get a
    /// `NOTIFY` wake-up on every commit). Default: 500 ms.
    #[serde(default = "defaults::poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Largest import body accepted. Default: 2 GiB.
    #[serde(default = "defaults::max_import_bytes")]
    pub max_import_bytes: u64,
    /// Serve the API over HTTPS; cleartext when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Also publish the change feed to NATS JetStream and take heartbeats from it, for
    /// proxies that follow the map through NATS instead of a stream each from a replica.
    #[serde(default)]
    pub nats: Option<NatsConfig>,
}

/// The NATS fan-out tier (docs/control-plane.md, "The NATS fan-out tier").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://host:port` or `tls://host:port`; `user:password@` in it when the server asks.
    pub url: String,
    /// The subjects' prefix, and the stream's name (`<prefix>-map`). Every replica and every
    /// proxy of one control plane uses the same. Default: `domicile`.
    #[serde(default = "defaults::nats_prefix")]
    pub prefix: String,
    /// For `tls://`: the CA (PEM) the NATS server's certificate is signed by.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// How many of the newest changes the stream keeps; a proxy further behind fetches a
    /// snapshot over HTTP. Default: 100,000.
    #[serde(default = "defaults::nats_keep")]
    pub keep: u64,
}

/// The API's HTTPS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The control plane's certificate chain (PEM, leaf first); reloaded when it changes.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA whose client certificates authenticate callers (mTLS): a certificate carrying
    /// `urn:domicile:<role>:<name>` gets that role, as a token would. Callers without a
    /// certificate still authenticate with a bearer token; a certificate from another CA is
    /// refused in the handshake.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

mod defaults {
    use super::*;
    pub fn listen() -> SocketAddr {
        ([127, 0, 0, 1], 7700).into()
    }
    pub fn store() -> String {
        "sqlite://domicile.db".to_owned()
    }
    pub fn feed_heartbeat() -> Duration {
        Duration::from_secs(5)
    }
    pub fn stale_after() -> Duration {
        Duration::from_secs(30)
    }
    pub fn behind_after() -> Duration {
        Duration::from_secs(10)
    }
    pub fn change_retention() -> u64 {
        1_000_000
    }
    pub fn poll_interval() -> Duration {
        Duration::from_millis(500)
    }
    pub fn max_import_bytes() -> u64 {
        2 << 30
    }
    pub fn nats_prefix() -> String {
        domicile_wire::fanout::DEFAULT_PREFIX.to_owned()
    }
    pub fn nats_keep() -> u64 {
        100_000
    }
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        toml::from_str("").expect("every setting has a default")
    }
}

impl ControlPlaneConfig {
    /// Reads a configuration file. Relative paths in it (the SQLite file, the token file)
    /// are taken from the file's directory.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let mut config: Self = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is invalid: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.admin_token_file = config.admin_token_file.map(|p| base.join(p));
        if let Some(tls) = config.tls.as_mut() {
            tls.cert = base.join(&tls.cert);
            tls.key = base.join(&tls.key);
            tls.client_ca = tls.client_ca.as_ref().map(|p| base.join(p));
        }
        if let Some(nats) = config.nats.as_mut() {
            nats.ca = nats.ca.as_ref().map(|p| base.join(p));
        }
        if let Some(file) = config.store.strip_prefix("sqlite://") {
            let file = Path::new(file.split('?').next().unwrap_or(file));
            if file.is_relative() && !file.as_os_str().is_empty() {
                config.store = format!("sqlite://{}", base.join(&config.store[9..]).display());
            }
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        if !(self.store.starts_with("sqlite:")
            || self.store.starts_with("postgres:")
            || self.store.starts_with("postgresql:"))
        {
            errors.push(format!(
                "store: {:?} is not a store URL (expected sqlite://PATH or postgres://...)",
                self.store
            ));
        }
        if self.change_retention == 0 {
            errors.push("change_retention: must be at least 1".to_owned());
        }
        for (key, d) in [
            ("feed_heartbeat", self.feed_heartbeat),
            ("stale_after", self.stale_after),
            ("poll_interval", self.poll_interval),
        ] {
            if d.is_zero() {
                errors.push(format!("{key}: must be longer than zero"));
            }
        }
        if let Some(tls) = &self.tls {
            let provider = domicile_certs::pem::provider();
            if let Err(e) = domicile_certs::pem::load_pair(&tls.cert, &tls.key, &provider) {
                errors.push(format!("tls: {e}"));
            }
            if let Some(ca) = &tls.client_ca {
                if let Err(e) = domicile_certs::pem::load_roots(ca) {
                    errors.push(format!("tls.client_ca: {e}"));
                }
            }
        }
        if let Some(nats) = &self.nats {
            if !(nats.url.starts_with("nats://") || nats.url.starts_with("tls://")) {
                errors.push(format!(
                    "nats.url: {:?} is not a NATS URL (expected nats://host:port or tls://host:port)",
                    crate::server::redact(&nats.url)
                ));
            }
            if !domicile_wire::fanout::is_valid_prefix(&nats.prefix) {
                errors.push(format!(
                    "nats.prefix: {:?} is not valid (1 to 32 of A-Z a-z 0-9 _ -)",
                    nats.prefix
                ));
            }
            if nats.keep == 0 || nats.keep > i64::MAX as u64 {
                errors.push("nats.keep: must be at least 1".to_owned());
            }
            if let Some(ca) = &nats.ca {
                if let Err(e) = domicile_certs::pem::load_roots(ca) {
                    errors.push(format!("nats.ca: {e}"));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!(
                "invalid control-plane configuration:\n  {}",
                errors.join("\n  ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let config = ControlPlaneConfig::default();
        assert_eq!(config.listen.port(), 7700);
        assert!(config.validate().is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.toml");
        std::fs::write(
            &path,
            "store = \"sqlite://cp.db\"\nadmin_token_file = \"admin.token\"\n",
        )
        .unwrap();
        let config = ControlPlaneConfig::from_file(&path).unwrap();
        assert_eq!(
            config.store,
            format!("sqlite://{}", dir.path().join("cp.db").display())
        );
        assert_eq!(
            config.admin_token_file.unwrap(),
            dir.path().join("admin.token")
        );
        std::fs::write(&path, "store = \"mysql://x\"\nchange_retention = 0\n").unwrap();
        let err = ControlPlaneConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("store:") && err.contains("change_retention"),
            "{err}"
        );
        std::fs::write(
            &path,
            "[nats]\nurl = \"http://x:4222\"\nprefix = \"a.b\"\nkeep = 0\n",
        )
        .unwrap();
        let err = ControlPlaneConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nats.url") && err.contains("nats.prefix") && err.contains("nats.keep"),
            "{err}"
        );
        std::fs::write(&path, "[nats]\nurl = \"nats://127.0.0.1:4222\"\n").unwrap();
        let nats = ControlPlaneConfig::from_file(&path).unwrap().nats.unwrap();
        assert_eq!((nats.prefix.as_str(), nats.keep), ("domicile", 100_000));
        std::fs::write(&path, "colour = \"red\"\n").unwrap();
        let err = ControlPlaneConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
    }
}
