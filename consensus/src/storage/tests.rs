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

/// A log in `dir` holding entries 1..=`count` (term 1) in one file, closed; that file.
fn closed_log(dir: &Path, count: u64) -> PathBuf {
    {
        let mut storage = DiskStorage::open(dir, Some(&[1, 2, 3])).unwrap();
        for index in 1..=count {
            storage
                .append(&[entry(index, 1)], Some(&hard_state(1, 2, index)))
                .unwrap();
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|file| file.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "raftlog"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 1, "{files:?}");
    files.remove(0)
}

/// Writes `bytes` at `offset` of `file` (the end when `None`).
fn write_into(file: &Path, offset: Option<u64>, bytes: &[u8]) {
    use std::io::{Seek as _, SeekFrom, Write as _};
    let mut file = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    file.seek(offset.map_or(SeekFrom::End(0), SeekFrom::Start))
        .unwrap();
    file.write_all(bytes).unwrap();
}

/// The path of the log file after `file`.
fn next_file(file: &Path) -> PathBuf {
    let name = file.file_name().unwrap().to_str().unwrap();
    let seq: u64 = name[..16].parse().unwrap();
    file.with_file_name(format!("{:016}.raftlog", seq + 1))
}

/// What a crash leaves after raft-engine failed to rotate on a full disk (seen in a chaos
/// run): the file it was writing ends in space it had allocated ahead (zeros), and the
/// next file was created but got no header. The zeros are then no longer the log's tail,
/// and raft-engine refused to open the log, so the server could never start again.
#[test]
fn a_log_left_by_a_rotation_that_failed_on_a_full_disk_opens_with_every_entry() {
    let dir = tempfile::tempdir().unwrap();
    let file = closed_log(dir.path(), 5);
    write_into(&file, None, &[0u8; 4096]);
    let empty = next_file(&file);
    std::fs::File::create(&empty).unwrap();

    let storage = DiskStorage::open(dir.path(), None).unwrap();
    assert_eq!(&storage.hard_state, &hard_state(1, 2, 5));
    assert_eq!(storage.last_index().unwrap(), 5);
    let read = storage
        .entries(1, 6, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(read, (1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>());
    assert!(!empty.exists(), "the empty file is set aside");
    assert!(empty.with_extension("raftlog.empty").exists());
}

#[test]
fn damage_before_an_empty_last_file_is_still_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = closed_log(dir.path(), 5);
    // Zero the second batch's header: the batches after it are data, not zeros.
    let bytes = std::fs::read(&file).unwrap();
    let header = LOG_FILE_HEADER_MAX_BYTES as usize;
    let first_batch = u64::from_be_bytes(bytes[header..header + 8].try_into().unwrap()) >> 8;
    write_into(&file, Some(header as u64 + first_batch), &[0u8; 16]);
    let empty = next_file(&file);
    std::fs::File::create(&empty).unwrap();
    let error = DiskStorage::open(dir.path(), None).unwrap_err();
    assert!(error.to_string().contains("Corruption"), "{error}");
    assert!(empty.exists(), "nothing is set aside");
}

#[test]
fn a_broken_file_in_the_middle_of_the_log_is_still_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = closed_log(dir.path(), 1);
    write_into(&file, None, &[0u8; 4096]);
    // A later file that holds more than a header: not an empty leftover, so nothing is
    // set aside and the corruption is reported.
    std::fs::write(next_file(&file), [7u8; 4096]).unwrap();
    let error = DiskStorage::open(dir.path(), None).unwrap_err();
    assert!(error.to_string().contains("Corruption"), "{error}");
}

/// A snapshot from the leader whose log batch never got written (the process died on a
/// full disk between the two): raft-rs aborted on the old commit ("out of range").
#[test]
fn a_snapshot_installed_only_halfway_before_a_crash_still_starts_raft() {
    let dir = tempfile::tempdir().unwrap();
    closed_log(dir.path(), 3);
    write_snapshot(
        &dir.path().join(SNAPSHOT_FILE),
        &snapshot(10, 2, vec![1, 2, 3]),
    )
    .unwrap();
    let storage = DiskStorage::open(dir.path(), None).unwrap();
    assert_eq!(storage.hard_state.commit, 10);
    assert_eq!(storage.hard_state.term, 2);
    let config = raft::Config {
        id: 1,
        ..raft::Config::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let raw = raft::RawNode::new(&config, storage, &logger).unwrap();
    assert_eq!(raw.raft.raft_log.committed, 10);
    assert_eq!(raw.raft.raft_log.last_index(), 10);
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
