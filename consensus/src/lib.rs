//! Raft consensus for Shoal's control plane, on tikv's `raft` crate.
//!
//! One thread (the driver) owns the raft [`core`]: it ticks, steps messages from peers,
//! persists each `Ready` durably to a `raft-engine` log before anything that depends on it
//! leaves the process, applies committed entries to a [`StateMachine`] and answers the
//! callers waiting on them. Members talk over TCP ([`transport`]). Callers hold a cloneable
//! [`ConsensusHandle`]: `propose`, `read_index`, `change_membership`, `transfer_leader`,
//! `status`, each with a deadline.
//!
//! This crate never interprets a command: it replicates opaque bytes. It knows nothing
//! about models, nodes or HTTP.

mod core;
mod driver;
mod logger;
mod storage;
pub mod transport;

#[cfg(test)]
mod sim;

pub use driver::{Consensus, ConsensusHandle, start};
pub use storage::StorageError;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What raft replicates into. Implemented by the node layer over the scheduler's state.
pub trait StateMachine: Send + 'static {
    /// Applies the bytes of one committed entry at `index` and returns the bytes answered to
    /// whoever proposed it. Must be deterministic: every member applies the same entries.
    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8>;

    /// Called after a run of entries has been applied, so the owner can publish one new
    /// view instead of one per entry.
    fn applied(&mut self, _index: u64) {}

    /// The whole state as bytes, for a snapshot.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the whole state with a snapshot's bytes.
    fn restore(&mut self, data: &[u8]) -> Result<(), String>;
}

/// Settings of one raft member.
#[derive(Clone, Debug)]
pub struct ConsensusConfig {
    /// This member's raft id; ids start at 1.
    pub id: u64,
    /// The directory holding the raft log and snapshot. Nothing else may write there.
    pub dir: PathBuf,
    /// Frames carrying another cluster id are refused, so two clusters never mix.
    pub cluster_id: u64,
    /// Raft addresses (`host:port`) of the members to talk to, this member included. When
    /// `bootstrap` is set and the log is new, these are the group's first voters.
    pub peers: BTreeMap<u64, String>,
    /// Whether a new, empty log starts a new group with `peers` as voters. A member that
    /// joins an existing group (a new member, or one whose data was lost) must not: it
    /// starts with no membership and waits to be added by a conf change. Never bootstrap
    /// a member that may have voted before: it could vote twice in one term.
    pub bootstrap: bool,
    /// Where to accept raft traffic; `None` for a single member that talks to no one.
    pub listen: Option<SocketAddr>,
    /// Time between raft ticks.
    pub tick_interval: Duration,
    /// Ticks without a heartbeat before a follower campaigns.
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots; each snapshot compacts the log.
    pub snapshot_interval_entries: u64,
}

impl ConsensusConfig {
    /// A single member with this id and directory, talking to no one: 100 ms ticks,
    /// election after 1 s without a leader, heartbeats every 200 ms, a snapshot every
    /// 10,000 entries.
    pub fn single(id: u64, dir: PathBuf) -> ConsensusConfig {
        ConsensusConfig {
            id,
            dir,
            cluster_id: 0,
            peers: BTreeMap::from([(id, String::new())]),
            bootstrap: true,
            listen: None,
            tick_interval: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval_entries: 10_000,
        }
    }
}

/// A change of membership, applied through a raft conf change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a voter, or promote a learner to voter. `address` is its raft address.
    AddVoter { id: u64, address: String },
    /// Add a learner: it receives the log but does not vote.
    AddLearner { id: u64, address: String },
    /// Remove a voter or learner.
    Remove { id: u64 },
}

/// A member's view of the group, published after every `Ready`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub term: u64,
    /// The leader's id, if one is known.
    pub leader: Option<u64>,
    pub is_leader: bool,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Index of the latest snapshot; the log starts after it.
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// On the leader: the last index each learner's log is known to hold, as the leader
    /// has it (raft's `matched`); a learner that has caught up holds `commit_index`. Empty
    /// on any other member.
    pub matched: std::collections::BTreeMap<u64, u64>,
    /// True while this member cannot write its log (disk full) and refuses proposals, or
    /// has a membership change applied but not yet written.
    pub storage_stalled: bool,
}

/// Why a request has no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader; {}", leader.map_or_else(|| "no leader is known".to_string(), |id| format!("the leader is member {id}")))]
    NotLeader { leader: Option<u64> },
    #[error("the request queue is full; retry later")]
    Overloaded,
    #[error("no answer before the deadline; the request may or may not have taken effect")]
    Timeout,
    #[error("the raft log cannot be written: {0}")]
    Storage(String),
    #[error("refused by raft: {0}")]
    Refused(String),
    #[error("consensus has stopped")]
    Stopped,
}

/// Why consensus could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the raft log in {dir}: {source}")]
    Open {
        dir: PathBuf,
        #[source]
        source: StorageError,
    },
    #[error("creating the raft node: {0}")]
    Raft(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("listening for raft traffic on {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the driver thread: {0}")]
    Thread(#[from] std::io::Error),
}
