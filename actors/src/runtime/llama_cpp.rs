//! Llama weights in GGUF as llama.cpp's converter writes them: under llama.cpp's tensor
//! names (`blk.0.attn_q.weight`), with the rows of each head of the query and key
//! projections reordered for llama.cpp's rotary embedding, which turns neighbouring pairs
//! of a head's elements where Hugging Face's turns its first half against its second.
//! Read back here to the names and row order of Hugging Face's checkpoints, which the llama
//! runtime uses; quantized matrices are reordered as stored, a row of blocks at a time.

use super::{LoadedWeights, RuntimeError};

/// What llama.cpp calls a layer's tensors, and what Hugging Face calls them.
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The same for the tensors outside the layers.
const MODEL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Whether a file's tensors are named as llama.cpp names them: its embedding table is,
/// and Hugging Face's is not there.
pub(crate) fn is_llama_cpp<'a>(names: impl Iterator<Item = &'a String>) -> bool {
    let (mut llama_cpp, mut hugging_face) = (false, false);
    for name in names {
        llama_cpp |= name == MODEL_NAMES[0].0;
        hugging_face |= name == MODEL_NAMES[0].1;
    }
    llama_cpp && !hugging_face
}

/// Hugging Face's name for llama.cpp's tensor `name`; `None` for a name llama.cpp does
/// not give a llama's tensors.
pub(crate) fn hugging_face_name(name: &str) -> Option<String> {
    if let Some((_, hf)) = MODEL_NAMES.iter().find(|(cpp, _)| *cpp == name) {
        return Some((*hf).to_string());
    }
    let rest = name.strip_prefix("blk.")?.strip_suffix(".weight")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = LAYER_NAMES.iter().find(|(cpp, _)| *cpp == part)?;
    Some(format!("model.layers.{layer}.{hf}.weight"))
}

/// llama.cpp's name for Hugging Face's tensor `name` (the converse of
/// [`hugging_face_name`]).
pub fn llama_cpp_name(name: &str) -> Option<String> {
    if let Some((cpp, _)) = MODEL_NAMES.iter().find(|(_, hf)| *hf == name) {
        return Some((*cpp).to_string());
    }
    let rest = name
        .strip_prefix("model.layers.")?
        .strip_suffix(".weight")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (cpp, _) = LAYER_NAMES.iter().find(|(_, hf)| *hf == part)?;
    Some(format!("blk.{layer}.{cpp}.weight"))
}

/// Where llama.cpp keeps row `row` (Hugging Face's order) of a query or key projection
/// whose heads are `head_dim` rows each: Hugging Face's element `i` of a head's first half
/// and element `i` of its second half sit side by side, at `2i` and `2i + 1`.
pub fn llama_cpp_row(row: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, within) = (row / head_dim, row % head_dim);
    let (second, i) = (within / half, within % half);
    head * head_dim + 2 * i + second
}

/// Renames a llama.cpp file's tensors to Hugging Face's and puts the query and key rows
/// back in Hugging Face's order, for `head_dim`-row heads.
pub(crate) fn to_hugging_face(
    weights: &mut LoadedWeights,
    head_dim: usize,
) -> Result<(), RuntimeError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(RuntimeError::Config(format!(
            "heads of {head_dim} elements cannot be paired for the rotary embedding"
        )));
    }
    weights.rename(hugging_face_name)?;
    let projections: Vec<String> = weights
        .names()
        .filter(|name| {
            name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.k_proj.weight")
        })
        .cloned()
        .collect();
    for name in projections {
        let dims = weights.dims(&name).unwrap_or_default();
        let rows = dims.first().copied().unwrap_or(0);
        if dims.len() != 2 || rows == 0 || !rows.is_multiple_of(head_dim) {
            return Err(RuntimeError::Weights(format!(
                "{name:?} is {dims:?}, not a matrix of whole heads of {head_dim} rows"
            )));
        }
        let order: Vec<usize> = (0..rows).map(|row| llama_cpp_row(row, head_dim)).collect();
        weights.reorder_rows(&name, &order)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{GgufStorage, TinyLlama, as_llama_cpp_gguf, tiny_llama};
    use crate::runtime::{LoadedModel, ModelFiles, load};
    use proptest::prelude::*;

    proptest! {
        /// Within each head the reordering is a permutation, and the names map back.
        #[test]
        fn the_row_order_is_a_permutation_within_each_head(heads in 1usize..5, half in 1usize..9) {
            let head_dim = 2 * half;
            let mut seen: Vec<usize> = (0..heads * head_dim).map(|row| llama_cpp_row(row, head_dim)).collect();
            for (row, moved) in seen.iter().enumerate() {
                prop_assert_eq!(row / head_dim, moved / head_dim);
            }
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..heads * head_dim).collect::<Vec<_>>());
        }
    }

    /// Regression: a query projection that is no matrix, quantized, made the reordering
    /// build blocks from a buffer of the wrong length, which candle answers with a panic.
    /// (A tensor of no elements is refused before, by `gguf::check_header`.)
    #[test]
    fn a_query_projection_that_is_no_matrix_is_refused_not_panicked_on() {
        use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
        use candle_core::{Device, Tensor};
        for dims in [vec![64], vec![32]] {
            let values =
                Tensor::zeros(dims.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap();
            let embedding = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
            let tensors = [
                (
                    "token_embd.weight",
                    QTensor::quantize(&embedding, GgmlDType::F32).unwrap(),
                ),
                (
                    "blk.0.attn_q.weight",
                    QTensor::quantize(&values, GgmlDType::Q8_0).unwrap(),
                ),
            ];
            let listed: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (*n, q)).collect();
            let mut file = std::io::Cursor::new(Vec::new());
            gguf_file::write(&mut file, &[], &listed).unwrap();
            let bytes = file.into_inner();
            let mut loaded = crate::runtime::WeightsFile::Gguf(&bytes)
                .load(&Device::Cpu, |_| true)
                .unwrap();
            let error = to_hugging_face(&mut loaded, 8).unwrap_err();
            assert!(
                error.to_string().contains("not a matrix"),
                "{dims:?}: {error}"
            );
        }
    }

    #[test]
    fn a_file_with_both_embedding_names_is_not_taken_for_llama_cpps() {
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert!(is_llama_cpp(
            names(&["token_embd.weight", "output.weight"]).iter()
        ));
        assert!(!is_llama_cpp(
            names(&["token_embd.weight", "model.embed_tokens.weight"]).iter()
        ));
        assert!(!is_llama_cpp(names(&["model.embed_tokens.weight"]).iter()));
    }

    #[test]
    fn names_map_both_ways_and_others_are_not_llama_cpp_names() {
        for hf in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.11.self_attn.q_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
        ] {
            let cpp = llama_cpp_name(hf).unwrap();
            assert_eq!(hugging_face_name(&cpp).as_deref(), Some(hf));
        }
        assert_eq!(
            llama_cpp_name("model.layers.3.mlp.down_proj.weight").as_deref(),
            Some("blk.3.ffn_down.weight")
        );
        assert_eq!(hugging_face_name("blk.x.attn_q.weight"), None);
        assert_eq!(hugging_face_name("rope_freqs.weight"), None);
    }

    /// The last prompt position's logits of the llama runtime for `files`.
    fn logits(files: &ModelFiles, prompt: &[u32]) -> Vec<f32> {
        let Ok(LoadedModel::Generative(model)) = load(files) else {
            panic!("a generative model");
        };
        let (_, logits) = model.prefill(prompt).unwrap();
        logits.to_vec1().unwrap()
    }

    /// The same logits from candle-transformers' llama.cpp model, which reads llama.cpp's
    /// names and row order itself: a reference that owes nothing to this module.
    fn reference_logits(files: &ModelFiles, prompt: &[u32]) -> Vec<f32> {
        use candle_transformers::models::quantized_llama::ModelWeights;
        let bytes = &files[crate::runtime::GGUF_WEIGHTS_FILE];
        let mut reader = std::io::Cursor::new(bytes);
        let content = candle_core::quantized::gguf_file::Content::read(&mut reader).unwrap();
        let device = candle_core::Device::Cpu;
        let mut model = ModelWeights::from_gguf(content, &mut reader, &device).unwrap();
        let tokens = candle_core::Tensor::new(prompt, &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        model
            .forward(&tokens, 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn close(a: &[f32], b: &[f32], tolerance: f32) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= tolerance * scale,
            "logits differ by {worst} of {scale}"
        );
        worst
    }

    #[test]
    fn a_gguf_from_llama_cpp_predicts_as_its_hugging_face_checkpoint_and_as_candles_reader() {
        let files = tiny_llama(&TinyLlama::for_tests()).unwrap();
        let prompt: Vec<u32> = "shoal serves".bytes().map(u32::from).collect();
        let expected = logits(&files, &prompt);

        let exact = as_llama_cpp_gguf(&files, GgufStorage::F32).unwrap();
        close(&logits(&exact, &prompt), &expected, 1e-4);
        close(&reference_logits(&exact, &prompt), &expected, 1e-4);

        // Quantized, both read the same blocks: nearly the same logits.
        let quantized = as_llama_cpp_gguf(&files, GgufStorage::Q8).unwrap();
        let ours = logits(&quantized, &prompt);
        close(&ours, &expected, 0.05);
        close(&ours, &reference_logits(&quantized, &prompt), 0.02);
    }
}
