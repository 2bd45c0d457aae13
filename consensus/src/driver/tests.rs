//! Driver tests on a real raft-engine directory: proposals, restart from disk, refusal.

use super::*;

/// A state machine that keeps a running sum of the u64s it applies and answers the sum.
#[derive(Debug, Default)]
struct Sum {
    total: u64,
    last_index: u64,
}

impl StateMachine for Sum {
    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8> {
        assert!(index > self.last_index, "entries apply in index order");
        self.last_index = index;
        let value = u64::from_be_bytes(data.try_into().expect("8-byte test entries"));
        self.total += value;
        self.total.to_be_bytes().to_vec()
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

fn config(dir: &std::path::Path) -> ConsensusConfig {
    let mut config = ConsensusConfig::new(1, dir.join("raft"));
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
    let consensus = start(&config(dir.path()), Sum::default()).unwrap();
    let handle = consensus.handle();
    assert_eq!(propose(&handle, 1).await, Ok(1));
    assert_eq!(propose(&handle, 2).await, Ok(3));
    assert_eq!(propose(&handle, 3).await, Ok(6));
    // The status is published just after the answers of the same `Ready` go out.
    let mut watch = handle.watch_status();
    let status = tokio::time::timeout(DEADLINE, watch.wait_for(|s| s.applied_index >= 4))
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
    let consensus = start(&config(dir.path()), Sum::default()).unwrap();
    let handle = consensus.handle();
    for value in 1..=10 {
        propose(&handle, value).await.unwrap();
    }
    let term_before = handle.status().term;
    shutdown(consensus).await;

    // A fresh, empty state machine is rebuilt by replaying the log.
    let consensus = start(&config(dir.path()), Sum::default()).unwrap();
    let handle = consensus.handle();
    assert_eq!(propose(&handle, 100).await, Ok(55 + 100));
    assert!(
        handle.status().term > term_before,
        "a restart elects in a new term"
    );
    shutdown(consensus).await;
}

#[tokio::test]
async fn concurrent_proposals_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let consensus = start(&config(dir.path()), Sum::default()).unwrap();
    let handle = consensus.handle();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let handle = handle.clone();
        tasks.push(tokio::spawn(async move { propose(&handle, 1).await }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap().unwrap());
    }
    answers.sort_unstable();
    assert_eq!(answers, (1..=200).collect::<Vec<u64>>());
    shutdown(consensus).await;
}

#[tokio::test]
async fn a_second_driver_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let consensus = start(&config(dir.path()), Sum::default()).unwrap();
    let second = start(&config(dir.path()), Sum::default());
    assert!(matches!(second, Err(StartError::Open { .. })), "{second:?}");
    // The first keeps working.
    assert_eq!(propose(&consensus.handle(), 7).await, Ok(7));
    shutdown(consensus).await;
}

#[tokio::test]
async fn proposals_after_shutdown_are_answered_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let consensus = start(&config(dir.path()), Sum::default()).unwrap();
    let handle = consensus.handle();
    shutdown(consensus).await;
    assert_eq!(propose(&handle, 1).await, Err(ProposeError::Stopped));
}

#[test]
fn proposal_contexts_round_trip() {
    let context = proposal_context(3, u64::MAX - 1);
    assert_eq!(parse_proposal_context(&context), Some((3, u64::MAX - 1)));
    assert_eq!(parse_proposal_context(&[1, 2, 3]), None);
}
