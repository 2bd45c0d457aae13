//! Artifact blobs over HTTP. `PUT /api/v1/blobs/{digest}` streams a blob in, verifies it
//! against its digest and answers only once it is durable on a majority of the servers;
//! `GET /api/v1/blobs/{digest}` serves it to agents and to a leader that lacks it.

use super::{AdminError, ApiError, AppState, BLOB_BODY_MAX_BYTES};
use crate::store::ReceiveError;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use shoal_actors::ArtifactFetcher;
use std::sync::Arc;
use std::time::Duration;

/// Marks a server-to-server copy, which is stored and not replicated again.
pub const REPLICA_HEADER: &str = "x-shoal-replica";

/// Longest one copy to one peer may take: room for a few GiB on a slow link.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(300);

fn receive_error(error: ReceiveError) -> ApiError {
    match error {
        ReceiveError::Io(error) => ApiError::Unavailable(format!("storing the blob: {error}")),
        ReceiveError::TooLarge { .. } => ApiError::PayloadTooLarge(error.to_string()),
        other => ApiError::BadRequest(other.to_string()),
    }
}

/// The number of servers that must hold a blob: a majority of the voters.
fn majority(app: &AppState) -> usize {
    app.control.raft_status().voters.len() / 2 + 1
}

pub async fn put(
    State(app): State<Arc<AppState>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AdminError> {
    let digest = digest.to_ascii_lowercase();
    let size_bytes = app
        .store
        .receive(&digest, body.into_data_stream(), BLOB_BODY_MAX_BYTES as u64)
        .await
        .map_err(receive_error)?;
    if headers.contains_key(REPLICA_HEADER) {
        // A copy from another server, not a push: counted where it was pushed.
        return Ok(
            Json(serde_json::json!({"digest": digest, "size_bytes": size_bytes})).into_response(),
        );
    }
    shoal_ops::metrics::metrics()
        .artifact_pushed_bytes_total
        .inc_by(size_bytes);
    let authorization = headers.get(header::AUTHORIZATION).cloned();
    let copies = 1 + replicate(&app, &digest, authorization).await;
    let needed = majority(&app);
    if copies < needed {
        return Err(ApiError::Unavailable(format!(
            "the blob is on {copies} server(s) but a majority is {needed}; retry the upload"
        ))
        .into());
    }
    let body = serde_json::json!({"digest": digest, "size_bytes": size_bytes, "copies": copies});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Copies a stored blob to every other server; returns how many took it.
async fn replicate(app: &AppState, digest: &str, authorization: Option<HeaderValue>) -> usize {
    let Some(forwarder) = &app.forwarder else {
        return 0;
    };
    let peers = forwarder.addresses(&app.control.state(), app.member_id);
    if peers.is_empty() {
        return 0;
    }
    let store = app.store.clone();
    let owned = digest.to_string();
    let Ok(Ok(bytes)) = tokio::task::spawn_blocking(move || store.fetch(&owned)).await else {
        return 0;
    };
    let bytes = Bytes::from(bytes);
    let copies = peers.into_values().map(|base| {
        let mut request = forwarder
            .client()
            .put(format!("{base}/api/v1/blobs/{digest}"))
            .timeout(REPLICATION_TIMEOUT)
            .header(REPLICA_HEADER, "1")
            .body(bytes.clone());
        if let Some(authorization) = &authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        async move {
            match request.send().await {
                Ok(answer) if answer.status().is_success() => true,
                Ok(answer) => {
                    tracing::warn!(%base, status = %answer.status(), "a peer refused a blob copy");
                    false
                }
                Err(error) => {
                    tracing::warn!(%base, %error, "copying a blob to a peer failed");
                    false
                }
            }
        }
    });
    futures_util::future::join_all(copies)
        .await
        .into_iter()
        .filter(|copied| *copied)
        .count()
}

pub async fn get(
    State(app): State<Arc<AppState>>,
    Path(digest): Path<String>,
) -> Result<Response, AdminError> {
    let store = app.store.clone();
    let wanted = digest.clone();
    let bytes = tokio::task::spawn_blocking(move || store.fetch(&wanted))
        .await
        .map_err(|error| ApiError::Internal(error.to_string()))?
        .map_err(|error| ApiError::NotFound(error.to_string()))?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Bytes::from(bytes),
    )
        .into_response())
}

/// Makes sure the blob is in this server's store, copying it from a peer if needed.
pub async fn ensure_local(
    app: &AppState,
    digest: &str,
    authorization: Option<&HeaderValue>,
) -> Result<(), ApiError> {
    // Touched, so the sweep keeps it until the version that is about to list it has.
    let (store, wanted) = (app.store.clone(), digest.to_string());
    if tokio::task::spawn_blocking(move || store.touch(&wanted))
        .await
        .unwrap_or(false)
    {
        return Ok(());
    }
    let Some(forwarder) = &app.forwarder else {
        return Err(ApiError::BadRequest(format!(
            "no blob {digest}; upload it first"
        )));
    };
    for base in forwarder
        .addresses(&app.control.state(), app.member_id)
        .into_values()
    {
        let mut request = forwarder
            .client()
            .get(format!("{base}/api/v1/blobs/{digest}"))
            .timeout(REPLICATION_TIMEOUT);
        if let Some(authorization) = authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        let Ok(answer) = request.send().await else {
            continue;
        };
        if !answer.status().is_success() {
            continue;
        }
        let Ok(bytes) = answer.bytes().await else {
            continue;
        };
        shoal_ops::metrics::metrics()
            .artifact_fetched_bytes_total
            .inc_by(bytes.len() as u64);
        if hex::encode(Sha256::digest(&bytes)) != digest {
            tracing::warn!(%base, %digest, "a peer served a blob that does not match its digest");
            continue;
        }
        let store = app.store.clone();
        tokio::task::spawn_blocking(move || store.put(&bytes))
            .await
            .map_err(|error| ApiError::Internal(error.to_string()))?
            .map_err(|error| ApiError::Unavailable(format!("storing the blob: {error}")))?;
        return Ok(());
    }
    Err(ApiError::BadRequest(format!(
        "no server holds blob {digest}; upload it first"
    )))
}
