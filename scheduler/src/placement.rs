//! Placement: which device each missing replica should go to.
//!
//! The rule, in plain words: for every deployment that has fewer live replicas than it asks
//! for, look at every device of every ready node that has enough free memory for the
//! version's estimate. Prefer the node that runs the fewest replicas of this deployment
//! (spread, so one host failure takes out as few as possible), then the device that is left
//! with the least free memory (best fit, so large holes stay open for large models), then
//! the lowest node and device id (so the choice is deterministic).
//!
//! `plan` only proposes; `apply` re-checks memory when the commands commit, so a plan made
//! on a stale state can be refused but can never over-commit a device.

use crate::command::Command;
use crate::state::{ClusterState, NodeStatus};
use crate::types::{DeviceId, NodeId};
use std::collections::BTreeMap;

/// The commands that bring every deployment up to its replica count, as far as memory allows.
pub fn plan(state: &ClusterState) -> Vec<Command> {
    let mut reserved = state.reserved_by_device();
    let mut commands = Vec::new();
    for deployment in state.deployments.values() {
        let Some(version) = state.version(&deployment.model, deployment.version) else {
            continue;
        };
        let need_bytes = version.memory_bytes;
        let mut per_node: BTreeMap<NodeId, u32> = BTreeMap::new();
        let mut live = 0u32;
        for replica in state.replicas_of(&deployment.name) {
            if replica.state.holds_memory() {
                live += 1;
                *per_node.entry(replica.node).or_insert(0) += 1;
            }
        }
        for _ in live..deployment.replicas {
            let Some((node, device)) = choose_device(state, &reserved, &per_node, need_bytes)
            else {
                break;
            };
            *reserved.entry((node, device)).or_insert(0) += need_bytes;
            *per_node.entry(node).or_insert(0) += 1;
            commands.push(Command::AssignReplica {
                deployment: deployment.name.clone(),
                node,
                device,
                reserved_bytes: need_bytes,
            });
        }
    }
    commands
}

fn choose_device(
    state: &ClusterState,
    reserved: &BTreeMap<(NodeId, DeviceId), u64>,
    per_node: &BTreeMap<NodeId, u32>,
    need_bytes: u64,
) -> Option<(NodeId, DeviceId)> {
    // Compared as a tuple: fewest replicas of this deployment on the node, then least
    // memory left over, then lowest ids.
    let mut best: Option<(u32, u64, NodeId, DeviceId)> = None;
    for node in state.nodes.values() {
        if node.status != NodeStatus::Ready {
            continue;
        }
        let same_deployment = per_node.get(&node.id).copied().unwrap_or(0);
        for device in &node.devices {
            let used = reserved.get(&(node.id, device.id)).copied().unwrap_or(0);
            let free_bytes = device.memory_bytes.saturating_sub(used);
            if free_bytes < need_bytes {
                continue;
            }
            let key = (same_deployment, free_bytes - need_bytes, node.id, device.id);
            if best.is_none_or(|best_key| key < best_key) {
                best = Some(key);
            }
        }
    }
    best.map(|(_, _, node, device)| (node, device))
}

#[cfg(test)]
mod tests;
