//! The counters every step adds to. Counters are fixed arrays of atomics indexed by outcome
//! and region, so recording a request takes no lock and no allocation; names and labels are
//! only formatted at scrape time, by `ops`, which knows them. This module knows nothing above
//! it: the sizes of the arrays indexed by other modules' enums are constants they check.
//!
//! The per-request counters are kept per thread ([`RequestCounters`]): each thread writes its
//! own with plain loads and stores (no locked instruction, no cache line shared between
//! workers), and a scrape sums them.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::refusal::RefusalCode;

/// Region slots: one per possible region index (see `route::map::MAX_REGIONS`, which checks
/// that it is this), plus "none".
pub const REGIONS: usize = 256;
/// Reasons a sync resyncs (`sync::Resync::ALL`, which checks the count).
pub const RESYNC_REASONS: usize = 5;
/// Framing violations (`http::framing::Violation::ALL`, which checks the count).
pub const MALFORMED_REASONS: usize = 30;

/// Outcome slots: 0 = forwarded, 1.. = refusal codes.
pub(crate) const OUTCOMES: usize = 1 + RefusalCode::ALL.len();
/// Region slots: one per region index, plus "none".
pub(crate) const REGION_SLOTS: usize = REGIONS + 1;
pub(crate) const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One thread's request counters.
pub(crate) struct RequestCounters {
    owner: std::thread::ThreadId,
    pub(crate) requests: Box<[AtomicU64]>,
    pub(crate) latency_buckets: [AtomicU64; BUCKETS.len()],
    pub(crate) latency_count: AtomicU64,
    pub(crate) latency_sum_micros: AtomicU64,
}

impl RequestCounters {
    fn new() -> Self {
        Self {
            owner: std::thread::current().id(),
            requests: (0..OUTCOMES * REGION_SLOTS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            latency_buckets: Default::default(),
            latency_count: AtomicU64::new(0),
            latency_sum_micros: AtomicU64::new(0),
        }
    }
}

/// Adds to a counter only this thread writes: a load and a store, no locked instruction.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

static NEXT_METRICS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's counters, for the metrics they belong to.
    static SHARD: RefCell<Option<(u64, Arc<RequestCounters>)>> = const { RefCell::new(None) };
}

pub struct Metrics {
    /// Identifies these metrics to the threads that keep counters for them.
    id: u64,
    /// Every thread's request counters.
    shards: parking_lot::Mutex<Vec<Arc<RequestCounters>>>,
    pub upstream_retries: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    /// Connections turned away at `limits.max_connections`.
    pub connections_refused: AtomicU64,
    pub map_reloads_ok: AtomicU64,
    pub map_reloads_failed: AtomicU64,
    /// The map version the replica routes with (control-plane sync).
    pub map_applied_version: AtomicU64,
    /// When the control plane last answered, in ms since the Unix epoch (0: never).
    pub map_last_contact_ms: AtomicU64,
    pub sync_snapshots: AtomicU64,
    pub sync_errors: AtomicU64,
    /// Resyncs by reason (`sync::Resync`).
    pub resyncs: [AtomicU64; RESYNC_REASONS],
    pub lkg_writes: AtomicU64,
    pub lkg_load_failures: AtomicU64,
    pub heartbeats_ok: AtomicU64,
    pub heartbeats_failed: AtomicU64,
    /// Requests refused for their framing, by `http::framing::Violation`.
    pub malformed: [AtomicU64; MALFORMED_REASONS],
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            id: NEXT_METRICS.fetch_add(1, Ordering::Relaxed),
            shards: parking_lot::Mutex::new(Vec::new()),
            upstream_retries: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_active: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            map_reloads_ok: AtomicU64::new(0),
            map_reloads_failed: AtomicU64::new(0),
            map_applied_version: AtomicU64::new(0),
            map_last_contact_ms: AtomicU64::new(0),
            sync_snapshots: AtomicU64::new(0),
            sync_errors: AtomicU64::new(0),
            resyncs: Default::default(),
            lkg_writes: AtomicU64::new(0),
            lkg_load_failures: AtomicU64::new(0),
            heartbeats_ok: AtomicU64::new(0),
            heartbeats_failed: AtomicU64::new(0),
            malformed: Default::default(),
        }
    }
}

impl Metrics {
    /// Counts one request by outcome (`None` = forwarded) and region.
    pub fn record(&self, refusal: Option<RefusalCode>, region: Option<u8>, elapsed: Duration) {
        let outcome = refusal.map_or(0, |c| 1 + c.index());
        let region = region.map_or(REGIONS, usize::from);
        self.with_shard(|shard| {
            bump(&shard.requests[outcome * REGION_SLOTS + region], 1);
            let seconds = elapsed.as_secs_f64();
            if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
                bump(&shard.latency_buckets[i], 1);
            }
            bump(&shard.latency_count, 1);
            bump(&shard.latency_sum_micros, elapsed.as_micros() as u64);
        });
    }

    /// Runs `f` on this thread's counters (made and listed on first use).
    fn with_shard(&self, f: impl FnOnce(&RequestCounters)) {
        let mine = SHARD.try_with(|slot| {
            let mut slot = slot.borrow_mut();
            match slot.as_ref() {
                Some((id, shard)) if *id == self.id => shard.clone(),
                _ => {
                    // This thread counted for other metrics last, or for none yet (tests run
                    // several proxies in one process): these metrics' shard for it.
                    let shard = self.shard_of_this_thread();
                    *slot = Some((self.id, shard.clone()));
                    shard
                }
            }
        });
        match mine {
            Ok(shard) => f(&shard),
            // The thread is ending and its cache is gone.
            Err(_) => f(&self.shard_of_this_thread()),
        }
    }

    fn shard_of_this_thread(&self) -> Arc<RequestCounters> {
        let me = std::thread::current().id();
        let mut shards = self.shards.lock();
        if let Some(shard) = shards.iter().find(|s| s.owner == me) {
            return shard.clone();
        }
        let shard = Arc::new(RequestCounters::new());
        shards.push(shard.clone());
        shard
    }

    /// Sums one per-thread counter over every thread.
    pub(crate) fn sum(&self, counter: impl Fn(&RequestCounters) -> &AtomicU64) -> u64 {
        self.shards
            .lock()
            .iter()
            .map(|shard| counter(shard).load(Ordering::Relaxed))
            .sum()
    }

    /// Requests counted for one outcome and region (tests and the admin API).
    pub fn requests(&self, refusal: Option<RefusalCode>, region: Option<u8>) -> u64 {
        let outcome = refusal.map_or(0, |c| 1 + c.index());
        let region = region.map_or(REGIONS, usize::from);
        self.sum(|shard| &shard.requests[outcome * REGION_SLOTS + region])
    }

    /// Counts a request refused for its framing ([`crate::http::framing::Violation::index`]).
    pub fn count_malformed(&self, reason: usize) {
        if let Some(counter) = self.malformed.get(reason) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}
