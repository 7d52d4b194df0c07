//! The `domicile` command's building blocks: the admin commands and their API client, the
//! audit log's commands (keygen, verify, report), the demo and its origins.

pub mod admin;
pub mod audit;
pub mod client;
pub mod demo;
pub mod origin;
