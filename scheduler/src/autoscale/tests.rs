//! Autoscaler tests: the rule on worked examples, then bounds and stability properties.

use super::*;
use crate::command::tests::{applied, next, version_command};
use crate::deployment::{DeploymentSpec, ReplicaPolicy};
use proptest::prelude::*;

const SECOND_MS: u64 = 1_000;

fn policy(scale_to_zero_after_ms: Option<u64>) -> AutoscalePolicy {
    AutoscalePolicy {
        target_ongoing_requests: 2,
        upscale_delay_ms: 30 * SECOND_MS,
        downscale_delay_ms: 600 * SECOND_MS,
        scale_to_zero_after_ms,
    }
}

fn autoscaled(replicas: ReplicaPolicy, autoscale: AutoscalePolicy) -> ClusterState {
    let mut spec = DeploymentSpec::new("m", "m", 1, replicas.initial);
    spec.replicas = replicas;
    spec.autoscale = Some(autoscale);
    applied(vec![
        version_command("m", "d1", 1),
        Command::CreateDeployment { spec },
    ])
}

fn load(in_flight: u64, held: u64, last_request_ms: Option<u64>) -> LoadSnapshot {
    let mut snapshot = LoadSnapshot::default();
    snapshot.deployments.insert(
        "m".into(),
        DeploymentLoad {
            requests_in_flight: in_flight,
            requests_held: held,
            last_request_ms,
            ..DeploymentLoad::default()
        },
    );
    snapshot
}

/// Runs the autoscaler every second from `from_ms` to `to_ms`, applying what it decides.
fn run(
    scaler: &mut Autoscaler,
    state: &mut ClusterState,
    load: &LoadSnapshot,
    from_ms: u64,
    to_ms: u64,
) -> Vec<(u64, u32)> {
    let mut changes = Vec::new();
    let mut now_ms = from_ms;
    while now_ms <= to_ms {
        for command in scaler.decide(state, load, now_ms) {
            if let Command::SetDesiredReplicas { replicas, .. } = &command {
                changes.push((now_ms, *replicas));
            }
            next(state, command).expect("the autoscaler stays within bounds");
        }
        now_ms += SECOND_MS;
    }
    changes
}

#[test]
fn the_count_is_in_flight_requests_over_the_target_rounded_up() {
    let autoscale = policy(None);
    let at = |in_flight| {
        recommended_replicas(
            &autoscale,
            1,
            10,
            &load(in_flight, 0, None).deployments["m"],
        )
    };
    assert_eq!(at(0), 1);
    assert_eq!(at(2), 1);
    assert_eq!(at(3), 2);
    assert_eq!(at(19), 10);
    assert_eq!(at(1_000), 10);
}

#[test]
fn an_upscale_waits_out_its_window_and_takes_the_smallest_ask() {
    let bounds = ReplicaPolicy {
        initial: 1,
        min: 1,
        max: 10,
    };
    let mut state = autoscaled(bounds, policy(None));
    let mut scaler = Autoscaler::new();
    // 10 then 6 in flight: asks for 5, then 3.
    let first = run(
        &mut scaler,
        &mut state,
        &load(10, 0, Some(0)),
        0,
        10 * SECOND_MS,
    );
    assert_eq!(first, vec![]);
    let second = run(
        &mut scaler,
        &mut state,
        &load(6, 0, Some(0)),
        11 * SECOND_MS,
        40 * SECOND_MS,
    );
    assert_eq!(second, vec![(30 * SECOND_MS, 3)]);
}

#[test]
fn a_spike_shorter_than_the_window_moves_nothing() {
    let bounds = ReplicaPolicy {
        initial: 2,
        min: 1,
        max: 10,
    };
    let mut state = autoscaled(bounds, policy(None));
    let mut scaler = Autoscaler::new();
    assert_eq!(
        run(
            &mut scaler,
            &mut state,
            &load(20, 0, Some(0)),
            0,
            20 * SECOND_MS
        ),
        vec![]
    );
    assert_eq!(
        run(
            &mut scaler,
            &mut state,
            &load(4, 0, Some(0)),
            21 * SECOND_MS,
            60 * SECOND_MS
        ),
        vec![]
    );
    assert_eq!(state.deployments["m"].replicas_desired, 2);
}

#[test]
fn a_downscale_waits_for_its_longer_window() {
    let bounds = ReplicaPolicy {
        initial: 4,
        min: 1,
        max: 10,
    };
    let mut state = autoscaled(bounds, policy(None));
    let mut scaler = Autoscaler::new();
    let changes = run(
        &mut scaler,
        &mut state,
        &load(2, 0, Some(0)),
        0,
        700 * SECOND_MS,
    );
    assert_eq!(changes, vec![(600 * SECOND_MS, 1)]);
}

/// One replica (0 to 4) that scales to zero after 300 s idle, left idle from 0 to 400 s;
/// the changes it made on the way.
fn scaled_to_zero_by_400_s() -> (Autoscaler, ClusterState, Vec<(u64, u32)>) {
    let bounds = ReplicaPolicy {
        initial: 1,
        min: 0,
        max: 4,
    };
    let mut state = autoscaled(bounds, policy(Some(300 * SECOND_MS)));
    let mut scaler = Autoscaler::new();
    let idle = run(
        &mut scaler,
        &mut state,
        &load(0, 0, Some(0)),
        0,
        400 * SECOND_MS,
    );
    (scaler, state, idle)
}

#[test]
fn an_idle_deployment_scales_to_zero_and_the_first_held_request_brings_it_back() {
    let (mut scaler, mut state, idle) = scaled_to_zero_by_400_s();
    assert_eq!(idle, vec![(300 * SECOND_MS, 0)]);
    let woken = run(
        &mut scaler,
        &mut state,
        &load(0, 1, Some(401 * SECOND_MS)),
        401 * SECOND_MS,
        402 * SECOND_MS,
    );
    assert_eq!(woken, vec![(401 * SECOND_MS, 1)]);
}

/// Regression: the held request that woke a deployment was answered before any agent
/// reported it, so the last request the leader knew of was from before the scale-down, and
/// the next round put the deployment straight back to zero.
#[test]
fn a_deployment_woken_from_zero_is_not_scaled_back_before_it_has_been_idle_again() {
    let (mut scaler, mut state, _) = scaled_to_zero_by_400_s();
    let asleep = load(0, 0, Some(0));
    let woken = run(
        &mut scaler,
        &mut state,
        &load(0, 1, Some(0)),
        401 * SECOND_MS,
        401 * SECOND_MS,
    );
    assert_eq!(woken, vec![(401 * SECOND_MS, 1)]);
    // The held request is answered; no report of it has reached the leader yet.
    let after = run(
        &mut scaler,
        &mut state,
        &asleep,
        402 * SECOND_MS,
        700 * SECOND_MS,
    );
    assert_eq!(
        after,
        vec![],
        "woken at 401 s, it is idle for 300 s only at 701 s"
    );
    let later = run(
        &mut scaler,
        &mut state,
        &asleep,
        701 * SECOND_MS,
        701 * SECOND_MS,
    );
    assert_eq!(later, vec![(701 * SECOND_MS, 0)]);
}

/// Regression: a held request that waited longer than the idle time for its replica to
/// load was answered, and the next round (before any report of it came) found the
/// deployment idle since it was woken and put it straight back to zero.
#[test]
fn a_request_held_longer_than_the_idle_time_keeps_the_deployment_up_after_its_answer() {
    let (mut scaler, mut state, _) = scaled_to_zero_by_400_s();
    let held = load(0, 1, Some(0));
    let woken = run(
        &mut scaler,
        &mut state,
        &held,
        401 * SECOND_MS,
        800 * SECOND_MS,
    );
    assert_eq!(
        woken,
        vec![(401 * SECOND_MS, 1)],
        "held from 401 s to 800 s"
    );
    let answered = run(
        &mut scaler,
        &mut state,
        &load(0, 0, Some(0)),
        801 * SECOND_MS,
        1_099 * SECOND_MS,
    );
    assert_eq!(answered, vec![], "idle only since 800 s");
    let idle = run(
        &mut scaler,
        &mut state,
        &load(0, 0, Some(0)),
        1_100 * SECOND_MS,
        1_100 * SECOND_MS,
    );
    assert_eq!(idle, vec![(1_100 * SECOND_MS, 0)]);
}

/// Regression: a replica that went away (replaced, or reloading after a crash) dropped out
/// of the load reports with its last request, and idleness was counted from when the
/// autoscaler first saw the deployment, hours before.
#[test]
fn idleness_counts_from_the_last_request_seen_even_once_its_replica_is_gone() {
    let bounds = ReplicaPolicy {
        initial: 1,
        min: 0,
        max: 4,
    };
    let mut state = autoscaled(bounds, policy(Some(300 * SECOND_MS)));
    let mut scaler = Autoscaler::new();
    let served = load(0, 0, Some(1_000 * SECOND_MS));
    assert_eq!(
        run(&mut scaler, &mut state, &served, 0, 1_000 * SECOND_MS),
        vec![]
    );
    let forgotten = load(0, 0, None);
    let after = run(
        &mut scaler,
        &mut state,
        &forgotten,
        1_001 * SECOND_MS,
        1_300 * SECOND_MS,
    );
    assert_eq!(
        after,
        vec![(1_300 * SECOND_MS, 0)],
        "300 s after its last request"
    );
}

#[test]
fn without_scale_to_zero_an_idle_deployment_keeps_one_replica() {
    let bounds = ReplicaPolicy {
        initial: 2,
        min: 0,
        max: 4,
    };
    let mut state = autoscaled(bounds, policy(None));
    let mut scaler = Autoscaler::new();
    let changes = run(
        &mut scaler,
        &mut state,
        &load(0, 0, Some(0)),
        0,
        3_600 * SECOND_MS,
    );
    assert_eq!(changes, vec![(600 * SECOND_MS, 1)]);
}

proptest! {
    #[test]
    fn under_a_constant_load_the_count_moves_one_way_and_stays_in_bounds(
        min in 0u32..4,
        extra in 0u32..6,
        initial_offset in 0u32..6,
        target in 1u32..8,
        upscale_s in 0u64..60,
        downscale_s in 0u64..120,
        zero_s in prop::option::of(0u64..200),
        in_flight in 0u64..100,
        step_s in 1u64..20,
    ) {
        let max = (min + extra).max(1);
        let initial = (min + initial_offset).min(max);
        let autoscale = AutoscalePolicy {
            target_ongoing_requests: target,
            upscale_delay_ms: upscale_s * SECOND_MS,
            downscale_delay_ms: downscale_s * SECOND_MS,
            scale_to_zero_after_ms: zero_s.map(|s| s * SECOND_MS),
        };
        let mut state = autoscaled(ReplicaPolicy { initial, min, max }, autoscale);
        let mut scaler = Autoscaler::new();
        let constant = load(in_flight, 0, Some(0));
        let mut seen = vec![initial];
        let mut now_ms = 0;
        while now_ms < 1_000 * SECOND_MS {
            for command in scaler.decide(&state, &constant, now_ms) {
                let outcome = next(&mut state, command.clone());
                prop_assert!(outcome.is_ok(), "{:?} refused: {:?}", command, outcome);
            }
            let desired = state.deployments["m"].replicas_desired;
            prop_assert!(desired >= min && desired <= max);
            if seen.last() != Some(&desired) {
                seen.push(desired);
            }
            now_ms += step_s * SECOND_MS;
        }
        let rising = seen.windows(2).all(|pair| pair[0] < pair[1]);
        let falling = seen.windows(2).all(|pair| pair[0] > pair[1]);
        prop_assert!(rising || falling, "the count oscillated: {:?}", seen);
        // Downwards it may settle at the load's ask and then at zero; upwards in one step.
        prop_assert!(seen.len() <= 3, "too many changes: {:?}", seen);
    }
}
