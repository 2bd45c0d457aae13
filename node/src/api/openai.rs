//! OpenAI-compatible routes, translated onto the same inference path as the Open Inference
//! Protocol: `GET /v1/models` and `POST /v1/embeddings`. Errors use OpenAI's envelope.

use super::AppState;
use super::oip::{InferResponse, ResponseData};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use shoal_scheduler::DataType;
use std::sync::Arc;

/// Largest response body read back from the inference path.
const RESPONSE_BYTES_MAX: usize = 64 << 20;

/// An error in OpenAI's shape.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = match status.as_u16() {
        400 | 404 | 413 => "invalid_request_error",
        401 | 403 => "authentication_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}});
    (status, Json(body)).into_response()
}

/// `GET /v1/models`: every deployed model.
pub async fn models(State(app): State<Arc<AppState>>) -> Json<Value> {
    let state = app.control.state();
    let mut names: Vec<&str> = state.deployments.values().map(|d| d.model()).collect();
    names.sort_unstable();
    names.dedup();
    let data: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let created = state
                .models
                .get(name)
                .and_then(|model| model.versions.values().next())
                .map_or(0, |version| version.created_at_ms / 1000);
            json!({"id": name, "object": "model", "created": created, "owned_by": "shoal"})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    model: String,
    /// One text or a list of texts.
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// `POST /v1/embeddings`: texts to vectors, for a model that takes one BYTES input.
pub async fn embeddings(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let request: EmbeddingsRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(problem) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("malformed request: {problem}"),
            );
        }
    };
    if request
        .encoding_format
        .as_deref()
        .is_some_and(|format| format != "float")
    {
        return error(
            StatusCode::BAD_REQUEST,
            "only encoding_format \"float\" is supported",
        );
    }
    let texts: Vec<String> = match &request.input {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) if !items.is_empty() => {
            let texts: Option<Vec<String>> = items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect();
            match texts {
                Some(texts) => texts,
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "input must be a string or a list of strings",
                    );
                }
            }
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input must be a string or a non-empty list of strings",
            );
        }
    };
    let state = app.control.state();
    let signature = match super::inference::resolve(&state, &request.model, None) {
        Ok(version) => version.signature.clone(),
        Err(problem) => return error(problem.status(), problem.to_string()),
    };
    let (Some(input), Some(output)) = (signature.inputs.first(), signature.outputs.first()) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("model {:?} does not embed text", request.model),
        );
    };
    if signature.inputs.len() != 1
        || input.datatype != DataType::Bytes
        || output.datatype != DataType::Fp32
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("model {:?} does not embed text", request.model),
        );
    }
    let count = texts.len();
    let oip = json!({
        "inputs": [{"name": input.name, "shape": [count], "datatype": "BYTES", "data": texts}],
        "outputs": [{"name": output.name}],
    });
    let answer = super::inference::observed(
        &app,
        request.model.clone(),
        None,
        &headers,
        Ok(Bytes::from(oip.to_string())),
    )
    .await;
    let status = answer.status();
    let Ok(bytes) = axum::body::to_bytes(answer.into_body(), RESPONSE_BYTES_MAX).await else {
        return error(
            StatusCode::BAD_GATEWAY,
            "the model's answer could not be read",
        );
    };
    if !status.is_success() {
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|body| body["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return error(status, message);
    }
    let Ok(answer) = serde_json::from_slice::<InferResponse>(&bytes) else {
        return error(
            StatusCode::BAD_GATEWAY,
            "the model answered something that is not an inference result",
        );
    };
    let Some(vectors) = answer.outputs.into_iter().find(|o| o.name == output.name) else {
        return error(
            StatusCode::BAD_GATEWAY,
            "the model's answer has no embedding",
        );
    };
    let values = match vectors.data {
        ResponseData::Fp32(values) => values,
        ResponseData::Int64(values) => values.into_iter().map(|v| v as f32).collect(),
        ResponseData::Bytes(_) => {
            return error(StatusCode::BAD_GATEWAY, "the embedding is not numbers");
        }
    };
    let width = vectors.shape.get(1).copied().unwrap_or(0);
    if width == 0 || values.len() != width * count {
        return error(StatusCode::BAD_GATEWAY, "the embedding has the wrong shape");
    }
    let data: Vec<Value> = values
        .chunks(width)
        .enumerate()
        .map(|(index, vector)| json!({"object": "embedding", "index": index, "embedding": vector}))
        .collect();
    Json(json!({"object": "list", "data": data, "model": request.model})).into_response()
}
