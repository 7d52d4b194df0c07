//! Domicile's data plane: accept, identify, decide, forward only to the home region.
//!
//! Read in the order a request travels: [`listener`] -> [`identify`] -> [`map`] -> [`decide`]
//! -> [`upstream`] (via [`pipeline`], over each worker's [`connpool`]) -> [`audit`] (one record
//! per decision); plain HTTP/1.1 requests take the fast path, which routes through the same
//! pipeline and forwards raw heads. [`config`] turns TOML into a validated configuration,
//! [`mapfile`] feeds the map replica from a file, [`sync`] from the control plane,
//! [`inflight`] counts requests per map version for moves, [`admin`] serves health and metrics.

pub mod admin;
pub mod audit;
pub mod body;
pub mod config;
pub mod connpool;
pub mod decide;
mod fastpath;
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
pub mod geoip;
pub mod headers;
pub mod identify;
pub mod inflight;
pub mod listener;
pub mod map;
pub mod mapfile;
pub mod metrics;
pub mod pipeline;
pub mod refusal;
mod screen;
pub mod sync;
pub mod upstream;
pub mod workspace_id;

mod server;

pub use config::ProxyConfig;
pub use server::{start, RunningProxy, StartError};
