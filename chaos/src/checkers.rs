//! The verdicts over a chaos history: one pure function per property the cluster must
//! keep under faults (linearizable aliases, durable acknowledged writes, no overcommitted
//! device, no stale assignment run, every inference request answered, convergence after
//! healing, no process down with no fault to blame). Each reads a [`History`] and returns
//! a [`Verdict`]; none does IO.
//!
//! A checker fails only on evidence: an operation whose outcome is unknown (no answer)
//! may or may not have taken effect, at any time after it was invoked, and every checker
//! gives it that benefit of the doubt.

use crate::history::{FaultKind, History, Micros, OpKind, Operation, Outcome, Placement};
use serde::{Deserialize, Serialize};
use shoal_tests::linearizability::{self, Op};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub const LINEARIZABLE_ALIASES: &str = "linearizable_aliases";
pub const ACKNOWLEDGED_WRITES_SURVIVE: &str = "acknowledged_writes_survive";
pub const NO_DEVICE_OVERCOMMITTED: &str = "no_device_overcommitted";
pub const NO_STALE_EPOCH_ACCEPTED: &str = "no_stale_epoch_accepted";
pub const EVERY_REQUEST_ANSWERED: &str = "every_request_answered";
pub const CONVERGES_AFTER_HEALING: &str = "converges_after_healing";
pub const PROCESSES_STAY_UP: &str = "processes_stay_up";

/// The most states the linearizability search visits before it answers `Undecided`; the
/// histories of a chaos run (a few thousand alias operations) finish far below it.
pub const LINEARIZABILITY_STATES_MAX: usize = 1_000_000;

/// How many violations a failed verdict spells out; the rest are counted.
const EXAMPLES_MAX: usize = 5;

/// What one checker concluded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The checker's name, one of the constants above.
    pub name: String,
    pub passed: bool,
    /// What was checked when it passed; the first few violations when it failed.
    pub detail: String,
}

impl Verdict {
    fn pass(name: &str, detail: String) -> Self {
        Verdict {
            name: name.to_owned(),
            passed: true,
            detail,
        }
    }

    fn fail(name: &str, detail: String) -> Self {
        Verdict {
            name: name.to_owned(),
            passed: false,
            detail,
        }
    }
}

/// Every checker, in a fixed order. `convergence_bound` is how long after the last heal
/// the cluster may take to converge.
pub fn all(history: &History, convergence_bound: Micros) -> Vec<Verdict> {
    vec![
        linearizable_aliases(history),
        acknowledged_writes_survive(history),
        no_device_overcommitted(history),
        no_stale_epoch_accepted(history),
        every_request_answered(history),
        converges_after_healing(history, convergence_bound),
        processes_stay_up(history),
    ]
}

/// The register alias is linearizable: some order of the alias writes and reads respects
/// real time and a register's behaviour (a read returns the latest write; 0 before any).
///
/// Acknowledged writes and reads must be placed; a write without an answer may take effect
/// at any time after its invocation, or never; refused operations took no effect and a read
/// without an answer tells nothing, so both are left out.
pub fn linearizable_aliases(history: &History) -> Verdict {
    let mut operations = Vec::new();
    let (mut writes_acknowledged, mut writes_unknown, mut reads) = (0usize, 0usize, 0usize);
    for operation in &history.operations {
        let invoked = Duration::from_micros(operation.invoked);
        let returned = Some(Duration::from_micros(operation.completed));
        let converted = match (&operation.kind, &operation.outcome) {
            (OpKind::AliasWrite { value }, Outcome::Ok) => {
                writes_acknowledged += 1;
                (Op::Write(*value), returned)
            }
            (OpKind::AliasWrite { value }, Outcome::Unknown(_)) => {
                writes_unknown += 1;
                (Op::Write(*value), None)
            }
            // An acknowledged read without a value read the alias unset, which the
            // register model calls 0.
            (OpKind::AliasRead { value }, Outcome::Ok) => {
                reads += 1;
                (Op::Read(value.unwrap_or(0)), returned)
            }
            _ => continue,
        };
        operations.push(linearizability::Operation {
            op: converted.0,
            invoked,
            returned: converted.1,
        });
    }
    let counts = format!(
        "{} operations ({writes_acknowledged} acknowledged writes, {writes_unknown} unknown \
         writes, {reads} reads)",
        operations.len()
    );
    match linearizability::check(&operations, 0, LINEARIZABILITY_STATES_MAX) {
        linearizability::Verdict::Linearizable => {
            Verdict::pass(LINEARIZABLE_ALIASES, format!("{counts} are linearizable"))
        }
        linearizability::Verdict::NotLinearizable { longest } => {
            let mut detail = format!(
                "{counts} are not linearizable: no order respects real time and the register; \
                 the longest attempt ordered {longest}"
            );
            let unwritten = reads_of_unwritten_values(history);
            if !unwritten.is_empty() {
                detail.push_str("; reads of values not written before they returned: ");
                detail.push_str(&examples(&unwritten));
            }
            Verdict::fail(LINEARIZABLE_ALIASES, detail)
        }
        linearizability::Verdict::Undecided { limit } => Verdict::fail(
            LINEARIZABLE_ALIASES,
            format!("{counts}: undecided, the search visited more than {limit} states"),
        ),
    }
}

/// A hint for a non-linearizable history: acknowledged reads of a value that no write not
/// known to have failed had set going before the read returned.
fn reads_of_unwritten_values(history: &History) -> Vec<String> {
    history
        .operations
        .iter()
        .filter_map(|read| {
            let (OpKind::AliasRead { value: Some(value) }, Outcome::Ok) =
                (&read.kind, &read.outcome)
            else {
                return None;
            };
            let written = *value == 0
                || history.operations.iter().any(|write| {
                    matches!(write.kind, OpKind::AliasWrite { value: written } if written == *value)
                        && !matches!(write.outcome, Outcome::Fail(_))
                        && write.invoked <= read.completed
                });
            (!written).then(|| format!("{value} by {}", describe(read)))
        })
        .collect()
}

/// Acknowledged writes survive the faults: after healing, the final state holds every
/// acknowledged version and deployment, and each deployment's replica count and each
/// node's drain flag is a value its writes could have left.
pub fn acknowledged_writes_survive(history: &History) -> Verdict {
    let final_state = &history.final_state;
    let mut violations = Vec::new();
    let mut versions_checked = 0usize;
    // Writes of each deployment's replica count and each node's drain flag, in history order.
    let mut replicas: BTreeMap<&str, Vec<(u32, &Operation)>> = BTreeMap::new();
    let mut draining: BTreeMap<u64, Vec<(bool, &Operation)>> = BTreeMap::new();
    for operation in &history.operations {
        let acknowledged = operation.outcome == Outcome::Ok;
        match &operation.kind {
            OpKind::RegisterVersion {
                model,
                version: Some(version),
            } if acknowledged => {
                versions_checked += 1;
                let kept = final_state
                    .versions
                    .get(model)
                    .is_some_and(|versions| versions.contains(version));
                if !kept {
                    violations.push(format!(
                        "version {version} of {model}, acknowledged by {}, is missing",
                        describe(operation)
                    ));
                }
            }
            OpKind::Deploy {
                deployment,
                replicas: value,
            }
            | OpKind::Scale {
                deployment,
                replicas: value,
            } => {
                // An acknowledged scale proves the deployment existed, as a deploy does;
                // nothing in a workload deletes one.
                if acknowledged && !final_state.deployments.contains_key(deployment) {
                    violations.push(format!(
                        "deployment {deployment}, acknowledged by {}, is missing",
                        describe(operation)
                    ));
                }
                replicas
                    .entry(deployment)
                    .or_default()
                    .push((*value, operation));
            }
            OpKind::Drain { node } => draining.entry(*node).or_default().push((true, operation)),
            OpKind::Undrain { node } => draining.entry(*node).or_default().push((false, operation)),
            _ => {}
        }
    }
    for (deployment, writes) in &replicas {
        let Some(&actual) = final_state.deployments.get(*deployment) else {
            continue; // reported above if any write was acknowledged
        };
        if let Some(possible) = possible_final_values(writes)
            && !possible.iter().any(|(value, _)| *value == actual)
        {
            violations.push(format!(
                "deployment {deployment} wants {actual} replicas; its writes allow only {}",
                list_possible(&possible)
            ));
        }
    }
    for (node, writes) in &draining {
        let actual = final_state.draining.contains(node);
        if let Some(possible) = possible_final_values(writes)
            && !possible.iter().any(|(value, _)| *value == actual)
        {
            let state = if actual { "draining" } else { "not draining" };
            violations.push(format!(
                "node {node} is {state}; its writes allow only draining = {}",
                list_possible(&possible)
            ));
        }
    }
    if violations.is_empty() {
        Verdict::pass(
            ACKNOWLEDGED_WRITES_SURVIVE,
            format!(
                "after healing: {versions_checked} acknowledged versions kept, replica counts \
                 of {} deployments and drain flags of {} nodes as their writes allow",
                replicas.len(),
                draining.len()
            ),
        )
    } else {
        Verdict::fail(
            ACKNOWLEDGED_WRITES_SURVIVE,
            format!(
                "{} lost writes after healing: {}",
                violations.len(),
                examples(&violations)
            ),
        )
    }
}

/// The values a last-writer-wins register (a deployment's replica count, a node's drain
/// flag) may hold after all of `writes`, each with the operation that wrote it; `None` when
/// no write was acknowledged, so nothing is known (the value may predate the run).
///
/// The writes took effect in some order that respects real time, and the last one to take
/// effect set the final value. A refused write took no effect. An acknowledged write can
/// be that last one unless another acknowledged write was invoked after it completed (that
/// one certainly came later). A write without an answer may have taken effect at any time
/// after its invocation (a paused server can propose a request long after its client gave
/// up), so it can always be the last one. That is exactly the set below; anything else in
/// the final state means an acknowledged write was lost or a write came from nowhere.
fn possible_final_values<'a, T: Copy>(
    writes: &[(T, &'a Operation)],
) -> Option<Vec<(T, &'a Operation)>> {
    let acknowledged: Vec<&Operation> = writes
        .iter()
        .map(|(_, operation)| *operation)
        .filter(|operation| operation.outcome == Outcome::Ok)
        .collect();
    if acknowledged.is_empty() {
        return None;
    }
    let possible = writes
        .iter()
        .filter(|(_, write)| match write.outcome {
            Outcome::Ok => !acknowledged
                .iter()
                .any(|later| later.invoked > write.completed),
            Outcome::Unknown(_) => true,
            Outcome::Fail(_) => false,
        })
        .copied()
        .collect();
    Some(possible)
}

fn list_possible<T: std::fmt::Display>(possible: &[(T, &Operation)]) -> String {
    let listed: Vec<String> = possible
        .iter()
        .map(|(value, operation)| format!("{value} ({})", describe(operation)))
        .collect();
    examples(&listed)
}

/// No device is overcommitted: every observation of a device, from the replicated state or
/// an agent's ledger, reserves at most its capacity.
pub fn no_device_overcommitted(history: &History) -> Verdict {
    let over: Vec<_> = history
        .devices
        .iter()
        .filter(|device| device.reserved_bytes > device.capacity_bytes)
        .collect();
    let worst = over
        .iter()
        .max_by_key(|device| device.reserved_bytes - device.capacity_bytes);
    match worst {
        None => Verdict::pass(
            NO_DEVICE_OVERCOMMITTED,
            format!(
                "{} device observations within capacity",
                history.devices.len()
            ),
        ),
        Some(worst) => Verdict::fail(
            NO_DEVICE_OVERCOMMITTED,
            format!(
                "{} of {} device observations reserve beyond capacity; worst: {} saw node {} \
                 device {} at {} reserve {} of {} bytes ({} over)",
                over.len(),
                history.devices.len(),
                worst.source,
                worst.node,
                worst.device,
                seconds(worst.at),
                worst.reserved_bytes,
                worst.capacity_bytes,
                worst.reserved_bytes - worst.capacity_bytes
            ),
        ),
    }
}

/// No agent ran a stale or forged assignment: (a) within one agent process (agent and
/// incarnation), the epochs it accepted for each replica never decrease, in log order;
/// (b) every accepted (replica, epoch) is a placement the control plane made on that
/// agent's node (an agent's node id is its agent number).
pub fn no_stale_epoch_accepted(history: &History) -> Verdict {
    let mut violations = Vec::new();
    let mut latest: BTreeMap<(u64, u32, u64), u64> = BTreeMap::new();
    for accepted in &history.accepted {
        let key = (accepted.agent, accepted.incarnation, accepted.replica);
        if let Some(&previous) = latest.get(&key)
            && accepted.epoch < previous
        {
            violations.push(format!(
                "agent {} (incarnation {}) accepted replica {} at epoch {} after epoch {}",
                accepted.agent, accepted.incarnation, accepted.replica, accepted.epoch, previous
            ));
        }
        let highest = latest.entry(key).or_insert(accepted.epoch);
        *highest = (*highest).max(accepted.epoch);
    }
    // Placements by (replica, epoch): every node the control plane gave it to.
    let mut placed: BTreeMap<(u64, u64), BTreeSet<u64>> = BTreeMap::new();
    for placement in history
        .placements
        .iter()
        .chain(&history.final_state.placements)
    {
        let Placement {
            replica,
            epoch,
            node,
        } = *placement;
        placed.entry((replica, epoch)).or_default().insert(node);
    }
    // The harness polls the state, so a replica placed and removed between two looks is
    // never seen: that is no evidence. A (replica, epoch) seen on another node is.
    let mut unobserved = 0usize;
    for accepted in &history.accepted {
        let Some(nodes) = placed.get(&(accepted.replica, accepted.epoch)) else {
            unobserved += 1;
            continue;
        };
        if nodes.contains(&accepted.agent) {
            continue;
        }
        let elsewhere: Vec<String> = nodes.iter().map(u64::to_string).collect();
        violations.push(format!(
            "agent {} (incarnation {}) accepted replica {} at epoch {}, placed on node {} instead",
            accepted.agent,
            accepted.incarnation,
            accepted.replica,
            accepted.epoch,
            elsewhere.join(", ")
        ));
    }
    if violations.is_empty() {
        Verdict::pass(
            NO_STALE_EPOCH_ACCEPTED,
            format!(
                "{} accepted assignments, epochs never decreasing, none placed on another \
                 node ({unobserved} placed and removed between the harness's looks)",
                history.accepted.len()
            ),
        )
    } else {
        Verdict::fail(
            NO_STALE_EPOCH_ACCEPTED,
            format!(
                "{} stale or foreign assignments accepted: {}",
                violations.len(),
                examples(&violations)
            ),
        )
    }
}

/// Every inference request got an answer: a success, or a clear error (an HTTP status in
/// 400..=599). A request without an answer, or one that could not be sent at all, is
/// excused only if a fault hit its gateway while it was in flight; otherwise it was lost.
pub fn every_request_answered(history: &History) -> Verdict {
    let (mut answered, mut excused) = (0usize, 0usize);
    let mut lost = Vec::new();
    let mut unclear = Vec::new();
    for operation in &history.operations {
        let OpKind::Infer { gateway, status } = operation.kind else {
            continue;
        };
        match &operation.outcome {
            Outcome::Ok => answered += 1,
            Outcome::Fail(message) => {
                // A request that could not even be sent (connection refused) is a clear
                // error only while a fault had its gateway down.
                let gateway_down = history
                    .nemesis
                    .iter()
                    .any(|event| event.hits(gateway, operation.invoked, operation.completed));
                if status.is_some_and(|status| (400..=599).contains(&status)) {
                    answered += 1;
                } else if status.is_none() && gateway_down {
                    excused += 1;
                } else {
                    let status = status.map_or("no status".to_owned(), |s| format!("status {s}"));
                    unclear.push(format!(
                        "{} failed with {status}: {message}",
                        describe(operation)
                    ));
                }
            }
            Outcome::Unknown(message) => {
                let hit = history
                    .nemesis
                    .iter()
                    .any(|event| event.hits(gateway, operation.invoked, operation.completed));
                if hit {
                    excused += 1;
                } else {
                    lost.push(format!("{} to {gateway:?}: {message}", describe(operation)));
                }
            }
        }
    }
    if lost.is_empty() && unclear.is_empty() {
        return Verdict::pass(
            EVERY_REQUEST_ANSWERED,
            format!(
                "{answered} requests answered, {excused} unanswered while a fault hit their \
                 gateway"
            ),
        );
    }
    let mut parts = Vec::new();
    if !lost.is_empty() {
        parts.push(format!(
            "{} requests lost (no answer from a gateway no fault hit): {}",
            lost.len(),
            examples(&lost)
        ));
    }
    if !unclear.is_empty() {
        parts.push(format!(
            "{} failures without an HTTP error status: {}",
            unclear.len(),
            examples(&unclear)
        ));
    }
    Verdict::fail(EVERY_REQUEST_ANSWERED, parts.join("; "))
}

/// The cluster converges after healing: some observation at or after the last heal, and
/// no later than `bound` after it, finds every deployment at its desired ready replicas,
/// and the last observation of all still does.
pub fn converges_after_healing(history: &History, bound: Micros) -> Verdict {
    let healed_at = history.healed_at;
    let deadline = healed_at.saturating_add(bound);
    let first_converged = history
        .convergence
        .iter()
        .filter(|observation| observation.converged && observation.at >= healed_at)
        .min_by_key(|observation| observation.at);
    let last = history
        .convergence
        .iter()
        .max_by_key(|observation| observation.at);
    let Some(last) = last else {
        return Verdict::fail(
            CONVERGES_AFTER_HEALING,
            "no convergence was observed at all".to_owned(),
        );
    };
    let bound_text = milliseconds(bound);
    match first_converged {
        Some(converged) if converged.at <= deadline => {
            let took = milliseconds(converged.at - healed_at);
            if last.converged {
                Verdict::pass(
                    CONVERGES_AFTER_HEALING,
                    format!("converged {took} after healing (bound {bound_text})"),
                )
            } else {
                Verdict::fail(
                    CONVERGES_AFTER_HEALING,
                    format!(
                        "converged {took} after healing, but the last observation, at {}, is \
                         not converged: {}",
                        seconds(last.at),
                        last.detail
                    ),
                )
            }
        }
        Some(converged) => Verdict::fail(
            CONVERGES_AFTER_HEALING,
            format!(
                "converged only {} after healing, beyond the bound of {bound_text}",
                milliseconds(converged.at - healed_at)
            ),
        ),
        None => {
            let last_not_converged = history
                .convergence
                .iter()
                .filter(|observation| !observation.converged)
                .max_by_key(|observation| observation.at);
            let detail = last_not_converged.map_or_else(
                || "no observation after healing".to_owned(),
                |observation| format!("at {}: {}", seconds(observation.at), observation.detail),
            );
            Verdict::fail(
                CONVERGES_AFTER_HEALING,
                format!("never converged within {bound_text} of healing; last: {detail}"),
            )
        }
    }
}

/// No process went down with no fault to blame: every exit was the nemesis' kill, and
/// every process it restarted listened again within the bound.
pub fn processes_stay_up(history: &History) -> Verdict {
    if history.unbidden_exits.is_empty() {
        let restarts = history
            .nemesis
            .iter()
            .filter(|event| {
                matches!(
                    event.kind,
                    FaultKind::KillLeader
                        | FaultKind::KillFollower
                        | FaultKind::KillAgent
                        | FaultKind::ClockSkew
                )
            })
            .count();
        return Verdict::pass(
            PROCESSES_STAY_UP,
            format!(
                "no process exited by itself; {restarts} killed or restarted by the nemesis \
                 all listened again"
            ),
        );
    }
    let exits: Vec<String> = history
        .unbidden_exits
        .iter()
        .map(|exit| format!("{:?} at {}: {}", exit.member, seconds(exit.at), exit.detail))
        .collect();
    Verdict::fail(
        PROCESSES_STAY_UP,
        format!(
            "{} processes went down with no fault to blame: {}",
            exits.len(),
            examples(&exits)
        ),
    )
}

/// "client 2 scale(iris, 3) at 1.250 s, ok".
fn describe(operation: &Operation) -> String {
    let what = match &operation.kind {
        OpKind::AliasWrite { value } => format!("alias_write({value})"),
        OpKind::AliasRead { value } => format!("alias_read -> {value:?}"),
        OpKind::RegisterVersion { model, version } => {
            format!("register_version({model}) -> {version:?}")
        }
        OpKind::Deploy {
            deployment,
            replicas,
        } => format!("deploy({deployment}, {replicas})"),
        OpKind::Scale {
            deployment,
            replicas,
        } => format!("scale({deployment}, {replicas})"),
        OpKind::Drain { node } => format!("drain({node})"),
        OpKind::Undrain { node } => format!("undrain({node})"),
        OpKind::Infer { status, .. } => format!("infer -> {status:?}"),
    };
    let outcome = match &operation.outcome {
        Outcome::Ok => "ok",
        Outcome::Fail(_) => "fail",
        Outcome::Unknown(_) => "unknown",
    };
    format!(
        "client {} {what} at {}, {outcome}",
        operation.client,
        seconds(operation.invoked)
    )
}

/// The first [`EXAMPLES_MAX`] items joined, and how many more there are.
fn examples(items: &[String]) -> String {
    let mut text = items
        .iter()
        .take(EXAMPLES_MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > EXAMPLES_MAX {
        text.push_str(&format!("; and {} more", items.len() - EXAMPLES_MAX));
    }
    text
}

fn seconds(at: Micros) -> String {
    format!("{:.3} s", at as f64 / 1e6)
}

fn milliseconds(span: Micros) -> String {
    format!("{:.1} ms", span as f64 / 1e3)
}

#[cfg(test)]
pub(crate) mod tests;
