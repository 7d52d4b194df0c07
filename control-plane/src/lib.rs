//! Domicile's control plane: the authoritative workspace-to-region map, its change feed, the
//! fleet of proxies that follow it, and the admin API over all of them.
//!
//! Read in this order: [`store`] (the schema and the version-ordering rule), [`api`] (the
//! routes), `feed` (the change stream), `fanout` (the same feed through NATS JetStream), [`auth`] (tokens and roles), [`moves`] (the move driver), [`server`] (starting and stopping a replica).

pub mod api;
pub mod auth;
pub mod config;
mod fanout;
mod feed;
pub mod moves;
pub mod server;
pub mod store;
pub mod testing;
mod tls;

pub use config::ControlPlaneConfig;
pub use server::{start, RunningControlPlane};
pub use store::{Store, StoreOptions};
