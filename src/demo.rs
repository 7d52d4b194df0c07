//! `domicile demo`: demo origins for regions `us` and `eu` and a proxy in front of them, all on
//! loopback, with the configuration written into the data directory for a reader to see, and
//! the proxy's routing audit log in `DIR/audit/` (public key `DIR/audit.pub`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use http::Method;
use serde_json::json;

use crate::client::AdminClient;
use crate::origin::Origin;

/// Demo settings (the command's flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub control_plane: SocketAddr,
}

/// The demo's regions: id, name, jurisdiction.
pub const DEMO_REGIONS: &[(&str, &str, &[&str])] = &[
    ("us", "United States", &["US", "CA"]),
    (
        "eu",
        "European Union",
        &[
            "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU",
            "IE", "IT", "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
        ],
    ),
];

/// The demo's workspaces and their home regions.
pub const DEMO_WORKSPACES: &[(&str, &str)] = &[
    ("acme", "us"),
    ("initech", "us"),
    ("globex", "eu"),
    ("umbrella", "eu"),
];

/// The proxy configuration the demo runs, pointing at origins on `us` and `eu` and following
/// the control plane at `control_plane`.
pub fn proxy_config(
    options: &DemoOptions,
    us: SocketAddr,
    eu: SocketAddr,
    control_plane: SocketAddr,
) -> String {
    format!(
        r#"# Written by `domicile demo`. A real configuration: `domicile check-config proxy.toml`.
[proxy]
id = "demo-edge"
edge_region = "us"
listen = "{http}"
admin_listen = "{admin}"
shutdown_grace = "5s"

[control_plane]
# The map comes from the control plane; the last-known-good copy keeps the proxy routing
# when the control plane is down (docs/control-plane.md).
url = "http://{control_plane}"
token_file = "proxy.token"
last_known_good = "last-known-good.map"
heartbeat_interval = "2s"

[identify]
# Every rule that finds an id must agree.
rules = [
  {{ from = "host", pattern = "{{workspace}}.localhost" }},
  {{ from = "header", name = "x-workspace-id" }},
  {{ from = "path", pattern = "/w/{{workspace}}/" }},
]
unidentified = "refuse"

[limits]
header_read_timeout = "10s"
idle_timeout = "60s"
max_body_bytes = "1GiB"

[regions.us]
endpoints = ["{us}"]
health = {{ path = "/healthz", interval = "1s" }}

[regions.eu]
endpoints = ["{eu}"]
health = {{ path = "/healthz", interval = "1s" }}

[audit]
# One record per routing decision, chained and signed (docs/audit.md). Auditors verify it
# with audit.pub alone: `domicile audit verify audit --key audit.pub`.
dir = "audit"
signing_key = "audit.key"
checkpoint_interval = "10s"
"#,
        http = options.http,
        admin = options.admin,
    )
}

/// How to run this binary, for the printed commands: through cargo (with the profile it was
/// built with, so nothing is built twice) when it runs from a cargo target directory.
fn command_prefix() -> &'static str {
    let exe = std::env::current_exe().unwrap_or_default();
    let dirs: Vec<_> = exe.components().map(|c| c.as_os_str().to_owned()).collect();
    let in_target = dirs.iter().any(|c| c == "target");
    let release = dirs.iter().any(|c| c == "release");
    match (in_target, release) {
        (true, true) => "cargo run -q --release --",
        (true, false) => "cargo run -q --",
        (false, _) => "domicile",
    }
}

/// What the demo prints once everything is up, with the addresses actually bound.
pub fn what_to_try(
    options: &DemoOptions,
    http: SocketAddr,
    admin: SocketAddr,
    control_plane: SocketAddr,
    config_path: &Path,
    secret: &str,
) -> String {
    let port = http.port();
    let token = options.data_dir.join("admin.token");
    let d = command_prefix();
    format!(
        r#"Domicile demo is running.
  proxy         http://{http}   (HTTP/1.1 and HTTP/2 cleartext)
  admin         http://{admin}  (/healthz, /readyz, /metrics)
  control plane http://{control_plane}  (admin API; SQLite in {data})
  admin token   {secret}  (also in {token})
  config        {config}
  workspaces    acme, initech -> us;  globex, umbrella -> eu

Try:
  curl -s http://acme.localhost:{port}/hello              # host rule: served by region us
  curl -s -H 'x-workspace-id: globex' http://{http}/docs  # header rule: served by region eu
  curl -s http://{http}/w/umbrella/files                  # path rule: served by region eu
  curl -s --http2-prior-knowledge http://initech.localhost:{port}/
  curl -si -H 'x-workspace-id: acme' http://globex.localhost:{port}/   # 400 conflicting_workspace
  curl -si http://nobody.localhost:{port}/                # 404 unknown_workspace
  curl -si http://{http}/                                 # 400 missing_workspace
  curl -si -H 'x-domicile-region: eu' http://acme.localhost:{port}/  # spoofed header is dropped
  curl -s http://{admin}/metrics | grep -E 'domicile_(requests_total|map_applied_version)'

The map lives in the control plane:
  export DOMICILE_CONTROL_PLANE=http://{control_plane} DOMICILE_TOKEN_FILE={token}
  {d} workspace list
  {d} workspace set hooli --region eu                  # reaches the proxy within a second
  curl -s http://hooli.localhost:{port}/                 # served by region eu
  {d} workspace history acme
  {d} region delete eu                                   # refused: workspaces live there
  {d} fleet                                              # demo-edge: SYNCED
  curl -s -H "Authorization: Bearer $(cat {token})" http://{control_plane}/v1/map/snapshot

Move acme to eu with zero misrouted requests (writes pause only until the copy is done):
  {d} move start acme --to eu --reason 'customer asked for EU hosting' --wait  # -> frozen
  curl -si -X POST http://acme.localhost:{port}/orders    # 503 workspace_moving + Retry-After
  curl -s http://acme.localhost:{port}/                   # reads still served by us
  {d} move complete ID --wait      # ID as printed above: the data copy is done -> done
  curl -s http://acme.localhost:{port}/                   # served by region eu
  {d} move list
  {d} audit admin --workspace acme                      # every phase, actor and reason

Every routing decision above is in the audit log ({audit}), signed with {key}:
  {d} audit verify {audit} --key {public} --checkpoint http://{admin}/audit/checkpoint
  {d} audit report {audit} --key {public}              # per workspace and region; cross-region forwards: 0
  {d} audit report {audit} --key {public} --html audit-report.html
  curl -s http://{admin}/audit/public-key

Stop with Ctrl-C."#,
        config = config_path.display(),
        data = options.data_dir.display(),
        token = token.display(),
        audit = options.data_dir.join("audit").display(),
        key = options.data_dir.join("audit.key").display(),
        public = options.data_dir.join("audit.pub").display(),
    )
}

/// Starts the control plane on SQLite in the data directory and seeds it through the API.
async fn start_control_plane(
    options: &DemoOptions,
) -> anyhow::Result<(domicile_control_plane::RunningControlPlane, String, String)> {
    let token_path = options.data_dir.join("admin.token");
    let config = domicile_control_plane::ControlPlaneConfig {
        listen: options.control_plane,
        store: format!(
            "sqlite://{}",
            options.data_dir.join("control-plane.db").display()
        ),
        admin_token_file: Some(token_path.clone()),
        feed_heartbeat: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let running = domicile_control_plane::start(config)
        .await
        .context("cannot start the control plane")?;
    let admin_token = std::fs::read_to_string(&token_path)
        .with_context(|| {
            format!(
                "cannot read {} (delete {} to start the demo afresh)",
                token_path.display(),
                options.data_dir.display()
            )
        })?
        .trim()
        .to_owned();
    let client = AdminClient::new(
        &format!("http://{}", running.addr),
        Some(admin_token.clone()),
    );
    for (id, name, jurisdiction) in DEMO_REGIONS {
        client
            .send_json(
                Method::PUT,
                &format!("/v1/regions/{id}"),
                &json!({ "name": name, "jurisdiction": jurisdiction }),
            )
            .await
            .with_context(|| format!("cannot seed region {id}"))?;
    }
    for (id, region) in DEMO_WORKSPACES {
        match client
            .send_json(
                Method::PUT,
                &format!("/v1/workspaces/{id}"),
                &json!({ "region": region, "reason": "demo seed" }),
            )
            .await
        {
            Ok(_) => {}
            // A workspace the user moved in an earlier run stays where it is.
            Err(e)
                if e.downcast_ref::<crate::client::ApiError>()
                    .is_some_and(|e| e.status == http::StatusCode::CONFLICT) => {}
            Err(e) => return Err(e.context(format!("cannot seed workspace {id}"))),
        }
    }
    // A fresh proxy token for this run.
    let _ = client
        .send(Method::DELETE, "/v1/tokens/demo-edge", None)
        .await;
    let created = client
        .send_json(
            Method::POST,
            "/v1/tokens",
            &json!({ "name": "demo-edge", "role": "proxy" }),
        )
        .await
        .context("cannot create the proxy's token")?;
    let proxy_token = created["token"]
        .as_str()
        .context("the control plane returned no token")?
        .to_owned();
    Ok((running, proxy_token, admin_token))
}

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run(
    options: DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            options.data_dir.display()
        )
    })?;
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let us = Origin::start("us", loopback)
        .await
        .context("cannot start the us origin")?;
    let eu = Origin::start("eu", loopback)
        .await
        .context("cannot start the eu origin")?;

    let (control_plane, proxy_token, admin_token) = start_control_plane(&options).await?;
    domicile_control_plane::server::write_secret(
        &options.data_dir.join("proxy.token"),
        &proxy_token,
    )
    .context("cannot write the proxy's token")?;
    let head = control_plane.store.head().await?.version;

    // The key pair that signs the audit log's checkpoints, made once and kept.
    let audit_key = options.data_dir.join("audit.key");
    if !audit_key.exists() {
        domicile_proxy::audit::keys::generate(
            &audit_key,
            &options.data_dir.join("audit.pub"),
            true,
        )
        .context("cannot make the audit signing key")?;
    }

    let config_path = options.data_dir.join("proxy.toml");
    std::fs::write(
        &config_path,
        proxy_config(&options, us.addr, eu.addr, control_plane.addr),
    )
    .with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = domicile_proxy::ProxyConfig::from_file(&config_path)?;
    let proxy = domicile_proxy::start(config).await?;
    if let Some(sync) = &proxy.sync {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            sync.wait_for_version(head),
        )
        .await
        .context("the proxy did not load the map from the control plane within 10 s")?;
    }

    let admin = proxy.admin_addr.unwrap_or(options.admin);
    println!(
        "{}",
        what_to_try(
            &options,
            proxy.addr,
            admin,
            control_plane.addr,
            &config_path,
            &admin_token,
        )
    );
    shutdown.await;
    println!("shutting down: draining in-flight requests");
    proxy.shutdown().await;
    control_plane.shutdown().await;
    Ok(())
}
