//! Placement: the commands that bring every deployment to what it wants, one round at a
//! time. `scheduler/README.md` explains the heuristic in plain words.
//!
//! For each deployment, in name order, the planner:
//! 1. steps its rollout (`rollout::decide`), which sets how many groups of each version are
//!    wanted (`rollout::version_targets`);
//! 2. places again, in place and at a higher epoch, every group with a failed shard or a
//!    shard on a down node (a group that failed again and again once its wait is over, see
//!    [`crate::backoff`]);
//! 3. removes surplus groups, those on draining nodes first, then those not ready, then the
//!    newest, but never a ready one while that would leave fewer ready groups than the
//!    deployment wants minus its `max_unavailable`: a replacement is ready before the group
//!    it replaces goes;
//! 4. places missing groups up to the wanted count plus `max_surge`, spreading each
//!    deployment across zones and nodes and fitting each group onto the devices it fills
//!    best; a packed deployment that finds no room evicts idle packed replicas of other
//!    deployments, least recently used first.
//!
//! It repeats 1–4 on its own running picture of the result until nothing changes, so the
//! commands of one round, once applied, leave nothing for the next (`plan` is idempotent).
//! `plan` only proposes; `apply` re-checks every command when it commits, so a plan made
//! on a stale state can be refused but can never over-commit a device.

mod index;

use crate::command::{Command, shard_bytes};
use crate::deployment::{Deployment, RemovalReason};
use crate::load::LoadSnapshot;
use crate::rollout::{self, GroupCounts};
use crate::state::{ClusterState, GroupView, NodeStatus, ReplicaState};
use crate::types::{ReplicaId, ShardPlacement};
use index::{DeviceIndex, Request, Spread};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// A replica that served a request more recently than this is not idle, and is never
/// evicted: a minute covers a slow client's think time between requests.
pub const EVICTION_IDLE_MIN_MS: u64 = 60_000;

/// Rounds of look-ahead per deployment: a rollout moves at most a few phases on what one
/// round can see (supersede, start, advance, complete), so this is never reached in practice.
const LOOKAHEAD_ROUNDS_MAX: usize = 8;

/// The commands that move every deployment towards what it wants, as far as memory allows.
pub fn plan(state: &ClusterState, load: &LoadSnapshot, now_ms: u64) -> Vec<Command> {
    let mut planner = Planner {
        state,
        load,
        now_ms,
        devices: DeviceIndex::new(state),
        commands: Vec::new(),
        next_replica_id: state.next_replica_id,
        removed: BTreeSet::new(),
        desired_cut: BTreeMap::new(),
        idle: None,
        frees: 0,
        starved: false,
    };
    let mut short = Vec::new();
    for deployment in state.deployments.values() {
        let mut picture = planner.picture(deployment);
        planner.starved = false;
        planner.advance(&mut picture);
        if planner.starved {
            short.push((picture, planner.frees));
        }
    }
    // A deployment left short of room may find it freed by one planned after it: revisit the
    // short ones (in name order) while that happens, so the next round finds nothing to do.
    for _ in 0..LOOKAHEAD_ROUNDS_MAX {
        let frees_before = planner.frees;
        let mut still_short = Vec::new();
        for (mut picture, frees_seen) in short {
            if planner.frees == frees_seen {
                still_short.push((picture, frees_seen));
                continue;
            }
            planner.starved = false;
            planner.refresh(&mut picture);
            planner.advance(&mut picture);
            if planner.starved {
                still_short.push((picture, planner.frees));
            }
        }
        short = still_short;
        if planner.frees == frees_before {
            break;
        }
    }
    planner.commands
}

/// One deployment as the plan so far leaves it.
struct Picture<'a> {
    deployment: Cow<'a, Deployment>,
    groups: Vec<Group>,
    /// Groups of it evicted for others that the picture already accounts for.
    cut_seen: u32,
}

/// A replica group in the planner's running picture.
#[derive(Clone, Debug)]
struct Group {
    view: GroupView,
    /// Each shard's placement, bytes, and whether it holds them now.
    shards: Vec<(ShardPlacement, u64, bool)>,
}

impl Group {
    fn placements(&self) -> Vec<ShardPlacement> {
        self.shards
            .iter()
            .map(|(placement, _, _)| *placement)
            .collect()
    }
}

/// An idle replica that could be evicted for a packed deployment.
#[derive(Clone, Debug)]
struct IdleReplica<'a> {
    last_request_ms: Option<u64>,
    group: ReplicaId,
    epoch: u64,
    deployment: &'a str,
    placement: ShardPlacement,
    bytes: u64,
}

struct Planner<'a> {
    state: &'a ClusterState,
    load: &'a LoadSnapshot,
    now_ms: u64,
    devices: DeviceIndex<'a>,
    commands: Vec<Command>,
    /// The id the next `AssignReplica` of this plan will get, once applied in order.
    next_replica_id: u64,
    /// Groups removed (evicted or not) in this round, and how many each deployment lost to
    /// eviction.
    removed: BTreeSet<ReplicaId>,
    desired_cut: BTreeMap<&'a str, u32>,
    /// Eviction candidates, least recently used first; built on first need.
    idle: Option<Vec<IdleReplica<'a>>>,
    /// How many times the plan so far freed memory.
    frees: u64,
    /// Whether the deployment being planned found no room for a group it wanted.
    starved: bool,
}

impl<'a> Planner<'a> {
    fn picture(&self, original: &'a Deployment) -> Picture<'a> {
        let state = self.state;
        let groups: Vec<Group> = state
            .group_ids_of(original.name())
            .filter_map(|id| {
                let view = state.group_view(id)?;
                let shards = state
                    .group(id)
                    .map(|r| {
                        let placement = ShardPlacement {
                            node: r.node,
                            device: r.device,
                        };
                        (placement, r.reserved_bytes, r.state.holds_memory())
                    })
                    .collect();
                Some(Group { view, shards })
            })
            .collect();
        let mut picture = Picture {
            deployment: Cow::Borrowed(original),
            groups,
            cut_seen: 0,
        };
        self.refresh(&mut picture);
        picture
    }

    /// Brings a picture up to date with evictions made for other deployments.
    fn refresh(&self, picture: &mut Picture<'a>) {
        let cut = self
            .desired_cut
            .get(picture.deployment.name())
            .copied()
            .unwrap_or(0);
        if cut > picture.cut_seen {
            let owned = picture.deployment.to_mut();
            owned.replicas_desired = owned
                .replicas_desired
                .saturating_sub(cut - picture.cut_seen);
            picture.cut_seen = cut;
        }
        picture
            .groups
            .retain(|group| !self.removed.contains(&group.view.id));
    }

    /// Steps the rollout and reconciles groups until neither has anything left to do.
    fn advance(&mut self, picture: &mut Picture<'a>) {
        let model = self.state.models.get(picture.deployment.model());
        let wanted = rollout::wanted_version(model, &picture.deployment.spec.versions);
        for _ in 0..LOOKAHEAD_ROUNDS_MAX {
            let stepped = self.step_rollout(&mut picture.deployment, wanted, &picture.groups);
            let changed = self.reconcile(&picture.deployment, &mut picture.groups);
            if !stepped && !changed {
                break;
            }
        }
    }

    /// Applies every rollout step due now to the planner's copy of the deployment.
    fn step_rollout(
        &mut self,
        deployment: &mut Cow<'a, Deployment>,
        wanted: Option<u32>,
        groups: &[Group],
    ) -> bool {
        let mut stepped = false;
        for _ in 0..LOOKAHEAD_ROUNDS_MAX {
            let mut counts = GroupCounts::default();
            for group in groups {
                *counts.live.entry(group.view.version).or_insert(0) += 1;
                if group.view.ready {
                    *counts.ready.entry(group.view.version).or_insert(0) += 1;
                }
                if let Some(failing) = self.load.failing.get(&group.view.id) {
                    let most = counts.failing.entry(group.view.version).or_insert(0);
                    *most = (*most).max(failing.in_a_row);
                }
            }
            let health = deployment.rollout.and_then(|rollout| {
                self.load
                    .deployments
                    .get(deployment.name())
                    .and_then(|load| load.versions.get(&rollout.to))
            });
            let Some(command) = rollout::decide(deployment, wanted, &counts, health, self.now_ms)
            else {
                break;
            };
            let owned = deployment.to_mut();
            let applied = match &command {
                Command::StartRollout { version, at_ms, .. } => {
                    rollout::start(owned, *version, *at_ms)
                }
                Command::AdvanceRollout { version, phase, .. } => {
                    rollout::advance(owned, *version, *phase)
                }
                Command::CompleteRollout { version, .. } => rollout::complete(owned, *version),
                Command::RollbackRollout {
                    version, reason, ..
                } => rollout::rollback(owned, *version, reason),
                _ => break,
            };
            if applied.is_err() {
                break;
            }
            self.commands.push(command);
            stepped = true;
        }
        stepped
    }

    /// Reassigns, removes and places groups of one deployment; whether it did anything.
    fn reconcile(&mut self, deployment: &Deployment, groups: &mut Vec<Group>) -> bool {
        let state = self.state;
        let spec = &deployment.spec;
        let shards_wanted = spec.sharding.shards;
        let zone_label = spec.placement.zone_label.as_str();
        let targets = rollout::version_targets(deployment);
        let target = |version: u32| targets.get(&version).copied().unwrap_or(0);
        let need_bytes = |version: u32| {
            state
                .version(&spec.model, version)
                .map(|known| shard_bytes(known.memory_bytes, shards_wanted))
        };
        let commands_before = self.commands.len();

        let mut spread = Spread::default();
        for group in groups.iter() {
            if group.view.settled(shards_wanted) && !group.view.needs_reassignment {
                spread.add(state, zone_label, &group.placements());
            }
        }

        // 1. Groups that lost a shard: place them again, or drop them if unwanted.
        let mut position = 0;
        while position < groups.len() {
            let group = &groups[position];
            if !group.view.needs_reassignment {
                position += 1;
                continue;
            }
            let wanted = target(group.view.version) > 0 && group.view.shards == shards_wanted;
            let bytes = need_bytes(group.view.version);
            // A failing group waits out its backoff, unless it lost a node too: then it
            // moves at once, as any group off a down node does.
            let on_lost_node = group.shards.iter().any(|(placement, _, _)| {
                self.state
                    .nodes
                    .get(&placement.node)
                    .is_none_or(|node| node.status == NodeStatus::Down)
            });
            let waiting = !on_lost_node
                && self
                    .load
                    .failing
                    .get(&group.view.id)
                    .is_some_and(|failing| failing.retry_at_ms > self.now_ms);
            match (wanted, bytes) {
                (true, Some(_)) if waiting => position += 1,
                (true, Some(bytes)) => {
                    if let Some(placements) =
                        self.reassign(deployment, &groups[position], bytes, &spread)
                    {
                        let group = &mut groups[position];
                        group.view.epoch += 1;
                        group.view.needs_reassignment = false;
                        group.view.ready = false;
                        group.shards = placements.iter().map(|&p| (p, bytes, true)).collect();
                        spread.add(state, zone_label, &placements);
                    }
                    position += 1;
                }
                _ => {
                    let group = groups.remove(position);
                    self.remove(&group, RemovalReason::Surplus);
                }
            }
        }

        // 2. Surplus groups, least useful first, keeping enough ready groups serving.
        let min_ready = deployment
            .replicas_desired
            .saturating_sub(spec.rollout.max_unavailable);
        let mut ready_total = groups.iter().filter(|g| g.view.ready).count() as u32;
        let versions: BTreeSet<u32> = groups.iter().map(|g| g.view.version).collect();
        for version in versions {
            let total = groups.iter().filter(|g| g.view.version == version).count() as u32;
            let surplus = total.saturating_sub(target(version));
            if surplus == 0 {
                continue;
            }
            let mut candidates: Vec<(bool, bool, std::cmp::Reverse<ReplicaId>)> = groups
                .iter()
                .filter(|g| g.view.version == version)
                .map(|g| {
                    let settled = g.view.settled(shards_wanted);
                    (settled, g.view.ready, std::cmp::Reverse(g.view.id))
                })
                .collect();
            candidates.sort();
            let mut removed = 0;
            for (_, ready, std::cmp::Reverse(id)) in candidates {
                if removed == surplus {
                    break;
                }
                if ready && ready_total <= min_ready {
                    break;
                }
                let Some(at) = groups.iter().position(|g| g.view.id == id) else {
                    continue;
                };
                let group = groups.remove(at);
                if group.view.settled(shards_wanted) && !group.view.needs_reassignment {
                    spread.remove(state, zone_label, &group.placements());
                }
                let reason = if group.view.on_draining_node {
                    RemovalReason::Moved
                } else {
                    RemovalReason::Surplus
                };
                self.remove(&group, reason);
                if ready {
                    ready_total -= 1;
                }
                removed += 1;
            }
        }

        // 3. Missing groups, within the surge allowance.
        let ceiling = targets
            .values()
            .sum::<u32>()
            .saturating_add(spec.rollout.max_surge);
        for (&version, &wanted) in &targets {
            let Some(bytes) = need_bytes(version) else {
                continue;
            };
            loop {
                let settled = groups
                    .iter()
                    .filter(|g| g.view.version == version && g.view.settled(shards_wanted))
                    .count() as u32;
                if settled >= wanted || groups.len() as u32 >= ceiling {
                    break;
                }
                let request = Request {
                    bytes,
                    shards: shards_wanted,
                    layout: spec.sharding.layout,
                    constraints: &spec.placement,
                };
                let placements = match self.devices.choose(&request, &spread) {
                    Some(placements) => placements,
                    None if spec.placement.allow_packing && shards_wanted == 1 => {
                        match self.evict_for(deployment, bytes) {
                            Some(placement) => vec![placement],
                            None => {
                                self.starved = true;
                                break;
                            }
                        }
                    }
                    None => {
                        self.starved = true;
                        break;
                    }
                };
                for placement in &placements {
                    self.devices.take(placement.node, placement.device, bytes);
                }
                spread.add(state, zone_label, &placements);
                let id = ReplicaId(self.next_replica_id);
                self.next_replica_id += u64::from(shards_wanted);
                groups.push(Group {
                    view: GroupView {
                        id,
                        version,
                        epoch: 1,
                        shards: shards_wanted,
                        needs_reassignment: false,
                        on_draining_node: false,
                        ready: false,
                    },
                    shards: placements.iter().map(|&p| (p, bytes, true)).collect(),
                });
                self.commands.push(Command::AssignReplica {
                    deployment: spec.name.clone(),
                    version,
                    shards: placements,
                });
            }
        }
        self.commands.len() > commands_before
    }

    /// Finds a new home for a group that lost a shard; proposes the move.
    fn reassign(
        &mut self,
        deployment: &Deployment,
        group: &Group,
        bytes: u64,
        spread: &Spread<'_>,
    ) -> Option<Vec<ShardPlacement>> {
        // What the group still holds is released by the move, so it may land there again.
        for (placement, held, holds) in &group.shards {
            if *holds {
                self.devices.give(placement.node, placement.device, *held);
            }
        }
        let spec = &deployment.spec;
        let request = Request {
            bytes,
            shards: spec.sharding.shards,
            layout: spec.sharding.layout,
            constraints: &spec.placement,
        };
        let chosen = self.devices.choose(&request, spread);
        let (take, bytes_each): (Vec<ShardPlacement>, Option<u64>) = match &chosen {
            Some(placements) => (placements.clone(), Some(bytes)),
            None => (group.placements(), None),
        };
        match bytes_each {
            Some(bytes) => {
                for placement in &take {
                    self.devices.take(placement.node, placement.device, bytes);
                }
            }
            None => {
                // Nowhere to go: the group keeps what it holds.
                for (placement, held, holds) in &group.shards {
                    if *holds {
                        self.devices.take(placement.node, placement.device, *held);
                    }
                }
            }
        }
        let Some(placements) = chosen else {
            self.starved = true;
            return None;
        };
        if group.shards.iter().any(|(_, _, holds)| *holds) {
            // The move frees what the group held where it was.
            self.frees += 1;
        }
        self.commands.push(Command::ReassignReplica {
            group: group.view.id,
            epoch: group.view.epoch,
            shards: placements.clone(),
        });
        Some(placements)
    }

    fn remove(&mut self, group: &Group, reason: RemovalReason) {
        self.removed.insert(group.view.id);
        self.frees += 1;
        for (placement, held, holds) in &group.shards {
            if *holds {
                self.devices.give(placement.node, placement.device, *held);
            }
        }
        self.commands.push(Command::RemoveReplica {
            group: group.view.id,
            epoch: group.view.epoch,
            reason,
        });
    }

    /// Idle, ready, unsharded replicas of packed deployments, least recently used first.
    /// A replica the load does not mention is not known to be idle, so it is not a candidate.
    fn idle_replicas(&self) -> Vec<IdleReplica<'a>> {
        let state = self.state;
        let mut idle = Vec::new();
        for deployment in state.deployments.values() {
            let packed = deployment.spec.placement.allow_packing;
            if !packed || deployment.rollout.is_some() || deployment.spec.sharding.shards != 1 {
                continue;
            }
            for id in state.group_ids_of(deployment.name()) {
                let Some(replica) = state.replicas.get(&id) else {
                    continue;
                };
                let Some(load) = self.load.replicas.get(&id) else {
                    continue;
                };
                let quiet = load
                    .last_request_ms
                    .is_none_or(|at| self.now_ms.saturating_sub(at) >= EVICTION_IDLE_MIN_MS);
                let on_ready_node = self.devices.free(replica.node, replica.device).is_some();
                if replica.state == ReplicaState::Ready
                    && load.requests_in_flight == 0
                    && quiet
                    && on_ready_node
                {
                    idle.push(IdleReplica {
                        last_request_ms: load.last_request_ms,
                        group: id,
                        epoch: replica.epoch,
                        deployment: &replica.deployment,
                        placement: ShardPlacement {
                            node: replica.node,
                            device: replica.device,
                        },
                        bytes: replica.reserved_bytes,
                    });
                }
            }
        }
        // `None` (never served) sorts first: it is the least recently used.
        idle.sort_by_key(|replica| (replica.last_request_ms, replica.group));
        idle
    }

    /// Makes room for one shard of `bytes` for a packed deployment by evicting idle replicas
    /// of other packed deployments: on the first device where evicting the least recently
    /// used replicas frees enough. Proposes the evictions and returns the device.
    fn evict_for(&mut self, deployment: &Deployment, bytes: u64) -> Option<ShardPlacement> {
        if self.idle.is_none() {
            self.idle = Some(self.idle_replicas());
        }
        let idle = self.idle.take().unwrap_or_default();
        let state = self.state;
        let constraints = &deployment.spec.placement;
        // Groups each victim deployment can lose without dropping below its minimum.
        let budget = |name: &str, planner: &Planner<'a>| {
            state.deployments.get(name).map_or(0, |victim| {
                let cut = planner.desired_cut.get(name).copied().unwrap_or(0);
                victim
                    .replicas_desired
                    .saturating_sub(cut)
                    .saturating_sub(victim.spec.replicas.min)
            })
        };
        let mut freed: BTreeMap<ShardPlacement, (u64, Vec<usize>)> = BTreeMap::new();
        let mut taken: BTreeMap<(ShardPlacement, &str), u32> = BTreeMap::new();
        let mut chosen: Option<(ShardPlacement, Vec<usize>)> = None;
        for (position, candidate) in idle.iter().enumerate() {
            if candidate.deployment == deployment.name()
                || self.removed.contains(&candidate.group)
                || !self.devices.allows(
                    candidate.placement.node,
                    candidate.placement.device,
                    constraints,
                )
            {
                continue;
            }
            let used = taken
                .entry((candidate.placement, candidate.deployment))
                .or_insert(0);
            if *used >= budget(candidate.deployment, self) {
                continue;
            }
            *used += 1;
            let entry = freed.entry(candidate.placement).or_insert((0, Vec::new()));
            entry.0 += candidate.bytes;
            entry.1.push(position);
            let free = self
                .devices
                .free(candidate.placement.node, candidate.placement.device)
                .unwrap_or(0);
            if free.saturating_add(entry.0) >= bytes {
                chosen = Some((candidate.placement, entry.1.clone()));
                break;
            }
        }
        let result = chosen.map(|(placement, victims)| {
            for position in victims {
                let victim = &idle[position];
                self.removed.insert(victim.group);
                *self.desired_cut.entry(victim.deployment).or_insert(0) += 1;
                self.devices
                    .give(victim.placement.node, victim.placement.device, victim.bytes);
                self.commands.push(Command::RemoveReplica {
                    group: victim.group,
                    epoch: victim.epoch,
                    reason: RemovalReason::Evicted {
                        for_deployment: deployment.name().to_string(),
                        last_request_ms: victim.last_request_ms,
                    },
                });
            }
            placement
        });
        self.idle = Some(idle);
        result
    }
}

#[cfg(test)]
mod tests;
