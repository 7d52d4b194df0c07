//! The sequence every request goes through, written once:
//!
//! 1. **check the head**: limits, user information in the host, CONNECT, an HTTP/2 `host`
//!    that disagrees with `:authority` ([`Engine::check_head`]);
//! 2. **identify** the workspace and look it up in the map, then **decide** (a pure function)
//!    ([`Engine::route`]);
//! 3. **reserve the audit record** and describe the decision in it; a decision that cannot be
//!    recorded is refused, `audit_unavailable`;
//! 4. **refuse**, or **forward**: the home region's endpoints are tried by the retry driver
//!    ([`super::retry`]), each attempt over the origin connection layer
//!    ([`super::origin`]), and the answer is relayed as it arrives;
//! 5. **finish the record**: queued just before the response's last bytes are written (or,
//!    when the exchange ends otherwise, when it is dropped, as cut off).

use std::time::Instant;

use super::headers::Forwarding;
use super::retry::Exchange;
use super::Engine;
use crate::audit::{Begin, Description, Entry};
use crate::config::Unidentified;
use crate::http::peer::{self, Peer};
use crate::http::{ClientSide, RequestHead, RequestId, Served, Version};
use crate::refusal::{Refusal, RefusalCode};
use crate::route::decide::{decide, Decision, RequestFacts};
use crate::route::identify::{normalized_path, Identity, RequestView};
use crate::route::inflight::InFlightGuard;
use crate::route::map::{Lookup, RegionIdx};
use crate::upstream::RouteView;

/// What routing made of a request.
pub(crate) struct Routed {
    pub decision: Decision,
    pub identity: Identity,
    pub lookup: Lookup,
    /// A request routed by a workspace's entry, registered as in flight at the map version it
    /// read until its answer is complete (moves wait for it; see [`crate::route::inflight`]).
    pub in_flight: Option<InFlightGuard>,
}

impl Engine {
    /// Serves one request from `peer` to its end.
    pub(crate) async fn serve<C: ClientSide>(
        &self,
        head: &RequestHead<'_>,
        peer: &Peer,
        client: &mut C,
    ) -> Served {
        let started = Instant::now();
        let request_id = RequestId::of(head.fields);

        // 1-2. The head's own checks, then identification and the decision.
        let checked = self.check_head(head);
        let routed = match &checked {
            Some(refusal) => Routed {
                decision: Decision::Refuse {
                    code: refusal.code,
                    workspace: None,
                    home_region: None,
                },
                identity: Identity::None,
                lookup: Lookup::NoMap,
                in_flight: None,
            },
            None => self.route(head, peer),
        };

        // 3. The record, before anything is forwarded or answered.
        let mut audit = match self.audit.as_ref().map(|audit| audit.begin()) {
            None | Some(Begin::Unrecorded) => None,
            Some(Begin::Record(entry)) => Some(entry),
            Some(Begin::Refuse) => {
                if let Some(audit) = &self.audit {
                    audit.count_refusal();
                }
                let refusal = Refusal::new(RefusalCode::AuditUnavailable).message(
                    "the routing decision cannot be recorded in the audit log; nothing was forwarded",
                );
                return self
                    .refuse(client, refusal, None, None, &request_id, started, None)
                    .await;
            }
        };
        if let Some(entry) = audit.as_mut() {
            self.describe(
                entry,
                head,
                &request_id,
                peer,
                &routed.decision,
                routed.lookup,
            );
        }

        // 4. Refuse, or forward.
        let Routed {
            decision,
            identity,
            lookup,
            in_flight,
        } = routed;
        match decision {
            Decision::Refuse {
                code,
                workspace,
                home_region,
            } => {
                let refusal = match checked {
                    Some(refusal) => refusal,
                    None => Refusal::new(code)
                        .message(self.explain(code, &identity, lookup, home_region))
                        .retry_after(
                            (code == RefusalCode::WorkspaceMoving)
                                .then_some(self.config.proxy.moving_retry_after),
                        ),
                };
                let workspace = workspace.as_ref().map(|w| w.as_str());
                self.refuse(
                    client,
                    refusal,
                    workspace,
                    home_region,
                    &request_id,
                    started,
                    audit,
                )
                .await
            }
            Decision::Forward(forward) => {
                let workspace = forward.workspace;
                let ws = workspace.as_ref().map(|w| w.as_str());
                let Some(pool) = self.upstreams.pool(forward.region) else {
                    // decide() only forwards to routed regions; keep the invariant explicit.
                    let refusal = Refusal::new(RefusalCode::RegionUnroutable);
                    return self
                        .refuse(
                            client,
                            refusal,
                            ws,
                            Some(forward.region),
                            &request_id,
                            started,
                            audit,
                        )
                        .await;
                };
                if let Some(length) = head.body.length() {
                    if length > pool.max_body_bytes {
                        let refusal = Refusal::new(RefusalCode::BodyTooLarge).message(format!(
                            "the request body is {length} bytes; the limit for region {} is {}",
                            pool.region_id, pool.max_body_bytes
                        ));
                        return self
                            .refuse(
                                client,
                                refusal,
                                ws,
                                Some(forward.region),
                                &request_id,
                                started,
                                audit,
                            )
                            .await;
                    }
                }
                // An upgrade goes on only between HTTP/1.1 on both sides; to an HTTP/2 origin
                // the request goes as a plain one.
                let upgrade = head.upgrade
                    && client.can_upgrade()
                    && pool.protocol == crate::config::UpstreamProtocol::Http1;
                let forwarding = Forwarding {
                    peer,
                    forward: &forward,
                    request_id: &request_id,
                    region_id: &pool.region_id,
                    host: head.authority,
                    upgrade,
                    join_cookies: head.version == Version::Http2
                        && pool.protocol == crate::config::UpstreamProtocol::Http1,
                };
                let exchange = Exchange::new(
                    self,
                    head,
                    client,
                    pool,
                    &forwarding,
                    &request_id,
                    started,
                    audit,
                );
                let served = exchange.forward().await;
                drop(in_flight);
                served
            }
        }
    }

    /// The limits and rules of a head that the framing rules do not cover, each with its own
    /// message: the same for every protocol.
    fn check_head(&self, head: &RequestHead<'_>) -> Option<Refusal<'static>> {
        let limits = &self.config.limits;
        // A host with user information (`globex.example@acme.example`) would be identified by
        // one part while an origin may read the other: refuse it outright.
        let userinfo = head.authority.is_some_and(|a| a.contains('@'))
            || head.fields.values("host").any(|h| h.contains(&b'@'));
        if userinfo {
            return Some(
                Refusal::new(RefusalCode::BadRequest)
                    .message("the host must not contain user information ('@')"),
            );
        }
        if head.host_mismatch {
            return Some(
                Refusal::new(RefusalCode::BadRequest).message(
                    "the host field names another authority than the request's :authority",
                ),
            );
        }
        if head.method == "CONNECT" {
            return Some(
                Refusal::new(RefusalCode::BadRequest)
                    .message("CONNECT is not supported by this edge"),
            );
        }
        let count = head.fields.len();
        if count > limits.max_headers {
            return Some(Refusal::new(RefusalCode::HeadersTooLarge).message(format!(
                "the request has {count} header fields; the limit is {}",
                limits.max_headers
            )));
        }
        if head.head_bytes as u64 > limits.max_header_bytes {
            return Some(Refusal::new(RefusalCode::HeadersTooLarge).message(format!(
                "the request head is {} bytes; the limit is {}",
                head.head_bytes, limits.max_header_bytes
            )));
        }
        None
    }

    /// Identify, look up, decide: where a request goes, or why it may not go anywhere.
    pub(crate) fn route(&self, head: &RequestHead<'_>, peer: &Peer) -> Routed {
        let host = head.host();
        let path = normalized_path(head.path);
        let mut view = RequestView {
            host,
            path: &path,
            query: head.query,
            headers: head.fields,
        };
        let mut identity = self.identifier.identify(&view);
        if *path != *head.path {
            // An origin may read the raw path or the normalized one: both must name the same
            // workspace (`/w/globex/%2e%2e/acme/` names two).
            view.path = head.path;
            identity = Identity::agree(identity, self.identifier.identify(&view));
        }
        let (lookup, in_flight) = match identity {
            Identity::Workspace(id) => self.replica.lookup_tracked(&id),
            _ => match self.replica.version() {
                Some(version) => (Lookup::Unknown { version }, None),
                None => (Lookup::NoMap, None),
            },
        };
        let arrived_on = match (self.policy.strict_regional_hosts, host) {
            (true, Some(host)) => self.upstreams.region_of_host(host),
            _ => None,
        };
        let client_country = match (identity, self.policy.unidentified, &self.geoip) {
            (Identity::None, Unidentified::NearestRegion, Some(geoip)) => {
                let ip = peer::client_ip(
                    peer.addr.ip(),
                    head.fields,
                    &self.config.proxy.trusted_proxies,
                );
                geoip.country(ip)
            }
            _ => None,
        };
        let facts = RequestFacts {
            identity,
            safe_method: head.is_safe(),
            arrived_on,
            client_country,
        };
        let routes = RouteView {
            upstreams: &self.upstreams,
            regions: self.replica.regions(),
        };
        let decision = decide(&facts, &self.policy, lookup, &routes);
        // Only a forwarded request has anything in flight.
        let in_flight = in_flight.filter(|_| matches!(decision, Decision::Forward(_)));
        Routed {
            decision,
            identity,
            lookup,
            in_flight,
        }
    }

    /// Fills in a request's record: what it is and what was decided.
    fn describe(
        &self,
        entry: &mut Entry,
        head: &RequestHead<'_>,
        request_id: &RequestId,
        peer: &Peer,
        decision: &Decision,
        lookup: Lookup,
    ) {
        let found = match lookup {
            Lookup::Found { entry, version } => Some((entry, version)),
            _ => None,
        };
        let (workspace, home_region, map_version, epoch, refusal) = match decision {
            Decision::Forward(forward) => (
                forward.workspace.as_ref(),
                forward.workspace.as_ref().map(|_| forward.region),
                forward.map_version,
                forward.epoch,
                None,
            ),
            Decision::Refuse {
                code,
                workspace,
                home_region,
            } => (
                workspace.as_ref(),
                *home_region,
                found.map(|(_, version)| version),
                found.map(|(entry, _)| entry.epoch),
                Some(*code),
            ),
        };
        entry.describe(&Description {
            request_id: request_id.as_bytes(),
            method: head.method,
            host: head.host(),
            path: head.path,
            client_ip: peer::client_ip(
                peer.addr.ip(),
                head.fields,
                &self.config.proxy.trusted_proxies,
            ),
            workspace,
            home_region,
            map_version,
            epoch,
            refusal,
        });
    }

    fn explain(
        &self,
        code: RefusalCode,
        identity: &Identity,
        lookup: Lookup,
        home: Option<RegionIdx>,
    ) -> String {
        let region = || {
            home.and_then(|r| self.replica.regions().id(r))
                .map_or_else(|| "?".to_owned(), |id| id.to_string())
        };
        match (code, identity) {
            (RefusalCode::InvalidWorkspace, Identity::Invalid { source, reason }) => {
                format!("the workspace id in {} is not valid: {reason}", self.identifier.describe(*source))
            }
            (RefusalCode::ConflictingWorkspace, Identity::Conflict { first, second }) => format!(
                "the request names two workspaces, {first} and {second}; one request must touch one workspace"
            ),
            (RefusalCode::UnknownWorkspace, Identity::Workspace(id)) => match lookup {
                Lookup::Unknown { version } => format!("workspace {id} is not in the routing map (map version {version})"),
                _ => format!("workspace {id} is not in the routing map"),
            },
            (RefusalCode::RegionUnroutable, _) => format!(
                "home region {} has no route at this edge; the request is not sent to any other region",
                region()
            ),
            (RefusalCode::RegionUnavailable, _) => format!(
                "no healthy endpoint in home region {}; the request is not sent to any other region",
                region()
            ),
            (RefusalCode::WrongRegionEndpoint, Identity::Workspace(id)) => format!(
                "workspace {id} lives in region {}; use that region's hostname",
                region()
            ),
            (RefusalCode::WorkspaceMoving, Identity::Workspace(id)) => format!(
                "workspace {id} is moving between regions; retry writes shortly (reads continue)"
            ),
            _ => code.default_message().to_owned(),
        }
    }

    /// Answers with `refusal`: counted, its record (if any) queued first. A `bad_request`
    /// closes an HTTP/1.1 connection.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn refuse<C: ClientSide>(
        &self,
        client: &mut C,
        refusal: Refusal<'_>,
        workspace: Option<&str>,
        region: Option<RegionIdx>,
        request_id: &RequestId,
        started: Instant,
        audit: Option<Entry>,
    ) -> Served {
        let code = refusal.code;
        self.metrics.record(Some(code), region, started.elapsed());
        if let Some(mut entry) = audit {
            entry.decide(Some(code));
            entry.status(code.status().as_u16());
            entry.complete();
        }
        let refusal = refusal
            .workspace(workspace)
            .request_id(Some(request_id.as_str()));
        let close = code == RefusalCode::BadRequest;
        match client.send_refusal(&refusal, close).await {
            Ok(()) if !close => Served::KeepAlive,
            _ => Served::Close,
        }
    }
}
