//! The move driver: advances each open move when the fleet has converged on the version its
//! phase waits for, reports moves that wait longer than their timeout (naming the proxies
//! they wait for, and never guessing past them), and calls each move's webhook on every
//! phase change. docs/moves.md describes the protocol; `tests/move_model.rs` checks it.
//!
//! Every replica runs a driver. They cannot step on each other: each advance is a
//! conditional write under the store's meta lock, so exactly one replica makes it (and only
//! that replica calls the webhook).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};

use crate::store::{now_ms, FleetRow, Head, Move, Phase, Store, StoreError};

/// How often the driver looks again without a wake-up (timeouts, moves requested at another
/// replica).
const TICK: Duration = Duration::from_millis(250);
/// How often it looks while a move waits for the fleet to drain and nothing wakes it. Each
/// heartbeat this replica writes wakes it, and the last member to drain reports to one of
/// the replicas, whose driver then sees the whole fleet drained; this is the backstop.
const AWAITING_TICK: Duration = Duration::from_millis(100);
/// While a move waits, the least time between two looks: a fleet's heartbeats arrive by the
/// thousand, and each look counts the fleet table.
const AWAITING_GAP: Duration = Duration::from_millis(10);
/// Webhook deliveries queued before new ones are dropped (and counted).
const WEBHOOK_QUEUE: usize = 1024;
const WEBHOOK_ATTEMPTS: u32 = 3;
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct MoveMetrics {
    pub started: AtomicU64,
    pub done: AtomicU64,
    pub aborted: AtomicU64,
    pub stalled: AtomicU64,
    pub webhooks_sent: AtomicU64,
    pub webhooks_failed: AtomicU64,
}

/// A fleet member the move waits for, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lagging {
    pub proxy_id: String,
    pub edge_region: String,
    pub applied_version: u64,
    pub drained_version: Option<u64>,
    pub last_seen_ms: i64,
    pub why: String,
}

/// The members of `fleet` that have not drained `version` of the store `head`.
pub fn lagging(fleet: &[FleetRow], head: &Head, version: u64) -> Vec<Lagging> {
    fleet
        .iter()
        .filter_map(|m| {
            let why = if m.epoch != head.epoch {
                format!("follows another store (epoch {})", m.epoch)
            } else {
                match m.drained_version {
                    Some(d) if d >= version => return None,
                    Some(d) => format!("drained {d} < {version}"),
                    None => format!("reports no drained version (applied {})", m.applied_version),
                }
            };
            Some(Lagging {
                proxy_id: m.proxy_id.clone(),
                edge_region: m.edge_region.clone(),
                applied_version: m.applied_version,
                drained_version: m.drained_version,
                last_seen_ms: m.last_seen_ms,
                why,
            })
        })
        .collect()
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The most proxies a move's view names; `waiting_count` says how many it waits for in all.
const WAITING_NAMED: usize = 100;
/// The most proxies a stalled move's log line and trail entry name.
const STALLED_NAMED: usize = 20;

/// Who a move waits for: how many members, and the first of them (the furthest behind).
#[derive(Debug, Clone, Default)]
pub struct Waiting {
    pub count: u64,
    pub named: Vec<Lagging>,
}

impl Waiting {
    /// Reads from the store who a move awaiting `version` waits for.
    pub async fn read(store: &Store, head: &Head, version: u64) -> Result<Self, StoreError> {
        let (_, count) = store.fleet_lagging(&head.epoch, version).await?;
        let rows = store
            .fleet_lagging_members(&head.epoch, version, WAITING_NAMED)
            .await?;
        Ok(Self {
            count,
            named: lagging(&rows, head, version),
        })
    }
}

fn describe(waiting: &Waiting, now: i64) -> String {
    let mut names: Vec<String> = waiting
        .named
        .iter()
        .take(STALLED_NAMED)
        .map(|l| {
            format!(
                "{} ({}, last seen {:.1} s ago)",
                l.proxy_id,
                l.why,
                (now - l.last_seen_ms).max(0) as f64 / 1000.0
            )
        })
        .collect();
    let unnamed = waiting.count.saturating_sub(names.len() as u64);
    if unnamed > 0 {
        names.push(format!("and {unnamed} more"));
    }
    format!("waiting for {}", names.join(", "))
}

/// A move as the API shows it: the record, and (in the phases that wait for the fleet) how
/// many proxies it waits for and the first 100 of them.
pub fn view(m: &Move, waiting: Option<&Waiting>) -> Value {
    let at = |ms: Option<i64>| ms.map(rfc3339);
    let now = now_ms();
    let write_pause_ms = m
        .freezing_at_ms
        .map(|start| m.done_at_ms.or(m.aborted_at_ms).unwrap_or(now) - start);
    json!({
        "id": m.id,
        "workspace": m.workspace,
        "from": m.from,
        "to": m.to,
        "phase": m.phase,
        "actor": m.actor,
        "reason": m.reason,
        "webhook": m.webhook,
        "timeout_seconds": m.timeout_ms as f64 / 1000.0,
        "versions": {
            "freeze": m.freeze_version,
            "switch": m.switch_version,
            "done": m.done_version,
            "abort": m.abort_version,
        },
        "at": {
            "requested": rfc3339(m.requested_at_ms),
            "freezing": at(m.freezing_at_ms),
            "frozen": at(m.frozen_at_ms),
            "switching": at(m.switching_at_ms),
            "done": at(m.done_at_ms),
            "aborted": at(m.aborted_at_ms),
        },
        "awaiting_version": m.awaited_version(),
        "stalled": m.stalled_at_ms.is_some(),
        "stalled_at": at(m.stalled_at_ms),
        "waiting_count": waiting.map_or(0, |w| w.count),
        "waiting_for": waiting.map_or(&[][..], |w| &w.named[..]),
        "abort_reason": m.abort_reason,
        "write_pause_ms": write_pause_ms,
        "next": next_step(m),
    })
}

/// What has to happen for the move to go on, in words.
fn next_step(m: &Move) -> &'static str {
    match m.phase {
        Phase::Requested => "the control plane writes the freeze",
        Phase::Freezing => "every proxy drains the freeze (waiting_for names those still to)",
        Phase::Frozen => "the data mover copies the workspace's data, then calls complete",
        Phase::Switching => "every proxy drains the switch (waiting_for names those still to)",
        Phase::Done | Phase::Aborted => "nothing: the move is over",
    }
}

/// A move's view with its current wait list (read from the store).
pub async fn current_view(store: &Store, m: &Move) -> Result<Value, StoreError> {
    let waiting = match m.awaited_version() {
        Some(version) => Some(Waiting::read(store, &store.head().await?, version).await?),
        None => None,
    };
    Ok(view(m, waiting.as_ref()))
}

/// One webhook call to make.
struct Delivery {
    url: String,
    event: &'static str,
    body: Value,
}

/// Handle to the running driver.
#[derive(Clone)]
pub struct Driver {
    wake: Arc<Notify>,
    /// Whether an open move waits for the fleet to drain a version: only then does a
    /// heartbeat wake the driver (a move's freeze brings one from every proxy).
    awaiting: Arc<AtomicBool>,
    webhooks: mpsc::Sender<Delivery>,
    pub metrics: Arc<MoveMetrics>,
}

impl Driver {
    /// Starts the driver (and its webhook sender) until `stopping` turns true.
    pub fn spawn(store: Store, stopping: watch::Receiver<bool>) -> Self {
        let wake = Arc::new(Notify::new());
        let metrics = Arc::new(MoveMetrics::default());
        let (webhooks, queue) = mpsc::channel(WEBHOOK_QUEUE);
        let driver = Self {
            wake,
            awaiting: Arc::new(AtomicBool::new(false)),
            webhooks,
            metrics,
        };
        tokio::spawn(send_webhooks(queue, driver.metrics.clone()));
        tokio::spawn(driver.clone().run(store, stopping));
        driver
    }

    /// Asks the driver to look at the moves now (a proxy was removed, a move was requested).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A heartbeat was written: a move waiting for the fleet may go on.
    pub fn heard(&self) {
        if self.awaiting.load(Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    async fn run(self, store: Store, mut stopping: watch::Receiver<bool>) {
        let mut head = store.subscribe();
        loop {
            match self.pass(&store).await {
                Ok(awaiting) => self.awaiting.store(awaiting, Ordering::Relaxed),
                Err(e) => tracing::warn!("move driver: {e}"),
            }
            let tick = if self.awaiting.load(Ordering::Relaxed) {
                tokio::select! {
                    () = tokio::time::sleep(AWAITING_GAP) => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
                AWAITING_TICK
            } else {
                TICK
            };
            tokio::select! {
                () = self.wake.notified() => {}
                _ = head.changed() => {}
                () = tokio::time::sleep(tick) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }

    /// Looks at every open move once and advances those that can go on. Returns whether one
    /// is left waiting for the fleet to drain a version.
    async fn pass(&self, store: &Store) -> Result<bool, StoreError> {
        let open = store.moves(None, true, 10_000).await?;
        let mut awaiting = false;
        if open.is_empty() {
            return Ok(awaiting);
        }
        let mut head_view: Option<Head> = None;
        for m in open {
            match m.phase {
                Phase::Requested => {
                    if let Some(m) = store.move_freeze(m.id).await? {
                        self.metrics.started.fetch_add(1, Ordering::Relaxed);
                        if m.phase == Phase::Aborted {
                            tracing::warn!(
                                id = m.id,
                                workspace = m.workspace,
                                "move aborted: {}",
                                m.abort_reason.as_deref().unwrap_or("")
                            );
                        }
                        awaiting |= m.phase == Phase::Freezing;
                        self.announce(&m, None);
                    }
                }
                Phase::Freezing | Phase::Switching => {
                    let Some(version) = m.awaited_version() else {
                        continue;
                    };
                    if head_view.is_none() {
                        head_view = Some(store.head().await?);
                    }
                    let head = head_view.as_ref().expect("just read");
                    // The count first: the whole fleet is read only to say who a stalled
                    // move waits for.
                    let (members, behind) = store.fleet_lagging(&head.epoch, version).await?;
                    if behind == 0 {
                        let detail =
                            format!("all {members} fleet member(s) drained version {version}");
                        let advanced = if m.phase == Phase::Freezing {
                            store.move_frozen(m.id, &detail).await?
                        } else {
                            store.move_finish(m.id, &detail).await?
                        };
                        if let Some(m) = advanced {
                            if m.phase == Phase::Done {
                                self.metrics.done.fetch_add(1, Ordering::Relaxed);
                            }
                            tracing::info!(id = m.id, workspace = m.workspace, phase = %m.phase, "move advanced");
                            self.announce(&m, None);
                        }
                    } else {
                        awaiting = true;
                        let overdue = m.stalled_at_ms.is_none()
                            && now_ms() - m.phase_started_ms() > m.timeout_ms as i64;
                        if overdue {
                            let waiting = Waiting::read(store, head, version).await?;
                            let detail = describe(&waiting, now_ms());
                            if let Some(m) = store.move_stalled(m.id, m.phase, &detail).await? {
                                self.metrics.stalled.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(
                                    id = m.id,
                                    workspace = m.workspace,
                                    phase = %m.phase,
                                    "move outlived its timeout of {} s: {detail}",
                                    m.timeout_ms / 1000
                                );
                                self.queue(&m, "move.stalled", Some(&waiting));
                            }
                        }
                    }
                }
                Phase::Frozen | Phase::Done | Phase::Aborted => {}
            }
        }
        Ok(awaiting)
    }

    /// Tells the webhook (if any) that the move reached its current phase.
    pub fn announce(&self, m: &Move, waiting: Option<&Waiting>) {
        if m.phase == Phase::Aborted {
            self.metrics.aborted.fetch_add(1, Ordering::Relaxed);
        }
        self.queue(m, "move.phase", waiting);
    }

    fn queue(&self, m: &Move, event: &'static str, waiting: Option<&Waiting>) {
        let Some(url) = &m.webhook else {
            return;
        };
        let delivery = Delivery {
            url: url.clone(),
            event,
            body: json!({ "event": event, "move": view(m, waiting) }),
        };
        if self.webhooks.try_send(delivery).is_err() {
            self.metrics.webhooks_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                id = m.id,
                "webhook queue full; the call for phase {} is dropped",
                m.phase
            );
        }
    }
}

/// Sends webhook calls one at a time, in the order they were queued: a receiver sees a move's
/// phases in order.
async fn send_webhooks(mut queue: mpsc::Receiver<Delivery>, metrics: Arc<MoveMetrics>) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(WEBHOOK_TIMEOUT));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    while let Some(d) = queue.recv().await {
        let body = Bytes::from(serde_json::to_vec(&d.body).expect("JSON serialises"));
        let mut delay = Duration::from_millis(200);
        let mut outcome = Err(String::new());
        for attempt in 1..=WEBHOOK_ATTEMPTS {
            let request = http::Request::post(&d.url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header("x-domicile-event", d.event)
                .body(Full::new(body.clone()));
            outcome = match request {
                Err(e) => Err(e.to_string()),
                Ok(request) => {
                    match tokio::time::timeout(WEBHOOK_TIMEOUT, client.request(request)).await {
                        Err(_) => Err("timed out".to_owned()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Ok(Ok(r)) if r.status().is_success() => Ok(()),
                        Ok(Ok(r)) => Err(format!("answered {}", r.status())),
                    }
                }
            };
            if outcome.is_ok() || attempt == WEBHOOK_ATTEMPTS {
                break;
            }
            tokio::time::sleep(delay).await;
            delay *= 4;
        }
        match outcome {
            Ok(()) => {
                metrics.webhooks_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                metrics.webhooks_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(url = d.url, event = d.event, "webhook failed: {e}");
            }
        }
    }
}

/// Checks a webhook URL: absolute `http://` with a host.
pub fn check_webhook(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("webhook {url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "webhook {url:?}: https webhooks need the control plane's TLS client, which \
                 this build does not have; use http:// (on a private network) for now"
            ))
        }
        _ => return Err(format!("webhook {url:?} must be an absolute http:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("webhook {url:?} has no host"));
    }
    Ok(())
}
