//! The `domicile` command's building blocks: the demo and its origins.

pub mod demo;
pub mod origin;
