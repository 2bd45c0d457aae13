//! Sentence embeddings with a BERT encoder (all-MiniLM-L6-v2 and its kind): tokenize,
//! encode with `candle-transformers`' `BertModel`, mean-pool over real tokens, L2-normalise.
//!
//! Files: `config.json` (Hugging Face BERT config), `model.safetensors`, `tokenizer.json`.
//! Signature: `text` BYTES `[N]` in, `embedding` FP32 `[N, hidden_size]` out.

use super::{ModelRuntime, RuntimeError, TEXT, WeightsFile};
use crate::tensor::{NamedTensor, TensorData};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::Deserialize;
use shoal_scheduler::{DataType, Signature, TensorSpec};
use tokenizers::{PaddingStrategy, Tokenizer, TruncationParams};

/// The output's name.
pub const EMBEDDING: &str = "embedding";

/// Longest input in tokens; longer texts are truncated. all-MiniLM-L6-v2 was trained on
/// at most 256 (its `max_seq_length`), although its positions reach 512.
const MAX_TOKENS: usize = 256;

/// The part of config.json the signature needs.
#[derive(Deserialize)]
pub(super) struct EmbedderConfig {
    pub hidden_size: usize,
}

pub(super) fn signature(hidden_size: usize) -> Signature {
    Signature {
        inputs: vec![TensorSpec {
            name: TEXT.into(),
            datatype: DataType::Bytes,
            shape: vec![-1],
        }],
        outputs: vec![TensorSpec {
            name: EMBEDDING.into(),
            datatype: DataType::Fp32,
            shape: vec![-1, hidden_size as i64],
        }],
    }
}

/// A loaded sentence-embedding model.
pub struct SentenceEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    signature: Signature,
    hidden_size: usize,
    device: Device,
}

impl SentenceEmbedder {
    pub fn load(
        config_json: &[u8],
        weights: WeightsFile<'_>,
        tokenizer_json: &[u8],
        device: &Device,
    ) -> Result<SentenceEmbedder, RuntimeError> {
        let config: Config = serde_json::from_slice(config_json)
            .map_err(|error| RuntimeError::Config(error.to_string()))?;
        let hidden_size: EmbedderConfig = serde_json::from_slice(config_json)
            .map_err(|error| RuntimeError::Config(error.to_string()))?;
        let weights = VarBuilder::from_tensors(weights.tensors(device)?, DType::F32, device);
        let model = BertModel::load(weights, &config)
            .map_err(|error| RuntimeError::Weights(error.to_string()))?;
        let mut tokenizer = Tokenizer::from_bytes(tokenizer_json)
            .map_err(|error| RuntimeError::Tokenizer(error.to_string()))?;
        // Pad each batch to its longest text (the file pads every text to 128), and
        // truncate at the length the model was trained on.
        if let Some(padding) = tokenizer.get_padding_mut() {
            padding.strategy = PaddingStrategy::BatchLongest;
        }
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|error| RuntimeError::Tokenizer(error.to_string()))?;
        Ok(SentenceEmbedder {
            model,
            tokenizer,
            signature: signature(hidden_size.hidden_size),
            hidden_size: hidden_size.hidden_size,
            device: device.clone(),
        })
    }

    /// Unit-length embeddings of `texts`, one row each, as a `[N, hidden]` tensor.
    pub fn embed(&self, texts: &[String]) -> Result<Tensor, RuntimeError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|error| RuntimeError::Tokenizer(error.to_string()))?;
        let rows = encodings.len();
        let tokens = encodings.first().map_or(0, |e| e.get_ids().len());
        let mut ids = Vec::with_capacity(rows * tokens);
        let mut mask = Vec::with_capacity(rows * tokens);
        for encoding in &encodings {
            ids.extend_from_slice(encoding.get_ids());
            mask.extend_from_slice(encoding.get_attention_mask());
        }
        let ids = Tensor::from_vec(ids, (rows, tokens), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, tokens), &self.device)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &token_types, Some(&mask))?;
        // Mean over the real tokens only: padding is masked out of the sum and the count.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        Ok(mean.broadcast_div(&norms)?)
    }
}

impl ModelRuntime for SentenceEmbedder {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn forward(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, RuntimeError> {
        let Some(TensorData::Bytes(texts)) = inputs
            .iter()
            .find(|input| input.name == TEXT)
            .map(|input| &input.data)
        else {
            return Err(RuntimeError::Input(format!("needs a BYTES input {TEXT:?}")));
        };
        let embeddings = self.embed(texts)?;
        Ok(vec![NamedTensor {
            name: EMBEDDING.into(),
            shape: vec![texts.len(), self.hidden_size],
            data: TensorData::Fp32(embeddings.flatten_all()?.to_vec1()?),
        }])
    }
}
