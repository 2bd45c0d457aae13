//! The admin API (`/api/v1/…`): what the control plane knows, as JSON for the CLI.

use super::AppState;
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use shoal_scheduler::{ClusterState, NodeStatus, ReplicaState, VersionSelector, VersionWeight};
use std::collections::BTreeMap;
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
    /// The model's aliases (name -> version), the same on each of its versions' entries.
    pub aliases: BTreeMap<String, u32>,
}

pub async fn list_models(State(app): State<Arc<AppState>>) -> Json<Vec<VersionView>> {
    Json(version_views(&app.control.state()))
}

/// Every version of every model, each with its model's aliases.
fn version_views(state: &ClusterState) -> Vec<VersionView> {
    state
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
            aliases: model.aliases.clone(),
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct ReplicaView {
    pub id: u64,
    pub node: u64,
    pub device: u32,
    pub version: u32,
    pub state: ReplicaState,
    /// The status of the replica's node: a replica on a Down node reports nothing, so
    /// its state is the last one it reported. `None` for a node the state no longer has.
    pub node_status: Option<NodeStatus>,
    pub reserved_bytes: u64,
    pub failure: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DeploymentView {
    pub name: String,
    pub model: String,
    /// The stable version: the one serving when no rollout is in progress (for a traffic
    /// split, the heaviest).
    pub version: u32,
    /// Which version(s) the deployment asked for, as its file names them.
    pub selector: SelectorView,
    pub replicas_wanted: u32,
    /// Replicas Ready on a node that is not Down.
    pub replicas_ready: usize,
    pub replicas: Vec<ReplicaView>,
}

/// A deployment's version selector with the keys of its deployment file:
/// `{"version": 1}`, `{"alias": "stable"}` or `{"split": [{"version": 1, "weight": 90}, …]}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectorView {
    Version(u32),
    Alias(String),
    Split(Vec<VersionWeight>),
}

impl From<&VersionSelector> for SelectorView {
    fn from(selector: &VersionSelector) -> SelectorView {
        match selector {
            VersionSelector::Version(version) => SelectorView::Version(*version),
            VersionSelector::Alias(alias) => SelectorView::Alias(alias.clone()),
            VersionSelector::Split(split) => SelectorView::Split(split.clone()),
        }
    }
}

pub async fn list_deployments(State(app): State<Arc<AppState>>) -> Json<Vec<DeploymentView>> {
    Json(deployment_views(&app.control.state()))
}

/// Every deployment with its replicas.
fn deployment_views(state: &ClusterState) -> Vec<DeploymentView> {
    state
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
                    node_status: state.nodes.get(&replica.node).map(|node| node.status),
                    reserved_bytes: replica.reserved_bytes,
                    failure: replica.failure.clone(),
                })
                .collect();
            DeploymentView {
                name: deployment.name().to_string(),
                model: deployment.model().to_string(),
                version: deployment.stable_version,
                selector: SelectorView::from(&deployment.spec.versions),
                replicas_wanted: deployment.replicas_desired,
                replicas_ready: replicas
                    .iter()
                    .filter(|r| {
                        r.state == ReplicaState::Ready
                            && matches!(
                                r.node_status,
                                Some(NodeStatus::Ready | NodeStatus::Draining)
                            )
                    })
                    .count(),
                replicas,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shoal_scheduler::{
        Command, DeploymentSpec, Device, DeviceId, DeviceKind, NodeId, ReplicaId, ShardPlacement,
    };

    use crate::api::fixtures::{applied, version};

    #[test]
    fn every_version_entry_carries_its_models_aliases() {
        let state = applied(vec![
            version("iris", "one"),
            version("iris", "two"),
            version("other", "three"),
            Command::SetAlias {
                model: "iris".into(),
                alias: "stable".into(),
                version: 2,
            },
        ]);
        let views = serde_json::to_value(version_views(&state)).unwrap();
        let aliases: Vec<_> = views
            .as_array()
            .unwrap()
            .iter()
            .map(|view| (view["model"].clone(), view["aliases"].clone()))
            .collect();
        assert_eq!(
            aliases,
            [
                ("iris".into(), serde_json::json!({"stable": 2})),
                ("iris".into(), serde_json::json!({"stable": 2})),
                ("other".into(), serde_json::json!({})),
            ]
        );
    }

    #[test]
    fn a_deployment_view_names_its_version_selector() {
        let split = VersionSelector::Split(vec![
            VersionWeight {
                version: 1,
                weight: 90,
            },
            VersionWeight {
                version: 2,
                weight: 10,
            },
        ]);
        let spec = |name: &str, versions: VersionSelector| {
            let mut spec = DeploymentSpec::new(name, "iris", 0, 1);
            spec.versions = versions;
            Command::CreateDeployment { spec }
        };
        let state = applied(vec![
            version("iris", "one"),
            version("iris", "two"),
            Command::SetAlias {
                model: "iris".into(),
                alias: "stable".into(),
                version: 2,
            },
            spec("pinned", VersionSelector::Version(1)),
            spec("follows", VersionSelector::Alias("stable".into())),
            spec("split", split),
        ]);
        let views = serde_json::to_value(deployment_views(&state)).unwrap();
        let selectors: Vec<_> = views
            .as_array()
            .unwrap()
            .iter()
            .map(|view| {
                (
                    view["name"].clone(),
                    view["selector"].clone(),
                    view["version"].clone(),
                )
            })
            .collect();
        assert_eq!(
            selectors,
            [
                ("follows".into(), json!({"alias": "stable"}), json!(2)),
                ("pinned".into(), json!({"version": 1}), json!(1)),
                (
                    "split".into(),
                    json!({"split": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]}),
                    json!(1)
                ),
            ]
        );
    }

    #[test]
    fn replicas_on_a_down_node_are_not_counted_ready_and_say_their_node_is_down() {
        let node = |id: u64| Command::RegisterNode {
            id: NodeId(id),
            address: format!("127.0.0.1:{}", 9000 + id),
            devices: vec![Device {
                id: DeviceId(0),
                kind: DeviceKind::Cpu,
                memory_bytes: 1 << 30,
            }],
            labels: Default::default(),
        };
        let on = |id: u64| Command::AssignReplica {
            deployment: "iris".into(),
            version: 1,
            shards: vec![ShardPlacement {
                node: NodeId(id),
                device: DeviceId(0),
            }],
        };
        let ready = |replica: u64| Command::SetReplicaState {
            replica: ReplicaId(replica),
            epoch: 1,
            state: ReplicaState::Ready,
            failure: None,
        };
        let mut state = applied(vec![
            node(1),
            node(2),
            version("iris", "one"),
            Command::CreateDeployment {
                spec: DeploymentSpec::new("iris", "iris", 1, 2),
            },
            on(1),
            on(2),
        ]);
        let replicas: Vec<u64> = state.replicas.keys().map(|id| id.0).collect();
        for command in replicas
            .iter()
            .map(|&id| ready(id))
            .chain([Command::SetNodeStatus {
                node: NodeId(1),
                status: NodeStatus::Down,
            }])
        {
            let index = state.applied_index + 1;
            shoal_scheduler::apply(&mut state, index, command).unwrap();
        }
        let views = deployment_views(&state);
        assert_eq!(views[0].replicas_ready, 1);
        let nodes: Vec<_> = views[0]
            .replicas
            .iter()
            .map(|replica| (replica.node, replica.state, replica.node_status))
            .collect();
        assert_eq!(
            nodes,
            [
                (1, ReplicaState::Ready, Some(NodeStatus::Down)),
                (2, ReplicaState::Ready, Some(NodeStatus::Ready)),
            ]
        );
    }
}
