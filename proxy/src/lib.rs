//! Domicile's data plane: accept, identify, decide, forward only to the home region, record.
//!
//! Read the folders in the order a request travels:
//!
//! 1. `listen`: accept on the cleartext and HTTPS ports, the connection limit, the TLS
//!    handshake, HTTP/1.1 or HTTP/2.
//! 2. [`http`]: the client's protocol, an adapter that turns bytes into one request head for
//!    the engine, under the strict framing rules.
//! 3. [`route`]: identify the workspace, look it up in the map replica, decide.
//! 4. `forward`: the engine, one sequence of steps for every protocol: check, route, record,
//!    refuse or forward (retry driver, failure model, header rules), relay the answer.
//! 5. `upstream`: the home region's endpoints: pools per worker, TLS that proves the region,
//!    HTTP/1.1 and HTTP/2 to origins, health checks.
//! 6. [`audit`]: one record per decision, chained, signed, verifiable.
//!
//! Beside the path: [`config`] (text to typed to validated, below everything), `refusal`
//! (the public refusal codes), `metrics` (counters), [`sync`] (follows the control plane),
//! `ops` (admin listener, metrics rendering), and `server`, which assembles the parts.

pub mod audit;
pub mod config;
mod forward;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
mod listen;
mod metrics;
mod ops;
mod refusal;
pub mod route;
mod server;
pub mod sync;
mod upstream;

pub use config::ProxyConfig;
/// The proxy's counters, which [`sync::start`] counts in.
pub use metrics::Metrics;
pub use server::{check_config, start, RunningProxy, StartError};
