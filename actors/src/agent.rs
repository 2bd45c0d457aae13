//! The agent: root of a host's supervision tree. It owns the device manager, starts and
//! stops replica actors to match this node's assignments, reports their state, and
//! publishes the table of serving replicas that the gateway routes by.

use crate::batcher::BatcherHandle;
use crate::compute::ComputePool;
use crate::device::{DeviceHandle, DeviceManager, DeviceManagerArgs, DevicePolicy};
use crate::replica::{LoadError, Loader, Replica, ReplicaArgs, ReplicaMsg, ReplicaSpec};
use crate::{ArtifactFetcher, ReplicaReporter};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use shoal_scheduler::{Device, DeviceId, ReplicaId, ReplicaState};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// When a crashed replica is started again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed within `window`; one more crash and the replica is reported Failed.
    pub restarts_max: u32,
    pub window: Duration,
    /// Wait before each restart.
    pub backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            restarts_max: 3,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(200),
        }
    }
}

/// How an agent runs its host.
#[derive(Clone)]
pub struct AgentConfig {
    /// This host's node id, for metric labels.
    pub node: String,
    /// Threads that run forward passes (and loads); at least one.
    pub compute_threads: usize,
    pub device_policy: DevicePolicy,
    pub restart: RestartPolicy,
    pub loader: Loader,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node: "1".to_string(),
            compute_threads: std::thread::available_parallelism().map_or(1, usize::from),
            device_policy: DevicePolicy::default(),
            restart: RestartPolicy::default(),
            loader: crate::replica::default_loader(),
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("node", &self.node)
            .field("compute_threads", &self.compute_threads)
            .field("device_policy", &self.device_policy)
            .field("restart", &self.restart)
            .finish_non_exhaustive()
    }
}

/// A replica that is serving, as the gateway sees it.
#[derive(Clone, Debug)]
pub struct Route {
    pub replica: ReplicaId,
    pub version: u32,
    pub handle: BatcherHandle,
}

/// Serving replicas by model name. Replaced whole on every change.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    pub by_model: BTreeMap<String, Vec<Route>>,
}

impl Routes {
    pub fn for_model(&self, model: &str) -> &[Route] {
        self.by_model.get(model).map_or(&[], Vec::as_slice)
    }

    /// Whether `replica` serves here.
    pub fn serves(&self, replica: ReplicaId) -> bool {
        self.by_model
            .values()
            .flatten()
            .any(|route| route.replica == replica)
    }
}

pub enum AgentMsg {
    /// The replicas this node should run, from the control plane. Anything running that
    /// is not in the list is stopped; anything missing is started.
    Reconcile(Vec<ReplicaSpec>),
    /// A replica finished loading and serves through `handle`.
    Serving {
        replica: ReplicaId,
        epoch: u64,
        handle: BatcherHandle,
    },
    /// The device manager evicted an idle replica to make room for another.
    Evicted {
        replica: ReplicaId,
        device: DeviceId,
    },
    /// A crashed replica's backoff is over: start it again if still assigned.
    Restart { replica: ReplicaId, epoch: u64 },
}

/// What the agent is started with.
pub struct AgentArgs {
    pub devices: Vec<Device>,
    pub fetcher: Arc<dyn ArtifactFetcher>,
    pub reporter: Arc<dyn ReplicaReporter>,
    pub routes: watch::Sender<Arc<Routes>>,
    pub config: AgentConfig,
}

#[derive(Debug)]
pub struct Agent;

struct Running {
    spec: ReplicaSpec,
    /// `None` while waiting out a restart backoff.
    actor: Option<ActorRef<ReplicaMsg>>,
    serving: Option<BatcherHandle>,
    /// When this replica crashed recently, oldest first, for the restart policy.
    crashes: VecDeque<Instant>,
}

pub struct AgentState {
    args: AgentArgs,
    devices: DeviceHandle,
    compute: ComputePool,
    replicas: BTreeMap<ReplicaId, Running>,
}

impl AgentState {
    fn publish_routes(&self) {
        let mut routes = Routes::default();
        for running in self.replicas.values() {
            if let Some(handle) = &running.serving {
                routes
                    .by_model
                    .entry(running.spec.model.clone())
                    .or_default()
                    .push(Route {
                        replica: running.spec.id,
                        version: running.spec.version,
                        handle: handle.clone(),
                    });
            }
        }
        let mut counts: BTreeMap<(&str, u32, &str), i64> = BTreeMap::new();
        for running in self.replicas.values() {
            let state = if running.serving.is_some() {
                "ready"
            } else {
                "loading"
            };
            let key = (running.spec.model.as_str(), running.spec.version, state);
            *counts.entry(key).or_default() += 1;
        }
        // Rebuilt from scratch, so a model this agent no longer runs leaves no stale series.
        let gauge = &shoal_ops::metrics::metrics().replicas;
        gauge.reset();
        for ((model, version, state), count) in counts {
            gauge
                .with_label_values(&[model, &version.to_string(), state])
                .set(count);
        }
        self.args.routes.send_replace(Arc::new(routes));
    }

    fn find_by_cell(&self, cell: &ActorCell) -> Option<ReplicaId> {
        self.replicas
            .iter()
            .find(|(_, running)| {
                running
                    .actor
                    .as_ref()
                    .is_some_and(|actor| actor.get_id() == cell.get_id())
            })
            .map(|(id, _)| *id)
    }

    /// Spawns the replica actor for `spec`, linked to the agent.
    async fn spawn_replica(
        &self,
        myself: &ActorRef<AgentMsg>,
        spec: &ReplicaSpec,
    ) -> Result<ActorRef<ReplicaMsg>, ractor::SpawnErr> {
        let args = ReplicaArgs {
            spec: spec.clone(),
            devices: self.devices.clone(),
            fetcher: Arc::clone(&self.args.fetcher),
            agent: myself.clone(),
            compute: self.compute.clone(),
            loader: Arc::clone(&self.args.config.loader),
        };
        let (actor, _) = Actor::spawn_linked(None, Replica, args, myself.get_cell()).await?;
        Ok(actor)
    }

    /// A replica failed. Load errors repeat, so they are reported; crashes are restarted
    /// while the restart policy allows.
    fn replica_failed(
        &mut self,
        myself: &ActorRef<AgentMsg>,
        id: ReplicaId,
        error: &ActorProcessingErr,
    ) {
        let reason = error.to_string();
        let is_load_error = error.downcast_ref::<LoadError>().is_some();
        let policy = self.args.config.restart.clone();
        let Some(running) = self.replicas.get_mut(&id) else {
            return;
        };
        self.devices.release(id, running.spec.device);
        running.actor = None;
        running.serving = None;
        let now = Instant::now();
        while running
            .crashes
            .front()
            .is_some_and(|at| now.duration_since(*at) > policy.window)
        {
            running.crashes.pop_front();
        }
        let epoch = running.spec.epoch;
        if is_load_error || running.crashes.len() >= policy.restarts_max as usize {
            tracing::warn!(replica = %id, %reason, "replica failed");
            self.replicas.remove(&id);
            self.args
                .reporter
                .report(id, epoch, ReplicaState::Failed, Some(reason));
        } else {
            running.crashes.push_back(now);
            let attempt = running.crashes.len();
            tracing::warn!(replica = %id, %reason, attempt, "replica crashed; restarting");
            self.args.reporter.report(
                id,
                epoch,
                ReplicaState::Loading,
                Some(format!("restarting after a crash: {reason}")),
            );
            let agent = myself.clone();
            tokio::spawn(async move {
                tokio::time::sleep(policy.backoff).await;
                let _ = agent.cast(AgentMsg::Restart { replica: id, epoch });
            });
        }
        self.publish_routes();
    }
}

impl Actor for Agent {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = AgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AgentMsg>,
        args: AgentArgs,
    ) -> Result<AgentState, ActorProcessingErr> {
        let agent = myself.clone();
        let device_args = DeviceManagerArgs {
            node: args.config.node.clone(),
            devices: args.devices.clone(),
            policy: args.config.device_policy.clone(),
            on_evict: Some(Arc::new(move |replica, device| {
                let _ = agent.cast(AgentMsg::Evicted { replica, device });
            })),
        };
        let (device_actor, _) =
            Actor::spawn_linked(None, DeviceManager, device_args, myself.get_cell()).await?;
        let compute = ComputePool::new(args.config.compute_threads)?;
        Ok(AgentState {
            devices: DeviceHandle::new(device_actor),
            compute,
            args,
            replicas: BTreeMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        message: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AgentMsg::Reconcile(wanted) => {
                let wanted: BTreeMap<ReplicaId, ReplicaSpec> =
                    wanted.into_iter().map(|spec| (spec.id, spec)).collect();
                let unwanted: Vec<ReplicaId> = state
                    .replicas
                    .iter()
                    .filter(|(id, running)| {
                        wanted.get(id).is_none_or(|s| s.epoch != running.spec.epoch)
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in unwanted {
                    let Some(running) = state.replicas.remove(&id) else {
                        continue;
                    };
                    let Some(actor) = running.actor else {
                        continue;
                    };
                    if running.serving.is_some() {
                        // Out of the routes first (below), then finish what it holds.
                        tracing::info!(replica = %id, "draining replica no longer assigned here");
                        let _ = actor.cast(ReplicaMsg::Drain(None));
                    } else {
                        tracing::info!(replica = %id, "stopping loading replica no longer assigned here");
                        actor.stop(Some("unassigned".into()));
                    }
                }
                for (id, spec) in wanted {
                    if state.replicas.contains_key(&id) {
                        continue;
                    }
                    state
                        .args
                        .reporter
                        .report(id, spec.epoch, ReplicaState::Loading, None);
                    match state.spawn_replica(&myself, &spec).await {
                        Ok(actor) => {
                            state.replicas.insert(
                                id,
                                Running {
                                    spec,
                                    actor: Some(actor),
                                    serving: None,
                                    crashes: VecDeque::new(),
                                },
                            );
                        }
                        Err(error) => {
                            let reason = format!("replica did not start: {error}");
                            state.args.reporter.report(
                                id,
                                spec.epoch,
                                ReplicaState::Failed,
                                Some(reason),
                            );
                        }
                    }
                }
                state.publish_routes();
            }
            AgentMsg::Serving {
                replica,
                epoch,
                handle,
            } => {
                if let Some(running) = state.replicas.get_mut(&replica)
                    && running.spec.epoch == epoch
                {
                    running.serving = Some(handle);
                    state
                        .args
                        .reporter
                        .report(replica, epoch, ReplicaState::Ready, None);
                    state.publish_routes();
                }
            }
            AgentMsg::Evicted { replica, device } => {
                if let Some(running) = state.replicas.remove(&replica) {
                    if let Some(actor) = running.actor {
                        actor.stop(Some("evicted".into()));
                    }
                    state.args.reporter.report(
                        replica,
                        running.spec.epoch,
                        ReplicaState::Failed,
                        Some(format!(
                            "evicted from {device} to make room for another replica"
                        )),
                    );
                    state.publish_routes();
                }
            }
            AgentMsg::Restart { replica, epoch } => {
                let spec = match state.replicas.get(&replica) {
                    Some(running) if running.spec.epoch == epoch && running.actor.is_none() => {
                        running.spec.clone()
                    }
                    _ => return Ok(()),
                };
                match state.spawn_replica(&myself, &spec).await {
                    Ok(actor) => {
                        if let Some(running) = state.replicas.get_mut(&replica) {
                            running.actor = Some(actor);
                        }
                    }
                    Err(error) => {
                        state.replicas.remove(&replica);
                        state.args.reporter.report(
                            replica,
                            epoch,
                            ReplicaState::Failed,
                            Some(format!("replica did not restart: {error}")),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<AgentMsg>,
        event: SupervisionEvent,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                if cell.get_id() == state.devices_id() {
                    // Without its ledger the agent cannot keep its promise; fail upward.
                    myself.stop(Some(format!("device manager failed: {error}")));
                    return Ok(());
                }
                if let Some(id) = state.find_by_cell(&cell) {
                    state.replica_failed(&myself, id, &error);
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(id) = state.find_by_cell(&cell) {
                    state.replicas.remove(&id);
                    state.publish_routes();
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl AgentState {
    fn devices_id(&self) -> ractor::ActorId {
        self.devices.actor_id()
    }
}

/// A typed handle over the agent's mailbox.
#[derive(Clone, Debug)]
pub struct AgentHandle {
    actor: ActorRef<AgentMsg>,
}

impl AgentHandle {
    pub fn new(actor: ActorRef<AgentMsg>) -> AgentHandle {
        AgentHandle { actor }
    }

    /// Asks the agent to match `wanted`. False when the agent is gone.
    pub fn reconcile(&self, wanted: Vec<ReplicaSpec>) -> bool {
        self.actor.cast(AgentMsg::Reconcile(wanted)).is_ok()
    }

    /// Stops the agent and every replica under it, and waits until they are gone.
    pub async fn stop(&self) {
        // Stopping a supervisor stops its linked children first.
        let _ = self
            .actor
            .stop_and_wait(Some("shutdown".into()), None)
            .await;
    }
}

/// Starts an agent with the default [`AgentConfig`]; returns its handle and a receiver
/// of the serving table.
pub async fn start(
    devices: Vec<Device>,
    fetcher: Arc<dyn ArtifactFetcher>,
    reporter: Arc<dyn ReplicaReporter>,
) -> Result<(AgentHandle, watch::Receiver<Arc<Routes>>), ractor::SpawnErr> {
    start_with(devices, fetcher, reporter, AgentConfig::default()).await
}

/// Starts an agent with `config`; returns its handle and a receiver of the serving table.
pub async fn start_with(
    devices: Vec<Device>,
    fetcher: Arc<dyn ArtifactFetcher>,
    reporter: Arc<dyn ReplicaReporter>,
    config: AgentConfig,
) -> Result<(AgentHandle, watch::Receiver<Arc<Routes>>), ractor::SpawnErr> {
    let (routes, routes_receiver) = watch::channel(Arc::new(Routes::default()));
    let args = AgentArgs {
        devices,
        fetcher,
        reporter,
        routes,
        config,
    };
    let (actor, _) = Actor::spawn(None, Agent, args).await?;
    Ok((AgentHandle::new(actor), routes_receiver))
}

#[cfg(test)]
mod tests;
