//! `domicile demo`: demo origins for regions `us` and `eu` and a proxy in front of them, all on
//! loopback, with the configuration written into the data directory for a reader to see, and
//! the proxy's routing audit log in `DIR/audit/` (public key `DIR/audit.pub`).
//!
//! Every link but the cleartext client port speaks TLS, with certificates from a development
//! CA the demo makes in `DIR/certs/` (`DIR/certs/ca.pem`): the edge serves HTTPS, each origin
//! proves its region (`us.region.example.test`) and requires the proxy's client certificate,
//! and the control plane's API is HTTPS, where the proxy authenticates with that certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use http::Method;
use serde_json::json;

use domicile_certs::dev::{DevLayout, DevOptions};

use crate::client::AdminClient;
use crate::origin::Origin;

/// Demo settings (the command's flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub https: SocketAddr,
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

/// The DNS domain of the demo's certificates.
pub const DEMO_DOMAIN: &str = "example.test";

/// The demo proxy's id (and the name in its client certificate).
pub const DEMO_PROXY: &str = "demo-edge";

/// The demo's development PKI in `DIR/certs/`: made on the first run and kept (so a CA the
/// user trusted stays valid), made again when a file is missing or a certificate has expired.
pub fn demo_certs(data_dir: &Path) -> anyhow::Result<DevLayout> {
    let layout = DevLayout::new(data_dir.join("certs"));
    let mut pairs = vec![
        layout.edge(),
        layout.control_plane(),
        layout.proxy(DEMO_PROXY),
    ];
    for (region, _, _) in DEMO_REGIONS {
        pairs.push(layout.origin(region));
    }
    let provider = domicile_certs::pem::provider();
    let now = std::time::SystemTime::now();
    let usable = layout.ca().exists()
        && pairs.iter().all(|(cert, key)| {
            domicile_certs::pem::load_pair(cert, key, &provider)
                .is_ok_and(|c| c.info.validity_problem(now).is_none())
        });
    if !usable {
        let options = DevOptions {
            domain: DEMO_DOMAIN.to_owned(),
            regions: DEMO_REGIONS
                .iter()
                .map(|(id, _, _)| id.to_string())
                .collect(),
            proxies: vec![DEMO_PROXY.to_owned()],
            edge_names: DEMO_WORKSPACES
                .iter()
                .map(|(id, _)| *id)
                .chain(["hooli"])
                .map(|w| format!("{w}.localhost"))
                .collect(),
            days: 365,
            force: true,
        };
        domicile_certs::dev::generate(&layout.dir, &options)
            .context("cannot make the demo's certificates")?;
    }
    Ok(layout)
}

/// The proxy configuration the demo runs, pointing at origins on `us` and `eu` and following
/// the control plane at `control_plane`, with the certificates of [`demo_certs`] (paths
/// relative to the data directory, where the configuration is written).
pub fn proxy_config(
    options: &DemoOptions,
    us: SocketAddr,
    eu: SocketAddr,
    control_plane: SocketAddr,
) -> String {
    let certs = DevLayout::new("certs");
    let (edge_cert, edge_key) = certs.edge();
    let (proxy_cert, proxy_key) = certs.proxy(DEMO_PROXY);
    let origin_tls = |region: &str| {
        format!(
            "tls = {{ ca = \"{ca}\", identity = \"{identity}\", cert = \"{cert}\", key = \"{key}\" }}",
            ca = certs.ca().display(),
            identity = domicile_certs::dev::region_identity(region, DEMO_DOMAIN),
            cert = proxy_cert.display(),
            key = proxy_key.display(),
        )
    };
    format!(
        r#"# Written by `domicile demo`. A real configuration: `domicile check-config proxy.toml`.
[proxy]
id = "{proxy}"
edge_region = "us"
listen = "{http}"
admin_listen = "{admin}"
shutdown_grace = "5s"

[tls]
# HTTPS for client traffic (HTTP/2 and HTTP/1.1 by ALPN), certificates chosen by SNI and
# reloaded when the files change (docs/tls.md).
listen = "{https}"
[[tls.certificates]]
cert = "{edge_cert}"
key = "{edge_key}"

[control_plane]
# The map comes from the control plane; the last-known-good copy keeps the proxy routing
# when the control plane is down (docs/control-plane.md). Over HTTPS, the proxy's client
# certificate (urn:domicile:proxy:{proxy}) authenticates it: no token.
url = "https://{control_plane}"
ca = "{ca}"
cert = "{proxy_cert}"
key = "{proxy_key}"
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

# Each region's origins speak TLS and must prove the region: an origin whose certificate is
# not for <region>.region.{domain} is refused (502 upstream_wrong_region), whatever its address.
[regions.us]
endpoints = ["{us}"]
health = {{ path = "/healthz", interval = "1s" }}
{us_tls}

[regions.eu]
endpoints = ["{eu}"]
health = {{ path = "/healthz", interval = "1s" }}
{eu_tls}

[audit]
# One record per routing decision, chained and signed (docs/audit.md). Auditors verify it
# with audit.pub alone: `domicile audit verify audit --key audit.pub`.
dir = "audit"
signing_key = "audit.key"
checkpoint_interval = "10s"
"#,
        http = options.http,
        https = options.https,
        admin = options.admin,
        proxy = DEMO_PROXY,
        domain = DEMO_DOMAIN,
        edge_cert = edge_cert.display(),
        edge_key = edge_key.display(),
        ca = certs.ca().display(),
        proxy_cert = proxy_cert.display(),
        proxy_key = proxy_key.display(),
        us_tls = origin_tls("us"),
        eu_tls = origin_tls("eu"),
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
    https: SocketAddr,
    admin: SocketAddr,
    control_plane: SocketAddr,
    config_path: &Path,
    secret: &str,
) -> String {
    let port = http.port();
    let tls_port = https.port();
    let ca = options.data_dir.join("certs").join("ca.pem");
    let token = options.data_dir.join("admin.token");
    let d = command_prefix();
    format!(
        r#"Domicile demo is running.
  proxy         http://{http}   (HTTP/1.1 and HTTP/2 cleartext)
  proxy (TLS)   https://{https}  (HTTP/2 and HTTP/1.1 by ALPN; CA {ca})
  admin         http://{admin}  (/healthz, /readyz, /metrics)
  control plane https://{control_plane}  (admin API over HTTPS; SQLite in {data})
  admin token   {secret}  (also in {token})
  config        {config}
  workspaces    acme, initech -> us;  globex, umbrella -> eu

Try:
  curl -s http://acme.localhost:{port}/hello              # host rule: served by region us
  curl -s -H 'x-workspace-id: globex' http://{http}/docs  # header rule: served by region eu
  curl -s http://{http}/w/umbrella/files                  # path rule: served by region eu
  curl -s --http2-prior-knowledge http://initech.localhost:{port}/
  curl -s --cacert {ca} https://acme.localhost:{tls_port}/hello   # HTTPS (h2); origins reached over mTLS
  curl -s --cacert {ca} --http1.1 https://globex.localhost:{tls_port}/  # "tls": the proxy's client certificate
  curl -si -H 'x-workspace-id: acme' http://globex.localhost:{port}/   # 400 conflicting_workspace
  curl -si http://nobody.localhost:{port}/                # 404 unknown_workspace
  curl -si http://{http}/                                 # 400 missing_workspace
  curl -si -H 'x-domicile-region: eu' http://acme.localhost:{port}/  # spoofed header is dropped
  curl -s http://{admin}/metrics | grep -E 'domicile_(requests_total|map_applied_version|tls_handshakes_total)'

The map lives in the control plane:
  export DOMICILE_CONTROL_PLANE=https://{control_plane} DOMICILE_CA_FILE={ca} DOMICILE_TOKEN_FILE={token}
  {d} workspace list
  {d} workspace set hooli --region eu                  # reaches the proxy within a second
  curl -s http://hooli.localhost:{port}/                 # served by region eu
  {d} workspace history acme
  {d} region delete eu                                   # refused: workspaces live there
  {d} fleet                                              # demo-edge: SYNCED
  curl -s --cacert {ca} -H "Authorization: Bearer $(cat {token})" https://{control_plane}/v1/map/snapshot

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
        ca = ca.display(),
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
    certs: &DevLayout,
) -> anyhow::Result<(domicile_control_plane::RunningControlPlane, String)> {
    let (cert, key) = certs.control_plane();
    let token_path = options.data_dir.join("admin.token");
    let config = domicile_control_plane::ControlPlaneConfig {
        listen: options.control_plane,
        store: format!(
            "sqlite://{}",
            options.data_dir.join("control-plane.db").display()
        ),
        admin_token_file: Some(token_path.clone()),
        feed_heartbeat: std::time::Duration::from_secs(2),
        tls: Some(domicile_control_plane::config::TlsConfig {
            cert,
            key,
            client_ca: Some(certs.ca()),
        }),
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
    let client = AdminClient::with_tls(
        &format!("https://{}", running.addr),
        Some(admin_token.clone()),
        &certs.ca(),
        None,
    )?;
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
    // The proxy authenticates with its client certificate; a proxy token an earlier version
    // of the demo made is no longer needed.
    let _ = client
        .send(Method::DELETE, "/v1/tokens/demo-edge", None)
        .await;
    let _ = std::fs::remove_file(options.data_dir.join("proxy.token"));
    Ok((running, admin_token))
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
    let certs = demo_certs(&options.data_dir)?;
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let ca = certs.ca();
    let (us_cert, us_key) = certs.origin("us");
    let us = Origin::start_tls("us", loopback, &us_cert, &us_key, Some(&ca))
        .await
        .context("cannot start the us origin")?;
    let (eu_cert, eu_key) = certs.origin("eu");
    let eu = Origin::start_tls("eu", loopback, &eu_cert, &eu_key, Some(&ca))
        .await
        .context("cannot start the eu origin")?;

    let (control_plane, admin_token) = start_control_plane(&options, &certs).await?;
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
    let config = domicile_proxy::check_config(&config_path)?;
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
            proxy.tls_addr.unwrap_or(options.https),
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
