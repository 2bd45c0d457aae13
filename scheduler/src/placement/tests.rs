//! Placement tests: worked examples, then properties over random clusters and histories.

use super::*;
use crate::backoff::{FailingGroup, FailureMemory};
use crate::command::tests::{applied, deployment_command, next, node_command, version_command};
use crate::command::{Outcome, Rejected, apply};
use crate::deployment::{
    DeploymentSpec, ReplicaPolicy, RolloutKind, ShardLayout, Sharding, VersionSelector,
};
use crate::load::ReplicaLoad;
use crate::state::{ClusterState, NodeStatus};
use crate::types::{DeviceId, NodeId};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;
const NOW_MS: u64 = 1_000_000;

fn no_load() -> LoadSnapshot {
    LoadSnapshot::default()
}

/// Applies every planned command, asserting that none is refused.
fn apply_plan(state: &mut ClusterState, commands: Vec<Command>) {
    for command in commands {
        let outcome = next(state, command.clone());
        assert!(
            outcome.is_ok(),
            "plan proposed {command:?}, refused: {outcome:?}"
        );
    }
}

/// What every agent would do next: report each pending replica ready.
fn agents_report_ready(state: &mut ClusterState) {
    let pending: Vec<(ReplicaId, u64)> = state
        .replicas
        .values()
        .filter(|r| matches!(r.state, ReplicaState::Pending | ReplicaState::Loading))
        .filter(|r| {
            state
                .nodes
                .get(&r.node)
                .is_some_and(|n| n.status != NodeStatus::Down)
        })
        .map(|r| (r.id, r.epoch))
        .collect();
    for (replica, epoch) in pending {
        next(
            state,
            Command::SetReplicaState {
                replica,
                epoch,
                state: ReplicaState::Ready,
                failure: None,
            },
        )
        .expect("a current report applies");
    }
}

/// Plans, applies and lets agents report until a plan is empty; returns the rounds taken.
fn converge(state: &mut ClusterState, now_ms: u64) -> usize {
    /// Far more rounds than any test cluster needs; reaching it means the plan loops.
    const ROUNDS_MAX: usize = 50;
    for round in 0..ROUNDS_MAX {
        let commands = plan(state, &no_load(), now_ms);
        if commands.is_empty() {
            return round;
        }
        apply_plan(state, commands);
        agents_report_ready(state);
    }
    panic!("no convergence after {ROUNDS_MAX} rounds");
}

fn labelled_node(id: u64, device_bytes: &[u64], labels: &[(&str, &str)]) -> Command {
    let mut command = node_command(id, device_bytes);
    if let Command::RegisterNode { labels: set, .. } = &mut command {
        for (key, value) in labels {
            set.insert((*key).into(), (*value).into());
        }
    }
    command
}

fn set_status(state: &mut ClusterState, node: u64, status: NodeStatus) {
    next(
        state,
        Command::SetNodeStatus {
            node: NodeId(node),
            status,
        },
    )
    .unwrap();
}

/// Reports replica `replica` at `epoch` failed with `failure`, as its agent would.
fn fail(state: &mut ClusterState, replica: u64, epoch: u64, failure: &str) {
    next(
        state,
        Command::SetReplicaState {
            replica: ReplicaId(replica),
            epoch,
            state: ReplicaState::Failed,
            failure: Some(failure.into()),
        },
    )
    .unwrap();
}

fn node_ids(state: &ClusterState) -> Vec<u64> {
    state.replicas.values().map(|r| r.node.0).collect()
}

#[test]
fn replicas_of_one_deployment_spread_across_nodes() {
    let mut state = applied(vec![
        node_command(1, &[8 * GIB]),
        node_command(2, &[8 * GIB]),
        node_command(3, &[8 * GIB]),
        version_command("m", "d1", GIB),
        deployment_command("m", "m", 3),
    ]);
    let commands = plan(&state, &no_load(), NOW_MS);
    apply_plan(&mut state, commands);
    assert_eq!(node_ids(&state), vec![1, 2, 3]);
}

#[test]
fn replicas_spread_across_zones_before_nodes() {
    let mut state = applied(vec![
        labelled_node(1, &[8 * GIB], &[("zone", "a")]),
        labelled_node(2, &[8 * GIB], &[("zone", "a")]),
        labelled_node(3, &[8 * GIB], &[("zone", "b")]),
        version_command("m", "d1", GIB),
        deployment_command("m", "m", 2),
    ]);
    let commands = plan(&state, &no_load(), NOW_MS);
    apply_plan(&mut state, commands);
    assert_eq!(node_ids(&state), vec![1, 3]);
}

#[test]
fn the_tightest_fitting_device_is_chosen() {
    let mut state = applied(vec![
        node_command(1, &[8 * GIB, 2 * GIB, 4 * GIB]),
        version_command("m", "d1", 2 * GIB),
        deployment_command("m", "m", 1),
    ]);
    let commands = plan(&state, &no_load(), NOW_MS);
    apply_plan(&mut state, commands);
    let replica = state.replicas.values().next().unwrap();
    assert_eq!(replica.device, DeviceId(1));
}

#[test]
fn a_deployment_that_does_not_fit_gets_what_fits_and_no_more() {
    let mut state = applied(vec![
        node_command(1, &[3 * GIB]),
        version_command("m", "d1", 2 * GIB),
        deployment_command("m", "m", 2),
    ]);
    let commands = plan(&state, &no_load(), NOW_MS);
    assert_eq!(commands.len(), 1);
    apply_plan(&mut state, commands);
    assert!(plan(&state, &no_load(), NOW_MS).is_empty());
}

#[test]
fn a_node_that_is_not_ready_gets_nothing() {
    let mut state = applied(vec![
        node_command(1, &[8 * GIB]),
        node_command(2, &[8 * GIB]),
        version_command("m", "d1", GIB),
        deployment_command("m", "m", 1),
    ]);
    set_status(&mut state, 1, NodeStatus::Down);
    set_status(&mut state, 2, NodeStatus::Draining);
    assert!(plan(&state, &no_load(), NOW_MS).is_empty());
}

#[test]
fn label_selectors_keep_replicas_off_other_nodes() {
    let mut spec = DeploymentSpec::new("m", "m", 1, 2);
    spec.placement
        .node_labels
        .insert("gpu".into(), "a100".into());
    let mut state = applied(vec![
        labelled_node(1, &[8 * GIB], &[("gpu", "t4")]),
        labelled_node(2, &[8 * GIB], &[("gpu", "a100")]),
        version_command("m", "d1", GIB),
        Command::CreateDeployment { spec },
    ]);
    let commands = plan(&state, &no_load(), NOW_MS);
    apply_plan(&mut state, commands);
    assert_eq!(node_ids(&state), vec![2, 2]);
}

#[test]
fn a_plan_made_on_a_stale_state_is_refused_not_over_committed() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("a", "d1", GIB),
        version_command("b", "d2", GIB),
        deployment_command("a", "a", 1),
    ]);
    let stale = plan(&state, &no_load(), NOW_MS);
    // Meanwhile another deployment takes the only device.
    next(&mut state, deployment_command("b", "b", 1)).unwrap();
    let mut fresh = state.clone();
    fresh.deployments.remove("a");
    for command in plan(&fresh, &no_load(), NOW_MS) {
        next(&mut state, command).unwrap();
    }
    let refused = next(&mut state, stale[0].clone());
    assert!(matches!(refused, Err(Rejected::InsufficientMemory { .. })));
    assert!(state.reserved_bytes(NodeId(1), DeviceId(0)) <= GIB);
}

fn sharded(name: &str, replicas: u32, shards: u32, layout: ShardLayout) -> Command {
    let mut spec = DeploymentSpec::new(name, name, 1, replicas);
    spec.sharding = Sharding { shards, layout };
    Command::CreateDeployment { spec }
}

#[test]
fn tensor_parallel_shards_land_together_on_one_node() {
    let mut state = applied(vec![
        node_command(1, &[8 * GIB, 8 * GIB]),
        node_command(2, &[8 * GIB, 8 * GIB, 8 * GIB, 8 * GIB]),
        version_command("llm", "d1", 16 * GIB),
        sharded("llm", 1, 4, ShardLayout::SameNode),
    ]);
    let commands = plan(&state, &no_load(), NOW_MS);
    apply_plan(&mut state, commands);
    assert_eq!(node_ids(&state), vec![2, 2, 2, 2]);
    for device in 0..4 {
        assert_eq!(state.reserved_bytes(NodeId(2), DeviceId(device)), 4 * GIB);
    }
}

#[test]
fn a_tensor_parallel_group_no_node_can_hold_is_not_placed() {
    let state = applied(vec![
        node_command(1, &[8 * GIB, 8 * GIB]),
        node_command(2, &[8 * GIB, 8 * GIB]),
        version_command("llm", "d1", 16 * GIB),
        sharded("llm", 1, 4, ShardLayout::SameNode),
    ]);
    assert!(plan(&state, &no_load(), NOW_MS).is_empty());
}

#[test]
fn a_pipeline_spans_nodes_only_when_no_node_has_room() {
    let mut state = applied(vec![
        node_command(1, &[8 * GIB, 8 * GIB]),
        node_command(2, &[8 * GIB, 8 * GIB]),
        node_command(3, &[8 * GIB, 8 * GIB, 8 * GIB]),
        version_command("llm", "d1", 12 * GIB),
        version_command("big", "d2", 16 * GIB),
        sharded("big", 1, 4, ShardLayout::PipelineAcrossNodes),
        sharded("llm", 1, 3, ShardLayout::PipelineAcrossNodes),
    ]);
    let commands = plan(&state, &no_load(), NOW_MS);
    apply_plan(&mut state, commands);
    // `big` (4 stages) fits on no single node, so it spans two; `llm` (3 stages) then
    // finds node 3 whole.
    let big: Vec<u64> = state.replicas_of("big").map(|r| r.node.0).collect();
    let llm: Vec<u64> = state.replicas_of("llm").map(|r| r.node.0).collect();
    assert_eq!(big, vec![1, 1, 2, 2]);
    assert_eq!(llm, vec![3, 3, 3]);
    assert_eq!(
        state
            .replicas_of("big")
            .map(|r| r.shard)
            .collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
}

#[test]
fn replicas_of_a_down_node_are_placed_again_at_a_higher_epoch() {
    let mut state = applied(vec![
        node_command(1, &[8 * GIB]),
        node_command(2, &[8 * GIB]),
        version_command("m", "d1", GIB),
        deployment_command("m", "m", 2),
    ]);
    converge(&mut state, NOW_MS);
    set_status(&mut state, 1, NodeStatus::Down);
    let commands = plan(&state, &no_load(), NOW_MS);
    assert_eq!(
        commands,
        vec![Command::ReassignReplica {
            group: ReplicaId(0),
            epoch: 1,
            shards: vec![ShardPlacement {
                node: NodeId(2),
                device: DeviceId(0)
            }],
        }]
    );
    apply_plan(&mut state, commands);
    assert_eq!(state.replicas[&ReplicaId(0)].epoch, 2);
    assert_eq!(state.replicas[&ReplicaId(0)].node, NodeId(2));
}

#[test]
fn a_failed_replica_is_placed_again_in_its_slot() {
    let mut state = applied(vec![
        node_command(1, &[8 * GIB]),
        version_command("m", "d1", GIB),
        deployment_command("m", "m", 1),
    ]);
    converge(&mut state, NOW_MS);
    fail(&mut state, 0, 1, "out of memory");
    let commands = plan(&state, &no_load(), NOW_MS);
    assert!(matches!(
        commands.as_slice(),
        [Command::ReassignReplica {
            group: ReplicaId(0),
            epoch: 1,
            ..
        }]
    ));
    apply_plan(&mut state, commands);
    assert_eq!(state.replicas.len(), 1);
    assert_eq!(state.replicas[&ReplicaId(0)].epoch, 2);
}

/// Regression: a version that can never load (no `config.json`) was placed again the
/// moment it failed, three raft entries per attempt, forever, and its reason was hardly
/// ever on show.
#[test]
fn a_group_that_keeps_failing_waits_longer_each_time_before_it_is_placed_again() {
    let mut state = applied(vec![
        node_command(1, &[8 * GIB]),
        version_command("m", "d1", GIB),
        deployment_command("m", "m", 1),
    ]);
    converge(&mut state, NOW_MS);
    let mut memory = FailureMemory::default();
    let mut now_ms = NOW_MS;
    let mut waits = Vec::new();
    for epoch in 1..=4 {
        fail(&mut state, 0, epoch, "the version has no config.json file");
        memory.observe(&state, now_ms);
        let load = LoadSnapshot {
            failing: memory.failing(),
            ..LoadSnapshot::default()
        };
        let failed_at_ms = now_ms;
        while plan(&state, &load, now_ms).is_empty() {
            let replica = &state.replicas[&ReplicaId(0)];
            assert_eq!(replica.state, ReplicaState::Failed);
            assert!(replica.failure.is_some(), "the reason stays on show");
            now_ms += 100;
        }
        waits.push(now_ms - failed_at_ms);
        let commands = plan(&state, &load, now_ms);
        assert!(matches!(
            commands.as_slice(),
            [Command::ReassignReplica {
                group: ReplicaId(0),
                ..
            }]
        ));
        apply_plan(&mut state, commands);
        memory.observe(&state, now_ms);
    }
    assert_eq!(waits, [0, 500, 1_000, 2_000]);

    // Once it serves, the count starts again.
    agents_report_ready(&mut state);
    memory.observe(&state, now_ms);
    assert_eq!(memory.failures_in_a_row(ReplicaId(0)), 0);
    assert!(memory.failing().is_empty());
}

/// A failing group that also lost its node moves at once: the wait is for the version, and
/// another node may run it.
#[test]
fn a_failed_group_whose_node_went_down_moves_without_waiting() {
    let mut state = applied(vec![
        node_command(1, &[8 * GIB]),
        node_command(2, &[8 * GIB]),
        version_command("m", "d1", GIB),
        deployment_command("m", "m", 1),
    ]);
    converge(&mut state, NOW_MS);
    let node = state.replicas[&ReplicaId(0)].node;
    fail(&mut state, 0, 1, "out of memory");
    set_status(&mut state, node.0, NodeStatus::Down);
    let mut load = LoadSnapshot::default();
    let failing = FailingGroup {
        in_a_row: 5,
        retry_at_ms: NOW_MS + 60_000,
    };
    load.failing.insert(ReplicaId(0), failing);
    let commands = plan(&state, &load, NOW_MS);
    assert!(
        matches!(commands.as_slice(), [Command::ReassignReplica { .. }]),
        "{commands:?}"
    );
    apply_plan(&mut state, commands);
    assert_ne!(state.replicas[&ReplicaId(0)].node, node);
}

/// A deployment that no longer wants a failed group drops it at once, wait or not.
#[test]
fn a_failed_group_that_waits_is_still_removed_when_no_longer_wanted() {
    let mut spec = DeploymentSpec::new("m", "m", 1, 1);
    spec.replicas = ReplicaPolicy {
        initial: 1,
        min: 0,
        max: 1,
    };
    let mut state = applied(vec![
        node_command(1, &[8 * GIB]),
        version_command("m", "d1", GIB),
        Command::CreateDeployment { spec },
    ]);
    converge(&mut state, NOW_MS);
    fail(&mut state, 0, 1, "weights do not match the config");
    next(
        &mut state,
        Command::SetDesiredReplicas {
            deployment: "m".into(),
            replicas: 0,
        },
    )
    .unwrap();
    let mut load = LoadSnapshot::default();
    load.failing.insert(
        ReplicaId(0),
        FailingGroup {
            in_a_row: 9,
            retry_at_ms: NOW_MS + 60_000,
        },
    );
    let commands = plan(&state, &load, NOW_MS);
    assert!(
        matches!(commands.as_slice(), [Command::RemoveReplica { .. }]),
        "{commands:?}"
    );
}

fn packed(name: &str, replicas: ReplicaPolicy) -> Command {
    let mut spec = DeploymentSpec::new(name, name, 1, replicas.initial);
    spec.replicas = replicas;
    spec.placement.allow_packing = true;
    Command::CreateDeployment { spec }
}

fn scalable(max: u32) -> ReplicaPolicy {
    ReplicaPolicy {
        initial: 1,
        min: 0,
        max,
    }
}

/// One device holding two idle packed replicas (`a` served at 1s, `b` at 2s) and a third
/// packed deployment `c` that needs room.
fn packed_cluster() -> ClusterState {
    let mut state = applied(vec![
        node_command(1, &[2 * GIB]),
        version_command("a", "d1", GIB),
        version_command("b", "d2", GIB),
        version_command("c", "d3", GIB),
        packed("a", scalable(2)),
        packed("b", scalable(2)),
    ]);
    converge(&mut state, NOW_MS);
    next(&mut state, packed("c", scalable(2))).unwrap();
    state
}

fn idle_load(state: &ClusterState, last_request_ms: &[(&str, u64)]) -> LoadSnapshot {
    let mut load = LoadSnapshot::default();
    for (deployment, at) in last_request_ms {
        for group in state.group_ids_of(deployment) {
            load.replicas.insert(
                group,
                ReplicaLoad {
                    requests_in_flight: 0,
                    last_request_ms: Some(*at),
                },
            );
        }
    }
    load
}

#[test]
fn a_packed_deployment_evicts_the_least_recently_used_idle_replica() {
    let mut state = packed_cluster();
    let load = idle_load(&state, &[("a", 1_000), ("b", 2_000)]);
    let commands = plan(&state, &load, NOW_MS);
    assert_eq!(
        commands,
        vec![
            Command::RemoveReplica {
                group: ReplicaId(0),
                epoch: 1,
                reason: RemovalReason::Evicted {
                    for_deployment: "c".into(),
                    last_request_ms: Some(1_000),
                },
            },
            Command::AssignReplica {
                deployment: "c".into(),
                version: 1,
                shards: vec![ShardPlacement {
                    node: NodeId(1),
                    device: DeviceId(0)
                }],
            },
        ]
    );
    apply_plan(&mut state, commands);
    assert_eq!(state.deployments["a"].replicas_desired, 0);
    assert!(plan(&state, &load, NOW_MS).is_empty());
}

#[test]
fn a_replica_that_served_recently_or_is_unknown_is_never_evicted() {
    let state = packed_cluster();
    let recent = idle_load(&state, &[("a", NOW_MS - 1), ("b", NOW_MS - 1)]);
    assert!(plan(&state, &recent, NOW_MS).is_empty());
    assert!(plan(&state, &no_load(), NOW_MS).is_empty());
}

#[test]
fn a_replica_at_its_deployments_minimum_is_never_evicted() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("a", "d1", GIB),
        version_command("c", "d3", GIB),
        packed("a", ReplicaPolicy::fixed(1)),
    ]);
    converge(&mut state, NOW_MS);
    next(&mut state, packed("c", scalable(1))).unwrap();
    let load = idle_load(&state, &[("a", 0)]);
    assert!(plan(&state, &load, NOW_MS).is_empty());
}

#[test]
fn an_update_to_a_new_version_starts_a_rollout_in_the_same_plan() {
    let mut state = applied(vec![
        node_command(1, &[8 * GIB]),
        node_command(2, &[8 * GIB]),
        version_command("m", "d1", GIB),
        version_command("m", "d2", GIB),
        deployment_command("m", "m", 2),
    ]);
    converge(&mut state, NOW_MS);
    let mut spec = DeploymentSpec::new("m", "m", 2, 2);
    spec.versions = VersionSelector::Version(2);
    next(&mut state, Command::UpdateDeployment { spec }).unwrap();
    let commands = plan(&state, &no_load(), NOW_MS);
    assert!(matches!(
        commands.as_slice(),
        [
            Command::StartRollout { version: 2, .. },
            Command::AssignReplica { version: 2, .. },
        ]
    ));
}

#[derive(Debug, Clone)]
struct Cluster {
    /// Per node: device sizes in GiB, zone, whether it starts ready.
    nodes: Vec<(Vec<u64>, u8, bool)>,
    /// Per deployment: memory in GiB, replicas, shards, pipeline, packing.
    deployments: Vec<(u64, u32, u32, bool, bool)>,
}

fn cluster(device_gib: std::ops::RangeInclusive<u64>) -> impl Strategy<Value = Cluster> {
    let node = (
        prop::collection::vec(device_gib, 1..4),
        0u8..3,
        prop::bool::weighted(0.85),
    );
    let deployment = (1u64..=8, 0u32..6, 1u32..=2, any::<bool>(), any::<bool>());
    (
        prop::collection::vec(node, 1..8),
        prop::collection::vec(deployment, 0..8),
    )
        .prop_map(|(nodes, deployments)| Cluster { nodes, deployments })
}

fn state_of(cluster: &Cluster) -> ClusterState {
    let mut commands = Vec::new();
    for (index, (devices, zone, _)) in cluster.nodes.iter().enumerate() {
        let bytes: Vec<u64> = devices.iter().map(|gib| gib * GIB).collect();
        let zone = ["a", "b", "c"][*zone as usize];
        commands.push(labelled_node(index as u64 + 1, &bytes, &[("zone", zone)]));
    }
    for (index, &(memory_gib, replicas, shards, pipeline, packing)) in
        cluster.deployments.iter().enumerate()
    {
        let name = format!("d{index}");
        commands.push(version_command(&name, "v1", memory_gib * GIB));
        commands.push(version_command(&name, "v2", memory_gib * GIB));
        let mut spec = DeploymentSpec::new(&name, &name, 1, replicas);
        spec.sharding = Sharding {
            shards,
            layout: if pipeline {
                ShardLayout::PipelineAcrossNodes
            } else {
                ShardLayout::SameNode
            },
        };
        spec.placement.allow_packing = packing;
        commands.push(Command::CreateDeployment { spec });
    }
    let mut state = applied(commands);
    for (index, (_, _, ready)) in cluster.nodes.iter().enumerate() {
        if !ready {
            set_status(&mut state, index as u64 + 1, NodeStatus::Down);
        }
    }
    state
}

/// Something that happens to a cluster between plans.
#[derive(Debug, Clone)]
enum Event {
    NodeStatus(usize, NodeStatus),
    ReplicaFails(usize),
    AgentsReport,
    /// Deployment `.0` moves to version `.1` with strategy `.2` (0 rolling, 1 canary, 2 blue-green).
    NewVersion(usize, u32, u8),
    Scale(usize, u32),
    TimePasses(u64),
}

fn event() -> impl Strategy<Value = Event> {
    let status = prop::sample::select(vec![
        NodeStatus::Ready,
        NodeStatus::Draining,
        NodeStatus::Down,
    ]);
    prop_oneof![
        2 => (0usize..8, status).prop_map(|(node, status)| Event::NodeStatus(node, status)),
        1 => (0usize..64).prop_map(Event::ReplicaFails),
        4 => Just(Event::AgentsReport),
        3 => (0usize..4, 1u32..=2, 0u8..3).prop_map(|(d, v, s)| Event::NewVersion(d, v, s)),
        1 => (0usize..8, 0u32..6).prop_map(|(d, r)| Event::Scale(d, r)),
        2 => (0u64..8_000).prop_map(Event::TimePasses),
    ]
}

fn happen(state: &mut ClusterState, event: &Event, now_ms: &mut u64) {
    match event {
        Event::NodeStatus(node, status) => {
            let id = NodeId(*node as u64 + 1);
            if state.nodes.contains_key(&id) {
                set_status(state, id.0, *status);
            }
        }
        Event::ReplicaFails(position) => {
            let Some(replica) = state.replicas.values().nth(*position) else {
                return;
            };
            let (replica, epoch) = (replica.id, replica.epoch);
            let _ = next(
                state,
                Command::SetReplicaState {
                    replica,
                    epoch,
                    state: ReplicaState::Failed,
                    failure: Some("crashed".into()),
                },
            );
        }
        Event::AgentsReport => agents_report_ready(state),
        Event::NewVersion(deployment, version, strategy) => {
            let Some(current) = state.deployments.values().nth(*deployment) else {
                return;
            };
            let mut spec = current.spec.clone();
            spec.versions = VersionSelector::Version(*version);
            spec.rollout.kind = match strategy {
                0 => RolloutKind::Rolling,
                1 => RolloutKind::Canary {
                    traffic_percent: 20,
                    observation_ms: 5_000,
                    thresholds: crate::deployment::CanaryThresholds {
                        error_ratio_max_ppm: 10_000,
                        latency_p99_max_ms: 500,
                        requests_min: 10,
                    },
                },
                _ => RolloutKind::BlueGreen {
                    keep_previous_ms: 5_000,
                },
            };
            next(state, Command::UpdateDeployment { spec }).unwrap();
        }
        Event::Scale(deployment, replicas) => {
            let Some(current) = state.deployments.values().nth(*deployment) else {
                return;
            };
            let mut spec = current.spec.clone();
            spec.replicas = ReplicaPolicy::fixed(*replicas);
            next(state, Command::UpdateDeployment { spec }).unwrap();
        }
        Event::TimePasses(ms) => *now_ms += ms,
    }
}

/// Every (group, epoch) seen so far, with the placement it named.
type EpochLedger = BTreeMap<(ReplicaId, u64), Vec<ShardPlacement>>;

fn check_epochs(state: &ClusterState, ledger: &mut EpochLedger) -> Result<(), TestCaseError> {
    for replica in state.replicas.values().filter(|r| r.shard == 0) {
        let placements: Vec<ShardPlacement> = state
            .group(replica.id)
            .map(|r| ShardPlacement {
                node: r.node,
                device: r.device,
            })
            .collect();
        let seen = ledger
            .entry((replica.id, replica.epoch))
            .or_insert_with(|| placements.clone());
        prop_assert_eq!(
            &*seen,
            &placements,
            "{} epoch {} names two placements",
            replica.id,
            replica.epoch
        );
        if let Some(((_, newest), _)) = ledger
            .range((replica.id, 0)..=(replica.id, u64::MAX))
            .next_back()
        {
            prop_assert!(
                replica.epoch == *newest,
                "{} went back to an older epoch",
                replica.id
            );
        }
    }
    Ok(())
}

fn check_no_over_commit(state: &ClusterState) -> Result<(), TestCaseError> {
    for node in state.nodes.values() {
        for device in &node.devices {
            prop_assert!(state.reserved_bytes(node.id, device.id) <= device.memory_bytes);
        }
    }
    Ok(())
}

/// Whether some ready node could take one more group of `deployment` right now.
fn fits_somewhere(state: &ClusterState, deployment: &Deployment) -> bool {
    let spec = &deployment.spec;
    let Some(version) = state.version(&spec.model, deployment.stable_version) else {
        return false;
    };
    let need = shard_bytes(version.memory_bytes, spec.sharding.shards);
    let free_per_node: Vec<usize> = state
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Ready)
        .map(|n| {
            n.devices
                .iter()
                .filter(|d| state.free_bytes(n.id, d.id) >= need)
                .count()
        })
        .collect();
    let shards = spec.sharding.shards as usize;
    match spec.sharding.layout {
        ShardLayout::SameNode => free_per_node.iter().any(|&fit| fit >= shards),
        ShardLayout::PipelineAcrossNodes => free_per_node.iter().sum::<usize>() >= shards,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn plans_are_accepted_never_over_commit_and_leave_nothing_to_plan(
        cluster in cluster(1..=16),
        events in prop::collection::vec(event(), 0..40),
    ) {
        let mut state = state_of(&cluster);
        let mut now_ms = NOW_MS;
        let mut ledger = EpochLedger::new();
        for event in std::iter::once(Event::AgentsReport).chain(events) {
            happen(&mut state, &event, &mut now_ms);
            let commands = plan(&state, &no_load(), now_ms);
            for command in commands {
                let outcome = next(&mut state, command.clone());
                prop_assert!(outcome.is_ok(), "plan proposed {:?}, refused: {:?}", command, outcome);
            }
            check_no_over_commit(&state)?;
            check_epochs(&state, &mut ledger)?;
            let again = plan(&state, &no_load(), now_ms);
            prop_assert_eq!(again, vec![], "planning again after {:?} found more to do", event);
        }
    }

    #[test]
    fn after_a_node_goes_down_every_deployment_converges(
        cluster in cluster(1..=16),
        down in 0usize..8,
    ) {
        let mut state = state_of(&cluster);
        converge(&mut state, NOW_MS);
        let down = NodeId((down % cluster.nodes.len()) as u64 + 1);
        set_status(&mut state, down.0, NodeStatus::Down);
        converge(&mut state, NOW_MS);
        for deployment in state.deployments.values() {
            let groups: Vec<GroupView> = state
                .group_ids_of(deployment.name())
                .filter_map(|g| state.group_view(g))
                .collect();
            let healthy = groups.iter().filter(|g| !g.needs_reassignment).count() as u32;
            prop_assert!(groups.len() as u32 <= deployment.replicas_desired);
            if healthy < deployment.replicas_desired {
                prop_assert!(
                    !fits_somewhere(&state, deployment),
                    "{} has {} of {} healthy groups but room remains",
                    deployment.name(), healthy, deployment.replicas_desired
                );
            }
            prop_assert!(groups.iter().all(|g| g.ready || g.needs_reassignment));
        }
    }

    #[test]
    fn replicas_spread_evenly_over_zones_and_nodes_when_capacity_allows(
        cluster in cluster(1_000..=1_000),
    ) {
        let mut cluster = cluster;
        for deployment in &mut cluster.deployments {
            deployment.2 = 1;
        }
        let mut state = state_of(&cluster);
        converge(&mut state, NOW_MS);
        let ready: Vec<&crate::state::Node> =
            state.nodes.values().filter(|n| n.status == NodeStatus::Ready).collect();
        for deployment in state.deployments.values() {
            let mut per_node: BTreeMap<NodeId, u32> =
                ready.iter().map(|n| (n.id, 0)).collect();
            let mut per_zone: BTreeMap<&str, u32> = BTreeMap::new();
            for node in &ready {
                per_zone.insert(node.labels["zone"].as_str(), 0);
            }
            for replica in state.replicas_of(deployment.name()) {
                *per_node.get_mut(&replica.node).unwrap() += 1;
                *per_zone.get_mut(state.nodes[&replica.node].labels["zone"].as_str()).unwrap() += 1;
            }
            let spread = |counts: &mut dyn Iterator<Item = u32>| {
                let counts: Vec<u32> = counts.collect();
                counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
            };
            prop_assert!(spread(&mut per_zone.values().copied()) <= 1, "zones {:?}", per_zone);
            for zone in per_zone.keys() {
                let mut in_zone = ready
                    .iter()
                    .filter(|n| n.labels["zone"] == *zone)
                    .map(|n| per_node[&n.id]);
                prop_assert!(spread(&mut in_zone) <= 1, "nodes {:?} in zone {}", per_node, zone);
            }
        }
    }

    #[test]
    fn plan_is_deterministic(cluster in cluster(1..=16)) {
        // Two states built independently from the same inputs plan the same commands.
        prop_assert_eq!(
            plan(&state_of(&cluster), &no_load(), NOW_MS),
            plan(&state_of(&cluster), &no_load(), NOW_MS)
        );
    }
}

#[test]
fn the_outcome_of_an_assignment_names_the_group_the_plan_predicted() {
    // The planner predicts replica ids to reason about its own placements; check it against
    // what apply hands out.
    let mut state = applied(vec![
        node_command(1, &[8 * GIB, 8 * GIB]),
        version_command("a", "d1", GIB),
        version_command("b", "d2", 2 * GIB),
        sharded("a", 2, 2, ShardLayout::SameNode),
        deployment_command("b", "b", 1),
    ]);
    let commands = plan(&state, &no_load(), NOW_MS);
    let mut groups = Vec::new();
    for command in commands {
        let index = state.applied_index + 1;
        if let Ok(Outcome::ReplicaAssigned { replica }) = apply(&mut state, index, command) {
            groups.push(replica.0);
        }
    }
    assert_eq!(groups, vec![0, 2, 4]);
}
