//! Model runtimes: load a version's files into something that runs forward passes.
//!
//! Every runtime sits behind [`ModelRuntime`], which batchers call from a blocking thread.
//! Only data formats are loaded (safetensors, JSON), never code.

mod mlp;

pub use mlp::{MlpClassifier, MlpConfig};

use crate::tensor::NamedTensor;
use serde::Deserialize;
use shoal_scheduler::Signature;
use std::collections::HashMap;
use std::sync::Arc;

/// A loaded model version that can run forward passes.
pub trait ModelRuntime: Send + Sync + 'static {
    /// What the model takes and gives.
    fn signature(&self) -> &Signature;

    /// Runs one forward pass over a batch whose inputs were validated against the signature.
    /// Blocking and CPU- or GPU-heavy: never call it on an async worker thread.
    fn forward(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, RuntimeError>;
}

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the version has no {0} file")]
    MissingFile(&'static str),
    #[error("config.json is not a model config Shoal knows: {0}")]
    Config(String),
    #[error("weights do not match the config: {0}")]
    Weights(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("the model was given inputs it cannot take: {0}")]
    Input(String),
}

/// The weights file every runtime reads.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The config file every runtime reads.
pub const CONFIG_FILE: &str = "config.json";

#[derive(Deserialize)]
struct ArchitectureOnly {
    architecture: String,
}

/// Loads a model from its files (file name to bytes) by the `architecture` in config.json.
pub fn load(files: &HashMap<String, Vec<u8>>) -> Result<Arc<dyn ModelRuntime>, RuntimeError> {
    let config = files
        .get(CONFIG_FILE)
        .ok_or(RuntimeError::MissingFile(CONFIG_FILE))?;
    let weights = files
        .get(WEIGHTS_FILE)
        .ok_or(RuntimeError::MissingFile(WEIGHTS_FILE))?;
    let architecture: ArchitectureOnly =
        serde_json::from_slice(config).map_err(|error| RuntimeError::Config(error.to_string()))?;
    match architecture.architecture.as_str() {
        MlpConfig::ARCHITECTURE => Ok(Arc::new(MlpClassifier::load(config, weights)?)),
        other => Err(RuntimeError::Config(format!(
            "unknown architecture {other:?}; known: {:?}",
            [MlpConfig::ARCHITECTURE]
        ))),
    }
}

/// The signature a version's files will have once loaded, read from config.json alone.
pub fn signature_of(config_json: &[u8]) -> Result<Signature, RuntimeError> {
    let architecture: ArchitectureOnly = serde_json::from_slice(config_json)
        .map_err(|error| RuntimeError::Config(error.to_string()))?;
    match architecture.architecture.as_str() {
        MlpConfig::ARCHITECTURE => {
            let config: MlpConfig = serde_json::from_slice(config_json)
                .map_err(|error| RuntimeError::Config(error.to_string()))?;
            Ok(config.signature())
        }
        other => Err(RuntimeError::Config(format!(
            "unknown architecture {other:?}"
        ))),
    }
}

/// Device bytes a replica of a model with `weights_bytes` of weights is expected to use:
/// the weights, once more for activations and copies made while loading, and a fixed
/// workspace.
pub fn memory_estimate_bytes(weights_bytes: u64) -> u64 {
    const WORKSPACE_BYTES: u64 = 16 << 20;
    weights_bytes
        .saturating_mul(2)
        .saturating_add(WORKSPACE_BYTES)
}
