//! Operations: the admin listener (health, readiness, metrics, the audit log's key and
//! checkpoint) and the rendering of every counter in Prometheus text format. Nothing here
//! touches customer traffic.

pub mod admin;
pub(crate) mod metrics;
