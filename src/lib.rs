//! The `domicile` command's building blocks: the admin commands and their API client, the
//! demo and its origins.

pub mod admin;
pub mod client;
pub mod demo;
pub mod origin;
