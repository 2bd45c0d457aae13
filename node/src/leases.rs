//! Node leases, held in memory by the leader. Agents renew theirs with heartbeats, which
//! are not raft entries; only the transitions they cause are (a node registered, marked
//! Down, back to Ready). A new leader grants every node a fresh lease before judging any.

use crate::control::ControlPlane;
use shoal_scheduler::autoscale::{Autoscaler, recommended_replicas};
use shoal_scheduler::{
    ClusterState, Command, DeploymentLoad, LoadSnapshot, NodeId, NodeStatus, ReplicaId, ReplicaLoad,
};
use std::collections::{BTreeMap, HashMap};
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

    /// Gives every node in `state` a lease of [`NEW_LEADER_GRACE`] from `now`: what a new
    /// leader does, since it has not been hearing heartbeats until now and agents need a
    /// moment to find it.
    fn grant_all(&self, state: &ClusterState, now: Instant) {
        if let Ok(mut expires) = self.expires.lock() {
            expires.clear();
            for node in state.nodes.keys() {
                expires.insert(*node, now + NEW_LEADER_GRACE);
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

/// Live load: what agents last reported per replica, and requests gateways hold for
/// deployments scaled to zero. Kept in memory on every server; the leader's feeds the
/// autoscaler. Never replicated.
#[derive(Debug, Default)]
pub struct LoadBoard {
    replicas: Mutex<HashMap<NodeId, BTreeMap<ReplicaId, ReplicaLoad>>>,
    held: Mutex<HashMap<String, u64>>,
    /// Woken when a request is held, so the autoscaler brings a deployment back from
    /// zero at once instead of at its next look.
    held_request: tokio::sync::Notify,
}

impl LoadBoard {
    /// Records a node's report, replacing its previous one.
    pub fn report(&self, node: NodeId, load: BTreeMap<ReplicaId, ReplicaLoad>) {
        if let Ok(mut replicas) = self.replicas.lock() {
            replicas.insert(node, load);
        }
    }

    /// Counts a request waiting at a gateway for a deployment with no replica, until the
    /// guard is dropped: answered, timed out, or given up by a caller that went away.
    pub fn hold<'a>(&'a self, deployment: &'a str) -> HeldRequest<'a> {
        if let Ok(mut held) = self.held.lock() {
            *held.entry(deployment.to_string()).or_insert(0) += 1;
        }
        self.held_request.notify_one();
        HeldRequest {
            board: self,
            deployment,
        }
    }

    /// The load of every deployment in `state`, from the replicas it still has.
    pub fn snapshot(&self, state: &ClusterState) -> LoadSnapshot {
        let mut snapshot = LoadSnapshot::default();
        if let Ok(nodes) = self.replicas.lock() {
            for (node, replicas) in nodes.iter() {
                for (id, load) in replicas {
                    let Some(replica) = state.replicas.get(id) else {
                        continue;
                    };
                    if replica.node != *node {
                        continue;
                    }
                    snapshot.replicas.insert(*id, *load);
                    let deployment: &mut DeploymentLoad = snapshot
                        .deployments
                        .entry(replica.deployment.clone())
                        .or_default();
                    deployment.requests_in_flight += load.requests_in_flight;
                    deployment.last_request_ms =
                        deployment.last_request_ms.max(load.last_request_ms);
                }
            }
        }
        if let Ok(held) = self.held.lock() {
            for (name, count) in held.iter().filter(|(_, count)| **count > 0) {
                snapshot
                    .deployments
                    .entry(name.clone())
                    .or_default()
                    .requests_held = *count;
            }
        }
        snapshot
    }
}

/// Counts each replica's traffic where its requests are served (an agent, or `shoal up`
/// for its own replicas) and turns it into the load the autoscaler reads.
#[derive(Debug, Default)]
pub struct TrafficMeter {
    /// Locked only to update counters, never across an await.
    replicas: Mutex<HashMap<u64, Traffic>>,
}

/// One replica's traffic since the last report.
#[derive(Debug, Default)]
struct Traffic {
    in_flight: u64,
    /// Summed time requests spent here since the last report: divided by the interval it
    /// is the average number in flight (Little's law), which a sample at one instant
    /// would miss for fast models.
    busy: Duration,
    last_request_ms: Option<u64>,
}

impl TrafficMeter {
    /// Counts a request to `replica` that arrived at `since`, until the guard is dropped.
    pub fn track(self: &std::sync::Arc<Self>, replica: u64, since: Instant) -> Tracked {
        if let Ok(mut replicas) = self.replicas.lock() {
            replicas.entry(replica).or_default().in_flight += 1;
        }
        Tracked {
            meter: self.clone(),
            replica,
            since,
        }
    }

    fn finished(&self, replica: u64, took: Duration) {
        if let Ok(mut replicas) = self.replicas.lock() {
            let traffic = replicas.entry(replica).or_default();
            traffic.in_flight = traffic.in_flight.saturating_sub(1);
            traffic.busy += took;
            traffic.last_request_ms = Some(crate::store::now_ms());
        }
    }

    /// Each replica's load over the `interval` just ended; starts the next one.
    pub fn take_load(&self, interval: Duration) -> BTreeMap<u64, ReplicaLoad> {
        let Ok(mut replicas) = self.replicas.lock() else {
            return BTreeMap::new();
        };
        replicas
            .iter_mut()
            .map(|(replica, traffic)| {
                let average = (traffic.busy.as_secs_f64() / interval.as_secs_f64()).ceil() as u64;
                traffic.busy = Duration::ZERO;
                let load = ReplicaLoad {
                    requests_in_flight: average.max(traffic.in_flight),
                    last_request_ms: traffic.last_request_ms,
                };
                (*replica, load)
            })
            .collect()
    }
}

/// A request counted against its replica until dropped.
pub struct Tracked {
    meter: std::sync::Arc<TrafficMeter>,
    replica: u64,
    since: Instant,
}

impl Tracked {
    /// `stream` (a generation's tokens), with its request counted until it is dropped:
    /// a generation holds its replica for as long as it streams.
    pub fn over<S: futures_util::Stream>(
        self,
        stream: S,
    ) -> impl futures_util::Stream<Item = S::Item> {
        use futures_util::StreamExt;
        stream.map(move |item| {
            let _counted = &self;
            item
        })
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.meter.finished(self.replica, self.since.elapsed());
    }
}

/// `shoal up`'s own replicas, which no agent reports: their load goes to `board` as this
/// node's every `interval`, as an agent's heartbeat would carry it, until `shutdown`.
pub async fn report_own_load(
    meter: std::sync::Arc<TrafficMeter>,
    board: std::sync::Arc<LoadBoard>,
    node: NodeId,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(interval) => {}
        }
        board.report(
            node,
            meter
                .take_load(interval)
                .into_iter()
                .map(|(id, load)| (ReplicaId(id), load))
                .collect(),
        );
    }
}

/// A request counted as held (see [`LoadBoard::hold`]).
pub struct HeldRequest<'a> {
    board: &'a LoadBoard,
    deployment: &'a str,
}

impl Drop for HeldRequest<'_> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.board.held.lock()
            && let Some(count) = held.get_mut(self.deployment)
        {
            *count = count.saturating_sub(1);
        }
    }
}

/// How often the leader's autoscaler looks at the load.
const AUTOSCALE_INTERVAL: Duration = Duration::from_millis(500);

/// On the leader, turns load into replica counts, until `shutdown` fires.
pub async fn run_autoscaler(
    control: ControlPlane,
    board: std::sync::Arc<LoadBoard>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut autoscaler = Autoscaler::new();
    loop {
        let metrics = shoal_ops::metrics::metrics();
        if control.raft_status().is_leader {
            let state = control.state();
            let load = board.snapshot(&state);
            publish_recommendations(&state, &load);
            for command in autoscaler.decide(&state, &load, crate::store::now_ms()) {
                let Command::SetDesiredReplicas {
                    deployment,
                    replicas,
                } = &command
                else {
                    continue;
                };
                let current = state
                    .deployments
                    .get(deployment)
                    .map_or(0, |d| d.replicas_desired);
                let direction = if *replicas > current { "up" } else { "down" };
                match control.propose(&command).await {
                    Ok(_) => {
                        tracing::info!(?command, "autoscaler changed a replica count");
                        metrics
                            .autoscaler_decisions_total
                            .with_label_values(&[deployment, direction])
                            .inc();
                    }
                    Err(error) => tracing::warn!(%error, "autoscaler proposal not applied"),
                }
            }
        } else {
            // A new leader starts with fresh stabilisation windows.
            autoscaler = Autoscaler::new();
            metrics.autoscaler_recommended_replicas.reset();
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            () = board.held_request.notified() => {}
            () = tokio::time::sleep(AUTOSCALE_INTERVAL) => {}
        }
    }
}

/// Sets what the load asks of each autoscaled deployment, windows aside.
fn publish_recommendations(state: &ClusterState, load: &LoadSnapshot) {
    let metrics = shoal_ops::metrics::metrics();
    let gauge = &metrics.autoscaler_recommended_replicas;
    let decisions = &metrics.autoscaler_decisions_total;
    gauge.reset();
    let idle = DeploymentLoad::default();
    for deployment in state.deployments.values() {
        let Some(policy) = &deployment.spec.autoscale else {
            continue;
        };
        let bounds = deployment.spec.replicas;
        let load = load.deployments.get(deployment.name()).unwrap_or(&idle);
        let recommended = recommended_replicas(policy, bounds.min, bounds.max, load);
        // Both directions exist from the start, so a rate over decisions is defined.
        for direction in ["up", "down"] {
            decisions.with_label_values(&[deployment.name(), direction]);
        }
        gauge
            .with_label_values(&[deployment.name()])
            .set(i64::from(recommended));
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

    #[test]
    fn a_stream_counts_as_its_replicas_traffic_until_it_is_dropped() {
        use futures_util::{FutureExt, StreamExt};
        let meter = std::sync::Arc::new(TrafficMeter::default());
        let in_flight = |meter: &TrafficMeter| {
            meter
                .take_load(Duration::from_secs(1))
                .get(&7)
                .map_or(0, |load| load.requests_in_flight)
        };
        let mut tokens = meter
            .track(7, Instant::now())
            .over(futures_util::stream::iter(["a", "b"]));
        assert_eq!(in_flight(&meter), 1);
        assert_eq!(tokens.next().now_or_never(), Some(Some("a")));
        assert_eq!(in_flight(&meter), 1, "still streaming");
        drop(tokens);
        let load = meter.take_load(Duration::from_secs(1))[&7];
        assert!(
            load.last_request_ms.is_some(),
            "its end is the replica's last request"
        );
        assert_eq!(load.requests_in_flight, 1, "busy for part of this interval");
        assert_eq!(in_flight(&meter), 0, "and none of the next");
    }

    #[test]
    fn a_held_request_wakes_the_autoscaler_before_its_next_look() {
        use futures_util::FutureExt;
        let board = LoadBoard::default();
        let held = board.hold("iris");
        // The wake-up is stored for the autoscaler's next wait, which ends at once.
        assert!(board.held_request.notified().now_or_never().is_some());
        // Nothing held, nothing stored: the autoscaler waits out its interval.
        assert!(board.held_request.notified().now_or_never().is_none());
        let load = |board: &LoadBoard| {
            board
                .snapshot(&ClusterState::default())
                .deployments
                .get("iris")
                .map_or(0, |load| load.requests_held)
        };
        assert_eq!(load(&board), 1);
        // However the wait ends (a caller that goes away drops it too), it is let go.
        drop(held);
        assert_eq!(load(&board), 0);
    }
}
