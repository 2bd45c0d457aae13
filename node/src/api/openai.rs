//! OpenAI-compatible routes, translated onto the same inference path as the Open Inference
//! Protocol: `GET /v1/models` and `POST /v1/embeddings`. Errors use OpenAI's envelope.

use super::cluster::AsSent;
use super::oip::{InferResponse, ResponseData};
use super::{ApiError, AppState};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use shoal_actors::agent::Routes;
use shoal_actors::generate::GenerateError;
use shoal_scheduler::DataType;
use std::sync::Arc;
use std::time::Instant;

/// Largest response body read back from the inference path.
const RESPONSE_BYTES_MAX: usize = 64 << 20;

/// An error in OpenAI's shape.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = super::error::openai_body(status, &message.into());
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
    let body = match read_body(body) {
        Ok(body) => body,
        Err(problem) => return refused(&problem),
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
        Some(ResponseData::Fp32(values)) => values,
        Some(ResponseData::Int64(values)) => values.into_iter().map(|v| v as f32).collect(),
        Some(ResponseData::Bytes(_)) | None => {
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

/// One event of a generation, whichever path it came by.
enum Piece {
    Text(String),
    Finish(String),
    /// The generation failed: 504 when its deadline passed, else 502.
    Failed(StatusCode, String),
}

impl Piece {
    fn failed(problem: &GenerateError) -> Piece {
        let status = match problem {
            GenerateError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        Piece::Failed(status, problem.to_string())
    }
}

/// A generation's pieces as they come.
type Pieces = std::pin::Pin<Box<dyn futures_util::Stream<Item = Piece> + Send>>;

/// Largest `max_tokens` accepted: a bound on how long one request may hold a replica.
const MAX_TOKENS_LIMIT: usize = 4_096;

/// Starts a generation of `prompt` on a replica of `model`: in this process when one runs
/// here, else on an agent.
async fn start_generation(
    app: &AppState,
    model: &str,
    prompt: String,
    max_tokens: Option<usize>,
    sent: AsSent,
) -> Result<Pieces, Response> {
    use futures_util::StreamExt;
    if max_tokens.is_some_and(|tokens| tokens == 0 || tokens > MAX_TOKENS_LIMIT) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("max_tokens must be 1..={MAX_TOKENS_LIMIT}"),
        ));
    }
    let state = app.control.state();
    let resolved =
        super::inference::resolve(&state, model, None).map_err(|problem| refused(&problem))?;
    let version = resolved.version;
    // Before anything waits for a replica: a model that cannot generate is refused at
    // once, and never woken from zero for it.
    if !shoal_actors::runtime::generates_text(&resolved.signature) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("model {model:?} does not generate text"),
        ));
    }
    // The caller's deadline (`x-shoal-timeout-ms`) within 30 s, as for inference: for the
    // wait for a replica, and for the generation itself in this process.
    let timeout =
        super::inference::request_timeout(&sent.headers).map_err(|problem| refused(&problem))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut routes = app.routes.borrow().clone();
    let serving_here = |routes: &Routes| {
        super::inference::serving_here(routes, model, version)
            .first()
            .copied()
            .cloned()
    };
    if app.embedded && serving_here(&routes).is_none() {
        routes = super::inference::hold_for_own_replica(app, model, version, deadline)
            .await
            .map_err(|problem| refused(&problem))?;
    }
    if let Some(route) = serving_here(&routes) {
        let Some(generation) = route.handle.generation() else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("model {model:?} does not generate text"),
            ));
        };
        let request = shoal_actors::generate::GenerationRequest {
            prompt,
            max_new_tokens: max_tokens,
            deadline,
        };
        let stream = match generation.submit(&request) {
            Ok(stream) => stream,
            Err(problem) => {
                return Err(error(StatusCode::SERVICE_UNAVAILABLE, problem.to_string()));
            }
        };
        let pieces = futures_util::stream::unfold(Some(stream), |stream| async move {
            let mut stream = stream?;
            match stream.next().await {
                Some(Ok(piece)) => Some((Piece::Text(piece.text), Some(stream))),
                Some(Err(problem)) => Some((Piece::failed(&problem), None)),
                None => {
                    let finish = match stream.finish() {
                        Some(shoal_actors::generate::FinishReason::EndToken) | None => "stop",
                        Some(_) => "length",
                    };
                    Some((Piece::Finish(finish.to_string()), None))
                }
            }
        });
        return Ok(match &app.traffic {
            Some(traffic) => Box::pin(
                traffic
                    .track(route.replica.0, Instant::now())
                    .during(pieces),
            ),
            None => Box::pin(pieces),
        });
    }
    let mut targets = super::gateway::targets(&state, model, version);
    if targets.is_empty() {
        targets = super::gateway::targets_any_version(&state, model);
    }
    if targets.is_empty() {
        if let Some((leader, forwarder)) = super::inference::leader_to_hold_at(app, &sent.headers) {
            // The leader's answer, streamed through: `Err` is a response sent as it is.
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let answer = forwarder
                .forward_held(&app.control, leader, sent, remaining)
                .await;
            return Err(answer.unwrap_or_else(|problem| refused(&problem)));
        }
        targets = super::inference::hold_for_scale_up(app, model, version, deadline)
            .await
            .map_err(|problem| refused(&problem))?;
    }
    // The agent generates within what is left of the deadline.
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let body = crate::agent::GenerateRequest {
        prompt,
        max_tokens,
        timeout_ms: Some(super::inference::whole_millis(remaining)),
    };
    let body = serde_json::to_string(&body)
        .map_err(|problem| error(StatusCode::INTERNAL_SERVER_ERROR, problem.to_string()))?;
    let answer = match app
        .gateway
        .open_generation(targets, Bytes::from(body))
        .await
    {
        Ok(answer) => answer,
        Err(problem) => return Err(error(problem.status(), problem.to_string())),
    };
    // The agent's lines, re-cut on newlines whatever the chunking.
    let lines = futures_util::stream::unfold(
        (answer.bytes_stream(), Vec::<u8>::new(), false),
        |(mut chunks, mut buffer, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let value: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
                    let piece = if let Some(text) = value["text"].as_str() {
                        Piece::Text(text.to_string())
                    } else if let Some(finish) = value["finish"].as_str() {
                        Piece::Finish(finish.to_string())
                    } else {
                        let status = if value["deadline"] == true {
                            StatusCode::GATEWAY_TIMEOUT
                        } else {
                            StatusCode::BAD_GATEWAY
                        };
                        let message = value["error"]
                            .as_str()
                            .unwrap_or("a malformed line from the replica");
                        Piece::Failed(status, message.to_string())
                    };
                    let last = !matches!(piece, Piece::Text(_));
                    return Some((piece, (chunks, buffer, last)));
                }
                match chunks.next().await {
                    Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                    _ => {
                        return Some((
                            Piece::Failed(
                                StatusCode::BAD_GATEWAY,
                                "the replica's stream broke off".into(),
                            ),
                            (chunks, buffer, true),
                        ));
                    }
                }
            }
        },
    );
    Ok(Box::pin(lines))
}

/// Starts and answers a generation, recorded in the gateway's request metrics (a stream
/// counts as answered when its first bytes go out).
async fn observed_generation(
    app: &AppState,
    model: String,
    prompt: String,
    max_tokens: Option<usize>,
    stream: bool,
    chat: bool,
    sent: AsSent,
) -> Response {
    let observed = super::inference::Observed::start(app, &model);
    let version = super::inference::resolve(&app.control.state(), &model, None)
        .ok()
        .map(|version| version.version);
    let response = match start_generation(app, &model, prompt, max_tokens, sent).await {
        Ok(pieces) => answer_generation(pieces, model, stream, chat).await,
        Err(response) => response,
    };
    observed.finish(version, response.status());
    response
}

fn now_seconds() -> u64 {
    crate::store::now_ms() / 1000
}

/// The OpenAI answer for a finished or streamed generation.
async fn answer_generation(pieces: Pieces, model: String, stream: bool, chat: bool) -> Response {
    use futures_util::StreamExt;
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = format!(
        "{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let (object, chunk_object) = if chat {
        ("chat.completion", "chat.completion.chunk")
    } else {
        ("text_completion", "text_completion")
    };
    let created = now_seconds();
    if !stream {
        let mut text = String::new();
        let mut finish = String::from("stop");
        let mut pieces = pieces;
        while let Some(piece) = pieces.next().await {
            match piece {
                Piece::Text(more) => text.push_str(&more),
                Piece::Finish(reason) => finish = reason,
                Piece::Failed(status, message) => return error(status, message),
            }
        }
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish})
        };
        return Json(json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]}))
            .into_response();
    }
    let events = pieces
        .map(move |piece| {
            let (delta, finish) = match piece {
                Piece::Text(text) => (text, Value::Null),
                Piece::Finish(reason) => (String::new(), Value::String(reason)),
                Piece::Failed(_, message) => {
                    let body = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
                    return format!("data: {body}\n\n");
                }
            };
            let choice = if chat {
                json!({"index": 0, "delta": {"content": delta}, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": delta, "finish_reason": finish})
            };
            let chunk = json!({"id": id, "object": chunk_object, "created": created, "model": model, "choices": [choice]});
            format!("data: {chunk}\n\n")
        })
        .chain(futures_util::stream::once(async { "data: [DONE]\n\n".to_string() }))
        .map(Ok::<_, std::io::Error>);
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        axum::body::Body::from_stream(events),
    )
        .into_response()
}

/// A request body, or why it could not be read: 413 for one over
/// [`super::REQUEST_BODY_MAX_BYTES`], as the inference routes answer, else 400.
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(ApiError::from)
}

/// A request body read as `T`, kept beside it; why not, as an error for [`refused`].
fn read_json<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
) -> Result<(T, Bytes), ApiError> {
    let body = read_body(body)?;
    let request = serde_json::from_slice(&body)
        .map_err(|problem| ApiError::BadRequest(format!("malformed request: {problem}")))?;
    Ok((request, body))
}

/// An error of this module's callers, in OpenAI's shape with its status.
fn refused(problem: &ApiError) -> Response {
    error(problem.status(), problem.to_string())
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    model: String,
    prompt: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
}

/// `POST /v1/completions`, streamed as server-sent events with `stream: true`.
pub async fn completions(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (request, body): (CompletionRequest, Bytes) = match read_json(body) {
        Ok(read) => read,
        Err(problem) => return refused(&problem),
    };
    let chat = false;
    let sent = AsSent {
        path: "/v1/completions".into(),
        headers,
        body,
    };
    observed_generation(
        &app,
        request.model,
        request.prompt,
        request.max_tokens,
        request.stream,
        chat,
        sent,
    )
    .await
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
}

/// `POST /v1/chat/completions`: the messages become one prompt, `role: content` a line,
/// ending with `assistant:` for the model to continue.
pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (request, body): (ChatRequest, Bytes) = match read_json(body) {
        Ok(read) => read,
        Err(problem) => return refused(&problem),
    };
    if request.messages.is_empty() {
        return error(StatusCode::BAD_REQUEST, "messages must not be empty");
    }
    let mut prompt = String::new();
    for message in &request.messages {
        prompt.push_str(&format!("{}: {}\n", message.role, message.content));
    }
    prompt.push_str("assistant:");
    let chat = true;
    let sent = AsSent {
        path: "/v1/chat/completions".into(),
        headers,
        body,
    };
    observed_generation(
        &app,
        request.model,
        prompt,
        request.max_tokens,
        request.stream,
        chat,
        sent,
    )
    .await
}
