//! The control plane as the rest of the node sees it: the scheduler's `ClusterState`
//! replicated by consensus, with typed proposals and a watchable view of the state.

use shoal_consensus::{ConsensusHandle, MembershipChange, ProposeError, RaftStatus, StateMachine};
use shoal_scheduler::{ClusterState, Command, Outcome, Rejected, apply};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Longest a caller waits for a command to be applied.
pub const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a member that knows no leader waits for one before answering `NotLeader`: two
/// of `shoal server`'s longest election timeouts (20 ticks of 50 ms). A member in an
/// election, or a follower that has not yet heard from the winner, knows it well within.
pub const LEADER_WAIT: Duration = Duration::from_secs(2);

/// The format of the replicated state: bincode (see [`wire`]) of the scheduler's
/// `ClusterState` in snapshots and `Command`s in the log. Bump it with any change that
/// changes how those types encode; a data dir in another format is then refused at start,
/// by name, where it would have failed to decode part-way.
pub const STATE_FORMAT: u32 = 1;

pub fn wire() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Why a command was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("refused: {0}")]
    Rejected(#[from] Rejected),
    #[error(transparent)]
    Consensus(#[from] ProposeError),
    #[error("the state machine answered bytes that do not decode: {0}")]
    Codec(String),
}

/// Applies committed commands to a `ClusterState` and publishes a snapshot after each run.
pub struct ClusterStateMachine {
    state: ClusterState,
    published: watch::Sender<Arc<ClusterState>>,
}

impl ClusterStateMachine {
    pub fn new() -> (ClusterStateMachine, watch::Receiver<Arc<ClusterState>>) {
        let (published, receiver) = watch::channel(Arc::new(ClusterState::default()));
        let machine = ClusterStateMachine {
            state: ClusterState::default(),
            published,
        };
        (machine, receiver)
    }
}

impl StateMachine for ClusterStateMachine {
    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8> {
        let result = match bincode::serde::decode_from_slice::<Command, _>(data, wire()) {
            Ok((command, _)) => apply(&mut self.state, index, command),
            Err(error) => {
                // Every member decodes the same bytes the same way, so this stays
                // deterministic; the entry is applied as a rejection.
                self.state.applied_index = index;
                Err(Rejected::Invalid(format!("undecodable command: {error}")))
            }
        };
        if let Err(rejected) = &result {
            tracing::debug!(index, %rejected, "command rejected");
        }
        bincode::serde::encode_to_vec(&result, wire()).unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<u8> {
        // Encoding a plain struct into a Vec cannot fail; an empty snapshot would be
        // refused by `restore`, never silently installed.
        bincode::serde::encode_to_vec(&self.state, wire()).unwrap_or_default()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        let (state, _): (ClusterState, usize) =
            bincode::serde::decode_from_slice(data, wire()).map_err(|error| error.to_string())?;
        self.state = state;
        self.published.send_replace(Arc::new(self.state.clone()));
        Ok(())
    }

    fn applied(&mut self, index: u64) {
        // Raft also applies entries that are not commands (a new leader's empty entry,
        // membership changes). The revision follows the log, not only the commands, or a
        // read waiting for its read index after such an entry would wait forever.
        self.state.applied_index = self.state.applied_index.max(index);
        // One clone per run of entries, not per entry. Fine at this state's size; a
        // persistent map replaces the clone when clusters grow (issue 4's benchmark).
        self.published.send_replace(Arc::new(self.state.clone()));
    }
}

/// A cloneable way to propose commands and read the replicated state.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// `None` in a standalone gateway, which follows the state without being a member.
    consensus: Option<ConsensusHandle>,
    state: watch::Receiver<Arc<ClusterState>>,
    raft: watch::Receiver<RaftStatus>,
    /// [`LEADER_WAIT`], but for tests.
    leader_wait: Duration,
}

impl ControlPlane {
    pub fn new(consensus: ConsensusHandle, state: watch::Receiver<Arc<ClusterState>>) -> Self {
        let raft = consensus.watch_status();
        ControlPlane {
            consensus: Some(consensus),
            state,
            raft,
            leader_wait: LEADER_WAIT,
        }
    }

    /// A view of the state kept by someone else (a standalone gateway following a
    /// server): reads work, writes answer `NotLeader` with the leader it was told of.
    pub fn follower(
        state: watch::Receiver<Arc<ClusterState>>,
        raft: watch::Receiver<RaftStatus>,
    ) -> Self {
        ControlPlane {
            consensus: None,
            state,
            raft,
            leader_wait: LEADER_WAIT,
        }
    }

    /// Whether this process is a raft member (a standalone gateway is not).
    pub fn is_member(&self) -> bool {
        self.consensus.is_some()
    }

    fn member(&self) -> Result<&ConsensusHandle, ControlError> {
        self.consensus.as_ref().ok_or_else(|| {
            ControlError::Consensus(ProposeError::NotLeader {
                leader: self.raft.borrow().leader,
            })
        })
    }

    /// Waits (at most [`LEADER_WAIT`]) until this member knows a leader; false if it
    /// still knows none.
    pub async fn wait_for_leader(&self) -> bool {
        let mut raft = self.raft.clone();
        let known = raft.wait_for(|status| status.leader.is_some());
        matches!(
            tokio::time::timeout(self.leader_wait, known).await,
            Ok(Ok(_))
        )
    }

    /// Waits (at most [`LEADER_WAIT`]) until the replicated state lists server `id`'s HTTP
    /// address; that address, or `None` if it is still not listed.
    pub async fn wait_for_server_address(&self, id: u64) -> Option<String> {
        let mut states = self.watch_state();
        let listed = states.wait_for(|state| state.servers.contains_key(&id));
        match tokio::time::timeout(self.leader_wait, listed).await {
            Ok(Ok(state)) => state.servers.get(&id).cloned(),
            _ => None,
        }
    }

    #[cfg(test)]
    fn with_leader_wait(mut self, wait: Duration) -> Self {
        self.leader_wait = wait;
        self
    }

    /// Runs `call`, and once more after a leader is known if it found none. Safe to
    /// repeat: `NotLeader` means nothing was proposed.
    async fn with_a_leader<T, F, Fut>(&self, call: F) -> Result<T, ControlError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ControlError>>,
    {
        let answer = call().await;
        if let Err(ControlError::Consensus(ProposeError::NotLeader { leader: None })) = answer
            && self.wait_for_leader().await
        {
            return call().await;
        }
        answer
    }

    /// Replicates `command` and returns what applying it did.
    pub async fn propose(&self, command: &Command) -> Result<Outcome, ControlError> {
        let data = bincode::serde::encode_to_vec(command, wire())
            .map_err(|error| ControlError::Codec(error.to_string()))?;
        let answer = self
            .with_a_leader(|| async {
                Ok(self
                    .member()?
                    .propose(data.clone(), PROPOSAL_TIMEOUT)
                    .await?)
            })
            .await?;
        let (result, _): (Result<Outcome, Rejected>, usize) =
            bincode::serde::decode_from_slice(&answer, wire())
                .map_err(|error| ControlError::Codec(error.to_string()))?;
        Ok(result?)
    }

    /// The state after every write acknowledged before this call: a linearizable read,
    /// through raft's read index. Works on followers too.
    pub async fn linearizable_state(&self) -> Result<Arc<ClusterState>, ControlError> {
        let index = self
            .with_a_leader(|| async { Ok(self.member()?.read_index(PROPOSAL_TIMEOUT).await?) })
            .await?;
        let mut states = self.state.clone();
        // The read index is answered after the state machine published that index, so
        // this normally returns at once.
        let state = tokio::time::timeout(
            PROPOSAL_TIMEOUT,
            states.wait_for(|state| state.applied_index >= index),
        )
        .await
        .map_err(|_| ControlError::Consensus(ProposeError::Timeout))?
        .map_err(|_| ControlError::Consensus(ProposeError::Stopped))?
        .clone();
        Ok(state)
    }

    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), ControlError> {
        self.with_a_leader(|| async {
            Ok(self
                .member()?
                .change_membership(change.clone(), PROPOSAL_TIMEOUT)
                .await?)
        })
        .await
    }

    pub fn transfer_leader(&self, to: u64) -> Result<(), ControlError> {
        Ok(self.member()?.transfer_leader(to)?)
    }

    /// The state as of the last applied run of entries (possibly stale on a follower).
    pub fn state(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }

    pub fn watch_state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.clone()
    }

    pub fn raft_status(&self) -> RaftStatus {
        self.raft.borrow().clone()
    }

    pub fn watch_raft(&self) -> watch::Receiver<RaftStatus> {
        self.raft.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One member of a three-member group, on `addresses`, with fast ticks.
    async fn member(
        id: u64,
        addresses: &std::collections::BTreeMap<u64, String>,
        dir: &std::path::Path,
    ) -> (shoal_consensus::Consensus, ControlPlane) {
        let config = shoal_consensus::ConsensusConfig {
            id,
            dir: dir.join(format!("member-{id}")),
            cluster_id: 7,
            peers: addresses.clone(),
            bootstrap: true,
            listen: Some(addresses[&id].parse().unwrap()),
            tick_interval: Duration::from_millis(20),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval_entries: 10_000,
        };
        let (machine, states) = ClusterStateMachine::new();
        let consensus = shoal_consensus::start(&config, machine).await.unwrap();
        let control = ControlPlane::new(consensus.handle(), states);
        (consensus, control)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_to_a_member_that_knows_no_leader_waits_for_an_election() {
        let dir = tempfile::tempdir().unwrap();
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addresses: std::collections::BTreeMap<u64, String> = (1..=3)
            .zip(
                listeners
                    .iter()
                    .map(|l| l.local_addr().unwrap().to_string()),
            )
            .collect();
        drop(listeners);
        let command = Command::SetAlias {
            model: "m".into(),
            alias: "prod".into(),
            version: 1,
        };
        // Alone, member 1 cannot elect anyone: after the wait (short here) it answers that
        // it knows no leader.
        let (first, control) = member(1, &addresses, dir.path()).await;
        let answer = control
            .clone()
            .with_leader_wait(Duration::from_millis(300))
            .propose(&command)
            .await;
        assert!(
            matches!(
                answer,
                Err(ControlError::Consensus(ProposeError::NotLeader {
                    leader: None
                }))
            ),
            "{answer:?}"
        );
        // A second member comes while the write waits (long here: member 1 may be in its
        // reconnect backoff, and this host may be slow): the write goes ahead with the
        // leader they elect. Here it is applied (and refused by the state machine: there
        // is no model "m"), or answered `NotLeader` naming member 2, for the caller to
        // forward.
        let writing = tokio::spawn({
            let control = control.with_leader_wait(Duration::from_secs(30));
            let command = command.clone();
            async move { control.propose(&command).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (second, _) = member(2, &addresses, dir.path()).await;
        let answer = writing.await.unwrap();
        assert!(
            matches!(
                answer,
                Err(ControlError::Rejected(Rejected::UnknownModel(_))
                    | ControlError::Consensus(ProposeError::NotLeader { leader: Some(2) }))
            ),
            "{answer:?}"
        );
        for consensus in [first, second] {
            tokio::task::spawn_blocking(move || consensus.shutdown())
                .await
                .unwrap();
        }
    }

    /// A version's registration, as `shoal model push` proposes one.
    fn registration() -> Command {
        Command::RegisterModelVersion {
            model: "m".into(),
            manifest_digest: "d".into(),
            files: vec![],
            format: "safetensors".into(),
            memory_bytes: 1,
            signature: Default::default(),
            created_at_ms: 5,
        }
    }

    #[test]
    fn a_snapshot_restores_the_same_state() {
        let (mut machine, _) = ClusterStateMachine::new();
        let command = registration();
        let data = bincode::serde::encode_to_vec(&command, wire()).unwrap();
        machine.apply(1, &data);
        let snapshot = machine.snapshot();
        let (mut other, published) = ClusterStateMachine::new();
        other.restore(&snapshot).unwrap();
        assert_eq!(other.state, machine.state);
        assert_eq!(*published.borrow().as_ref(), machine.state);
        assert!(other.restore(b"garbage").is_err());
    }

    #[test]
    fn the_published_revision_follows_entries_that_are_not_commands() {
        // Regression: after a leader change the log ends in an empty entry; a linearizable
        // read waits for that index and used to wait forever.
        let (mut machine, state) = ClusterStateMachine::new();
        machine.applied(7);
        assert_eq!(state.borrow().applied_index, 7);
    }

    /// The log holds commands as bincode, whose enum tag is the variant's position: a
    /// variant moved or inserted before the end would make every older entry of the
    /// variants after it decode as another command.
    #[test]
    fn commands_keep_their_positions_in_the_log_encoding() {
        let registration = registration();
        let server = Command::RegisterServer {
            id: 1,
            http_address: "127.0.0.1:1".into(),
        };
        let tag = |command: &Command| bincode::serde::encode_to_vec(command, wire()).unwrap()[0];
        assert_eq!(tag(&registration), 1);
        assert_eq!(tag(&server), 18);
        let derived = registration.clone().derived_from(1);
        assert_eq!(tag(&derived), 19);
        // A derived registration is the plain one's fields after its parent.
        let plain = bincode::serde::encode_to_vec(&registration, wire()).unwrap();
        let derived = bincode::serde::encode_to_vec(&derived, wire()).unwrap();
        assert_eq!(&derived[2..], &plain[1..]);
    }

    #[test]
    fn undecodable_bytes_are_applied_as_a_rejection() {
        let (mut machine, state) = ClusterStateMachine::new();
        let answer = machine.apply(1, b"\xff\xff\xff garbage");
        machine.applied(1);
        let (result, _): (Result<Outcome, Rejected>, usize) =
            bincode::serde::decode_from_slice(&answer, wire()).unwrap();
        assert!(matches!(result, Err(Rejected::Invalid(_))));
        assert_eq!(state.borrow().applied_index, 1);
    }
}
