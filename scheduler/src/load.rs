//! Live load: what the leader knows about traffic right now, and which failing groups must
//! wait before they are placed again. Not replicated; the leader gathers it from agents,
//! gateways and its own [`crate::backoff::FailureMemory`] and hands a snapshot to the
//! controllers.
//!
//! Missing entries mean "unknown", and every controller reads unknown conservatively: an
//! unknown replica is never idle (so never evicted), an unknown canary is never judged.

use crate::backoff::FailingGroup;
use crate::types::ReplicaId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSnapshot {
    pub deployments: BTreeMap<String, DeploymentLoad>,
    /// Per replica group, by group id.
    pub replicas: BTreeMap<ReplicaId, ReplicaLoad>,
    /// Groups that failed since they were last ready, by group id
    /// ([`crate::backoff::FailureMemory`]): placement leaves each failed until its retry
    /// time, and a rollout whose new version keeps failing is rolled back. A failed group
    /// not listed is placed again at once.
    #[serde(default)]
    pub failing: BTreeMap<ReplicaId, FailingGroup>,
}

/// One deployment's traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentLoad {
    /// Requests running or queued at its replicas, summed over replicas.
    pub requests_in_flight: u64,
    /// Requests held at the gateway because no replica is ready (for example at zero).
    pub requests_held: u64,
    /// When the last request arrived; `None` if none ever did.
    pub last_request_ms: Option<u64>,
    /// Health of each version since the current canary's observation began.
    pub versions: BTreeMap<u32, VersionHealth>,
}

/// Outcomes of one version's requests over an observation window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionHealth {
    pub requests: u64,
    pub errors: u64,
    pub latency_p99_ms: u64,
}

/// One replica group's traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaLoad {
    pub requests_in_flight: u64,
    pub last_request_ms: Option<u64>,
}
