//! Every metric Shoal exports, named once, with its help text and labels.
//!
//! Names follow Prometheus conventions: the `shoal_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` on counters. Labels have bounded cardinality: model, version, code,
//! role; never a request id. Dashboards and alert rules may use only names listed here.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;

/// Buckets for request latencies: 100 µs to 10 s.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets for rows per forward pass.
const BATCH_ROWS_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The metrics of one process, registered in its own registry.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Inference requests answered, by model and HTTP status code.
    pub requests_total: IntCounterVec,
    /// Time from receiving an inference request to answering it, by model.
    pub request_duration_seconds: HistogramVec,
    /// Time a request waited in a replica's queue before its batch ran, by model.
    pub queue_duration_seconds: HistogramVec,
    /// Wall time of one forward pass, by model.
    pub compute_duration_seconds: HistogramVec,
    /// Rows in each forward pass, by model.
    pub batch_rows: HistogramVec,
    /// Requests refused because a replica's queue was full, by model.
    pub overloaded_total: IntCounterVec,
    /// Replicas this agent runs, by state.
    pub replicas: IntGaugeVec,
    /// Bytes reserved on each device of this agent, by device.
    pub device_memory_reserved_bytes: IntGaugeVec,
    /// Capacity of each device of this agent, by device.
    pub device_memory_total_bytes: IntGaugeVec,
    /// Memory in use on each device as its driver (or the kernel, for RAM) reports it.
    pub device_memory_used_bytes: IntGaugeVec,
    /// Idle replicas evicted to make room for another, by device.
    pub device_evictions_total: IntCounterVec,
    /// Current raft term.
    pub raft_term: IntGauge,
    /// 1 while this member is the raft leader.
    pub raft_is_leader: IntGauge,
    /// Highest log index known committed.
    pub raft_commit_index: IntGauge,
    /// Highest log index applied to the state machine.
    pub raft_applied_index: IntGauge,
    /// Times this member saw the leader change.
    pub raft_leader_changes_total: IntCounter,
    /// Time from proposing a command to it being applied.
    pub raft_proposal_duration_seconds: Histogram,
    /// Bytes of raft log files on disk.
    pub raft_log_bytes: IntGauge,
    /// Snapshots this member took of its own state (each compacts the log).
    pub raft_snapshots_taken_total: IntCounter,
    /// Snapshots this member installed from a leader.
    pub raft_snapshots_installed_total: IntCounter,
    /// Time to take a snapshot and compact the log.
    pub raft_snapshot_duration_seconds: Histogram,
    /// 1 while this member cannot write its log (disk full) and refuses proposals.
    pub raft_storage_stalled: IntGauge,
    /// Raft messages not sent, by reason (queue_full, encode).
    pub raft_messages_dropped_total: IntCounterVec,
    /// Inbound raft frames refused, by reason (cluster_id, oversized, corrupt, wrong_member).
    pub raft_frames_rejected_total: IntCounterVec,
    /// Build information; the value is always 1.
    pub build_info: IntGaugeVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let metrics = Metrics {
            requests_total: counter_vec(
                &registry,
                "shoal_requests_total",
                "Inference requests answered, by model and HTTP status code.",
                &["model", "code"],
            ),
            request_duration_seconds: histogram_vec(
                &registry,
                "shoal_request_duration_seconds",
                "Time from receiving an inference request to answering it.",
                &["model"],
                LATENCY_BUCKETS_SECONDS,
            ),
            queue_duration_seconds: histogram_vec(
                &registry,
                "shoal_queue_duration_seconds",
                "Time a request waited in a replica queue before its batch ran.",
                &["model"],
                LATENCY_BUCKETS_SECONDS,
            ),
            compute_duration_seconds: histogram_vec(
                &registry,
                "shoal_compute_duration_seconds",
                "Wall time of one forward pass.",
                &["model"],
                LATENCY_BUCKETS_SECONDS,
            ),
            batch_rows: histogram_vec(
                &registry,
                "shoal_batch_rows",
                "Rows in each forward pass.",
                &["model"],
                BATCH_ROWS_BUCKETS,
            ),
            overloaded_total: counter_vec(
                &registry,
                "shoal_overloaded_total",
                "Requests refused because a replica queue was full.",
                &["model"],
            ),
            replicas: gauge_vec(
                &registry,
                "shoal_replicas",
                "Replicas this agent runs, by state.",
                &["state"],
            ),
            device_memory_reserved_bytes: gauge_vec(
                &registry,
                "shoal_device_memory_reserved_bytes",
                "Bytes reserved by replicas on each device of this agent.",
                &["device"],
            ),
            device_memory_total_bytes: gauge_vec(
                &registry,
                "shoal_device_memory_total_bytes",
                "Memory capacity of each device of this agent.",
                &["device"],
            ),
            device_memory_used_bytes: gauge_vec(
                &registry,
                "shoal_device_memory_used_bytes",
                "Memory in use on each device as its driver or the kernel reports it.",
                &["device"],
            ),
            device_evictions_total: counter_vec(
                &registry,
                "shoal_device_evictions_total",
                "Idle replicas evicted from each device to make room.",
                &["device"],
            ),
            raft_term: gauge(&registry, "shoal_raft_term", "Current raft term."),
            raft_is_leader: gauge(
                &registry,
                "shoal_raft_is_leader",
                "1 while this member is the raft leader, else 0.",
            ),
            raft_commit_index: gauge(
                &registry,
                "shoal_raft_commit_index",
                "Highest raft log index known committed.",
            ),
            raft_applied_index: gauge(
                &registry,
                "shoal_raft_applied_index",
                "Highest raft log index applied to the state machine.",
            ),
            raft_leader_changes_total: counter(
                &registry,
                "shoal_raft_leader_changes_total",
                "Times this member saw the raft leader change.",
            ),
            raft_proposal_duration_seconds: histogram(
                &registry,
                "shoal_raft_proposal_duration_seconds",
                "Time from proposing a command to it being applied.",
                LATENCY_BUCKETS_SECONDS,
            ),
            raft_log_bytes: gauge(
                &registry,
                "shoal_raft_log_bytes",
                "Bytes of raft log files on disk.",
            ),
            raft_snapshots_taken_total: counter(
                &registry,
                "shoal_raft_snapshots_taken_total",
                "Snapshots this member took of its own state.",
            ),
            raft_snapshots_installed_total: counter(
                &registry,
                "shoal_raft_snapshots_installed_total",
                "Snapshots this member installed from a leader.",
            ),
            raft_snapshot_duration_seconds: histogram(
                &registry,
                "shoal_raft_snapshot_duration_seconds",
                "Time to take a snapshot and compact the log.",
                LATENCY_BUCKETS_SECONDS,
            ),
            raft_storage_stalled: gauge(
                &registry,
                "shoal_raft_storage_stalled",
                "1 while this member cannot write its log and refuses proposals.",
            ),
            raft_messages_dropped_total: counter_vec(
                &registry,
                "shoal_raft_messages_dropped_total",
                "Raft messages not sent, by reason.",
                &["reason"],
            ),
            raft_frames_rejected_total: counter_vec(
                &registry,
                "shoal_raft_frames_rejected_total",
                "Inbound raft frames refused, by reason.",
                &["reason"],
            ),
            build_info: gauge_vec(
                &registry,
                "shoal_build_info",
                "Build information; the value is always 1.",
                &["version"],
            ),
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[crate::VERSION])
            .set(1);
        metrics
    }
}

/// Renders every metric in the Prometheus text format.
pub fn encode() -> String {
    let mut buffer = Vec::new();
    let families = metrics().registry.gather();
    // Encoding into a Vec cannot fail on IO; a failure would be a malformed metric, which
    // the names test rules out.
    if let Err(error) = TextEncoder::new().encode(&families, &mut buffer) {
        tracing::error!(%error, "encoding metrics failed");
    }
    String::from_utf8(buffer).unwrap_or_default()
}

// Registration only fails for an invalid or duplicate name; every name is a constant
// registered once, so these helpers panic at startup if someone breaks that.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and valid");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    register(registry, metric)
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("valid counter"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid gauge"))
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
    register(registry, metric)
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(
        registry,
        Histogram::with_opts(opts).expect("valid histogram"),
    )
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(
        registry,
        HistogramVec::new(opts, labels).expect("valid histogram"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_follows_the_naming_rules() {
        metrics()
            .requests_total
            .with_label_values(&["m", "200"])
            .inc();
        for family in metrics().registry.gather() {
            let name = family.name();
            assert!(name.starts_with("shoal_"), "{name} lacks the shoal_ prefix");
            assert!(!family.help().is_empty(), "{name} has no help text");
            let is_counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
            assert_eq!(
                is_counter,
                name.ends_with("_total"),
                "{name}: _total iff counter"
            );
        }
    }

    #[test]
    fn encoded_text_holds_the_build_info() {
        assert!(encode().contains("shoal_build_info{version="));
    }
}
