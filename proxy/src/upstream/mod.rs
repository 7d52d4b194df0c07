//! Upstream: how this edge reaches each region it has a route for.
//!
//! - [`connect`]: one connection to one endpoint, TCP and TLS, where an origin must prove the
//!   region's identity before anything is written to it.
//! - [`pool`]: the connections each worker keeps, for HTTP/1.1 and HTTP/2 origins alike.
//! - [`h1`], [`h2`]: the origin's side of each protocol.
//! - [`health`]: active checks, through the same connector and the same response rules as
//!   client traffic, so that a passing check means client traffic can use the endpoint.
//!
//! One pool per routed region, several endpoints per pool, round robin over the endpoints that
//! are both healthy (active checks) and not ejected (passive: consecutive failures). A pool
//! only ever holds endpoints of its own region: nothing here can hand out an endpoint of
//! another region, and there is no fallback between pools.

pub(crate) mod connect;
pub(crate) mod h1;
pub(crate) mod h2;
pub(crate) mod health;
pub(crate) mod pool;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connect::{OriginTls, Target};

use crate::config::{Ejection, HealthCheck, Limits, RegionRoute, UpstreamProtocol};
use crate::route::decide::{RouteStatus, Routes};
use crate::route::map::{RegionIdx, Regions, MAX_REGIONS};

/// What active health checks know of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No check has answered yet: not used until one passes.
    Unchecked,
    Healthy,
    Unhealthy,
}

/// One origin endpoint and what this edge knows of its health.
#[derive(Debug)]
pub struct Endpoint {
    /// How to reach it (its `host:port` is `target.authority`).
    pub(crate) target: Target,
    health: AtomicU8,
    /// Milliseconds since the pool's start until which the endpoint is ejected.
    ejected_until_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    pub ejections: AtomicU64,
}

impl Endpoint {
    pub fn authority(&self) -> &str {
        &self.target.authority
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unchecked,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.health() == Health::Healthy
    }

    pub(crate) fn set_health(&self, health: Health) {
        let v = match health {
            Health::Unchecked => 0,
            Health::Healthy => 1,
            Health::Unhealthy => 2,
        };
        self.health.store(v, Ordering::Relaxed);
    }

    fn is_available(&self, now: impl Fn() -> u64) -> bool {
        if !self.is_healthy() {
            return false;
        }
        // The clock is read only for an endpoint that was ejected at some point.
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until == 0 || until <= now()
    }
}

/// The endpoints of one region.
#[derive(Debug)]
pub struct RegionPool {
    pub region: RegionIdx,
    pub region_id: Arc<str>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub protocol: UpstreamProtocol,
    pub max_body_bytes: u64,
    /// TLS to the origins, when the route has it.
    pub(crate) tls: Option<Arc<OriginTls>>,
    /// Handshakes refused because the origin's certificate did not carry the region identity.
    pub wrong_identity: AtomicU64,
    /// Handshakes that failed otherwise (an expired or unknown certificate, an alert).
    pub tls_failures: AtomicU64,
    next: AtomicUsize,
    ejection: Ejection,
    pub(crate) health: HealthCheck,
    epoch: Instant,
}

impl RegionPool {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether any endpoint can take a request now.
    pub fn is_up(&self) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.is_available(|| self.now_ms()))
    }

    /// Whether the route has TLS to its origins.
    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The next available endpoint, round robin, skipping `tried` (a bit set of indexes).
    pub fn pick(&self, tried: u64) -> Option<(usize, &Arc<Endpoint>)> {
        let n = self.endpoints.len();
        // Round robin without a locked instruction: workers racing on the counter at worst
        // pick the same endpoint twice, which is no worse than any other order.
        let start = self.next.load(Ordering::Relaxed);
        self.next.store(start.wrapping_add(1), Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| i >= 64 || tried & (1 << i) == 0)
            .map(|i| (i, &self.endpoints[i]))
            .find(|(_, e)| e.is_available(|| self.now_ms()))
    }

    /// An exchange with this endpoint failed by the endpoint's doing (no connection, a
    /// handshake refused, a broken or missing answer): enough in a row eject it for a while.
    pub(crate) fn record_failure(&self, endpoint: &Endpoint) {
        let failures = endpoint
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if failures >= self.ejection.consecutive_failures {
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
            // At least 1: 0 means "never ejected".
            let until = (self.now_ms() + self.ejection.duration.as_millis() as u64).max(1);
            endpoint.ejected_until_ms.store(until, Ordering::Relaxed);
            endpoint.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(region = %self.region_id, endpoint = %endpoint.authority(), "endpoint ejected after {failures} consecutive failures");
        }
    }

    /// Counts and logs a refused TLS handshake with `endpoint`. One that did not prove the
    /// region's identity also takes the endpoint out of rotation until a health check passes
    /// again (with health checks on): such an endpoint is never counted healthy.
    pub(crate) fn count_tls_failure(
        &self,
        endpoint: &Endpoint,
        wrong_identity: bool,
        detail: &str,
    ) {
        if wrong_identity {
            self.wrong_identity.fetch_add(1, Ordering::Relaxed);
            if self.health.enabled {
                endpoint.set_health(Health::Unhealthy);
            }
            tracing::error!(region = %self.region_id, endpoint = %endpoint.authority(), "origin refused: it did not prove the region's identity: {detail}");
        } else {
            self.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(region = %self.region_id, endpoint = %endpoint.authority(), "origin TLS handshake failed: {detail}");
        }
    }

    pub(crate) fn record_success(&self, endpoint: &Endpoint) {
        if endpoint.consecutive_failures.load(Ordering::Relaxed) != 0 {
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }
}

/// Every region this edge has a route for, indexed by [`RegionIdx`].
#[derive(Debug)]
pub struct Upstreams {
    pools: Vec<Option<Arc<RegionPool>>>,
    /// (host pattern, region): exact host or `*.suffix` (stored as `.suffix`).
    regional_hosts: Vec<(String, RegionIdx)>,
}

impl Upstreams {
    /// Builds the pools and starts their health checks (needs a Tokio runtime). Endpoints of a
    /// route with health checks start unchecked and are not used until a check passes; see
    /// [`Upstreams::first_checks`].
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
                .map(|tls| OriginTls::new(id, tls, route.protocol))
                .transpose()?;
            let health = if route.health.enabled {
                Health::Unchecked
            } else {
                Health::Healthy
            };
            let endpoints = route
                .endpoints
                .iter()
                .map(|endpoint| {
                    let endpoint = Endpoint {
                        target: Target::new(
                            endpoint.as_str(),
                            limits.upstream_connect_timeout,
                            tls.clone(),
                        ),
                        health: AtomicU8::new(0),
                        ejected_until_ms: AtomicU64::new(0),
                        consecutive_failures: AtomicU32::new(0),
                        ejections: AtomicU64::new(0),
                    };
                    endpoint.set_health(health);
                    Arc::new(endpoint)
                })
                .collect();
            let pool = Arc::new(RegionPool {
                region: idx,
                region_id: Arc::from(id.as_str()),
                endpoints,
                protocol: route.protocol,
                max_body_bytes: route.max_body_bytes.unwrap_or(limits.max_body_bytes),
                tls,
                wrong_identity: AtomicU64::new(0),
                tls_failures: AtomicU64::new(0),
                next: AtomicUsize::new(0),
                ejection: route.ejection.clone(),
                health: route.health.clone(),
                epoch: Instant::now(),
            });
            health::spawn(&pool);
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

    /// Waits until every endpoint with health checks has had its first answer (pass or fail),
    /// at most the longest check timeout and connect timeout of any route: a proxy opens its
    /// listeners knowing which endpoints it may use.
    pub async fn first_checks(&self) {
        let longest = self
            .pools()
            .filter(|p| p.health.enabled)
            .map(|p| p.health.timeout)
            .max()
            .unwrap_or(Duration::ZERO);
        let deadline = tokio::time::Instant::now() + longest + Duration::from_millis(200);
        loop {
            let pending = self
                .pools()
                .flat_map(|p| p.endpoints.iter())
                .any(|e| e.health() == Health::Unchecked);
            if !pending || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
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

    #[tokio::test]
    async fn checked_endpoints_start_unused_until_a_check_passes() {
        let regions = Regions::default();
        let mut routes = std::collections::BTreeMap::new();
        // Nothing listens on port 1: the first check fails at once.
        let route: RegionRoute = toml::from_str(
            r#"endpoints = ["127.0.0.1:1"]
health = { interval = "1h", timeout = "1s" }"#,
        )
        .unwrap();
        routes.insert("eu".to_owned(), route);
        let upstreams = Upstreams::start(&routes, &Limits::default(), &regions).unwrap();
        let pool = upstreams.pool(regions.find("eu").unwrap()).unwrap();
        assert_eq!(pool.endpoints[0].health(), Health::Unchecked);
        assert!(!pool.is_up(), "an unchecked endpoint is not used");
        upstreams.first_checks().await;
        assert_eq!(pool.endpoints[0].health(), Health::Unhealthy);
    }
}
