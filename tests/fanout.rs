//! The NATS fan-out tier, end to end against a real NATS server with JetStream (`NATS_URL`,
//! default `nats://127.0.0.1:4222`; skipped when unreachable, except under `CI=true`, where
//! it fails): two replicas on one PostgreSQL publish the feed, proxies follow it through
//! NATS and heartbeat through it, a move completes on those heartbeats, a proxy restarted
//! from its last-known-good map catches up from the stream, and whatever reaches the
//! subjects that is not the control plane's (another epoch, a gap, a heartbeat without a
//! token) is never applied or written.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cp::*;
use common::*;
use domicile_control_plane::config::NatsConfig;
use domicile_control_plane::testing;
use domicile_wire::fanout;
use serde_json::{json, Value};

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A client of the test server, or `None` (skip) when it is unreachable outside CI.
async fn nats() -> Option<async_nats::Client> {
    let url = nats_url();
    match async_nats::connect(url.as_str()).await {
        Ok(client) => Some(client),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("CI=true and NATS at {url} is unreachable: {e}")
        }
        Err(e) => {
            eprintln!("skipping: NATS at {url} is unreachable ({e}); set NATS_URL");
            None
        }
    }
}

/// A subject prefix (and stream) of this test alone; the stream is deleted with the guard.
struct Prefix {
    name: String,
    client: async_nats::Client,
}

impl Prefix {
    fn new(client: &async_nats::Client) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Self {
            name: format!("t{}-{nanos}", std::process::id()),
            client: client.clone(),
        }
    }

    fn config(&self) -> NatsConfig {
        NatsConfig {
            url: nats_url(),
            prefix: self.name.clone(),
            ca: None,
            keep: 1000,
        }
    }

    /// The proxy's `[control_plane.nats]` section.
    fn section(&self) -> String {
        format!(
            "[control_plane.nats]\nurl = \"{}\"\nprefix = \"{}\"\n",
            nats_url(),
            self.name
        )
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), fanout::stream_name(&self.name));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                async_nats::jetstream::new(client)
                    .delete_stream(&name)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

async fn head(cp: &Cp) -> u64 {
    cp.running.store.head().await.unwrap().version
}

async fn routed_to(proxy: &TestProxy, workspace: &str) -> Option<String> {
    let reply = get(&proxy.url("/"), &[("x-workspace-id", workspace)]).await;
    (reply.status == 200).then(|| reply.region())
}

/// A replica's value of one metric.
async fn metric(cp: &Cp, name: &str) -> u64 {
    let text = reqwest_text(&format!("{}/metrics", cp.url())).await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn reqwest_text(url: &str) -> String {
    String::from_utf8_lossy(&get(url, &[]).await.body).into_owned()
}

/// Waits until the proxy follows NATS (its subscriptions are open).
async fn streaming(proxy: &TestProxy) {
    let mut state = proxy.running.sync.as_ref().unwrap().state.clone();
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| s.streaming))
        .await
        .expect("the proxy never followed NATS")
        .unwrap();
}

async fn wait_move(cp: &Cp, id: u64, phase: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = cp.admin.get_json(&format!("/v1/moves/{id}")).await.unwrap();
        if m["phase"] == phase {
            return m;
        }
        assert!(Instant::now() < deadline, "move never reached {phase}: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_follow_the_map_and_a_move_through_nats_with_no_stream_from_a_replica() {
    let Some(client) = nats().await else { return };
    let Some(schema) = testing::postgres_schema().await else {
        return;
    };
    let prefix = Prefix::new(&client);
    let a = control_plane(Some(&schema.url), LOOPBACK, |c| {
        c.nats = Some(prefix.config())
    })
    .await;
    let b = control_plane(Some(&schema.url), LOOPBACK, |c| {
        c.nats = Some(prefix.config())
    })
    .await;
    seed(&a.admin).await;
    let proxy_token = token(&a.admin, "edge-1", "proxy").await;
    let (us, eu) = (origin("us").await, origin("eu").await);

    // The snapshot comes from A over HTTP; everything after it through NATS.
    let proxy = following(&a.url(), &proxy_token, &us, &eu)
        .section(&prefix.section())
        .start()
        .await;
    synced(&proxy, head(&a).await).await;
    assert_eq!(routed_to(&proxy, "acme").await.as_deref(), Some("us"));
    put(&b.admin, "/v1/workspaces/via-b", json!({"region": "eu"})).await;
    synced(&proxy, head(&b).await).await;
    assert_eq!(routed_to(&proxy, "via-b").await.as_deref(), Some("eu"));
    // Neither replica holds a change stream: the map reached the proxy through NATS.
    assert_eq!(metric(&a, "domicile_cp_feed_streams").await, 0);
    assert_eq!(metric(&b, "domicile_cp_feed_streams").await, 0);
    // Both replicas published every change; the stream kept each once.
    let (pa, pb) = (
        metric(&a, "domicile_cp_nats_published_total").await,
        metric(&b, "domicile_cp_nats_published_total").await,
    );
    let (da, db) = (
        metric(&a, "domicile_cp_nats_duplicates_total").await,
        metric(&b, "domicile_cp_nats_duplicates_total").await,
    );
    assert!(
        pa + pb >= 1 && da + db >= 1,
        "published {pa}+{pb}, duplicates {da}+{db}"
    );

    // Heartbeats arrive through NATS: the fleet sees the proxy SYNCED with a good checksum.
    let target = head(&a).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fleet = a.admin.get_json("/v1/fleet").await.unwrap();
        let member = &fleet["members"][0];
        if member["applied_version"] == json!(target) && member["status"] == "SYNCED" {
            assert_eq!(member["checksum_ok"], true, "{fleet}");
            break;
        }
        assert!(Instant::now() < deadline, "never SYNCED: {fleet}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        metric(&a, "domicile_cp_nats_heartbeats_total").await
            + metric(&b, "domicile_cp_nats_heartbeats_total").await
            > 0
    );

    // A move waits for the proxy's drained heartbeats, which come through NATS alone.
    let m = a
        .admin
        .send_json(
            http::Method::POST,
            "/v1/moves",
            &json!({"workspace": "acme", "to": "eu"}),
        )
        .await
        .unwrap();
    let id = m["id"].as_u64().unwrap();
    wait_move(&a, id, "frozen").await;
    let frozen = get(&proxy.url("/"), &[("x-workspace-id", "acme")]).await;
    assert_eq!(frozen.status, 200, "reads go on while frozen");
    a.admin
        .send_json(
            http::Method::POST,
            &format!("/v1/moves/{id}/complete"),
            &json!({}),
        )
        .await
        .unwrap();
    wait_move(&b, id, "done").await;
    synced(&proxy, head(&a).await).await;
    assert_eq!(routed_to(&proxy, "acme").await.as_deref(), Some("eu"));

    // A replica gone: the proxy follows the other one's publishing.
    a.running.shutdown().await;
    put(&b.admin, "/v1/workspaces/after-a", json!({"region": "us"})).await;
    synced(&proxy, head(&b).await).await;
    assert_eq!(routed_to(&proxy, "after-a").await.as_deref(), Some("us"));

    // Restarted from its last-known-good map while changes were made, the proxy catches up
    // from the stream: no snapshot.
    let proxy = {
        let TestProxy { running, dir } = proxy;
        running.shutdown().await;
        put_workspaces(&b.admin, "while-down", 5, "eu").await;
        let config =
            domicile_proxy::ProxyConfig::from_file(&dir.path().join("proxy.toml")).unwrap();
        TestProxy {
            running: domicile_proxy::start(config).await.unwrap(),
            dir,
        }
    };
    synced(&proxy, head(&b).await).await;
    assert_eq!(
        routed_to(&proxy, "while-down-4").await.as_deref(),
        Some("eu")
    );
    // Applied is published before the catch-up is persisted and the proxy says it follows.
    streaming(&proxy).await;
    let state = proxy.running.sync.as_ref().unwrap().state.borrow().clone();
    assert_eq!(state.snapshots, 0, "{state:?}");
    proxy.running.shutdown().await;
    b.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_reaches_the_subjects_from_elsewhere_is_never_applied_or_written() {
    let Some(client) = nats().await else { return };
    let prefix = Prefix::new(&client);
    let cp = control_plane(None, LOOPBACK, |c| c.nats = Some(prefix.config())).await;
    seed(&cp.admin).await;
    let proxy_token = token(&cp.admin, "edge-1", "proxy").await;
    let (us, eu) = (origin("us").await, origin("eu").await);
    let proxy = following(&cp.url(), &proxy_token, &us, &eu)
        .section(&prefix.section())
        .start()
        .await;
    let version = head(&cp).await;
    synced(&proxy, version).await;
    streaming(&proxy).await;
    let snapshots = || {
        proxy
            .running
            .sync
            .as_ref()
            .unwrap()
            .state
            .borrow()
            .snapshots
    };
    let before = snapshots();
    let forged = |region: &str| {
        Bytes::from(
            json!({"type": "workspace", "version": version + 1, "id": "acme", "op": "put",
                   "entry": {"region": region, "state": "active", "epoch": 9}})
            .to_string(),
        )
    };
    let live = |v: u64| format!("{}.map.live.{v}", prefix.name);

    // The next version, of another epoch: not applied; the proxy fetches a snapshot.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(fanout::EPOCH_HEADER, "another-store");
    client
        .publish_with_headers(live(version + 1), headers, forged("eu"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while snapshots() == before {
        assert!(
            Instant::now() < deadline,
            "no resync after a change of another epoch"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    synced(&proxy, version).await;
    streaming(&proxy).await;
    assert_eq!(routed_to(&proxy, "acme").await.as_deref(), Some("us"));

    // A version the stream never held (a gap): the proxy looks for what it lacks, finds
    // nothing and fetches a snapshot, never applying the change after the gap.
    let before = snapshots();
    let epoch = cp.running.store.epoch().to_owned();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(fanout::EPOCH_HEADER, epoch.as_str());
    client
        .publish_with_headers(
            live(version + 3),
            headers,
            Bytes::from(
                json!({"type": "workspace", "version": version + 3, "id": "acme", "op": "put",
                       "entry": {"region": "eu", "state": "active", "epoch": 9}})
                .to_string(),
            ),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while snapshots() == before {
        assert!(Instant::now() < deadline, "no resync after a gap");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(routed_to(&proxy, "acme").await.as_deref(), Some("us"));
    assert_eq!(
        proxy.running.sync.as_ref().unwrap().state.borrow().applied,
        Some(version)
    );

    // Heartbeats: no token, a wrong token and a bad body are refused, and nothing is written.
    let subject = fanout::heartbeat_subject(&prefix.name);
    let beat = json!({"proxy_id": "forged", "edge_region": "us", "applied_version": version,
                      "checksum": "00", "epoch": epoch});
    let ask = |auth: Option<&str>, body: Vec<u8>| {
        let (client, subject) = (client.clone(), subject.clone());
        let auth = auth.map(str::to_owned);
        async move {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(auth) = auth {
                headers.insert("Authorization", auth.as_str());
            }
            let reply = client
                .request_with_headers(subject, headers, Bytes::from(body))
                .await
                .unwrap();
            let status = reply
                .headers
                .as_ref()
                .unwrap()
                .get(fanout::STATUS_HEADER)
                .unwrap()
                .to_string();
            let body: Value = serde_json::from_slice(&reply.payload).unwrap();
            (status, body)
        }
    };
    let (status, body) = ask(None, beat.to_string().into_bytes()).await;
    assert_eq!(
        (status.as_str(), body["error"]["code"].as_str()),
        ("401", Some("unauthenticated"))
    );
    let (status, _) = ask(Some("Bearer not-a-token"), beat.to_string().into_bytes()).await;
    assert_eq!(status, "401");
    let reader = token(&cp.admin, "reader", "auditor").await;
    let (status, body) = ask(
        Some(&format!("Bearer {reader}")),
        beat.to_string().into_bytes(),
    )
    .await;
    assert_eq!(
        (status.as_str(), body["error"]["code"].as_str()),
        ("403", Some("forbidden")),
        "{body}"
    );
    let (status, body) = ask(
        Some(&format!("Bearer {proxy_token}")),
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(
        (status.as_str(), body["error"]["code"].as_str()),
        ("400", Some("invalid_body"))
    );
    let fleet = cp.admin.get_json("/v1/fleet").await.unwrap();
    assert!(
        fleet["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["proxy_id"] != "forged"),
        "{fleet}"
    );
    // A good one is written and answered with the head.
    let (status, body) = ask(
        Some(&format!("Bearer {proxy_token}")),
        beat.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, "200", "{body}");
    assert_eq!(body["head"], json!(head(&cp).await));
    proxy.running.shutdown().await;
    cp.running.shutdown().await;
}
