//! The summary a chaos run writes: verdicts, what the nemesis did, how operations ended,
//! leader failover times, write unavailability per fault type and inference error ratios,
//! as a serde [`Report`] with a JSON and a plain-text rendering. Pure: building and
//! rendering return values; the caller writes them.

use crate::checkers::Verdict;
use crate::history::{
    FaultKind, History, Member, Micros, NemesisEvent, OpKind, Operation, Outcome,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How many characters of a verdict's detail the text table shows.
const DETAIL_CHARS_MAX: usize = 100;

/// How operations of one kind (or all) ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeCounts {
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
}

impl OutcomeCounts {
    pub fn total(&self) -> usize {
        self.ok + self.fail + self.unknown
    }

    fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Fail(_) => self.fail += 1,
            Outcome::Unknown(_) => self.unknown += 1,
        }
    }
}

/// How long the cluster took to elect a new leader after the leader was killed or cut
/// off: from the fault's start to the first observation of another leader, or of the same
/// one in a higher term.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    /// Faults aimed at the leader after which a new leader was observed.
    pub measured: usize,
    /// Leader kills after which no new leader was ever observed.
    pub unresolved: usize,
    /// Isolations of the leader too short to cost it the lead: no new leader by
    /// [`KEPT_SLACK`] after healing. Not failovers, so not measured.
    pub kept: usize,
    /// Nearest-rank percentiles of the measured times; `None` when none was measured.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Control-plane write availability while faults of one kind were active.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Unavailability {
    /// Faults of this kind.
    pub events: usize,
    /// Control-plane writes invoked while one of them was active (started..=healed).
    pub ops: usize,
    /// Of those, the ones not acknowledged (refused or unanswered).
    pub not_ok: usize,
    /// `not_ok / ops`; `None` when no write was invoked.
    pub not_ok_ratio: Option<f64>,
    /// Summed over the faults: the longest stretch without an acknowledged write around
    /// each fault, from the last acknowledged write completed before or during it to the
    /// next one completed (or the end of the run).
    pub longest_write_gap_ms: f64,
}

/// How many inference requests of a group were not answered with success.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorRatio {
    pub requests: usize,
    pub not_ok: usize,
    /// `not_ok / requests`; `None` when there were no requests.
    pub ratio: Option<f64>,
}

impl ErrorRatio {
    fn add(&mut self, outcome: &Outcome) {
        self.requests += 1;
        if *outcome != Outcome::Ok {
            self.not_ok += 1;
        }
        self.ratio = Some(self.not_ok as f64 / self.requests as f64);
    }
}

/// Inference errors for requests invoked while some fault was active, and for the rest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InferenceErrors {
    pub during_faults: ErrorRatio,
    pub baseline: ErrorRatio,
}

/// What a run writes at its end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub seed: u64,
    /// Length of the faulty part of the run.
    pub duration_s: f64,
    /// Whether every checker passed (false when there were no verdicts).
    pub passed: bool,
    pub verdicts: Vec<Verdict>,
    pub nemesis_events: usize,
    /// Fault counts by [`FaultKind::name`]; kinds that never ran are absent.
    pub nemesis_events_by_kind: BTreeMap<String, usize>,
    pub operations: OutcomeCounts,
    /// Outcome counts by [`OpKind::name`].
    pub operations_by_kind: BTreeMap<String, OutcomeCounts>,
    pub failover: Failover,
    /// By [`FaultKind::name`], for the kinds that ran.
    pub unavailability_by_fault: BTreeMap<String, Unavailability>,
    pub inference_errors: InferenceErrors,
}

/// Summarises `history` and the verdicts the checkers gave it.
pub fn build(history: &History, verdicts: &[Verdict]) -> Report {
    let mut nemesis_events_by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for event in &history.nemesis {
        *nemesis_events_by_kind
            .entry(event.kind.name().to_owned())
            .or_default() += 1;
    }
    let mut operations = OutcomeCounts::default();
    let mut operations_by_kind: BTreeMap<String, OutcomeCounts> = BTreeMap::new();
    for operation in &history.operations {
        operations.add(&operation.outcome);
        operations_by_kind
            .entry(operation.kind.name().to_owned())
            .or_default()
            .add(&operation.outcome);
    }
    Report {
        seed: history.seed,
        duration_s: history.duration as f64 / 1e6,
        passed: !verdicts.is_empty() && verdicts.iter().all(|verdict| verdict.passed),
        verdicts: verdicts.to_vec(),
        nemesis_events: history.nemesis.len(),
        nemesis_events_by_kind,
        operations,
        operations_by_kind,
        failover: failover(history),
        unavailability_by_fault: unavailability_by_fault(history),
        inference_errors: inference_errors(history),
    }
}

/// Failover times after every fault that killed or isolated the leader of the moment.
///
/// The fault is resolved by the first leader observation at or after its start that names
/// another server, or the same server in a term above every term observed before the
/// start (it was re-elected). Taking the highest earlier term, rather than the last
/// observation's, keeps a lagging server's stale report from making the old leader's own
/// term look new.
/// How long after an isolation heals a new leader may still appear because of it (a few
/// election timeouts).
pub const KEPT_SLACK: Micros = 2_000_000;

fn failover(history: &History) -> Failover {
    let mut times: Vec<Micros> = Vec::new();
    let (mut unresolved, mut kept) = (0, 0);
    for event in &history.nemesis {
        if !matches!(
            event.kind,
            FaultKind::KillLeader | FaultKind::PartitionIsolate
        ) {
            continue;
        }
        let Some(leader) = event.leader_before else {
            continue;
        };
        if !event.targets.contains(&Member::Server(leader)) {
            continue;
        }
        let term_before = history
            .leaders
            .iter()
            .filter(|observation| observation.at < event.started)
            .map(|observation| observation.term)
            .max();
        let resolved = history
            .leaders
            .iter()
            .filter(|observation| observation.at >= event.started)
            .filter(|observation| match observation.leader {
                Some(other) if other != leader => true,
                Some(_) => term_before.is_some_and(|term| observation.term > term),
                None => false,
            })
            .map(|observation| observation.at)
            .min();
        let isolation = event.kind == FaultKind::PartitionIsolate;
        let window_end = event
            .healed
            .map_or(Micros::MAX, |healed| healed + KEPT_SLACK);
        match resolved {
            Some(at) if !isolation || at <= window_end => times.push(at - event.started),
            _ if isolation => kept += 1,
            _ => unresolved += 1,
        }
    }
    times.sort_unstable();
    let percentile_ms = |percent| nearest_rank(&times, percent).map(milliseconds);
    Failover {
        measured: times.len(),
        unresolved,
        kept,
        p50_ms: percentile_ms(50),
        p99_ms: percentile_ms(99),
        max_ms: percentile_ms(100),
    }
}

/// The nearest-rank `percent`ile (1..=100) of `sorted`: the smallest value at least
/// `percent`% of the values are less than or equal to.
fn nearest_rank(sorted: &[Micros], percent: usize) -> Option<Micros> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (percent * sorted.len())
        .div_ceil(100)
        .clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Whether `kind` changes control-plane state (every control-plane operation but a read).
fn is_control_plane_write(kind: &OpKind) -> bool {
    kind.is_control_plane() && !matches!(kind, OpKind::AliasRead { .. })
}

/// When `event` stopped: its heal, or for one the run ended before healing, the final heal.
fn window_end(event: &NemesisEvent, history: &History) -> Micros {
    event.healed.unwrap_or(history.healed_at).max(event.started)
}

fn unavailability_by_fault(history: &History) -> BTreeMap<String, Unavailability> {
    let writes: Vec<&Operation> = history
        .operations
        .iter()
        .filter(|operation| is_control_plane_write(&operation.kind))
        .collect();
    let mut acknowledged: Vec<Micros> = writes
        .iter()
        .filter(|operation| operation.outcome == Outcome::Ok)
        .map(|operation| operation.completed)
        .collect();
    acknowledged.sort_unstable();
    // A gap still open at the end of the run is measured to the last thing the run saw.
    let run_end = history
        .operations
        .iter()
        .map(|operation| operation.completed)
        .chain(
            history
                .nemesis
                .iter()
                .map(|event| window_end(event, history)),
        )
        .chain([history.healed_at, history.duration])
        .max()
        .unwrap_or_default();

    let mut by_fault = BTreeMap::new();
    for kind in FaultKind::ALL {
        let mut summary = Unavailability::default();
        let mut gaps_summed: Micros = 0;
        for event in history.nemesis.iter().filter(|event| event.kind == kind) {
            let (start, end) = (event.started, window_end(event, history));
            summary.events += 1;
            for write in writes
                .iter()
                .filter(|write| (start..=end).contains(&write.invoked))
            {
                summary.ops += 1;
                if write.outcome != Outcome::Ok {
                    summary.not_ok += 1;
                }
            }
            gaps_summed += longest_gap(&acknowledged, start, end, run_end);
        }
        if summary.events == 0 {
            continue;
        }
        summary.not_ok_ratio =
            (summary.ops > 0).then(|| summary.not_ok as f64 / summary.ops as f64);
        summary.longest_write_gap_ms = milliseconds(gaps_summed);
        by_fault.insert(kind.name().to_owned(), summary);
    }
    by_fault
}

/// The longest gap between successive acknowledged writes (sorted completion times) that
/// touches `start..=end`: from the last one completed at or before `start` (or `start`
/// itself if none was), through those completed inside, to the first completed after
/// `end` (or `run_end` if none was).
fn longest_gap(acknowledged: &[Micros], start: Micros, end: Micros, run_end: Micros) -> Micros {
    let before = acknowledged.partition_point(|&at| at <= start);
    let after = acknowledged.partition_point(|&at| at <= end);
    let first = if before > 0 {
        acknowledged[before - 1]
    } else {
        start
    };
    let last = acknowledged.get(after).copied().unwrap_or(run_end.max(end));
    let mut points = vec![first];
    points.extend_from_slice(&acknowledged[before..after]);
    points.push(last);
    points
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default()
}

fn inference_errors(history: &History) -> InferenceErrors {
    let mut errors = InferenceErrors::default();
    for operation in &history.operations {
        if !matches!(operation.kind, OpKind::Infer { .. }) {
            continue;
        }
        let during_fault = history
            .nemesis
            .iter()
            .any(|event| (event.started..=window_end(event, history)).contains(&operation.invoked));
        let group = if during_fault {
            &mut errors.during_faults
        } else {
            &mut errors.baseline
        };
        group.add(&operation.outcome);
    }
    errors
}

/// The report as pretty JSON.
pub fn json(report: &Report) -> String {
    // A report holds only strings, numbers, options and string-keyed maps, all of which
    // serde_json can write.
    serde_json::to_string_pretty(report).expect("a report always serializes to JSON")
}

/// A short plain-text summary with aligned columns.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let checkers_passed = report.verdicts.iter().filter(|v| v.passed).count();
    out.push_str(&format!(
        "shoal-chaos seed {}: {:.1} s of faults, {} ({} of {} checkers passed)\n",
        report.seed,
        report.duration_s,
        if report.passed { "PASSED" } else { "FAILED" },
        checkers_passed,
        report.verdicts.len()
    ));

    out.push('\n');
    let rows: Vec<Vec<String>> = report
        .verdicts
        .iter()
        .map(|verdict| {
            vec![
                if verdict.passed { "PASS" } else { "FAIL" }.to_owned(),
                verdict.name.clone(),
                truncate(&verdict.detail, DETAIL_CHARS_MAX),
            ]
        })
        .collect();
    table(&mut out, &["result", "checker", "detail"], &rows, 3);
    // The table cuts details; a failure is spelled out whole, so a printed report (all a CI
    // log keeps) says what went wrong.
    for verdict in report.verdicts.iter().filter(|verdict| !verdict.passed) {
        out.push_str(&format!("\n{} failed: {}\n", verdict.name, verdict.detail));
    }

    out.push('\n');
    let mut rows: Vec<Vec<String>> = report
        .nemesis_events_by_kind
        .iter()
        .map(|(kind, count)| vec![kind.clone(), count.to_string()])
        .collect();
    rows.push(vec!["total".to_owned(), report.nemesis_events.to_string()]);
    table(&mut out, &["nemesis event", "count"], &rows, 1);

    out.push('\n');
    let counts_row = |name: &str, counts: &OutcomeCounts| {
        vec![
            name.to_owned(),
            counts.ok.to_string(),
            counts.fail.to_string(),
            counts.unknown.to_string(),
        ]
    };
    let mut rows: Vec<Vec<String>> = report
        .operations_by_kind
        .iter()
        .map(|(kind, counts)| counts_row(kind, counts))
        .collect();
    rows.push(counts_row("total", &report.operations));
    table(&mut out, &["operation", "ok", "fail", "unknown"], &rows, 1);

    out.push('\n');
    let failover = &report.failover;
    out.push_str(&format!(
        "leader failover: p50 {} ms, p99 {} ms, max {} ms ({} measured, {} unresolved, \
         {} isolations too short to cost the lead)\n",
        optional_ms(failover.p50_ms),
        optional_ms(failover.p99_ms),
        optional_ms(failover.max_ms),
        failover.measured,
        failover.unresolved,
        failover.kept
    ));

    out.push('\n');
    let rows: Vec<Vec<String>> = report
        .unavailability_by_fault
        .iter()
        .map(|(kind, summary)| {
            vec![
                kind.clone(),
                summary.events.to_string(),
                summary.ops.to_string(),
                optional_percent(summary.not_ok_ratio),
                format!("{:.1}", summary.longest_write_gap_ms),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "fault",
            "events",
            "writes",
            "not ok",
            "write gap ms (summed)",
        ],
        &rows,
        1,
    );

    out.push('\n');
    let ratio_row = |name: &str, ratio: &ErrorRatio| {
        vec![
            name.to_owned(),
            ratio.requests.to_string(),
            ratio.not_ok.to_string(),
            optional_percent(ratio.ratio),
        ]
    };
    let errors = &report.inference_errors;
    let rows = vec![
        ratio_row("during faults", &errors.during_faults),
        ratio_row("baseline", &errors.baseline),
    ];
    table(
        &mut out,
        &["inference", "requests", "not ok", "error ratio"],
        &rows,
        1,
    );
    out
}

/// Appends `header` and `rows` with every column padded to its widest cell; the first
/// `left_columns` columns are aligned left, the rest right.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>], left_columns: usize) {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|cell| (*cell).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, &width))| {
                if column < left_columns {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
}

/// `text` on one line, cut to `chars_max` characters with "..." when longer.
fn truncate(text: &str, chars_max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= chars_max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(chars_max.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}

fn optional_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1}"))
}

fn optional_percent(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "-".to_owned(), |ratio| format!("{:.1}%", ratio * 100.0))
}

fn milliseconds(span: Micros) -> f64 {
    span as f64 / 1e3
}

#[cfg(test)]
mod tests;
