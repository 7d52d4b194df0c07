//! Following the map through the control plane's NATS fan-out tier
//! (`[control_plane.nats]`), in place of a change stream from a replica.
//!
//! ```text
//! subscribe <prefix>.map.live.> and <prefix>.map.head
//! catch up: direct get <prefix>.map.change.<V+1>, <V+2>, ... until the stream has no more
//! loop: live change V+1 ─► apply; a later one ─► catch up to it first; an older one ─► skip
//!       head tick: another epoch ─► snapshot; a head we lack for a while ─► catch up
//!       nothing heard for stall_timeout ─► reconnect
//! ```
//!
//! The same rules as the HTTP stream decide what is applied ([`take_line`]): versions strictly
//! in order, each of this map's epoch. A change the stream no longer holds, or a head tick
//! below our version that no replica contradicts for `stall_timeout`, ends in a snapshot over
//! HTTP.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use domicile_wire::fanout;
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;

use super::{take_line, Backoff, Resync, SyncError, Syncer, Taken};
use crate::config::{ControlPlaneSection, NatsSection};

/// How long a head tick may report versions we lack before we fetch them (a change's live
/// message and a tick from another replica may arrive in either order).
const CATCH_UP_GRACE: Duration = Duration::from_millis(500);
/// The most changes one catch-up fetches one by one; further behind, a snapshot is cheaper.
const MAX_CATCH_UP: u64 = 10_000;

enum Event {
    Live(async_nats::Message),
    Tick(async_nats::Message),
}

/// The connection to NATS, shared by the sync task and the heartbeats.
pub(super) struct Nats {
    client: async_nats::Client,
    stream: jetstream::stream::Stream<()>,
    prefix: String,
}

impl Nats {
    /// Sets up the client; it connects in the background and reconnects for ever.
    pub(super) async fn connect(
        nats: &NatsSection,
        cfg: &ControlPlaneSection,
    ) -> Result<Arc<Self>, String> {
        let mut options = async_nats::ConnectOptions::new()
            .name(concat!("domicile-proxy/", env!("CARGO_PKG_VERSION")))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .request_timeout(Some(cfg.request_timeout))
            .connection_timeout(cfg.request_timeout);
        if let Some(ca) = &nats.ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = options
            .connect(nats.url.as_str())
            .await
            .map_err(|e| format!("nats: {e}"))?;
        let js = jetstream::new(client.clone());
        let stream = js
            .get_stream_no_info(fanout::stream_name(&nats.prefix))
            .await
            .map_err(|e| format!("nats: {e}"))?;
        Ok(Arc::new(Self {
            client,
            stream,
            prefix: nats.prefix.clone(),
        }))
    }

    /// Change `version` as the stream holds it: `Ok(None)` when it holds no such change.
    async fn change(&self, version: u64) -> Result<Option<(Bytes, Option<String>)>, SyncError> {
        match self
            .stream
            .direct_get_last_for_subject(fanout::change_subject(&self.prefix, version))
            .await
        {
            Ok(message) => {
                let epoch = message
                    .headers
                    .get(fanout::EPOCH_HEADER)
                    .map(|e| e.as_str().to_owned());
                Ok(Some((message.payload, epoch)))
            }
            Err(e) if matches!(e.kind(), jetstream::stream::DirectGetErrorKind::NotFound) => {
                Ok(None)
            }
            Err(e) => Err(SyncError::Nats(format!("reading change {version}: {e}"))),
        }
    }

    /// Sends a heartbeat as a request to the replicas' queue group, answered once written.
    pub(super) async fn heartbeat(
        &self,
        token: Option<String>,
        body: Vec<u8>,
    ) -> Result<domicile_wire::HeartbeatReply, String> {
        let Some(token) = token else {
            return Err("heartbeats through NATS need the proxy's token".to_owned());
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Authorization", format!("Bearer {token}").as_str());
        let reply = self
            .client
            .request_with_headers(
                fanout::heartbeat_subject(&self.prefix),
                headers,
                Bytes::from(body),
            )
            .await
            .map_err(|e| format!("nats: {e}"))?;
        let status = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(fanout::STATUS_HEADER))
            .map(|s| s.as_str().to_owned());
        if status.as_deref() != Some("200") {
            return Err(format!(
                "{}: {}",
                status.unwrap_or_else(|| "no status".to_owned()),
                String::from_utf8_lossy(&reply.payload)
            ));
        }
        serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())
    }
}

impl Syncer {
    /// Follows the fan-out tier until a resync is due (`Ok`) or the connection fails.
    pub(super) async fn follow_nats(
        &mut self,
        nats: Arc<Nats>,
        backoff: &mut Backoff,
    ) -> Result<Resync, SyncError> {
        let failed = |e: async_nats::SubscribeError| SyncError::Nats(e.to_string());
        let mut live = nats
            .client
            .subscribe(fanout::live_subjects(&nats.prefix))
            .await
            .map_err(failed)?;
        let mut ticks = nats
            .client
            .subscribe(fanout::head_subject(&nats.prefix))
            .await
            .map_err(failed)?;
        // What was committed before the subscriptions began comes from the stream; what
        // follows is in `live` already, and skipped there if the catch-up took it too.
        // Whatever was applied is persisted before an error is returned: a change the
        // replica routes with is always on its way to the journal (the same holds below).
        let mut journal = Vec::new();
        let caught_up = self.catch_up(&nats, None, &mut journal).await;
        // Caught up after (re)connecting: where the proxy stands is reported at once.
        self.prompt_pending |= !journal.is_empty();
        self.applied(journal).await;
        if let Some(reason) = caught_up? {
            return Ok(reason);
        }
        self.contact();
        self.state.send_modify(|s| s.streaming = true);
        backoff.reset();
        let stall = self.cfg.stall_timeout;
        let mut heard = Instant::now();
        let mut head_confirmed = Instant::now();
        let mut behind_since: Option<Instant> = None;
        let mut stop = self.stop.clone();
        loop {
            let event = tokio::select! {
                m = live.next() => match m {
                    Some(m) => Event::Live(m),
                    None => return Err(SyncError::Ended),
                },
                m = ticks.next() => match m {
                    Some(m) => Event::Tick(m),
                    None => return Err(SyncError::Ended),
                },
                () = tokio::time::sleep_until(heard + stall) => {
                    return Err(SyncError::Stalled(stall));
                }
                _ = stop.wait_for(|s| *s) => return Err(SyncError::Stopped),
            };
            heard = Instant::now();
            let mut journal = Vec::new();
            let outcome = match event {
                Event::Live(first) => {
                    // Everything already delivered is taken in the same round: one journal
                    // write for a burst of changes.
                    let mut outcome = self.take_live(&nats, first, &mut journal).await;
                    while matches!(outcome, Ok(None)) {
                        match live.next().now_or_never() {
                            Some(Some(next)) => {
                                outcome = self.take_live(&nats, next, &mut journal).await;
                            }
                            Some(None) => outcome = Err(SyncError::Ended),
                            None => break,
                        }
                    }
                    outcome
                }
                Event::Tick(tick) => {
                    self.take_tick(
                        &nats,
                        &tick.payload,
                        &mut journal,
                        &mut head_confirmed,
                        &mut behind_since,
                    )
                    .await
                }
            };
            self.contact();
            self.applied(journal).await;
            if let Some(reason) = outcome? {
                return Ok(reason);
            }
        }
    }

    /// One live change: applied when it is the next version, after a catch-up when it is
    /// further ahead, skipped when we have it.
    async fn take_live(
        &mut self,
        nats: &Nats,
        message: async_nats::Message,
        journal: &mut Vec<u8>,
    ) -> Result<Option<Resync>, SyncError> {
        let Some(version) = fanout::subject_version(&message.subject) else {
            return Ok(None);
        };
        let ours = self.pos.as_ref().map_or(0, |p| p.version);
        if version <= ours {
            return Ok(None);
        }
        if version > ours + 1 {
            if let Some(reason) = self.catch_up(nats, Some(version - 1), journal).await? {
                return Ok(Some(reason));
            }
        }
        let epoch = message
            .headers
            .as_ref()
            .and_then(|h| h.get(fanout::EPOCH_HEADER))
            .map(|e| e.as_str().to_owned());
        Ok(self
            .take_change(&message.payload, epoch.as_deref(), journal)
            .err())
    }

    /// A head tick: the epoch checked, a head we lack fetched once it has been reported for
    /// [`CATCH_UP_GRACE`], a head below ours that nothing contradicts for `stall_timeout`
    /// taken as the store gone back.
    async fn take_tick(
        &mut self,
        nats: &Nats,
        payload: &[u8],
        journal: &mut Vec<u8>,
        head_confirmed: &mut Instant,
        behind_since: &mut Option<Instant>,
    ) -> Result<Option<Resync>, SyncError> {
        let Ok(domicile_wire::FeedLine::Heartbeat { epoch, head }) =
            serde_json::from_slice(payload)
        else {
            tracing::debug!("ignoring an unreadable head tick");
            return Ok(None);
        };
        let Some(pos) = self.pos.as_ref() else {
            return Ok(Some(Resync::Invalid));
        };
        if epoch != pos.epoch {
            return Ok(Some(Resync::Epoch));
        }
        let now = Instant::now();
        if head < pos.version {
            // One replica may lag the other by a moment; only a head below ours from every
            // replica, for as long as a stall, means the store went back.
            if now.duration_since(*head_confirmed) > self.cfg.stall_timeout {
                return Ok(Some(Resync::Backwards));
            }
            return Ok(None);
        }
        *head_confirmed = now;
        if head == pos.version {
            *behind_since = None;
            return Ok(None);
        }
        match *behind_since {
            None => {
                *behind_since = Some(now);
                Ok(None)
            }
            Some(since) if now.duration_since(since) >= CATCH_UP_GRACE => {
                *behind_since = None;
                self.catch_up(nats, Some(head), journal).await
            }
            Some(_) => Ok(None),
        }
    }

    /// Applies one change line of `epoch`; its line joins `journal`.
    fn take_change(
        &mut self,
        payload: &[u8],
        epoch: Option<&str>,
        journal: &mut Vec<u8>,
    ) -> Result<(), Resync> {
        let pos = self.pos.as_mut().ok_or(Resync::Invalid)?;
        if epoch != Some(pos.epoch.as_str()) {
            return Err(Resync::Epoch);
        }
        match take_line(&self.local.replica, pos, payload)? {
            Taken::Applied { prompt } => {
                self.prompt_pending |= prompt;
                journal.extend_from_slice(payload);
                journal.push(b'\n');
                Ok(())
            }
            // Change subjects carry changes only; anything else is not the protocol.
            Taken::Hello { .. } | Taken::Heartbeat => Err(Resync::Invalid),
        }
    }

    /// Fetches the changes after ours from the stream, one by one, until it holds no more
    /// (`until: None`) or up to `until`, their lines added to `journal`. A change the stream
    /// should hold and does not, or a gap too long to fetch, ends in a resync.
    async fn catch_up(
        &mut self,
        nats: &Nats,
        until: Option<u64>,
        journal: &mut Vec<u8>,
    ) -> Result<Option<Resync>, SyncError> {
        for _ in 0..MAX_CATCH_UP {
            let next = self.pos.as_ref().map_or(0, |p| p.version) + 1;
            if until.is_some_and(|u| next > u) {
                return Ok(None);
            }
            if until.is_some_and(|u| u - next >= MAX_CATCH_UP) {
                return Ok(Some(Resync::Gone));
            }
            match nats.change(next).await? {
                Some((payload, epoch)) => {
                    if let Err(reason) = self.take_change(&payload, epoch.as_deref(), journal) {
                        return Ok(Some(reason));
                    }
                }
                // The head named a version the stream lacks: pruned, or never published.
                None if until.is_some() => return Ok(Some(Resync::Gone)),
                None => return Ok(None),
            }
        }
        // Still more after that many: a snapshot is cheaper than the rest one by one.
        Ok(Some(Resync::Gone))
    }
}
