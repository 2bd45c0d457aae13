//! Open Inference Protocol v2 handlers: health, metadata, readiness and infer.

use super::oip::{self, InferResponse, ModelMetadata, TensorMetadata};
use super::{ApiError, AppState};
use crate::load::HeldRequest;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use shoal_actors::agent::{Route, Routes};
use shoal_actors::batcher::InferError;
use shoal_actors::tensor::validate_inputs;
use shoal_scheduler::{ClusterState, ModelVersion, Signature, VersionSelector};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Longest a request may take from arrival to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The metric label for a model name nobody deployed: keeps label values bounded.
const UNKNOWN_MODEL_LABEL: &str = "_unknown";

/// The metric label for the version of a request refused before a version was chosen.
const UNRESOLVED_VERSION_LABEL: &str = "none";

pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"live": true}))
}

pub async fn server_metadata() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "name": "shoal",
        "version": shoal_ops::VERSION,
        "extensions": ["binary_tensor_data"],
    }))
}

/// 200 when the control plane has a leader and every deployment not scaled to zero, and
/// every required model, has a serving replica.
pub async fn ready(State(app): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    if app.control.raft_status().leader.is_none() {
        return Err(ApiError::Unavailable(
            "the control plane has no leader".into(),
        ));
    }
    let state = app.control.state();
    let routes = app.routes.borrow().clone();
    // A deployment is served when a replica runs here or on any agent; one scaled to zero
    // waits for its first request, which is served by holding it.
    let waiting: Vec<&str> = state
        .deployments
        .values()
        .filter(|deployment| deployment.replicas_desired > 0)
        .map(|deployment| deployment.model())
        .chain(app.required_models.iter().map(String::as_str))
        .filter(|model| {
            routes.for_model(model).is_empty()
                && (app.embedded || super::gateway::targets_any_version(&state, model).is_empty())
        })
        .collect();
    if !waiting.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "no ready replica yet for: {}",
            waiting.join(", ")
        )));
    }
    Ok(Json(serde_json::json!({"ready": true})))
}

/// The version a request addresses: the one given, else the one deployed.
pub(super) fn resolve<'a>(
    state: &'a ClusterState,
    model: &str,
    version: Option<&str>,
) -> Result<&'a ModelVersion, ApiError> {
    let Some(known) = state.models.get(model) else {
        return Err(ApiError::NotFound(format!("unknown model {model:?}")));
    };
    let number = match version {
        Some(text) => text.parse::<u32>().map_err(|_| {
            ApiError::BadRequest(format!("version {text:?} is not a version number"))
        })?,
        None => state
            .deployments
            .values()
            .find(|deployment| deployment.model() == model)
            .map(|deployment| deployment.stable_version)
            .or_else(|| known.versions.keys().next_back().copied())
            .ok_or_else(|| ApiError::NotFound(format!("model {model:?} has no versions")))?,
    };
    known
        .versions
        .get(&number)
        .ok_or_else(|| ApiError::NotFound(format!("model {model:?} has no version {number}")))
}

fn metadata(
    state: &ClusterState,
    model: &str,
    version: Option<&str>,
) -> Result<ModelMetadata, ApiError> {
    let resolved = resolve(state, model, version)?;
    let versions = match version {
        Some(_) => vec![resolved.version.to_string()],
        None => state.models[model]
            .versions
            .keys()
            .map(u32::to_string)
            .collect(),
    };
    Ok(ModelMetadata {
        name: model.to_string(),
        versions,
        platform: format!("shoal_{}", resolved.format),
        inputs: resolved
            .signature
            .inputs
            .iter()
            .map(TensorMetadata::from)
            .collect(),
        outputs: resolved
            .signature
            .outputs
            .iter()
            .map(TensorMetadata::from)
            .collect(),
    })
}

pub async fn model_metadata(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<ModelMetadata>, ApiError> {
    metadata(&app.control.state(), &model, None).map(Json)
}

pub async fn version_metadata(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<ModelMetadata>, ApiError> {
    metadata(&app.control.state(), &model, Some(&version)).map(Json)
}

fn model_is_ready(
    app: &AppState,
    model: &str,
    version: Option<&str>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let state = app.control.state();
    let resolved = resolve(&state, model, version)?;
    let routes = app.routes.borrow().clone();
    let serving = routes
        .for_model(model)
        .iter()
        .any(|route| version.is_none() || route.version == resolved.version);
    if !serving {
        return Err(ApiError::Unavailable(format!(
            "model {model:?} has no ready replica"
        )));
    }
    Ok(Json(serde_json::json!({"name": model, "ready": true})))
}

pub async fn model_ready(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    model_is_ready(&app, &model, None)
}

pub async fn version_ready(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    model_is_ready(&app, &model, Some(&version))
}

pub async fn infer(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    observed(&app, model, None, &headers, body).await
}

pub async fn version_infer(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    observed(&app, model, Some(version), &headers, body).await
}

/// `model` as a metric label: a name nobody registered gets one shared label, so label
/// values stay bounded.
pub(super) fn model_label<'a>(app: &AppState, model: &'a str) -> &'a str {
    if app.control.state().models.contains_key(model) {
        model
    } else {
        UNKNOWN_MODEL_LABEL
    }
}

/// One inference request in the gateway metrics: counted in flight while it lives, then
/// counted and timed by the version that served it and the status it was answered with.
pub(super) struct Observed {
    model: String,
    started: Instant,
    in_flight: prometheus::IntGauge,
}

impl Observed {
    pub(super) fn start(app: &AppState, model: &str) -> Observed {
        let model = model_label(app, model);
        let in_flight = shoal_ops::metrics::metrics()
            .requests_in_flight
            .with_label_values(&[model]);
        in_flight.inc();
        Observed {
            model: model.to_string(),
            started: Instant::now(),
            in_flight,
        }
    }

    /// Records the answer: `version` is the one that served it, `None` when none was chosen.
    pub(super) fn finish(self, version: Option<u32>, status: axum::http::StatusCode) {
        let version =
            version.map_or_else(|| UNRESOLVED_VERSION_LABEL.to_string(), |v| v.to_string());
        let metrics = shoal_ops::metrics::metrics();
        metrics
            .requests_total
            .with_label_values(&[&self.model, &version, status.as_str()])
            .inc();
        metrics
            .request_duration_seconds
            .with_label_values(&[&self.model, &version])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// Runs [`serve`] and records its outcome in the request metrics.
pub(super) async fn observed(
    app: &AppState,
    model: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let observed = Observed::start(app, &model);
    let mut served = None;
    let result = match app.admission.admit(&model) {
        Some(_admitted) => serve(app, &model, version.as_deref(), headers, body, &mut served).await,
        None => Err(ApiError::Overloaded(format!(
            "model {model:?} has {} requests in flight here, its limit; retry later",
            app.admission.limit()
        ))),
    };
    let status = match &result {
        Ok(response) => response.status(),
        Err(error) => error.status(),
    };
    observed.finish(served, status);
    if let Err(error) = &result {
        tracing::debug!(model = %model, status = %error.status(), %error, "inference request refused");
    }
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Most rows one request may carry: a batch a replica can take in a few passes, not a
/// job that holds it for minutes.
pub(super) const ROWS_PER_REQUEST_MAX: usize = 1_024;

/// For a request that names no version: the version its deployment's traffic split (or
/// rollout in progress) sends it to, drawn by weight.
fn split_version(app: &AppState, state: &ClusterState, model: &str) -> Option<u32> {
    let deployment = state.deployments.values().find(|d| d.model() == model)?;
    let mut ready_groups = std::collections::BTreeMap::new();
    for replica in state.replicas_of(deployment.name()) {
        if replica.shard == 0 && replica.state == shoal_scheduler::ReplicaState::Ready {
            *ready_groups.entry(replica.version).or_insert(0u32) += 1;
        }
    }
    let weights = shoal_scheduler::rollout::traffic(deployment, &ready_groups);
    app.gateway.pick_weighted(&weights)
}

/// The version that answers a request for `version` of `model`: the one named, else the
/// one its deployment's traffic split draws, else the deployed one.
pub(super) fn chosen_version<'a>(
    app: &AppState,
    state: &'a ClusterState,
    model: &str,
    version: Option<&str>,
) -> Result<&'a ModelVersion, ApiError> {
    let resolved = resolve(state, model, version)?;
    if version.is_none()
        && let Some(chosen) = split_version(app, state, model)
        && let Some(split) = state.version(model, chosen)
    {
        return Ok(split);
    }
    Ok(resolved)
}

/// A caller may ask for a shorter deadline than [`REQUEST_TIMEOUT`] with this header.
pub const TIMEOUT_HEADER: &str = "x-shoal-timeout-ms";

/// What is left of a deadline, as [`TIMEOUT_HEADER`] and the agents' generate requests
/// carry it.
pub(crate) fn whole_millis(remaining: Duration) -> u64 {
    u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX)
}

/// The request's deadline budget: the caller's, capped at [`REQUEST_TIMEOUT`]; a 400 when
/// the caller's is not a whole number of milliseconds (ignoring it would give a caller
/// who meant a short deadline the longest one).
pub(crate) fn request_timeout(headers: &HeaderMap) -> Result<Duration, ApiError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(REQUEST_TIMEOUT);
    };
    let milliseconds = value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{TIMEOUT_HEADER} must be a whole number of milliseconds, not {:?}",
                String::from_utf8_lossy(value.as_bytes())
            ))
        })?;
    Ok(Duration::from_millis(milliseconds).min(REQUEST_TIMEOUT))
}

/// A deadline budget in words: whole seconds as `30 s`, anything else as `250 ms`.
fn timeout_text(timeout: Duration) -> String {
    if timeout.subsec_millis() == 0 && timeout.as_secs() > 0 {
        format!("{} s", timeout.as_secs())
    } else {
        format!("{} ms", whole_millis(timeout))
    }
}

/// Requests held at once for one deployment scaled to zero; beyond this, 503.
const HELD_REQUESTS_MAX: u64 = 1_024;

/// The deployment of `model` when the autoscaler scaled it to zero and will bring it back
/// for a request, so the request may be held until a replica is; else why it is refused
/// (503). One an operator set to zero replicas stays there: holding would only delay the
/// refusal.
fn scaled_to_zero(state: &ClusterState, model: &str, version: u32) -> Result<String, ApiError> {
    let scaled_to_zero = state.deployments.values().find(|deployment| {
        deployment.model() == model
            && deployment.replicas_desired == 0
            && deployment.spec.autoscale.is_some()
            && deployment.spec.replicas.max > 0
    });
    let Some(deployment) = scaled_to_zero else {
        return Err(ApiError::Unavailable(format!(
            "model {model:?} version {version} has no ready replica yet"
        )));
    };
    Ok(deployment.name().to_string())
}

/// Counts a request held for `deployment` until the guard is dropped; 503 beyond
/// [`HELD_REQUESTS_MAX`].
fn hold<'a>(app: &'a AppState, deployment: &'a str) -> Result<HeldRequest<'a>, ApiError> {
    app.load
        .hold(deployment, HELD_REQUESTS_MAX)
        .map_err(|held| {
            ApiError::Unavailable(format!(
                "{deployment} is scaling up from zero and already holds {held} requests"
            ))
        })
}

fn not_back_in_time(deployment: &str) -> ApiError {
    ApiError::Unavailable(format!(
        "{deployment} did not scale up from zero in time; retry"
    ))
}

/// Where a follower passes a request that must be held for a deployment scaled to zero:
/// the leader, whose autoscaler counts held requests. `None` on the leader, without one,
/// and for a request another server passed on already.
pub(super) fn leader_to_hold_at<'a>(
    app: &'a AppState,
    headers: &HeaderMap,
) -> Option<(u64, &'a super::cluster::Forwarder)> {
    let status = app.control.raft_status();
    if status.is_leader || headers.contains_key(super::cluster::FORWARDED_HEADER) {
        return None;
    }
    Some((status.leader?, app.forwarder.as_ref()?))
}

/// For a deployment scaled to zero: holds the request, counted so the autoscaler brings a
/// replica back, until one is ready on an agent or the deadline passes (then 503).
pub(super) async fn hold_for_scale_up(
    app: &AppState,
    model: &str,
    version: u32,
    deadline: tokio::time::Instant,
) -> Result<Vec<super::gateway::Target>, ApiError> {
    let name = scaled_to_zero(&app.control.state(), model, version)?;
    let _held = hold(app, &name)?;
    let mut states = app.control.watch_state();
    let found = tokio::time::timeout_at(deadline, async {
        loop {
            let targets = super::gateway::targets(&states.borrow_and_update(), model, version);
            if !targets.is_empty() {
                return Some(targets);
            }
            if states.changed().await.is_err() {
                return None;
            }
        }
    })
    .await;
    match found {
        Ok(Some(targets)) => Ok(targets),
        _ => Err(not_back_in_time(&name)),
    }
}

/// `shoal up`'s [`hold_for_scale_up`]: until a replica of `version` serves in this
/// process; the routes then.
pub(super) async fn hold_for_own_replica(
    app: &AppState,
    model: &str,
    version: u32,
    deadline: tokio::time::Instant,
) -> Result<Arc<Routes>, ApiError> {
    let name = scaled_to_zero(&app.control.state(), model, version)?;
    let _held = hold(app, &name)?;
    let mut routes = app.routes.clone();
    let serving = |routes: &Arc<Routes>| !serving_here(routes, model, version).is_empty();
    match tokio::time::timeout_at(deadline, routes.wait_for(serving)).await {
        Ok(Ok(routes)) => Ok(routes.clone()),
        _ => Err(not_back_in_time(&name)),
    }
}

async fn serve(
    app: &AppState,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    served: &mut Option<u32>,
) -> Result<Response, ApiError> {
    let timeout = request_timeout(headers)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let body = body?;
    let header_bytes = binary_header(headers)?;
    let state = app.control.state();
    let resolved = chosen_version(app, &state, model, version)?;
    *served = Some(resolved.version);

    let routes = app.routes.borrow().clone();
    let candidates = serving_here(&routes, model, resolved.version);
    if candidates.is_empty() && !app.embedded {
        // No replica in this process: send it to one on an agent.
        let mut targets = super::gateway::targets(&state, model, resolved.version);
        let this_version = !targets.is_empty();
        if targets.is_empty() && version.is_none() {
            // Mid-rollout the deployment's version may have no ready replica yet (or any
            // more); a request that named no version goes to the one that has.
            targets = super::gateway::targets_any_version(&state, model);
        }
        if !targets.is_empty() {
            // The agent reads and checks the request against the model it runs (see
            // `check_request`) and answers 400 or 413 itself: reading it here as well
            // would cost the gateway as much again for every request.
            let forwarded = app
                .gateway
                .forward(targets, body.clone(), header_bytes, deadline)
                .await;
            if let Err(ApiError::ReplicaFailed(_) | ApiError::Unavailable(_)) = forwarded
                && this_version
            {
                // No agent checked it: a bad request is still told what is wrong with it,
                // not that the agents are away. (Against the version it was meant for:
                // one sent to another version mid-rollout keeps the agents' error.)
                let request =
                    oip::read_request(&body, header_bytes).map_err(ApiError::BadRequest)?;
                check_request(&resolved.signature, model, &request)?;
            }
            return forwarded;
        }
    }

    if candidates.is_empty() && version.is_some() && !deployed(&state, model, resolved.version) {
        // Nothing will ever serve it: a 503 would have the caller retry forever.
        return Err(ApiError::NotFound(format!(
            "version {} of {model} is not deployed",
            resolved.version
        )));
    }

    // Served here, held, or passed to the leader: read and check it first, so a bad
    // request is refused at once and never wakes a deployment scaled to zero.
    let mut request = oip::read_request(&body, header_bytes).map_err(ApiError::BadRequest)?;
    check_request(&resolved.signature, model, &request)?;
    let held_for;
    let candidates = if candidates.is_empty() && app.embedded {
        held_for = hold_for_own_replica(app, model, resolved.version, deadline).await?;
        serving_here(&held_for, model, resolved.version)
    } else {
        candidates
    };
    if candidates.is_empty() {
        if let Some((leader, forwarder)) = leader_to_hold_at(app, headers) {
            let path = match version {
                Some(version) => format!("/v2/models/{model}/versions/{version}/infer"),
                None => format!("/v2/models/{model}/infer"),
            };
            let sent = super::cluster::AsSent {
                path,
                headers: headers.clone(),
                body,
            };
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            return forwarder
                .forward_held(&app.control, leader, sent, remaining)
                .await;
        }
        let targets = hold_for_scale_up(app, model, resolved.version, deadline).await?;
        return app
            .gateway
            .forward(targets, body, header_bytes, deadline)
            .await;
    }
    let inputs = std::mem::take(&mut request.inputs);
    let position = app.next_route.fetch_add(1, Ordering::Relaxed) % candidates.len();
    let route = candidates[position];
    let _tracked = app
        .traffic
        .as_ref()
        .map(|traffic| traffic.track(route.replica.0, Instant::now()));
    let outputs = route
        .handle
        .infer(inputs, deadline)
        .await
        .map_err(|error| match error {
            InferError::Input(input) => ApiError::BadRequest(input.to_string()),
            InferError::Overloaded => {
                ApiError::Overloaded(format!("model {model:?} is overloaded; retry later"))
            }
            InferError::DeadlineExceeded => {
                ApiError::DeadlineExceeded(format!("no answer within {}", timeout_text(timeout)))
            }
            InferError::Stopped | InferError::Draining => {
                ApiError::Unavailable(format!("the replica of {model:?} stopped; retry"))
            }
            InferError::Model(message) => ApiError::ReplicaFailed(message),
        })?;
    Ok(answer(model, route.version, outputs, &request))
}

/// Whether a deployment of `model` selects `version` (by number, by alias, in its traffic
/// split, as its stable version or as the target of a rollout in progress) or still runs
/// a replica of it: only then may a replica of it come, and a request wait for one.
fn deployed(state: &ClusterState, model: &str, version: u32) -> bool {
    let aliases = state.models.get(model).map(|known| &known.aliases);
    state
        .deployments
        .values()
        .filter(|deployment| deployment.model() == model)
        .any(|deployment| {
            let selected = match &deployment.spec.versions {
                VersionSelector::Version(selected) => *selected == version,
                VersionSelector::Alias(alias) => {
                    aliases.and_then(|aliases| aliases.get(alias)) == Some(&version)
                }
                VersionSelector::Split(split) => split.iter().any(|share| share.version == version),
            };
            selected
                || deployment.stable_version == version
                || deployment
                    .rollout
                    .is_some_and(|rollout| rollout.to == version)
                || state
                    .replicas_of(deployment.name())
                    .any(|replica| replica.version == version)
        })
}

/// The replicas of `version` of `model` that serve in this process.
pub(super) fn serving_here<'a>(routes: &'a Routes, model: &str, version: u32) -> Vec<&'a Route> {
    routes
        .for_model(model)
        .iter()
        .filter(|route| route.version == version)
        .collect()
}

/// Checks a read request against the signature of the model that will run it: its inputs
/// (names, types, shapes), its row count against [`ROWS_PER_REQUEST_MAX`], and the outputs
/// it names. Wherever a request is served (in this process or on an agent) it passes here
/// first.
pub(crate) fn check_request(
    signature: &Signature,
    model: &str,
    request: &oip::Request,
) -> Result<(), ApiError> {
    let rows = validate_inputs(signature, &request.inputs)
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    if rows > ROWS_PER_REQUEST_MAX {
        return Err(ApiError::TooManyRows(format!(
            "{rows} rows in one request; the limit is {ROWS_PER_REQUEST_MAX}, split the batch"
        )));
    }
    if let Some(unknown) = request.outputs.iter().find(|wanted| {
        !signature
            .outputs
            .iter()
            .any(|spec| spec.name == wanted.name)
    }) {
        return Err(ApiError::BadRequest(format!(
            "model {model:?} has no output {:?}",
            unknown.name
        )));
    }
    Ok(())
}

/// The binary extension's JSON length, when the request carries its header.
pub(crate) fn binary_header(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    let Some(value) = headers.get(oip::BINARY_HEADER_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::BadRequest(format!("{} is not a byte count", oip::BINARY_HEADER_LENGTH))
        })
}

/// A replica's outputs as the answer to `request`: the outputs it asked for, as JSON or,
/// those it asked for so, as binary tensor data after the JSON.
pub(crate) fn answer(
    model: &str,
    version: u32,
    outputs: Vec<shoal_actors::tensor::NamedTensor>,
    request: &oip::Request,
) -> Response {
    let response = InferResponse {
        model_name: model.to_string(),
        model_version: version.to_string(),
        outputs: outputs
            .into_iter()
            .filter(|output| request.wants(&output.name))
            .map(oip::to_output)
            .collect(),
        id: request.id.clone(),
    };
    if let Some(refusal) = unwritable_in_json(&response, request) {
        return ApiError::ReplicaFailed(refusal).into_response();
    }
    let (body, header_bytes) = oip::encode_response(response, |name| request.binary(name));
    let mut answer = body.into_response();
    set_framing(answer.headers_mut(), header_bytes);
    answer
}

/// Why an answer cannot be written as asked: an FP32 output to be answered in JSON holds a
/// NaN or an infinity, which JSON has no number for (serde writes `null`, which a client
/// reads as a missing value, or fails on). As binary tensor data the same output goes
/// through bit for bit.
fn unwritable_in_json(response: &InferResponse, request: &oip::Request) -> Option<String> {
    response.outputs.iter().find_map(|output| {
        let Some(oip::ResponseData::Fp32(values)) = &output.data else {
            return None;
        };
        if request.binary(&output.name) {
            return None;
        }
        let index = values.iter().position(|value| !value.is_finite())?;
        Some(format!(
            "the model answered {} at element {index} of output {:?}, which JSON cannot \
             carry (an Open Inference Protocol request can ask for the output as binary \
             tensor data)",
            values[index], output.name
        ))
    })
}

/// The headers that frame an inference body, request or answer: JSON, or (with the
/// length of its JSON part) JSON followed by binary tensor data. Every hop that passes a
/// body on — gateway to agent, follower to leader, and back — sends these with it.
pub(crate) fn framing(header_bytes: Option<usize>) -> Vec<(HeaderName, HeaderValue)> {
    match header_bytes {
        None => vec![(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        Some(header_bytes) => vec![
            (
                CONTENT_TYPE,
                HeaderValue::from_static(oip::BINARY_CONTENT_TYPE),
            ),
            (
                HeaderName::from_static(oip::BINARY_HEADER_LENGTH),
                HeaderValue::from(header_bytes),
            ),
        ],
    }
}

/// Frames an answer's body: replaces whatever content type its body type gave it.
pub(crate) fn set_framing(headers: &mut HeaderMap, header_bytes: Option<usize>) {
    for (name, value) in framing(header_bytes) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::fixtures::{applied, version};
    use shoal_scheduler::{Command, DeploymentSpec, VersionWeight};

    fn deployment(name: &str, versions: VersionSelector) -> Command {
        let mut spec = DeploymentSpec::new(name, "iris", 0, 1);
        spec.versions = versions;
        Command::CreateDeployment { spec }
    }

    /// Regression: a NaN the model answered was written as `null` in the JSON answer.
    #[tokio::test]
    async fn a_non_finite_output_is_a_clear_error_in_json_and_kept_as_binary_data() {
        let outputs = || {
            vec![shoal_actors::tensor::NamedTensor {
                name: "probabilities".into(),
                shape: vec![1, 3],
                data: shoal_actors::tensor::TensorData::Fp32(vec![0.5, f32::NAN, 0.5]),
            }]
        };
        let json = oip::Request::default();
        let refused = answer("iris", 1, outputs(), &json);
        assert_eq!(refused.status(), 502);
        let body = axum::body::to_bytes(refused.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("answered NaN at element 1 of output") && body.contains("probabilities"),
            "{body}"
        );

        let binary = oip::Request {
            binary_output: true,
            ..oip::Request::default()
        };
        let kept = answer("iris", 1, outputs(), &binary);
        assert_eq!(kept.status(), 200);
        let body = axum::body::to_bytes(kept.into_body(), 1 << 20)
            .await
            .unwrap();
        let nan = f32::NAN.to_le_bytes();
        assert!(
            body.windows(4).any(|word| word == nan),
            "the NaN's bits are sent"
        );
    }

    /// Regression: a version no deployment serves was answered 503 with Retry-After, so
    /// clients retried forever.
    #[test]
    fn a_version_is_deployed_only_when_a_deployment_selects_it() {
        let share = |version| VersionWeight {
            version,
            weight: 50,
        };
        let commands = vec![
            version("iris", "one"),
            version("iris", "two"),
            version("iris", "three"),
            version("iris", "four"),
            version("other", "one"),
            Command::SetAlias {
                model: "iris".into(),
                alias: "stable".into(),
                version: 2,
            },
            deployment("pinned", VersionSelector::Version(1)),
            deployment("follows", VersionSelector::Alias("stable".into())),
            deployment("split", VersionSelector::Split(vec![share(1), share(3)])),
        ];
        let state = applied(commands);
        let deployed_versions: Vec<u32> = (1..=5)
            .filter(|&version| deployed(&state, "iris", version))
            .collect();
        assert_eq!(deployed_versions, [1, 2, 3]);
        assert!(!deployed(&state, "other", 1));
    }
}
