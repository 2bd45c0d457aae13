//! Every metric Shoal exports, named once, with its type, help text and labels.
//!
//! Names follow Prometheus conventions: the `shoal_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` on counters. Labels have bounded cardinality (model, version,
//! deployment, node, device, code and small enums such as state); never a request id.
//! [`CATALOG`] is the one list: the registry is built from it, and the dashboard and alert
//! tests refuse any name that is not in it.
//!
//! Who sets what: the gateway sets the request metrics; replicas on an agent set queue,
//! compute, batch, token, load and device metrics; every raft member sets the `raft_`
//! metrics; the control-plane leader alone sets the cluster-wide gauges (`node_status`,
//! `deployment_*`, `autoscaler_*`, `placement_*`) and clears them when it steps down, so a
//! sum over servers never counts them twice.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;

/// What kind of Prometheus metric a name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Which processes export a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every process that sets it.
    Any,
    /// Control-plane members only (`shoal server`, `shoal up`): an agent or a gateway
    /// leaves these out of its `/metrics` rather than exporting zeros.
    ControlPlane,
}

/// One metric: its name, kind, help text, label names and who exports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Definition {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    pub scope: Scope,
}

impl Definition {
    /// The series names this metric appears under in the exposition and in PromQL: a
    /// histogram's `_bucket`, `_sum` and `_count`, anything else its own name.
    pub fn series_names(&self) -> Vec<String> {
        match self.kind {
            Kind::Histogram => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{}{suffix}", self.name))
                .collect(),
            Kind::Counter | Kind::Gauge => vec![self.name.to_string()],
        }
    }
}

/// Defines each metric as a constant and [`CATALOG`] as the list of all of them, so a
/// metric cannot be defined without being listed.
macro_rules! catalog {
    ($($constant:ident: $scope:ident $kind:ident $name:literal [$($label:literal),*] $help:literal;)*) => {
        $(
            #[doc = $help]
            pub const $constant: Definition = Definition {
                name: $name,
                kind: Kind::$kind,
                help: $help,
                labels: &[$($label),*],
                scope: Scope::$scope,
            };
        )*
        /// Every metric Shoal exports.
        pub const CATALOG: &[Definition] = &[$($constant),*];
    };
}

catalog! {
    // Serving, at the gateway that answers the caller.
    REQUESTS_TOTAL: Any Counter "shoal_requests_total" ["model", "version", "code"]
        "Inference requests answered by this gateway, by model, version served and HTTP status code.";
    REQUEST_DURATION_SECONDS: Any Histogram "shoal_request_duration_seconds" ["model", "version"]
        "Time from receiving an inference request at the gateway to answering it.";
    REQUESTS_IN_FLIGHT: Any Gauge "shoal_requests_in_flight" ["model"]
        "Inference requests this gateway is handling now.";
    EXPLANATIONS_TOTAL: Any Counter "shoal_explanations_total" ["model", "method", "code"]
        "Explain requests answered by this gateway, by model, method and HTTP status code (the inference requests each runs count in shoal_requests_total too).";
    // Serving, at the replica that runs the model.
    QUEUED_REQUESTS: Any Gauge "shoal_queued_requests" ["model", "version"]
        "Requests waiting in replica queues on this agent for their batch to start.";
    QUEUE_DURATION_SECONDS: Any Histogram "shoal_queue_duration_seconds" ["model", "version"]
        "Time a request waited in a replica queue before its batch ran.";
    COMPUTE_DURATION_SECONDS: Any Histogram "shoal_compute_duration_seconds" ["model", "version"]
        "Wall time of one forward pass.";
    BATCH_ROWS: Any Histogram "shoal_batch_rows" ["model", "version"]
        "Rows in each forward pass (the batch size).";
    OVERLOADED_TOTAL: Any Counter "shoal_overloaded_total" ["model", "version"]
        "Requests refused because a replica queue was full.";
    TIME_TO_FIRST_TOKEN_SECONDS: Any Histogram "shoal_time_to_first_token_seconds" ["model", "version"]
        "Time from a generation request reaching its replica to its first token.";
    INTER_TOKEN_LATENCY_SECONDS: Any Histogram "shoal_inter_token_latency_seconds" ["model", "version"]
        "Time between consecutive tokens of one generated sequence.";
    GENERATED_TOKENS_TOTAL: Any Counter "shoal_generated_tokens_total" ["model", "version"]
        "Tokens generated by replicas on this agent.";
    REPLICAS: Any Gauge "shoal_replicas" ["model", "version", "state"]
        "Replicas this agent runs, by model, version and state (loading or ready).";
    MODEL_LOAD_DURATION_SECONDS: Any Histogram "shoal_model_load_duration_seconds" ["model", "version"]
        "Time for a replica to fetch, verify, load and warm up its model.";
    // Devices, on each agent.
    DEVICE_MEMORY_TOTAL_BYTES: Any Gauge "shoal_device_memory_total_bytes" ["node", "device"]
        "Memory capacity of each device of this agent.";
    DEVICE_MEMORY_RESERVED_BYTES: Any Gauge "shoal_device_memory_reserved_bytes" ["node", "device"]
        "Bytes reserved by replicas on each device of this agent.";
    DEVICE_MEMORY_USED_BYTES: Any Gauge "shoal_device_memory_used_bytes" ["node", "device"]
        "Memory in use on each device as its driver or the kernel reports it.";
    DEVICE_EVICTIONS_TOTAL: Any Counter "shoal_device_evictions_total" ["node", "device"]
        "Idle replicas evicted from each device to make room for another.";
    // Artifacts.
    ARTIFACT_PUSHED_BYTES_TOTAL: ControlPlane Counter "shoal_artifact_pushed_bytes_total" []
        "Bytes of model files pushed to this server and stored.";
    ARTIFACT_FETCHED_BYTES_TOTAL: Any Counter "shoal_artifact_fetched_bytes_total" []
        "Bytes of model files this process downloaded from a server.";
    ARTIFACT_SWEPT_BYTES_TOTAL: Any Counter "shoal_artifact_swept_bytes_total" []
        "Bytes of blobs removed past their grace: from a server's store those no version lists, from an agent's cache those no replica of it uses.";
    // The cluster, as the control-plane leader sees it.
    NODE_STATUS: ControlPlane Gauge "shoal_node_status" ["node", "status"]
        "1 for each node's current status (ready, draining, down), else 0; set by the leader.";
    DEPLOYMENT_REPLICAS: ControlPlane Gauge "shoal_deployment_replicas" ["deployment", "state"]
        "Replica groups of each deployment by state; set by the leader.";
    DEPLOYMENT_DESIRED_REPLICAS: ControlPlane Gauge "shoal_deployment_desired_replicas" ["deployment"]
        "Replica groups each deployment wants now; set by the leader.";
    DEPLOYMENT_LATENCY_OBJECTIVE_SECONDS: ControlPlane Gauge "shoal_deployment_latency_objective_seconds" ["deployment", "model"]
        "Each deployment's 99th percentile latency objective, where it declares one; set by the leader.";
    PLACEMENT_ROUND_DURATION_SECONDS: ControlPlane Histogram "shoal_placement_round_duration_seconds" []
        "Time for the leader to compute one placement plan.";
    PLACEMENT_COMMANDS_TOTAL: ControlPlane Counter "shoal_placement_commands_total" ["command", "result"]
        "Commands the placement controller proposed, by kind and result (applied or refused).";
    AUTOSCALER_RECOMMENDED_REPLICAS: ControlPlane Gauge "shoal_autoscaler_recommended_replicas" ["deployment"]
        "Replica groups the current load asks for, before stabilisation windows; set by the leader.";
    AUTOSCALER_MAX_REPLICAS: ControlPlane Gauge "shoal_autoscaler_max_replicas" ["deployment"]
        "The upper bound of each autoscaled deployment; set by the leader.";
    AUTOSCALER_DECISIONS_TOTAL: ControlPlane Counter "shoal_autoscaler_decisions_total" ["deployment", "direction"]
        "Replica count changes the autoscaler made, by direction (up or down).";
    // Raft, on every control-plane member.
    RAFT_TERM: ControlPlane Gauge "shoal_raft_term" []
        "Current raft term.";
    RAFT_IS_LEADER: ControlPlane Gauge "shoal_raft_is_leader" []
        "1 while this member is the raft leader, else 0.";
    RAFT_ROLE: ControlPlane Gauge "shoal_raft_role" ["role"]
        "1 for this member's current raft role (leader, candidate, pre_candidate, follower), else 0.";
    RAFT_COMMIT_INDEX: ControlPlane Gauge "shoal_raft_commit_index" []
        "Highest raft log index known committed.";
    RAFT_APPLIED_INDEX: ControlPlane Gauge "shoal_raft_applied_index" []
        "Highest raft log index applied to the state machine.";
    RAFT_LEADER_CHANGES_TOTAL: ControlPlane Counter "shoal_raft_leader_changes_total" []
        "Times this member saw the raft leader change.";
    RAFT_PROPOSAL_DURATION_SECONDS: ControlPlane Histogram "shoal_raft_proposal_duration_seconds" []
        "Time from proposing a command to it being applied.";
    RAFT_LOG_BYTES: ControlPlane Gauge "shoal_raft_log_bytes" []
        "Bytes of raft log files on disk.";
    RAFT_SNAPSHOTS_TAKEN_TOTAL: ControlPlane Counter "shoal_raft_snapshots_taken_total" []
        "Snapshots this member took of its own state.";
    RAFT_SNAPSHOTS_INSTALLED_TOTAL: ControlPlane Counter "shoal_raft_snapshots_installed_total" []
        "Snapshots this member installed from a leader.";
    RAFT_SNAPSHOT_DURATION_SECONDS: ControlPlane Histogram "shoal_raft_snapshot_duration_seconds" []
        "Time to take a snapshot and compact the log.";
    RAFT_STORAGE_STALLED: ControlPlane Gauge "shoal_raft_storage_stalled" []
        "1 while this member cannot write its log and refuses proposals.";
    RAFT_MESSAGES_DROPPED_TOTAL: ControlPlane Counter "shoal_raft_messages_dropped_total" ["reason"]
        "Raft messages not sent, by reason.";
    RAFT_FRAMES_REJECTED_TOTAL: ControlPlane Counter "shoal_raft_frames_rejected_total" ["reason"]
        "Inbound raft frames refused, by reason.";
    // The process.
    BUILD_INFO: Any Gauge "shoal_build_info" ["version", "role"]
        "Build information and the role this process runs (up, server, agent, gateway); the value is always 1.";
}

/// Buckets for request, queue, compute and token latencies: 100 µs to 10 s.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets for model loads: 10 ms to 5 minutes.
const LOAD_BUCKETS_SECONDS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Buckets for rows per forward pass.
const BATCH_ROWS_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The metrics of one process, registered in its own registry. Each field is the metric
/// of the [`CATALOG`] constant with the same name.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub requests_in_flight: IntGaugeVec,
    pub explanations_total: IntCounterVec,
    pub queued_requests: IntGaugeVec,
    pub queue_duration_seconds: HistogramVec,
    pub compute_duration_seconds: HistogramVec,
    pub batch_rows: HistogramVec,
    pub overloaded_total: IntCounterVec,
    pub time_to_first_token_seconds: HistogramVec,
    pub inter_token_latency_seconds: HistogramVec,
    pub generated_tokens_total: IntCounterVec,
    pub replicas: IntGaugeVec,
    pub model_load_duration_seconds: HistogramVec,
    pub device_memory_total_bytes: IntGaugeVec,
    pub device_memory_reserved_bytes: IntGaugeVec,
    pub device_memory_used_bytes: IntGaugeVec,
    pub device_evictions_total: IntCounterVec,
    pub artifact_pushed_bytes_total: IntCounter,
    pub artifact_fetched_bytes_total: IntCounter,
    pub artifact_swept_bytes_total: IntCounter,
    pub node_status: IntGaugeVec,
    pub deployment_replicas: IntGaugeVec,
    pub deployment_desired_replicas: IntGaugeVec,
    pub deployment_latency_objective_seconds: prometheus::GaugeVec,
    pub placement_round_duration_seconds: Histogram,
    pub placement_commands_total: IntCounterVec,
    pub autoscaler_recommended_replicas: IntGaugeVec,
    pub autoscaler_max_replicas: IntGaugeVec,
    pub autoscaler_decisions_total: IntCounterVec,
    pub raft_term: IntGauge,
    pub raft_is_leader: IntGauge,
    pub raft_role: IntGaugeVec,
    pub raft_commit_index: IntGauge,
    pub raft_applied_index: IntGauge,
    pub raft_leader_changes_total: IntCounter,
    pub raft_proposal_duration_seconds: Histogram,
    pub raft_log_bytes: IntGauge,
    pub raft_snapshots_taken_total: IntCounter,
    pub raft_snapshots_installed_total: IntCounter,
    pub raft_snapshot_duration_seconds: Histogram,
    pub raft_storage_stalled: IntGauge,
    pub raft_messages_dropped_total: IntCounterVec,
    pub raft_frames_rejected_total: IntCounterVec,
    pub build_info: IntGaugeVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The raft roles [`RAFT_ROLE`] distinguishes.
pub const RAFT_ROLES: &[&str] = &["leader", "candidate", "pre_candidate", "follower"];

/// Whether this process is a control-plane member, so exports [`Scope::ControlPlane`]
/// metrics; true until a role says otherwise.
static CONTROL_PLANE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Records the role this process runs (up, server, agent, gateway) in [`BUILD_INFO`] and
/// decides which metrics it exports; called once at startup.
pub fn set_process_role(role: &str) {
    let info = &metrics().build_info;
    info.reset();
    info.with_label_values(&[crate::VERSION, role]).set(1);
    let member = matches!(role, "up" | "server");
    CONTROL_PLANE.store(member, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this process exports `definition`.
fn exported(definition: &Definition) -> bool {
    definition.scope == Scope::Any || CONTROL_PLANE.load(std::sync::atomic::Ordering::Relaxed)
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let metrics = Metrics {
            requests_total: counter_vec(&r, &REQUESTS_TOTAL),
            explanations_total: counter_vec(&r, &EXPLANATIONS_TOTAL),
            request_duration_seconds: histogram_vec(
                &r,
                &REQUEST_DURATION_SECONDS,
                LATENCY_BUCKETS_SECONDS,
            ),
            requests_in_flight: gauge_vec(&r, &REQUESTS_IN_FLIGHT),
            queued_requests: gauge_vec(&r, &QUEUED_REQUESTS),
            queue_duration_seconds: histogram_vec(
                &r,
                &QUEUE_DURATION_SECONDS,
                LATENCY_BUCKETS_SECONDS,
            ),
            compute_duration_seconds: histogram_vec(
                &r,
                &COMPUTE_DURATION_SECONDS,
                LATENCY_BUCKETS_SECONDS,
            ),
            batch_rows: histogram_vec(&r, &BATCH_ROWS, BATCH_ROWS_BUCKETS),
            overloaded_total: counter_vec(&r, &OVERLOADED_TOTAL),
            time_to_first_token_seconds: histogram_vec(
                &r,
                &TIME_TO_FIRST_TOKEN_SECONDS,
                LATENCY_BUCKETS_SECONDS,
            ),
            inter_token_latency_seconds: histogram_vec(
                &r,
                &INTER_TOKEN_LATENCY_SECONDS,
                LATENCY_BUCKETS_SECONDS,
            ),
            generated_tokens_total: counter_vec(&r, &GENERATED_TOKENS_TOTAL),
            replicas: gauge_vec(&r, &REPLICAS),
            model_load_duration_seconds: histogram_vec(
                &r,
                &MODEL_LOAD_DURATION_SECONDS,
                LOAD_BUCKETS_SECONDS,
            ),
            device_memory_total_bytes: gauge_vec(&r, &DEVICE_MEMORY_TOTAL_BYTES),
            device_memory_reserved_bytes: gauge_vec(&r, &DEVICE_MEMORY_RESERVED_BYTES),
            device_memory_used_bytes: gauge_vec(&r, &DEVICE_MEMORY_USED_BYTES),
            device_evictions_total: counter_vec(&r, &DEVICE_EVICTIONS_TOTAL),
            artifact_pushed_bytes_total: counter(&r, &ARTIFACT_PUSHED_BYTES_TOTAL),
            artifact_fetched_bytes_total: counter(&r, &ARTIFACT_FETCHED_BYTES_TOTAL),
            artifact_swept_bytes_total: counter(&r, &ARTIFACT_SWEPT_BYTES_TOTAL),
            node_status: gauge_vec(&r, &NODE_STATUS),
            deployment_replicas: gauge_vec(&r, &DEPLOYMENT_REPLICAS),
            deployment_desired_replicas: gauge_vec(&r, &DEPLOYMENT_DESIRED_REPLICAS),
            deployment_latency_objective_seconds: {
                let definition = &DEPLOYMENT_LATENCY_OBJECTIVE_SECONDS;
                let opts = Opts::new(definition.name, definition.help);
                register(
                    &r,
                    prometheus::GaugeVec::new(opts, definition.labels).expect("valid gauge"),
                )
            },
            placement_round_duration_seconds: histogram(
                &r,
                &PLACEMENT_ROUND_DURATION_SECONDS,
                LATENCY_BUCKETS_SECONDS,
            ),
            placement_commands_total: counter_vec(&r, &PLACEMENT_COMMANDS_TOTAL),
            autoscaler_recommended_replicas: gauge_vec(&r, &AUTOSCALER_RECOMMENDED_REPLICAS),
            autoscaler_max_replicas: gauge_vec(&r, &AUTOSCALER_MAX_REPLICAS),
            autoscaler_decisions_total: counter_vec(&r, &AUTOSCALER_DECISIONS_TOTAL),
            raft_term: gauge(&r, &RAFT_TERM),
            raft_is_leader: gauge(&r, &RAFT_IS_LEADER),
            raft_role: gauge_vec(&r, &RAFT_ROLE),
            raft_commit_index: gauge(&r, &RAFT_COMMIT_INDEX),
            raft_applied_index: gauge(&r, &RAFT_APPLIED_INDEX),
            raft_leader_changes_total: counter(&r, &RAFT_LEADER_CHANGES_TOTAL),
            raft_proposal_duration_seconds: histogram(
                &r,
                &RAFT_PROPOSAL_DURATION_SECONDS,
                LATENCY_BUCKETS_SECONDS,
            ),
            raft_log_bytes: gauge(&r, &RAFT_LOG_BYTES),
            raft_snapshots_taken_total: counter(&r, &RAFT_SNAPSHOTS_TAKEN_TOTAL),
            raft_snapshots_installed_total: counter(&r, &RAFT_SNAPSHOTS_INSTALLED_TOTAL),
            raft_snapshot_duration_seconds: histogram(
                &r,
                &RAFT_SNAPSHOT_DURATION_SECONDS,
                LATENCY_BUCKETS_SECONDS,
            ),
            raft_storage_stalled: gauge(&r, &RAFT_STORAGE_STALLED),
            raft_messages_dropped_total: counter_vec(&r, &RAFT_MESSAGES_DROPPED_TOTAL),
            raft_frames_rejected_total: counter_vec(&r, &RAFT_FRAMES_REJECTED_TOTAL),
            build_info: gauge_vec(&r, &BUILD_INFO),
            registry: r,
        };
        metrics
            .build_info
            .with_label_values(&[crate::VERSION, "unknown"])
            .set(1);
        metrics
    }

    /// Sets [`RAFT_ROLE`] to `role` (one of [`RAFT_ROLES`]) and [`RAFT_IS_LEADER`] to match.
    pub fn set_raft_role(&self, role: &str) {
        for candidate in RAFT_ROLES {
            self.raft_role
                .with_label_values(&[candidate])
                .set(i64::from(*candidate == role));
        }
        self.raft_is_leader.set(i64::from(role == "leader"));
    }
}

/// Renders every metric this process exports in the Prometheus text format.
pub fn encode() -> String {
    let mut buffer = Vec::new();
    let mut families = metrics().registry.gather();
    families.retain(|family| {
        CATALOG
            .iter()
            .find(|definition| definition.name == family.name())
            .is_some_and(exported)
    });
    // Encoding into a Vec cannot fail on IO; a failure would be a malformed metric, which
    // the catalog test rules out.
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

fn opts(definition: &Definition, kind: Kind) -> Opts {
    assert_eq!(
        definition.kind, kind,
        "{} is a {:?}",
        definition.name, definition.kind
    );
    Opts::new(definition.name, definition.help)
}

fn counter_vec(registry: &Registry, definition: &Definition) -> IntCounterVec {
    let opts = opts(definition, Kind::Counter);
    register(
        registry,
        IntCounterVec::new(opts, definition.labels).expect("valid counter"),
    )
}

fn counter(registry: &Registry, definition: &Definition) -> IntCounter {
    assert!(
        definition.labels.is_empty(),
        "{} has labels",
        definition.name
    );
    let opts = opts(definition, Kind::Counter);
    register(
        registry,
        IntCounter::with_opts(opts).expect("valid counter"),
    )
}

fn gauge_vec(registry: &Registry, definition: &Definition) -> IntGaugeVec {
    let opts = opts(definition, Kind::Gauge);
    register(
        registry,
        IntGaugeVec::new(opts, definition.labels).expect("valid gauge"),
    )
}

fn gauge(registry: &Registry, definition: &Definition) -> IntGauge {
    assert!(
        definition.labels.is_empty(),
        "{} has labels",
        definition.name
    );
    let opts = opts(definition, Kind::Gauge);
    register(registry, IntGauge::with_opts(opts).expect("valid gauge"))
}

fn histogram_opts(definition: &Definition, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::from(opts(definition, Kind::Histogram)).buckets(buckets.to_vec())
}

fn histogram(registry: &Registry, definition: &Definition, buckets: &[f64]) -> Histogram {
    assert!(
        definition.labels.is_empty(),
        "{} has labels",
        definition.name
    );
    let opts = histogram_opts(definition, buckets);
    register(
        registry,
        Histogram::with_opts(opts).expect("valid histogram"),
    )
}

fn histogram_vec(registry: &Registry, definition: &Definition, buckets: &[f64]) -> HistogramVec {
    let opts = histogram_opts(definition, buckets);
    register(
        registry,
        HistogramVec::new(opts, definition.labels).expect("valid histogram"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::core::Collector;
    use prometheus::proto::MetricType;
    use std::collections::BTreeSet;

    #[test]
    fn every_catalog_entry_follows_the_naming_rules() {
        let mut names = BTreeSet::new();
        for definition in CATALOG {
            let name = definition.name;
            assert!(names.insert(name), "{name} is listed twice");
            assert!(name.starts_with("shoal_"), "{name} lacks the shoal_ prefix");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name} is not snake_case"
            );
            assert!(!definition.help.is_empty(), "{name} has no help text");
            assert_eq!(
                definition.kind == Kind::Counter,
                name.ends_with("_total"),
                "{name}: _total iff counter"
            );
            for forbidden in ["request_id", "id", "trace_id", "prompt"] {
                assert!(
                    !definition.labels.contains(&forbidden),
                    "{name} has the unbounded label {forbidden}"
                );
            }
        }
    }

    #[test]
    fn the_registry_holds_exactly_the_catalog() {
        // Vectors appear in a gather only once a label set exists: create one of each.
        for definition in CATALOG {
            let values = vec!["x"; definition.labels.len()];
            let registered = metrics()
                .registry
                .gather()
                .into_iter()
                .any(|family| family.name() == definition.name);
            if !registered && !definition.labels.is_empty() {
                touch(definition.name, &values);
            }
        }
        let gathered: BTreeSet<(String, String)> = metrics()
            .registry
            .gather()
            .into_iter()
            .map(|family| {
                let kind = format!("{:?}", family.get_field_type());
                (family.name().to_string(), kind)
            })
            .collect();
        let listed: BTreeSet<(String, String)> = CATALOG
            .iter()
            .map(|definition| {
                let kind = match definition.kind {
                    Kind::Counter => MetricType::COUNTER,
                    Kind::Gauge => MetricType::GAUGE,
                    Kind::Histogram => MetricType::HISTOGRAM,
                };
                (definition.name.to_string(), format!("{kind:?}"))
            })
            .collect();
        assert_eq!(gathered, listed);
    }

    /// Creates one series of the labelled metric `name`, whatever its type.
    fn touch(name: &str, values: &[&str]) {
        let m = metrics();
        let counters = [
            &m.requests_total,
            &m.explanations_total,
            &m.overloaded_total,
            &m.generated_tokens_total,
            &m.device_evictions_total,
            &m.placement_commands_total,
            &m.autoscaler_decisions_total,
            &m.raft_messages_dropped_total,
            &m.raft_frames_rejected_total,
        ];
        let gauges = [
            &m.requests_in_flight,
            &m.queued_requests,
            &m.replicas,
            &m.device_memory_total_bytes,
            &m.device_memory_reserved_bytes,
            &m.device_memory_used_bytes,
            &m.node_status,
            &m.deployment_replicas,
            &m.deployment_desired_replicas,
            &m.autoscaler_recommended_replicas,
            &m.autoscaler_max_replicas,
            &m.raft_role,
            &m.build_info,
        ];
        let histograms = [
            &m.request_duration_seconds,
            &m.queue_duration_seconds,
            &m.compute_duration_seconds,
            &m.batch_rows,
            &m.time_to_first_token_seconds,
            &m.inter_token_latency_seconds,
            &m.model_load_duration_seconds,
        ];
        for counter in counters {
            if counter.desc()[0].fq_name == name {
                counter.with_label_values(values).inc();
            }
        }
        for gauge in gauges {
            if gauge.desc()[0].fq_name == name {
                gauge.with_label_values(values).set(1);
            }
        }
        for histogram in histograms {
            if histogram.desc()[0].fq_name == name {
                histogram.with_label_values(values).observe(1.0);
            }
        }
        if m.deployment_latency_objective_seconds.desc()[0].fq_name == name {
            m.deployment_latency_objective_seconds
                .with_label_values(values)
                .set(1.0);
        }
    }

    // One test, since the role is process-wide.
    #[test]
    fn the_role_names_itself_in_build_info_and_only_members_export_raft_metrics() {
        set_process_role("agent");
        let text = encode();
        assert!(text.contains("role=\"agent\""), "{text}");
        assert!(!text.contains("shoal_raft_term"), "{text}");
        assert!(
            text.contains("shoal_artifact_fetched_bytes_total"),
            "{text}"
        );
        set_process_role("server");
        let text = encode();
        let line = format!(
            "shoal_build_info{{role=\"server\",version=\"{}\"}} 1",
            crate::VERSION
        );
        assert!(text.contains(&line), "{text}");
        assert!(text.contains("shoal_raft_term"), "{text}");
    }
}
