//! `POST /v2/models/{m}[/versions/{v}]/explain`: how much each input feature moved each
//! output of a prediction ([`crate::explain`]).
//!
//! The rows an explanation needs go through the ordinary infer path (`inference::observed`)
//! as binary tensor data, to one version chosen once, with the caller's credentials, in
//! requests of at most `ROWS_PER_REQUEST_MAX` rows and a body an agent takes, composed one
//! request at a time: admission, routing to a replica here or on an agent, holding for a
//! deployment scaled to zero and the request metrics all apply as they do to inference.

use super::edge::REQUEST_ID_HEADER;
use super::inference::{self, ROWS_PER_REQUEST_MAX};
use super::oip::{self, InferResponse, RequestInput};
use super::{ApiError, AppState, REQUEST_BODY_MAX_BYTES};
use crate::explain::{Explanation, Method, Plan};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shoal_actors::tensor::TensorData;
use shoal_scheduler::{DataType, Signature};
use std::sync::Arc;

/// Most model rows one explanation may run: 16 requests of `ROWS_PER_REQUEST_MAX` rows.
/// Exact Shapley values of 4 features take 16 rows a row explained, ablation of 784
/// features 786.
pub const MODEL_ROWS_PER_EXPLANATION_MAX: usize = 16 * ROWS_PER_REQUEST_MAX;

/// Most values an explanation holds at once, of the model's outputs or of the attributions
/// it answers: 4 Mi, 16 MiB of FP32 (the attributions of 5 rows of a 784-feature model
/// with 1,000 outputs are 3.9 Mi).
pub const EXPLANATION_VALUES_MAX: usize = 4 << 20;

/// The body of an explain request: the input as an infer request gives it (FP32, one row
/// or several), and how to explain it.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    pub inputs: Vec<RequestInput>,
    /// The FP32 output to explain; the model's first FP32 output when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The values a feature takes when it is left out: one for every feature, or one per
    /// feature. Zero when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    #[serde(default)]
    pub method: Method,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Baseline {
    Every(f32),
    PerFeature(Vec<f32>),
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ExplainResponse {
    pub model_name: String,
    pub model_version: String,
    pub method: Method,
    pub output: String,
    /// The shape of one row of the output: each explanation's `prediction` holds its
    /// elements row-major, and `attributions` one list of features per element.
    pub output_shape: Vec<usize>,
    pub baseline: Vec<f32>,
    /// One per input row, in order.
    pub explanations: Vec<Explanation>,
}

pub async fn explain(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted(&app, &model, None, &headers, body).await
}

pub async fn version_explain(
    State(app): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted(&app, &model, Some(&version), &headers, body).await
}

/// [`explained`], counted in `shoal_explanations_total` by model, method (`none` for a
/// request refused as it was read) and status.
async fn counted(
    app: &AppState,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut method = None;
    let answer = explained(app, model, version, headers, body, &mut method)
        .await
        .unwrap_or_else(|refusal| refusal);
    shoal_ops::metrics::metrics()
        .explanations_total
        .with_label_values(&[
            inference::model_label(app, model),
            method.map_or("none", Method::as_str),
            answer.status().as_str(),
        ])
        .inc();
    answer
}

/// What to run for an explain request, checked against the model before anything runs.
struct Job {
    version: u32,
    input: String,
    plan: Plan,
    output: String,
    /// The output's values per row, when its signature fixes them.
    output_values: Option<usize>,
    /// The input rows, row-major, `features` values each.
    rows: Vec<f32>,
    baseline: Vec<f32>,
}

/// The explanation, or the answer to give instead: the refusal of a bad request, or the
/// error a model row's inference was answered with, as it was answered.
async fn explained(
    app: &AppState,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    method: &mut Option<Method>,
) -> Result<Response, Response> {
    let refused = |error: ApiError| error.into_response();
    let deadline =
        tokio::time::Instant::now() + inference::request_timeout(headers).map_err(refused)?;
    let body = body.map_err(|rejection| refused(ApiError::from(rejection)))?;
    let job = read_job(app, model, version, &body).map_err(refused)?;
    *method = Some(job.plan.method());
    let features = job.baseline.len();
    let explained_rows = job.rows.len() / features;
    let model_rows = explained_rows * job.plan.rows();
    if let Some(k) = job.output_values {
        bounded(explained_rows, model_rows, features, k).map_err(refused)?;
    }
    let (output_shape, outputs) = answers(app, model, &job, headers, deadline).await?;
    let k = output_shape.iter().product::<usize>();
    let per_row = job.plan.rows() * k;
    if k == 0 || outputs.len() != explained_rows * per_row {
        return Err(refused(ApiError::ReplicaFailed(format!(
            "the replica answered {} values of output {:?} for {model_rows} rows",
            outputs.len(),
            job.output,
        ))));
    }
    let explanations: Vec<Explanation> = outputs
        .chunks(per_row)
        .map(|answers| job.plan.attribute(answers, k))
        .collect();
    if explanations
        .iter()
        .flat_map(|explanation| explanation.attributions.iter().flatten())
        .any(|value| !value.is_finite())
    {
        return Err(refused(ApiError::ReplicaFailed(
            "an attribution is past the range of FP32: the model's outputs are too far apart \
             to explain"
                .into(),
        )));
    }
    Ok(Json(ExplainResponse {
        model_name: model.to_string(),
        model_version: job.version.to_string(),
        method: job.plan.method(),
        output: job.output,
        output_shape,
        baseline: job.baseline,
        explanations,
    })
    .into_response())
}

/// The model's answers for every row the job composes, in order: run as requests of as
/// many rows as a body an agent takes may carry, and no more than a request may have, each
/// composed as it is sent. The output's shape past the rows, and its values.
async fn answers(
    app: &AppState,
    model: &str,
    job: &Job,
    headers: &HeaderMap,
    deadline: tokio::time::Instant,
) -> Result<(Vec<usize>, Vec<f32>), Response> {
    let refused = |error: ApiError| error.into_response();
    let features = job.baseline.len();
    let explained_rows = job.rows.len() / features;
    let model_rows = explained_rows * job.plan.rows();
    let header_bytes = request_header(job, ROWS_PER_REQUEST_MAX).len();
    let chunk_rows = ROWS_PER_REQUEST_MAX
        .min(REQUEST_BODY_MAX_BYTES.saturating_sub(header_bytes) / (4 * features));
    if chunk_rows == 0 {
        return Err(refused(ApiError::PayloadTooLarge(format!(
            "one row of {features} features is over the {REQUEST_BODY_MAX_BYTES} bytes a \
             request may carry"
        ))));
    }
    let mut outputs = Vec::new();
    let mut output_shape: Option<Vec<usize>> = None;
    let mut chunk = Vec::with_capacity(chunk_rows * features);
    for start in (0..model_rows).step_by(chunk_rows) {
        chunk.clear();
        for index in start..(start + chunk_rows).min(model_rows) {
            let (explained, within) = (index / job.plan.rows(), index % job.plan.rows());
            let row = &job.rows[explained * features..(explained + 1) * features];
            job.plan.compose_row(within, row, &job.baseline, &mut chunk);
        }
        let (shape, values) = run(app, model, job, &chunk, headers, deadline).await?;
        match &output_shape {
            // What the answer will hold, known once the model answered.
            None => bounded(explained_rows, model_rows, features, shape.iter().product())
                .map_err(refused)?,
            Some(first) if *first != shape => {
                return Err(refused(ApiError::ReplicaFailed(format!(
                    "output {:?} came back as rows of {shape:?}, and before as rows of \
                     {first:?}",
                    job.output
                ))));
            }
            Some(_) => {}
        }
        output_shape = Some(shape);
        outputs.extend(values);
    }
    Ok((output_shape.unwrap_or_default(), outputs))
}

/// Refuses an explanation that would hold more than [`EXPLANATION_VALUES_MAX`] values: the
/// model's `k` output values for each of its rows, or the attributions it answers.
fn bounded(
    explained_rows: usize,
    model_rows: usize,
    features: usize,
    k: usize,
) -> Result<(), ApiError> {
    let held = model_rows
        .saturating_mul(k)
        .max(explained_rows.saturating_mul(k).saturating_mul(features));
    if held > EXPLANATION_VALUES_MAX {
        return Err(ApiError::TooManyRows(format!(
            "explaining {explained_rows} rows of {features} features for {k} output values \
             each takes {held} values; the limit is {EXPLANATION_VALUES_MAX}, explain fewer \
             rows at once"
        )));
    }
    Ok(())
}

/// The JSON part of an infer request for `count` model rows of the job's input, asking for
/// its output as binary tensor data.
fn request_header(job: &Job, count: usize) -> Vec<u8> {
    let features = job.baseline.len();
    let header = serde_json::json!({
        "inputs": [{
            "name": job.input,
            "shape": [count, features],
            "datatype": "FP32",
            "parameters": {"binary_data_size": count * features * 4},
        }],
        "outputs": [{"name": job.output, "parameters": {"binary_data": true}}],
    });
    // Serialising plain data to a vector does not fail.
    serde_json::to_vec(&header).unwrap_or_default()
}

/// Reads and checks an explain request against the version that will answer it.
fn read_job(
    app: &AppState,
    model: &str,
    version: Option<&str>,
    body: &[u8],
) -> Result<Job, ApiError> {
    let request: ExplainRequest = serde_json::from_slice(body)
        .map_err(|error| ApiError::BadRequest(format!("malformed explain request: {error}")))?;
    let state = app.control.state();
    let resolved = inference::chosen_version(app, &state, model, version)?;
    let signature = &resolved.signature;
    let input = explainable_input(model, signature)?;
    let output = explained_output(model, signature, request.output)?;
    let inputs = request
        .inputs
        .into_iter()
        .map(oip::to_tensor)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::BadRequest)?;
    let infer = oip::Request {
        id: None,
        inputs,
        outputs: Vec::new(),
        binary_output: false,
    };
    inference::check_request(signature, model, &infer)?;
    let [tensor] = <[_; 1]>::try_from(infer.inputs)
        .map_err(|_| ApiError::BadRequest(format!("model {model:?} takes one input, {input:?}")))?;
    let (&[rows, features], TensorData::Fp32(values)) = (tensor.shape.as_slice(), tensor.data)
    else {
        return Err(ApiError::BadRequest(format!(
            "input {input:?} must be FP32 rows of features, [rows, features]"
        )));
    };
    let plan = Plan::new(request.method, features).map_err(ApiError::BadRequest)?;
    if rows * plan.rows() > MODEL_ROWS_PER_EXPLANATION_MAX {
        return Err(ApiError::TooManyRows(format!(
            "explaining {rows} rows by {} takes {} model rows; the limit is \
             {MODEL_ROWS_PER_EXPLANATION_MAX}, explain fewer rows at once",
            plan.method().as_str(),
            rows * plan.rows()
        )));
    }
    let baseline = match request.baseline {
        None => vec![0.0; features],
        Some(Baseline::Every(value)) => vec![value; features],
        Some(Baseline::PerFeature(values)) if values.len() == features => values,
        Some(Baseline::PerFeature(values)) => {
            return Err(ApiError::BadRequest(format!(
                "the baseline has {} values; input {input:?} has {features} features",
                values.len()
            )));
        }
    };
    if let Some(index) = baseline.iter().position(|value| !value.is_finite()) {
        return Err(ApiError::BadRequest(format!(
            "baseline value {index} is {}, not a finite number",
            baseline[index]
        )));
    }
    let output_values = signature
        .outputs
        .iter()
        .find(|spec| spec.name == output)
        .and_then(|spec| {
            spec.shape.iter().skip(1).try_fold(1usize, |count, &d| {
                count.checked_mul(usize::try_from(d).ok()?)
            })
        });
    Ok(Job {
        version: resolved.version,
        input: input.to_string(),
        plan,
        output,
        output_values,
        rows: values,
        baseline,
    })
}

/// The model's one input, when it is FP32 rows of features: what an explanation varies.
fn explainable_input<'a>(model: &str, signature: &'a Signature) -> Result<&'a str, ApiError> {
    match signature.inputs.as_slice() {
        [input] if input.datatype == DataType::Fp32 && input.shape.len() == 2 => Ok(&input.name),
        _ => Err(ApiError::BadRequest(format!(
            "model {model:?} cannot be explained: explanations vary the features of one FP32 \
             input of shape [rows, features], and it takes {}",
            signature
                .inputs
                .iter()
                .map(|input| format!(
                    "{} {} {:?}",
                    input.name,
                    input.datatype.as_str(),
                    input.shape
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The output to explain: the one asked for, or the first FP32 one.
fn explained_output(
    model: &str,
    signature: &Signature,
    asked: Option<String>,
) -> Result<String, ApiError> {
    let fp32 = |name: &str| {
        signature
            .outputs
            .iter()
            .any(|spec| spec.name == name && spec.datatype == DataType::Fp32)
    };
    match asked {
        Some(name) if fp32(&name) => Ok(name),
        Some(name) => Err(ApiError::BadRequest(format!(
            "model {model:?} has no FP32 output {name:?} to explain; its FP32 outputs: {}",
            signature
                .outputs
                .iter()
                .filter(|spec| spec.datatype == DataType::Fp32)
                .map(|spec| spec.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        None => signature
            .outputs
            .iter()
            .find(|spec| spec.datatype == DataType::Fp32)
            .map(|spec| spec.name.clone())
            .ok_or_else(|| {
                ApiError::BadRequest(format!("model {model:?} has no FP32 output to explain"))
            }),
    }
}

/// Runs `rows` (row-major) through the infer path as one request for the job's output;
/// the output's shape past the rows, and its values. An answer other than 200 is passed on.
async fn run(
    app: &AppState,
    model: &str,
    job: &Job,
    rows: &[f32],
    caller: &HeaderMap,
    deadline: tokio::time::Instant,
) -> Result<(Vec<usize>, Vec<f32>), Response> {
    let count = rows.len() / job.baseline.len();
    let mut body = request_header(job, count);
    let header_bytes = body.len();
    body.extend(rows.iter().flat_map(|value| value.to_le_bytes()));
    let mut headers = HeaderMap::new();
    // The caller's credentials and request id go on with each request, as a request held
    // for a scale-up is passed to the leader with them.
    for name in [AUTHORIZATION.as_str(), REQUEST_ID_HEADER] {
        if let Some(value) = caller.get(name) {
            headers.insert(name, value.clone());
        }
    }
    for (name, value) in inference::framing(Some(header_bytes)) {
        headers.insert(name, value);
    }
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    headers.insert(
        inference::TIMEOUT_HEADER,
        HeaderValue::from(inference::whole_millis(remaining)),
    );
    let answer = inference::observed(
        app,
        model.to_string(),
        Some(job.version.to_string()),
        &headers,
        Ok(Bytes::from(body)),
    )
    .await;
    if !answer.status().is_success() {
        return Err(answer);
    }
    read_output(answer, &job.output, count)
        .await
        .map_err(|message| ApiError::ReplicaFailed(message).into_response())
}

/// The output `name` of an infer answer asked for as binary tensor data: its shape past
/// the `rows` rows, and its values, all finite.
async fn read_output(
    answer: Response,
    name: &str,
    rows: usize,
) -> Result<(Vec<usize>, Vec<f32>), String> {
    let header_bytes = inference::binary_header(answer.headers())
        .ok()
        .flatten()
        .ok_or("the replica answered without binary tensor data")?;
    let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
        .await
        .map_err(|error| format!("reading the replica's answer: {error}"))?;
    let (head, mut tensors) = body
        .split_at_checked(header_bytes)
        .ok_or("the replica's answer is shorter than its header")?;
    let response: InferResponse = serde_json::from_slice(head)
        .map_err(|error| format!("the replica's answer does not read: {error}"))?;
    let mut values = None;
    for output in response.outputs {
        let size = output
            .parameters
            .as_ref()
            .and_then(|parameters| parameters.binary_data_size)
            .unwrap_or(0);
        let (bytes, rest) = tensors
            .split_at_checked(size)
            .ok_or("the replica's answer is shorter than its tensors")?;
        tensors = rest;
        if output.name == name {
            values = Some((output.shape, bytes));
        }
    }
    let (shape, bytes) = values.ok_or_else(|| format!("the replica answered no {name:?}"))?;
    let Some((&answered_rows, row_shape)) = shape.split_first() else {
        return Err(format!("output {name:?} came back with no rows"));
    };
    let k = row_shape.iter().product::<usize>();
    if answered_rows != rows || bytes.len() != rows * k * 4 {
        return Err(format!(
            "output {name:?} came back as {shape:?} in {} bytes for {rows} rows",
            bytes.len()
        ));
    }
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|word| f32::from_le_bytes([word[0], word[1], word[2], word[3]]))
        .collect();
    if let Some(index) = values.iter().position(|value| !value.is_finite()) {
        return Err(format!(
            "the model answered {} at element {index} of output {name:?}: a prediction that \
             is not a number cannot be explained",
            values[index]
        ));
    }
    Ok((row_shape.to_vec(), values))
}
