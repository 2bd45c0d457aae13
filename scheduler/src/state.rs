//! `ClusterState`: everything the control plane agrees on, and read-only queries over it.
//!
//! Replicas are changed only through the crate-private mutators at the bottom of this file,
//! which keep a derived index (reserved bytes per device, replica groups per deployment,
//! replicas per node) in step. The index is never serialized: it is rebuilt when a state is
//! decoded, so a snapshot holds each fact once.

use crate::deployment::Deployment;
use crate::types::{
    ArtifactFile, DeviceId, DeviceKind, NodeId, ReplicaId, ShardPlacement, Signature,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The replicated state. Ordered maps keep iteration, and so every decision, deterministic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "StateData")]
pub struct ClusterState {
    /// Raft index of the last command applied; doubles as the state's revision.
    pub applied_index: u64,
    pub nodes: BTreeMap<NodeId, Node>,
    pub models: BTreeMap<String, Model>,
    pub deployments: BTreeMap<String, Deployment>,
    /// Every replica, one record per shard. Read freely; change only through `apply`.
    pub replicas: BTreeMap<ReplicaId, Replica>,
    /// The id the next assigned replica gets.
    pub next_replica_id: u64,
    /// HTTP address of each control-plane server, by raft id.
    pub servers: BTreeMap<u64, String>,
    #[serde(skip)]
    index: Index,
}

/// Facts derived from `replicas`, kept in step by the mutators so that `apply` and `plan`
/// never scan every replica to answer a question about one device or one deployment.
#[derive(Clone, Debug, Default, PartialEq)]
struct Index {
    /// Bytes held on each device by replicas that still hold memory. No zero entries.
    reserved_bytes: BTreeMap<(NodeId, DeviceId), u64>,
    /// Group ids (the id of each group's shard 0) of each deployment.
    groups: BTreeMap<String, BTreeSet<ReplicaId>>,
    /// Replica ids on each node.
    on_node: BTreeMap<NodeId, BTreeSet<ReplicaId>>,
}

/// The serialized form of `ClusterState`: the same fields without the index.
#[derive(Deserialize)]
struct StateData {
    applied_index: u64,
    nodes: BTreeMap<NodeId, Node>,
    models: BTreeMap<String, Model>,
    deployments: BTreeMap<String, Deployment>,
    replicas: BTreeMap<ReplicaId, Replica>,
    next_replica_id: u64,
    servers: BTreeMap<u64, String>,
}

impl From<StateData> for ClusterState {
    fn from(data: StateData) -> Self {
        let mut state = ClusterState {
            applied_index: data.applied_index,
            nodes: data.nodes,
            models: data.models,
            deployments: data.deployments,
            replicas: data.replicas,
            next_replica_id: data.next_replica_id,
            servers: data.servers,
            index: Index::default(),
        };
        state.index = Index::build(&state.replicas);
        state
    }
}

impl Index {
    fn build(replicas: &BTreeMap<ReplicaId, Replica>) -> Index {
        let mut index = Index::default();
        for replica in replicas.values() {
            index.add(replica);
        }
        index
    }

    fn add(&mut self, replica: &Replica) {
        if replica.state.holds_memory() {
            *self
                .reserved_bytes
                .entry((replica.node, replica.device))
                .or_insert(0) += replica.reserved_bytes;
        }
        if replica.shard == 0 {
            self.groups
                .entry(replica.deployment.clone())
                .or_default()
                .insert(replica.id);
        }
        self.on_node
            .entry(replica.node)
            .or_default()
            .insert(replica.id);
    }

    fn remove(&mut self, replica: &Replica) {
        if replica.state.holds_memory() {
            let key = (replica.node, replica.device);
            if let Some(bytes) = self.reserved_bytes.get_mut(&key) {
                *bytes = bytes.saturating_sub(replica.reserved_bytes);
                if *bytes == 0 {
                    self.reserved_bytes.remove(&key);
                }
            }
        }
        if replica.shard == 0
            && let Some(groups) = self.groups.get_mut(&replica.deployment)
        {
            groups.remove(&replica.id);
            if groups.is_empty() {
                self.groups.remove(&replica.deployment);
            }
        }
        if let Some(ids) = self.on_node.get_mut(&replica.node) {
            ids.remove(&replica.id);
            if ids.is_empty() {
                self.on_node.remove(&replica.node);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Takes new replicas.
    Ready,
    /// Takes no new replicas; its replicas move elsewhere, new copy first.
    Draining,
    /// Lost: its replicas are reassigned elsewhere.
    Down,
}

/// A host running a deploy agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    /// Where the agent's data-plane listens, `host:port`.
    pub address: String,
    pub devices: Vec<Device>,
    /// Free-form labels matched by placement constraints; the zone is one of them.
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
    /// Bytes a loaded copy of the whole model is expected to occupy on devices. A deployment
    /// that shards the model reserves an even share of this on each shard's device.
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
    /// Gave up; its memory is free again. Only a reassignment brings it back.
    Failed,
}

impl ReplicaState {
    /// Whether the replica still holds its device memory.
    pub fn holds_memory(self) -> bool {
        !matches!(self, ReplicaState::Failed)
    }
}

/// One shard of one placed copy of a deployment's model version. An unsharded copy is a
/// group of one; the shards of a group share its id (`group`), version and epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub id: ReplicaId,
    /// The id of shard 0 of this replica's group; equal to `id` for an unsharded replica.
    pub group: ReplicaId,
    /// Position of this shard in its group: 0..shards, also its pipeline stage.
    pub shard: u32,
    pub deployment: String,
    pub model: String,
    pub version: u32,
    pub node: NodeId,
    pub device: DeviceId,
    pub reserved_bytes: u64,
    pub state: ReplicaState,
    /// Starts at 1 and grows by one whenever the group is reassigned; reports carrying an
    /// older epoch are stale, so a slot never names two placements with one epoch.
    pub epoch: u64,
    /// Why it failed, when it did.
    pub failure: Option<String>,
}

impl ClusterState {
    /// Bytes reserved on one device by replicas that still hold memory.
    pub fn reserved_bytes(&self, node: NodeId, device: DeviceId) -> u64 {
        self.index
            .reserved_bytes
            .get(&(node, device))
            .copied()
            .unwrap_or(0)
    }

    /// Reserved bytes of every device that has any.
    pub fn reserved_by_device(&self) -> &BTreeMap<(NodeId, DeviceId), u64> {
        &self.index.reserved_bytes
    }

    /// Bytes still free on one device; zero for an unknown device.
    pub fn free_bytes(&self, node: NodeId, device: DeviceId) -> u64 {
        self.device(node, device).map_or(0, |known| {
            known
                .memory_bytes
                .saturating_sub(self.reserved_bytes(node, device))
        })
    }

    /// A device by node and id.
    pub fn device(&self, node: NodeId, device: DeviceId) -> Option<&Device> {
        self.nodes.get(&node)?.devices.get(device.0 as usize)
    }

    /// Replicas (every shard) of one deployment, in id order.
    pub fn replicas_of<'a>(&'a self, deployment: &str) -> impl Iterator<Item = &'a Replica> {
        self.group_ids_of(deployment)
            .flat_map(move |group| self.group(group))
    }

    /// The group ids of one deployment, in id order.
    pub fn group_ids_of<'a>(&'a self, deployment: &str) -> impl Iterator<Item = ReplicaId> + 'a {
        self.index
            .groups
            .get(deployment)
            .into_iter()
            .flat_map(|groups| groups.iter().copied())
    }

    /// The shards of one group, shard 0 first. Empty for an unknown group.
    pub fn group(&self, group: ReplicaId) -> impl Iterator<Item = &Replica> {
        // `apply` gives the shards of a group consecutive ids starting at the group id.
        self.replicas
            .range(group..)
            .map(|(_, replica)| replica)
            .take_while(move |replica| replica.group == group)
    }

    /// Replicas assigned to one node, in id order.
    pub fn replicas_on(&self, node: NodeId) -> impl Iterator<Item = &Replica> {
        self.index
            .on_node
            .get(&node)
            .into_iter()
            .flat_map(|ids| ids.iter())
            .filter_map(|id| self.replicas.get(id))
    }

    /// A model version by model name and number.
    pub fn version(&self, model: &str, version: u32) -> Option<&ModelVersion> {
        self.models.get(model)?.versions.get(&version)
    }

    /// Whether the derived index matches the replicas; for tests and debug assertions.
    pub fn index_is_consistent(&self) -> bool {
        self.index == Index::build(&self.replicas)
    }

    pub(crate) fn insert_replica(&mut self, replica: Replica) {
        self.index.add(&replica);
        self.replicas.insert(replica.id, replica);
    }

    pub(crate) fn remove_replica(&mut self, id: ReplicaId) -> Option<Replica> {
        let replica = self.replicas.remove(&id)?;
        self.index.remove(&replica);
        Some(replica)
    }

    /// Changes one replica through `change`, keeping the index in step.
    pub(crate) fn update_replica(&mut self, id: ReplicaId, change: impl FnOnce(&mut Replica)) {
        if let Some(replica) = self.replicas.get_mut(&id) {
            self.index.remove(replica);
            change(replica);
            self.index.add(replica);
        }
    }

    /// Moves a group's shards to `placements` (one per shard, in shard order), sets them
    /// Pending at `epoch`.
    pub(crate) fn move_group(
        &mut self,
        group: ReplicaId,
        placements: &[ShardPlacement],
        epoch: u64,
    ) {
        let ids: Vec<ReplicaId> = self.group(group).map(|replica| replica.id).collect();
        for (id, placement) in ids.into_iter().zip(placements) {
            self.update_replica(id, |replica| {
                replica.node = placement.node;
                replica.device = placement.device;
                replica.epoch = epoch;
                replica.state = ReplicaState::Pending;
                replica.failure = None;
            });
        }
    }
}

/// One replica group as the controllers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupView {
    pub id: ReplicaId,
    pub version: u32,
    pub epoch: u64,
    pub shards: u32,
    /// A shard failed, or sits on a node that is down or gone: the whole group must be
    /// placed again.
    pub needs_reassignment: bool,
    /// Healthy, but a shard sits on a draining node: the group is to be replaced.
    pub on_draining_node: bool,
    /// Every shard is ready on a node that is not down: the group serves.
    pub ready: bool,
}

impl GroupView {
    /// Whether the group counts towards its version's target: it is not on its way out
    /// (on a draining node, or shaped for a sharding the deployment no longer asks for).
    pub fn settled(&self, shards_wanted: u32) -> bool {
        !self.on_draining_node && self.shards == shards_wanted
    }
}

impl ClusterState {
    /// How one group stands; `None` for an id that is not a group's.
    pub fn group_view(&self, group: ReplicaId) -> Option<GroupView> {
        let mut shards = self.group(group).peekable();
        let first = shards.peek().copied()?;
        let mut view = GroupView {
            id: group,
            version: first.version,
            epoch: first.epoch,
            shards: 0,
            needs_reassignment: false,
            on_draining_node: false,
            ready: true,
        };
        for replica in shards {
            view.shards += 1;
            let status = self.nodes.get(&replica.node).map(|node| node.status);
            match status {
                None | Some(NodeStatus::Down) => view.needs_reassignment = true,
                Some(NodeStatus::Draining) => view.on_draining_node = true,
                Some(NodeStatus::Ready) => {}
            }
            if replica.state == ReplicaState::Failed {
                view.needs_reassignment = true;
            }
            if replica.state != ReplicaState::Ready {
                view.ready = false;
            }
        }
        if view.needs_reassignment {
            view.ready = false;
            view.on_draining_node = false;
        }
        Some(view)
    }
}
