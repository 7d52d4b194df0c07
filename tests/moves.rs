//! Moves through the API, end to end: every phase with a fleet that drains on command, aborts,
//! refusals, the stalled-move report, webhooks, the admin audit trail, and a real proxy whose
//! slow request holds a move until it finishes.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cp::*;
use common::*;
use domicile::client::{AdminClient, ApiError};
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// A fleet member played by the test: it heartbeats whatever versions it is told to.
struct FakeProxy {
    id: &'static str,
    client: AdminClient,
    epoch: String,
}

impl FakeProxy {
    async fn new(cp: &Cp, id: &'static str) -> Self {
        let secret = token(&cp.admin, id, "proxy").await;
        Self {
            id,
            client: AdminClient::new(&cp.url(), Some(secret)),
            epoch: cp.running.store.epoch().to_owned(),
        }
    }

    async fn beat(&self, applied: u64, drained: u64) {
        self.client
            .send_json(
                Method::POST,
                "/v1/fleet/heartbeat",
                &json!({
                    "proxy_id": self.id,
                    "edge_region": "us",
                    "applied_version": applied,
                    "drained_version": drained,
                    "checksum": "0000000000000000",
                    "epoch": self.epoch,
                }),
            )
            .await
            .unwrap_or_else(|e| panic!("heartbeat of {}: {e}", self.id));
    }
}

/// Receives webhook calls and keeps their bodies.
struct Hook {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Hook {
    async fn start() -> Self {
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;
        let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let kept = calls.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let event = req
                                .headers()
                                .get("x-domicile-event")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned();
                            let body = req.into_body().collect().await?.to_bytes();
                            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            kept.lock().unwrap().push((event, body));
                            Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                                Bytes::new(),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, calls }
    }

    fn url(&self) -> String {
        format!("http://{}/moves", self.addr)
    }

    fn events(&self) -> Vec<(String, String)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(event, body)| {
                (
                    event.clone(),
                    body["move"]["phase"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
}

async fn start_move(admin: &AdminClient, body: Value) -> Value {
    admin
        .send_json(Method::POST, "/v1/moves", &body)
        .await
        .unwrap_or_else(|e| panic!("POST /v1/moves {body}: {e}"))
}

async fn get_move(admin: &AdminClient, id: u64) -> Value {
    admin.get_json(&format!("/v1/moves/{id}")).await.unwrap()
}

/// Waits until the move is in `phase` (10 s at most) and returns it.
async fn wait_phase(admin: &AdminClient, id: u64, phase: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = get_move(admin, id).await;
        if m["phase"] == phase {
            return m;
        }
        assert!(Instant::now() < deadline, "move never reached {phase}: {m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The move stays in `phase` for a while (the driver had every chance to advance it).
async fn stays(admin: &AdminClient, id: u64, phase: &str) -> Value {
    tokio::time::sleep(Duration::from_millis(400)).await;
    let m = get_move(admin, id).await;
    assert_eq!(m["phase"], phase, "{m}");
    m
}

fn waiting_ids(m: &Value) -> Vec<String> {
    m["waiting_for"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["proxy_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn post(admin: &AdminClient, path: &str) -> Result<Value, ApiError> {
    admin
        .send_json(Method::POST, path, &json!({}))
        .await
        .map_err(|e| e.downcast::<ApiError>().expect("an API error"))
}

async fn workspace(admin: &AdminClient, id: &str) -> Value {
    admin
        .get_json(&format!("/v1/workspaces/{id}"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_goes_through_every_phase_as_the_fleet_drains() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let a = FakeProxy::new(&cp, "edge-a").await;
    let b = FakeProxy::new(&cp, "edge-b").await;
    let head = head_version(&cp).await;
    a.beat(head, head).await;
    b.beat(head, head).await;
    let hook = Hook::start().await;

    let m = start_move(
        &cp.admin,
        json!({"workspace": "ACME", "to": "eu", "reason": "customer asked", "webhook": hook.url()}),
    )
    .await;
    assert_eq!(m["phase"], "requested");
    assert_eq!(
        (m["workspace"].as_str(), m["from"].as_str()),
        (Some("acme"), Some("us"))
    );
    let id = m["id"].as_u64().unwrap();

    // Freezing: the freeze is written and both proxies are waited for.
    let m = wait_phase(&cp.admin, id, "freezing").await;
    let vf = m["versions"]["freeze"].as_u64().unwrap();
    assert_eq!(m["awaiting_version"], vf);
    assert_eq!(waiting_ids(&m), ["edge-a", "edge-b"]);
    let acme = workspace(&cp.admin, "acme").await;
    assert_eq!(
        (acme["state"].as_str(), acme["region"].as_str()),
        (Some("frozen"), Some("us"))
    );
    assert_eq!(acme["version"], vf);

    // Not before the fleet drained: complete is refused, and so is a second move.
    let e = post(&cp.admin, &format!("/v1/moves/{id}/complete"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.status, e.code.as_str()),
        (StatusCode::CONFLICT, "move_not_frozen")
    );
    let e = cp
        .admin
        .send_json(
            Method::POST,
            "/v1/moves",
            &json!({"workspace": "acme", "to": "eu"}),
        )
        .await
        .unwrap_err()
        .downcast::<ApiError>()
        .unwrap();
    assert_eq!(
        (e.status, e.code.as_str()),
        (StatusCode::CONFLICT, "move_in_progress")
    );
    assert!(e.message.contains(&format!("move {id}")), "{}", e.message);

    // One proxy drained; the other applied the freeze but still has an older request in flight.
    a.beat(vf, vf).await;
    b.beat(vf, vf - 1).await;
    let m = stays(&cp.admin, id, "freezing").await;
    assert_eq!(waiting_ids(&m), ["edge-b"]);
    assert_eq!(
        m["waiting_for"][0]["why"],
        format!("drained {} < {vf}", vf - 1)
    );
    b.beat(vf, vf).await;
    let m = wait_phase(&cp.admin, id, "frozen").await;
    assert!(m["waiting_for"].as_array().unwrap().is_empty());
    assert!(m["at"]["frozen"].is_string());

    // The data mover completes: the home switches (still frozen) and the fleet must drain it.
    let m = post(&cp.admin, &format!("/v1/moves/{id}/complete"))
        .await
        .unwrap();
    assert_eq!(m["phase"], "switching");
    let vs = m["versions"]["switch"].as_u64().unwrap();
    assert!(vs > vf);
    let acme = workspace(&cp.admin, "acme").await;
    assert_eq!(
        (acme["state"].as_str(), acme["region"].as_str()),
        (Some("frozen"), Some("eu"))
    );
    // A retried complete is harmless; an abort is too late.
    assert_eq!(
        post(&cp.admin, &format!("/v1/moves/{id}/complete"))
            .await
            .unwrap()["phase"],
        "switching"
    );
    let e = post(&cp.admin, &format!("/v1/moves/{id}/abort"))
        .await
        .unwrap_err();
    assert_eq!(e.code, "move_past_switch");
    a.beat(vs, vs).await;
    let m = stays(&cp.admin, id, "switching").await;
    assert_eq!(waiting_ids(&m), ["edge-b"]);
    b.beat(vs, vs).await;
    let m = wait_phase(&cp.admin, id, "done").await;
    let vu = m["versions"]["done"].as_u64().unwrap();
    let acme = workspace(&cp.admin, "acme").await;
    assert_eq!(
        (acme["state"].as_str(), acme["region"].as_str()),
        (Some("active"), Some("eu"))
    );
    assert_eq!(acme["version"], vu);
    assert!(m["write_pause_ms"].as_i64().unwrap() >= 0);

    // The webhook saw every phase, in order.
    let deadline = Instant::now() + Duration::from_secs(5);
    while hook.events().len() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let phases: Vec<String> = hook.events().into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        phases,
        ["requested", "freezing", "frozen", "switching", "done"]
    );
    assert!(hook.events().iter().all(|(e, _)| e == "move.phase"));

    // The audit trail: each phase and each map write, with actor and reason.
    let trail = cp
        .admin
        .get_json("/v1/audit/admin?workspace=acme")
        .await
        .unwrap();
    let entries = trail["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in [
        "move.requested",
        "move.freezing",
        "move.frozen",
        "move.switching",
        "move.done",
    ] {
        assert_eq!(
            actions.iter().filter(|a| **a == action).count(),
            1,
            "{action}: {actions:?}"
        );
    }
    let map_writes: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "map.workspace.put" && e["version"].as_u64() >= Some(vf))
        .collect();
    assert_eq!(map_writes.len(), 3, "freeze, switch, unfreeze: {trail}");
    assert!(map_writes.iter().all(|e| e["reason"]
        .as_str()
        .unwrap()
        .starts_with(&format!("move {id}:"))));
    assert!(map_writes.iter().all(|e| e["actor"] == entries[0]["actor"]));
    let listed = cp.admin.get_json("/v1/moves?workspace=acme").await.unwrap();
    assert_eq!(listed["moves"][0]["id"], id);
    assert_eq!(listed["moves"][0]["phase"], "done");
}

async fn head_version(cp: &Cp) -> u64 {
    cp.running.store.head().await.unwrap().version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_unfreezes_at_the_old_home_in_freezing_and_in_frozen() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let a = FakeProxy::new(&cp, "edge-a").await;
    let head = head_version(&cp).await;
    a.beat(head, head).await;

    // Aborted while freezing (the proxy never drains).
    let id = start_move(&cp.admin, json!({"workspace": "acme", "to": "eu"})).await["id"]
        .as_u64()
        .unwrap();
    wait_phase(&cp.admin, id, "freezing").await;
    let m = cp
        .admin
        .send_json(
            Method::POST,
            &format!("/v1/moves/{id}/abort"),
            &json!({"reason": "wrong workspace"}),
        )
        .await
        .unwrap();
    assert_eq!(m["phase"], "aborted");
    assert_eq!(m["abort_reason"], "wrong workspace");
    let acme = workspace(&cp.admin, "acme").await;
    assert_eq!(
        (acme["state"].as_str(), acme["region"].as_str()),
        (Some("active"), Some("us"))
    );
    assert_eq!(acme["version"], m["versions"]["abort"]);
    // Aborting again is harmless; completing is refused.
    assert_eq!(
        post(&cp.admin, &format!("/v1/moves/{id}/abort"))
            .await
            .unwrap()["phase"],
        "aborted"
    );
    let e = post(&cp.admin, &format!("/v1/moves/{id}/complete"))
        .await
        .unwrap_err();
    assert_eq!(e.code, "move_aborted");

    // Aborted once frozen.
    let id = start_move(&cp.admin, json!({"workspace": "acme", "to": "eu"})).await["id"]
        .as_u64()
        .unwrap();
    let vf = wait_phase(&cp.admin, id, "freezing").await["versions"]["freeze"]
        .as_u64()
        .unwrap();
    a.beat(vf, vf).await;
    wait_phase(&cp.admin, id, "frozen").await;
    let m = post(&cp.admin, &format!("/v1/moves/{id}/abort"))
        .await
        .unwrap();
    assert_eq!(m["phase"], "aborted");
    let acme = workspace(&cp.admin, "acme").await;
    assert_eq!(
        (acme["state"].as_str(), acme["region"].as_str()),
        (Some("active"), Some("us"))
    );
    // A new move may start once the last one is over.
    start_move(&cp.admin, json!({"workspace": "acme", "to": "eu"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_move_requests_are_refused_with_their_reason() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let refused = |body: Value| {
        let admin = cp.admin.clone();
        async move {
            let e = admin
                .send_json(Method::POST, "/v1/moves", &body)
                .await
                .expect_err("refused")
                .downcast::<ApiError>()
                .unwrap();
            (e.status.as_u16(), e.code)
        }
    };
    let cases = [
        (
            json!({"workspace": "acme", "to": "mars"}),
            422,
            "unknown_region",
        ),
        (json!({"workspace": "acme", "to": "us"}), 422, "same_region"),
        (json!({"workspace": "nobody", "to": "eu"}), 404, "not_found"),
        (
            json!({"workspace": "bad id!", "to": "eu"}),
            400,
            "invalid_workspace_id",
        ),
        (
            json!({"workspace": "acme", "to": "EU!"}),
            400,
            "invalid_region_id",
        ),
        (json!({"workspace": "acme"}), 400, "invalid_body"),
        (
            json!({"workspace": "acme", "to": "eu", "colour": "red"}),
            400,
            "invalid_body",
        ),
        (
            json!({"workspace": "acme", "to": "eu", "webhook": "ftp://x"}),
            400,
            "invalid_webhook",
        ),
        (
            json!({"workspace": "acme", "to": "eu", "webhook": "https://hooks.example/m"}),
            400,
            "invalid_webhook",
        ),
        (
            json!({"workspace": "acme", "to": "eu", "timeout_seconds": 0}),
            400,
            "invalid_body",
        ),
        (
            json!({"workspace": "acme", "to": "eu", "reason": "x".repeat(1025)}),
            400,
            "invalid_body",
        ),
        (
            json!({"workspace": "hooli-frozen", "to": "eu"}),
            409,
            "workspace_moving",
        ),
    ];
    // A workspace frozen outside any move (by hand, in the store) is not moved on top of that.
    put(
        &cp.admin,
        "/v1/workspaces/hooli-frozen",
        json!({"region": "us"}),
    )
    .await;
    cp.running
        .store
        .set_workspace_state(
            "hooli-frozen",
            domicile_wire::State::Frozen,
            None,
            &domicile_control_plane::store::Actor::new("test"),
        )
        .await
        .unwrap();
    for (body, status, code) in cases {
        assert_eq!(
            refused(body.clone()).await,
            (status, code.to_owned()),
            "{body}"
        );
    }
    assert!(
        cp.admin.get_json("/v1/moves").await.unwrap()["moves"]
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing was recorded"
    );
    for (path, code) in [
        ("/v1/moves/0", "invalid_move_id"),
        ("/v1/moves/x", "invalid_move_id"),
        ("/v1/moves/99", "not_found"),
    ] {
        let e = cp
            .admin
            .get_json(path)
            .await
            .unwrap_err()
            .downcast::<ApiError>()
            .unwrap();
        assert_eq!(e.code, code, "{path}");
    }
    for path in [
        "/v1/audit/admin?since=yesterday",
        "/v1/audit/admin?after=not-a-cursor",
        "/v1/audit/admin?colour=red",
        "/v1/moves?limit=many",
    ] {
        let e = cp
            .admin
            .get_json(path)
            .await
            .unwrap_err()
            .downcast::<ApiError>()
            .unwrap();
        assert_eq!(
            (e.status, e.code.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_query"),
            "{path}"
        );
    }
    let e = cp
        .admin
        .send(
            Method::POST,
            "/v1/moves/1/abort",
            Some((Bytes::from_static(b"{\"why\": 1}"), "application/json")),
        )
        .await
        .unwrap_err()
        .downcast::<ApiError>()
        .unwrap();
    assert_eq!(e.code, "invalid_body", "an unknown field in an abort body");

    // Roles: an auditor reads moves and the trail but cannot start one; an operator can.
    let auditor = AdminClient::new(
        &cp.url(),
        Some(token(&cp.admin, "auditor", "auditor").await),
    );
    let operator = AdminClient::new(&cp.url(), Some(token(&cp.admin, "ops", "operator").await));
    let e = auditor
        .send_json(
            Method::POST,
            "/v1/moves",
            &json!({"workspace": "acme", "to": "eu"}),
        )
        .await
        .unwrap_err()
        .downcast::<ApiError>()
        .unwrap();
    assert_eq!(e.status, StatusCode::FORBIDDEN);
    let m = start_move(&operator, json!({"workspace": "acme", "to": "eu"})).await;
    assert_eq!(m["actor"], "ops");
    auditor
        .get_json(&format!("/v1/moves/{}", m["id"]))
        .await
        .unwrap();
    let trail = auditor.get_json("/v1/audit/admin").await.unwrap();
    let actions: Vec<&str> = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"token.create") && actions.contains(&"move.requested"),
        "{actions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_past_its_timeout_names_the_lagging_proxy_and_keeps_waiting() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let a = FakeProxy::new(&cp, "edge-a").await;
    let b = FakeProxy::new(&cp, "edge-stuck").await;
    let head = head_version(&cp).await;
    a.beat(head, head).await;
    b.beat(head, head).await;
    let hook = Hook::start().await;
    let id = start_move(
        &cp.admin,
        json!({"workspace": "acme", "to": "eu", "timeout_seconds": 0.3, "webhook": hook.url()}),
    )
    .await["id"]
        .as_u64()
        .unwrap();
    let vf = wait_phase(&cp.admin, id, "freezing").await["versions"]["freeze"]
        .as_u64()
        .unwrap();
    a.beat(vf, vf).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = get_move(&cp.admin, id).await;
        if m["stalled"] == true {
            break m;
        }
        assert!(Instant::now() < deadline, "never reported stalled: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // It reports, it does not guess: still freezing, and it names the proxy.
    assert_eq!(m["phase"], "freezing");
    assert_eq!(waiting_ids(&m), ["edge-stuck"]);
    let trail = cp
        .admin
        .get_json("/v1/audit/admin?workspace=acme")
        .await
        .unwrap();
    let stalled = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "move.stalled")
        .cloned()
        .expect("the trail records the stall");
    assert!(
        stalled["detail"].as_str().unwrap().contains("edge-stuck"),
        "{stalled}"
    );
    assert!(
        !stalled["detail"].as_str().unwrap().contains("edge-a"),
        "{stalled}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !hook.events().iter().any(|(e, _)| e == "move.stalled") {
        assert!(
            Instant::now() < deadline,
            "no stalled webhook: {:?}",
            hook.events()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = String::from_utf8(
        cp.admin
            .send(Method::GET, "/metrics", None)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains("domicile_cp_moves_stalled_total 1"),
        "{metrics}"
    );

    // The operator removes the proxy that is gone; the move goes on.
    cp.admin
        .send(Method::DELETE, "/v1/fleet/edge-stuck", None)
        .await
        .unwrap();
    let m = wait_phase(&cp.admin, id, "frozen").await;
    assert_eq!(m["stalled"], false, "a new phase starts its own clock");
    let trail = cp.admin.get_json("/v1/audit/admin").await.unwrap();
    assert!(trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "fleet.remove" && e["subject"] == "edge-stuck"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_proxy_holds_the_freeze_until_its_slow_write_finishes() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let us = origin("us").await;
    let eu = origin("eu").await;
    let secret = token(&cp.admin, "edge", "proxy").await;
    let proxy = following(&cp.url(), &secret, &us, &eu).start().await;
    synced(&proxy, head_version(&cp).await).await;

    // A write whose body is still arriving: in flight at the current map version.
    let (body, response) = streaming_post(&proxy.url("/upload"), "acme");
    body.send(Ok(hyper::body::Frame::data(Bytes::from_static(
        b"part one",
    ))))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let id = start_move(&cp.admin, json!({"workspace": "acme", "to": "eu"})).await["id"]
        .as_u64()
        .unwrap();
    let m = wait_phase(&cp.admin, id, "freezing").await;
    let vf = m["versions"]["freeze"].as_u64().unwrap();
    synced(&proxy, vf).await;
    // The proxy applied the freeze, but its write routed before it is still going.
    let m = stays(&cp.admin, id, "freezing").await;
    assert_eq!(waiting_ids(&m), ["test-edge"], "{m}");
    // New writes are refused meanwhile; reads go on at the old home.
    let write = request(
        "POST",
        &proxy.url("/w"),
        &[("x-workspace-id", "acme")],
        b"x",
    )
    .await;
    assert_eq!(write.refusal(), Some("workspace_moving"));
    assert!(write.headers.contains_key("retry-after"));
    assert_eq!(
        get(&proxy.url("/"), &[("x-workspace-id", "acme")])
            .await
            .region(),
        "us"
    );

    // The slow write finishes (at the old home, before the copy): now the freeze has drained.
    body.send(Ok(hyper::body::Frame::data(Bytes::from_static(
        b" and two",
    ))))
    .await
    .unwrap();
    drop(body);
    let reply = collect(response.await.unwrap().unwrap()).await;
    assert_eq!(reply.region(), "us");
    let m = wait_phase(&cp.admin, id, "frozen").await;
    let frozen_after_ms = m["write_pause_ms"].as_i64().unwrap();
    assert!(
        frozen_after_ms >= 400,
        "the freeze waited for the write: {m}"
    );

    post(&cp.admin, &format!("/v1/moves/{id}/complete"))
        .await
        .unwrap();
    wait_phase(&cp.admin, id, "done").await;
    let head = head_version(&cp).await;
    synced(&proxy, head).await;
    let write = request(
        "POST",
        &proxy.url("/w"),
        &[("x-workspace-id", "acme")],
        b"x",
    )
    .await;
    assert_eq!((write.status, write.region()), (200, "eu".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_postgres_advance_a_move_exactly_once() {
    let Some(schema) = domicile_control_plane::testing::postgres_schema().await else {
        return;
    };
    let a = control_plane(Some(&schema.url), LOOPBACK, |_| {}).await;
    let b = control_plane(Some(&schema.url), LOOPBACK, |_| {}).await;
    seed(&a.admin).await;
    // The proxy reports to replica B; the move is started through A and completed through B.
    let edge = FakeProxy::new(&b, "edge-a").await;
    let head = head_version(&a).await;
    edge.beat(head, head).await;
    let id = start_move(&a.admin, json!({"workspace": "acme", "to": "eu"})).await["id"]
        .as_u64()
        .unwrap();
    let vf = wait_phase(&b.admin, id, "freezing").await["versions"]["freeze"]
        .as_u64()
        .unwrap();
    edge.beat(vf, vf).await;
    wait_phase(&a.admin, id, "frozen").await;
    let vs = post(&b.admin, &format!("/v1/moves/{id}/complete"))
        .await
        .unwrap()["versions"]["switch"]
        .as_u64()
        .unwrap();
    edge.beat(vs, vs).await;
    wait_phase(&a.admin, id, "done").await;
    // Both drivers ran all along; each phase happened once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let trail = a
        .admin
        .get_json("/v1/audit/admin?workspace=acme")
        .await
        .unwrap();
    let entries = trail["entries"].as_array().unwrap();
    for action in [
        "move.requested",
        "move.freezing",
        "move.frozen",
        "move.switching",
        "move.done",
    ] {
        let n = entries.iter().filter(|e| e["action"] == action).count();
        assert_eq!(n, 1, "{action} recorded {n} times: {trail}");
    }
    let writes = entries
        .iter()
        .filter(|e| e["action"] == "map.workspace.put" && e["version"].as_u64() >= Some(vf))
        .count();
    assert_eq!(
        writes, 3,
        "freeze, switch and unfreeze written once each: {trail}"
    );
    a.running.shutdown().await;
    b.running.shutdown().await;
}

/// Heartbeats the control plane has received.
async fn beats(cp: &Cp) -> u64 {
    let text = get(&format!("{}/metrics", cp.url()), &[]).await;
    String::from_utf8_lossy(&text.body)
        .lines()
        .find_map(|l| l.strip_prefix("domicile_cp_heartbeats_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("the heartbeat counter")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_reports_a_move_s_steps_at_once_and_other_changes_on_its_periodic_beat() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let (us, eu) = (origin("us").await, origin("eu").await);
    let secret = token(&cp.admin, "edge", "proxy").await;
    // No periodic beat within the test: every beat after the first is one the sync asked for.
    let proxy = following_beating_every("1h", &cp.url(), &secret, &us, &eu)
        .start()
        .await;
    // The first beat, at start.
    let deadline = Instant::now() + Duration::from_secs(10);
    while beats(&cp).await == 0 {
        assert!(Instant::now() < deadline, "the proxy never reported");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = beats(&cp).await;

    // Ten ordinary changes: routed with at once, reported at the next periodic beat.
    put_workspaces(&cp.admin, "beat", 10, "eu").await;
    synced(&proxy, head_version(&cp).await).await;
    assert_eq!(routed(&proxy, "beat-9").await, "eu");
    // Not yet reported, and not yet due: the fleet view does not call the proxy BEHIND.
    let fleet = cp.admin.get_json("/v1/fleet").await.unwrap();
    assert!(
        fleet["members"][0]["applied_version"].as_u64() < fleet["head"].as_u64(),
        "{fleet}"
    );
    assert_eq!(fleet["members"][0]["status"], "SYNCED", "{fleet}");

    // A move: its freeze and its switch are each reported at once, so it never waits for the
    // hour-long period.
    let id = start_move(&cp.admin, json!({"workspace": "acme", "to": "eu"})).await["id"]
        .as_u64()
        .unwrap();
    wait_phase(&cp.admin, id, "frozen").await;
    post(&cp.admin, &format!("/v1/moves/{id}/complete"))
        .await
        .unwrap();
    wait_phase(&cp.admin, id, "done").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while beats(&cp).await < before + 2 {
        assert!(Instant::now() < deadline, "the switch's beat never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two beats in all: the freeze and the switch (nothing was in flight, so each drained as
    // it was applied). None for the ten changes, nor for the move's final unfreeze.
    assert_eq!(beats(&cp).await - before, 2);
    proxy.running.shutdown().await;
    cp.running.shutdown().await;
}

/// The region a workspace's GET is routed to.
async fn routed(proxy: &TestProxy, workspace: &str) -> String {
    get(&proxy.url("/"), &[("x-workspace-id", workspace)])
        .await
        .region()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_waiting_on_a_large_fleet_counts_it_and_names_the_furthest_behind() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let store = &cp.running.store;
    let head = store.head().await.unwrap();
    let member = |n: usize, version: u64| domicile_wire::Heartbeat {
        proxy_id: format!("edge-{n:03}"),
        edge_region: "us".into(),
        applied_version: version,
        drained_version: Some(version),
        checksum: head.checksum.to_hex(),
        epoch: head.epoch.clone(),
    };
    // Heartbeats arriving together are written together, as a fleet's do.
    let report = |members: Vec<domicile_wire::Heartbeat>| async move {
        let written =
            futures_util::future::join_all(members.iter().map(|m| store.heartbeat(m, "t")));
        for result in written.await {
            result.unwrap();
        }
    };
    // 250 members at the head; a move's freeze then waits for all of them.
    report((0..250).map(|n| member(n, head.version)).collect()).await;
    let id = start_move(&cp.admin, json!({"workspace": "acme", "to": "eu"})).await["id"]
        .as_u64()
        .unwrap();
    let m = wait_phase(&cp.admin, id, "freezing").await;
    let vf = m["versions"]["freeze"].as_u64().unwrap();
    // Member 7 fell further behind (it reports an older version) and 60 others drained.
    report(vec![member(7, head.version - 1)]).await;
    report((100..160).map(|n| member(n, vf)).collect()).await;
    let m = get_move(&cp.admin, id).await;
    assert_eq!(m["waiting_count"], 190, "{m}");
    let named = waiting_ids(&m);
    assert_eq!(named.len(), 100, "the view names at most 100");
    assert_eq!(named[0], "edge-007", "the furthest behind first");
    assert!(
        named
            .iter()
            .all(|id| !("edge-100".."edge-160").contains(&id.as_str())),
        "{named:?}"
    );
    // Every member drains: the move goes on.
    report((0..250).map(|n| member(n, vf)).collect()).await;
    let m = wait_phase(&cp.admin, id, "frozen").await;
    assert_eq!(
        (m["waiting_count"].as_u64(), waiting_ids(&m).len()),
        (Some(0), 0)
    );
    cp.running.shutdown().await;
}
