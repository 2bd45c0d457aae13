//! The driver: one thread that owns the `RawNode` and does everything raft needs, in order.
//!
//! It runs on a dedicated OS thread, not the async runtime, because every `Ready` ends in
//! an fsync. Callers talk to it through a bounded queue; each proposal carries a oneshot
//! that the driver answers once the entry is applied.

use crate::storage::DiskStorage;
use crate::{ConsensusConfig, ProposeError, RaftStatus, StartError, StateMachine};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, StateRole};
use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Requests waiting for the driver. Beyond this a proposer gets `Overloaded` at once
/// rather than queueing without bound behind a slow disk.
const REQUEST_QUEUE_CAPACITY: usize = 4_096;

/// Requests taken from the queue before handling one `Ready`: under load many proposals
/// share one fsync, while a tick is never delayed by more than one batch.
const REQUESTS_PER_READY_MAX: usize = 1_024;

/// Largest append message raft builds, in bytes.
const MESSAGE_SIZE_MAX_BYTES: u64 = 1 << 20;

/// Most append messages in flight to one follower.
const INFLIGHT_MESSAGES_MAX: usize = 256;

enum Request {
    Propose {
        data: Vec<u8>,
        deadline: Instant,
        reply: oneshot::Sender<Result<Vec<u8>, ProposeError>>,
    },
    Shutdown,
}

struct Waiter {
    /// The term the proposal was made in. An entry only answers a waiter of its own term:
    /// after a restart, replayed entries carry sequence numbers that a new proposal reuses.
    term: u64,
    reply: oneshot::Sender<Result<Vec<u8>, ProposeError>>,
    deadline: Instant,
    proposed_at: Instant,
}

/// A cloneable way to reach the driver.
#[derive(Clone, Debug)]
pub struct ConsensusHandle {
    requests: SyncSender<Request>,
    status: watch::Receiver<RaftStatus>,
}

/// The running driver; dropping it without [`Consensus::shutdown`] leaves the thread to
/// stop when every handle is gone.
#[derive(Debug)]
pub struct Consensus {
    handle: ConsensusHandle,
    thread: JoinHandle<()>,
}

/// Opens the log in `config.dir` and starts the driver thread.
///
/// A new log is bootstrapped as a single-voter group of `config.id`; the state machine is
/// rebuilt by replaying every committed entry, so it starts empty.
pub fn start<S: StateMachine>(
    config: &ConsensusConfig,
    state_machine: S,
) -> Result<Consensus, StartError> {
    let storage =
        DiskStorage::open(&config.dir, &[config.id]).map_err(|source| StartError::Open {
            dir: config.dir.clone(),
            source,
        })?;
    let voters = storage.conf_state().voters.clone();
    let raft_config = raft::Config {
        id: config.id,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        // The state machine lives in memory and is rebuilt from the log on every start.
        applied: 0,
        max_size_per_msg: MESSAGE_SIZE_MAX_BYTES,
        max_inflight_msgs: INFLIGHT_MESSAGES_MAX,
        check_quorum: true,
        pre_vote: true,
        ..raft::Config::default()
    };
    raft_config.validate()?;
    let mut raw_node = RawNode::new(
        &raft_config,
        storage,
        &crate::logger::raft_logger(config.id),
    )?;
    if voters == [config.id] {
        // Alone in the group: no one to wait for, so take the lead now instead of after an
        // election timeout.
        raw_node.campaign()?;
    }
    let (requests, receiver) = sync_channel(REQUEST_QUEUE_CAPACITY);
    let (status_sender, status) = watch::channel(RaftStatus {
        id: config.id,
        voters,
        ..RaftStatus::default()
    });
    let driver = Driver {
        id: config.id,
        raw_node,
        state_machine,
        requests: receiver,
        status: status_sender,
        waiters: HashMap::new(),
        next_proposal: 0,
        tick_interval: config.tick_interval,
        leader: None,
    };
    let thread = std::thread::Builder::new()
        .name(format!("raft-driver-{}", config.id))
        .spawn(move || driver.run())?;
    Ok(Consensus {
        handle: ConsensusHandle { requests, status },
        thread,
    })
}

impl Consensus {
    pub fn handle(&self) -> ConsensusHandle {
        self.handle.clone()
    }

    /// Stops the driver after the request it is handling and waits for the thread. Waiting
    /// proposers are answered `Stopped`. Blocks: call from a blocking context.
    pub fn shutdown(self) {
        // A full queue still gets the message: the driver drains it.
        let _ = self.handle.requests.send(Request::Shutdown);
        if self.thread.join().is_err() {
            tracing::error!("raft driver thread panicked");
        }
    }
}

impl ConsensusHandle {
    /// Replicates `data`, waits until it is applied, and returns the state machine's answer.
    ///
    /// `Timeout` means the outcome is unknown: the entry may still commit later.
    pub async fn propose(&self, data: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, ProposeError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Propose {
            data,
            deadline: Instant::now() + timeout,
            reply,
        };
        match self.requests.try_send(request) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ProposeError::Overloaded),
            Err(TrySendError::Disconnected(_)) => return Err(ProposeError::Stopped),
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Timeout),
        }
    }

    /// The latest published status.
    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// A receiver that wakes on every status change.
    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }
}

struct Driver<S> {
    id: u64,
    raw_node: RawNode<DiskStorage>,
    state_machine: S,
    requests: Receiver<Request>,
    status: watch::Sender<RaftStatus>,
    /// Proposers waiting for their entry, by proposal sequence number.
    waiters: HashMap<u64, Waiter>,
    next_proposal: u64,
    tick_interval: Duration,
    leader: Option<u64>,
}

/// Why the driver must stop.
#[derive(Debug)]
enum Fatal {
    Storage(String),
    Raft(raft::Error),
}

impl<S: StateMachine> Driver<S> {
    fn run(mut self) {
        let mut next_tick = Instant::now() + self.tick_interval;
        let outcome = loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let mut stop = match self.requests.recv_timeout(wait) {
                Ok(request) => self.handle(request),
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            for _ in 0..REQUESTS_PER_READY_MAX {
                if stop {
                    break;
                }
                match self.requests.try_recv() {
                    Ok(request) => stop = self.handle(request),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw_node.tick();
                next_tick = now + self.tick_interval;
                self.expire_waiters(now);
            }
            if let Err(fatal) = self.on_ready() {
                break Err(fatal);
            }
            if stop {
                break Ok(());
            }
        };
        let answer = match outcome {
            Ok(()) => {
                tracing::info!(id = self.id, "raft driver stopped");
                ProposeError::Stopped
            }
            Err(fatal) => {
                tracing::error!(id = self.id, error = ?fatal, "raft driver stopped on a fatal error");
                match fatal {
                    Fatal::Storage(message) => ProposeError::Storage(message),
                    Fatal::Raft(error) => ProposeError::Storage(error.to_string()),
                }
            }
        };
        for (_, waiter) in self.waiters.drain() {
            let _ = waiter.reply.send(Err(answer.clone()));
        }
    }

    /// Handles one request; true when the driver should stop.
    fn handle(&mut self, request: Request) -> bool {
        match request {
            Request::Shutdown => true,
            Request::Propose {
                data,
                deadline,
                reply,
            } => {
                if self.raw_node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(ProposeError::NotLeader {
                        leader: self.leader,
                    }));
                    return false;
                }
                let sequence = self.next_proposal;
                self.next_proposal += 1;
                let context = proposal_context(self.id, sequence);
                match self.raw_node.propose(context, data) {
                    Ok(()) => {
                        let waiter = Waiter {
                            term: self.raw_node.raft.term,
                            reply,
                            deadline,
                            proposed_at: Instant::now(),
                        };
                        self.waiters.insert(sequence, waiter);
                    }
                    Err(error) => {
                        tracing::debug!(%error, "proposal dropped");
                        let _ = reply.send(Err(ProposeError::NotLeader {
                            leader: self.leader,
                        }));
                    }
                }
                false
            }
        }
    }

    fn expire_waiters(&mut self, now: Instant) {
        self.waiters
            .retain(|_, waiter| waiter.deadline > now && !waiter.reply.is_closed());
    }

    /// Handles one `Ready` in the order raft-rs documents: send what may go before
    /// persisting, apply what is committed, persist entries and hard state (synced), send
    /// what had to wait for that, advance, then the same for the light ready.
    fn on_ready(&mut self) -> Result<(), Fatal> {
        if !self.raw_node.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw_node.ready();
        if let Some(soft_state) = ready.ss() {
            let leader = (soft_state.leader_id != raft::INVALID_ID).then_some(soft_state.leader_id);
            if leader != self.leader {
                shoal_ops::metrics::metrics()
                    .raft_leader_changes_total
                    .inc();
                tracing::info!(id = self.id, leader = ?leader, role = ?soft_state.raft_state, "raft leader changed");
                self.leader = leader;
            }
        }
        send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            return Err(Fatal::Storage(
                "received a snapshot; snapshot install is not supported yet".into(),
            ));
        }
        self.apply(ready.take_committed_entries())?;
        self.raw_node
            .mut_store()
            .persist(ready.entries(), ready.hs(), None)
            .map_err(|error| Fatal::Storage(error.to_string()))?;
        send(ready.take_persisted_messages());
        let mut light = self.raw_node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw_node
                .mut_store()
                .set_commit(commit)
                .map_err(|error| Fatal::Storage(error.to_string()))?;
        }
        send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw_node.advance_apply();
        self.publish_status();
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Fatal> {
        let Some(last) = entries.last().map(|entry| entry.index) else {
            return Ok(());
        };
        for entry in entries {
            let output = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => continue,
                EntryType::EntryNormal => self.state_machine.apply(entry.index, &entry.data),
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|error| Fatal::Storage(format!("corrupt conf change: {error}")))?;
                    self.apply_conf_change(&change)?;
                    Vec::new()
                }
                EntryType::EntryConfChangeV2 => {
                    let change = ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|error| Fatal::Storage(format!("corrupt conf change: {error}")))?;
                    self.apply_conf_change(&change)?;
                    Vec::new()
                }
            };
            self.answer(&entry, output);
        }
        self.state_machine.applied(last);
        Ok(())
    }

    fn apply_conf_change(&mut self, change: &impl raft_proto::ConfChangeI) -> Result<(), Fatal> {
        let conf_state = self
            .raw_node
            .apply_conf_change(change)
            .map_err(Fatal::Raft)?;
        self.raw_node
            .mut_store()
            .persist(&[], None, Some(&conf_state))
            .map_err(|error| Fatal::Storage(error.to_string()))
    }

    fn answer(&mut self, entry: &Entry, output: Vec<u8>) {
        let Some((proposer, sequence)) = parse_proposal_context(&entry.context) else {
            return;
        };
        if proposer != self.id {
            return;
        }
        if self
            .waiters
            .get(&sequence)
            .is_none_or(|waiter| waiter.term != entry.term)
        {
            return;
        }
        if let Some(waiter) = self.waiters.remove(&sequence) {
            shoal_ops::metrics::metrics()
                .raft_proposal_duration_seconds
                .observe(waiter.proposed_at.elapsed().as_secs_f64());
            let _ = waiter.reply.send(Ok(output));
        }
    }

    fn publish_status(&mut self) {
        let raft = &self.raw_node.raft;
        let status = RaftStatus {
            id: self.id,
            term: raft.term,
            leader: self.leader,
            is_leader: raft.state == StateRole::Leader,
            commit_index: raft.raft_log.committed,
            applied_index: raft.raft_log.applied,
            voters: self.raw_node.store().conf_state().voters.clone(),
        };
        let metrics = shoal_ops::metrics::metrics();
        metrics.raft_term.set(saturating_i64(status.term));
        metrics.raft_is_leader.set(i64::from(status.is_leader));
        metrics
            .raft_commit_index
            .set(saturating_i64(status.commit_index));
        metrics
            .raft_applied_index
            .set(saturating_i64(status.applied_index));
        metrics
            .raft_log_bytes
            .set(saturating_i64(self.raw_node.store().used_bytes() as u64));
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

/// Messages for other members. A single-voter group has none; the TCP transport that
/// carries them between servers arrives with multi-member groups.
fn send(messages: Vec<Message>) {
    for message in messages {
        tracing::warn!(to = message.to, kind = ?message.get_msg_type(), "no transport for raft message; dropped");
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A proposal's context: the proposer's id and its sequence number, 16 bytes big-endian.
fn proposal_context(proposer: u64, sequence: u64) -> Vec<u8> {
    let mut context = Vec::with_capacity(16);
    context.extend_from_slice(&proposer.to_be_bytes());
    context.extend_from_slice(&sequence.to_be_bytes());
    context
}

fn parse_proposal_context(context: &[u8]) -> Option<(u64, u64)> {
    let proposer = u64::from_be_bytes(context.get(..8)?.try_into().ok()?);
    let sequence = u64::from_be_bytes(context.get(8..16)?.try_into().ok()?);
    Some((proposer, sequence))
}

#[cfg(test)]
mod tests;
