//! The NATS fan-out tier's subjects and headers, shared by the control plane (which
//! publishes) and the proxies (which follow). See docs/control-plane.md, "The NATS fan-out
//! tier".
//!
//! ```text
//! <prefix>.map.change.<version>   JetStream stream `<prefix>-map`: one message per change
//!                                 (the feed line), deduplicated across replicas
//! <prefix>.map.live.<version>     the same messages, republished by the stream once stored
//! <prefix>.map.head               each replica's head, every feed_heartbeat (a feed heartbeat line)
//! <prefix>.fleet.heartbeat        proxies' heartbeats, request/reply, to one replica of a queue group
//! ```

/// The subject prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "domicile";
/// The queue group the replicas answer heartbeats in, so that each is written once.
pub const QUEUE_GROUP: &str = "domicile-control-plane";
/// On every change message: the control-plane epoch the version belongs to.
pub const EPOCH_HEADER: &str = "Domicile-Epoch";
/// On a heartbeat's reply: the HTTP status the same heartbeat would have had over HTTP.
pub const STATUS_HEADER: &str = "Domicile-Status";

/// Whether `prefix` may prefix the subjects: 1 to 32 of `A-Z a-z 0-9 _ -` (no dots, so
/// every subject below has a fixed shape, and it names the stream too).
pub fn is_valid_prefix(prefix: &str) -> bool {
    (1..=32).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The JetStream stream that keeps the changes.
pub fn stream_name(prefix: &str) -> String {
    format!("{prefix}-map")
}

/// The subject change `version` is stored under.
pub fn change_subject(prefix: &str, version: u64) -> String {
    format!("{prefix}.map.change.{version}")
}

/// Every change subject (the stream's subjects).
pub fn change_subjects(prefix: &str) -> String {
    format!("{prefix}.map.change.>")
}

/// Where the stream republishes each change it stores.
pub fn live_subjects(prefix: &str) -> String {
    format!("{prefix}.map.live.>")
}

pub fn head_subject(prefix: &str) -> String {
    format!("{prefix}.map.head")
}

pub fn heartbeat_subject(prefix: &str) -> String {
    format!("{prefix}.fleet.heartbeat")
}

/// The version a change or live subject carries (`None` for anything else).
pub fn subject_version(subject: &str) -> Option<u64> {
    let (_, last) = subject.rsplit_once('.')?;
    if last.is_empty() || !last.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    last.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_subjects() {
        assert!(is_valid_prefix("domicile"));
        assert!(is_valid_prefix("eu_prod-2"));
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(33)] {
            assert!(!is_valid_prefix(bad), "{bad:?}");
        }
        assert_eq!(change_subject("d", 42), "d.map.change.42");
        assert_eq!(subject_version("d.map.live.42"), Some(42));
        assert_eq!(
            subject_version(&change_subject("d", u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(subject_version("d.map.head"), None);
        assert_eq!(subject_version("d.map.live.4x"), None);
        assert_eq!(subject_version("d.map.live.99999999999999999999"), None);
    }
}
