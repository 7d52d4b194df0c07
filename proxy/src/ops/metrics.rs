//! Metrics in Prometheus text format: the counters of [`crate::metrics`], named and labelled
//! at scrape time.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::http::framing::Violation;
use crate::metrics::{Metrics, BUCKETS, OUTCOMES, REGION_SLOTS};
use crate::refusal::RefusalCode;
use crate::route::map::Replica;
use crate::sync::Resync;
use crate::upstream::Upstreams;

/// Renders every metric of the request path, the map and the sync.
pub(crate) fn render(m: &Metrics, replica: &Replica, upstreams: &Upstreams) -> String {
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
            let n = m.sum(|c| &c.requests[outcome * REGION_SLOTS + slot]);
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
        cumulative += m.sum(|c| &c.latency_buckets[i]);
        let _ = writeln!(
            out,
            "domicile_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let count = m.sum(|c| &c.latency_count);
    let _ = writeln!(
        out,
        "domicile_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "domicile_request_duration_seconds_sum {}",
        m.sum(|c| &c.latency_sum_micros) as f64 / 1e6
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
                pool.region_id,
                endpoint.authority(),
                up as u8
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
                endpoint.authority(),
                endpoint.ejections.load(Ordering::Relaxed)
            );
        }
    }
    let counters = [
        (
            "domicile_upstream_retries_total",
            "counter",
            m.upstream_retries.load(Ordering::Relaxed),
        ),
        (
            "domicile_connections_accepted_total",
            "counter",
            m.connections_accepted.load(Ordering::Relaxed),
        ),
        (
            "domicile_connections_active",
            "gauge",
            m.connections_active.load(Ordering::Relaxed),
        ),
        (
            "domicile_connections_refused_total",
            "counter",
            m.connections_refused.load(Ordering::Relaxed),
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
        m.map_reloads_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "domicile_map_reloads_total{{result=\"failed\"}} {}",
        m.map_reloads_failed.load(Ordering::Relaxed)
    );

    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let sync = [
        (
            "domicile_map_applied_version",
            "gauge",
            "Map version applied from the control plane (or its last-known-good copy).",
            load(&m.map_applied_version),
        ),
        (
            "domicile_sync_snapshots_total",
            "counter",
            "Map snapshots fetched from the control plane.",
            load(&m.sync_snapshots),
        ),
        (
            "domicile_sync_errors_total",
            "counter",
            "Failed snapshot fetches and broken change streams.",
            load(&m.sync_errors),
        ),
        (
            "domicile_last_known_good_writes_total",
            "counter",
            "Last-known-good base maps written.",
            load(&m.lkg_writes),
        ),
        (
            "domicile_last_known_good_load_failures_total",
            "counter",
            "Last-known-good maps refused at start (corrupt or truncated).",
            load(&m.lkg_load_failures),
        ),
    ];
    for (name, kind, help, value) in sync {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let contact = load(&m.map_last_contact_ms);
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
    for reason in Resync::ALL {
        let _ = writeln!(
            out,
            "domicile_sync_resyncs_total{{reason=\"{}\"}} {}",
            reason.as_str(),
            load(&m.resyncs[reason as usize])
        );
    }
    out.push_str("# TYPE domicile_heartbeats_total counter\n");
    let _ = writeln!(
        out,
        "domicile_heartbeats_total{{result=\"ok\"}} {}\ndomicile_heartbeats_total{{result=\"failed\"}} {}",
        load(&m.heartbeats_ok),
        load(&m.heartbeats_failed)
    );
    out.push_str("# HELP domicile_malformed_requests_total HTTP/1.1 requests refused for their framing, by reason.\n");
    out.push_str("# TYPE domicile_malformed_requests_total counter\n");
    for violation in Violation::ALL {
        let _ = writeln!(
            out,
            "domicile_malformed_requests_total{{reason=\"{}\"}} {}",
            violation.as_str(),
            load(&m.malformed[violation.index()])
        );
    }
    render_origin_tls(&mut out, upstreams);
    out
}

/// Per-region counts of refused origin handshakes.
fn render_origin_tls(out: &mut String, upstreams: &Upstreams) {
    if upstreams.pools().all(|pool| !pool.has_tls()) {
        return;
    }
    out.push_str("# HELP domicile_upstream_tls_refused_total Origin TLS handshakes refused: wrong_region (the certificate lacks the region identity) or certificate/handshake failures.
");
    out.push_str(
        "# TYPE domicile_upstream_tls_refused_total counter
",
    );
    for pool in upstreams.pools().filter(|pool| pool.has_tls()) {
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
