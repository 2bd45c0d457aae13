//! The gateway's remote path: send an inference request to a ready replica on some agent.
//! Replicas are picked by least outstanding requests among two chosen at random (power
//! of two choices); a connection that fails before an answer is retried on another
//! replica, since inference is idempotent.

use super::ApiError;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shoal_scheduler::{ClusterState, NodeStatus, ReplicaId, ReplicaState};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Replicas tried for one request before giving up with 502.
const ATTEMPTS_MAX: usize = 3;
/// Longest one forwarded request may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long past the caller's deadline the gateway still waits for an agent: the agent
/// answers 504 at the deadline itself, and that answer has to travel back.
const AGENT_HOP: Duration = Duration::from_secs(1);

/// A replica that can take a request, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub replica: ReplicaId,
    pub address: String,
}

/// Ready, unsharded replicas of `model` at `version` on nodes that are up.
pub fn targets(state: &ClusterState, model: &str, version: u32) -> Vec<Target> {
    state
        .replicas
        .values()
        .filter(|r| r.model == model && r.version == version && r.shard == 0)
        .filter(|r| r.state == ReplicaState::Ready)
        .filter_map(|r| {
            let node = state.nodes.get(&r.node)?;
            (node.status != NodeStatus::Down).then(|| Target {
                replica: r.id,
                address: node.address.clone(),
            })
        })
        .collect()
}

/// Ready replicas of any version of the deployments of `model`: where a request that named
/// no version may go while a rollout moves traffic from one version to another.
pub fn targets_any_version(state: &ClusterState, model: &str) -> Vec<Target> {
    let mut versions: Vec<u32> = state
        .replicas
        .values()
        .filter(|r| r.model == model && r.state == ReplicaState::Ready)
        .map(|r| r.version)
        .collect();
    versions.sort_unstable();
    versions.dedup();
    versions
        .into_iter()
        .flat_map(|version| targets(state, model, version))
        .collect()
}

#[derive(Debug)]
pub struct Gateway {
    http: reqwest::Client,
    /// Requests in flight per replica, for the least-outstanding choice.
    outstanding: Mutex<HashMap<ReplicaId, usize>>,
    random: AtomicU64,
}

/// Decrements a replica's outstanding count when the request ends, however it ends.
struct InFlight<'a> {
    gateway: &'a Gateway,
    replica: ReplicaId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.gateway.outstanding.lock()
            && let Some(count) = counts.get_mut(&self.replica)
        {
            *count = count.saturating_sub(1);
        }
    }
}

impl Gateway {
    pub fn new() -> Result<Gateway, reqwest::Error> {
        Ok(Gateway {
            http: reqwest::Client::builder()
                .timeout(FORWARD_TIMEOUT)
                .build()?,
            outstanding: Mutex::new(HashMap::new()),
            random: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
        })
    }

    fn next_random(&self) -> u64 {
        // xorshift: cheap, and quality does not matter for picking two replicas.
        let mut x = self.random.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random.store(x, Ordering::Relaxed);
        x
    }

    /// A version drawn in proportion to `weights`; `None` when they are all zero.
    pub fn pick_weighted(&self, weights: &[shoal_scheduler::VersionWeight]) -> Option<u32> {
        let total: u64 = weights.iter().map(|w| u64::from(w.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut draw = self.next_random() % total;
        for share in weights {
            let weight = u64::from(share.weight);
            if draw < weight {
                return Some(share.version);
            }
            draw -= weight;
        }
        None
    }

    fn load_of(&self, replica: ReplicaId) -> usize {
        self.outstanding
            .lock()
            .map_or(0, |counts| counts.get(&replica).copied().unwrap_or(0))
    }

    /// Power of two choices over `candidates`, least outstanding wins.
    fn choose<'a>(&self, candidates: &'a [Target]) -> &'a Target {
        if candidates.len() == 1 {
            return &candidates[0];
        }
        let first = (self.next_random() as usize) % candidates.len();
        let mut second = (self.next_random() as usize) % (candidates.len() - 1);
        if second >= first {
            second += 1;
        }
        let (a, b) = (&candidates[first], &candidates[second]);
        if self.load_of(b.replica) < self.load_of(a.replica) {
            b
        } else {
            a
        }
    }

    fn start(&self, replica: ReplicaId) -> InFlight<'_> {
        if let Ok(mut counts) = self.outstanding.lock() {
            *counts.entry(replica).or_insert(0) += 1;
        }
        InFlight {
            gateway: self,
            replica,
        }
    }

    /// Opens a streamed generation on one of `candidates` (retrying others that cannot be
    /// reached or are not serving); the answer's body is the agent's line stream.
    pub async fn open_generation(
        &self,
        mut candidates: Vec<Target>,
        body: Bytes,
    ) -> Result<reqwest::Response, ApiError> {
        let mut last_error = String::from("no ready replica");
        for _ in 0..ATTEMPTS_MAX {
            if candidates.is_empty() {
                break;
            }
            let target = self.choose(&candidates).clone();
            candidates.retain(|candidate| candidate.replica != target.replica);
            let url = format!(
                "http://{}/internal/v1/replicas/{}/generate",
                target.address, target.replica.0
            );
            match self
                .http
                .post(url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
            {
                Ok(answer) if answer.status().is_success() => return Ok(answer),
                Ok(answer) if answer.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    last_error = format!("{} is not serving", target.replica);
                }
                Ok(answer) => {
                    let status = answer.status().as_u16();
                    let text = answer.text().await.unwrap_or_default();
                    let message = serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|body| body["error"].as_str().map(str::to_string))
                        .unwrap_or(text);
                    return Err(match status {
                        400 => ApiError::BadRequest(message),
                        429 => ApiError::Overloaded(message),
                        _ => ApiError::ReplicaFailed(message),
                    });
                }
                Err(error) => last_error = format!("{}: {error}", target.replica),
            }
        }
        Err(ApiError::Unavailable(format!(
            "no replica took the generation; last: {last_error}"
        )))
    }

    /// Sends an Open Inference Protocol body to one of `targets`, retrying others when
    /// a replica cannot be reached or is no longer serving.
    /// `header_bytes` is the binary extension's JSON length, passed on with the body; the
    /// answer keeps the replica's content type and binary header.
    /// `deadline` is the caller's: the agent is told what is left of it, and the wait for
    /// its answer ends a moment after.
    pub async fn forward(
        &self,
        mut candidates: Vec<Target>,
        body: Bytes,
        header_bytes: Option<usize>,
        deadline: tokio::time::Instant,
    ) -> Result<Response, ApiError> {
        let mut last_error = String::new();
        // Whether a replica took the request and then failed to answer it whole, rather
        // than only being out of reach: 502 rather than 503.
        let mut cut_short = false;
        for _ in 0..ATTEMPTS_MAX {
            if candidates.is_empty() {
                break;
            }
            let target = self.choose(&candidates).clone();
            candidates.retain(|candidate| candidate.replica != target.replica);
            let _in_flight = self.start(target.replica);
            let url = format!(
                "http://{}/internal/v1/replicas/{}/infer",
                target.address, target.replica.0
            );
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(ApiError::DeadlineExceeded(
                    "the request's deadline passed before a replica answered".into(),
                ));
            }
            let mut request = self
                .http
                .post(url)
                .timeout(remaining + AGENT_HOP)
                .header(super::TIMEOUT_HEADER, super::whole_millis(remaining))
                .body(body.clone());
            for (name, value) in super::framing(header_bytes) {
                request = request.header(name, value);
            }
            let sent = request.send().await;
            match sent {
                Ok(answer) => {
                    let status = StatusCode::from_u16(answer.status().as_u16())
                        .unwrap_or(StatusCode::BAD_GATEWAY);
                    // The agent frames its answer as this process would; a length it
                    // garbled leaves the body as JSON, for the caller to refuse.
                    let answer_bytes = super::binary_header(answer.headers()).unwrap_or(None);
                    let bytes = match answer.bytes().await {
                        Ok(bytes) => bytes,
                        Err(error) => {
                            last_error = format!("{}: {error}", target.replica);
                            cut_short = true;
                            continue;
                        }
                    };
                    // The replica went away between the state and the request: another.
                    if status == StatusCode::SERVICE_UNAVAILABLE {
                        last_error = format!("{} is not serving", target.replica);
                        continue;
                    }
                    let mut relayed = (status, bytes).into_response();
                    super::set_framing(relayed.headers_mut(), answer_bytes);
                    return Ok(relayed);
                }
                Err(error) if error.is_timeout() => {
                    return Err(ApiError::DeadlineExceeded(format!(
                        "no answer from {} before the request's deadline",
                        target.replica
                    )));
                }
                Err(error) => {
                    tracing::debug!(replica = %target.replica, %error, "replica unreachable; trying another");
                    last_error = format!("{}: {error}", target.replica);
                }
            }
        }
        if last_error.is_empty() {
            return Err(ApiError::Unavailable("no ready replica".into()));
        }
        let message = format!("no replica answered after retries; last: {last_error}");
        Err(if cut_short {
            ApiError::ReplicaFailed(message)
        } else {
            // None could be reached (an agent gone before its lease ran out): no ready
            // replica, for now.
            ApiError::Unavailable(message)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: u64) -> Target {
        Target {
            replica: ReplicaId(id),
            address: format!("127.0.0.1:{id}"),
        }
    }

    #[test]
    fn two_choices_prefer_the_less_loaded_replica() {
        let gateway = Gateway::new().unwrap();
        let candidates = vec![target(1), target(2)];
        let _busy = (0..5)
            .map(|_| gateway.start(ReplicaId(1)))
            .collect::<Vec<_>>();
        for _ in 0..20 {
            assert_eq!(gateway.choose(&candidates).replica, ReplicaId(2));
        }
    }

    #[test]
    fn versions_are_drawn_in_proportion_to_their_weights() {
        let gateway = Gateway::new().unwrap();
        let weights = [
            shoal_scheduler::VersionWeight {
                version: 1,
                weight: 90,
            },
            shoal_scheduler::VersionWeight {
                version: 2,
                weight: 10,
            },
        ];
        let draws = 10_000;
        let second = (0..draws)
            .filter(|_| gateway.pick_weighted(&weights) == Some(2))
            .count();
        assert!(
            (800..1_200).contains(&second),
            "{second} of {draws} went to the 10% version"
        );
        assert_eq!(gateway.pick_weighted(&[]), None);
    }

    #[test]
    fn outstanding_counts_return_to_zero_when_requests_end() {
        let gateway = Gateway::new().unwrap();
        {
            let _one = gateway.start(ReplicaId(3));
            let _two = gateway.start(ReplicaId(3));
            assert_eq!(gateway.load_of(ReplicaId(3)), 2);
        }
        assert_eq!(gateway.load_of(ReplicaId(3)), 0);
    }

    #[tokio::test]
    async fn unreachable_replicas_are_each_tried_then_reported_unavailable() {
        let gateway = Gateway::new().unwrap();
        // Nothing listens on these ports: no replica took the request, so it is 503 (no
        // ready replica for now), not 502 (a model that failed on it).
        let error = gateway
            .forward(
                vec![target(1), target(2)],
                Bytes::from_static(b"{}"),
                None,
                tokio::time::Instant::now() + Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, ApiError::Unavailable(_)), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("no replica answered after retries"),
            "{message}"
        );
    }
}
