//! `loadtest moves`: what a move costs the people using the workspace.
//!
//! A control plane, P proxies (default 3) and origins for two regions, all in this process on
//! loopback. M moves (default 40) run one after another, each with an instant data copy (the
//! data mover calls `complete` the moment the move is frozen). During each move:
//!
//! - a writer sends writes for the moving workspace back to back through the proxies in turn;
//!   the **write pause** is the time from its last write accepted before the freeze to its
//!   first write accepted after the unfreeze (what a client sees);
//! - readers send reads for the moving workspace and for others through every proxy; **read
//!   availability** is the share of them answered 200 by a home region.
//!
//! Also recorded per move: the phases as the control plane timed them (freeze to drained,
//! switch to drained). Results go to `loadtest/results/<date>-<host>-moves.{json,md}`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use bytes::Bytes;
use domicile::client::AdminClient;
use domicile_control_plane::ControlPlaneConfig;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::json;

use crate::control_plane::{
    host_name, origins, percentiles, proxy_token, start_proxy, wait_applied, write_report,
    Percentiles,
};

#[derive(Debug, Clone)]
pub struct Options {
    pub moves: usize,
    pub proxies: usize,
    pub readers: usize,
    pub results_dir: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub host: String,
    pub cpus: usize,
    pub proxies: usize,
    pub moves: usize,
    /// Client-side: last accepted write before the freeze to first accepted write after.
    pub write_pause_ms: Percentiles,
    /// Control-plane side: freeze written to unfreeze written.
    pub control_plane_pause_ms: Percentiles,
    /// Freeze written to every proxy drained it.
    pub freeze_drain_ms: Percentiles,
    /// `complete` to every proxy drained the switch (and the unfreeze was written).
    pub switch_drain_ms: Percentiles,
    pub reads: u64,
    pub reads_ok: u64,
    pub read_availability_percent: f64,
    pub writes_accepted: u64,
    pub writes_refused_moving: u64,
    pub writes_failed_otherwise: u64,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The refusal code an answer carries (`x-domicile-refusal`), if any.
pub(crate) fn refusal_code(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("x-domicile-refusal")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Sends one request for `workspace`; returns the status and the refusal code, if any.
async fn send(
    client: &HttpClient,
    addr: std::net::SocketAddr,
    method: Method,
    workspace: &str,
) -> (u16, Option<String>) {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}/items"))
        .header("x-workspace-id", workspace)
        .body(Full::new(Bytes::new()))
        .expect("request");
    match client.request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let refusal = refusal_code(response.headers());
            let _ = response.into_body().collect().await;
            (status, refusal)
        }
        Err(_) => (0, None),
    }
}

/// Moves `workspace` to `to` with an instant data copy (`complete` the moment it is frozen)
/// and returns the move as `GET /v1/moves/{id}` shows it once done, asking every `poll`.
pub(crate) async fn move_with_instant_copy(
    admin: &AdminClient,
    workspace: &str,
    to: &str,
    reason: &str,
    poll: Duration,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let m = admin
        .send_json(
            Method::POST,
            "/v1/moves",
            &json!({ "workspace": workspace, "to": to, "reason": reason }),
        )
        .await?;
    let id = m["id"].as_u64().context("move id")?;
    let started = Instant::now();
    let mut completed = false;
    loop {
        let m = admin.get_json(&format!("/v1/moves/{id}")).await?;
        if instant_copy(admin, &m, &mut completed).await? {
            return Ok(m);
        }
        if started.elapsed() > timeout {
            anyhow::bail!("move {id} did not finish in {timeout:?}: {m}");
        }
        tokio::time::sleep(poll).await;
    }
}

/// What a data mover whose copy is instant does on seeing move `m`: it completes the move the
/// moment it is frozen (once: `completed` remembers). Returns whether the move is done; an
/// aborted move is an error.
pub(crate) async fn instant_copy(
    admin: &AdminClient,
    m: &serde_json::Value,
    completed: &mut bool,
) -> Result<bool> {
    match m["phase"].as_str() {
        Some("frozen") if !*completed => {
            admin
                .send_json(
                    Method::POST,
                    &format!("/v1/moves/{}/complete", m["id"]),
                    &json!({}),
                )
                .await?;
            *completed = true;
        }
        Some("done") => return Ok(true),
        Some("aborted") => anyhow::bail!("move {} aborted: {m}", m["id"]),
        _ => {}
    }
    Ok(false)
}

/// A data mover's webhook endpoint (docs/moves.md): it learns of each phase of a move as the
/// control plane announces it, instead of asking. Its URL goes in the move's `webhook`.
pub(crate) struct Webhook {
    pub(crate) url: String,
    calls: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Webhook {
    pub(crate) async fn start() -> Result<Self> {
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/moves", listener.local_addr()?);
        let (tx, calls) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            if let Ok(call) = serde_json::from_slice::<serde_json::Value>(&body) {
                                let _ = tx.send(call["move"].clone());
                            }
                            Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { url, calls, server })
    }

    /// The next call about move `id` (calls about others are dropped), as the move's view.
    pub(crate) async fn next(&mut self, id: u64, deadline: Instant) -> Result<serde_json::Value> {
        loop {
            let m = tokio::time::timeout_at(deadline.into(), self.calls.recv())
                .await
                .with_context(|| format!("no webhook call about move {id} in time"))?
                .context("the webhook server stopped")?;
            if m["id"].as_u64() == Some(id) {
                return Ok(m);
            }
        }
    }
}

/// When a finished move entered `freezing`, `frozen`, `switching` and `done`.
pub(crate) fn phase_times(
    m: &serde_json::Value,
) -> Option<(SystemTime, SystemTime, SystemTime, SystemTime)> {
    let at = |phase: &str| {
        m["at"][phase]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
    };
    Some((
        at("freezing")?,
        at("frozen")?,
        at("switching")?,
        at("done")?,
    ))
}

/// Runs the moves and writes the report; returns the Markdown path.
pub async fn run(options: Options) -> Result<PathBuf> {
    let dir = tempfile::tempdir()?;
    let config = ControlPlaneConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        store: format!("sqlite://{}", dir.path().join("moves.db").display()),
        admin_token_file: Some(dir.path().join("admin.token")),
        ..ControlPlaneConfig::default()
    };
    let cp = domicile_control_plane::start(config).await?;
    let base = format!("http://{}", cp.addr);
    let admin = AdminClient::new(
        &base,
        Some(cp.bootstrap_token.clone().context("admin token")?),
    );
    for id in ["us", "eu"] {
        admin
            .send_json(Method::PUT, &format!("/v1/regions/{id}"), &json!({}))
            .await?;
    }
    const WORKSPACES: usize = 20;
    for i in 0..WORKSPACES {
        let region = if i % 2 == 0 { "us" } else { "eu" };
        admin
            .send_json(
                Method::PUT,
                &format!("/v1/workspaces/ws-{i}"),
                &json!({ "region": region }),
            )
            .await?;
    }
    let token = proxy_token(&admin).await?;
    let (us, eu) = origins().await?;
    let mut proxies = Vec::new();
    for i in 0..options.proxies {
        proxies.push(start_proxy(dir.path(), &base, &token, &us, &eu, &format!("edge-{i}")).await?);
    }
    let head = cp.store.head().await?.version;
    for proxy in &proxies {
        wait_applied(proxy, head).await?;
    }
    let addrs: Arc<Vec<std::net::SocketAddr>> = Arc::new(proxies.iter().map(|p| p.addr).collect());

    // Readers: all through the run, over every workspace (the moving one included).
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reads_ok = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for r in 0..options.readers {
        let (addrs, stop, reads, reads_ok) =
            (addrs.clone(), stop.clone(), reads.clone(), reads_ok.clone());
        readers.push(tokio::spawn(async move {
            let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
            let mut n = r;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let addr = addrs[n % addrs.len()];
                let (status, _) = send(
                    &client,
                    addr,
                    Method::GET,
                    &format!("ws-{}", n % WORKSPACES),
                )
                .await;
                reads.fetch_add(1, Ordering::Relaxed);
                if status == 200 {
                    reads_ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut write_pauses = Vec::new();
    let mut cp_pauses = Vec::new();
    let mut freeze_drains = Vec::new();
    let mut switch_drains = Vec::new();
    let (mut accepted, mut moving, mut failed) = (0u64, 0u64, 0u64);
    for i in 0..options.moves {
        let workspace = format!("ws-{}", (i * 7) % WORKSPACES);
        let current = admin
            .get_json(&format!("/v1/workspaces/{workspace}"))
            .await?;
        let to = if current["region"] == "us" {
            "eu"
        } else {
            "us"
        };

        // The writer: back to back through the proxies in turn, until told to stop.
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (client, addrs, done, workspace) = (
                client.clone(),
                addrs.clone(),
                done.clone(),
                workspace.clone(),
            );
            tokio::spawn(async move {
                let mut log: Vec<(Instant, bool, bool)> = Vec::new();
                let mut n = 0usize;
                while !done.load(Ordering::Relaxed) {
                    n += 1;
                    let (status, refusal) =
                        send(&client, addrs[n % addrs.len()], Method::POST, &workspace).await;
                    let refused_moving = refusal.as_deref() == Some("workspace_moving");
                    log.push((Instant::now(), status == 200, refused_moving));
                }
                log
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let finished = move_with_instant_copy(
            &admin,
            &workspace,
            to,
            "loadtest",
            Duration::from_millis(1),
            Duration::from_secs(60),
        )
        .await?;
        // A little traffic after the unfreeze, then the writer's log.
        tokio::time::sleep(Duration::from_millis(30)).await;
        done.store(true, Ordering::Relaxed);
        let log = writer.await?;
        let first_refusal = log.iter().position(|(_, _, refused)| *refused);
        if let Some(first) = first_refusal {
            let last_ok_before = log[..first].iter().rev().find(|(_, ok, _)| *ok);
            let first_ok_after = log[first..].iter().find(|(_, ok, _)| *ok);
            if let (Some(before), Some(after)) = (last_ok_before, first_ok_after) {
                write_pauses.push(after.0 - before.0);
            }
        }
        for (_, ok, refused) in &log {
            match (ok, refused) {
                (true, _) => accepted += 1,
                (false, true) => moving += 1,
                (false, false) => failed += 1,
            }
        }
        if let Some((freezing, frozen, switching, done)) = phase_times(&finished) {
            cp_pauses.push(done.duration_since(freezing).unwrap_or_default());
            freeze_drains.push(frozen.duration_since(freezing).unwrap_or_default());
            switch_drains.push(done.duration_since(switching).unwrap_or_default());
        }
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await?;
    }
    for proxy in proxies {
        proxy.shutdown().await;
    }
    cp.shutdown().await;

    let reads = reads.load(Ordering::Relaxed);
    let reads_ok = reads_ok.load(Ordering::Relaxed);
    anyhow::ensure!(
        !write_pauses.is_empty(),
        "no move paused a write: nothing measured"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let report = Report {
        date: crate::compare::utc_date(now),
        host: host_name(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        proxies: options.proxies,
        moves: options.moves,
        write_pause_ms: percentiles(write_pauses),
        control_plane_pause_ms: percentiles(cp_pauses),
        freeze_drain_ms: percentiles(freeze_drains),
        switch_drain_ms: percentiles(switch_drains),
        reads,
        reads_ok,
        read_availability_percent: if reads == 0 {
            0.0
        } else {
            reads_ok as f64 * 100.0 / reads as f64
        },
        writes_accepted: accepted,
        writes_refused_moving: moving,
        writes_failed_otherwise: failed,
    };
    let stem = format!("{}-{}-moves", report.date, report.host);
    write_report(&options.results_dir, &stem, &report, &markdown(&report))
}

fn markdown(r: &Report) -> String {
    let row = |name: &str, p: &Percentiles| {
        format!(
            "| {name} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |\n",
            p.p50, p.p90, p.p99, p.max
        )
    };
    let mut out = format!(
        "# Moves: {} on {} ({} CPUs)\n\n\
         Command: `cargo run --release -p loadtest -- moves`. {} moves one after another, \
         instant data copy, {} proxies, loopback.\n\n\
         | | p50 | p90 | p99 | max |\n| --- | --- | --- | --- | --- |\n",
        r.date, r.host, r.cpus, r.moves, r.proxies
    );
    out.push_str(&row("Write pause seen by a client", &r.write_pause_ms));
    out.push_str(&row(
        "Freeze to unfreeze (control plane)",
        &r.control_plane_pause_ms,
    ));
    out.push_str(&row("Freeze drained by every proxy", &r.freeze_drain_ms));
    out.push_str(&row("Switch drained by every proxy", &r.switch_drain_ms));
    out.push_str(&format!(
        "\nReads during the moves: {} of {} answered 200 ({:.3} % available).\n\
         Writes to the moving workspaces: {} accepted, {} refused `workspace_moving`, {} failed otherwise.\n",
        r.reads_ok, r.reads, r.read_availability_percent, r.writes_accepted, r.writes_refused_moving,
        r.writes_failed_otherwise
    ));
    out
}
