//! What `shoal model optimise --quantize` buys: the same models in f32 and in ggml's
//! blocks (`Q8_0`, `Q4_0`), measured in one run as ratios to f32.
//!
//! `cargo bench -p shoal-actors --bench optimise`
//!
//! - device memory a loaded copy takes (the registration's estimate, from the file's
//!   header) and the weights file's size;
//! - the MLP of the serving bench (784-512-512-10; its first matrix's rows of 784 are no
//!   whole block of 32 and stay f32) at batch 1 and 32, rows/s;
//! - the benchmark llama (4 layers, 512 wide): a decode step of 16 sequences, tokens/s.
//!
//! Each variant is measured in alternating short rounds and the best round kept, so a
//! neighbour's burst of CPU lands on every side.

use shoal_actors::fixtures::{TinyLlama, mlp_classifier, tiny_llama};
use shoal_actors::optimise::{Optimisation, Quantization, optimise};
use shoal_actors::runtime::{
    Architecture, CONFIG_FILE, LoadedModel, ModelFiles, ModelRuntime, WeightsFile, load,
};
use shoal_actors::tensor::{NamedTensor, TensorData};
use std::time::{Duration, Instant};

const MLP_LAYERS: &[usize] = &[784, 512, 512, 10];
const ROUND: Duration = Duration::from_millis(500);
const ROUNDS: usize = 4;
const STREAMS: usize = 16;

/// The f32 files and their Q8_0 and Q4_0 forms, by name.
fn variants(files: &ModelFiles) -> Vec<(&'static str, ModelFiles)> {
    let mut all = vec![("f32", files.clone())];
    for quantization in [Quantization::Q8_0, Quantization::Q4_0] {
        let optimisation = Optimisation {
            prune: None,
            quantize: Some(quantization),
        };
        let (optimised, _) = optimise(files, &optimisation, "bench").expect("optimise");
        all.push((quantization.as_str(), optimised));
    }
    all
}

/// (weights file bytes, loaded bytes) of a version.
fn sizes(files: &ModelFiles) -> (u64, u64) {
    let architecture = Architecture::of(&files[CONFIG_FILE]).expect("an architecture");
    let weights = WeightsFile::of(files).expect("a weights file");
    (
        weights.stored_bytes(),
        weights.loaded_bytes(architecture).expect("sized"),
    )
}

/// Work done per second by `step` (which returns how much it did) over one round.
fn per_second(mut step: impl FnMut() -> usize) -> f64 {
    for _ in 0..2 {
        step();
    }
    let started = Instant::now();
    let mut done = 0;
    while started.elapsed() < ROUND {
        done += step();
    }
    done as f64 / started.elapsed().as_secs_f64()
}

fn mlp_step(model: &dyn ModelRuntime, rows: usize) -> impl FnMut() -> usize + '_ {
    let width = MLP_LAYERS[0];
    let inputs = vec![NamedTensor {
        name: "features".into(),
        shape: vec![rows, width],
        data: TensorData::Fp32((0..rows * width).map(|i| (i % 97) as f32 / 97.0).collect()),
    }];
    move || {
        model.forward(&inputs).expect("forward");
        rows
    }
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .build()
        .expect("a rayon pool");
    let mut lines: Vec<(String, f64)> = Vec::new();

    let mlp = variants(&mlp_classifier(MLP_LAYERS, 5).expect("an MLP"));
    let llama = variants(&tiny_llama(&TinyLlama::for_benchmarks()).expect("a llama"));
    for (family, versions) in [("MLP", &mlp), ("llama", &llama)] {
        let (f32_stored, f32_loaded) = sizes(&versions[0].1);
        for (name, files) in versions.iter().skip(1) {
            let (stored, loaded) = sizes(files);
            lines.push((
                format!("{family} {name}: weights file ÷ f32"),
                stored as f64 / f32_stored as f64,
            ));
            lines.push((
                format!("{family} {name}: loaded bytes ÷ f32"),
                loaded as f64 / f32_loaded as f64,
            ));
        }
    }

    let mlp_models: Vec<(&str, std::sync::Arc<dyn ModelRuntime>)> = mlp
        .iter()
        .map(|(name, files)| match load(files).expect("load") {
            LoadedModel::Fixed(model) => (*name, model),
            LoadedModel::Generative(_) => unreachable!("an MLP is fixed-shape"),
        })
        .collect();
    for rows in [1, 32] {
        let mut best = vec![0f64; mlp_models.len()];
        for _ in 0..ROUNDS {
            for (slot, (_, model)) in best.iter_mut().zip(&mlp_models) {
                let rate = pool.install(|| per_second(mlp_step(model.as_ref(), rows)));
                *slot = slot.max(rate);
            }
        }
        for ((name, _), rate) in mlp_models.iter().zip(&best) {
            lines.push((format!("MLP {name}: batch {rows}, rows/s"), *rate));
            if *name != "f32" {
                lines.push((format!("MLP {name}: batch {rows} ÷ f32"), rate / best[0]));
            }
        }
    }

    let llamas: Vec<_> = llama
        .iter()
        .map(|(name, files)| match load(files).expect("load") {
            LoadedModel::Generative(model) => (*name, model),
            LoadedModel::Fixed(_) => unreachable!("a llama generates"),
        })
        .collect();
    let mut best = vec![0f64; llamas.len()];
    for _ in 0..ROUNDS {
        for (slot, (_, model)) in best.iter_mut().zip(&llamas) {
            let prompt = model.encode("the quick brown fox").expect("encode");
            let prompts: Vec<&[u32]> = (0..STREAMS).map(|_| prompt.as_slice()).collect();
            let started = || -> Vec<_> {
                model
                    .prefill_batch(&prompts)
                    .expect("prefill")
                    .into_iter()
                    .map(|(sequence, _)| sequence)
                    .collect()
            };
            let mut sequences = started();
            let last = vec![prompt[prompt.len() - 1]; STREAMS];
            let positions = model.config().max_position_embeddings;
            let rate = pool.install(|| {
                per_second(|| {
                    // Keep to the model's positions: start over before they run out.
                    if sequences[0].tokens() + 1 >= positions {
                        sequences = started();
                    }
                    let mut each: Vec<_> = sequences.iter_mut().collect();
                    model.decode(&mut each, &last).expect("decode");
                    STREAMS
                })
            });
            *slot = slot.max(rate);
        }
    }
    for ((name, _), rate) in llamas.iter().zip(&best) {
        lines.push((
            format!("llama {name}: decode of {STREAMS} sequences, tokens/s"),
            *rate,
        ));
        if *name != "f32" {
            lines.push((format!("llama {name}: decode ÷ f32"), rate / best[0]));
        }
    }

    println!("| measurement | value |\n| --- | ---: |");
    for (name, value) in &lines {
        println!("| {name} | {value:.3} |");
    }
    let json: serde_json::Map<String, serde_json::Value> = lines
        .iter()
        .map(|(name, value)| (name.clone(), serde_json::json!(value)))
        .collect();
    println!("{}", serde_json::Value::Object(json));
}
