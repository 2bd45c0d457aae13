//! A deterministic simulation of a raft group: the real [`Core`] over an in-memory log,
//! a seeded network that drops, duplicates, reorders and partitions, crash-restarts
//! that lose everything not made durable, and disks that fill up and refuse appends. Safety is checked after every step; at the end
//! the network heals and every acknowledged proposal must be applied on every member.
//!
//! A failure prints its seed; `SHOAL_SIM_SEED=<seed> cargo test -p shoal-consensus sim`
//! replays exactly that run.

use crate::core::{Core, CoreConfig, ProposalReply, ReadyError};
use crate::storage::{LogStore, StorageError};
use crate::{ProposeError, StateMachine};
use raft::eraftpb::{ConfState, Entry, HardState, Message, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// SplitMix64: small, fast and good enough to drive a simulation from one seed.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    /// True with probability `percent` / 100.
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Linux's "No space left on device".
const ENOSPC: i32 = 28;

/// The error raft-engine gives for a write on a full disk.
fn no_space() -> StorageError {
    StorageError::Engine(raft_engine::Error::Io(std::io::Error::from_raw_os_error(
        ENOSPC,
    )))
}

/// What survives a crash: everything `LogStore` promised was durable.
#[derive(Clone, Debug, Default)]
struct Durable {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    /// Entries after the snapshot, contiguous.
    entries: Vec<Entry>,
}

/// An in-memory log with the same contract as the disk one. The commit index written by
/// `set_commit` is volatile, as on disk, and is lost by a crash.
#[derive(Debug)]
struct MemoryLog {
    durable: Durable,
    /// The disk is full: appends fail as raft-engine's do, with `ENOSPC`.
    full: bool,
    /// How many more membership writes fail while everything else is written, as when
    /// the disk fills and frees between two writes (`u64::MAX`: until set back to 0).
    membership_refusals: u64,
}

impl MemoryLog {
    fn snapshot_index(&self) -> u64 {
        self.durable.snapshot.get_metadata().index
    }

    fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last(&self) -> u64 {
        self.durable
            .entries
            .last()
            .map_or(self.snapshot_index(), |entry| entry.index)
    }
}

impl Storage for MemoryLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.durable.hard_state.clone(),
            self.durable.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        let offset = self.first();
        let mut entries: Vec<Entry> =
            self.durable.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        if let Some(max_size) = max_size.into() {
            let mut size = 0u64;
            let mut keep = 0;
            for entry in &entries {
                size += u64::from(protobuf::Message::compute_size(entry));
                if keep > 0 && size > max_size {
                    break;
                }
                keep += 1;
            }
            entries.truncate(keep);
        }
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.snapshot_index() {
            return Ok(self.durable.snapshot.get_metadata().term);
        }
        if index < self.first() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if index > self.last() {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.durable.entries[(index - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot_index() < request_index {
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.durable.snapshot.clone())
    }
}

impl LogStore for MemoryLog {
    fn append(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError> {
        if self.full && (!entries.is_empty() || hard_state.is_some()) {
            return Err(no_space());
        }
        if let Some(first) = entries.first() {
            assert!(first.index >= self.first(), "append below the snapshot");
            assert!(first.index <= self.last() + 1, "append leaves a gap");
            self.durable
                .entries
                .truncate((first.index - self.first()) as usize);
            self.durable.entries.extend_from_slice(entries);
        }
        if let Some(hard_state) = hard_state {
            self.durable.hard_state = hard_state.clone();
        }
        Ok(())
    }

    fn set_commit(&mut self, _commit: u64) -> Result<(), StorageError> {
        // Volatile: modelled by simply not recording it.
        Ok(())
    }

    fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), StorageError> {
        if self.full {
            return Err(no_space());
        }
        if self.membership_refusals > 0 {
            self.membership_refusals -= 1;
            return Err(no_space());
        }
        self.durable.conf_state = conf_state.clone();
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        if self.full {
            return Err(no_space());
        }
        let metadata = snapshot.get_metadata();
        self.durable.entries.clear();
        self.durable.hard_state.term = self.durable.hard_state.term.max(metadata.term);
        self.durable.hard_state.commit = metadata.index;
        self.durable.conf_state = metadata.get_conf_state().clone();
        self.durable.snapshot = snapshot.clone();
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        let index = snapshot.get_metadata().index;
        let drop = (index + 1).saturating_sub(self.first()) as usize;
        self.durable
            .entries
            .drain(..drop.min(self.durable.entries.len()));
        self.durable.snapshot = snapshot;
        Ok(())
    }

    fn latest_snapshot(&self) -> &Snapshot {
        &self.durable.snapshot
    }

    fn conf_state(&self) -> &ConfState {
        &self.durable.conf_state
    }
}

/// The simulated state machine: the sequence of values applied, in order.
#[derive(Clone, Debug, Default)]
struct Sequence {
    values: Vec<u64>,
}

impl StateMachine for Sequence {
    fn apply(&mut self, _index: u64, data: &[u8]) -> Vec<u8> {
        let value = u64::from_be_bytes(data.try_into().expect("8-byte values"));
        self.values.push(value);
        Vec::new()
    }

    fn snapshot(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        self.values = data
            .chunks(8)
            .map(|chunk| u64::from_be_bytes(chunk.try_into().expect("8-byte values")))
            .collect();
        Ok(())
    }
}

/// Settings of one simulated run.
#[derive(Clone, Debug)]
pub(crate) struct SimConfig {
    pub members: u64,
    pub steps: usize,
    pub drop_percent: u64,
    pub duplicate_percent: u64,
    pub crash_percent_per_mille: u64,
    pub snapshot_interval_entries: u64,
    /// Plants a disk that loses the last entries it acknowledged when it crashes, to show
    /// the checkers catch what such a bug breaks.
    pub planted_lossy_disk: bool,
    /// Chance per step, in thousandths, that a member's disk fills up (or, if full, is
    /// freed).
    pub disk_toggle_per_mille: u64,
}

struct InFlight {
    message: Message,
}

type Member = Core<MemoryLog, Sequence>;

/// Where a proposal's outcome arrives.
type Answer = oneshot::Receiver<Result<Vec<u8>, ProposeError>>;

struct Sim {
    rng: Rng,
    config: SimConfig,
    members: BTreeMap<u64, Option<Member>>,
    /// What each crashed member's disk held.
    disks: BTreeMap<u64, Durable>,
    network: Vec<InFlight>,
    /// Directed links that drop everything: (from, to).
    cut: BTreeSet<(u64, u64)>,
    /// Proposals waiting for an answer: value and reply.
    pending: Vec<(u64, Answer)>,
    acknowledged: BTreeSet<u64>,
    next_value: u64,
    /// Leader seen for each term: election safety.
    leaders: BTreeMap<u64, u64>,
    /// Longest applied sequence seen: every member's must be a prefix of it or extend it.
    longest_applied: Vec<u64>,
    log: Vec<String>,
}

fn core_config(id: u64, snapshot_interval_entries: u64) -> CoreConfig {
    CoreConfig {
        id,
        election_ticks: 10,
        heartbeat_ticks: 2,
        snapshot_interval_entries,
        deterministic_election: true,
    }
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Sim {
    fn new(seed: u64, config: SimConfig) -> Sim {
        let voters: Vec<u64> = (1..=config.members).collect();
        let mut members = BTreeMap::new();
        for &id in &voters {
            let mut durable = Durable::default();
            durable.conf_state.set_voters(voters.clone());
            let log = MemoryLog {
                durable,
                full: false,
                membership_refusals: 0,
            };
            let core = Core::new(
                &core_config(id, config.snapshot_interval_entries),
                log,
                Sequence::default(),
                &logger(),
            )
            .expect("core starts");
            members.insert(id, Some(core));
        }
        Sim {
            rng: Rng(seed),
            config,
            members,
            disks: BTreeMap::new(),
            network: Vec::new(),
            cut: BTreeSet::new(),
            pending: Vec::new(),
            acknowledged: BTreeSet::new(),
            next_value: 1,
            leaders: BTreeMap::new(),
            longest_applied: Vec::new(),
            log: Vec::new(),
        }
    }

    fn ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    fn pick(&mut self) -> u64 {
        let ids = self.ids();
        ids[self.rng.below(ids.len() as u64) as usize]
    }

    fn far_deadline() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Lets member `id` process its ready and puts its messages on the wire.
    fn ready(&mut self, id: u64) {
        let Some(Some(core)) = self.members.get_mut(&id) else {
            return;
        };
        match core.handle_ready() {
            Ok(()) => {}
            // The ready is kept and retried once the disk has room again.
            Err(ReadyError::Stalled(_)) => {}
            Err(ReadyError::Fatal(message)) => panic!("member {id} fatal: {message}"),
        }
        let outbox = core.take_outbox();
        core.take_events();
        for message in outbox {
            let is_snapshot = message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
            let lost = self.cut.contains(&(message.from, message.to))
                || self.rng.chance(self.config.drop_percent);
            if is_snapshot && let Some(Some(core)) = self.members.get_mut(&id) {
                // As the driver does: a snapshot that left is reported finished (raft
                // probes again if it never arrived), one that could not leave failed.
                core.report_snapshot(message.to, !lost);
            }
            if lost {
                continue;
            }
            if self.rng.chance(self.config.duplicate_percent) {
                self.network.push(InFlight {
                    message: message.clone(),
                });
            }
            self.network.push(InFlight { message });
        }
    }

    fn crash(&mut self, id: u64) {
        if let Some(slot) = self.members.get_mut(&id)
            && let Some(core) = slot.take()
        {
            let mut disk = core.store().durable.clone();
            if self.config.planted_lossy_disk {
                let keep = disk.entries.len().saturating_sub(3);
                disk.entries.truncate(keep);
                let last = disk
                    .entries
                    .last()
                    .map_or(disk.snapshot.get_metadata().index, |e| e.index);
                disk.hard_state.commit = disk.hard_state.commit.min(last);
            }
            self.disks.insert(id, disk);
            self.log.push(format!("crash {id}"));
        }
    }

    fn restart(&mut self, id: u64) {
        if let Some(durable) = self.disks.remove(&id) {
            let log = MemoryLog {
                durable,
                full: false,
                membership_refusals: 0,
            };
            let core = Core::new(
                &core_config(id, self.config.snapshot_interval_entries),
                log,
                Sequence::default(),
                &logger(),
            )
            .expect("core restarts");
            self.members.insert(id, Some(core));
            self.log.push(format!("restart {id}"));
        }
    }

    /// Fills a member's disk, or frees it if it was full.
    fn toggle_disk(&mut self) {
        let id = self.pick();
        if let Some(Some(core)) = self.members.get_mut(&id) {
            let log = core.store_mut();
            log.full = !log.full;
            let what = if log.full { "fill" } else { "free" };
            self.log.push(format!("{what} the disk of {id}"));
        }
    }

    fn partition(&mut self) {
        self.cut.clear();
        let ids = self.ids();
        match self.rng.below(4) {
            // Isolate one member.
            0 => {
                let alone = self.pick();
                for &other in &ids {
                    if other != alone {
                        self.cut.insert((alone, other));
                        self.cut.insert((other, alone));
                    }
                }
                self.log.push(format!("isolate {alone}"));
            }
            // Split into a minority and a majority.
            1 => {
                let split = 1 + self.rng.below(ids.len() as u64 - 1) as usize;
                let (left, right) = ids.split_at(split);
                for &a in left {
                    for &b in right {
                        self.cut.insert((a, b));
                        self.cut.insert((b, a));
                    }
                }
                self.log.push(format!("split {left:?} | {right:?}"));
            }
            // A bridge: two sides that only one member can talk to.
            2 => {
                let bridge = self.pick();
                let others: Vec<u64> = ids.iter().copied().filter(|&id| id != bridge).collect();
                let (left, right) = others.split_at(others.len() / 2);
                for &a in left {
                    for &b in right {
                        self.cut.insert((a, b));
                        self.cut.insert((b, a));
                    }
                }
                self.log.push(format!("bridge {bridge}"));
            }
            // One way: a member can send but not hear.
            _ => {
                let deaf = self.pick();
                for &other in &ids {
                    if other != deaf {
                        self.cut.insert((other, deaf));
                    }
                }
                self.log.push(format!("deaf {deaf}"));
            }
        }
    }

    fn deliver_one(&mut self) {
        if self.network.is_empty() {
            return;
        }
        // Any message may be next: reordering.
        let position = self.rng.below(self.network.len() as u64) as usize;
        let InFlight { message } = self.network.swap_remove(position);
        if self.cut.contains(&(message.from, message.to)) {
            return;
        }
        if let Some(Some(core)) = self.members.get_mut(&message.to) {
            core.step(message);
        }
    }

    fn propose(&mut self) {
        let id = self.pick();
        let value = self.next_value;
        let Some(Some(core)) = self.members.get_mut(&id) else {
            return;
        };
        let (reply, answer): (ProposalReply, _) = oneshot::channel();
        core.propose(value.to_be_bytes().to_vec(), Self::far_deadline(), reply);
        self.next_value += 1;
        self.pending.push((value, answer));
    }

    fn collect_answers(&mut self) {
        let mut still = Vec::new();
        for (value, mut answer) in self.pending.drain(..) {
            match answer.try_recv() {
                Ok(Ok(_)) => {
                    self.acknowledged.insert(value);
                }
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => {}
                Err(oneshot::error::TryRecvError::Empty) => still.push((value, answer)),
            }
        }
        self.pending = still;
    }

    /// Election safety, log matching and state-machine safety, over every live member.
    fn check(&mut self) -> Result<(), String> {
        let live: Vec<&Member> = self.members.values().flatten().collect();
        for core in &live {
            let status = core.status();
            if status.is_leader {
                match self.leaders.insert(status.term, status.id) {
                    Some(previous) if previous != status.id => {
                        return Err(format!(
                            "election safety: term {} has leaders {previous} and {}",
                            status.term, status.id
                        ));
                    }
                    _ => {}
                }
            }
        }
        for (i, a) in live.iter().enumerate() {
            for b in &live[i + 1..] {
                let (a_log, b_log) = (&a.store().durable, &b.store().durable);
                let b_by_index: BTreeMap<u64, &Entry> =
                    b_log.entries.iter().map(|e| (e.index, e)).collect();
                for entry in &a_log.entries {
                    if let Some(other) = b_by_index.get(&entry.index)
                        && other.term == entry.term
                        && other.data != entry.data
                    {
                        return Err(format!(
                            "log matching: index {} term {} differs between members",
                            entry.index, entry.term
                        ));
                    }
                }
            }
        }
        for core in &live {
            let applied = &core.state_machine().values;
            let common = applied.len().min(self.longest_applied.len());
            if applied[..common] != self.longest_applied[..common] {
                return Err(format!(
                    "state machine safety: member {} applied {:?}… against {:?}…",
                    core.status().id,
                    &applied[..common.min(8)],
                    &self.longest_applied[..common.min(8)]
                ));
            }
            if applied.len() > self.longest_applied.len() {
                self.longest_applied = applied.clone();
            }
            let unique: BTreeSet<&u64> = applied.iter().collect();
            if unique.len() != applied.len() {
                return Err(format!("member {} applied a value twice", core.status().id));
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        if self.rng.below(1000) < self.config.disk_toggle_per_mille {
            self.toggle_disk();
        }
        let roll = self.rng.below(1000);
        match roll {
            0..=299 => {
                let id = self.pick();
                if let Some(Some(core)) = self.members.get_mut(&id) {
                    core.tick(Instant::now());
                }
                self.ready(id);
            }
            300..=699 => {
                for _ in 0..1 + self.rng.below(4) {
                    self.deliver_one();
                }
                let id = self.pick();
                self.ready(id);
            }
            700..=849 => self.propose(),
            850..=869 => self.partition(),
            870..=889 => {
                self.cut.clear();
                self.log.push("heal".into());
            }
            _ => {
                if roll < 890 + self.config.crash_percent_per_mille {
                    let id = self.pick();
                    if self.members[&id].is_some() {
                        // Never more than a minority down at once, so progress stays possible.
                        let down = self.members.values().filter(|m| m.is_none()).count() as u64;
                        if (down + 1) * 2 < self.config.members {
                            self.crash(id);
                        }
                    } else {
                        self.restart(id);
                    }
                } else {
                    let id = self.pick();
                    self.restart(id);
                    self.ready(id);
                }
            }
        }
        self.collect_answers();
        self.check()
    }

    /// Heals everything and runs until every member applied every acknowledged value.
    fn settle(&mut self) -> Result<(), String> {
        self.cut.clear();
        for id in self.ids() {
            self.restart(id);
            if let Some(Some(core)) = self.members.get_mut(&id) {
                core.store_mut().full = false;
            }
        }
        for round in 0..20_000 {
            for id in self.ids() {
                if round % 4 == 0
                    && let Some(Some(core)) = self.members.get_mut(&id)
                {
                    core.tick(Instant::now());
                }
                self.ready(id);
            }
            while !self.network.is_empty() {
                self.deliver_one();
            }
            self.collect_answers();
            self.check()?;
            let done = self.members.values().flatten().all(|core| {
                let applied: BTreeSet<u64> = core.state_machine().values.iter().copied().collect();
                self.acknowledged.is_subset(&applied)
                    && core.state_machine().values.len() == self.longest_applied.len()
            });
            if done && round > 50 {
                return Ok(());
            }
        }
        Err(format!(
            "did not converge: {} acknowledged, members applied {:?}",
            self.acknowledged.len(),
            self.members
                .values()
                .flatten()
                .map(|c| c.state_machine().values.len())
                .collect::<Vec<_>>()
        ))
    }
}

/// Runs one seeded simulation; the error names what broke and the last events. A panic
/// inside raft-rs (its own assertions) counts as a failure too.
pub(crate) fn run(seed: u64, config: SimConfig) -> Result<usize, String> {
    std::panic::catch_unwind(|| run_unguarded(seed, config)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_default();
        Err(format!("seed {seed}: panicked: {message}"))
    })
}

fn run_unguarded(seed: u64, config: SimConfig) -> Result<usize, String> {
    let mut sim = Sim::new(seed, config);
    for step in 0..sim.config.steps {
        sim.step().map_err(|error| {
            format!(
                "seed {seed}, step {step}: {error}; last events: {:?}",
                sim.log.iter().rev().take(8).collect::<Vec<_>>()
            )
        })?;
    }
    sim.settle()
        .map_err(|error| format!("seed {seed}, settling: {error}"))?;
    Ok(sim.acknowledged.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MembershipChange;

    fn config(members: u64) -> SimConfig {
        SimConfig {
            members,
            steps: 3_000,
            drop_percent: 5,
            duplicate_percent: 3,
            crash_percent_per_mille: 15,
            snapshot_interval_entries: 25,
            planted_lossy_disk: false,
            disk_toggle_per_mille: 10,
        }
    }

    fn seeds() -> Vec<u64> {
        if let Some(seed) = std::env::var("SHOAL_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return vec![seed];
        }
        let random = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut seeds: Vec<u64> = (1..=12).collect();
        seeds.push(random);
        seeds
    }

    #[test]
    fn raft_stays_safe_and_keeps_acknowledged_proposals_under_faults() {
        for members in [3, 5] {
            let mut acknowledged = 0;
            for seed in seeds() {
                eprintln!(
                    "simulating {members} members, seed {seed} (replay: SHOAL_SIM_SEED={seed})"
                );
                match run(seed, config(members)) {
                    Ok(count) => acknowledged += count,
                    Err(failure) => panic!("{failure}"),
                }
            }
            assert!(
                acknowledged > 0,
                "some proposals must succeed across the seeds"
            );
        }
    }

    #[test]
    fn raft_stays_safe_when_disks_fill_up_often() {
        // Full disks often enough that members stall while appending, while installing a
        // snapshot from the leader, and as leaders.
        let mut config = config(3);
        config.disk_toggle_per_mille = 60;
        config.crash_percent_per_mille = 40;
        config.snapshot_interval_entries = 10;
        for seed in seeds() {
            eprintln!("simulating full disks, seed {seed} (replay: SHOAL_SIM_SEED={seed})");
            if let Err(failure) = run(seed, config.clone()) {
                panic!("{failure}");
            }
        }
    }

    #[test]
    fn the_checkers_catch_a_disk_that_loses_acknowledged_entries() {
        let mut lossy = config(3);
        lossy.planted_lossy_disk = true;
        lossy.crash_percent_per_mille = 60;
        let failures = (1..=12)
            .filter(|&seed| run(seed, lossy.clone()).is_err())
            .count();
        assert!(failures > 0, "a lossy disk went unnoticed in 12 seeds");
    }

    type TestCore = Core<MemoryLog, Sequence>;

    /// Voters 1 to `count`, on disks with room.
    fn voters(count: u64) -> BTreeMap<u64, TestCore> {
        let ids: Vec<u64> = (1..=count).collect();
        ids.iter()
            .map(|&id| {
                let durable = Durable {
                    conf_state: ConfState::from((ids.clone(), vec![])),
                    ..Durable::default()
                };
                (id, member(id, durable))
            })
            .collect()
    }

    fn member(id: u64, durable: Durable) -> TestCore {
        let log = MemoryLog {
            durable,
            full: false,
            membership_refusals: 0,
        };
        Core::new(&core_config(id, 1_000), log, Sequence::default(), &logger())
            .expect("core starts")
    }

    /// Lets every member process its ready and delivers what they send, until nothing
    /// is sent; member 1 ticks `ticks` times first. A member whose disk is full stalls.
    fn pump(cores: &mut BTreeMap<u64, TestCore>, ticks: usize) {
        for _ in 0..ticks {
            cores.get_mut(&1).expect("member 1").tick(Instant::now());
        }
        for _ in 0..100 {
            if !round(cores) {
                return;
            }
        }
    }

    /// Every member processes its ready (a member whose disk is full stalls), then what
    /// they sent is delivered to the members present. False when nothing was sent.
    fn round(cores: &mut BTreeMap<u64, TestCore>) -> bool {
        let mut messages = Vec::new();
        for core in cores.values_mut() {
            match core.handle_ready() {
                Ok(()) | Err(ReadyError::Stalled(_)) => {}
                Err(ReadyError::Fatal(message)) => panic!("member stopped: {message}"),
            }
            messages.extend(core.take_outbox());
        }
        let sent = !messages.is_empty();
        for message in messages {
            if let Some(core) = cores.get_mut(&message.to) {
                core.step(message);
            }
        }
        sent
    }

    /// Member 1, the leader, proposes adding learner `id`.
    fn add_learner(
        cores: &mut BTreeMap<u64, TestCore>,
        id: u64,
    ) -> oneshot::Receiver<Result<Vec<u8>, ProposeError>> {
        let (reply, answer) = oneshot::channel();
        let change = MembershipChange::AddLearner {
            id,
            address: "127.0.0.1:1".into(),
        };
        let leader = cores.get_mut(&1).expect("member 1");
        leader.change_membership(&change, Sim::far_deadline(), reply);
        answer
    }

    /// The learners in `membership`, in order.
    fn learners(membership: &ConfState) -> Vec<u64> {
        let mut learners = membership.learners.clone();
        learners.sort_unstable();
        learners
    }

    /// Member 1 leads and adds a learner; the entry reaches member 2's log, then `fill`
    /// takes room from member 2's disk before the commit comes, and everything sent is
    /// delivered. Gives the answer to the change and the index of its entry.
    fn a_change_member_2_applies_without_room(
        cores: &mut BTreeMap<u64, TestCore>,
        fill: impl FnOnce(&mut MemoryLog),
    ) -> (oneshot::Receiver<Result<Vec<u8>, ProposeError>>, u64) {
        // Only member 1 ticks: it campaigns and leads.
        pump(cores, 30);
        assert!(cores[&1].status().is_leader);
        let answer = add_learner(cores, 3);
        // The append to member 2, then its answer.
        for _ in 0..2 {
            let mut messages = Vec::new();
            for core in cores.values_mut() {
                core.handle_ready().expect("room on both disks");
                messages.extend(core.take_outbox());
            }
            for message in messages {
                cores.get_mut(&message.to).expect("a member").step(message);
            }
        }
        let change = cores[&1].store().last();
        assert_eq!(cores[&2].store().last(), change);
        fill(cores.get_mut(&2).expect("member 2").store_mut());
        pump(cores, 3);
        assert!(cores[&2].store().conf_state().learners.is_empty());
        (answer, change)
    }

    /// Regression: a member whose disk filled up between storing a membership change
    /// and applying it stopped ("persisting the membership: … No space left on device"),
    /// and restarted, stopped again, until space returned.
    #[test]
    fn a_membership_change_applied_on_a_full_disk_is_written_once_there_is_room() {
        let mut cores = voters(2);
        let (mut answer, _) =
            a_change_member_2_applies_without_room(&mut cores, |disk| disk.full = true);
        assert!(
            matches!(answer.try_recv(), Ok(Ok(_))),
            "the change is applied"
        );
        let status = cores[&2].status();
        assert!(status.storage_stalled, "{status:?}");

        cores.get_mut(&2).expect("member 2").store_mut().full = false;
        pump(&mut cores, 3);
        assert_eq!(cores[&2].store().conf_state().learners, [3]);
        assert!(!cores[&2].status().storage_stalled);
    }

    /// The same, but member 2 crashes before space returns: restarted from what its disk
    /// holds, it applies the change again and writes it.
    #[test]
    fn a_membership_lost_with_a_full_disk_in_a_crash_comes_back_from_the_log() {
        let mut cores = voters(2);
        a_change_member_2_applies_without_room(&mut cores, |disk| disk.full = true);
        let disk = cores.remove(&2).expect("member 2").store().durable.clone();
        cores.insert(2, member(2, disk));
        // Heartbeats bring the commit index, and the change is applied again.
        pump(&mut cores, 10);
        assert_eq!(cores[&2].store().conf_state().learners, [3]);
    }

    /// With only the membership's write refused, the rest of the ready is written and
    /// applied; a snapshot then would record the old membership past the change, and the
    /// change would be lost for good, so none is taken until the membership is written.
    #[test]
    fn no_snapshot_is_taken_while_the_membership_is_unwritten() {
        let mut cores = voters(2);
        let (_, change) = a_change_member_2_applies_without_room(&mut cores, |disk| {
            disk.membership_refusals = u64::MAX;
        });
        let status = cores[&2].status();
        assert!(status.applied_index >= change, "{status:?}");
        assert!(status.storage_stalled, "{status:?}");
        assert!(cores[&2].store().latest_snapshot().get_metadata().index < change);

        cores
            .get_mut(&2)
            .expect("member 2")
            .store_mut()
            .membership_refusals = 0;
        pump(&mut cores, 3);
        assert_eq!(cores[&2].store().conf_state().learners, [3]);
        let snapshot = cores[&2].store().latest_snapshot().get_metadata();
        assert!(snapshot.index >= change, "the snapshot due is taken now");
        assert_eq!(snapshot.get_conf_state().learners, [3]);
    }

    /// Regression guard: once a newer membership is written, an older one still kept
    /// unwritten must be dropped, or its retry before the next ready writes it over the
    /// newer one and undoes the later change.
    #[test]
    fn a_newer_membership_once_written_is_not_undone_by_an_older_unwritten_one() {
        let mut cores = voters(2);
        a_change_member_2_applies_without_room(&mut cores, |disk| {
            disk.membership_refusals = u64::MAX;
        });
        // The change becomes the leader's next entry.
        let change = cores[&1].store().last() + 1;
        let _answer = add_learner(&mut cores, 4);
        // Deliver until member 2 hears that the second change is committed, and stop
        // before it applies it.
        for _ in 0..10 {
            if cores[&2].status().commit_index >= change {
                break;
            }
            round(&mut cores);
        }
        assert_eq!(cores[&1].store().last(), change);
        let member_2 = cores.get_mut(&2).expect("member 2");
        assert!(member_2.status().commit_index >= change);
        // Room comes back between the two writes: the older membership's retry is
        // refused, the newer one is written.
        member_2.store_mut().membership_refusals = 1;
        member_2
            .handle_ready()
            .expect("the newer membership is written");
        assert_eq!(learners(member_2.store().conf_state()), [3, 4]);

        pump(&mut cores, 3);
        assert_eq!(learners(cores[&2].store().conf_state()), [3, 4]);
        assert!(!cores[&2].status().storage_stalled);
    }

    /// A snapshot from the leader carries a membership newer than the one this member
    /// kept unwritten; writing the kept one afterwards would undo the snapshot's.
    #[test]
    fn a_snapshot_installed_supersedes_a_membership_left_unwritten() {
        let mut cores = voters(3);
        pump(&mut cores, 30);
        assert!(cores[&1].status().is_leader);
        cores
            .get_mut(&2)
            .expect("member 2")
            .store_mut()
            .membership_refusals = u64::MAX;
        let _first = add_learner(&mut cores, 4);
        pump(&mut cores, 3);
        assert!(cores[&2].status().storage_stalled);
        let behind = cores[&2].status().applied_index;

        // Cut off, member 2 misses a second change; the leader snapshots (a membership
        // change makes one due) and compacts its log past what member 2 has.
        let member_2 = cores.remove(&2).expect("member 2");
        let _second = add_learner(&mut cores, 5);
        pump(&mut cores, 3);
        let leader = cores[&1].store();
        assert_eq!(
            learners(leader.latest_snapshot().get_metadata().get_conf_state()),
            [4, 5]
        );
        assert!(
            leader.first() > behind + 1,
            "the leader keeps what member 2 lacks"
        );

        cores.insert(2, member_2);
        pump(&mut cores, 6);
        assert!(
            cores[&2].store().snapshot_index() > behind,
            "member 2 installed a snapshot"
        );
        assert_eq!(learners(cores[&2].store().conf_state()), [4, 5]);
        assert!(!cores[&2].status().storage_stalled);

        cores
            .get_mut(&2)
            .expect("member 2")
            .store_mut()
            .membership_refusals = 0;
        pump(&mut cores, 3);
        assert_eq!(learners(cores[&2].store().conf_state()), [4, 5]);
    }

    #[test]
    fn the_same_seed_replays_the_same_run() {
        assert_eq!(run(99, config(3)), run(99, config(3)));
    }
}
