//! Rollout: how a deployment moves from its stable version to a new one, and back.
//!
//! A rollout is a small state machine on the `Deployment` (`RolloutPhase`). Its phase decides
//! two things, both pure functions here: how many replica groups of each version are wanted
//! ([`version_targets`]) and how traffic is shared between versions ([`traffic`]). Placement
//! then adds and removes groups to meet the targets, new ones first. The controller half,
//! [`decide`], looks at what is ready (and, for a canary, at its health) and proposes the
//! next step; the transition functions apply a step and are shared by `apply` and by the
//! planner's own look-ahead, so both agree on what a step means.

use crate::command::{Command, Rejected};
use crate::deployment::{
    Deployment, RollbackReason, Rollout, RolloutKind, RolloutPhase, VersionSelector, VersionWeight,
};
use crate::load::VersionHealth;
use crate::state::Model;
use std::collections::BTreeMap;

/// Percent of traffic, the whole.
const PERCENT_ALL: u32 = 100;

/// The version the spec asks for, when it asks for exactly one. `None` for a traffic split
/// or an alias that is not set.
pub fn wanted_version(model: Option<&Model>, selector: &VersionSelector) -> Option<u32> {
    match selector {
        VersionSelector::Version(version) => Some(*version),
        VersionSelector::Alias(alias) => model?.aliases.get(alias).copied(),
        VersionSelector::Split(_) => None,
    }
}

/// Replica groups wanted of each version in the deployment's current phase.
pub fn version_targets(deployment: &Deployment) -> BTreeMap<u32, u32> {
    let desired = deployment.replicas_desired;
    let stable = deployment.stable_version;
    let mut targets = BTreeMap::new();
    match deployment.rollout {
        None => match &deployment.spec.versions {
            VersionSelector::Split(weights) => return apportion(desired, weights),
            _ => {
                targets.insert(stable, desired);
            }
        },
        Some(Rollout { to, phase, .. }) => match phase {
            RolloutPhase::CanaryWarming | RolloutPhase::CanaryObserving { .. } => {
                targets.insert(stable, desired);
                targets.insert(to, canary_groups(deployment));
            }
            RolloutPhase::Rolling => {
                targets.insert(to, desired);
            }
            RolloutPhase::GreenWarming | RolloutPhase::Switched { .. } => {
                targets.insert(stable, desired);
                targets.insert(to, desired);
            }
        },
    }
    targets
}

/// How requests are shared between versions now, as weights. `ready_groups` counts the
/// ready replica groups of each version; a rolling update sends traffic in proportion to
/// them.
pub fn traffic(deployment: &Deployment, ready_groups: &BTreeMap<u32, u32>) -> Vec<VersionWeight> {
    let stable = deployment.stable_version;
    let all = |version| {
        vec![VersionWeight {
            version,
            weight: PERCENT_ALL,
        }]
    };
    match deployment.rollout {
        None => match &deployment.spec.versions {
            VersionSelector::Split(weights) => weights
                .iter()
                .filter(|share| share.weight > 0)
                .copied()
                .collect(),
            _ => all(stable),
        },
        Some(Rollout { to, phase, .. }) => match phase {
            RolloutPhase::CanaryWarming | RolloutPhase::GreenWarming => all(stable),
            RolloutPhase::Switched { .. } => all(to),
            RolloutPhase::CanaryObserving { .. } => {
                let percent = canary_percent(deployment);
                vec![
                    VersionWeight {
                        version: stable,
                        weight: PERCENT_ALL - percent,
                    },
                    VersionWeight {
                        version: to,
                        weight: percent,
                    },
                ]
            }
            RolloutPhase::Rolling => {
                let shares: Vec<VersionWeight> = ready_groups
                    .iter()
                    .filter(|(_, ready)| **ready > 0)
                    .map(|(&version, &ready)| VersionWeight {
                        version,
                        weight: ready,
                    })
                    .collect();
                if shares.is_empty() {
                    all(stable)
                } else {
                    shares
                }
            }
        },
    }
}

/// Splits `total` groups by weight: largest remainder, ties to the earlier entry, and every
/// positively weighted version gets at least one group when there are enough to go round.
pub fn apportion(total: u32, weights: &[VersionWeight]) -> BTreeMap<u32, u32> {
    let positive: Vec<VersionWeight> = weights.iter().filter(|w| w.weight > 0).copied().collect();
    let weight_sum: u64 = positive.iter().map(|w| u64::from(w.weight)).sum();
    let mut shares: Vec<(u32, u32, u64)> = Vec::with_capacity(positive.len());
    for share in &positive {
        let exact = u64::from(total) * u64::from(share.weight);
        let whole = u32::try_from(exact / weight_sum).unwrap_or(total);
        shares.push((share.version, whole, exact % weight_sum));
    }
    let assigned: u32 = shares.iter().map(|(_, whole, _)| whole).sum();
    let mut by_remainder: Vec<usize> = (0..shares.len()).collect();
    by_remainder.sort_by(|&a, &b| shares[b].2.cmp(&shares[a].2).then(a.cmp(&b)));
    for &position in by_remainder.iter().take((total - assigned) as usize) {
        shares[position].1 += 1;
    }
    if total as usize >= shares.len() {
        while let Some(empty) = shares.iter().position(|(_, groups, _)| *groups == 0) {
            let Some(largest) = (0..shares.len()).max_by_key(|&i| (shares[i].1, usize::MAX - i))
            else {
                break;
            };
            shares[largest].1 -= 1;
            shares[empty].1 += 1;
        }
    }
    let mut targets = BTreeMap::new();
    for (version, groups, _) in shares {
        *targets.entry(version).or_insert(0) += groups;
    }
    targets
}

fn canary_percent(deployment: &Deployment) -> u32 {
    match deployment.spec.rollout.kind {
        RolloutKind::Canary {
            traffic_percent, ..
        } => u32::from(traffic_percent).min(PERCENT_ALL),
        _ => 0,
    }
}

/// Canary groups: the canary's share of the wanted groups, rounded up, at least one.
fn canary_groups(deployment: &Deployment) -> u32 {
    let desired = deployment.replicas_desired;
    if desired == 0 {
        return 0;
    }
    let share = (u64::from(desired) * u64::from(canary_percent(deployment))).div_ceil(100);
    u32::try_from(share).unwrap_or(desired).clamp(1, desired)
}

/// Whether a canary's health breaches its thresholds, and how.
pub fn canary_verdict(deployment: &Deployment, health: &VersionHealth) -> Option<RollbackReason> {
    let RolloutKind::Canary { thresholds, .. } = deployment.spec.rollout.kind else {
        return None;
    };
    if health.requests == 0 || health.requests < thresholds.requests_min {
        return None;
    }
    let errors_ppm = u128::from(health.errors) * 1_000_000;
    if errors_ppm > u128::from(thresholds.error_ratio_max_ppm) * u128::from(health.requests) {
        return Some(RollbackReason::CanaryErrors {
            errors: health.errors,
            requests: health.requests,
            error_ratio_max_ppm: thresholds.error_ratio_max_ppm,
        });
    }
    if health.latency_p99_ms > thresholds.latency_p99_max_ms {
        return Some(RollbackReason::CanaryLatency {
            latency_p99_ms: health.latency_p99_ms,
            latency_p99_max_ms: thresholds.latency_p99_max_ms,
        });
    }
    None
}

/// What the rollout controller sees of one deployment's groups.
#[derive(Clone, Debug, Default)]
pub struct GroupCounts {
    /// Groups that hold memory, by version.
    pub live: BTreeMap<u32, u32>,
    /// Groups whose every shard is ready on a node that is not down, by version.
    pub ready: BTreeMap<u32, u32>,
    /// The most failures in a row of any group of the version, by version.
    pub failing: BTreeMap<u32, u32>,
}

impl GroupCounts {
    fn ready(&self, version: u32) -> u32 {
        self.ready.get(&version).copied().unwrap_or(0)
    }

    fn live_except(&self, version: u32) -> u32 {
        self.live
            .iter()
            .filter(|(v, _)| **v != version)
            .map(|(_, groups)| groups)
            .sum()
    }
}

/// Failures in a row of one of the new version's groups after which its rollout is rolled
/// back (and the version blocked): with [`crate::backoff::retry_delay_ms`]'s waits (the
/// first retry at once, the second after half a second) a passing fault gets two chances,
/// and a version that cannot load is given up within a second or two while the stable
/// version still serves.
pub const ROLLOUT_FAILURES_MAX: u32 = 3;

/// The next rollout step for one deployment, if one is due.
///
/// `wanted` is [`wanted_version`]; `canary_health` the load's health of the rollout's new
/// version since its observation began.
pub fn decide(
    deployment: &Deployment,
    wanted: Option<u32>,
    counts: &GroupCounts,
    canary_health: Option<&VersionHealth>,
    now_ms: u64,
) -> Option<Command> {
    let name = deployment.name().to_string();
    let Some(rollout) = deployment.rollout else {
        let to = wanted?;
        if to == deployment.stable_version || Some(to) == deployment.blocked_version {
            return None;
        }
        return Some(Command::StartRollout {
            deployment: name,
            version: to,
            at_ms: now_ms,
        });
    };
    let version = rollout.to;
    if wanted != Some(version) {
        return Some(Command::RollbackRollout {
            deployment: name,
            version,
            reason: RollbackReason::Superseded,
        });
    }
    let failures_in_a_row = counts.failing.get(&version).copied().unwrap_or(0);
    if failures_in_a_row >= ROLLOUT_FAILURES_MAX {
        return Some(Command::RollbackRollout {
            deployment: name,
            version,
            reason: RollbackReason::NewVersionFailed { failures_in_a_row },
        });
    }
    let desired = deployment.replicas_desired;
    let advance = |phase| {
        Some(Command::AdvanceRollout {
            deployment: name.clone(),
            version,
            phase,
        })
    };
    match (rollout.phase, deployment.spec.rollout.kind) {
        (RolloutPhase::CanaryWarming, _) => (counts.ready(version) >= canary_groups(deployment))
            .then(|| advance(RolloutPhase::CanaryObserving { since_ms: now_ms }))
            .flatten(),
        (
            RolloutPhase::CanaryObserving { since_ms },
            RolloutKind::Canary { observation_ms, .. },
        ) => {
            if let Some(reason) = canary_health.and_then(|h| canary_verdict(deployment, h)) {
                return Some(Command::RollbackRollout {
                    deployment: name,
                    version,
                    reason,
                });
            }
            (now_ms >= since_ms.saturating_add(observation_ms))
                .then(|| advance(RolloutPhase::Rolling))
                .flatten()
        }
        // The strategy changed under a canary: there is no window left to wait for.
        (RolloutPhase::CanaryObserving { .. }, _) => advance(RolloutPhase::Rolling),
        (RolloutPhase::Rolling, _) => (counts.ready(version) >= desired
            && counts.live_except(version) == 0)
            .then_some(Command::CompleteRollout {
                deployment: name,
                version,
            }),
        (RolloutPhase::GreenWarming, _) => (counts.ready(version) >= desired)
            .then(|| advance(RolloutPhase::Switched { at_ms: now_ms }))
            .flatten(),
        (RolloutPhase::Switched { at_ms }, kind) => {
            let keep_ms = match kind {
                RolloutKind::BlueGreen { keep_previous_ms } => keep_previous_ms,
                _ => 0,
            };
            (now_ms >= at_ms.saturating_add(keep_ms)).then_some(Command::CompleteRollout {
                deployment: name,
                version,
            })
        }
    }
}

/// Starts a rollout to `to`; its first phase follows the strategy.
pub(crate) fn start(deployment: &mut Deployment, to: u32, at_ms: u64) -> Result<(), Rejected> {
    if let Some(rollout) = deployment.rollout {
        return Err(Rejected::RolloutInProgress {
            deployment: deployment.name().to_string(),
            version: rollout.to,
        });
    }
    if to == deployment.stable_version {
        return Err(Rejected::Invalid(format!(
            "version {to} is already the stable version of {}",
            deployment.name()
        )));
    }
    let phase = match deployment.spec.rollout.kind {
        RolloutKind::Rolling => RolloutPhase::Rolling,
        RolloutKind::Canary { .. } => RolloutPhase::CanaryWarming,
        RolloutKind::BlueGreen { .. } => RolloutPhase::GreenWarming,
    };
    deployment.rollout = Some(Rollout {
        to,
        started_at_ms: at_ms,
        phase,
    });
    Ok(())
}

fn current(deployment: &Deployment, version: u32) -> Result<Rollout, Rejected> {
    match deployment.rollout {
        Some(rollout) if rollout.to == version => Ok(rollout),
        Some(rollout) => Err(Rejected::RolloutMismatch {
            deployment: deployment.name().to_string(),
            current: rollout.to,
            given: version,
        }),
        None => Err(Rejected::NoRollout(deployment.name().to_string())),
    }
}

/// Moves the rollout to `version` into `phase`, if that is the next phase.
pub(crate) fn advance(
    deployment: &mut Deployment,
    version: u32,
    phase: RolloutPhase,
) -> Result<(), Rejected> {
    let mut rollout = current(deployment, version)?;
    let allowed = matches!(
        (rollout.phase, phase),
        (
            RolloutPhase::CanaryWarming,
            RolloutPhase::CanaryObserving { .. }
        ) | (RolloutPhase::CanaryObserving { .. }, RolloutPhase::Rolling)
            | (RolloutPhase::GreenWarming, RolloutPhase::Switched { .. })
    );
    if !allowed {
        return Err(Rejected::InvalidTransition {
            deployment: deployment.name().to_string(),
            from: rollout.phase,
            to: phase,
        });
    }
    rollout.phase = phase;
    deployment.rollout = Some(rollout);
    Ok(())
}

/// Makes the rollout's version the stable one.
pub(crate) fn complete(deployment: &mut Deployment, version: u32) -> Result<(), Rejected> {
    let rollout = current(deployment, version)?;
    if !matches!(
        rollout.phase,
        RolloutPhase::Rolling | RolloutPhase::Switched { .. }
    ) {
        return Err(Rejected::InvalidTransition {
            deployment: deployment.name().to_string(),
            from: rollout.phase,
            to: RolloutPhase::Rolling,
        });
    }
    if deployment.stable_version != version {
        deployment.previous_version = Some(deployment.stable_version);
    }
    deployment.stable_version = version;
    deployment.rollout = None;
    deployment.blocked_version = None;
    Ok(())
}

/// Abandons the rollout: the stable version stays, and serves all traffic at once where its
/// replicas are still warm.
pub(crate) fn rollback(
    deployment: &mut Deployment,
    version: u32,
    reason: &RollbackReason,
) -> Result<(), Rejected> {
    current(deployment, version)?;
    deployment.rollout = None;
    if reason.blocks_version() {
        deployment.blocked_version = Some(version);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
