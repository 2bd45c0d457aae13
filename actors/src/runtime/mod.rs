//! Model runtimes: load a version's files into something that runs forward passes.
//!
//! Every fixed-shape runtime sits behind [`ModelRuntime`], which batchers call from a
//! compute thread; generative models load as [`LlamaRuntime`], which the continuous
//! batcher drives token by token. Only data formats are loaded (safetensors, GGUF, JSON,
//! tokenizer.json), never code.
//!
//! A version's config.json names its architecture either with Shoal's own `architecture`
//! field (`mlp_classifier`) or, for models exported by Hugging Face tools, `model_type`
//! (`bert`: sentence embeddings; `llama`: text generation).

mod bert;
mod gguf;
mod llama;
pub(crate) mod llama_cpp;
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
    #[error(
        "the version has no weights file: give {} or {}",
        WEIGHTS_FILE,
        GGUF_WEIGHTS_FILE
    )]
    NoWeightsFile,
    #[error(
        "the version has both {} and {}: keep one",
        WEIGHTS_FILE,
        GGUF_WEIGHTS_FILE
    )]
    TwoWeightsFiles,
    #[error("{file} cannot be read: {message}")]
    UnreadableWeights { file: &'static str, message: String },
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

/// The weights file every runtime reads, in safetensors; or else [`GGUF_WEIGHTS_FILE`].
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The same weights in GGUF, with the same tensor names. A quantized weight matrix stays
/// quantized where the runtime multiplies by it as stored ([`Architecture::keeps_quantized`]);
/// any other quantized tensor is dequantized to `f32` as it loads.
pub const GGUF_WEIGHTS_FILE: &str = "model.gguf";
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
    /// The files a version of this architecture needs besides its weights file.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Architecture::MlpClassifier => &[CONFIG_FILE],
            Architecture::SentenceEmbedding | Architecture::Llama => &[CONFIG_FILE, TOKENIZER_FILE],
        }
    }

    /// Whether this architecture's runtime multiplies by the tensor `name` as it is stored
    /// when it is stored quantized (ggml blocks in GGUF), rather than dequantizing it to
    /// `f32` as it loads: its weight matrices, for the MLP and llama. What it keeps so is
    /// what a loaded copy takes on a device (see [`WeightsFile::loaded_bytes`]).
    pub fn keeps_quantized(self, name: &str) -> bool {
        match self {
            Architecture::MlpClassifier => name.starts_with("layers.") && name.ends_with(".weight"),
            Architecture::Llama => {
                let name = llama_cpp::hugging_face_name(name).unwrap_or_else(|| name.to_string());
                name.ends_with("_proj.weight") || name == "lm_head.weight"
            }
            Architecture::SentenceEmbedding => false,
        }
    }

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

/// A version's weights file, by its format.
#[derive(Clone, Copy, Debug)]
pub enum WeightsFile<'a> {
    Safetensors(&'a [u8]),
    Gguf(&'a [u8]),
}

impl<'a> WeightsFile<'a> {
    /// The one weights file among a version's files.
    pub fn of(files: &'a ModelFiles) -> Result<WeightsFile<'a>, RuntimeError> {
        match (files.get(WEIGHTS_FILE), files.get(GGUF_WEIGHTS_FILE)) {
            (Some(safetensors), None) => Ok(WeightsFile::Safetensors(safetensors)),
            (None, Some(gguf)) => Ok(WeightsFile::Gguf(gguf)),
            (None, None) => Err(RuntimeError::NoWeightsFile),
            (Some(_), Some(_)) => Err(RuntimeError::TwoWeightsFiles),
        }
    }

    /// The file's size in bytes.
    pub fn stored_bytes(self) -> u64 {
        match self {
            WeightsFile::Safetensors(bytes) | WeightsFile::Gguf(bytes) => bytes.len() as u64,
        }
    }

    /// The weights file called `name`, if that is a weights file's name.
    pub fn named(name: &str, bytes: &'a [u8]) -> Option<WeightsFile<'a>> {
        match name {
            WEIGHTS_FILE => Some(WeightsFile::Safetensors(bytes)),
            GGUF_WEIGHTS_FILE => Some(WeightsFile::Gguf(bytes)),
            _ => None,
        }
    }

    /// The bytes its tensors take once loaded by `architecture`'s runtime, read from the
    /// file's header alone: a quantized GGUF tensor that runtime keeps quantized takes what
    /// it is stored in, any other loads as `f32`, larger than it is stored. A GGUF file must
    /// also hold every tensor its header lists.
    pub fn loaded_bytes(self, architecture: Architecture) -> Result<u64, RuntimeError> {
        let bytes = match self {
            WeightsFile::Safetensors(bytes) => {
                return safetensors_loaded_bytes(bytes).map_err(|message| {
                    RuntimeError::UnreadableWeights {
                        file: WEIGHTS_FILE,
                        message,
                    }
                });
            }
            WeightsFile::Gguf(bytes) => bytes,
        };
        let content = read_gguf(bytes)?;
        let mut loaded_bytes = 0u64;
        for (name, info) in &content.tensor_infos {
            // Bounded by `gguf::check_header`: no product here overflows.
            let elements = info.shape.elem_count() as u64;
            let block = info.ggml_dtype.block_size() as u64;
            if !elements.is_multiple_of(block) {
                return Err(unreadable_gguf(format!(
                    "tensor {name:?} has {elements} elements, not whole blocks of {block}"
                )));
            }
            let stored = (elements / block).checked_mul(info.ggml_dtype.type_size() as u64);
            let end = stored
                .and_then(|stored| stored.checked_add(info.offset))
                .and_then(|end| end.checked_add(content.tensor_data_offset));
            let (Some(stored), Some(end)) = (stored, end) else {
                return Err(unreadable_gguf(format!("tensor {name:?} overflows")));
            };
            if end > bytes.len() as u64 {
                return Err(unreadable_gguf(format!(
                    "tensor {name:?} runs past the end of the file"
                )));
            }
            let loaded = if is_quantized(info.ggml_dtype) && architecture.keeps_quantized(name) {
                stored
            } else {
                elements.saturating_mul(4)
            };
            loaded_bytes = loaded_bytes.saturating_add(loaded);
        }
        Ok(loaded_bytes)
    }

    /// Every tensor in the file by name, on `device`, as `f32` tensors (dequantized).
    pub fn tensors(
        self,
        device: &candle_core::Device,
    ) -> Result<HashMap<String, candle_core::Tensor>, RuntimeError> {
        Ok(self.load(device, |_| false)?.tensors)
    }

    /// Every tensor in the file by name, on `device`: those stored quantized for which
    /// `keep_quantized` holds as they are stored, the rest as tensors.
    pub fn load(
        self,
        device: &candle_core::Device,
        keep_quantized: impl Fn(&str) -> bool,
    ) -> Result<LoadedWeights, RuntimeError> {
        let bytes = match self {
            WeightsFile::Safetensors(bytes) => {
                return Ok(LoadedWeights {
                    tensors: candle_core::safetensors::load_buffer(bytes, device)?,
                    quantized: HashMap::new(),
                });
            }
            WeightsFile::Gguf(bytes) => bytes,
        };
        let content = read_gguf(bytes)?;
        let mut reader = std::io::Cursor::new(bytes);
        let mut loaded = LoadedWeights {
            tensors: HashMap::new(),
            quantized: HashMap::new(),
        };
        for (name, info) in &content.tensor_infos {
            let stored = content
                .tensor(&mut reader, name, device)
                .map_err(|error| unreadable_gguf(error.to_string()))?;
            if is_quantized(info.ggml_dtype) && keep_quantized(name) {
                loaded.quantized.insert(name.clone(), Arc::new(stored));
            } else {
                let tensor = stored
                    .dequantize(device)
                    .map_err(|error| unreadable_gguf(error.to_string()))?;
                loaded.tensors.insert(name.clone(), tensor);
            }
        }
        Ok(loaded)
    }
}

/// A weights file's tensors as a runtime takes them ([`WeightsFile::load`]).
#[derive(Debug)]
pub struct LoadedWeights {
    /// Every tensor not kept quantized, `f32` when it was stored quantized.
    pub tensors: HashMap<String, candle_core::Tensor>,
    quantized: HashMap<String, Arc<candle_core::quantized::QTensor>>,
}

impl LoadedWeights {
    /// The tensor `name`, of shape `dims`, as `f32` (dequantized if it was kept quantized).
    pub fn tensor(
        &mut self,
        name: &str,
        dims: &[usize],
    ) -> Result<candle_core::Tensor, RuntimeError> {
        let tensor = match (self.tensors.remove(name), self.quantized.remove(name)) {
            (Some(tensor), _) => tensor,
            (None, Some(quantized)) => quantized.dequantize(&quantized.device())?,
            (None, None) => return Err(RuntimeError::Weights(format!("missing tensor {name:?}"))),
        };
        check_dims(name, tensor.dims(), dims)?;
        Ok(tensor.to_dtype(candle_core::DType::F32)?)
    }

    /// The matrix `name`, `[rows, columns]`, to multiply by: as stored when it was kept
    /// quantized, else the tensor.
    pub fn matrix(
        &mut self,
        name: &str,
        rows: usize,
        columns: usize,
    ) -> Result<candle_core::quantized::QMatMul, RuntimeError> {
        use candle_core::quantized::QMatMul;
        match self.quantized.remove(name) {
            Some(quantized) => {
                check_dims(name, quantized.shape().dims(), &[rows, columns])?;
                Ok(QMatMul::QTensor(quantized))
            }
            None => Ok(QMatMul::Tensor(self.tensor(name, &[rows, columns])?)),
        }
    }
}

impl LoadedWeights {
    /// Every tensor's name.
    pub(crate) fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys().chain(self.quantized.keys())
    }

    /// Renames each tensor `to` gives a new name; the others keep theirs. Two tensors
    /// that would have one name are refused.
    pub(crate) fn rename(
        &mut self,
        to: impl Fn(&str) -> Option<String>,
    ) -> Result<(), RuntimeError> {
        fn renamed<T>(
            tensors: HashMap<String, T>,
            to: &impl Fn(&str) -> Option<String>,
            taken: &mut std::collections::HashSet<String>,
        ) -> Result<HashMap<String, T>, RuntimeError> {
            let mut out = HashMap::with_capacity(tensors.len());
            for (name, tensor) in tensors {
                let new = to(&name).unwrap_or(name);
                if !taken.insert(new.clone()) {
                    return Err(RuntimeError::Weights(format!(
                        "two tensors would both be {new:?}"
                    )));
                }
                out.insert(new, tensor);
            }
            Ok(out)
        }
        let mut taken = std::collections::HashSet::new();
        self.tensors = renamed(std::mem::take(&mut self.tensors), &to, &mut taken)?;
        self.quantized = renamed(std::mem::take(&mut self.quantized), &to, &mut taken)?;
        Ok(())
    }

    /// The dimensions of tensor `name`.
    pub(crate) fn dims(&self, name: &str) -> Option<Vec<usize>> {
        match (self.tensors.get(name), self.quantized.get(name)) {
            (Some(tensor), _) => Some(tensor.dims().to_vec()),
            (None, Some(quantized)) => Some(quantized.shape().dims().to_vec()),
            (None, None) => None,
        }
    }

    /// Reorders the rows of matrix `name`: row `k` becomes what row `order[k]` was (one
    /// entry per row, each row once). A quantized matrix is reordered as stored, a row of
    /// blocks at a time.
    pub(crate) fn reorder_rows(&mut self, name: &str, order: &[usize]) -> Result<(), RuntimeError> {
        use candle_core::quantized::{QStorage, QTensor};
        let shape_error = |dims: &[usize]| {
            RuntimeError::Weights(format!(
                "{name:?} is {dims:?}: not a matrix of {} rows to reorder",
                order.len()
            ))
        };
        if let Some(tensor) = self.tensors.get_mut(name) {
            if tensor.rank() != 2 || tensor.dims()[0] != order.len() || order.is_empty() {
                return Err(shape_error(tensor.dims()));
            }
            let indices: Vec<u32> = order.iter().map(|&row| row as u32).collect();
            let indices = candle_core::Tensor::new(indices.as_slice(), tensor.device())?;
            *tensor = tensor.index_select(&indices, 0)?;
            return Ok(());
        }
        let Some(quantized) = self.quantized.get_mut(name) else {
            return Err(RuntimeError::Weights(format!("missing tensor {name:?}")));
        };
        let dims = quantized.shape().dims().to_vec();
        let dtype = quantized.dtype();
        let &[rows, columns] = dims.as_slice() else {
            return Err(shape_error(&dims));
        };
        let data = quantized.data()?;
        let row_bytes = columns / dtype.block_size() * dtype.type_size();
        if rows != order.len() || rows == 0 || rows * row_bytes != data.len() {
            return Err(shape_error(&dims));
        }
        let mut reordered = Vec::with_capacity(data.len());
        for &row in order {
            reordered.extend_from_slice(&data[row * row_bytes..(row + 1) * row_bytes]);
        }
        let device = quantized.device();
        let storage = QStorage::from_data(reordered.into(), &device, quantized.dtype())?;
        *quantized = Arc::new(QTensor::new(storage, quantized.shape().clone())?);
        Ok(())
    }
}

/// `x Wᵀ + b` with `W` as [`LoadedWeights::matrix`] gives it: quantized or a tensor.
#[derive(Debug, Clone)]
pub(crate) struct Projection {
    weight: candle_core::quantized::QMatMul,
    bias: Option<candle_core::Tensor>,
}

impl Projection {
    pub(crate) fn new(
        weight: candle_core::quantized::QMatMul,
        bias: Option<candle_core::Tensor>,
    ) -> Projection {
        Projection { weight, bias }
    }
}

impl candle_core::Module for Projection {
    fn forward(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        let projected = self.weight.forward(x)?;
        match &self.bias {
            Some(bias) => projected.broadcast_add(bias),
            None => Ok(projected),
        }
    }
}

/// Refuses a tensor `name` of shape `dims` where `expected` was asked for.
fn check_dims(name: &str, dims: &[usize], expected: &[usize]) -> Result<(), RuntimeError> {
    if dims != expected {
        return Err(RuntimeError::Weights(format!(
            "{name:?} has shape {dims:?}, expected {expected:?}"
        )));
    }
    Ok(())
}

/// Whether tensors of `dtype` are stored in quantized blocks (not plain floats).
fn is_quantized(dtype: candle_core::quantized::GgmlDType) -> bool {
    use candle_core::quantized::GgmlDType;
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Longest safetensors header read. A header lists each tensor's name, type, shape and
/// offsets, about 100 bytes a tensor: 16 MiB holds 160,000 tensors, far past any model,
/// and what it parses into stays within a few times that.
pub const SAFETENSORS_HEADER_MAX_BYTES: usize = 16 << 20;

/// What of a safetensors header entry is read: a tensor's shape (`__metadata__` has none).
#[derive(Deserialize)]
struct SafetensorsEntry {
    #[serde(default)]
    shape: Option<Vec<u64>>,
}

/// The bytes a safetensors file's tensors take as `f32`, from its header (an F16 or BF16
/// file loads at twice its size); why not, for a file whose header does not read or is
/// past [`SAFETENSORS_HEADER_MAX_BYTES`].
pub fn safetensors_loaded_bytes(bytes: &[u8]) -> Result<u64, String> {
    let length = bytes
        .get(..8)
        .and_then(|prefix| <[u8; 8]>::try_from(prefix).ok())
        .map(u64::from_le_bytes)
        .ok_or("too short for a safetensors file")?;
    if length > SAFETENSORS_HEADER_MAX_BYTES as u64 {
        return Err(format!(
            "a safetensors header of {length} bytes; at most {SAFETENSORS_HEADER_MAX_BYTES} are read"
        ));
    }
    let header = bytes
        .get(8..8 + length as usize)
        .ok_or("the safetensors header runs past the end of the file")?;
    let entries: HashMap<String, SafetensorsEntry> = serde_json::from_slice(header)
        .map_err(|error| format!("the safetensors header does not read: {error}"))?;
    let mut loaded_bytes = 0u64;
    for (name, entry) in entries.iter().filter(|(name, _)| *name != "__metadata__") {
        let elements = entry
            .shape
            .as_ref()
            .and_then(|shape| {
                shape
                    .iter()
                    .try_fold(1u64, |count, &d| count.checked_mul(d))
            })
            .ok_or_else(|| format!("tensor {name:?} has no readable shape"))?;
        loaded_bytes = loaded_bytes.saturating_add(elements.saturating_mul(4));
    }
    Ok(loaded_bytes)
}

/// A GGUF file's header, once [`gguf::check_header`] found it within bounds.
fn read_gguf(bytes: &[u8]) -> Result<candle_core::quantized::gguf_file::Content, RuntimeError> {
    gguf::check_header(bytes).map_err(unreadable_gguf)?;
    candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(bytes))
        .map_err(|error| unreadable_gguf(error.to_string()))
}

fn unreadable_gguf(message: String) -> RuntimeError {
    RuntimeError::UnreadableWeights {
        file: GGUF_WEIGHTS_FILE,
        message,
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
    let weights = WeightsFile::of(files)?;
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
    use crate::fixtures::{GgufStorage, TinyLlama, as_gguf, mlp_classifier, tiny_llama};
    use crate::tensor::TensorData;

    /// The MLP's answer to the same two rows, by output name.
    fn mlp_answer(files: &ModelFiles) -> Vec<NamedTensor> {
        let LoadedModel::Fixed(model) = load(files).unwrap() else {
            panic!("an MLP is a fixed-shape model");
        };
        let rows: Vec<f32> = (0..2 * 64).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
        let input = NamedTensor {
            name: "features".into(),
            shape: vec![2, 64],
            data: TensorData::Fp32(rows),
        };
        model.forward(&[input]).unwrap()
    }

    fn probabilities(answer: &[NamedTensor]) -> Vec<f32> {
        let output = answer.iter().find(|t| t.name == "probabilities").unwrap();
        let TensorData::Fp32(values) = &output.data else {
            panic!("probabilities are FP32");
        };
        values.clone()
    }

    #[test]
    fn a_version_in_gguf_answers_as_the_same_weights_in_safetensors() {
        let safetensors = mlp_classifier(&[64, 32, 4], 7).unwrap();
        let expected = mlp_answer(&safetensors);

        let gguf = as_gguf(&safetensors, GgufStorage::F32).unwrap();
        assert!(!gguf.contains_key(WEIGHTS_FILE));
        assert_eq!(
            mlp_answer(&gguf),
            expected,
            "f32 GGUF holds the same numbers"
        );

        // Quantized to 8 bits, the matrices are multiplied by as stored: nearly the same answer.
        let quantized = as_gguf(&safetensors, GgufStorage::Q8).unwrap();
        assert!(quantized[GGUF_WEIGHTS_FILE].len() < gguf[GGUF_WEIGHTS_FILE].len() / 2);
        let near = probabilities(&mlp_answer(&quantized));
        for (got, want) in near.iter().zip(probabilities(&expected)) {
            assert!((got - want).abs() < 0.01, "{got} against {want}");
        }
        // The MLP multiplies by its quantized matrices as they are stored (34 bytes a
        // block of 32), a runtime that does not takes them as f32.
        let stored = WeightsFile::Gguf(&quantized[GGUF_WEIGHTS_FILE]);
        let vectors = 4 * (64 + 64 + 32 + 4);
        assert_eq!(
            stored.loaded_bytes(Architecture::MlpClassifier).unwrap(),
            vectors + 34 * (32 * 64 / 32 + 4 * 32 / 32),
            "the MLP keeps its matrices quantized"
        );
        assert_eq!(
            stored
                .loaded_bytes(Architecture::SentenceEmbedding)
                .unwrap(),
            4 * (64 + 64 + 64 * 32 + 32 + 32 * 4 + 4),
            "a quantized tensor dequantized loads as f32"
        );
    }

    #[test]
    fn weights_are_sized_as_they_load_in_f32_whatever_their_stored_type() {
        let files = mlp_classifier(&[64, 32, 4], 7).unwrap();
        let f32_bytes = 4 * (64 + 64 + 64 * 32 + 32 + 32 * 4 + 4);
        let weights = WeightsFile::of(&files).unwrap();
        assert_eq!(
            weights.loaded_bytes(Architecture::MlpClassifier).unwrap(),
            f32_bytes
        );

        let device = candle_core::Device::Cpu;
        let halves: HashMap<String, candle_core::Tensor> = weights
            .tensors(&device)
            .unwrap()
            .into_iter()
            .map(|(name, tensor)| (name, tensor.to_dtype(candle_core::DType::F16).unwrap()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WEIGHTS_FILE);
        candle_core::safetensors::save(&halves, &path).unwrap();
        let stored = std::fs::read(&path).unwrap();
        assert!((stored.len() as u64) < f32_bytes * 3 / 4);
        assert_eq!(
            WeightsFile::Safetensors(&stored)
                .loaded_bytes(Architecture::MlpClassifier)
                .unwrap(),
            f32_bytes,
            "an F16 file loads at twice its size"
        );
    }

    /// Regression: the header was parsed into JSON values whatever its length, each
    /// element of an array in `__metadata__` 16 times its size in memory.
    #[test]
    fn a_safetensors_header_past_its_limit_is_refused_unread() {
        let mut bytes = (SAFETENSORS_HEADER_MAX_BYTES as u64 + 1)
            .to_le_bytes()
            .to_vec();
        bytes.extend(b"{}");
        let refused = safetensors_loaded_bytes(&bytes).unwrap_err();
        assert!(refused.contains("at most"), "{refused}");
        let refused = safetensors_loaded_bytes(b"\x02\0\0\0\0\0\0\0{").unwrap_err();
        assert!(refused.contains("runs past the end"), "{refused}");
    }

    #[test]
    fn a_generative_model_in_gguf_loads_with_the_same_weights() {
        let files = tiny_llama(&TinyLlama::for_tests()).unwrap();
        let gguf = as_gguf(&files, GgufStorage::F32).unwrap();
        let device = candle_core::Device::Cpu;
        let from_safetensors = WeightsFile::of(&files).unwrap().tensors(&device).unwrap();
        let from_gguf = WeightsFile::of(&gguf).unwrap().tensors(&device).unwrap();
        assert_eq!(from_gguf.len(), from_safetensors.len());
        for (name, tensor) in &from_safetensors {
            let other = &from_gguf[name];
            assert_eq!(other.dims(), tensor.dims(), "{name}");
            let difference = (other - tensor).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(difference.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        assert!(matches!(load(&gguf), Ok(LoadedModel::Generative(_))));
    }

    #[test]
    fn a_quantized_llama_multiplies_by_its_projections_as_stored_and_predicts_as_before() {
        let shape = TinyLlama::for_tests();
        let files = tiny_llama(&shape).unwrap();
        let quantized = as_gguf(&files, GgufStorage::Q8).unwrap();
        let device = candle_core::Device::Cpu;
        let loaded = WeightsFile::of(&quantized)
            .unwrap()
            .load(&device, |name| Architecture::Llama.keeps_quantized(name))
            .unwrap();
        let mut kept: Vec<&String> = loaded.quantized.keys().collect();
        kept.sort();
        assert_eq!(
            kept.len(),
            7 * shape.layers + 1,
            "every projection: {kept:?}"
        );
        assert!(
            kept.iter()
                .all(|name| name.ends_with("_proj.weight") || *name == "lm_head.weight"),
            "{kept:?}"
        );
        assert!(
            loaded
                .tensors
                .keys()
                .all(|name| !name.ends_with("_proj.weight")),
            "no projection is also dequantized"
        );

        let logits = |files: &ModelFiles| {
            let Ok(LoadedModel::Generative(model)) = load(files) else {
                panic!("a generative model");
            };
            let prompt = model.encode("hello shoal").unwrap();
            let (_, logits) = model.prefill(&prompt).unwrap();
            logits.to_vec1::<f32>().unwrap()
        };
        let (exact, near) = (logits(&files), logits(&quantized));
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = exact
            .iter()
            .zip(&near)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 0.05 * scale, "logits moved by {worst} of {scale}");
        let argmax =
            |values: &[f32]| (0..values.len()).max_by(|&a, &b| values[a].total_cmp(&values[b]));
        assert_eq!(argmax(&exact), argmax(&near), "the same next token");
    }

    #[test]
    fn a_version_with_two_weights_files_or_a_damaged_gguf_is_refused_by_name() {
        let mut files = mlp_classifier(&[8, 4], 1).unwrap();
        let gguf = as_gguf(&files, GgufStorage::F32).unwrap();
        files.insert(GGUF_WEIGHTS_FILE.into(), gguf[GGUF_WEIGHTS_FILE].clone());
        let Err(both) = load(&files) else {
            panic!("two weights files are ambiguous");
        };
        assert!(both.to_string().contains("keep one"), "{both}");

        let mut damaged = gguf;
        let bytes = damaged.get_mut(GGUF_WEIGHTS_FILE).unwrap();
        bytes.truncate(bytes.len() - 8);
        let Err(error) = load(&damaged) else {
            panic!("a GGUF file cut short does not load");
        };
        assert!(error.to_string().contains(GGUF_WEIGHTS_FILE), "{error}");
        let Err(error) =
            WeightsFile::Gguf(&damaged[GGUF_WEIGHTS_FILE]).loaded_bytes(Architecture::Llama)
        else {
            panic!("a GGUF file missing its last tensor's end has no size");
        };
        assert!(error.to_string().contains("runs past the end"), "{error}");
        let Err(error) =
            WeightsFile::Gguf(b"GGUF\x03\x00\x00\x00").loaded_bytes(Architecture::Llama)
        else {
            panic!("a GGUF header cut short has no size");
        };
        assert!(error.to_string().contains(GGUF_WEIGHTS_FILE), "{error}");
    }

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
