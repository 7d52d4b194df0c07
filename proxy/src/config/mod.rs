//! Proxy configuration: TOML text -> typed sections -> validated [`ProxyConfig`].
//!
//! Unknown keys are errors (a typo in a residency rule must not pass silently). Every section,
//! every region and every identification rule is parsed on its own and then validated, so one
//! run of `domicile check-config` reports every problem it can find, each with the key at fault.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;

mod rules;

pub use rules::{compile_rule, Pattern};

use domicile_wire::is_valid_region_id;

/// Parses an endpoint, `host:port` or `http://host:port`, into its `host:port`.
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let bare = match text.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "endpoint {text:?}: scheme {scheme:?} is not supported (use host:port or http://host:port)"
            ))
        }
        None => text,
    };
    let bare = bare.trim_end_matches('/');
    let authority: http::uri::Authority = bare
        .parse()
        .map_err(|_| format!("endpoint {text:?} is not host:port"))?;
    if authority.port_u16().is_none() {
        return Err(format!("endpoint {text:?} needs a port"));
    }
    if bare.contains(['/', '@']) {
        return Err(format!(
            "endpoint {text:?} must be host:port without path or user"
        ));
    }
    Ok(authority.as_str().to_owned())
}

/// Longest timeout accepted: deadlines computed from it must never overflow a clock.
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Checks of files that other parts of the proxy read and own the format of (the GeoIP
/// database, the audit signing key), for a configuration check that reports every problem.
/// Configuration itself reads no such file.
pub trait FileChecks {
    fn geoip_database(&self, path: &Path) -> Result<(), String>;
    fn signing_key(&self, path: &Path) -> Result<(), String>;
}

/// A validated proxy configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub proxy: ProxySection,
    pub map: MapSection,
    /// Where the map comes from when it is not a file: the control plane.
    pub control_plane: Option<ControlPlaneSection>,
    pub identify: IdentifySection,
    pub limits: Limits,
    /// How this edge reaches each region, by region id.
    pub regions: BTreeMap<String, RegionRoute>,
    /// The routing audit log; off when the section is absent.
    pub audit: Option<AuditSection>,
    /// The HTTPS listener; off when the section is absent.
    pub tls: Option<TlsSection>,
}

/// The HTTPS listener for client traffic (beside `proxy.listen`, which stays cleartext).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Address for HTTPS client traffic (HTTP/1.1 and HTTP/2 by ALPN).
    pub listen: SocketAddr,
    /// Certificates, chosen by SNI from their DNS names (wildcards included). The first one
    /// is the default certificate.
    pub certificates: Vec<CertificateFiles>,
    /// A name no certificate covers, or no SNI: `default` (the first certificate, the
    /// default) or `refuse` (the handshake fails with an alert).
    #[serde(default)]
    pub unknown_name: UnknownNamePolicy,
    /// Backstop re-read of the files for filesystems without change events. Default: 10 s.
    #[serde(default = "defaults::tls_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Time allowed for a TLS handshake. Default: 10 s.
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Stateless session tickets for resumption. Default: true.
    #[serde(default = "defaults::yes")]
    pub session_tickets: bool,
    /// Sessions kept in memory for resumption by session id. Default: 16384.
    #[serde(default = "defaults::session_cache")]
    pub session_cache: usize,
}

/// A PEM certificate chain (leaf first) and its private key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownNamePolicy {
    #[default]
    Default,
    Refuse,
}

/// TLS to one region's origins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginTlsSection {
    /// CA certificates (PEM) the region's origins are signed by; no other CA is trusted.
    pub ca: PathBuf,
    /// The name every origin of the region must prove in its certificate (a DNS SAN), for
    /// example `eu.region.example.com`. It is also sent as SNI. An origin whose certificate
    /// does not carry it is refused with 502 `upstream_wrong_region` and nothing is sent.
    pub identity: String,
    /// Client certificate presented to the origins (mTLS), with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// This proxy's id in the fleet and in audit records. Default: `domicile-<hostname>`.
    #[serde(default)]
    pub id: Option<String>,
    /// The region this edge runs in (used by `unidentified = "edge-region"`).
    pub edge_region: String,
    /// Address for client traffic (HTTP/1.1 and HTTP/2 cleartext on one port).
    pub listen: SocketAddr,
    /// Address for `/healthz`, `/readyz` and `/metrics`. Default: none.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// Peers whose `Forwarded` / `X-Forwarded-For` headers are trusted (CIDR). Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// MaxMind database (GeoIP2/GeoLite2 Country or City) for `nearest-region`.
    #[serde(default)]
    pub geoip_database: Option<PathBuf>,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT. Default: 30 s.
    #[serde(default = "defaults::shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Seconds sent in `Retry-After` with `workspace_moving`. Default: 5.
    #[serde(default = "defaults::moving_retry_after")]
    pub moving_retry_after: u32,
    /// Threads serving client traffic. Default: the CPUs this process may run on.
    #[serde(default)]
    pub workers: Option<usize>,
}

/// Most worker threads a proxy may be configured with.
pub const MAX_WORKERS: usize = 1024;

impl ProxySection {
    /// The number of worker threads: `workers`, or the CPUs this process may run on.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapSection {
    /// A map file in JSON lines (see docs/map-file.md). Reloaded when it changes.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Reload the map file when it changes. Default: true.
    #[serde(default = "defaults::yes")]
    pub watch: bool,
}

/// Following the control plane's map (docs/control-plane.md, "The proxy side").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneSection {
    /// The control plane's base URL, `http://host:port` or `https://host:port`.
    pub url: String,
    /// For `https`: the CA (PEM) the control plane's certificate is signed by.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// For `https`: a client certificate (role `proxy`, `urn:domicile:proxy:<proxy id>`) that
    /// authenticates this proxy instead of a token, with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// A file holding the proxy's bearer token (role `proxy`); read at every reconnect, so a
    /// rotated token is picked up without a restart.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The token itself (prefer `token_file`, or the environment variable
    /// `DOMICILE_PROXY_TOKEN`).
    #[serde(default)]
    pub token: Option<String>,
    /// The last-known-good map, served at start when the control plane is unreachable.
    /// Default: `last-known-good.map` beside the configuration file.
    #[serde(default = "defaults::last_known_good")]
    pub last_known_good: PathBuf,
    /// Heartbeat period (one is also sent as soon as a new version is persisted). Default: 5 s.
    #[serde(default = "defaults::heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Reconnect when the change stream is silent (no change, no heartbeat) this long.
    /// Default: 20 s.
    #[serde(default = "defaults::stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Timeout for connecting and for each plain request. Default: 5 s.
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First reconnect delay; doubles up to `backoff_max`; each delay is drawn between half that and all of it. Default: 100 ms.
    #[serde(default = "defaults::backoff_initial", with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest reconnect delay. Default: 10 s.
    #[serde(default = "defaults::backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Follow the map through the control plane's NATS fan-out tier instead of a change
    /// stream from a replica; heartbeats go through NATS too. Snapshots still come from
    /// `url`.
    #[serde(default)]
    pub nats: Option<NatsSection>,
}

/// `[control_plane.nats]`: the fan-out tier the control plane publishes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSection {
    /// `nats://host:port` or `tls://host:port`; `user:password@` in it when the server asks.
    pub url: String,
    /// The subject prefix the control plane publishes under. Default: `domicile`.
    #[serde(default = "defaults::nats_prefix")]
    pub prefix: String,
    /// For `tls://`: the CA (PEM) the NATS server's certificate is signed by.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl ControlPlaneSection {
    /// The bearer token: `token`, else `token_file`, else `DOMICILE_PROXY_TOKEN`. `None`: no
    /// token is configured and the client certificate authenticates the proxy.
    pub fn read_token(&self) -> Result<Option<String>, String> {
        if let Some(token) = &self.token {
            return Ok(Some(token.trim().to_owned()));
        }
        if let Some(path) = &self.token_file {
            return std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|e| format!("cannot read the token file {}: {e}", path.display()));
        }
        match std::env::var("DOMICILE_PROXY_TOKEN") {
            Ok(token) => Ok(Some(token.trim().to_owned())),
            Err(_) if self.cert.is_some() => Ok(None),
            Err(_) => Err(
                "no token: set control_plane.token_file, control_plane.token or DOMICILE_PROXY_TOKEN (or a client certificate with cert and key)"
                    .to_owned(),
            ),
        }
    }

    /// The client certificate, when configured.
    pub fn client_certificate(&self) -> Option<domicile_certs::CertSource> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(domicile_certs::CertSource {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifySection {
    /// Rules, all evaluated; every rule that finds an id must agree.
    #[serde(default, skip)]
    pub rules: Vec<Rule>,
    /// What to do when no rule finds an id. Default: `refuse`.
    #[serde(default)]
    pub unidentified: Unidentified,
    /// Refuse (421) requests that arrive on another region's `regional_hosts`. Default: false.
    #[serde(default)]
    pub strict_regional_hosts: bool,
}

/// One identification rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "from", rename_all = "lowercase", deny_unknown_fields)]
pub enum Rule {
    /// `{workspace}.app.example.com`: one `{workspace}` label of the host.
    Host { pattern: String },
    /// `/workspaces/{workspace}/`: one `{workspace}` segment of the path.
    Path { pattern: String },
    /// The value of a request header.
    Header { name: String },
    /// The value of a query parameter.
    Query { name: String },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unidentified {
    /// 400 `missing_workspace`.
    #[default]
    Refuse,
    /// Forward to this edge's own region.
    EdgeRegion,
    /// Forward to the region whose jurisdiction holds the client's country (GeoIP), else the
    /// edge region.
    NearestRegion,
}

/// The routing audit log (docs/audit.md): one record per routing decision, chained and signed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Directory of the segment files, created if missing. One proxy per directory (a lock
    /// file keeps a second one out).
    pub dir: PathBuf,
    /// The Ed25519 private key that signs checkpoints (PKCS#8 PEM, from `domicile audit
    /// keygen`). The public key is served at the admin listener's `/audit/public-key`.
    pub signing_key: PathBuf,
    /// Group commit: queued records are written and fsynced at most this long after the
    /// previous commit. Default: 10 ms.
    #[serde(default = "defaults::commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// A signed checkpoint at least this often, also when no request comes. Default: 10 s
    /// (at most 10 s).
    #[serde(default = "defaults::checkpoint_interval", with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// A segment is closed and a new one begun at this size, in bytes. Default: 64 MiB.
    #[serde(
        default = "defaults::segment_max_bytes",
        deserialize_with = "size::deserialize"
    )]
    pub segment_max_bytes: u64,
    /// ... or this long after it was begun. Default: 1 h.
    #[serde(default = "defaults::segment_max_age", with = "humantime_serde")]
    pub segment_max_age: Duration,
    /// Most records reserved at once: requests in flight plus records not yet on disk. Past
    /// it, requests get `audit_unavailable`. Default: 65536.
    #[serde(default = "defaults::queue_capacity")]
    pub queue_capacity: usize,
    /// Client addresses in records: `full` (default), `truncated` (/24 for IPv4, /48 for
    /// IPv6) or `none`.
    #[serde(default)]
    pub client_ip: ClientIpMode,
    /// When a decision cannot be recorded (queue full, disk failing): `refuse` answers 503
    /// `audit_unavailable` (default); `serve` forwards it unrecorded. Either way it is counted
    /// and the next checkpoint states it.
    #[serde(default)]
    pub on_failure: OnFailure,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientIpMode {
    #[default]
    Full,
    Truncated,
    None,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Refuse,
    Serve,
}

/// Longest `audit.checkpoint_interval`: a silent period longer than this would not be provable.
pub const MAX_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// Limits, each with a safe default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Time to receive a complete request head, counted from when the connection starts
    /// waiting for it (so it also bounds idle time between HTTP/1.1 requests). 408. Default: 10 s.
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed; a body that moves no
    /// byte for this long is aborted. Default: 60 s.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers), in bytes. 431. Default: 16384.
    #[serde(
        default = "defaults::max_header_bytes",
        deserialize_with = "size::deserialize"
    )]
    pub max_header_bytes: u64,
    /// Most request header fields. 431. Default: 100.
    #[serde(default = "defaults::max_headers")]
    pub max_headers: usize,
    /// Largest request body, in bytes (integer or "100MiB"); per region override. 413.
    /// Default: 100 MiB.
    #[serde(
        default = "defaults::max_body_bytes",
        deserialize_with = "size::deserialize"
    )]
    pub max_body_bytes: u64,
    /// Time to connect to an upstream endpoint. Default: 2 s.
    #[serde(
        default = "defaults::upstream_connect_timeout",
        with = "humantime_serde"
    )]
    pub upstream_connect_timeout: Duration,
    /// Time from sending a request upstream to receiving its response head. 504. Default: 30 s.
    #[serde(
        default = "defaults::upstream_response_timeout",
        with = "humantime_serde"
    )]
    pub upstream_response_timeout: Duration,
    /// Extra attempts for idempotent requests without a body, each to another endpoint of the
    /// same region. Default: 1.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// Most concurrent HTTP/2 streams per client connection. Default: 256.
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Most client connections this process holds open (all workers, both listeners); past
    /// it a new connection is answered 503 `overloaded` (cleartext) or closed (TLS) at once.
    /// Default: 16384.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u64,
    /// HTTP/2: streams a client may open and reset before the proxy has accepted them (the
    /// "rapid reset" attack); past it the connection gets GOAWAY `ENHANCE_YOUR_CALM`.
    /// Default: 20.
    #[serde(default = "defaults::h2_max_pending_reset_streams")]
    pub h2_max_pending_reset_streams: usize,
    /// HTTP/2: streams the proxy may reset for the client's protocol errors on one connection
    /// before it sends GOAWAY. Default: 256.
    #[serde(default = "defaults::h2_max_local_error_resets")]
    pub h2_max_local_error_resets: usize,
    /// HTTP/2: bytes buffered for sending per stream. Default: 400 KiB.
    #[serde(
        default = "defaults::h2_max_send_buffer",
        deserialize_with = "size::deserialize"
    )]
    pub h2_max_send_buffer: u64,
    /// HTTP/2: time to answer a PING before the connection is closed. Default: 20 s.
    #[serde(default = "defaults::h2_keep_alive_timeout", with = "humantime_serde")]
    pub h2_keep_alive_timeout: Duration,
}

impl Limits {
    /// The most bytes a request head may take before it is cut off: twice `max_header_bytes`
    /// (at least 16 KiB), so that heads between the two get the pipeline's JSON 431.
    pub fn head_buffer_cap(&self) -> usize {
        (self.max_header_bytes as usize)
            .saturating_mul(2)
            .max(16 * 1024)
    }
}

impl Default for Limits {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|e| unreachable!("defaults parse: {e}"))
    }
}

/// How this edge reaches one region.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRoute {
    /// `host:port` endpoints (or `http://host:port`), load-balanced round robin.
    pub endpoints: Vec<String>,
    /// `http1` (default) or `h2c` (HTTP/2 with prior knowledge) to the origins.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Overrides `limits.max_body_bytes` for workspaces homed here.
    #[serde(default, deserialize_with = "size::deserialize_opt")]
    pub max_body_bytes: Option<u64>,
    /// Hostnames (exact, or `*.suffix`) that belong to this region, for strict mode.
    #[serde(default)]
    pub regional_hosts: Vec<String>,
    #[serde(default)]
    pub health: HealthCheck,
    #[serde(default)]
    pub ejection: Ejection,
    /// TLS to the origins; cleartext when absent.
    #[serde(default)]
    pub tls: Option<OriginTlsSection>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2c,
}

/// Active health checks: `GET path` on every endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path to probe; a 2xx or 3xx answer is healthy. Default: `/healthz`.
    #[serde(default = "defaults::health_path")]
    pub path: String,
    /// Default: 2 s.
    #[serde(default = "defaults::health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Default: 1 s.
    #[serde(default = "defaults::health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passes to mark an endpoint healthy again. Default: 1.
    #[serde(default = "defaults::one")]
    pub healthy_threshold: u32,
    /// Consecutive failures to mark an endpoint unhealthy. Default: 2.
    #[serde(default = "defaults::two")]
    pub unhealthy_threshold: u32,
    /// Turn active checks off (passive ejection still applies). Default: true.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
}

impl Default for HealthCheck {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|e| unreachable!("defaults parse: {e}"))
    }
}

/// Passive ejection: endpoints that fail requests are taken out for a while.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ejection {
    /// Consecutive failed requests (connect errors, resets, timeouts) that eject an endpoint.
    /// Default: 3.
    #[serde(default = "defaults::three")]
    pub consecutive_failures: u32,
    /// How long an ejected endpoint stays out. Default: 10 s.
    #[serde(default = "defaults::ejection_time", with = "humantime_serde")]
    pub duration: Duration,
}

impl Default for Ejection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|e| unreachable!("defaults parse: {e}"))
    }
}

mod defaults {
    use std::time::Duration;
    pub fn commit_interval() -> Duration {
        Duration::from_millis(10)
    }
    pub fn checkpoint_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn segment_max_bytes() -> u64 {
        64 << 20
    }
    pub fn segment_max_age() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn queue_capacity() -> usize {
        65536
    }
    pub fn last_known_good() -> std::path::PathBuf {
        "last-known-good.map".into()
    }
    pub fn nats_prefix() -> String {
        domicile_wire::fanout::DEFAULT_PREFIX.to_owned()
    }
    pub fn heartbeat_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn stall_timeout() -> Duration {
        Duration::from_secs(20)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn backoff_initial() -> Duration {
        Duration::from_millis(100)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(10)
    }
    pub fn shutdown_grace() -> Duration {
        Duration::from_secs(30)
    }
    pub fn moving_retry_after() -> u32 {
        5
    }
    pub fn tls_reload_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn session_cache() -> usize {
        16 * 1024
    }
    pub fn yes() -> bool {
        true
    }
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_header_bytes() -> u64 {
        16 * 1024
    }
    pub fn max_headers() -> usize {
        100
    }
    pub fn max_body_bytes() -> u64 {
        100 * 1024 * 1024
    }
    pub fn upstream_connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn upstream_response_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn retries() -> u32 {
        1
    }
    pub fn max_concurrent_streams() -> u32 {
        256
    }
    pub fn max_connections() -> u64 {
        16_384
    }
    pub fn h2_max_pending_reset_streams() -> usize {
        20
    }
    pub fn h2_max_local_error_resets() -> usize {
        256
    }
    pub fn h2_max_send_buffer() -> u64 {
        400 * 1024
    }
    pub fn h2_keep_alive_timeout() -> Duration {
        Duration::from_secs(20)
    }
    pub fn health_path() -> String {
        "/healthz".into()
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(2)
    }
    pub fn health_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn one() -> u32 {
        1
    }
    pub fn two() -> u32 {
        2
    }
    pub fn three() -> u32 {
        3
    }
    pub fn ejection_time() -> Duration {
        Duration::from_secs(10)
    }
}

/// Byte sizes: an integer, or a string like `"64KiB"`, `"100MiB"`, `"1GiB"`, `"512"`.
mod size {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }

    pub fn parse(text: &str) -> Result<u64, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (num, unit) = text.split_at(split);
        let num: u64 = num.parse().map_err(|_| format!("{text:?} is not a size"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} (use B, KiB, MiB, GiB, TiB)"
                ))
            }
        };
        num.checked_mul(mult)
            .ok_or_else(|| format!("{text:?} is too large"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(n),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }

    pub fn deserialize_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        deserialize(d).map(Some)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One problem, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn render(errors: &[ConfigError]) -> String {
    let mut out = format!(
        "{} error{} in configuration:",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for e in errors {
        out.push_str(&format!("\n  {}: {}", e.key, e.message));
    }
    out
}

struct Collector(Vec<ConfigError>);

impl Collector {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Deserializes one section, recording the error (with the exact key path) on failure.
    fn section<T: DeserializeOwned>(&mut self, key: &str, value: toml::Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = e.path().to_string();
                let full = if inner == "." || inner.is_empty() {
                    key.to_owned()
                } else {
                    format!("{key}.{inner}")
                };
                self.push(full, e.into_inner().to_string());
                None
            }
        }
    }
}

impl ProxyConfig {
    /// Reads and validates a config file; relative paths in it are taken from its directory.
    pub fn from_file(path: &Path) -> Result<Self, ConfigErrors> {
        Self::from_file_with(path, None)
    }

    /// As [`ProxyConfig::from_file`], also opening the files other parts read with `checks`,
    /// so that one run reports every problem.
    pub fn from_file_with(
        path: &Path,
        checks: Option<&dyn FileChecks>,
    ) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                key: path.display().to_string(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_with(&text, base, checks)
    }

    /// Parses and validates config text; relative paths are resolved against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, ConfigErrors> {
        Self::from_toml_with(text, base, None)
    }

    fn from_toml_with(
        text: &str,
        base: &Path,
        checks: Option<&dyn FileChecks>,
    ) -> Result<Self, ConfigErrors> {
        let mut errors = Collector(Vec::new());
        let mut doc: toml::Table = match text.parse() {
            Ok(doc) => doc,
            Err(e) => {
                errors.push("(syntax)", e.to_string().trim().to_owned());
                return Err(ConfigErrors(errors.0));
            }
        };
        let take = |doc: &mut toml::Table, key: &str| {
            doc.remove(key)
                .unwrap_or_else(|| toml::Value::Table(Default::default()))
        };

        let proxy_value = doc.remove("proxy");
        let proxy: Option<ProxySection> = match proxy_value {
            Some(v) => errors.section("proxy", v),
            None => {
                errors.push(
                    "proxy",
                    "missing section [proxy] (edge_region and listen are required)",
                );
                None
            }
        };
        let map: Option<MapSection> = errors.section("map", take(&mut doc, "map"));
        let control_plane: Option<ControlPlaneSection> = match doc.remove("control_plane") {
            Some(v) => errors.section("control_plane", v),
            None => None,
        };
        if let Some(cp) = &control_plane {
            validate_control_plane(cp, base, &mut errors);
            if map.as_ref().is_some_and(|m| m.file.is_some()) {
                errors.push(
                    "map.file",
                    "map.file and [control_plane] are two sources for the map; use one",
                );
            }
        }
        let limits: Option<Limits> = errors.section("limits", take(&mut doc, "limits"));
        let audit: Option<AuditSection> = match doc.remove("audit") {
            Some(v) => errors.section("audit", v),
            None => None,
        };
        if let Some(audit) = &audit {
            validate_audit(audit, &mut errors);
            if let Some(checks) = checks {
                if let Err(e) = checks.signing_key(&base.join(&audit.signing_key)) {
                    errors.push("audit.signing_key", e);
                }
            }
        }
        let tls: Option<TlsSection> = match doc.remove("tls") {
            Some(v) => errors.section("tls", v),
            None => None,
        };
        if let Some(tls) = &tls {
            validate_tls(tls, base, &mut errors);
        }

        let mut identify_value = take(&mut doc, "identify");
        let rules_value = identify_value
            .as_table_mut()
            .and_then(|t| t.remove("rules"));
        let mut identify: Option<IdentifySection> = errors.section("identify", identify_value);
        let mut rules = Vec::new();
        match rules_value {
            None => {}
            Some(toml::Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    if let Some(rule) =
                        errors.section::<Rule>(&format!("identify.rules[{i}]"), item)
                    {
                        if let Err(msg) = compile_rule(&rule) {
                            errors.push(format!("identify.rules[{i}]"), msg);
                        }
                        rules.push(rule);
                    }
                }
            }
            Some(_) => errors.push("identify.rules", "must be an array of rules"),
        }
        if let Some(identify) = identify.as_mut() {
            identify.rules = rules;
        }

        let mut regions = BTreeMap::new();
        match doc.remove("regions") {
            None => {}
            Some(toml::Value::Table(table)) => {
                for (id, value) in table {
                    let key = format!("regions.{id}");
                    if !is_valid_region_id(&id) {
                        errors.push(&key, "region id must match [a-z][a-z0-9-]{0,31}");
                    }
                    if let Some(mut route) = errors.section::<RegionRoute>(&key, value) {
                        validate_route(&key, &route, base, &mut errors);
                        // Endpoints as `host:port` from here on.
                        route.endpoints = route
                            .endpoints
                            .iter()
                            .filter_map(|e| parse_endpoint(e).ok())
                            .collect();
                        regions.insert(id, route);
                    }
                }
            }
            Some(_) => errors.push("regions", "must be a table of regions"),
        }
        for key in doc.keys() {
            errors.push(
                key.as_str(),
                "unknown section (expected proxy, map, control_plane, identify, limits, regions, audit, tls)",
            );
        }

        if let Some(proxy) = &proxy {
            if !is_valid_region_id(&proxy.edge_region) {
                errors.push(
                    "proxy.edge_region",
                    "region id must match [a-z][a-z0-9-]{0,31}",
                );
            }
            if let Some(id) = &proxy.id {
                if !domicile_wire::is_valid_proxy_id(id) {
                    errors.push(
                        "proxy.id",
                        "must be 1-128 printable characters without spaces",
                    );
                }
            }
        }
        if let (Some(proxy), Some(checks)) = (&proxy, checks) {
            if let Some(path) = &proxy.geoip_database {
                if let Err(e) = checks.geoip_database(&base.join(path)) {
                    errors.push("proxy.geoip_database", e);
                }
            }
        }
        if let Some(proxy) = &proxy {
            if proxy.shutdown_grace > MAX_TIMEOUT {
                errors.push("proxy.shutdown_grace", "must be at most 7 days");
            }
            if proxy.workers.is_some_and(|w| w == 0 || w > MAX_WORKERS) {
                errors.push(
                    "proxy.workers",
                    format!("must be between 1 and {MAX_WORKERS}"),
                );
            }
        }
        if let Some(limits) = &limits {
            if limits.max_header_bytes < 1024 {
                errors.push("limits.max_header_bytes", "must be at least 1024");
            }
            if limits.max_headers == 0 {
                errors.push("limits.max_headers", "must be at least 1");
            }
            if limits.max_connections == 0 {
                errors.push("limits.max_connections", "must be at least 1");
            }
            if limits.max_concurrent_streams == 0 {
                errors.push("limits.max_concurrent_streams", "must be at least 1");
            }
            if limits.h2_max_send_buffer == 0 || limits.h2_max_send_buffer > u64::from(u32::MAX) {
                errors.push(
                    "limits.h2_max_send_buffer",
                    "must be between 1 byte and 4 GiB",
                );
            }
            for (key, d) in [
                ("limits.header_read_timeout", limits.header_read_timeout),
                ("limits.idle_timeout", limits.idle_timeout),
                (
                    "limits.upstream_connect_timeout",
                    limits.upstream_connect_timeout,
                ),
                (
                    "limits.upstream_response_timeout",
                    limits.upstream_response_timeout,
                ),
                ("limits.h2_keep_alive_timeout", limits.h2_keep_alive_timeout),
            ] {
                if d.is_zero() {
                    errors.push(key, "must be greater than zero");
                } else if d > MAX_TIMEOUT {
                    errors.push(key, "must be at most 7 days");
                }
            }
        }
        if let (Some(identify), Some(proxy)) = (&identify, &proxy) {
            if identify.unidentified == Unidentified::NearestRegion
                && proxy.geoip_database.is_none()
            {
                errors.push(
                    "identify.unidentified",
                    "\"nearest-region\" needs proxy.geoip_database",
                );
            }
        }
        if let Some(identify) = &identify {
            if identify.strict_regional_hosts
                && regions.values().all(|r| r.regional_hosts.is_empty())
            {
                errors.push(
                    "identify.strict_regional_hosts",
                    "strict mode needs regional_hosts on at least one region",
                );
            }
        }

        match (proxy, map, identify, limits) {
            (Some(mut proxy), Some(mut map), Some(identify), Some(limits))
                if errors.0.is_empty() =>
            {
                proxy.geoip_database = proxy.geoip_database.map(|p| base.join(p));
                map.file = map.file.map(|p| base.join(p));
                let control_plane = control_plane.map(|mut cp| {
                    cp.token_file = cp.token_file.map(|p| base.join(p));
                    cp.ca = cp.ca.map(|p| base.join(p));
                    cp.cert = cp.cert.map(|p| base.join(p));
                    cp.key = cp.key.map(|p| base.join(p));
                    cp.last_known_good = base.join(&cp.last_known_good);
                    if let Some(nats) = cp.nats.as_mut() {
                        nats.ca = nats.ca.as_ref().map(|p| base.join(p));
                    }
                    cp
                });
                if proxy.id.is_none() {
                    proxy.id = Some(default_proxy_id());
                }
                let audit = audit.map(|mut audit| {
                    audit.dir = base.join(&audit.dir);
                    audit.signing_key = base.join(&audit.signing_key);
                    audit
                });
                let tls = tls.map(|mut tls| {
                    for files in &mut tls.certificates {
                        files.cert = base.join(&files.cert);
                        files.key = base.join(&files.key);
                    }
                    tls
                });
                for route in regions.values_mut() {
                    if let Some(origin) = route.tls.as_mut() {
                        origin.ca = base.join(&origin.ca);
                        origin.cert = origin.cert.as_ref().map(|p| base.join(p));
                        origin.key = origin.key.as_ref().map(|p| base.join(p));
                    }
                }
                Ok(ProxyConfig {
                    proxy,
                    map,
                    control_plane,
                    identify,
                    limits,
                    regions,
                    audit,
                    tls,
                })
            }
            _ => Err(ConfigErrors(errors.0)),
        }
    }

    /// This proxy's fleet id.
    pub fn proxy_id(&self) -> &str {
        self.proxy.id.as_deref().unwrap_or("domicile")
    }
}

fn validate_control_plane(cp: &ControlPlaneSection, base: &Path, errors: &mut Collector) {
    let mut https = false;
    match cp.url.parse::<http::Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some() =>
        {
            https = uri.scheme_str() == Some("https");
            if uri.path() != "/" && !uri.path().is_empty() {
                errors.push(
                    "control_plane.url",
                    "must be a base URL (http://host:port or https://host:port)",
                );
            }
        }
        _ => errors.push(
            "control_plane.url",
            format!("{:?} is not an http:// or https://host:port URL", cp.url),
        ),
    }
    if cp.cert.is_some() != cp.key.is_some() {
        errors.push(
            "control_plane.cert",
            "a client certificate needs both cert and key",
        );
    }
    if !https {
        if cp.ca.is_some() || cp.cert.is_some() {
            errors.push(
                "control_plane.url",
                "ca, cert and key are for an https:// control plane",
            );
        }
    } else if let Some(ca) = &cp.ca {
        let client = cp.client_certificate().map(|mut c| {
            c.cert = base.join(&c.cert);
            c.key = base.join(&c.key);
            c
        });
        if let Err(e) =
            domicile_certs::client::client_config(&base.join(ca), client.as_ref(), Vec::new())
        {
            errors.push("control_plane", e.to_string());
        }
    } else {
        errors.push(
            "control_plane.ca",
            "an https control plane needs ca (the CA its certificate is signed by)",
        );
    }
    if cp.token.is_some() && cp.token_file.is_some() {
        errors.push("control_plane.token", "set token or token_file, not both");
    }
    for (key, d) in [
        ("control_plane.heartbeat_interval", cp.heartbeat_interval),
        ("control_plane.stall_timeout", cp.stall_timeout),
        ("control_plane.request_timeout", cp.request_timeout),
        ("control_plane.backoff_initial", cp.backoff_initial),
        ("control_plane.backoff_max", cp.backoff_max),
    ] {
        if d.is_zero() {
            errors.push(key, "must be greater than zero");
        } else if d > MAX_TIMEOUT {
            errors.push(key, "must be at most 7 days");
        }
    }
    if cp.backoff_initial > cp.backoff_max {
        errors.push(
            "control_plane.backoff_initial",
            "must not be longer than backoff_max",
        );
    }
    if let Some(nats) = &cp.nats {
        if !(nats.url.starts_with("nats://") || nats.url.starts_with("tls://")) {
            errors.push(
                "control_plane.nats.url",
                "is not a NATS URL (expected nats://host:port or tls://host:port)",
            );
        }
        if !domicile_wire::fanout::is_valid_prefix(&nats.prefix) {
            errors.push(
                "control_plane.nats.prefix",
                format!(
                    "{:?} is not valid (1 to 32 of A-Z a-z 0-9 _ -)",
                    nats.prefix
                ),
            );
        }
        if let Some(ca) = &nats.ca {
            if let Err(e) = domicile_certs::pem::load_roots(&base.join(ca)) {
                errors.push("control_plane.nats.ca", e.to_string());
            }
        }
        if cp.cert.is_some() && cp.token.is_none() && cp.token_file.is_none() {
            errors.push(
                "control_plane.nats",
                "heartbeats through NATS authenticate with the proxy's token: set token_file (a client certificate does not reach the control plane through NATS)",
            );
        }
    }
}

fn validate_audit(audit: &AuditSection, errors: &mut Collector) {
    if audit.commit_interval.is_zero() || audit.commit_interval > Duration::from_secs(1) {
        errors.push(
            "audit.commit_interval",
            "must be greater than zero and at most 1 s",
        );
    }
    if audit.checkpoint_interval < Duration::from_millis(10)
        || audit.checkpoint_interval > MAX_CHECKPOINT_INTERVAL
    {
        errors.push(
            "audit.checkpoint_interval",
            "must be between 10 ms and 10 s (idle periods are proven by checkpoints)",
        );
    }
    if audit.segment_max_bytes < 64 * 1024 {
        errors.push("audit.segment_max_bytes", "must be at least 64 KiB");
    }
    if audit.segment_max_age < Duration::from_secs(1) || audit.segment_max_age > MAX_TIMEOUT {
        errors.push("audit.segment_max_age", "must be between 1 s and 7 days");
    }
    if audit.queue_capacity == 0 || audit.queue_capacity > 16 << 20 {
        errors.push(
            "audit.queue_capacity",
            "must be between 1 and 16777216 records",
        );
    }
}

fn validate_tls(tls: &TlsSection, base: &Path, errors: &mut Collector) {
    if tls.certificates.is_empty() {
        errors.push(
            "tls.certificates",
            "at least one certificate is needed ([[tls.certificates]] with cert and key)",
        );
    }
    let provider = domicile_certs::pem::provider();
    let mut loaded = Vec::new();
    for (i, files) in tls.certificates.iter().enumerate() {
        match domicile_certs::pem::load_pair(
            &base.join(&files.cert),
            &base.join(&files.key),
            &provider,
        ) {
            Ok(cert) => loaded.push(cert),
            Err(e) => errors.push(format!("tls.certificates[{i}]"), e.to_string()),
        }
    }
    if loaded.len() == tls.certificates.len() && !loaded.is_empty() {
        if let Err(e) = domicile_certs::CertSet::new(loaded, domicile_certs::UnknownName::Default) {
            errors.push("tls.certificates", e.to_string());
        }
    }
    if tls.reload_interval < Duration::from_millis(10) || tls.reload_interval > MAX_TIMEOUT {
        errors.push("tls.reload_interval", "must be between 10 ms and 7 days");
    }
    if tls.handshake_timeout.is_zero() || tls.handshake_timeout > MAX_TIMEOUT {
        errors.push(
            "tls.handshake_timeout",
            "must be greater than zero and at most 7 days",
        );
    }
}

fn validate_origin_tls(key: &str, tls: &OriginTlsSection, base: &Path, errors: &mut Collector) {
    if let Err(e) = domicile_certs::client::server_name(&tls.identity) {
        errors.push(format!("{key}.tls.identity"), e);
    }
    let client = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => Some(domicile_certs::CertSource {
            cert: base.join(cert),
            key: base.join(key),
        }),
        (None, None) => None,
        _ => {
            errors.push(
                format!("{key}.tls"),
                "a client certificate needs both cert and key",
            );
            return;
        }
    };
    if let Err(e) =
        domicile_certs::client::client_config(&base.join(&tls.ca), client.as_ref(), Vec::new())
    {
        errors.push(format!("{key}.tls"), e.to_string());
    }
}

fn validate_route(key: &str, route: &RegionRoute, base: &Path, errors: &mut Collector) {
    if let Some(tls) = &route.tls {
        validate_origin_tls(key, tls, base, errors);
    }
    if route.endpoints.is_empty() {
        errors.push(
            format!("{key}.endpoints"),
            "at least one endpoint is required",
        );
    }
    for (i, endpoint) in route.endpoints.iter().enumerate() {
        if let Err(msg) = parse_endpoint(endpoint) {
            errors.push(format!("{key}.endpoints[{i}]"), msg);
        }
    }
    if !route.health.path.starts_with('/') {
        errors.push(format!("{key}.health.path"), "must start with '/'");
    }
    if route.health.interval > MAX_TIMEOUT || route.health.timeout > MAX_TIMEOUT {
        errors.push(
            format!("{key}.health"),
            "interval and timeout must be at most 7 days",
        );
    }
    if route.health.interval.is_zero() || route.health.timeout.is_zero() {
        errors.push(
            format!("{key}.health"),
            "interval and timeout must be greater than zero",
        );
    }
    if route.health.healthy_threshold == 0 || route.health.unhealthy_threshold == 0 {
        errors.push(format!("{key}.health"), "thresholds must be at least 1");
    }
    if route.ejection.consecutive_failures == 0 {
        errors.push(
            format!("{key}.ejection.consecutive_failures"),
            "must be at least 1",
        );
    }
    for (i, host) in route.regional_hosts.iter().enumerate() {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        if bare.is_empty() || bare.contains(['*', '/', ':', ' ']) {
            errors.push(
                format!("{key}.regional_hosts[{i}]"),
                "expected a hostname or *.suffix",
            );
        }
    }
}

fn default_proxy_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        "domicile".to_owned()
    } else {
        format!("domicile-{host}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[proxy]
edge_region = "us"
listen = "127.0.0.1:8080"

[identify]
rules = [{ from = "header", name = "x-workspace-id" }]

[regions.us]
endpoints = ["127.0.0.1:9001"]
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = ProxyConfig::from_toml(MINIMAL, Path::new("/etc/domicile")).unwrap();
        assert_eq!(cfg.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(cfg.limits.max_body_bytes, 100 << 20);
        assert_eq!(cfg.identify.unidentified, Unidentified::Refuse);
        assert_eq!(cfg.regions["us"].health.path, "/healthz");
        assert!(cfg.proxy.id.is_some());
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let text = r#"
[proxy]
edge_region = "US"
listen = "127.0.0.1:8080"
colour = "blue"

[limits]
max_body_bytes = "12 parsecs"

[identify]
unidentified = "nearest-region"
rules = [
  { from = "host", pattern = "app.example.com" },
  { from = "cookie", name = "ws" },
]

[regions.eu]
endpoints = []

[regions.us]
endpoints = ["ftp://x:1"]
helth = {}

[extra]
"#;
        let err = ProxyConfig::from_toml(text, Path::new(".")).unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
        for want in [
            "proxy.colour",
            "limits.max_body_bytes",
            "identify.rules[0]",
            "identify.rules[1]",
            "regions.eu.endpoints",
            "regions.us.helth",
            "extra",
        ] {
            assert!(
                keys.iter().any(|k| k.starts_with(want)),
                "{want} not reported in:\n{err}"
            );
        }
    }

    #[test]
    fn the_nats_section_is_checked_and_its_paths_resolved() {
        let base = MINIMAL.to_owned() + "[control_plane]\nurl = \"http://cp:7700\"\n";
        let ok = base.clone() + "[control_plane.nats]\nurl = \"nats://nats:4222\"\n";
        let cfg = ProxyConfig::from_toml(&ok, Path::new("/etc/domicile")).unwrap();
        let nats = cfg.control_plane.unwrap().nats.unwrap();
        assert_eq!(
            (nats.url.as_str(), nats.prefix.as_str()),
            ("nats://nats:4222", "domicile")
        );
        let bad = base
            + "[control_plane.nats]\nurl = \"http://nats:4222\"\nprefix = \"a.b\"\n\
               ca = \"missing-ca.pem\"\ncolour = 1\n";
        let err = ProxyConfig::from_toml(&bad, Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let bad = bad.replace("colour = 1\n", "");
        let err = ProxyConfig::from_toml(&bad, Path::new("/nonexistent")).unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
        for want in [
            "control_plane.nats.url",
            "control_plane.nats.prefix",
            "control_plane.nats.ca",
        ] {
            assert!(keys.contains(&want), "{want} not reported in:\n{err}");
        }
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = r#"
[proxy]
edge_region = "US"
listen = "127.0.0.1:8080"
workers = 0

[identify]
unidentified = "nearest-region"
strict_regional_hosts = true

[limits]
idle_timeout = "100000000h"

[regions.eu]
endpoints = ["127.0.0.1:1", "nope"]
regional_hosts = ["bad/host"]
health = { path = "healthz" }
"#;
        let err = ProxyConfig::from_toml(text, Path::new(".")).unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
        for want in [
            "proxy.edge_region",
            "proxy.workers",
            "identify.unidentified",
            "regions.eu.endpoints[1]",
            "regions.eu.regional_hosts[0]",
            "regions.eu.health.path",
            "limits.idle_timeout",
        ] {
            assert!(keys.contains(&want), "{want} not reported in:\n{err}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(size::parse("64KiB"), Ok(65536));
        assert_eq!(size::parse("1GiB"), Ok(1 << 30));
        assert_eq!(size::parse("512"), Ok(512));
        assert!(size::parse("1 parsec").is_err());
        assert!(size::parse("99999999999999TiB").is_err());
    }
}
