//! Checker tests: for each checker a history that passes and one with a planted violation
//! that fails, then properties over generated histories. The history builders are shared
//! with the report's tests.

use super::*;
use crate::history::{
    AcceptedAssignment, ConvergenceObservation, DeviceObservation, FaultKind, Member, NemesisEvent,
    UnbiddenExit,
};
use proptest::prelude::*;

pub(crate) const SECOND: Micros = 1_000_000;
const CONVERGENCE_BOUND: Micros = 30 * SECOND;

/// Milliseconds as `Micros`.
pub(crate) fn ms(value: u64) -> Micros {
    value * 1_000
}

pub(crate) fn op(kind: OpKind, invoked_ms: u64, completed_ms: u64, outcome: Outcome) -> Operation {
    Operation {
        client: 0,
        kind,
        invoked: ms(invoked_ms),
        completed: ms(completed_ms),
        outcome,
    }
}

pub(crate) fn fail() -> Outcome {
    Outcome::Fail("503 no leader".into())
}

pub(crate) fn unknown() -> Outcome {
    Outcome::Unknown("timed out".into())
}

pub(crate) fn with_operations(operations: Vec<Operation>) -> History {
    History {
        operations,
        ..History::default()
    }
}

pub(crate) fn event(
    kind: FaultKind,
    started_ms: u64,
    healed_ms: Option<u64>,
    targets: Vec<Member>,
) -> NemesisEvent {
    let detail = format!("{} {targets:?}", kind.name());
    NemesisEvent {
        kind,
        started: ms(started_ms),
        healed: healed_ms.map(ms),
        targets,
        leader_before: None,
        detail,
    }
}

fn write(value: u32) -> OpKind {
    OpKind::AliasWrite { value }
}

fn read(value: u32) -> OpKind {
    OpKind::AliasRead { value: Some(value) }
}

fn register(model: &str, version: Option<u32>) -> OpKind {
    OpKind::RegisterVersion {
        model: model.into(),
        version,
    }
}

fn deploy(deployment: &str, replicas: u32) -> OpKind {
    OpKind::Deploy {
        deployment: deployment.into(),
        replicas,
    }
}

fn scale(deployment: &str, replicas: u32) -> OpKind {
    OpKind::Scale {
        deployment: deployment.into(),
        replicas,
    }
}

fn infer(gateway: Member, status: Option<u16>) -> OpKind {
    OpKind::Infer { gateway, status }
}

fn assert_passes(verdict: &Verdict) {
    assert!(
        verdict.passed,
        "{} failed: {}",
        verdict.name, verdict.detail
    );
}

fn assert_fails(verdict: &Verdict) {
    assert!(
        !verdict.passed,
        "{} passed: {}",
        verdict.name, verdict.detail
    );
}

// Linearizable aliases.

#[test]
fn sequential_alias_writes_and_reads_are_linearizable() {
    let history = with_operations(vec![
        op(read(0), 0, 5, Outcome::Ok),
        op(write(1), 10, 20, Outcome::Ok),
        op(read(1), 30, 40, Outcome::Ok),
        op(write(2), 50, 60, Outcome::Ok),
        op(read(2), 70, 80, Outcome::Ok),
    ]);
    let verdict = linearizable_aliases(&history);
    assert_passes(&verdict);
    assert_eq!(verdict.name, LINEARIZABLE_ALIASES);
}

#[test]
fn a_read_of_a_value_never_written_is_not_linearizable() {
    let history = with_operations(vec![
        op(write(1), 0, 10, Outcome::Ok),
        op(read(7), 20, 30, Outcome::Ok),
    ]);
    let verdict = linearizable_aliases(&history);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("7 by client 0"),
        "{}",
        verdict.detail
    );
}

#[test]
fn a_stale_alias_read_after_an_acknowledged_write_is_not_linearizable() {
    let history = with_operations(vec![
        op(write(1), 0, 10, Outcome::Ok),
        op(write(2), 20, 30, Outcome::Ok),
        op(read(1), 40, 50, Outcome::Ok),
    ]);
    assert_fails(&linearizable_aliases(&history));
}

#[test]
fn an_unanswered_alias_write_may_take_effect_late_or_never() {
    let late = with_operations(vec![
        op(write(1), 0, 10, Outcome::Ok),
        op(write(2), 20, 30, unknown()),
        op(read(1), 40, 50, Outcome::Ok),
        op(read(2), 60, 70, Outcome::Ok),
    ]);
    assert_passes(&linearizable_aliases(&late));
    let never = with_operations(vec![
        op(write(1), 0, 10, Outcome::Ok),
        op(write(2), 20, 30, unknown()),
        op(read(1), 40, 50, Outcome::Ok),
    ]);
    assert_passes(&linearizable_aliases(&never));
}

#[test]
fn a_refused_alias_write_must_not_be_read() {
    let history = with_operations(vec![
        op(write(1), 0, 10, Outcome::Ok),
        op(write(2), 20, 30, fail()),
        op(read(2), 40, 50, Outcome::Ok),
    ]);
    assert_fails(&linearizable_aliases(&history));
}

#[test]
fn unanswered_and_refused_reads_tell_nothing() {
    let history = with_operations(vec![
        op(write(1), 0, 10, Outcome::Ok),
        op(OpKind::AliasRead { value: Some(9) }, 20, 30, unknown()),
        op(OpKind::AliasRead { value: None }, 40, 50, fail()),
        op(read(1), 60, 70, Outcome::Ok),
    ]);
    assert_passes(&linearizable_aliases(&history));
}

#[test]
fn an_acknowledged_read_without_a_value_reads_the_alias_unset() {
    let unset = with_operations(vec![op(
        OpKind::AliasRead { value: None },
        0,
        10,
        Outcome::Ok,
    )]);
    assert_passes(&linearizable_aliases(&unset));
    let after_write = with_operations(vec![
        op(write(1), 0, 10, Outcome::Ok),
        op(OpKind::AliasRead { value: None }, 20, 30, Outcome::Ok),
    ]);
    assert_fails(&linearizable_aliases(&after_write));
}

// Acknowledged writes survive.

fn durable_history() -> History {
    let mut history = with_operations(vec![
        op(register("iris", Some(1)), 0, 10, Outcome::Ok),
        op(register("iris", None), 20, 30, unknown()),
        op(deploy("iris", 1), 40, 50, Outcome::Ok),
        op(scale("iris", 2), 60, 70, Outcome::Ok),
        op(OpKind::Drain { node: 2 }, 80, 90, Outcome::Ok),
        op(OpKind::Drain { node: 3 }, 80, 90, Outcome::Ok),
        op(OpKind::Undrain { node: 3 }, 100, 110, Outcome::Ok),
    ]);
    history
        .final_state
        .versions
        .insert("iris".into(), [1].into());
    history.final_state.deployments.insert("iris".into(), 2);
    history.final_state.draining.insert(2);
    history
}

#[test]
fn acknowledged_writes_present_after_healing_pass_durability() {
    assert_passes(&acknowledged_writes_survive(&durable_history()));
}

#[test]
fn a_version_acknowledged_but_missing_after_healing_fails_durability() {
    let mut history = durable_history();
    history
        .final_state
        .versions
        .insert("iris".into(), [2].into());
    let verdict = acknowledged_writes_survive(&history);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("version 1 of iris"),
        "{}",
        verdict.detail
    );
}

#[test]
fn a_deployment_acknowledged_but_missing_after_healing_fails_durability() {
    let mut history = durable_history();
    history.final_state.deployments.clear();
    let verdict = acknowledged_writes_survive(&history);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("deployment iris"),
        "{}",
        verdict.detail
    );
}

#[test]
fn a_replica_count_rolled_back_to_an_overwritten_value_fails_durability() {
    let mut history = durable_history();
    history.final_state.deployments.insert("iris".into(), 1);
    let verdict = acknowledged_writes_survive(&history);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("wants 1 replicas"),
        "{}",
        verdict.detail
    );
}

#[test]
fn concurrent_acknowledged_scales_may_leave_either_value() {
    for final_replicas in [2, 3] {
        let mut history = with_operations(vec![
            op(deploy("iris", 1), 0, 10, Outcome::Ok),
            op(scale("iris", 2), 20, 50, Outcome::Ok),
            op(scale("iris", 3), 30, 40, Outcome::Ok),
        ]);
        history
            .final_state
            .deployments
            .insert("iris".into(), final_replicas);
        assert_passes(&acknowledged_writes_survive(&history));
    }
}

#[test]
fn an_unanswered_scale_may_or_may_not_be_the_final_value() {
    // The unanswered scale gave up before the acknowledged one was invoked, and still may
    // have taken effect after it: a paused server can propose it late.
    let operations = vec![
        op(deploy("iris", 1), 0, 10, Outcome::Ok),
        op(scale("iris", 5), 20, 30, unknown()),
        op(scale("iris", 2), 40, 50, Outcome::Ok),
    ];
    for (final_replicas, possible) in [(2, true), (5, true), (1, false), (7, false)] {
        let mut history = with_operations(operations.clone());
        history
            .final_state
            .deployments
            .insert("iris".into(), final_replicas);
        let verdict = acknowledged_writes_survive(&history);
        assert_eq!(
            verdict.passed, possible,
            "{final_replicas}: {}",
            verdict.detail
        );
    }
}

#[test]
fn a_refused_scale_must_not_take_effect() {
    let mut history = with_operations(vec![
        op(deploy("iris", 1), 0, 10, Outcome::Ok),
        op(scale("iris", 5), 20, 30, fail()),
    ]);
    history.final_state.deployments.insert("iris".into(), 5);
    assert_fails(&acknowledged_writes_survive(&history));
}

#[test]
fn an_acknowledged_scale_proves_the_deployment_exists() {
    let history = with_operations(vec![
        op(deploy("iris", 1), 0, 10, unknown()),
        op(scale("iris", 2), 20, 30, Outcome::Ok),
    ]);
    assert_fails(&acknowledged_writes_survive(&history));
}

#[test]
fn a_drain_acknowledged_but_lost_fails_durability() {
    let mut history = durable_history();
    history.final_state.draining.remove(&2);
    let verdict = acknowledged_writes_survive(&history);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("node 2 is not draining"),
        "{}",
        verdict.detail
    );
}

#[test]
fn an_undrain_acknowledged_but_lost_fails_durability() {
    let mut history = durable_history();
    history.final_state.draining.insert(3);
    let verdict = acknowledged_writes_survive(&history);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("node 3 is draining"),
        "{}",
        verdict.detail
    );
}

#[test]
fn a_later_unanswered_undrain_excuses_a_node_no_longer_draining() {
    let mut history = durable_history();
    history
        .operations
        .push(op(OpKind::Undrain { node: 2 }, 120, 130, unknown()));
    history.final_state.draining.remove(&2);
    assert_passes(&acknowledged_writes_survive(&history));
}

// No device overcommitted.

fn device(source: &str, node: u64, at_ms: u64, reserved_bytes: u64) -> DeviceObservation {
    DeviceObservation {
        at: ms(at_ms),
        source: source.into(),
        node,
        device: 0,
        reserved_bytes,
        capacity_bytes: 1_000,
    }
}

#[test]
fn reservations_within_capacity_pass_the_overcommit_checker() {
    let history = History {
        devices: vec![
            device("agent 1", 1, 0, 0),
            device("state@server 1", 1, 10, 1_000),
        ],
        ..History::default()
    };
    assert_passes(&no_device_overcommitted(&history));
}

#[test]
fn a_reservation_beyond_capacity_fails_the_overcommit_checker() {
    let history = History {
        devices: vec![
            device("agent 1", 1, 0, 1_100),
            device("state@server 2", 3, 2_500, 1_700),
            device("agent 3", 3, 3_000, 900),
        ],
        ..History::default()
    };
    let verdict = no_device_overcommitted(&history);
    assert_fails(&verdict);
    assert!(verdict.detail.starts_with("2 of 3"), "{}", verdict.detail);
    assert!(
        verdict
            .detail
            .contains("state@server 2 saw node 3 device 0 at 2.500 s reserve 1700"),
        "{}",
        verdict.detail
    );
}

// No stale epoch accepted.

fn accepted(agent: u64, incarnation: u32, replica: u64, epoch: u64) -> AcceptedAssignment {
    AcceptedAssignment {
        agent,
        incarnation,
        replica,
        epoch,
    }
}

fn placed(replica: u64, epoch: u64, node: u64) -> Placement {
    Placement {
        replica,
        epoch,
        node,
    }
}

fn placed_history() -> History {
    History {
        accepted: vec![
            accepted(1, 0, 10, 1),
            accepted(1, 0, 10, 3),
            accepted(2, 0, 11, 1),
        ],
        placements: [placed(10, 1, 1), placed(10, 3, 1), placed(11, 1, 2)].into(),
        ..History::default()
    }
}

#[test]
fn assignments_placed_on_their_agent_with_rising_epochs_pass() {
    assert_passes(&no_stale_epoch_accepted(&placed_history()));
}

#[test]
fn an_epoch_going_backwards_on_one_agent_is_caught() {
    let mut history = placed_history();
    history.accepted.push(accepted(1, 0, 10, 1));
    let verdict = no_stale_epoch_accepted(&history);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("at epoch 1 after epoch 3"),
        "{}",
        verdict.detail
    );
}

#[test]
fn a_restarted_agent_starts_its_epochs_afresh() {
    let mut history = placed_history();
    history.accepted.push(accepted(1, 1, 10, 1));
    assert_passes(&no_stale_epoch_accepted(&history));
}

#[test]
fn an_assignment_placed_on_another_node_is_caught() {
    let mut history = placed_history();
    history.accepted.push(accepted(3, 0, 11, 1));
    let verdict = no_stale_epoch_accepted(&history);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("placed on node 2 instead"),
        "{}",
        verdict.detail
    );
}

#[test]
fn an_assignment_the_harness_never_saw_placed_is_no_evidence() {
    let mut history = placed_history();
    history.accepted.push(accepted(2, 0, 11, 9));
    let verdict = no_stale_epoch_accepted(&history);
    assert_passes(&verdict);
    assert!(
        verdict.detail.contains("1 placed and removed"),
        "{}",
        verdict.detail
    );
}

#[test]
fn a_placement_only_in_the_final_state_counts() {
    let mut history = placed_history();
    history.accepted.push(accepted(2, 0, 11, 2));
    history.final_state.placements.insert(placed(11, 2, 2));
    assert_passes(&no_stale_epoch_accepted(&history));
}

// Every request answered.

const GATEWAY: Member = Member::Server(1);

#[test]
fn successes_and_clear_errors_are_answers() {
    let history = with_operations(vec![
        op(infer(GATEWAY, Some(200)), 0, 10, Outcome::Ok),
        op(infer(GATEWAY, Some(503)), 20, 30, fail()),
        op(infer(GATEWAY, Some(429)), 40, 50, fail()),
    ]);
    assert_passes(&every_request_answered(&history));
}

#[test]
fn an_unanswered_request_to_a_healthy_gateway_is_lost() {
    let mut history = with_operations(vec![
        op(infer(GATEWAY, Some(200)), 0, 10, Outcome::Ok),
        op(infer(GATEWAY, None), 20, 5_020, unknown()),
    ]);
    // A fault that hit another process, and one that hit the gateway only later.
    history.nemesis = vec![
        event(
            FaultKind::KillAgent,
            0,
            Some(10_000),
            vec![Member::Agent(1)],
        ),
        event(FaultKind::Pause, 6_000, Some(7_000), vec![GATEWAY]),
    ];
    let verdict = every_request_answered(&history);
    assert_fails(&verdict);
    assert!(
        verdict.detail.starts_with("1 requests lost"),
        "{}",
        verdict.detail
    );
}

#[test]
fn an_unknown_request_to_a_killed_gateway_is_not_lost() {
    let mut history = with_operations(vec![op(infer(GATEWAY, None), 20, 5_020, unknown())]);
    history.nemesis = vec![event(
        FaultKind::KillLeader,
        3_000,
        Some(9_000),
        vec![GATEWAY],
    )];
    assert_passes(&every_request_answered(&history));
    // A fault never healed still covers the rest of the run.
    history.nemesis = vec![event(FaultKind::Pause, 3_000, None, vec![GATEWAY])];
    assert_passes(&every_request_answered(&history));
}

#[test]
fn a_failure_without_an_error_status_is_not_an_answer() {
    for status in [None, Some(200), Some(302)] {
        let history = with_operations(vec![op(infer(GATEWAY, status), 0, 10, fail())]);
        let verdict = every_request_answered(&history);
        assert_fails(&verdict);
        assert!(
            verdict.detail.contains("without an HTTP error status"),
            "{}",
            verdict.detail
        );
    }
}

#[test]
fn a_request_not_sent_while_its_gateway_was_down_is_excused() {
    let mut history = with_operations(vec![op(infer(GATEWAY, None), 20, 30, fail())]);
    assert_fails(&every_request_answered(&history));
    history.nemesis = vec![event(FaultKind::KillFollower, 0, Some(25), vec![GATEWAY])];
    assert_passes(&every_request_answered(&history));
}

// Converges after healing.

fn observed(at_ms: u64, converged: bool) -> ConvergenceObservation {
    ConvergenceObservation {
        at: ms(at_ms),
        converged,
        detail: if converged {
            String::new()
        } else {
            "iris: 1 of 2 ready".into()
        },
    }
}

fn healed_at_10_s(convergence: Vec<ConvergenceObservation>) -> History {
    History {
        healed_at: 10 * SECOND,
        convergence,
        ..History::default()
    }
}

#[test]
fn a_cluster_converging_within_the_bound_passes() {
    let history = healed_at_10_s(vec![
        observed(9_000, true),
        observed(11_000, false),
        observed(14_500, true),
        observed(20_000, true),
    ]);
    let verdict = converges_after_healing(&history, CONVERGENCE_BOUND);
    assert_passes(&verdict);
    assert!(
        verdict.detail.contains("converged 4500.0 ms after healing"),
        "{}",
        verdict.detail
    );
}

#[test]
fn a_cluster_that_never_converges_fails() {
    let history = healed_at_10_s(vec![
        observed(9_000, true),
        observed(11_000, false),
        observed(50_000, false),
    ]);
    let verdict = converges_after_healing(&history, CONVERGENCE_BOUND);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("iris: 1 of 2 ready"),
        "{}",
        verdict.detail
    );
    assert_fails(&converges_after_healing(
        &healed_at_10_s(vec![]),
        CONVERGENCE_BOUND,
    ));
}

#[test]
fn converging_after_the_bound_fails() {
    let history = healed_at_10_s(vec![observed(11_000, false), observed(41_000, true)]);
    let verdict = converges_after_healing(&history, CONVERGENCE_BOUND);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("beyond the bound"),
        "{}",
        verdict.detail
    );
}

#[test]
fn falling_out_of_convergence_at_the_end_fails() {
    let history = healed_at_10_s(vec![observed(12_000, true), observed(30_000, false)]);
    let verdict = converges_after_healing(&history, CONVERGENCE_BOUND);
    assert_fails(&verdict);
    assert!(
        verdict.detail.contains("the last observation"),
        "{}",
        verdict.detail
    );
}

// processes_stay_up

#[test]
fn processes_the_nemesis_killed_and_restarted_pass() {
    let history = History {
        nemesis: vec![
            event(
                FaultKind::KillLeader,
                100,
                Some(900),
                vec![Member::Server(1)],
            ),
            event(
                FaultKind::ClockSkew,
                1_000,
                Some(2_000),
                vec![Member::Server(2)],
            ),
        ],
        ..History::default()
    };
    let verdict = processes_stay_up(&history);
    assert_passes(&verdict);
    assert!(
        verdict.detail.contains("2 killed or restarted"),
        "{}",
        verdict.detail
    );
}

#[test]
fn a_process_that_exits_by_itself_fails_naming_it_and_how_it_ended() {
    let history = History {
        unbidden_exits: vec![UnbiddenExit {
            at: ms(91_200),
            member: Member::Server(3),
            detail: "exit status: 101; its log ends: panicked at raw_node.rs".into(),
        }],
        ..History::default()
    };
    let verdict = processes_stay_up(&history);
    assert_fails(&verdict);
    for part in ["Server(3)", "91.200 s", "exit status: 101", "panicked"] {
        assert!(verdict.detail.contains(part), "{part}: {}", verdict.detail);
    }
}

// All checkers.

#[test]
fn every_checker_gives_one_verdict_and_a_clean_history_passes_them_all() {
    let mut history = durable_history();
    history.healed_at = 10 * SECOND;
    history.convergence = vec![observed(12_000, true)];
    let verdicts = all(&history, CONVERGENCE_BOUND);
    let names: Vec<&str> = verdicts
        .iter()
        .map(|verdict| verdict.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            LINEARIZABLE_ALIASES,
            ACKNOWLEDGED_WRITES_SURVIVE,
            NO_DEVICE_OVERCOMMITTED,
            NO_STALE_EPOCH_ACCEPTED,
            EVERY_REQUEST_ANSWERED,
            CONVERGES_AFTER_HEALING,
            PROCESSES_STAY_UP,
        ]
    );
    verdicts.iter().for_each(assert_passes);
}

#[test]
fn a_failed_verdict_spells_out_only_the_first_few_violations() {
    let history = History {
        devices: (0..20).map(|at| device("agent 1", 1, at, 2_000)).collect(),
        ..History::default()
    };
    let verdict = no_device_overcommitted(&history);
    assert_fails(&verdict);
    let lost: Vec<Operation> = (0..20)
        .map(|at| op(infer(GATEWAY, None), at * 100, at * 100 + 50, unknown()))
        .collect();
    let verdict = every_request_answered(&with_operations(lost));
    assert!(verdict.detail.contains("and 15 more"), "{}", verdict.detail);
}

// Properties.

/// One step of a single client against the alias: a write that is acknowledged, a write
/// without an answer that did or did not take effect, or a read.
#[derive(Clone, Debug)]
enum Step {
    Write { value: u32, outcome: u8 },
    Read,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u32..5, 0u8..3).prop_map(|(value, outcome)| Step::Write { value, outcome }),
        Just(Step::Read),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Sequential operations whose reads return what a model register holds are always
    /// linearizable, whatever unanswered writes did or did not do.
    #[test]
    fn a_sequential_history_of_a_model_register_is_linearizable(
        steps in prop::collection::vec(step(), 0..40),
    ) {
        let mut register = 0;
        let mut operations = Vec::new();
        for (index, step) in (0u64..).zip(&steps) {
            let (invoked_ms, completed_ms) = (index * 10, index * 10 + 5);
            match *step {
                Step::Write { value, outcome } => {
                    // 0: acknowledged; 1: no answer, took effect; 2: no answer, did not.
                    if outcome < 2 {
                        register = value;
                    }
                    let outcome = if outcome == 0 { Outcome::Ok } else { unknown() };
                    operations.push(op(write(value), invoked_ms, completed_ms, outcome));
                }
                Step::Read => operations.push(op(read(register), invoked_ms, completed_ms, Outcome::Ok)),
            }
        }
        let verdict = linearizable_aliases(&with_operations(operations));
        prop_assert!(verdict.passed, "{}", verdict.detail);
    }

    /// Sequential acknowledged scales leave the last one; any other final value is lost
    /// writes.
    #[test]
    fn sequential_acknowledged_scales_leave_exactly_the_last_value(
        values in prop::collection::vec(1u32..6, 1..20),
        final_replicas in 1u32..6,
    ) {
        let operations: Vec<Operation> = (0u64..)
            .zip(&values)
            .map(|(index, &replicas)| op(scale("iris", replicas), index * 10, index * 10 + 5, Outcome::Ok))
            .collect();
        let mut history = with_operations(operations);
        history.final_state.deployments.insert("iris".into(), final_replicas);
        let verdict = acknowledged_writes_survive(&history);
        let last = values.last().copied();
        prop_assert_eq!(verdict.passed, last == Some(final_replicas), "{}", verdict.detail);
    }
}
