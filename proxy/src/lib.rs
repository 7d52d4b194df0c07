//! Domicile's data plane: accept, identify, decide, forward only to the home region.
//!
//! Read in the order a request travels: [`listener`] -> [`identify`] -> [`map`] -> [`decide`]
//! -> [`upstream`] (via [`pipeline`], over each worker's [`connpool`]). [`config`] turns TOML into a validated configuration,
//! [`mapfile`] feeds the map replica from a file, [`admin`] serves health and metrics.

pub mod admin;
pub mod body;
pub mod config;
pub mod connpool;
pub mod decide;
pub mod geoip;
pub mod headers;
pub mod identify;
pub mod listener;
pub mod map;
pub mod mapfile;
pub mod metrics;
pub mod pipeline;
pub mod refusal;
pub mod upstream;
pub mod workspace_id;

mod server;

pub use config::ProxyConfig;
pub use server::{start, RunningProxy, StartError};
