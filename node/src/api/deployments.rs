//! Deployments over HTTP: apply (create or update) from a small operator-facing shape,
//! scale, delete. Writes that land on a follower are forwarded to the leader.

use super::cluster::{WriteRequest, Written, propose};
use super::{AdminError, ApiError, AppState};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shoal_scheduler::{
    AutoscalePolicy, BatchingPolicy, Command, DeploymentSpec, ReplicaPolicy, RollbackReason,
    VersionSelector, VersionWeight,
};
use std::sync::Arc;

/// What an operator writes (as TOML for `shoal deploy apply -f`, or as JSON here). Fields
/// left out take the defaults of a fixed-size deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentFile {
    pub name: String,
    pub model: String,
    /// A version number; or give `alias` instead.
    #[serde(default)]
    pub version: Option<u32>,
    /// Follow whatever version this alias names.
    #[serde(default)]
    pub alias: Option<String>,
    /// Run several versions at once, each taking a share of replicas and traffic by weight.
    #[serde(default)]
    pub split: Option<Vec<VersionWeight>>,
    /// Replicas to start with (and to keep, without autoscaling).
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default)]
    pub autoscale: Option<AutoscaleFile>,
    #[serde(default)]
    pub batching: Option<BatchingPolicy>,
    /// The 99th percentile latency promised to callers, in milliseconds; an alert fires
    /// when the deployment's model is slower.
    #[serde(default)]
    pub latency_objective_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

/// Most replica groups one deployment may ask for: beyond any fleet one control plane
/// places for, so a typo (`replicas = 100000`) is refused instead of reserving every
/// device's memory.
pub const REPLICAS_MAX: u32 = 1_000;

/// Refuses a replica count past [`REPLICAS_MAX`].
fn check_replicas(what: &str, replicas: u32) -> Result<(), String> {
    if replicas > REPLICAS_MAX {
        return Err(format!(
            "{what} is {replicas}; a deployment may have at most {REPLICAS_MAX} replicas"
        ));
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleFile {
    pub min: u32,
    pub max: u32,
    pub target_ongoing_requests: u32,
    #[serde(default = "upscale_delay_ms")]
    pub upscale_delay_ms: u64,
    #[serde(default = "downscale_delay_ms")]
    pub downscale_delay_ms: u64,
    #[serde(default)]
    pub scale_to_zero_after_ms: Option<u64>,
}

fn upscale_delay_ms() -> u64 {
    3_000
}

fn downscale_delay_ms() -> u64 {
    30_000
}

impl DeploymentFile {
    /// The scheduler's spec; refuses contradictions before anything is proposed.
    pub fn spec(&self) -> Result<DeploymentSpec, String> {
        let versions = match (&self.version, &self.alias, &self.split) {
            (Some(version), None, None) => VersionSelector::Version(*version),
            (None, Some(alias), None) => VersionSelector::Alias(alias.clone()),
            (None, None, Some(split)) if split.iter().any(|share| share.weight > 0) => {
                VersionSelector::Split(split.clone())
            }
            _ => {
                return Err("give exactly one of `version`, `alias` and a non-zero `split`".into());
            }
        };
        check_replicas("replicas", self.replicas)?;
        let mut spec = DeploymentSpec::new(&self.name, &self.model, 0, self.replicas);
        spec.versions = versions;
        if self.latency_objective_ms == Some(0) {
            return Err("latency_objective_ms must be at least 1".into());
        }
        spec.latency_objective_ms = self.latency_objective_ms;
        if let Some(batching) = self.batching {
            spec.batching = batching;
        }
        if let Some(autoscale) = &self.autoscale {
            if autoscale.min > autoscale.max || autoscale.target_ongoing_requests == 0 {
                return Err("autoscale needs min <= max and a target of at least 1".into());
            }
            if autoscale.max == 0 {
                return Err(
                    "autoscale needs max >= 1: a deployment that may never have a \
                            replica serves nothing"
                        .into(),
                );
            }
            check_replicas("autoscale max", autoscale.max)?;
            spec.replicas = ReplicaPolicy {
                initial: self.replicas.clamp(autoscale.min, autoscale.max),
                min: autoscale.min,
                max: autoscale.max,
            };
            spec.autoscale = Some(AutoscalePolicy {
                target_ongoing_requests: autoscale.target_ongoing_requests,
                upscale_delay_ms: autoscale.upscale_delay_ms,
                downscale_delay_ms: autoscale.downscale_delay_ms,
                scale_to_zero_after_ms: autoscale.scale_to_zero_after_ms,
            });
        }
        Ok(spec)
    }
}

/// `POST /api/v1/deployments`: creates the deployment, or updates it if it exists.
pub async fn apply(
    State(app): State<Arc<AppState>>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let file: DeploymentFile = write.json()?;
    let spec = file.spec().map_err(ApiError::BadRequest)?;
    let exists = app.control.state().deployments.contains_key(&file.name);
    let command = if exists {
        Command::UpdateDeployment { spec }
    } else {
        Command::CreateDeployment { spec }
    };
    match propose(&app, write, &command).await? {
        Written::Forwarded(response) => Ok(response),
        Written::Here(outcome) => {
            let status = if exists {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let body = serde_json::json!({"name": file.name, "outcome": format!("{outcome:?}")});
            Ok((status, Json(body)).into_response())
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    replicas: u32,
}

/// `POST /api/v1/deployments/{name}/scale`: a new size for a fixed deployment, or a count
/// within an autoscaled one's bounds.
pub async fn scale(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let scale: Scale = write.json()?;
    check_replicas("replicas", scale.replicas).map_err(ApiError::BadRequest)?;
    let state = app.control.state();
    let Some(deployment) = state.deployments.get(&name) else {
        return Err(ApiError::NotFound(format!("unknown deployment {name:?}")).into());
    };
    // A fixed-size deployment changes its size; an autoscaled one moves within its bounds.
    let command = if deployment.spec.autoscale.is_none() {
        let mut spec = deployment.spec.clone();
        spec.replicas = ReplicaPolicy::fixed(scale.replicas);
        Command::UpdateDeployment { spec }
    } else {
        Command::SetDesiredReplicas {
            deployment: name.clone(),
            replicas: scale.replicas,
        }
    };
    match propose(&app, write, &command).await? {
        Written::Forwarded(response) => Ok(response),
        Written::Here(_) => {
            Ok(Json(serde_json::json!({"name": name, "replicas": scale.replicas})).into_response())
        }
    }
}

/// `POST /api/v1/deployments/{name}/rollback`: abandons a rollout in progress (the old
/// version's replicas are still warm), or, with none, rolls out the version the deployment
/// ran before its last rollout, pinned (an alias it followed is no longer followed).
pub async fn rollback(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let state = app.control.state();
    let Some(deployment) = state.deployments.get(&name) else {
        return Err(ApiError::NotFound(format!("unknown deployment {name:?}")).into());
    };
    let mut unpinned = None;
    let command = match &deployment.rollout {
        Some(rollout) => Command::RollbackRollout {
            deployment: name.clone(),
            version: rollout.to,
            reason: RollbackReason::Operator,
        },
        None if matches!(deployment.spec.versions, VersionSelector::Split(_)) => {
            return Err(ApiError::Conflict(format!(
                "{name} splits its traffic between versions and no rollout is in progress; \
                 to go back, apply its file with the split (or the single version) wanted"
            ))
            .into());
        }
        None => {
            let previous = deployment.previous_version.ok_or_else(|| {
                ApiError::Conflict(format!(
                    "{name} runs version {} and no rollout is in progress; it ran no \
                     version before this one to return to",
                    deployment.stable_version
                ))
            })?;
            if let VersionSelector::Alias(alias) = &deployment.spec.versions {
                // The deployment is pinned: going back must not be undone by the alias
                // it followed, which still names the version rolled back from.
                unpinned = Some(alias.clone());
            }
            let mut spec = deployment.spec.clone();
            spec.versions = VersionSelector::Version(previous);
            Command::UpdateDeployment { spec }
        }
    };
    let request = write;
    match propose(&app, request, &command).await? {
        Written::Forwarded(response) => Ok(response),
        Written::Here(outcome) => {
            let mut answer = serde_json::json!({"name": name, "outcome": format!("{outcome:?}")});
            if let Some(alias) = unpinned {
                answer["note"] = serde_json::json!(format!(
                    "{name} no longer follows alias {alias:?}; apply its file to follow it again"
                ));
            }
            Ok(Json(answer).into_response())
        }
    }
}

/// `DELETE /api/v1/deployments/{name}`.
pub async fn delete(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let command = Command::DeleteDeployment { name: name.clone() };
    match propose(&app, write, &command).await? {
        Written::Forwarded(response) => Ok(response),
        Written::Here(_) => Ok(Json(serde_json::json!({"deleted": name})).into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> DeploymentFile {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_minimal_file_is_a_fixed_deployment_of_one_version() {
        let spec = file("name = \"iris\"\nmodel = \"iris\"\nversion = 2\nreplicas = 3\n")
            .spec()
            .unwrap();
        assert_eq!(spec, DeploymentSpec::new("iris", "iris", 2, 3));
    }

    /// Regression: `replicas = 100000` on one device was accepted and reserved the whole
    /// device for about 1,500 groups; an autoscale range of 0..=0 could never serve.
    #[test]
    fn replica_counts_past_the_limit_and_an_autoscaler_that_may_never_run_one_are_refused() {
        let refused = |text: &str| file(text).spec().unwrap_err();
        let error = refused("name = \"m\"\nmodel = \"m\"\nversion = 1\nreplicas = 100000\n");
        assert!(error.contains("at most 1000"), "{error}");
        let error = refused(
            "name = \"m\"\nmodel = \"m\"\nversion = 1\n\
             [autoscale]\nmin = 0\nmax = 0\ntarget_ongoing_requests = 1\n",
        );
        assert!(error.contains("max >= 1"), "{error}");
        let error = refused(
            "name = \"m\"\nmodel = \"m\"\nversion = 1\n\
             [autoscale]\nmin = 1\nmax = 5000\ntarget_ongoing_requests = 1\n",
        );
        assert!(error.contains("autoscale max is 5000"), "{error}");
        let limit =
            format!("name = \"m\"\nmodel = \"m\"\nversion = 1\nreplicas = {REPLICAS_MAX}\n");
        assert!(file(&limit).spec().is_ok());
    }

    #[test]
    fn autoscaling_bounds_the_initial_count() {
        let spec = file(
            "name = \"m\"\nmodel = \"m\"\nalias = \"stable\"\nreplicas = 9\n\
             [autoscale]\nmin = 0\nmax = 4\ntarget_ongoing_requests = 2\nscale_to_zero_after_ms = 60000\n",
        )
        .spec()
        .unwrap();
        assert_eq!(spec.replicas.initial, 4);
        assert_eq!(spec.versions, VersionSelector::Alias("stable".into()));
        assert_eq!(spec.autoscale.unwrap().scale_to_zero_after_ms, Some(60_000));
    }

    #[test]
    fn contradictions_and_unknown_fields_are_refused() {
        assert!(file("name = \"m\"\nmodel = \"m\"\n").spec().is_err());
        assert!(
            file("name = \"m\"\nmodel = \"m\"\nversion = 1\nalias = \"a\"\n")
                .spec()
                .is_err()
        );
        assert!(
            toml::from_str::<DeploymentFile>("name = \"m\"\nmodel = \"m\"\nreplica = 2\n").is_err()
        );
    }
}
