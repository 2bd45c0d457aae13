//! The closed set of commands and `apply`, the only function that mutates `ClusterState`.
//!
//! `apply` re-checks every precondition against the state it is given, because a command
//! was decided on an older state than the one it is applied to: a plan that raced another
//! plan is rejected here, not half-applied.

use crate::state::{
    ClusterState, Deployment, Device, Model, ModelVersion, Node, NodeStatus, Replica, ReplicaState,
};
use crate::types::{ArtifactFile, BatchingPolicy, DeviceId, NodeId, ReplicaId, Signature};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Every change the control plane can agree on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Add a node, or refresh the address, devices and labels of a known one.
    RegisterNode {
        id: NodeId,
        address: String,
        devices: Vec<Device>,
        labels: BTreeMap<String, String>,
    },
    /// Add a version to a model (creating the model). A manifest digest the model already
    /// has returns the existing version instead: versions are content-addressed.
    RegisterModelVersion {
        model: String,
        manifest_digest: String,
        files: Vec<ArtifactFile>,
        format: String,
        memory_bytes: u64,
        signature: Signature,
        created_at_ms: u64,
    },
    CreateDeployment {
        name: String,
        model: String,
        version: u32,
        replicas: u32,
        batching: BatchingPolicy,
    },
    /// Place one more replica of a deployment on a device, reserving its memory.
    AssignReplica {
        deployment: String,
        node: NodeId,
        device: DeviceId,
        reserved_bytes: u64,
    },
    /// An agent's report on a replica it runs.
    SetReplicaState {
        replica: ReplicaId,
        epoch: u64,
        state: ReplicaState,
        failure: Option<String>,
    },
}

/// What an accepted command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    NodeRegistered { created: bool },
    VersionRegistered { version: u32, created: bool },
    DeploymentCreated,
    ReplicaAssigned { replica: ReplicaId },
    ReplicaStateSet,
}

/// Why a command was refused. The state is unchanged when a command is rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejected {
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    #[error("node {node} has no device {device}")]
    UnknownDevice { node: NodeId, device: DeviceId },
    #[error("unknown model {0:?}")]
    UnknownModel(String),
    #[error("model {model:?} has no version {version}")]
    UnknownVersion { model: String, version: u32 },
    #[error("unknown deployment {0:?}")]
    UnknownDeployment(String),
    #[error("unknown replica {0}")]
    UnknownReplica(ReplicaId),
    #[error("deployment {0:?} already exists")]
    DeploymentExists(String),
    #[error("deployment {0:?} already has all its replicas")]
    DeploymentSatisfied(String),
    #[error("node {0} is not ready")]
    NodeNotReady(NodeId),
    #[error("{node} {device} has {free_bytes} bytes free, {needed_bytes} needed")]
    InsufficientMemory {
        node: NodeId,
        device: DeviceId,
        needed_bytes: u64,
        free_bytes: u64,
    },
    #[error(
        "device {device} of {node} would shrink below the {reserved_bytes} bytes reserved on it"
    )]
    DeviceShrinksBelowReservations {
        node: NodeId,
        device: DeviceId,
        reserved_bytes: u64,
    },
    #[error("stale report for {replica}: epoch {given}, current {current}")]
    StaleEpoch {
        replica: ReplicaId,
        given: u64,
        current: u64,
    },
    #[error("{replica} is failed; failed is terminal")]
    ReplicaFailed { replica: ReplicaId },
}

/// Applies one committed command at raft `index`. On `Err` the state is untouched except
/// for `applied_index`, which always advances: a rejected entry is still applied.
pub fn apply(state: &mut ClusterState, index: u64, command: Command) -> Result<Outcome, Rejected> {
    debug_assert!(
        index > state.applied_index || index == 0,
        "entries apply in order"
    );
    state.applied_index = index;
    match command {
        Command::RegisterNode {
            id,
            address,
            devices,
            labels,
        } => register_node(state, id, address, devices, labels),
        Command::RegisterModelVersion {
            model,
            manifest_digest,
            files,
            format,
            memory_bytes,
            signature,
            created_at_ms,
        } => {
            validate_name("model", &model)?;
            if manifest_digest.is_empty() {
                return Err(Rejected::Invalid("manifest digest is empty".into()));
            }
            let entry = state.models.entry(model.clone()).or_insert_with(|| Model {
                name: model,
                versions: BTreeMap::new(),
                aliases: BTreeMap::new(),
            });
            if let Some(existing) = entry
                .versions
                .values()
                .find(|version| version.manifest_digest == manifest_digest)
            {
                return Ok(Outcome::VersionRegistered {
                    version: existing.version,
                    created: false,
                });
            }
            let parent = entry.versions.keys().next_back().copied();
            let version = parent.map_or(1, |latest| latest + 1);
            entry.versions.insert(
                version,
                ModelVersion {
                    version,
                    manifest_digest,
                    files,
                    format,
                    memory_bytes,
                    signature,
                    parent,
                    created_at_ms,
                },
            );
            Ok(Outcome::VersionRegistered {
                version,
                created: true,
            })
        }
        Command::CreateDeployment {
            name,
            model,
            version,
            replicas,
            batching,
        } => {
            validate_name("deployment", &name)?;
            if batching.batch_size_max == 0 || batching.queue_capacity == 0 {
                return Err(Rejected::Invalid(
                    "batch size and queue capacity must be at least 1".into(),
                ));
            }
            if state.deployments.contains_key(&name) {
                return Err(Rejected::DeploymentExists(name));
            }
            let Some(known) = state.models.get(&model) else {
                return Err(Rejected::UnknownModel(model));
            };
            if !known.versions.contains_key(&version) {
                return Err(Rejected::UnknownVersion { model, version });
            }
            state.deployments.insert(
                name.clone(),
                Deployment {
                    name,
                    model,
                    version,
                    replicas,
                    batching,
                },
            );
            Ok(Outcome::DeploymentCreated)
        }
        Command::AssignReplica {
            deployment,
            node,
            device,
            reserved_bytes,
        } => assign_replica(state, deployment, node, device, reserved_bytes),
        Command::SetReplicaState {
            replica,
            epoch,
            state: new_state,
            failure,
        } => {
            let Some(current) = state.replicas.get_mut(&replica) else {
                return Err(Rejected::UnknownReplica(replica));
            };
            if current.epoch != epoch {
                return Err(Rejected::StaleEpoch {
                    replica,
                    given: epoch,
                    current: current.epoch,
                });
            }
            if current.state == ReplicaState::Failed {
                return Err(Rejected::ReplicaFailed { replica });
            }
            current.state = new_state;
            current.failure = failure;
            Ok(Outcome::ReplicaStateSet)
        }
    }
}

fn validate_name(what: &str, name: &str) -> Result<(), Rejected> {
    /// Names appear in URLs and metric labels: keep them short and plain.
    const NAME_LENGTH_MAX: usize = 64;
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > NAME_LENGTH_MAX || !plain {
        return Err(Rejected::Invalid(format!(
            "{what} name {name:?} must be 1-{NAME_LENGTH_MAX} characters of [A-Za-z0-9._-]"
        )));
    }
    Ok(())
}

fn register_node(
    state: &mut ClusterState,
    id: NodeId,
    address: String,
    devices: Vec<Device>,
    labels: BTreeMap<String, String>,
) -> Result<Outcome, Rejected> {
    for (position, device) in devices.iter().enumerate() {
        if device.id.0 as usize != position {
            return Err(Rejected::Invalid(format!(
                "device ids must be 0..n in order; found {} at position {position}",
                device.id
            )));
        }
    }
    // A re-registering node may not shrink a device below what is already reserved on it.
    for replica in state.replicas_on(id).filter(|r| r.state.holds_memory()) {
        let capacity = devices
            .get(replica.device.0 as usize)
            .map_or(0, |device| device.memory_bytes);
        let reserved_bytes = state.reserved_bytes(id, replica.device);
        if capacity < reserved_bytes {
            return Err(Rejected::DeviceShrinksBelowReservations {
                node: id,
                device: replica.device,
                reserved_bytes,
            });
        }
    }
    let created = !state.nodes.contains_key(&id);
    state.nodes.insert(
        id,
        Node {
            id,
            address,
            devices,
            labels,
            status: NodeStatus::Ready,
        },
    );
    Ok(Outcome::NodeRegistered { created })
}

fn assign_replica(
    state: &mut ClusterState,
    deployment: String,
    node: NodeId,
    device: DeviceId,
    reserved_bytes: u64,
) -> Result<Outcome, Rejected> {
    let Some(wanted) = state.deployments.get(&deployment) else {
        return Err(Rejected::UnknownDeployment(deployment));
    };
    let live = state
        .replicas_of(&deployment)
        .filter(|replica| replica.state.holds_memory())
        .count();
    if live >= wanted.replicas as usize {
        return Err(Rejected::DeploymentSatisfied(deployment));
    }
    let Some(target) = state.nodes.get(&node) else {
        return Err(Rejected::UnknownNode(node));
    };
    if target.status != NodeStatus::Ready {
        return Err(Rejected::NodeNotReady(node));
    }
    let Some(capacity) = target
        .devices
        .get(device.0 as usize)
        .map(|d| d.memory_bytes)
    else {
        return Err(Rejected::UnknownDevice { node, device });
    };
    let free_bytes = capacity.saturating_sub(state.reserved_bytes(node, device));
    if reserved_bytes > free_bytes {
        return Err(Rejected::InsufficientMemory {
            node,
            device,
            needed_bytes: reserved_bytes,
            free_bytes,
        });
    }
    let id = ReplicaId(state.next_replica_id);
    state.next_replica_id += 1;
    let (model, version) = (wanted.model.clone(), wanted.version);
    state.replicas.insert(
        id,
        Replica {
            id,
            deployment,
            model,
            version,
            node,
            device,
            reserved_bytes,
            state: ReplicaState::Pending,
            epoch: 1,
            failure: None,
        },
    );
    Ok(Outcome::ReplicaAssigned { replica: id })
}

#[cfg(test)]
pub(crate) mod tests;
