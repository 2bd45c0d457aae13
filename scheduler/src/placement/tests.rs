//! Placement tests: worked examples, then properties over random clusters.

use super::*;
use crate::command::tests::{deployment_command, node_command, version_command};
use crate::command::{Rejected, apply};
use crate::state::ClusterState;
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

fn build(commands: Vec<Command>) -> ClusterState {
    let mut state = ClusterState::default();
    for command in commands {
        let index = state.applied_index + 1;
        apply(&mut state, index, command).expect("setup command applies");
    }
    state
}

/// Applies every planned command, asserting that none is refused.
fn apply_plan(state: &mut ClusterState, commands: Vec<Command>) {
    for command in commands {
        let index = state.applied_index + 1;
        let outcome = apply(state, index, command.clone());
        assert!(
            outcome.is_ok(),
            "plan proposed {command:?}, refused: {outcome:?}"
        );
    }
}

#[test]
fn replicas_of_one_deployment_spread_across_nodes() {
    let mut state = build(vec![
        node_command(1, &[8 * GIB]),
        node_command(2, &[8 * GIB]),
        node_command(3, &[8 * GIB]),
        version_command("m", "d1", GIB),
        deployment_command("m", "m", 3),
    ]);
    let commands = plan(&state);
    apply_plan(&mut state, commands);
    let nodes: Vec<u64> = state.replicas.values().map(|r| r.node.0).collect();
    assert_eq!(nodes, vec![1, 2, 3]);
}

#[test]
fn the_tightest_fitting_device_is_chosen() {
    let mut state = build(vec![
        node_command(1, &[8 * GIB, 2 * GIB, 4 * GIB]),
        version_command("m", "d1", 2 * GIB),
        deployment_command("m", "m", 1),
    ]);
    let commands = plan(&state);
    apply_plan(&mut state, commands);
    let replica = state.replicas.values().next().unwrap();
    assert_eq!(replica.device, DeviceId(1));
}

#[test]
fn a_deployment_that_does_not_fit_gets_what_fits_and_no_more() {
    let mut state = build(vec![
        node_command(1, &[3 * GIB]),
        version_command("m", "d1", 2 * GIB),
        deployment_command("m", "m", 2),
    ]);
    let commands = plan(&state);
    assert_eq!(commands.len(), 1);
    apply_plan(&mut state, commands);
    assert!(plan(&state).is_empty());
}

#[test]
fn a_node_that_is_not_ready_gets_nothing() {
    let mut state = build(vec![
        node_command(1, &[8 * GIB]),
        version_command("m", "d1", GIB),
        deployment_command("m", "m", 1),
    ]);
    state.nodes.get_mut(&NodeId(1)).unwrap().status = NodeStatus::Down;
    assert!(plan(&state).is_empty());
}

#[test]
fn a_plan_made_on_a_stale_state_is_refused_not_over_committed() {
    let mut state = build(vec![
        node_command(1, &[GIB]),
        version_command("a", "d1", GIB),
        version_command("b", "d2", GIB),
        deployment_command("a", "a", 1),
    ]);
    let stale = plan(&state);
    // Meanwhile another deployment takes the only device.
    apply(&mut state, 100, deployment_command("b", "b", 1)).unwrap();
    let mut fresh = state.clone();
    fresh.deployments.remove("a");
    for command in plan(&fresh) {
        apply(&mut state, 101, command).unwrap();
    }
    let refused = apply(&mut state, 102, stale[0].clone());
    assert!(matches!(refused, Err(Rejected::InsufficientMemory { .. })));
    assert!(state.reserved_bytes(NodeId(1), DeviceId(0)) <= GIB);
}

#[derive(Debug, Clone)]
struct Scenario {
    nodes: Vec<(Vec<u64>, bool)>,
    deployments: Vec<(u64, u32)>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let device = 1u64..=16;
    let node = (
        prop::collection::vec(device, 1..4),
        prop::bool::weighted(0.85),
    );
    let deployment = (1u64..=8, 0u32..6);
    (
        prop::collection::vec(node, 0..8),
        prop::collection::vec(deployment, 0..10),
    )
        .prop_map(|(nodes, deployments)| Scenario { nodes, deployments })
}

fn state_of(scenario: &Scenario) -> ClusterState {
    let mut commands = Vec::new();
    for (index, (devices, _)) in scenario.nodes.iter().enumerate() {
        let bytes: Vec<u64> = devices.iter().map(|gib| gib * GIB).collect();
        commands.push(node_command(index as u64 + 1, &bytes));
    }
    for (index, (memory_gib, replicas)) in scenario.deployments.iter().enumerate() {
        let name = format!("d{index}");
        commands.push(version_command(&name, "digest", memory_gib * GIB));
        commands.push(deployment_command(&name, &name, *replicas));
    }
    let mut state = build(commands);
    for (index, (_, ready)) in scenario.nodes.iter().enumerate() {
        if !ready {
            state
                .nodes
                .get_mut(&NodeId(index as u64 + 1))
                .unwrap()
                .status = NodeStatus::Down;
        }
    }
    state
}

proptest! {
    #[test]
    fn planned_commands_are_all_accepted_and_never_over_commit(scenario in scenario()) {
        let mut state = state_of(&scenario);
        let commands = plan(&state);
        apply_plan(&mut state, commands);
        for node in state.nodes.values() {
            for device in &node.devices {
                prop_assert!(state.reserved_bytes(node.id, device.id) <= device.memory_bytes);
            }
        }
    }

    #[test]
    fn planning_again_after_applying_a_plan_changes_nothing(scenario in scenario()) {
        let mut state = state_of(&scenario);
        let commands = plan(&state);
        apply_plan(&mut state, commands);
        prop_assert_eq!(plan(&state), vec![]);
    }

    #[test]
    fn a_deployment_left_short_has_nowhere_to_go(scenario in scenario()) {
        let mut state = state_of(&scenario);
        let commands = plan(&state);
        apply_plan(&mut state, commands);
        for deployment in state.deployments.values() {
            let live = state.replicas_of(&deployment.name).count() as u32;
            prop_assert!(live <= deployment.replicas);
            if live < deployment.replicas {
                let need = state.version(&deployment.model, deployment.version).unwrap().memory_bytes;
                for node in state.nodes.values().filter(|n| n.status == NodeStatus::Ready) {
                    for device in &node.devices {
                        let free = device.memory_bytes - state.reserved_bytes(node.id, device.id);
                        prop_assert!(free < need, "{} short but {} {} has {} free", deployment.name, node.id, device.id, free);
                    }
                }
            }
        }
    }

    #[test]
    fn plan_is_deterministic(scenario in scenario()) {
        // Two states built independently from the same inputs plan the same commands.
        prop_assert_eq!(plan(&state_of(&scenario)), plan(&state_of(&scenario)));
    }
}
