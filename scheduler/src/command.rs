//! The closed set of commands and `apply`, the only function that mutates `ClusterState`.
//!
//! `apply` re-checks every precondition against the state it is given, because a command
//! was decided on an older state than the one it is applied to: a plan that raced another
//! plan is rejected here, not half-applied. It never panics: every input, however wrong,
//! ends in `Ok` or a typed `Rejected`.

use crate::deployment::{
    Deployment, DeploymentSpec, RemovalReason, RollbackReason, RolloutKind, RolloutPhase,
    ShardLayout, VersionSelector,
};
use crate::rollout;
use crate::state::{
    ClusterState, Device, Model, ModelVersion, Node, NodeStatus, Replica, ReplicaState,
};
use crate::types::{ArtifactFile, DeviceId, NodeId, ReplicaId, ShardPlacement, Signature};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Most shards one replica group may span; more is a typo, not a model.
pub const SHARDS_MAX: u32 = 64;

/// Every change the control plane can agree on.
///
/// The first variants keep their positions so that older log entries of them still decode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Add a node, or refresh the address, devices and labels of a known one. A known node
    /// comes back Ready unless it was draining, which it stays.
    RegisterNode {
        id: NodeId,
        address: String,
        devices: Vec<Device>,
        labels: BTreeMap<String, String>,
    },
    /// Add a version to a model (creating the model). A manifest digest the model already
    /// has returns the existing version instead: versions are content-addressed.
    RegisterModelVersion {
        model: String,
        manifest_digest: String,
        files: Vec<ArtifactFile>,
        format: String,
        memory_bytes: u64,
        signature: Signature,
        created_at_ms: u64,
    },
    CreateDeployment {
        spec: DeploymentSpec,
    },
    /// Place a new replica group of `version`: one shard per entry of `shards`, in shard
    /// order, each reserving the version's per-shard memory estimate.
    AssignReplica {
        deployment: String,
        version: u32,
        shards: Vec<ShardPlacement>,
    },
    /// An agent's report on a replica it runs.
    SetReplicaState {
        replica: ReplicaId,
        epoch: u64,
        state: ReplicaState,
        failure: Option<String>,
    },
    /// Mark a node Ready, Draining or Down.
    SetNodeStatus {
        node: NodeId,
        status: NodeStatus,
    },
    /// Forget a node that runs nothing.
    RemoveNode {
        node: NodeId,
    },
    /// Point a model's alias at one of its versions (creating or moving it).
    SetAlias {
        model: String,
        alias: String,
        version: u32,
    },
    /// Remove a model's alias; removing an absent alias changes nothing.
    RemoveAlias {
        model: String,
        alias: String,
    },
    /// Replace a deployment's spec (same model). A new version starts a rollout.
    UpdateDeployment {
        spec: DeploymentSpec,
    },
    /// Remove a deployment and every replica of it.
    DeleteDeployment {
        name: String,
    },
    /// Place an existing group again (its node went down, a shard failed, or a move), at
    /// `epoch + 1`. `epoch` must be the group's current epoch.
    ReassignReplica {
        group: ReplicaId,
        epoch: u64,
        shards: Vec<ShardPlacement>,
    },
    /// Remove a replica group and free its memory.
    RemoveReplica {
        group: ReplicaId,
        epoch: u64,
        reason: RemovalReason,
    },
    /// The autoscaler's (or an operator's) replica count, within the deployment's bounds.
    SetDesiredReplicas {
        deployment: String,
        replicas: u32,
    },
    StartRollout {
        deployment: String,
        version: u32,
        at_ms: u64,
    },
    AdvanceRollout {
        deployment: String,
        version: u32,
        phase: RolloutPhase,
    },
    CompleteRollout {
        deployment: String,
        version: u32,
    },
    RollbackRollout {
        deployment: String,
        version: u32,
        reason: RollbackReason,
    },
    /// Record where a control-plane server (a raft member) serves HTTP, so every server can
    /// forward writes to whichever member leads. (Last in the enum: the encoding of the
    /// variants before it stays as it was.)
    RegisterServer {
        id: u64,
        http_address: String,
    },
    /// Add a version made from another version of the same model (`shoal model optimise`):
    /// as [`Command::RegisterModelVersion`], but its parent is `parent`, the version it was
    /// made from, not the newest. (After `RegisterServer`: the encoding of the variants
    /// before it stays as it was.)
    RegisterDerivedVersion {
        parent: u32,
        model: String,
        manifest_digest: String,
        files: Vec<ArtifactFile>,
        format: String,
        memory_bytes: u64,
        signature: Signature,
        created_at_ms: u64,
    },
}

impl Command {
    /// A version's registration as that of a version made from `parent`; any other
    /// command as it is.
    pub fn derived_from(self, parent: u32) -> Command {
        match self {
            Command::RegisterModelVersion {
                model,
                manifest_digest,
                files,
                format,
                memory_bytes,
                signature,
                created_at_ms,
            } => Command::RegisterDerivedVersion {
                parent,
                model,
                manifest_digest,
                files,
                format,
                memory_bytes,
                signature,
                created_at_ms,
            },
            other => other,
        }
    }

    /// The command's kind in snake case, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::RegisterNode { .. } => "register_node",
            Command::RegisterModelVersion { .. } => "register_model_version",
            Command::CreateDeployment { .. } => "create_deployment",
            Command::AssignReplica { .. } => "assign_replica",
            Command::SetReplicaState { .. } => "set_replica_state",
            Command::SetNodeStatus { .. } => "set_node_status",
            Command::RemoveNode { .. } => "remove_node",
            Command::SetAlias { .. } => "set_alias",
            Command::RemoveAlias { .. } => "remove_alias",
            Command::UpdateDeployment { .. } => "update_deployment",
            Command::DeleteDeployment { .. } => "delete_deployment",
            Command::ReassignReplica { .. } => "reassign_replica",
            Command::RemoveReplica { .. } => "remove_replica",
            Command::SetDesiredReplicas { .. } => "set_desired_replicas",
            Command::StartRollout { .. } => "start_rollout",
            Command::AdvanceRollout { .. } => "advance_rollout",
            Command::CompleteRollout { .. } => "complete_rollout",
            Command::RollbackRollout { .. } => "rollback_rollout",
            Command::RegisterServer { .. } => "register_server",
            Command::RegisterDerivedVersion { .. } => "register_derived_version",
        }
    }
}

/// What an accepted command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    NodeRegistered {
        created: bool,
    },
    VersionRegistered {
        version: u32,
        created: bool,
    },
    DeploymentCreated,
    /// A new group; its id is the id of its shard 0.
    ReplicaAssigned {
        replica: ReplicaId,
    },
    ReplicaStateSet,
    NodeStatusSet {
        previous: NodeStatus,
    },
    NodeRemoved,
    AliasSet {
        previous: Option<u32>,
    },
    AliasRemoved {
        previous: Option<u32>,
    },
    DeploymentUpdated,
    DeploymentDeleted {
        replicas_removed: usize,
    },
    ReplicaReassigned {
        epoch: u64,
    },
    ReplicaRemoved,
    DesiredReplicasSet {
        previous: u32,
    },
    RolloutStarted,
    RolloutAdvanced,
    RolloutCompleted,
    RolledBack,
    ServerRegistered {
        previous: Option<String>,
    },
}

/// Why a command was refused. The state is unchanged when a command is rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejected {
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    #[error("node {node} has no device {device}")]
    UnknownDevice { node: NodeId, device: DeviceId },
    #[error("unknown model {0:?}")]
    UnknownModel(String),
    #[error("model {model:?} has no version {version}")]
    UnknownVersion { model: String, version: u32 },
    #[error("model {model:?} has no alias {alias:?}")]
    UnknownAlias { model: String, alias: String },
    #[error(
        "model {model:?} has version {version} with the same manifest digest and other contents"
    )]
    VersionConflict { model: String, version: u32 },
    #[error("unknown deployment {0:?}")]
    UnknownDeployment(String),
    #[error("unknown replica group {0}")]
    UnknownReplica(ReplicaId),
    #[error("deployment {0:?} already exists")]
    DeploymentExists(String),
    #[error("deployment {deployment:?} already has all the groups of version {version} it wants")]
    DeploymentSatisfied { deployment: String, version: u32 },
    #[error("node {0} is not ready")]
    NodeNotReady(NodeId),
    #[error("node {node} still holds {replicas} replicas")]
    NodeNotEmpty { node: NodeId, replicas: usize },
    #[error("{node} {device} does not meet the placement constraints of {deployment:?}")]
    ConstraintViolated {
        deployment: String,
        node: NodeId,
        device: DeviceId,
    },
    #[error("{given} shards given, {expected} expected")]
    WrongShardCount { expected: u32, given: usize },
    #[error("{node} {device} has {free_bytes} bytes free, {needed_bytes} needed")]
    InsufficientMemory {
        node: NodeId,
        device: DeviceId,
        needed_bytes: u64,
        free_bytes: u64,
    },
    #[error(
        "device {device} of {node} would shrink below the {reserved_bytes} bytes reserved on it"
    )]
    DeviceShrinksBelowReservations {
        node: NodeId,
        device: DeviceId,
        reserved_bytes: u64,
    },
    #[error("stale command for {replica}: epoch {given}, current {current}")]
    StaleEpoch {
        replica: ReplicaId,
        given: u64,
        current: u64,
    },
    #[error("{replica} is failed; only a reassignment revives it")]
    ReplicaFailed { replica: ReplicaId },
    #[error("{replicas} replicas for {deployment:?} is outside {min}..={max}")]
    ReplicasOutOfRange {
        deployment: String,
        replicas: u32,
        min: u32,
        max: u32,
    },
    #[error("deployment {deployment:?} is already rolling out version {version}")]
    RolloutInProgress { deployment: String, version: u32 },
    #[error("deployment {0:?} has no rollout in progress")]
    NoRollout(String),
    #[error("deployment {deployment:?} is rolling out version {current}, not {given}")]
    RolloutMismatch {
        deployment: String,
        current: u32,
        given: u32,
    },
    #[error("deployment {deployment:?} cannot go from {from:?} to {to:?}")]
    InvalidTransition {
        deployment: String,
        from: RolloutPhase,
        to: RolloutPhase,
    },
}

/// Applies one committed command at raft `index`. On `Err` the state is untouched except
/// for `applied_index`, which always advances: a rejected entry is still applied.
pub fn apply(state: &mut ClusterState, index: u64, command: Command) -> Result<Outcome, Rejected> {
    debug_assert!(
        index > state.applied_index || index == 0,
        "entries apply in order"
    );
    state.applied_index = index;
    match command {
        Command::RegisterNode {
            id,
            address,
            devices,
            labels,
        } => register_node(state, id, address, devices, labels),
        Command::SetNodeStatus { node, status } => {
            let Some(known) = state.nodes.get_mut(&node) else {
                return Err(Rejected::UnknownNode(node));
            };
            let previous = known.status;
            known.status = status;
            Ok(Outcome::NodeStatusSet { previous })
        }
        Command::RemoveNode { node } => {
            if !state.nodes.contains_key(&node) {
                return Err(Rejected::UnknownNode(node));
            }
            let replicas = state.replicas_on(node).count();
            if replicas > 0 {
                return Err(Rejected::NodeNotEmpty { node, replicas });
            }
            state.nodes.remove(&node);
            Ok(Outcome::NodeRemoved)
        }
        Command::RegisterModelVersion {
            model,
            manifest_digest,
            files,
            format,
            memory_bytes,
            signature,
            created_at_ms,
        } => register_version(
            state,
            model,
            ModelVersion {
                version: 0,
                manifest_digest,
                files,
                format,
                memory_bytes,
                signature,
                parent: None,
                created_at_ms,
            },
        ),
        Command::RegisterDerivedVersion {
            parent,
            model,
            manifest_digest,
            files,
            format,
            memory_bytes,
            signature,
            created_at_ms,
        } => {
            if state.version(&model, parent).is_none() {
                return Err(Rejected::UnknownVersion {
                    model,
                    version: parent,
                });
            }
            register_version(
                state,
                model,
                ModelVersion {
                    version: 0,
                    manifest_digest,
                    files,
                    format,
                    memory_bytes,
                    signature,
                    parent: Some(parent),
                    created_at_ms,
                },
            )
        }
        Command::SetAlias {
            model,
            alias,
            version,
        } => {
            validate_name("alias", &alias)?;
            let known = known_model(state, &model)?;
            if !known.versions.contains_key(&version) {
                return Err(Rejected::UnknownVersion { model, version });
            }
            let previous = state
                .models
                .get_mut(&model)
                .and_then(|known| known.aliases.insert(alias, version));
            Ok(Outcome::AliasSet { previous })
        }
        Command::RemoveAlias { model, alias } => {
            known_model(state, &model)?;
            let previous = state
                .models
                .get_mut(&model)
                .and_then(|known| known.aliases.remove(&alias));
            Ok(Outcome::AliasRemoved { previous })
        }
        Command::CreateDeployment { spec } => {
            let stable_version = validate_spec(state, &spec)?;
            if state.deployments.contains_key(&spec.name) {
                return Err(Rejected::DeploymentExists(spec.name));
            }
            let deployment = Deployment {
                replicas_desired: spec.replicas.initial,
                stable_version,
                previous_version: None,
                rollout: None,
                blocked_version: None,
                spec,
            };
            state
                .deployments
                .insert(deployment.spec.name.clone(), deployment);
            Ok(Outcome::DeploymentCreated)
        }
        Command::UpdateDeployment { spec } => {
            let split_stable = validate_spec(state, &spec)?;
            let deployment = known_deployment(state, &spec.name)?;
            if deployment.spec.model != spec.model {
                return Err(Rejected::Invalid(format!(
                    "deployment {:?} serves model {:?}; a deployment cannot change model",
                    spec.name, deployment.spec.model
                )));
            }
            let deployment = deployment_mut(state, &spec.name)?;
            if deployment.rollout.is_none()
                && matches!(spec.versions, VersionSelector::Split(_))
                && deployment.stable_version != split_stable
            {
                deployment.previous_version = Some(deployment.stable_version);
                deployment.stable_version = split_stable;
            }
            deployment.replicas_desired = deployment
                .replicas_desired
                .clamp(spec.replicas.min, spec.replicas.max);
            deployment.blocked_version = None;
            deployment.spec = spec;
            Ok(Outcome::DeploymentUpdated)
        }
        Command::DeleteDeployment { name } => {
            known_deployment(state, &name)?;
            let groups: Vec<ReplicaId> = state.group_ids_of(&name).collect();
            let mut replicas_removed = 0;
            for group in groups {
                replicas_removed += remove_group(state, group);
            }
            state.deployments.remove(&name);
            Ok(Outcome::DeploymentDeleted { replicas_removed })
        }
        Command::AssignReplica {
            deployment,
            version,
            shards,
        } => assign_replica(state, deployment, version, shards),
        Command::ReassignReplica {
            group,
            epoch,
            shards,
        } => reassign_replica(state, group, epoch, &shards),
        Command::RemoveReplica {
            group,
            epoch,
            reason,
        } => {
            let view = state
                .group_view(group)
                .filter(|view| view.id == group)
                .ok_or(Rejected::UnknownReplica(group))?;
            check_epoch(group, epoch, view.epoch)?;
            if let RemovalReason::Evicted { .. } = reason {
                // An eviction is a scale-down of an idle deployment: it lowers the wanted
                // count, or the group would be placed straight back.
                let name = deployment_of(state, group)?;
                let deployment = deployment_mut(state, &name)?;
                let policy = deployment.spec.replicas;
                if deployment.replicas_desired <= policy.min {
                    return Err(Rejected::ReplicasOutOfRange {
                        deployment: name,
                        replicas: deployment.replicas_desired.saturating_sub(1),
                        min: policy.min,
                        max: policy.max,
                    });
                }
                deployment.replicas_desired -= 1;
            }
            remove_group(state, group);
            Ok(Outcome::ReplicaRemoved)
        }
        Command::SetReplicaState {
            replica,
            epoch,
            state: new_state,
            failure,
        } => {
            let Some(current) = state.replicas.get(&replica) else {
                return Err(Rejected::UnknownReplica(replica));
            };
            check_epoch(replica, epoch, current.epoch)?;
            if current.state == ReplicaState::Failed {
                return Err(Rejected::ReplicaFailed { replica });
            }
            state.update_replica(replica, |current| {
                current.state = new_state;
                current.failure = failure;
            });
            Ok(Outcome::ReplicaStateSet)
        }
        Command::SetDesiredReplicas {
            deployment,
            replicas,
        } => {
            let known = deployment_mut(state, &deployment)?;
            let policy = known.spec.replicas;
            if replicas < policy.min || replicas > policy.max {
                return Err(Rejected::ReplicasOutOfRange {
                    deployment,
                    replicas,
                    min: policy.min,
                    max: policy.max,
                });
            }
            let previous = known.replicas_desired;
            known.replicas_desired = replicas;
            Ok(Outcome::DesiredReplicasSet { previous })
        }
        Command::StartRollout {
            deployment,
            version,
            at_ms,
        } => {
            let model = known_deployment(state, &deployment)?.spec.model.clone();
            if state.version(&model, version).is_none() {
                return Err(Rejected::UnknownVersion { model, version });
            }
            rollout::start(deployment_mut(state, &deployment)?, version, at_ms)?;
            Ok(Outcome::RolloutStarted)
        }
        Command::AdvanceRollout {
            deployment,
            version,
            phase,
        } => {
            rollout::advance(deployment_mut(state, &deployment)?, version, phase)?;
            Ok(Outcome::RolloutAdvanced)
        }
        Command::CompleteRollout {
            deployment,
            version,
        } => {
            rollout::complete(deployment_mut(state, &deployment)?, version)?;
            Ok(Outcome::RolloutCompleted)
        }
        Command::RollbackRollout {
            deployment,
            version,
            reason,
        } => {
            rollout::rollback(deployment_mut(state, &deployment)?, version, &reason)?;
            Ok(Outcome::RolledBack)
        }
        Command::RegisterServer { id, http_address } => {
            if id == 0 || http_address.parse::<std::net::SocketAddr>().is_err() {
                return Err(Rejected::Invalid(format!(
                    "server {id} at {http_address:?}: ids start at 1 and the address is HOST:PORT"
                )));
            }
            let previous = state.servers.insert(id, http_address);
            Ok(Outcome::ServerRegistered { previous })
        }
    }
}

fn validate_name(what: &str, name: &str) -> Result<(), Rejected> {
    /// Names appear in URLs and metric labels: keep them short and plain.
    const NAME_LENGTH_MAX: usize = 64;
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > NAME_LENGTH_MAX || !plain {
        return Err(Rejected::Invalid(format!(
            "{what} name {name:?} must be 1-{NAME_LENGTH_MAX} characters of [A-Za-z0-9._-]"
        )));
    }
    Ok(())
}

fn check_epoch(replica: ReplicaId, given: u64, current: u64) -> Result<(), Rejected> {
    if given != current {
        return Err(Rejected::StaleEpoch {
            replica,
            given,
            current,
        });
    }
    Ok(())
}

fn known_model<'a>(state: &'a ClusterState, model: &str) -> Result<&'a Model, Rejected> {
    state
        .models
        .get(model)
        .ok_or_else(|| Rejected::UnknownModel(model.to_string()))
}

fn known_deployment<'a>(state: &'a ClusterState, name: &str) -> Result<&'a Deployment, Rejected> {
    state
        .deployments
        .get(name)
        .ok_or_else(|| Rejected::UnknownDeployment(name.to_string()))
}

fn deployment_mut<'a>(
    state: &'a mut ClusterState,
    name: &str,
) -> Result<&'a mut Deployment, Rejected> {
    state
        .deployments
        .get_mut(name)
        .ok_or_else(|| Rejected::UnknownDeployment(name.to_string()))
}

fn deployment_of(state: &ClusterState, group: ReplicaId) -> Result<String, Rejected> {
    state
        .replicas
        .get(&group)
        .map(|replica| replica.deployment.clone())
        .ok_or(Rejected::UnknownReplica(group))
}

/// Removes every shard of a group; returns how many there were.
fn remove_group(state: &mut ClusterState, group: ReplicaId) -> usize {
    let ids: Vec<ReplicaId> = state.group(group).map(|replica| replica.id).collect();
    for id in &ids {
        state.remove_replica(*id);
    }
    ids.len()
}

/// Checks a spec against the state; returns the version it starts on.
fn validate_spec(state: &ClusterState, spec: &DeploymentSpec) -> Result<u32, Rejected> {
    validate_name("deployment", &spec.name)?;
    let invalid = |message: &str| Err(Rejected::Invalid(format!("{}: {message}", spec.name)));
    if spec.batching.batch_size_max == 0 || spec.batching.queue_capacity == 0 {
        return invalid("batch size and queue capacity must be at least 1");
    }
    let policy = spec.replicas;
    if policy.min > policy.max || policy.initial < policy.min || policy.initial > policy.max {
        return invalid("replicas must satisfy min <= initial <= max");
    }
    if let Some(autoscale) = spec.autoscale
        && autoscale.target_ongoing_requests == 0
    {
        return invalid("the autoscaler's target of ongoing requests must be at least 1");
    }
    if spec.sharding.shards == 0 || spec.sharding.shards > SHARDS_MAX {
        return invalid("shards must be 1..=64");
    }
    let strategy = spec.rollout;
    if strategy.max_surge == 0 && strategy.max_unavailable == 0 {
        return invalid("max surge and max unavailable cannot both be 0");
    }
    if let RolloutKind::Canary {
        traffic_percent, ..
    } = strategy.kind
        && !(1..=100).contains(&traffic_percent)
    {
        return invalid("canary traffic percent must be 1..=100");
    }
    let model = known_model(state, &spec.model)?;
    let known_version = |version: u32| {
        if model.versions.contains_key(&version) {
            Ok(version)
        } else {
            Err(Rejected::UnknownVersion {
                model: spec.model.clone(),
                version,
            })
        }
    };
    match &spec.versions {
        VersionSelector::Version(version) => known_version(*version),
        VersionSelector::Alias(alias) => match model.aliases.get(alias) {
            Some(version) => known_version(*version),
            None => Err(Rejected::UnknownAlias {
                model: spec.model.clone(),
                alias: alias.clone(),
            }),
        },
        VersionSelector::Split(weights) => {
            let mut seen = BTreeSet::new();
            for share in weights {
                known_version(share.version)?;
                if !seen.insert(share.version) {
                    return invalid("a version appears twice in the traffic split");
                }
            }
            // The heaviest version, the lowest on a tie.
            weights
                .iter()
                .filter(|share| share.weight > 0)
                .max_by_key(|share| (share.weight, u32::MAX - share.version))
                .map(|share| share.version)
                .map_or_else(|| invalid("a traffic split needs a positive weight"), Ok)
        }
    }
}

fn register_version(
    state: &mut ClusterState,
    model: String,
    mut new: ModelVersion,
) -> Result<Outcome, Rejected> {
    validate_name("model", &model)?;
    if new.manifest_digest.is_empty() {
        return Err(Rejected::Invalid("manifest digest is empty".into()));
    }
    let entry = state.models.entry(model.clone()).or_insert_with(|| Model {
        name: model.clone(),
        versions: BTreeMap::new(),
        aliases: BTreeMap::new(),
    });
    if let Some(existing) = entry
        .versions
        .values()
        .find(|version| version.manifest_digest == new.manifest_digest)
    {
        // The same files in another order are the same version: the manifest digest
        // hashes them by name, and a log written before registrations sorted them holds
        // the demo's files in the order `shoal up` once listed them.
        fn by_name(files: &[ArtifactFile]) -> Vec<&ArtifactFile> {
            let mut sorted: Vec<&ArtifactFile> = files.iter().collect();
            sorted.sort_by(|a, b| a.name.cmp(&b.name));
            sorted
        }
        let same = by_name(&existing.files) == by_name(&new.files)
            && existing.format == new.format
            && existing.memory_bytes == new.memory_bytes
            && existing.signature == new.signature;
        if !same {
            return Err(Rejected::VersionConflict {
                model,
                version: existing.version,
            });
        }
        return Ok(Outcome::VersionRegistered {
            version: existing.version,
            created: false,
        });
    }
    let newest = entry.versions.keys().next_back().copied();
    let Some(version) = newest.map_or(Some(1), |latest| latest.checked_add(1)) else {
        return Err(Rejected::Invalid(format!(
            "model {model:?} has no version numbers left"
        )));
    };
    new.version = version;
    // A version made from another names it; any other follows the newest.
    new.parent = new.parent.or(newest);
    entry.versions.insert(version, new);
    Ok(Outcome::VersionRegistered {
        version,
        created: true,
    })
}

fn register_node(
    state: &mut ClusterState,
    id: NodeId,
    address: String,
    devices: Vec<Device>,
    labels: BTreeMap<String, String>,
) -> Result<Outcome, Rejected> {
    for (position, device) in devices.iter().enumerate() {
        if device.id.0 as usize != position {
            return Err(Rejected::Invalid(format!(
                "device ids must be 0..n in order; found {} at position {position}",
                device.id
            )));
        }
    }
    // A re-registering node may not shrink (or drop) a device below what is reserved on it.
    let reserved: Vec<(DeviceId, u64)> = state
        .reserved_by_device()
        .range((id, DeviceId(0))..=(id, DeviceId(u32::MAX)))
        .map(|((_, device), bytes)| (*device, *bytes))
        .collect();
    for (device, reserved_bytes) in reserved {
        let capacity = devices
            .get(device.0 as usize)
            .map_or(0, |device| device.memory_bytes);
        if capacity < reserved_bytes {
            return Err(Rejected::DeviceShrinksBelowReservations {
                node: id,
                device,
                reserved_bytes,
            });
        }
    }
    let previous = state.nodes.get(&id).map(|node| node.status);
    let status = match previous {
        Some(NodeStatus::Draining) => NodeStatus::Draining,
        _ => NodeStatus::Ready,
    };
    state.nodes.insert(
        id,
        Node {
            id,
            address,
            devices,
            labels,
            status,
        },
    );
    Ok(Outcome::NodeRegistered {
        created: previous.is_none(),
    })
}

/// Bytes each shard of `deployment`'s copy of `version` reserves: an even share, rounded up.
pub fn shard_bytes(memory_bytes: u64, shards: u32) -> u64 {
    memory_bytes.div_ceil(u64::from(shards.max(1)))
}

/// Checks that `shards` is a placement `deployment` may use for one group: the right count,
/// distinct devices, ready nodes, constraints met, and (beyond what `releasing` frees) room.
fn check_placement(
    state: &ClusterState,
    deployment: &Deployment,
    shards: &[ShardPlacement],
    need_bytes: u64,
    releasing: &BTreeMap<(NodeId, DeviceId), u64>,
) -> Result<(), Rejected> {
    let spec = &deployment.spec;
    let expected = spec.sharding.shards;
    if shards.len() != expected as usize {
        return Err(Rejected::WrongShardCount {
            expected,
            given: shards.len(),
        });
    }
    let distinct: BTreeSet<&ShardPlacement> = shards.iter().collect();
    if distinct.len() != shards.len() {
        return Err(Rejected::Invalid("two shards on one device".into()));
    }
    if spec.sharding.layout == ShardLayout::SameNode
        && shards.iter().any(|shard| shard.node != shards[0].node)
    {
        return Err(Rejected::Invalid(
            "tensor-parallel shards must share one node".into(),
        ));
    }
    for &ShardPlacement { node, device } in shards {
        let Some(target) = state.nodes.get(&node) else {
            return Err(Rejected::UnknownNode(node));
        };
        if target.status != NodeStatus::Ready {
            return Err(Rejected::NodeNotReady(node));
        }
        let Some(known) = target.devices.get(device.0 as usize) else {
            return Err(Rejected::UnknownDevice { node, device });
        };
        let labels_match = spec
            .placement
            .node_labels
            .iter()
            .all(|(key, value)| target.labels.get(key) == Some(value));
        let kind_matches = spec
            .placement
            .device_kind
            .is_none_or(|kind| kind == known.kind);
        if !labels_match || !kind_matches {
            return Err(Rejected::ConstraintViolated {
                deployment: spec.name.clone(),
                node,
                device,
            });
        }
        let released = releasing.get(&(node, device)).copied().unwrap_or(0);
        let free_bytes = state.free_bytes(node, device).saturating_add(released);
        if need_bytes > free_bytes {
            return Err(Rejected::InsufficientMemory {
                node,
                device,
                needed_bytes: need_bytes,
                free_bytes,
            });
        }
    }
    Ok(())
}

fn assign_replica(
    state: &mut ClusterState,
    name: String,
    version: u32,
    shards: Vec<ShardPlacement>,
) -> Result<Outcome, Rejected> {
    let deployment = known_deployment(state, &name)?;
    let Some(known) = state.version(&deployment.spec.model, version) else {
        return Err(Rejected::UnknownVersion {
            model: deployment.spec.model.clone(),
            version,
        });
    };
    // Groups on their way out (draining node, old shape) do not count against the target.
    let shards_wanted = deployment.spec.sharding.shards;
    let target = rollout::version_targets(deployment)
        .get(&version)
        .copied()
        .unwrap_or(0);
    let settled = state
        .group_ids_of(&name)
        .filter_map(|group| state.group_view(group))
        .filter(|view| view.version == version && view.settled(shards_wanted))
        .count();
    if settled >= target as usize {
        return Err(Rejected::DeploymentSatisfied {
            deployment: name,
            version,
        });
    }
    let need_bytes = shard_bytes(known.memory_bytes, deployment.spec.sharding.shards);
    check_placement(state, deployment, &shards, need_bytes, &BTreeMap::new())?;
    let model = deployment.spec.model.clone();
    let first = state.next_replica_id;
    let Some(next) = first.checked_add(shards.len() as u64) else {
        return Err(Rejected::Invalid("replica ids exhausted".into()));
    };
    state.next_replica_id = next;
    for (position, placement) in shards.into_iter().enumerate() {
        let id = ReplicaId(first + position as u64);
        state.insert_replica(Replica {
            id,
            group: ReplicaId(first),
            shard: position as u32,
            deployment: name.clone(),
            model: model.clone(),
            version,
            node: placement.node,
            device: placement.device,
            reserved_bytes: need_bytes,
            state: ReplicaState::Pending,
            epoch: 1,
            failure: None,
        });
    }
    Ok(Outcome::ReplicaAssigned {
        replica: ReplicaId(first),
    })
}

fn reassign_replica(
    state: &mut ClusterState,
    group: ReplicaId,
    epoch: u64,
    shards: &[ShardPlacement],
) -> Result<Outcome, Rejected> {
    let view = state
        .group_view(group)
        .filter(|view| view.id == group)
        .ok_or(Rejected::UnknownReplica(group))?;
    check_epoch(group, epoch, view.epoch)?;
    let name = deployment_of(state, group)?;
    let deployment = known_deployment(state, &name)?;
    if view.shards != deployment.spec.sharding.shards {
        // The deployment's sharding changed: this group is replaced, not moved.
        return Err(Rejected::WrongShardCount {
            expected: view.shards,
            given: shards.len(),
        });
    }
    // The group's own reservations are released by the move, so it may land where it is.
    let mut releasing: BTreeMap<(NodeId, DeviceId), u64> = BTreeMap::new();
    let mut need_bytes = 0;
    for replica in state.group(group) {
        need_bytes = replica.reserved_bytes;
        if replica.state.holds_memory() {
            *releasing.entry((replica.node, replica.device)).or_insert(0) += replica.reserved_bytes;
        }
    }
    check_placement(state, deployment, shards, need_bytes, &releasing)?;
    let Some(next_epoch) = epoch.checked_add(1) else {
        return Err(Rejected::Invalid("epochs exhausted".into()));
    };
    state.move_group(group, shards, next_epoch);
    Ok(Outcome::ReplicaReassigned { epoch: next_epoch })
}

#[cfg(test)]
pub(crate) mod tests;
