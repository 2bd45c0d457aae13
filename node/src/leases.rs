//! Node leases, held in memory by the leader. Agents renew theirs with heartbeats, which
//! are not raft entries; only the transitions they cause are (a node registered, marked
//! Down, back to Ready). A new leader grants every node a fresh lease before judging any.

use crate::control::ControlPlane;
use shoal_scheduler::{ClusterState, Command, NodeId, NodeStatus};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a heartbeat keeps a node alive: a few missed heartbeats (agents send one a
/// second), not one slow one.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// The lease a new leader grants every node: agents learn of the new leader only when a
/// heartbeat fails over to it, so a healthy node must not go Down for that.
const NEW_LEADER_GRACE: Duration = Duration::from_secs(2 * 3);

/// How often the leader looks for expired leases.
const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Expiry time per node. Locked only for map operations, never across an await.
#[derive(Debug, Default)]
pub struct Leases {
    expires: Mutex<HashMap<NodeId, Instant>>,
}

impl Leases {
    pub fn renew(&self, node: NodeId, now: Instant) {
        if let Ok(mut expires) = self.expires.lock() {
            expires.insert(node, now + LEASE_TTL);
        }
    }

    /// Gives every node in `state` a lease of at least [`NEW_LEADER_GRACE`] from `now`:
    /// what a new leader does, since it has not been hearing heartbeats until now and
    /// agents need a moment to find it. A lease renewed since this member began to lead
    /// (a heartbeat can come before the failure detector notices) is kept: before, it was
    /// cleared, and a node that registered in between was marked Down a moment later.
    fn grant_all(&self, state: &ClusterState, now: Instant) {
        if let Ok(mut expires) = self.expires.lock() {
            // Leases of nodes gone from the state, long run out, go.
            expires.retain(|node, until| state.nodes.contains_key(node) || *until > now);
            for node in state.nodes.keys() {
                let until = expires.entry(*node).or_insert(now);
                *until = (*until).max(now + NEW_LEADER_GRACE);
            }
        }
    }

    /// Nodes not Down whose lease ran out (or that never had one) at `now`.
    pub fn expired(&self, state: &ClusterState, now: Instant) -> Vec<NodeId> {
        let Ok(expires) = self.expires.lock() else {
            return Vec::new();
        };
        state
            .nodes
            .values()
            .filter(|node| node.status != NodeStatus::Down)
            .filter(|node| expires.get(&node.id).is_none_or(|until| *until <= now))
            .map(|node| node.id)
            .collect()
    }
}

/// On the leader, marks nodes whose lease expired Down, until `shutdown` fires.
pub async fn run_failure_detector(
    control: ControlPlane,
    leases: std::sync::Arc<Leases>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut was_leader = false;
    loop {
        let is_leader = control.raft_status().is_leader;
        let now = Instant::now();
        if is_leader && !was_leader {
            leases.grant_all(&control.state(), now);
        }
        was_leader = is_leader;
        if is_leader {
            for node in leases.expired(&control.state(), now) {
                let command = Command::SetNodeStatus {
                    node,
                    status: NodeStatus::Down,
                };
                match control.propose(&command).await {
                    Ok(_) => tracing::warn!(%node, "node lease expired; marked down"),
                    Err(error) => {
                        tracing::warn!(%node, %error, "marking an expired node down failed")
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_scheduler::apply;

    fn state_with_nodes(ids: &[u64]) -> ClusterState {
        let mut state = ClusterState::default();
        for (index, id) in ids.iter().enumerate() {
            let command = Command::RegisterNode {
                id: NodeId(*id),
                address: format!("127.0.0.1:{}", 9000 + id),
                devices: vec![],
                labels: Default::default(),
            };
            apply(&mut state, index as u64 + 1, command).unwrap();
        }
        state
    }

    #[test]
    fn a_node_without_a_heartbeat_for_the_ttl_expires() {
        let state = state_with_nodes(&[1, 2]);
        let leases = Leases::default();
        let start = Instant::now();
        leases.renew(NodeId(1), start);
        leases.renew(NodeId(2), start + LEASE_TTL / 2);
        assert!(leases.expired(&state, start + LEASE_TTL / 2).is_empty());
        assert_eq!(leases.expired(&state, start + LEASE_TTL), vec![NodeId(1)]);
    }

    #[test]
    fn a_new_leader_gives_every_node_time_to_find_it() {
        let state = state_with_nodes(&[1, 2]);
        let leases = Leases::default();
        let start = Instant::now();
        leases.grant_all(&state, start);
        assert!(
            leases
                .expired(&state, start + LEASE_TTL + LEASE_TTL / 2)
                .is_empty()
        );
        assert_eq!(leases.expired(&state, start + NEW_LEADER_GRACE).len(), 2);
    }

    /// Regression: a node whose first heartbeat reached the new leader before its failure
    /// detector noticed the leadership lost that renewal, and being registered by then
    /// but given no lease, it was marked Down 250 ms after it joined.
    #[test]
    fn a_lease_renewed_before_the_new_leader_grants_its_grace_is_kept() {
        let leases = Leases::default();
        let start = Instant::now();
        // Its heartbeat renews the lease and registers it...
        leases.renew(NodeId(2), start);
        let state = state_with_nodes(&[1, 2]);
        // ...then the detector notices it leads, with node 2 already in the state.
        leases.grant_all(&state_with_nodes(&[1]), start);
        assert!(leases.expired(&state, start + LEASE_TTL / 2).is_empty());
        // And a grant never shortens a lease.
        leases.renew(NodeId(1), start + NEW_LEADER_GRACE);
        leases.grant_all(&state, start);
        assert!(
            !leases
                .expired(&state, start + NEW_LEADER_GRACE + LEASE_TTL / 2)
                .contains(&NodeId(1))
        );
    }

    #[test]
    fn a_node_already_down_is_not_expired_again() {
        let mut state = state_with_nodes(&[1]);
        let command = Command::SetNodeStatus {
            node: NodeId(1),
            status: NodeStatus::Down,
        };
        apply(&mut state, 10, command).unwrap();
        let leases = Leases::default();
        assert!(leases.expired(&state, Instant::now()).is_empty());
    }
}
