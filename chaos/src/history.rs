//! What a chaos run records: every client operation (invoke, then ok, fail or unknown),
//! every fault the nemesis injected and healed, and what the harness observed of the
//! cluster meanwhile. The checkers judge a `History` after the run; nothing here does IO.
//!
//! Times are microseconds on a monotonic clock since the run started.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Microseconds since the run started, on a monotonic clock.
pub type Micros = u64;

/// A process of the cluster under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Member {
    Server(u64),
    Agent(u64),
}

/// How an operation ended, as its client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Acknowledged: it took effect.
    Ok,
    /// Refused with a clear answer (an HTTP error status and message): it did not take
    /// effect.
    Fail(String),
    /// No answer (connection broken, timeout): it may or may not have taken effect.
    Unknown(String),
}

/// What a client asked for, and what an acknowledged answer said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    /// Point the register alias at `value` (a version number of the register model).
    AliasWrite {
        value: u32,
    },
    /// Read the register alias; `value` is what an acknowledged read returned (0: unset).
    AliasRead {
        value: Option<u32>,
    },
    /// Register a new version of `model`; `version` is the number an acknowledged
    /// registration was given.
    RegisterVersion {
        model: String,
        version: Option<u32>,
    },
    /// Create or update a deployment with `replicas` replica groups.
    Deploy {
        deployment: String,
        replicas: u32,
    },
    /// Set a deployment's replica count.
    Scale {
        deployment: String,
        replicas: u32,
    },
    /// Drain or undrain a node.
    Drain {
        node: u64,
    },
    Undrain {
        node: u64,
    },
    /// An inference request sent to `gateway`; `status` is the HTTP status of the answer
    /// when there was one.
    Infer {
        gateway: Member,
        status: Option<u16>,
    },
}

impl OpKind {
    /// A short name for tables: `alias_write`, `infer`, ...
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::AliasWrite { .. } => "alias_write",
            OpKind::AliasRead { .. } => "alias_read",
            OpKind::RegisterVersion { .. } => "register_version",
            OpKind::Deploy { .. } => "deploy",
            OpKind::Scale { .. } => "scale",
            OpKind::Drain { .. } => "drain",
            OpKind::Undrain { .. } => "undrain",
            OpKind::Infer { .. } => "infer",
        }
    }

    /// Whether this is a control-plane operation (everything but inference).
    pub fn is_control_plane(&self) -> bool {
        !matches!(self, OpKind::Infer { .. })
    }
}

/// One client operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// The client (worker) that ran it; a client runs one operation at a time.
    pub client: u32,
    pub kind: OpKind,
    pub invoked: Micros,
    /// When the answer (or the give-up) came.
    pub completed: Micros,
    pub outcome: Outcome,
}

/// The kinds of fault the nemesis injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    /// SIGKILL the raft leader, then restart it on its data dir.
    KillLeader,
    /// SIGKILL a follower server, then restart it.
    KillFollower,
    /// SIGKILL an agent, then restart it.
    KillAgent,
    /// SIGSTOP a process, then SIGCONT it.
    Pause,
    /// Cut one server off from every other process (iptables).
    PartitionIsolate,
    /// Split the servers into a minority and a majority (iptables).
    PartitionSplit,
    /// A bridge: two halves that cannot talk, and one server that talks to both.
    PartitionBridge,
    /// One server cannot send to another; the other way still works.
    PartitionOneWay,
    /// Delay raft traffic on some links (the harness's proxy).
    ProxyDelay,
    /// Lose raft traffic on some links: connections reset at random (the proxy).
    ProxyLoss,
    /// Drop raft traffic on some links: bytes accepted and never delivered (the proxy).
    ProxyDrop,
    /// Fill one server's data disk (a small tmpfs), then free it.
    DiskFull,
    /// Restart one server with its clock skewed (faketime), then restart it without.
    ClockSkew,
}

impl FaultKind {
    pub const ALL: [FaultKind; 13] = [
        FaultKind::KillLeader,
        FaultKind::KillFollower,
        FaultKind::KillAgent,
        FaultKind::Pause,
        FaultKind::PartitionIsolate,
        FaultKind::PartitionSplit,
        FaultKind::PartitionBridge,
        FaultKind::PartitionOneWay,
        FaultKind::ProxyDelay,
        FaultKind::ProxyLoss,
        FaultKind::ProxyDrop,
        FaultKind::DiskFull,
        FaultKind::ClockSkew,
    ];

    /// A short snake-case name for tables.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill_leader",
            FaultKind::KillFollower => "kill_follower",
            FaultKind::KillAgent => "kill_agent",
            FaultKind::Pause => "pause",
            FaultKind::PartitionIsolate => "partition_isolate",
            FaultKind::PartitionSplit => "partition_split",
            FaultKind::PartitionBridge => "partition_bridge",
            FaultKind::PartitionOneWay => "partition_one_way",
            FaultKind::ProxyDelay => "proxy_delay",
            FaultKind::ProxyLoss => "proxy_loss",
            FaultKind::ProxyDrop => "proxy_drop",
            FaultKind::DiskFull => "disk_full",
            FaultKind::ClockSkew => "clock_skew",
        }
    }
}

/// One injected fault: when it started, when it was healed, whom it hit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NemesisEvent {
    pub kind: FaultKind,
    pub started: Micros,
    /// `None` if the run ended before healing (the harness heals everything at the end).
    pub healed: Option<Micros>,
    /// The processes the fault was aimed at (the killed, paused or cut-off ones).
    pub targets: Vec<Member>,
    /// The raft leader when the fault started, if known.
    pub leader_before: Option<u64>,
    /// A human-readable account: "isolate server 2", "delay 50-150 ms on 1->3".
    pub detail: String,
}

impl NemesisEvent {
    /// Whether `member` was hit by this fault at any time in `from..=to`.
    pub fn hits(&self, member: Member, from: Micros, to: Micros) -> bool {
        let end = self.healed.unwrap_or(Micros::MAX);
        self.targets.contains(&member) && self.started <= to && from <= end
    }
}

/// Reserved and total bytes of one device at one moment, from one source: the control
/// plane's replicated state (`state@server N`) or an agent's own ledger (`agent N`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceObservation {
    pub at: Micros,
    pub source: String,
    pub node: u64,
    pub device: u32,
    pub reserved_bytes: u64,
    pub capacity_bytes: u64,
}

/// An assignment an agent accepted (from its log): agent process `incarnation` (counts
/// restarts) began to run `replica` at `epoch`. In log order per incarnation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedAssignment {
    pub agent: u64,
    pub incarnation: u32,
    pub replica: u64,
    pub epoch: u64,
}

/// Who the raft leader was at one moment, as some server reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderObservation {
    pub at: Micros,
    pub leader: Option<u64>,
    pub term: u64,
}

/// Whether every deployment had its desired number of ready replica groups at `at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvergenceObservation {
    pub at: Micros,
    pub converged: bool,
    /// What is missing when not converged: "iris: 1 of 2 ready".
    pub detail: String,
}

/// The cluster's state read after healing, for the durability checker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    /// Registered version numbers by model.
    pub versions: BTreeMap<String, BTreeSet<u32>>,
    /// Desired replica groups by deployment.
    pub deployments: BTreeMap<String, u32>,
    /// Nodes that are draining.
    pub draining: BTreeSet<u64>,
    /// Every placement the final state names.
    pub placements: BTreeSet<Placement>,
}

/// The control plane placed `replica` at `epoch` on `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Placement {
    pub replica: u64,
    pub epoch: u64,
    pub node: u64,
}

/// A process that went down with no fault to blame: it exited although the nemesis did
/// not kill it, or it did not listen again within the bound after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnbiddenExit {
    /// When the harness noticed.
    pub at: Micros,
    pub member: Member,
    /// How it ended ("exit status: 101") and the last lines of its log.
    pub detail: String,
}

/// Everything a run recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub seed: u64,
    /// Length of the faulty part of the run, before healing and convergence.
    pub duration: Micros,
    pub operations: Vec<Operation>,
    pub nemesis: Vec<NemesisEvent>,
    pub devices: Vec<DeviceObservation>,
    pub accepted: Vec<AcceptedAssignment>,
    /// Every placement seen in any state read during the run.
    pub placements: BTreeSet<Placement>,
    pub leaders: Vec<LeaderObservation>,
    pub convergence: Vec<ConvergenceObservation>,
    pub unbidden_exits: Vec<UnbiddenExit>,
    /// When the last fault was healed.
    pub healed_at: Micros,
    pub final_state: FinalState,
}
