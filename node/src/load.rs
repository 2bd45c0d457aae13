//! The live load the autoscaler reads, and the autoscaler's loop. A `TrafficMeter` counts
//! each replica's requests where they are served (an agent's data plane, or `shoal up`'s
//! gateway for its own replicas); agents report that load with their heartbeats and
//! `shoal up` to itself; every server keeps the reports, with the requests its gateway
//! holds for deployments scaled to zero, on its `LoadBoard`; the leader's autoscaler
//! turns the board into replica counts. None of it is replicated.

use crate::control::ControlPlane;
use shoal_scheduler::autoscale::{Autoscaler, recommended_replicas};
use shoal_scheduler::{
    ClusterState, Command, DeploymentLoad, LoadSnapshot, NodeId, ReplicaId, ReplicaLoad,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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
    /// Refused, with how many are held, when `most` already are.
    pub fn hold<'a>(&'a self, deployment: &'a str, most: u64) -> Result<HeldRequest<'a>, u64> {
        if let Ok(mut held) = self.held.lock() {
            let count = held.entry(deployment.to_string()).or_insert(0);
            if *count >= most {
                return Err(*count);
            }
            *count += 1;
        }
        self.held_request.notify_one();
        Ok(HeldRequest {
            board: self,
            deployment,
        })
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
#[derive(Debug)]
struct Traffic {
    in_flight: u64,
    /// The time requests spent here since `window_from`, summed up to `counted_to`:
    /// divided by the window it is the average number in flight (Little's law), which a
    /// sample at one instant would miss for fast models. Counted as it passes, so a
    /// generation that streams for a minute weighs one request in each report, not sixty
    /// in the one it ends in.
    busy: Duration,
    counted_to: Instant,
    /// Where this report's window began: the last report, or the replica's first request.
    /// Reports come as often as the reporter manages, not exactly on its interval.
    window_from: Instant,
    last_request_ms: Option<u64>,
}

impl Traffic {
    fn new(now: Instant) -> Traffic {
        Traffic {
            in_flight: 0,
            busy: Duration::ZERO,
            counted_to: now,
            window_from: now,
            last_request_ms: None,
        }
    }

    /// Adds the time in flight up to `now`.
    fn count_to(&mut self, now: Instant) {
        let passed = now.saturating_duration_since(self.counted_to);
        let in_flight = u32::try_from(self.in_flight).unwrap_or(u32::MAX);
        self.busy = self.busy.saturating_add(passed.saturating_mul(in_flight));
        self.counted_to = self.counted_to.max(now);
    }

    /// The requests in flight on average since the window began, rounded up, and never
    /// fewer than are in flight now; starts the next window at `now`.
    fn take_average(&mut self, now: Instant) -> u64 {
        self.count_to(now);
        let window = now.saturating_duration_since(self.window_from);
        // In whole nanoseconds: a float division of exact sums could land an ulp above a
        // whole number and round up a request that is not there.
        let average = if window.is_zero() {
            0
        } else {
            let average = self.busy.as_nanos().div_ceil(window.as_nanos());
            u64::try_from(average).unwrap_or(u64::MAX)
        };
        self.busy = Duration::ZERO;
        self.window_from = now;
        average.max(self.in_flight)
    }
}

impl TrafficMeter {
    /// Counts a request to `replica` that arrived at `since`, until the guard is dropped.
    pub fn track(self: &std::sync::Arc<Self>, replica: u64, since: Instant) -> Tracked {
        self.started(replica, since, Instant::now());
        Tracked {
            meter: self.clone(),
            replica,
        }
    }

    fn started(&self, replica: u64, since: Instant, now: Instant) {
        if let Ok(mut replicas) = self.replicas.lock() {
            let traffic = replicas
                .entry(replica)
                .or_insert_with(|| Traffic::new(since.min(now)));
            traffic.count_to(now);
            // What it spent before it was counted (reading its body) counts too, within
            // this window.
            traffic.busy += now.saturating_duration_since(since.max(traffic.window_from));
            traffic.in_flight += 1;
        }
    }

    fn finished(&self, replica: u64, now: Instant) {
        if let Ok(mut replicas) = self.replicas.lock() {
            let traffic = replicas.entry(replica).or_insert_with(|| Traffic::new(now));
            traffic.count_to(now);
            traffic.in_flight = traffic.in_flight.saturating_sub(1);
            traffic.last_request_ms = Some(crate::store::now_ms());
        }
    }

    /// Each replica's load since the last call; starts the next window. Replicas not in
    /// `serving` are forgotten once nothing of theirs is in flight.
    pub fn take_load(&self, serving: impl Fn(u64) -> bool) -> BTreeMap<u64, ReplicaLoad> {
        self.load_at(serving, Instant::now())
    }

    fn load_at(&self, serving: impl Fn(u64) -> bool, now: Instant) -> BTreeMap<u64, ReplicaLoad> {
        let Ok(mut replicas) = self.replicas.lock() else {
            return BTreeMap::new();
        };
        replicas.retain(|replica, traffic| traffic.in_flight > 0 || serving(*replica));
        replicas
            .iter_mut()
            .map(|(replica, traffic)| {
                let load = ReplicaLoad {
                    requests_in_flight: traffic.take_average(now),
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
}

impl Tracked {
    /// `stream` (a generation's tokens), with its request counted until it is dropped:
    /// a generation holds its replica for as long as it streams.
    pub fn during<S: futures_util::Stream>(
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
        self.meter.finished(self.replica, Instant::now());
    }
}

/// `shoal up`'s own replicas, which no agent reports: their load goes to `board` as this
/// node's every `interval`, as an agent's heartbeat would carry it, until `shutdown`.
pub async fn report_own_load(
    meter: std::sync::Arc<TrafficMeter>,
    routes: watch::Receiver<std::sync::Arc<shoal_actors::agent::Routes>>,
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
        let serving = routes.borrow().clone();
        let load = meter
            .take_load(|replica| serving.serves(ReplicaId(replica)))
            .into_iter()
            .map(|(replica, load)| (ReplicaId(replica), load))
            .collect();
        board.report(node, load);
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Replica 7's requests in flight over the window that ends at `now`.
    fn in_flight(meter: &TrafficMeter, now: Instant) -> u64 {
        meter
            .load_at(|_| true, now)
            .get(&7)
            .map_or(0, |load| load.requests_in_flight)
    }

    #[test]
    fn a_long_request_weighs_one_in_every_interval_it_spans_not_all_in_the_last() {
        let meter = TrafficMeter::default();
        let start = Instant::now();
        meter.started(7, start, start);
        assert_eq!(in_flight(&meter, start + SECOND), 1);
        assert_eq!(in_flight(&meter, start + 2 * SECOND), 1);
        meter.finished(7, start + 5 * SECOND / 2);
        assert_eq!(in_flight(&meter, start + 3 * SECOND), 1, "busy half of it");
        assert_eq!(in_flight(&meter, start + 4 * SECOND), 0);
    }

    #[test]
    fn reports_that_come_late_or_are_skipped_do_not_inflate_the_load() {
        let meter = TrafficMeter::default();
        let start = Instant::now();
        meter.started(7, start, start);
        let late = SECOND + Duration::from_millis(3);
        assert_eq!(in_flight(&meter, start + late), 1, "a report 3 ms late");
        // A report that did not get through: the next covers both windows.
        assert_eq!(in_flight(&meter, start + late + 3 * SECOND), 1);
    }

    #[test]
    fn many_short_requests_weigh_what_they_overlap() {
        let meter = TrafficMeter::default();
        let start = Instant::now();
        // Three at a time, back to back, for the whole second.
        for step in 0..100 {
            let at = start + SECOND * step / 100;
            for _ in 0..3 {
                meter.started(7, at, at);
            }
            for _ in 0..3 {
                meter.finished(7, at + SECOND / 100);
            }
        }
        assert_eq!(in_flight(&meter, start + SECOND), 3);
    }

    #[test]
    fn a_replica_that_no_longer_serves_is_forgotten_once_idle() {
        let meter = TrafficMeter::default();
        let start = Instant::now();
        meter.started(7, start, start);
        let gone = |_| false;
        assert!(meter.load_at(gone, start + SECOND).contains_key(&7));
        meter.finished(7, start + SECOND);
        assert!(meter.load_at(gone, start + 2 * SECOND).is_empty());
    }

    #[test]
    fn a_stream_counts_as_its_replicas_traffic_until_it_is_dropped() {
        use futures_util::{FutureExt, StreamExt};
        let meter = std::sync::Arc::new(TrafficMeter::default());
        let mut tokens = meter
            .track(7, Instant::now())
            .during(futures_util::stream::iter(["a", "b"]));
        assert_eq!(tokens.next().now_or_never(), Some(Some("a")));
        let now = Instant::now();
        assert_eq!(in_flight(&meter, now), 1, "still streaming");
        drop(tokens);
        let load = meter.load_at(|_| true, now + SECOND)[&7];
        assert!(
            load.last_request_ms.is_some(),
            "its end is the replica's last request"
        );
        assert_eq!(in_flight(&meter, now + 2 * SECOND), 0);
    }

    #[test]
    fn a_held_request_wakes_the_autoscaler_before_its_next_look() {
        use futures_util::FutureExt;
        let board = LoadBoard::default();
        let held = board.hold("iris", 2).unwrap();
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
        let second = board.hold("iris", 2).unwrap();
        assert_eq!(board.hold("iris", 2).err(), Some(2), "at most two");
        // However the wait ends (a caller that goes away drops it too), it is let go.
        drop(held);
        drop(second);
        assert_eq!(load(&board), 0);
    }
}
