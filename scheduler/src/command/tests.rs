//! Unit tests for `apply`: each command's effect and each way it is refused.

use super::*;
use crate::deployment::{ReplicaPolicy, Sharding, VersionWeight};
use crate::types::{BatchingPolicy, DataType, DeviceKind, TensorSpec};
use proptest::prelude::*;

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
        spec: DeploymentSpec::new(name, model, 1, replicas),
    }
}

pub(crate) fn applied(commands: Vec<Command>) -> ClusterState {
    let mut state = ClusterState::default();
    for (index, command) in commands.into_iter().enumerate() {
        apply(&mut state, index as u64 + 1, command).expect("setup command applies");
    }
    state
}

/// Applies `command` at the next index.
pub(crate) fn next(state: &mut ClusterState, command: Command) -> Result<Outcome, Rejected> {
    let index = state.applied_index + 1;
    apply(state, index, command)
}

fn assign(deployment: &str, node: u64, device: u32) -> Command {
    Command::AssignReplica {
        deployment: deployment.into(),
        version: 1,
        shards: vec![ShardPlacement {
            node: NodeId(node),
            device: DeviceId(device),
        }],
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
    let command = Command::CreateDeployment {
        spec: DeploymentSpec::new("iris", "iris", 7, 1),
    };
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
    assert!(state.index_is_consistent());
}

#[test]
fn assigning_a_replica_reserves_memory_and_never_over_commits() {
    let mut state = applied(vec![
        node_command(1, &[GIB + GIB / 4]),
        version_command("iris", "d1", GIB / 2),
        deployment_command("iris", "iris", 3),
    ]);
    assert_eq!(
        apply(&mut state, 4, assign("iris", 1, 0)),
        Ok(Outcome::ReplicaAssigned {
            replica: ReplicaId(0)
        })
    );
    apply(&mut state, 5, assign("iris", 1, 0)).unwrap();
    assert_eq!(
        apply(&mut state, 6, assign("iris", 1, 0)),
        Err(Rejected::InsufficientMemory {
            node: NodeId(1),
            device: DeviceId(0),
            needed_bytes: GIB / 2,
            free_bytes: GIB / 4,
        })
    );
    assert_eq!(state.reserved_bytes(NodeId(1), DeviceId(0)), GIB);
    assert_eq!(state.replicas.len(), 2);
    assert!(state.index_is_consistent());
}

#[test]
fn assigning_beyond_the_replica_count_is_refused() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", 1),
        deployment_command("iris", "iris", 1),
        assign("iris", 1, 0),
    ]);
    assert_eq!(
        apply(&mut state, 5, assign("iris", 1, 0)),
        Err(Rejected::DeploymentSatisfied {
            deployment: "iris".into(),
            version: 1
        })
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
        apply(&mut state, 4, assign("iris", 2, 0)),
        Err(Rejected::UnknownNode(NodeId(2)))
    );
    assert_eq!(
        apply(&mut state, 5, assign("iris", 1, 3)),
        Err(Rejected::UnknownDevice {
            node: NodeId(1),
            device: DeviceId(3)
        })
    );
    assert_eq!(
        apply(&mut state, 6, assign("nope", 1, 0)),
        Err(Rejected::UnknownDeployment("nope".into()))
    );
}

#[test]
fn marking_a_replica_ready_needs_its_current_epoch() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", 1),
        deployment_command("iris", "iris", 1),
        assign("iris", 1, 0),
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
        assign("iris", 1, 0),
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
    // Its memory can now hold the group again, placed at a higher epoch.
    assert_eq!(
        apply(
            &mut state,
            7,
            Command::ReassignReplica {
                group: ReplicaId(0),
                epoch: 1,
                shards: vec![ShardPlacement {
                    node: NodeId(1),
                    device: DeviceId(0)
                }],
            }
        ),
        Ok(Outcome::ReplicaReassigned { epoch: 2 })
    );
    assert_eq!(state.replicas[&ReplicaId(0)].state, ReplicaState::Pending);
    assert_eq!(state.reserved_bytes(NodeId(1), DeviceId(0)), GIB);
}

#[test]
fn a_node_cannot_shrink_a_device_below_its_reservations() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", GIB),
        deployment_command("iris", "iris", 1),
        assign("iris", 1, 0),
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

fn placed(node: u64, device: u32) -> ShardPlacement {
    ShardPlacement {
        node: NodeId(node),
        device: DeviceId(device),
    }
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

#[test]
fn aliases_are_registers_that_answer_their_previous_value() {
    let mut state = applied(vec![
        version_command("iris", "d1", 10),
        version_command("iris", "d2", 10),
    ]);
    let set = |version| Command::SetAlias {
        model: "iris".into(),
        alias: "stable".into(),
        version,
    };
    assert_eq!(
        next(&mut state, set(1)),
        Ok(Outcome::AliasSet { previous: None })
    );
    assert_eq!(
        next(&mut state, set(2)),
        Ok(Outcome::AliasSet { previous: Some(1) })
    );
    assert_eq!(state.models["iris"].aliases["stable"], 2);
    let remove = Command::RemoveAlias {
        model: "iris".into(),
        alias: "stable".into(),
    };
    assert_eq!(
        next(&mut state, remove.clone()),
        Ok(Outcome::AliasRemoved { previous: Some(2) })
    );
    assert_eq!(
        next(&mut state, remove),
        Ok(Outcome::AliasRemoved { previous: None })
    );
    assert!(state.models["iris"].aliases.is_empty());
}

#[test]
fn an_alias_to_an_unknown_version_or_model_is_refused() {
    let mut state = applied(vec![version_command("iris", "d1", 10)]);
    assert_eq!(
        next(
            &mut state,
            Command::SetAlias {
                model: "iris".into(),
                alias: "stable".into(),
                version: 9
            }
        ),
        Err(Rejected::UnknownVersion {
            model: "iris".into(),
            version: 9
        })
    );
    assert_eq!(
        next(
            &mut state,
            Command::RemoveAlias {
                model: "nope".into(),
                alias: "stable".into()
            }
        ),
        Err(Rejected::UnknownModel("nope".into()))
    );
}

#[test]
fn a_deployment_following_an_unset_alias_is_refused() {
    let mut state = applied(vec![version_command("iris", "d1", 10)]);
    let mut spec = DeploymentSpec::new("iris", "iris", 1, 1);
    spec.versions = VersionSelector::Alias("stable".into());
    assert_eq!(
        next(&mut state, Command::CreateDeployment { spec }),
        Err(Rejected::UnknownAlias {
            model: "iris".into(),
            alias: "stable".into()
        })
    );
}

/// Regression: `shoal up` once registered the demo as [model.safetensors, config.json] and
/// a push of the same files lists them by name; the push was refused as a conflict.
#[test]
fn the_same_files_in_another_order_are_the_same_version() {
    let with_files = |names: [&str; 2]| {
        let mut command = version_command("iris", "d1", 10);
        if let Command::RegisterModelVersion { files, .. } = &mut command {
            *files = names
                .iter()
                .map(|name| ArtifactFile {
                    name: (*name).into(),
                    digest: name.len().to_string().repeat(64),
                    size_bytes: 10,
                })
                .collect();
        }
        command
    };
    let mut state = applied(vec![with_files(["model.safetensors", "config.json"])]);
    assert_eq!(
        next(&mut state, with_files(["config.json", "model.safetensors"])),
        Ok(Outcome::VersionRegistered {
            version: 1,
            created: false
        })
    );
}

#[test]
fn a_version_made_from_another_names_it_as_its_parent_and_others_the_newest() {
    let mut state = applied(vec![
        version_command("iris", "d1", 10),
        version_command("iris", "d2", 10),
        version_command("iris", "d3", 10).derived_from(1),
        version_command("iris", "d4", 10),
    ]);
    let parent = |version| state.version("iris", version).and_then(|v| v.parent);
    assert_eq!(
        [parent(1), parent(2), parent(3), parent(4)],
        [None, Some(1), Some(1), Some(3)]
    );
    assert_eq!(
        next(
            &mut state,
            version_command("iris", "d5", 10).derived_from(9)
        ),
        Err(Rejected::UnknownVersion {
            model: "iris".into(),
            version: 9
        })
    );
    assert_eq!(
        next(
            &mut state,
            version_command("other", "d6", 10).derived_from(1)
        ),
        Err(Rejected::UnknownVersion {
            model: "other".into(),
            version: 1
        }),
        "a model with no versions has none to make one from"
    );
    assert!(!state.models.contains_key("other"));
    // The same files again are the version they already are, whatever it was made from.
    assert_eq!(
        next(
            &mut state,
            version_command("iris", "d2", 10).derived_from(3)
        ),
        Ok(Outcome::VersionRegistered {
            version: 2,
            created: false
        })
    );
}

#[test]
fn a_same_digest_with_other_contents_is_a_conflict() {
    let mut state = applied(vec![version_command("iris", "d1", 10)]);
    assert_eq!(
        next(&mut state, version_command("iris", "d1", 11)),
        Err(Rejected::VersionConflict {
            model: "iris".into(),
            version: 1
        })
    );
}

#[test]
fn a_traffic_split_must_name_known_versions_once() {
    let mut state = applied(vec![
        version_command("iris", "d1", 10),
        version_command("iris", "d2", 10),
    ]);
    let split = |weights: Vec<(u32, u32)>| {
        let mut spec = DeploymentSpec::new("iris", "iris", 1, 2);
        spec.versions = VersionSelector::Split(
            weights
                .into_iter()
                .map(|(version, weight)| VersionWeight { version, weight })
                .collect(),
        );
        Command::CreateDeployment { spec }
    };
    assert!(matches!(
        next(&mut state, split(vec![(1, 50), (1, 50)])),
        Err(Rejected::Invalid(_))
    ));
    assert!(matches!(
        next(&mut state, split(vec![(1, 0)])),
        Err(Rejected::Invalid(_))
    ));
    assert!(matches!(
        next(&mut state, split(vec![(1, 50), (3, 50)])),
        Err(Rejected::UnknownVersion { version: 3, .. })
    ));
    next(&mut state, split(vec![(1, 30), (2, 70)])).unwrap();
    assert_eq!(state.deployments["iris"].stable_version, 2);
}

#[test]
fn a_draining_node_stays_draining_when_it_registers_again() {
    let mut state = applied(vec![node_command(1, &[GIB])]);
    let drain = Command::SetNodeStatus {
        node: NodeId(1),
        status: NodeStatus::Draining,
    };
    assert_eq!(
        next(&mut state, drain),
        Ok(Outcome::NodeStatusSet {
            previous: NodeStatus::Ready
        })
    );
    next(&mut state, node_command(1, &[GIB])).unwrap();
    assert_eq!(state.nodes[&NodeId(1)].status, NodeStatus::Draining);
}

#[test]
fn a_down_node_comes_back_ready_when_it_registers_again() {
    let mut state = applied(vec![node_command(1, &[GIB])]);
    next(
        &mut state,
        Command::SetNodeStatus {
            node: NodeId(1),
            status: NodeStatus::Down,
        },
    )
    .unwrap();
    next(&mut state, node_command(1, &[GIB])).unwrap();
    assert_eq!(state.nodes[&NodeId(1)].status, NodeStatus::Ready);
}

#[test]
fn a_node_holding_replicas_cannot_be_removed() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        node_command(2, &[GIB]),
        version_command("iris", "d1", 1),
        deployment_command("iris", "iris", 1),
        assign("iris", 1, 0),
    ]);
    assert_eq!(
        next(&mut state, Command::RemoveNode { node: NodeId(1) }),
        Err(Rejected::NodeNotEmpty {
            node: NodeId(1),
            replicas: 1
        })
    );
    assert_eq!(
        next(&mut state, Command::RemoveNode { node: NodeId(2) }),
        Ok(Outcome::NodeRemoved)
    );
    assert!(!state.nodes.contains_key(&NodeId(2)));
}

#[test]
fn assigning_to_a_node_that_is_not_ready_is_refused() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", 1),
        deployment_command("iris", "iris", 1),
        Command::SetNodeStatus {
            node: NodeId(1),
            status: NodeStatus::Draining,
        },
    ]);
    assert_eq!(
        next(&mut state, assign("iris", 1, 0)),
        Err(Rejected::NodeNotReady(NodeId(1)))
    );
}

#[test]
fn assigning_outside_the_placement_constraints_is_refused() {
    let mut spec = DeploymentSpec::new("iris", "iris", 1, 2);
    spec.placement
        .node_labels
        .insert("gpu".into(), "a100".into());
    let mut state = applied(vec![
        labelled_node(1, &[GIB], &[("gpu", "t4")]),
        labelled_node(2, &[GIB], &[("gpu", "a100")]),
        version_command("iris", "d1", 1),
        Command::CreateDeployment { spec },
    ]);
    assert_eq!(
        next(&mut state, assign("iris", 1, 0)),
        Err(Rejected::ConstraintViolated {
            deployment: "iris".into(),
            node: NodeId(1),
            device: DeviceId(0)
        })
    );
    next(&mut state, assign("iris", 2, 0)).unwrap();
}

#[test]
fn shards_of_a_tensor_parallel_group_must_share_a_node_and_match_the_count() {
    let mut spec = DeploymentSpec::new("llm", "llm", 1, 1);
    spec.sharding = Sharding {
        shards: 2,
        layout: ShardLayout::SameNode,
    };
    let mut state = applied(vec![
        node_command(1, &[GIB, GIB]),
        node_command(2, &[GIB, GIB]),
        version_command("llm", "d1", GIB),
        Command::CreateDeployment { spec },
    ]);
    let group = |shards: Vec<ShardPlacement>| Command::AssignReplica {
        deployment: "llm".into(),
        version: 1,
        shards,
    };
    assert_eq!(
        next(&mut state, group(vec![placed(1, 0)])),
        Err(Rejected::WrongShardCount {
            expected: 2,
            given: 1
        })
    );
    assert!(matches!(
        next(&mut state, group(vec![placed(1, 0), placed(2, 0)])),
        Err(Rejected::Invalid(_))
    ));
    assert!(matches!(
        next(&mut state, group(vec![placed(1, 0), placed(1, 0)])),
        Err(Rejected::Invalid(_))
    ));
    assert_eq!(
        next(&mut state, group(vec![placed(1, 0), placed(1, 1)])),
        Ok(Outcome::ReplicaAssigned {
            replica: ReplicaId(0)
        })
    );
    // Each shard reserves half of the model on its own device, and both share the group.
    assert_eq!(state.reserved_bytes(NodeId(1), DeviceId(0)), GIB / 2);
    assert_eq!(state.reserved_bytes(NodeId(1), DeviceId(1)), GIB / 2);
    assert_eq!(state.replicas[&ReplicaId(1)].group, ReplicaId(0));
    assert_eq!(state.replicas[&ReplicaId(1)].shard, 1);
    assert_eq!(state.group(ReplicaId(0)).count(), 2);
}

#[test]
fn a_reassignment_with_a_stale_epoch_is_refused() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        node_command(2, &[GIB]),
        version_command("iris", "d1", GIB),
        deployment_command("iris", "iris", 1),
        assign("iris", 1, 0),
    ]);
    let reassign = |epoch| Command::ReassignReplica {
        group: ReplicaId(0),
        epoch,
        shards: vec![placed(2, 0)],
    };
    next(&mut state, reassign(1)).unwrap();
    assert_eq!(
        next(&mut state, reassign(1)),
        Err(Rejected::StaleEpoch {
            replica: ReplicaId(0),
            given: 1,
            current: 2
        })
    );
    // The move freed the old device and reserved the new one.
    assert_eq!(state.reserved_bytes(NodeId(1), DeviceId(0)), 0);
    assert_eq!(state.reserved_bytes(NodeId(2), DeviceId(0)), GIB);
    // The old agent's report at epoch 1 is stale now.
    assert!(matches!(
        next(
            &mut state,
            Command::SetReplicaState {
                replica: ReplicaId(0),
                epoch: 1,
                state: ReplicaState::Ready,
                failure: None
            }
        ),
        Err(Rejected::StaleEpoch { .. })
    ));
}

#[test]
fn desired_replicas_outside_the_bounds_are_refused() {
    let mut spec = DeploymentSpec::new("iris", "iris", 1, 2);
    spec.replicas = ReplicaPolicy {
        initial: 2,
        min: 1,
        max: 4,
    };
    let mut state = applied(vec![
        version_command("iris", "d1", 1),
        Command::CreateDeployment { spec },
    ]);
    let set = |replicas| Command::SetDesiredReplicas {
        deployment: "iris".into(),
        replicas,
    };
    assert!(matches!(
        next(&mut state, set(5)),
        Err(Rejected::ReplicasOutOfRange { replicas: 5, .. })
    ));
    assert!(matches!(
        next(&mut state, set(0)),
        Err(Rejected::ReplicasOutOfRange { replicas: 0, .. })
    ));
    assert_eq!(
        next(&mut state, set(4)),
        Ok(Outcome::DesiredReplicasSet { previous: 2 })
    );
}

#[test]
fn an_eviction_lowers_the_wanted_count_but_never_below_the_minimum() {
    let mut spec = DeploymentSpec::new("iris", "iris", 1, 2);
    spec.replicas = ReplicaPolicy {
        initial: 2,
        min: 1,
        max: 2,
    };
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", 1),
        Command::CreateDeployment { spec },
        assign("iris", 1, 0),
        assign("iris", 1, 0),
    ]);
    let evict = |group| Command::RemoveReplica {
        group: ReplicaId(group),
        epoch: 1,
        reason: RemovalReason::Evicted {
            for_deployment: "other".into(),
            last_request_ms: None,
        },
    };
    next(&mut state, evict(0)).unwrap();
    assert_eq!(state.deployments["iris"].replicas_desired, 1);
    assert!(matches!(
        next(&mut state, evict(1)),
        Err(Rejected::ReplicasOutOfRange { .. })
    ));
    assert_eq!(state.replicas.len(), 1);
}

#[test]
fn updating_a_deployment_keeps_its_model_and_clamps_its_count() {
    let mut state = applied(vec![
        version_command("iris", "d1", 1),
        version_command("other", "d2", 1),
        deployment_command("iris", "iris", 3),
    ]);
    let mut moved = DeploymentSpec::new("iris", "other", 1, 3);
    assert!(matches!(
        next(
            &mut state,
            Command::UpdateDeployment {
                spec: moved.clone()
            }
        ),
        Err(Rejected::Invalid(_))
    ));
    moved.model = "iris".into();
    moved.replicas = ReplicaPolicy::fixed(1);
    assert_eq!(
        next(&mut state, Command::UpdateDeployment { spec: moved }),
        Ok(Outcome::DeploymentUpdated)
    );
    assert_eq!(state.deployments["iris"].replicas_desired, 1);
}

#[test]
fn deleting_a_deployment_removes_its_replicas_and_frees_their_memory() {
    let mut state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", GIB / 2),
        deployment_command("iris", "iris", 2),
        assign("iris", 1, 0),
        assign("iris", 1, 0),
    ]);
    assert_eq!(
        next(
            &mut state,
            Command::DeleteDeployment {
                name: "iris".into()
            }
        ),
        Ok(Outcome::DeploymentDeleted {
            replicas_removed: 2
        })
    );
    assert!(state.replicas.is_empty());
    assert_eq!(state.reserved_bytes(NodeId(1), DeviceId(0)), 0);
    assert!(state.index_is_consistent());
}

#[test]
fn rollout_steps_must_name_the_rollout_and_follow_its_phases() {
    let mut spec = DeploymentSpec::new("iris", "iris", 1, 1);
    spec.rollout.kind = RolloutKind::BlueGreen {
        keep_previous_ms: 1_000,
    };
    let mut state = applied(vec![
        version_command("iris", "d1", 1),
        version_command("iris", "d2", 1),
        Command::CreateDeployment { spec },
    ]);
    assert!(matches!(
        next(
            &mut state,
            Command::CompleteRollout {
                deployment: "iris".into(),
                version: 2
            }
        ),
        Err(Rejected::NoRollout(_))
    ));
    next(
        &mut state,
        Command::StartRollout {
            deployment: "iris".into(),
            version: 2,
            at_ms: 5,
        },
    )
    .unwrap();
    assert_eq!(
        state.deployments["iris"].rollout.map(|r| r.phase),
        Some(RolloutPhase::GreenWarming)
    );
    assert!(matches!(
        next(
            &mut state,
            Command::StartRollout {
                deployment: "iris".into(),
                version: 2,
                at_ms: 6,
            }
        ),
        Err(Rejected::RolloutInProgress { .. })
    ));
    // Blue-green cannot complete before it switched.
    assert!(matches!(
        next(
            &mut state,
            Command::CompleteRollout {
                deployment: "iris".into(),
                version: 2
            }
        ),
        Err(Rejected::InvalidTransition { .. })
    ));
    assert!(matches!(
        next(
            &mut state,
            Command::AdvanceRollout {
                deployment: "iris".into(),
                version: 3,
                phase: RolloutPhase::Switched { at_ms: 7 }
            }
        ),
        Err(Rejected::RolloutMismatch { .. })
    ));
    next(
        &mut state,
        Command::AdvanceRollout {
            deployment: "iris".into(),
            version: 2,
            phase: RolloutPhase::Switched { at_ms: 7 },
        },
    )
    .unwrap();
    next(
        &mut state,
        Command::RollbackRollout {
            deployment: "iris".into(),
            version: 2,
            reason: RollbackReason::Operator,
        },
    )
    .unwrap();
    let deployment = &state.deployments["iris"];
    assert_eq!(deployment.stable_version, 1);
    assert_eq!(deployment.rollout, None);
    assert_eq!(deployment.blocked_version, Some(2));
}

#[test]
fn a_state_survives_a_serde_round_trip_with_its_index_rebuilt() {
    let state = applied(vec![
        node_command(1, &[GIB]),
        version_command("iris", "d1", GIB / 2),
        deployment_command("iris", "iris", 1),
        assign("iris", 1, 0),
    ]);
    let text = serde_json::to_string(&state).unwrap();
    let back: ClusterState = serde_json::from_str(&text).unwrap();
    assert_eq!(back, state);
    assert_eq!(back.reserved_bytes(NodeId(1), DeviceId(0)), GIB / 2);
}

/// Commands over a tiny universe (two nodes, two models, two deployments), so that random
/// sequences hit real preconditions rather than only unknown names.
fn any_command() -> impl Strategy<Value = Command> {
    let node = 1u64..=2;
    let name = prop::sample::select(vec!["a", "b"]);
    let status = prop::sample::select(vec![
        NodeStatus::Ready,
        NodeStatus::Draining,
        NodeStatus::Down,
    ]);
    let replica_state = prop::sample::select(vec![
        ReplicaState::Pending,
        ReplicaState::Loading,
        ReplicaState::Ready,
        ReplicaState::Draining,
        ReplicaState::Failed,
    ]);
    let phase = prop::sample::select(vec![
        RolloutPhase::CanaryWarming,
        RolloutPhase::CanaryObserving { since_ms: 1 },
        RolloutPhase::Rolling,
        RolloutPhase::GreenWarming,
        RolloutPhase::Switched { at_ms: 1 },
    ]);
    let shards = prop::collection::vec((node.clone(), 0u32..3), 0..3).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(node, device)| placed(node, device))
            .collect::<Vec<_>>()
    });
    prop_oneof![
        (node.clone(), prop::collection::vec(0u64..4, 0..3)).prop_map(|(id, gib)| {
            let bytes: Vec<u64> = gib.iter().map(|g| g * GIB).collect();
            node_command(id, &bytes)
        }),
        (name.clone(), 0u32..3, 0u64..3).prop_map(|(model, digest, gib)| version_command(
            model,
            &format!("d{digest}"),
            gib * GIB
        )),
        (name.clone(), name.clone(), 1u32..3, 0u32..4, 1u32..3).prop_map(
            |(deployment, model, version, replicas, shards)| {
                let mut spec = DeploymentSpec::new(deployment, model, version, replicas);
                spec.sharding.shards = shards;
                Command::CreateDeployment { spec }
            }
        ),
        (name.clone(), 1u32..3, shards.clone()).prop_map(|(deployment, version, shards)| {
            Command::AssignReplica {
                deployment: deployment.into(),
                version,
                shards,
            }
        }),
        (0u64..6, 0u64..4, replica_state).prop_map(|(replica, epoch, state)| {
            Command::SetReplicaState {
                replica: ReplicaId(replica),
                epoch,
                state,
                failure: None,
            }
        }),
        (node.clone(), status).prop_map(|(node, status)| Command::SetNodeStatus {
            node: NodeId(node),
            status
        }),
        node.prop_map(|node| Command::RemoveNode { node: NodeId(node) }),
        (name.clone(), 0u32..3).prop_map(|(model, version)| Command::SetAlias {
            model: model.into(),
            alias: "stable".into(),
            version
        }),
        name.clone().prop_map(|model| Command::RemoveAlias {
            model: model.into(),
            alias: "stable".into()
        }),
        (name.clone(), 0u32..5).prop_map(|(deployment, replicas)| {
            Command::SetDesiredReplicas {
                deployment: deployment.into(),
                replicas,
            }
        }),
        name.clone()
            .prop_map(|deployment| Command::DeleteDeployment {
                name: deployment.into()
            }),
        (0u64..6, 0u64..4, shards).prop_map(|(group, epoch, shards)| {
            Command::ReassignReplica {
                group: ReplicaId(group),
                epoch,
                shards,
            }
        }),
        (0u64..6, 0u64..4, any::<bool>()).prop_map(|(group, epoch, evicted)| {
            Command::RemoveReplica {
                group: ReplicaId(group),
                epoch,
                reason: if evicted {
                    RemovalReason::Evicted {
                        for_deployment: "a".into(),
                        last_request_ms: None,
                    }
                } else {
                    RemovalReason::Surplus
                },
            }
        }),
        (name.clone(), 1u32..3).prop_map(|(deployment, version)| Command::StartRollout {
            deployment: deployment.into(),
            version,
            at_ms: 1
        }),
        (name.clone(), 1u32..3, phase).prop_map(|(deployment, version, phase)| {
            Command::AdvanceRollout {
                deployment: deployment.into(),
                version,
                phase,
            }
        }),
        (name.clone(), 1u32..3).prop_map(|(deployment, version)| Command::CompleteRollout {
            deployment: deployment.into(),
            version
        }),
        (name, 1u32..3).prop_map(|(deployment, version)| Command::RollbackRollout {
            deployment: deployment.into(),
            version,
            reason: RollbackReason::Operator
        }),
    ]
}

proptest! {
    #[test]
    fn apply_never_panics_and_a_rejected_command_changes_nothing(
        commands in prop::collection::vec(any_command(), 0..60)
    ) {
        let mut state = ClusterState::default();
        for command in commands {
            let before = state.clone();
            let result = next(&mut state, command.clone());
            if result.is_err() {
                let mut unchanged = before;
                unchanged.applied_index = state.applied_index;
                prop_assert_eq!(&unchanged, &state, "{:?} was refused but changed the state", command);
            }
            prop_assert!(state.index_is_consistent(), "index out of step after {:?}", command);
            for node in state.nodes.values() {
                for device in &node.devices {
                    prop_assert!(state.reserved_bytes(node.id, device.id) <= device.memory_bytes);
                }
            }
        }
    }
}

#[test]
fn batching_defaults_are_valid_for_a_deployment() {
    let spec = DeploymentSpec::new("iris", "iris", 1, 1);
    assert_eq!(spec.batching, BatchingPolicy::default());
    let mut state = applied(vec![version_command("iris", "d1", 1)]);
    next(&mut state, Command::CreateDeployment { spec }).unwrap();
}

#[test]
fn a_server_address_is_recorded_and_replaced() {
    let mut state = ClusterState::default();
    let register = |address: &str| Command::RegisterServer {
        id: 2,
        http_address: address.into(),
    };
    assert_eq!(
        apply(&mut state, 1, register("127.0.0.1:7072")),
        Ok(Outcome::ServerRegistered { previous: None })
    );
    assert_eq!(
        apply(&mut state, 2, register("127.0.0.1:8072")),
        Ok(Outcome::ServerRegistered {
            previous: Some("127.0.0.1:7072".into())
        })
    );
    assert!(matches!(
        apply(&mut state, 3, register("nowhere")),
        Err(Rejected::Invalid(_))
    ));
    assert_eq!(state.servers[&2], "127.0.0.1:8072");
}
