//! The agents' side of the admin API: heartbeats that renew a node's lease (and register
//! or revive it), long-polled assignments, replica reports; and the operator's node list
//! and drain switch.

use super::cluster::{WriteRequest, Written, propose};
use super::{AdminError, ApiError, AppState};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shoal_scheduler::{
    ArtifactFile, BatchingPolicy, ClusterState, Command, Device, DeviceId, NodeId, NodeStatus,
    ReplicaId, ReplicaLoad, ReplicaState,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest an assignments poll waits for a change.
const POLL_WAIT_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Where the agent's data plane listens, `host:port`.
    pub address: String,
    pub devices: Vec<Device>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Load of each replica the agent runs, by replica id.
    #[serde(default)]
    pub load: BTreeMap<u64, ReplicaLoad>,
}

/// `POST /api/v1/nodes/{id}/heartbeat`: renews the node's lease on the leader, registering
/// the node (or its new devices) and bringing it back from Down when needed.
pub async fn heartbeat(
    State(app): State<Arc<AppState>>,
    Path(id): Path<u64>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let beat: Heartbeat = write.json()?;
    if let Err(answer) = write.leader_or_forward(&app).await? {
        return Ok(answer);
    }
    let node = NodeId(id);
    let Some(leases) = &app.leases else {
        return Err(ApiError::NotFound("this process keeps no node leases".into()).into());
    };
    leases.renew(node, Instant::now());
    app.load.report(
        node,
        beat.load
            .iter()
            .map(|(id, load)| (ReplicaId(*id), *load))
            .collect(),
    );
    let state = app.control.state();
    let known = state.nodes.get(&node);
    let changed = known.is_none_or(|known| {
        known.address != beat.address
            || known.devices != beat.devices
            || known.labels != beat.labels
    });
    if changed {
        let command = Command::RegisterNode {
            id: node,
            address: beat.address.clone(),
            devices: beat.devices.clone(),
            labels: beat.labels.clone(),
        };
        app.control.propose(&command).await?;
        tracing::info!(%node, address = %beat.address, "node registered");
    } else if known.is_some_and(|known| known.status == NodeStatus::Down) {
        let command = Command::SetNodeStatus {
            node,
            status: NodeStatus::Ready,
        };
        app.control.propose(&command).await?;
        tracing::info!(%node, "node back from down");
    }
    Ok(Json(serde_json::json!({
        "revision": app.control.state().applied_index,
        "lease_ms": crate::leases::LEASE_TTL.as_millis() as u64,
    }))
    .into_response())
}

/// One replica a node should run, as agents receive it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub id: ReplicaId,
    pub epoch: u64,
    pub model: String,
    pub version: u32,
    pub device: DeviceId,
    pub reserved_bytes: u64,
    pub files: Vec<ArtifactFile>,
    pub batching: BatchingPolicy,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Assignments {
    /// The state revision these reflect; poll again with it to wait for the next change.
    pub revision: u64,
    /// False when the node is Down: it must stop everything.
    pub node_up: bool,
    pub replicas: Vec<Assignment>,
}

#[derive(Debug, Deserialize)]
pub struct PollOptions {
    #[serde(default)]
    revision: u64,
    #[serde(default)]
    wait_ms: u64,
}

/// What node `node` should run in `state`.
fn view(state: &ClusterState, node: NodeId) -> (bool, Vec<Assignment>) {
    let node_up = state
        .nodes
        .get(&node)
        .is_some_and(|known| known.status != NodeStatus::Down);
    if !node_up {
        return (false, Vec::new());
    }
    let replicas = crate::loops::assignments(state, node)
        .into_iter()
        .map(|spec| Assignment {
            id: spec.id,
            epoch: spec.epoch,
            model: spec.model,
            version: spec.version,
            device: spec.device,
            reserved_bytes: spec.reserved_bytes,
            files: spec.files,
            batching: spec.batching,
        })
        .collect();
    (true, replicas)
}

/// `GET /api/v1/nodes/{id}/assignments?revision=N&wait_ms=M`, a blocking query: a caller
/// behind revision N gets the current view at once; one that is current waits until this
/// node's view (its replicas, or whether it is up) changes, or M ms pass.
pub async fn assignments(
    State(app): State<Arc<AppState>>,
    Path(id): Path<u64>,
    Query(options): Query<PollOptions>,
) -> Json<Assignments> {
    let node = NodeId(id);
    let wait = Duration::from_millis(options.wait_ms).min(POLL_WAIT_MAX);
    let mut states = app.control.watch_state();
    let current = states.borrow_and_update().clone();
    let start_view = view(&current, node);
    if current.applied_index <= options.revision && !wait.is_zero() {
        let _ = tokio::time::timeout(wait, async {
            while states.changed().await.is_ok() {
                let state = states.borrow_and_update().clone();
                if view(&state, node) != start_view {
                    return;
                }
            }
        })
        .await;
    }
    let state = app.control.state();
    let (node_up, replicas) = view(&state, node);
    Json(Assignments {
        revision: state.applied_index,
        node_up,
        replicas,
    })
}

/// The header naming the leader in a state answer, for followers of the state.
pub const LEADER_HEADER: &str = "x-shoal-leader";

/// `GET /api/v1/state?revision=N&wait_ms=M`: the whole cluster state (bincode), for a
/// standalone gateway; a blocking query that answers once the state is past revision N
/// or M ms passed.
pub async fn state(
    State(app): State<Arc<AppState>>,
    Query(options): Query<PollOptions>,
) -> Response {
    let wait = Duration::from_millis(options.wait_ms).min(POLL_WAIT_MAX);
    let mut states = app.control.watch_state();
    let _ = tokio::time::timeout(
        wait,
        states.wait_for(|state| state.applied_index > options.revision),
    )
    .await;
    let state = app.control.state();
    let Ok(bytes) = bincode::serde::encode_to_vec(state.as_ref(), crate::control::wire()) else {
        return ApiError::Internal("encoding the state failed".into()).into_response();
    };
    let leader = app
        .control
        .raft_status()
        .leader
        .map_or_else(String::new, |leader| leader.to_string());
    (
        [
            ("content-type", "application/octet-stream".to_string()),
            (LEADER_HEADER, leader),
        ],
        bytes,
    )
        .into_response()
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaReport {
    pub epoch: u64,
    pub state: ReplicaState,
    #[serde(default)]
    pub failure: Option<String>,
}

/// `POST /api/v1/replicas/{id}/state`: an agent's report on a replica; stale epochs are
/// refused (409).
pub async fn report(
    State(app): State<Arc<AppState>>,
    Path(id): Path<u64>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let report: ReplicaReport = write.json()?;
    let command = Command::SetReplicaState {
        replica: ReplicaId(id),
        epoch: report.epoch,
        state: report.state,
        failure: report.failure,
    };
    match propose(&app, write, &command).await? {
        Written::Forwarded(response) => Ok(response),
        Written::Here(_) => Ok(Json(serde_json::json!({"replica": id})).into_response()),
    }
}

#[derive(Debug, Serialize)]
pub struct NodeView {
    pub id: u64,
    pub address: String,
    pub status: NodeStatus,
    pub devices: Vec<Device>,
    pub labels: BTreeMap<String, String>,
    pub replicas: usize,
}

pub async fn list(State(app): State<Arc<AppState>>) -> Json<Vec<NodeView>> {
    let state = app.control.state();
    Json(
        state
            .nodes
            .values()
            .map(|node| NodeView {
                id: node.id.0,
                address: node.address.clone(),
                status: node.status,
                devices: node.devices.clone(),
                labels: node.labels.clone(),
                replicas: state.replicas_on(node.id).count(),
            })
            .collect(),
    )
}

async fn set_status(
    app: &AppState,
    request: WriteRequest,
    id: u64,
    status: NodeStatus,
) -> Result<Response, AdminError> {
    let command = Command::SetNodeStatus {
        node: NodeId(id),
        status,
    };
    match propose(app, request, &command).await? {
        Written::Forwarded(response) => Ok(response),
        Written::Here(_) => {
            Ok(Json(serde_json::json!({"node": id, "status": status})).into_response())
        }
    }
}

pub async fn drain(
    State(app): State<Arc<AppState>>,
    Path(id): Path<u64>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let request = write;
    set_status(&app, request, id, NodeStatus::Draining).await
}

pub async fn undrain(
    State(app): State<Arc<AppState>>,
    Path(id): Path<u64>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let request = write;
    set_status(&app, request, id, NodeStatus::Ready).await
}
