//! One member's raft logic with no threads, sockets or clocks of its own: the `RawNode`,
//! the state machine, and the callers waiting on them. The driver thread runs it against
//! the disk and TCP; the simulation tests run it against memory and a seeded network.
//!
//! `handle_ready` follows raft-rs's documented order: collect messages, install a received
//! snapshot, apply committed entries, persist new entries and hard state (synced), collect
//! the messages that had to wait for that, advance, then the same for the light ready.
//! Messages are handed to the caller only after that, so nothing leaves before it is
//! durable. When the disk is full the ready waits for space, and until it is advanced the
//! `RawNode` is left alone, as raft-rs requires: no ticks, peer messages are dropped, and
//! proposals and reads are refused.

use crate::storage::{LogStore, StorageError};
use crate::{MembershipChange, ProposeError, RaftStatus, StateMachine};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
    Snapshot,
};
use raft::{RawNode, StateRole};
use std::collections::HashMap;
use std::time::Instant;
use tokio::sync::oneshot;

/// Reply channel of a proposal: the state machine's answer.
pub(crate) type ProposalReply = oneshot::Sender<Result<Vec<u8>, ProposeError>>;
/// Reply channel of a read-index request: the index a read must wait for.
pub(crate) type ReadReply = oneshot::Sender<Result<u64, ProposeError>>;

struct Waiter<T> {
    /// The term the request was made in. An entry only answers a waiter of its own term:
    /// after a restart, replayed entries carry sequence numbers that new requests reuse.
    term: u64,
    reply: oneshot::Sender<Result<T, ProposeError>>,
    deadline: Instant,
    started: Instant,
}

struct PendingRead {
    /// Known once the leader confirmed it; the read may go ahead once this is applied.
    index: Option<u64>,
    reply: ReadReply,
    deadline: Instant,
}

/// Something the owner of the core must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CoreEvent {
    /// A member joined (or its address changed) through a committed conf change.
    PeerAddress { id: u64, address: String },
    /// A member left.
    PeerRemoved { id: u64 },
}

/// Why `handle_ready` could not finish.
#[derive(Debug)]
pub(crate) enum ReadyError {
    /// The disk is full: the ready is kept and retried; proposals are refused meanwhile.
    Stalled(StorageError),
    /// Anything else: the member must stop.
    Fatal(String),
}

pub(crate) struct Core<L: LogStore, S: StateMachine> {
    id: u64,
    raw: RawNode<L>,
    state_machine: S,
    proposals: HashMap<u64, Waiter<Vec<u8>>>,
    reads: HashMap<u64, PendingRead>,
    next_sequence: u64,
    leader: Option<u64>,
    /// Take a snapshot (and compact the log) once this many entries were applied since
    /// the last one.
    snapshot_interval_entries: u64,
    /// Set when the membership changed: the next snapshot must carry the new membership,
    /// since a member added by the change can only install a snapshot that names it.
    snapshot_due: bool,
    /// A ready that could not be written yet (disk full); retried first.
    unpersisted: Option<Unpersisted>,
    /// A membership applied but not yet written (the disk was full): written again before
    /// each ready, and no snapshot is taken meanwhile, since a snapshot records the written
    /// membership. Lost in a crash, it comes back when the log's committed entries are
    /// applied again on restart.
    unsaved_membership: Option<ConfState>,
    /// The newest leader a stalled member heard from in the messages it had to drop:
    /// while raft-rs here lags behind that term, this member is not the leader, whatever
    /// raft-rs still believes, and callers are sent to the one it heard.
    heard: Option<HeardLeader>,
    outbox: Vec<Message>,
    events: Vec<CoreEvent>,
}

/// A ready waiting for disk space, and how far it got.
struct Unpersisted {
    ready: raft::Ready,
    /// Its snapshot is installed and its committed entries applied: what is left is to
    /// persist its entries and hard state. (Both are done once.)
    applied: bool,
}

/// A leader of a newer term, known from its messages before raft-rs could step them.
#[derive(Clone, Copy, Debug)]
struct HeardLeader {
    term: u64,
    id: u64,
}

/// Settings of a core.
#[derive(Clone, Debug)]
pub(crate) struct CoreConfig {
    pub id: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_interval_entries: u64,
    /// Fixes the election timeout at `election_ticks` instead of randomising it, so a
    /// seeded simulation replays exactly (its scheduler supplies the randomness).
    pub deterministic_election: bool,
}

impl<L: LogStore, S: StateMachine> Core<L, S> {
    /// Builds the core over `store`, restoring `state_machine` from the store's snapshot.
    /// Entries after the snapshot are re-applied as raft commits them again.
    pub(crate) fn new(
        config: &CoreConfig,
        store: L,
        mut state_machine: S,
        logger: &slog::Logger,
    ) -> Result<Core<L, S>, String> {
        let snapshot = store.latest_snapshot().clone();
        let applied = snapshot.get_metadata().index;
        if applied > 0 {
            state_machine
                .restore(&snapshot.data)
                .map_err(|error| format!("restoring the snapshot at {applied}: {error}"))?;
        }
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: MESSAGE_SIZE_MAX_BYTES,
            max_inflight_msgs: INFLIGHT_MESSAGES_MAX,
            check_quorum: true,
            pre_vote: true,
            min_election_tick: config.election_ticks,
            max_election_tick: if config.deterministic_election {
                config.election_ticks + 1
            } else {
                2 * config.election_ticks
            },
            ..raft::Config::default()
        };
        raft_config.validate().map_err(|error| error.to_string())?;
        let voters = store.conf_state().voters.clone();
        let mut raw =
            RawNode::new(&raft_config, store, logger).map_err(|error| error.to_string())?;
        if voters == [config.id] {
            // Alone in the group: no one to wait for, so take the lead now instead of
            // after an election timeout.
            raw.campaign().map_err(|error| error.to_string())?;
        }
        Ok(Core {
            id: config.id,
            raw,
            state_machine,
            proposals: HashMap::new(),
            reads: HashMap::new(),
            next_sequence: 0,
            leader: None,
            snapshot_interval_entries: config.snapshot_interval_entries.max(1),
            snapshot_due: false,
            unpersisted: None,
            unsaved_membership: None,
            heard: None,
            outbox: Vec::new(),
            events: Vec::new(),
        })
    }

    /// Why nothing may reach the `RawNode` now: a leader of a newer term is known (the
    /// caller goes there), or a ready is waiting for disk space, and raft-rs forbids
    /// changing its state between `ready` and `advance`.
    fn stall_refusal(&self) -> Option<ProposeError> {
        if let Some(newer) = self.newer_leader() {
            return Some(ProposeError::NotLeader {
                leader: Some(newer.id),
            });
        }
        self.is_stalled().then(|| {
            ProposeError::Storage("this member cannot write its log (disk full); retrying".into())
        })
    }

    fn refusal(&self) -> Option<ProposeError> {
        if let Some(refusal) = self.stall_refusal() {
            return Some(refusal);
        }
        if self.raw.raft.state != StateRole::Leader {
            return Some(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        None
    }

    fn next_context(&mut self) -> (u64, Vec<u8>) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        (sequence, proposal_context(self.id, sequence))
    }

    /// Proposes `data`; `reply` is answered with the state machine's output once applied.
    pub(crate) fn propose(&mut self, data: Vec<u8>, deadline: Instant, reply: ProposalReply) {
        if let Some(refusal) = self.refusal() {
            let _ = reply.send(Err(refusal));
            return;
        }
        let (sequence, context) = self.next_context();
        match self.raw.propose(context, data) {
            Ok(()) => self.wait(sequence, deadline, reply),
            Err(error) => {
                tracing::debug!(%error, "proposal dropped");
                let _ = reply.send(Err(ProposeError::NotLeader {
                    leader: self.leader,
                }));
            }
        }
    }

    /// Proposes a membership change; answered (with no bytes) once applied.
    pub(crate) fn change_membership(
        &mut self,
        change: &MembershipChange,
        deadline: Instant,
        reply: ProposalReply,
    ) {
        if let Some(refusal) = self.refusal() {
            let _ = reply.send(Err(refusal));
            return;
        }
        let mut conf_change = ConfChange::default();
        match change {
            MembershipChange::AddVoter { id, address } => {
                conf_change.set_change_type(ConfChangeType::AddNode);
                conf_change.node_id = *id;
                conf_change.context = address.clone().into_bytes().into();
            }
            MembershipChange::AddLearner { id, address } => {
                conf_change.set_change_type(ConfChangeType::AddLearnerNode);
                conf_change.node_id = *id;
                conf_change.context = address.clone().into_bytes().into();
            }
            MembershipChange::Remove { id } => {
                conf_change.set_change_type(ConfChangeType::RemoveNode);
                conf_change.node_id = *id;
            }
        }
        let (sequence, context) = self.next_context();
        match self.raw.propose_conf_change(context, conf_change) {
            Ok(()) => self.wait(sequence, deadline, reply),
            Err(error) => {
                let _ = reply.send(Err(ProposeError::Refused(error.to_string())));
            }
        }
    }

    fn wait(&mut self, sequence: u64, deadline: Instant, reply: ProposalReply) {
        let waiter = Waiter {
            term: self.raw.raft.term,
            reply,
            deadline,
            started: Instant::now(),
        };
        self.proposals.insert(sequence, waiter);
    }

    /// Asks for a linearizable read point: `reply` gets a log index once the leader has
    /// confirmed its leadership and this member has applied up to that index.
    pub(crate) fn read_index(&mut self, deadline: Instant, reply: ReadReply) {
        if let Some(refusal) = self.stall_refusal() {
            let _ = reply.send(Err(refusal));
            return;
        }
        if self.leader.is_none() {
            let _ = reply.send(Err(ProposeError::NotLeader { leader: None }));
            return;
        }
        let (sequence, context) = self.next_context();
        self.raw.read_index(context);
        self.reads.insert(
            sequence,
            PendingRead {
                index: None,
                reply,
                deadline,
            },
        );
    }

    pub(crate) fn step(&mut self, message: Message) {
        if self.is_stalled() {
            // raft-rs must not be stepped between `ready` and `advance`: a follower that
            // answered here would abort in `advance`. Raft tolerates the loss; the sender
            // tries again.
            shoal_ops::metrics::metrics()
                .raft_messages_dropped_total
                .with_label_values(&["storage_stalled"])
                .inc();
            self.hear(&message);
            return;
        }
        let last_index = self.raw.raft.raft_log.last_index();
        if message.get_msg_type() == MessageType::MsgHeartbeat && message.commit > last_index {
            // The leader believes this member stored entries it does not have: its data
            // was lost. raft-rs would abort on this; refuse it instead. The member has to
            // be removed and added again (it then gets a snapshot).
            shoal_ops::metrics::metrics()
                .raft_frames_rejected_total
                .with_label_values(&["log_behind_leader"])
                .inc();
            tracing::error!(
                id = self.id,
                leader_commit = message.commit,
                last_index,
                "the leader believes this member holds entries it lacks (was its data lost?); \
                 remove it from the group and add it again"
            );
            return;
        }
        if let Err(error) = self.raw.step(message) {
            tracing::debug!(%error, "raft message not stepped");
        }
    }

    pub(crate) fn tick(&mut self, now: Instant) {
        // Not while a ready is unpersisted: a tick may start an election, and a member
        // that cannot write its vote has no business campaigning.
        if !self.is_stalled() {
            self.raw.tick();
        }
        // Expired callers are told so: their entry may still commit later, which is what
        // `Timeout` means. (Dropping the reply would read as `Stopped`.)
        let expired: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, waiter)| waiter.deadline <= now || waiter.reply.is_closed())
            .map(|(sequence, _)| *sequence)
            .collect();
        for sequence in expired {
            if let Some(waiter) = self.proposals.remove(&sequence) {
                let _ = waiter.reply.send(Err(ProposeError::Timeout));
            }
        }
        let expired: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, read)| read.deadline <= now || read.reply.is_closed())
            .map(|(sequence, _)| *sequence)
            .collect();
        for sequence in expired {
            if let Some(read) = self.reads.remove(&sequence) {
                let _ = read.reply.send(Err(ProposeError::Timeout));
            }
        }
    }

    pub(crate) fn transfer_leader(&mut self, to: u64) {
        // A stalled leader keeps the lead until it can write again (or loses it to an
        // election among the others); the caller sees the lead did not move.
        if !self.is_stalled() {
            self.raw.transfer_leader(to);
        }
    }

    pub(crate) fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// Tells raft whether a snapshot message to `id` left this member.
    pub(crate) fn report_snapshot(&mut self, id: u64, sent: bool) {
        let status = if sent {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(id, status);
    }

    /// Messages to send, in order. Everything in here is already durable.
    pub(crate) fn take_outbox(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    pub(crate) fn take_events(&mut self) -> Vec<CoreEvent> {
        std::mem::take(&mut self.events)
    }

    pub(crate) fn is_stalled(&self) -> bool {
        self.unpersisted.is_some()
    }

    /// Notes the sender of a dropped message as the leader of a newer term, when only a
    /// leader sends such a message. A stalled leader does not tick, so the others elect a
    /// new one; without this it would go on calling itself leader and refuse every write
    /// until its disk had room, where it can send them to the one that leads now. The
    /// note cannot outlive its use: a leader of term T had a majority in T, so this member
    /// can only lead again in a later term, by which time raft-rs here is past T and
    /// [`Core::newer_leader`] ignores it.
    fn hear(&mut self, message: &Message) {
        let from_a_leader = matches!(
            message.get_msg_type(),
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        );
        let newest = self.heard.map_or(self.raw.raft.term, |heard| {
            heard.term.max(self.raw.raft.term)
        });
        if from_a_leader && message.term > newest {
            tracing::info!(
                id = self.id,
                leader = message.from,
                term = message.term,
                "heard from the leader of a newer term while this member cannot write"
            );
            self.heard = Some(HeardLeader {
                term: message.term,
                id: message.from,
            });
        }
    }

    /// The leader heard of a term newer than raft-rs here knows (see [`Core::hear`]).
    fn newer_leader(&self) -> Option<HeardLeader> {
        self.heard.filter(|heard| heard.term > self.raw.raft.term)
    }

    #[cfg(test)]
    pub(crate) fn state_machine(&self) -> &S {
        &self.state_machine
    }

    pub(crate) fn store(&self) -> &L {
        self.raw.store()
    }

    #[cfg(test)]
    pub(crate) fn store_mut(&mut self) -> &mut L {
        self.raw.mut_store()
    }

    /// This member's raft role, as named in the `shoal_raft_role` metric. A stalled member
    /// that heard of a newer leader counts as a follower: it leads or campaigns for
    /// nothing any more.
    pub(crate) fn role_name(&self) -> &'static str {
        if self.newer_leader().is_some() {
            return "follower";
        }
        match self.raw.raft.state {
            StateRole::Leader => "leader",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre_candidate",
            StateRole::Follower => "follower",
        }
    }

    pub(crate) fn status(&self) -> RaftStatus {
        let raft = &self.raw.raft;
        let conf_state = self.raw.store().conf_state();
        let newer = self.newer_leader();
        RaftStatus {
            id: self.id,
            term: raft.term,
            leader: newer.map_or(self.leader, |newer| Some(newer.id)),
            is_leader: raft.state == StateRole::Leader && newer.is_none(),
            commit_index: raft.raft_log.committed,
            applied_index: raft.raft_log.applied,
            snapshot_index: self.raw.store().latest_snapshot().get_metadata().index,
            voters: conf_state.voters.clone(),
            learners: conf_state.learners.clone(),
            // Learners only: a voter's index moves with every append, and the status is
            // published whenever it changes.
            matched: if raft.state == StateRole::Leader {
                raft.prs()
                    .iter()
                    .filter(|(id, _)| conf_state.learners.contains(id))
                    .map(|(&id, progress)| (id, progress.matched))
                    .collect()
            } else {
                std::collections::BTreeMap::new()
            },
            storage_stalled: self.unpersisted.is_some() || self.unsaved_membership.is_some(),
        }
    }

    /// Processes everything raft has ready. On `Stalled` the ready is kept and the next
    /// call goes on with it from where it stopped.
    pub(crate) fn handle_ready(&mut self) -> Result<(), ReadyError> {
        if let Some(membership) = self.unsaved_membership.clone() {
            self.save_membership(membership)?;
        }
        let Unpersisted { mut ready, applied } = match self.unpersisted.take() {
            Some(unpersisted) => unpersisted,
            None if self.raw.has_ready() => Unpersisted {
                ready: self.take_ready(),
                applied: false,
            },
            None => return Ok(()),
        };
        if !applied {
            if !ready.snapshot().is_empty() {
                let snapshot = ready.snapshot().clone();
                if let Err(error) = self.raw.mut_store().install_snapshot(&snapshot) {
                    let index = snapshot.get_metadata().index;
                    return Err(self.stall_or_fail(
                        Unpersisted { ready, applied },
                        error,
                        &format!("installing the snapshot at {index}"),
                    ));
                }
                // The snapshot's membership is newer than any this member kept unwritten.
                self.unsaved_membership = None;
                self.restore(&snapshot)?;
            }
            self.apply(ready.take_committed_entries())?;
        }
        self.persist_and_advance(ready)
    }

    /// A new ready from raft, with what can be done at once done: the leader noted, the
    /// messages that need not wait for the disk queued, read points recorded.
    fn take_ready(&mut self) -> raft::Ready {
        let mut ready = self.raw.ready();
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
        self.outbox.extend(ready.take_messages());
        for read in ready.take_read_states() {
            if let Some((_, sequence)) = parse_proposal_context(&read.request_ctx)
                && let Some(pending) = self.reads.get_mut(&sequence)
            {
                pending.index = Some(read.index);
            }
        }
        ready
    }

    /// A full disk keeps `unpersisted` for the next call; anything else stops the member.
    fn stall_or_fail(
        &mut self,
        unpersisted: Unpersisted,
        error: StorageError,
        doing: &str,
    ) -> ReadyError {
        if error.is_out_of_space() {
            self.unpersisted = Some(unpersisted);
            return ReadyError::Stalled(error);
        }
        ReadyError::Fatal(format!("{doing}: {error}"))
    }

    fn persist_and_advance(&mut self, mut ready: raft::Ready) -> Result<(), ReadyError> {
        if let Err(error) = self.raw.mut_store().append(ready.entries(), ready.hs()) {
            let unpersisted = Unpersisted {
                ready,
                applied: true,
            };
            return Err(self.stall_or_fail(unpersisted, error, "persisting entries"));
        }
        self.outbox.extend(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index()
            && let Err(error) = self.raw.mut_store().set_commit(commit)
        {
            // Not fatal: a lost commit index is learned again from the leader.
            tracing::warn!(%error, commit, "recording the commit index failed");
        }
        self.outbox.extend(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.answer_reads();
        self.maybe_snapshot()
    }

    /// Restores the state machine from a snapshot the log has just installed.
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), ReadyError> {
        let index = snapshot.get_metadata().index;
        self.state_machine
            .restore(&snapshot.data)
            .map_err(|error| {
                ReadyError::Fatal(format!("restoring the snapshot at {index}: {error}"))
            })?;
        shoal_ops::metrics::metrics()
            .raft_snapshots_installed_total
            .inc();
        tracing::info!(id = self.id, index, "installed a snapshot from the leader");
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), ReadyError> {
        let Some(last) = entries.last().map(|entry| entry.index) else {
            return Ok(());
        };
        // Answers go out after `applied`, so a caller that reads the state machine's
        // published view after its answer sees its own write.
        let mut answers = Vec::new();
        for entry in entries {
            let output = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => continue,
                EntryType::EntryNormal => self.state_machine.apply(entry.index, &entry.data),
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data).map_err(|error| {
                        ReadyError::Fatal(format!("corrupt conf change: {error}"))
                    })?;
                    self.apply_conf_change(
                        &change,
                        change.get_change_type(),
                        change.node_id,
                        &change.context,
                    )?;
                    Vec::new()
                }
                EntryType::EntryConfChangeV2 => {
                    let change = ConfChangeV2::parse_from_bytes(&entry.data).map_err(|error| {
                        ReadyError::Fatal(format!("corrupt conf change: {error}"))
                    })?;
                    self.apply_conf_change(
                        &change,
                        ConfChangeType::AddNode,
                        raft::INVALID_ID,
                        &change.context,
                    )?;
                    Vec::new()
                }
            };
            answers.push((entry, output));
        }
        self.state_machine.applied(last);
        for (entry, output) in answers {
            self.answer(&entry, output);
        }
        Ok(())
    }

    fn apply_conf_change(
        &mut self,
        change: &impl raft_proto::ConfChangeI,
        kind: ConfChangeType,
        node: u64,
        context: &[u8],
    ) -> Result<(), ReadyError> {
        let conf_state = match self.raw.apply_conf_change(change) {
            Ok(conf_state) => conf_state,
            Err(error) => {
                // raft-rs refuses changes that would leave the group invalid; the entry is
                // still committed, it just changes nothing.
                tracing::warn!(%error, "conf change refused");
                return Ok(());
            }
        };
        self.save_membership(conf_state.clone())?;
        self.snapshot_due = true;
        if node != raft::INVALID_ID {
            match kind {
                ConfChangeType::RemoveNode => self.events.push(CoreEvent::PeerRemoved { id: node }),
                _ if !context.is_empty() => self.events.push(CoreEvent::PeerAddress {
                    id: node,
                    address: String::from_utf8_lossy(context).into_owned(),
                }),
                _ => {}
            }
        }
        tracing::info!(id = self.id, voters = ?conf_state.voters, learners = ?conf_state.learners, "membership changed");
        Ok(())
    }

    /// Writes `membership`, the newest applied; on a full disk keeps it to write again
    /// (see `unsaved_membership`) rather than stop the member.
    fn save_membership(&mut self, membership: ConfState) -> Result<(), ReadyError> {
        match self.raw.mut_store().set_conf_state(&membership) {
            Ok(()) => {
                // The newest is written: an older one kept unwritten must never follow it.
                self.unsaved_membership = None;
                Ok(())
            }
            Err(error) if error.is_out_of_space() => {
                if self.unsaved_membership.is_none() {
                    tracing::warn!(id = self.id, %error, "no space to write the membership; it is written once there is");
                }
                self.unsaved_membership = Some(membership);
                Ok(())
            }
            Err(error) => Err(ReadyError::Fatal(format!(
                "persisting the membership: {error}"
            ))),
        }
    }

    fn answer(&mut self, entry: &Entry, output: Vec<u8>) {
        let Some((proposer, sequence)) = parse_proposal_context(&entry.context) else {
            return;
        };
        if proposer != self.id
            || self
                .proposals
                .get(&sequence)
                .is_none_or(|waiter| waiter.term != entry.term)
        {
            return;
        }
        if let Some(waiter) = self.proposals.remove(&sequence) {
            shoal_ops::metrics::metrics()
                .raft_proposal_duration_seconds
                .observe(waiter.started.elapsed().as_secs_f64());
            let _ = waiter.reply.send(Ok(output));
        }
    }

    fn answer_reads(&mut self) {
        let applied = self.raw.raft.raft_log.applied;
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, read)| read.index.is_some_and(|index| index <= applied))
            .map(|(sequence, _)| *sequence)
            .collect();
        for sequence in ready {
            if let Some(read) = self.reads.remove(&sequence)
                && let Some(index) = read.index
            {
                let _ = read.reply.send(Ok(index));
            }
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), ReadyError> {
        let applied = self.raw.raft.raft_log.applied;
        let last_snapshot = self.raw.store().latest_snapshot().get_metadata().index;
        if !self.snapshot_due && applied < last_snapshot + self.snapshot_interval_entries {
            return Ok(());
        }
        if applied <= last_snapshot || self.unsaved_membership.is_some() {
            return Ok(());
        }
        self.snapshot_due = false;
        let started = Instant::now();
        let term = self.raw.store().term(applied).map_err(|error| {
            ReadyError::Fatal(format!("term of applied index {applied}: {error}"))
        })?;
        let mut snapshot = Snapshot::default();
        snapshot.data = self.state_machine.snapshot().into();
        let metadata = snapshot.mut_metadata();
        metadata.index = applied;
        metadata.term = term;
        metadata.set_conf_state(self.raw.store().conf_state().clone());
        match self.raw.mut_store().compact(snapshot) {
            Ok(()) => {
                let metrics = shoal_ops::metrics::metrics();
                metrics.raft_snapshots_taken_total.inc();
                metrics
                    .raft_snapshot_duration_seconds
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(
                    id = self.id,
                    index = applied,
                    "took a snapshot and compacted the log"
                );
                Ok(())
            }
            // A snapshot is an optimisation: without it the log is just longer.
            Err(error) if error.is_out_of_space() => {
                tracing::warn!(%error, "no space for a snapshot; the log keeps growing");
                Ok(())
            }
            Err(error) => Err(ReadyError::Fatal(format!("taking a snapshot: {error}"))),
        }
    }
}

/// Largest append message raft builds, in bytes.
const MESSAGE_SIZE_MAX_BYTES: u64 = 1 << 20;

/// Most append messages in flight to one follower.
const INFLIGHT_MESSAGES_MAX: usize = 256;

/// A request's context: the requester's id and its sequence number, 16 bytes big-endian.
pub(crate) fn proposal_context(proposer: u64, sequence: u64) -> Vec<u8> {
    let mut context = Vec::with_capacity(16);
    context.extend_from_slice(&proposer.to_be_bytes());
    context.extend_from_slice(&sequence.to_be_bytes());
    context
}

pub(crate) fn parse_proposal_context(context: &[u8]) -> Option<(u64, u64)> {
    let proposer = u64::from_be_bytes(context.get(..8)?.try_into().ok()?);
    let sequence = u64::from_be_bytes(context.get(8..16)?.try_into().ok()?);
    Some((proposer, sequence))
}
