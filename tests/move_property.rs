//! The property that matters for moves, checked against real processes' evidence.
//!
//! Three proxies follow a control plane; two origins (us, eu) log every request they get with
//! its `x-domicile-workspace`, `x-domicile-epoch` and `x-domicile-map-version`. Clients send a
//! steady mix of reads and writes for many workspaces through all three proxies while movers
//! run many moves back and forth (with an instant data copy), and a proxy is restarted, the
//! control plane is restarted, then another proxy is restarted, all in the middle of it.
//!
//! Afterwards, from the origins' logs, the map history and the moves' recorded phase times:
//! 1. every request reached the home its map version names, with that version's epoch, and no
//!    write was routed by a frozen entry (no request reached a region that was never the
//!    workspace's home at that version);
//! 2. no write reached the old home after the fleet drained the freeze (that is when the copy
//!    may start);
//! 3. no request of any kind reached the old home after the switch converged.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cp::*;
use common::*;
use domicile::client::{AdminClient, ApiError};
use domicile_control_plane::store::{HistoryRecord, Move, Phase};
use domicile_wire::{Op, State};
use http::Method;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

const PROXIES: usize = 3;
const WORKSPACES: usize = 12;
const CLIENTS: usize = 12;
const MOVES: usize = 80;
const MOVERS: usize = 4;

/// A small deterministic generator (xorshift), one per task.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[derive(Default)]
struct Tally {
    reads_ok: AtomicU64,
    reads_refused: AtomicU64,
    writes_ok: AtomicU64,
    writes_moving: AtomicU64,
    writes_refused_otherwise: AtomicU64,
    /// Connection failures: a proxy was being restarted.
    unreachable: AtomicU64,
}

/// Calls the API until it answers (the control plane may be restarting); API errors are
/// returned, transport errors and 503 retried for up to 30 s.
async fn api(
    admin: &AdminClient,
    method: Method,
    path: &str,
    body: Value,
) -> Result<Value, ApiError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let result = match method {
            Method::GET => admin.get_json(path).await,
            _ => admin.send_json(method.clone(), path, &body).await,
        };
        match result {
            Ok(v) => return Ok(v),
            Err(e) => match e.downcast::<ApiError>() {
                Ok(api) if api.status != http::StatusCode::SERVICE_UNAVAILABLE => return Err(api),
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(api) => panic!("{method} {path}: {api}"),
                Err(e) => panic!("{method} {path}: {e}"),
            },
        }
    }
}

/// Runs one move to the end with an instant data copy; returns its id.
async fn run_move(admin: &AdminClient, workspace: &str, to: &str) -> u64 {
    let m = api(
        admin,
        Method::POST,
        "/v1/moves",
        json!({"workspace": workspace, "to": to, "reason": "property test"}),
    )
    .await
    .unwrap_or_else(|e| panic!("move {workspace} -> {to}: {e}"));
    let id = m["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = api(admin, Method::GET, &format!("/v1/moves/{id}"), Value::Null)
            .await
            .unwrap();
        match m["phase"].as_str().unwrap() {
            "frozen" => {
                api(
                    admin,
                    Method::POST,
                    &format!("/v1/moves/{id}/complete"),
                    json!({}),
                )
                .await
                .unwrap();
            }
            "done" => return id,
            "aborted" => panic!("move {id} aborted: {m}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "move {id} is stuck: {m}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One request an origin logged.
struct Logged {
    region: String,
    workspace: String,
    write: bool,
    epoch: u32,
    version: u64,
    at_ms: i64,
}

/// The workspace's entry at map version `v`: its last change at or before `v`.
fn entry_at(history: &[HistoryRecord], v: u64) -> Option<&HistoryRecord> {
    history.iter().take_while(|h| h.version <= v).last()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_request_is_processed_in_the_wrong_region_across_moves_and_restarts() {
    let started = Instant::now();
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let workspaces: Vec<String> = (0..WORKSPACES).map(|i| format!("w{i:02}")).collect();
    for (i, w) in workspaces.iter().enumerate() {
        let region = if i % 2 == 0 { "us" } else { "eu" };
        put(
            &cp.admin,
            &format!("/v1/workspaces/{w}"),
            json!({"region": region}),
        )
        .await;
    }
    let us = origin("us").await;
    let eu = origin("eu").await;
    let mut proxies = Vec::new();
    for i in 0..PROXIES {
        let secret = token(&cp.admin, &format!("edge-{i}"), "proxy").await;
        let proxy = following(&cp.url(), &secret, &us, &eu)
            .id(&format!("edge-{i}"))
            .start()
            .await;
        proxies.push(proxy);
    }
    let head = cp.running.store.head().await.unwrap().version;
    for proxy in &proxies {
        synced(proxy, head).await;
    }
    let addrs: Arc<RwLock<Vec<Option<SocketAddr>>>> = Arc::new(RwLock::new(
        proxies.iter().map(|p| Some(p.addr())).collect(),
    ));

    // The load: reads and writes for every workspace through every proxy.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (addrs, stop, tally, workspaces) = (
            addrs.clone(),
            stop.clone(),
            tally.clone(),
            workspaces.clone(),
        );
        clients.push(tokio::spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((c as u64 + 1) * 0x1234_5678_9abc));
            while !stop.load(Ordering::Relaxed) {
                let addr = {
                    let addrs = addrs.read().unwrap();
                    addrs[rng.below(addrs.len())]
                };
                let Some(addr) = addr else {
                    continue;
                };
                let workspace = &workspaces[rng.below(workspaces.len())];
                let write = rng.below(10) < 4;
                // Some requests take the origin a while: they are in flight when a freeze or
                // a switch arrives, which is what the drained version must account for.
                let delay = if rng.below(4) == 0 { rng.below(40) } else { 0 };
                let request = http::Request::builder()
                    .method(if write { Method::POST } else { Method::GET })
                    .uri(format!("http://{addr}/w/{workspace}/items"))
                    .header("x-origin-delay-ms", delay.to_string())
                    .body(Full::new(if write {
                        Bytes::from_static(b"{\"n\":1}")
                    } else {
                        Bytes::new()
                    }))
                    .unwrap();
                let reply =
                    match tokio::time::timeout(Duration::from_secs(10), client.request(request))
                        .await
                    {
                        Ok(Ok(response)) => collect(response).await,
                        _ => {
                            tally.unreachable.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                    };
                let counter = match (write, reply.status, reply.refusal()) {
                    (false, 200, _) => &tally.reads_ok,
                    (false, _, _) => &tally.reads_refused,
                    (true, 200, _) => &tally.writes_ok,
                    (true, 503, Some("workspace_moving")) => &tally.writes_moving,
                    (true, _, _) => &tally.writes_refused_otherwise,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // The movers: many moves back and forth, a few at a time, never two of one workspace.
    let idle: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(workspaces.clone()));
    let moves_done = Arc::new(AtomicUsize::new(0));
    let mut movers = Vec::new();
    for m in 0..MOVERS {
        let (admin, idle, moves_done) = (cp.admin.clone(), idle.clone(), moves_done.clone());
        movers.push(tokio::spawn(async move {
            let mut rng = Rng(0xdead_beef_u64 + m as u64 * 7919);
            for _ in 0..MOVES / MOVERS {
                let workspace = {
                    let mut idle = idle.lock().unwrap();
                    let i = rng.below(idle.len());
                    idle.swap_remove(i)
                };
                let current = api(
                    &admin,
                    Method::GET,
                    &format!("/v1/workspaces/{workspace}"),
                    Value::Null,
                )
                .await
                .unwrap();
                let to = if current["region"] == "us" {
                    "eu"
                } else {
                    "us"
                };
                run_move(&admin, &workspace, to).await;
                idle.lock().unwrap().push(workspace);
                moves_done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Chaos in the middle of it: a proxy restart, a control-plane restart, another proxy.
    let wait_for_moves = |n: usize| {
        let moves_done = moves_done.clone();
        async move {
            while moves_done.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let restart_proxy = |i: usize, proxies: &mut Vec<TestProxy>| {
        addrs.write().unwrap()[i] = None;
        let proxy = proxies.remove(i);
        async move { restart(proxy).await }
    };
    wait_for_moves(MOVES / 4).await;
    let restarted = restart_proxy(0, &mut proxies).await;
    addrs.write().unwrap()[0] = Some(restarted.addr());
    proxies.insert(0, restarted);

    wait_for_moves(MOVES / 2).await;
    let Cp {
        running,
        admin: _,
        dir,
    } = cp;
    let listen = running.addr;
    let store_url = format!("sqlite://{}", dir.path().join("cp.db").display());
    running.shutdown().await;
    // Proxies keep routing from their maps meanwhile; moves wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cp = control_plane(Some(&store_url), listen, |_| {}).await;

    wait_for_moves(3 * MOVES / 4).await;
    let restarted = restart_proxy(1, &mut proxies).await;
    addrs.write().unwrap()[1] = Some(restarted.addr());
    proxies.insert(1, restarted);

    for mover in movers {
        mover.await.expect("mover");
    }
    // A little more load after the last move, then stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    let elapsed = started.elapsed();

    // ---- the evidence ----
    let store = &cp.running.store;
    let mut history: HashMap<String, Vec<HistoryRecord>> = HashMap::new();
    let mut moves: HashMap<String, Vec<Move>> = HashMap::new();
    for w in &workspaces {
        history.insert(w.clone(), store.history(w).await.unwrap());
        moves.insert(w.clone(), store.moves(Some(w), false, 1000).await.unwrap());
    }
    let logged: Vec<Logged> = [&us, &eu]
        .iter()
        .flat_map(|origin| {
            origin.seen_requests().into_iter().filter_map(|s| {
                let header = |name: &str| s.headers.get(name).cloned();
                Some(Logged {
                    region: origin.region.clone(),
                    workspace: header("x-domicile-workspace")?,
                    write: s.method != "GET",
                    epoch: header("x-domicile-epoch")?.parse().ok()?,
                    version: header("x-domicile-map-version")?.parse().ok()?,
                    at_ms: s.at_us / 1000,
                })
            })
        })
        .collect();

    let mut violations: Vec<String> = Vec::new();
    for r in &logged {
        let h = &history[&r.workspace];
        // 1. The home of the version it was routed with, that version's epoch; no write by a
        //    frozen entry.
        match entry_at(h, r.version) {
            Some(e) if e.op == Op::Put => {
                if e.region.as_deref() != Some(&r.region) || e.epoch != Some(r.epoch) {
                    violations.push(format!(
                        "{} reached {} with version {} epoch {}, whose entry is {:?}/{:?}",
                        r.workspace, r.region, r.version, r.epoch, e.region, e.epoch
                    ));
                }
                if r.write && e.state != Some(State::Active) {
                    violations.push(format!(
                        "a write of {} was routed by frozen version {}",
                        r.workspace, r.version
                    ));
                }
            }
            _ => violations.push(format!(
                "{} reached {} with version {}, at which it had no entry",
                r.workspace, r.region, r.version
            )),
        }
        for m in &moves[&r.workspace] {
            // 2. No write routed before the freeze arrived after the freeze drained.
            if let (true, Some(vf), Some(frozen_at)) = (r.write, m.freeze_version, m.frozen_at_ms) {
                if r.version < vf && r.at_ms > frozen_at {
                    violations.push(format!(
                        "a write of {} (version {} < freeze {vf}) reached {} {} ms after move {} drained the freeze",
                        r.workspace, r.version, r.region, r.at_ms - frozen_at, m.id
                    ));
                }
            }
            // 3. Nothing routed before the switch reached the old home after the switch
            //    converged.
            if let (Some(vs), Some(done_at)) = (m.switch_version, m.done_at_ms) {
                if r.region == m.from && r.version < vs && r.at_ms > done_at {
                    violations.push(format!(
                        "a request of {} (version {} < switch {vs}) reached the old home {} {} ms after move {} converged",
                        r.workspace, r.version, r.region, r.at_ms - done_at, m.id
                    ));
                }
            }
        }
    }

    let all_moves: Vec<&Move> = moves.values().flatten().collect();
    let done = all_moves.iter().filter(|m| m.phase == Phase::Done).count();
    let mut pauses: Vec<i64> = all_moves
        .iter()
        .filter_map(|m| Some(m.done_at_ms? - m.freezing_at_ms?))
        .collect();
    pauses.sort_unstable();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let writes_at_origins = logged.iter().filter(|r| r.write).count();
    eprintln!(
        "{} requests logged by origins ({} writes) in {:.1} s; {done} moves done; clients: \
         reads ok {} refused {}, writes ok {} refused workspace_moving {} otherwise {}, \
         unreachable during restarts {}; write pause (freeze to unfreeze) p50 {} ms, max {} ms",
        logged.len(),
        writes_at_origins,
        elapsed.as_secs_f64(),
        load(&tally.reads_ok),
        load(&tally.reads_refused),
        load(&tally.writes_ok),
        load(&tally.writes_moving),
        load(&tally.writes_refused_otherwise),
        load(&tally.unreachable),
        pauses.get(pauses.len() / 2).copied().unwrap_or(0),
        pauses.last().copied().unwrap_or(0),
    );
    assert!(
        violations.is_empty(),
        "{} violation(s), first ones:\n{}",
        violations.len(),
        violations
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(done, MOVES / MOVERS * MOVERS, "every move finished");
    assert_eq!(
        load(&tally.reads_refused),
        0,
        "reads are never refused by a move"
    );
    assert_eq!(load(&tally.writes_refused_otherwise), 0);
    assert!(
        load(&tally.writes_moving) > 0,
        "the load did meet frozen workspaces"
    );
    assert!(
        logged.len() > 20 * MOVES,
        "enough load to matter: {} requests for {MOVES} moves",
        logged.len()
    );
    // The evidence is consistent with the map's end state.
    for w in &workspaces {
        let last = history[w].last().unwrap();
        assert_eq!(last.state, Some(State::Active), "{w} ends active");
    }
    drop(proxies);
}
