//! `domicile demo`: demo origins for regions `us` and `eu` and a proxy in front of them, all on
//! loopback, with the configuration written into the data directory for a reader to see.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::origin::Origin;

/// Demo settings (the command's flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub admin: SocketAddr,
}

/// The demo's map: four workspaces in two regions.
pub const DEMO_MAP: &str = r#"{"type":"map","version":4}
{"type":"region","id":"us","name":"United States","jurisdiction":["US","CA"]}
{"type":"region","id":"eu","name":"European Union","jurisdiction":["AT","BE","BG","CY","CZ","DE","DK","EE","ES","FI","FR","GR","HR","HU","IE","IT","LT","LU","LV","MT","NL","PL","PT","RO","SE","SI","SK"]}
{"type":"workspace","id":"acme","region":"us","state":"active","epoch":1,"version":1}
{"type":"workspace","id":"initech","region":"us","state":"active","epoch":1,"version":2}
{"type":"workspace","id":"globex","region":"eu","state":"active","epoch":1,"version":3}
{"type":"workspace","id":"umbrella","region":"eu","state":"active","epoch":1,"version":4}
"#;

/// The proxy configuration the demo runs, pointing at origins on `us` and `eu`.
pub fn proxy_config(options: &DemoOptions, us: SocketAddr, eu: SocketAddr) -> String {
    format!(
        r#"# Written by `domicile demo`. A real configuration: `domicile check-config proxy.toml`.
[proxy]
id = "demo-edge"
edge_region = "us"
listen = "{http}"
admin_listen = "{admin}"
shutdown_grace = "5s"

[map]
# JSON lines; edit it and the proxy reloads it (docs/map-file.md).
file = "map.jsonl"

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
"#,
        http = options.http,
        admin = options.admin,
    )
}

/// What the demo prints once everything is up, with the addresses actually bound.
pub fn what_to_try(
    options: &DemoOptions,
    http: SocketAddr,
    admin: SocketAddr,
    config_path: &Path,
) -> String {
    let port = http.port();
    format!(
        r#"Domicile demo is running.
  proxy      http://{http}   (HTTP/1.1 and HTTP/2 cleartext)
  admin      http://{admin}  (/healthz, /readyz, /metrics)
  config     {config}
  map        {map}
  workspaces acme, initech -> us;  globex, umbrella -> eu

Try:
  curl -s http://acme.localhost:{port}/hello              # host rule: served by region us
  curl -s -H 'x-workspace-id: globex' http://{http}/docs  # header rule: served by region eu
  curl -s http://{http}/w/umbrella/files                  # path rule: served by region eu
  curl -s --http2-prior-knowledge http://initech.localhost:{port}/
  curl -si -H 'x-workspace-id: acme' http://globex.localhost:{port}/   # 400 conflicting_workspace
  curl -si http://nobody.localhost:{port}/                # 404 unknown_workspace
  curl -si http://{http}/                                 # 400 missing_workspace
  curl -si -H 'x-domicile-region: eu' http://acme.localhost:{port}/  # spoofed header is dropped
  curl -s http://{admin}/metrics | grep domicile_requests_total

Edit {map} (for example move acme to "eu" and bump the map version) and the proxy reloads it.
Stop with Ctrl-C."#,
        config = config_path.display(),
        map = options.data_dir.join("map.jsonl").display(),
    )
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

    let map_path = options.data_dir.join("map.jsonl");
    if !map_path.exists() {
        std::fs::write(&map_path, DEMO_MAP)
            .with_context(|| format!("cannot write {}", map_path.display()))?;
    }
    let config_path = options.data_dir.join("proxy.toml");
    std::fs::write(&config_path, proxy_config(&options, us.addr, eu.addr))
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = domicile_proxy::ProxyConfig::from_file(&config_path)?;
    let proxy = domicile_proxy::start(config).await?;

    let admin = proxy.admin_addr.unwrap_or(options.admin);
    println!("{}", what_to_try(&options, proxy.addr, admin, &config_path));
    shutdown.await;
    println!("shutting down: draining in-flight requests");
    proxy.shutdown().await;
    Ok(())
}
