//! Rollout tests: the phase table, traffic shares, apportioning and the canary verdict.

use super::*;
use crate::deployment::{CanaryThresholds, DeploymentSpec, RolloutStrategy};
use proptest::prelude::*;

fn deployment(kind: RolloutKind, desired: u32, rollout: Option<Rollout>) -> Deployment {
    let mut spec = DeploymentSpec::new("m", "m", 1, desired);
    spec.rollout = RolloutStrategy {
        kind,
        max_surge: 1,
        max_unavailable: 0,
    };
    Deployment {
        spec,
        stable_version: 1,
        previous_version: None,
        rollout,
        blocked_version: None,
        replicas_desired: desired,
    }
}

fn canary(percent: u8) -> RolloutKind {
    RolloutKind::Canary {
        traffic_percent: percent,
        observation_ms: 60_000,
        thresholds: CanaryThresholds {
            error_ratio_max_ppm: 10_000,
            latency_p99_max_ms: 250,
            requests_min: 100,
        },
    }
}

fn to_two(phase: RolloutPhase) -> Option<Rollout> {
    Some(Rollout {
        to: 2,
        started_at_ms: 0,
        phase,
    })
}

/// One row of a phase table: strategy, phase (none: no rollout), expected (version, n) pairs.
type PhaseRow = (RolloutKind, Option<RolloutPhase>, Vec<(u32, u32)>);

fn weights(pairs: &[(u32, u32)]) -> Vec<VersionWeight> {
    pairs
        .iter()
        .map(|&(version, weight)| VersionWeight { version, weight })
        .collect()
}

#[test]
fn each_phase_wants_the_groups_its_strategy_describes() {
    let table: Vec<PhaseRow> = vec![
        (RolloutKind::Rolling, None, vec![(1, 4)]),
        (
            RolloutKind::Rolling,
            Some(RolloutPhase::Rolling),
            vec![(2, 4)],
        ),
        (
            canary(10),
            Some(RolloutPhase::CanaryWarming),
            vec![(1, 4), (2, 1)],
        ),
        (
            canary(50),
            Some(RolloutPhase::CanaryObserving { since_ms: 0 }),
            vec![(1, 4), (2, 2)],
        ),
        (canary(50), Some(RolloutPhase::Rolling), vec![(2, 4)]),
        (
            RolloutKind::BlueGreen {
                keep_previous_ms: 1,
            },
            Some(RolloutPhase::GreenWarming),
            vec![(1, 4), (2, 4)],
        ),
        (
            RolloutKind::BlueGreen {
                keep_previous_ms: 1,
            },
            Some(RolloutPhase::Switched { at_ms: 0 }),
            vec![(1, 4), (2, 4)],
        ),
    ];
    for (kind, phase, expected) in table {
        let wanted = version_targets(&deployment(kind, 4, phase.and_then(to_two)));
        let expected: BTreeMap<u32, u32> = expected.into_iter().collect();
        assert_eq!(wanted, expected, "{kind:?} in {phase:?}");
    }
}

#[test]
fn traffic_follows_the_phase() {
    let ready: BTreeMap<u32, u32> = [(1, 3), (2, 1)].into_iter().collect();
    let table: Vec<PhaseRow> = vec![
        (RolloutKind::Rolling, None, vec![(1, 100)]),
        (
            RolloutKind::Rolling,
            Some(RolloutPhase::Rolling),
            vec![(1, 3), (2, 1)],
        ),
        (
            canary(10),
            Some(RolloutPhase::CanaryWarming),
            vec![(1, 100)],
        ),
        (
            canary(10),
            Some(RolloutPhase::CanaryObserving { since_ms: 0 }),
            vec![(1, 90), (2, 10)],
        ),
        (
            RolloutKind::BlueGreen {
                keep_previous_ms: 1,
            },
            Some(RolloutPhase::GreenWarming),
            vec![(1, 100)],
        ),
        (
            RolloutKind::BlueGreen {
                keep_previous_ms: 1,
            },
            Some(RolloutPhase::Switched { at_ms: 0 }),
            vec![(2, 100)],
        ),
    ];
    for (kind, phase, expected) in table {
        let shares = traffic(&deployment(kind, 4, phase.and_then(to_two)), &ready);
        assert_eq!(shares, weights(&expected), "{kind:?} in {phase:?}");
    }
}

#[test]
fn a_traffic_split_gives_every_weighted_version_a_group_when_it_can() {
    assert_eq!(
        apportion(10, &weights(&[(1, 99), (2, 1)])),
        [(1, 9), (2, 1)].into_iter().collect()
    );
    assert_eq!(
        apportion(3, &weights(&[(1, 1), (2, 1)])),
        [(1, 2), (2, 1)].into_iter().collect()
    );
    assert_eq!(
        apportion(1, &weights(&[(1, 1), (2, 1), (3, 1)])),
        [(1, 1), (2, 0), (3, 0)].into_iter().collect()
    );
    assert_eq!(apportion(5, &weights(&[(1, 0)])), BTreeMap::new());
}

#[test]
fn a_canary_is_judged_only_after_enough_requests() {
    let deployment = deployment(canary(10), 4, to_two(RolloutPhase::Rolling));
    let health = |requests, errors, latency_p99_ms| VersionHealth {
        requests,
        errors,
        latency_p99_ms,
    };
    assert_eq!(canary_verdict(&deployment, &health(99, 99, 9_999)), None);
    assert_eq!(canary_verdict(&deployment, &health(1_000, 10, 250)), None);
    assert_eq!(
        canary_verdict(&deployment, &health(1_000, 11, 100)),
        Some(RollbackReason::CanaryErrors {
            errors: 11,
            requests: 1_000,
            error_ratio_max_ppm: 10_000
        })
    );
    assert_eq!(
        canary_verdict(&deployment, &health(1_000, 0, 251)),
        Some(RollbackReason::CanaryLatency {
            latency_p99_ms: 251,
            latency_p99_max_ms: 250
        })
    );
}

#[test]
fn a_rolled_back_version_is_not_rolled_out_again_until_the_spec_changes() {
    let mut rolled_back = deployment(RolloutKind::Rolling, 2, None);
    rolled_back.blocked_version = Some(2);
    let counts = GroupCounts::default();
    assert_eq!(decide(&rolled_back, Some(2), &counts, None, 0), None);
    assert!(matches!(
        decide(&rolled_back, Some(3), &counts, None, 0),
        Some(Command::StartRollout { version: 3, .. })
    ));
}

/// A version whose replicas keep failing to load is given up after a few tries, in any
/// phase, while the stable version still serves; fewer failures change nothing.
#[test]
fn a_rollout_whose_new_version_keeps_failing_is_rolled_back() {
    for phase in [RolloutPhase::Rolling, RolloutPhase::CanaryWarming] {
        let rolling = deployment(RolloutKind::Rolling, 2, to_two(phase));
        let mut counts = GroupCounts::default();
        counts.failing.insert(2, ROLLOUT_FAILURES_MAX - 1);
        assert!(
            !matches!(
                decide(&rolling, Some(2), &counts, None, 0),
                Some(Command::RollbackRollout { .. })
            ),
            "{phase:?}"
        );
        counts.failing.insert(2, ROLLOUT_FAILURES_MAX);
        counts.failing.insert(1, 99);
        assert_eq!(
            decide(&rolling, Some(2), &counts, None, 0),
            Some(Command::RollbackRollout {
                deployment: "m".into(),
                version: 2,
                reason: RollbackReason::NewVersionFailed {
                    failures_in_a_row: ROLLOUT_FAILURES_MAX
                },
            }),
            "{phase:?}"
        );
    }
    assert!(
        RollbackReason::NewVersionFailed {
            failures_in_a_row: 3
        }
        .blocks_version()
    );
}

/// Regression: with versions 1, 2 and 3 pushed, a deployment moved from 1 to 3 rolled back
/// to 2 (the version 3 was made from), which had never run.
#[test]
fn a_completed_rollout_remembers_the_version_it_replaced_for_a_rollback() {
    let mut deployment = deployment(
        RolloutKind::Rolling,
        2,
        Some(Rollout {
            to: 3,
            started_at_ms: 0,
            phase: RolloutPhase::Rolling,
        }),
    );
    assert_eq!(deployment.previous_version, None);
    complete(&mut deployment, 3).unwrap();
    assert_eq!(deployment.stable_version, 3);
    assert_eq!(deployment.previous_version, Some(1));
}

proptest! {
    #[test]
    fn apportioning_hands_out_exactly_the_total(
        total in 0u32..50,
        shares in prop::collection::vec(0u32..100, 1..5),
    ) {
        let split: Vec<VersionWeight> = shares
            .iter()
            .enumerate()
            .map(|(i, &weight)| VersionWeight { version: i as u32 + 1, weight })
            .collect();
        let targets = apportion(total, &split);
        let positive = shares.iter().filter(|&&w| w > 0).count();
        let handed: u32 = targets.values().sum();
        prop_assert_eq!(handed, if positive == 0 { 0 } else { total });
        if total as usize >= positive {
            prop_assert!(targets.values().all(|&groups| groups > 0));
        }
    }
}
