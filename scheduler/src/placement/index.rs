//! The planner's view of device memory: free bytes of every device on a ready node, kept
//! in one ordered set so that "the tightest device with at least N bytes free" is a range
//! scan rather than a pass over the whole cluster.

use crate::deployment::{PlacementConstraints, ShardLayout};
use crate::state::{ClusterState, Node, NodeStatus};
use crate::types::{DeviceId, NodeId, ShardPlacement};
use std::collections::{BTreeMap, BTreeSet};

/// Free memory of every device of every ready node, as the plan so far leaves it.
pub(super) struct DeviceIndex<'a> {
    /// Ready nodes in id order; positions index `free`.
    nodes: Vec<&'a Node>,
    position: BTreeMap<NodeId, u32>,
    /// Free bytes per device, per node position.
    free: Vec<Vec<u64>>,
    /// `(free bytes, node position, device id)`: ascending free bytes, then ids.
    by_free: BTreeSet<(u64, u32, u32)>,
    /// Zones of ready nodes under each zone label in use.
    zones: BTreeMap<String, ZoneTable<'a>>,
    /// Which ready nodes and zones each (zone label, label selector) in use admits.
    admitted: BTreeMap<(String, Vec<(String, String)>), Admitted>,
}

/// The nodes (by position) and zones (by zone index) a label selector admits.
struct Admitted {
    nodes: Vec<bool>,
    zones: Vec<bool>,
}

/// The zones under one zone label: distinct values ("" where a node lacks the label) and
/// each ready node's zone, by position.
struct ZoneTable<'a> {
    names: Vec<&'a str>,
    of_node: Vec<u32>,
}

/// How a candidate ranks, smallest best: groups of the deployment in its zone, on its node,
/// bytes left on the device that completes it, node position.
type Rank = (u32, u32, u64, u32);

/// One group to place.
pub(super) struct Request<'r> {
    pub bytes: u64,
    pub shards: u32,
    pub layout: ShardLayout,
    pub constraints: &'r PlacementConstraints,
}

/// Where a deployment's healthy groups already are, to spread the next one away from them.
#[derive(Default)]
pub(super) struct Spread<'a> {
    pub per_node: BTreeMap<NodeId, u32>,
    pub per_zone: BTreeMap<&'a str, u32>,
}

impl<'a> Spread<'a> {
    pub fn add(&mut self, state: &'a ClusterState, zone_label: &str, shards: &[ShardPlacement]) {
        self.change(state, zone_label, shards, true);
    }

    pub fn remove(&mut self, state: &'a ClusterState, zone_label: &str, shards: &[ShardPlacement]) {
        self.change(state, zone_label, shards, false);
    }

    fn change(
        &mut self,
        state: &'a ClusterState,
        zone_label: &str,
        shards: &[ShardPlacement],
        add: bool,
    ) {
        let step = |count: &mut u32| {
            *count = if add {
                *count + 1
            } else {
                count.saturating_sub(1)
            };
        };
        let nodes: BTreeSet<NodeId> = shards.iter().map(|shard| shard.node).collect();
        for node in nodes {
            step(self.per_node.entry(node).or_insert(0));
        }
        if let Some(first) = shards.first() {
            let zone = state
                .nodes
                .get(&first.node)
                .map_or("", |n| zone_of(n, zone_label));
            step(self.per_zone.entry(zone).or_insert(0));
        }
    }
}

pub(super) fn zone_of<'n>(node: &'n Node, zone_label: &str) -> &'n str {
    node.labels.get(zone_label).map_or("", String::as_str)
}

fn eligible(node: &Node, constraints: &PlacementConstraints) -> bool {
    constraints
        .node_labels
        .iter()
        .all(|(key, value)| node.labels.get(key) == Some(value))
}

impl<'a> DeviceIndex<'a> {
    pub fn new(state: &'a ClusterState) -> DeviceIndex<'a> {
        let mut index = DeviceIndex {
            nodes: Vec::new(),
            position: BTreeMap::new(),
            free: Vec::new(),
            by_free: BTreeSet::new(),
            zones: BTreeMap::new(),
            admitted: BTreeMap::new(),
        };
        for node in state.nodes.values() {
            if node.status != NodeStatus::Ready {
                continue;
            }
            let position = index.nodes.len() as u32;
            let free: Vec<u64> = node
                .devices
                .iter()
                .map(|device| state.free_bytes(node.id, device.id))
                .collect();
            for (device, &bytes) in free.iter().enumerate() {
                index.by_free.insert((bytes, position, device as u32));
            }
            index.nodes.push(node);
            index.position.insert(node.id, position);
            index.free.push(free);
        }
        index
    }

    fn set_free(&mut self, node: NodeId, device: DeviceId, change: impl FnOnce(u64) -> u64) {
        let Some(&position) = self.position.get(&node) else {
            // Not a ready node: nothing is placed there, so nothing to track.
            return;
        };
        let Some(free) = self
            .free
            .get_mut(position as usize)
            .and_then(|devices| devices.get_mut(device.0 as usize))
        else {
            return;
        };
        self.by_free.remove(&(*free, position, device.0));
        *free = change(*free);
        self.by_free.insert((*free, position, device.0));
    }

    /// Reserves `bytes` on a device.
    pub fn take(&mut self, node: NodeId, device: DeviceId, bytes: u64) {
        self.set_free(node, device, |free| free.saturating_sub(bytes));
    }

    /// Frees `bytes` on a device.
    pub fn give(&mut self, node: NodeId, device: DeviceId, bytes: u64) {
        self.set_free(node, device, |free| free.saturating_add(bytes));
    }

    /// Free bytes of a device on a ready node; `None` elsewhere.
    pub fn free(&self, node: NodeId, device: DeviceId) -> Option<u64> {
        let position = *self.position.get(&node)?;
        self.free
            .get(position as usize)?
            .get(device.0 as usize)
            .copied()
    }

    /// Whether a device on a ready node may take a shard under `constraints`.
    pub fn allows(
        &self,
        node: NodeId,
        device: DeviceId,
        constraints: &PlacementConstraints,
    ) -> bool {
        let Some(&position) = self.position.get(&node) else {
            return false;
        };
        let known = self.nodes[position as usize];
        eligible(known, constraints)
            && known
                .devices
                .get(device.0 as usize)
                .is_some_and(|d| constraints.device_kind.is_none_or(|kind| kind == d.kind))
    }

    /// Builds the zone table and the admitted-node list `constraints` need, once per plan.
    fn prepare(&mut self, constraints: &PlacementConstraints) -> (String, Vec<(String, String)>) {
        if !self.zones.contains_key(&constraints.zone_label) {
            let zones: Vec<&'a str> = self
                .nodes
                .iter()
                .map(|node| zone_of(node, &constraints.zone_label))
                .collect();
            let names: Vec<&'a str> = zones
                .iter()
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let of_node = zones
                .iter()
                .map(|zone| names.binary_search(zone).unwrap_or(0) as u32)
                .collect();
            self.zones
                .insert(constraints.zone_label.clone(), ZoneTable { names, of_node });
        }
        let selector: Vec<(String, String)> = constraints
            .node_labels
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let key = (constraints.zone_label.clone(), selector);
        if !self.admitted.contains_key(&key)
            && let Some(zones) = self.zones.get(&constraints.zone_label)
        {
            let nodes: Vec<bool> = self
                .nodes
                .iter()
                .map(|node| eligible(node, constraints))
                .collect();
            let mut admitted_zones = vec![false; zones.names.len()];
            for (position, &admitted) in nodes.iter().enumerate() {
                if admitted {
                    admitted_zones[zones.of_node[position] as usize] = true;
                }
            }
            let admitted = Admitted {
                nodes,
                zones: admitted_zones,
            };
            self.admitted.insert(key.clone(), admitted);
        }
        key
    }

    /// The best placement for one group, or `None` when no ready node has room.
    ///
    /// Candidates are compared by: groups of the deployment in the candidate's zone, then on
    /// the candidate node (spread), then bytes left on the tightest-fitting device that
    /// completes the group (best fit), then node id. Devices are scanned in ascending free
    /// memory, so the scan stops at the first candidate that no other can beat: one in the
    /// emptiest zone that holds an admitted node, on a node without a group of this
    /// deployment.
    pub fn choose(
        &mut self,
        request: &Request<'_>,
        spread: &Spread<'_>,
    ) -> Option<Vec<ShardPlacement>> {
        if request.shards == 0 {
            return None;
        }
        let selector = self.prepare(request.constraints);
        let (Some(zones), Some(admitted)) = (
            self.zones.get(&request.constraints.zone_label),
            self.admitted.get(&selector),
        ) else {
            return None;
        };
        let in_zone: Vec<u32> = zones
            .names
            .iter()
            .map(|zone| spread.per_zone.get(zone).copied().unwrap_or(0))
            .collect();
        let zone_floor = in_zone
            .iter()
            .zip(&admitted.zones)
            .filter(|(_, admits)| **admits)
            .map(|(count, _)| *count)
            .min()
            .unwrap_or(0);
        let floor = (zone_floor, 0);
        let wanted = request.shards as usize;
        // Devices that fit, per node position, in ascending free bytes.
        let mut fitting: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let mut best: Option<(Rank, u32)> = None;
        for &(free, position, device) in self.by_free.range((request.bytes, 0, 0)..) {
            if !admitted.nodes[position as usize] {
                continue;
            }
            let node = self.nodes[position as usize];
            let kind_ok = node.devices.get(device as usize).is_some_and(|d| {
                request
                    .constraints
                    .device_kind
                    .is_none_or(|kind| kind == d.kind)
            });
            if !kind_ok {
                continue;
            }
            if wanted > 1 {
                let seen = fitting.entry(position).or_default();
                seen.push(device);
                if seen.len() != wanted {
                    continue;
                }
            }
            let zone_count = in_zone[zones.of_node[position as usize] as usize];
            let node_count = spread.per_node.get(&node.id).copied().unwrap_or(0);
            let key = (zone_count, node_count, free - request.bytes, position);
            if best.is_none_or(|(best_key, _)| key < best_key) {
                best = Some((key, device));
            }
            if (zone_count, node_count) == floor {
                break;
            }
        }
        if let Some(((_, _, _, position), device)) = best {
            let node = self.nodes[position as usize].id;
            let devices = if wanted == 1 {
                vec![device]
            } else {
                fitting.remove(&position).unwrap_or_default()
            };
            return Some(
                devices
                    .into_iter()
                    .take(wanted)
                    .map(|device| ShardPlacement {
                        node,
                        device: DeviceId(device),
                    })
                    .collect(),
            );
        }
        if request.layout == ShardLayout::PipelineAcrossNodes && wanted > 1 {
            return self.choose_pipeline(request);
        }
        None
    }

    /// Pipeline stages across nodes: the tightest-fitting eligible devices, one per stage,
    /// staying on as few nodes as the scan order gives.
    fn choose_pipeline(&self, request: &Request<'_>) -> Option<Vec<ShardPlacement>> {
        let mut chosen = Vec::with_capacity(request.shards as usize);
        for &(_, position, device) in self.by_free.range((request.bytes, 0, 0)..) {
            let node = self.nodes[position as usize];
            if !self.allows(node.id, DeviceId(device), request.constraints) {
                continue;
            }
            chosen.push(ShardPlacement {
                node: node.id,
                device: DeviceId(device),
            });
            if chosen.len() == request.shards as usize {
                // Stage order follows node order so that neighbouring stages are neighbours.
                chosen.sort();
                return Some(chosen);
            }
        }
        None
    }
}
