//! Deployments: what an operator declares (`DeploymentSpec`) and what the control plane
//! tracks while it serves it (`Deployment`: the stable version, a rollout in progress, the
//! autoscaler's replica count).

use crate::types::{BatchingPolicy, DeviceKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The node label whose value names a node's zone, unless a deployment names another.
pub const ZONE_LABEL: &str = "zone";

/// Which version(s) of the model a deployment serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionSelector {
    /// Exactly this version.
    Version(u32),
    /// Whatever version the model's alias names; moving the alias starts a rollout.
    Alias(String),
    /// Several versions at once, each taking a share of replicas and traffic by weight.
    Split(Vec<VersionWeight>),
}

/// One version's share of a traffic split. Weights are relative to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionWeight {
    pub version: u32,
    pub weight: u32,
}

/// How many replica groups a deployment may run. A fixed deployment has `min == max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaPolicy {
    /// Replicas when the deployment is created, before the autoscaler has spoken.
    pub initial: u32,
    pub min: u32,
    pub max: u32,
}

impl ReplicaPolicy {
    /// Exactly `replicas`, never scaled.
    pub fn fixed(replicas: u32) -> ReplicaPolicy {
        ReplicaPolicy {
            initial: replicas,
            min: replicas,
            max: replicas,
        }
    }
}

/// How the autoscaler sizes a deployment between its `ReplicaPolicy` bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoscalePolicy {
    /// Requests in flight (running or queued) one replica should carry, as Ray Serve's
    /// `target_ongoing_requests`.
    pub target_ongoing_requests: u32,
    /// How long the load must ask for more replicas before the count goes up.
    pub upscale_delay_ms: u64,
    /// How long the load must ask for fewer replicas before the count goes down.
    pub downscale_delay_ms: u64,
    /// Scale to zero after this long without a request; `None` keeps at least one replica
    /// even when `min` is 0.
    pub scale_to_zero_after_ms: Option<u64>,
}

/// Where a deployment's replicas may go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementConstraints {
    /// Every label here must be on a node, with the same value, for it to be used.
    pub node_labels: BTreeMap<String, String>,
    /// Only devices of this kind, when set.
    pub device_kind: Option<DeviceKind>,
    /// The node label that names zones; replicas spread across its values, then nodes.
    pub zone_label: String,
    /// Whether this deployment shares devices with other packed deployments: when it needs
    /// room, idle replicas of other packed deployments may be evicted, least recently used
    /// first, and its own idle replicas may be evicted for them.
    pub allow_packing: bool,
}

impl Default for PlacementConstraints {
    fn default() -> Self {
        PlacementConstraints {
            node_labels: BTreeMap::new(),
            device_kind: None,
            zone_label: ZONE_LABEL.to_string(),
            allow_packing: false,
        }
    }
}

/// How a model is split across devices. Each shard reserves an even share of the
/// version's memory on its own device; all shards of a group are placed together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sharding {
    /// Devices one copy of the model spans; 1 for an unsharded model.
    pub shards: u32,
    pub layout: ShardLayout,
}

impl Default for Sharding {
    fn default() -> Self {
        Sharding {
            shards: 1,
            layout: ShardLayout::SameNode,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardLayout {
    /// Tensor parallel: every shard on its own device of one node.
    SameNode,
    /// Pipeline parallel: one node when one has room, else stages on several nodes.
    PipelineAcrossNodes,
}

/// How a new version replaces the old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStrategy {
    pub kind: RolloutKind,
    /// Replica groups above the wanted count that may run while replacing (also when moving
    /// replicas off a draining node).
    pub max_surge: u32,
    /// Ready replica groups below the wanted count that are tolerated while replacing.
    pub max_unavailable: u32,
}

impl Default for RolloutStrategy {
    fn default() -> Self {
        RolloutStrategy {
            kind: RolloutKind::Rolling,
            max_surge: 1,
            max_unavailable: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutKind {
    /// Replace replicas a few at a time within the surge and unavailability limits.
    Rolling,
    /// Bring up a few new replicas, send them `traffic_percent` of requests, watch them for
    /// `observation_ms`, roll back automatically on a breach, then replace the rest.
    Canary {
        traffic_percent: u8,
        observation_ms: u64,
        thresholds: CanaryThresholds,
    },
    /// Bring up a full set of new replicas beside the old, switch all traffic at once, and
    /// keep the old ones warm for `keep_previous_ms` so a rollback is instant.
    BlueGreen { keep_previous_ms: u64 },
}

/// When a canary is judged bad. A threshold is judged only once the canary has served
/// `requests_min` requests in its observation window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryThresholds {
    /// Most failed requests per million requests.
    pub error_ratio_max_ppm: u32,
    /// Highest tolerated 99th percentile latency.
    pub latency_p99_max_ms: u64,
    pub requests_min: u64,
}

/// What an operator declares about a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    pub name: String,
    pub model: String,
    pub versions: VersionSelector,
    pub replicas: ReplicaPolicy,
    /// `None`: the replica count stays at `replicas.initial` unless set by hand.
    pub autoscale: Option<AutoscalePolicy>,
    pub batching: BatchingPolicy,
    pub placement: PlacementConstraints,
    pub sharding: Sharding,
    pub rollout: RolloutStrategy,
    /// The 99th percentile request latency the operator promises callers, if any; watched
    /// by the alert rules, not by placement.
    pub latency_objective_ms: Option<u64>,
}

impl DeploymentSpec {
    /// A fixed number of unsharded replicas of one version, every other policy default.
    pub fn new(name: &str, model: &str, version: u32, replicas: u32) -> DeploymentSpec {
        DeploymentSpec {
            name: name.to_string(),
            model: model.to_string(),
            versions: VersionSelector::Version(version),
            replicas: ReplicaPolicy::fixed(replicas),
            autoscale: None,
            batching: BatchingPolicy::default(),
            placement: PlacementConstraints::default(),
            sharding: Sharding::default(),
            rollout: RolloutStrategy::default(),
            latency_objective_ms: None,
        }
    }
}

/// A deployment as the control plane tracks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub spec: DeploymentSpec,
    /// The version that serves when no rollout is in progress, and that a rollback returns
    /// to. For a traffic split, the heaviest version.
    pub stable_version: u32,
    /// The stable version before the last one: what an operator's rollback with no rollout
    /// in progress returns to. `None` until a rollout has completed.
    pub previous_version: Option<u32>,
    pub rollout: Option<Rollout>,
    /// A version rolled back from; no rollout goes to it again until the spec changes.
    pub blocked_version: Option<u32>,
    /// Replica groups wanted now: the autoscaler's answer within the policy's bounds.
    pub replicas_desired: u32,
}

impl Deployment {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn model(&self) -> &str {
        &self.spec.model
    }
}

/// A version change in progress, from the stable version to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub to: u32,
    pub started_at_ms: u64,
    pub phase: RolloutPhase,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutPhase {
    /// Canary replicas come up beside the stable ones; traffic stays on the stable version.
    CanaryWarming,
    /// The canary takes its share of traffic and is judged from `since_ms`.
    CanaryObserving { since_ms: u64 },
    /// New replicas replace old ones within the surge and unavailability limits.
    Rolling,
    /// Blue-green: a full set of new replicas comes up; traffic stays on the stable version.
    GreenWarming,
    /// Blue-green: all traffic on the new version since `at_ms`; the old replicas stay warm.
    Switched { at_ms: u64 },
}

/// Why a replica group is removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemovalReason {
    /// More groups of its version than wanted (scale down, rollout, rollback).
    Surplus,
    /// Its node drains and a replacement is ready elsewhere.
    Moved,
    /// Evicted while idle to make room for a packed deployment.
    Evicted {
        for_deployment: String,
        /// When it last served, if it ever did; the least recent goes first.
        last_request_ms: Option<u64>,
    },
}

/// Why a rollout was abandoned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RollbackReason {
    /// An operator asked.
    Operator,
    /// The spec or alias now names another version than the rollout's.
    Superseded,
    /// The canary failed more requests than allowed.
    CanaryErrors {
        errors: u64,
        requests: u64,
        error_ratio_max_ppm: u32,
    },
    /// The canary's 99th percentile latency was above the threshold.
    CanaryLatency {
        latency_p99_ms: u64,
        latency_p99_max_ms: u64,
    },
    /// A replica of the new version failed this many times in a row (it cannot load).
    NewVersionFailed { failures_in_a_row: u32 },
}

impl RollbackReason {
    /// Whether the version rolled back from is blocked from being rolled to again.
    pub fn blocks_version(&self) -> bool {
        !matches!(self, RollbackReason::Superseded)
    }
}
