//! Unit tests for `apply`: each command's effect and each way it is refused.

use super::*;
use crate::types::{DataType, DeviceKind, TensorSpec};

const GIB: u64 = 1 << 30;

pub(crate) fn node_command(id: u64, device_bytes: &[u64]) -> Command {
    Command::RegisterNode {
        id: NodeId(id),
        address: format!("127.0.0.1:{}", 9000 + id),
        devices: device_bytes
            .iter()
            .enumerate()
            .map(|(index, &memory_bytes)| Device {
                id: DeviceId(index as u32),
                kind: DeviceKind::Gpu,
                memory_bytes,
            })
            .collect(),
        labels: BTreeMap::new(),
    }
}

pub(crate) fn version_command(model: &str, digest: &str, memory_bytes: u64) -> Command {
    Command::RegisterModelVersion {
        model: model.into(),
        manifest_digest: digest.into(),
        files: vec![ArtifactFile {
            name: "model.safetensors".into(),
            digest: "ab".repeat(32),
            size_bytes: 1234,
        }],
        format: "safetensors".into(),
        memory_bytes,
        signature: Signature {
            inputs: vec![TensorSpec {
                name: "features".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 4],
            }],
            outputs: vec![],
        },
        created_at_ms: 1_700_000_000_000,
    }
}

pub(crate) fn deployment_command(name: &str, model: &str, replicas: u32) -> Command {
    Command::CreateDeployment {
        name: name.into(),
        model: model.into(),
        version: 1,
        replicas,
        batching: BatchingPolicy::default(),
    }
}

fn applied(commands: Vec<Command>) -> ClusterState {
    let mut state = ClusterState::default();
    for (index, command) in commands.into_iter().enumerate() {
        apply(&mut state, index as u64 + 1, command).expect("setup command applies");
    }
    state
}

fn assign(deployment: &str, node: u64, device: u32, bytes: u64) -> Command {
    Command::AssignReplica {
        deployment: deployment.into(),
        node: NodeId(node),
        device: DeviceId(device),
        reserved_bytes: bytes,
    }
}

#[test]
fn registering_a_node_twice_updates_it_in_place() {
    let mut state = applied(vec![node_command(1, &[GIB])]);
    let outcome = apply(&mut state, 2, node_command(1, &[2 * GIB])).unwrap();
    assert_eq!(outcome, Outcome::NodeRegistered { created: false });
    assert_eq!(state.nodes[&NodeId(1)].devices[0].memory_bytes, 2 * GIB);
    assert_eq!(state.applied_index, 2);
}

#[test]
fn versions_are_numbered_in_order_and_content_addressed() {
    let mut state = ClusterState::default();
    let first = apply(&mut state, 1, version_command("iris", "d1", 10)).unwrap();
    let second = apply(&mut state, 2, version_command("iris", "d2", 10)).unwrap();
    let again = apply(&mut state, 3, version_command("iris", "d1", 10)).unwrap();
    assert_eq!(
        first,
        Outcome::VersionRegistered {
            version: 1,
            created: true
        }
    );
    assert_eq!(
        second,
        Outcome::VersionRegistered {
            version: 2,
            created: true
        }
    );
    assert_eq!(
        again,
        Outcome::VersionRegistered {
            version: 1,
            created: false
        }
    );
    assert_eq!(state.version("iris", 2).unwrap().parent, Some(1));
    assert_eq!(state.models["iris"].versions.len(), 2);
}

#[test]
fn a_model_name_with_a_slash_is_refused() {
    let mut state = ClusterState::default();
    let refused = apply(&mut state, 1, version_command("a/b", "d1", 10));
    assert!(matches!(refused, Err(Rejected::Invalid(_))));
    assert!(state.models.is_empty());
}

#[test]
fn a_deployment_of_an_unknown_version_is_refused() {
    let mut state = applied(vec![version_command("iris", "d1", 10)]);
    let mut command = deployment_command("iris", "iris", 1);
    if let Command::CreateDeployment { version, .. } = &mut command {
        *version = 7;
    }
    assert_eq!(
        apply(&mut state, 2, command),
        Err(Rejected::UnknownVersion {
            model: "iris".into(),
            version: 7
        })
    );
    assert_eq!(
        apply(&mut state, 3, deployment_command("x", "nope", 1)),
        Err(Rejected::UnknownModel("nope".into()))
    );
    apply(&mut state, 4, deployment_command("iris", "iris", 1)).unwrap();
    assert_eq!(
        apply(&mut state, 5, deployment_command("iris", "iris", 1)),
        Err(Rejected::DeploymentExists("iris".into()))
    );
}

#[test]
fn assigning_a_replica_reserves_memory_and_never_over_commits() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", GIB / 2),
        deployment_command("iris", "iris", 3),
    ]);
    assert_eq!(
        apply(&mut state, 4, assign("iris", 1, 0, GIB / 2)),
        Ok(Outcome::ReplicaAssigned {
            replica: ReplicaId(0)
        })
    );
    apply(&mut state, 5, assign("iris", 1, 0, GIB / 2)).unwrap();
    assert_eq!(
        apply(&mut state, 6, assign("iris", 1, 0, 1)),
        Err(Rejected::InsufficientMemory {
            node: NodeId(1),
            device: DeviceId(0),
            needed_bytes: 1,
            free_bytes: 0,
        })
    );
    assert_eq!(state.reserved_bytes(NodeId(1), DeviceId(0)), GIB);
    assert_eq!(state.replicas.len(), 2);
}

#[test]
fn assigning_beyond_the_replica_count_is_refused() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", 1),
        deployment_command("iris", "iris", 1),
        assign("iris", 1, 0, 1),
    ]);
    assert_eq!(
        apply(&mut state, 5, assign("iris", 1, 0, 1)),
        Err(Rejected::DeploymentSatisfied("iris".into()))
    );
}

#[test]
fn assigning_to_an_unknown_node_or_device_is_refused() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", 1),
        deployment_command("iris", "iris", 2),
    ]);
    assert_eq!(
        apply(&mut state, 4, assign("iris", 2, 0, 1)),
        Err(Rejected::UnknownNode(NodeId(2)))
    );
    assert_eq!(
        apply(&mut state, 5, assign("iris", 1, 3, 1)),
        Err(Rejected::UnknownDevice {
            node: NodeId(1),
            device: DeviceId(3)
        })
    );
    assert_eq!(
        apply(&mut state, 6, assign("nope", 1, 0, 1)),
        Err(Rejected::UnknownDeployment("nope".into()))
    );
}

#[test]
fn marking_a_replica_ready_needs_its_current_epoch() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", 1),
        deployment_command("iris", "iris", 1),
        assign("iris", 1, 0, 1),
    ]);
    let ready = |epoch| Command::SetReplicaState {
        replica: ReplicaId(0),
        epoch,
        state: ReplicaState::Ready,
        failure: None,
    };
    assert_eq!(
        apply(&mut state, 5, ready(0)),
        Err(Rejected::StaleEpoch {
            replica: ReplicaId(0),
            given: 0,
            current: 1
        })
    );
    assert_eq!(apply(&mut state, 6, ready(1)), Ok(Outcome::ReplicaStateSet));
    assert_eq!(state.replicas[&ReplicaId(0)].state, ReplicaState::Ready);
}

#[test]
fn a_failed_replica_frees_its_memory_and_stays_failed() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", GIB),
        deployment_command("iris", "iris", 1),
        assign("iris", 1, 0, GIB),
    ]);
    let set = |state| Command::SetReplicaState {
        replica: ReplicaId(0),
        epoch: 1,
        state,
        failure: Some("weights corrupt".into()),
    };
    apply(&mut state, 5, set(ReplicaState::Failed)).unwrap();
    assert_eq!(state.reserved_bytes(NodeId(1), DeviceId(0)), 0);
    assert_eq!(
        apply(&mut state, 6, set(ReplicaState::Ready)),
        Err(Rejected::ReplicaFailed {
            replica: ReplicaId(0)
        })
    );
    // Its memory can now hold a replacement.
    apply(&mut state, 7, assign("iris", 1, 0, GIB)).unwrap();
}

#[test]
fn a_node_cannot_shrink_a_device_below_its_reservations() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", GIB),
        deployment_command("iris", "iris", 1),
        assign("iris", 1, 0, GIB),
    ]);
    assert_eq!(
        apply(&mut state, 5, node_command(1, &[GIB / 2])),
        Err(Rejected::DeviceShrinksBelowReservations {
            node: NodeId(1),
            device: DeviceId(0),
            reserved_bytes: GIB,
        })
    );
    assert_eq!(state.nodes[&NodeId(1)].devices[0].memory_bytes, GIB);
}

#[test]
fn commands_survive_a_serde_round_trip() {
    let command = version_command("iris", "d1", 10);
    let text = serde_json::to_string(&command).unwrap();
    let back: Command = serde_json::from_str(&text).unwrap();
    assert_eq!(back, command);
}
