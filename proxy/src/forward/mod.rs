//! Forward: the engine. One sequence of steps for every request, whatever the protocol on
//! either side ([`engine`]): check the head, identify, decide, reserve the audit record, then
//! refuse, or forward to the home region's endpoints ([`retry`], [`origin`]) and relay the
//! answer, and finish the record. The header rules ([`headers`]) and the failure model
//! ([`failure`]) are the only ones.
//!
//! It must never send a request to an endpoint outside the region `decide` chose: a pool only
//! holds its own region's endpoints, and a request that region cannot answer gets a refusal.

pub(crate) mod engine;
pub(crate) mod failure;
pub(crate) mod headers;
pub(crate) mod origin;
pub(crate) mod retry;

use std::sync::Arc;

use crate::audit::{Audit, Identity as AuditIdentity};
use crate::config::ProxyConfig;
use crate::http::peer::Peer;
use crate::http::{ClientSide, Handler, RequestHead, Served};
use crate::metrics::Metrics;
use crate::route::decide::Policy;
use crate::route::geoip::GeoIp;
use crate::route::identify::Identifier;
use crate::route::map::Replica;
use crate::upstream::Upstreams;

/// Everything the request path shares across connections and workers.
pub struct Engine {
    pub config: Arc<ProxyConfig>,
    identifier: Identifier,
    pub replica: Arc<Replica>,
    pub upstreams: Upstreams,
    geoip: Option<Arc<GeoIp>>,
    policy: Policy,
    pub metrics: Arc<Metrics>,
    /// The routing audit log, when `[audit]` is configured.
    pub audit: Option<Audit>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// Builds the engine: the identification rules, the pools (health checks start: needs a
    /// Tokio runtime), the GeoIP database, the audit log.
    pub fn new(
        config: Arc<ProxyConfig>,
        replica: Arc<Replica>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let identifier = Identifier::new(&config.identify.rules)?;
        let edge_region = replica
            .regions()
            .intern(&config.proxy.edge_region)
            .map_err(|e| e.to_string())?;
        let upstreams = Upstreams::start(&config.regions, &config.limits, replica.regions())?;
        let geoip = match &config.proxy.geoip_database {
            Some(path) => Some(Arc::new(
                GeoIp::open(path).map_err(|e| format!("proxy.geoip_database: {e}"))?,
            )),
            None => None,
        };
        let audit = match &config.audit {
            Some(section) => {
                // Endpoint names by region index, as records name them.
                let mut endpoints: Vec<Vec<Arc<str>>> = Vec::new();
                for pool in upstreams.pools() {
                    let slot = usize::from(pool.region);
                    if endpoints.len() <= slot {
                        endpoints.resize(slot + 1, Vec::new());
                    }
                    endpoints[slot] = pool
                        .endpoints
                        .iter()
                        .map(|e| e.target.authority.clone())
                        .collect();
                }
                let identity = AuditIdentity {
                    proxy_id: config.proxy_id(),
                    edge_region: &config.proxy.edge_region,
                };
                Some(
                    Audit::start(section, identity, replica.clone(), endpoints, geoip.clone())
                        .map_err(|e| e.to_string())?,
                )
            }
            None => None,
        };
        let policy = Policy {
            unidentified: config.identify.unidentified,
            edge_region,
            strict_regional_hosts: config.identify.strict_regional_hosts,
        };
        Ok(Self {
            config,
            identifier,
            replica,
            upstreams,
            geoip,
            policy,
            metrics,
            audit,
        })
    }

    /// The engine as one connection's handler: requests from `peer`.
    pub(crate) fn for_peer<'a>(&'a self, peer: &'a Peer) -> Conn<'a> {
        Conn { engine: self, peer }
    }
}

/// The engine serving one client connection.
pub(crate) struct Conn<'a> {
    engine: &'a Engine,
    peer: &'a Peer,
}

impl Handler for Conn<'_> {
    async fn serve<C: ClientSide>(&self, head: &RequestHead<'_>, client: &mut C) -> Served {
        self.engine.serve(head, self.peer, client).await
    }
}
