//! Backing off from replica groups that keep failing. A group whose load fails again and
//! again (a version with no `config.json`, a config that does not match its weights) is
//! placed again after a wait that doubles with each failure in a row, up to
//! [`RETRY_DELAY_MAX_MS`], instead of at once: at once, each attempt committed three raft
//! entries (reassign, loading, failed) in a loop that never ended, and the replica spent
//! so little time `Failed` that its reason was hardly ever seen.
//!
//! The record is the leader's memory, not replicated, like node leases: a new leader starts
//! with none, so it retries each failed group once at once. It is built from what the state
//! shows: [`FailureMemory::observe`] counts a group's failure once per epoch (each placement
//! of a group has its own epoch), and forgets the group once it is ready or gone.

use crate::state::{ClusterState, ReplicaState};
use crate::types::ReplicaId;
use std::collections::BTreeMap;

/// The wait after the second failure in a row; each further one doubles it. The first
/// failure is retried at once: it may have been passing (a fetch cut short).
pub const RETRY_DELAY_FIRST_MS: u64 = 500;

/// The longest wait between two attempts: a minute keeps a broken version's log traffic to
/// three entries a minute, and a fixed cause (memory freed, a file restored) is tried again
/// soon enough.
pub const RETRY_DELAY_MAX_MS: u64 = 60_000;

/// How long to wait before placing again a group that failed `in_a_row` times in a row.
pub fn retry_delay_ms(in_a_row: u32) -> u64 {
    match in_a_row {
        0 | 1 => 0,
        n => {
            let doublings = 1u64.checked_shl(n - 2).unwrap_or(u64::MAX);
            RETRY_DELAY_FIRST_MS
                .saturating_mul(doublings)
                .min(RETRY_DELAY_MAX_MS)
        }
    }
}

/// What the planner knows of a group that failed since it was last ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailingGroup {
    /// Failures in a row, one per placement (epoch).
    pub in_a_row: u32,
    /// Not placed again before this time.
    pub retry_at_ms: u64,
}

/// The failures in a row of the groups that are failing now or failed since they were last
/// ready.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailureMemory {
    groups: BTreeMap<ReplicaId, Failing>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Failing {
    /// The epoch of the last placement seen failed.
    epoch: u64,
    in_a_row: u32,
    /// When that failure was first seen.
    seen_at_ms: u64,
}

impl FailureMemory {
    /// Notes what `state` shows at `now_ms`: a group with a failed shard at an epoch not yet
    /// counted has failed once more; a group that is ready, or gone, is forgotten.
    pub fn observe(&mut self, state: &ClusterState, now_ms: u64) {
        self.groups
            .retain(|group, _| state.group_view(*group).is_some_and(|view| !view.ready));
        for replica in state.replicas.values() {
            if replica.state != ReplicaState::Failed {
                continue;
            }
            let failing = self.groups.entry(replica.group).or_insert(Failing {
                epoch: 0,
                in_a_row: 0,
                seen_at_ms: now_ms,
            });
            if failing.epoch < replica.epoch {
                failing.epoch = replica.epoch;
                failing.in_a_row = failing.in_a_row.saturating_add(1);
                failing.seen_at_ms = now_ms;
            }
        }
    }

    /// Every group that failed since it was last ready: how often in a row, and when it may
    /// be placed again.
    pub fn failing(&self) -> BTreeMap<ReplicaId, FailingGroup> {
        self.groups
            .iter()
            .map(|(&group, failing)| {
                let delay = retry_delay_ms(failing.in_a_row);
                let retry_at_ms = failing.seen_at_ms.saturating_add(delay);
                let known = FailingGroup {
                    in_a_row: failing.in_a_row,
                    retry_at_ms,
                };
                (group, known)
            })
            .collect()
    }

    /// How many times in a row `group` failed, as far as this memory knows.
    pub fn failures_in_a_row(&self, group: ReplicaId) -> u32 {
        self.groups
            .get(&group)
            .map_or(0, |failing| failing.in_a_row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_first_failure_is_retried_at_once_then_the_wait_doubles_up_to_a_minute() {
        let delays: Vec<u64> = (1..=10).map(retry_delay_ms).collect();
        assert_eq!(
            delays,
            [
                0, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000
            ]
        );
        assert_eq!(retry_delay_ms(u32::MAX), RETRY_DELAY_MAX_MS);
    }

    proptest! {
        #[test]
        fn the_wait_never_shrinks_with_more_failures_and_never_passes_the_cap(n in 0u32..200) {
            prop_assert!(retry_delay_ms(n) <= retry_delay_ms(n + 1));
            prop_assert!(retry_delay_ms(n) <= RETRY_DELAY_MAX_MS);
        }
    }
}
