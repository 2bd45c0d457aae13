//! Control-plane benchmark: 3 raft members in one process, talking over loopback TCP,
//! each with its own raft-engine log and fsync on every `Ready`. Prints committed
//! proposals per second and commit latency at several concurrencies, and how long the
//! group takes to commit again after its leader stops abruptly.
//!
//! `cargo bench -p shoal-consensus --bench raft` (add `-- --quick` for a short run).
//! Figures, not assertions: this machine is shared and noisy.

use shoal_consensus::{Consensus, ConsensusConfig, ConsensusHandle, ProposeError, StateMachine};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Counts applied entries; answers nothing.
#[derive(Debug, Default)]
struct Counter {
    applied: u64,
}

impl StateMachine for Counter {
    fn apply(&mut self, _index: u64, _data: &[u8]) -> Vec<u8> {
        self.applied += 1;
        Vec::new()
    }

    fn snapshot(&self) -> Vec<u8> {
        self.applied.to_be_bytes().to_vec()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        let bytes: [u8; 8] = data.try_into().map_err(|_| "8 bytes".to_string())?;
        self.applied = u64::from_be_bytes(bytes);
        Ok(())
    }
}

/// A command of the size the control plane proposes (a replica state report).
const PAYLOAD_BYTES: usize = 96;
const DEADLINE: Duration = Duration::from_secs(10);

struct Group {
    root: tempfile::TempDir,
    addresses: BTreeMap<u64, String>,
    members: BTreeMap<u64, Consensus>,
}

impl Group {
    async fn start() -> Group {
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("free port"))
            .collect();
        let addresses = (1..=3u64)
            .zip(
                listeners
                    .iter()
                    .map(|l| l.local_addr().expect("address").to_string()),
            )
            .collect();
        drop(listeners);
        let mut group = Group {
            root: tempfile::tempdir().expect("temp dir"),
            addresses,
            members: BTreeMap::new(),
        };
        for id in 1..=3 {
            group.start_member(id).await;
        }
        group
    }

    async fn start_member(&mut self, id: u64) {
        let config = ConsensusConfig {
            id,
            dir: self.root.path().join(format!("member-{id}")),
            cluster_id: 7,
            peers: self.addresses.clone(),
            bootstrap: true,
            listen: Some(self.addresses[&id].parse().expect("address")),
            tick_interval: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval_entries: 50_000,
        };
        let consensus = shoal_consensus::start(&config, Counter::default())
            .await
            .expect("member starts");
        self.members.insert(id, consensus);
    }

    async fn stop_member(&mut self, id: u64) {
        if let Some(consensus) = self.members.remove(&id) {
            tokio::task::spawn_blocking(move || consensus.shutdown())
                .await
                .expect("joined");
        }
    }

    async fn leader(&self) -> (u64, ConsensusHandle) {
        loop {
            for (id, member) in &self.members {
                let status = member.handle().status();
                if status.is_leader {
                    return (*id, member.handle());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// `concurrency` callers propose back to back for `duration`.
async fn throughput(
    leader: &ConsensusHandle,
    concurrency: usize,
    duration: Duration,
) -> (f64, Duration, Duration) {
    let started = Instant::now();
    let callers: Vec<_> = (0..concurrency)
        .map(|_| {
            let handle = leader.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while started.elapsed() < duration {
                    let sent = Instant::now();
                    match handle.propose(vec![7u8; PAYLOAD_BYTES], DEADLINE).await {
                        Ok(_) => latencies.push(sent.elapsed()),
                        Err(ProposeError::Overloaded) => tokio::task::yield_now().await,
                        Err(error) => panic!("proposal failed: {error}"),
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for caller in callers {
        latencies.extend(caller.await.expect("caller"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    (
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let run_for = if quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    };
    let failovers = if quick { 5 } else { 20 };
    let mut group = Group::start().await;
    let (_, leader) = group.leader().await;
    // Warm up connections and the log.
    throughput(&leader, 16, Duration::from_millis(500)).await;

    println!("3 voters on loopback TCP, fsync on every Ready, {PAYLOAD_BYTES}-byte proposals");
    println!(
        "{:>12} {:>14} {:>12} {:>12}",
        "concurrency", "proposals/s", "p50 ms", "p99 ms"
    );
    let mut rows = Vec::new();
    for concurrency in [1, 64, 1024] {
        let (rate, p50, p99) = throughput(&leader, concurrency, run_for).await;
        rows.push(
            serde_json::json!({"concurrency": concurrency, "proposals_per_second": rate,
            "p50_ms": p50.as_secs_f64() * 1e3, "p99_ms": p99.as_secs_f64() * 1e3}),
        );
        println!(
            "{concurrency:>12} {rate:>14.0} {:>12.2} {:>12.2}",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }

    // Failover: stop the leader abruptly (its thread ends, its sockets close), then time
    // until a proposal commits on the new leader. Election timeout: 10 ticks of 50 ms.
    let mut failover_times = Vec::new();
    for _ in 0..failovers {
        let (old, _) = group.leader().await;
        let stopped = Instant::now();
        group.stop_member(old).await;
        loop {
            let (_, handle) = group.leader().await;
            if handle
                .propose(vec![1u8; PAYLOAD_BYTES], Duration::from_millis(500))
                .await
                .is_ok()
            {
                break;
            }
        }
        failover_times.push(stopped.elapsed());
        group.start_member(old).await;
        // Let the restarted member catch up before the next round.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    failover_times.sort_unstable();
    println!(
        "leader failover (stop leader -> first commit on the new one), {} runs: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        failover_times.len(),
        percentile(&failover_times, 50.0).as_secs_f64() * 1e3,
        percentile(&failover_times, 99.0).as_secs_f64() * 1e3,
        failover_times
            .last()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3,
    );
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    let report = serde_json::json!({
        "scenario": "control_plane",
        "proposals": rows,
        "failover_ms": {
            "runs": failover_times.len(),
            "p50": ms(percentile(&failover_times, 50.0)),
            "p99": ms(percentile(&failover_times, 99.0)),
            "max": ms(failover_times.last().copied().unwrap_or_default()),
        },
    });
    println!("{report}");
    for id in [1, 2, 3] {
        group.stop_member(id).await;
    }
}
