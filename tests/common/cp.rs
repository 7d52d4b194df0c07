//! Control-plane helpers for end-to-end tests: a replica on a fresh SQLite file (or a given
//! store), seeding, tokens, and proxies that follow it.

use std::net::SocketAddr;
use std::time::Duration;

use domicile::client::AdminClient;
use domicile::origin::Origin;
use domicile_control_plane::{ControlPlaneConfig, RunningControlPlane};
use http::Method;
use serde_json::{json, Value};

use super::{proxy, ProxyBuilder, TestProxy};

/// A control-plane replica and an admin client for it.
pub struct Cp {
    pub running: RunningControlPlane,
    pub admin: AdminClient,
    pub dir: tempfile::TempDir,
}

impl Cp {
    pub fn url(&self) -> String {
        format!("http://{}", self.running.addr)
    }
}

/// Starts a replica on `store` (a fresh SQLite file when `None`) at `listen`.
pub async fn control_plane(
    store: Option<&str>,
    listen: SocketAddr,
    tweak: impl FnOnce(&mut ControlPlaneConfig),
) -> Cp {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    let mut config = ControlPlaneConfig {
        listen,
        store: store.map_or_else(
            || format!("sqlite://{}", dir.path().join("cp.db").display()),
            str::to_owned,
        ),
        admin_token_file: Some(token_file.clone()),
        feed_heartbeat: Duration::from_millis(200),
        poll_interval: Duration::from_millis(100),
        ..ControlPlaneConfig::default()
    };
    tweak(&mut config);
    let running = domicile_control_plane::start(config)
        .await
        .expect("control plane starts");
    let token = match &running.bootstrap_token {
        Some(token) => token.clone(),
        // A second replica on a store that already has an admin: make another admin token
        // directly in the store.
        None => running
            .store
            .create_token(
                &format!("admin-{}", running.addr.port()),
                domicile_control_plane::auth::Role::Admin,
            )
            .await
            .unwrap(),
    };
    let admin = AdminClient::new(&format!("http://{}", running.addr), Some(token));
    Cp {
        running,
        admin,
        dir,
    }
}

pub async fn put(admin: &AdminClient, path: &str, body: Value) -> Value {
    admin
        .send_json(Method::PUT, path, &body)
        .await
        .unwrap_or_else(|e| panic!("PUT {path}: {e}"))
}

/// Creates workspaces `<prefix>-0` to `<prefix>-<count - 1>` in `region`, one write each.
pub async fn put_workspaces(admin: &AdminClient, prefix: &str, count: usize, region: &str) {
    for i in 0..count {
        put(
            admin,
            &format!("/v1/workspaces/{prefix}-{i}"),
            json!({ "region": region }),
        )
        .await;
    }
}

pub async fn seed(admin: &AdminClient) {
    put(
        admin,
        "/v1/regions/us",
        json!({"name": "United States", "jurisdiction": ["US"]}),
    )
    .await;
    put(
        admin,
        "/v1/regions/eu",
        json!({"name": "European Union", "jurisdiction": ["DE", "FR"]}),
    )
    .await;
    put(admin, "/v1/workspaces/acme", json!({"region": "us"})).await;
    put(admin, "/v1/workspaces/globex", json!({"region": "eu"})).await;
}

pub async fn token(admin: &AdminClient, name: &str, role: &str) -> String {
    admin
        .send_json(
            Method::POST,
            "/v1/tokens",
            &json!({"name": name, "role": role}),
        )
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A proxy configuration following the control plane at `url`.
pub fn following(url: &str, token: &str, us: &Origin, eu: &Origin) -> ProxyBuilder {
    following_beating_every("200ms", url, token, us, eu)
}

/// The same, with periodic heartbeats every `interval` (a humantime duration).
pub fn following_beating_every(
    interval: &str,
    url: &str,
    token: &str,
    us: &Origin,
    eu: &Origin,
) -> ProxyBuilder {
    proxy()
        .map(None)
        .route("us", &[us])
        .route("eu", &[eu])
        .section(&format!(
            "[control_plane]\nurl = \"{url}\"\ntoken = \"{token}\"\nlast_known_good = \"lkg.map\"\n\
             heartbeat_interval = \"{interval}\"\nstall_timeout = \"2s\"\nrequest_timeout = \"1s\"\n\
             backoff_initial = \"20ms\"\nbackoff_max = \"200ms\"\n"
        ))
}

/// Restarts a proxy from the same directory (configuration and last-known-good map).
pub async fn restart(proxy: TestProxy) -> TestProxy {
    let TestProxy { running, dir } = proxy;
    running.shutdown().await;
    let config = domicile_proxy::ProxyConfig::from_file(&dir.path().join("proxy.toml")).unwrap();
    TestProxy {
        running: domicile_proxy::start(config).await.expect("proxy restarts"),
        dir,
    }
}

pub async fn synced(proxy: &TestProxy, version: u64) {
    let sync = proxy
        .running
        .sync
        .as_ref()
        .expect("the proxy follows a control plane");
    tokio::time::timeout(Duration::from_secs(15), sync.wait_for_version(version))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the proxy never reached version {version}: {:?}",
                *sync.state.borrow()
            )
        });
}
