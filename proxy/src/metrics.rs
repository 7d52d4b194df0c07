//! Metrics in Prometheus text format.
//!
//! Counters are fixed arrays of atomics indexed by outcome and region, so recording a request
//! takes no lock and no allocation; names and labels are only formatted at scrape time.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::map::{Replica, MAX_REGIONS};
use crate::refusal::RefusalCode;
use crate::upstream::Upstreams;

/// Outcome slots: 0 = forwarded, 1.. = refusal codes.
const OUTCOMES: usize = 1 + RefusalCode::ALL.len();
/// Region slots: one per region index, plus "none".
const REGION_SLOTS: usize = MAX_REGIONS + 1;
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    requests: Box<[AtomicU64]>,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
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
    /// Resyncs by reason ([`crate::sync::Resync`]).
    pub resyncs: [AtomicU64; crate::sync::Resync::ALL.len()],
    pub lkg_writes: AtomicU64,
    pub lkg_load_failures: AtomicU64,
    pub heartbeats_ok: AtomicU64,
    pub heartbeats_failed: AtomicU64,
    /// Requests refused for their framing, by [`crate::framing::Violation`].
    pub malformed: [AtomicU64; crate::framing::Violation::ALL.len()],
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
        let region = region.map_or(MAX_REGIONS, usize::from);
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
        let region = region.map_or(MAX_REGIONS, usize::from);
        self.requests[outcome * REGION_SLOTS + region].load(Ordering::Relaxed)
    }

    /// Renders every metric.
    pub fn render(&self, replica: &Replica, upstreams: &Upstreams) -> String {
        let mut out = String::with_capacity(4096);
        let regions = replica.regions().snapshot();
        let region_name = |slot: usize| -> String {
            regions
                .get(slot)
                .map_or_else(|| "none".to_owned(), |r| r.id.to_string())
        };

        out.push_str("# HELP domicile_requests_total Requests by decision (forwarded or refusal code) and home region.\n");
        out.push_str("# TYPE domicile_requests_total counter\n");
        for outcome in 0..OUTCOMES {
            let decision = if outcome == 0 {
                "forwarded"
            } else {
                RefusalCode::ALL[outcome - 1].as_str()
            };
            for slot in 0..REGION_SLOTS {
                let n = self.requests[outcome * REGION_SLOTS + slot].load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "domicile_requests_total{{decision=\"{decision}\",region=\"{}\"}} {n}",
                        region_name(slot)
                    );
                }
            }
        }

        out.push_str(
            "# HELP domicile_request_duration_seconds Time from request head to response head.\n",
        );
        out.push_str("# TYPE domicile_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "domicile_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "domicile_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "domicile_request_duration_seconds_sum {}",
            self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "domicile_request_duration_seconds_count {count}");

        out.push_str("# HELP domicile_upstream_endpoint_healthy 1 when the endpoint passes health checks and is not ejected.\n");
        out.push_str("# TYPE domicile_upstream_endpoint_healthy gauge\n");
        for pool in upstreams.pools() {
            for endpoint in &pool.endpoints {
                let up = pool.is_up() && endpoint.is_healthy();
                let _ = writeln!(
                    out,
                    "domicile_upstream_endpoint_healthy{{region=\"{}\",endpoint=\"{}\"}} {}",
                    pool.region_id, endpoint.authority, up as u8
                );
            }
        }
        out.push_str("# TYPE domicile_upstream_region_up gauge\n");
        for pool in upstreams.pools() {
            let _ = writeln!(
                out,
                "domicile_upstream_region_up{{region=\"{}\"}} {}",
                pool.region_id,
                pool.is_up() as u8
            );
        }
        out.push_str("# TYPE domicile_upstream_ejections_total counter\n");
        for pool in upstreams.pools() {
            for endpoint in &pool.endpoints {
                let _ = writeln!(
                    out,
                    "domicile_upstream_ejections_total{{region=\"{}\",endpoint=\"{}\"}} {}",
                    pool.region_id,
                    endpoint.authority,
                    endpoint.ejections.load(Ordering::Relaxed)
                );
            }
        }
        let counters = [
            (
                "domicile_upstream_retries_total",
                "counter",
                self.upstream_retries.load(Ordering::Relaxed),
            ),
            (
                "domicile_connections_accepted_total",
                "counter",
                self.connections_accepted.load(Ordering::Relaxed),
            ),
            (
                "domicile_connections_active",
                "gauge",
                self.connections_active.load(Ordering::Relaxed),
            ),
            (
                "domicile_connections_refused_total",
                "counter",
                self.connections_refused.load(Ordering::Relaxed),
            ),
            ("domicile_map_loaded", "gauge", replica.is_loaded() as u64),
            ("domicile_map_entries", "gauge", replica.len() as u64),
            (
                "domicile_map_version",
                "gauge",
                replica.version().unwrap_or(0),
            ),
            (
                "domicile_requests_in_flight",
                "gauge",
                replica.in_flight().count(),
            ),
            (
                "domicile_in_flight_oldest_map_version",
                "gauge",
                replica.in_flight().oldest().unwrap_or(0),
            ),
        ];
        for (name, kind, value) in counters {
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
        }
        out.push_str("# TYPE domicile_map_reloads_total counter\n");
        let _ = writeln!(
            out,
            "domicile_map_reloads_total{{result=\"ok\"}} {}",
            self.map_reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "domicile_map_reloads_total{{result=\"failed\"}} {}",
            self.map_reloads_failed.load(Ordering::Relaxed)
        );

        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let sync = [
            (
                "domicile_map_applied_version",
                "gauge",
                "Map version applied from the control plane (or its last-known-good copy).",
                load(&self.map_applied_version),
            ),
            (
                "domicile_sync_snapshots_total",
                "counter",
                "Map snapshots fetched from the control plane.",
                load(&self.sync_snapshots),
            ),
            (
                "domicile_sync_errors_total",
                "counter",
                "Failed snapshot fetches and broken change streams.",
                load(&self.sync_errors),
            ),
            (
                "domicile_last_known_good_writes_total",
                "counter",
                "Last-known-good base maps written.",
                load(&self.lkg_writes),
            ),
            (
                "domicile_last_known_good_load_failures_total",
                "counter",
                "Last-known-good maps refused at start (corrupt or truncated).",
                load(&self.lkg_load_failures),
            ),
        ];
        for (name, kind, help, value) in sync {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let contact = load(&self.map_last_contact_ms);
        if contact > 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let _ = writeln!(
                out,
                "# HELP domicile_control_plane_seconds_since_contact Seconds since the control plane last answered.\n\
                 # TYPE domicile_control_plane_seconds_since_contact gauge\n\
                 domicile_control_plane_seconds_since_contact {:.3}",
                now.saturating_sub(contact) as f64 / 1000.0
            );
        }
        out.push_str("# TYPE domicile_sync_resyncs_total counter\n");
        for reason in crate::sync::Resync::ALL {
            let _ = writeln!(
                out,
                "domicile_sync_resyncs_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                load(&self.resyncs[reason as usize])
            );
        }
        out.push_str("# TYPE domicile_heartbeats_total counter\n");
        let _ = writeln!(
            out,
            "domicile_heartbeats_total{{result=\"ok\"}} {}\ndomicile_heartbeats_total{{result=\"failed\"}} {}",
            load(&self.heartbeats_ok),
            load(&self.heartbeats_failed)
        );
        out.push_str("# HELP domicile_malformed_requests_total HTTP/1.1 requests refused for their framing, by reason.\n");
        out.push_str("# TYPE domicile_malformed_requests_total counter\n");
        for violation in crate::framing::Violation::ALL {
            let _ = writeln!(
                out,
                "domicile_malformed_requests_total{{reason=\"{}\"}} {}",
                violation.as_str(),
                load(&self.malformed[violation.index()])
            );
        }
        render_origin_tls(&mut out, upstreams);
        out
    }
}

/// Per-region counts of refused origin handshakes.
fn render_origin_tls(out: &mut String, upstreams: &Upstreams) {
    if upstreams.pools().all(|pool| pool.tls.is_none()) {
        return;
    }
    out.push_str("# HELP domicile_upstream_tls_refused_total Origin TLS handshakes refused: wrong_region (the certificate lacks the region identity) or certificate/handshake failures.
");
    out.push_str(
        "# TYPE domicile_upstream_tls_refused_total counter
",
    );
    for pool in upstreams.pools().filter(|pool| pool.tls.is_some()) {
        let _ = writeln!(
            out,
            "domicile_upstream_tls_refused_total{{region=\"{}\",reason=\"wrong_region\"}} {}\n\
             domicile_upstream_tls_refused_total{{region=\"{}\",reason=\"tls\"}} {}",
            pool.region_id,
            pool.wrong_identity.load(Ordering::Relaxed),
            pool.region_id,
            pool.tls_failures.load(Ordering::Relaxed),
        );
    }
}

/// The edge's TLS listener: handshakes, refusals, reloads and certificate expiry.
pub fn render_edge_tls(out: &mut String, tls: &domicile_certs::ServerTls) {
    let stats = tls.stats();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP domicile_tls_handshakes_total Completed TLS handshakes on the HTTPS listener, full or resumed.\n\
         # TYPE domicile_tls_handshakes_total counter\n\
         domicile_tls_handshakes_total{{kind=\"full\"}} {}\n\
         domicile_tls_handshakes_total{{kind=\"resumed\"}} {}\n\
         # HELP domicile_tls_handshake_failures_total TLS handshakes that failed or timed out.\n\
         # TYPE domicile_tls_handshake_failures_total counter\n\
         domicile_tls_handshake_failures_total {}\n\
         # HELP domicile_tls_unknown_name_total Handshakes for a name no certificate covers, by what they got.\n\
         # TYPE domicile_tls_unknown_name_total counter\n\
         domicile_tls_unknown_name_total{{result=\"default\"}} {}\n\
         domicile_tls_unknown_name_total{{result=\"refused\"}} {}\n\
         # HELP domicile_tls_reloads_total Certificate reloads after the files changed.\n\
         # TYPE domicile_tls_reloads_total counter\n\
         domicile_tls_reloads_total{{result=\"ok\"}} {}\n\
         domicile_tls_reloads_total{{result=\"failed\"}} {}\n\
         # HELP domicile_tls_reload_error 1 while the last reload failed (the previous certificates are served).\n\
         # TYPE domicile_tls_reload_error gauge\n\
         domicile_tls_reload_error {}",
        load(&stats.handshakes_full),
        load(&stats.handshakes_resumed),
        load(&stats.handshake_failures),
        load(&stats.unknown_name_default),
        load(&stats.unknown_name_refused),
        load(&stats.reloads_ok),
        load(&stats.reloads_failed),
        tls.last_error().is_some() as u8,
    );
    let now = std::time::SystemTime::now();
    out.push_str("# HELP domicile_tls_certificate_expiry_seconds Seconds until each served certificate expires (negative: expired).\n");
    out.push_str("# TYPE domicile_tls_certificate_expiry_seconds gauge\n");
    for cert in tls.certs().certs() {
        let _ = writeln!(
            out,
            "domicile_tls_certificate_expiry_seconds{{cert=\"{}\"}} {}",
            cert.cert_path
                .display()
                .to_string()
                .replace(['"', '\\'], "_"),
            cert.info.seconds_left(now)
        );
    }
}
