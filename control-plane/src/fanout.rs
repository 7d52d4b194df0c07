//! The NATS fan-out tier: the change feed published to a JetStream stream, the proxies'
//! heartbeats taken from NATS. With it a replica holds no connection per proxy: NATS carries
//! each change to every proxy, and keeps the newest ones for proxies that catch up.
//!
//! ```text
//! Tail (the replica's one reader of new changes)
//!   └─► publisher: one message per change, <prefix>.map.change.<version>, Nats-Msg-Id
//!       <epoch>:<version> ─► stream <prefix>-map (both replicas publish; the stream keeps one)
//!                              └─► republished once stored: <prefix>.map.live.<version> ─► proxies
//! every feed_heartbeat: <prefix>.map.head (a feed heartbeat line: epoch and head) ─► proxies
//! proxies ─► <prefix>.fleet.heartbeat (request, queue group) ─► one replica: authorize,
//!            write (the same path as POST /v1/fleet/heartbeat), answer
//! ```
//!
//! Nothing here decides what a proxy routes with: a proxy applies versions strictly in order
//! and checks the epoch of every change, so a duplicate, a reordering or a lost message in
//! NATS costs a catch-up, never a wrong map. The store stays the one source of truth; NATS may
//! lose its stream and the publisher fills it again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use domicile_wire::fanout;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue};
use tokio::sync::watch;

use crate::api::AppState;
use crate::config::NatsConfig;
use crate::feed::FEED_BATCH;

/// On a first start (an empty stream), how many of the newest changes are published, so
/// that a proxy a little behind catches up from NATS rather than with a snapshot.
const BACKFILL: u64 = 1000;
/// Publishes in flight before their acknowledgements are awaited.
const PIPELINE: usize = 256;
/// Heartbeats being written at once; more wait in NATS's buffer for this connection.
const HEARTBEATS_IN_FLIGHT: usize = 8192;

/// The tier's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct NatsMetrics {
    /// Changes the stream stored from this replica (the other replica's copies are
    /// duplicates).
    pub published: AtomicU64,
    pub duplicates: AtomicU64,
    pub heartbeats: AtomicU64,
    pub errors: AtomicU64,
    /// The newest version this replica knows the stream holds.
    pub stream_version: AtomicU64,
    /// 1 while connected to NATS.
    pub connected: AtomicU64,
}

/// Connects (in the background: a replica starts, and serves HTTP, while NATS is down) and
/// runs the publisher, the head ticks and the heartbeat service until the replica stops.
pub(crate) async fn start(state: AppState, cfg: NatsConfig) -> anyhow::Result<()> {
    let mut options = async_nats::ConnectOptions::new()
        .name("domicile-control-plane")
        .retry_on_initial_connect()
        .max_reconnects(None);
    if let Some(ca) = &cfg.ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let metrics = state.nats.clone();
    let connected = metrics.clone();
    options = options.event_callback(move |event| {
        let connected = connected.clone();
        async move {
            match event {
                async_nats::Event::Connected => {
                    connected.connected.store(1, Ordering::Relaxed);
                    tracing::info!("connected to NATS");
                }
                async_nats::Event::Disconnected => {
                    connected.connected.store(0, Ordering::Relaxed);
                    tracing::warn!("disconnected from NATS; reconnecting");
                }
                other => tracing::debug!("NATS: {other}"),
            }
        }
    });
    let client = options
        .connect(cfg.url.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("nats: {e}"))?;
    tokio::spawn(heartbeats(
        state.clone(),
        client.clone(),
        cfg.prefix.clone(),
    ));
    tokio::spawn(head_ticks(
        state.clone(),
        client.clone(),
        cfg.prefix.clone(),
    ));
    tokio::spawn(publish(state, client, cfg));
    Ok(())
}

/// The stream, created (or its settings brought up to date) as this replica wants it.
async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<stream::Stream, String> {
    let config = stream::Config {
        name: fanout::stream_name(&cfg.prefix),
        subjects: vec![fanout::change_subjects(&cfg.prefix)],
        max_messages: cfg.keep as i64,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        allow_direct: true,
        republish: Some(stream::Republish {
            source: fanout::change_subjects(&cfg.prefix),
            destination: fanout::live_subjects(&cfg.prefix),
            headers_only: false,
        }),
        ..Default::default()
    };
    match js.get_stream(&config.name).await {
        Ok(mut existing) => {
            let current = existing
                .info()
                .await
                .map_err(|e| e.to_string())?
                .config
                .clone();
            if current.max_messages != config.max_messages
                || current.republish.as_ref().map(|r| &r.destination)
                    != config.republish.as_ref().map(|r| &r.destination)
                || !current.allow_direct
            {
                js.update_stream(&config).await.map_err(|e| e.to_string())?;
            }
            Ok(existing)
        }
        Err(_) => js
            .get_or_create_stream(config)
            .await
            .map_err(|e| e.to_string()),
    }
}

/// The newest version in the stream, when it is of `epoch`. A stream of another epoch (a
/// new store) is purged, and so is one ahead of the store (a store restored from a backup):
/// its versions name other changes now.
async fn stream_position(
    stream: &stream::Stream,
    epoch: &str,
    head: u64,
) -> Result<Option<u64>, String> {
    let info = stream.get_info().await.map_err(|e| e.to_string())?;
    if info.state.messages == 0 {
        return Ok(None);
    }
    let last = stream
        .direct_get(info.state.last_sequence)
        .await
        .map_err(|e| e.to_string())?;
    let version = fanout::subject_version(&last.subject);
    let same_epoch = last
        .headers
        .get(fanout::EPOCH_HEADER)
        .is_some_and(|e| e.as_str() == epoch);
    match version {
        Some(v) if same_epoch && v <= head => Ok(Some(v)),
        _ => {
            tracing::warn!(
                stream_version = ?version,
                head,
                same_epoch,
                "the NATS stream holds another store's changes; purging it"
            );
            stream.purge().await.map_err(|e| e.to_string())?;
            Ok(None)
        }
    }
}

/// Publishes every change this replica's tail reads, in order, each acknowledged by the
/// stream before the publisher moves on past it.
async fn publish(state: AppState, client: async_nats::Client, cfg: NatsConfig) {
    let js = jetstream::new(client);
    let epoch = state.store.epoch().to_owned();
    let mut window = state.tail.watch();
    let mut stopping = state.stopping.clone();
    let metrics = state.nats.clone();
    // Counts and logs a failure and waits a second: false when the replica stops meanwhile.
    let failed = async |stopping: &mut watch::Receiver<bool>, what: String| -> bool {
        metrics.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("{what}; retrying");
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => true,
            _ = stopping.wait_for(|s| *s) => false,
        }
    };
    'restart: loop {
        if *stopping.borrow() {
            return;
        }
        let stream = match ensure_stream(&js, &cfg).await {
            Ok(s) => s,
            Err(e) => {
                if failed(&mut stopping, format!("cannot set up the NATS stream: {e}")).await {
                    continue;
                }
                return;
            }
        };
        let head = window.borrow().end();
        let mut published = match stream_position(&stream, &epoch, head).await {
            Ok(Some(v)) => v,
            Ok(None) => head.saturating_sub(BACKFILL),
            Err(e) => {
                if failed(
                    &mut stopping,
                    format!("cannot read the NATS stream's position: {e}"),
                )
                .await
                {
                    continue;
                }
                return;
            }
        };
        metrics.stream_version.store(published, Ordering::Relaxed);
        loop {
            let current = window.borrow_and_update().clone();
            if current.end() < published {
                // The store went back (restored from a backup): the stream's newest versions
                // name other changes now; look at it again, which purges it.
                continue 'restart;
            }
            if current.end() > published {
                let lines = match current.lines_after(published) {
                    Some(lines) => lines,
                    None => match state.store.changes(published, FEED_BATCH).await {
                        Ok(batch) => batch
                            .into_iter()
                            .map(|(v, text)| (v, Bytes::from(text + "\n")))
                            .collect(),
                        Err(e) => {
                            if failed(
                                &mut stopping,
                                format!("cannot read changes to publish: {e}"),
                            )
                            .await
                            {
                                continue 'restart;
                            }
                            return;
                        }
                    },
                };
                match send(&js, &cfg.prefix, &epoch, published, &lines, &metrics).await {
                    Ok(reached) => {
                        published = reached;
                        metrics.stream_version.store(published, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => {
                        if failed(&mut stopping, format!("publishing to NATS failed: {e}")).await {
                            continue 'restart;
                        }
                        return;
                    }
                }
            }
            tokio::select! {
                changed = window.changed() => if changed.is_err() { return },
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Publishes `lines` (versions after `after`, in order), up to [`PIPELINE`] at a time, and
/// returns the last version the stream acknowledged.
async fn send(
    js: &jetstream::Context,
    prefix: &str,
    epoch: &str,
    after: u64,
    lines: &[(u64, Bytes)],
    metrics: &NatsMetrics,
) -> Result<u64, String> {
    let mut reached = after;
    for chunk in lines.chunks(PIPELINE) {
        let mut acks = Vec::with_capacity(chunk.len());
        for (version, line) in chunk {
            if *version <= reached {
                continue;
            }
            let payload = line.slice(..line.len().saturating_sub(1));
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload)
                .message_id(format!("{epoch}:{version}"))
                .header(fanout::EPOCH_HEADER, epoch);
            let ack = js
                .send_publish(fanout::change_subject(prefix, *version), publish)
                .await
                .map_err(|e| e.to_string())?;
            acks.push((*version, ack));
        }
        for (version, ack) in acks {
            let ack = ack.await.map_err(|e| e.to_string())?;
            if ack.duplicate {
                metrics.duplicates.fetch_add(1, Ordering::Relaxed);
            } else {
                metrics.published.fetch_add(1, Ordering::Relaxed);
            }
            reached = version;
        }
    }
    Ok(reached)
}

/// Every `feed_heartbeat`, this replica's epoch and head: a proxy that hears nothing for its
/// stall timeout reconnects, and one that hears of a head it lacks catches up.
async fn head_ticks(state: AppState, client: async_nats::Client, prefix: String) {
    let subject = fanout::head_subject(&prefix);
    let epoch = state.store.epoch().to_owned();
    let window = state.tail.watch();
    let mut stopping = state.stopping.clone();
    let mut every = tokio::time::interval(state.config.feed_heartbeat);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        let line = domicile_wire::FeedLine::Heartbeat {
            epoch: epoch.clone(),
            head: window.borrow().end(),
        };
        let text = serde_json::to_vec(&line).expect("feed lines serialise");
        if let Err(e) = client.publish(subject.clone(), Bytes::from(text)).await {
            tracing::debug!("cannot publish the head: {e}");
        }
    }
}

/// Answers heartbeats sent through NATS, as `POST /v1/fleet/heartbeat` would.
async fn heartbeats(state: AppState, client: async_nats::Client, prefix: String) {
    let subject = fanout::heartbeat_subject(&prefix);
    let mut stopping = state.stopping.clone();
    let mut subscription = loop {
        match client
            .queue_subscribe(subject.clone(), fanout::QUEUE_GROUP.to_owned())
            .await
        {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!("cannot subscribe to {subject}: {e}; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
            }
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(HEARTBEATS_IN_FLIGHT));
    loop {
        let message = tokio::select! {
            m = subscription.next() => match m {
                Some(m) => m,
                None => return,
            },
            _ = stopping.wait_for(|s| *s) => return,
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (state, client) = (state.clone(), client.clone());
        tokio::spawn(async move {
            let _slot = slot;
            answer(&state, &client, message).await;
        });
    }
}

async fn answer(state: &AppState, client: &async_nats::Client, message: async_nats::Message) {
    // Only the token crosses over: the header that carries a verified client certificate
    // exists on the HTTPS listener alone, and nothing from NATS can set it.
    let mut headers = HeaderMap::new();
    if let Some(value) = message
        .headers
        .as_ref()
        .and_then(|h| {
            // NATS header names keep their case; take the usual spelling or lower case.
            h.get("Authorization")
                .or_else(|| h.get(header::AUTHORIZATION.as_str()))
        })
        .and_then(|v| HeaderValue::from_str(v.as_str()).ok())
    {
        headers.insert(header::AUTHORIZATION, value);
    }
    let (status, body) = match crate::api::take_heartbeat(state, &headers, &message.payload).await {
        Ok(reply) => {
            state.nats.heartbeats.fetch_add(1, Ordering::Relaxed);
            (
                200,
                serde_json::to_vec(&reply).expect("heartbeat replies serialise"),
            )
        }
        Err(e) => (e.status().as_u16(), e.body()),
    };
    let Some(reply) = message.reply else {
        return;
    };
    let mut out = async_nats::HeaderMap::new();
    out.insert(fanout::STATUS_HEADER, status.to_string().as_str());
    if let Err(e) = client
        .publish_with_headers(reply, out, Bytes::from(body))
        .await
    {
        tracing::debug!("cannot answer a heartbeat: {e}");
    }
}
