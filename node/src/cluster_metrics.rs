//! The cluster-wide gauges: node status, replica groups per deployment, desired replicas
//! and latency objectives, read from the replicated state. Only the leader publishes them
//! (and clears them when it steps down), so a sum over servers never counts them twice and
//! a lagging follower never shows an old picture.

use crate::control::ControlPlane;
use shoal_scheduler::{ClusterState, NodeStatus, ReplicaState};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;

/// How often the gauges are refreshed when the state does not change.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// Every node status, so each node has a series per status (0 or 1).
const NODE_STATUSES: [NodeStatus; 3] = [NodeStatus::Ready, NodeStatus::Draining, NodeStatus::Down];

/// Every replica state, so each deployment has a series per state (possibly 0).
const REPLICA_STATES: [ReplicaState; 5] = [
    ReplicaState::Pending,
    ReplicaState::Loading,
    ReplicaState::Ready,
    ReplicaState::Draining,
    ReplicaState::Failed,
];

pub fn node_status_label(status: NodeStatus) -> &'static str {
    match status {
        NodeStatus::Ready => "ready",
        NodeStatus::Draining => "draining",
        NodeStatus::Down => "down",
    }
}

pub fn replica_state_label(state: ReplicaState) -> &'static str {
    match state {
        ReplicaState::Pending => "pending",
        ReplicaState::Loading => "loading",
        ReplicaState::Ready => "ready",
        ReplicaState::Draining => "draining",
        ReplicaState::Failed => "failed",
    }
}

/// The label of a group with a shard on a node that is down (or gone): whatever its agent last
/// reported, it serves nothing until the node is back or the group is placed elsewhere
/// (Nomad's word for such an allocation).
pub const LOST_LABEL: &str = "lost";

/// Replica groups of each deployment by the group's state: a group is as far along as its
/// least advanced shard, so it counts as ready only when every shard is, and as
/// [`LOST_LABEL`] while any shard is on a node that is down.
pub fn groups_by_state(state: &ClusterState) -> BTreeMap<&str, BTreeMap<&'static str, i64>> {
    let mut groups: BTreeMap<(&str, u64), (ReplicaState, bool)> = BTreeMap::new();
    for replica in state.replicas.values() {
        let key = (replica.deployment.as_str(), replica.group.0);
        let on_down_node = state
            .nodes
            .get(&replica.node)
            .is_none_or(|node| node.status == NodeStatus::Down);
        let (group_state, lost) = groups.entry(key).or_insert((replica.state, false));
        if *group_state == ReplicaState::Ready {
            *group_state = replica.state;
        }
        *lost |= on_down_node;
    }
    let mut counts: BTreeMap<&str, BTreeMap<&'static str, i64>> = state
        .deployments
        .keys()
        .map(|name| (name.as_str(), BTreeMap::new()))
        .collect();
    for ((deployment, _), (group_state, lost)) in groups {
        let label = if lost {
            LOST_LABEL
        } else {
            replica_state_label(group_state)
        };
        *counts
            .entry(deployment)
            .or_default()
            .entry(label)
            .or_default() += 1;
    }
    counts
}

/// Sets the cluster gauges from `state`, dropping series of nodes and deployments gone.
pub fn publish(state: &ClusterState) {
    clear();
    let metrics = shoal_ops::metrics::metrics();
    for node in state.nodes.values() {
        let id = node.id.0.to_string();
        for status in NODE_STATUSES {
            metrics
                .node_status
                .with_label_values(&[&id, node_status_label(status)])
                .set(i64::from(node.status == status));
        }
    }
    for (name, counts) in groups_by_state(state) {
        let labels = REPLICA_STATES.map(replica_state_label);
        for label in labels.into_iter().chain([LOST_LABEL]) {
            let count = counts.get(label).copied().unwrap_or(0);
            metrics
                .deployment_replicas
                .with_label_values(&[name, label])
                .set(count);
        }
    }
    for deployment in state.deployments.values() {
        metrics
            .deployment_desired_replicas
            .with_label_values(&[deployment.name()])
            .set(i64::from(deployment.replicas_desired));
        if let Some(objective_ms) = deployment.spec.latency_objective_ms {
            metrics
                .deployment_latency_objective_seconds
                .with_label_values(&[deployment.name(), deployment.model()])
                .set(objective_ms as f64 / 1_000.0);
        }
        if deployment.spec.autoscale.is_some() {
            metrics
                .autoscaler_max_replicas
                .with_label_values(&[deployment.name()])
                .set(i64::from(deployment.spec.replicas.max));
        }
    }
}

/// Removes every cluster gauge: what a member that does not lead shows.
pub fn clear() {
    let metrics = shoal_ops::metrics::metrics();
    metrics.node_status.reset();
    metrics.deployment_replicas.reset();
    metrics.deployment_desired_replicas.reset();
    metrics.deployment_latency_objective_seconds.reset();
    metrics.autoscaler_max_replicas.reset();
}

/// Keeps the gauges current on the leader, and clear elsewhere, until `shutdown` fires.
pub async fn run_publisher(control: ControlPlane, mut shutdown: watch::Receiver<bool>) {
    let mut states = control.watch_state();
    let mut published = false;
    loop {
        if control.raft_status().is_leader {
            publish(&control.state());
            published = true;
        } else if published {
            clear();
            published = false;
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            changed = states.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(PUBLISH_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_scheduler::{DeviceId, NodeId, Replica, ReplicaId};

    #[test]
    fn a_sharded_group_is_ready_only_when_every_shard_is() {
        let mut state = ClusterState::default();
        let node = shoal_scheduler::Node {
            id: NodeId(1),
            address: String::new(),
            devices: Vec::new(),
            labels: BTreeMap::new(),
            status: NodeStatus::Ready,
        };
        state.nodes.insert(NodeId(1), node);
        let mut replica = |id: u64, group: u64, shard: u32, replica_state: ReplicaState| {
            let replica = Replica {
                id: ReplicaId(id),
                group: ReplicaId(group),
                shard,
                deployment: "d".into(),
                model: "m".into(),
                version: 1,
                node: NodeId(1),
                device: DeviceId(0),
                reserved_bytes: 0,
                state: replica_state,
                epoch: 1,
                failure: None,
            };
            state.replicas.insert(ReplicaId(id), replica);
        };
        replica(1, 1, 0, ReplicaState::Ready);
        replica(2, 1, 1, ReplicaState::Loading);
        replica(3, 3, 0, ReplicaState::Ready);
        replica(4, 3, 1, ReplicaState::Ready);
        let counts = groups_by_state(&state);
        assert_eq!(counts["d"].get("ready"), Some(&1));
        assert_eq!(counts["d"].get("loading"), Some(&1));
    }

    /// Regression: with its only agent gone, a deployment showed its groups ready, so the
    /// no-ready-replica alert never fired while every request failed.
    #[test]
    fn a_group_on_a_node_that_is_down_counts_as_lost_not_ready() {
        let mut state = ClusterState::default();
        for (id, status) in [(1, NodeStatus::Ready), (2, NodeStatus::Down)] {
            let node = shoal_scheduler::Node {
                id: NodeId(id),
                address: String::new(),
                devices: Vec::new(),
                labels: BTreeMap::new(),
                status,
            };
            state.nodes.insert(NodeId(id), node);
        }
        for (id, node) in [(1, 1), (2, 2), (3, 2)] {
            let replica = Replica {
                id: ReplicaId(id),
                group: ReplicaId(id),
                shard: 0,
                deployment: "d".into(),
                model: "m".into(),
                version: 1,
                node: NodeId(node),
                device: DeviceId(0),
                reserved_bytes: 0,
                state: ReplicaState::Ready,
                epoch: 1,
                failure: None,
            };
            state.replicas.insert(ReplicaId(id), replica);
        }
        let counts = groups_by_state(&state);
        assert_eq!(counts["d"].get("ready"), Some(&1));
        assert_eq!(counts["d"].get(LOST_LABEL), Some(&2));
    }
}
