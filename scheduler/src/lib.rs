//! The cluster model: what raft replicates and what the leader's controllers decide over.
//!
//! `ClusterState` holds nodes, model versions, deployments and replicas. The only way to
//! change it is [`apply`] with a [`Command`]; the only way to decide what should change is a
//! pure controller: [`placement::plan`] (placement, rescheduling, draining, packing and the
//! rollout state machine of [`rollout`]) and [`autoscale::Autoscaler`]. Controllers read a
//! [`LoadSnapshot`] of live traffic and take the time as an argument.
//!
//! This crate must never do IO, spawn threads, be async or read a clock: time comes in as an
//! argument. That is what makes every decision deterministic, replayable from the raft log
//! and property-testable.

pub mod autoscale;
pub mod backoff;
mod command;
mod deployment;
mod load;
pub mod placement;
pub mod rollout;
mod state;
mod types;

pub use command::{Command, Outcome, Rejected, SHARDS_MAX, apply, shard_bytes};
pub use deployment::{
    AutoscalePolicy, CanaryThresholds, Deployment, DeploymentSpec, PlacementConstraints,
    RemovalReason, ReplicaPolicy, RollbackReason, Rollout, RolloutKind, RolloutPhase,
    RolloutStrategy, ShardLayout, Sharding, VersionSelector, VersionWeight, ZONE_LABEL,
};
pub use load::{DeploymentLoad, LoadSnapshot, ReplicaLoad, VersionHealth};
pub use state::{
    ClusterState, Device, GroupView, Model, ModelVersion, Node, NodeStatus, Replica, ReplicaState,
};
pub use types::{
    ArtifactFile, BatchingPolicy, DataType, DeviceId, DeviceKind, NodeId, ReplicaId,
    ShardPlacement, Signature, TensorSpec,
};
