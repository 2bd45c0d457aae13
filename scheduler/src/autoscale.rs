//! Autoscaler: how many replica groups each autoscaled deployment wants, from its load.
//!
//! The rule, in plain words (also in `scheduler/README.md`): a deployment wants
//! `ceil(requests in flight / target per replica)` replicas, kept within its bounds and at
//! least one. A change waits out a stabilisation window: the load must ask for more (or
//! fewer) replicas for the whole upscale (or downscale) window, and the count then moves
//! only as far as the load asked for during all of the window (the smallest ask for an
//! upscale, the largest for a downscale), so one spike or one lull moves nothing. With no
//! request for its idle period a deployment that allows it scales to zero; at zero, the
//! first request held at the gateway brings it back at once, without a window.
//!
//! The windows need memory of earlier rounds. It lives in [`Autoscaler`], a plain value the
//! leader keeps (not replicated): a new leader starts with empty windows, which only delays
//! its first decision by one window. Given the same inputs it decides the same way.

use crate::command::Command;
use crate::deployment::{AutoscalePolicy, Deployment};
use crate::load::{DeploymentLoad, LoadSnapshot};
use crate::state::ClusterState;
use std::collections::BTreeMap;

/// The autoscaler's memory between rounds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Autoscaler {
    deployments: BTreeMap<String, Memory>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Memory {
    /// The first round that saw the deployment: it has been quiet at least since then.
    first_seen_ms: u64,
    /// The round that last woke it from zero: the held request that woke it reaches the
    /// load reports only after it is answered, so idleness never counts from before this.
    woken_ms: u64,
    /// The latest request any round's load showed. Reports forget a replica that went
    /// away (replaced, or reloading after a crash), and its last request with it.
    last_request_ms: Option<u64>,
    trend: Option<Trend>,
}

/// The load has asked for more (or fewer) replicas since `since_ms`; `bound` is the
/// smallest (or largest) ask in that time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Trend {
    up: bool,
    since_ms: u64,
    bound: u32,
}

/// Replicas the load asks for under `policy`, ignoring windows: never below one (zero is
/// only reached through the idle rule), within `min..=max`.
pub fn recommended_replicas(
    policy: &AutoscalePolicy,
    min: u32,
    max: u32,
    load: &DeploymentLoad,
) -> u32 {
    let ongoing = load.requests_in_flight.saturating_add(load.requests_held);
    let target = u64::from(policy.target_ongoing_requests.max(1));
    let wanted = u32::try_from(ongoing.div_ceil(target)).unwrap_or(u32::MAX);
    wanted.clamp(min.max(1).min(max), max)
}

impl Autoscaler {
    pub fn new() -> Autoscaler {
        Autoscaler::default()
    }

    /// The `SetDesiredReplicas` commands due now, for every autoscaled deployment.
    pub fn decide(
        &mut self,
        state: &ClusterState,
        load: &LoadSnapshot,
        now_ms: u64,
    ) -> Vec<Command> {
        self.deployments
            .retain(|name, _| state.deployments.contains_key(name));
        let mut commands = Vec::new();
        for deployment in state.deployments.values() {
            let Some(policy) = deployment.spec.autoscale else {
                continue;
            };
            let memory = self
                .deployments
                .entry(deployment.name().to_string())
                .or_insert(Memory {
                    first_seen_ms: now_ms,
                    woken_ms: 0,
                    last_request_ms: None,
                    trend: None,
                });
            let empty = DeploymentLoad::default();
            let load = load.deployments.get(deployment.name()).unwrap_or(&empty);
            if let Some(replicas) = decide_one(deployment, &policy, load, memory, now_ms) {
                commands.push(Command::SetDesiredReplicas {
                    deployment: deployment.name().to_string(),
                    replicas,
                });
            }
        }
        commands
    }
}

fn decide_one(
    deployment: &Deployment,
    policy: &AutoscalePolicy,
    load: &DeploymentLoad,
    memory: &mut Memory,
    now_ms: u64,
) -> Option<u32> {
    let bounds = deployment.spec.replicas;
    let current = deployment.replicas_desired;
    if bounds.max == 0 {
        return None;
    }
    let recommended = recommended_replicas(policy, bounds.min, bounds.max, load);
    memory.last_request_ms = memory.last_request_ms.max(load.last_request_ms);
    let ongoing = load.requests_in_flight.saturating_add(load.requests_held);
    if ongoing > 0 {
        // A request running or held now: the deployment is not idle now, whenever that
        // request arrived (a held one waited out the replica's load; a long one started
        // long ago) and whenever a report of its end comes.
        memory.last_request_ms = memory.last_request_ms.max(Some(now_ms));
    }
    if current == 0 {
        // At zero only a held request counts: it brings the deployment back at once.
        memory.trend = None;
        if load.requests_held == 0 {
            return None;
        }
        memory.woken_ms = now_ms;
        return Some(recommended);
    }
    if let Some(idle_ms) = policy.scale_to_zero_after_ms
        && bounds.min == 0
        && ongoing == 0
    {
        let quiet_since_ms = memory
            .last_request_ms
            .unwrap_or(memory.first_seen_ms)
            .max(memory.woken_ms);
        if now_ms.saturating_sub(quiet_since_ms) >= idle_ms {
            memory.trend = None;
            return Some(0);
        }
    }
    if recommended == current {
        memory.trend = None;
        return None;
    }
    let up = recommended > current;
    let trend = match memory.trend {
        Some(trend) if trend.up == up => Trend {
            bound: if up {
                trend.bound.min(recommended)
            } else {
                trend.bound.max(recommended)
            },
            ..trend
        },
        _ => Trend {
            up,
            since_ms: now_ms,
            bound: recommended,
        },
    };
    let window_ms = if up {
        policy.upscale_delay_ms
    } else {
        policy.downscale_delay_ms
    };
    if now_ms.saturating_sub(trend.since_ms) >= window_ms {
        memory.trend = None;
        return Some(trend.bound);
    }
    memory.trend = Some(trend);
    None
}

#[cfg(test)]
mod tests;
