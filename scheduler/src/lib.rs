//! The cluster model: what raft replicates and what the leader's controllers decide over.
//!
//! `ClusterState` holds nodes, model versions, deployments and replicas. The only way to
//! change it is [`apply`] with a [`Command`]; the only way to decide what should change is a
//! pure controller such as [`placement::plan`].
//!
//! This crate must never do IO, spawn threads, be async or read a clock: time comes in as an
//! argument. That is what makes every decision deterministic, replayable from the raft log
//! and property-testable.

mod command;
pub mod placement;
mod state;
mod types;

pub use command::{Command, Outcome, Rejected, apply};
pub use state::{
    ClusterState, Deployment, Device, Model, ModelVersion, Node, NodeStatus, Replica, ReplicaState,
};
pub use types::{
    ArtifactFile, BatchingPolicy, DataType, DeviceId, DeviceKind, NodeId, ReplicaId, Signature,
    TensorSpec,
};
