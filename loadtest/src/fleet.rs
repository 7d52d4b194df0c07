//! `loadtest fleet`: the control plane with a fleet of N proxies (default 10,000).
//!
//! Two control-plane replicas run as `domicile control-plane` processes on one PostgreSQL
//! store (a fresh schema of `DATABASE_URL`). The proxies are the proxy's own control-plane
//! client ([`domicile_proxy::sync`]: snapshot, change stream, heartbeats with applied and
//! drained versions, last-known-good map and its resume), each with its own map replica, run
//! in agent processes of `--per-agent` proxies each (`loadtest fleet-agent`, so that no process
//! holds more sockets than its open-file limit allows), spread over both replicas. What the
//! proxies leave out is the data plane: no listener, no requests in flight, so each drains a
//! version the moment it applies it.
//!
//! Measured, in this order:
//! - **connect**: all N start with no map; the time until the last routes with the head;
//! - **memory per proxy**: the replicas' resident memory with N proxies connected, less what
//!   it was before the first connected, over N;
//! - **idle**: store operations per second and replica CPU while nothing changes (the
//!   periodic heartbeats);
//! - **propagation**: C writes one after another, alternately through each replica, each timed
//!   from the API call until the last of the N proxies routes with its version; store
//!   operations per change (less the idle rate over the same time);
//! - **moves**: M moves, each completed the moment it is frozen, timed from the request until
//!   the control plane reports it done (freeze drained by all N, switch drained by all N),
//!   driven by the move's webhook as a data mover would be; and when the last proxy routed
//!   with the freeze and with the switch;
//! - **reconnect storm**: every proxy stops at once and starts again from its last-known-good
//!   map; the time until all N follow the change stream again, and the replicas' peak CPU and
//!   memory meanwhile.
//!
//! The last-known-good maps go to `/dev/shm` when it exists: N proxies on one disk would
//! measure that disk's `fsync` queue, not the control plane (each real proxy has its own).
//! Results go to `loadtest/results/<date>-<host>-fleet[-label].{json,md}`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use domicile::client::AdminClient;
use domicile_proxy::config::ControlPlaneSection;
use domicile_proxy::route::map::Replica;
use domicile_proxy::sync::SyncHandle;
use futures_util::future::join_all;
use http::Method;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::control_plane::{host_name, percentiles, write_report, Percentiles};
use crate::synthetic::workspace_id;

#[derive(Debug, Clone)]
pub struct Options {
    pub proxies: usize,
    pub changes: usize,
    pub moves: usize,
    pub workspaces: u64,
    pub per_agent: usize,
    pub replicas: usize,
    /// The NATS fan-out tier's URL: the proxies follow it instead of a stream each.
    pub nats: Option<String>,
    pub domicile: Option<PathBuf>,
    pub results_dir: PathBuf,
    pub label: Option<String>,
}

/// How long any one step may take before the run gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// The quiet window the idle figures are taken over (two heartbeat periods).
const IDLE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub host: String,
    pub cpus: usize,
    pub command: String,
    pub proxies: usize,
    pub replicas: usize,
    pub agents: usize,
    pub workspaces: u64,
    /// How the proxies follow the map: `http` (a change stream each from a replica) or
    /// `nats` (the NATS fan-out tier).
    pub fanout: &'static str,
    /// With `nats`: the NATS server's memory before the proxies connected and with all
    /// connected, its share per proxy, and its CPU per change and over the storm.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsFigures>,
    /// Start with no map until the last proxy routes with the head, seconds.
    pub connect_seconds: f64,
    /// The replicas' resident memory before the proxies connected and with all connected.
    pub replica_rss_before_bytes: u64,
    pub replica_rss_connected_bytes: u64,
    /// 6 s after the last proxy routed (the first heartbeats and snapshots settled).
    pub memory_per_proxy_kib: f64,
    /// The replicas' memory after the idle window as well (16 s after), and per proxy: what
    /// stays once the start-up burst's memory has gone back, or not.
    pub replica_rss_settled_bytes: u64,
    pub memory_per_proxy_settled_kib: f64,
    pub idle_store_operations_per_second: f64,
    pub idle_replica_cpu_percent: f64,
    pub changes: usize,
    pub propagation_ms: Percentiles,
    /// Store operations over the changes, less the idle rate over the same time, per change.
    pub store_operations_per_change: f64,
    /// All store operations over the changes, per change (idle heartbeats included).
    pub store_operations_per_change_raw: f64,
    /// CPU seconds per change over the changes: the replicas', and the simulated proxies'
    /// (all of them, on the same cores).
    pub replica_cpu_ms_per_change: f64,
    pub proxies_cpu_ms_per_change: f64,
    /// PostgreSQL's (the postmaster and its backends), when its process is found.
    pub postgres_cpu_ms_per_change: f64,
    pub moves: usize,
    pub move_ms: Percentiles,
    pub move_freeze_drained_ms: Percentiles,
    pub move_switch_drained_ms: Percentiles,
    /// From the freeze's (the switch's) commit until the last proxy routes with it: what the
    /// drained figures spend before the heartbeats that report it.
    pub move_freeze_applied_ms: Percentiles,
    pub move_switch_applied_ms: Percentiles,
    /// From the restart until the last proxy follows the change stream again, seconds.
    pub storm_seconds: f64,
    pub storm_peak_replica_cpu_percent: f64,
    pub storm_peak_replica_rss_bytes: u64,
    /// CPU seconds over the storm: the replicas' and the proxies'.
    pub storm_replica_cpu_seconds: f64,
    pub storm_proxies_cpu_seconds: f64,
    /// Members the control plane reported SYNCED after the storm (of `proxies`), and when
    /// it first reported all of them (or gave up, a minute after all followed), from the
    /// restart.
    pub synced_after_storm: usize,
    pub storm_all_synced_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct NatsFigures {
    pub rss_before_bytes: u64,
    pub rss_connected_bytes: u64,
    pub memory_per_proxy_kib: f64,
    pub rss_settled_bytes: u64,
    pub memory_per_proxy_settled_kib: f64,
    pub cpu_ms_per_change: f64,
    pub storm_cpu_seconds: f64,
}

/// The root process of a service of this machine's, found by name (the NATS server, or
/// PostgreSQL's postmaster: its backends are its children, so the tree counts them).
fn service_pid(name: &str) -> Option<u32> {
    let named = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
    };
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
    };
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        (named(pid) && !parent(pid).is_some_and(named)).then_some(pid)
    })
}

/// A `domicile control-plane` process.
pub(crate) struct ControlPlane {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    pub(crate) url: String,
}

/// Starts replica `index` on `store` with the configuration file `config`, if any; its
/// standard error goes to `control-plane-<index>.log` in `dir` (appended to, so a restarted
/// replica's log follows the one before). Replica 0 writes the first admin token to
/// `token_file`.
pub(crate) async fn start_control_plane(
    domicile: &Path,
    dir: &Path,
    index: usize,
    store: &str,
    token_file: &Path,
    config: Option<&Path>,
) -> Result<ControlPlane> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("control-plane-{index}.log")))?;
    let mut command = Command::new(domicile);
    command.arg("control-plane");
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("DOMICILE_STORE", store)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    if index == 0 {
        command.arg("--admin-token-file").arg(token_file);
    }
    let mut child = command.spawn().context("starting domicile control-plane")?;
    let pid = child.id().context("the control plane has no pid")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("domicile control plane listening on ") {
                let url = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                return Ok::<_, anyhow::Error>(url);
            }
        }
        bail!("control plane {index} exited before listening (see control-plane-{index}.log)")
    })
    .await
    .context("the control plane did not start within 60 s")??;
    // Keep reading so the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(ControlPlane { child, pid, url })
}

/// What an agent reports, one line each.
#[derive(Debug)]
enum Event {
    Ready(u64),
    Reached(u64, u64),
    Restarted(u64),
    Synced(u64, u64),
    Failed(String),
}

fn parse_event(line: &str) -> Option<Event> {
    let mut words = line.split_whitespace();
    let kind = words.next()?;
    let mut num = || words.next().and_then(|w| w.parse::<u64>().ok());
    Some(match kind {
        "ready" => Event::Ready(num()?),
        "reached" => Event::Reached(num()?, num()?),
        "restarted" => Event::Restarted(num()?),
        "synced" => Event::Synced(num()?, num()?),
        "error" => Event::Failed(line["error".len()..].trim().to_owned()),
        _ => return None,
    })
}

struct Agents {
    stdin: Vec<ChildStdin>,
    children: Vec<Child>,
    pids: Vec<u32>,
    events: mpsc::UnboundedReceiver<(usize, Event)>,
}

impl Agents {
    fn cpu_seconds(&self) -> f64 {
        self.pids
            .iter()
            .map(|p| crate::procs::cpu_seconds(*p))
            .sum()
    }

    async fn send(&mut self, command: &str) -> Result<()> {
        for stdin in &mut self.stdin {
            stdin.write_all(command.as_bytes()).await?;
            stdin.write_all(b"\n").await?;
            stdin.flush().await?;
        }
        Ok(())
    }

    /// One event from every agent that `pick` accepts; an agent's error ends the run.
    async fn gather<T>(&mut self, mut pick: impl FnMut(Event) -> Option<T>) -> Result<Vec<T>> {
        let mut got: Vec<Option<T>> = (0..self.stdin.len()).map(|_| None).collect();
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        while got.iter().any(Option::is_none) {
            let (agent, event) = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .context("an agent did not answer in time")?
                .context("an agent exited")?;
            if let Event::Failed(message) = &event {
                bail!("agent {agent}: {message}");
            }
            if let Some(value) = pick(event) {
                got[agent] = Some(value);
            }
        }
        Ok(got.into_iter().map(|v| v.expect("all gathered")).collect())
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The counter `name` from a replica's `/metrics`.
async fn metric(url: &str, name: &str) -> Result<u64> {
    let text = AdminClient::new(url, None)
        .send(Method::GET, "/metrics", None)
        .await?;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .with_context(|| format!("{url}/metrics has no {name}"))
}

async fn store_operations(cps: &[ControlPlane]) -> Result<u64> {
    let mut sum = 0;
    for cp in cps {
        sum += metric(&cp.url, "domicile_cp_store_operations_total").await?;
    }
    Ok(sum)
}

fn cpu_seconds(cps: &[ControlPlane]) -> f64 {
    cps.iter().map(|cp| crate::procs::cpu_seconds(cp.pid)).sum()
}

fn rss(cps: &[ControlPlane]) -> u64 {
    cps.iter().map(|cp| crate::procs::rss_bytes(cp.pid)).sum()
}

/// Where the proxies' last-known-good maps go: memory-backed when this machine has it.
fn lkg_dir(fallback: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.join(format!("domicile-fleet-{}", std::process::id()))
    } else {
        fallback.join("lkg")
    }
}

pub async fn run(options: Options) -> Result<PathBuf> {
    anyhow::ensure!(options.replicas >= 1, "--replicas must be at least 1");
    let domicile = crate::peers::domicile_binary(options.domicile.clone())?;
    let Some(schema) = domicile_control_plane::testing::postgres_schema().await else {
        bail!(
            "the fleet run needs PostgreSQL: {} is unreachable (set DATABASE_URL)",
            domicile_control_plane::testing::database_url()
        );
    };
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("admin.token");
    let nats = match &options.nats {
        Some(url) => {
            let prefix = format!("fleet-{}", std::process::id());
            let config = dir.path().join("control-plane.toml");
            std::fs::write(
                &config,
                format!("[nats]\nurl = \"{url}\"\nprefix = \"{prefix}\"\n"),
            )?;
            let pid = service_pid("nats-server")
                .context("--nats: no nats-server process on this machine to measure")?;
            Some((url.clone(), prefix, config, pid))
        }
        None => None,
    };
    let mut cps = Vec::new();
    for i in 0..options.replicas {
        let config = nats.as_ref().map(|n| n.2.as_path());
        cps.push(
            start_control_plane(&domicile, dir.path(), i, &schema.url, &token_file, config).await?,
        );
    }
    let nats_pid = nats.as_ref().map(|n| n.3);
    let postgres_pid = service_pid("postgres");
    let postgres_cpu = || postgres_pid.map_or(0.0, crate::procs::cpu_seconds);
    let token = std::fs::read_to_string(&token_file)
        .context("the first replica wrote no admin token")?
        .trim()
        .to_owned();
    let admin = AdminClient::new(&cps[0].url, Some(token));
    crate::control_plane::two_regions(&admin).await?;
    crate::control_plane::import(&admin, options.workspaces, |i| i % 2 == 1).await?;
    let proxy_token = crate::control_plane::proxy_token(&admin).await?;
    let proxy_token_file = dir.path().join("proxy.token");
    std::fs::write(&proxy_token_file, &proxy_token)?;
    let lkg = lkg_dir(dir.path());
    std::fs::create_dir_all(&lkg)?;
    let head = metric(&cps[0].url, "domicile_cp_head_version").await?;

    // Connect: every agent starts its proxies with no map.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss(&cps);
    let nats_rss_before = nats_pid.map_or(0, crate::procs::rss_bytes);
    let urls: Vec<&str> = cps.iter().map(|c| c.url.as_str()).collect();
    let exe = std::env::current_exe()?;
    let per_agent = options.per_agent.max(1);
    let (tx, events) = mpsc::unbounded_channel();
    let mut agents = Agents {
        stdin: Vec::new(),
        children: Vec::new(),
        pids: Vec::new(),
        events,
    };
    let started_ns = now_ns();
    let mut first = 0;
    while first < options.proxies {
        let count = per_agent.min(options.proxies - first);
        let index = agents.stdin.len();
        let log = std::fs::File::create(dir.path().join(format!("agent-{index}.log")))?;
        let mut child = Command::new(&exe)
            .arg("fleet-agent")
            .arg("--first")
            .arg(first.to_string())
            .arg("--count")
            .arg(count.to_string())
            .arg("--control-planes")
            .arg(urls.join(","))
            .arg("--token-file")
            .arg(&proxy_token_file)
            .arg("--lkg-dir")
            .arg(&lkg)
            .arg("--head")
            .arg(head.to_string())
            .args(nats.iter().flat_map(|(url, prefix, _, _)| {
                ["--nats", url.as_str(), "--nats-prefix", prefix.as_str()]
            }))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting a fleet agent")?;
        let stdout = child.stdout.take().context("no stdout")?;
        agents.stdin.push(child.stdin.take().context("no stdin")?);
        agents
            .pids
            .push(child.id().context("the agent has no pid")?);
        agents.children.push(child);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(event) = parse_event(&line) {
                    if tx.send((index, event)).is_err() {
                        return;
                    }
                }
            }
        });
        first += count;
    }
    drop(tx);
    eprintln!(
        "fleet: {} proxies in {} agents connecting to {} replicas",
        options.proxies,
        agents.stdin.len(),
        cps.len()
    );
    let ready = agents
        .gather(|e| match e {
            Event::Ready(ns) => Some(ns),
            _ => None,
        })
        .await?;
    let connect_seconds =
        (ready.iter().max().copied().unwrap_or(started_ns) - started_ns) as f64 / 1e9;
    eprintln!(
        "fleet: all {} routing with the head in {connect_seconds:.2} s",
        options.proxies
    );

    // Memory per proxy, once the first heartbeats and snapshots have settled.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_connected = rss(&cps);
    let memory_per_proxy_kib =
        rss_connected.saturating_sub(rss_before) as f64 / 1024.0 / options.proxies as f64;
    eprintln!("fleet: {memory_per_proxy_kib:.1} KiB per connected proxy");
    let nats_rss_connected = nats_pid.map_or(0, crate::procs::rss_bytes);
    if nats_pid.is_some() {
        eprintln!(
            "fleet: the NATS server: {:.1} KiB per connected proxy",
            nats_rss_connected.saturating_sub(nats_rss_before) as f64
                / 1024.0
                / options.proxies as f64
        );
    }
    let nats_cpu = || nats_pid.map_or(0.0, crate::procs::cpu_seconds);

    // Idle.
    let (ops0, cpu0, t0) = (
        store_operations(&cps).await?,
        cpu_seconds(&cps),
        Instant::now(),
    );
    tokio::time::sleep(IDLE_WINDOW).await;
    let (ops1, cpu1) = (store_operations(&cps).await?, cpu_seconds(&cps));
    let idle_seconds = t0.elapsed().as_secs_f64();
    let idle_rate = (ops1 - ops0) as f64 / idle_seconds;
    let idle_cpu = (cpu1 - cpu0) / idle_seconds * 100.0;
    let rss_settled = rss(&cps);
    let memory_per_proxy_settled_kib =
        rss_settled.saturating_sub(rss_before) as f64 / 1024.0 / options.proxies as f64;
    let nats_rss_settled = nats_pid.map_or(0, crate::procs::rss_bytes);
    eprintln!("fleet: idle {idle_rate:.0} store operations/s, replicas {idle_cpu:.0} % CPU");

    // Propagation.
    let writers: Vec<AdminClient> = cps
        .iter()
        .map(|cp| AdminClient::new(&cp.url, admin_token(&token_file)))
        .collect();
    let (ops_before, t_changes) = (store_operations(&cps).await?, Instant::now());
    let (replica_cpu0, proxies_cpu0) = (cpu_seconds(&cps), agents.cpu_seconds());
    let nats_cpu0 = nats_cpu();
    let postgres_cpu0 = postgres_cpu();
    let mut samples = Vec::with_capacity(options.changes);
    for k in 0..options.changes {
        let region = if k % 2 == 0 { "eu" } else { "us" };
        let start = now_ns();
        let written = writers[k % writers.len()]
            .send_json(
                Method::PUT,
                &format!("/v1/workspaces/fleet-change-{k}"),
                &json!({ "region": region }),
            )
            .await?;
        let version = written["version"].as_u64().context("version")?;
        agents.send(&format!("wait {version}")).await?;
        let reached = agents
            .gather(|e| match e {
                Event::Reached(v, ns) if v == version => Some(ns),
                _ => None,
            })
            .await?;
        let last = reached.into_iter().max().unwrap_or(start);
        samples.push(Duration::from_nanos(last.saturating_sub(start)));
    }
    let changes_seconds = t_changes.elapsed().as_secs_f64();
    let replica_cpu_ms_per_change =
        (cpu_seconds(&cps) - replica_cpu0) * 1000.0 / options.changes.max(1) as f64;
    let proxies_cpu_ms_per_change =
        (agents.cpu_seconds() - proxies_cpu0) * 1000.0 / options.changes.max(1) as f64;
    let nats_cpu_ms_per_change = (nats_cpu() - nats_cpu0) * 1000.0 / options.changes.max(1) as f64;
    let postgres_cpu_ms_per_change =
        (postgres_cpu() - postgres_cpu0) * 1000.0 / options.changes.max(1) as f64;
    let ops_changes = store_operations(&cps).await? - ops_before;
    let changes = options.changes.max(1) as f64;
    let store_operations_per_change_raw = ops_changes as f64 / changes;
    let store_operations_per_change =
        (ops_changes as f64 - idle_rate * changes_seconds).max(0.0) / changes;
    let propagation_ms = percentiles(samples);
    eprintln!(
        "fleet: propagation to all {}: p50 {:.0} ms, p99 {:.0} ms; {store_operations_per_change:.1} store operations per change; CPU per change: replicas {replica_cpu_ms_per_change:.0} ms, proxies {proxies_cpu_ms_per_change:.0} ms, PostgreSQL {postgres_cpu_ms_per_change:.0} ms",
        options.proxies, propagation_ms.p50, propagation_ms.p99
    );

    // Moves.
    let mut hook = crate::moves::Webhook::start().await?;
    let mut move_samples = Vec::new();
    let (mut freeze_drains, mut switch_drains) = (Vec::new(), Vec::new());
    let (mut freeze_applies, mut switch_applies) = (Vec::new(), Vec::new());
    for i in 0..options.moves {
        let workspace = workspace_id(i as u64 % options.workspaces.max(1));
        let current = admin
            .get_json(&format!("/v1/workspaces/{workspace}"))
            .await?;
        let to = if current["region"] == "us" {
            "eu"
        } else {
            "us"
        };
        let started = Instant::now();
        let (finished, freeze, switch) =
            move_watched(&admin, &mut hook, &mut agents, &workspace, to).await?;
        move_samples.push(started.elapsed());
        if let Some((freezing, frozen, switching, done)) = crate::moves::phase_times(&finished) {
            freeze_drains.push(frozen.duration_since(freezing).unwrap_or_default());
            switch_drains.push(done.duration_since(switching).unwrap_or_default());
            let since = |at: std::time::SystemTime, ns: u64| {
                let at_ns = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                Duration::from_nanos(ns.saturating_sub(at_ns))
            };
            freeze_applies.push(since(freezing, freeze));
            switch_applies.push(since(switching, switch));
        }
    }
    let move_ms = percentiles_or_zero(move_samples);
    eprintln!(
        "fleet: {} moves with {} proxies: p50 {:.0} ms, max {:.0} ms",
        options.moves, options.proxies, move_ms.p50, move_ms.max
    );

    // Reconnect storm.
    let head = metric(&cps[0].url, "domicile_cp_head_version").await?;
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let pids: Vec<u32> = cps.iter().map(|c| c.pid).collect();
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let (mut peak_cpu, mut peak_rss) = (0.0f64, 0u64);
            let cpu = || {
                pids.iter()
                    .map(|p| crate::procs::cpu_seconds(*p))
                    .sum::<f64>()
            };
            let (mut last, mut at) = (cpu(), Instant::now());
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = cpu();
                let pct = (now - last) / at.elapsed().as_secs_f64() * 100.0;
                (last, at) = (now, Instant::now());
                peak_cpu = peak_cpu.max(pct);
                peak_rss = peak_rss.max(pids.iter().map(|p| crate::procs::rss_bytes(*p)).sum());
            }
            (peak_cpu, peak_rss)
        })
    };
    let (replica_cpu0, proxies_cpu0) = (cpu_seconds(&cps), agents.cpu_seconds());
    let nats_cpu0 = nats_cpu();
    agents.send(&format!("storm {head}")).await?;
    let restarted = agents
        .gather(|e| match e {
            Event::Restarted(ns) => Some(ns),
            _ => None,
        })
        .await?;
    let synced = agents
        .gather(|e| match e {
            Event::Synced(v, ns) if v == head => Some(ns),
            _ => None,
        })
        .await?;
    let storm_replica_cpu_seconds = cpu_seconds(&cps) - replica_cpu0;
    let storm_proxies_cpu_seconds = agents.cpu_seconds() - proxies_cpu0;
    let storm_nats_cpu_seconds = nats_cpu() - nats_cpu0;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let (peak_cpu, peak_rss) = sampler.await?;
    let from = restarted.iter().min().copied().unwrap_or(0);
    let storm_seconds = (synced.iter().max().copied().unwrap_or(from) - from) as f64 / 1e9;
    // Then until the control plane sees every proxy SYNCED (their heartbeats written), or
    // a minute.
    let give_up = Instant::now() + Duration::from_secs(60);
    let (synced_after_storm, all_synced_ns) = loop {
        let fleet = admin.get_json("/v1/fleet").await?;
        let at = now_ns();
        let members = fleet["members"].as_array().cloned().unwrap_or_default();
        let n = members.iter().filter(|m| m["status"] == "SYNCED").count();
        if n < options.proxies {
            // Who is not, and why: the first of them, as the control plane sees it.
            if let Some(m) = members.iter().find(|m| m["status"] != "SYNCED") {
                eprintln!(
                    "fleet: {:.1} s after the restart: {n} SYNCED; e.g. {} {} at {} (head {}, expected {}), seen {} s ago",
                    (at.saturating_sub(from)) as f64 / 1e9,
                    m["proxy_id"], m["status"], m["applied_version"], fleet["head"],
                    fleet["expected_version"], m["seconds_since_seen"]
                );
            }
        }
        if n >= options.proxies || Instant::now() > give_up {
            break (n, at);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let storm_all_synced_seconds = (all_synced_ns.saturating_sub(from)) as f64 / 1e9;
    eprintln!(
        "fleet: reconnect storm: all following again in {storm_seconds:.2} s, replicas peaked at {peak_cpu:.0} % CPU and {} MiB; {synced_after_storm} SYNCED after {storm_all_synced_seconds:.2} s",
        peak_rss >> 20
    );

    agents.send("quit").await?;
    for mut child in agents.children {
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
    for mut cp in cps {
        let _ = cp.child.kill().await;
    }
    let _ = std::fs::remove_dir_all(&lkg);
    drop(schema);
    if let Some((url, prefix, _, _)) = &nats {
        // The run's stream goes with it.
        if let Ok(client) = async_nats::connect(url.as_str()).await {
            let _ = async_nats::jetstream::new(client)
                .delete_stream(domicile_wire::fanout::stream_name(prefix))
                .await;
        }
    }

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let report = Report {
        date: crate::compare::utc_date(now),
        host: host_name(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        proxies: options.proxies,
        replicas: options.replicas,
        agents: options.proxies.div_ceil(per_agent),
        workspaces: options.workspaces,
        fanout: if nats.is_some() { "nats" } else { "http" },
        nats: nats_pid.map(|_| NatsFigures {
            rss_before_bytes: nats_rss_before,
            rss_connected_bytes: nats_rss_connected,
            memory_per_proxy_kib: nats_rss_connected.saturating_sub(nats_rss_before) as f64
                / 1024.0
                / options.proxies as f64,
            rss_settled_bytes: nats_rss_settled,
            memory_per_proxy_settled_kib: nats_rss_settled.saturating_sub(nats_rss_before) as f64
                / 1024.0
                / options.proxies as f64,
            cpu_ms_per_change: nats_cpu_ms_per_change,
            storm_cpu_seconds: storm_nats_cpu_seconds,
        }),
        connect_seconds,
        replica_rss_before_bytes: rss_before,
        replica_rss_connected_bytes: rss_connected,
        memory_per_proxy_kib,
        replica_rss_settled_bytes: rss_settled,
        memory_per_proxy_settled_kib,
        idle_store_operations_per_second: idle_rate,
        idle_replica_cpu_percent: idle_cpu,
        changes: options.changes,
        propagation_ms,
        store_operations_per_change,
        store_operations_per_change_raw,
        replica_cpu_ms_per_change,
        proxies_cpu_ms_per_change,
        postgres_cpu_ms_per_change,
        moves: options.moves,
        move_ms,
        move_freeze_drained_ms: percentiles_or_zero(freeze_drains),
        move_switch_drained_ms: percentiles_or_zero(switch_drains),
        move_freeze_applied_ms: percentiles_or_zero(freeze_applies),
        move_switch_applied_ms: percentiles_or_zero(switch_applies),
        storm_seconds,
        storm_peak_replica_cpu_percent: peak_cpu,
        storm_peak_replica_rss_bytes: peak_rss,
        storm_replica_cpu_seconds,
        storm_proxies_cpu_seconds,
        synced_after_storm,
        storm_all_synced_seconds,
    };
    let mut stem = format!("{}-{}-fleet", report.date, report.host);
    if let Some(label) = &options.label {
        stem.push('-');
        stem.push_str(label);
    }
    write_report(&options.results_dir, &stem, &report, &markdown(&report))
}

/// One move, its data copied the moment it is frozen, driven by its webhook as a data mover
/// would be (nothing polls the control plane meanwhile), and watched from both ends: the
/// control plane's phases, and when the last proxy routed with the freeze and with the switch
/// (wall-clock nanoseconds, as the agents report them).
async fn move_watched(
    admin: &AdminClient,
    hook: &mut crate::moves::Webhook,
    agents: &mut Agents,
    workspace: &str,
    to: &str,
) -> Result<(serde_json::Value, u64, u64)> {
    let m = admin
        .send_json(
            Method::POST,
            "/v1/moves",
            &json!({ "workspace": workspace, "to": to, "reason": "loadtest fleet",
                     "webhook": hook.url }),
        )
        .await?;
    let id = m["id"].as_u64().context("move id")?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    let (mut freeze, mut switch, mut completed) = (None, None, false);
    let done = loop {
        let m = hook.next(id, deadline).await?;
        // Each version goes to the agents as soon as it is announced (replicas announce
        // independently, so a later phase may come first); they answer when all of their
        // proxies route with it.
        for (sent, key) in [(&mut freeze, "freeze"), (&mut switch, "switch")] {
            if let (None, Some(v)) = (*sent, m["versions"][key].as_u64()) {
                agents.send(&format!("wait {v}")).await?;
                *sent = Some(v);
            }
        }
        if crate::moves::instant_copy(admin, &m, &mut completed).await? {
            break m;
        }
    };
    // The webhook's view was taken at the phase change; the record, with every phase's time,
    // is read once the move is over.
    let finished = admin.get_json(&format!("/v1/moves/{}", done["id"])).await?;
    let (freeze, switch) = (
        freeze.context("no freeze version was announced")?,
        switch.context("no switch version was announced")?,
    );
    // An agent answers its commands in order: the freeze's answer, then the switch's.
    let mut last = Vec::new();
    for version in [freeze, switch] {
        let reached = agents
            .gather(|e| match e {
                Event::Reached(v, ns) if v == version => Some(ns),
                _ => None,
            })
            .await?;
        last.push(reached.into_iter().max().unwrap_or(0));
    }
    Ok((finished, last[0], last[1]))
}

fn admin_token(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_owned())
}

fn percentiles_or_zero(samples: Vec<Duration>) -> Percentiles {
    if samples.is_empty() {
        percentiles(vec![Duration::ZERO])
    } else {
        percentiles(samples)
    }
}

fn markdown(r: &Report) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let tier = match r.fanout {
        "nats" => "The proxies follow the map through the NATS fan-out tier (JetStream).",
        _ => "Each proxy follows a change stream from a replica.",
    };
    let mut md = format!(
        "# Fleet: {proxies} proxies on {replicas} control-plane replicas, {date} on {host} ({cpus} CPUs)\n\n\
         Command: `cargo run --release -p loadtest -- {command}`. PostgreSQL store, \
         {workspaces} workspaces, proxies in {agents} agent processes. {tier}\n\n\
         | what | figure |\n| --- | --- |\n\
         | connect: start with no map until the last proxy routes with the head | {connect:.2} s |\n\
         | replica memory before / with all connected | {before:.0} MiB / {after:.0} MiB |\n\
         | memory per connected proxy, 6 s / 16 s after the last connected | {per:.1} / {per_settled:.1} KiB |\n\
         | idle: store operations per second / replica CPU | {idle_ops:.0} / {idle_cpu:.0} % |\n\
         | propagation, write to the last of {proxies} routing it: p50 / p90 / p99 / max over {changes} | {p50:.0} / {p90:.0} / {p99:.0} / {pmax:.0} ms |\n\
         | store operations per change (less the idle rate; all) | {per_change:.1} ({raw:.1}) |\n\
         | CPU per change: replicas / the {proxies} proxies / PostgreSQL | {rcpu:.0} ms / {pcpu:.0} ms / {pgcpu:.0} ms |\n\
         | move, request to done (freeze and switch drained by all): p50 / max over {moves} | {m50:.0} / {mmax:.0} ms |\n\
         | freeze drained / switch drained, p50 | {f50:.0} / {s50:.0} ms |\n\
         | freeze / switch routed with by the last proxy, p50 | {fa50:.0} / {sa50:.0} ms |\n\
         | reconnect storm: restart until all follow the stream again | {storm:.2} s |\n\
         | storm: replicas' peak CPU / peak memory | {scpu:.0} % / {srss:.0} MiB |\n\
         | storm: CPU of the replicas / of the proxies | {srcpu:.1} s / {spcpu:.1} s |\n\
         | reconnect storm: restart until the control plane sees all SYNCED | {all_synced:.2} s ({synced} of {proxies}) |\n",
        proxies = r.proxies,
        replicas = r.replicas,
        date = r.date,
        host = r.host,
        cpus = r.cpus,
        command = r.command,
        workspaces = r.workspaces,
        agents = r.agents,
        connect = r.connect_seconds,
        before = mib(r.replica_rss_before_bytes),
        after = mib(r.replica_rss_connected_bytes),
        per = r.memory_per_proxy_kib,
        per_settled = r.memory_per_proxy_settled_kib,
        idle_ops = r.idle_store_operations_per_second,
        idle_cpu = r.idle_replica_cpu_percent,
        changes = r.changes,
        p50 = r.propagation_ms.p50,
        p90 = r.propagation_ms.p90,
        p99 = r.propagation_ms.p99,
        pmax = r.propagation_ms.max,
        per_change = r.store_operations_per_change,
        raw = r.store_operations_per_change_raw,
        rcpu = r.replica_cpu_ms_per_change,
        pcpu = r.proxies_cpu_ms_per_change,
        pgcpu = r.postgres_cpu_ms_per_change,
        moves = r.moves,
        m50 = r.move_ms.p50,
        mmax = r.move_ms.max,
        f50 = r.move_freeze_drained_ms.p50,
        s50 = r.move_switch_drained_ms.p50,
        fa50 = r.move_freeze_applied_ms.p50,
        sa50 = r.move_switch_applied_ms.p50,
        storm = r.storm_seconds,
        scpu = r.storm_peak_replica_cpu_percent,
        srss = mib(r.storm_peak_replica_rss_bytes),
        srcpu = r.storm_replica_cpu_seconds,
        spcpu = r.storm_proxies_cpu_seconds,
        synced = r.synced_after_storm,
        all_synced = r.storm_all_synced_seconds,
    );
    if let Some(n) = &r.nats {
        md.push_str(&format!(
            "| the NATS server: memory before / with all connected | {:.0} MiB / {:.0} MiB |\n\
             | the NATS server: memory per connected proxy, 6 s / 16 s after | {:.1} / {:.1} KiB |\n\
             | the NATS server: CPU per change / over the storm | {:.0} ms / {:.1} s |\n",
            mib(n.rss_before_bytes),
            mib(n.rss_connected_bytes),
            n.memory_per_proxy_kib,
            n.memory_per_proxy_settled_kib,
            n.cpu_ms_per_change,
            n.storm_cpu_seconds,
        ));
    }
    md
}

// ---- the agent: `loadtest fleet-agent` ----

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The first proxy's number (proxy ids are `fleet-<n>`).
    pub first: usize,
    pub count: usize,
    pub control_planes: Vec<String>,
    pub token_file: PathBuf,
    pub lkg_dir: PathBuf,
    /// The head version at start: `ready` once every proxy routes with it.
    pub head: u64,
    /// The NATS fan-out tier's URL and subject prefix, when the proxies follow it.
    pub nats: Option<(String, String)>,
}

struct SimProxy {
    id: String,
    cfg: ControlPlaneSection,
    sync: Option<SyncHandle>,
}

impl SimProxy {
    fn start(&mut self) {
        self.sync = Some(domicile_proxy::sync::start(
            self.cfg.clone(),
            Arc::new(Replica::new()),
            Arc::new(domicile_proxy::Metrics::default()),
            self.id.clone(),
            "us".to_owned(),
        ));
    }
}

/// Runs `count` proxies and answers the coordinator's commands on stdin:
/// `wait V` (answers `reached V <ns>` once all route with V), `storm V` (stops all at once,
/// starts them again from their last-known-good maps: `restarted <ns>`, then `synced V <ns>`
/// once all follow the stream at V or later), `quit`.
pub async fn agent(options: AgentOptions) -> Result<()> {
    let mut proxies: Vec<SimProxy> = (options.first..options.first + options.count)
        .map(|n| {
            let id = format!("fleet-{n}");
            let cfg = ControlPlaneSection {
                url: options.control_planes[n % options.control_planes.len()].clone(),
                ca: None,
                cert: None,
                key: None,
                token_file: Some(options.token_file.clone()),
                token: None,
                last_known_good: options.lkg_dir.join(format!("{id}.map")),
                heartbeat_interval: Duration::from_secs(5),
                stall_timeout: Duration::from_secs(20),
                request_timeout: Duration::from_secs(10),
                backoff_initial: Duration::from_millis(100),
                backoff_max: Duration::from_secs(10),
                nats: options.nats.as_ref().map(|(url, prefix)| {
                    domicile_proxy::config::NatsSection {
                        url: url.clone(),
                        prefix: prefix.clone(),
                        ca: None,
                    }
                }),
            };
            SimProxy {
                id,
                cfg,
                sync: None,
            }
        })
        .collect();
    for proxy in &mut proxies {
        proxy.start();
    }
    let mut out = tokio::io::stdout();
    let mut say = async |line: String| -> Result<()> {
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
        out.flush().await?;
        Ok(())
    };
    wait_all(&proxies, options.head, false).await;
    say(format!("ready {}", now_ns())).await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        let command = words.next().unwrap_or_default();
        let version = words.next().and_then(|w| w.parse::<u64>().ok());
        match (command, version) {
            ("wait", Some(v)) => {
                wait_all(&proxies, v, false).await;
                say(format!("reached {v} {}", now_ns())).await?;
            }
            ("storm", Some(v)) => {
                join_all(
                    proxies
                        .iter_mut()
                        .filter_map(|p| p.sync.take())
                        .map(SyncHandle::stop),
                )
                .await;
                say(format!("restarted {}", now_ns())).await?;
                for proxy in &mut proxies {
                    proxy.start();
                }
                wait_all(&proxies, v, true).await;
                say(format!("synced {v} {}", now_ns())).await?;
            }
            ("quit", None) => break,
            _ => say(format!("error unknown command {line:?}")).await?,
        }
    }
    join_all(
        proxies
            .iter_mut()
            .filter_map(|p| p.sync.take())
            .map(SyncHandle::stop),
    )
    .await;
    Ok(())
}

/// Waits until every proxy routes with `version` or later (and, with `streaming`, follows the
/// change stream).
async fn wait_all(proxies: &[SimProxy], version: u64, streaming: bool) {
    join_all(proxies.iter().filter_map(|p| p.sync.as_ref()).map(|sync| {
        let mut state = sync.state.clone();
        async move {
            let _ = state
                .wait_for(|s| {
                    s.applied.is_some_and(|v| v >= version) && (!streaming || s.streaming)
                })
                .await;
        }
    }))
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_lines_parse() {
        assert!(matches!(parse_event("ready 12"), Some(Event::Ready(12))));
        assert!(matches!(
            parse_event("reached 7 99"),
            Some(Event::Reached(7, 99))
        ));
        assert!(matches!(
            parse_event("synced 7 99"),
            Some(Event::Synced(7, 99))
        ));
        assert!(matches!(
            parse_event("error the sky fell"),
            Some(Event::Failed(m)) if m == "the sky fell"
        ));
        assert!(parse_event("reached seven 99").is_none());
        assert!(parse_event("hello").is_none());
    }
}
