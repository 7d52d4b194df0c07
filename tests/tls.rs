//! TLS on every link: the edge's HTTPS listener (ALPN, SNI, wildcards, unknown names, validity,
//! hot reload) and TLS to origins that must prove their region.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::tls::*;
use common::*;
use domicile::origin::Origin;
use domicile_certs::dev::{self, DevCa, Leaf, Usage};
use domicile_certs::rustls;

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics(proxy: &TestProxy) -> String {
    String::from_utf8_lossy(&get(&proxy.admin_url("/metrics"), &[]).await.body).into_owned()
}

/// Waits until a counter of the proxy's TLS listener reaches `n` (the server counts a handshake
/// when its side of it ends, which can be after the client's side).
async fn tls_counter_reaches(
    proxy: &TestProxy,
    counter: fn(&domicile_certs::TlsStats) -> &std::sync::atomic::AtomicU64,
    n: u64,
) {
    let stats = proxy.running.edge_tls.as_ref().unwrap().stats().clone();
    let reached = eventually(Duration::from_secs(5), || {
        counter(&stats).load(std::sync::atomic::Ordering::Relaxed) == n
    })
    .await;
    assert!(reached, "{}", metrics(proxy).await);
}

/// Two cleartext origins and a proxy with the dev edge certificate on its HTTPS port.
async fn https_proxy(
    extra_tls: &str,
) -> (Origin, Origin, TestProxy, domicile_certs::dev::DevLayout) {
    let us = origin("us").await;
    let eu = origin("eu").await;
    let builder = proxy().route("us", &[&us]).route("eu", &[&eu]);
    let layout = pki(builder.dir());
    let builder = builder.section(&tls_section(&[layout.edge()], extra_tls));
    (us, eu, builder.start().await, layout)
}

#[tokio::test]
async fn https_serves_http1_and_h2_by_alpn_and_tells_the_origin() {
    let (us, eu, proxy, layout) = https_proxy("").await;
    let addr = proxy.running.tls_addr.expect("https address");
    for (alpn, expect_h2) in [
        (&[b"h2" as &[u8], b"http/1.1"][..], true),
        (&[b"http/1.1" as &[u8]][..], false),
    ] {
        let session = handshake(addr, "acme.localhost", client_config(&layout.ca(), alpn))
            .await
            .expect("handshake");
        assert_eq!(session.alpn().as_deref() == Some(b"h2"), expect_h2);
        let mut sender = Sender::open(session).await;
        for (host, region) in [("acme.localhost", "us"), ("globex.localhost", "eu")] {
            let reply = sender.get(host, "/hello", &[]).await;
            assert_eq!(
                reply.status,
                200,
                "{}",
                String::from_utf8_lossy(&reply.body)
            );
            assert_eq!(reply.region(), region);
            let headers = &reply.json()["headers"];
            assert_eq!(headers["x-forwarded-proto"], "https");
            assert!(headers["forwarded"]
                .as_str()
                .unwrap()
                .contains("proto=https"));
        }
    }
    assert_eq!(us.seen_requests().len(), 2);
    assert_eq!(eu.seen_requests().len(), 2);
    // The cleartext port still serves.
    let plain = get(&proxy.url("/"), &[("host", "acme.localhost")]).await;
    assert_eq!(plain.region(), "us");
    let text = metrics(&proxy).await;
    assert_eq!(
        metric(&text, "domicile_tls_handshakes_total{kind=\"full\"}"),
        Some(2.0),
        "{text}"
    );
    let expiry = metric(
        &text,
        &format!(
            "domicile_tls_certificate_expiry_seconds{{cert=\"{}\"}}",
            layout.edge().0.display()
        ),
    )
    .expect("expiry gauge");
    assert!(
        expiry > 29.0 * 86_400.0 && expiry <= 30.0 * 86_400.0,
        "{expiry}"
    );
}

#[tokio::test]
async fn sessions_resume() {
    let (_us, _eu, proxy, layout) = https_proxy("").await;
    let addr = proxy.running.tls_addr.unwrap();
    // One client configuration keeps the tickets of its earlier sessions.
    let config = client_config(&layout.ca(), &[b"http/1.1"]);
    let first = handshake(addr, "acme.localhost", config.clone())
        .await
        .unwrap();
    assert!(!first.resumed());
    // TLS 1.3 tickets arrive after the handshake: read them by making a request.
    let mut sender = Sender::open(first).await;
    assert_eq!(sender.get("acme.localhost", "/", &[]).await.status, 200);
    let second = handshake(addr, "acme.localhost", config).await.unwrap();
    assert!(
        second.resumed(),
        "the second handshake should resume the first session"
    );
    tls_counter_reaches(&proxy, |s| &s.handshakes_resumed, 1).await;
    let text = metrics(&proxy).await;
    assert_eq!(
        metric(&text, "domicile_tls_handshakes_total{kind=\"resumed\"}"),
        Some(1.0),
        "{text}"
    );
}

// curl runs as a blocking child: the origins need a runtime thread of their own meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_http1_and_h2_to_the_edge() {
    let (_us, _eu, proxy, layout) = https_proxy("").await;
    let addr = proxy.running.tls_addr.unwrap();
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", flag, "--cacert"])
            .arg(layout.ca())
            .arg("--resolve")
            .arg(format!("globex.localhost:{}:127.0.0.1", addr.port()))
            .args(["-w", "\n%{http_version}"])
            .arg(format!("https://globex.localhost:{}/docs", addr.port()))
            .args(["-m", "4", "-v"])
            .output()
            .expect("curl runs (scripts/setup.sh installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {flag}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, got) = stdout.rsplit_once('\n').unwrap();
        assert_eq!(got, version, "{stdout}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["region"], "eu");
        assert_eq!(json["path"], "/docs");
    }
    // TLS 1.2 is served; anything older is refused in the handshake.
    let version = |args: &[&str]| {
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(layout.ca())
            .args(args)
            .arg("--resolve")
            .arg(format!("globex.localhost:{}:127.0.0.1", addr.port()))
            .arg(format!("https://globex.localhost:{}/", addr.port()))
            .output()
            .unwrap()
    };
    let tls12 = version(&["--tlsv1.2", "--tls-max", "1.2"]);
    assert_eq!(
        String::from_utf8_lossy(&tls12.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&tls12.stderr)
    );
    let tls11 = version(&["--tlsv1.1", "--tls-max", "1.1"]);
    assert!(!tls11.status.success(), "TLS 1.1 must be refused");
    // curl refuses a server it cannot verify: without the CA, exit code 60.
    let out = Command::new("curl")
        .args(["-sS", "--resolve"])
        .arg(format!("globex.localhost:{}:127.0.0.1", addr.port()))
        .arg(format!("https://globex.localhost:{}/", addr.port()))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(60),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issues `names` from `ca` into `dir/stem.pem` and `dir/stem-key.pem`.
fn issue(ca: &DevCa, dir: &std::path::Path, stem: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let issued = ca.issue(leaf).unwrap();
    let pair = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    );
    dev::write_file(&pair.0, &issued.cert_pem, false).unwrap();
    dev::write_file(&pair.1, &issued.key_pem, true).unwrap();
    pair
}

fn server_leaf(names: &[&str]) -> Leaf {
    Leaf::new(names[0], Usage::Server, 30).names(names.iter().copied())
}

#[tokio::test]
async fn certificates_are_chosen_by_sni_with_wildcards_and_unknown_names_refused() {
    let us = origin("us").await;
    let builder = proxy().route("us", &[&us]);
    let ca = DevCa::generate("test CA").unwrap();
    let dir = builder.dir().to_owned();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    let certs = [
        issue(
            &ca,
            &dir,
            "default",
            &server_leaf(&["default.example.test"]),
        ),
        issue(&ca, &dir, "wild", &server_leaf(&["*.example.test"])),
        issue(&ca, &dir, "api", &server_leaf(&["api.example.test"])),
    ];
    let proxy = builder
        .section(&tls_section(&certs, "unknown_name = \"refuse\""))
        .start()
        .await;
    let addr = proxy.running.tls_addr.unwrap();
    let config = client_config(&dir.join("ca.pem"), &[b"http/1.1"]);
    let names = |sni: &'static str| {
        let config = config.clone();
        async move { handshake(addr, sni, config).await.map(|s| s.names()) }
    };
    assert_eq!(
        names("api.example.test").await.unwrap(),
        ["api.example.test"]
    );
    assert_eq!(
        names("acme.example.test").await.unwrap(),
        ["*.example.test"]
    );
    assert_eq!(
        names("default.example.test").await.unwrap(),
        ["default.example.test"]
    );
    // A wildcard covers one label: two labels deep is an unknown name, refused with an alert.
    let err = names("a.b.example.test").await.unwrap_err();
    assert!(
        matches!(tls_error(&err), Some(rustls::Error::AlertReceived(_))),
        "{err:?}"
    );
    let err = names("other.test").await.unwrap_err();
    assert!(
        matches!(tls_error(&err), Some(rustls::Error::AlertReceived(_))),
        "{err:?}"
    );
    tls_counter_reaches(&proxy, |s| &s.handshake_failures, 2).await;
    let text = metrics(&proxy).await;
    assert_eq!(
        metric(&text, "domicile_tls_unknown_name_total{result=\"refused\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "domicile_tls_handshake_failures_total"),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn unknown_names_get_the_default_certificate_when_so_configured() {
    let (_us, _eu, proxy, layout) = https_proxy("unknown_name = \"default\"").await;
    let addr = proxy.running.tls_addr.unwrap();
    let session = handshake(
        addr,
        "not-ours.test",
        client_config(&layout.ca(), &[b"http/1.1"]),
    )
    .await
    .unwrap_err();
    // The client refuses the default certificate for a name it does not carry...
    assert!(
        matches!(
            tls_error(&session),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{session:?}"
    );
    // ...and an IP-address client (no SNI) gets it and accepts it: it names 127.0.0.1.
    let session = handshake(
        addr,
        "127.0.0.1",
        client_config(&layout.ca(), &[b"http/1.1"]),
    )
    .await
    .expect("handshake without SNI");
    assert!(session.names().contains(&"*.localhost".to_string()));
    let text = metrics(&proxy).await;
    assert_eq!(
        metric(&text, "domicile_tls_unknown_name_total{result=\"default\"}"),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_not_yet_valid_certificates_are_refused_by_clients() {
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    for (stem, valid, expected) in [
        (
            "expired",
            (now - 10 * day, now - day),
            rustls::CertificateError::Expired,
        ),
        (
            "future",
            (now + day, now + 10 * day),
            rustls::CertificateError::NotValidYet,
        ),
    ] {
        let us = origin("us").await;
        let builder = proxy().route("us", &[&us]);
        let ca = DevCa::generate("test CA").unwrap();
        let dir = builder.dir().to_owned();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        let leaf = server_leaf(&["acme.localhost"]).valid(valid.0, valid.1);
        let pair = issue(&ca, &dir, stem, &leaf);
        // The proxy starts (refusing to would take HTTPS down for every name) and says so in
        // its expiry gauge; clients refuse the certificate.
        let proxy = builder
            .section(&tls_section(std::slice::from_ref(&pair), ""))
            .start()
            .await;
        let addr = proxy.running.tls_addr.unwrap();
        let err = handshake(
            addr,
            "acme.localhost",
            client_config(&dir.join("ca.pem"), &[b"h2"]),
        )
        .await
        .unwrap_err();
        let got = match tls_error(&err) {
            Some(rustls::Error::InvalidCertificate(e)) => e.clone(),
            other => panic!("{stem}: {other:?}"),
        };
        let same = matches!(
            (&got, &expected),
            (
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
                rustls::CertificateError::Expired
            ) | (
                rustls::CertificateError::NotValidYet
                    | rustls::CertificateError::NotValidYetContext { .. },
                rustls::CertificateError::NotValidYet
            )
        );
        assert!(same, "{stem}: {got:?}");
        let out = Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(dir.join("ca.pem"))
            .arg("--resolve")
            .arg(format!("acme.localhost:{}:127.0.0.1", addr.port()))
            .arg(format!("https://acme.localhost:{}/", addr.port()))
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(60),
            "{stem}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = metrics(&proxy).await;
        let gauge = metric(
            &text,
            &format!(
                "domicile_tls_certificate_expiry_seconds{{cert=\"{}\"}}",
                pair.0.display()
            ),
        )
        .unwrap();
        if stem == "expired" {
            assert!(gauge < 0.0, "{gauge}");
        }
    }
}

#[tokio::test]
async fn a_changed_certificate_is_served_without_dropping_open_connections() {
    let us = origin("us").await;
    let builder = proxy().route("us", &[&us]);
    let ca = DevCa::generate("test CA").unwrap();
    let dir = builder.dir().to_owned();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    let pair = issue(
        &ca,
        &dir,
        "edge",
        &server_leaf(&["acme.localhost", "one.localhost"]),
    );
    let proxy = builder
        .section(&tls_section(std::slice::from_ref(&pair), ""))
        .start()
        .await;
    let addr = proxy.running.tls_addr.unwrap();
    let config = client_config(&dir.join("ca.pem"), &[b"http/1.1"]);

    let open = handshake(addr, "acme.localhost", config.clone())
        .await
        .unwrap();
    assert!(open.names().contains(&"one.localhost".to_string()));
    let mut open = Sender::open(open).await;
    assert_eq!(open.get("acme.localhost", "/", &[]).await.status, 200);

    issue(
        &ca,
        &dir,
        "edge",
        &server_leaf(&["acme.localhost", "two.localhost"]),
    );
    let reloaded = eventually(Duration::from_secs(10), || {
        proxy
            .running
            .edge_tls
            .as_ref()
            .unwrap()
            .stats()
            .reloads_ok
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    assert!(reloaded, "the new certificate was not loaded");
    // A new client (a resumed session would carry the old certificate).
    let config = client_config(&dir.join("ca.pem"), &[b"http/1.1"]);
    let fresh = handshake(addr, "acme.localhost", config).await.unwrap();
    assert!(
        fresh.names().contains(&"two.localhost".to_string()),
        "{:?}",
        fresh.names()
    );
    // The connection opened before the reload still serves.
    let reply = open.get("acme.localhost", "/still-here", &[]).await;
    assert_eq!((reply.status, reply.region()), (200, "us".to_owned()));

    // A broken certificate: the current one stays, and metrics say the reload failed.
    std::fs::write(&pair.0, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    let failed = eventually(Duration::from_secs(10), || {
        proxy
            .running
            .edge_tls
            .as_ref()
            .unwrap()
            .stats()
            .reloads_failed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
    assert!(failed, "the broken certificate was not noticed");
    let text = metrics(&proxy).await;
    assert_eq!(
        metric(&text, "domicile_tls_reload_error"),
        Some(1.0),
        "{text}"
    );
    let config = client_config(&dir.join("ca.pem"), &[b"http/1.1"]);
    let after = handshake(addr, "acme.localhost", config).await.unwrap();
    assert!(after.names().contains(&"two.localhost".to_string()));
    let reply = open.get("acme.localhost", "/", &[]).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn origins_over_mtls_must_prove_the_home_region() {
    let builder = proxy();
    let layout = pki(builder.dir());
    let (us_cert, us_key) = layout.origin("us");
    let (eu_cert, eu_key) = layout.origin("eu");
    let ca = layout.ca();
    let us = Origin::start_tls("us", LOOPBACK, &us_cert, &us_key, Some(&ca))
        .await
        .unwrap();
    // The "eu" endpoint is an origin with the us certificate: the right CA, the wrong region.
    let impostor = Origin::start_tls("eu", LOOPBACK, &us_cert, &us_key, Some(&ca))
        .await
        .unwrap();
    let eu = Origin::start_tls("eu", LOOPBACK, &eu_cert, &eu_key, Some(&ca))
        .await
        .unwrap();
    let no_health = "health = { enabled = false }\n";
    let proxy = builder
        .route_addrs(
            "us",
            &[us.addr],
            // HTTP/2 over TLS (ALPN h2) to this region's origin.
            &format!(
                "protocol = \"h2c\"\n{}{no_health}",
                origin_tls(&layout, "us.region.example.test")
            ),
        )
        .route_addrs(
            "eu",
            &[impostor.addr],
            &format!(
                "{}{no_health}",
                origin_tls(&layout, "eu.region.example.test")
            ),
        )
        .audit("")
        .start()
        .await;

    let reply = get(&proxy.url("/"), &[("host", "acme.localhost")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.region(), "us");
    // The origin saw the proxy's client certificate, over HTTP/2 (an authority is only set
    // from HTTP/2's pseudo-headers).
    assert_eq!(
        reply.json()["tls"]["client"],
        "urn:domicile:proxy:test-edge"
    );
    assert!(reply.json()["authority"].is_string(), "{}", reply.json());

    let refused = get(&proxy.url("/"), &[("host", "globex.localhost")]).await;
    assert_eq!(
        refused.status,
        502,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.refusal(), Some("upstream_wrong_region"));
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("us.region.example.test") && message.contains("eu.region.example.test"),
        "{message}"
    );
    assert!(
        impostor.seen().is_empty(),
        "nothing reaches an origin that did not prove its region"
    );
    let text = metrics(&proxy).await;
    assert_eq!(
        metric(
            &text,
            "domicile_upstream_tls_refused_total{region=\"eu\",reason=\"wrong_region\"}"
        ),
        Some(1.0),
        "{text}"
    );
    drop(eu);
    proxy.running.shutdown().await;
    // The audit record of the refusal names no upstream: nothing was sent.
    let records: Vec<serde_json::Value> = std::fs::read_dir(proxy.dir.path().join("audit"))
        .unwrap()
        .flat_map(|e| {
            std::fs::read_to_string(e.unwrap().path())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| serde_json::from_str(&l).ok())
        .filter(|r: &serde_json::Value| r["workspace"] == "globex")
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["decision"], "upstream_wrong_region");
    assert!(records[0]["upstream_region"].is_null(), "{:?}", records[0]);
}

#[tokio::test]
async fn origins_with_expired_or_untrusted_certificates_are_refused() {
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let ca = DevCa::generate("test CA").unwrap();
    let other = DevCa::generate("other CA").unwrap();
    let identity = "eu.region.example.test";
    let cases = [
        (
            "expired",
            &ca,
            server_leaf(&[identity]).valid(now - 10 * day, now - day),
        ),
        (
            "future",
            &ca,
            server_leaf(&[identity]).valid(now + day, now + 10 * day),
        ),
        ("untrusted", &other, server_leaf(&[identity])),
    ];
    for (stem, issuer, leaf) in cases {
        let builder = proxy();
        let dir = builder.dir().to_owned();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        let (cert, key) = issue(issuer, &dir, stem, &leaf);
        let origin = Origin::start_tls("eu", LOOPBACK, &cert, &key, None)
            .await
            .unwrap();
        let tls = format!(
            "tls = {{ ca = \"{}\", identity = \"{identity}\" }}\nhealth = {{ enabled = false }}\n",
            dir.join("ca.pem").display()
        );
        let proxy = builder
            .route_addrs("eu", &[origin.addr], &tls)
            .start()
            .await;
        let refused = get(&proxy.url("/"), &[("host", "globex.localhost")]).await;
        assert_eq!(refused.status, 502, "{stem}");
        assert_eq!(refused.refusal(), Some("upstream_tls"), "{stem}");
        assert!(origin.seen().is_empty(), "{stem}");
        let text = metrics(&proxy).await;
        assert_eq!(
            metric(
                &text,
                "domicile_upstream_tls_refused_total{region=\"eu\",reason=\"tls\"}"
            ),
            Some(1.0),
            "{stem}: {text}"
        );
    }
}

#[test]
fn certs_dev_writes_private_keys_0600_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["certs", "dev"])
        .arg(dir.path())
        .args([
            "--domain",
            "example.test",
            "--regions",
            "us,eu,au",
            "--proxies",
            "edge-1,edge-2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut keys = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        if path.to_string_lossy().ends_with("-key.pem") {
            keys += 1;
            assert_eq!(mode, 0o600, "{}", path.display());
        } else {
            assert_eq!(mode, 0o644, "{}", path.display());
        }
    }
    // CA, edge, three origins, two proxies, control plane.
    assert_eq!(keys, 8);
    let again = Command::new(BIN)
        .args(["certs", "dev"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let bad = Command::new(BIN)
        .args(["certs", "dev"])
        .arg(dir.path().join("x"))
        .args(["--domain", "not a domain"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--domain"));
}

#[test]
fn check_config_names_broken_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let layout = pki(dir.path());
    let (cert, _) = layout.edge();
    let (_, wrong_key) = layout.control_plane();
    let config = format!(
        "[proxy]\nedge_region = \"us\"\nlisten = \"127.0.0.1:0\"\n[map]\n[identify]\nrules = [{{ from = \"header\", name = \"x-workspace-id\" }}]\n\
         [tls]\nlisten = \"127.0.0.1:0\"\n[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n\
         [regions.eu]\nendpoints = [\"127.0.0.1:1\"]\ntls = {{ ca = \"missing-ca.pem\", identity = \"not a name\" }}\n",
        cert.display(),
        wrong_key.display()
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls.certificates[0]") && stderr.contains("does not belong"),
        "{stderr}"
    );
    assert!(stderr.contains("regions.eu.tls.identity"), "{stderr}");
    assert!(stderr.contains("missing-ca.pem"), "{stderr}");

    // An https control plane needs the CA; a client certificate needs https and both files.
    let config = format!(
        "[proxy]\nedge_region = \"us\"\nlisten = \"127.0.0.1:0\"\n[identify]\nrules = [{{ from = \"header\", name = \"x-workspace-id\" }}]\n\
         [control_plane]\nurl = \"https://127.0.0.1:1\"\ncert = \"{}\"\n",
        cert.display()
    );
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("control_plane.ca"), "{stderr}");
    assert!(stderr.contains("both cert and key"), "{stderr}");
}

fn status_of(e: &anyhow::Error) -> Option<u16> {
    e.downcast_ref::<domicile::client::ApiError>()
        .map(|api| api.status.as_u16())
}

// curl runs as a blocking child while the control plane answers on the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_follows_an_https_control_plane_with_its_client_certificate() {
    use common::cp::*;
    let certs_dir = tempfile::tempdir().unwrap();
    let layout = pki(certs_dir.path());
    let (cp_cert, cp_key) = layout.control_plane();
    let ca = layout.ca();
    let cp = control_plane(None, LOOPBACK, |config| {
        config.tls = Some(domicile_control_plane::config::TlsConfig {
            cert: cp_cert.clone(),
            key: cp_key.clone(),
            client_ca: Some(ca.clone()),
        });
    })
    .await;
    assert_eq!(cp.running.scheme, "https");
    let url = format!("https://{}", cp.running.addr);
    let token = cp.running.bootstrap_token.clone().unwrap();
    let admin = domicile::client::AdminClient::with_tls(&url, Some(token), &ca, None).unwrap();
    seed(&admin).await;

    // The proxy authenticates with its certificate alone: no token anywhere.
    let (us, eu) = (origin("us").await, origin("eu").await);
    let (proxy_cert, proxy_key) = layout.proxy("test-edge");
    let proxy = proxy()
        .map(None)
        .route("us", &[&us])
        .route("eu", &[&eu])
        .section(&format!(
            "[control_plane]\nurl = \"{url}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             last_known_good = \"lkg.map\"\nheartbeat_interval = \"200ms\"\nrequest_timeout = \"2s\"\n\
             backoff_initial = \"20ms\"\nbackoff_max = \"200ms\"\n",
            ca.display(),
            proxy_cert.display(),
            proxy_key.display()
        ))
        .start()
        .await;
    let version = cp.running.store.head().await.unwrap().version;
    synced(&proxy, version).await;
    let reply = get(&proxy.url("/"), &[("host", "globex.localhost")]).await;
    assert_eq!(reply.region(), "eu");
    let mut fleet = serde_json::Value::Null;
    for _ in 0..100 {
        fleet = admin.get_json("/v1/fleet").await.unwrap();
        if fleet["members"][0]["proxy_id"] == "test-edge" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fleet["members"][0]["proxy_id"], "test-edge", "{fleet}");

    // The proxy's certificate grants the proxy role only...
    let as_proxy = domicile::client::AdminClient::with_tls(
        &url,
        None,
        &ca,
        Some(&domicile_certs::CertSource {
            cert: proxy_cert.clone(),
            key: proxy_key.clone(),
        }),
    )
    .unwrap();
    let err = as_proxy.get_json("/v1/tokens").await.unwrap_err();
    assert_eq!(status_of(&err), Some(403), "{err:#}");
    assert!(
        format!("{err:#}").contains("client certificate \"test-edge\" has role proxy"),
        "{err:#}"
    );
    // ...and reports for its own proxy id only.
    let heartbeat = serde_json::json!({
        "proxy_id": "someone-else", "edge_region": "us", "applied_version": 1,
        "drained_version": 1, "epoch": "x", "checksum": "00"
    });
    let err = as_proxy
        .send_json(http::Method::POST, "/v1/fleet/heartbeat", &heartbeat)
        .await
        .unwrap_err();
    assert_eq!(status_of(&err), Some(403), "{err:#}");
    assert!(
        format!("{err:#}").contains("cannot report for proxy \"someone-else\""),
        "{err:#}"
    );

    // A certificate from another CA is refused in the handshake.
    let other = DevCa::generate("other CA").unwrap();
    let stranger = issue(
        &other,
        certs_dir.path(),
        "stranger",
        &Leaf::new("stranger", Usage::Client, 30).identity("admin", "stranger"),
    );
    let as_stranger = domicile::client::AdminClient::with_tls(
        &url,
        None,
        &ca,
        Some(&domicile_certs::CertSource {
            cert: stranger.0,
            key: stranger.1,
        }),
    )
    .unwrap();
    let err = as_stranger.get_json("/v1/regions").await.unwrap_err();
    assert_eq!(status_of(&err), None, "refused before any HTTP: {err:#}");

    // No certificate and no token: 401; a forged identity header changes nothing.
    for extra in [
        &[][..],
        &["-H", "x-domicile-internal-client-certificate: admin:root"][..],
    ] {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca)
            .args(extra)
            .arg(format!("{url}/v1/tokens"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "401",
            "{extra:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    proxy.running.shutdown().await;
    cp.running.shutdown().await;
}

#[tokio::test]
async fn health_checks_over_tls_count_only_origins_that_prove_the_region() {
    for h2 in [false, true] {
        let builder = proxy();
        let layout = pki(builder.dir());
        let (impostor, good) = impostor_and_good(&layout).await;
        let protocol = if h2 { "protocol = \"h2c\"\n" } else { "" };
        let proxy = builder
            .route_addrs(
                "us",
                &[impostor.addr, good.addr],
                &format!(
                    "health = {{ interval = \"50ms\", timeout = \"500ms\" }}\n{protocol}{}",
                    origin_tls(&layout, "us.region.example.test")
                ),
            )
            .start()
            .await;
        // The proxy starts once every endpoint has had its first check: from the first
        // moment, the impostor is not healthy and the origin that proves the region is.
        let text = metrics(&proxy).await;
        let healthy = |addr: SocketAddr| {
            metric(
                &text,
                &format!("domicile_upstream_endpoint_healthy{{region=\"us\",endpoint=\"{addr}\"}}"),
            )
        };
        assert_eq!(healthy(impostor.addr), Some(0.0), "h2 {h2}: {text}");
        assert_eq!(healthy(good.addr), Some(1.0), "h2 {h2}: {text}");
        // Checks go through the data path's connector: TLS with the proxy's client
        // certificate, the region's protocol, the endpoint as host.
        let check = good
            .seen()
            .into_iter()
            .find(|s| s.path == "/healthz")
            .expect("a health check reached the good origin");
        assert_eq!(check.headers["user-agent"], "domicile-health-check");
        if !h2 {
            assert_eq!(check.headers["host"], good.addr.to_string());
        }
        assert!(
            impostor.seen().is_empty(),
            "nothing is sent to the impostor"
        );
        // Every request goes to the origin that proved the region, none is refused.
        for _ in 0..6 {
            let reply = get(&proxy.url("/"), &[("host", "acme.localhost")]).await;
            assert_eq!(reply.status, 200);
            assert_eq!(
                reply.json()["tls"]["client"],
                "urn:domicile:proxy:test-edge"
            );
            assert_eq!(reply.json()["authority"].is_string(), h2);
        }
        // And the impostor stays out while checks go on.
        let before = good.seen().len();
        assert!(eventually(Duration::from_secs(5), || good.seen().len() > before + 6).await);
        let text = metrics(&proxy).await;
        assert_eq!(
            metric(
                &text,
                &format!(
                    "domicile_upstream_endpoint_healthy{{region=\"us\",endpoint=\"{}\"}}",
                    impostor.addr
                )
            ),
            Some(0.0)
        );
        proxy.running.shutdown().await;
    }
}

/// A client whose request leaves in the same TCP write as its handshake's Finished (TLS 1.3
/// allows it; busy clients and loaded machines make it common). The edge reads both at once:
/// the request is then held decrypted in the TLS session while the socket has nothing more to
/// say, and must be served from there.
#[tokio::test]
async fn a_request_sent_with_the_clients_finished_is_answered() {
    use std::io::{Read, Write};
    let (_us, _eu, proxy, layout) = https_proxy("").await;
    let addr = proxy.running.tls_addr.unwrap();
    let config = client_config(&layout.ca(), &[b"http/1.1"]);
    let answer = tokio::task::spawn_blocking(move || {
        let name = rustls::pki_types::ServerName::try_from("globex.localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        // Written before the handshake: rustls sends it right after the client's Finished.
        conn.writer()
            .write_all(
                b"GET /first HTTP/1.1\r\nhost: globex.localhost\r\nconnection: close\r\n\r\n",
            )
            .unwrap();
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = Vec::new();
        loop {
            // Everything pending in one write: Finished and the request together.
            let mut out = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut out).unwrap();
            }
            if !out.is_empty() {
                tcp.write_all(&out).unwrap();
            }
            match conn.read_tls(&mut tcp) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => panic!(
                    "no answer: {e} (so far {:?})",
                    String::from_utf8_lossy(&answer)
                ),
            }
            conn.process_new_packets().unwrap();
            let mut plain = [0u8; 4096];
            loop {
                match conn.reader().read(&mut plain) {
                    Ok(0) => return answer,
                    Ok(n) => answer.extend_from_slice(&plain[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return answer,
                }
            }
        }
        answer
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(raw_status(&text), Some(200), "{text}");
    assert!(text.contains("\"path\": \"/first\""), "{text}");
}
