//! The control plane and the proxies that follow it, end to end: API writes routed by a
//! running proxy, static stability with the control plane down, resync on 410, unusable
//! last-known-good maps, several replicas on one PostgreSQL, and every role's permissions.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cp::*;
use common::*;
use domicile::client::{AdminClient, ApiError};
use domicile_control_plane::testing;
use http::{Method, StatusCode};
use serde_json::{json, Value};

async fn head(cp: &Cp) -> u64 {
    cp.running.store.head().await.unwrap().version
}

async fn routed_to(proxy: &TestProxy, workspace: &str) -> Option<String> {
    let reply = get(&proxy.url("/"), &[("x-workspace-id", workspace)]).await;
    (reply.status == 200).then(|| reply.region())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_set_through_the_api_is_routed_by_a_running_proxy() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let proxy_token = token(&cp.admin, "edge-1", "proxy").await;
    let (us, eu) = (origin("us").await, origin("eu").await);
    let proxy = following(&cp.url(), &proxy_token, &us, &eu).start().await;
    synced(&proxy, head(&cp).await).await;
    assert_eq!(routed_to(&proxy, "acme").await.as_deref(), Some("us"));
    assert_eq!(routed_to(&proxy, "globex").await.as_deref(), Some("eu"));

    // Propagation: from the API's answer to the proxy routing the new workspace.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let id = format!("new-{i}");
        let region = if i % 2 == 0 { "eu" } else { "us" };
        let written = Instant::now();
        put(
            &cp.admin,
            &format!("/v1/workspaces/{id}"),
            json!({"region": region}),
        )
        .await;
        loop {
            if routed_to(&proxy, &id).await.as_deref() == Some(region) {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(5),
                "{id} never routed"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        worst = worst.max(written.elapsed());
    }
    eprintln!("worst propagation over 20 writes: {worst:?}");

    // A delete reaches the proxy too: the workspace becomes unknown.
    cp.admin
        .send(Method::DELETE, "/v1/workspaces/new-0", None)
        .await
        .unwrap();
    synced(&proxy, head(&cp).await).await;
    let gone = get(&proxy.url("/"), &[("x-workspace-id", "new-0")]).await;
    assert_eq!(gone.refusal(), Some("unknown_workspace"));

    // The fleet sees the proxy synced, with a matching checksum, once it heartbeats.
    let target = head(&cp).await;
    let mut fleet = Value::Null;
    for _ in 0..200 {
        fleet = cp.admin.get_json("/v1/fleet").await.unwrap();
        let member = &fleet["members"][0];
        if member["applied_version"] == json!(target) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let member = &fleet["members"][0];
    assert_eq!(member["proxy_id"], "test-edge");
    assert_eq!(member["status"], "SYNCED", "{fleet}");
    assert_eq!(member["checksum_ok"], true, "{fleet}");

    // The proxy exports its applied version and how long ago it heard from the control plane.
    let metrics = get(&proxy.admin_url("/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(&format!("domicile_map_applied_version {target}")),
        "{text}"
    );
    assert!(text.contains("domicile_control_plane_seconds_since_contact"));
    proxy.running.shutdown().await;
    cp.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_behind_the_retained_window_gets_410_and_resyncs_from_a_snapshot() {
    let cp = control_plane(None, LOOPBACK, |c| c.change_retention = 2).await;
    seed(&cp.admin).await;
    let proxy_token = token(&cp.admin, "edge-1", "proxy").await;
    let (us, eu) = (origin("us").await, origin("eu").await);
    let proxy = following(&cp.url(), &proxy_token, &us, &eu).start().await;
    synced(&proxy, head(&cp).await).await;
    let TestProxy { running, dir } = proxy;
    running.shutdown().await;

    put_workspaces(&cp.admin, "late", 10, "eu").await;
    let target = head(&cp).await;
    // The change stream now refuses the proxy's position.
    let stale = cp
        .admin
        .send(Method::GET, "/v1/map/changes?after=1", None)
        .await
        .unwrap_err();
    let stale = stale.downcast_ref::<ApiError>().expect("an API error");
    assert_eq!(
        (stale.status, stale.code.as_str()),
        (StatusCode::GONE, "changes_expired")
    );

    let config = domicile_proxy::ProxyConfig::from_file(&dir.path().join("proxy.toml")).unwrap();
    let proxy = TestProxy {
        running: domicile_proxy::start(config).await.unwrap(),
        dir,
    };
    synced(&proxy, target).await;
    assert_eq!(routed_to(&proxy, "late-9").await.as_deref(), Some("eu"));
    let engine = &proxy.running.engine;
    assert!(
        engine.metrics.resyncs[domicile_proxy::sync::Resync::Gone as usize]
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    proxy.running.shutdown().await;
    cp.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_last_known_good_map_is_never_served_and_the_proxy_waits_for_the_control_plane()
{
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let proxy_token = token(&cp.admin, "edge-1", "proxy").await;
    let (us, eu) = (origin("us").await, origin("eu").await);
    let proxy = following(&cp.url(), &proxy_token, &us, &eu).start().await;
    synced(&proxy, head(&cp).await).await;
    let TestProxy { running, dir } = proxy;
    running.shutdown().await;
    let cp_addr = cp.running.addr;
    let Cp {
        running: cp_running,
        dir: store_dir,
        ..
    } = cp;
    cp_running.shutdown().await;

    let lkg = dir.path().join("lkg.map");
    let text = std::fs::read_to_string(&lkg).unwrap();
    let cases: Vec<(&str, String)> = vec![
        // The last line cut off: fewer entries than the header promises.
        ("truncated", {
            let mut lines: Vec<&str> = text.lines().collect();
            lines.pop();
            lines.join("\n") + "\n"
        }),
        // One entry's region changed: the checksum no longer matches.
        (
            "edited",
            text.replacen("\"region\":\"us\"", "\"region\":\"eu\"", 1),
        ),
        ("garbage", "\u{0}\u{1}not a map\n".to_owned()),
    ];
    for (what, damaged) in cases {
        assert_ne!(damaged, text, "{what}: the damage changes the file");
        std::fs::write(&lkg, &damaged).unwrap();
        let _ = std::fs::remove_file(dir.path().join("lkg.map.journal"));
        let config =
            domicile_proxy::ProxyConfig::from_file(&dir.path().join("proxy.toml")).unwrap();
        let running = domicile_proxy::start(config).await.unwrap();
        let proxy = TestProxy {
            running,
            dir: tempfile::tempdir().unwrap(),
        };
        assert!(
            !proxy.running.engine.replica.is_loaded(),
            "{what}: no half map"
        );
        let refused = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
        assert_eq!(refused.status, 503, "{what}");
        assert_eq!(refused.refusal(), Some("map_unavailable"), "{what}");
        assert_eq!(
            proxy
                .running
                .engine
                .metrics
                .lkg_load_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "{what}"
        );
        proxy.running.shutdown().await;
    }

    // The control plane comes back at its address: the proxy loads the map from it.
    let cp = control_plane(
        Some(&format!(
            "sqlite://{}",
            store_dir.path().join("cp.db").display()
        )),
        cp_addr,
        |_| {},
    )
    .await;
    let config = domicile_proxy::ProxyConfig::from_file(&dir.path().join("proxy.toml")).unwrap();
    let proxy = TestProxy {
        running: domicile_proxy::start(config).await.unwrap(),
        dir,
    };
    synced(&proxy, head(&cp).await).await;
    assert_eq!(routed_to(&proxy, "acme").await.as_deref(), Some("us"));
    proxy.running.shutdown().await;
    cp.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_postgres_keep_proxies_routing_through_outages() {
    let Some(schema) = testing::postgres_schema().await else {
        return;
    };
    let a = control_plane(Some(&schema.url), LOOPBACK, |_| {}).await;
    let b = control_plane(Some(&schema.url), LOOPBACK, |_| {}).await;
    seed(&a.admin).await;
    let proxy_token = token(&a.admin, "edge-1", "proxy").await;
    let (us, eu) = (origin("us").await, origin("eu").await);

    // A change written through one replica reaches a proxy connected to the other.
    let on_b = following(&b.url(), &proxy_token, &us, &eu).start().await;
    synced(&on_b, head(&a).await).await;
    put(&a.admin, "/v1/workspaces/via-a", json!({"region": "eu"})).await;
    synced(&on_b, head(&a).await).await;
    assert_eq!(routed_to(&on_b, "via-a").await.as_deref(), Some("eu"));
    on_b.running.shutdown().await;

    // Static stability: a proxy following A keeps routing when A stops...
    let proxy = following(&a.url(), &proxy_token, &us, &eu).start().await;
    synced(&proxy, head(&a).await).await;
    let a_addr = a.running.addr;
    a.running.shutdown().await;
    assert_eq!(routed_to(&proxy, "acme").await.as_deref(), Some("us"));
    assert_eq!(routed_to(&proxy, "via-a").await.as_deref(), Some("eu"));

    // ...and after a restart with A still down it serves its last-known-good map.
    let proxy = restart(proxy).await;
    assert!(proxy.running.engine.replica.is_loaded());
    assert_eq!(routed_to(&proxy, "acme").await.as_deref(), Some("us"));
    assert_eq!(routed_to(&proxy, "globex").await.as_deref(), Some("eu"));
    let ready = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(
        ready.status,
        200,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );

    // Meanwhile the map changes through B.
    put(
        &b.admin,
        "/v1/workspaces/while-down",
        json!({"region": "us"}),
    )
    .await;
    b.admin
        .send(Method::DELETE, "/v1/workspaces/via-a", None)
        .await
        .unwrap();
    let target = head(&b).await;
    assert_eq!(
        get(&proxy.url("/"), &[("x-workspace-id", "while-down")])
            .await
            .refusal(),
        Some("unknown_workspace")
    );

    // A comes back at its address: the proxy catches up.
    let a = control_plane(Some(&schema.url), a_addr, |_| {}).await;
    synced(&proxy, target).await;
    assert_eq!(routed_to(&proxy, "while-down").await.as_deref(), Some("us"));
    assert_eq!(
        get(&proxy.url("/"), &[("x-workspace-id", "via-a")])
            .await
            .refusal(),
        Some("unknown_workspace")
    );
    proxy.running.shutdown().await;
    a.running.shutdown().await;
    b.running.shutdown().await;
}

/// What one request needs: method, path, body.
type Call = (Method, &'static str, Option<Value>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_is_allowed_and_refused_where_it_must_be() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let mut clients = Vec::new();
    for role in ["admin", "operator", "auditor", "proxy"] {
        let secret = token(&cp.admin, &format!("t-{role}"), role).await;
        clients.push((role, AdminClient::new(&cp.url(), Some(secret))));
    }
    let heartbeat = json!({
        "proxy_id": "edge-9", "edge_region": "us", "applied_version": 1,
        "checksum": "0000000000000000", "epoch": "e"
    });
    // (call, roles allowed)
    let table: Vec<(Call, &[&str])> = vec![
        (
            (Method::GET, "/v1/regions", None),
            &["admin", "operator", "auditor"],
        ),
        (
            (Method::GET, "/v1/regions/us", None),
            &["admin", "operator", "auditor"],
        ),
        (
            (
                Method::PUT,
                "/v1/regions/au",
                Some(json!({"name": "Australia"})),
            ),
            &["admin"],
        ),
        (
            (Method::GET, "/v1/workspaces", None),
            &["admin", "operator", "auditor"],
        ),
        (
            (Method::GET, "/v1/workspaces/acme", None),
            &["admin", "operator", "auditor"],
        ),
        (
            (
                Method::PUT,
                "/v1/workspaces/w-role",
                Some(json!({"region": "us"})),
            ),
            &["admin"],
        ),
        (
            (Method::GET, "/v1/map/history?workspace=acme", None),
            &["admin", "operator", "auditor"],
        ),
        (
            (Method::GET, "/v1/map/snapshot", None),
            &["admin", "auditor", "proxy"],
        ),
        (
            (Method::POST, "/v1/fleet/heartbeat", Some(heartbeat)),
            &["proxy"],
        ),
        (
            (Method::GET, "/v1/fleet", None),
            &["admin", "operator", "auditor"],
        ),
        ((Method::GET, "/v1/tokens", None), &["admin"]),
    ];
    for ((method, path, body), allowed) in &table {
        for (role, client) in &clients {
            let body = body
                .as_ref()
                .map(|b| (Bytes::from(b.to_string()), "application/json"));
            let result = client.send(method.clone(), path, body).await;
            if allowed.contains(role) {
                assert!(result.is_ok(), "{role} may {method} {path}: {result:?}");
            } else {
                let err = result.expect_err(&format!("{role} may not {method} {path}"));
                let err = err.downcast_ref::<ApiError>().expect("an API error");
                assert_eq!(err.status, StatusCode::FORBIDDEN, "{role} {method} {path}");
                assert_eq!(err.code, "forbidden");
                assert!(err.message.contains(role), "{}", err.message);
            }
        }
    }
    // Deletes, last (they change what the table above reads).
    for (role, client) in &clients {
        let result = client
            .send(Method::DELETE, "/v1/workspaces/w-role", None)
            .await;
        assert_eq!(result.is_ok(), *role == "admin", "{role} DELETE workspace");
    }

    // No token, a malformed header and an unknown token are 401 with a JSON error.
    let anonymous = AdminClient::new(&cp.url(), None);
    for client in [
        &anonymous,
        &AdminClient::new(&cp.url(), Some("dom_0000".into())),
    ] {
        let err = client.get_json("/v1/regions").await.unwrap_err();
        let err = err.downcast_ref::<ApiError>().expect("an API error");
        assert_eq!(
            (err.status, err.code.as_str()),
            (StatusCode::UNAUTHORIZED, "unauthenticated")
        );
    }
    let raw = request(
        "GET",
        &format!("{}/v1/regions", cp.url()),
        &[("authorization", "Basic YWRtaW46YWRtaW4=")],
        b"",
    )
    .await;
    assert_eq!(raw.status, 401);
    assert_eq!(raw.headers["www-authenticate"], "Bearer realm=\"domicile\"");
    assert_eq!(raw.json()["error"]["code"], "unauthenticated");
    // Open endpoints need no token.
    for path in ["/v1/openapi.json", "/healthz", "/readyz", "/metrics"] {
        assert!(
            anonymous.send(Method::GET, path, None).await.is_ok(),
            "{path}"
        );
    }
    cp.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_json_errors_and_change_nothing() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let before = head(&cp).await;
    let expect = |result: anyhow::Result<Value>, status: StatusCode, code: &str| {
        let err = result.expect_err(code);
        let err = err
            .downcast_ref::<ApiError>()
            .expect("an API error")
            .clone_fields();
        assert_eq!((err.0, err.1.as_str()), (status, code), "{}", err.2);
        err.2
    };
    let a = &cp.admin;
    expect(
        a.send_json(Method::PUT, "/v1/regions/EU", &json!({})).await,
        StatusCode::BAD_REQUEST,
        "invalid_region_id",
    );
    expect(
        a.send_json(
            Method::PUT,
            "/v1/regions/au",
            &json!({"jurisdiction": ["Australia"]}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    expect(
        a.send_json(Method::PUT, "/v1/regions/au", &json!({"colour": "red"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    expect(
        a.send_json(Method::PUT, "/v1/workspaces/-x", &json!({"region": "us"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_workspace_id",
    );
    let msg = expect(
        a.send_json(
            Method::PUT,
            "/v1/workspaces/new",
            &json!({"region": "mars"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_region",
    );
    assert!(msg.contains("mars"), "{msg}");
    expect(
        a.send_json(Method::PUT, "/v1/workspaces/acme", &json!({"region": "eu"}))
            .await,
        StatusCode::CONFLICT,
        "region_change_requires_move",
    );
    let msg = expect(
        a.send(Method::DELETE, "/v1/regions/us", None)
            .await
            .map(|_| Value::Null),
        StatusCode::CONFLICT,
        "region_in_use",
    );
    assert!(msg.contains("1 workspace"), "{msg}");
    expect(
        a.get_json("/v1/workspaces/nobody").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    expect(
        a.get_json("/v1/nowhere").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    expect(
        a.get_json("/v1/workspaces?limit=0").await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
    expect(
        a.get_json("/v1/map/changes?after=soon").await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
    expect(
        a.get_json("/v1/map/changes?after=18446744073709551615")
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
    expect(
        a.send(Method::PATCH, "/v1/regions/us", None)
            .await
            .map(|_| Value::Null),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    assert_eq!(head(&cp).await, before, "no refused request wrote anything");

    // An import with bad lines names each of them and writes nothing.
    let ndjson = "{\"id\":\"ok-1\",\"region\":\"us\"}\n\
                  not json\n\
                  {\"id\":\"ok-2\",\"region\":\"mars\"}\n\
                  \n\
                  {\"id\":\"Ok-1\",\"region\":\"eu\"}\n\
                  {\"id\":\"a b\",\"region\":\"eu\"}\n";
    let err = a
        .send(
            Method::POST,
            "/v1/workspaces:import",
            Some((Bytes::from(ndjson), "application/x-ndjson")),
        )
        .await
        .unwrap_err();
    let err = err.downcast_ref::<ApiError>().unwrap();
    assert_eq!(
        (err.status, err.code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_import")
    );
    let lines: Vec<(u64, &str)> = err
        .lines
        .iter()
        .map(|l| (l.line, l.code.as_str()))
        .collect();
    assert_eq!(
        lines,
        [
            (2, "invalid_json"),
            (5, "duplicate_workspace"),
            (6, "invalid_workspace_id")
        ]
    );
    assert_eq!(head(&cp).await, before);
    // With the syntax fixed, the store's checks report the unknown region.
    let err = a
        .send(
            Method::POST,
            "/v1/workspaces:import",
            Some((
                Bytes::from(
                    "{\"id\":\"ok-1\",\"region\":\"us\"}\n{\"id\":\"ok-2\",\"region\":\"mars\"}",
                ),
                "application/x-ndjson",
            )),
        )
        .await
        .unwrap_err();
    let err = err.downcast_ref::<ApiError>().unwrap();
    assert_eq!(err.lines.len(), 1);
    assert_eq!(
        (err.lines[0].line, err.lines[0].code.as_str()),
        (2, "unknown_region")
    );
    assert_eq!(head(&cp).await, before);
    let ok = a
        .send(
            Method::POST,
            "/v1/workspaces:import",
            Some((
                Bytes::from(
                    "{\"id\":\"ok-1\",\"region\":\"us\"}\n{\"id\":\"ok-2\",\"region\":\"eu\"}",
                ),
                "application/x-ndjson",
            )),
        )
        .await
        .unwrap();
    let ok: Value = serde_json::from_slice(&ok).unwrap();
    assert_eq!(
        (ok["created"].as_u64(), ok["version"].as_u64()),
        (Some(2), Some(before + 2))
    );
    cp.running.shutdown().await;
}

trait CloneFields {
    fn clone_fields(&self) -> (StatusCode, String, String);
}

impl CloneFields for ApiError {
    fn clone_fields(&self) -> (StatusCode, String, String) {
        (self.status, self.code.clone(), self.message.clone())
    }
}

/// Reads a change stream over HTTP until it has seen `until`, checking order and gaps.
async fn watch_feed(url: String, token: String, after: u64, until: u64) -> (Vec<u64>, usize) {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let request = http::Request::get(format!("{url}/v1/map/changes?after={after}"))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut pending = Vec::new();
    let mut seen = Vec::new();
    let mut heartbeats = 0;
    let mut cursor = after;
    while cursor < until {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the stream keeps moving")
            .expect("the stream stays open")
            .unwrap();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Value = serde_json::from_slice(&pending[..nl]).unwrap();
            pending.drain(..=nl);
            match line["type"].as_str().unwrap() {
                "hello" => {}
                "heartbeat" => heartbeats += 1,
                _ => {
                    let v = line["version"].as_u64().unwrap();
                    assert_eq!(v, cursor + 1, "gap or repeat after {cursor}");
                    cursor = v;
                    seen.push(v);
                }
            }
        }
    }
    (seen, heartbeats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_streams_carry_every_version_once_in_order_and_heartbeat_when_idle() {
    let cp = control_plane(None, LOOPBACK, |c| {
        c.feed_heartbeat = Duration::from_millis(50)
    })
    .await;
    seed(&cp.admin).await;
    let auditor = token(&cp.admin, "watcher", "auditor").await;
    let start = head(&cp).await;
    const WRITERS: u64 = 6;
    const EACH: u64 = 25;
    let end = start + WRITERS * EACH;
    let watchers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(watch_feed(cp.url(), auditor.clone(), start, end)))
        .collect();
    // Idle streams heartbeat (every 50 ms here) before anything is written.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let admin = cp.admin.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    admin
                        .send_json(
                            Method::PUT,
                            &format!("/v1/workspaces/c{w}-{i}"),
                            &json!({"region": if i % 2 == 0 { "us" } else { "eu" }}),
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    for w in watchers {
        let (seen, heartbeats) = w.await.unwrap();
        assert_eq!(seen, ((start + 1)..=end).collect::<Vec<_>>());
        assert!(heartbeats >= 1, "an idle stream heartbeats");
    }
    cp.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_control_plane_ends_open_streams_at_once_and_the_proxy_keeps_routing() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let proxy_token = token(&cp.admin, "edge-1", "proxy").await;
    let (us, eu) = (origin("us").await, origin("eu").await);
    let proxy = following(&cp.url(), &proxy_token, &us, &eu).start().await;
    synced(&proxy, head(&cp).await).await;
    let mut state = proxy.running.sync.as_ref().unwrap().state.clone();
    tokio::time::timeout(Duration::from_secs(5), state.wait_for(|s| s.streaming))
        .await
        .expect("the proxy opens a change stream")
        .unwrap();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), cp.running.shutdown())
        .await
        .expect("an open change stream does not hold the control plane up");
    eprintln!("stopped in {:?}", started.elapsed());
    assert_eq!(routed_to(&proxy, "acme").await.as_deref(), Some("us"));
    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_imports_self_deleting_tokens_and_bad_heartbeats_are_refused() {
    let cp = control_plane(None, LOOPBACK, |c| c.max_import_bytes = 64).await;
    seed(&cp.admin).await;
    let before = head(&cp).await;
    let big = "{\"id\":\"w\",\"region\":\"us\"}\n".repeat(10);
    let err = cp
        .admin
        .send(
            Method::POST,
            "/v1/workspaces:import",
            Some((Bytes::from(big), "application/x-ndjson")),
        )
        .await
        .unwrap_err();
    let err = err.downcast_ref::<ApiError>().unwrap();
    assert_eq!(
        (err.status, err.code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "import_too_large")
    );
    assert_eq!(head(&cp).await, before);

    // The bootstrap token is named "admin": it cannot delete itself.
    let err = cp
        .admin
        .send(Method::DELETE, "/v1/tokens/admin", None)
        .await
        .unwrap_err();
    let err = err.downcast_ref::<ApiError>().unwrap();
    assert_eq!(
        (err.status, err.code.as_str()),
        (StatusCode::CONFLICT, "token_in_use")
    );

    let proxy = AdminClient::new(&cp.url(), Some(token(&cp.admin, "edge-1", "proxy").await));
    for (body, what) in [
        (
            json!({"proxy_id": "edge 1", "edge_region": "us", "applied_version": 1, "checksum": "0", "epoch": "e"}),
            "a proxy id with a space",
        ),
        (
            json!({"proxy_id": "edge-1", "edge_region": "US", "applied_version": 1, "checksum": "0", "epoch": "e"}),
            "an edge region that is not a region id",
        ),
        (json!({"proxy_id": "edge-1"}), "missing fields"),
    ] {
        let err = proxy
            .send_json(Method::POST, "/v1/fleet/heartbeat", &body)
            .await
            .expect_err(what);
        let err = err.downcast_ref::<ApiError>().unwrap();
        assert_eq!(
            (err.status, err.code.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_body"),
            "{what}"
        );
    }
    assert!(cp.running.store.fleet().await.unwrap().is_empty());
    cp.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_cannot_persist_keeps_routing_and_never_reports_an_unpersisted_version() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let proxy_token = token(&cp.admin, "edge-1", "proxy").await;
    let (us, eu) = (origin("us").await, origin("eu").await);
    let builder = following(&cp.url(), &proxy_token, &us, &eu);
    // The last-known-good path lies under a regular file: every write fails.
    std::fs::write(builder.dir().join("not-a-dir"), b"").unwrap();
    let (path, dir) = builder.write();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "last_known_good = \"lkg.map\"",
        "last_known_good = \"not-a-dir/lkg.map\"",
    );
    std::fs::write(&path, text).unwrap();
    let config = domicile_proxy::ProxyConfig::from_file(&path).unwrap();
    let proxy = TestProxy {
        running: domicile_proxy::start(config).await.unwrap(),
        dir,
    };
    synced(&proxy, head(&cp).await).await;
    assert_eq!(routed_to(&proxy, "acme").await.as_deref(), Some("us"));
    put(&cp.admin, "/v1/workspaces/later", json!({"region": "eu"})).await;
    synced(&proxy, head(&cp).await).await;
    assert_eq!(routed_to(&proxy, "later").await.as_deref(), Some("eu"));
    let metrics = &proxy.running.engine.metrics;
    assert!(
        metrics
            .sync_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(
        metrics
            .lkg_writes
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // Nothing to wait for when nothing should happen: let two heartbeat periods pass.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let state = proxy.running.sync.as_ref().unwrap().state.borrow().clone();
    assert_eq!(state.persisted, None, "nothing on disk, nothing reported");
    assert!(
        cp.running.store.fleet().await.unwrap().is_empty(),
        "no heartbeat claims a version that is not on disk"
    );
    proxy.running.shutdown().await;
    cp.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_view_tells_synced_behind_and_stale_apart() {
    let cp = control_plane(None, LOOPBACK, |c| {
        c.stale_after = Duration::from_millis(300);
        // The head itself is expected of every member.
        c.behind_after = Duration::ZERO;
    })
    .await;
    seed(&cp.admin).await;
    let store = &cp.running.store;
    let head = store.head().await.unwrap();
    let beat = |id: &str, version: u64, checksum: String| domicile_wire::Heartbeat {
        proxy_id: id.into(),
        edge_region: "us".into(),
        applied_version: version,
        drained_version: None,
        checksum,
        epoch: head.epoch.clone(),
    };
    store
        .heartbeat(&beat("old", head.version, head.checksum.to_hex()), "t")
        .await
        .unwrap();
    // Past the stale interval for "old"; the others report now.
    tokio::time::sleep(Duration::from_millis(400)).await;
    store
        .heartbeat(&beat("synced", head.version, head.checksum.to_hex()), "t")
        .await
        .unwrap();
    store
        .heartbeat(&beat("behind", head.version - 1, "0".repeat(16)), "t")
        .await
        .unwrap();
    store
        .heartbeat(&beat("diverged", head.version, "f".repeat(16)), "t")
        .await
        .unwrap();
    let fleet: domicile_wire::Fleet =
        serde_json::from_value(cp.admin.get_json("/v1/fleet").await.unwrap()).unwrap();
    let by_id = |id: &str| fleet.members.iter().find(|m| m.proxy_id == id).unwrap();
    use domicile_wire::SyncStatus::*;
    assert_eq!(by_id("old").status, Stale);
    assert_eq!(
        (by_id("synced").status, by_id("synced").checksum_ok),
        (Synced, Some(true))
    );
    assert_eq!(
        (by_id("behind").status, by_id("behind").checksum_ok),
        (Behind, None)
    );
    assert_eq!(by_id("diverged").checksum_ok, Some(false));
    assert_eq!(fleet.expected_version, head.version);
    let metrics = get(&format!("{}/metrics", cp.url()), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("domicile_cp_fleet_members{status=\"STALE\"} 1"),
        "{text}"
    );
    cp.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_short_of_changes_newer_than_behind_after_is_not_behind() {
    let cp = control_plane(None, LOOPBACK, |c| {
        c.behind_after = Duration::from_secs(3600)
    })
    .await;
    seed(&cp.admin).await;
    let store = &cp.running.store;
    let seeded = store.head().await.unwrap();
    // Commit times a millisecond apart, so that each version has its own moment.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let before = domicile_control_plane::store::now_ms();
    tokio::time::sleep(Duration::from_millis(2)).await;
    put(
        &cp.admin,
        "/v1/workspaces/just-now",
        json!({"region": "eu"}),
    )
    .await;
    let head = store.head().await.unwrap();
    assert_eq!(store.version_at(before).await.unwrap(), seeded.version);
    assert_eq!(
        store
            .version_at(domicile_control_plane::store::now_ms())
            .await
            .unwrap(),
        head.version
    );
    assert_eq!(store.version_at(0).await.unwrap(), 0);

    // A member one change short of the head, heard from just now: the change is younger
    // than an hour, so the member is not BEHIND.
    store
        .heartbeat(
            &domicile_wire::Heartbeat {
                proxy_id: "edge".into(),
                edge_region: "us".into(),
                applied_version: seeded.version,
                drained_version: Some(seeded.version),
                checksum: seeded.checksum.to_hex(),
                epoch: head.epoch.clone(),
            },
            "t",
        )
        .await
        .unwrap();
    let fleet: domicile_wire::Fleet =
        serde_json::from_value(cp.admin.get_json("/v1/fleet").await.unwrap()).unwrap();
    assert_eq!((fleet.head, fleet.expected_version), (head.version, 0));
    assert_eq!(fleet.behind_after_seconds, 3600.0);
    assert_eq!(fleet.members[0].status, domicile_wire::SyncStatus::Synced);
    cp.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_comes_back_reports_where_it_stands_once_it_has_caught_up() {
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let proxy_token = token(&cp.admin, "edge-1", "proxy").await;
    let (us, eu) = (origin("us").await, origin("eu").await);
    // Periodic beats an hour apart: any report within the test is one the sync asked for.
    let proxy = following_beating_every("1h", &cp.url(), &proxy_token, &us, &eu)
        .start()
        .await;
    synced(&proxy, head(&cp).await).await;
    let TestProxy { running, dir } = proxy;
    running.shutdown().await;

    // Changes it misses while it is down: none of them is a move's.
    put_workspaces(&cp.admin, "missed", 5, "eu").await;
    let target = head(&cp).await;
    let config = domicile_proxy::ProxyConfig::from_file(&dir.path().join("proxy.toml")).unwrap();
    let proxy = TestProxy {
        running: domicile_proxy::start(config).await.unwrap(),
        dir,
    };
    // It starts from its last-known-good map, reports that at once, resumes the stream, and
    // reports again once it has caught up with the head the stream opened at.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fleet = cp.admin.get_json("/v1/fleet").await.unwrap();
        if fleet["members"][0]["applied_version"] == json!(target) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never reported {target}: {fleet}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.running.shutdown().await;
    cp.running.shutdown().await;
}
