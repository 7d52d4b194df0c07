//! Route: where a request may go. [`identify`] finds the workspace a request names (every
//! rule must agree), [`map`] is the local replica of the workspace-to-region map (fed by
//! [`mapfile`] or by the control plane's sync), [`inflight`] counts requests per map version
//! for moves, [`geoip`] finds an unidentified client's country, and [`decide`] is the pure
//! function that says Forward (to the home region) or Refuse (with a code). Nothing here does
//! I/O on the request path.

pub mod decide;
pub mod geoip;
pub mod identify;
pub mod inflight;
pub mod map;
pub mod mapfile;
pub mod workspace_id;
