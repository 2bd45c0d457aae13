//! Leader failover with real processes: three `shoal server`s on loopback, the leader
//! killed with SIGKILL, and the time until a write (an alias change, sent to every
//! surviving server until one takes it) is acknowledged by the new leader. The killed
//! server is restarted between rounds.
//!
//! `cargo bench -p shoal-tests --bench failover` (add `-- --rounds N`; default 20). It
//! uses the `shoal` binary from the same target directory: build it first with
//! `cargo build --release -p shoal-node` (or set SHOAL_BIN).

use shoal_tests::ServerCluster;
use std::time::{Duration, Instant};

const MODEL: &str = "failover";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * (sorted.len().saturating_sub(1)) as f64).round() as usize;
    sorted.get(rank).copied().unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arguments: Vec<String> = std::env::args().collect();
    let rounds: usize = arguments
        .iter()
        .position(|arg| arg == "--rounds")
        .and_then(|i| arguments.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let root = tempfile::tempdir().expect("temp dir");
    let mut cluster = ServerCluster::start(root.path(), 3);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("client");
    let setup = reqwest::Client::new();
    cluster.register_model(&setup, MODEL, 2).await;

    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let leader = cluster.leader(&setup, Duration::from_secs(20)).await;
        let value = 1 + (round % 2);
        let killed = Instant::now();
        cluster.kill(leader);
        'acknowledged: loop {
            for id in cluster.live() {
                let url = cluster.url(id, &format!("/api/v1/models/{MODEL}/aliases/current"));
                let body = serde_json::json!({"version": value});
                if let Ok(answer) = client.put(url).json(&body).send().await
                    && answer.status().is_success()
                {
                    break 'acknowledged;
                }
            }
        }
        times.push(killed.elapsed());
        cluster.start_member(leader);
        // Let the restarted server rejoin and catch up before the next kill.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    times.sort_unstable();
    println!(
        "3 shoal servers, kill -9 the leader -> first acknowledged write, {} rounds: \
         p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms, min {:.0} ms",
        times.len(),
        percentile(&times, 50.0).as_secs_f64() * 1e3,
        percentile(&times, 99.0).as_secs_f64() * 1e3,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        times.first().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    let report = serde_json::json!({
        "scenario": "failover",
        "rounds": times.len(),
        "p50_ms": ms(percentile(&times, 50.0)),
        "p99_ms": ms(percentile(&times, 99.0)),
        "max_ms": ms(times.last().copied().unwrap_or_default()),
        "min_ms": ms(times.first().copied().unwrap_or_default()),
    });
    println!("{report}");
    cluster.stop_all();
}
