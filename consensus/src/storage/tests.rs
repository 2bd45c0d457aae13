//! DiskStorage on a real raft-engine directory: what survives reopening.

use super::*;

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("entry {index}").into_bytes().into(),
        ..Entry::default()
    }
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..HardState::default()
    }
}

fn snapshot(index: u64, term: u64, voters: Vec<u64>) -> Snapshot {
    let mut snapshot = Snapshot {
        data: b"state".to_vec().into(),
        ..Snapshot::default()
    };
    let metadata = snapshot.mut_metadata();
    metadata.index = index;
    metadata.term = term;
    metadata.mut_conf_state().set_voters(voters);
    snapshot
}

#[test]
fn entries_and_hard_state_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut storage = DiskStorage::open(dir.path(), Some(&[1, 2, 3])).unwrap();
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
        storage
            .append(&entries, Some(&hard_state(1, 2, 3)))
            .unwrap();
    }
    let storage = DiskStorage::open(dir.path(), Some(&[9])).unwrap();
    assert_eq!(&storage.hard_state, &hard_state(1, 2, 3));
    assert_eq!(
        storage.conf_state().voters,
        vec![1, 2, 3],
        "bootstrap voters kept"
    );
    assert_eq!(storage.first_index().unwrap(), 1);
    assert_eq!(storage.last_index().unwrap(), 5);
    let read = storage
        .entries(2, 4, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(read, vec![entry(2, 1), entry(3, 1)]);
}

#[test]
fn appending_over_a_conflict_truncates_the_old_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let mut storage = DiskStorage::open(dir.path(), Some(&[1])).unwrap();
    let old: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
    storage.append(&old, None).unwrap();
    storage.append(&[entry(3, 2)], None).unwrap();
    assert_eq!(storage.last_index().unwrap(), 3);
    assert_eq!(storage.term(3).unwrap(), 2);
}

#[test]
fn an_installed_snapshot_replaces_the_log_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut storage = DiskStorage::open(dir.path(), Some(&[1, 2, 3])).unwrap();
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
        storage
            .append(&entries, Some(&hard_state(2, 1, 5)))
            .unwrap();
        storage
            .install_snapshot(&snapshot(10, 2, vec![1, 2, 3, 4]))
            .unwrap();
    }
    let storage = DiskStorage::open(dir.path(), Some(&[1])).unwrap();
    assert_eq!(storage.first_index().unwrap(), 11);
    assert_eq!(storage.last_index().unwrap(), 10);
    assert_eq!(storage.term(10).unwrap(), 2);
    assert_eq!(storage.hard_state.term, 2);
    assert_eq!(storage.hard_state.vote, 1, "the vote is kept");
    assert_eq!(storage.hard_state.commit, 10);
    assert_eq!(storage.conf_state().voters, vec![1, 2, 3, 4]);
    assert_eq!(storage.latest_snapshot().data.as_ref(), b"state");
}

#[test]
fn compacting_drops_covered_entries_but_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut storage = DiskStorage::open(dir.path(), Some(&[1])).unwrap();
    let entries: Vec<Entry> = (1..=20).map(|i| entry(i, 3)).collect();
    storage.append(&entries, None).unwrap();
    storage.compact(snapshot(15, 3, vec![1])).unwrap();
    assert_eq!(storage.first_index().unwrap(), 16);
    assert_eq!(storage.last_index().unwrap(), 20);
    assert_eq!(storage.term(15).unwrap(), 3);
    assert!(matches!(
        storage.entries(10, 12, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(raft::StorageError::Compacted))
    ));
    drop(storage);
    let storage = DiskStorage::open(dir.path(), Some(&[1])).unwrap();
    assert_eq!(storage.first_index().unwrap(), 16);
    assert_eq!(storage.latest_snapshot().get_metadata().index, 15);
}

#[test]
fn a_corrupt_snapshot_file_is_reported_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    DiskStorage::open(dir.path(), Some(&[1])).unwrap();
    std::fs::write(dir.path().join(SNAPSHOT_FILE), b"\xff\xfe garbage").unwrap();
    let error = DiskStorage::open(dir.path(), Some(&[1])).unwrap_err();
    assert!(
        matches!(error, StorageError::SnapshotCorrupt { .. }),
        "{error}"
    );
}

#[test]
fn a_joining_member_starts_with_no_membership() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path(), None).unwrap();
    assert!(storage.conf_state().voters.is_empty());
    assert!(!storage.initial_state().unwrap().initialized());
}
