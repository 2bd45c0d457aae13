//! `ClusterState`: everything the control plane agrees on, and read-only queries over it.

use crate::types::{
    ArtifactFile, BatchingPolicy, DeviceId, DeviceKind, NodeId, ReplicaId, Signature,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The replicated state. Ordered maps keep iteration, and so every decision, deterministic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Raft index of the last command applied; doubles as the state's revision.
    pub applied_index: u64,
    pub nodes: BTreeMap<NodeId, Node>,
    pub models: BTreeMap<String, Model>,
    pub deployments: BTreeMap<String, Deployment>,
    pub replicas: BTreeMap<ReplicaId, Replica>,
    /// The id the next assigned replica gets.
    pub next_replica_id: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    Ready,
    Draining,
    Down,
}

/// A host running a deploy agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    /// Where the agent's data-plane listens, `host:port`.
    pub address: String,
    pub devices: Vec<Device>,
    pub labels: BTreeMap<String, String>,
    pub status: NodeStatus,
}

/// One device's memory as the agent reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: DeviceId,
    pub kind: DeviceKind,
    pub memory_bytes: u64,
}

/// A model and its immutable versions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub name: String,
    pub versions: BTreeMap<u32, ModelVersion>,
    /// Alias (`stable`, `canary`, …) to version number.
    pub aliases: BTreeMap<String, u32>,
}

/// One immutable version of a model. Its identity is the digest of its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub version: u32,
    pub manifest_digest: String,
    pub files: Vec<ArtifactFile>,
    /// Weight format, e.g. `safetensors`.
    pub format: String,
    /// Bytes a loaded replica is expected to occupy on its device.
    pub memory_bytes: u64,
    pub signature: Signature,
    pub parent: Option<u32>,
    /// Milliseconds since the Unix epoch, as given by the proposer.
    pub created_at_ms: u64,
}

impl ModelVersion {
    /// Sum of the sizes of the version's files.
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|file| file.size_bytes).sum()
    }
}

/// A declared wish: run `replicas` copies of one model version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub name: String,
    pub model: String,
    pub version: u32,
    pub replicas: u32,
    pub batching: BatchingPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Assigned to a node; the agent has not started it yet.
    Pending,
    /// The agent is fetching and loading its weights.
    Loading,
    /// Serving.
    Ready,
    /// Finishing in-flight requests before it stops.
    Draining,
    /// Gave up; its memory is free again. Terminal.
    Failed,
}

impl ReplicaState {
    /// Whether the replica still holds its device memory.
    pub fn holds_memory(self) -> bool {
        !matches!(self, ReplicaState::Failed)
    }
}

/// One placed copy of a deployment's model version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub id: ReplicaId,
    pub deployment: String,
    pub model: String,
    pub version: u32,
    pub node: NodeId,
    pub device: DeviceId,
    pub reserved_bytes: u64,
    pub state: ReplicaState,
    /// Bumped whenever the replica is reassigned; reports carrying an older epoch are stale.
    pub epoch: u64,
    /// Why it failed, when it did.
    pub failure: Option<String>,
}

impl ClusterState {
    /// Bytes reserved on one device by replicas that still hold memory.
    pub fn reserved_bytes(&self, node: NodeId, device: DeviceId) -> u64 {
        self.replicas
            .values()
            .filter(|replica| replica.node == node && replica.device == device)
            .filter(|replica| replica.state.holds_memory())
            .map(|replica| replica.reserved_bytes)
            .sum()
    }

    /// Reserved bytes of every device that has any, in one pass over the replicas.
    pub fn reserved_by_device(&self) -> BTreeMap<(NodeId, DeviceId), u64> {
        let mut reserved = BTreeMap::new();
        for replica in self.replicas.values() {
            if replica.state.holds_memory() {
                *reserved.entry((replica.node, replica.device)).or_insert(0) +=
                    replica.reserved_bytes;
            }
        }
        reserved
    }

    /// Replicas of one deployment, in id order.
    pub fn replicas_of<'a>(&'a self, deployment: &'a str) -> impl Iterator<Item = &'a Replica> {
        self.replicas
            .values()
            .filter(move |replica| replica.deployment == deployment)
    }

    /// Replicas assigned to one node, in id order.
    pub fn replicas_on(&self, node: NodeId) -> impl Iterator<Item = &Replica> {
        self.replicas
            .values()
            .filter(move |replica| replica.node == node)
    }

    /// A model version by model name and number.
    pub fn version(&self, model: &str, version: u32) -> Option<&ModelVersion> {
        self.models.get(model)?.versions.get(&version)
    }
}
