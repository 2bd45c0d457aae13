//! The GPU check, run by `scripts/gpu-check.sh` on a GPU host with the `cuda` feature:
//! the ledger against the driver's memory figures, CPU and GPU outputs of the MLP and of
//! MiniLM, and throughput at batch 32; then quantized matrices run as stored: the MLP in
//! `Q8_0`, and a `Q8_0` llama in llama.cpp's layout (its rows reordered on the GPU). Prints its figures; exits non-zero on a failed check
//! and with 2 when there is no GPU to check.

use shoal_actors::device::{
    DeviceHandle, DeviceManagerArgs, DevicePolicy, discover_devices, gpu_memory, probe_gpus,
};
use shoal_actors::fixtures::{
    GgufStorage, TinyLlama, as_llama_cpp_gguf, minilm_files, mlp_classifier, tiny_llama,
};
use shoal_actors::optimise::{Optimisation, Quantization, optimise};
use shoal_actors::runtime::{LoadedModel, ModelRuntime, TEXT, load_on};
use shoal_actors::tensor::{NamedTensor, TensorData};
use shoal_scheduler::DeviceKind;
use std::time::Instant;

const BATCH: usize = 32;
const MEMORY_TOLERANCE: f64 = 0.01;
const OUTPUT_TOLERANCE: f32 = 1e-3;

fn fixed(model: LoadedModel) -> std::sync::Arc<dyn ModelRuntime> {
    match model {
        LoadedModel::Fixed(model) => model,
        LoadedModel::Generative(_) => panic!("expected a fixed-shape model"),
    }
}

fn floats(outputs: &[NamedTensor]) -> Vec<f32> {
    match &outputs[0].data {
        TensorData::Fp32(values) => values.clone(),
        _ => panic!("expected FP32 output"),
    }
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Items per second of `forward(inputs)` over about two seconds.
fn per_second(model: &dyn ModelRuntime, inputs: &[NamedTensor], items: usize) -> f64 {
    model.forward(inputs).expect("warm up");
    let started = Instant::now();
    let mut done = 0;
    while started.elapsed().as_secs_f64() < 2.0 {
        model.forward(inputs).expect("forward");
        done += items;
    }
    done as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let gpus = probe_gpus();
    if gpus.is_empty() {
        println!(
            "no CUDA GPU found (driver present: {})",
            shoal_actors::device::cuda_driver_present()
        );
        std::process::exit(2);
    }
    if !cfg!(feature = "cuda") {
        println!("GPUs found but this build has no `cuda` feature: run scripts/gpu-check.sh");
        std::process::exit(2);
    }
    let mut failed = false;
    let mut check = |name: &str, ok: bool, detail: String| {
        println!("{} {name}: {detail}", if ok { "PASS" } else { "FAIL" });
        failed |= !ok;
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio");

    // 1. The ledger against the driver, for every GPU.
    let devices = discover_devices();
    let usage = runtime.block_on(async {
        let manager = DeviceHandle::start(DeviceManagerArgs {
            node: "gpu-check".into(),
            devices: devices.clone(),
            policy: DevicePolicy::default(),
            on_evict: None,
        })
        .await
        .expect("device manager");
        manager.usage().await.expect("usage")
    });
    for device in usage.iter().filter(|u| u.device.kind == DeviceKind::Gpu) {
        let ordinal = shoal_actors::device::cuda_ordinal(device.device.id).expect("gpu ordinal");
        let driver = gpu_memory(ordinal).expect("driver figures");
        let ledger_free =
            device.device.memory_bytes - device.reserved_bytes - device.headroom_bytes;
        let gap = (ledger_free as f64 - driver.free_bytes as f64).abs() / driver.total_bytes as f64;
        println!(
            "gpu {ordinal} ({}): ledger total {} B, ledger free {} B; driver total {} B, driver free {} B",
            driver.name,
            device.device.memory_bytes,
            ledger_free,
            driver.total_bytes,
            driver.free_bytes
        );
        check(
            &format!("gpu {ordinal} ledger free = driver free within 1%"),
            gap <= MEMORY_TOLERANCE,
            format!("gap {:.3}% of total", gap * 100.0),
        );
    }

    // 2. and 3. Same outputs on CPU and GPU, and throughput at batch 32, on GPU 0.
    let gpu = candle_core::Device::new_cuda(0).expect("cuda device 0");
    let cpu = candle_core::Device::Cpu;
    let mlp_files = mlp_classifier(&[256, 1024, 1024, 10], 5).expect("mlp");
    let features = vec![NamedTensor {
        name: "features".into(),
        shape: vec![BATCH, 256],
        data: TensorData::Fp32((0..BATCH * 256).map(|i| (i % 97) as f32 / 97.0).collect()),
    }];
    let mlp_cpu = fixed(load_on(&mlp_files, &cpu).expect("mlp on cpu"));
    let mlp_gpu = fixed(load_on(&mlp_files, &gpu).expect("mlp on gpu"));
    let difference = max_difference(
        &floats(&mlp_cpu.forward(&features).expect("cpu")),
        &floats(&mlp_gpu.forward(&features).expect("gpu")),
    );
    check(
        "MLP cpu = gpu within 1e-3",
        difference <= OUTPUT_TOLERANCE,
        format!("max difference {difference:e}"),
    );
    let cpu_rate = per_second(mlp_cpu.as_ref(), &features, BATCH);
    let gpu_rate = per_second(mlp_gpu.as_ref(), &features, BATCH);
    println!("MLP batch {BATCH}: cpu {cpu_rate:.0} rows/s, gpu {gpu_rate:.0} rows/s");

    // 4. Quantized matrices multiplied as stored: the same MLP in Q8_0 (`shoal model
    // optimise`), and a llama in llama.cpp's layout, its q/k rows reordered on the GPU.
    let quantize = Optimisation {
        prune: None,
        quantize: Some(Quantization::Q8_0),
    };
    let (q8_files, _) = optimise(&mlp_files, &quantize, "gpu check").expect("optimise");
    let q8_cpu = fixed(load_on(&q8_files, &cpu).expect("q8 mlp on cpu"));
    let q8_gpu = fixed(load_on(&q8_files, &gpu).expect("q8 mlp on gpu"));
    let difference = max_difference(
        &floats(&q8_cpu.forward(&features).expect("cpu")),
        &floats(&q8_gpu.forward(&features).expect("gpu")),
    );
    check(
        "Q8_0 MLP cpu = gpu within 1e-2",
        difference <= 1e-2,
        format!("max difference {difference:e}"),
    );
    let q8_rate = per_second(q8_gpu.as_ref(), &features, BATCH);
    println!("Q8_0 MLP batch {BATCH}: gpu {q8_rate:.0} rows/s (f32 {gpu_rate:.0})");
    let llama = as_llama_cpp_gguf(
        &tiny_llama(&TinyLlama::for_tests()).expect("llama"),
        GgufStorage::Q8,
    )
    .expect("llama.cpp layout");
    let logits = |device: &candle_core::Device| -> Vec<f32> {
        let LoadedModel::Generative(model) = load_on(&llama, device).expect("llama") else {
            panic!("a llama generates");
        };
        let prompt = model.encode("shoal on a gpu").expect("encode");
        let (_, logits) = model.prefill(&prompt).expect("prefill");
        logits.to_vec1().expect("logits")
    };
    let difference = max_difference(&logits(&cpu), &logits(&gpu));
    check(
        "Q8_0 llama.cpp-layout llama cpu = gpu logits within 1e-2",
        difference <= 1e-2,
        format!("max difference {difference:e}"),
    );

    match minilm_files() {
        Ok(files) => {
            let texts = vec![NamedTensor {
                name: TEXT.into(),
                shape: vec![BATCH],
                data: TensorData::Bytes(
                    (0..BATCH)
                        .map(|i| format!("sentence {i} about topic {}", i % 5))
                        .collect(),
                ),
            }];
            let minilm_cpu = fixed(load_on(&files, &cpu).expect("minilm on cpu"));
            let minilm_gpu = fixed(load_on(&files, &gpu).expect("minilm on gpu"));
            let difference = max_difference(
                &floats(&minilm_cpu.forward(&texts).expect("cpu")),
                &floats(&minilm_gpu.forward(&texts).expect("gpu")),
            );
            check(
                "MiniLM cpu = gpu within 1e-3",
                difference <= OUTPUT_TOLERANCE,
                format!("max difference {difference:e}"),
            );
            let cpu_rate = per_second(minilm_cpu.as_ref(), &texts, BATCH);
            let gpu_rate = per_second(minilm_gpu.as_ref(), &texts, BATCH);
            println!(
                "MiniLM batch {BATCH}: cpu {cpu_rate:.0} sentences/s, gpu {gpu_rate:.0} sentences/s"
            );
        }
        Err(error) => check("MiniLM fetched", false, error.to_string()),
    }
    std::process::exit(i32::from(failed));
}
