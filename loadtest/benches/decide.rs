//! The per-request hot path at scale: identify + map lookup + decide, with 10 thousand, 1 million
//! and 10 million workspaces in the replica, plus `Replica::lookup` alone at 10 million, with and
//! without its in-flight registration.
//!
//! Run: `cargo bench -p loadtest --bench decide` (see docs/benchmarks.md).
//!
//! Each map is built once per size, outside the timed loop. Requests pick workspaces in a
//! pseudo-random order across the whole map: 2^20 request hosts are precomputed for random
//! workspace indexes and cycled through, so the working set (at 1M and 10M entries) is far larger
//! than the last-level cache and map probes miss the cache as they would in production.
//!
//! The id mix (70% short ids kept inline in the slot, 30% longer ids kept in the arena) and the
//! region assignment are the same as `loadtest map-memory`'s (loadtest/src/main.rs); keep the
//! two `workspace_id`/`home_is_eu` functions in sync.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use domicile_proxy::config::{Rule, Unidentified};
use domicile_proxy::http::Fields;
use domicile_proxy::route::decide::{decide, Decision, Policy, RequestFacts, RouteStatus, Routes};
use domicile_proxy::route::identify::{Identifier, Identity, RequestView};
use domicile_proxy::route::map::{Lookup, MapEntry, MapTable, RegionIdx, Replica, WorkspaceState};
use domicile_proxy::route::workspace_id::WorkspaceId;
use http::{HeaderMap, HeaderValue};
use loadtest::synthetic::{catalogue, home_is_eu, mix, workspace_id};

/// Map sizes benchmarked for the whole request path.
const SIZES: [(u64, &str); 3] = [(10_000, "10K"), (1_000_000, "1M"), (10_000_000, "10M")];
/// Precomputed requests, cycled through (a power of two).
const REQUESTS: usize = 1 << 20;
const HOST_SUFFIX: &str = ".app.example.com";

/// Both regions of the map have healthy routes.
struct BothUp {
    us: RegionIdx,
    eu: RegionIdx,
}

impl Routes for BothUp {
    fn status(&self, region: RegionIdx) -> RouteStatus {
        if region == self.us || region == self.eu {
            RouteStatus::Up
        } else {
            RouteStatus::Unroutable
        }
    }

    fn nearest(&self, _country: [u8; 2]) -> Option<RegionIdx> {
        None
    }
}

/// Request hosts for random workspaces, in one contiguous buffer.
struct Requests {
    hosts: String,
    /// (start, end) of each host in `hosts`, and the workspace index it names.
    spans: Vec<(u32, u32, u64)>,
}

impl Requests {
    fn random(entries: u64, seed: u64) -> Self {
        let mut hosts = String::with_capacity(REQUESTS * 36);
        let mut spans = Vec::with_capacity(REQUESTS);
        for n in 0..REQUESTS as u64 {
            let index = mix(seed ^ n.wrapping_mul(0x2545_f491_4f6c_dd1d)) % entries;
            let start = hosts.len() as u32;
            hosts.push_str(&workspace_id(index));
            hosts.push_str(HOST_SUFFIX);
            spans.push((start, hosts.len() as u32, index));
        }
        Self { hosts, spans }
    }

    fn host(&self, n: usize) -> &str {
        let (start, end, _) = self.spans[n];
        &self.hosts[start as usize..end as usize]
    }
}

/// One map size with everything a request needs.
struct Fixture {
    entries: u64,
    replica: Replica,
    identifier: Identifier,
    policy: Policy,
    routes: BothUp,
    headers: HeaderMap,
    requests: Requests,
}

impl Fixture {
    fn build(entries: u64) -> Self {
        let started = Instant::now();
        let replica = Replica::new();
        let us = replica.regions().intern("us").expect("region us");
        let eu = replica.regions().intern("eu").expect("region eu");
        let table = MapTable::with_capacity(entries as usize, 1);
        for i in 0..entries {
            let id = WorkspaceId::parse(workspace_id(i).as_bytes()).expect("valid id");
            let entry = MapEntry {
                home_region: if home_is_eu(i) { eu } else { us },
                state: WorkspaceState::Active,
                epoch: 1 + (i % 7) as u32,
                version: 1,
            };
            table.insert(&id, entry);
        }
        table.publish_version(1);
        assert_eq!(table.len() as u64, entries, "workspace ids must be unique");
        let catalogue = catalogue();
        replica.replace(table, &catalogue).expect("catalogue");

        let identifier = Identifier::new(&[
            Rule::Host {
                pattern: format!("{{workspace}}{HOST_SUFFIX}"),
            },
            Rule::Header {
                name: "x-workspace-id".into(),
            },
        ])
        .expect("rules");
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("accept", "application/json"),
            ("accept-encoding", "gzip, br"),
            ("user-agent", "domicile-bench/1.0"),
            ("x-request-id", "0f8e2a41-5b7c-4d3e-9a10-6c2b8f4e7d95"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        let fixture = Self {
            entries,
            replica,
            identifier,
            policy: Policy {
                unidentified: Unidentified::Refuse,
                edge_region: us,
                strict_regional_hosts: false,
            },
            routes: BothUp { us, eu },
            headers,
            requests: Requests::random(entries, entries),
        };
        fixture.check();
        eprintln!(
            "decide bench: built {} workspaces (and {REQUESTS} requests) in {:.2?}",
            entries,
            started.elapsed()
        );
        fixture
    }

    /// The request path as `pipeline` runs it, minus I/O and headers (the in-flight
    /// registration is taken and, the request being over at once, released).
    fn route(&self, n: usize) -> Decision {
        let view = RequestView {
            host: Some(self.requests.host(n)),
            path: "/api/v1/documents",
            query: None,
            headers: Fields::Map(&self.headers),
        };
        let identity = self.identifier.identify(black_box(&view));
        let (lookup, _in_flight) = match identity {
            Identity::Workspace(id) => self.replica.lookup_tracked(&id),
            _ => match self.replica.version() {
                Some(version) => (Lookup::Unknown { version }, None),
                None => (Lookup::NoMap, None),
            },
        };
        let facts = RequestFacts {
            identity,
            safe_method: true,
            arrived_on: None,
            client_country: None,
        };
        decide(&facts, &self.policy, lookup, &self.routes)
    }

    /// Every precomputed request is forwarded to its workspace's home region.
    fn check(&self) {
        for (n, &(_, _, index)) in self.requests.spans.iter().enumerate() {
            let want = if home_is_eu(index) {
                self.routes.eu
            } else {
                self.routes.us
            };
            match self.route(n) {
                Decision::Forward(forward) if forward.region == want => {}
                other => panic!("request {n} ({}): {other:?}", self.requests.host(n)),
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("identify_lookup_decide");
    group.throughput(Throughput::Elements(1));
    let mut largest = None;
    for (entries, label) in SIZES {
        // Drop the previous map before building the next one.
        drop(largest.take());
        let fixture = Fixture::build(entries);
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            let mut n = 0usize;
            b.iter(|| {
                let decision = fixture.route(n);
                n = (n + 1) & (REQUESTS - 1);
                black_box(decision)
            })
        });
        largest = Some(fixture);
    }
    group.finish();

    let fixture = largest.expect("the largest map");
    let ids: Vec<WorkspaceId> = fixture
        .requests
        .spans
        .iter()
        .map(|&(_, _, index)| WorkspaceId::parse(workspace_id(index).as_bytes()).expect("valid id"))
        .collect();
    let mut group = c.benchmark_group("replica_lookup");
    group.throughput(Throughput::Elements(1));
    let label = SIZES[SIZES.len() - 1].1;
    assert_eq!(fixture.entries, SIZES[SIZES.len() - 1].0);
    group.bench_function(BenchmarkId::from_parameter(label), |b| {
        let mut n = 0usize;
        b.iter(|| {
            let lookup = fixture.replica.lookup(black_box(&ids[n]));
            n = (n + 1) & (REQUESTS - 1);
            black_box(lookup)
        })
    });
    // The same lookup registered as in flight and released (what a forwarded request pays for
    // moves: `proxy/src/inflight.rs`).
    group.bench_function(BenchmarkId::new("tracked", label), |b| {
        let mut n = 0usize;
        b.iter(|| {
            let (lookup, guard) = fixture.replica.lookup_tracked(black_box(&ids[n]));
            n = (n + 1) & (REQUESTS - 1);
            drop(black_box(guard));
            black_box(lookup)
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
