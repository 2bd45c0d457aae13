//! The admin API (`/api/v1/…`): what the control plane knows, as JSON for the CLI.

use super::AppState;
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use shoal_scheduler::ReplicaState;
use std::sync::Arc;

#[derive(Debug, Serialize)]
pub struct VersionView {
    pub model: String,
    pub version: u32,
    pub manifest_digest: String,
    pub format: String,
    pub size_bytes: u64,
    pub memory_bytes: u64,
    pub parent: Option<u32>,
    pub created_at_ms: u64,
    pub files: Vec<shoal_scheduler::ArtifactFile>,
}

pub async fn list_models(State(app): State<Arc<AppState>>) -> Json<Vec<VersionView>> {
    let state = app.control.state();
    let views = state
        .models
        .values()
        .flat_map(|model| model.versions.values().map(move |version| (model, version)))
        .map(|(model, version)| VersionView {
            model: model.name.clone(),
            version: version.version,
            manifest_digest: version.manifest_digest.clone(),
            format: version.format.clone(),
            size_bytes: version.size_bytes(),
            memory_bytes: version.memory_bytes,
            parent: version.parent,
            created_at_ms: version.created_at_ms,
            files: version.files.clone(),
        })
        .collect();
    Json(views)
}

#[derive(Debug, Serialize)]
pub struct ReplicaView {
    pub id: u64,
    pub node: u64,
    pub device: u32,
    pub version: u32,
    pub state: ReplicaState,
    pub reserved_bytes: u64,
    pub failure: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DeploymentView {
    pub name: String,
    pub model: String,
    pub version: u32,
    pub replicas_wanted: u32,
    pub replicas_ready: usize,
    pub replicas: Vec<ReplicaView>,
}

pub async fn list_deployments(State(app): State<Arc<AppState>>) -> Json<Vec<DeploymentView>> {
    let state = app.control.state();
    let views = state
        .deployments
        .values()
        .map(|deployment| {
            let replicas: Vec<ReplicaView> = state
                .replicas_of(deployment.name())
                .map(|replica| ReplicaView {
                    id: replica.id.0,
                    node: replica.node.0,
                    device: replica.device.0,
                    version: replica.version,
                    state: replica.state,
                    reserved_bytes: replica.reserved_bytes,
                    failure: replica.failure.clone(),
                })
                .collect();
            DeploymentView {
                name: deployment.name().to_string(),
                model: deployment.model().to_string(),
                version: deployment.stable_version,
                replicas_wanted: deployment.replicas_desired,
                replicas_ready: replicas
                    .iter()
                    .filter(|r| r.state == ReplicaState::Ready)
                    .count(),
                replicas,
            }
        })
        .collect();
    Json(views)
}
