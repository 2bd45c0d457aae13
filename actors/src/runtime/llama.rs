//! A llama-architecture text generator with one KV cache per sequence and a decode step
//! that advances many sequences at once.
//!
//! Files: `config.json` (Hugging Face llama config, parsed by `candle-transformers`),
//! `model.safetensors` or `model.gguf` (Hugging Face llama tensor names, or llama.cpp's:
//! see `llama_cpp`), `tokenizer.json`.
//!
//! Why not call `candle_transformers::models::llama::Llama::forward` directly: it takes
//! one position for the whole batch and one cache, so sequences that joined at different
//! times cannot share a forward pass. Here the projections and the MLP of a decode step
//! run as one batched matrix product over every running sequence, and only attention runs
//! per sequence against that sequence's own cache. The same weights load into
//! `candle-transformers`' `Llama` in the tests, which check that both give the same logits.
//! Decoding is greedy (argmax), so a sequence's tokens do not depend on its batch-mates.

use super::{Architecture, LoadedWeights, Projection, RuntimeError, TEXT, WeightsFile, llama_cpp};
use crate::generate::Generator;
use crate::shard::{Activation, Stage};
use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::{Embedding, Module, RmsNorm, VarBuilder};
use candle_transformers::models::llama::{Config, LlamaConfig, LlamaEosToks};
use candle_transformers::utils::repeat_kv;
use serde::Deserialize;
use shoal_scheduler::{DataType, Signature, TensorSpec};
use std::ops::Range;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// Tokens generated when a request does not say, unless config.json sets `max_new_tokens`.
const DEFAULT_MAX_NEW_TOKENS: usize = 32;

pub(super) fn signature() -> Signature {
    let text = || TensorSpec {
        name: TEXT.into(),
        datatype: DataType::Bytes,
        shape: vec![-1],
    };
    Signature {
        inputs: vec![text()],
        outputs: vec![text()],
    }
}

/// Shoal's own additions to a llama config.json.
#[derive(Deserialize)]
struct GenerationDefaults {
    max_new_tokens: Option<usize>,
}

#[derive(Debug, Clone)]
struct Layer {
    attention_norm: RmsNorm,
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
    mlp_norm: RmsNorm,
    gate: Projection,
    up: Projection,
    down: Projection,
}

/// The weights and shapes shared by the whole model and by its pipeline stages.
#[derive(Debug)]
struct Weights {
    config: Config,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Projection,
    /// Rotary tables, `[max_position_embeddings, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    head_dim: usize,
    device: Device,
}

/// A loaded llama model and its tokenizer.
pub struct LlamaRuntime {
    weights: Arc<Weights>,
    tokenizer: Tokenizer,
    signature: Signature,
    eos_token: Option<u32>,
    bos_token: Option<u32>,
    max_new_tokens: usize,
}

/// One sequence's KV cache: per layer, keys and values `[1, kv_heads, tokens, head_dim]`.
#[derive(Debug)]
pub struct LlamaSequence {
    kv: Vec<(Tensor, Tensor)>,
    tokens: usize,
}

impl LlamaSequence {
    /// Tokens in the cache (prompt and generated so far).
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

impl LlamaRuntime {
    pub fn load(
        config_json: &[u8],
        weights: WeightsFile<'_>,
        tokenizer_json: &[u8],
        device: &Device,
    ) -> Result<LlamaRuntime, RuntimeError> {
        let parse_error = |error: serde_json::Error| RuntimeError::Config(error.to_string());
        let llama: LlamaConfig = serde_json::from_slice(config_json).map_err(parse_error)?;
        let defaults: GenerationDefaults =
            serde_json::from_slice(config_json).map_err(parse_error)?;
        let config = llama.into_config(false);
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
            || config.num_key_value_heads == 0
            || !config
                .num_attention_heads
                .is_multiple_of(config.num_key_value_heads)
        {
            return Err(RuntimeError::Config(
                "hidden_size must split evenly into heads, and heads into kv heads".into(),
            ));
        }
        let mut loaded = weights.load(device, |name| Architecture::Llama.keeps_quantized(name))?;
        if llama_cpp::is_llama_cpp(loaded.names()) {
            llama_cpp::to_hugging_face(
                &mut loaded,
                config.hidden_size / config.num_attention_heads,
            )?;
        }
        let weights = Weights::load(&mut loaded, config, device)?;
        let tokenizer = Tokenizer::from_bytes(tokenizer_json)
            .map_err(|error| RuntimeError::Tokenizer(error.to_string()))?;
        let eos_token = match &weights.config.eos_token_id {
            Some(LlamaEosToks::Single(token)) => Some(*token),
            Some(LlamaEosToks::Multiple(tokens)) => tokens.first().copied(),
            None => None,
        };
        Ok(LlamaRuntime {
            bos_token: weights.config.bos_token_id,
            weights: Arc::new(weights),
            tokenizer,
            signature: signature(),
            eos_token,
            max_new_tokens: defaults.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS),
        })
    }

    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    pub fn config(&self) -> &Config {
        &self.weights.config
    }

    /// Runs the prompt through the model, fills a new cache, and returns the logits of the
    /// prompt's last position, `[vocab]`.
    pub fn prefill(&self, prompt: &[u32]) -> Result<(LlamaSequence, Tensor), RuntimeError> {
        let mut started = self.prefill_batch(&[prompt])?;
        started
            .pop()
            .ok_or_else(|| RuntimeError::Input("no prompt".into()))
    }

    /// Prefills several prompts in one forward pass: they are padded at the end to the
    /// longest, which the causal mask keeps away from the real tokens; each sequence keeps
    /// the keys and values of its own tokens and the logits of its last one.
    pub fn prefill_batch(
        &self,
        prompts: &[&[u32]],
    ) -> Result<Vec<(LlamaSequence, Tensor)>, RuntimeError> {
        let w = &self.weights;
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if prompts.iter().any(|p| p.is_empty()) {
            return Err(RuntimeError::Input("an empty prompt".into()));
        }
        if longest > w.config.max_position_embeddings {
            return Err(RuntimeError::Input(format!(
                "prompt of {longest} tokens is over the model's {}",
                w.config.max_position_embeddings
            )));
        }
        let mut ids = Vec::with_capacity(prompts.len() * longest);
        for prompt in prompts {
            ids.extend_from_slice(prompt);
            ids.extend(std::iter::repeat_n(0, longest - prompt.len()));
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), longest), &w.device)?;
        let mut x = w.embed.forward(&ids)?;
        let mut kv = Vec::with_capacity(w.layers.len());
        for layer in &w.layers {
            let (out, k, v) = w.layer_full(layer, &x)?;
            x = out;
            kv.push((k, v));
        }
        let mut started = Vec::with_capacity(prompts.len());
        for (row, prompt) in prompts.iter().enumerate() {
            let length = prompt.len();
            let own_kv = kv
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.narrow(0, row, 1)?.narrow(2, 0, length)?.contiguous()?,
                        v.narrow(0, row, 1)?.narrow(2, 0, length)?.contiguous()?,
                    ))
                })
                .collect::<Result<Vec<_>, candle_core::Error>>()?;
            let last = x.i((row, length - 1))?.unsqueeze(0)?;
            let logits = w.logits(&last)?.squeeze(0)?;
            started.push((
                LlamaSequence {
                    kv: own_kv,
                    tokens: length,
                },
                logits,
            ));
        }
        Ok(started)
    }

    /// One decode step for every sequence: `last_tokens[i]` is appended to sequence `i`,
    /// and the logits of its next token come back as row `i` of a `[B, vocab]` tensor.
    pub fn decode(
        &self,
        sequences: &mut [&mut LlamaSequence],
        last_tokens: &[u32],
    ) -> Result<Tensor, RuntimeError> {
        let w = &self.weights;
        if sequences.len() != last_tokens.len() || sequences.is_empty() {
            return Err(RuntimeError::Input(
                "one last token per sequence, at least one sequence".into(),
            ));
        }
        if let Some(full) = sequences
            .iter()
            .find(|s| s.tokens >= w.config.max_position_embeddings)
        {
            return Err(RuntimeError::Input(format!(
                "a sequence of {} tokens is at the model's limit",
                full.tokens
            )));
        }
        let batch = sequences.len();
        let positions: Vec<u32> = sequences.iter().map(|s| s.tokens as u32).collect();
        let positions = Tensor::new(positions.as_slice(), &w.device)?;
        let half = w.head_dim / 2;
        let cos = w
            .cos
            .index_select(&positions, 0)?
            .reshape((batch, 1, half))?;
        let sin = w
            .sin
            .index_select(&positions, 0)?
            .reshape((batch, 1, half))?;
        let mut x = w.embed.forward(&Tensor::new(last_tokens, &w.device)?)?;
        for (index, layer) in w.layers.iter().enumerate() {
            let heads = w.config.num_attention_heads;
            let kv_heads = w.config.num_key_value_heads;
            let h = layer.attention_norm.forward(&x)?;
            let q = rope_rows(&layer.q.forward(&h)?, batch, heads, w.head_dim, &cos, &sin)?;
            let k = rope_rows(
                &layer.k.forward(&h)?,
                batch,
                kv_heads,
                w.head_dim,
                &cos,
                &sin,
            )?;
            let v = layer
                .v
                .forward(&h)?
                .reshape((batch, kv_heads, 1, w.head_dim))?;
            let mut attended = Vec::with_capacity(batch);
            for (row, sequence) in sequences.iter_mut().enumerate() {
                let (cached_k, cached_v) = &sequence.kv[index];
                let k_all = Tensor::cat(&[cached_k, &k.narrow(0, row, 1)?], 2)?;
                let v_all = Tensor::cat(&[cached_v, &v.narrow(0, row, 1)?], 2)?;
                attended.push(w.attend(&q.narrow(0, row, 1)?, &k_all, &v_all, false)?);
                sequence.kv[index] = (k_all, v_all);
            }
            let attended = Tensor::cat(&attended, 0)?.reshape((batch, heads * w.head_dim))?;
            x = (x + layer.o.forward(&attended)?)?;
            x = (&x + w.mlp(layer, &x)?)?;
        }
        for sequence in sequences.iter_mut() {
            sequence.tokens += 1;
        }
        Ok(w.logits(&x)?)
    }

    /// Logits of the last position of `tokens` by a full forward pass with no cache.
    pub fn forward_full(&self, tokens: &[u32]) -> Result<Tensor, RuntimeError> {
        Ok(self.prefill(tokens)?.1)
    }

    /// A pipeline stage running `layers` of this model: the first stage also embeds the
    /// tokens, the last one also normalises and projects to logits.
    pub fn stage(&self, layers: Range<usize>) -> Result<LlamaStage, RuntimeError> {
        let count = self.weights.layers.len();
        if layers.start >= layers.end || layers.end > count {
            return Err(RuntimeError::Config(format!(
                "stage layers {layers:?} do not fit a model of {count} layers"
            )));
        }
        Ok(LlamaStage {
            weights: Arc::clone(&self.weights),
            first: layers.start == 0,
            last: layers.end == count,
            layers,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, RuntimeError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|error| RuntimeError::Tokenizer(error.to_string()))?;
        let mut tokens = Vec::with_capacity(encoding.len() + 1);
        tokens.extend(self.bos_token);
        tokens.extend_from_slice(encoding.get_ids());
        Ok(tokens)
    }
}

/// Greedy choice: the index of the largest logit of each row.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>, RuntimeError> {
    Ok(logits.argmax(D::Minus1)?.to_vec1()?)
}

/// `[B, heads * head_dim]` projections to `[B, heads, 1, head_dim]`, rotated at each
/// row's own position (`cos`/`sin` are `[B, 1, head_dim / 2]`).
fn rope_rows(
    projected: &Tensor,
    batch: usize,
    heads: usize,
    head_dim: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor, candle_core::Error> {
    let x = projected
        .reshape((batch, heads, 1, head_dim))?
        .contiguous()?;
    candle_nn::rotary_emb::rope(&x, cos, sin)
}

impl Weights {
    /// The model from its weights: projections as [`LoadedWeights::matrix`] gives them
    /// (multiplied by as stored when quantized), the rest through a `VarBuilder`.
    fn load(
        loaded: &mut LoadedWeights,
        config: Config,
        device: &Device,
    ) -> Result<Weights, RuntimeError> {
        let hidden = config.hidden_size;
        let head_dim = hidden / config.num_attention_heads;
        let kv_size = head_dim * config.num_key_value_heads;
        let inner = config.intermediate_size;
        let mut projection = |name: String, rows: usize, columns: usize| {
            Ok::<_, RuntimeError>(Projection::new(loaded.matrix(&name, rows, columns)?, None))
        };
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(projection(
                "lm_head.weight".into(),
                config.vocab_size,
                hidden,
            )?)
        };
        let mut projections = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let name = |part: &str| format!("model.layers.{index}.{part}.weight");
            projections.push([
                projection(name("self_attn.q_proj"), hidden, hidden)?,
                projection(name("self_attn.k_proj"), kv_size, hidden)?,
                projection(name("self_attn.v_proj"), kv_size, hidden)?,
                projection(name("self_attn.o_proj"), hidden, hidden)?,
                projection(name("mlp.gate_proj"), inner, hidden)?,
                projection(name("mlp.up_proj"), inner, hidden)?,
                projection(name("mlp.down_proj"), hidden, inner)?,
            ]);
        }
        let vb = VarBuilder::from_tensors(std::mem::take(&mut loaded.tensors), DType::F32, device);
        Weights::assemble(&vb, config, lm_head, projections, device)
            .map_err(|error| RuntimeError::Weights(error.to_string()))
    }

    fn assemble(
        vb: &VarBuilder,
        config: Config,
        lm_head: Option<Projection>,
        projections: Vec<[Projection; 7]>,
        device: &Device,
    ) -> Result<Weights, candle_core::Error> {
        let hidden = config.hidden_size;
        let head_dim = hidden / config.num_attention_heads;
        let embed = candle_nn::embedding(config.vocab_size, hidden, vb.pp("model.embed_tokens"))?;
        let lm_head = lm_head.unwrap_or_else(|| {
            Projection::new(
                candle_core::quantized::QMatMul::Tensor(embed.embeddings().clone()),
                None,
            )
        });
        let norm = candle_nn::rms_norm(hidden, config.rms_norm_eps, vb.pp("model.norm"))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for (index, [q, k, v, o, gate, up, down]) in projections.into_iter().enumerate() {
            let vb = vb.pp(format!("model.layers.{index}"));
            layers.push(Layer {
                attention_norm: candle_nn::rms_norm(
                    hidden,
                    config.rms_norm_eps,
                    vb.pp("input_layernorm"),
                )?,
                q,
                k,
                v,
                o,
                mlp_norm: candle_nn::rms_norm(
                    hidden,
                    config.rms_norm_eps,
                    vb.pp("post_attention_layernorm"),
                )?,
                gate,
                up,
                down,
            });
        }
        // The same rotary tables as the reference: position × inverse frequency.
        let inverse_frequency: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / config.rope_theta.powf(i as f32 / head_dim as f32))
            .collect();
        let frequencies = Tensor::new(inverse_frequency.as_slice(), device)?;
        let positions = Tensor::arange(0, config.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((config.max_position_embeddings, 1))?;
        let angles = positions.matmul(&frequencies.reshape((1, head_dim / 2))?)?;
        Ok(Weights {
            cos: angles.cos()?,
            sin: angles.sin()?,
            config,
            embed,
            layers,
            norm,
            lm_head,
            head_dim,
            device: device.clone(),
        })
    }

    /// One layer over whole sequences `[batch, tokens, hidden]` starting at position 0, with
    /// a causal mask. Returns the output and the layer's keys and values
    /// `[batch, kv_heads, tokens, head_dim]` for a cache. Rows padded at the end are
    /// harmless to the real tokens before them: the mask hides later positions.
    fn layer_full(
        &self,
        layer: &Layer,
        x: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor), candle_core::Error> {
        let (batch, tokens, _) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let kv_heads = self.config.num_key_value_heads;
        let h = layer.attention_norm.forward(x)?;
        let cos = self.cos.narrow(0, 0, tokens)?;
        let sin = self.sin.narrow(0, 0, tokens)?;
        let split = |t: Tensor, n: usize| -> Result<Tensor, candle_core::Error> {
            t.reshape((batch, tokens, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = candle_nn::rotary_emb::rope(&split(layer.q.forward(&h)?, heads)?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&split(layer.k.forward(&h)?, kv_heads)?, &cos, &sin)?;
        let v = split(layer.v.forward(&h)?, kv_heads)?;
        let attended = self.attend(&q, &k, &v, tokens > 1)?;
        let attended = attended
            .transpose(1, 2)?
            .reshape((batch, tokens, heads * self.head_dim))?;
        let x = (x + layer.o.forward(&attended)?)?;
        let out = (&x + self.mlp(layer, &x)?)?;
        Ok((out, k, v))
    }

    /// Scaled dot-product attention of `q` `[b, heads, q_len, d]` over `k`, `v`
    /// `[b, kv_heads, kv_len, d]`; causal over the last `q_len` positions when asked.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
    ) -> Result<Tensor, candle_core::Error> {
        let repeat = self.config.num_attention_heads / self.config.num_key_value_heads;
        let k = repeat_kv(k.clone(), repeat)?;
        let v = repeat_kv(v.clone(), repeat)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let scores = if causal {
            let (_, _, q_len, kv_len) = scores.dims4()?;
            let mask: Vec<u8> = (0..q_len)
                .flat_map(|i| (0..kv_len).map(move |j| u8::from(j + q_len > i + kv_len)))
                .collect();
            let mask = Tensor::from_slice(&mask, (q_len, kv_len), q.device())?
                .broadcast_as(scores.shape())?;
            let minus_infinity =
                Tensor::new(f32::NEG_INFINITY, q.device())?.broadcast_as(scores.shape())?;
            mask.where_cond(&minus_infinity, &scores)?
        } else {
            scores
        };
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> Result<Tensor, candle_core::Error> {
        let h = layer.mlp_norm.forward(x)?;
        let gated = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
        layer.down.forward(&gated)
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor, candle_core::Error> {
        self.lm_head.forward(&self.norm.forward(x)?)
    }
}

/// A contiguous range of a llama model's layers, as one pipeline stage.
#[derive(Debug)]
pub struct LlamaStage {
    weights: Arc<Weights>,
    layers: Range<usize>,
    first: bool,
    last: bool,
}

impl Stage for LlamaStage {
    /// Tokens in (first stage) or hidden states `[tokens, hidden]`; hidden states out, or
    /// the last position's logits `[vocab]` from the last stage.
    fn forward(&self, input: Activation) -> Result<Activation, RuntimeError> {
        let w = &self.weights;
        let mut x = match (input, self.first) {
            (Activation::Tokens(tokens), true) => w
                .embed
                .forward(&Tensor::new(tokens.as_slice(), &w.device)?)?,
            (Activation::Hidden { shape, values }, false) => {
                Tensor::from_vec(values, shape.as_slice(), &w.device)?
            }
            (_, first) => {
                return Err(RuntimeError::Input(format!(
                    "stage {:?} (first: {first}) got the wrong kind of activation",
                    self.layers
                )));
            }
        };
        let mut x3 = x.unsqueeze(0)?;
        for layer in &w.layers[self.layers.clone()] {
            x3 = w.layer_full(layer, &x3)?.0;
        }
        x = x3.squeeze(0)?;
        if self.last {
            let (tokens, _) = x.dims2()?;
            x = w.logits(&x.i(tokens - 1)?.unsqueeze(0)?)?.squeeze(0)?;
        }
        Ok(Activation::Hidden {
            shape: x.dims().to_vec(),
            values: x.flatten_all()?.to_vec1()?,
        })
    }
}

impl Generator for LlamaRuntime {
    type Sequence = LlamaSequence;

    fn encode(&self, prompt: &str) -> Result<Vec<u32>, RuntimeError> {
        LlamaRuntime::encode(self, prompt)
    }

    fn decode_text(&self, tokens: &[u32]) -> Result<String, RuntimeError> {
        self.tokenizer
            .decode(tokens, true)
            .map_err(|error| RuntimeError::Tokenizer(error.to_string()))
    }

    fn eos_token(&self) -> Option<u32> {
        self.eos_token
    }

    fn context_tokens_max(&self) -> usize {
        self.weights.config.max_position_embeddings
    }

    fn cached_tokens(&self, sequence: &LlamaSequence) -> usize {
        sequence.tokens
    }

    fn default_max_new_tokens(&self) -> usize {
        self.max_new_tokens
    }

    fn start(&self, prompts: &[&[u32]]) -> Result<Vec<(LlamaSequence, u32)>, RuntimeError> {
        let started = self.prefill_batch(prompts)?;
        let mut first = Vec::with_capacity(started.len());
        for (sequence, logits) in started {
            let next = argmax_rows(&logits.unsqueeze(0)?)?;
            first.push((sequence, next[0]));
        }
        Ok(first)
    }

    fn step(
        &self,
        sequences: &mut [&mut LlamaSequence],
        last_tokens: &[u32],
    ) -> Result<Vec<u32>, RuntimeError> {
        argmax_rows(&self.decode(sequences, last_tokens)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{TinyLlama, tiny_llama};
    use crate::runtime::{CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, WeightsFile};
    use candle_transformers::models::llama::{Cache, Llama};

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn batched_decoding_gives_the_logits_of_candle_transformers_llama() {
        let files = tiny_llama(&TinyLlama::for_tests()).unwrap();
        let device = Device::Cpu;
        let ours = LlamaRuntime::load(
            &files[CONFIG_FILE],
            WeightsFile::Safetensors(&files[WEIGHTS_FILE]),
            &files[TOKENIZER_FILE],
            &device,
        )
        .unwrap();
        let weights =
            VarBuilder::from_buffered_safetensors(files[WEIGHTS_FILE].clone(), DType::F32, &device)
                .unwrap();
        let reference = Llama::load(weights, ours.config()).unwrap();

        let prompts = [
            ours.encode("first prompt").unwrap(),
            ours.encode("2nd").unwrap(),
        ];
        let mut sequences = Vec::new();
        let mut caches = Vec::new();
        let mut last = Vec::new();
        for prompt in &prompts {
            let mut cache = Cache::new(true, DType::F32, ours.config(), &device).unwrap();
            let input = Tensor::new(prompt.as_slice(), &device)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let expected = reference
                .forward(&input, 0, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let (sequence, logits) = ours.prefill(prompt).unwrap();
            assert!(max_difference(&logits, &expected) < 1e-4);
            last.push(argmax_rows(&logits.unsqueeze(0).unwrap()).unwrap()[0]);
            sequences.push(sequence);
            caches.push(cache);
        }
        // Prefilled together (padded to the longer prompt), they get the same logits.
        let together = ours
            .prefill_batch(&[prompts[0].as_slice(), prompts[1].as_slice()])
            .unwrap();
        for (index, (sequence, logits)) in together.iter().enumerate() {
            let (alone, alone_logits) = ours.prefill(&prompts[index]).unwrap();
            assert_eq!(sequence.tokens(), alone.tokens());
            assert!(max_difference(logits, &alone_logits) < 1e-4);
        }
        // Both sequences advance together, at different positions, for a few steps.
        for _ in 0..6 {
            let mut expected_rows = Vec::new();
            for (index, cache) in caches.iter_mut().enumerate() {
                let position = sequences[index].tokens();
                let input = Tensor::new(&[[last[index]]], &device).unwrap();
                expected_rows.push(reference.forward(&input, position, cache).unwrap());
            }
            let expected = Tensor::cat(&expected_rows, 0).unwrap();
            let mut batch: Vec<&mut LlamaSequence> = sequences.iter_mut().collect();
            let logits = ours.decode(&mut batch, &last).unwrap();
            assert!(
                max_difference(&logits, &expected) < 1e-4,
                "difference {}",
                max_difference(&logits, &expected)
            );
            last = argmax_rows(&logits).unwrap();
        }
    }

    #[test]
    fn a_stage_split_gives_the_unsplit_logits() {
        let files = tiny_llama(&TinyLlama::for_tests()).unwrap();
        let model = LlamaRuntime::load(
            &files[CONFIG_FILE],
            WeightsFile::Safetensors(&files[WEIGHTS_FILE]),
            &files[TOKENIZER_FILE],
            &Device::Cpu,
        )
        .unwrap();
        let tokens = model.encode("split me").unwrap();
        let whole = model.forward_full(&tokens).unwrap();
        let first = model.stage(0..1).unwrap();
        let second = model.stage(1..2).unwrap();
        let middle = first.forward(Activation::Tokens(tokens)).unwrap();
        let Activation::Hidden { shape, values } = second.forward(middle).unwrap() else {
            panic!("logits are hidden values");
        };
        let split = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
        assert!(max_difference(&split, &whole) < 1e-5);
        assert!(model.stage(1..1).is_err() && model.stage(0..3).is_err());
    }
}
