//! Placement benchmark: plan rounds on a 10,000-node cluster (8 devices each) running 5,000
//! deployments and 100,000 replica groups; a round after 1% of nodes fail; a drain. Prints a
//! table. Run with `cargo bench -p shoal-scheduler --bench plan`.
//!
//! The cluster is generated from a fixed seed, so every run plans the same commands.

use shoal_scheduler::placement::plan;
use shoal_scheduler::{
    ArtifactFile, ClusterState, Command, DeploymentSpec, Device, DeviceId, DeviceKind,
    LoadSnapshot, NodeId, NodeStatus, ReplicaState, ShardLayout, Sharding, Signature, apply,
};
use std::time::{Duration, Instant};

const NODES: u64 = 10_000;
const DEVICES_PER_NODE: u32 = 8;
const DEVICE_BYTES: u64 = 80 << 30;
const ZONES: u64 = 10;
const DEPLOYMENTS: u64 = 5_000;
const GROUPS: u64 = 100_000;
const FAILED_NODES: u64 = NODES / 100;
/// Runs per measured round; the table shows the median and the fastest.
const RUNS: usize = 5;
const NOW_MS: u64 = 1_700_000_000_000;

/// xorshift64*: a tiny deterministic generator, so the benchmark needs no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % bound
    }
}

fn accept(state: &mut ClusterState, command: Command) {
    let index = state.applied_index + 1;
    if let Err(rejected) = apply(state, index, command) {
        panic!("benchmark setup refused: {rejected}");
    }
}

fn cluster() -> ClusterState {
    let mut rng = Rng(0x5eed_0f54_00a1);
    let mut state = ClusterState::default();
    for id in 0..NODES {
        let labels = [
            ("zone".to_string(), format!("z{}", id % ZONES)),
            (
                "gpu".to_string(),
                if id % 4 == 0 { "h100" } else { "a100" }.to_string(),
            ),
        ];
        accept(
            &mut state,
            Command::RegisterNode {
                id: NodeId(id),
                address: format!("10.{}.{}.{}:7071", id >> 16, (id >> 8) & 255, id & 255),
                devices: (0..DEVICES_PER_NODE)
                    .map(|device| Device {
                        id: DeviceId(device),
                        kind: DeviceKind::Gpu,
                        memory_bytes: DEVICE_BYTES,
                    })
                    .collect(),
                labels: labels.into_iter().collect(),
            },
        );
    }
    // Replica counts: 20 on average, 10..=30, adding up to exactly GROUPS.
    let mut counts: Vec<u32> = (0..DEPLOYMENTS)
        .map(|_| 10 + rng.below(21) as u32)
        .collect();
    let mut total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    let mut position = 0;
    let deployments = counts.len();
    while total != GROUPS {
        let count = &mut counts[position % deployments];
        if total > GROUPS && *count > 1 {
            *count -= 1;
            total -= 1;
        } else if total < GROUPS {
            *count += 1;
            total += 1;
        }
        position += 1;
    }
    for (index, replicas) in counts.into_iter().enumerate() {
        let name = format!("model-{index}");
        let memory_gib = 2 + rng.below(30);
        accept(
            &mut state,
            Command::RegisterModelVersion {
                model: name.clone(),
                manifest_digest: format!("{index:064x}"),
                files: vec![ArtifactFile {
                    name: "model.safetensors".into(),
                    digest: format!("{index:064x}"),
                    size_bytes: memory_gib << 30,
                }],
                format: "safetensors".into(),
                memory_bytes: memory_gib << 30,
                signature: Signature::default(),
                created_at_ms: NOW_MS,
            },
        );
        let mut spec = DeploymentSpec::new(&name, &name, 1, replicas);
        match index % 20 {
            // One in twenty is tensor parallel over two devices, one in twenty wants H100s.
            0 => {
                spec.sharding = Sharding {
                    shards: 2,
                    layout: ShardLayout::SameNode,
                }
            }
            1 => {
                spec.placement
                    .node_labels
                    .insert("gpu".into(), "h100".into());
            }
            _ => {}
        }
        accept(&mut state, Command::CreateDeployment { spec });
    }
    state
}

fn apply_all(state: &mut ClusterState, commands: Vec<Command>) -> Duration {
    let started = Instant::now();
    for command in commands {
        accept(state, command);
    }
    started.elapsed()
}

fn all_ready(state: &mut ClusterState) {
    let pending: Vec<_> = state
        .replicas
        .values()
        .filter(|r| r.state == ReplicaState::Pending)
        .map(|r| (r.id, r.epoch))
        .collect();
    for (replica, epoch) in pending {
        accept(
            state,
            Command::SetReplicaState {
                replica,
                epoch,
                state: ReplicaState::Ready,
                failure: None,
            },
        );
    }
}

/// Plans `RUNS` times; returns the commands and the median and fastest durations.
fn measure(state: &ClusterState) -> (Vec<Command>, Duration, Duration) {
    let load = LoadSnapshot::default();
    let mut times = Vec::with_capacity(RUNS);
    let mut commands = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        commands = plan(state, &load, NOW_MS);
        times.push(started.elapsed());
    }
    times.sort();
    (commands, times[RUNS / 2], times[0])
}

fn placements(commands: &[Command]) -> usize {
    commands
        .iter()
        .filter(|c| {
            matches!(
                c,
                Command::AssignReplica { .. } | Command::ReassignReplica { .. }
            )
        })
        .count()
}

fn row(round: &str, commands: &[Command], median: Duration, fastest: Duration) {
    let placed = placements(commands);
    let per_second = if placed == 0 {
        "-".to_string()
    } else {
        format!("{:.0}", placed as f64 / median.as_secs_f64())
    };
    println!(
        "| {round:<34} | {:>8} | {:>10} | {:>9.1} | {:>9.1} | {per_second:>12} |",
        commands.len(),
        placed,
        median.as_secs_f64() * 1e3,
        fastest.as_secs_f64() * 1e3,
    );
}

fn main() {
    let started = Instant::now();
    let mut state = cluster();
    eprintln!(
        "built {} nodes, {} deployments in {:.1} s",
        state.nodes.len(),
        state.deployments.len(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "cluster: {NODES} nodes x {DEVICES_PER_NODE} devices ({} GiB each), {ZONES} zones, \
         {DEPLOYMENTS} deployments, {GROUPS} replica groups (1 in 20 deployments sharded over 2 \
         devices); {RUNS} runs per round",
        DEVICE_BYTES >> 30
    );
    println!();
    println!(
        "| round                              | commands | placements | median ms | fastest ms | placements/s |"
    );
    println!(
        "|------------------------------------|---------:|-----------:|----------:|-----------:|-------------:|"
    );

    let (commands, median, fastest) = measure(&state);
    row("initial: place every replica", &commands, median, fastest);
    let apply_time = apply_all(&mut state, commands);
    all_ready(&mut state);
    let replicas = state.replicas.len();

    let (commands, median, fastest) = measure(&state);
    row("steady state: nothing to do", &commands, median, fastest);
    assert!(commands.is_empty(), "a converged cluster plans nothing");

    for id in 0..FAILED_NODES {
        // Spread the failures over the cluster: every 100th node.
        accept(
            &mut state,
            Command::SetNodeStatus {
                node: NodeId(id * (NODES / FAILED_NODES)),
                status: NodeStatus::Down,
            },
        );
    }
    let (commands, median, fastest) = measure(&state);
    row("1% of nodes down: reschedule", &commands, median, fastest);
    apply_all(&mut state, commands);
    all_ready(&mut state);

    let (commands, median, fastest) = measure(&state);
    row(
        "after rescheduling: nothing to do",
        &commands,
        median,
        fastest,
    );

    for id in 0..FAILED_NODES {
        accept(
            &mut state,
            Command::SetNodeStatus {
                node: NodeId(id * (NODES / FAILED_NODES) + 1),
                status: NodeStatus::Draining,
            },
        );
    }
    let (commands, median, fastest) = measure(&state);
    row(
        "1% of nodes draining: surge copies",
        &commands,
        median,
        fastest,
    );

    println!();
    println!(
        "{replicas} replica records (shards) in the state; applying the initial plan took {:.0} ms",
        apply_time.as_secs_f64() * 1e3
    );
}
