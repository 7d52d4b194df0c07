//! Following the control plane's map: snapshot, then the change stream, applied into the
//! [`Replica`] one change at a time; the last-known-good map kept on disk so the proxy routes
//! at start even when the control plane is down; heartbeats to the fleet.
//!
//! ```text
//! start ── load last-known-good (if any) ──► serve
//!   │
//!   └─► loop: [no map, 410, gap, version backwards, new epoch] ─► GET /v1/map/snapshot
//!             GET /v1/map/changes?after=V ─► apply ─► append to journal + fsync ─► heartbeat
//!               (or, with [control_plane.nats], the NATS fan-out tier: [`nats`])
//!             error ─► reconnect after a jittered, doubling delay
//! ```
//!
//! The last-known-good map is two files: a base map in map-file format (written to a
//! temporary file, fsynced, renamed) and a journal of the changes applied since, appended
//! and fsynced before the version they reach is heartbeated. The journal is folded into a
//! new base when it grows past half the base (and 4 MiB). A torn last journal line (a crash in
//! the middle of an append) is ignored: it was never acknowledged. A base that does not hold
//! what its header promises is refused whole, and the proxy waits for the control plane
//! rather than serve part of a map.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use domicile_wire::{Checksum, FeedLine, Heartbeat, HeartbeatReply, Op};
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use crate::config::ControlPlaneSection;
use crate::metrics::Metrics;
use crate::route::map::{CatalogueRegion, MapEntry, MapTable, Regions, Replica, WorkspaceState};
use crate::route::mapfile::{self, entry_hash, MapBuilder, MapFileError};
use crate::route::workspace_id::WorkspaceId;

mod nats;

/// Where the proxy's map stands, as the sync task last published it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncState {
    /// The version the replica routes with.
    pub applied: Option<u64>,
    /// The version persisted as last-known-good (what heartbeats report).
    pub persisted: Option<u64>,
    /// The newest persisted version that a move may be waiting for this proxy to drain: one
    /// that froze a workspace (a move's freeze or switch), a snapshot, or the head the proxy
    /// caught up with after (re)connecting. Heartbeats report it at once, and again as soon
    /// as it is drained; any other version waits for the next periodic heartbeat.
    pub prompt: Option<u64>,
    /// The map checksum at `persisted`.
    pub checksum: Option<Checksum>,
    /// The control-plane epoch the map came from.
    pub epoch: Option<String>,
    /// Whether a change stream is open right now.
    pub streaming: bool,
    /// Snapshots fetched since start.
    pub snapshots: u64,
}

/// The running sync task.
#[derive(Debug)]
pub struct SyncHandle {
    pub state: watch::Receiver<SyncState>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl SyncHandle {
    /// Stops following the control plane and waits for the task to end.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Waits until the replica routes with at least `version`.
    pub async fn wait_for_version(&self, version: u64) -> SyncState {
        let mut state = self.state.clone();
        let reached = state
            .wait_for(|s| s.applied.is_some_and(|v| v >= version))
            .await
            .map(|s| s.clone());
        reached.unwrap_or_else(|_| self.state.borrow().clone())
    }
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("cannot reach the control plane: {0}")]
    Http(String),
    #[error("the control plane answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("the snapshot is invalid: {0}")]
    Snapshot(#[from] MapFileError),
    #[error("{0}")]
    Token(String),
    #[error("cannot persist the last-known-good map: {0}")]
    Persist(std::io::Error),
    #[error("the change stream stalled for {0:?}")]
    Stalled(Duration),
    #[error("the change stream ended")]
    Ended,
    #[error("NATS: {0}")]
    Nats(String),
    #[error("stopping")]
    Stopped,
}

/// Why the proxy drops its map position and fetches a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// 410: the change log no longer reaches back to our version.
    Gone,
    /// A change skipped a version.
    Gap,
    /// The control plane's head is older than our version (a restored store).
    Backwards,
    /// Another control-plane epoch (a new store).
    Epoch,
    /// A change the proxy cannot apply (names an unknown region, a bad id).
    Invalid,
}

// The metrics keep one counter per reason.
const _: () = assert!(Resync::ALL.len() == crate::metrics::RESYNC_REASONS);

impl Resync {
    pub const ALL: [Resync; 5] = [
        Resync::Gone,
        Resync::Gap,
        Resync::Backwards,
        Resync::Epoch,
        Resync::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Resync::Gone => "gone",
            Resync::Gap => "gap",
            Resync::Backwards => "backwards",
            Resync::Epoch => "epoch",
            Resync::Invalid => "invalid_change",
        }
    }
}

/// The map as the sync task tracks it, beside the replica's table.
pub(crate) struct Position {
    pub(crate) epoch: String,
    pub(crate) version: u64,
    pub(crate) checksum: Checksum,
    pub(crate) catalogue: Vec<CatalogueRegion>,
}

/// Applies one change line to `table` (and `catalogue`); the caller publishes the version.
/// Returns whether the region catalogue changed.
fn apply_change(
    table: &MapTable,
    regions: &Regions,
    pos: &mut Position,
    line: &FeedLine,
) -> Result<bool, String> {
    match line {
        FeedLine::Workspace {
            version,
            id,
            op,
            entry,
        } => {
            let ws = WorkspaceId::parse(id.as_bytes())
                .map_err(|e| format!("workspace id {id:?}: {e}"))?;
            // Everything that can fail is checked before anything changes.
            let new = match (op, entry) {
                (Op::Put, Some(body)) => {
                    if !pos.catalogue.iter().any(|r| r.id == body.region) {
                        return Err(format!(
                            "workspace {id:?} names region {:?}, which the map does not list",
                            body.region
                        ));
                    }
                    let home_region = regions.intern(&body.region).map_err(|e| e.to_string())?;
                    Some(MapEntry {
                        home_region,
                        state: match body.state {
                            domicile_wire::State::Active => WorkspaceState::Active,
                            domicile_wire::State::Frozen => WorkspaceState::Frozen,
                        },
                        epoch: body.epoch,
                        version: *version,
                    })
                }
                (Op::Delete, _) => None,
                (Op::Put, None) => return Err(format!("a put of {id:?} without an entry")),
            };
            let old = match table.get(ws.as_bytes()) {
                Some(old) => Some((
                    old,
                    regions
                        .id(old.home_region)
                        .ok_or("an entry names a region that was never interned")?,
                )),
                None => None,
            };
            if let Some((old, region)) = old {
                pos.checksum.remove(entry_hash(ws.as_str(), &region, &old));
            }
            match (new, entry) {
                (Some(new), Some(body)) => {
                    pos.checksum
                        .add(entry_hash(ws.as_str(), &body.region, &new));
                    table.insert(&ws, new);
                }
                _ => {
                    table.remove(ws.as_bytes());
                }
            }
            Ok(false)
        }
        FeedLine::Region { id, op, entry, .. } => {
            let region = match (op, entry) {
                (Op::Put, Some(body)) => {
                    let mut jurisdiction = Vec::new();
                    for code in &body.jurisdiction {
                        let b = code.as_bytes();
                        if b.len() != 2 || !b.iter().all(u8::is_ascii_alphabetic) {
                            return Err(format!("region {id:?}: bad country code {code:?}"));
                        }
                        jurisdiction.push([b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()]);
                    }
                    regions.intern(id).map_err(|e| e.to_string())?;
                    Some(CatalogueRegion {
                        id: id.clone(),
                        name: body.name.clone(),
                        jurisdiction,
                    })
                }
                (Op::Delete, _) => None,
                (Op::Put, None) => return Err(format!("a put of region {id:?} without a body")),
            };
            pos.catalogue.retain(|r| r.id != *id);
            pos.catalogue.extend(region);
            Ok(true)
        }
        FeedLine::Hello { .. } | FeedLine::Heartbeat { .. } => Ok(false),
    }
}

/// What one line of the change stream did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// The stream's first line: the control plane's head when it opened.
    Hello {
        head: u64,
    },
    Heartbeat,
    /// A change, applied and published: `pos.version` is its version. `prompt` when a move
    /// may be waiting for it (see [`SyncState::prompt`]).
    Applied {
        prompt: bool,
    },
}

/// Whether a move may wait for the fleet to drain this change: it puts a workspace in the
/// frozen state (a move's freeze, or its switch to the new home, still frozen).
fn awaited_by_moves(line: &FeedLine) -> bool {
    matches!(
        line,
        FeedLine::Workspace {
            op: Op::Put,
            entry: Some(domicile_wire::WorkspaceBody {
                state: domicile_wire::State::Frozen,
                ..
            }),
            ..
        }
    )
}

/// Takes one line of the live change stream (without its line feed): a hello or heartbeat
/// is checked against `pos`, a change must carry the next version and is applied to the
/// replica's table and published. Anything else ends the stream with the reason to resync;
/// the table is then as it was before the line.
pub(crate) fn take_line(
    replica: &Replica,
    pos: &mut Position,
    text: &[u8],
) -> Result<Taken, Resync> {
    let line: FeedLine = match serde_json::from_slice(text) {
        Ok(line) => line,
        Err(e) => {
            tracing::warn!("unreadable change line: {e}");
            return Err(Resync::Invalid);
        }
    };
    match &line {
        FeedLine::Hello { epoch, head } | FeedLine::Heartbeat { epoch, head } => {
            if *epoch != pos.epoch {
                return Err(Resync::Epoch);
            }
            if *head < pos.version {
                return Err(Resync::Backwards);
            }
            Ok(if matches!(line, FeedLine::Hello { .. }) {
                Taken::Hello { head: *head }
            } else {
                Taken::Heartbeat
            })
        }
        change => {
            let version = change.version().unwrap_or_default();
            if Some(version) != pos.version.checked_add(1) {
                return Err(if version <= pos.version {
                    Resync::Backwards
                } else {
                    Resync::Gap
                });
            }
            let Some(table) = replica.table() else {
                return Err(Resync::Invalid);
            };
            match apply_change(&table, replica.regions(), pos, change) {
                Ok(changed) => {
                    if changed {
                        if let Err(e) = replica.regions().set_catalogue(&pos.catalogue) {
                            tracing::warn!("cannot apply a region change: {e}");
                            return Err(Resync::Invalid);
                        }
                    }
                    pos.version = version;
                    table.publish_version(version);
                    Ok(Taken::Applied {
                        prompt: awaited_by_moves(change),
                    })
                }
                Err(e) => {
                    tracing::warn!(version, "cannot apply a change: {e}");
                    Err(Resync::Invalid)
                }
            }
        }
    }
}

/// The last-known-good files: a base map and a journal of changes since.
struct LastKnownGood {
    base: PathBuf,
    journal: PathBuf,
    file: Option<std::fs::File>,
    journal_bytes: u64,
    base_bytes: u64,
}

impl LastKnownGood {
    fn new(base: PathBuf) -> Self {
        let mut journal = base.clone().into_os_string();
        journal.push(".journal");
        Self {
            base,
            journal: journal.into(),
            file: None,
            journal_bytes: 0,
            base_bytes: 0,
        }
    }

    /// Loads the base and replays the journal. `Ok(None)` when there is no base yet.
    fn load(
        &mut self,
        replica: &Replica,
    ) -> Result<Option<(MapTable, Position, usize)>, MapFileError> {
        if !self.base.exists() {
            return Ok(None);
        }
        let loaded = mapfile::load(&self.base, replica)?;
        let Some(epoch) = loaded.epoch else {
            return Err(MapFileError::Invalid {
                path: self.base.clone(),
                errors: vec!["  the map names no control-plane epoch".into()],
            });
        };
        self.base_bytes = std::fs::metadata(&self.base).map_or(0, |m| m.len());
        let table = loaded.table;
        let mut pos = Position {
            epoch,
            version: table.version(),
            checksum: loaded.checksum,
            catalogue: loaded.regions,
        };
        let mut replayed = 0;
        match std::fs::File::open(&self.journal) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                path = %self.journal.display(),
                "cannot read the last-known-good journal, using the base map alone: {e}"
            ),
            Ok(file) => {
                let mut lines = std::io::BufReader::new(file).lines();
                let first = lines.next().and_then(|l| l.ok());
                let hello = first.and_then(|l| serde_json::from_str::<FeedLine>(&l).ok());
                match hello {
                    Some(FeedLine::Hello { epoch, head })
                        if epoch == pos.epoch && head == pos.version =>
                    {
                        for (n, line) in lines.enumerate() {
                            let Ok(line) = line else { break };
                            let change = serde_json::from_str::<FeedLine>(&line);
                            let ok = match &change {
                                Ok(change) if change.version() == Some(pos.version + 1) => {
                                    apply_change(&table, replica.regions(), &mut pos, change)
                                        .is_ok()
                                }
                                _ => false,
                            };
                            if !ok {
                                tracing::warn!(
                                    path = %self.journal.display(),
                                    line = n + 2,
                                    version = pos.version,
                                    "the last-known-good journal ends in a line that cannot be applied; \
                                     using the map up to the line before"
                                );
                                break;
                            }
                            pos.version += 1;
                            table.publish_version(pos.version);
                            replayed += 1;
                        }
                    }
                    _ => tracing::warn!(
                        path = %self.journal.display(),
                        "the last-known-good journal does not follow the base map; ignoring it"
                    ),
                }
            }
        }
        Ok(Some((table, pos, replayed)))
    }

    /// Writes the whole map as the new base, and starts an empty journal after it.
    fn write_base(&mut self, replica: &Replica, pos: &Position) -> std::io::Result<()> {
        self.file = None;
        mapfile::write_atomically(&self.base, replica, Some(&pos.epoch))?;
        self.base_bytes = std::fs::metadata(&self.base).map_or(0, |m| m.len());
        let tmp = self.journal.with_extension("journal.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        let mut hello = serde_json::to_vec(&FeedLine::Hello {
            epoch: pos.epoch.clone(),
            head: pos.version,
        })?;
        hello.push(b'\n');
        file.write_all(&hello)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.journal)?;
        sync_dir(&self.journal)?;
        self.journal_bytes = hello.len() as u64;
        self.file = Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&self.journal)?,
        );
        Ok(())
    }

    /// Appends changes to the journal and fsyncs them.
    fn append(&mut self, lines: &[u8]) -> std::io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(std::io::Error::other("the journal is not open"));
        };
        file.write_all(lines)?;
        file.sync_data()?;
        self.journal_bytes += lines.len() as u64;
        Ok(())
    }

    fn wants_new_base(&self) -> bool {
        self.file.is_none() || self.journal_bytes > (4 << 20).max(self.base_bytes / 2)
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Jittered exponential backoff ("equal jitter": uniform between half the doubling cap and the
/// cap, so a fleet does not reconnect in step and no delay collapses to nothing).
struct Backoff {
    initial: Duration,
    max: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            cap: initial,
        }
    }

    fn reset(&mut self) {
        self.cap = self.initial;
    }

    fn next(&mut self) -> Duration {
        use rand::Rng;
        let cap = self.cap;
        self.cap = (self.cap * 2).min(self.max);
        let low = cap / 2;
        low + rand::thread_rng().gen_range(Duration::ZERO..=cap - low)
    }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The client to the control plane: cleartext, or TLS trusting `ca` only and presenting the
/// client certificate when configured.
fn build_client(cfg: &ControlPlaneSection) -> Result<HttpClient, String> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(cfg.request_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let tls = match &cfg.ca {
        Some(ca) => {
            let config = domicile_certs::client::client_config(
                ca,
                cfg.client_certificate().as_ref(),
                Vec::new(),
            )
            .map_err(|e| format!("control_plane: {e}"))?;
            (*config).clone()
        }
        None => domicile_certs::client::trusting_nothing(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(connector);
    let mut builder = Client::builder(TokioExecutor::new());
    if cfg.nats.is_some() {
        // Through NATS the client fetches only the odd snapshot: no connection is kept open
        // on a replica between them.
        builder.pool_max_idle_per_host(0);
    }
    Ok(builder.build(https))
}

/// What the sync applies to and counts in: this proxy's map replica and its counters.
struct Local {
    replica: Arc<Replica>,
    metrics: Arc<Metrics>,
}

struct Syncer {
    cfg: ControlPlaneSection,
    /// Set when the map is followed through the NATS fan-out tier.
    nats: Option<Arc<nats::Nats>>,
    local: Arc<Local>,
    client: HttpClient,
    base: String,
    pos: Option<Position>,
    lkg: Option<LastKnownGood>,
    /// Applied changes include one a move may wait for (or a snapshot): the next version
    /// persisted is reported at once.
    prompt_pending: bool,
    /// Told when a version is to be reported at once: the heartbeat task sleeps through every
    /// other change of the state.
    prompted: Arc<tokio::sync::Notify>,
    state: watch::Sender<SyncState>,
    stop: watch::Receiver<bool>,
}

/// Loads the last-known-good map (when there is one) and starts following the control plane.
pub fn start(
    cfg: ControlPlaneSection,
    replica: Arc<Replica>,
    metrics: Arc<Metrics>,
    proxy_id: String,
    edge_region: String,
) -> SyncHandle {
    let local = Arc::new(Local { replica, metrics });
    let mut lkg = LastKnownGood::new(cfg.last_known_good.clone());
    let mut pos = None;
    match lkg.load(&local.replica) {
        Ok(None) => tracing::info!(
            path = %lkg.base.display(),
            "no last-known-good map yet; waiting for the control plane"
        ),
        Ok(Some((table, loaded, replayed))) => {
            let (version, entries) = (loaded.version, table.len());
            match local.replica.replace(table, &loaded.catalogue) {
                Ok(()) => {
                    tracing::info!(
                        path = %lkg.base.display(),
                        version,
                        entries,
                        replayed,
                        "serving the last-known-good map until the control plane answers"
                    );
                    pos = Some(loaded);
                }
                Err(e) => tracing::error!("cannot install the last-known-good map: {e}"),
            }
        }
        Err(e) => {
            local
                .metrics
                .lkg_load_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "the last-known-good map is unusable, so nothing is served from it; \
                 waiting for the control plane: {e}"
            );
        }
    }
    let initial = SyncState {
        applied: pos.as_ref().map(|p| p.version),
        persisted: pos.as_ref().map(|p| p.version),
        checksum: pos.as_ref().map(|p| p.checksum),
        epoch: pos.as_ref().map(|p| p.epoch.clone()),
        ..SyncState::default()
    };
    if let Some(v) = initial.applied {
        local
            .metrics
            .map_applied_version
            .store(v, Ordering::Relaxed);
    }
    let (state, state_rx) = watch::channel(initial);
    let state_rx_task = state_rx.clone();
    let (stop_tx, stop) = watch::channel(false);
    // The configuration was checked (every file loads); a file broken since is reported and
    // the client falls back to one that fails every request, which the sync loop retries.
    let client = build_client(&cfg).unwrap_or_else(|e| {
        tracing::error!("cannot set up TLS to the control plane: {e}");
        let mut cleartext = cfg.clone();
        cleartext.ca = None;
        cleartext.cert = None;
        build_client(&cleartext).unwrap_or_else(|e| unreachable!("cleartext client: {e}"))
    });
    let base = cfg.url.trim_end_matches('/').to_owned();
    let task = tokio::spawn(async move {
        let mut stop = stop;
        let nats = match &cfg.nats {
            None => None,
            Some(section) => {
                let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
                loop {
                    match nats::Nats::connect(section, &cfg).await {
                        Ok(nats) => break Some(nats),
                        Err(e) => {
                            local.metrics.sync_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::error!("cannot set up the NATS client: {e}; retrying");
                            tokio::select! {
                                () = tokio::time::sleep(backoff.next()) => {}
                                _ = stop.wait_for(|s| *s) => return,
                            }
                        }
                    }
                }
            }
        };
        let prompted = Arc::new(tokio::sync::Notify::new());
        let heartbeat = tokio::spawn(heartbeats(
            cfg.clone(),
            client.clone(),
            nats.clone(),
            base.clone(),
            proxy_id,
            edge_region,
            local.clone(),
            state_rx_task,
            prompted.clone(),
            stop.clone(),
        ));
        let syncer = Syncer {
            cfg,
            nats,
            local,
            client,
            base,
            pos,
            lkg: Some(lkg),
            prompt_pending: false,
            prompted,
            state,
            stop,
        };
        syncer.run().await;
        let _ = heartbeat.await;
    });
    SyncHandle {
        state: state_rx,
        stop: stop_tx,
        task: Some(task),
    }
}

impl Syncer {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.cfg.backoff_initial, self.cfg.backoff_max);
        let mut need_snapshot = self.pos.is_none();
        loop {
            if *self.stop.borrow() {
                return;
            }
            if need_snapshot {
                match self.fetch_snapshot().await {
                    Ok(()) => {
                        need_snapshot = false;
                        backoff.reset();
                    }
                    Err(SyncError::Stopped) => return,
                    Err(e) => {
                        self.local
                            .metrics
                            .sync_errors
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("map snapshot failed: {e}");
                        if self.pause(backoff.next()).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let followed = match self.nats.clone() {
                Some(nats) => self.follow_nats(nats, &mut backoff).await,
                None => self.follow(&mut backoff).await,
            };
            self.state.send_modify(|s| s.streaming = false);
            match followed {
                Ok(reason) => {
                    self.local.metrics.resyncs[reason as usize].fetch_add(1, Ordering::Relaxed);
                    tracing::info!(reason = reason.as_str(), "fetching a new map snapshot");
                    need_snapshot = true;
                    // A 410 is routine; anything else resyncing again and again should not
                    // hammer the control plane with snapshots.
                    if reason != Resync::Gone && self.pause(backoff.next()).await {
                        return;
                    }
                }
                Err(SyncError::Stopped) => return,
                Err(e) => {
                    self.local
                        .metrics
                        .sync_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("map change stream: {e}; reconnecting");
                    if self.pause(backoff.next()).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps, or returns true when told to stop.
    async fn pause(&mut self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            _ = self.stop.wait_for(|s| *s) => true,
        }
    }

    fn contact(&self) {
        self.local
            .metrics
            .map_last_contact_ms
            .store(now_ms(), Ordering::Relaxed);
    }

    async fn get(
        &self,
        path_and_query: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, SyncError> {
        let token = self.cfg.read_token().map_err(SyncError::Token)?;
        let uri: Uri = format!("{}{path_and_query}", self.base)
            .parse()
            .map_err(|e| SyncError::Http(format!("bad URL: {e}")))?;
        let mut request = Request::builder().method(Method::GET).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .header(
                header::USER_AGENT,
                concat!("domicile-proxy/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| SyncError::Http(e.to_string()))?;
        let response = tokio::time::timeout(self.cfg.request_timeout, self.client.request(request))
            .await
            .map_err(|_| {
                SyncError::Http(format!("no answer within {:?}", self.cfg.request_timeout))
            })?
            .map_err(|e| SyncError::Http(e.to_string()))?;
        Ok(response)
    }

    /// The next body frame, with the stall timeout and the stop signal.
    async fn frame(
        &mut self,
        body: &mut hyper::body::Incoming,
    ) -> Result<Option<Bytes>, SyncError> {
        let stall = self.cfg.stall_timeout;
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(stall, body.frame()) => next,
                _ = self.stop.wait_for(|s| *s) => return Err(SyncError::Stopped),
            };
            match next {
                Err(_) => return Err(SyncError::Stalled(stall)),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(SyncError::Http(e.to_string())),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    async fn error_status(response: hyper::Response<hyper::body::Incoming>) -> SyncError {
        let status = response.status();
        let body = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect())
            .await
            .ok()
            .and_then(|b| b.ok())
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        SyncError::Status { status, body }
    }

    async fn fetch_snapshot(&mut self) -> Result<(), SyncError> {
        let started = std::time::Instant::now();
        let response = self.get("/v1/map/snapshot").await?;
        if response.status() != StatusCode::OK {
            return Err(Self::error_status(response).await);
        }
        self.contact();
        let mut body = response.into_body();
        let local = self.local.clone();
        let mut builder = MapBuilder::new(&local.replica, 0);
        let mut pending: Vec<u8> = Vec::new();
        while let Some(data) = self.frame(&mut body).await? {
            pending.extend_from_slice(&data);
            let mut start = 0;
            while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
                builder.line(&String::from_utf8_lossy(&pending[start..start + nl]));
                start += nl + 1;
            }
            pending.drain(..start);
        }
        if !pending.is_empty() {
            builder.line(&String::from_utf8_lossy(&pending));
        }
        let source = PathBuf::from(format!("{}/v1/map/snapshot", self.base));
        let loaded = builder.finish(&source)?;
        let Some(epoch) = loaded.epoch else {
            return Err(SyncError::Snapshot(MapFileError::Invalid {
                path: source,
                errors: vec!["  the snapshot names no control-plane epoch".into()],
            }));
        };
        let version = loaded.table.version();
        let entries = loaded.table.len();
        local
            .replica
            .replace(loaded.table, &loaded.regions)
            .map_err(|e| {
                SyncError::Snapshot(MapFileError::Invalid {
                    path: source.clone(),
                    errors: vec![format!("  {e}")],
                })
            })?;
        self.pos = Some(Position {
            epoch,
            version,
            checksum: loaded.checksum,
            catalogue: loaded.regions,
        });
        local
            .metrics
            .map_applied_version
            .store(version, Ordering::Relaxed);
        local.metrics.sync_snapshots.fetch_add(1, Ordering::Relaxed);
        self.state.send_modify(|s| {
            s.applied = Some(version);
            s.snapshots += 1;
        });
        tracing::info!(version, entries, elapsed = ?started.elapsed(), "map snapshot applied");
        // The map routes now whatever happens to the disk; until it is persisted, heartbeats
        // go on reporting the last version that is, and the base is written again later.
        // A move may be waiting for this proxy: report the snapshot at once.
        self.prompt_pending = true;
        if let Err(e) = self.persist_base().await {
            self.persist_failed(&e);
        }
        Ok(())
    }

    fn persist_failed(&self, e: &SyncError) {
        self.local
            .metrics
            .sync_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!("{e}; heartbeats report the last version on disk until a write succeeds");
    }

    /// Writes a new last-known-good base and reports the version as persisted.
    async fn persist_base(&mut self) -> Result<(), SyncError> {
        let (Some(pos), Some(mut lkg)) = (self.pos.take(), self.lkg.take()) else {
            return Ok(());
        };
        let local = self.local.clone();
        let (lkg, pos, written) = tokio::task::spawn_blocking(move || {
            let written = lkg.write_base(&local.replica, &pos);
            (lkg, pos, written)
        })
        .await
        .expect("the last-known-good writer does not panic");
        self.lkg = Some(lkg);
        let (version, checksum, epoch) = (pos.version, pos.checksum, pos.epoch.clone());
        self.pos = Some(pos);
        written.map_err(SyncError::Persist)?;
        self.local
            .metrics
            .lkg_writes
            .fetch_add(1, Ordering::Relaxed);
        self.report_persisted(version, checksum, Some(epoch));
        Ok(())
    }

    /// Publishes `version` as persisted, for the heartbeats to report: at once when it is one
    /// a move may be waiting for. Version, checksum and epoch change together: a heartbeat
    /// never pairs one map's version with another's epoch (`None`: the epoch is unchanged).
    fn report_persisted(&mut self, version: u64, checksum: Checksum, epoch: Option<String>) {
        let prompt = std::mem::take(&mut self.prompt_pending);
        self.state.send_modify(|s| {
            s.persisted = Some(version);
            s.checksum = Some(checksum);
            if let Some(epoch) = epoch {
                s.epoch = Some(epoch);
            }
            if prompt {
                s.prompt = Some(version);
            }
        });
        if prompt {
            self.prompted.notify_one();
        }
    }

    /// Appends applied changes to the journal (or writes a new base when due).
    async fn persist_changes(&mut self, lines: Vec<u8>) -> Result<(), SyncError> {
        if self.lkg.as_ref().is_none_or(|l| l.wants_new_base()) {
            return self.persist_base().await;
        }
        let Some(mut lkg) = self.lkg.take() else {
            return Ok(());
        };
        let (lkg, written) = tokio::task::spawn_blocking(move || {
            let written = lkg.append(&lines);
            (lkg, written)
        })
        .await
        .expect("the journal writer does not panic");
        self.lkg = Some(lkg);
        if let Err(e) = written {
            // The base is rewritten on the next change; until then nothing newer is reported.
            if let Some(lkg) = self.lkg.as_mut() {
                lkg.file = None;
            }
            return Err(SyncError::Persist(e));
        }
        if let Some((version, checksum)) = self.pos.as_ref().map(|p| (p.version, p.checksum)) {
            self.report_persisted(version, checksum, None);
        }
        Ok(())
    }

    /// Follows the change stream until it ends (an error) or a resync is needed.
    async fn follow(&mut self, backoff: &mut Backoff) -> Result<Resync, SyncError> {
        let after = self.pos.as_ref().map_or(0, |p| p.version);
        let response = self.get(&format!("/v1/map/changes?after={after}")).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::GONE => {
                self.contact();
                return Ok(Resync::Gone);
            }
            _ => return Err(Self::error_status(response).await),
        }
        self.contact();
        self.state.send_modify(|s| s.streaming = true);
        let mut body = response.into_body();
        let mut pending: Vec<u8> = Vec::new();
        // The head the stream opened at, while the changes before it are still coming: the
        // proxy reports where it stands once it has caught up after (re)connecting.
        let mut catching_up_to = None;
        loop {
            let Some(data) = self.frame(&mut body).await? else {
                return Err(SyncError::Ended);
            };
            self.contact();
            pending.extend_from_slice(&data);
            let mut journal = Vec::new();
            let mut start = 0;
            let mut outcome = None;
            while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
                let text = &pending[start..start + nl];
                start += nl + 1;
                let pos = self.pos.as_mut().expect("following needs a map");
                match take_line(&self.local.replica, pos, text) {
                    Ok(Taken::Hello { head }) => {
                        backoff.reset();
                        catching_up_to = (head > pos.version).then_some(head);
                    }
                    Ok(Taken::Heartbeat) => {}
                    Ok(Taken::Applied { prompt }) => {
                        let caught_up = catching_up_to.is_some_and(|head| pos.version >= head);
                        if caught_up {
                            catching_up_to = None;
                        }
                        self.prompt_pending |= prompt || caught_up;
                        journal.extend_from_slice(text);
                        journal.push(b'\n');
                    }
                    Err(reason) => {
                        outcome = Some(reason);
                        break;
                    }
                }
            }
            pending.drain(..start);
            self.applied(journal).await;
            if let Some(reason) = outcome {
                return Ok(reason);
            }
        }
    }

    /// After a round of changes (their lines in `journal`, possibly none): the version they
    /// reached is published and persisted.
    async fn applied(&mut self, journal: Vec<u8>) {
        if !journal.is_empty() {
            let version = self.pos.as_ref().map_or(0, |p| p.version);
            self.local
                .metrics
                .map_applied_version
                .store(version, Ordering::Relaxed);
            self.state.send_modify(|s| s.applied = Some(version));
            if let Err(e) = self.persist_changes(journal).await {
                self.persist_failed(&e);
            }
        } else if self.lkg.as_ref().is_some_and(|l| l.file.is_none()) {
            // The last base write failed and nothing has changed since: try again now.
            if let Err(e) = self.persist_base().await {
                self.persist_failed(&e);
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How often a proxy with older requests in flight checks whether they finished.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// What a proxy's last heartbeat that got through said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Told {
    persisted: u64,
    drained: u64,
}

/// Whether a heartbeat is owed before the periodic one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    /// Nothing a move may wait for is unreported.
    Nothing,
    /// Beat now: a version a move may wait for is persisted and not yet reported, or has
    /// just drained.
    Now,
    /// The version is reported but older requests are still in flight: look again soon.
    Draining,
}

/// What `state` owes the control plane, given what was last `told` and what has drained now.
fn owed(state: &SyncState, told: Option<Told>, drained_now: impl Fn(u64) -> u64) -> Owed {
    let (Some(prompt), Some(persisted)) = (state.prompt, state.persisted) else {
        return Owed::Nothing;
    };
    match told {
        None => Owed::Now,
        Some(t) if t.persisted < prompt => Owed::Now,
        Some(t) if t.drained >= prompt => Owed::Nothing,
        Some(_) if drained_now(persisted) >= prompt => Owed::Now,
        Some(_) => Owed::Draining,
    }
}

/// Sends a heartbeat every `heartbeat_interval`, reporting the persisted version and what has
/// drained of it; and at once when a version a move may wait for ([`SyncState::prompt`]) is
/// persisted, and again as soon as the requests routed with older versions have finished.
/// Other versions wait for the periodic beat: a change to the map does not bring a heartbeat
/// from every proxy of the fleet.
#[allow(clippy::too_many_arguments)]
async fn heartbeats(
    cfg: ControlPlaneSection,
    client: HttpClient,
    nats: Option<Arc<nats::Nats>>,
    base: String,
    proxy_id: String,
    edge_region: String,
    local: Arc<Local>,
    mut state: watch::Receiver<SyncState>,
    prompted: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let in_flight = || local.replica.in_flight();
    let mut token = TokenCache::default();
    // After a failed beat the next one is due sooner than `heartbeat_interval` (a proxy
    // that restarted before the control plane answered is not left unreported for a whole
    // period), backing off up to that period.
    let mut retry = Backoff::new(
        cfg.backoff_initial.min(cfg.heartbeat_interval),
        cfg.heartbeat_interval,
    );
    let mut told: Option<Told> = None;
    loop {
        let current = state.borrow_and_update().clone();
        let mut failed_now = false;
        if let (Some(version), Some(epoch), Some(checksum)) =
            (current.persisted, current.epoch.clone(), current.checksum)
        {
            // What this beat says has drained: checked when it is built, after the version
            // was persisted and published.
            let drained = in_flight().drained(version);
            let hb = Heartbeat {
                proxy_id: proxy_id.clone(),
                edge_region: edge_region.clone(),
                applied_version: version,
                drained_version: Some(drained),
                checksum: checksum.to_hex(),
                epoch,
            };
            let sent = match token.get(&cfg).await {
                Err(e) => Err(e),
                Ok(secret) => match &nats {
                    Some(nats) => match serde_json::to_vec(&hb) {
                        Ok(body) => nats.heartbeat(secret, body).await,
                        Err(e) => Err(e.to_string()),
                    },
                    None => send_heartbeat(&cfg, &client, &base, secret, &hb).await,
                },
            };
            match sent {
                Ok(_reply) => {
                    retry.reset();
                    told = Some(Told {
                        persisted: version,
                        drained,
                    });
                    local.metrics.heartbeats_ok.fetch_add(1, Ordering::Relaxed);
                    local
                        .metrics
                        .map_last_contact_ms
                        .store(now_ms(), Ordering::Relaxed);
                }
                Err(e) => {
                    // A rotated or revoked token shows here first: read the file again.
                    token.forget();
                    failed_now = true;
                    let failed = local
                        .metrics
                        .heartbeats_failed
                        .fetch_add(1, Ordering::Relaxed);
                    // The first failure and then one in a hundred: a control plane that is
                    // down is not news on every beat.
                    if failed.is_multiple_of(100) {
                        tracing::warn!("heartbeat failed: {e}");
                    } else {
                        tracing::debug!("heartbeat failed: {e}");
                    }
                }
            }
        }
        let next_beat = tokio::time::Instant::now()
            + if failed_now {
                retry.next()
            } else {
                cfg.heartbeat_interval
            };
        loop {
            // After a failure the retry's delay holds, whatever is owed, unless the change
            // stream has come back meanwhile: the control plane answers again.
            let owes = if !failed_now {
                owed(&state.borrow(), told, |v| in_flight().drained(v))
            } else if state.borrow_and_update().streaming && !current.streaming {
                Owed::Now
            } else {
                Owed::Nothing
            };
            if owes == Owed::Now {
                break;
            }
            tokio::select! {
                () = prompted.notified() => {}
                // Only after a failure does any other change of the state matter here.
                changed = state.changed(), if failed_now => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep_until(next_beat) => break,
                () = tokio::time::sleep(DRAIN_POLL), if owes == Owed::Draining => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// How long a token read from its file is used before the file is read again.
const TOKEN_REREAD: Duration = Duration::from_secs(10);

/// The proxy's token for heartbeats: read off the runtime's threads, at most every
/// [`TOKEN_REREAD`] and again after a failed beat, not from the file on every beat.
#[derive(Default)]
struct TokenCache {
    read: Option<(tokio::time::Instant, Option<String>)>,
}

impl TokenCache {
    async fn get(&mut self, cfg: &ControlPlaneSection) -> Result<Option<String>, String> {
        if let Some((at, token)) = &self.read {
            if at.elapsed() < TOKEN_REREAD {
                return Ok(token.clone());
            }
        }
        let cfg = cfg.clone();
        let token = tokio::task::spawn_blocking(move || cfg.read_token())
            .await
            .map_err(|e| e.to_string())??;
        self.read = Some((tokio::time::Instant::now(), token.clone()));
        Ok(token)
    }

    fn forget(&mut self) {
        self.read = None;
    }
}

async fn send_heartbeat(
    cfg: &ControlPlaneSection,
    client: &HttpClient,
    base: &str,
    token: Option<String>,
    hb: &Heartbeat,
) -> Result<HeartbeatReply, String> {
    let body = serde_json::to_vec(hb).map_err(|e| e.to_string())?;
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}/v1/fleet/heartbeat"));
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(cfg.request_timeout, client.request(request))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = tokio::time::timeout(cfg.request_timeout, response.into_body().collect())
        .await
        .map_err(|_| "the reply stalled".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_version_a_move_may_wait_for_is_owed_before_the_periodic_beat() {
        let state = |persisted: u64, prompt: Option<u64>| SyncState {
            persisted: Some(persisted),
            prompt,
            ..SyncState::default()
        };
        let told = |persisted, drained| Some(Told { persisted, drained });
        fn all_drained(v: u64) -> u64 {
            v
        }
        fn still_in_flight(_: u64) -> u64 {
            6
        }
        /// The sync's state, the last beat that got through, what has drained now, and
        /// what is owed.
        type Case = (SyncState, Option<Told>, fn(u64) -> u64, Owed);
        let cases: [Case; 8] = [
            // Ordinary changes persisted since the last beat: nothing owed.
            (state(9, None), told(6, 6), all_drained, Owed::Nothing),
            (state(9, Some(5)), told(6, 6), all_drained, Owed::Nothing),
            // The freeze at 7 is persisted and never reported.
            (state(9, Some(7)), told(6, 6), all_drained, Owed::Now),
            (state(9, Some(7)), None, all_drained, Owed::Now),
            // Reported applied, but older requests are still in flight: poll.
            (
                state(9, Some(7)),
                told(9, 6),
                still_in_flight,
                Owed::Draining,
            ),
            // ... until they finish.
            (state(9, Some(7)), told(9, 6), all_drained, Owed::Now),
            // Reported drained: nothing more.
            (state(9, Some(7)), told(9, 9), all_drained, Owed::Nothing),
            // Nothing persisted yet: nothing to report.
            (SyncState::default(), None, all_drained, Owed::Nothing),
        ];
        for (i, (state, told, drained, want)) in cases.into_iter().enumerate() {
            assert_eq!(owed(&state, told, drained), want, "case {i}");
        }
    }

    #[test]
    fn moves_wait_for_freezes_and_switches_only() {
        let put = |state| FeedLine::Workspace {
            version: 3,
            id: "acme".into(),
            op: Op::Put,
            entry: Some(domicile_wire::WorkspaceBody {
                region: "eu".into(),
                state,
                epoch: 2,
            }),
        };
        assert!(awaited_by_moves(&put(domicile_wire::State::Frozen)));
        assert!(!awaited_by_moves(&put(domicile_wire::State::Active)));
        assert!(!awaited_by_moves(&FeedLine::Workspace {
            version: 3,
            id: "acme".into(),
            op: Op::Delete,
            entry: None,
        }));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(500));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}

#[cfg(test)]
mod last_known_good {
    use super::*;
    use crate::route::map::Lookup;

    fn change(version: u64, id: &str, region: &str) -> String {
        serde_json::to_string(&FeedLine::Workspace {
            version,
            id: id.into(),
            op: Op::Put,
            entry: Some(domicile_wire::WorkspaceBody {
                region: region.into(),
                state: domicile_wire::State::Active,
                epoch: 1,
            }),
        })
        .unwrap()
            + "\n"
    }

    /// A base at version 2 (one region, one workspace) and an empty journal.
    fn base(dir: &Path) -> (Replica, LastKnownGood) {
        let p = Replica::new();
        let map = "{\"type\":\"map\",\"version\":2,\"epoch\":\"e1\"}\n\
                   {\"type\":\"region\",\"id\":\"us\"}\n\
                   {\"type\":\"workspace\",\"id\":\"acme\",\"region\":\"us\",\"epoch\":1,\"version\":2}\n";
        let src = dir.join("src.map");
        std::fs::write(&src, map).unwrap();
        mapfile::load_into(&src, &p).unwrap();
        let loaded = mapfile::load(&src, &p).unwrap();
        let pos = Position {
            epoch: "e1".into(),
            version: 2,
            checksum: loaded.checksum,
            catalogue: loaded.regions,
        };
        let mut lkg = LastKnownGood::new(dir.join("lkg.map"));
        lkg.write_base(&p, &pos).unwrap();
        (p, lkg)
    }

    fn found(table: &MapTable, id: &str) -> bool {
        table.get(id.as_bytes()).is_some()
    }

    #[test]
    fn the_journal_is_replayed_and_a_torn_last_line_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (p, mut lkg) = base(dir.path());
        lkg.append(change(3, "globex", "us").as_bytes()).unwrap();
        lkg.append(change(4, "initech", "us").as_bytes()).unwrap();
        // A crash in the middle of an append: half a line, never acknowledged.
        lkg.append(&change(5, "hooli", "us").as_bytes()[..20])
            .unwrap();
        let fresh = Replica::new();
        let (table, pos, replayed) = LastKnownGood::new(dir.path().join("lkg.map"))
            .load(&fresh)
            .unwrap()
            .unwrap();
        assert_eq!((pos.version, replayed, table.version()), (4, 2, 4));
        assert!(found(&table, "globex") && found(&table, "initech") && !found(&table, "hooli"));
        drop(p);
    }

    #[test]
    fn a_gap_in_the_journal_stops_the_replay_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_p, mut lkg) = base(dir.path());
        lkg.append(change(3, "globex", "us").as_bytes()).unwrap();
        lkg.append(change(5, "initech", "us").as_bytes()).unwrap();
        let fresh = Replica::new();
        let (table, pos, _) = LastKnownGood::new(dir.path().join("lkg.map"))
            .load(&fresh)
            .unwrap()
            .unwrap();
        assert_eq!(pos.version, 3);
        assert!(!found(&table, "initech"));
    }

    #[test]
    fn a_journal_that_does_not_follow_the_base_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (_p, mut lkg) = base(dir.path());
        lkg.append(change(3, "globex", "us").as_bytes()).unwrap();
        // The base is replaced (as after a crash between the two renames) by another epoch's.
        let text = std::fs::read_to_string(dir.path().join("lkg.map"))
            .unwrap()
            .replace("\"epoch\":\"e1\"", "\"epoch\":\"e2\"");
        std::fs::write(dir.path().join("lkg.map"), text).unwrap();
        let fresh = Replica::new();
        let (table, pos, replayed) = LastKnownGood::new(dir.path().join("lkg.map"))
            .load(&fresh)
            .unwrap()
            .unwrap();
        assert_eq!((pos.version, replayed, pos.epoch.as_str()), (2, 0, "e2"));
        assert!(!found(&table, "globex"));
    }

    #[test]
    fn a_base_that_lost_a_line_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (_p, _lkg) = base(dir.path());
        let path = dir.path().join("lkg.map");
        let text = std::fs::read_to_string(&path).unwrap();
        let cut: Vec<&str> = text.lines().filter(|l| !l.contains("acme")).collect();
        std::fs::write(&path, cut.join("\n")).unwrap();
        let fresh = Replica::new();
        let err = match LastKnownGood::new(path).load(&fresh) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a truncated base must be refused"),
        };
        assert!(err.contains("promises 1 entries but holds 0"), "{err}");
        assert!(matches!(
            fresh.lookup(&WorkspaceId::parse(b"acme").unwrap()),
            Lookup::NoMap
        ));
    }
}
