//! Decide: Forward or Refuse, as a pure function of the request facts, the edge's policy, the
//! map's answer and the health of the regions.
//!
//! No I/O, no clock, no allocation: it can be tested exhaustively and benchmarked on its own.
//! It must never pick a region other than the workspace's home region for an identified request.

use crate::config::Unidentified;
use crate::refusal::RefusalCode;
use crate::route::identify::Identity;
use crate::route::map::{Lookup, RegionIdx, WorkspaceState};
use crate::route::workspace_id::WorkspaceId;

/// What the request itself says, beyond its workspace.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts {
    pub identity: Identity,
    /// GET, HEAD or OPTIONS.
    pub safe_method: bool,
    /// The region whose regional hostname the request arrived on, if any.
    pub arrived_on: Option<RegionIdx>,
    /// The client's country, when GeoIP knows it.
    pub client_country: Option<[u8; 2]>,
}

/// The edge's own policy.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub unidentified: Unidentified,
    pub edge_region: RegionIdx,
    pub strict_regional_hosts: bool,
}

/// Whether this edge can reach a region right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteStatus {
    /// No route for this region in this edge's config.
    Unroutable,
    /// A route, but no healthy endpoint.
    Down,
    Up,
}

/// The state of the edge's routes, as `decide` sees it.
pub trait Routes {
    fn status(&self, region: RegionIdx) -> RouteStatus;
    /// The region whose jurisdiction includes `country` and that is routable here.
    fn nearest(&self, country: [u8; 2]) -> Option<RegionIdx>;
}

/// Where a forwarded request goes and what the origin is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub region: RegionIdx,
    pub workspace: Option<WorkspaceId>,
    pub epoch: Option<u32>,
    pub map_version: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Forward(Forward),
    Refuse {
        code: RefusalCode,
        workspace: Option<WorkspaceId>,
        /// The home region, when known (for messages and audit).
        home_region: Option<RegionIdx>,
    },
}

fn refuse(
    code: RefusalCode,
    workspace: Option<WorkspaceId>,
    home_region: Option<RegionIdx>,
) -> Decision {
    Decision::Refuse {
        code,
        workspace,
        home_region,
    }
}

fn route_to(
    region: RegionIdx,
    routes: &impl Routes,
    forward: Forward,
    workspace: Option<WorkspaceId>,
) -> Decision {
    match routes.status(region) {
        RouteStatus::Unroutable => refuse(RefusalCode::RegionUnroutable, workspace, Some(region)),
        RouteStatus::Down => refuse(RefusalCode::RegionUnavailable, workspace, Some(region)),
        RouteStatus::Up => Decision::Forward(forward),
    }
}

/// The routing decision. `lookup` is the map's answer for the identified workspace, or, for an
/// unidentified request, `NoMap` / `Unknown { version }` to say whether a map is loaded.
pub fn decide(
    facts: &RequestFacts,
    policy: &Policy,
    lookup: Lookup,
    routes: &impl Routes,
) -> Decision {
    let workspace = match facts.identity {
        Identity::Invalid { .. } => return refuse(RefusalCode::InvalidWorkspace, None, None),
        Identity::Conflict { .. } => return refuse(RefusalCode::ConflictingWorkspace, None, None),
        Identity::Workspace(id) => id,
        Identity::None => {
            let map_version = match lookup {
                Lookup::NoMap => None,
                Lookup::Unknown { version } | Lookup::Found { version, .. } => Some(version),
            };
            let region = match policy.unidentified {
                Unidentified::Refuse => return refuse(RefusalCode::MissingWorkspace, None, None),
                Unidentified::EdgeRegion => policy.edge_region,
                Unidentified::NearestRegion => {
                    if map_version.is_none() {
                        // Jurisdictions come with the map.
                        return refuse(RefusalCode::MapUnavailable, None, None);
                    }
                    facts
                        .client_country
                        .and_then(|country| routes.nearest(country))
                        .unwrap_or(policy.edge_region)
                }
            };
            let forward = Forward {
                region,
                workspace: None,
                epoch: None,
                map_version,
            };
            return route_to(region, routes, forward, None);
        }
    };
    let (entry, version) = match lookup {
        Lookup::NoMap => return refuse(RefusalCode::MapUnavailable, Some(workspace), None),
        Lookup::Unknown { .. } => {
            return refuse(RefusalCode::UnknownWorkspace, Some(workspace), None)
        }
        Lookup::Found { entry, version } => (entry, version),
    };
    let home = entry.home_region;
    if policy.strict_regional_hosts {
        if let Some(arrived_on) = facts.arrived_on {
            if arrived_on != home {
                return refuse(
                    RefusalCode::WrongRegionEndpoint,
                    Some(workspace),
                    Some(home),
                );
            }
        }
    }
    if entry.state == WorkspaceState::Frozen && !facts.safe_method {
        return refuse(RefusalCode::WorkspaceMoving, Some(workspace), Some(home));
    }
    let forward = Forward {
        region: home,
        workspace: Some(workspace),
        epoch: Some(entry.epoch),
        map_version: Some(version),
    };
    route_to(home, routes, forward, Some(workspace))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::identify::Source;
    use crate::route::map::MapEntry;
    use crate::route::workspace_id::InvalidId;

    const US: RegionIdx = 0;
    const EU: RegionIdx = 1;
    const AU: RegionIdx = 2; // in the map, no route here
    const DOWN: RegionIdx = 3; // routed, no healthy endpoint

    struct TestRoutes;
    impl Routes for TestRoutes {
        fn status(&self, region: RegionIdx) -> RouteStatus {
            match region {
                US | EU => RouteStatus::Up,
                DOWN => RouteStatus::Down,
                _ => RouteStatus::Unroutable,
            }
        }
        fn nearest(&self, country: [u8; 2]) -> Option<RegionIdx> {
            match &country {
                b"DE" | b"FR" => Some(EU),
                b"US" => Some(US),
                _ => None,
            }
        }
    }

    fn id(s: &str) -> WorkspaceId {
        WorkspaceId::parse(s.as_bytes()).unwrap()
    }

    fn facts(identity: Identity) -> RequestFacts {
        RequestFacts {
            identity,
            safe_method: true,
            arrived_on: None,
            client_country: None,
        }
    }

    fn policy(unidentified: Unidentified) -> Policy {
        Policy {
            unidentified,
            edge_region: US,
            strict_regional_hosts: false,
        }
    }

    fn found(region: RegionIdx, state: WorkspaceState) -> Lookup {
        Lookup::Found {
            entry: MapEntry {
                home_region: region,
                state,
                epoch: 4,
                version: 10,
            },
            version: 12,
        }
    }

    fn code(d: Decision) -> Option<RefusalCode> {
        match d {
            Decision::Refuse { code, .. } => Some(code),
            Decision::Forward(_) => None,
        }
    }

    #[test]
    fn forwards_to_the_home_region_with_epoch_and_version() {
        let d = decide(
            &facts(Identity::Workspace(id("globex"))),
            &policy(Unidentified::Refuse),
            found(EU, WorkspaceState::Active),
            &TestRoutes,
        );
        assert_eq!(
            d,
            Decision::Forward(Forward {
                region: EU,
                workspace: Some(id("globex")),
                epoch: Some(4),
                map_version: Some(12),
            })
        );
    }

    /// One row per refusal code of the design's table that the data plane produces.
    #[test]
    fn every_refusal_row() {
        let ws = Identity::Workspace(id("acme"));
        let mut unsafe_write = facts(ws);
        unsafe_write.safe_method = false;
        let mut strict = policy(Unidentified::Refuse);
        strict.strict_regional_hosts = true;
        let mut wrong_host = facts(ws);
        wrong_host.arrived_on = Some(EU);

        let rows: Vec<(&str, Decision, RefusalCode)> = vec![
            (
                "missing",
                decide(
                    &facts(Identity::None),
                    &policy(Unidentified::Refuse),
                    Lookup::Unknown { version: 1 },
                    &TestRoutes,
                ),
                RefusalCode::MissingWorkspace,
            ),
            (
                "invalid",
                decide(
                    &facts(Identity::Invalid {
                        source: Source::Path,
                        reason: InvalidId::BadChar,
                    }),
                    &policy(Unidentified::EdgeRegion),
                    found(US, WorkspaceState::Active),
                    &TestRoutes,
                ),
                RefusalCode::InvalidWorkspace,
            ),
            (
                "conflicting",
                decide(
                    &facts(Identity::Conflict {
                        first: id("a"),
                        second: id("b"),
                    }),
                    &policy(Unidentified::EdgeRegion),
                    found(US, WorkspaceState::Active),
                    &TestRoutes,
                ),
                RefusalCode::ConflictingWorkspace,
            ),
            (
                "unknown",
                decide(
                    &facts(ws),
                    &policy(Unidentified::EdgeRegion),
                    Lookup::Unknown { version: 3 },
                    &TestRoutes,
                ),
                RefusalCode::UnknownWorkspace,
            ),
            (
                "map unavailable",
                decide(
                    &facts(ws),
                    &policy(Unidentified::Refuse),
                    Lookup::NoMap,
                    &TestRoutes,
                ),
                RefusalCode::MapUnavailable,
            ),
            (
                "map unavailable, nearest",
                decide(
                    &facts(Identity::None),
                    &policy(Unidentified::NearestRegion),
                    Lookup::NoMap,
                    &TestRoutes,
                ),
                RefusalCode::MapUnavailable,
            ),
            (
                "unroutable",
                decide(
                    &facts(ws),
                    &policy(Unidentified::Refuse),
                    found(AU, WorkspaceState::Active),
                    &TestRoutes,
                ),
                RefusalCode::RegionUnroutable,
            ),
            (
                "unavailable",
                decide(
                    &facts(ws),
                    &policy(Unidentified::Refuse),
                    found(DOWN, WorkspaceState::Active),
                    &TestRoutes,
                ),
                RefusalCode::RegionUnavailable,
            ),
            (
                "moving",
                decide(
                    &unsafe_write,
                    &policy(Unidentified::Refuse),
                    found(US, WorkspaceState::Frozen),
                    &TestRoutes,
                ),
                RefusalCode::WorkspaceMoving,
            ),
            (
                "wrong region endpoint",
                decide(
                    &wrong_host,
                    &strict,
                    found(US, WorkspaceState::Active),
                    &TestRoutes,
                ),
                RefusalCode::WrongRegionEndpoint,
            ),
        ];
        for (name, decision, want) in rows {
            assert_eq!(code(decision), Some(want), "{name}");
        }
    }

    #[test]
    fn frozen_workspaces_still_serve_safe_methods_at_the_current_home() {
        let d = decide(
            &facts(Identity::Workspace(id("acme"))),
            &policy(Unidentified::Refuse),
            found(US, WorkspaceState::Frozen),
            &TestRoutes,
        );
        assert!(matches!(d, Decision::Forward(Forward { region: US, .. })));
    }

    #[test]
    fn strict_mode_allows_the_home_regions_host_and_off_mode_ignores_hosts() {
        let mut f = facts(Identity::Workspace(id("acme")));
        f.arrived_on = Some(US);
        let mut strict = policy(Unidentified::Refuse);
        strict.strict_regional_hosts = true;
        assert_eq!(
            code(decide(
                &f,
                &strict,
                found(US, WorkspaceState::Active),
                &TestRoutes
            )),
            None
        );
        f.arrived_on = Some(EU);
        assert_eq!(
            code(decide(
                &f,
                &policy(Unidentified::Refuse),
                found(US, WorkspaceState::Active),
                &TestRoutes
            )),
            None
        );
    }

    #[test]
    fn unidentified_policies() {
        let none = facts(Identity::None);
        let loaded = Lookup::Unknown { version: 7 };
        let edge = decide(
            &none,
            &policy(Unidentified::EdgeRegion),
            loaded,
            &TestRoutes,
        );
        assert_eq!(
            edge,
            Decision::Forward(Forward {
                region: US,
                workspace: None,
                epoch: None,
                map_version: Some(7)
            })
        );
        // edge-region works without any map.
        assert!(matches!(
            decide(
                &none,
                &policy(Unidentified::EdgeRegion),
                Lookup::NoMap,
                &TestRoutes
            ),
            Decision::Forward(Forward {
                region: US,
                map_version: None,
                ..
            })
        ));

        let mut german = none;
        german.client_country = Some(*b"DE");
        assert!(matches!(
            decide(
                &german,
                &policy(Unidentified::NearestRegion),
                loaded,
                &TestRoutes
            ),
            Decision::Forward(Forward { region: EU, .. })
        ));
        let mut japanese = none;
        japanese.client_country = Some(*b"JP");
        assert!(matches!(
            decide(
                &japanese,
                &policy(Unidentified::NearestRegion),
                loaded,
                &TestRoutes
            ),
            Decision::Forward(Forward { region: US, .. })
        ));
        assert!(matches!(
            decide(
                &none,
                &policy(Unidentified::NearestRegion),
                loaded,
                &TestRoutes
            ),
            Decision::Forward(Forward { region: US, .. })
        ));

        let mut down_edge = policy(Unidentified::EdgeRegion);
        down_edge.edge_region = DOWN;
        assert_eq!(
            code(decide(&none, &down_edge, loaded, &TestRoutes)),
            Some(RefusalCode::RegionUnavailable)
        );
    }

    #[test]
    fn never_forwards_an_identified_request_outside_its_home() {
        for home in [US, EU, AU, DOWN] {
            for state in [WorkspaceState::Active, WorkspaceState::Frozen] {
                for safe in [true, false] {
                    for arrived_on in [None, Some(US), Some(EU)] {
                        for strict in [false, true] {
                            let mut f = facts(Identity::Workspace(id("w")));
                            f.safe_method = safe;
                            f.arrived_on = arrived_on;
                            f.client_country = Some(*b"DE");
                            let mut p = policy(Unidentified::NearestRegion);
                            p.strict_regional_hosts = strict;
                            if let Decision::Forward(fw) =
                                decide(&f, &p, found(home, state), &TestRoutes)
                            {
                                assert_eq!(fw.region, home);
                            }
                        }
                    }
                }
            }
        }
    }
}
