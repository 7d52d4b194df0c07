//! Upstream pools: how this edge reaches each region it has a route for.
//!
//! One pool per routed region, several endpoints per pool, round robin over the endpoints that
//! are both healthy (active checks) and not ejected (passive: consecutive connection failures or
//! timeouts). A pool only ever holds endpoints of its own region: nothing here can hand out an
//! endpoint of another region, and there is no fallback between pools.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{
    Ejection, HealthCheck, Limits, OriginTlsSection, RegionRoute, UpstreamProtocol,
};
use crate::connpool::{EndpointKey, OriginTls, Target};
use crate::decide::{RouteStatus, Routes};
use crate::map::{RegionIdx, Regions, MAX_REGIONS};
use crate::refusal::ProxyBody;

/// The HTTP client of one region's active health checks (client traffic goes through each
/// worker's own pool, [`crate::connpool`]). For a TLS route it checks the region's identity as
/// client traffic does: an origin that cannot prove it is in the region is not healthy.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// Parses `host:port` or `http://host:port` into an authority.
pub fn parse_endpoint(text: &str) -> Result<Authority, String> {
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
    let authority: Authority = bare
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
    Ok(authority)
}

/// One origin endpoint and what this edge knows of its health.
#[derive(Debug)]
pub struct Endpoint {
    pub authority: Authority,
    /// How client requests reach it: through each worker's own connection pool.
    pub target: Target,
    /// Result of active health checks (starts healthy).
    healthy: AtomicBool,
    /// Milliseconds since the pool's start until which the endpoint is ejected.
    ejected_until_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    pub ejections: AtomicU64,
}

impl Endpoint {
    fn new(
        authority: Authority,
        protocol: UpstreamProtocol,
        limits: &Limits,
        tls: Option<Arc<OriginTls>>,
    ) -> Self {
        let target = Target {
            key: EndpointKey::new(),
            authority: authority.as_str().to_owned(),
            addr: authority.as_str().parse().ok(),
            protocol,
            connect_timeout: limits.upstream_connect_timeout,
            tls,
        };
        Self {
            authority,
            target,
            healthy: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn is_available(&self, now_ms: u64) -> bool {
        self.is_healthy() && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }
}

/// The endpoints of one region.
#[derive(Debug)]
pub struct RegionPool {
    pub region: RegionIdx,
    pub region_id: Arc<str>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub client: UpstreamClient,
    pub protocol: UpstreamProtocol,
    pub max_body_bytes: u64,
    /// TLS to the origins, when the route has it.
    pub tls: Option<Arc<OriginTls>>,
    /// Handshakes refused because the origin's certificate did not carry the region identity.
    pub wrong_identity: AtomicU64,
    /// Handshakes that failed otherwise (an expired or unknown certificate, an alert).
    pub tls_failures: AtomicU64,
    next: AtomicUsize,
    ejection: Ejection,
    health: HealthCheck,
    epoch: Instant,
}

impl RegionPool {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether any endpoint can take a request now.
    pub fn is_up(&self) -> bool {
        let now = self.now_ms();
        self.endpoints.iter().any(|e| e.is_available(now))
    }

    /// The next available endpoint, round robin, skipping `tried` (a bit set of indexes).
    pub fn pick(&self, tried: u64) -> Option<(usize, &Arc<Endpoint>)> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| i >= 64 || tried & (1 << i) == 0)
            .map(|i| (i, &self.endpoints[i]))
            .find(|(_, e)| e.is_available(now))
    }

    /// A request through this endpoint failed (connection refused or reset, timeout, protocol error).
    pub fn record_failure(&self, endpoint: &Endpoint) {
        let failures = endpoint
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if failures >= self.ejection.consecutive_failures {
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
            let until = self.now_ms() + self.ejection.duration.as_millis() as u64;
            endpoint.ejected_until_ms.store(until, Ordering::Relaxed);
            endpoint.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(region = %self.region_id, endpoint = %endpoint.authority, "endpoint ejected after {failures} consecutive failures");
        }
    }

    /// Counts and logs a refused TLS handshake with `endpoint`.
    pub fn count_tls_failure(
        &self,
        endpoint: &Endpoint,
        failure: &domicile_certs::client::HandshakeFailure,
    ) {
        use domicile_certs::client::HandshakeFailure;
        if matches!(failure, HandshakeFailure::WrongIdentity { .. }) {
            self.wrong_identity.fetch_add(1, Ordering::Relaxed);
            tracing::error!(region = %self.region_id, endpoint = %endpoint.authority, "origin refused: it did not prove the region's identity: {failure}");
        } else {
            self.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(region = %self.region_id, endpoint = %endpoint.authority, "origin TLS handshake failed: {failure}");
        }
    }

    pub fn record_success(&self, endpoint: &Endpoint) {
        if endpoint.consecutive_failures.load(Ordering::Relaxed) != 0 {
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Runs active health checks on every endpoint until the pool is dropped.
    fn spawn_health_checks(self: &Arc<Self>) {
        if !self.health.enabled {
            return;
        }
        for endpoint in &self.endpoints {
            let pool = Arc::downgrade(self);
            let endpoint = endpoint.clone();
            let health = self.health.clone();
            let scheme = if self.tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            };
            let uri = Uri::builder()
                .scheme(scheme)
                .authority(endpoint.authority.clone())
                .path_and_query(health.path.as_str())
                .build();
            let Ok(uri) = uri else { continue };
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(health.interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let (mut passes, mut fails) = (0u32, 0u32);
                loop {
                    ticker.tick().await;
                    let Some(pool) = pool.upgrade() else { return };
                    let request = Request::get(uri.clone())
                        .header("user-agent", "domicile-health-check")
                        .body(Empty::new().map_err(|never| match never {}).boxed_unsync());
                    let Ok(request) = request else { return };
                    let result =
                        tokio::time::timeout(health.timeout, pool.client.request(request)).await;
                    if let (Ok(Err(e)), Some(tls)) = (&result, &pool.tls) {
                        if let Some(failure) =
                            domicile_certs::client::find_in_chain(e, &tls.identity_text)
                        {
                            pool.count_tls_failure(&endpoint, &failure);
                        }
                    }
                    let ok = matches!(
                        result,
                        Ok(Ok(response)) if response.status().is_success() || response.status().is_redirection()
                    );
                    if ok {
                        passes += 1;
                        fails = 0;
                        if !endpoint.is_healthy() && passes >= health.healthy_threshold {
                            endpoint.healthy.store(true, Ordering::Relaxed);
                            tracing::info!(region = %pool.region_id, endpoint = %endpoint.authority, "endpoint healthy");
                        }
                    } else {
                        fails += 1;
                        passes = 0;
                        if endpoint.is_healthy() && fails >= health.unhealthy_threshold {
                            endpoint.healthy.store(false, Ordering::Relaxed);
                            tracing::warn!(region = %pool.region_id, endpoint = %endpoint.authority, "endpoint unhealthy");
                        }
                    }
                }
            });
        }
    }
}

/// The rustls configuration of a route's TLS, and the identity its origins must prove.
fn origin_tls(
    region: &str,
    tls: &OriginTlsSection,
    protocol: UpstreamProtocol,
) -> Result<(Arc<OriginTls>, Arc<rustls::ClientConfig>), String> {
    let client = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => Some(domicile_certs::CertSource {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let alpn = match protocol {
        UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        UpstreamProtocol::H2c => vec![b"h2".to_vec()],
    };
    let config = domicile_certs::client::client_config(&tls.ca, client.as_ref(), alpn)
        .map_err(|e| format!("regions.{region}.tls: {e}"))?;
    let identity = domicile_certs::client::server_name(&tls.identity)
        .map_err(|e| format!("regions.{region}.tls.identity: {e}"))?;
    Ok((
        Arc::new(OriginTls {
            connector: tokio_rustls::TlsConnector::from(config.clone()),
            identity,
            identity_text: Arc::from(tls.identity.as_str()),
        }),
        config,
    ))
}

fn build_client(
    protocol: UpstreamProtocol,
    limits: &Limits,
    tls: Option<(&OriginTls, Arc<rustls::ClientConfig>)>,
) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(limits.upstream_connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.enforce_http(false);
    let connector = match tls {
        Some((origin, config)) => {
            // hyper-rustls sets ALPN itself from the protocols enabled below.
            let mut config = (*config).clone();
            config.alpn_protocols.clear();
            let builder = HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_only()
                .with_server_name_resolver(FixedServerNameResolver::new(origin.identity.clone()));
            match protocol {
                UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(connector),
                UpstreamProtocol::H2c => builder.enable_http2().wrap_connector(connector),
            }
        }
        None => HttpsConnectorBuilder::new()
            .with_tls_config(domicile_certs::client::trusting_nothing())
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(connector),
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90));
    if protocol == UpstreamProtocol::H2c {
        builder.http2_only(true);
    }
    builder.build(connector)
}

/// Every region this edge has a route for, indexed by [`RegionIdx`].
#[derive(Debug)]
pub struct Upstreams {
    pools: Vec<Option<Arc<RegionPool>>>,
    /// (host pattern, region): exact host or `*.suffix` (stored as `.suffix`).
    regional_hosts: Vec<(String, RegionIdx)>,
}

impl Upstreams {
    /// Builds the pools and starts their health checks (needs a Tokio runtime).
    pub fn start(
        routes: &std::collections::BTreeMap<String, RegionRoute>,
        limits: &Limits,
        regions: &Regions,
    ) -> Result<Self, String> {
        let mut pools = vec![None; MAX_REGIONS];
        let mut regional_hosts = Vec::new();
        for (id, route) in routes {
            let idx = regions.intern(id).map_err(|e| e.to_string())?;
            let tls = route
                .tls
                .as_ref()
                .map(|tls| origin_tls(id, tls, route.protocol))
                .transpose()?;
            let origin = tls.as_ref().map(|(origin, _)| origin.clone());
            let endpoints = route
                .endpoints
                .iter()
                .map(|e| {
                    parse_endpoint(e)
                        .map(|a| Arc::new(Endpoint::new(a, route.protocol, limits, origin.clone())))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let pool = Arc::new(RegionPool {
                region: idx,
                region_id: Arc::from(id.as_str()),
                endpoints,
                client: build_client(
                    route.protocol,
                    limits,
                    tls.as_ref()
                        .map(|(origin, config)| (origin.as_ref(), config.clone())),
                ),
                protocol: route.protocol,
                max_body_bytes: route.max_body_bytes.unwrap_or(limits.max_body_bytes),
                tls: origin,
                wrong_identity: AtomicU64::new(0),
                tls_failures: AtomicU64::new(0),
                next: AtomicUsize::new(0),
                ejection: route.ejection.clone(),
                health: route.health.clone(),
                epoch: Instant::now(),
            });
            pool.spawn_health_checks();
            for host in &route.regional_hosts {
                let pattern = match host.strip_prefix('*') {
                    Some(suffix) => suffix.to_ascii_lowercase(),
                    None => host.to_ascii_lowercase(),
                };
                regional_hosts.push((pattern, idx));
            }
            pools[idx as usize] = Some(pool);
        }
        Ok(Self {
            pools,
            regional_hosts,
        })
    }

    pub fn pool(&self, region: RegionIdx) -> Option<&Arc<RegionPool>> {
        self.pools[region as usize].as_ref()
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<RegionPool>> {
        self.pools.iter().flatten()
    }

    /// The region whose regional hostname `host` is, if any.
    pub fn region_of_host(&self, host: &str) -> Option<RegionIdx> {
        // The most specific pattern wins: `*.eu.example.com` over `*.example.com`.
        self.regional_hosts
            .iter()
            .filter(|(pattern, _)| {
                if pattern.starts_with('.') {
                    host.len() > pattern.len()
                        && host.as_bytes()[host.len() - pattern.len()..]
                            .eq_ignore_ascii_case(pattern.as_bytes())
                } else {
                    host.eq_ignore_ascii_case(pattern)
                }
            })
            .max_by_key(|(pattern, _)| (!pattern.starts_with('.'), pattern.len()))
            .map(|(_, idx)| *idx)
    }
}

/// [`Routes`] for `decide`: this edge's pools plus the map's jurisdictions.
pub struct RouteView<'a> {
    pub upstreams: &'a Upstreams,
    pub regions: &'a Regions,
}

impl Routes for RouteView<'_> {
    fn status(&self, region: RegionIdx) -> RouteStatus {
        match self.upstreams.pool(region) {
            None => RouteStatus::Unroutable,
            Some(pool) if pool.is_up() => RouteStatus::Up,
            Some(_) => RouteStatus::Down,
        }
    }

    fn nearest(&self, country: [u8; 2]) -> Option<RegionIdx> {
        self.regions
            .by_jurisdiction(country, |idx| self.status(idx) == RouteStatus::Up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert!(parse_endpoint("127.0.0.1:8080").is_ok());
        assert!(parse_endpoint("http://origin.eu.internal:80/").is_ok());
        assert!(parse_endpoint("[::1]:9000").is_ok());
        for bad in ["origin", "https://x:1", "x:1/path", "u@x:1", ""] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn round_robin_skips_ejected_and_tried() {
        let regions = Regions::default();
        let mut routes = std::collections::BTreeMap::new();
        let mut route: RegionRoute =
            toml::from_str(r#"endpoints = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]"#).unwrap();
        route.health.enabled = false;
        route.ejection.consecutive_failures = 2;
        routes.insert("eu".to_owned(), route);
        let upstreams = Upstreams::start(&routes, &Limits::default(), &regions).unwrap();
        let pool = upstreams.pool(regions.find("eu").unwrap()).unwrap();
        let picks: Vec<usize> = (0..6).map(|_| pool.pick(0).unwrap().0).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // Two failures eject endpoint 1.
        pool.record_failure(&pool.endpoints[1]);
        pool.record_failure(&pool.endpoints[1]);
        assert!((0..6).all(|_| pool.pick(0).unwrap().0 != 1));
        // Exclude 0 as already tried: only 2 is left.
        assert!((0..4).all(|_| pool.pick(1).unwrap().0 == 2));
        pool.record_failure(&pool.endpoints[0]);
        pool.record_failure(&pool.endpoints[0]);
        pool.record_failure(&pool.endpoints[2]);
        pool.record_failure(&pool.endpoints[2]);
        assert!(pool.pick(0).is_none());
        assert!(!pool.is_up());
        let view = RouteView {
            upstreams: &upstreams,
            regions: &regions,
        };
        assert_eq!(view.status(pool.region), RouteStatus::Down);
        assert_eq!(
            view.status(regions.intern("au").unwrap()),
            RouteStatus::Unroutable
        );
    }
}
