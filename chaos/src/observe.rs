//! What the harness watches while the run goes on: who leads, the replicated state (device
//! reservations, placements), each agent's own memory ledger, and afterwards whether the
//! cluster converged, what its final state is, and which assignments each agent accepted.

use crate::history::{
    AcceptedAssignment, ConvergenceObservation, DeviceObservation, FinalState, LeaderObservation,
    Placement,
};
use crate::net::{agent_address, http_address};
use crate::workload::Recorder;
use serde_json::Value;
use shoal_scheduler::{ClusterState, NodeStatus, ReplicaState};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const POLL_TIMEOUT: Duration = Duration::from_millis(300);

/// Who leads now, by asking every server; `None` when no server claims to.
pub async fn current_leader(http: &reqwest::Client, servers: u64) -> (Option<u64>, u64) {
    let mut best: (Option<u64>, u64) = (None, 0);
    for server in 1..=servers {
        let answer = http
            .get(format!("http://{}/api/v1/cluster", http_address(server)))
            .timeout(POLL_TIMEOUT)
            .send()
            .await;
        let Ok(answer) = answer else { continue };
        let Ok(status) = answer.json::<Value>().await else {
            continue;
        };
        let term = status["term"].as_u64().unwrap_or(0);
        if status["is_leader"] == Value::Bool(true) && term >= best.1 {
            best = (Some(server), term);
        } else if best.0.is_none() && term > best.1 {
            best.1 = term;
        }
    }
    best
}

/// Records every change of leader until `stop`.
pub async fn watch_leaders(servers: u64, recorder: &Recorder, stop: &AtomicBool) {
    let http = shoal_tests::http_client(POLL_TIMEOUT);
    let mut last: Option<(Option<u64>, u64)> = None;
    while !stop.load(Ordering::Relaxed) {
        let now = current_leader(&http, servers).await;
        if last != Some(now) {
            last = Some(now);
            let at = recorder.now();
            recorder.with(|history| {
                history.leaders.push(LeaderObservation {
                    at,
                    leader: now.0,
                    term: now.1,
                });
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `server`'s current view of the replicated state (no read index: what it acts on).
pub async fn state_of(http: &reqwest::Client, server: u64) -> Option<ClusterState> {
    state_after(http, server, 0, 0).await
}

/// `server`'s view once it has applied past `revision`, or after `wait_ms` (a blocking
/// query, the way agents and gateways follow the state).
async fn state_after(
    http: &reqwest::Client,
    server: u64,
    revision: u64,
    wait_ms: u64,
) -> Option<ClusterState> {
    let answer = http
        .get(format!(
            "http://{}/api/v1/state?revision={revision}&wait_ms={wait_ms}",
            http_address(server)
        ))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !answer.status().is_success() {
        return None;
    }
    let bytes = answer.bytes().await.ok()?;
    bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
        .ok()
        .map(|(state, _)| state)
}

/// Reserved bytes per (node, device) in `state`, from the replicas that hold memory.
fn reservations(state: &ClusterState) -> BTreeMap<(u64, u32), u64> {
    let mut reserved = BTreeMap::new();
    for replica in state.replicas.values() {
        if replica.state.holds_memory() {
            *reserved
                .entry((replica.node.0, replica.device.0))
                .or_default() += replica.reserved_bytes;
        }
    }
    reserved
}

/// Records, until `stop`, every server's device reservations and placements, and every
/// agent's own ledger.
pub async fn watch_state(servers: u64, agents: u64, recorder: &Recorder, stop: &AtomicBool) {
    let http = shoal_tests::http_client(Duration::from_secs(2));
    let mut round = 0u64;
    // The revision each server was last seen at: the next look waits for a newer one, so
    // few states go unseen.
    let mut revisions: BTreeMap<u64, u64> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let server = round % servers + 1;
        let revision = revisions.get(&server).copied().unwrap_or(0);
        if let Some(state) = state_after(&http, server, revision, 200).await {
            revisions.insert(server, state.applied_index);
            let at = recorder.now();
            let reserved = reservations(&state);
            recorder.with(|history| {
                for node in state.nodes.values() {
                    for device in &node.devices {
                        history.devices.push(DeviceObservation {
                            at,
                            source: format!("state@server {server}"),
                            node: node.id.0,
                            device: device.id.0,
                            reserved_bytes: reserved
                                .get(&(node.id.0, device.id.0))
                                .copied()
                                .unwrap_or(0),
                            capacity_bytes: device.memory_bytes,
                        });
                    }
                }
                for replica in state.replicas.values() {
                    history.placements.insert(Placement {
                        replica: replica.id.0,
                        epoch: replica.epoch,
                        node: replica.node.0,
                    });
                }
            });
        }
        let agents_due = round.is_multiple_of(4 * servers);
        for agent in (1..=agents).filter(|_| agents_due) {
            if let Some(devices) = agent_ledger(&http, agent).await {
                let at = recorder.now();
                recorder.with(|history| {
                    for (device, (reserved, capacity)) in devices {
                        history.devices.push(DeviceObservation {
                            at,
                            source: format!("agent {agent}"),
                            node: agent,
                            device,
                            reserved_bytes: reserved,
                            capacity_bytes: capacity,
                        });
                    }
                });
            }
        }
        if round.is_multiple_of(servers) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Reserved and total bytes per device from agent `agent`'s `/metrics`.
async fn agent_ledger(http: &reqwest::Client, agent: u64) -> Option<BTreeMap<u32, (u64, u64)>> {
    let text = http
        .get(format!("http://{}/metrics", agent_address(agent)))
        .timeout(POLL_TIMEOUT)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let mut devices: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for line in text.lines() {
        let reserved = line.starts_with("shoal_device_memory_reserved_bytes{");
        let total = line.starts_with("shoal_device_memory_total_bytes{");
        if !reserved && !total {
            continue;
        }
        let device = line
            .split("device=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|id| id.parse::<u32>().ok())?;
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|value| value.parse::<f64>().ok())? as u64;
        let entry = devices.entry(device).or_default();
        if reserved {
            entry.0 = value;
        } else {
            entry.1 = value;
        }
    }
    Some(devices)
}

/// Whether every deployment in `state` has its desired number of ready replica groups.
pub fn convergence(state: &ClusterState) -> (bool, String) {
    let mut missing = Vec::new();
    for deployment in state.deployments.values() {
        let ready = state
            .replicas_of(deployment.name())
            .filter(|replica| replica.shard == 0 && replica.state == ReplicaState::Ready)
            .count() as u32;
        if ready < deployment.replicas_desired {
            missing.push(format!(
                "{}: {ready} of {} ready",
                deployment.name(),
                deployment.replicas_desired
            ));
        }
    }
    for node in state.nodes.values() {
        if node.status == NodeStatus::Down {
            missing.push(format!("node {} down", node.id.0));
        }
    }
    (missing.is_empty(), missing.join("; "))
}

/// Polls the leader's state until it converges or `bound` passes, recording each look.
pub async fn wait_for_convergence(servers: u64, recorder: &Recorder, bound: Duration) -> bool {
    let http = shoal_tests::http_client(Duration::from_secs(2));
    let deadline = std::time::Instant::now() + bound;
    loop {
        let (leader, _) = current_leader(&http, servers).await;
        let state = match leader {
            Some(leader) => state_of(&http, leader).await,
            None => None,
        };
        let (converged, detail) = match &state {
            Some(state) => convergence(state),
            None => (false, "no leader answered".to_string()),
        };
        let at = recorder.now();
        recorder.with(|history| {
            history.convergence.push(ConvergenceObservation {
                at,
                converged,
                detail,
            });
        });
        if converged {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the leader's state holds after healing.
pub fn final_state(state: &ClusterState) -> FinalState {
    FinalState {
        versions: state
            .models
            .iter()
            .map(|(name, model)| (name.clone(), model.versions.keys().copied().collect()))
            .collect(),
        deployments: state
            .deployments
            .values()
            .map(|deployment| (deployment.name().to_string(), deployment.replicas_desired))
            .collect(),
        draining: state
            .nodes
            .values()
            .filter(|node| node.status == NodeStatus::Draining)
            .map(|node| node.id.0)
            .collect(),
        placements: state
            .replicas
            .values()
            .map(|replica| Placement {
                replica: replica.id.0,
                epoch: replica.epoch,
                node: replica.node.0,
            })
            .collect(),
    }
}

/// The assignments agent `agent` accepted, from its JSON log: one incarnation per
/// "agent started" line.
pub fn accepted_assignments(agent: u64, log: &Path) -> Vec<AcceptedAssignment> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut incarnation = 0;
    let mut accepted = Vec::new();
    for line in text.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        // Shoal flattens event fields into the line; nested `fields` is read too.
        let fields = if entry["fields"].is_object() {
            &entry["fields"]
        } else {
            &entry
        };
        match fields["message"].as_str() {
            Some("agent started") => incarnation += 1,
            Some("accepted an assignment") => {
                if let (Some(replica), Some(epoch)) =
                    (fields["replica"].as_u64(), fields["epoch"].as_u64())
                {
                    accepted.push(AcceptedAssignment {
                        agent,
                        incarnation,
                        replica,
                        epoch,
                    });
                }
            }
            _ => {}
        }
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_assignments_are_read_per_incarnation_from_the_json_log() {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let log = dir.path().join("agent.log");
        let lines = [
            r#"{"fields":{"message":"agent started"}}"#,
            r#"{"fields":{"message":"accepted an assignment","replica":4,"epoch":1}}"#,
            "not json",
            r#"{"message":"agent started"}"#,
            r#"{"message":"accepted an assignment","replica":4,"epoch":2}"#,
        ];
        std::fs::write(&log, lines.join("\n")).unwrap_or_else(|error| panic!("{error}"));
        let accepted = accepted_assignments(2, &log);
        assert_eq!(accepted.len(), 2);
        assert_eq!((accepted[0].incarnation, accepted[0].epoch), (1, 1));
        assert_eq!((accepted[1].incarnation, accepted[1].epoch), (2, 2));
    }
}
