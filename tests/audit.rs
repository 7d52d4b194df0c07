//! The routing audit log end to end: real proxies and origins write it, `domicile audit
//! verify` and `report` read it. A proxy killed under load, a disk that fails, and a record
//! forged after the fact.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::cp::{control_plane, following, seed, synced, token};
use common::*;
use domicile_proxy::audit::format::{self, Line, Record};
use domicile_proxy::audit::keys;
use domicile_proxy::audit::verify::{verify, Verdict};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Origins for `us` and `eu` and a proxy configuration routing to both (add `.audit(..)`).
async fn audited() -> (
    domicile::origin::Origin,
    domicile::origin::Origin,
    ProxyBuilder,
) {
    let us = origin("us").await;
    let eu = origin("eu").await;
    let builder = proxy().route("us", &[&us]).route("eu", &[&eu]);
    (us, eu, builder)
}

/// Every record in an audit directory, in log order.
fn records(dir: &Path) -> Vec<Record> {
    let mut out = Vec::new();
    for (_, path) in format::list_segments(dir).unwrap() {
        for line in std::fs::read_to_string(path).unwrap().lines() {
            if let Ok(Line::Record(r)) = serde_json::from_str::<Line>(line) {
                out.push(r);
            }
        }
    }
    out
}

fn public_key(proxy_dir: &Path) -> keys::VerifyingKey {
    keys::load_verifying_key(&proxy_dir.join("audit.pub")).unwrap()
}

fn domicile(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn every_decision_is_recorded_with_what_happened() {
    let (us, eu, builder) = audited().await;
    let proxy = builder
        .proxy_section(&format!(
            "trusted_proxies = [\"127.0.0.1/32\"]\ngeoip_database = \"{}\"",
            geoip_db("GeoIP2-Country-Test.mmdb").display()
        ))
        .audit("client_ip = \"truncated\"")
        .start()
        .await;
    let url = proxy.url("/");
    // A bodiless GET, an upload, HTTP/2, and refusals of several kinds.
    let r = get(
        &url,
        &[
            ("host", "acme.localhost"),
            ("x-request-id", "fast-1"),
            ("x-forwarded-for", "81.2.69.142"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = request(
        "POST",
        &url,
        &[("x-workspace-id", "globex"), ("x-request-id", "post-1")],
        b"twelve bytes",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send_h2(
        Request::get(proxy.url("/w/umbrella/h2"))
            .header("x-request-id", "h2-1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let big = get(
        &proxy.url("/bytes/300000"),
        &[("x-workspace-id", "acme"), ("x-request-id", "big-1")],
    )
    .await;
    assert_eq!(big.body.len(), 300_000);
    for (headers, code) in [
        (
            vec![("x-request-id", "r-unknown"), ("host", "nobody.localhost")],
            "unknown_workspace",
        ),
        (vec![("x-request-id", "r-missing")], "missing_workspace"),
        (
            vec![
                ("x-request-id", "r-conflict"),
                ("host", "acme.localhost"),
                ("x-workspace-id", "globex"),
            ],
            "conflicting_workspace",
        ),
        (
            vec![
                ("x-request-id", "r-unroutable"),
                ("x-workspace-id", "wombat"),
            ],
            "region_unroutable",
        ),
    ] {
        let r = get(&url, &headers).await;
        assert_eq!(r.refusal(), Some(code));
    }
    let r = request(
        "POST",
        &url,
        &[("x-workspace-id", "hooli"), ("x-request-id", "r-moving")],
        b"x",
    )
    .await;
    assert_eq!(r.refusal(), Some("workspace_moving"));

    // The auditor's endpoints.
    let pem = get(&proxy.admin_url("/audit/public-key"), &[]).await;
    assert_eq!(
        String::from_utf8_lossy(&pem.body),
        std::fs::read_to_string(proxy.dir.path().join("audit.pub")).unwrap()
    );
    let checkpoint = get(&proxy.admin_url("/audit/checkpoint"), &[]).await;
    let checkpoint: Value = serde_json::from_slice(&checkpoint.body).unwrap();
    assert_eq!(checkpoint["type"], "checkpoint");
    let ready = get(&proxy.admin_url("/readyz"), &[]).await.json();
    assert_eq!(ready["audit_writable"], true);
    let metrics =
        String::from_utf8_lossy(&get(&proxy.admin_url("/metrics"), &[]).await.body).into_owned();
    for name in [
        "domicile_audit_records_written_total",
        "domicile_audit_queue_depth",
        "domicile_audit_fsync_seconds_count",
        "domicile_audit_refusals_total",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }

    let dir = proxy.dir.path().to_owned();
    proxy.running.shutdown().await;
    let report = verify(&dir.join("audit"), &public_key(&dir), None).unwrap();
    assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    let by_id: HashMap<String, Record> = records(&dir.join("audit"))
        .into_iter()
        .map(|r| (r.request_id.clone(), r))
        .collect();
    assert_eq!(
        by_id.len(),
        9,
        "one record per decision: {:?}",
        by_id.keys()
    );

    let fast = &by_id["fast-1"];
    assert_eq!(fast.decision, "forwarded");
    assert_eq!(fast.workspace.as_deref(), Some("acme"));
    assert_eq!(fast.home_region.as_deref(), Some("us"));
    assert_eq!(fast.upstream_region.as_deref(), Some("us"));
    assert_eq!(fast.upstream, Some(us.addr.to_string()));
    assert_eq!((fast.map_version, fast.epoch), (Some(7), Some(3)));
    assert_eq!((fast.method.as_str(), fast.path.as_str()), ("GET", "/"));
    assert_eq!(fast.host.as_deref(), Some("acme.localhost"));
    assert_eq!(fast.status, Some(200));
    assert!(fast.complete && fast.bytes_out > 0);
    assert_eq!(fast.client_country.as_deref(), Some("GB"));
    assert_eq!(fast.client_ip, Some("81.2.69.0".parse().unwrap()));

    let post = &by_id["post-1"];
    assert_eq!(post.upstream_region.as_deref(), Some("eu"));
    assert_eq!(post.bytes_in, 12);
    assert!(post.complete);
    assert_eq!(post.client_country, None, "loopback has no country");
    assert_eq!(post.client_ip, Some("127.0.0.0".parse().unwrap()));
    assert_eq!(by_id["h2-1"].workspace.as_deref(), Some("umbrella"));
    assert_eq!(by_id["h2-1"].path, "/w/umbrella/h2");
    assert_eq!(by_id["big-1"].bytes_out, 300_000);
    assert!(by_id["big-1"].complete);

    for (id, code, status) in [
        ("r-unknown", "unknown_workspace", 404),
        ("r-missing", "missing_workspace", 400),
        ("r-conflict", "conflicting_workspace", 400),
        ("r-unroutable", "region_unroutable", 503),
        ("r-moving", "workspace_moving", 503),
    ] {
        let r = &by_id[id];
        assert_eq!(r.decision, code, "{id}");
        assert_eq!(r.status, Some(status), "{id}");
        assert_eq!(r.upstream_region, None, "{id}: nothing was sent anywhere");
    }
    assert_eq!(by_id["r-unroutable"].home_region.as_deref(), Some("au"));
    assert_eq!(by_id["r-moving"].epoch, Some(9));
    // Exactly what the origins saw.
    assert_eq!(us.seen_requests().len() + eu.seen_requests().len(), 4);
}

#[tokio::test]
async fn a_download_cut_off_by_the_client_is_recorded_as_incomplete() {
    let (us, _eu, builder) = audited().await;
    let proxy = builder.audit("").start().await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(
            Request::get(proxy.url("/bytes/50000000"))
                .header("x-workspace-id", "acme")
                .header("x-request-id", "cut-1")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    drop(body);
    drop(client);
    let engine = proxy.running.engine.clone();
    let written = eventually(Duration::from_secs(10), || {
        engine.audit.as_ref().unwrap().records_written() >= 1
    })
    .await;
    assert!(written);
    let dir = proxy.dir.path().to_owned();
    proxy.running.shutdown().await;
    let records = records(&dir.join("audit"));
    let cut = records.iter().find(|r| r.request_id == "cut-1").unwrap();
    assert!(!cut.complete, "{cut:?}");
    assert_eq!(cut.status, Some(200));
    assert!(cut.bytes_out < 50_000_000);
    assert_eq!(us.seen_requests().len(), 1);
}

/// `domicile proxy --config CONFIG` as a child process, and the address it serves on.
fn spawn_proxy(config: &Path) -> (Owned, std::net::SocketAddr) {
    let child = Command::new(BIN)
        .args(["proxy", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Owned(child);
    let (line, _) = wait_for_line(&mut child.0, "proxy listening on");
    let addr = addr_after(&line, "http://");
    (child, addr)
}

/// One client request as the client saw it, with global event numbers for when it was sent
/// and when its whole response had arrived.
struct Seen {
    id: String,
    sent: u64,
    received: Option<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_leaves_an_open_tail_and_every_answered_request_before_it() {
    let (us, eu, builder) = audited().await;
    let (config, dir) = builder
        .audit("commit_interval = \"5ms\"\ncheckpoint_interval = \"200ms\"")
        .write();
    let (mut child, addr) = spawn_proxy(&config);

    let events = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..6 {
        let events = events.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut seen = Vec::new();
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = format!("c{c}-{n}");
                let (method, body) = if n % 5 == 0 {
                    ("POST", Bytes::from_static(b"a body for hyper's path"))
                } else {
                    ("GET", Bytes::new())
                };
                let request = Request::builder()
                    .method(method)
                    .uri(format!("http://{addr}/w/{}/x", ["acme", "globex"][n % 2]))
                    .header("x-request-id", &id)
                    .body(Full::new(body))
                    .unwrap();
                let sent = events.fetch_add(1, Ordering::SeqCst);
                let received = match client.request(request).await {
                    Ok(response) if response.status() == 200 => {
                        match response.into_body().collect().await {
                            Ok(_) => Some(events.fetch_add(1, Ordering::SeqCst)),
                            Err(_) => None,
                        }
                    }
                    Ok(_) => None,
                    Err(_) => {
                        seen.push(Seen {
                            id,
                            sent,
                            received: None,
                        });
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                };
                seen.push(Seen { id, sent, received });
            }
            seen
        }));
    }
    // Load until a few thousand requests were answered, then kill the proxy mid-stream.
    let loaded = eventually(Duration::from_secs(30), || {
        events.load(Ordering::Relaxed) > 6000
    })
    .await;
    assert!(loaded, "the load never got going");
    let pid = rustix::process::Pid::from_raw(child.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    let _ = child.0.wait();
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for client in clients {
        seen.extend(client.await.unwrap());
    }

    // verify: the open tail, and nothing else.
    let audit_dir = dir.path().join("audit");
    let report = verify(&audit_dir, &public_key(dir.path()), None).unwrap();
    assert_eq!(report.verdict, Verdict::Open, "{}", report.to_text());
    assert!(report.findings.is_empty(), "{}", report.to_text());
    assert!(report.notes.is_empty(), "{}", report.to_text());
    assert!(report.open_tail.is_some());
    let (code, text, _) = domicile(&[
        "audit",
        "verify",
        audit_dir.to_str().unwrap(),
        "--key",
        dir.path().join("audit.pub").to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains("open tail") && !text.contains("DAMAGE"),
        "{text}"
    );

    // Every response a client had in full before some request whose record is on disk was
    // sent has its record too: the log holds a prefix of the decisions, in order.
    let logged: HashSet<String> = records(&audit_dir)
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    let sent_at: HashMap<&str, u64> = seen.iter().map(|s| (s.id.as_str(), s.sent)).collect();
    for id in &logged {
        assert!(
            sent_at.contains_key(id.as_str()),
            "a record no client sent: {id}"
        );
    }
    let newest_logged_send = logged
        .iter()
        .filter_map(|id| sent_at.get(id.as_str()))
        .max()
        .copied()
        .unwrap();
    let answered: Vec<&Seen> = seen.iter().filter(|s| s.received.is_some()).collect();
    let covered: Vec<&&Seen> = answered
        .iter()
        .filter(|s| s.received.unwrap() < newest_logged_send)
        .collect();
    assert!(
        covered.len() > 1000,
        "only {} answers before the last logged request",
        covered.len()
    );
    let missing: Vec<&str> = covered
        .iter()
        .filter(|s| !logged.contains(&s.id))
        .map(|s| s.id.as_str())
        .collect();
    assert!(missing.is_empty(), "answered but not on disk: {missing:?}");

    // A restart continues the log and acknowledges the crash, and records from the forward
    // journal what the crash took: every request an origin saw has exactly one record now.
    let config = domicile_proxy::ProxyConfig::from_file(&config).unwrap();
    let restarted = domicile_proxy::start(config).await.unwrap();
    restarted.shutdown().await;
    let report = verify(&audit_dir, &public_key(dir.path()), None).unwrap();
    assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    let after = records(&audit_dir);
    let mut per_id: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in &after {
        per_id.entry(r.request_id.as_str()).or_default().push(r);
    }
    let served: Vec<(String, &str)> = us
        .seen_requests()
        .into_iter()
        .map(|s| (s, "us"))
        .chain(eu.seen_requests().into_iter().map(|s| (s, "eu")))
        .filter_map(|(s, region)| Some((s.headers.get("x-request-id")?.clone(), region)))
        .collect();
    assert!(served.len() > 1000);
    let mut recovered = 0;
    for (id, region) in &served {
        let rs = per_id.get(id.as_str()).map_or(&[][..], |v| &v[..]);
        assert_eq!(
            rs.len(),
            1,
            "{id} served in {region} has {} records",
            rs.len()
        );
        assert_eq!(
            rs[0].upstream_region.as_deref(),
            Some(*region),
            "{:?}",
            rs[0]
        );
        if rs[0].recovered {
            recovered += 1;
            assert!(!logged.contains(id), "{id} was in the log already");
            assert!(!rs[0].complete && rs[0].status.is_none(), "{:?}", rs[0]);
        }
    }
    // The kill came mid-load: some forwards were in flight or still in the queue.
    assert!(recovered > 0, "no forward was recovered from the journal");
    let journals = std::fs::read_dir(&audit_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("journal-"))
        .count();
    assert_eq!(journals, 0, "a clean stop leaves no journal behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_in_flight_at_a_kill_is_recorded_at_the_next_start() {
    let (us, _eu, builder) = audited().await;
    let (config_path, dir) = builder.audit("").write();
    let (mut child, addr) = spawn_proxy(&config_path);
    let audit_dir = dir.path().join("audit");
    // An upload the origin holds for 3 s before it answers: in flight when the proxy dies.
    let request = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/w/acme/slow"))
        .header("x-request-id", "in-flight-1")
        .header("x-origin-delay-ms", "3000")
        .body(Full::new(Bytes::from_static(b"the data that left")))
        .unwrap();
    let pending = tokio::spawn(async move {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        client.request(request).await.map(|r| r.status())
    });
    // The decision is in the journal before the request leaves for the origin.
    let journal_len = || -> u64 {
        std::fs::read_dir(&audit_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("journal-"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(10), || journal_len() > 0).await,
        "nothing was journaled"
    );
    let pid = rustix::process::Pid::from_raw(child.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    let _ = child.0.wait();
    assert!(
        pending.await.unwrap().is_err(),
        "the client lost its answer with the proxy"
    );
    assert!(
        records(&audit_dir)
            .iter()
            .all(|r| r.request_id != "in-flight-1"),
        "no record yet: the request never ended"
    );

    let start = || async {
        let config = domicile_proxy::ProxyConfig::from_file(&config_path).unwrap();
        let proxy = domicile_proxy::start(config).await.unwrap();
        proxy.shutdown().await;
        records(&audit_dir)
            .into_iter()
            .filter(|r| r.request_id == "in-flight-1")
            .collect::<Vec<Record>>()
    };
    let found = start().await;
    assert_eq!(found.len(), 1, "{found:?}");
    let r = &found[0];
    assert!(r.recovered);
    assert_eq!(r.decision, "forwarded");
    assert_eq!(r.workspace.as_deref(), Some("acme"));
    assert_eq!(r.home_region.as_deref(), Some("us"));
    assert_eq!(r.upstream_region.as_deref(), Some("us"));
    assert_eq!(r.upstream.as_deref(), Some(us.addr.to_string().as_str()));
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/w/acme/slow");
    assert!(r.status.is_none() && !r.complete, "{r:?}");
    let report = verify(&audit_dir, &public_key(dir.path()), None).unwrap();
    assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    assert_eq!(journal_len(), 0, "the recovered journal was removed");
    // A second start finds nothing more to recover: the record is not written twice.
    assert_eq!(start().await.len(), 1);
}

/// One GET through the proxy, kept with its answer (request id, status, refusal).
async fn ask(url: &str, answered: &mut Vec<(String, u16, Option<String>)>) -> Reply {
    let id = format!("d-{}", answered.len());
    let r = get(url, &[("x-request-id", &id)]).await;
    answered.push((id, r.status, r.refusal().map(str::to_owned)));
    r
}

#[tokio::test]
async fn a_failing_disk_refuses_requests_and_loses_nothing_it_acknowledged() {
    let (us, _eu, builder) = audited().await;
    let proxy = builder.audit("").start().await;
    let audit = || proxy.running.engine.audit.as_ref().unwrap();
    let url = proxy.url("/w/acme/x");
    let mut answered: Vec<(String, u16, Option<String>)> = Vec::new();
    for _ in 0..20 {
        assert_eq!(ask(&url, &mut answered).await.status, 200);
    }
    audit().fail_disk(true);
    // Requests go on until the writer's next commit fails; from then on they are refused.
    let mut refused = false;
    for _ in 0..500 {
        let r = ask(&url, &mut answered).await;
        if r.refusal() == Some("audit_unavailable") {
            assert_eq!(r.status, 503);
            assert!(r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("audit"));
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(refused, "a failing disk never refused a request");
    let ready = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["audit_writable"], false);
    for _ in 0..10 {
        assert_eq!(
            ask(&url, &mut answered).await.refusal(),
            Some("audit_unavailable")
        );
    }
    let seen_while_failing = us.seen_requests().len();
    audit().fail_disk(false);
    let mut recovered = false;
    for _ in 0..500 {
        if ask(&url, &mut answered).await.status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(recovered, "the log never took records again");
    for _ in 0..20 {
        assert_eq!(ask(&url, &mut answered).await.status, 200);
    }
    let metrics =
        String::from_utf8_lossy(&get(&proxy.admin_url("/metrics"), &[]).await.body).into_owned();
    let refusals: u64 = answered
        .iter()
        .filter(|a| a.2.as_deref() == Some("audit_unavailable"))
        .count() as u64;
    assert!(
        metrics.contains(&format!("domicile_audit_refusals_total {refusals}")),
        "{metrics}"
    );
    assert!(!metrics.contains("domicile_audit_write_errors_total 0\n"));

    let dir = proxy.dir.path().to_owned();
    proxy.running.shutdown().await;
    let report = verify(&dir.join("audit"), &public_key(&dir), None).unwrap();
    assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    let stated: u64 = report.outages.iter().map(|(_, o)| o.refused).sum();
    assert_eq!(stated, refusals, "{}", report.to_text());
    assert!(report.outages.iter().any(|(_, o)| o.kind == "disk"
        && o.error
            .as_deref()
            .is_some_and(|e| e.contains("No space left"))));
    // Nothing acknowledged was lost: every answered request has its record, exactly once,
    // and no refused one reached an origin.
    let logged: Vec<String> = records(&dir.join("audit"))
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    let unique: HashSet<&String> = logged.iter().collect();
    assert_eq!(unique.len(), logged.len(), "a record written twice");
    for (id, status, _) in &answered {
        assert_eq!(
            unique.contains(id),
            *status == 200,
            "{id} ({status}) and its record disagree"
        );
    }
    assert_eq!(
        us.seen_requests().len(),
        answered.iter().filter(|a| a.1 == 200).count()
    );
    assert!(seen_while_failing <= us.seen_requests().len());
}

// The report runs as a child process against this test's control plane: a second runtime
// thread keeps the control plane answering while this one waits for the child.
/// The proxy process with its file-size limit (RLIMIT_FSIZE) set to `bytes` (`None`: none).
fn limit_file_size(child: &Owned, bytes: Option<u64>) {
    use rustix::process::{prlimit, Pid, Resource, Rlimit};
    let pid = Pid::from_raw(child.pid() as i32).unwrap();
    prlimit(
        Some(pid),
        Resource::Fsize,
        Rlimit {
            current: bytes,
            maximum: None,
        },
    )
    .expect("set the proxy's file-size limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_size_limit_fails_real_writes_and_the_log_goes_on_in_a_new_segment() {
    let (_us, _eu, builder) = audited().await;
    let (config, dir) = builder.audit("commit_interval = \"2ms\"").write();
    let (mut child, addr) = spawn_proxy(&config);
    let url = format!("http://{addr}/w/acme/x");
    let mut answered: Vec<(String, u16, Option<String>)> = Vec::new();
    for _ in 0..50 {
        assert_eq!(ask(&url, &mut answered).await.status, 200);
    }
    // The kernel now refuses to let the segment grow much further (EFBIG): the writer must
    // refuse requests, then carry on in a new segment, which starts small again.
    let audit_dir = dir.path().join("audit");
    let segment = audit_dir.join(format::segment_name(1));
    let size = std::fs::metadata(&segment).unwrap().len();
    limit_file_size(&child, Some(size + 20_000));
    let mut refused = 0;
    let mut recovered = false;
    for _ in 0..3000 {
        let r = ask(&url, &mut answered).await;
        match r.refusal() {
            Some("audit_unavailable") => refused += 1,
            None if refused > 0 && r.status == 200 => {
                recovered = true;
                break;
            }
            _ => assert_eq!(r.status, 200, "{:?}", r.refusal()),
        }
    }
    assert!(refused > 0, "a file-size limit never refused a request");
    assert!(recovered, "the log never took records again");
    limit_file_size(&child, None);
    for _ in 0..20 {
        assert_eq!(ask(&url, &mut answered).await.status, 200);
    }
    assert!(
        child.terminate().success(),
        "the proxy survived SIGXFSZ and stopped cleanly"
    );

    let report = verify(&audit_dir, &public_key(dir.path()), None).unwrap();
    assert_eq!(report.verdict, Verdict::Intact, "{}", report.to_text());
    assert!(report.segments.len() >= 2, "{}", report.to_text());
    assert!(
        report.notes.iter().any(|n| n.detail.contains("left open")),
        "{}",
        report.to_text()
    );
    assert!(
        report.outages.iter().any(|(_, o)| o.kind == "disk"
            && o.error
                .as_deref()
                .is_some_and(|e| e.contains("File too large"))),
        "{}",
        report.to_text()
    );
    let stated: u64 = report.outages.iter().map(|(_, o)| o.refused).sum();
    assert_eq!(stated, refused);
    let logged: Vec<String> = records(&audit_dir)
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    let unique: HashSet<&String> = logged.iter().collect();
    assert_eq!(unique.len(), logged.len(), "a record written twice");
    for (id, status, _) in &answered {
        assert_eq!(unique.contains(id), *status == 200, "{id} ({status})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_checks_every_forward_against_the_map_history_and_flags_a_forged_one() {
    let us = origin("us").await;
    let eu = origin("eu").await;
    let cp = control_plane(None, LOOPBACK, |_| {}).await;
    seed(&cp.admin).await;
    let proxy_token = token(&cp.admin, "edge", "proxy").await;
    let auditor = token(&cp.admin, "auditor", "auditor").await;
    let proxy = following(&cp.url(), &proxy_token, &us, &eu)
        .audit("")
        .start()
        .await;
    let head = cp.running.store.head().await.unwrap().version;
    synced(&proxy, head).await;
    for (i, workspace) in ["acme", "globex", "acme", "globex", "acme"]
        .iter()
        .enumerate()
    {
        let r = get(
            &proxy.url("/"),
            &[
                ("x-workspace-id", workspace),
                ("x-request-id", &format!("q-{i}")),
            ],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        get(&proxy.url("/"), &[("x-workspace-id", "nobody")])
            .await
            .refusal(),
        Some("unknown_workspace")
    );
    let dir = proxy.dir.path().to_owned();
    proxy.running.shutdown().await;
    let audit_dir = dir.join("audit");
    let audit_dir = audit_dir.to_str().unwrap();
    let public = dir.join("audit.pub");
    let public = public.to_str().unwrap();
    let cp_url = cp.url();
    let report = |extra: &[&str]| {
        let mut args = vec![
            "audit",
            "report",
            audit_dir,
            "--key",
            public,
            "--control-plane",
            &cp_url,
            "--token",
            &auditor,
        ];
        args.extend_from_slice(extra);
        domicile(&args)
    };
    let (code, json, err) = report(&["--json"]);
    assert_eq!(code, 0, "{err}{json}");
    let value: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["cross_region_forwards"], 0);
    assert_eq!(value["checked"], 5);
    assert_eq!(value["records"], 6);
    assert_eq!(value["verification"]["verdict"], "intact");
    assert_eq!(value["by_workspace"]["acme"]["forwarded"], 3);
    assert_eq!(
        value["by_workspace"]["nobody"]["refused"]["unknown_workspace"],
        1
    );
    assert_eq!(value["by_region"]["eu"]["forwarded"], 2);
    let (code, text, _) = report(&[]);
    assert_eq!(code, 0);
    assert!(text.contains("Cross-region forwards: 0"), "{text}");
    assert!(
        text.contains("By workspace") && text.contains("By region"),
        "{text}"
    );

    // Forge one: an acme request (home us) recorded as sent to eu.
    let (_, path) = format::list_segments(Path::new(audit_dir)).unwrap()[0].clone();
    let text = std::fs::read_to_string(&path).unwrap();
    let forged = text.replacen(
        "\"request_id\":\"q-2\",\"workspace\":\"acme\",\"home_region\":\"us\",\"decision\":\"forwarded\",\"upstream_region\":\"us\"",
        "\"request_id\":\"q-2\",\"workspace\":\"acme\",\"home_region\":\"us\",\"decision\":\"forwarded\",\"upstream_region\":\"eu\"",
        1,
    );
    assert_ne!(forged, text, "the record to forge is there");
    std::fs::write(&path, forged).unwrap();
    let (code, json, _) = report(&["--json"]);
    assert_eq!(code, 1, "a cross-region forward fails the report");
    let value: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["cross_region_forwards"], 1, "{value}");
    let flagged = &value["cross_region"][0];
    assert_eq!(flagged["request_id"], "q-2");
    assert_eq!(flagged["upstream_region"], "eu");
    assert_eq!(flagged["home_at_version"], "us");
    assert!(flagged["reason"]
        .as_str()
        .unwrap()
        .contains("home at map version"));
    assert_eq!(value["verification"]["verdict"], "damaged");
    let html = dir.join("report.html");
    let (code, _, _) = report(&["--html", html.to_str().unwrap()]);
    assert_eq!(code, 1);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("1 cross-region forward<") && page.contains("q-2"),
        "{page}"
    );
    assert!(!page.contains("<script") && !page.contains("http-equiv"));
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_reads() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    let public = dir.path().join("k.pub");
    let (code, out, err) = domicile(&[
        "audit",
        "keygen",
        "--key",
        key.to_str().unwrap(),
        "--public",
        public.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("key id"), "{out}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (code, _, err) = domicile(&[
        "audit",
        "keygen",
        "--key",
        key.to_str().unwrap(),
        "--public",
        public.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    // A verify with a broken key, or of a directory with no log, is a clear error.
    std::fs::write(&public, "nope").unwrap();
    let (code, _, err) = domicile(&[
        "audit",
        "verify",
        dir.path().to_str().unwrap(),
        "--key",
        public.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("k.pub") && err.contains("public"), "{err}");
    keys::generate(&key, &public, true).unwrap();
    let (code, _, err) = domicile(&[
        "audit",
        "verify",
        dir.path().to_str().unwrap(),
        "--key",
        public.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no audit segments"), "{err}");
}

#[test]
fn check_config_reports_every_audit_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[proxy]\nedge_region = \"us\"\nlisten = \"127.0.0.1:0\"\n\
         [regions.us]\nendpoints = [\"127.0.0.1:1\"]\n\
         [audit]\ndir = \"audit\"\nsigning_key = \"missing.key\"\n\
         checkpoint_interval = \"1m\"\ncommit_interval = \"0s\"\nqueue_capacity = 0\n\
         client_ip = \"partial\"\n",
    )
    .unwrap();
    let (code, _, err) = domicile(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("audit.client_ip"), "{err}");
    std::fs::write(
        &config,
        "[proxy]\nedge_region = \"us\"\nlisten = \"127.0.0.1:0\"\n\
         [regions.us]\nendpoints = [\"127.0.0.1:1\"]\n\
         [audit]\ndir = \"audit\"\nsigning_key = \"missing.key\"\n\
         checkpoint_interval = \"1m\"\ncommit_interval = \"0s\"\nqueue_capacity = 0\n",
    )
    .unwrap();
    let (code, _, err) = domicile(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    for key in [
        "audit.signing_key",
        "audit.checkpoint_interval",
        "audit.commit_interval",
        "audit.queue_capacity",
    ] {
        assert!(err.contains(key), "{key} not reported:\n{err}");
    }
}
