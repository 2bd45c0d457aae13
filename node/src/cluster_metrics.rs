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

/// Replica groups of each deployment by the group's state: a group is as far along as its
/// least advanced shard, so it counts as ready only when every shard is.
pub fn groups_by_state(state: &ClusterState) -> BTreeMap<&str, BTreeMap<&'static str, i64>> {
    let mut groups: BTreeMap<(&str, u64), ReplicaState> = BTreeMap::new();
    for replica in state.replicas.values() {
        let key = (replica.deployment.as_str(), replica.group.0);
        groups
            .entry(key)
            .and_modify(|group| {
                if *group == ReplicaState::Ready {
                    *group = replica.state;
                }
            })
            .or_insert(replica.state);
    }
    let mut counts: BTreeMap<&str, BTreeMap<&'static str, i64>> = state
        .deployments
        .keys()
        .map(|name| (name.as_str(), BTreeMap::new()))
        .collect();
    for ((deployment, _), group_state) in groups {
        *counts
            .entry(deployment)
            .or_default()
            .entry(replica_state_label(group_state))
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
        for replica_state in REPLICA_STATES.map(replica_state_label) {
            let count = counts.get(replica_state).copied().unwrap_or(0);
            metrics
                .deployment_replicas
                .with_label_values(&[name, replica_state])
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
}
