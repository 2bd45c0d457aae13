//! Observability shared by every Shoal process: the one list of metric names, the registry
//! they live in, tracing setup, build information and process memory hygiene.
//!
//! This crate must never depend on another Shoal crate, and never know HTTP: `node` serves
//! what [`metrics::encode`] renders.

pub mod memory;
pub mod metrics;
pub mod tracing_setup;

/// The version of Shoal this binary was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
