//! Optimising a model version into a new one (`shoal model optimise`): magnitude pruning
//! and quantization of its weight matrices.
//!
//! - Pruning zeroes the given share of each matrix's entries, those of least magnitude.
//! - Quantization stores each matrix whose rows are whole blocks in one of ggml's block
//!   formats (`Q8_0`, `Q4_0`), in `model.gguf`; the rest stay `f32`, as llama.cpp keeps
//!   norms and biases.
//!
//! Embedding tables (tensors named `…embed…`) and vectors (biases, norms, the input
//! standardisation) are left as they are, and nothing changes a float type (an f16 matrix
//! pruned stays f16). The other files (config, tokenizer) are copied. A version in GGUF is
//! refused: its matrices may be quantized already.
//! The result records what was done and to what in its weights file's metadata, so the new
//! version's content address covers its provenance; and it is loaded once, as a replica
//! would load it, before it is returned.

use crate::runtime::{GGUF_WEIGHTS_FILE, ModelFiles, RuntimeError, WEIGHTS_FILE, WeightsFile};
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// The metadata key that names the version an optimised one was made from.
pub const OPTIMISED_FROM_KEY: &str = "shoal.optimised_from";
/// The metadata key that says what was done to it.
pub const OPTIMISATION_KEY: &str = "shoal.optimisation";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// 8-bit blocks of 32 with one f16 scale: 8.5 bits a weight.
    Q8_0,
    /// 4-bit blocks of 32 with one f16 scale: 4.5 bits a weight.
    Q4_0,
}

impl Quantization {
    fn dtype(self) -> GgmlDType {
        match self {
            Quantization::Q8_0 => GgmlDType::Q8_0,
            Quantization::Q4_0 => GgmlDType::Q4_0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4_0 => "q4_0",
        }
    }
}

/// What to do to a version's weights.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Optimisation {
    /// Share of each matrix's entries to zero, in `(0, 1)`.
    pub prune: Option<f64>,
    pub quantize: Option<Quantization>,
}

impl Optimisation {
    /// In words, as the metadata records it: `prune 0.5, quantize q8_0`.
    pub fn describe(&self) -> String {
        let mut steps = Vec::new();
        if let Some(share) = self.prune {
            steps.push(format!("prune {share}"));
        }
        if let Some(quantization) = self.quantize {
            steps.push(format!("quantize {}", quantization.as_str()));
        }
        steps.join(", ")
    }
}

/// What happened to one tensor.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorChange {
    pub name: String,
    pub shape: Vec<usize>,
    /// `q8_0` or `q4_0`; else its float type as it was (`f32`, `f16`, `bf16`).
    pub stored_as: &'static str,
    /// Entries set to zero by pruning.
    pub zeroed: usize,
    /// ‖new − old‖ / ‖old‖ over the tensor's entries (Frobenius norms), as it loads.
    pub relative_error: f64,
}

/// What an optimisation did.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimiseReport {
    /// Every matrix it could change, by name; vectors and embeddings are not listed.
    pub tensors: Vec<TensorChange>,
    pub weights_bytes_before: u64,
    pub weights_bytes_after: u64,
    /// The new version's weight format: `gguf` when quantized, else `safetensors`.
    pub format: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum OptimiseError {
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("writing the weights: {0}")]
    Write(String),
}

/// Optimises the version in `files` as `optimisation` says; `from` names it in the new
/// weights' metadata (e.g. `iris version 1, manifest sha256 …`).
pub fn optimise(
    files: &ModelFiles,
    optimisation: &Optimisation,
    from: &str,
) -> Result<(ModelFiles, OptimiseReport), OptimiseError> {
    check(optimisation)?;
    let weights = WeightsFile::of(files)?;
    if matches!(weights, WeightsFile::Gguf(_)) {
        // Its matrices may be quantized already: quantized again, they would carry both
        // rounding errors; its other tensors would come back as f32.
        return Err(OptimiseError::Settings(
            "this version keeps its weights in GGUF; optimise the version in safetensors it \
             was made from"
                .into(),
        ));
    }
    let weights_bytes_before = weights.stored_bytes();
    let tensors = weights.tensors(&Device::Cpu)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut changes = Vec::new();
    let mut stored: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut kept: Vec<(String, Tensor)> = Vec::with_capacity(names.len());
    for name in names {
        let source = &tensors[name];
        // What is not quantized keeps its float type: f16 stays f16.
        let (float, float_name) = float_type(source.dtype());
        let tensor = source.to_dtype(candle_core::DType::F32)?;
        if !changeable(name, &tensor) {
            stored.push((name.clone(), QTensor::quantize(&tensor, float)?));
            kept.push((name.clone(), source.clone()));
            continue;
        }
        let original = tensor.flatten_all()?.to_vec1::<f32>()?;
        let mut values = original.clone();
        let zeroed = match optimisation.prune {
            Some(share) => prune(&mut values, share),
            None => 0,
        };
        let pruned = Tensor::from_vec(values, tensor.shape(), &Device::Cpu)?;
        let row = tensor.dims().last().copied().unwrap_or(0);
        let (dtype, stored_as) = match optimisation.quantize {
            Some(quantization) if row % quantization.dtype().block_size() == 0 => {
                (quantization.dtype(), quantization.as_str())
            }
            _ => (float, float_name),
        };
        let quantized = QTensor::quantize(&pruned, dtype)?;
        let loaded = quantized
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        changes.push(TensorChange {
            name: name.clone(),
            shape: tensor.dims().to_vec(),
            stored_as,
            zeroed,
            relative_error: relative_error(&original, &loaded),
        });
        stored.push((name.clone(), quantized));
        kept.push((name.clone(), pruned.to_dtype(source.dtype())?));
    }
    if changes.is_empty() {
        return Err(OptimiseError::Settings(
            "the version has no weight matrix to optimise (only vectors and embeddings)".into(),
        ));
    }
    if let Some(quantization) = optimisation.quantize
        && changes
            .iter()
            .all(|change| change.stored_as != quantization.as_str())
    {
        let rows: Vec<String> = changes
            .iter()
            .map(|change| change.shape.last().copied().unwrap_or(0).to_string())
            .collect();
        return Err(OptimiseError::Settings(format!(
            "quantizing to {} would change nothing: no weight matrix has rows of whole \
             blocks of {} (its rows are {} wide)",
            quantization.as_str(),
            quantization.dtype().block_size(),
            rows.join(", ")
        )));
    }
    let description = optimisation.describe();
    let mut optimised = files.clone();
    optimised.remove(WEIGHTS_FILE);
    optimised.remove(GGUF_WEIGHTS_FILE);
    let format = if optimisation.quantize.is_some() {
        let from_value = gguf_file::Value::String(from.to_string());
        let what_value = gguf_file::Value::String(description);
        let metadata = [
            (OPTIMISED_FROM_KEY, &from_value),
            (OPTIMISATION_KEY, &what_value),
        ];
        let listed: Vec<(&str, &QTensor)> = stored.iter().map(|(n, q)| (n.as_str(), q)).collect();
        let mut gguf = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut gguf, &metadata, &listed)?;
        optimised.insert(GGUF_WEIGHTS_FILE.to_string(), gguf.into_inner());
        "gguf"
    } else {
        let metadata = HashMap::from([
            (OPTIMISED_FROM_KEY.to_string(), from.to_string()),
            (OPTIMISATION_KEY.to_string(), description),
        ]);
        let bytes =
            safetensors::serialize(kept.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .map_err(|error| OptimiseError::Write(error.to_string()))?;
        optimised.insert(WEIGHTS_FILE.to_string(), bytes);
        "safetensors"
    };
    // A version that would not load is no optimisation: prove it loads as a replica would.
    crate::runtime::load(&optimised)?;
    let weights_bytes_after = WeightsFile::of(&optimised)?.stored_bytes();
    Ok((
        optimised,
        OptimiseReport {
            tensors: changes,
            weights_bytes_before,
            weights_bytes_after,
            format,
        },
    ))
}

/// How an optimised classifier answers a labelled data set next to the version it was
/// made from.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Comparison {
    pub rows: usize,
    /// Share of rows both label alike.
    pub agreement: f64,
    /// Share of rows each labels as the data set does.
    pub source_accuracy: f64,
    pub optimised_accuracy: f64,
    /// The largest change of one class probability over every row.
    pub largest_probability_change: f32,
}

/// Runs the classifiers `source` and `optimised` on every row of `csv` (a header, numeric
/// feature columns, the class name last, as `shoal model train` reads it) and compares
/// their answers with each other and with the data set's labels.
pub fn compare_classifiers(
    source: &ModelFiles,
    optimised: &ModelFiles,
    csv: &str,
) -> Result<Comparison, OptimiseError> {
    let data = crate::train::parse_csv(csv)
        .map_err(|error| OptimiseError::Settings(format!("the data set: {error}")))?;
    let answer = |files: &ModelFiles| -> Result<(Vec<f32>, Vec<String>), OptimiseError> {
        let crate::runtime::LoadedModel::Fixed(model) = crate::runtime::load(files)? else {
            return Err(OptimiseError::Settings(
                "a text generator is no classifier".into(),
            ));
        };
        let [input] = model.signature().inputs.as_slice() else {
            return Err(OptimiseError::Settings(
                "a classifier takes one input".into(),
            ));
        };
        let rows = data.classes.len();
        let inputs = [crate::tensor::NamedTensor {
            name: input.name.clone(),
            shape: vec![rows, data.width],
            data: crate::tensor::TensorData::Fp32(data.features.clone()),
        }];
        crate::tensor::validate_inputs(model.signature(), &inputs).map_err(|error| {
            OptimiseError::Settings(format!("the data set does not fit the model: {error}"))
        })?;
        let outputs = model.forward(&inputs)?;
        let output = |name: &str| outputs.iter().find(|output| output.name == name);
        match (output("probabilities"), output("label")) {
            (
                Some(crate::tensor::NamedTensor {
                    data: crate::tensor::TensorData::Fp32(probabilities),
                    ..
                }),
                Some(crate::tensor::NamedTensor {
                    data: crate::tensor::TensorData::Bytes(labels),
                    ..
                }),
            ) => Ok((probabilities.clone(), labels.clone())),
            _ => Err(OptimiseError::Settings(
                "not a classifier: no FP32 probabilities and BYTES label outputs".into(),
            )),
        }
    };
    let (source_probabilities, source_labels) = answer(source)?;
    let (optimised_probabilities, optimised_labels) = answer(optimised)?;
    let truth: Vec<&str> = data
        .classes
        .iter()
        .map(|&class| data.labels[class as usize].as_str())
        .collect();
    let share = |count: usize| count as f64 / truth.len() as f64;
    let right = |labels: &[String]| labels.iter().zip(&truth).filter(|(a, b)| a == *b).count();
    Ok(Comparison {
        rows: truth.len(),
        agreement: share(
            source_labels
                .iter()
                .zip(&optimised_labels)
                .filter(|(a, b)| a == b)
                .count(),
        ),
        source_accuracy: share(right(&source_labels)),
        optimised_accuracy: share(right(&optimised_labels)),
        largest_probability_change: source_probabilities
            .iter()
            .zip(&optimised_probabilities)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max),
    })
}

fn check(optimisation: &Optimisation) -> Result<(), OptimiseError> {
    if optimisation.prune.is_none() && optimisation.quantize.is_none() {
        return Err(OptimiseError::Settings(
            "nothing to do: ask to prune, to quantize, or both".into(),
        ));
    }
    if let Some(share) = optimisation.prune
        && !(share > 0.0 && share < 1.0)
    {
        return Err(OptimiseError::Settings(format!(
            "the share to prune is {share}; it must be above 0 and below 1"
        )));
    }
    Ok(())
}

/// The ggml type, and its name, that keeps a tensor of `dtype` as it is: f16 and bf16 as
/// they are, anything else as f32.
fn float_type(dtype: candle_core::DType) -> (GgmlDType, &'static str) {
    match dtype {
        candle_core::DType::F16 => (GgmlDType::F16, "f16"),
        candle_core::DType::BF16 => (GgmlDType::BF16, "bf16"),
        _ => (GgmlDType::F32, "f32"),
    }
}

/// Whether optimising may change `tensor`: a matrix, not an embedding table (under Hugging
/// Face's name or llama.cpp's).
fn changeable(name: &str, tensor: &Tensor) -> bool {
    let name =
        crate::runtime::llama_cpp::hugging_face_name(name).unwrap_or_else(|| name.to_string());
    tensor.rank() >= 2 && !name.contains("embed")
}

/// Zeroes `round(share × len)` of `values`, those of least magnitude; how many.
fn prune(values: &mut [f32], share: f64) -> usize {
    let count = ((share * values.len() as f64).round() as usize).min(values.len());
    if count == 0 {
        return 0;
    }
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.select_nth_unstable_by(count - 1, |&a, &b| {
        values[a].abs().total_cmp(&values[b].abs())
    });
    for &index in &order[..count] {
        values[index] = 0.0;
    }
    count
}

/// ‖new − old‖ / ‖old‖; 0 for an all-zero `old` left all zero.
fn relative_error(old: &[f32], new: &[f32]) -> f64 {
    let (mut difference, mut norm) = (0f64, 0f64);
    for (a, b) in old.iter().zip(new) {
        difference += (f64::from(*b) - f64::from(*a)).powi(2);
        norm += f64::from(*a).powi(2);
    }
    if norm == 0.0 {
        return if difference == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
    }
    (difference / norm).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use crate::tensor::{NamedTensor, TensorData};
    use proptest::prelude::*;

    proptest! {
        /// Pruning zeroes exactly its share, and never an entry larger than one it kept.
        #[test]
        fn pruning_zeroes_its_share_of_least_magnitude(
            values in prop::collection::vec(-100f32..100.0, 1..300),
            share in 0.01f64..0.99,
        ) {
            let mut pruned = values.clone();
            let zeroed = prune(&mut pruned, share);
            prop_assert_eq!(zeroed, ((share * values.len() as f64).round() as usize).min(values.len()));
            let largest_zeroed = values.iter().zip(&pruned).filter(|(_, p)| **p == 0.0).map(|(v, _)| v.abs()).fold(0f32, f32::max);
            let smallest_kept = pruned.iter().filter(|p| **p != 0.0).map(|p| p.abs()).fold(f32::INFINITY, f32::min);
            prop_assert!(largest_zeroed <= smallest_kept);
            prop_assert!(values.iter().zip(&pruned).all(|(v, p)| *p == 0.0 || p == v), "kept entries are unchanged");
            prop_assert!(pruned.iter().filter(|p| **p == 0.0).count() >= zeroed);
        }
    }

    /// The MLP of the serving bench (784-512-512-10), small enough here: 32-64-32-10.
    fn mlp() -> ModelFiles {
        fixtures::mlp_classifier(&[32, 64, 32, 10], 3).expect("an MLP")
    }

    fn forward(files: &ModelFiles, rows: &[f32]) -> Vec<f32> {
        let crate::runtime::LoadedModel::Fixed(model) = crate::runtime::load(files).unwrap() else {
            panic!("a fixed-shape model");
        };
        let outputs = model
            .forward(&[NamedTensor {
                name: "features".into(),
                shape: vec![rows.len() / 32, 32],
                data: TensorData::Fp32(rows.to_vec()),
            }])
            .unwrap();
        let TensorData::Fp32(probabilities) = &outputs[0].data else {
            panic!("probabilities are FP32");
        };
        probabilities.clone()
    }

    #[test]
    fn quantized_to_q8_0_the_mlp_answers_as_before_from_a_file_a_quarter_the_size() {
        let files = mlp();
        let optimisation = Optimisation {
            prune: None,
            quantize: Some(Quantization::Q8_0),
        };
        let (optimised, report) = optimise(&files, &optimisation, "mlp version 1").unwrap();
        assert_eq!(report.format, "gguf");
        assert!(optimised.contains_key(GGUF_WEIGHTS_FILE) && !optimised.contains_key(WEIGHTS_FILE));
        assert_eq!(
            report.tensors.len(),
            3,
            "the three weight matrices: {report:?}"
        );
        assert!(
            report
                .tensors
                .iter()
                .all(|t| t.stored_as == "q8_0" && t.relative_error < 0.01),
            "{report:?}"
        );
        assert!(
            report.weights_bytes_after * 3 < report.weights_bytes_before,
            "{report:?}"
        );
        let rows: Vec<f32> = (0..32 * 8)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let (before, after) = (forward(&files, &rows), forward(&optimised, &rows));
        let worst = before
            .iter()
            .zip(&after)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.01, "probabilities moved by {worst}");

        let content =
            gguf_file::Content::read(&mut std::io::Cursor::new(&optimised[GGUF_WEIGHTS_FILE]))
                .unwrap();
        let text = |key: &str| content.metadata[key].to_string().unwrap().clone();
        assert_eq!(text(OPTIMISED_FROM_KEY), "mlp version 1");
        assert_eq!(text(OPTIMISATION_KEY), "quantize q8_0");
    }

    #[test]
    fn pruned_alone_the_weights_stay_safetensors_with_their_share_zeroed() {
        let files = mlp();
        let optimisation = Optimisation {
            prune: Some(0.5),
            quantize: None,
        };
        let (optimised, report) = optimise(&files, &optimisation, "mlp version 1").unwrap();
        assert_eq!(report.format, "safetensors");
        for change in &report.tensors {
            let elements: usize = change.shape.iter().product();
            assert_eq!(change.zeroed, elements / 2, "{change:?}");
            assert!(
                change.relative_error > 0.0 && change.relative_error < 0.5,
                "{change:?}"
            );
        }
        let tensors = WeightsFile::of(&optimised)
            .unwrap()
            .tensors(&Device::Cpu)
            .unwrap();
        let zeros = |name: &str| {
            tensors[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .filter(|v| **v == 0.0)
                .count()
        };
        assert_eq!(zeros("layers.1.weight"), 64 * 32 / 2);
        assert_eq!(zeros("input.std"), 0, "vectors are not pruned");
    }

    #[test]
    fn rows_that_are_not_whole_blocks_stay_f32_and_a_quantization_that_changes_nothing_is_refused()
    {
        // Rows of 24: no whole block of 32.
        let files = fixtures::mlp_classifier(&[24, 24, 3], 5).unwrap();
        let optimisation = Optimisation {
            prune: None,
            quantize: Some(Quantization::Q4_0),
        };
        let error = optimise(&files, &optimisation, "small").unwrap_err();
        assert!(
            error.to_string().contains("rows are 24, 24 wide"),
            "{error}"
        );
        // Rows of 32 quantize; rows of 24 stay f32, as they were.
        let wider = fixtures::mlp_classifier(&[24, 32, 3], 5).unwrap();
        let (_, report) = optimise(&wider, &optimisation, "small").unwrap();
        let stored: Vec<&str> = report.tensors.iter().map(|t| t.stored_as).collect();
        assert_eq!(stored, ["f32", "q4_0"]);
        assert_eq!(report.tensors[0].relative_error, 0.0);

        let error = optimise(&files, &Optimisation::default(), "small").unwrap_err();
        assert!(error.to_string().contains("nothing to do"), "{error}");
        for share in [0.0, 1.0, f64::NAN] {
            let refused = Optimisation {
                prune: Some(share),
                quantize: None,
            };
            let error = optimise(&files, &refused, "small").unwrap_err();
            assert!(error.to_string().contains("share to prune"), "{error}");
        }
    }

    #[test]
    fn a_half_precision_version_pruned_stays_half_precision_and_a_gguf_one_is_refused() {
        let files = mlp();
        let tensors = WeightsFile::of(&files)
            .unwrap()
            .tensors(&Device::Cpu)
            .unwrap();
        let halves: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, tensor)| (name, tensor.to_dtype(candle_core::DType::F16).unwrap()))
            .collect();
        let mut half = files.clone();
        half.insert(
            WEIGHTS_FILE.into(),
            safetensors::serialize(&halves, None).unwrap(),
        );
        let pruned = Optimisation {
            prune: Some(0.25),
            quantize: None,
        };
        let (optimised, report) = optimise(&half, &pruned, "half").unwrap();
        assert!(
            report.tensors.iter().all(|t| t.stored_as == "f16"),
            "{report:?}"
        );
        assert!(
            report.weights_bytes_after <= report.weights_bytes_before + 1024,
            "{report:?}"
        );
        let written = safetensors::SafeTensors::deserialize(&optimised[WEIGHTS_FILE]).unwrap();
        assert!(
            written
                .tensors()
                .iter()
                .all(|(_, view)| view.dtype() == safetensors::Dtype::F16)
        );

        let quantized = Optimisation {
            prune: None,
            quantize: Some(Quantization::Q8_0),
        };
        let (gguf, _) = optimise(&files, &quantized, "mlp").unwrap();
        let error = optimise(&gguf, &quantized, "gguf").unwrap_err();
        assert!(error.to_string().contains("in safetensors"), "{error}");
    }

    #[test]
    fn an_optimised_classifier_is_compared_with_its_source_on_a_labelled_data_set() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::train::TrainConfig {
            hidden_sizes: vec![64, 64],
            ..crate::train::TrainConfig::iris()
        };
        crate::train::train_classifier(crate::IRIS_CSV, &config, dir.path()).unwrap();
        let source: ModelFiles = [WEIGHTS_FILE, crate::runtime::CONFIG_FILE]
            .iter()
            .map(|name| {
                (
                    name.to_string(),
                    std::fs::read(dir.path().join(name)).unwrap(),
                )
            })
            .collect();
        let same = compare_classifiers(&source, &source, crate::IRIS_CSV).unwrap();
        assert_eq!((same.rows, same.agreement), (150, 1.0));
        assert_eq!(same.largest_probability_change, 0.0);
        assert_eq!(same.source_accuracy, same.optimised_accuracy);

        let optimisation = Optimisation {
            prune: Some(0.3),
            quantize: Some(Quantization::Q8_0),
        };
        let (optimised, _) = optimise(&source, &optimisation, "iris").unwrap();
        let compared = compare_classifiers(&source, &optimised, crate::IRIS_CSV).unwrap();
        assert!(compared.agreement >= 0.95, "{compared:?}");
        assert!(compared.largest_probability_change > 0.0, "{compared:?}");

        let error = compare_classifiers(&source, &optimised, "a,b,label\n1,2,x\n").unwrap_err();
        assert!(error.to_string().contains("does not fit"), "{error}");
    }

    #[test]
    fn the_tiny_llama_quantized_keeps_its_embeddings_and_loads() {
        let files = fixtures::tiny_llama(&fixtures::TinyLlama::for_tests()).unwrap();
        let optimisation = Optimisation {
            prune: Some(0.1),
            quantize: Some(Quantization::Q8_0),
        };
        let (optimised, report) = optimise(&files, &optimisation, "llama").unwrap();
        assert!(optimised.contains_key("tokenizer.json"));
        assert!(
            report.tensors.iter().all(|t| !t.name.contains("embed")),
            "{report:?}"
        );
        assert!(
            report.tensors.iter().any(|t| t.stored_as == "q8_0"),
            "{report:?}"
        );
    }
}
