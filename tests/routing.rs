//! End-to-end routing: real origins for two regions, the real proxy, real HTTP.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn each_identification_kind_routes_to_the_home_region() {
    let (us, eu, proxy) = two_regions().await;

    let by_host = get(&proxy.url("/hello"), &[("host", "acme.localhost")]).await;
    let host_url = proxy.url("/docs");
    let by_header = get(&host_url, &[("x-workspace-id", "globex")]).await;
    let by_path = get(&proxy.url("/w/umbrella/files"), &[]).await;
    let by_query = get(&proxy.url("/search?q=x&workspace=initech"), &[]).await;
    let agreeing = get(
        &proxy.url("/w/GLOBEX/x?workspace=globex"),
        &[("host", "globex.localhost"), ("x-workspace-id", "Globex")],
    )
    .await;

    for (reply, region, workspace) in [
        (&by_host, "us", "acme"),
        (&by_header, "eu", "globex"),
        (&by_path, "eu", "umbrella"),
        (&by_query, "us", "initech"),
        (&agreeing, "eu", "globex"),
    ] {
        assert_eq!(
            reply.status,
            200,
            "{workspace}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.region(), region, "{workspace}");
        let headers = &reply.json()["headers"];
        assert_eq!(headers["x-domicile-workspace"], workspace);
        assert_eq!(headers["x-domicile-region"], region);
        assert_eq!(headers["x-domicile-map-version"], "7");
        assert!(reply.headers.contains_key("x-request-id"));
    }
    assert_eq!(by_host.json()["headers"]["x-domicile-epoch"], "3");
    assert_eq!(by_header.json()["headers"]["x-domicile-epoch"], "5");
    // Each origin saw only its own region's workspaces.
    for seen in us.seen_requests() {
        assert!(["acme", "initech"].contains(&seen.headers["x-domicile-workspace"].as_str()));
    }
    for seen in eu.seen_requests() {
        assert!(["globex", "umbrella"].contains(&seen.headers["x-domicile-workspace"].as_str()));
    }
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn refusals_have_code_status_and_json_body() {
    let (us, eu, proxy) = two_regions().await;

    let cases: Vec<(&str, Reply, u16, &str)> = vec![
        (
            "conflict host vs header",
            get(
                &proxy.url("/"),
                &[("host", "acme.localhost"), ("x-workspace-id", "globex")],
            )
            .await,
            400,
            "conflicting_workspace",
        ),
        (
            "conflict path vs query",
            get(&proxy.url("/w/acme/?workspace=globex"), &[]).await,
            400,
            "conflicting_workspace",
        ),
        (
            "unknown",
            get(&proxy.url("/"), &[("host", "nobody.localhost")]).await,
            404,
            "unknown_workspace",
        ),
        (
            "missing",
            get(&proxy.url("/"), &[]).await,
            400,
            "missing_workspace",
        ),
        (
            "invalid",
            get(&proxy.url("/"), &[("x-workspace-id", "no/slashes")]).await,
            400,
            "invalid_workspace",
        ),
        (
            "unroutable",
            get(&proxy.url("/"), &[("x-workspace-id", "wombat")]).await,
            503,
            "region_unroutable",
        ),
    ];
    for (name, reply, status, code) in cases {
        assert_eq!(reply.status, status, "{name}");
        assert_eq!(reply.refusal(), Some(code), "{name}");
        let body = reply.json();
        assert_eq!(body["error"]["code"], code, "{name}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert_eq!(
            body["error"]["request_id"].as_str(),
            reply
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
            "{name}"
        );
    }
    assert!(
        us.seen_requests().is_empty() && eu.seen_requests().is_empty(),
        "no refused request reaches an origin"
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn frozen_workspace_refuses_writes_and_serves_reads() {
    let us = origin("us").await;
    let proxy = proxy().route("us", &[&us]).start().await;
    let read = get(&proxy.url("/doc"), &[("x-workspace-id", "hooli")]).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.region(), "us");
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let write = request(
            method,
            &proxy.url("/doc"),
            &[("x-workspace-id", "hooli")],
            b"change",
        )
        .await;
        assert_eq!(write.status, 503, "{method}");
        assert_eq!(write.refusal(), Some("workspace_moving"));
        assert_eq!(write.headers["retry-after"], "5");
    }
    assert_eq!(
        us.seen_requests().len(),
        1,
        "only the read reached the origin"
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn stopped_region_fails_closed_and_never_crosses_to_another_region() {
    let (us, eu, proxy) = two_regions().await;
    let ok = get(&proxy.url("/"), &[("x-workspace-id", "globex")]).await;
    assert_eq!(ok.region(), "eu");

    eu.stop();
    // Before and after health checks notice: every answer is 503 region_unavailable.
    for _ in 0..5 {
        let reply = get(&proxy.url("/"), &[("x-workspace-id", "globex")]).await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.refusal(), Some("region_unavailable"));
    }
    let pool_down = eventually(Duration::from_secs(5), || {
        !proxy
            .running
            .engine
            .upstreams
            .pools()
            .find(|p| &*p.region_id == "eu")
            .unwrap()
            .is_up()
    })
    .await;
    assert!(pool_down, "health checks mark eu down");
    let reply = request(
        "POST",
        &proxy.url("/"),
        &[("x-workspace-id", "umbrella")],
        b"data",
    )
    .await;
    assert_eq!(reply.refusal(), Some("region_unavailable"));
    // The us origin never saw an eu workspace.
    for seen in us.seen_requests() {
        let ws = seen.headers.get("x-domicile-workspace").map(String::as_str);
        assert!(ws != Some("globex") && ws != Some("umbrella"), "{seen:?}");
    }
    // us is unaffected.
    assert_eq!(
        get(&proxy.url("/"), &[("x-workspace-id", "acme")])
            .await
            .region(),
        "us"
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn region_without_route_is_refused_and_us_sees_nothing() {
    let us = origin("us").await;
    // This edge has no route for eu at all.
    let proxy = proxy().route("us", &[&us]).start().await;
    let reply = get(&proxy.url("/"), &[("x-workspace-id", "globex")]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.refusal(), Some("region_unroutable"));
    assert!(us.seen_requests().is_empty());
    // /readyz says which map regions this edge cannot route.
    let ready = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    let unroutable = ready.json()["unroutable_regions"].clone();
    assert!(
        unroutable.as_array().unwrap().iter().any(|r| r == "eu"),
        "{unroutable}"
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn spoofed_domicile_and_hop_by_hop_headers_never_reach_the_origin() {
    let us = origin("us").await;
    let proxy = proxy().route("us", &[&us]).start().await;
    let reply = get(
        &proxy.url("/"),
        &[
            ("x-workspace-id", "acme"),
            ("x-domicile-region", "eu"),
            ("x-domicile-workspace", "globex"),
            ("x-domicile-epoch", "999"),
            ("X-Domicile-Anything", "1"),
            ("connection", "keep-alive, x-private-hop"),
            ("x-private-hop", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "gzip"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-request-id", "client-chosen-id"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    let headers = reply.json()["headers"].clone();
    assert_eq!(headers["x-domicile-region"], "us");
    assert_eq!(headers["x-domicile-workspace"], "acme");
    assert_eq!(headers["x-domicile-epoch"], "3");
    for gone in [
        "x-domicile-anything",
        "x-private-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
    ] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} reached the origin: {headers}"
        );
    }
    // Untrusted peer: its X-Forwarded-For is replaced, not appended to.
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-request-id"], "client-chosen-id");
    assert_eq!(reply.headers["x-request-id"], "client-chosen-id");
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn unidentified_edge_region_policy() {
    let us = origin("us").await;
    let eu = origin("eu").await;
    let proxy = proxy()
        .route("us", &[&us])
        .route("eu", &[&eu])
        .identify("unidentified = \"edge-region\"")
        .start()
        .await;
    let reply = get(&proxy.url("/static/logo.png"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.region(), "us");
    assert!(reply.json()["headers"]
        .get("x-domicile-workspace")
        .is_none());
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn unidentified_nearest_region_uses_geoip_and_jurisdictions() {
    let us = origin("us").await;
    let eu = origin("eu").await;
    let db = geoip_db("GeoLite2-Country-Test.mmdb");
    let proxy = proxy()
        .route("us", &[&us])
        .route("eu", &[&eu])
        .identify("unidentified = \"nearest-region\"")
        .proxy_section(&format!(
            "geoip_database = \"{}\"\ntrusted_proxies = [\"127.0.0.0/8\"]",
            db.display()
        ))
        .start()
        .await;
    // The test client is a trusted proxy on loopback, so X-Forwarded-For names the client.
    let cases = [
        ("89.160.20.112", "eu"), // SE: in eu's jurisdiction
        ("216.160.83.56", "us"), // US
        ("81.2.69.142", "us"),   // GB: no region's jurisdiction -> edge region
        ("10.0.0.1", "us"),      // unknown to GeoIP -> edge region
    ];
    for (client, region) in cases {
        let reply = get(&proxy.url("/"), &[("x-forwarded-for", client)]).await;
        assert_eq!(reply.status, 200, "{client}");
        assert_eq!(reply.region(), region, "{client}");
        // Trusted peer: the client's address is kept and ours appended.
        assert_eq!(
            reply.json()["headers"]["x-forwarded-for"],
            format!("{client}, 127.0.0.1")
        );
    }
    // An identified request ignores GeoIP entirely.
    let reply = get(
        &proxy.url("/"),
        &[
            ("x-forwarded-for", "89.160.20.112"),
            ("x-workspace-id", "acme"),
        ],
    )
    .await;
    assert_eq!(reply.region(), "us");
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn strict_regional_hosts_refuse_the_wrong_regions_hostname() {
    let us = origin("us").await;
    let eu = origin("eu").await;
    let proxy = proxy()
        .route_addrs("us", &[us.addr], "regional_hosts = [\"us.example.test\"]")
        .route_addrs("eu", &[eu.addr], "regional_hosts = [\"*.eu.example.test\"]")
        .identify("strict_regional_hosts = true")
        .start()
        .await;
    let wrong = get(
        &proxy.url("/"),
        &[("host", "api.eu.example.test"), ("x-workspace-id", "acme")],
    )
    .await;
    assert_eq!(wrong.status, 421);
    assert_eq!(wrong.refusal(), Some("wrong_region_endpoint"));
    let right = get(
        &proxy.url("/"),
        &[
            ("host", "api.eu.example.test"),
            ("x-workspace-id", "globex"),
        ],
    )
    .await;
    assert_eq!(right.region(), "eu");
    let home = get(
        &proxy.url("/"),
        &[("host", "us.example.test"), ("x-workspace-id", "acme")],
    )
    .await;
    assert_eq!(home.region(), "us");
    assert!(us
        .seen_requests()
        .iter()
        .all(|s| s.headers["x-domicile-workspace"] == "acme"));
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn no_map_means_map_unavailable() {
    let us = origin("us").await;
    let proxy = proxy().route("us", &[&us]).map(None).start().await;
    let reply = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.refusal(), Some("map_unavailable"));
    let ready = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["map_loaded"], false);
    assert!(us.seen_requests().is_empty());
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn map_file_changes_are_picked_up_and_bad_files_ignored() {
    let (_us, _eu, proxy) = two_regions().await;
    assert_eq!(
        get(&proxy.url("/"), &[("x-workspace-id", "acme")])
            .await
            .region(),
        "us"
    );

    // Move acme to eu with a new version, written the way a deploy tool would (rename over).
    let moved = MAP.replace(r#""version":7}"#, r#""version":8}"#).replace(
        r#"{"type":"workspace","id":"acme","region":"us","epoch":3,"version":1}"#,
        r#"{"type":"workspace","id":"acme","region":"eu","epoch":4,"version":8}"#,
    );
    let map_path = proxy.dir.path().join("map.jsonl");
    let tmp = proxy.dir.path().join("map.jsonl.new");
    std::fs::write(&tmp, moved).unwrap();
    std::fs::rename(&tmp, &map_path).unwrap();
    let engine = proxy.running.engine.clone();
    assert!(
        eventually(Duration::from_secs(5), || engine.replica.version()
            == Some(8))
        .await,
        "reloaded"
    );
    let reply = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
    assert_eq!(reply.region(), "eu");
    assert_eq!(reply.json()["headers"]["x-domicile-epoch"], "4");
    assert_eq!(reply.json()["headers"]["x-domicile-map-version"], "8");

    // A broken file is rejected; the proxy keeps serving version 8.
    std::fs::write(&map_path, "{\"type\":\"map\",\"version\":9}\nnot json\n").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || engine
            .metrics
            .map_reloads_failed
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0)
        .await,
        "bad reload counted"
    );
    assert_eq!(engine.replica.version(), Some(8));
    assert_eq!(
        get(&proxy.url("/"), &[("x-workspace-id", "acme")])
            .await
            .region(),
        "eu"
    );
    let metrics = get(&proxy.admin_url("/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("domicile_map_version 8"), "{text}");
    assert!(
        text.contains("domicile_map_reloads_total{result=\"failed\"}"),
        "{text}"
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn metrics_count_decisions_by_code_and_region() {
    let (_us, _eu, proxy) = two_regions().await;
    for _ in 0..3 {
        get(&proxy.url("/"), &[("x-workspace-id", "globex")]).await;
    }
    get(&proxy.url("/"), &[("x-workspace-id", "nobody")]).await;
    let text =
        String::from_utf8_lossy(&get(&proxy.admin_url("/metrics"), &[]).await.body).into_owned();
    for line in [
        "domicile_requests_total{decision=\"forwarded\",region=\"eu\"} 3",
        "domicile_requests_total{decision=\"unknown_workspace\",region=\"none\"} 1",
        "domicile_request_duration_seconds_count 4",
        "domicile_map_entries 6",
        "domicile_upstream_region_up{region=\"eu\"} 1",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert_eq!(get(&proxy.admin_url("/healthz"), &[]).await.status, 200);
    assert_eq!(
        get(&proxy.admin_url("/readyz"), &[]).await.status,
        503,
        "au is in the map without a route"
    );
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn an_absolute_form_target_must_agree_with_the_host_header() {
    let (us, eu, proxy) = two_regions().await;
    // The target names acme (us), the Host globex (eu): one request, two workspaces. Refused
    // before identification, so neither region sees it.
    let raw_request = "GET http://acme.localhost/doc HTTP/1.1\r\nHost: globex.localhost\r\nConnection: close\r\n\r\n";
    let answer = raw(proxy.addr(), raw_request.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(raw_status(&answer), Some(400), "{answer}");
    assert!(
        answer.contains("names another authority than the Host header"),
        "{answer}"
    );
    assert!(us.seen_requests().is_empty() && eu.seen_requests().is_empty());
    // Agreeing (case aside), it is identified by that authority.
    let raw_request = "GET http://ACME.localhost/doc HTTP/1.1\r\nHost: acme.localhost\r\nConnection: close\r\n\r\n";
    let answer = raw(proxy.addr(), raw_request.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    let seen = us.seen_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["x-domicile-workspace"], "acme");
    assert!(eu.seen_requests().is_empty());
    proxy.running.shutdown().await;
}

#[tokio::test]
async fn path_tricks_do_not_escape_the_path_rule() {
    let us = origin("us").await;
    let eu = origin("eu").await;
    // With edge-region, an unidentified request goes to us: a path that dodged the rule would
    // carry globex's request to the wrong region.
    let proxy = proxy()
        .route("us", &[&us])
        .route("eu", &[&eu])
        .identify("unidentified = \"edge-region\"")
        .start()
        .await;
    for path in [
        "//w/globex/x",
        "/x/../w/globex/",
        "/./w/globex",
        "/w/%67lobex/doc",
        "/w/%2e/globex/",
    ] {
        let answer = raw(
            proxy.addr(),
            format!("GET {path} HTTP/1.1\r\nHost: edge.example\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(raw_status(&answer), Some(200), "{path}: {answer}");
        assert!(
            answer.contains("\"region\": \"eu\""),
            "{path} must reach eu: {answer}"
        );
    }
    assert!(us.seen_requests().is_empty(), "{:?}", us.seen_requests());
    // Raw and normalized paths naming different workspaces: refused, not guessed.
    let answer = raw(
        proxy.addr(),
        b"GET /w/globex/%2e%2e/acme/ HTTP/1.1\r\nHost: edge.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(raw_status(&answer), Some(400), "{answer}");
    assert!(answer.contains("conflicting_workspace"), "{answer}");
    proxy.running.shutdown().await;
}
