//! Scenario tables: a cluster, then steps (operator and agent actions, time, load) each
//! followed by the exact commands the controllers must propose. The tables cover rollout,
//! rollback, automatic rollback, drain, node loss and scale to zero, through the public API
//! only.

use shoal_scheduler::autoscale::Autoscaler;
use shoal_scheduler::backoff::FailingGroup;
use shoal_scheduler::placement::plan;
use shoal_scheduler::rollout::traffic;
use shoal_scheduler::{
    ArtifactFile, AutoscalePolicy, CanaryThresholds, ClusterState, Command, DeploymentLoad,
    DeploymentSpec, Device, DeviceId, DeviceKind, LoadSnapshot, NodeId, NodeStatus, RemovalReason,
    ReplicaId, ReplicaPolicy, ReplicaState, RollbackReason, RolloutKind, RolloutPhase, Signature,
    VersionHealth, VersionSelector, VersionWeight, apply,
};
use std::collections::BTreeMap;

const GIB: u64 = 1 << 30;
const SECOND_MS: u64 = 1_000;

enum Step {
    /// Operator or agent commands, which must be accepted.
    Do(Vec<Command>),
    /// Every agent reports its pending replicas ready.
    AgentsReady,
    Wait(u64),
    Load(LoadSnapshot),
    /// Plan, compare with the expected commands (see `describe`), apply them.
    Plan(Vec<&'static str>),
    /// Run the autoscaler, compare, apply.
    Autoscale(Vec<&'static str>),
    /// A check on the state, with what it means.
    Check(&'static str, fn(&ClusterState) -> bool),
}

struct Scenario {
    name: &'static str,
    setup: Vec<Command>,
    steps: Vec<Step>,
}

fn describe(command: &Command) -> String {
    let nodes = |shards: &[shoal_scheduler::ShardPlacement]| {
        shards
            .iter()
            .map(|shard| shard.node.to_string())
            .collect::<Vec<_>>()
            .join("+")
    };
    match command {
        Command::AssignReplica {
            deployment,
            version,
            shards,
        } => format!("assign {deployment} v{version} {}", nodes(shards)),
        Command::ReassignReplica { group, shards, .. } => {
            format!("reassign {group} {}", nodes(shards))
        }
        Command::RemoveReplica { group, reason, .. } => {
            let why = match reason {
                RemovalReason::Surplus => "surplus",
                RemovalReason::Moved => "moved",
                RemovalReason::Evicted { .. } => "evicted",
            };
            format!("remove {group} {why}")
        }
        Command::StartRollout {
            deployment,
            version,
            ..
        } => format!("start {deployment} v{version}"),
        Command::AdvanceRollout {
            deployment,
            version,
            phase,
        } => {
            let phase = match phase {
                RolloutPhase::CanaryWarming => "canary-warming",
                RolloutPhase::CanaryObserving { .. } => "canary-observing",
                RolloutPhase::Rolling => "rolling",
                RolloutPhase::GreenWarming => "green-warming",
                RolloutPhase::Switched { .. } => "switched",
            };
            format!("advance {deployment} v{version} {phase}")
        }
        Command::CompleteRollout {
            deployment,
            version,
        } => format!("complete {deployment} v{version}"),
        Command::RollbackRollout {
            deployment,
            version,
            reason,
        } => {
            let why = match reason {
                RollbackReason::Operator => "operator",
                RollbackReason::Superseded => "superseded",
                RollbackReason::CanaryErrors { .. } => "canary-errors",
                RollbackReason::CanaryLatency { .. } => "canary-latency",
                RollbackReason::NewVersionFailed { .. } => "new-version-failed",
            };
            format!("rollback {deployment} v{version} {why}")
        }
        Command::SetDesiredReplicas {
            deployment,
            replicas,
        } => format!("scale {deployment} {replicas}"),
        other => format!("{other:?}"),
    }
}

fn run(scenario: Scenario) {
    let mut state = ClusterState::default();
    let mut now_ms = 1_000_000;
    let mut load = LoadSnapshot::default();
    let mut autoscaler = Autoscaler::new();
    let name = scenario.name;
    let accept = |state: &mut ClusterState, command: Command, step: usize| {
        let index = state.applied_index + 1;
        if let Err(rejected) = apply(state, index, command.clone()) {
            panic!("{name}, step {step}: {command:?} refused: {rejected}");
        }
    };
    for command in scenario.setup {
        accept(&mut state, command, 0);
    }
    for (position, step) in scenario.steps.into_iter().enumerate() {
        let step_number = position + 1;
        match step {
            Step::Do(commands) => {
                for command in commands {
                    accept(&mut state, command, step_number);
                }
            }
            Step::AgentsReady => {
                let pending: Vec<_> = state
                    .replicas
                    .values()
                    .filter(|r| r.state == ReplicaState::Pending)
                    .map(|r| (r.id, r.epoch))
                    .collect();
                for (replica, epoch) in pending {
                    let report = Command::SetReplicaState {
                        replica,
                        epoch,
                        state: ReplicaState::Ready,
                        failure: None,
                    };
                    accept(&mut state, report, step_number);
                }
            }
            Step::Wait(ms) => now_ms += ms,
            Step::Load(snapshot) => load = snapshot,
            Step::Plan(expected) => {
                let commands = plan(&state, &load, now_ms);
                let described: Vec<String> = commands.iter().map(describe).collect();
                assert_eq!(described, expected, "{name}, step {step_number}: plan");
                for command in commands {
                    accept(&mut state, command, step_number);
                }
            }
            Step::Autoscale(expected) => {
                let commands = autoscaler.decide(&state, &load, now_ms);
                let described: Vec<String> = commands.iter().map(describe).collect();
                assert_eq!(described, expected, "{name}, step {step_number}: autoscale");
                for command in commands {
                    accept(&mut state, command, step_number);
                }
            }
            Step::Check(what, check) => {
                assert!(check(&state), "{name}, step {step_number}: {what}");
            }
        }
    }
}

fn node(id: u64, zone: &str) -> Command {
    Command::RegisterNode {
        id: NodeId(id),
        address: format!("10.0.0.{id}:7071"),
        devices: vec![Device {
            id: DeviceId(0),
            kind: DeviceKind::Gpu,
            memory_bytes: 8 * GIB,
        }],
        labels: [("zone".to_string(), zone.to_string())]
            .into_iter()
            .collect(),
    }
}

fn version(model: &str, digest: &str) -> Command {
    Command::RegisterModelVersion {
        model: model.into(),
        manifest_digest: digest.into(),
        files: vec![ArtifactFile {
            name: "model.safetensors".into(),
            digest: digest.repeat(8),
            size_bytes: 1_000,
        }],
        format: "safetensors".into(),
        memory_bytes: GIB,
        signature: Signature::default(),
        created_at_ms: 0,
    }
}

fn spec(replicas: u32, kind: RolloutKind) -> DeploymentSpec {
    let mut spec = DeploymentSpec::new("m", "m", 1, replicas);
    spec.rollout.kind = kind;
    spec
}

fn to_version(mut spec: DeploymentSpec, version: u32) -> Command {
    spec.versions = VersionSelector::Version(version);
    Command::UpdateDeployment { spec }
}

/// `nodes` nodes in zone `a`, model `m` with versions 1 and 2, and `spec` deployed and
/// serving.
fn serving(nodes: u64, spec: DeploymentSpec) -> (Vec<Command>, Vec<Step>) {
    let mut setup: Vec<Command> = (1..=nodes).map(|id| node(id, "a")).collect();
    setup.push(version("m", "aa"));
    setup.push(version("m", "bb"));
    setup.push(Command::CreateDeployment { spec });
    (setup, vec![])
}

fn canary(observation_ms: u64) -> RolloutKind {
    RolloutKind::Canary {
        traffic_percent: 25,
        observation_ms,
        thresholds: CanaryThresholds {
            error_ratio_max_ppm: 10_000,
            latency_p99_max_ms: 250,
            requests_min: 100,
        },
    }
}

fn canary_health(requests: u64, errors: u64, latency_p99_ms: u64) -> LoadSnapshot {
    let mut load = LoadSnapshot::default();
    let mut deployment = DeploymentLoad::default();
    deployment.versions.insert(
        2,
        VersionHealth {
            requests,
            errors,
            latency_p99_ms,
        },
    );
    load.deployments.insert("m".into(), deployment);
    load
}

fn stable_is(state: &ClusterState, version: u32) -> bool {
    let deployment = &state.deployments["m"];
    deployment.stable_version == version && deployment.rollout.is_none()
}

fn versions_running(state: &ClusterState) -> Vec<u32> {
    state.replicas_of("m").map(|r| r.version).collect()
}

fn all_traffic_on(state: &ClusterState, version: u32) -> bool {
    let deployment = &state.deployments["m"];
    traffic(deployment, &BTreeMap::new())
        == vec![VersionWeight {
            version,
            weight: 100,
        }]
}

#[test]
fn a_rolling_update_brings_each_new_replica_up_before_an_old_one_goes() {
    let base = spec(2, RolloutKind::Rolling);
    let (setup, _) = serving(3, base.clone());
    run(Scenario {
        name: "rolling update",
        setup,
        steps: vec![
            Step::Plan(vec!["assign m v1 node-1", "assign m v1 node-2"]),
            Step::AgentsReady,
            Step::Plan(vec![]),
            Step::Do(vec![to_version(base, 2)]),
            Step::Plan(vec!["start m v2", "assign m v2 node-3"]),
            // Nothing old goes while the new replica loads.
            Step::Plan(vec![]),
            Step::AgentsReady,
            Step::Plan(vec!["remove replica-1 surplus", "assign m v2 node-2"]),
            Step::AgentsReady,
            Step::Plan(vec!["remove replica-0 surplus", "complete m v2"]),
            Step::Plan(vec![]),
            Step::Check("v2 is stable and alone", |s| {
                stable_is(s, 2) && versions_running(s) == vec![2, 2]
            }),
            Step::Check("v1 is what a rollback returns to", |s| {
                s.deployments["m"].previous_version == Some(1)
            }),
        ],
    });
}

/// The load the leader's failure memory gives after `group` failed `in_a_row` times.
fn failing(group: u64, in_a_row: u32) -> LoadSnapshot {
    let mut load = LoadSnapshot::default();
    let failing = FailingGroup {
        in_a_row,
        retry_at_ms: 0,
    };
    load.failing.insert(ReplicaId(group), failing);
    load
}

fn fail(replica: u64, epoch: u64) -> Command {
    Command::SetReplicaState {
        replica: ReplicaId(replica),
        epoch,
        state: ReplicaState::Failed,
        failure: Some("the version has no config.json file".into()),
    }
}

#[test]
fn a_rollout_to_a_version_that_cannot_load_is_rolled_back_and_the_old_one_serves_on() {
    let base = spec(2, RolloutKind::Rolling);
    let (setup, _) = serving(3, base.clone());
    run(Scenario {
        name: "version that cannot load",
        setup,
        steps: vec![
            Step::Plan(vec!["assign m v1 node-1", "assign m v1 node-2"]),
            Step::AgentsReady,
            Step::Do(vec![to_version(base, 2)]),
            Step::Plan(vec!["start m v2", "assign m v2 node-3"]),
            // Its first two failures are tried again (at once, then after a wait).
            Step::Do(vec![fail(2, 1)]),
            Step::Load(failing(2, 1)),
            Step::Plan(vec!["reassign replica-2 node-3"]),
            Step::Do(vec![fail(2, 2)]),
            Step::Load(failing(2, 2)),
            Step::Plan(vec!["reassign replica-2 node-3"]),
            // The third gives the version up; the old replicas never stopped serving.
            Step::Do(vec![fail(2, 3)]),
            Step::Load(failing(2, 3)),
            Step::Plan(vec![
                "rollback m v2 new-version-failed",
                "remove replica-2 surplus",
            ]),
            Step::Plan(vec![]),
            Step::Check("v1 serves alone and v2 is blocked", |s| {
                stable_is(s, 1)
                    && versions_running(s) == vec![1, 1]
                    && s.deployments["m"].blocked_version == Some(2)
            }),
        ],
    });
}

#[test]
fn a_canary_breaching_its_error_ratio_is_rolled_back_automatically() {
    let base = spec(4, canary(60 * SECOND_MS));
    let (setup, _) = serving(5, base.clone());
    run(Scenario {
        name: "canary auto-rollback on errors",
        setup,
        steps: vec![
            Step::Plan(vec![
                "assign m v1 node-1",
                "assign m v1 node-2",
                "assign m v1 node-3",
                "assign m v1 node-4",
            ]),
            Step::AgentsReady,
            Step::Do(vec![to_version(base, 2)]),
            Step::Plan(vec!["start m v2", "assign m v2 node-5"]),
            Step::Check("the warming canary takes no traffic", |s| {
                all_traffic_on(s, 1)
            }),
            Step::AgentsReady,
            Step::Plan(vec!["advance m v2 canary-observing"]),
            // Too few requests to judge yet, though all failed.
            Step::Load(canary_health(50, 50, 10)),
            Step::Wait(10 * SECOND_MS),
            Step::Plan(vec![]),
            Step::Load(canary_health(500, 50, 10)),
            Step::Plan(vec![
                "rollback m v2 canary-errors",
                "remove replica-4 surplus",
            ]),
            Step::Plan(vec![]),
            Step::Check("v1 stays stable and v2 is blocked", |s| {
                stable_is(s, 1)
                    && s.deployments["m"].blocked_version == Some(2)
                    && versions_running(s) == vec![1, 1, 1, 1]
            }),
        ],
    });
}

#[test]
fn a_canary_breaching_its_latency_is_rolled_back_automatically() {
    let base = spec(2, canary(60 * SECOND_MS));
    let (setup, _) = serving(3, base.clone());
    run(Scenario {
        name: "canary auto-rollback on latency",
        setup,
        steps: vec![
            Step::Plan(vec!["assign m v1 node-1", "assign m v1 node-2"]),
            Step::AgentsReady,
            Step::Do(vec![to_version(base, 2)]),
            Step::Plan(vec!["start m v2", "assign m v2 node-3"]),
            Step::AgentsReady,
            Step::Plan(vec!["advance m v2 canary-observing"]),
            Step::Load(canary_health(1_000, 0, 900)),
            Step::Plan(vec![
                "rollback m v2 canary-latency",
                "remove replica-2 surplus",
            ]),
        ],
    });
}

#[test]
fn a_healthy_canary_is_promoted_after_its_window_and_rolls_on() {
    let base = spec(2, canary(60 * SECOND_MS));
    let (setup, _) = serving(3, base.clone());
    run(Scenario {
        name: "canary promotion",
        setup,
        steps: vec![
            Step::Plan(vec!["assign m v1 node-1", "assign m v1 node-2"]),
            Step::AgentsReady,
            Step::Do(vec![to_version(base, 2)]),
            Step::Plan(vec!["start m v2", "assign m v2 node-3"]),
            Step::AgentsReady,
            Step::Plan(vec!["advance m v2 canary-observing"]),
            Step::Check("the canary takes its share", |s| {
                let shares = traffic(&s.deployments["m"], &BTreeMap::new());
                shares
                    == vec![
                        VersionWeight {
                            version: 1,
                            weight: 75,
                        },
                        VersionWeight {
                            version: 2,
                            weight: 25,
                        },
                    ]
            }),
            Step::Load(canary_health(1_000, 1, 100)),
            Step::Wait(59 * SECOND_MS),
            Step::Plan(vec![]),
            Step::Wait(SECOND_MS),
            // Promotion: two v2 wanted, one ready; one v1 may go while two stay ready.
            Step::Plan(vec![
                "advance m v2 rolling",
                "remove replica-1 surplus",
                "assign m v2 node-2",
            ]),
            Step::AgentsReady,
            Step::Plan(vec!["remove replica-0 surplus", "complete m v2"]),
            Step::Check("v2 is stable", |s| stable_is(s, 2)),
        ],
    });
}

#[test]
fn blue_green_switches_at_once_and_rolls_back_instantly_while_warm() {
    let base = spec(
        2,
        RolloutKind::BlueGreen {
            keep_previous_ms: 300 * SECOND_MS,
        },
    );
    let (setup, _) = serving(4, base.clone());
    run(Scenario {
        name: "blue-green rollback",
        setup,
        steps: vec![
            Step::Plan(vec!["assign m v1 node-1", "assign m v1 node-2"]),
            Step::AgentsReady,
            Step::Do(vec![to_version(base, 2)]),
            Step::Plan(vec![
                "start m v2",
                "assign m v2 node-3",
                "assign m v2 node-4",
            ]),
            Step::Check("green warms without traffic", |s| all_traffic_on(s, 1)),
            Step::AgentsReady,
            Step::Plan(vec!["advance m v2 switched"]),
            Step::Check("all traffic switched", |s| all_traffic_on(s, 2)),
            Step::Wait(60 * SECOND_MS),
            Step::Plan(vec![]),
            Step::Do(vec![Command::RollbackRollout {
                deployment: "m".into(),
                version: 2,
                reason: RollbackReason::Operator,
            }]),
            Step::Check("traffic is back on the warm v1 at once", |s| {
                all_traffic_on(s, 1) && versions_running(s) == vec![1, 1, 2, 2]
            }),
            Step::Plan(vec!["remove replica-3 surplus", "remove replica-2 surplus"]),
            Step::Plan(vec![]),
        ],
    });
}

#[test]
fn blue_green_completes_once_the_old_version_has_been_kept_warm_long_enough() {
    let base = spec(
        1,
        RolloutKind::BlueGreen {
            keep_previous_ms: 300 * SECOND_MS,
        },
    );
    let (setup, _) = serving(2, base.clone());
    run(Scenario {
        name: "blue-green completion",
        setup,
        steps: vec![
            Step::Plan(vec!["assign m v1 node-1"]),
            Step::AgentsReady,
            Step::Do(vec![to_version(base, 2)]),
            Step::Plan(vec!["start m v2", "assign m v2 node-2"]),
            Step::AgentsReady,
            Step::Plan(vec!["advance m v2 switched"]),
            Step::Wait(299 * SECOND_MS),
            Step::Plan(vec![]),
            Step::Wait(SECOND_MS),
            Step::Plan(vec!["complete m v2", "remove replica-0 surplus"]),
            Step::Check("v2 is stable and alone", |s| {
                stable_is(s, 2) && versions_running(s) == vec![2]
            }),
        ],
    });
}

#[test]
fn moving_an_alias_rolls_out_the_version_it_names() {
    let mut base = spec(1, RolloutKind::Rolling);
    base.versions = VersionSelector::Alias("stable".into());
    let mut setup: Vec<Command> = (1..=2).map(|id| node(id, "a")).collect();
    setup.push(version("m", "aa"));
    setup.push(version("m", "bb"));
    let alias = |version| Command::SetAlias {
        model: "m".into(),
        alias: "stable".into(),
        version,
    };
    setup.push(alias(1));
    setup.push(Command::CreateDeployment { spec: base });
    run(Scenario {
        name: "alias rollout",
        setup,
        steps: vec![
            Step::Plan(vec!["assign m v1 node-1"]),
            Step::AgentsReady,
            Step::Do(vec![alias(2)]),
            Step::Plan(vec!["start m v2", "assign m v2 node-2"]),
            // The alias moves back before v2 is ready: the rollout is superseded.
            Step::Do(vec![alias(1)]),
            Step::Plan(vec!["rollback m v2 superseded", "remove replica-1 surplus"]),
            Step::Check("v2 is not blocked by a supersede", |s| {
                s.deployments["m"].blocked_version.is_none()
            }),
        ],
    });
}

#[test]
fn a_draining_node_is_emptied_new_copy_first() {
    let (setup, _) = serving(3, spec(2, RolloutKind::Rolling));
    run(Scenario {
        name: "drain",
        setup,
        steps: vec![
            Step::Plan(vec!["assign m v1 node-1", "assign m v1 node-2"]),
            Step::AgentsReady,
            Step::Do(vec![Command::SetNodeStatus {
                node: NodeId(1),
                status: NodeStatus::Draining,
            }]),
            Step::Plan(vec!["assign m v1 node-3"]),
            Step::Plan(vec![]),
            Step::AgentsReady,
            Step::Plan(vec!["remove replica-0 moved"]),
            Step::Plan(vec![]),
            Step::Do(vec![Command::RemoveNode { node: NodeId(1) }]),
        ],
    });
}

#[test]
fn replicas_of_a_lost_node_are_placed_again_in_another_zone_if_needed() {
    let mut setup = vec![node(1, "a"), node(2, "b"), node(3, "b")];
    setup.push(version("m", "aa"));
    setup.push(Command::CreateDeployment {
        spec: spec(2, RolloutKind::Rolling),
    });
    run(Scenario {
        name: "node down",
        setup,
        steps: vec![
            Step::Plan(vec!["assign m v1 node-1", "assign m v1 node-2"]),
            Step::AgentsReady,
            Step::Do(vec![Command::SetNodeStatus {
                node: NodeId(1),
                status: NodeStatus::Down,
            }]),
            Step::Plan(vec!["reassign replica-0 node-3"]),
            Step::Plan(vec![]),
            Step::Check("the moved replica carries a new epoch", |s| {
                s.replicas.values().map(|r| r.epoch).collect::<Vec<_>>() == vec![2, 1]
            }),
        ],
    });
}

#[test]
fn an_idle_deployment_scales_to_zero_and_a_held_request_brings_it_back() {
    let mut base = spec(1, RolloutKind::Rolling);
    base.replicas = ReplicaPolicy {
        initial: 1,
        min: 0,
        max: 3,
    };
    base.autoscale = Some(AutoscalePolicy {
        target_ongoing_requests: 4,
        upscale_delay_ms: 30 * SECOND_MS,
        downscale_delay_ms: 120 * SECOND_MS,
        scale_to_zero_after_ms: Some(300 * SECOND_MS),
    });
    let (setup, _) = serving(2, base);
    let traffic_at = |in_flight, held, last_request_ms| {
        let mut load = LoadSnapshot::default();
        load.deployments.insert(
            "m".into(),
            DeploymentLoad {
                requests_in_flight: in_flight,
                requests_held: held,
                last_request_ms: Some(last_request_ms),
                versions: BTreeMap::new(),
            },
        );
        load
    };
    run(Scenario {
        name: "scale to zero",
        setup,
        steps: vec![
            Step::Plan(vec!["assign m v1 node-1"]),
            Step::AgentsReady,
            Step::Load(traffic_at(0, 0, 1_000_000)),
            Step::Autoscale(vec![]),
            Step::Wait(299 * SECOND_MS),
            Step::Autoscale(vec![]),
            Step::Wait(SECOND_MS),
            Step::Autoscale(vec!["scale m 0"]),
            Step::Plan(vec!["remove replica-0 surplus"]),
            Step::Wait(3_600 * SECOND_MS),
            Step::Autoscale(vec![]),
            Step::Plan(vec![]),
            Step::Load(traffic_at(0, 1, 4_900_000)),
            Step::Autoscale(vec!["scale m 1"]),
            Step::Plan(vec!["assign m v1 node-1"]),
            // Load grows past one replica's target: up after the upscale window only.
            Step::AgentsReady,
            Step::Load(traffic_at(9, 0, 4_900_000)),
            Step::Autoscale(vec![]),
            Step::Wait(30 * SECOND_MS),
            Step::Autoscale(vec!["scale m 3"]),
            Step::Plan(vec!["assign m v1 node-2", "assign m v1 node-1"]),
        ],
    });
}

#[test]
fn a_traffic_split_runs_each_version_in_proportion() {
    let mut base = spec(4, RolloutKind::Rolling);
    base.versions = VersionSelector::Split(vec![
        VersionWeight {
            version: 1,
            weight: 75,
        },
        VersionWeight {
            version: 2,
            weight: 25,
        },
    ]);
    let (setup, _) = serving(4, base);
    run(Scenario {
        name: "traffic split",
        setup,
        steps: vec![
            Step::Plan(vec![
                "assign m v1 node-1",
                "assign m v1 node-2",
                "assign m v1 node-3",
                "assign m v2 node-4",
            ]),
            Step::Plan(vec![]),
            Step::Check("stable is the heaviest version", |s| {
                s.deployments["m"].stable_version == 1
            }),
        ],
    });
}
