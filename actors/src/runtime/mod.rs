//! Model runtimes: load a version's files into something that runs forward passes.
//!
//! Every fixed-shape runtime sits behind [`ModelRuntime`], which batchers call from a
//! compute thread; generative models load as [`LlamaRuntime`], which the continuous
//! batcher drives token by token. Only data formats are loaded (safetensors, JSON,
//! tokenizer.json), never code.
//!
//! A version's config.json names its architecture either with Shoal's own `architecture`
//! field (`mlp_classifier`) or, for models exported by Hugging Face tools, `model_type`
//! (`bert`: sentence embeddings; `llama`: text generation).

mod bert;
mod llama;
mod mlp;

pub use bert::{EMBEDDING, SentenceEmbedder};
pub use llama::{LlamaRuntime, LlamaSequence, LlamaStage};
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
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("this build cannot use {0}: {1}")]
    Device(String, String),
}

/// The weights file every runtime reads.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The config file every runtime reads.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer file of text models (Hugging Face `tokenizers` JSON).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The name of the BYTES input and output of text models.
pub const TEXT: &str = "text";

/// A version's files: file name to bytes.
pub type ModelFiles = HashMap<String, Vec<u8>>;

/// Which runtime a config.json asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    MlpClassifier,
    SentenceEmbedding,
    Llama,
}

#[derive(Deserialize)]
struct ArchitectureOnly {
    architecture: Option<String>,
    model_type: Option<String>,
}

impl Architecture {
    /// Reads the architecture from config.json.
    pub fn of(config_json: &[u8]) -> Result<Architecture, RuntimeError> {
        let named: ArchitectureOnly = serde_json::from_slice(config_json)
            .map_err(|error| RuntimeError::Config(error.to_string()))?;
        match (named.architecture.as_deref(), named.model_type.as_deref()) {
            (Some(MlpConfig::ARCHITECTURE), _) => Ok(Architecture::MlpClassifier),
            (None, Some("bert")) => Ok(Architecture::SentenceEmbedding),
            (None, Some("llama")) => Ok(Architecture::Llama),
            (architecture, model_type) => {
                let shown = |value: Option<&str>| value.map_or("none".into(), |v| format!("{v:?}"));
                Err(RuntimeError::Config(format!(
                    "unknown architecture {} / model_type {}; known: architecture {:?}, \
                     model_type \"bert\" or \"llama\"",
                    shown(architecture),
                    shown(model_type),
                    MlpConfig::ARCHITECTURE
                )))
            }
        }
    }
}

/// A loaded model: fixed-shape (dynamic batching) or generative (continuous batching).
#[derive(Clone)]
pub enum LoadedModel {
    Fixed(Arc<dyn ModelRuntime>),
    Generative(Arc<LlamaRuntime>),
}

impl LoadedModel {
    pub fn signature(&self) -> &Signature {
        match self {
            LoadedModel::Fixed(model) => model.signature(),
            LoadedModel::Generative(model) => model.signature(),
        }
    }
}

/// Loads a model from its files onto the CPU.
pub fn load(files: &ModelFiles) -> Result<LoadedModel, RuntimeError> {
    load_on(files, &candle_core::Device::Cpu)
}

/// Loads a model from its files onto `device`, by the architecture in config.json.
pub fn load_on(
    files: &ModelFiles,
    device: &candle_core::Device,
) -> Result<LoadedModel, RuntimeError> {
    let file = |name: &'static str| files.get(name).ok_or(RuntimeError::MissingFile(name));
    let config = file(CONFIG_FILE)?;
    let weights = file(WEIGHTS_FILE)?;
    Ok(match Architecture::of(config)? {
        Architecture::MlpClassifier => {
            LoadedModel::Fixed(Arc::new(MlpClassifier::load_on(config, weights, device)?))
        }
        Architecture::SentenceEmbedding => LoadedModel::Fixed(Arc::new(SentenceEmbedder::load(
            config,
            weights,
            file(TOKENIZER_FILE)?,
            device,
        )?)),
        Architecture::Llama => LoadedModel::Generative(Arc::new(LlamaRuntime::load(
            config,
            weights,
            file(TOKENIZER_FILE)?,
            device,
        )?)),
    })
}

/// The candle device a ledger device stands for. A GPU needs the `cuda` feature.
pub fn candle_device(
    device: &shoal_scheduler::Device,
) -> Result<candle_core::Device, RuntimeError> {
    match device.kind {
        shoal_scheduler::DeviceKind::Cpu => Ok(candle_core::Device::Cpu),
        shoal_scheduler::DeviceKind::Gpu => {
            let ordinal = crate::device::cuda_ordinal(device.id).ok_or_else(|| {
                RuntimeError::Device(device.id.to_string(), "not a gpu id".into())
            })?;
            candle_core::Device::new_cuda(ordinal)
                .map_err(|error| RuntimeError::Device(device.id.to_string(), error.to_string()))
        }
    }
}

/// Whether a model with `signature` generates text (a llama: `text` in, `text` out), so
/// it can answer completions.
pub fn generates_text(signature: &Signature) -> bool {
    *signature == llama::signature()
}

/// The signature a version's files will have once loaded, read from config.json alone.
pub fn signature_of(config_json: &[u8]) -> Result<Signature, RuntimeError> {
    let parse_error = |error: serde_json::Error| RuntimeError::Config(error.to_string());
    match Architecture::of(config_json)? {
        Architecture::MlpClassifier => {
            let config: MlpConfig = serde_json::from_slice(config_json).map_err(parse_error)?;
            Ok(config.signature())
        }
        Architecture::SentenceEmbedding => {
            let config: bert::EmbedderConfig =
                serde_json::from_slice(config_json).map_err(parse_error)?;
            Ok(bert::signature(config.hidden_size))
        }
        Architecture::Llama => Ok(llama::signature()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the message showed Rust's `None` and `Some("gpt2")`.
    #[test]
    fn an_unknown_architecture_is_named_in_plain_words() {
        let Err(error) = Architecture::of(br#"{"model_type": "gpt2"}"#) else {
            panic!("gpt2 is not an architecture Shoal runs");
        };
        let message = error.to_string();
        assert!(
            message.contains(r#"unknown architecture none / model_type "gpt2""#),
            "{message}"
        );
        assert!(!message.contains("Some("), "{message}");
    }
}
