//! Report tests: each figure computed from a small synthetic history, then the renderings.

use super::*;
use crate::checkers::tests::{SECOND, event, fail, ms, op, unknown, with_operations};
use crate::history::LeaderObservation;
use proptest::prelude::*;

fn leader(at_ms: u64, leader: Option<u64>, term: u64) -> LeaderObservation {
    LeaderObservation {
        at: ms(at_ms),
        leader,
        term,
    }
}

fn aimed_at_leader(kind: FaultKind, started_ms: u64, leader: u64) -> NemesisEvent {
    NemesisEvent {
        leader_before: Some(leader),
        ..event(
            kind,
            started_ms,
            Some(started_ms + 5_000),
            vec![Member::Server(leader)],
        )
    }
}

fn verdict(name: &str, passed: bool, detail: &str) -> Verdict {
    Verdict {
        name: name.into(),
        passed,
        detail: detail.into(),
    }
}

fn alias_write(invoked_ms: u64, completed_ms: u64, outcome: Outcome) -> Operation {
    op(
        OpKind::AliasWrite { value: 1 },
        invoked_ms,
        completed_ms,
        outcome,
    )
}

fn infer(invoked_ms: u64, outcome: Outcome) -> Operation {
    op(
        OpKind::Infer {
            gateway: Member::Server(1),
            status: None,
        },
        invoked_ms,
        invoked_ms + 10,
        outcome,
    )
}

#[test]
fn failover_is_measured_from_the_fault_to_a_new_leader() {
    let history = History {
        nemesis: vec![
            // Server 1 is killed; it still reports itself (stale) before server 3 wins.
            aimed_at_leader(FaultKind::KillLeader, 10_000, 1),
            // Server 3 is cut off and re-elected in a higher term.
            aimed_at_leader(FaultKind::PartitionIsolate, 20_000, 3),
            // Server 3 is killed and nobody is ever seen leading again.
            aimed_at_leader(FaultKind::KillLeader, 30_000, 3),
            // Neither kind of fault nor aimed at the leader: not failovers.
            aimed_at_leader(FaultKind::KillFollower, 40_000, 2),
            NemesisEvent {
                leader_before: Some(3),
                ..event(
                    FaultKind::KillLeader,
                    50_000,
                    Some(51_000),
                    vec![Member::Server(2)],
                )
            },
        ],
        leaders: vec![
            leader(5_000, Some(1), 2),
            leader(10_500, Some(1), 2),
            leader(11_000, None, 3),
            leader(12_000, Some(3), 3),
            leader(21_000, Some(3), 3),
            leader(21_500, Some(3), 4),
            leader(30_100, Some(3), 4),
            leader(30_200, None, 5),
        ],
        ..History::default()
    };
    let report = build(&history, &[]);
    assert_eq!(
        report.failover,
        Failover {
            measured: 2,
            unresolved: 1,
            kept: 0,
            p50_ms: Some(1_500.0),
            p99_ms: Some(2_000.0),
            max_ms: Some(2_000.0),
        }
    );
}

#[test]
fn the_old_leader_in_its_old_term_does_not_resolve_a_failover() {
    // A stale lower-term report just before the fault must not make the old leader's
    // own term look new.
    let history = History {
        nemesis: vec![aimed_at_leader(FaultKind::PartitionIsolate, 10_000, 1)],
        leaders: vec![
            leader(9_000, Some(1), 7),
            leader(9_900, Some(1), 6),
            leader(11_000, Some(1), 7),
        ],
        ..History::default()
    };
    let failover = build(&history, &[]).failover;
    assert_eq!(
        (failover.measured, failover.unresolved, failover.kept),
        (0, 0, 1)
    );
    assert_eq!(failover.p50_ms, None);
}

#[test]
fn an_isolation_shorter_than_an_election_keeps_the_leader_and_is_not_a_failover() {
    // Isolated 10-15 s; the next leader change, long after, has other causes.
    let history = History {
        nemesis: vec![aimed_at_leader(FaultKind::PartitionIsolate, 10_000, 1)],
        leaders: vec![leader(9_000, Some(1), 7), leader(40_000, Some(2), 8)],
        ..History::default()
    };
    let failover = build(&history, &[]).failover;
    assert_eq!((failover.measured, failover.kept), (0, 1));
}

#[test]
fn operations_and_faults_are_counted_by_kind() {
    let mut history = with_operations(vec![
        alias_write(0, 10, Outcome::Ok),
        alias_write(20, 30, fail()),
        alias_write(40, 50, unknown()),
        infer(60, Outcome::Ok),
    ]);
    history.nemesis = vec![
        event(FaultKind::Pause, 0, Some(10), vec![]),
        event(FaultKind::Pause, 20, Some(30), vec![]),
        event(FaultKind::DiskFull, 40, None, vec![]),
    ];
    history.seed = 42;
    history.duration = 90 * SECOND;
    let report = build(&history, &[]);
    assert_eq!(report.seed, 42);
    assert_eq!(report.duration_s, 90.0);
    assert_eq!(report.nemesis_events, 3);
    assert_eq!(
        report.nemesis_events_by_kind,
        BTreeMap::from([("disk_full".to_owned(), 1), ("pause".to_owned(), 2)])
    );
    let counts = |ok, fail, unknown| OutcomeCounts { ok, fail, unknown };
    assert_eq!(
        report.operations_by_kind,
        BTreeMap::from([
            ("alias_write".to_owned(), counts(1, 1, 1)),
            ("infer".to_owned(), counts(1, 0, 0)),
        ])
    );
    assert_eq!(report.operations, counts(2, 1, 1));
    assert_eq!(report.operations.total(), 4);
}

#[test]
fn a_report_passes_only_when_every_verdict_passed() {
    let history = History::default();
    let passing = [verdict("a", true, ""), verdict("b", true, "")];
    assert!(build(&history, &passing).passed);
    let failing = [verdict("a", true, ""), verdict("b", false, "")];
    assert!(!build(&history, &failing).passed);
    assert!(!build(&history, &[]).passed);
}

#[test]
fn unavailability_counts_writes_during_faults_and_their_longest_gaps() {
    let mut history = with_operations(vec![
        alias_write(0, 1_000, Outcome::Ok),
        alias_write(1_500, 2_000, Outcome::Ok),
        // Fault from 3 s to 6 s: three writes invoked, one acknowledged at 7 s.
        alias_write(3_500, 4_500, unknown()),
        alias_write(4_000, 4_100, fail()),
        alias_write(5_000, 7_000, Outcome::Ok),
        // Reads and inference are not control-plane writes.
        op(OpKind::AliasRead { value: Some(1) }, 4_000, 4_010, fail()),
        infer(4_000, fail()),
        alias_write(7_500, 8_000, Outcome::Ok),
        // Fault from 10 s to 11 s with acknowledged writes at 10.2 s and 12 s.
        alias_write(10_100, 10_200, Outcome::Ok),
        alias_write(11_500, 12_000, Outcome::Ok),
    ]);
    history.nemesis = vec![
        event(FaultKind::KillLeader, 3_000, Some(6_000), vec![]),
        event(FaultKind::KillLeader, 10_000, Some(11_000), vec![]),
        event(FaultKind::ProxyDelay, 20_000, Some(21_000), vec![]),
    ];
    let report = build(&history, &[]);
    let kill = &report.unavailability_by_fault["kill_leader"];
    assert_eq!((kill.events, kill.ops, kill.not_ok), (2, 4, 2));
    assert_eq!(kill.not_ok_ratio, Some(0.5));
    // 2 s..7 s around the first, and 8 s..10.2 s, which reaches into the second.
    assert_eq!(kill.longest_write_gap_ms, 5_000.0 + 2_200.0);
    // No write ever came after the last acknowledged one: the gap runs to the end.
    let delay = &report.unavailability_by_fault["proxy_delay"];
    assert_eq!((delay.events, delay.ops, delay.not_ok_ratio), (1, 0, None));
    assert_eq!(delay.longest_write_gap_ms, 21_000.0 - 12_000.0);
    assert_eq!(report.unavailability_by_fault.len(), 2);
}

#[test]
fn inference_errors_are_split_between_faults_and_baseline() {
    let mut history = with_operations(vec![
        infer(0, Outcome::Ok),
        infer(1_000, fail()),
        infer(2_000, Outcome::Ok),
        infer(2_500, unknown()),
        infer(3_000, Outcome::Ok),
        infer(9_000, Outcome::Ok),
    ]);
    history.nemesis = vec![event(FaultKind::ProxyLoss, 2_000, Some(3_000), vec![])];
    let errors = build(&history, &[]).inference_errors;
    assert_eq!(
        errors.during_faults,
        ErrorRatio {
            requests: 3,
            not_ok: 1,
            ratio: Some(1.0 / 3.0)
        }
    );
    assert_eq!(
        errors.baseline,
        ErrorRatio {
            requests: 3,
            not_ok: 1,
            ratio: Some(1.0 / 3.0)
        }
    );
    let quiet = build(&History::default(), &[]).inference_errors;
    assert_eq!(quiet.baseline.ratio, None);
}

fn sample_report() -> Report {
    let mut history = with_operations(vec![
        alias_write(0, 1_000, Outcome::Ok),
        alias_write(1_500, 2_000, fail()),
        infer(4_000, Outcome::Ok),
    ]);
    history.seed = 7;
    history.duration = 60 * SECOND;
    history.nemesis = vec![aimed_at_leader(FaultKind::KillLeader, 1_200, 1)];
    history.leaders = vec![leader(0, Some(1), 1), leader(2_200, Some(2), 2)];
    let long = "x".repeat(300);
    build(
        &history,
        &[
            verdict(
                "linearizable_aliases",
                true,
                "12 operations are linearizable",
            ),
            verdict("acknowledged_writes_survive", false, &long),
        ],
    )
}

#[test]
fn the_text_shows_every_verdict_with_pass_or_fail() {
    let text = text(&sample_report());
    assert!(text.starts_with("shoal-chaos seed 7: 60.0 s of faults, FAILED (1 of 2"));
    let line_of = |name: &str| {
        text.lines()
            .find(|line| line.contains(name))
            .unwrap_or_else(|| panic!("no line for {name} in\n{text}"))
    };
    assert!(line_of("linearizable_aliases").starts_with("PASS"));
    let failed = line_of("acknowledged_writes_survive");
    assert!(failed.starts_with("FAIL"));
    assert!(failed.ends_with("x..."), "{failed}");
    assert!(failed.len() < 160, "the detail is cut: {failed}");
    assert!(
        text.contains(&format!(
            "acknowledged_writes_survive failed: {}\n",
            "x".repeat(300)
        )),
        "a failure is spelled out whole: {text}"
    );
    assert!(text.contains("leader failover: p50 1000.0 ms"), "{text}");
    assert!(text.contains("kill_leader"), "{text}");
    assert!(text.contains("during faults"), "{text}");
}

#[test]
fn the_text_tables_have_aligned_columns() {
    let text = text(&sample_report());
    // The operations table: right-aligned counts end in the same column.
    let table: Vec<&str> = text
        .lines()
        .skip_while(|line| !line.starts_with("operation"))
        .take_while(|line| !line.is_empty())
        .collect();
    assert_eq!(table.len(), 4, "{text}");
    assert!(
        table.iter().all(|line| line.len() == table[0].len()),
        "{text}"
    );
}

#[test]
fn the_json_reads_back_as_the_same_report() {
    let report = sample_report();
    let json = json(&report);
    assert!(json.contains("\"acknowledged_writes_survive\""));
    let back: Report = serde_json::from_str(&json).expect("the report parses back");
    assert_eq!(back, report);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever the failover times, p50 <= p99 <= max, and max is the slowest one.
    #[test]
    fn failover_percentiles_are_monotone(
        delays_ms in prop::collection::vec(0u64..60_000, 1..50),
    ) {
        let mut history = History::default();
        for (index, delay_ms) in (0u64..).zip(&delays_ms) {
            let started_ms = index * 100_000;
            history.nemesis.push(aimed_at_leader(FaultKind::KillLeader, started_ms, 1));
            history.leaders.push(leader(started_ms + delay_ms, Some(2), 2 * index + 1));
            // Server 1 leads again (re-elected) before the next fault.
            history.leaders.push(leader(started_ms + 90_000, Some(1), 2 * index + 2));
        }
        let failover = build(&history, &[]).failover;
        prop_assert_eq!(failover.measured, delays_ms.len());
        let (p50, p99, max) = (failover.p50_ms, failover.p99_ms, failover.max_ms);
        prop_assert!(p50.is_some() && p50 <= p99 && p99 <= max, "{:?}", failover);
        let slowest = delays_ms.iter().max().map(|&delay| delay as f64);
        prop_assert_eq!(max, slowest);
    }
}
