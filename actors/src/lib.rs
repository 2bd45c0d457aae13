//! The node-local actor system that runs on every agent host.
//!
//! One supervision tree per host: the [`agent::Agent`] supervises a [`device::DeviceManager`]
//! (one memory ledger per device) and one [`replica::Replica`] per placed replica, and
//! restarts replicas that crash. A replica fetches and verifies its weights, reserves
//! memory, loads a model ([`runtime`], candle) and serves through a [`batcher`]: dynamic
//! batching for fixed-shape models, continuous batching ([`generate`]) for generation.
//! Models split into pipeline stages run as chains of [`shard`] actors. Forward passes run
//! on the [`compute`] pool.
//!
//! This crate reaches the outside only through the [`ArtifactFetcher`] and
//! [`ReplicaReporter`] traits that `node` implements; it never opens a socket or knows
//! HTTP. It is the only crate that knows candle. A forward pass never runs on the async
//! runtime's worker threads.

pub mod agent;
pub mod batcher;
pub mod compute;
pub mod device;
pub mod fixtures;
pub mod generate;
pub mod ledger;
pub mod optimise;
pub mod replica;
pub mod runtime;
pub mod shard;
pub mod tensor;
pub mod train;

use shoal_scheduler::{ReplicaId, ReplicaState};

/// The Iris data set (150 rows, public domain), the demo model's training data.
pub const IRIS_CSV: &str = include_str!("../data/iris.csv");

/// Fetches an artifact's bytes by sha256 digest. Called from a blocking thread.
pub trait ArtifactFetcher: Send + Sync + 'static {
    fn fetch(&self, digest: &str) -> Result<Vec<u8>, FetchError>;
}

/// Why an artifact could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no artifact with digest {0}")]
    NotFound(String),
    #[error("reading artifact {digest}: {message}")]
    Io { digest: String, message: String },
}

/// Tells the control plane what happened to a replica. Must not block.
pub trait ReplicaReporter: Send + Sync + 'static {
    fn report(&self, replica: ReplicaId, epoch: u64, state: ReplicaState, failure: Option<String>);
}
