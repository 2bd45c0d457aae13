//! Every way a request can fail, mapped to an HTTP status in one place.
//!
//! Inference routes answer `{"error": "message"}`, as the Open Inference Protocol asks;
//! admin routes (`/api/v1/…`) answer `{"error": {"code": "...", "message": "..."}}`
//! through [`AdminError`].

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Seconds a client is told to wait before retrying a 429 or 503.
const RETRY_AFTER_SECONDS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// 413 for a body too large to read: the rest of it is left unread.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 413 for a request read whole that carries more rows than one may.
    #[error("{0}")]
    TooManyRows(String),
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ReplicaFailed(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Conflict(String),
    /// This server is not the raft leader and could not forward; nothing was proposed.
    #[error("{message}")]
    NotLeader {
        leader: Option<u64>,
        message: String,
    },
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) | ApiError::TooManyRows(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::ReplicaFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::NotLeader { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }

    /// A short machine-readable code for admin error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::PayloadTooLarge(_) | ApiError::TooManyRows(_) => "payload_too_large",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::ReplicaFailed(_) => "replica_failed",
            ApiError::DeadlineExceeded(_) => "deadline_exceeded",
            ApiError::Conflict(_) => "conflict",
            ApiError::NotLeader { .. } => "not_leader",
            ApiError::Internal(_) => "internal",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
        }
    }

    /// The error in OpenAI's envelope, for the OpenAI-compatible routes, with the same
    /// status and headers.
    pub(crate) fn into_openai_response(self) -> Response {
        let body = openai_body(self.status(), &self.to_string());
        self.with_body(body)
    }

    fn with_body(self, body: serde_json::Value) -> Response {
        let mut response = (self.status(), axum::Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(self, ApiError::PayloadTooLarge(_)) {
            // The rest of the body was never read, so the connection cannot carry another
            // request: say so, or a client may reuse it and lose its next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(
            self,
            ApiError::Overloaded(_) | ApiError::Unavailable(_) | ApiError::NotLeader { .. }
        ) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.to_string()});
        self.with_body(body)
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "request body is over the limit of {} bytes",
                super::REQUEST_BODY_MAX_BYTES
            ))
        } else {
            ApiError::BadRequest(format!(
                "could not read the request body: {}",
                rejection.body_text()
            ))
        }
    }
}

/// An error of the admin API: the same statuses, the structured body.
#[derive(Debug)]
pub struct AdminError(pub ApiError);

impl<E: Into<ApiError>> From<E> for AdminError {
    fn from(error: E) -> AdminError {
        AdminError(error.into())
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let error = self.0;
        let mut body =
            serde_json::json!({"error": {"code": error.code(), "message": error.to_string()}});
        if let ApiError::NotLeader {
            leader: Some(leader),
            ..
        } = &error
        {
            body["error"]["leader"] = serde_json::json!(leader);
        }
        error.with_body(body)
    }
}

impl From<crate::control::ControlError> for ApiError {
    fn from(error: crate::control::ControlError) -> ApiError {
        use crate::control::ControlError;
        use shoal_consensus::ProposeError;
        use shoal_scheduler::Rejected;
        match error {
            ControlError::Rejected(Rejected::Invalid(message)) => ApiError::BadRequest(message),
            ControlError::Rejected(
                rejected @ (Rejected::UnknownModel(_)
                | Rejected::UnknownVersion { .. }
                | Rejected::UnknownDeployment(_)
                | Rejected::UnknownNode(_)
                | Rejected::UnknownReplica(_)),
            ) => ApiError::NotFound(rejected.to_string()),
            ControlError::Rejected(rejected) => ApiError::Conflict(rejected.to_string()),
            ControlError::Consensus(ProposeError::NotLeader { leader }) => ApiError::NotLeader {
                leader,
                message: match leader {
                    Some(leader) => {
                        format!("this server is not the leader; the leader is member {leader}")
                    }
                    None => "this server is not the leader, and no leader is known yet; \
                             retry shortly"
                        .to_string(),
                },
            },
            ControlError::Consensus(ProposeError::Overloaded) => {
                ApiError::Overloaded("the control plane's queue is full; retry later".into())
            }
            ControlError::Consensus(ProposeError::Timeout) => ApiError::DeadlineExceeded(
                "no answer from the control plane in time; the change may or may not have been applied".into(),
            ),
            ControlError::Consensus(ProposeError::Refused(message)) => ApiError::BadRequest(message),
            ControlError::Consensus(error @ (ProposeError::Storage(_) | ProposeError::Stopped)) => {
                ApiError::Unavailable(error.to_string())
            }
            ControlError::Codec(message) => ApiError::Internal(message),
        }
    }
}

/// OpenAI's error envelope for `message` answered with `status`.
pub(crate) fn openai_body(status: StatusCode, message: &str) -> serde_json::Value {
    let kind = match status.as_u16() {
        400 | 404 | 413 => "invalid_request_error",
        401 | 403 => "authentication_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ControlError;
    use shoal_consensus::ProposeError;

    /// Regression: the message read "the leader is None" and "the leader is Some(2)".
    #[test]
    fn a_not_leader_refusal_names_the_leader_in_words() {
        let message = |leader| {
            ApiError::from(ControlError::Consensus(ProposeError::NotLeader { leader })).to_string()
        };
        assert!(
            message(Some(2)).ends_with("the leader is member 2"),
            "{}",
            message(Some(2))
        );
        let unknown = message(None);
        assert!(unknown.contains("no leader is known yet"), "{unknown}");
        assert!(!unknown.contains("None"), "{unknown}");
    }
}
