//! `loadtest control-plane`: the control plane at scale, on SQLite and on PostgreSQL.
//!
//! - **import**: N workspaces as one NDJSON `POST /v1/workspaces:import` (all or nothing);
//! - **snapshot**: a proxy starting with no map fetches the N-entry snapshot and applies it
//!   (time until it routes with the head version, and until that map is persisted);
//! - **propagation**: C workspace writes, one after another, each timed from the API call to
//!   the moment the proxy's replica routes with the new version, with one proxy and then with
//!   P proxies (the time until the last of them has it).
//!
//! Everything runs in this process on loopback; results go to
//! `loadtest/results/<date>-<host>-control-plane.{json,md}`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use domicile::client::AdminClient;
use domicile::origin::Origin;
use domicile_control_plane::ControlPlaneConfig;
use domicile_proxy::RunningProxy;
use http::Method;
use serde::Serialize;
use serde_json::json;

use crate::synthetic::{home_is_eu, workspace_id};

#[derive(Debug, Clone)]
pub struct Options {
    pub entries: u64,
    pub changes: usize,
    pub proxies: usize,
    pub stores: Vec<String>,
    pub results_dir: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct StoreResult {
    pub store: String,
    pub entries: u64,
    pub import_seconds: f64,
    pub import_per_second: f64,
    pub snapshot_bytes: u64,
    pub snapshot_applied_seconds: f64,
    pub snapshot_persisted_seconds: f64,
    pub changes: usize,
    pub propagation_one_proxy_ms: Percentiles,
    pub proxies: usize,
    pub propagation_all_proxies_ms: Percentiles,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

pub(crate) fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: at(1.0),
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub host: String,
    pub cpus: usize,
    pub results: Vec<StoreResult>,
    pub skipped: Vec<String>,
}

pub(crate) async fn start_proxy(
    dir: &Path,
    cp: &str,
    token: &str,
    us: &Origin,
    eu: &Origin,
    name: &str,
) -> Result<RunningProxy> {
    let config = format!(
        "[proxy]\nid = \"{name}\"\nedge_region = \"us\"\nlisten = \"127.0.0.1:0\"\nworkers = 1\n\
         [control_plane]\nurl = \"{cp}\"\ntoken = \"{token}\"\nlast_known_good = \"{name}.map\"\n\
         [identify]\nrules = [{{ from = \"header\", name = \"x-workspace-id\" }}]\n\
         [regions.us]\nendpoints = [\"{}\"]\n[regions.eu]\nendpoints = [\"{}\"]\n",
        us.addr, eu.addr
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let config = domicile_proxy::ProxyConfig::from_file(&path)
        .map_err(|e| anyhow::anyhow!("proxy config: {e}"))?;
    Ok(domicile_proxy::start(config).await?)
}

pub(crate) async fn wait_applied(proxy: &RunningProxy, version: u64) -> Result<()> {
    let sync = proxy
        .sync
        .as_ref()
        .context("the proxy follows no control plane")?;
    tokio::time::timeout(Duration::from_secs(600), sync.wait_for_version(version))
        .await
        .context("the proxy did not reach the version")?;
    Ok(())
}

async fn wait_persisted(proxy: &RunningProxy, version: u64) -> Result<()> {
    let sync = proxy
        .sync
        .as_ref()
        .context("the proxy follows no control plane")?;
    let mut state = sync.state.clone();
    tokio::time::timeout(
        Duration::from_secs(600),
        state.wait_for(|s| s.persisted.is_some_and(|v| v >= version)),
    )
    .await
    .context("the proxy did not persist the version")??;
    Ok(())
}

async fn run_store(store: &str, url: &str, options: &Options) -> Result<StoreResult> {
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("admin.token");
    let config = ControlPlaneConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        store: url.to_owned(),
        admin_token_file: Some(token_file),
        feed_heartbeat: Duration::from_secs(1),
        ..ControlPlaneConfig::default()
    };
    let cp = domicile_control_plane::start(config).await?;
    let token = cp
        .bootstrap_token
        .clone()
        .context("a fresh store makes an admin token")?;
    let base = format!("http://{}", cp.addr);
    let admin = AdminClient::new(&base, Some(token));
    two_regions(&admin).await?;

    // Import.
    eprintln!("[{store}] importing {} workspaces", options.entries);
    let started = Instant::now();
    import(&admin, options.entries, home_is_eu).await?;
    let import_seconds = started.elapsed().as_secs_f64();
    eprintln!("[{store}] import: {import_seconds:.1} s");

    // Snapshot: a proxy with no map starts and fetches it.
    let proxy_token = proxy_token(&admin).await?;
    let (us, eu) = origins().await?;
    let head = cp.store.head().await?.version;
    let snapshot_bytes = {
        let bytes = admin.send(Method::GET, "/v1/map/snapshot", None).await?;
        bytes.len() as u64
    };
    let started = Instant::now();
    let first = start_proxy(dir.path(), &base, &proxy_token, &us, &eu, "edge-0").await?;
    wait_applied(&first, head).await?;
    let snapshot_applied_seconds = started.elapsed().as_secs_f64();
    wait_persisted(&first, head).await?;
    let snapshot_persisted_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "[{store}] snapshot: applied in {snapshot_applied_seconds:.2} s, persisted in {snapshot_persisted_seconds:.2} s"
    );

    // Propagation, one proxy.
    let mut proxies = vec![first];
    let one = propagate(&admin, &proxies, options.changes, "one").await?;
    eprintln!(
        "[{store}] propagation, 1 proxy: p50 {:.1} ms, p99 {:.1} ms",
        one.p50, one.p99
    );
    for i in 1..options.proxies {
        let proxy = start_proxy(
            dir.path(),
            &base,
            &proxy_token,
            &us,
            &eu,
            &format!("edge-{i}"),
        )
        .await?;
        proxies.push(proxy);
    }
    let head = cp.store.head().await?.version;
    for proxy in &proxies {
        wait_applied(proxy, head).await?;
    }
    let all = propagate(&admin, &proxies, options.changes, "all").await?;
    eprintln!(
        "[{store}] propagation, {} proxies: p50 {:.1} ms, p99 {:.1} ms",
        proxies.len(),
        all.p50,
        all.p99
    );
    for proxy in proxies {
        proxy.shutdown().await;
    }
    cp.shutdown().await;
    Ok(StoreResult {
        store: store.to_owned(),
        entries: options.entries,
        import_seconds,
        import_per_second: options.entries as f64 / import_seconds,
        snapshot_bytes,
        snapshot_applied_seconds,
        snapshot_persisted_seconds,
        changes: options.changes,
        propagation_one_proxy_ms: one,
        proxies: options.proxies,
        propagation_all_proxies_ms: all,
    })
}

/// Writes `changes` workspaces one after another; each is timed until every proxy routes
/// with the version that wrote it.
async fn propagate(
    admin: &AdminClient,
    proxies: &[RunningProxy],
    changes: usize,
    tag: &str,
) -> Result<Percentiles> {
    let mut samples = Vec::with_capacity(changes);
    for i in 0..changes {
        let region = if i % 2 == 0 { "eu" } else { "us" };
        let started = Instant::now();
        let written = admin
            .send_json(
                Method::PUT,
                &format!("/v1/workspaces/prop-{tag}-{i}"),
                &json!({ "region": region }),
            )
            .await?;
        let version = written["version"].as_u64().context("version")?;
        for proxy in proxies {
            wait_applied(proxy, version).await?;
        }
        samples.push(started.elapsed());
    }
    Ok(percentiles(samples))
}

fn markdown(report: &Report) -> String {
    let mut out = format!(
        "# Control plane at scale: {} on {} ({} CPUs)\n\n\
         Command: `cargo run --release -p loadtest -- control-plane`.\n\n\
         | Store | Import of {} | Snapshot applied | Snapshot persisted | Propagation, 1 proxy (p50 / p99) | Propagation, {} proxies (p50 / p99) |\n\
         | --- | --- | --- | --- | --- | --- |\n",
        report.date,
        report.host,
        report.cpus,
        report.results.first().map_or(0, |r| r.entries),
        report.results.first().map_or(0, |r| r.proxies),
    );
    for r in &report.results {
        out.push_str(&format!(
            "| {} | {:.1} s ({:.0}/s) | {:.2} s ({} MB) | {:.2} s | {:.1} ms / {:.1} ms | {:.1} ms / {:.1} ms |\n",
            r.store,
            r.import_seconds,
            r.import_per_second,
            r.snapshot_applied_seconds,
            r.snapshot_bytes >> 20,
            r.snapshot_persisted_seconds,
            r.propagation_one_proxy_ms.p50,
            r.propagation_one_proxy_ms.p99,
            r.propagation_all_proxies_ms.p50,
            r.propagation_all_proxies_ms.p99,
        ));
    }
    for s in &report.skipped {
        out.push_str(&format!("\nSkipped: {s}\n"));
    }
    out
}

/// Runs the measurements and writes the report; returns the Markdown path.
pub async fn run(options: Options) -> Result<PathBuf> {
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for store in &options.stores {
        match store.as_str() {
            "sqlite" => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                results.push(run_store("sqlite", &url, &options).await?);
            }
            "postgres" => match domicile_control_plane::testing::postgres_schema().await {
                Some(schema) => results.push(run_store("postgres", &schema.url, &options).await?),
                None => skipped.push(format!(
                    "postgres: {} is unreachable (set DATABASE_URL)",
                    domicile_control_plane::testing::database_url()
                )),
            },
            other => anyhow::bail!("unknown store {other:?} (expected sqlite or postgres)"),
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let report = Report {
        date: crate::compare::utc_date(now),
        host: host_name(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        results,
        skipped,
    };
    let stem = format!("{}-{}-control-plane", report.date, report.host);
    write_report(&options.results_dir, &stem, &report, &markdown(&report))
}

/// Writes `<dir>/<stem>.json` and `<dir>/<stem>.md`, prints the Markdown and returns its path.
pub(crate) fn write_report<T: Serialize>(
    dir: &Path,
    stem: &str,
    report: &T,
    md: &str,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(report)? + "\n",
    )?;
    let md_path = dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, md)?;
    print!("{md}");
    Ok(md_path)
}

/// Regions `us` (US) and `eu` (DE).
pub(crate) async fn two_regions(admin: &AdminClient) -> Result<()> {
    for (id, codes) in [("us", ["US"]), ("eu", ["DE"])] {
        admin
            .send_json(
                Method::PUT,
                &format!("/v1/regions/{id}"),
                &json!({ "jurisdiction": codes }),
            )
            .await?;
    }
    Ok(())
}

/// Workspaces `workspace_id(0..n)` as one NDJSON import, in `eu` where `is_eu` says so and
/// in `us` otherwise.
pub(crate) async fn import(admin: &AdminClient, n: u64, is_eu: impl Fn(u64) -> bool) -> Result<()> {
    let mut ndjson = String::with_capacity(n as usize * 48);
    for i in 0..n {
        let region = if is_eu(i) { "eu" } else { "us" };
        ndjson.push_str(&format!(
            "{{\"id\":\"{}\",\"region\":\"{region}\"}}\n",
            workspace_id(i)
        ));
    }
    admin
        .send(
            Method::POST,
            "/v1/workspaces:import",
            Some((Bytes::from(ndjson), "application/x-ndjson")),
        )
        .await?;
    Ok(())
}

/// A token of role `proxy` for the bench's proxies.
pub(crate) async fn proxy_token(admin: &AdminClient) -> Result<String> {
    Ok(admin
        .send_json(
            Method::POST,
            "/v1/tokens",
            &json!({ "name": "bench-proxy", "role": "proxy" }),
        )
        .await?["token"]
        .as_str()
        .context("token")?
        .to_owned())
}

/// Origins for regions `us` and `eu` on loopback.
pub(crate) async fn origins() -> Result<(Origin, Origin)> {
    Ok((
        Origin::start("us", ([127, 0, 0, 1], 0).into()).await?,
        Origin::start("eu", ([127, 0, 0, 1], 0).into()).await?,
    ))
}

/// This machine's name, safe for a file name.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
