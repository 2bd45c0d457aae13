//! The node's long-running tasks that connect the control plane and the agent:
//! the placement controller, the reconciler and the replica-state reporter.

use crate::control::ControlPlane;
use shoal_actors::ReplicaReporter;
use shoal_actors::agent::AgentHandle;
use shoal_actors::replica::ReplicaSpec;
use shoal_scheduler::backoff::FailureMemory;
use shoal_scheduler::{
    ClusterState, Command, LoadSnapshot, NodeId, ReplicaId, ReplicaState, placement,
};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How often the controller plans even when the state has not changed, so a refused plan
/// is retried.
const PLAN_INTERVAL: Duration = Duration::from_secs(1);

/// Replica reports waiting to be proposed. A report is small and agents send a few per
/// replica lifetime; beyond this something is badly stuck and reports are dropped with a
/// warning (the next reconcile repeats them).
const REPORT_QUEUE_CAPACITY: usize = 1_024;

/// On the leader, turns placement plans into proposals until `shutdown` fires.
pub async fn run_controller(control: ControlPlane, mut shutdown: watch::Receiver<bool>) {
    let mut states = control.watch_state();
    // Which failed groups wait before they are placed again: this leader's memory only.
    let mut failures = FailureMemory::default();
    loop {
        if control.raft_status().is_leader {
            let state = control.state();
            let metrics = shoal_ops::metrics::metrics();
            let started = std::time::Instant::now();
            let now_ms = now_ms();
            failures.observe(&state, now_ms);
            // No live traffic is gathered here: a snapshot without it judges no canary and
            // evicts nothing.
            let load = LoadSnapshot {
                failing: failures.failing(),
                ..LoadSnapshot::default()
            };
            let plan = placement::plan(&state, &load, now_ms);
            metrics
                .placement_round_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            for command in plan {
                let result = match control.propose(&command).await {
                    Ok(outcome) => {
                        tracing::info!(?outcome, "placement applied");
                        if let Command::RollbackRollout {
                            deployment,
                            version,
                            reason,
                        } = &command
                        {
                            tracing::warn!(%deployment, version, ?reason, "rollout rolled back");
                        }
                        "applied"
                    }
                    Err(error) => {
                        tracing::warn!(%error, "placement proposal not applied");
                        "refused"
                    }
                };
                metrics
                    .placement_commands_total
                    .with_label_values(&[command.kind(), result])
                    .inc();
            }
        } else {
            failures = FailureMemory::default();
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            changed = states.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(PLAN_INTERVAL) => {}
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// What `node` should run, from the replicated state.
pub fn assignments(state: &ClusterState, node: NodeId) -> Vec<ReplicaSpec> {
    state
        .replicas_on(node)
        .filter(|replica| replica.state.holds_memory())
        .filter_map(|replica| {
            let version = state.version(&replica.model, replica.version)?;
            let deployment = state.deployments.get(&replica.deployment)?;
            Some(ReplicaSpec {
                id: replica.id,
                epoch: replica.epoch,
                model: replica.model.clone(),
                version: replica.version,
                device: replica.device,
                reserved_bytes: replica.reserved_bytes,
                files: version.files.clone(),
                batching: deployment.spec.batching,
            })
        })
        .collect()
}

/// Tells the agent what to run whenever this node's assignments change.
pub async fn run_reconciler(
    control: ControlPlane,
    node: NodeId,
    agent: AgentHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut states = control.watch_state();
    let mut last_sent: Option<Vec<ReplicaSpec>> = None;
    loop {
        let wanted = assignments(&control.state(), node);
        if last_sent.as_ref() != Some(&wanted) {
            if !agent.reconcile(wanted.clone()) {
                tracing::warn!("agent is gone; reconciler stops");
                break;
            }
            last_sent = Some(wanted);
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            changed = states.changed() => if changed.is_err() { break },
        }
    }
}

struct Report {
    replica: ReplicaId,
    epoch: u64,
    state: ReplicaState,
    failure: Option<String>,
}

/// Proposes the agent's replica reports, in order, through a bounded queue.
#[derive(Debug)]
pub struct ProposingReporter {
    reports: mpsc::Sender<Report>,
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} epoch {} {:?}", self.replica, self.epoch, self.state)
    }
}

impl ProposingReporter {
    /// Starts the task that proposes reports; it ends when the reporter is dropped.
    pub fn start(control: ControlPlane) -> ProposingReporter {
        let (reports, mut queue) = mpsc::channel::<Report>(REPORT_QUEUE_CAPACITY);
        tokio::spawn(async move {
            while let Some(report) = queue.recv().await {
                let command = Command::SetReplicaState {
                    replica: report.replica,
                    epoch: report.epoch,
                    state: report.state,
                    failure: report.failure,
                };
                if let Err(error) = control.propose(&command).await {
                    tracing::warn!(replica = %report.replica, %error, "replica report not applied");
                }
            }
        });
        ProposingReporter { reports }
    }
}

impl ReplicaReporter for ProposingReporter {
    fn report(&self, replica: ReplicaId, epoch: u64, state: ReplicaState, failure: Option<String>) {
        let report = Report {
            replica,
            epoch,
            state,
            failure,
        };
        if let Err(error) = self.reports.try_send(report) {
            tracing::warn!(%replica, %error, "replica report dropped: queue full");
        }
    }
}
