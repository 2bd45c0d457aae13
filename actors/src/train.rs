//! Training an MLP classifier (the demo model, and `shoal model train`) on a CSV of numeric
//! features and a class column: full-batch AdamW with seeded initial weights, so the same
//! data and seed give the same model. A share of the rows, drawn by the seed, may be held
//! out of training and only scored.

use crate::runtime::{CONFIG_FILE, MlpClassifier, MlpConfig, WEIGHTS_FILE};
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{Linear, Module, Optimizer};
use std::collections::HashMap;
use std::path::Path;

/// Settings of one training run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Name of the model's input tensor.
    pub input: String,
    /// Widths of the hidden layers.
    pub hidden_sizes: Vec<usize>,
    pub epochs: usize,
    pub learning_rate: f64,
    /// Seed of the initial weights and of which rows are held out.
    pub seed: u64,
    /// Share of the rows held out of training and only scored, in `[0, 1)`.
    pub holdout: f64,
}

impl TrainConfig {
    /// What the `iris` demo model is trained with.
    pub fn iris() -> TrainConfig {
        TrainConfig {
            input: "features".into(),
            hidden_sizes: vec![16],
            epochs: 300,
            learning_rate: 0.05,
            seed: 7,
            holdout: 0.0,
        }
    }
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// Fraction of training rows the final model labels correctly.
    pub accuracy: f64,
    /// Rows trained on.
    pub rows: usize,
    /// Fraction of the held-out rows it labels correctly; `None` when none were held out.
    pub holdout_accuracy: Option<f64>,
    pub holdout_rows: usize,
    /// Files written, relative to the output directory.
    pub files: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("line {line}: {message}")]
    Csv { line: usize, message: String },
    #[error("the data set has no rows")]
    Empty,
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
}

/// A labelled data set: rows of numeric features, and each row's class.
pub(crate) struct DataSet {
    /// Row-major, `width` values a row.
    pub(crate) features: Vec<f32>,
    /// Each row's class, an index into `labels`.
    pub(crate) classes: Vec<u32>,
    /// The class names, in the order they first appear.
    pub(crate) labels: Vec<String>,
    pub(crate) width: usize,
}

/// Parses a CSV with a header, numeric feature columns and the class name last.
pub(crate) fn parse_csv(csv: &str) -> Result<DataSet, TrainError> {
    let mut lines = csv
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty());
    let (_, header) = lines.next().ok_or(TrainError::Empty)?;
    let width = header.split(',').count().saturating_sub(1);
    let mut data = DataSet {
        features: Vec::new(),
        classes: Vec::new(),
        labels: Vec::new(),
        width,
    };
    for (number, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != width + 1 {
            return Err(TrainError::Csv {
                line: number + 1,
                message: format!("{} fields, header has {}", fields.len(), width + 1),
            });
        }
        for field in &fields[..width] {
            let value = field.parse::<f32>().map_err(|error| TrainError::Csv {
                line: number + 1,
                message: format!("{field:?}: {error}"),
            })?;
            data.features.push(value);
        }
        let label = fields[width];
        let class = match data.labels.iter().position(|known| known == label) {
            Some(class) => class,
            None => {
                data.labels.push(label.to_string());
                data.labels.len() - 1
            }
        };
        data.classes.push(class as u32);
    }
    if data.classes.is_empty() {
        return Err(TrainError::Empty);
    }
    Ok(data)
}

/// The rows trained on and the rows held out, each in the data set's order. Which rows are
/// held out is drawn by the seed: `round(holdout × rows)` of them, at least one row left to
/// train on. With no holdout the rows trained on are the data set itself.
fn split(data: &DataSet, config: &TrainConfig) -> Result<(DataSet, DataSet), TrainError> {
    if !(0.0..1.0).contains(&config.holdout) {
        return Err(TrainError::Settings(format!(
            "the held-out share is {}; it must be at least 0 and below 1",
            config.holdout
        )));
    }
    let rows = data.classes.len();
    let held = ((config.holdout * rows as f64).round() as usize).min(rows - 1);
    let mut random = SplitMix(config.seed ^ 0x005E_ED0F_401D_0075);
    let mut order: Vec<usize> = (0..rows).collect();
    // Fisher–Yates over the first `held` places: those rows are held out.
    for place in 0..held {
        let pick = place + (random.next_unit() * (rows - place) as f32) as usize;
        order.swap(place, pick.min(rows - 1));
    }
    let mut out = vec![false; rows];
    for &row in &order[..held] {
        out[row] = true;
    }
    let part = |held_out: bool| {
        let mut part = DataSet {
            features: Vec::new(),
            classes: Vec::new(),
            labels: data.labels.clone(),
            width: data.width,
        };
        for row in (0..rows).filter(|&row| out[row] == held_out) {
            part.features
                .extend_from_slice(&data.features[row * data.width..(row + 1) * data.width]);
            part.classes.push(data.classes[row]);
        }
        part
    };
    Ok((part(false), part(true)))
}

/// SplitMix64: a tiny, well-mixed generator, enough for reproducible initial weights.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Trains a classifier on `csv` and writes `model.safetensors` and `config.json` to `dir`.
pub fn train_classifier(
    csv: &str,
    config: &TrainConfig,
    dir: &Path,
) -> Result<TrainReport, TrainError> {
    let data = parse_csv(csv)?;
    let device = Device::Cpu;
    let (trained, held_out) = split(&data, config)?;
    let rows = trained.classes.len();
    let features = Tensor::from_slice(&trained.features, (rows, data.width), &device)?;
    let targets = Tensor::from_slice(&trained.classes, rows, &device)?;
    let mean = features.mean(0)?;
    let std = features
        .broadcast_sub(&mean)?
        .sqr()?
        .mean(0)?
        .sqrt()?
        .clamp(1e-6, f32::MAX)?;
    let standardised = features.broadcast_sub(&mean)?.broadcast_div(&std)?;

    let mut layer_sizes = vec![data.width];
    layer_sizes.extend(&config.hidden_sizes);
    layer_sizes.push(data.labels.len());
    let mut random = SplitMix(config.seed);
    let mut vars = Vec::new();
    for pair in layer_sizes.windows(2) {
        let (fan_in, fan_out) = (pair[0], pair[1]);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let weights: Vec<f32> = (0..fan_in * fan_out)
            .map(|_| (random.next_unit() * 2.0 - 1.0) * bound)
            .collect();
        vars.push(Var::from_tensor(&Tensor::from_vec(
            weights,
            (fan_out, fan_in),
            &device,
        )?)?);
        vars.push(Var::zeros(fan_out, DType::F32, &device)?);
    }
    let forward = |input: &Tensor| -> Result<Tensor, candle_core::Error> {
        let mut hidden = input.clone();
        let layers = vars.len() / 2;
        for layer in 0..layers {
            let linear = Linear::new(
                vars[2 * layer].as_tensor().clone(),
                Some(vars[2 * layer + 1].as_tensor().clone()),
            );
            hidden = linear.forward(&hidden)?;
            if layer + 1 < layers {
                hidden = hidden.relu()?;
            }
        }
        Ok(hidden)
    };
    let mut optimizer = candle_nn::AdamW::new_lr(vars.clone(), config.learning_rate)?;
    for _ in 0..config.epochs {
        let logits = forward(&standardised)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        optimizer.backward_step(&loss)?;
    }
    let accuracy = |features: &Tensor, classes: &Tensor| -> Result<f64, candle_core::Error> {
        let standardised = features.broadcast_sub(&mean)?.broadcast_div(&std)?;
        let correct: f32 = forward(&standardised)?
            .argmax(D::Minus1)?
            .eq(classes)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar()?;
        Ok(f64::from(correct) / classes.dims1()? as f64)
    };
    let trained_accuracy = accuracy(&features, &targets)?;
    let holdout_accuracy = match held_out.classes.len() {
        0 => None,
        count => Some(accuracy(
            &Tensor::from_slice(&held_out.features, (count, data.width), &device)?,
            &Tensor::from_slice(&held_out.classes, count, &device)?,
        )?),
    };

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("input.mean".into(), mean);
    tensors.insert("input.std".into(), std);
    for (index, pair) in vars.chunks(2).enumerate() {
        tensors.insert(
            format!("layers.{index}.weight"),
            pair[0].as_tensor().clone(),
        );
        tensors.insert(format!("layers.{index}.bias"), pair[1].as_tensor().clone());
    }
    let model_config = MlpConfig {
        architecture: MlpConfig::ARCHITECTURE.into(),
        input: config.input.clone(),
        layer_sizes,
        labels: data.labels,
    };
    let weights_path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights_path)?;
    let config_json = serde_json::to_vec_pretty(&model_config)
        .map_err(|error| crate::runtime::RuntimeError::Config(error.to_string()))?;
    let config_path = dir.join(CONFIG_FILE);
    std::fs::write(&config_path, &config_json).map_err(|source| TrainError::Write {
        path: config_path.display().to_string(),
        source,
    })?;
    // Prove the written files load back into the serving runtime before reporting success.
    let weights = std::fs::read(&weights_path).map_err(|source| TrainError::Write {
        path: weights_path.display().to_string(),
        source,
    })?;
    MlpClassifier::load(&config_json, &weights)?;
    Ok(TrainReport {
        accuracy: trained_accuracy,
        rows,
        holdout_accuracy,
        holdout_rows: held_out.classes.len(),
        files: vec![WEIGHTS_FILE.into(), CONFIG_FILE.into()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{NamedTensor, TensorData};
    use std::collections::HashMap;

    fn train(dir: &Path) -> TrainReport {
        train_classifier(crate::IRIS_CSV, &TrainConfig::iris(), dir).unwrap()
    }

    #[test]
    fn the_iris_model_learns_the_data_set() {
        let dir = tempfile::tempdir().unwrap();
        let report = train(dir.path());
        assert_eq!(report.rows, 150);
        assert!(report.accuracy >= 0.95, "accuracy {}", report.accuracy);
    }

    #[test]
    fn training_is_reproducible_from_its_seed() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        train(a.path());
        train(b.path());
        let read = |dir: &Path| std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        assert_eq!(read(a.path()), read(b.path()));
    }

    #[test]
    fn the_trained_model_labels_one_sample_of_each_species() {
        let dir = tempfile::tempdir().unwrap();
        train(dir.path());
        let mut files = HashMap::new();
        for name in [WEIGHTS_FILE, CONFIG_FILE] {
            files.insert(
                name.to_string(),
                std::fs::read(dir.path().join(name)).unwrap(),
            );
        }
        let crate::runtime::LoadedModel::Fixed(model) = crate::runtime::load(&files).unwrap()
        else {
            panic!("the classifier is a fixed-shape model");
        };
        let samples = vec![5.1, 3.5, 1.4, 0.2, 6.4, 3.2, 4.5, 1.5, 6.3, 3.3, 6.0, 2.5];
        let outputs = model
            .forward(&[NamedTensor {
                name: "features".into(),
                shape: vec![3, 4],
                data: TensorData::Fp32(samples),
            }])
            .unwrap();
        let labels = outputs.iter().find(|o| o.name == "label").unwrap();
        assert_eq!(
            labels.data,
            TensorData::Bytes(vec![
                "setosa".into(),
                "versicolor".into(),
                "virginica".into()
            ])
        );
        let TensorData::Fp32(probabilities) = &outputs[0].data else {
            panic!("probabilities are FP32");
        };
        for row in probabilities.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn held_out_rows_are_drawn_by_the_seed_scored_and_not_trained_on() {
        let config = TrainConfig {
            holdout: 0.2,
            ..TrainConfig::iris()
        };
        let data = parse_csv(crate::IRIS_CSV).unwrap();
        let (trained, held_out) = split(&data, &config).unwrap();
        assert_eq!((trained.classes.len(), held_out.classes.len()), (120, 30));
        let (again, _) = split(&data, &config).unwrap();
        assert_eq!(
            trained.features, again.features,
            "the same seed holds out the same rows"
        );
        let other = TrainConfig {
            seed: 8,
            ..config.clone()
        };
        assert_ne!(split(&data, &other).unwrap().0.features, trained.features);
        // Every row is in exactly one part.
        let mut rows: Vec<&[f32]> = trained
            .features
            .chunks(4)
            .chain(held_out.features.chunks(4))
            .collect();
        let mut all: Vec<&[f32]> = data.features.chunks(4).collect();
        rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
        all.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(rows, all);

        let dir = tempfile::tempdir().unwrap();
        let report = train_classifier(crate::IRIS_CSV, &config, dir.path()).unwrap();
        assert_eq!((report.rows, report.holdout_rows), (120, 30));
        let holdout = report.holdout_accuracy.unwrap();
        assert!(holdout >= 0.85, "held-out accuracy {holdout}");
        assert_eq!(train(dir.path()).holdout_accuracy, None);
    }

    #[test]
    fn a_held_out_share_outside_zero_to_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for holdout in [1.0, -0.1, f64::NAN] {
            let config = TrainConfig {
                holdout,
                ..TrainConfig::iris()
            };
            let error = train_classifier(crate::IRIS_CSV, &config, dir.path()).unwrap_err();
            assert!(error.to_string().contains("held-out share"), "{error}");
        }
    }

    #[test]
    fn a_malformed_csv_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let error = train_classifier(
            "a,b,label\n1,2,x\n1,oops,y\n",
            &TrainConfig::iris(),
            dir.path(),
        )
        .unwrap_err();
        assert!(error.to_string().starts_with("line 3:"), "{error}");
    }
}
