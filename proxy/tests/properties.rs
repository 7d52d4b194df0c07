//! Properties over arbitrary input: identification never panics and only ever returns an id the
//! request really carried; decide never forwards an identified request outside its home region;
//! the map file parser never panics and never installs a file it rejected.

use domicile_proxy::config::{Rule, Unidentified};
use domicile_proxy::http::Fields;
use domicile_proxy::route::decide::{decide, Decision, Policy, RequestFacts, RouteStatus, Routes};
use domicile_proxy::route::identify::{Identifier, Identity, RequestView};
use domicile_proxy::route::map::{Lookup, MapEntry, MapTable, RegionIdx, Replica, WorkspaceState};
use domicile_proxy::route::workspace_id::WorkspaceId;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;

fn identifier() -> Identifier {
    Identifier::new(&[
        Rule::Host {
            pattern: "{workspace}.app.example.com".into(),
        },
        Rule::Path {
            pattern: "/w/{workspace}/".into(),
        },
        Rule::Header {
            name: "x-workspace-id".into(),
        },
        Rule::Query { name: "ws".into() },
    ])
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn identify_only_returns_ids_the_request_carried(
        host in "[A-Za-z0-9._-]{0,40}(\\.app\\.example\\.com)?",
        path in "/[A-Za-z0-9/%._~-]{0,60}",
        query in proptest::option::of("[A-Za-z0-9=&%_.-]{0,60}"),
        header in proptest::option::of(proptest::collection::vec(32u8..127, 0..70)),
    ) {
        let mut headers = HeaderMap::new();
        if let Some(bytes) = &header {
            if let Ok(value) = HeaderValue::from_bytes(bytes) {
                headers.insert("x-workspace-id", value);
            }
        }
        let request = RequestView { host: Some(&host), path: &path, query: query.as_deref(), headers: Fields::Map(&headers) };
        if let Identity::Workspace(id) = identifier().identify(&request) {
            // A valid id, and present (case-insensitively) in some part of the request.
            prop_assert!(WorkspaceId::parse(id.as_bytes()).is_ok());
            let haystack = format!("{host} {path} {} {}", query.clone().unwrap_or_default(), String::from_utf8_lossy(header.as_deref().unwrap_or_default())).to_ascii_lowercase();
            prop_assert!(haystack.contains(id.as_str()), "{} not in {}", id, haystack);
        }
    }

    #[test]
    fn workspace_ids_parse_case_insensitively(raw in "[A-Za-z0-9][A-Za-z0-9_-]{0,63}") {
        let id = WorkspaceId::parse(raw.as_bytes()).unwrap();
        prop_assert_eq!(id.as_str(), raw.to_ascii_lowercase());
        prop_assert_eq!(WorkspaceId::parse(raw.to_ascii_uppercase().as_bytes()).unwrap(), id);
    }

    #[test]
    fn decide_never_leaves_the_home_region(
        home in 0u8..4,
        frozen: bool,
        safe: bool,
        strict: bool,
        arrived_on in proptest::option::of(0u8..4),
        country in proptest::option::of(proptest::sample::select(vec![*b"US", *b"DE", *b"JP"])),
        statuses in proptest::collection::vec(0u8..3, 4),
        policy in proptest::sample::select(vec![Unidentified::Refuse, Unidentified::EdgeRegion, Unidentified::NearestRegion]),
    ) {
        struct Table(Vec<u8>);
        impl Routes for Table {
            fn status(&self, region: RegionIdx) -> RouteStatus {
                match self.0.get(region as usize) {
                    Some(0) => RouteStatus::Up,
                    Some(1) => RouteStatus::Down,
                    _ => RouteStatus::Unroutable,
                }
            }
            fn nearest(&self, country: [u8; 2]) -> Option<RegionIdx> {
                (country == *b"DE").then_some(1)
            }
        }
        let routes = Table(statuses);
        let facts = RequestFacts {
            identity: Identity::Workspace(WorkspaceId::parse(b"acme").unwrap()),
            safe_method: safe,
            arrived_on,
            client_country: country,
        };
        let entry = MapEntry { home_region: home, state: if frozen { WorkspaceState::Frozen } else { WorkspaceState::Active }, epoch: 1, version: 1 };
        let decision = decide(&facts, &Policy { unidentified: policy, edge_region: 0, strict_regional_hosts: strict }, Lookup::Found { entry, version: 2 }, &routes);
        if let Decision::Forward(forward) = decision {
            prop_assert_eq!(forward.region, home);
            prop_assert_eq!(routes.status(home), RouteStatus::Up);
            prop_assert!(safe || !frozen);
        }
    }
}

proptest! {
    // Heavier cases (files, hundreds of operations): fewer of them.
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn map_file_parser_never_panics_and_rejected_files_are_not_installed(lines in proptest::collection::vec(
        prop_oneof![
            Just(r#"{"type":"map","version":3}"#.to_owned()),
            Just(r#"{"type":"region","id":"us","jurisdiction":["US"]}"#.to_owned()),
            "[ -~]{0,80}",
            "\\{\"type\":\"workspace\",\"id\":\"[a-zA-Z0-9_-]{0,8}\",\"region\":\"[a-z]{1,3}\"\\}",
        ],
        0..12,
    )) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        let replica = Replica::new();
        match domicile_proxy::route::mapfile::load_into(&path, &replica) {
            Ok((version, len)) => {
                prop_assert_eq!(replica.version(), Some(version));
                prop_assert_eq!(replica.len(), len);
            }
            Err(e) => {
                prop_assert!(!replica.is_loaded());
                prop_assert!(e.to_string().contains("line") || e.to_string().contains("map"));
            }
        }
    }

    #[test]
    fn the_table_agrees_with_a_reference_map(ops in proptest::collection::vec((0u8..3, "[a-z0-9]{1,20}", 0u8..4), 1..300)) {
        let table = MapTable::with_capacity(0, 0);
        let mut reference = std::collections::HashMap::new();
        for (op, id, region) in &ops {
            let ws = WorkspaceId::parse(id.as_bytes()).unwrap();
            match op {
                0 | 1 => {
                    let entry = MapEntry { home_region: *region, state: WorkspaceState::Active, epoch: u32::from(*region), version: 9 };
                    table.insert(&ws, entry);
                    reference.insert(id.clone(), entry);
                }
                _ => {
                    prop_assert_eq!(table.remove(id.as_bytes()), reference.remove(id).is_some());
                }
            }
        }
        prop_assert_eq!(table.len(), reference.len());
        for (id, entry) in &reference {
            prop_assert_eq!(table.get(id.as_bytes()), Some(*entry));
        }
    }
}
