//! `loadtest chaos`: the residency promise while everything fails.
//!
//! Three proxies (`domicile proxy`, one per edge region), two control-plane replicas
//! (`domicile control-plane`) on one fresh PostgreSQL schema, and origins for three regions
//! that log every request they serve, all on loopback. Client loops send GETs and uploads for
//! many workspaces through every proxy, over HTTP/1.1 (kept-alive and new connections) and
//! HTTP/2. Meanwhile faults follow a schedule drawn from one seed:
//!
//! - moves, completed and aborted, back and forth between the regions;
//! - `kill -9` and restart of a proxy, and of a control-plane replica (also while a move is
//!   freezing and switching);
//! - a region's origins stopped and started;
//! - the control plane unreachable (both replicas cut off) for longer than the proxies'
//!   `stall_timeout`;
//! - every PostgreSQL connection of the control plane cut (`pg_terminate_backend`).
//!
//! Each proxy reaches its replica through a relay in this process, which is how the control
//! plane is cut off and how a restarted replica (on a new port) is found again.
//!
//! Afterwards the run is judged from the origins' logs, the map history and the proxies' audit
//! logs ([`judge`]): requests served outside their workspace's home at the map version they
//! were forwarded with, writes served at an old home after the switch, forwarded requests
//! without an audit record, audit records without an origin request, and `domicile audit
//! verify` on every log. It prints one verdict line and keeps the seed and the logs, so a
//! failure can be replayed (`loadtest chaos --seed N`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use domicile::client::{AdminClient, ApiError};
use domicile::origin::{Origin, Seen};
use domicile_control_plane::testing::Schema;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::control_plane::{host_name, write_report};
use crate::fleet::{start_control_plane, ControlPlane};
use crate::synthetic::mix;

/// The regions, one proxy's edge each.
const REGIONS: [(&str, &str); 3] = [("us", "US"), ("eu", "DE"), ("au", "AU")];
/// The proxies' `stall_timeout`; the control plane is cut off for longer than this.
const STALL_TIMEOUT: Duration = Duration::from_secs(3);
/// The proxies' audit `commit_interval`.
const COMMIT_INTERVAL: Duration = Duration::from_millis(10);
/// How long before a `kill -9` a refusal may have been answered and still lose its record
/// with the process's queue: the commit interval plus the writer's previous write and fsync,
/// which on this shared disk under the run's load was seen to take 700 ms.
const CRASH_WINDOW: Duration = Duration::from_secs(2);
/// Longest a client waits for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a move phase is waited for before the run calls the move unfinished.
const MOVE_PHASE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// How long traffic and faults run.
    pub duration: Duration,
    /// Concurrent client loops.
    pub clients: usize,
    pub workspaces: usize,
    /// The `domicile` binary.
    pub domicile: PathBuf,
    /// Where the logs are kept (created; must not exist yet).
    pub dir: PathBuf,
    /// Where the report goes (`<date>-<host>-chaos[-label].{json,md}`); none: only in `dir`.
    pub results_dir: Option<PathBuf>,
    pub label: Option<String>,
}

/// What the run found. [`Verdict::ok`] is the pass condition.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Verdict {
    /// Requests an origin served outside the workspace's home at the map version the request
    /// was forwarded with (origin logs), and forwards an audit record says went outside it.
    pub misrouted: u64,
    /// Writes an origin served with a map version at which the workspace was frozen.
    pub frozen_writes: u64,
    /// Writes an origin served at a workspace's old home after the switch away from it.
    pub writes_at_old_home: u64,
    /// Requests an origin served that no audit record (forwarded, or an upstream failure to
    /// that region, or recovered from the forward journal) accounts for; and answers a client
    /// got that no record accounts for, beyond those of [`Verdict::lost_in_crash`].
    pub unaudited: u64,
    /// Refusals (nothing forwarded) whose records a `kill -9` of their proxy took from its
    /// queue: answered within the crash window before the kill. The log promises these only
    /// to a clean stop (docs/audit.md); a forward's record survives a kill through the
    /// forward journal, so none of those may be missing.
    pub lost_in_crash: u64,
    /// Request ids with more than one audit record.
    pub duplicate_records: u64,
    /// Records saying `forwarded` with no origin request behind them.
    pub orphan_records: u64,
    /// Origin requests with an id no client sent.
    pub unknown_requests: u64,
    /// The audit logs `domicile audit verify` did not pass (0: intact and closed).
    pub verify_failed: Vec<String>,
    pub logs_verified: usize,
    /// Up to 20 examples of each kind of violation.
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.misrouted == 0
            && self.frozen_writes == 0
            && self.writes_at_old_home == 0
            && self.unaudited == 0
            && self.duplicate_records == 0
            && self.orphan_records == 0
            && self.unknown_requests == 0
            && self.verify_failed.is_empty()
            && self.logs_verified > 0
    }

    pub fn line(&self) -> String {
        let verify = if self.verify_failed.is_empty() {
            format!("verify ok ({} logs)", self.logs_verified)
        } else {
            format!("verify FAILED: {}", self.verify_failed.join(", "))
        };
        format!(
            "{}: misrouted {}, unaudited {}, orphan records {}, {verify}; frozen writes {}, \
             writes at old home {}, duplicate records {}, unknown requests {}; \
             refusal records lost to kill -9 {}",
            if self.ok() { "PASS" } else { "FAIL" },
            self.misrouted,
            self.unaudited,
            self.orphan_records,
            self.frozen_writes,
            self.writes_at_old_home,
            self.duplicate_records,
            self.unknown_requests,
            self.lost_in_crash,
        )
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < 60 {
            self.examples.push(text);
        }
    }
}

/// Requests started during one phase of the run and how they were answered.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Phase {
    pub requests: u64,
    pub ok_2xx: u64,
    pub ok_percent: f64,
    /// Refusals by their `x-domicile-refusal` code.
    pub refusals: BTreeMap<String, u64>,
    /// Other answers without a refusal code, by status.
    pub other_status: BTreeMap<u16, u64>,
    /// No answer: the connection failed or the request timed out.
    pub no_answer: u64,
}

/// One injected fault, with when it began and ended.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    pub kind: &'static str,
    pub detail: String,
    pub start_us: i64,
    pub end_us: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub host: String,
    pub cpus: usize,
    pub seed: u64,
    /// As asked for (`--duration`): with the seed, it decides the fault schedule.
    pub planned_seconds: u64,
    /// As it ran, from the first request to the last.
    pub duration_seconds: f64,
    pub clients: usize,
    pub workspaces: usize,
    pub requests: u64,
    pub origin_requests: u64,
    pub audit_records: u64,
    pub moves_done: u64,
    pub moves_aborted: u64,
    pub moves_unfinished: u64,
    pub faults: BTreeMap<&'static str, u64>,
    pub verdict: Verdict,
    /// By the faults active when each request started (`steady`: none).
    pub phases: BTreeMap<String, Phase>,
    pub events: Vec<FaultEvent>,
    /// The logs directory; left out of the copy under `loadtest/results/`, which names no
    /// path of the machine it ran on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
}

/// What [`run`] leaves: the verdict, the report and where the logs are.
pub struct Outcome {
    pub report: Report,
    pub markdown: String,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A small deterministic generator (splitmix64 over a counter).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.next() % span.max(1))
    }
}

// ---- the network between the proxies and the control plane ----

/// A TCP relay in front of one control-plane replica: proxies connect to its fixed address;
/// it forwards to the replica's current one. Cutting it drops every connection and refuses
/// new ones, as a network partition would.
struct Relay {
    addr: SocketAddr,
    target: watch::Sender<Option<SocketAddr>>,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (target, _) = watch::channel(None::<SocketAddr>);
        let (cut, _) = watch::channel(false);
        let (mut target_rx, cut_rx) = (target.subscribe(), cut.subscribe());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Marked seen, so a connection's copy wakes only for a later change.
                let to = *target_rx.borrow_and_update();
                let (Some(to), false) = (to, *cut_rx.borrow()) else {
                    continue;
                };
                let (mut target_rx, mut cut_rx) = (target_rx.clone(), cut_rx.clone());
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                        _ = target_rx.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            target,
            cut,
            task,
        })
    }

    fn point_at(&self, url: Option<&str>) {
        let addr = url.and_then(|u| u.strip_prefix("http://")?.parse().ok());
        self.target.send_replace(addr);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- the processes ----

struct ProxyProc {
    child: Child,
    addr: SocketAddr,
}

async fn start_proxy(domicile: &Path, dir: &Path, index: usize) -> Result<ProxyProc> {
    let home = dir.join(format!("edge-{index}"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("proxy.log"))?;
    let mut child = Command::new(domicile)
        .arg("proxy")
        .arg("--config")
        .arg(home.join("proxy.toml"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting domicile proxy")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("domicile proxy listening on http://") {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return Ok::<_, anyhow::Error>(addr.parse::<SocketAddr>()?);
            }
        }
        bail!("proxy {index} exited before listening (see edge-{index}/proxy.log)")
    })
    .await
    .context("the proxy did not start within 60 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(ProxyProc { child, addr })
}

fn proxy_config(index: usize, relay: SocketAddr, origins: &[SocketAddr]) -> String {
    let mut toml = format!(
        r#"[proxy]
id = "chaos-edge-{index}"
edge_region = "{region}"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
workers = 1
shutdown_grace = "5s"

[control_plane]
url = "http://{relay}"
token_file = "../proxy.token"
last_known_good = "last-known-good.map"
heartbeat_interval = "1s"
stall_timeout = "{stall}ms"
request_timeout = "2s"
backoff_initial = "100ms"
backoff_max = "1s"

[identify]
rules = [{{ from = "header", name = "x-workspace-id" }}]

[limits]
upstream_connect_timeout = "500ms"
upstream_response_timeout = "5s"

[audit]
dir = "audit"
signing_key = "../audit.key"
commit_interval = "{commit}ms"
checkpoint_interval = "1s"
"#,
        region = REGIONS[index % REGIONS.len()].0,
        stall = STALL_TIMEOUT.as_millis(),
        commit = COMMIT_INTERVAL.as_millis(),
    );
    for ((region, _), addr) in REGIONS.iter().zip(origins) {
        toml.push_str(&format!(
            "\n[regions.{region}]\nendpoints = [\"{addr}\"]\nhealth.interval = \"500ms\"\n\
             health.timeout = \"300ms\"\nejection.duration = \"1s\"\n"
        ));
    }
    toml
}

/// Sends SIGTERM and waits up to `grace` for the process to end, then kills it.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child
        .id()
        .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// `kill -9`, and wait for the process to be gone.
async fn kill9(child: &mut Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

struct OriginSlot {
    region: &'static str,
    addr: SocketAddr,
    live: Option<Origin>,
    /// What earlier instances (before a stop) served.
    served: Vec<Seen>,
}

impl OriginSlot {
    /// Stops the origin and keeps what it served, read once its connections are gone (a
    /// request it logged as they closed is kept too).
    async fn stop(&mut self) {
        if let Some(origin) = self.live.take() {
            origin.stop();
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.served.extend(origin.seen_requests());
        }
    }
}

/// Everything the faults act on.
struct Cluster {
    domicile: PathBuf,
    dir: PathBuf,
    schema: Schema,
    admin_token: String,
    replicas: tokio::sync::Mutex<Vec<Option<ControlPlane>>>,
    relays: Vec<Relay>,
    proxies: tokio::sync::Mutex<Vec<Option<ProxyProc>>>,
    /// The proxies' client addresses (a killed proxy's stays until it is back, so clients see
    /// what a client of a dead edge sees).
    proxy_addrs: Mutex<Vec<SocketAddr>>,
    origins: tokio::sync::Mutex<Vec<OriginSlot>>,
    events: Mutex<Vec<FaultEvent>>,
    /// `kill -9` of a proxy: (proxy, when).
    kills: Mutex<Vec<(usize, i64)>>,
    /// Workspaces with an open move, and every workspace's home as the moves left it.
    moving: Mutex<HashSet<String>>,
    homes: Mutex<HashMap<String, &'static str>>,
    moves: Mutex<MoveCounts>,
}

#[derive(Default)]
struct MoveCounts {
    done: u64,
    aborted: u64,
    unfinished: u64,
}

impl Cluster {
    fn event(&self, kind: &'static str, detail: String, start_us: i64) {
        let event = FaultEvent {
            kind,
            detail,
            start_us,
            end_us: now_us(),
        };
        eprintln!(
            "chaos: {:>7.1}s {kind} {}",
            (event.end_us - event.start_us) as f64 / 1e6,
            event.detail
        );
        self.events.lock().unwrap().push(event);
    }

    async fn start_replica(&self, index: usize) -> Result<()> {
        let replica = start_control_plane(
            &self.domicile,
            &self.dir,
            index,
            &self.schema.url,
            &self.dir.join("admin.token"),
            Some(&self.dir.join("control-plane.toml")),
        )
        .await?;
        self.relays[index].point_at(Some(&replica.url));
        self.replicas.lock().await[index] = Some(replica);
        Ok(())
    }

    async fn kill_replica(&self, index: usize) {
        self.relays[index].point_at(None);
        if let Some(mut replica) = self.replicas.lock().await[index].take() {
            kill9(&mut replica.child).await;
        }
    }

    async fn replica_urls(&self) -> Vec<String> {
        let replicas = self.replicas.lock().await;
        replicas.iter().flatten().map(|r| r.url.clone()).collect()
    }

    /// One API call, on whichever replica answers: unreachable replicas, answers cut off and
    /// 5xx (a replica whose store connection was just cut) are tried again, on the other
    /// replica and then after a pause, for up to 30 s; any other answer is final.
    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut last = None;
            for url in self.replica_urls().await {
                let admin = AdminClient::new(&url, Some(self.admin_token.clone()));
                let body = body
                    .as_ref()
                    .map(|b| (Bytes::from(b.to_string()), "application/json"));
                match admin.send(method.clone(), path, body).await {
                    Ok(bytes) if bytes.is_empty() => return Ok(Value::Null),
                    Ok(bytes) => return Ok(serde_json::from_slice(&bytes)?),
                    Err(e) => match e.downcast_ref::<ApiError>() {
                        Some(api) if api.status.as_u16() < 500 => return Err(e),
                        _ => last = Some(e),
                    },
                }
            }
            if Instant::now() > deadline {
                return Err(last.unwrap_or_else(|| anyhow::anyhow!("no replica is running")))
                    .with_context(|| format!("{method} {path}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn restart_proxy(&self, index: usize) -> Result<()> {
        let proxy = start_proxy(&self.domicile, &self.dir, index).await?;
        self.proxy_addrs.lock().unwrap()[index] = proxy.addr;
        self.proxies.lock().await[index] = Some(proxy);
        Ok(())
    }
}

// ---- faults ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    MoveComplete,
    MoveAbort,
    MoveWithReplicaKills,
    KillProxy,
    KillReplica,
    StopOrigins,
    CutControlPlane,
    CutDatabase,
}

impl Fault {
    const ALL: [Fault; 8] = [
        Fault::MoveComplete,
        Fault::MoveAbort,
        Fault::MoveWithReplicaKills,
        Fault::KillProxy,
        Fault::KillReplica,
        Fault::StopOrigins,
        Fault::CutControlPlane,
        Fault::CutDatabase,
    ];

    /// Weights of the draws after every fault has had its turn once.
    fn weight(self) -> u64 {
        match self {
            Fault::MoveComplete => 6,
            Fault::MoveAbort => 3,
            Fault::MoveWithReplicaKills => 2,
            Fault::KillProxy => 4,
            Fault::KillReplica => 3,
            Fault::StopOrigins => 2,
            Fault::CutControlPlane => 1,
            Fault::CutDatabase => 2,
        }
    }

    fn draw(rng: &mut Rng) -> Fault {
        let total: u64 = Fault::ALL.iter().map(|f| f.weight()).sum();
        let mut pick = rng.next() % total;
        for fault in Fault::ALL {
            if pick < fault.weight() {
                return fault;
            }
            pick -= fault.weight();
        }
        Fault::MoveComplete
    }
}

/// How a move ends.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Complete,
    /// Abort right after the start (requested or freezing) or once frozen.
    Abort {
        once_frozen: bool,
    },
}

async fn phase_of(cluster: &Cluster, id: u64) -> Result<Value> {
    cluster
        .api(Method::GET, &format!("/v1/moves/{id}"), None)
        .await
}

/// Waits until move `id` is in one of `phases`; returns its state then.
async fn wait_phase(cluster: &Cluster, id: u64, phases: &[&str]) -> Result<Value> {
    let started = Instant::now();
    loop {
        let m = phase_of(cluster, id).await?;
        let phase = m["phase"].as_str().unwrap_or_default();
        if phases.contains(&phase) {
            return Ok(m);
        }
        if started.elapsed() > MOVE_PHASE_TIMEOUT {
            bail!("move {id} still {phase} after {MOVE_PHASE_TIMEOUT:?}: {m}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One move of `workspace` to `to`, ended as `ending` says; with `kill_replicas`, a replica is
/// killed and restarted while the move freezes and again while it switches.
async fn one_move(
    cluster: Arc<Cluster>,
    workspace: String,
    from: &'static str,
    to: &'static str,
    ending: Ending,
    kill_replicas: Option<usize>,
) {
    let started = now_us();
    let outcome = drive_move(&cluster, &workspace, to, ending, kill_replicas).await;
    let (kind, detail) = match &outcome {
        Ok(phase) => {
            let mut counts = cluster.moves.lock().unwrap();
            match phase.as_str() {
                "done" => {
                    counts.done += 1;
                    cluster.homes.lock().unwrap().insert(workspace.clone(), to);
                }
                _ => counts.aborted += 1,
            }
            (
                if kill_replicas.is_some() {
                    "move+replica-kills"
                } else {
                    "move"
                },
                format!("{workspace} {from}->{to} {phase}"),
            )
        }
        Err(e) => {
            cluster.moves.lock().unwrap().unfinished += 1;
            (
                "move",
                format!("{workspace} {from}->{to} unfinished: {e:#}"),
            )
        }
    };
    cluster.moving.lock().unwrap().remove(&workspace);
    cluster.event(kind, detail, started);
}

async fn drive_move(
    cluster: &Cluster,
    workspace: &str,
    to: &str,
    ending: Ending,
    kill_replicas: Option<usize>,
) -> Result<String> {
    let body = json!({ "workspace": workspace, "to": to, "reason": "chaos" });
    let m = match cluster.api(Method::POST, "/v1/moves", Some(body)).await {
        Ok(m) => m,
        // A start retried after a cut-off answer finds the move it made.
        Err(e)
            if e.downcast_ref::<ApiError>()
                .is_some_and(|a| a.code == "move_in_progress") =>
        {
            let open = cluster
                .api(
                    Method::GET,
                    &format!("/v1/moves?workspace={workspace}&open=true"),
                    None,
                )
                .await?;
            open["moves"]
                .as_array()
                .and_then(|m| m.first())
                .cloned()
                .context("move_in_progress, and no open move")?
        }
        Err(e) => return Err(e),
    };
    let id = m["id"].as_u64().context("the move has no id")?;
    if let Some(replica) = kill_replicas {
        kill_and_restart_replica(cluster, replica, Duration::from_millis(800)).await?;
    }
    if let Ending::Abort { once_frozen: false } = ending {
        return abort(cluster, id).await;
    }
    wait_phase(cluster, id, &["frozen"]).await?;
    if let Ending::Abort { once_frozen: true } = ending {
        return abort(cluster, id).await;
    }
    let completed = cluster
        .api(
            Method::POST,
            &format!("/v1/moves/{id}/complete"),
            Some(json!({})),
        )
        .await;
    if let Err(e) = completed {
        // A retried `complete` whose first attempt went through is refused: look.
        let m = phase_of(cluster, id).await?;
        if !matches!(m["phase"].as_str(), Some("switching" | "done")) {
            return Err(e);
        }
    }
    if let Some(replica) = kill_replicas {
        kill_and_restart_replica(cluster, 1 - replica.min(1), Duration::from_millis(800)).await?;
    }
    let m = wait_phase(cluster, id, &["done"]).await?;
    Ok(m["phase"].as_str().unwrap_or_default().to_owned())
}

async fn abort(cluster: &Cluster, id: u64) -> Result<String> {
    let aborted = cluster
        .api(
            Method::POST,
            &format!("/v1/moves/{id}/abort"),
            Some(json!({})),
        )
        .await;
    if let Err(e) = aborted {
        let m = phase_of(cluster, id).await?;
        if m["phase"].as_str() != Some("aborted") {
            return Err(e);
        }
    }
    let m = wait_phase(cluster, id, &["aborted"]).await?;
    Ok(m["phase"].as_str().unwrap_or_default().to_owned())
}

async fn kill_and_restart_replica(cluster: &Cluster, index: usize, down: Duration) -> Result<()> {
    let started = now_us();
    cluster.kill_replica(index).await;
    tokio::time::sleep(down).await;
    cluster.start_replica(index).await?;
    cluster.event("replica-kill", format!("replica {index}"), started);
    Ok(())
}

/// Starts a move of a workspace with no open move, to a region other than its home.
fn spawn_move(
    cluster: &Arc<Cluster>,
    rng: &mut Rng,
    workspaces: &[String],
    ending: Ending,
    kill_replicas: bool,
) -> Option<tokio::task::JoinHandle<()>> {
    let workspace = {
        let mut moving = cluster.moving.lock().unwrap();
        let free: Vec<&String> = workspaces.iter().filter(|w| !moving.contains(*w)).collect();
        let pick = free.get(rng.below(free.len()))?.to_string();
        moving.insert(pick.clone());
        pick
    };
    let from = cluster.homes.lock().unwrap()[&workspace];
    let others: Vec<&'static str> = REGIONS
        .iter()
        .map(|(r, _)| *r)
        .filter(|r| *r != from)
        .collect();
    let to = others[rng.below(others.len())];
    let replica = kill_replicas.then(|| rng.below(2));
    Some(tokio::spawn(one_move(
        cluster.clone(),
        workspace,
        from,
        to,
        ending,
        replica,
    )))
}

async fn inject(cluster: &Arc<Cluster>, fault: Fault, rng: &mut Rng) -> Result<()> {
    let started = now_us();
    match fault {
        Fault::KillProxy => {
            let index = rng.below(REGIONS.len());
            if let Some(mut proxy) = cluster.proxies.lock().await[index].take() {
                cluster.kills.lock().unwrap().push((index, now_us()));
                kill9(&mut proxy.child).await;
            }
            tokio::time::sleep(rng.between(Duration::from_millis(200), Duration::from_secs(2)))
                .await;
            cluster.restart_proxy(index).await?;
            cluster.event("proxy-kill", format!("proxy {index}"), started);
        }
        Fault::KillReplica => {
            let index = rng.below(2);
            let down = rng.between(Duration::from_millis(300), Duration::from_secs(3));
            kill_and_restart_replica(cluster, index, down).await?;
        }
        Fault::StopOrigins => {
            let index = rng.below(REGIONS.len());
            cluster.origins.lock().await[index].stop().await;
            tokio::time::sleep(rng.between(Duration::from_secs(1), Duration::from_secs(4))).await;
            let mut origins = cluster.origins.lock().await;
            let slot = &mut origins[index];
            slot.live = Some(Origin::start(slot.region, slot.addr).await?);
            drop(origins);
            // The fault lasts until the proxies' health checks (every 500 ms) can have seen
            // the region again.
            tokio::time::sleep(Duration::from_secs(1)).await;
            cluster.event("origins-down", REGIONS[index].0.to_owned(), started);
        }
        Fault::CutControlPlane => {
            for relay in &cluster.relays {
                relay.cut.send_replace(true);
            }
            tokio::time::sleep(STALL_TIMEOUT + Duration::from_millis(1500)).await;
            for relay in &cluster.relays {
                relay.cut.send_replace(false);
            }
            cluster.event(
                "control-plane-unreachable",
                format!("{:?}", STALL_TIMEOUT + Duration::from_millis(1500)),
                started,
            );
        }
        Fault::CutDatabase => {
            let cut = cluster.schema.terminate_connections().await?;
            cluster.event("database-cut", format!("{cut} connections"), started);
        }
        Fault::MoveComplete | Fault::MoveAbort | Fault::MoveWithReplicaKills => {
            unreachable!("moves run as tasks of their own")
        }
    }
    Ok(())
}

async fn schedule(
    cluster: Arc<Cluster>,
    seed: u64,
    until: Instant,
    workspaces: Vec<String>,
) -> Result<()> {
    let mut rng = Rng(seed);
    // Every kind of fault once, in an order the seed draws, then draws by weight.
    let mut first: Vec<Fault> = Fault::ALL.to_vec();
    for i in (1..first.len()).rev() {
        first.swap(i, rng.below(i + 1));
    }
    let mut moves: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(rng.between(Duration::from_millis(300), Duration::from_millis(1500)))
            .await;
        let (fault, first_turn) = match first.pop() {
            Some(fault) => (fault, true),
            None => (Fault::draw(&mut rng), false),
        };
        moves.retain(|m| !m.is_finished());
        let ending = match fault {
            Fault::MoveAbort => Some(Ending::Abort {
                once_frozen: rng.chance(50),
            }),
            Fault::MoveComplete | Fault::MoveWithReplicaKills => Some(Ending::Complete),
            _ => None,
        };
        match ending {
            // At most three moves at once; a first turn skipped for it comes again later.
            Some(_) if moves.len() >= 3 => {
                if first_turn {
                    first.insert(0, fault);
                }
            }
            Some(ending) => {
                let kills = fault == Fault::MoveWithReplicaKills;
                moves.extend(spawn_move(&cluster, &mut rng, &workspaces, ending, kills));
            }
            None => inject(&cluster, fault, &mut rng).await?,
        }
    }
    for m in moves {
        let _ = m.await;
    }
    Ok(())
}

// ---- traffic ----

/// One client request and how it ended.
#[derive(Debug, Clone)]
struct Sent {
    proxy: usize,
    write: bool,
    start_us: i64,
    end_us: i64,
    /// 0: no answer.
    status: u16,
    refusal: Option<String>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn client_loop(
    cluster: Arc<Cluster>,
    task: usize,
    seed: u64,
    until: Instant,
    workspaces: Arc<Vec<String>>,
) -> HashMap<String, Sent> {
    let mut rng = Rng(mix(seed ^ ((task as u64 + 1) << 32)));
    let kept: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let fresh: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let h2: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let upload = Bytes::from(vec![b'u'; 64 * 1024]);
    let mut sent = HashMap::new();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let id = format!("chaos-{seed:x}-{task}-{n}");
        let proxy = rng.below(REGIONS.len());
        let addr = cluster.proxy_addrs.lock().unwrap()[proxy];
        let workspace = &workspaces[rng.below(workspaces.len())];
        let write = rng.chance(30);
        let client = match rng.below(3) {
            0 => &kept,
            1 => &fresh,
            _ => &h2,
        };
        let body = if write {
            upload.slice(..1024 + rng.below(63 * 1024))
        } else {
            Bytes::new()
        };
        let request = http::Request::builder()
            .method(if write { Method::POST } else { Method::GET })
            .uri(format!("http://{addr}/items/{n}"))
            .header("x-workspace-id", workspace.as_str())
            .header("x-request-id", &id)
            .body(Full::new(body))
            .expect("a valid request");
        let start_us = now_us();
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let response = client.request(request).await.ok()?;
            let status = response.status().as_u16();
            let refusal = crate::moves::refusal_code(response.headers());
            // An answer cut off mid-body is no answer.
            response.into_body().collect().await.ok()?;
            Some((status, refusal))
        })
        .await
        .ok()
        .flatten();
        let (status, refusal) = answer.unwrap_or((0, None));
        sent.insert(
            id,
            Sent {
                proxy,
                write,
                start_us,
                end_us: now_us(),
                status,
                refusal,
            },
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    sent
}

// ---- the run ----

/// Runs the cluster, the traffic and the faults for `options.duration`, then judges.
pub async fn run(options: Options) -> Result<Outcome> {
    let Some(schema) = domicile_control_plane::testing::postgres_schema().await else {
        bail!(
            "the chaos run needs PostgreSQL: {} is unreachable (set DATABASE_URL)",
            domicile_control_plane::testing::database_url()
        );
    };
    let dir = options.dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        dir.join("control-plane.toml"),
        "feed_heartbeat = \"1s\"\nstale_after = \"10s\"\npoll_interval = \"200ms\"\n",
    )?;
    let status = std::process::Command::new(&options.domicile)
        .args(["audit", "keygen", "--key"])
        .arg(dir.join("audit.key"))
        .arg("--public")
        .arg(dir.join("audit.pub"))
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "domicile audit keygen failed: {status}");

    // Origins, then the control plane and its map, then the proxies.
    let mut origins = Vec::new();
    for (region, _) in REGIONS {
        let origin = Origin::start(region, ([127, 0, 0, 1], 0).into()).await?;
        origins.push(OriginSlot {
            region,
            addr: origin.addr,
            live: Some(origin),
            served: Vec::new(),
        });
    }
    let origin_addrs: Vec<SocketAddr> = origins.iter().map(|o| o.addr).collect();
    let relays = vec![Relay::start().await?, Relay::start().await?];
    let cluster = Arc::new(Cluster {
        domicile: options.domicile.clone(),
        dir: dir.clone(),
        schema,
        admin_token: String::new(),
        replicas: tokio::sync::Mutex::new(vec![None, None]),
        relays,
        proxies: tokio::sync::Mutex::new((0..REGIONS.len()).map(|_| None).collect()),
        proxy_addrs: Mutex::new(vec![([127, 0, 0, 1], 0).into(); REGIONS.len()]),
        origins: tokio::sync::Mutex::new(origins),
        events: Mutex::new(Vec::new()),
        kills: Mutex::new(Vec::new()),
        moving: Mutex::new(HashSet::new()),
        homes: Mutex::new(HashMap::new()),
        moves: Mutex::new(MoveCounts::default()),
    });
    cluster.start_replica(0).await?;
    cluster.start_replica(1).await?;
    let admin_token = std::fs::read_to_string(dir.join("admin.token"))
        .context("the first replica wrote no admin token")?
        .trim()
        .to_owned();
    // The token is known only now; the cluster is not shared yet.
    let mut cluster = Arc::try_unwrap(cluster).map_err(|_| anyhow::anyhow!("shared too early"))?;
    cluster.admin_token = admin_token;
    let cluster = Arc::new(cluster);

    for (id, country) in REGIONS {
        let body = json!({ "jurisdiction": [country] });
        cluster
            .api(Method::PUT, &format!("/v1/regions/{id}"), Some(body))
            .await?;
    }
    let workspaces: Vec<String> = (0..options.workspaces.max(1))
        .map(|i| format!("chaos-ws-{i}"))
        .collect();
    for (i, workspace) in workspaces.iter().enumerate() {
        let region = REGIONS[i % REGIONS.len()].0;
        cluster
            .api(
                Method::PUT,
                &format!("/v1/workspaces/{workspace}"),
                Some(json!({ "region": region })),
            )
            .await?;
        cluster
            .homes
            .lock()
            .unwrap()
            .insert(workspace.clone(), region);
    }
    let token = cluster
        .api(
            Method::POST,
            "/v1/tokens",
            Some(json!({ "name": "chaos-proxy", "role": "proxy" })),
        )
        .await?;
    std::fs::write(
        dir.join("proxy.token"),
        token["token"].as_str().context("no proxy token")?,
    )?;
    for i in 0..REGIONS.len() {
        let home = dir.join(format!("edge-{i}"));
        std::fs::create_dir_all(&home)?;
        // Proxies 0 and 2 follow replica 0, proxy 1 replica 1.
        let relay = cluster.relays[i % 2].addr;
        std::fs::write(
            home.join("proxy.toml"),
            proxy_config(i, relay, &origin_addrs),
        )?;
        cluster.restart_proxy(i).await?;
    }
    let ready = wait_ready(&cluster, options.seed).await?;

    // Traffic and faults.
    eprintln!(
        "chaos: seed {} for {:?}, logs in {}",
        options.seed,
        options.duration,
        dir.display()
    );
    let began = Instant::now();
    let until = began + options.duration;
    let workspaces = Arc::new(workspaces);
    let clients: Vec<_> = (0..options.clients.max(1))
        .map(|task| {
            tokio::spawn(client_loop(
                cluster.clone(),
                task,
                options.seed,
                until,
                workspaces.clone(),
            ))
        })
        .collect();
    // Faults stop a few seconds early, so the last of them has ended under traffic.
    let faults = schedule(
        cluster.clone(),
        options.seed,
        until - Duration::from_secs(5).min(options.duration / 4),
        workspaces.to_vec(),
    )
    .await;
    let mut sent = ready;
    for client in clients {
        sent.extend(client.await?);
    }
    faults?;
    let ran = began.elapsed();

    // Stop everything cleanly, so each log ends with a shutdown checkpoint.
    for proxy in cluster.proxies.lock().await.iter_mut().flatten() {
        terminate(&mut proxy.child, Duration::from_secs(10)).await;
    }
    let mut served: Vec<Seen> = Vec::new();
    let mut served_by: Vec<&'static str> = Vec::new();
    for slot in cluster.origins.lock().await.iter_mut() {
        slot.stop().await;
        served_by.extend(std::iter::repeat_n(slot.region, slot.served.len()));
        served.append(&mut slot.served);
    }
    let mut history = HashMap::new();
    for workspace in workspaces.iter() {
        let h = cluster
            .api(
                Method::GET,
                &format!("/v1/map/history?workspace={workspace}"),
                None,
            )
            .await?;
        history.insert(workspace.clone(), History::from_api(&h)?);
    }
    for replica in cluster.replicas.lock().await.iter_mut().flatten() {
        terminate(&mut replica.child, Duration::from_secs(10)).await;
    }

    let mut records = Vec::new();
    let mut verdict = Verdict::default();
    for i in 0..REGIONS.len() {
        let audit = dir.join(format!("edge-{i}")).join("audit");
        records.extend(read_audit(&audit)?);
        let out = std::process::Command::new(&options.domicile)
            .args(["audit", "verify"])
            .arg(&audit)
            .arg("--key")
            .arg(dir.join("audit.pub"))
            .output()?;
        std::fs::write(
            dir.join(format!("edge-{i}")).join("verify.txt"),
            [out.stdout, out.stderr].concat(),
        )?;
        verdict.logs_verified += 1;
        if !out.status.success() {
            verdict.verify_failed.push(format!(
                "edge-{i} (exit {})",
                out.status.code().unwrap_or(-1)
            ));
        }
    }
    let served: Vec<Served> = served
        .iter()
        .zip(served_by)
        .filter_map(|(seen, region)| Served::from_seen(seen, region))
        .collect();
    let kills = cluster.kills.lock().unwrap().clone();
    judge(&mut verdict, &sent, &served, &records, &history, &kills);

    let events = cluster.events.lock().unwrap().clone();
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    for e in &events {
        *faults.entry(e.kind).or_default() += 1;
    }
    let counts = std::mem::take(&mut *cluster.moves.lock().unwrap());
    let report = Report {
        date: crate::compare::utc_date((now_us() / 1_000_000) as u64),
        host: host_name(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        seed: options.seed,
        planned_seconds: options.duration.as_secs(),
        duration_seconds: ran.as_secs_f64(),
        clients: options.clients,
        workspaces: workspaces.len(),
        requests: sent.len() as u64,
        origin_requests: served.len() as u64,
        audit_records: records.len() as u64,
        moves_done: counts.done,
        moves_aborted: counts.aborted,
        moves_unfinished: counts.unfinished,
        faults,
        phases: phases(&sent, &events),
        verdict,
        events,
        logs: Some(dir.display().to_string()),
    };
    let md = markdown(&report);
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    if let Some(results) = &options.results_dir {
        let mut stem = format!("{}-{}-chaos", report.date, report.host);
        if let Some(label) = &options.label {
            stem.push('-');
            stem.push_str(label);
        }
        let kept = Report {
            logs: None,
            ..report.clone()
        };
        write_report(results, &stem, &kept, &markdown(&kept))?;
    }
    Ok(Outcome {
        report,
        markdown: md,
    })
}

/// Waits until every proxy routes: each answers a request for a workspace of each region.
/// Returns these requests, which are judged with the rest.
async fn wait_ready(cluster: &Cluster, seed: u64) -> Result<HashMap<String, Sent>> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(60);
    let addrs = cluster.proxy_addrs.lock().unwrap().clone();
    let mut sent = HashMap::new();
    for (proxy, addr) in addrs.into_iter().enumerate() {
        for i in 0..REGIONS.len() {
            loop {
                let id = format!("chaos-{seed:x}-ready-{}", sent.len());
                let request = http::Request::builder()
                    .uri(format!("http://{addr}/ready"))
                    .header("x-workspace-id", format!("chaos-ws-{i}"))
                    .header("x-request-id", &id)
                    .body(Full::new(Bytes::new()))?;
                let start_us = now_us();
                let mut status = 0;
                if let Ok(response) = client.request(request).await {
                    status = response.status().as_u16();
                    if response.into_body().collect().await.is_err() {
                        status = 0;
                    }
                }
                let end_us = now_us();
                sent.insert(
                    id,
                    Sent {
                        proxy,
                        write: false,
                        start_us,
                        end_us,
                        status,
                        refusal: None,
                    },
                );
                if (200..300).contains(&status) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("proxy {addr} did not route chaos-ws-{i} within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(sent)
}

// ---- judging ----

/// A workspace's entry at each version it changed, and when.
#[derive(Debug, Default)]
struct History {
    /// (version, region, frozen, at in µs), by version.
    entries: Vec<(u64, String, bool, i64)>,
}

impl History {
    fn from_api(value: &Value) -> Result<Self> {
        let mut entries = Vec::new();
        for h in value["history"].as_array().context("no history")? {
            let at = h["at"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .context("a history entry without a time")?;
            entries.push((
                h["version"]
                    .as_u64()
                    .context("a history entry without a version")?,
                h["region"].as_str().unwrap_or_default().to_owned(),
                h["state"].as_str() == Some("frozen"),
                at.as_micros() as i64,
            ));
        }
        entries.sort_by_key(|e| e.0);
        Ok(Self { entries })
    }

    /// The entry in force at map version `version`.
    fn at_version(&self, version: u64) -> Option<&(u64, String, bool, i64)> {
        self.entries.iter().rev().find(|e| e.0 <= version)
    }

    /// The newest entry written before `at_us`.
    fn at_time(&self, at_us: i64) -> Option<&(u64, String, bool, i64)> {
        self.entries.iter().rev().find(|e| e.3 < at_us)
    }
}

/// One request as an origin served it.
#[derive(Debug)]
struct Served {
    region: &'static str,
    workspace: String,
    request_id: String,
    version: Option<u64>,
    write: bool,
    at_us: i64,
}

impl Served {
    fn from_seen(seen: &Seen, region: &'static str) -> Option<Self> {
        Some(Self {
            region,
            workspace: seen.headers.get("x-workspace-id")?.clone(),
            request_id: seen
                .headers
                .get("x-request-id")
                .cloned()
                .unwrap_or_default(),
            version: seen
                .headers
                .get("x-domicile-map-version")
                .and_then(|v| v.parse().ok()),
            write: !matches!(seen.method.as_str(), "GET" | "HEAD" | "OPTIONS"),
            at_us: seen.at_us,
        })
    }
}

/// The fields of an audit record the judge reads.
#[derive(Debug)]
struct AuditRecord {
    proxy: String,
    request_id: String,
    decision: String,
    workspace: Option<String>,
    upstream_region: Option<String>,
    map_version: Option<u64>,
    /// Rebuilt from the forward journal after a crash: sent, or about to be sent.
    recovered: bool,
}

fn read_audit(dir: &Path) -> Result<Vec<AuditRecord>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        for line in std::fs::read_to_string(&file)?.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue; // a torn last line of a killed run: verify judges it
            };
            if v["type"] != "record" {
                continue;
            }
            let text = |k: &str| v[k].as_str().map(str::to_owned);
            out.push(AuditRecord {
                proxy: text("proxy_id").unwrap_or_default(),
                request_id: text("request_id").unwrap_or_default(),
                decision: text("decision").unwrap_or_default(),
                workspace: text("workspace"),
                upstream_region: text("upstream_region"),
                map_version: v["map_version"].as_u64(),
                recovered: v["recovered"].as_bool().unwrap_or(false),
            });
        }
    }
    Ok(out)
}

/// Whether a request of `sent` may have lost its record with its proxy: the proxy was killed
/// while it was in flight, or within the crash window after it ended.
fn lost_in_crash(sent: &Sent, kills: &[(usize, i64)]) -> bool {
    let window = CRASH_WINDOW.as_micros() as i64;
    kills.iter().any(|&(proxy, at)| {
        proxy == sent.proxy
            && sent.start_us <= at
            && (sent.status == 0 || sent.end_us >= at - window)
    })
}

fn judge(
    verdict: &mut Verdict,
    sent: &HashMap<String, Sent>,
    served: &[Served],
    records: &[AuditRecord],
    history: &HashMap<String, History>,
    kills: &[(usize, i64)],
) {
    let empty = History::default();
    let history_of = |w: &str| history.get(w).unwrap_or(&empty);

    // Residency, from what the origins served.
    for s in served {
        let h = history_of(&s.workspace);
        match s.version.and_then(|v| h.at_version(v)) {
            Some((_, home, frozen, _)) => {
                if home != s.region {
                    verdict.misrouted += 1;
                    verdict.example(format!(
                        "misrouted: {} for {} served in {} at map version {:?}, home {home}",
                        s.request_id, s.workspace, s.region, s.version
                    ));
                } else if *frozen && s.write {
                    verdict.frozen_writes += 1;
                    verdict.example(format!(
                        "frozen write: {} for {} served in {} at map version {:?}",
                        s.request_id, s.workspace, s.region, s.version
                    ));
                }
            }
            None => {
                verdict.misrouted += 1;
                verdict.example(format!(
                    "misrouted: {} for {} served in {} with map version {:?}, which has no entry \
                     for it",
                    s.request_id, s.workspace, s.region, s.version
                ));
            }
        }
        if s.write {
            if let Some((version, home, _, _)) = h.at_time(s.at_us) {
                if home != s.region {
                    verdict.writes_at_old_home += 1;
                    verdict.example(format!(
                        "write at old home: {} for {} served in {} after version {version} made \
                         {home} its home",
                        s.request_id, s.workspace, s.region
                    ));
                }
            }
        }
        if !sent.contains_key(&s.request_id) {
            verdict.unknown_requests += 1;
            verdict.example(format!(
                "unknown request: {} served in {}",
                s.request_id, s.region
            ));
        }
    }

    // The audit logs against the origins and the clients.
    let mut by_id: HashMap<&str, Vec<&AuditRecord>> = HashMap::new();
    for r in records {
        by_id.entry(r.request_id.as_str()).or_default().push(r);
        if r.decision == "forwarded" {
            let home = r
                .workspace
                .as_deref()
                .zip(r.map_version)
                .and_then(|(w, v)| history_of(w).at_version(v));
            if home.map(|h| h.1.as_str()) != r.upstream_region.as_deref() {
                verdict.misrouted += 1;
                verdict.example(format!(
                    "misrouted (audit): {} by {} to {:?} at map version {:?}",
                    r.request_id, r.proxy, r.upstream_region, r.map_version
                ));
            }
        }
    }
    for (id, rs) in &by_id {
        if rs.len() > 1 {
            verdict.duplicate_records += 1;
            verdict.example(format!("duplicate records: {id} has {}", rs.len()));
        }
    }
    let mut served_ids: HashMap<&str, HashSet<&str>> = HashMap::new();
    for s in served {
        served_ids
            .entry(s.request_id.as_str())
            .or_default()
            .insert(s.region);
    }
    let missing = |id: &str, what: &str, verdict: &mut Verdict| match sent.get(id) {
        Some(s) if lost_in_crash(s, kills) => verdict.lost_in_crash += 1,
        _ => {
            verdict.unaudited += 1;
            verdict.example(format!("unaudited: {id} {what}"));
        }
    };
    for (id, regions) in &served_ids {
        for region in regions {
            let recorded = by_id.get(id).is_some_and(|rs| {
                rs.iter()
                    .any(|r| r.upstream_region.as_deref() == Some(*region))
            });
            if !recorded {
                // Data left the edge: no crash excuses a missing record.
                verdict.unaudited += 1;
                verdict.example(format!(
                    "unaudited: {id} served in {region}, no record of it"
                ));
            }
        }
    }
    for (id, s) in sent {
        if s.status != 0
            && !by_id.contains_key(id.as_str())
            && !served_ids.contains_key(id.as_str())
        {
            missing(
                id,
                &format!("answered {} with no record", s.status),
                verdict,
            );
        }
    }
    for r in records {
        // A recovered record says the request may have gone: its proxy died around the send.
        if r.decision != "forwarded" || r.recovered {
            continue;
        }
        let seen = served_ids
            .get(r.request_id.as_str())
            .is_some_and(|regions| {
                r.upstream_region
                    .as_deref()
                    .is_some_and(|u| regions.contains(u))
            });
        if !seen {
            verdict.orphan_records += 1;
            verdict.example(format!(
                "orphan record: {} by {} says forwarded to {:?}; no origin there served it",
                r.request_id, r.proxy, r.upstream_region
            ));
        }
    }
}

/// Requests by the faults active when they started.
fn phases(sent: &HashMap<String, Sent>, events: &[FaultEvent]) -> BTreeMap<String, Phase> {
    let mut out: BTreeMap<String, Phase> = BTreeMap::new();
    for s in sent.values() {
        let mut active: Vec<&str> = events
            .iter()
            .filter(|e| e.start_us <= s.start_us && s.start_us <= e.end_us)
            .map(|e| e.kind)
            .collect();
        active.sort_unstable();
        active.dedup();
        let mut label = if active.is_empty() {
            "steady".to_owned()
        } else {
            active.join("+")
        };
        label.push_str(if s.write { " (writes)" } else { " (reads)" });
        let phase = out.entry(label).or_default();
        phase.requests += 1;
        match (s.status, &s.refusal) {
            (0, _) => phase.no_answer += 1,
            (200..=299, _) => phase.ok_2xx += 1,
            (_, Some(code)) => *phase.refusals.entry(code.clone()).or_default() += 1,
            (status, None) => *phase.other_status.entry(status).or_default() += 1,
        }
    }
    for phase in out.values_mut() {
        phase.ok_percent = 100.0 * phase.ok_2xx as f64 / phase.requests.max(1) as f64;
    }
    out
}

fn markdown(r: &Report) -> String {
    let mut md = format!(
        "# Chaos: seed {seed}, {secs:.0} s, {date} on {host} ({cpus} CPUs)\n\n\
         `{verdict}`\n\n\
         3 proxies (`domicile proxy`), 2 control-plane replicas on PostgreSQL, origins for \
         3 regions; {clients} client loops over {ws} workspaces (GET and uploads of 1 to 64 KiB, \
         HTTP/1.1 kept-alive and new connections, HTTP/2).\n\n\
         | measure | value |\n| --- | --- |\n\
         | client requests | {requests} |\n| served by origins | {origin} |\n\
         | audit records | {records} |\n\
         | moves done / aborted / unfinished | {done} / {aborted} / {unfinished} |\n",
        seed = r.seed,
        secs = r.duration_seconds,
        date = r.date,
        host = r.host,
        cpus = r.cpus,
        verdict = r.verdict.line(),
        clients = r.clients,
        ws = r.workspaces,
        requests = r.requests,
        origin = r.origin_requests,
        records = r.audit_records,
        done = r.moves_done,
        aborted = r.moves_aborted,
        unfinished = r.moves_unfinished,
    );
    for (kind, n) in &r.faults {
        md.push_str(&format!("| fault: {kind} | {n} |\n"));
    }
    md.push_str(
        "\n## Availability by phase\n\nRequests by the faults active when they started.\n\n\
         | phase | requests | 2xx | refusals | other answers | no answer |\n\
         | --- | ---: | ---: | --- | --- | ---: |\n",
    );
    for (label, p) in &r.phases {
        let join = |m: Vec<String>| {
            if m.is_empty() {
                "-".to_owned()
            } else {
                m.join(", ")
            }
        };
        md.push_str(&format!(
            "| {label} | {} | {:.1} % | {} | {} | {} |\n",
            p.requests,
            p.ok_percent,
            join(p.refusals.iter().map(|(c, n)| format!("{c} {n}")).collect()),
            join(
                p.other_status
                    .iter()
                    .map(|(c, n)| format!("{c} {n}"))
                    .collect()
            ),
            p.no_answer,
        ));
    }
    if !r.verdict.examples.is_empty() {
        md.push_str("\n## Violations (examples)\n\n");
        for e in &r.verdict.examples {
            md.push_str(&format!("- {e}\n"));
        }
    }
    md.push('\n');
    if let Some(logs) = &r.logs {
        md.push_str(&format!("Logs: `{logs}`. "));
    }
    md.push_str(&format!(
        "Replay: `cargo run --release -p loadtest -- chaos --seed {} --duration {}s --clients {} --workspaces {}`.\n",
        r.seed,
        r.planned_seconds,
        r.clients,
        r.workspaces
    ));
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(proxy: usize, start_us: i64, end_us: i64, status: u16) -> Sent {
        Sent {
            proxy,
            write: false,
            start_us,
            end_us,
            status,
            refusal: None,
        }
    }

    fn history(entries: &[(u64, &str, bool, i64)]) -> History {
        History {
            entries: entries
                .iter()
                .map(|(v, r, f, at)| (*v, (*r).to_owned(), *f, *at))
                .collect(),
        }
    }

    fn served(region: &'static str, id: &str, version: u64, write: bool, at_us: i64) -> Served {
        Served {
            region,
            workspace: "w".into(),
            request_id: id.into(),
            version: Some(version),
            write,
            at_us,
        }
    }

    fn record(id: &str, region: &str, version: u64) -> AuditRecord {
        AuditRecord {
            proxy: "p".into(),
            request_id: id.into(),
            decision: "forwarded".into(),
            workspace: Some("w".into()),
            upstream_region: Some(region.into()),
            map_version: Some(version),
            recovered: false,
        }
    }

    /// A move of `w` from us to eu: frozen at 10 (t=1000), switched at 11 (t=2000), active
    /// at eu at 12 (t=3000).
    fn moved() -> HashMap<String, History> {
        HashMap::from([(
            "w".to_owned(),
            history(&[
                (1, "us", false, 0),
                (10, "us", true, 1000),
                (11, "eu", true, 2000),
                (12, "eu", false, 3000),
            ]),
        )])
    }

    fn judged(served: &[Served], records: &[AuditRecord], kills: &[(usize, i64)]) -> Verdict {
        let ids = served
            .iter()
            .map(|s| s.request_id.clone())
            .chain(records.iter().map(|r| r.request_id.clone()));
        let sent = ids.map(|id| (id, sent(0, 0, 10, 200))).collect();
        let mut v = Verdict {
            logs_verified: 1,
            ..Verdict::default()
        };
        judge(&mut v, &sent, served, records, &moved(), kills);
        v
    }

    #[test]
    fn a_clean_run_passes() {
        let s = [
            served("us", "a", 1, true, 500),
            served("us", "b", 10, false, 1500),
            served("eu", "c", 11, false, 2500),
            served("eu", "d", 12, true, 3500),
        ];
        let r = [
            record("a", "us", 1),
            record("b", "us", 10),
            record("c", "eu", 11),
            record("d", "eu", 12),
        ];
        let v = judged(&s, &r, &[]);
        assert!(v.ok(), "{v:?}");
        // A recovered record with no origin request behind it is no orphan: it may not have
        // left before its proxy died.
        let mut recovered = record("e", "eu", 12);
        recovered.recovered = true;
        let mut with_recovered: Vec<AuditRecord> = r.into_iter().collect();
        with_recovered.push(recovered);
        let v = judged(&s, &with_recovered, &[]);
        assert!(v.ok(), "{v:?}");
        assert!(v
            .line()
            .starts_with("PASS: misrouted 0, unaudited 0, orphan records 0, verify ok"));
    }

    #[test]
    fn each_violation_is_found_and_named() {
        // Served in us at a version where eu is home; a write while frozen; a write at us
        // after the switch; a request without a record; a record without a request.
        let s = [
            served("us", "a", 11, false, 2500),
            served("us", "b", 10, true, 1500),
            served("us", "c", 1, true, 2100),
            served("eu", "d", 12, false, 3500),
        ];
        let r = [
            record("a", "us", 11),
            record("b", "us", 10),
            record("c", "us", 1),
            record("e", "eu", 12),
            record("e", "eu", 12),
        ];
        let v = judged(&s, &r, &[]);
        assert_eq!(
            v.misrouted, 2,
            "origin and audit both say a left home: {v:?}"
        );
        assert_eq!(v.frozen_writes, 1);
        assert_eq!(v.writes_at_old_home, 1);
        assert_eq!(v.unaudited, 1, "d");
        assert_eq!(v.orphan_records, 2, "e, twice");
        assert_eq!(v.duplicate_records, 1);
        assert!(!v.ok());
        assert!(v.line().starts_with("FAIL"));
    }

    #[test]
    fn a_forward_without_a_record_is_unaudited_even_at_a_kill() {
        let s = [served("us", "a", 1, false, 500)];
        // The judge's clients all used proxy 0 from t=0 to 10; kill it at t=5.
        let v = judged(&s, &[], &[(0, 5)]);
        assert_eq!(v.unaudited, 1, "{v:?}");
        assert_eq!(v.lost_in_crash, 0);
        // An answered refusal the kill took from the queue is reported, not failed.
        let v = judged(&[], &[], &[(0, 5)]);
        assert!(v.ok(), "{v:?}");
        let mut sent_only = HashMap::new();
        sent_only.insert("r".to_owned(), sent(0, 0, 10, 503));
        let mut v = Verdict {
            logs_verified: 1,
            ..Verdict::default()
        };
        judge(&mut v, &sent_only, &[], &[], &moved(), &[(0, 5)]);
        assert_eq!((v.unaudited, v.lost_in_crash), (0, 1), "{v:?}");
        let mut v = Verdict {
            logs_verified: 1,
            ..Verdict::default()
        };
        judge(&mut v, &sent_only, &[], &[], &moved(), &[]);
        assert_eq!((v.unaudited, v.lost_in_crash), (1, 0), "{v:?}");
    }

    #[test]
    fn only_requests_at_a_kill_count_as_lost_with_the_process() {
        // Well past the crash window from the run's start, so that "long before" exists.
        let kill = 10 * CRASH_WINDOW.as_micros() as i64;
        let kills = [(1, kill)];
        // In flight at the kill, on the killed proxy.
        assert!(lost_in_crash(&sent(1, kill - 10, kill + 5, 0), &kills));
        // Ended just before it (its record could still be in the queue).
        assert!(lost_in_crash(
            &sent(1, kill - 5000, kill - 1000, 200),
            &kills
        ));
        // Ended long before, another proxy, or started after it: a real loss.
        assert!(!lost_in_crash(&sent(1, 0, 10, 200), &kills));
        assert!(!lost_in_crash(&sent(0, kill - 10, kill + 5, 0), &kills));
        assert!(!lost_in_crash(&sent(1, kill + 10, kill + 20, 0), &kills));
    }

    #[test]
    fn the_schedule_is_the_seed_s() {
        let draw = |seed| {
            let mut rng = Rng(seed);
            (0..50).map(|_| Fault::draw(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let all = draw(7);
        assert!(Fault::ALL.iter().filter(|f| all.contains(f)).count() >= 6);
    }
}
