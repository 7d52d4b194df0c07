//! The `domicile` binary as a user runs it: the demo, check-config, and the proxy process with
//! a 1 GiB body streamed both ways through it with flat memory.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::test]
async fn demo_runs_routes_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .args(["demo", "--data-dir"])
        .arg(dir.path())
        .args([
            "--http",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--control-plane",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Owned(child);
    let (_, banner) = wait_for_line(&mut child.0, "Stop with Ctrl-C");
    let banner = banner.join("\n");
    let proxy_line = banner
        .lines()
        .find(|l| l.trim_start().starts_with("proxy"))
        .unwrap();
    let admin_line = banner
        .lines()
        .find(|l| l.trim_start().starts_with("admin"))
        .unwrap();
    let proxy = addr_after(proxy_line, "http://");
    let admin = addr_after(admin_line, "http://");
    assert!(banner.contains("curl"), "prints what to try: {banner}");

    let url = format!("http://{proxy}/");
    for (headers, region) in [
        (vec![("host", "acme.localhost")], "us"),
        (vec![("host", "initech.localhost")], "us"),
        (vec![("x-workspace-id", "globex")], "eu"),
        (vec![("x-workspace-id", "umbrella")], "eu"),
    ] {
        let reply = get(&url, &headers).await;
        assert_eq!(reply.status, 200);
        let body = reply.json();
        assert_eq!(body["region"], region);
        assert_eq!(body["method"], "GET");
        assert_eq!(body["path"], "/");
        assert!(body["headers"].is_object());
    }
    let by_path = get(&format!("http://{proxy}/w/umbrella/files"), &[]).await;
    assert_eq!(by_path.region(), "eu");

    // HTTPS with the demo's CA, HTTP/2 and HTTP/1.1; the origins saw the proxy's client
    // certificate (mTLS).
    let ca = dir.path().join("certs").join("ca.pem");
    let https = addr_after(
        banner
            .lines()
            .find(|l| l.trim_start().starts_with("proxy (TLS)"))
            .unwrap(),
        "https://",
    );
    for (alpn, host, region) in [
        (&[b"h2" as &[u8]][..], "acme.localhost", "us"),
        (&[b"http/1.1" as &[u8]][..], "globex.localhost", "eu"),
    ] {
        let session = common::tls::handshake(https, host, common::tls::client_config(&ca, alpn))
            .await
            .expect("the demo's edge certificate verifies with its CA");
        let mut sender = common::tls::Sender::open(session).await;
        let reply = sender.get(host, "/", &[]).await;
        assert_eq!(reply.region(), region);
        assert_eq!(
            reply.json()["tls"]["client"],
            "urn:domicile:proxy:demo-edge"
        );
        assert_eq!(reply.json()["headers"]["x-forwarded-proto"], "https");
    }
    assert_eq!(
        get(&format!("http://{admin}/readyz"), &[]).await.status,
        200
    );

    // The map lives in the control plane: the admin commands change it, the proxy follows.
    let control_plane = addr_after(
        banner
            .lines()
            .find(|l| l.trim_start().starts_with("control plane"))
            .unwrap(),
        "https://",
    );
    let token_file = dir.path().join("admin.token");
    let secret = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        banner.contains(secret.trim()),
        "the banner prints the admin token: {banner}"
    );
    let admin = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--control-plane", &format!("https://{control_plane}")])
            .arg("--ca-file")
            .arg(&ca)
            .arg("--token-file")
            .arg(&token_file)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, table, err) = admin(&["workspace", "list"]);
    assert!(ok, "{err}");
    assert!(table.starts_with("WORKSPACE"), "{table}");
    assert_eq!(
        table.lines().count(),
        5,
        "a header and the four demo workspaces: {table}"
    );
    let (ok, _, err) = admin(&["workspace", "set", "hooli", "--region", "eu"]);
    assert!(ok, "{err}");
    let hooli = format!("http://{proxy}/w/hooli/");
    let mut routed = false;
    for _ in 0..250 {
        let reply = get(&hooli, &[]).await;
        if reply.status == 200 && reply.region() == "eu" {
            routed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        routed,
        "a workspace set through the CLI is routed within 5 s"
    );
    let (ok, _, err) = admin(&["region", "delete", "eu"]);
    assert!(!ok, "a region with workspaces cannot be deleted");
    assert!(err.contains("region_in_use"), "{err}");
    let (ok, json, err) = admin(&["fleet", "--json"]);
    assert!(ok, "{err}");
    let fleet: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(fleet["members"][0]["proxy_id"] == "demo-edge", "{fleet}");
    // The move the banner suggests: acme to eu, driven by the CLI.
    assert!(banner.contains("move start acme --to eu"), "{banner}");
    let (ok, json, err) = admin(&["move", "start", "acme", "--to", "eu", "--wait", "--json"]);
    assert!(ok, "{err}");
    let started: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(started["phase"], "frozen", "{started}");
    let id = started["id"].to_string();
    let acme = format!("http://{proxy}/w/acme/orders");
    let write = request("POST", &acme, &[], b"{}").await;
    assert_eq!(write.status, 503);
    assert_eq!(write.refusal(), Some("workspace_moving"));
    assert!(write.headers.contains_key("retry-after"));
    assert_eq!(
        get(&acme, &[]).await.region(),
        "us",
        "reads go on at the old home"
    );
    let (ok, json, err) = admin(&["move", "complete", &id, "--wait", "--json"]);
    assert!(ok, "{err}");
    let done: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(done["phase"], "done", "{done}");
    let mut moved = false;
    for _ in 0..250 {
        let reply = request("POST", &acme, &[], b"{}").await;
        if reply.status == 200 && reply.region() == "eu" {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(moved, "writes resume at the new home");
    let (ok, table, err) = admin(&["audit", "admin", "--workspace", "acme"]);
    assert!(ok, "{err}");
    for action in [
        "move.requested",
        "move.freezing",
        "move.frozen",
        "move.switching",
        "move.done",
    ] {
        assert!(
            table.contains(action),
            "{action} missing from the trail:\n{table}"
        );
    }

    // Every decision above is in the audit log, and the report checks each forward against
    // the map history: none left its home region, through the move too.
    assert!(banner.contains("audit verify"), "{banner}");
    let audit_dir = dir.path().join("audit");
    let audit_dir = audit_dir.to_str().unwrap();
    let public = dir.path().join("audit.pub");
    let public = public.to_str().unwrap();
    let html = dir.path().join("report.html");
    let (ok, json, err) = admin(&[
        "audit",
        "report",
        audit_dir,
        "--key",
        public,
        "--json",
        "--html",
        html.to_str().unwrap(),
    ]);
    assert!(ok, "{err}\n{json}");
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["cross_region_forwards"], 0, "{report}");
    assert!(report["checked"].as_u64().unwrap() >= 8, "{report}");
    assert_eq!(report["verification"]["verdict"], "open", "{report}");
    let acme = &report["by_workspace"]["acme"];
    assert!(acme["forwarded"].as_u64().unwrap() >= 3, "{report}");
    assert!(
        acme["refused"]["workspace_moving"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(
        report["by_region"]["eu"]["forwarded"].as_u64().unwrap() >= 4,
        "{report}"
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!doctype html>") && page.contains("0 cross-region forwards"));

    let (ok, _, err) = Command::new(BIN)
        .args([
            "workspace",
            "list",
            "--control-plane",
            &format!("https://{control_plane}"),
        ])
        .env_remove("DOMICILE_TOKEN")
        .env_remove("DOMICILE_TOKEN_FILE")
        .output()
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(!ok && err.contains("no token"), "{err}");

    // The configuration the demo wrote is a real one.
    let config = dir.path().join("proxy.toml");
    assert!(token_file.exists());
    let check = Command::new(BIN)
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let status = child.terminate();
    assert!(
        status.success(),
        "demo exits cleanly on SIGTERM: {status:?}"
    );
    // Stopped cleanly, the log is closed: intact, every record under a signature.
    let verified = Command::new(BIN)
        .args(["audit", "verify", audit_dir, "--key", public])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "{text}");
    assert!(text.contains("INTACT"), "{text}");
}

#[test]
fn check_config_reports_every_error_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[proxy]
edge_region = "us"
listen = "127.0.0.1:8080"
colour = "blue"

[identify]
rules = [{ from = "host", pattern = "no-placeholder.example.com" }]
unidentified = "anywhere"

[limits]
idle_timeout = "soon"

[regions.eu]
endpoints = ["not an endpoint"]
"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "proxy.colour",
        "identify.rules[0]",
        "identify.unidentified",
        "limits.idle_timeout",
        "regions.eu.endpoints[0]",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
    let missing = Command::new(BIN)
        .arg("check-config")
        .arg(dir.path().join("nope.toml"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read"));
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test]
async fn one_gib_streams_both_ways_with_flat_memory() {
    const GIB: u64 = 1 << 30;
    let us = origin("us").await;
    let builder = proxy()
        .route("us", &[&us])
        .limits("max_body_bytes = \"2GiB\"");
    let (config, dir) = builder.write();
    // The proxy's log, shown if a transfer fails.
    let log = dir.path().join("proxy.log");
    let child = Command::new(BIN)
        .args(["proxy", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = Owned(child);
    let (line, _) = wait_for_line(&mut child.0, "listening on");
    let addr = addr_after(&line, "http://");
    let baseline = peak_rss(child.pid());
    let failed = |what: &str, e: &dyn std::fmt::Debug| -> ! {
        panic!(
            "{what}: {e:?}\nthe proxy's log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };

    // Upload: 1 GiB generated on the fly, never held anywhere.
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let chunks = (0..(GIB / chunk.len() as u64))
        .map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone())));
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let client: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(
            Request::post(format!("http://{addr}/upload"))
                .header("x-workspace-id", "acme")
                .body(body)
                .unwrap(),
        )
        .await
        .unwrap_or_else(|e| failed("upload", &e));
    let reply = collect(response).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["body_bytes"], GIB);

    // Download: 1 GiB from the origin, counted as it arrives.
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(
            Request::get(format!("http://{addr}/bytes/{GIB}"))
                .header("x-workspace-id", "acme")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap_or_else(|e| failed("download", &e));
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, GIB);

    let peak = peak_rss(child.pid());
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "proxy peak RSS {} MiB (baseline {} MiB)",
        peak >> 20,
        baseline >> 20
    );
    assert!(
        growth < 64 << 20,
        "proxy memory grew by {} MiB moving 2 GiB",
        growth >> 20
    );
    assert!(child.terminate().success());
}
