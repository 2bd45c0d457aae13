//! Driver tests on real raft-engine directories and real loopback TCP: one member, then
//! groups of three with leader loss, membership changes, snapshot install and full restart.

use super::*;
use std::path::Path;
use std::sync::Mutex;

/// A state machine that records every u64 it applies and answers how many it holds.
/// `mirror` lets the test see the applied values from outside the driver thread.
#[derive(Debug, Default)]
struct Recorder {
    values: Vec<u64>,
    mirror: Arc<Mutex<Vec<u64>>>,
}

impl Recorder {
    fn new() -> (Recorder, Arc<Mutex<Vec<u64>>>) {
        let recorder = Recorder::default();
        let mirror = recorder.mirror.clone();
        (recorder, mirror)
    }
}

impl StateMachine for Recorder {
    fn apply(&mut self, _index: u64, data: &[u8]) -> Vec<u8> {
        // Larger entries are filler (they fill a disk); only u64s are recorded.
        if let Ok(bytes) = data.try_into() {
            self.values.push(u64::from_be_bytes(bytes));
        }
        (self.values.len() as u64).to_be_bytes().to_vec()
    }

    fn applied(&mut self, _index: u64) {
        self.mirror.lock().unwrap().clone_from(&self.values);
    }

    fn snapshot(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        if !data.len().is_multiple_of(8) {
            return Err("snapshot length is not a multiple of 8".into());
        }
        self.values = data
            .chunks(8)
            .map(|chunk| u64::from_be_bytes(chunk.try_into().unwrap()))
            .collect();
        self.mirror.lock().unwrap().clone_from(&self.values);
        Ok(())
    }
}

const DEADLINE: Duration = Duration::from_secs(10);

async fn propose(handle: &ConsensusHandle, value: u64) -> Result<u64, ProposeError> {
    let output = handle
        .propose(value.to_be_bytes().to_vec(), DEADLINE)
        .await?;
    Ok(u64::from_be_bytes(
        output.try_into().expect("8-byte answers"),
    ))
}

fn single(dir: &Path) -> ConsensusConfig {
    let mut config = ConsensusConfig::single(1, dir.join("raft"));
    config.tick_interval = Duration::from_millis(10);
    config
}

async fn shutdown(consensus: Consensus) {
    tokio::task::spawn_blocking(move || consensus.shutdown())
        .await
        .expect("shutdown joins");
}

#[tokio::test]
async fn a_single_voter_leads_and_answers_with_the_applied_output() {
    let dir = tempfile::tempdir().unwrap();
    let consensus = start(&single(dir.path()), Recorder::default())
        .await
        .unwrap();
    let handle = consensus.handle();
    assert_eq!(propose(&handle, 10).await, Ok(1));
    assert_eq!(propose(&handle, 20).await, Ok(2));
    let mut watch = handle.watch_status();
    let status = tokio::time::timeout(DEADLINE, watch.wait_for(|s| s.applied_index >= 3))
        .await
        .expect("status catches up")
        .expect("driver running")
        .clone();
    assert!(status.is_leader);
    assert_eq!(status.leader, Some(1));
    assert_eq!(status.voters, vec![1]);
    shutdown(consensus).await;
}

#[tokio::test]
async fn acknowledged_proposals_survive_a_restart_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let consensus = start(&single(dir.path()), Recorder::default())
        .await
        .unwrap();
    for value in 1..=10 {
        propose(&consensus.handle(), value).await.unwrap();
    }
    let term_before = consensus.handle().status().term;
    shutdown(consensus).await;

    let (recorder, mirror) = Recorder::new();
    let consensus = start(&single(dir.path()), recorder).await.unwrap();
    let handle = consensus.handle();
    assert_eq!(propose(&handle, 100).await, Ok(11), "ten replayed, one new");
    assert_eq!(
        *mirror.lock().unwrap(),
        (1..=10).chain([100]).collect::<Vec<_>>()
    );
    assert!(
        handle.status().term > term_before,
        "a restart elects in a new term"
    );
    shutdown(consensus).await;
}

#[tokio::test]
async fn a_restart_after_snapshots_restores_the_state_and_replays_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = single(dir.path());
    config.snapshot_interval_entries = 16;
    let consensus = start(&config, Recorder::default()).await.unwrap();
    for value in 0..50 {
        propose(&consensus.handle(), value).await.unwrap();
    }
    let status = consensus.handle().status();
    assert!(
        status.snapshot_index >= 32,
        "snapshots were taken: {status:?}"
    );
    shutdown(consensus).await;

    let (recorder, mirror) = Recorder::new();
    let consensus = start(&config, recorder).await.unwrap();
    assert_eq!(propose(&consensus.handle(), 50).await, Ok(51));
    assert_eq!(*mirror.lock().unwrap(), (0..=50).collect::<Vec<_>>());
    shutdown(consensus).await;
}

#[tokio::test]
async fn concurrent_proposals_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let consensus = start(&single(dir.path()), Recorder::default())
        .await
        .unwrap();
    let handle = consensus.handle();
    let tasks: Vec<_> = (0..500)
        .map(|value| {
            let handle = handle.clone();
            tokio::spawn(async move { propose(&handle, value).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap().unwrap());
    }
    answers.sort_unstable();
    assert_eq!(answers, (1..=500).collect::<Vec<u64>>());
    shutdown(consensus).await;
}

#[tokio::test]
async fn a_second_driver_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let consensus = start(&single(dir.path()), Recorder::default())
        .await
        .unwrap();
    let second = start(&single(dir.path()), Recorder::default()).await;
    assert!(matches!(second, Err(StartError::Open { .. })), "{second:?}");
    assert_eq!(propose(&consensus.handle(), 7).await, Ok(1));
    shutdown(consensus).await;
}

#[tokio::test]
async fn requests_after_shutdown_are_answered_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let consensus = start(&single(dir.path()), Recorder::default())
        .await
        .unwrap();
    let handle = consensus.handle();
    let waiting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.stopped().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "stopped() resolved while running");
    assert!(!handle.has_stopped());
    shutdown(consensus).await;
    tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("stopped() resolves once the driver has ended")
        .unwrap();
    assert!(handle.has_stopped());
    assert_eq!(propose(&handle, 1).await, Err(ProposeError::Stopped));
    assert_eq!(
        handle.read_index(DEADLINE).await,
        Err(ProposeError::Stopped)
    );
}

/// Free loopback ports, found by binding and releasing.
fn free_addresses(count: usize) -> Vec<String> {
    let listeners: Vec<_> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}

/// A running member and the mirror of what it applied.
type Member = (Consensus, Arc<Mutex<Vec<u64>>>);

/// A group of members on loopback, each with its own directory.
struct Group {
    root: tempfile::TempDir,
    addresses: BTreeMap<u64, String>,
    members: BTreeMap<u64, Member>,
    snapshot_interval_entries: u64,
}

impl Group {
    async fn start(size: u64, snapshot_interval_entries: u64) -> Group {
        let mut group = Group::new(size, snapshot_interval_entries);
        for id in 1..=size {
            group.start_member(id, false).await;
        }
        group
    }

    /// The group's addresses and directories, with no member running yet.
    fn new(size: u64, snapshot_interval_entries: u64) -> Group {
        let addresses: BTreeMap<u64, String> =
            (1..=size).zip(free_addresses(size as usize)).collect();
        Group {
            root: tempfile::tempdir().unwrap(),
            addresses,
            members: BTreeMap::new(),
            snapshot_interval_entries,
        }
    }

    /// `join`: start with no membership, to be added by a conf change.
    fn config(&self, id: u64, join: bool) -> ConsensusConfig {
        ConsensusConfig {
            id,
            dir: self.root.path().join(format!("member-{id}")),
            cluster_id: 42,
            peers: self.addresses.clone(),
            bootstrap: !join,
            listen: Some(self.addresses[&id].parse().unwrap()),
            tick_interval: Duration::from_millis(20),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval_entries: self.snapshot_interval_entries,
        }
    }

    async fn start_member(&mut self, id: u64, join: bool) {
        let (recorder, mirror) = Recorder::new();
        let consensus = start(&self.config(id, join), recorder).await.unwrap();
        self.members.insert(id, (consensus, mirror));
    }

    async fn stop_member(&mut self, id: u64) {
        let (consensus, _) = self.members.remove(&id).unwrap();
        shutdown(consensus).await;
    }

    fn handle(&self, id: u64) -> ConsensusHandle {
        self.members[&id].0.handle()
    }

    /// Waits until a live member leads and every live member knows it.
    async fn leader(&self) -> u64 {
        let started = Instant::now();
        loop {
            let statuses: Vec<RaftStatus> = self
                .members
                .values()
                .map(|(c, _)| c.handle().status())
                .collect();
            if let Some(leader) = statuses.iter().find(|s| s.is_leader).map(|s| s.id)
                && statuses.iter().all(|s| s.leader == Some(leader))
            {
                return leader;
            }
            assert!(started.elapsed() < DEADLINE, "no leader: {statuses:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until member `id` has applied exactly `expected`.
    async fn converges(&self, id: u64, expected: &[u64]) {
        let started = Instant::now();
        loop {
            let applied = self.members[&id].1.lock().unwrap().clone();
            if applied == expected {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "member {id} applied {} values, expected {}",
                applied.len(),
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shutdown(self) {
        for (_, (consensus, _)) in self.members {
            shutdown(consensus).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_and_followers_answer_not_leader_with_the_leader() {
    let group = Group::start(3, 10_000).await;
    let leader = group.leader().await;
    for value in 0..20 {
        propose(&group.handle(leader), value).await.unwrap();
    }
    let expected: Vec<u64> = (0..20).collect();
    for id in 1..=3 {
        group.converges(id, &expected).await;
    }
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    assert_eq!(
        propose(&group.handle(follower), 99).await,
        Err(ProposeError::NotLeader {
            leader: Some(leader)
        })
    );
    // A follower's read index covers everything acknowledged before it.
    let index = group.handle(follower).read_index(DEADLINE).await.unwrap();
    assert!(index >= 21, "read index {index}");
    assert!(group.handle(follower).status().applied_index >= index);
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_proposals_survive_the_loss_of_the_leader() {
    let mut group = Group::start(3, 10_000).await;
    let first = group.leader().await;
    for value in 0..10 {
        propose(&group.handle(first), value).await.unwrap();
    }
    group.stop_member(first).await;
    let second = group.leader().await;
    assert_ne!(first, second);
    for value in 10..20 {
        propose(&group.handle(second), value).await.unwrap();
    }
    // The old leader comes back as a follower and catches up.
    group.start_member(first, false).await;
    let expected: Vec<u64> = (0..20).collect();
    for id in 1..=3 {
        group.converges(id, &expected).await;
    }
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_can_be_transferred() {
    let group = Group::start(3, 10_000).await;
    let leader = group.leader().await;
    let target = (1..=3).find(|&id| id != leader).unwrap();
    group.handle(leader).transfer_leader(target).unwrap();
    let started = Instant::now();
    while group.leader().await != target {
        assert!(started.elapsed() < DEADLINE, "leadership did not move");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(propose(&group.handle(target), 1).await, Ok(1));
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_joins_catches_up_from_a_snapshot_and_is_promoted_then_a_member_is_removed() {
    let mut group = Group::start(3, 32).await;
    let leader = group.leader().await;
    for value in 0..100 {
        propose(&group.handle(leader), value).await.unwrap();
    }
    // Member 4 starts empty; the log it needs is compacted, so it gets a snapshot.
    let address = free_addresses(1).remove(0);
    group.addresses.insert(4, address.clone());
    group.start_member(4, true).await;
    group
        .handle(leader)
        .change_membership(
            MembershipChange::AddLearner {
                id: 4,
                address: address.clone(),
            },
            DEADLINE,
        )
        .await
        .unwrap();
    let expected: Vec<u64> = (0..100).collect();
    group.converges(4, &expected).await;
    group
        .handle(leader)
        .change_membership(MembershipChange::AddVoter { id: 4, address }, DEADLINE)
        .await
        .unwrap();
    let removed = (1..=3).find(|&id| id != leader).unwrap();
    group
        .handle(leader)
        .change_membership(MembershipChange::Remove { id: removed }, DEADLINE)
        .await
        .unwrap();
    let wanted: Vec<u64> = [1, 2, 3, 4]
        .into_iter()
        .filter(|&id| id != removed)
        .collect();
    let mut watch = group.handle(leader).watch_status();
    let sorted = |voters: &[u64]| {
        let mut voters = voters.to_vec();
        voters.sort_unstable();
        voters
    };
    tokio::time::timeout(DEADLINE, watch.wait_for(|s| sorted(&s.voters) == wanted))
        .await
        .expect("the membership reaches the status")
        .unwrap();
    group.stop_member(removed).await;
    propose(&group.handle(leader), 100).await.unwrap();
    let expected: Vec<u64> = (0..=100).collect();
    group.converges(4, &expected).await;
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_is_removed_re_added_and_rebuilt_from_a_snapshot() {
    let mut group = Group::start(3, 32).await;
    let leader = group.leader().await;
    for value in 0..100 {
        propose(&group.handle(leader), value).await.unwrap();
    }
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    group.stop_member(follower).await;
    std::fs::remove_dir_all(group.root.path().join(format!("member-{follower}"))).unwrap();
    // It comes back empty, joining rather than bootstrapping; the leader's heartbeats
    // still claim it holds 100 entries, which it refuses instead of aborting.
    group.start_member(follower, true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let address = group.addresses[&follower].clone();
    let leader_handle = group.handle(leader);
    leader_handle
        .change_membership(MembershipChange::Remove { id: follower }, DEADLINE)
        .await
        .unwrap();
    leader_handle
        .change_membership(
            MembershipChange::AddVoter {
                id: follower,
                address,
            },
            DEADLINE,
        )
        .await
        .unwrap();
    let expected: Vec<u64> = (0..100).collect();
    group.converges(follower, &expected).await;
    assert!(group.handle(follower).status().snapshot_index >= 64);
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_members_restarting_at_once_keep_every_acknowledged_proposal() {
    let mut group = Group::start(3, 16).await;
    let leader = group.leader().await;
    for value in 0..40 {
        propose(&group.handle(leader), value).await.unwrap();
    }
    for id in 1..=3 {
        group.stop_member(id).await;
    }
    for id in 1..=3 {
        group.start_member(id, false).await;
    }
    let leader = group.leader().await;
    propose(&group.handle(leader), 40).await.unwrap();
    let expected: Vec<u64> = (0..=40).collect();
    for id in 1..=3 {
        group.converges(id, &expected).await;
    }
    group.shutdown().await;
}

/// A tmpfs of `size`, mounted on a fresh directory and unmounted on drop. Needs root (CI
/// and the development machines run as root); a run without it fails loudly.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root"
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let path = self.dir.path().join("ballast");
        let mut file = std::fs::File::create(&path).unwrap();
        // To the last byte: 64 KiB blocks, then single bytes.
        let block = vec![0u8; 64 << 10];
        while file.write_all(&block).is_ok() {}
        while file.write_all(&block[..1]).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_proposals_without_panicking_and_recovers_when_space_returns() {
    let disk = SmallDisk::mount("64m");
    let consensus = start(&single(disk.path()), Recorder::default())
        .await
        .unwrap();
    let handle = consensus.handle();
    for value in 0..10 {
        propose(&handle, value).await.unwrap();
    }
    let ballast = disk.fill();
    // Keep proposing until the log hits the wall: from then on proposals are refused with
    // a storage error, not accepted and lost.
    let started = Instant::now();
    let refusal = loop {
        let payload = vec![0u8; 256 << 10];
        match handle.propose(payload, Duration::from_millis(500)).await {
            Err(error @ ProposeError::Storage(_)) => break error,
            Ok(_) | Err(ProposeError::Timeout) => {}
            Err(other) => panic!("unexpected {other}"),
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the full disk was never noticed"
        );
    };
    assert!(refusal.to_string().contains("disk full"), "{refusal}");
    let mut watch = handle.watch_status();
    tokio::time::timeout(DEADLINE, watch.wait_for(|status| status.storage_stalled))
        .await
        .expect("the status reports the stall")
        .unwrap();
    assert!(
        propose(&handle, 1).await.is_err(),
        "still refused while full"
    );

    std::fs::remove_file(ballast).unwrap();
    let started = Instant::now();
    loop {
        if propose(&handle, 1000).await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "did not recover after space returned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown(consensus).await;
    // Everything acknowledged is still there after a restart on the same disk.
    let (recorder, mirror) = Recorder::new();
    let consensus = start(&single(disk.path()), recorder).await.unwrap();
    propose(&consensus.handle(), 2000).await.unwrap();
    let applied = mirror.lock().unwrap().clone();
    assert_eq!(&applied[..10], &(0..10).collect::<Vec<u64>>()[..]);
    assert_eq!(applied.last(), Some(&2000));
    assert!(applied.contains(&1000));
    shutdown(consensus).await;
}

/// Regression: a follower whose disk filled up kept stepping heartbeats into raft-rs while
/// its ready waited for space, and raft-rs aborted its driver ("not leader but has new msg
/// after advance") once the ready could be written. Seen in a chaos run (`disk_full`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_disk_fills_up_stalls_and_catches_up_when_space_returns() {
    let disk = SmallDisk::mount("64m");
    let mut group = Group::new(3, 10_000);
    std::os::unix::fs::symlink(disk.path(), group.root.path().join("member-3")).unwrap();
    for id in 1..=3 {
        group.start_member(id, false).await;
    }
    let mut leader = group.leader().await;
    if leader == 3 {
        group.handle(3).transfer_leader(1).unwrap();
        let started = Instant::now();
        while leader == 3 {
            assert!(started.elapsed() < DEADLINE, "the lead never left member 3");
            tokio::time::sleep(Duration::from_millis(20)).await;
            leader = group.leader().await;
        }
    }
    let mut expected: Vec<u64> = (0..10).collect();
    for &value in &expected {
        propose(&group.handle(leader), value).await.unwrap();
    }
    group.converges(3, &expected).await;

    let ballast = disk.fill();
    // The leader goes on with the other follower while member 3 cannot write.
    fill_until_stalled(&group, leader, 3).await;
    let mut value = 10;
    // Heartbeats and appends reach the stalled member for a while.
    for _ in 0..20 {
        propose(&group.handle(leader), value).await.unwrap();
        expected.push(value);
        value += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    std::fs::remove_file(ballast).unwrap();
    group.converges(3, &expected).await;
    assert!(!group.handle(3).status().storage_stalled);
    // Its driver is alive: it still takes part in the group.
    propose(&group.handle(leader), value).await.unwrap();
    expected.push(value);
    group.converges(3, &expected).await;
    group.shutdown().await;
}

/// Proposes filler through member `through` until member `stalled` cannot write its log.
/// The filler is not recorded and not compressible: it uses up what the log allocated
/// ahead. A proposal through a member that stalls never commits, so none is waited on
/// for long, and their answers do not matter.
async fn fill_until_stalled(group: &Group, through: u64, stalled: u64) {
    let mut status = group.handle(stalled).watch_status();
    let started = Instant::now();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    while !status.borrow_and_update().storage_stalled {
        let filler: Vec<u8> = (0..(256 << 10) / 8)
            .flat_map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed.to_le_bytes()
            })
            .collect();
        let _ = group
            .handle(through)
            .propose(filler, Duration::from_secs(1))
            .await;
        assert!(
            started.elapsed() < DEADLINE,
            "member {stalled} never stalled"
        );
    }
}

/// A leader whose disk fills up stops ticking, so the others elect a new leader. Until it
/// can write again it must name that leader and refuse writes as not the leader (so a
/// server forwards them there), not go on calling itself leader and refuse every write
/// for want of disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_fills_up_sends_callers_to_the_leader_elected_without_it() {
    let disk = SmallDisk::mount("64m");
    let mut group = Group::new(3, 10_000);
    std::os::unix::fs::symlink(disk.path(), group.root.path().join("member-3")).unwrap();
    for id in 1..=3 {
        group.start_member(id, false).await;
    }
    let started = Instant::now();
    while group.leader().await != 3 {
        let _ = group.handle(group.leader().await).transfer_leader(3);
        assert!(
            started.elapsed() < DEADLINE,
            "the lead never went to member 3"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut expected: Vec<u64> = (0..10).collect();
    for &value in &expected {
        propose(&group.handle(3), value).await.unwrap();
    }
    group.converges(1, &expected).await;

    let ballast = disk.fill();
    fill_until_stalled(&group, 3, 3).await;
    let started = Instant::now();
    let elected = loop {
        let status = group.handle(3).status();
        if let Some(leader) = status.leader.filter(|&leader| leader != 3) {
            assert!(!status.is_leader, "{status:?}");
            break leader;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the stalled member still names itself: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let not_the_leader = Err(ProposeError::NotLeader {
        leader: Some(elected),
    });
    assert_eq!(propose(&group.handle(3), 100).await, not_the_leader);
    assert_eq!(
        group.handle(3).read_index(DEADLINE).await.map(|_| 0),
        not_the_leader
    );
    for value in 10..20 {
        propose(&group.handle(elected), value).await.unwrap();
        expected.push(value);
    }

    std::fs::remove_file(ballast).unwrap();
    group.converges(3, &expected).await;
    let status = group.handle(3).status();
    assert!(!status.storage_stalled && !status.is_leader, "{status:?}");
    assert_eq!(
        status.leader,
        Some(elected),
        "raft-rs itself names the leader now"
    );
    propose(&group.handle(elected), 20).await.unwrap();
    expected.push(20);
    group.converges(3, &expected).await;
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_under_load_lose_no_acknowledged_proposal() {
    let mut group = Group::start(3, 64).await;
    let leader = group.leader().await;
    let address = free_addresses(1).remove(0);
    group.addresses.insert(4, address.clone());
    group.start_member(4, true).await;

    // Callers keep proposing to the leader throughout the changes.
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..4u64)
        .map(|writer| {
            let (handle, running) = (group.handle(leader), running.clone());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                let mut next = writer * 1_000_000;
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    if propose(&handle, next).await.is_ok() {
                        acknowledged.push(next);
                    }
                    next += 1;
                }
                acknowledged
            })
        })
        .collect();
    let leader_handle = group.handle(leader);
    leader_handle
        .change_membership(
            MembershipChange::AddLearner {
                id: 4,
                address: address.clone(),
            },
            DEADLINE,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    leader_handle
        .change_membership(MembershipChange::AddVoter { id: 4, address }, DEADLINE)
        .await
        .unwrap();
    let removed = (1..=3).find(|&id| id != leader).unwrap();
    leader_handle
        .change_membership(MembershipChange::Remove { id: removed }, DEADLINE)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    assert!(
        acknowledged.len() > 50,
        "load was light: {}",
        acknowledged.len()
    );
    group.stop_member(removed).await;
    // Every acknowledged value is applied, once, on every remaining member.
    let started = Instant::now();
    for id in [1, 2, 3, 4].into_iter().filter(|&id| id != removed) {
        loop {
            let applied = group.members[&id].1.lock().unwrap().clone();
            let set: std::collections::BTreeSet<u64> = applied.iter().copied().collect();
            if acknowledged.iter().all(|value| set.contains(value)) {
                assert_eq!(
                    set.len(),
                    applied.len(),
                    "member {id} applied a value twice"
                );
                break;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "member {id} is missing acknowledged values"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_foreign_and_stalled_peers_are_refused_while_the_group_keeps_working() {
    use tokio::io::AsyncWriteExt;
    let group = Group::start(3, 10_000).await;
    let leader = group.leader().await;
    let target = &group.addresses[&leader];
    let rejected = |reason: &str| {
        shoal_ops::metrics::metrics()
            .raft_frames_rejected_total
            .with_label_values(&[reason])
            .get()
    };
    let (corrupt_before, cluster_before) = (rejected("corrupt"), rejected("cluster_id"));

    // Garbage after a plausible length prefix.
    let mut garbage = tokio::net::TcpStream::connect(target).await.unwrap();
    garbage.write_all(&[0, 0, 0, 16]).await.unwrap();
    garbage.write_all(&[0xAB; 16]).await.unwrap();
    // A well-formed frame from another cluster.
    let foreign = transport::encode_frame(&Envelope {
        cluster_id: 999,
        from: 9,
        from_address: "127.0.0.1:1".into(),
        to: leader,
        message: Message::default().write_to_bytes().unwrap(),
    })
    .unwrap();
    let mut stranger = tokio::net::TcpStream::connect(target).await.unwrap();
    stranger.write_all(&foreign).await.unwrap();
    // A peer that announces a frame and then stalls mid-way.
    let mut staller = tokio::net::TcpStream::connect(target).await.unwrap();
    staller.write_all(&[0, 0, 1, 0, 1, 2, 3]).await.unwrap();
    // An oversized length prefix.
    let mut giant = tokio::net::TcpStream::connect(target).await.unwrap();
    giant.write_all(&u32::MAX.to_be_bytes()).await.unwrap();

    // The group goes on committing meanwhile.
    for value in 0..20 {
        propose(&group.handle(leader), value).await.unwrap();
    }
    let started = Instant::now();
    while rejected("corrupt") <= corrupt_before || rejected("cluster_id") <= cluster_before {
        assert!(started.elapsed() < DEADLINE, "bad frames were not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rejected("oversized") >= 1);
    drop((garbage, stranger, staller, giant));
    let expected: Vec<u64> = (0..20).collect();
    for id in 1..=3 {
        group.converges(id, &expected).await;
    }
    group.shutdown().await;
}

/// CPU time (user + system) a thread of this process named `name` has used, in clock
/// ticks, from `/proc`.
fn thread_cpu_ticks(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        return Some(utime + stime);
    }
    None
}

#[tokio::test]
async fn an_idle_member_without_a_listener_does_not_spin() {
    // Regression: with no transport the inbound queue is closed, and selecting on it
    // returned at once, so an idle `shoal up` burnt a whole core in its raft driver.
    let dir = tempfile::tempdir().unwrap();
    let mut config = ConsensusConfig::single(77, dir.path().join("raft"));
    config.tick_interval = Duration::from_millis(100);
    let consensus = start(&config, Recorder::default()).await.unwrap();
    propose(&consensus.handle(), 1).await.unwrap();
    let before = thread_cpu_ticks("raft-driver-77").expect("the driver thread");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let used = thread_cpu_ticks("raft-driver-77").expect("the driver thread") - before;
    // A spinning driver uses about 100 ticks a second; an idle one a handful at most.
    assert!(
        used < 20,
        "the idle driver used {used} ticks of CPU in a second"
    );
    shutdown(consensus).await;
}
