//! Domicile's TLS material: loading certificates and keys, choosing the edge certificate by
//! SNI, reloading it when the files change, checking that an origin proves its region, the
//! identity in a client certificate, and a development CA.
//!
//! Every endpoint uses rustls with the aws-lc-rs provider and TLS 1.3 or 1.2, nothing older.
//!
//! - [`pem`]: PEM files in, checked chains and keys out; what a certificate says of itself.
//! - [`sni`]: the edge's certificate resolver (exact names, wildcards, the default or refusal).
//! - [`server`]: a TLS server's configuration and its hot reload.
//! - [`client`]: client configurations, and why a handshake with a peer failed.
//! - [`identity`]: the `urn:domicile:<role>:<name>` a client certificate carries.
//! - [`dev`]: `domicile certs dev`, a CA and every certificate a deployment needs.

pub mod client;
pub mod dev;
pub mod identity;
pub mod pem;
pub mod server;
pub mod sni;

pub use pem::{CertError, CertInfo, LoadedCert};
pub use rustls;
pub use server::{CertSource, ServerOptions, ServerTls, Watcher};
pub use sni::{CertSet, TlsStats, UnknownName};

#[cfg(test)]
mod tests;
