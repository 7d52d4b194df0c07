//! The counters every step adds to. Counters are fixed arrays of atomics indexed by outcome
//! and region, so recording a request takes no lock and no allocation; names and labels are
//! only formatted at scrape time, by `ops`, which knows them. This module knows nothing above
//! it: the sizes of the arrays indexed by other modules' enums are constants they check.

use std::sync::atomic::{AtomicU64, Ordering};
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

pub struct Metrics {
    pub(crate) requests: Box<[AtomicU64]>,
    pub(crate) latency_buckets: [AtomicU64; BUCKETS.len()],
    pub(crate) latency_count: AtomicU64,
    pub(crate) latency_sum_micros: AtomicU64,
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
            requests: (0..OUTCOMES * REGION_SLOTS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            latency_buckets: Default::default(),
            latency_count: AtomicU64::new(0),
            latency_sum_micros: AtomicU64::new(0),
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
        self.requests[outcome * REGION_SLOTS + region].fetch_add(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Requests counted for one outcome and region (tests and the admin API).
    pub fn requests(&self, refusal: Option<RefusalCode>, region: Option<u8>) -> u64 {
        let outcome = refusal.map_or(0, |c| 1 + c.index());
        let region = region.map_or(REGIONS, usize::from);
        self.requests[outcome * REGION_SLOTS + region].load(Ordering::Relaxed)
    }

    /// Counts a request refused for its framing ([`crate::http::framing::Violation::index`]).
    pub fn count_malformed(&self, reason: usize) {
        if let Some(counter) = self.malformed.get(reason) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}
