//! The agent: root of a host's supervision tree. It owns the device manager, starts and
//! stops replica actors to match this node's assignments, reports their state, and
//! publishes the table of serving replicas that the gateway routes by.

use crate::batcher::BatcherHandle;
use crate::device::{DeviceHandle, DeviceManager};
use crate::replica::{Replica, ReplicaArgs, ReplicaMsg, ReplicaSpec};
use crate::{ArtifactFetcher, ReplicaReporter};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use shoal_scheduler::{Device, ReplicaId, ReplicaState};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

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
}

/// What the agent is started with.
pub struct AgentArgs {
    pub devices: Vec<Device>,
    pub fetcher: Arc<dyn ArtifactFetcher>,
    pub reporter: Arc<dyn ReplicaReporter>,
    pub routes: watch::Sender<Arc<Routes>>,
}

#[derive(Debug)]
pub struct Agent;

struct Running {
    spec: ReplicaSpec,
    actor: ActorRef<ReplicaMsg>,
    serving: Option<BatcherHandle>,
}

pub struct AgentState {
    args: AgentArgs,
    devices: DeviceHandle,
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
        let serving = self
            .replicas
            .values()
            .filter(|r| r.serving.is_some())
            .count();
        let metrics = shoal_ops::metrics::metrics();
        metrics
            .replicas
            .with_label_values(&["ready"])
            .set(serving as i64);
        metrics
            .replicas
            .with_label_values(&["loading"])
            .set((self.replicas.len() - serving) as i64);
        self.args.routes.send_replace(Arc::new(routes));
    }

    fn find_by_cell(&self, cell: &ActorCell) -> Option<ReplicaId> {
        self.replicas
            .iter()
            .find(|(_, running)| running.actor.get_id() == cell.get_id())
            .map(|(id, _)| *id)
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
        let (device_actor, _) =
            Actor::spawn_linked(None, DeviceManager, args.devices.clone(), myself.get_cell())
                .await?;
        Ok(AgentState {
            devices: DeviceHandle::new(device_actor),
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
                    if let Some(running) = state.replicas.remove(&id) {
                        tracing::info!(replica = %id, "stopping replica no longer assigned here");
                        running.actor.stop(Some("unassigned".into()));
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
                    let args = ReplicaArgs {
                        spec: spec.clone(),
                        devices: state.devices.clone(),
                        fetcher: Arc::clone(&state.args.fetcher),
                        agent: myself.clone(),
                    };
                    match Actor::spawn_linked(None, Replica, args, myself.get_cell()).await {
                        Ok((actor, _)) => {
                            state.replicas.insert(
                                id,
                                Running {
                                    spec,
                                    actor,
                                    serving: None,
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
                if let Some(id) = state.find_by_cell(&cell)
                    && let Some(running) = state.replicas.remove(&id)
                {
                    let reason = error.to_string();
                    tracing::warn!(replica = %id, %reason, "replica failed");
                    state.devices.release(id, running.spec.device);
                    state.args.reporter.report(
                        id,
                        running.spec.epoch,
                        ReplicaState::Failed,
                        Some(reason),
                    );
                    state.publish_routes();
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

/// Starts an agent; returns its handle and a receiver of the serving table.
pub async fn start(
    devices: Vec<Device>,
    fetcher: Arc<dyn ArtifactFetcher>,
    reporter: Arc<dyn ReplicaReporter>,
) -> Result<(AgentHandle, watch::Receiver<Arc<Routes>>), ractor::SpawnErr> {
    let (routes, routes_receiver) = watch::channel(Arc::new(Routes::default()));
    let args = AgentArgs {
        devices,
        fetcher,
        reporter,
        routes,
    };
    let (actor, _) = Actor::spawn(None, Agent, args).await?;
    Ok((AgentHandle::new(actor), routes_receiver))
}

#[cfg(test)]
mod tests;
