//! The driver: one thread that owns the raft [`Core`] and does its IO: the disk (through
//! the core's store), the transport, the clock and the callers' queues.
//!
//! It runs on a dedicated OS thread, not the async runtime, because every `Ready` ends in
//! an fsync. Callers and the transport reach it through two bounded queues, one for
//! requests and one for peer messages, so a flood of proposals never starves raft's own
//! traffic.

use crate::core::{Core, CoreConfig, CoreEvent, ProposalReply, ReadReply, ReadyError};
use crate::storage::DiskStorage;
use crate::transport::{self, Envelope, Inbox, PeerSender};
use crate::{
    ConsensusConfig, MembershipChange, ProposeError, RaftStatus, StartError, StateMachine,
};
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, select};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Requests waiting for the driver. Beyond this a caller gets `Overloaded` at once rather
/// than queueing without bound behind a slow disk.
const REQUEST_QUEUE_CAPACITY: usize = 8_192;

/// Peer messages waiting for the driver; when full, new ones are dropped (raft resends).
const INBOUND_QUEUE_CAPACITY: usize = 8_192;

/// Items taken from the queues before handling one `Ready`: under load many proposals
/// share one fsync, while a tick is never delayed by more than one batch.
const ITEMS_PER_READY_MAX: usize = 4_096;

enum Request {
    Propose {
        data: Vec<u8>,
        deadline: Instant,
        reply: ProposalReply,
    },
    ReadIndex {
        deadline: Instant,
        reply: ReadReply,
    },
    ChangeMembership {
        change: MembershipChange,
        deadline: Instant,
        reply: ProposalReply,
    },
    TransferLeader {
        to: u64,
    },
    Shutdown,
}

struct Inbound {
    envelope: Envelope,
    message: Message,
}

/// A cloneable way to reach the driver.
#[derive(Clone, Debug)]
pub struct ConsensusHandle {
    requests: Sender<Request>,
    status: watch::Receiver<RaftStatus>,
}

/// The running member; stop it with [`Consensus::shutdown`].
#[derive(Debug)]
pub struct Consensus {
    handle: ConsensusHandle,
    thread: JoinHandle<()>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

struct ChannelInbox(Sender<Inbound>);

impl Inbox for ChannelInbox {
    fn deliver(&self, envelope: Envelope, message: Message) -> bool {
        match self.0.try_send(Inbound { envelope, message }) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                shoal_ops::metrics::metrics()
                    .raft_messages_dropped_total
                    .with_label_values(&["inbound_full"])
                    .inc();
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Opens the log in `config.dir`, starts the transport (when `config.listen` is set) and
/// the driver thread. Must be called on a tokio runtime, which the transport uses.
///
/// A new log is bootstrapped with `config.peers` as voters. The state machine is restored
/// from the latest snapshot and the entries after it are applied again.
pub async fn start<S: StateMachine>(
    config: &ConsensusConfig,
    state_machine: S,
) -> Result<Consensus, StartError> {
    if !config.peers.contains_key(&config.id) {
        return Err(StartError::Config(format!(
            "member {} is not among the peers {:?}",
            config.id,
            config.peers.keys().collect::<Vec<_>>()
        )));
    }
    if config.peers.len() > 1 && config.listen.is_none() {
        return Err(StartError::Config(
            "a member of a group of several needs a raft listen address".into(),
        ));
    }
    let voters: Vec<u64> = config.peers.keys().copied().collect();
    let bootstrap = config.bootstrap.then_some(voters.as_slice());
    let storage = DiskStorage::open(&config.dir, bootstrap).map_err(|source| StartError::Open {
        dir: config.dir.clone(),
        source,
    })?;
    let core_config = CoreConfig {
        id: config.id,
        election_ticks: config.election_ticks,
        heartbeat_ticks: config.heartbeat_ticks,
        snapshot_interval_entries: config.snapshot_interval_entries,
        deterministic_election: false,
    };
    let core = Core::new(
        &core_config,
        storage,
        state_machine,
        &crate::logger::raft_logger(config.id),
    )
    .map_err(StartError::Raft)?;

    let (requests, request_queue) = bounded(REQUEST_QUEUE_CAPACITY);
    let (inbound, inbound_queue) = bounded(INBOUND_QUEUE_CAPACITY);
    let listener = match config.listen {
        None => None,
        Some(address) => {
            let socket = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| StartError::Listen { address, source })?;
            let inbox: Arc<dyn Inbox> = Arc::new(ChannelInbox(inbound));
            Some(tokio::spawn(transport::serve(
                socket,
                config.cluster_id,
                config.id,
                inbox,
            )))
        }
    };
    let runtime = tokio::runtime::Handle::current();
    let advertise = match config.peers.get(&config.id) {
        Some(address) if !address.is_empty() => address.clone(),
        _ => config.listen.map(|a| a.to_string()).unwrap_or_default(),
    };
    let mut peers = BTreeMap::new();
    for (&id, address) in &config.peers {
        if id != config.id && !address.is_empty() {
            peers.insert(id, PeerSender::start(&runtime, address.clone()));
        }
    }
    let (status_sender, status) = watch::channel(core.status());
    let driver = Driver {
        id: config.id,
        cluster_id: config.cluster_id,
        advertise,
        core,
        requests: request_queue,
        inbound: inbound_queue,
        status: status_sender,
        tick_interval: config.tick_interval,
        runtime,
        peers,
        published_role: "",
    };
    let thread = std::thread::Builder::new()
        .name(format!("raft-driver-{}", config.id))
        .spawn(move || driver.run())?;
    Ok(Consensus {
        handle: ConsensusHandle { requests, status },
        thread,
        listener,
    })
}

impl Consensus {
    pub fn handle(&self) -> ConsensusHandle {
        self.handle.clone()
    }

    /// Stops the driver after the request it is handling and waits for the thread.
    /// Waiting callers are answered `Stopped`. Blocks: call from a blocking context.
    pub fn shutdown(self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
        let _ = self.handle.requests.send(Request::Shutdown);
        if self.thread.join().is_err() {
            tracing::error!("raft driver thread panicked");
        }
    }
}

impl ConsensusHandle {
    fn submit(&self, request: Request) -> Result<(), ProposeError> {
        match self.requests.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ProposeError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(ProposeError::Stopped),
        }
    }

    async fn answer<T>(
        answer: oneshot::Receiver<Result<T, ProposeError>>,
        timeout: Duration,
    ) -> Result<T, ProposeError> {
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Timeout),
        }
    }

    /// Replicates `data`, waits until it is applied, and returns the state machine's answer.
    ///
    /// `Timeout` means the outcome is unknown: the entry may still commit later.
    pub async fn propose(&self, data: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Propose {
            data,
            deadline: Instant::now() + timeout,
            reply,
        })?;
        Self::answer(answer, timeout).await
    }

    /// A linearizable read point: returns once this member has applied everything the
    /// leader had committed when the read arrived. Reading the state machine after it
    /// returns sees every write acknowledged before the call.
    pub async fn read_index(&self, timeout: Duration) -> Result<u64, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::ReadIndex {
            deadline: Instant::now() + timeout,
            reply,
        })?;
        Self::answer(answer, timeout).await
    }

    /// Adds, promotes or removes a member; returns once the change is applied here.
    pub async fn change_membership(
        &self,
        change: MembershipChange,
        timeout: Duration,
    ) -> Result<(), ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::ChangeMembership {
            change,
            deadline: Instant::now() + timeout,
            reply,
        })?;
        Self::answer(answer, timeout).await.map(|_| ())
    }

    /// Asks the leader to hand leadership to `to`. Watch [`ConsensusHandle::status`] to
    /// see it happen.
    pub fn transfer_leader(&self, to: u64) -> Result<(), ProposeError> {
        self.submit(Request::TransferLeader { to })
    }

    /// The latest published status.
    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// A receiver that wakes on every status change.
    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// Resolves once the driver thread has ended: shut down, stopped on a fatal error, or
    /// panicked. (Its status sender goes with it.)
    pub async fn stopped(&self) {
        let mut status = self.status.clone();
        while status.changed().await.is_ok() {}
    }

    /// Whether the driver thread has ended (see [`ConsensusHandle::stopped`]).
    pub fn has_stopped(&self) -> bool {
        self.status.has_changed().is_err()
    }
}

struct Driver<S: StateMachine> {
    id: u64,
    cluster_id: u64,
    advertise: String,
    core: Core<DiskStorage, S>,
    requests: Receiver<Request>,
    inbound: Receiver<Inbound>,
    status: watch::Sender<RaftStatus>,
    tick_interval: Duration,
    runtime: tokio::runtime::Handle,
    peers: BTreeMap<u64, PeerSender>,
    /// The role last written to the metrics (labelled gauges are costly to set per loop).
    published_role: &'static str,
}

/// Every reason a raft message is dropped or an inbound frame refused, so each counter has
/// a series (at zero) from the start and a rate over it is defined.
const DROP_REASONS: [&str; 4] = [
    "inbound_full",
    "no_address",
    "queue_full",
    "storage_stalled",
];
const REJECT_REASONS: [&str; 5] = [
    "oversized",
    "corrupt",
    "cluster_id",
    "wrong_member",
    "log_behind_leader",
];

impl<S: StateMachine> Driver<S> {
    fn run(mut self) {
        let metrics = shoal_ops::metrics::metrics();
        for reason in DROP_REASONS {
            metrics
                .raft_messages_dropped_total
                .with_label_values(&[reason]);
        }
        for reason in REJECT_REASONS {
            metrics
                .raft_frames_rejected_total
                .with_label_values(&[reason]);
        }
        let mut next_tick = Instant::now() + self.tick_interval;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let mut stop = select! {
                recv(self.inbound) -> inbound => {
                    match inbound {
                        Ok(inbound) => self.step(inbound),
                        // No transport feeds this member (a single member without a
                        // listener): stop selecting on a closed queue, which would
                        // otherwise be ready at once, forever, and spin this thread.
                        Err(_) => self.inbound = crossbeam_channel::never(),
                    }
                    false
                }
                recv(self.requests) -> request => match request {
                    Ok(request) => self.handle(request),
                    Err(_) => true,
                },
                default(wait) => false,
            };
            for _ in 0..ITEMS_PER_READY_MAX {
                if stop {
                    break;
                }
                if let Ok(inbound) = self.inbound.try_recv() {
                    self.step(inbound);
                } else if let Ok(request) = self.requests.try_recv() {
                    stop = self.handle(request);
                } else {
                    break;
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.core.tick(now);
                next_tick = now + self.tick_interval;
            }
            let was_stalled = self.core.is_stalled();
            match self.core.handle_ready() {
                Ok(()) => {
                    if was_stalled {
                        tracing::info!(id = self.id, "the raft log is writable again");
                    }
                }
                Err(ReadyError::Stalled(error)) => {
                    if !was_stalled {
                        tracing::error!(id = self.id, %error, "cannot write the raft log; refusing proposals until space returns");
                    }
                }
                Err(ReadyError::Fatal(message)) => {
                    tracing::error!(id = self.id, %message, "raft driver stopped on a fatal error");
                    break;
                }
            }
            self.send_outbox();
            self.handle_events();
            self.publish_status();
            if stop {
                tracing::info!(id = self.id, "raft driver stopped");
                break;
            }
        }
    }

    fn step(&mut self, inbound: Inbound) {
        let Inbound { envelope, message } = inbound;
        if !envelope.from_address.is_empty()
            && self
                .peers
                .get(&envelope.from)
                .is_none_or(|peer| peer.address != envelope.from_address)
        {
            self.peers.insert(
                envelope.from,
                PeerSender::start(&self.runtime, envelope.from_address),
            );
        }
        self.core.step(message);
    }

    /// Handles one request; true when the driver should stop.
    fn handle(&mut self, request: Request) -> bool {
        match request {
            Request::Shutdown => return true,
            Request::Propose {
                data,
                deadline,
                reply,
            } => self.core.propose(data, deadline, reply),
            Request::ReadIndex { deadline, reply } => self.core.read_index(deadline, reply),
            Request::ChangeMembership {
                change,
                deadline,
                reply,
            } => {
                if let MembershipChange::AddVoter { id, address }
                | MembershipChange::AddLearner { id, address } = &change
                    && *id != self.id
                {
                    self.peers
                        .insert(*id, PeerSender::start(&self.runtime, address.clone()));
                }
                self.core.change_membership(&change, deadline, reply);
            }
            Request::TransferLeader { to } => self.core.transfer_leader(to),
        }
        false
    }

    fn send_outbox(&mut self) {
        let metrics = shoal_ops::metrics::metrics();
        for message in self.core.take_outbox() {
            let to = message.to;
            let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let Some(peer) = self.peers.get(&to) else {
                metrics
                    .raft_messages_dropped_total
                    .with_label_values(&["no_address"])
                    .inc();
                continue;
            };
            let frame = message
                .write_to_bytes()
                .map_err(|error| error.to_string())
                .and_then(|bytes| {
                    transport::encode_frame(&Envelope {
                        cluster_id: self.cluster_id,
                        from: self.id,
                        from_address: self.advertise.clone(),
                        to,
                        message: bytes,
                    })
                });
            let sent = match frame {
                Ok(frame) => peer.send(frame),
                Err(error) => {
                    tracing::warn!(to, %error, "raft message not encoded");
                    false
                }
            };
            if !sent {
                metrics
                    .raft_messages_dropped_total
                    .with_label_values(&["queue_full"])
                    .inc();
                self.core.report_unreachable(to);
            }
            if is_snapshot {
                self.core.report_snapshot(to, sent);
            }
        }
    }

    fn handle_events(&mut self) {
        for event in self.core.take_events() {
            match event {
                CoreEvent::PeerAddress { id, address } if id != self.id => {
                    if self
                        .peers
                        .get(&id)
                        .is_none_or(|peer| peer.address != address)
                    {
                        self.peers
                            .insert(id, PeerSender::start(&self.runtime, address));
                    }
                }
                CoreEvent::PeerRemoved { id } => {
                    self.peers.remove(&id);
                }
                CoreEvent::PeerAddress { .. } => {}
            }
        }
    }

    fn publish_status(&mut self) {
        let status = self.core.status();
        let metrics = shoal_ops::metrics::metrics();
        metrics.raft_term.set(saturating_i64(status.term));
        let role = self.core.role_name();
        if role != self.published_role {
            metrics.set_raft_role(role);
            self.published_role = role;
        }
        metrics
            .raft_commit_index
            .set(saturating_i64(status.commit_index));
        metrics
            .raft_applied_index
            .set(saturating_i64(status.applied_index));
        metrics
            .raft_log_bytes
            .set(saturating_i64(self.core.store().used_bytes() as u64));
        metrics
            .raft_storage_stalled
            .set(i64::from(status.storage_stalled));
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
