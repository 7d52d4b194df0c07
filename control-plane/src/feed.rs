//! The change feed: `GET /v1/map/changes?after=V` streams every change after V, then each
//! new one as it commits, with heartbeats while nothing changes.
//!
//! One task per replica (the [`Tail`]) reads each new change from the store once and keeps
//! the newest ones in memory as ready-made lines; every stream at or near the head is served
//! from there. Only a stream further behind than the window reads the store itself, so the
//! store's work per change does not grow with the number of proxies following it.
//!
//! ```text
//! commit ─► head watch ─► Tail: store.changes(end) once ─► Window (newest lines)
//!                                                           ├─► stream 1
//!                                                           ├─► ...
//!                                                           └─► stream N
//! stream behind the window ─► store.changes(cursor) until it reaches the window
//! ```

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch};

use crate::api::AppState;
use crate::store::{Store, StoreError};

/// How many changes one read of the log takes.
pub(crate) const FEED_BATCH: u32 = 2000;
/// The newest changes the window holds, at most.
const WINDOW_LINES: usize = 8192;
/// And at most this many bytes of them.
const WINDOW_BYTES: usize = 4 << 20;

/// The newest changes, contiguous, ending at `end`.
#[derive(Debug, Default)]
pub(crate) struct Window {
    /// The newest version the window has read (the head, once the tail caught up).
    end: u64,
    /// `(version, line with its newline)`, versions `end - len + 1 ..= end`.
    lines: VecDeque<(u64, Bytes)>,
    bytes: usize,
}

/// What the window has for a stream at some version.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Served {
    /// The lines after the cursor, and the version they reach.
    Lines(Bytes, u64, usize),
    /// Nothing newer yet.
    UpToDate,
    /// The cursor is before the window (or older than the feed keeps): ask the store.
    NotHeld,
}

impl Window {
    fn empty(end: u64) -> Self {
        Self {
            end,
            ..Self::default()
        }
    }

    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    /// The oldest cursor the window can serve: the version before its first line.
    fn start(&self) -> u64 {
        self.lines.front().map_or(self.end, |(v, _)| v - 1)
    }

    /// Whether a stream at `cursor` is served from here; `floor` is the oldest version the
    /// feed still serves (older cursors get 410 from the store).
    pub(crate) fn holds(&self, cursor: u64, floor: u64) -> bool {
        cursor >= floor && cursor >= self.start() && cursor <= self.end
    }

    pub(crate) fn serve(&self, cursor: u64, floor: u64) -> Served {
        if cursor >= self.end {
            // At the head, or ahead of what this replica has read (a commit through another
            // replica it has not heard of yet): the tail brings what follows.
            return Served::UpToDate;
        }
        if !self.holds(cursor, floor) {
            return Served::NotHeld;
        }
        let skip = (cursor - self.start()) as usize;
        let n = self.lines.len() - skip;
        let bytes = if n == 1 {
            // The usual case at the head: the line itself, shared by every stream.
            self.lines[skip].1.clone()
        } else {
            let mut out =
                BytesMut::with_capacity(self.lines.range(skip..).map(|l| l.1.len()).sum());
            for (_, line) in self.lines.range(skip..) {
                out.extend_from_slice(line);
            }
            out.freeze()
        };
        Served::Lines(bytes, self.end, n)
    }

    /// Each line after `cursor` with its version (`None` when the window does not hold
    /// `cursor`), for the NATS publisher, which sends one message per change.
    pub(crate) fn lines_after(&self, cursor: u64) -> Option<Vec<(u64, Bytes)>> {
        if cursor >= self.end {
            return Some(Vec::new());
        }
        if cursor < self.start() {
            return None;
        }
        let skip = (cursor - self.start()) as usize;
        Some(self.lines.range(skip..).cloned().collect())
    }

    /// The window with `batch` (which must follow `end`) appended and the oldest lines
    /// dropped past the window's size.
    fn extended(&self, batch: &[(u64, String)]) -> Self {
        let mut text = BytesMut::with_capacity(batch.iter().map(|c| c.1.len() + 1).sum());
        for (_, line) in batch {
            text.extend_from_slice(line.as_bytes());
            text.extend_from_slice(b"\n");
        }
        let text = text.freeze();
        let mut lines = self.lines.clone();
        let mut bytes = self.bytes;
        let mut at = 0;
        for (version, line) in batch {
            let len = line.len() + 1;
            lines.push_back((*version, text.slice(at..at + len)));
            at += len;
            bytes += len;
        }
        while lines.len() > WINDOW_LINES || (bytes > WINDOW_BYTES && lines.len() > 1) {
            if let Some((_, old)) = lines.pop_front() {
                bytes -= old.len();
            }
        }
        Self {
            end: batch.last().map_or(self.end, |c| c.0),
            lines,
            bytes,
        }
    }
}

/// The replica's one reader of new changes.
#[derive(Debug, Clone)]
pub struct Tail {
    window: watch::Receiver<Arc<Window>>,
}

impl Tail {
    /// Starts reading new changes from `store` until `stopping` turns true.
    pub fn spawn(store: Store, stopping: watch::Receiver<bool>) -> Self {
        let head = *store.subscribe().borrow();
        let (tx, window) = watch::channel(Arc::new(Window::empty(head)));
        tokio::spawn(follow(store, tx, stopping));
        Self { window }
    }

    pub(crate) fn current(&self) -> Arc<Window> {
        self.window.borrow().clone()
    }

    /// The window as it changes.
    pub(crate) fn watch(&self) -> watch::Receiver<Arc<Window>> {
        self.window.clone()
    }
}

async fn follow(store: Store, tx: watch::Sender<Arc<Window>>, mut stopping: watch::Receiver<bool>) {
    let mut head = store.subscribe();
    loop {
        let known = *head.borrow_and_update();
        let end = tx.borrow().end;
        if known < end {
            // The store went back (restored from a backup): start again from its head.
            tx.send_replace(Arc::new(Window::empty(known)));
            continue;
        }
        if known > end {
            match store.changes(end, FEED_BATCH).await {
                Ok(batch) if batch.first().is_some_and(|c| c.0 == end + 1) => {
                    let next = tx.borrow().extended(&batch);
                    tx.send_replace(Arc::new(next));
                    continue;
                }
                Ok(batch) if batch.is_empty() => {
                    // The head said there was more but the read found none (a replica's
                    // watch ahead of what this connection sees): do not spin on it.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Ok(batch) => {
                    // Cannot happen with versions committed in order; serve nothing from
                    // before the gap (streams there read the store, which ends them).
                    tracing::error!(after = end, first = batch[0].0, "the change log has a gap");
                    tx.send_replace(Arc::new(Window::empty(known)));
                    continue;
                }
                Err(StoreError::Gone { .. }) => {
                    tx.send_replace(Arc::new(Window::empty(known)));
                    continue;
                }
                Err(e) => {
                    tracing::warn!("cannot read new changes: {e}; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stopping.wait_for(|s| *s) => return,
                    }
                }
            }
        }
        tokio::select! {
            changed = head.changed() => if changed.is_err() { return },
            _ = stopping.wait_for(|s| *s) => return,
            () = tx.closed() => return,
        }
    }
}

/// Streams changes after `cursor` until the client goes away or falls out of the window.
/// `batch` is the first read of the store when the stream began behind the tail's window.
pub(crate) async fn stream(
    s: AppState,
    mut cursor: u64,
    mut batch: Option<Vec<(u64, String)>>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let metrics = s.metrics.clone();
    metrics.feed_streams_open.fetch_add(1, Ordering::Relaxed);
    let _open = scopeguard(move || {
        metrics.feed_streams_open.fetch_sub(1, Ordering::Relaxed);
    });
    let mut tail = s.tail.window.clone();
    let epoch = s.store.epoch().to_owned();
    let line = |l: &domicile_wire::FeedLine| {
        let mut text = serde_json::to_vec(l).expect("feed lines serialise");
        text.push(b'\n');
        Ok(Bytes::from(text))
    };
    let window = tail.borrow_and_update().clone();
    let head = if batch.is_some() {
        // The head from the store itself: this replica may not have caught up with a commit
        // made through another replica, and a proxy reads a head below its own version as
        // the map going backwards.
        let Ok(fresh) = s.store.head().await else {
            return;
        };
        fresh.version
    } else {
        window.end()
    };
    let hello = domicile_wire::FeedLine::Hello {
        epoch: epoch.clone(),
        // Never raised to the cursor: a head below it tells the proxy the store went back.
        head: head.max(batch.as_ref().and_then(|b| b.last()).map_or(0, |c| c.0)),
    };
    let mut stopping = s.stopping.clone();
    if tx.send(line(&hello)).await.is_err() {
        return;
    }
    let send = async |bytes: Bytes, lines: usize| -> bool {
        s.metrics
            .feed_lines_sent
            .fetch_add(lines as u64, Ordering::Relaxed);
        let mut stopping = s.stopping.clone();
        tokio::select! {
            sent = tx.send(Ok(bytes)) => sent.is_ok(),
            () = stopped(&mut stopping) => false,
        }
    };
    loop {
        // Behind the window: read the store until the window holds the cursor.
        if let Some(changes) = batch.take() {
            if changes.is_empty() {
                // The head said there was more but the read found none: do not spin on it.
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                if Some(changes[0].0) != cursor.checked_add(1) {
                    // Cannot happen with versions committed in order; end the stream rather
                    // than send a gap, and let the client resync.
                    return;
                }
                let mut out = Vec::with_capacity(changes.iter().map(|c| c.1.len() + 1).sum());
                for (version, text) in &changes {
                    out.extend_from_slice(text.as_bytes());
                    out.push(b'\n');
                    cursor = *version;
                }
                if !send(Bytes::from(out), changes.len()).await {
                    return;
                }
            }
        }
        let floor = s.store.change_floor(tail.borrow().end());
        let window = tail.borrow_and_update().clone();
        match window.serve(cursor, floor) {
            Served::Lines(bytes, to, n) => {
                cursor = to;
                if !send(bytes, n).await {
                    return;
                }
                continue;
            }
            Served::NotHeld => {
                batch = match s.store.changes(cursor, FEED_BATCH).await {
                    Ok(b) => Some(b),
                    Err(StoreError::Gone { .. }) => return,
                    Err(e) => {
                        tracing::warn!("change stream ends on a store error: {e}");
                        return;
                    }
                };
                continue;
            }
            Served::UpToDate => {}
        }
        // Wait for a newer change, sending heartbeats meanwhile.
        tokio::select! {
            changed = tail.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(s.config.feed_heartbeat) => {
                let beat = domicile_wire::FeedLine::Heartbeat {
                    epoch: epoch.clone(),
                    head: tail.borrow().end().max(cursor),
                };
                if tx.send(line(&beat)).await.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
            () = stopped(&mut stopping) => return,
        }
    }
}

/// Resolves once the replica is stopping.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(from: u64, to: u64) -> Vec<(u64, String)> {
        (from..=to).map(|v| (v, format!("change {v}"))).collect()
    }

    #[test]
    fn the_window_serves_what_follows_a_cursor_inside_it() {
        let w = Window::empty(10).extended(&changes(11, 13));
        assert_eq!(w.serve(13, 0), Served::UpToDate);
        assert_eq!(
            w.serve(12, 0),
            Served::Lines(Bytes::from_static(b"change 13\n"), 13, 1)
        );
        assert_eq!(
            w.serve(10, 0),
            Served::Lines(
                Bytes::from_static(b"change 11\nchange 12\nchange 13\n"),
                13,
                3
            )
        );
        // Before the window, or older than the feed keeps: the store answers.
        assert_eq!(w.serve(9, 0), Served::NotHeld);
        assert_eq!(w.serve(11, 12), Served::NotHeld);
        // Ahead of what the tail has read: wait for it (the stream began with a store read).
        assert_eq!(w.serve(14, 0), Served::UpToDate);
        assert!(!w.holds(14, 0));
        // One message per change for the NATS publisher.
        let versions = |c: u64| {
            w.lines_after(c)
                .map(|l| l.into_iter().map(|(v, _)| v).collect::<Vec<_>>())
        };
        assert_eq!(versions(11), Some(vec![12, 13]));
        assert_eq!(versions(10), Some(vec![11, 12, 13]));
        assert_eq!(versions(13), Some(vec![]));
        assert_eq!(versions(9), None);
        assert_eq!(
            w.lines_after(12).unwrap()[0].1,
            Bytes::from_static(b"change 13\n")
        );
    }

    /// A replica's state on a new SQLite store with region `us`, without the store's poll
    /// (its reads are not the streams').
    async fn replica() -> (AppState, tempfile::TempDir, watch::Sender<bool>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cp.db").display());
        let options = crate::StoreOptions {
            poll_interval: Duration::from_secs(3600),
            ..crate::StoreOptions::default()
        };
        let store = Store::open(&url, options).await.unwrap();
        let region = domicile_wire::Region {
            id: "us".into(),
            name: "US".into(),
            jurisdiction: vec!["US".into()],
        };
        store
            .put_region(region, &crate::store::Actor::new("test"))
            .await
            .unwrap();
        let (stop, stopping) = watch::channel(false);
        let state = AppState {
            store: store.clone(),
            config: Arc::new(crate::ControlPlaneConfig::default()),
            metrics: Arc::default(),
            stopping: stopping.clone(),
            moves: crate::moves::Driver::spawn(store.clone(), stopping.clone()),
            tail: Tail::spawn(store, stopping),
            nats: Arc::default(),
        };
        (state, dir, stop)
    }

    /// A proxy ahead of the store (one restored from a backup) is told the store's head, not
    /// its own version, so that it sees the map went back and fetches a snapshot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_ahead_of_the_store_hears_the_store_s_head() {
        let (state, _dir, _stop) = replica().await;
        let head = state.store.head().await.unwrap().version;
        let ahead = head + 100;
        assert!(!state.tail.current().holds(ahead, 0));
        let first = state.store.changes(ahead, FEED_BATCH).await.unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        tokio::spawn(stream(state.clone(), ahead, Some(first), tx));
        let hello = rx.recv().await.unwrap().unwrap();
        let hello: domicile_wire::FeedLine = serde_json::from_slice(&hello).unwrap();
        match hello {
            domicile_wire::FeedLine::Hello { head: said, .. } => assert_eq!(said, head),
            other => panic!("{other:?}"),
        }
    }

    /// Every stream at the head gets every change, and the store is read once per change
    /// however many streams follow it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_at_the_head_cost_the_store_nothing_per_stream() {
        let (state, _dir, _stop) = replica().await;
        let store = state.store.clone();
        let actor = crate::store::Actor::new("test");
        // Changes made while `streams` streams follow the head: the store operations they
        // took, and whether every stream saw every change.
        let round = async |streams: usize, tag: &str| -> u64 {
            let head = *store.subscribe().borrow();
            while state.tail.current().end() < head {
                tokio::task::yield_now().await;
            }
            let mut receivers = Vec::new();
            for _ in 0..streams {
                let (tx, rx) = mpsc::channel(16);
                tokio::spawn(stream(state.clone(), head, None, tx));
                receivers.push(rx);
            }
            let before = store.operations();
            for n in 0..10 {
                store
                    .put_workspace(&format!("{tag}-{n}"), "us", false, &actor)
                    .await
                    .unwrap();
            }
            for mut rx in receivers {
                let mut text = String::new();
                while text.matches("\"type\":\"workspace\"").count() < 10 {
                    let chunk = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                        .await
                        .expect("a stream fell silent")
                        .expect("a stream ended")
                        .unwrap();
                    text.push_str(std::str::from_utf8(&chunk).unwrap());
                }
                for n in 0..10 {
                    assert!(text.contains(&format!("\"{tag}-{n}\"")), "{text}");
                }
            }
            store.operations() - before
        };
        let one = round(1, "one").await;
        let many = round(50, "many").await;
        // The writes and at most one read by the tail per change, whatever the number of
        // streams.
        eprintln!("store operations for 10 changes: {one} with 1 stream, {many} with 50");
        assert!(
            one <= 40,
            "{one} store operations for 10 changes and 1 stream"
        );
        assert!(
            many <= one + 5,
            "50 streams took {many} store operations where 1 took {one}"
        );
    }

    #[test]
    fn the_window_keeps_only_the_newest_lines() {
        let mut w = Window::empty(0);
        for start in (1..=WINDOW_LINES as u64 + 100).step_by(50) {
            w = w.extended(&changes(start, start + 49));
        }
        assert_eq!(w.lines.len(), WINDOW_LINES);
        assert_eq!(w.end(), w.lines.back().unwrap().0);
        assert_eq!(w.start(), w.end() - WINDOW_LINES as u64);
        assert_eq!(w.serve(w.start() - 1, 0), Served::NotHeld);
        assert!(matches!(w.serve(w.start(), 0), Served::Lines(_, _, n) if n == WINDOW_LINES));
    }
}
