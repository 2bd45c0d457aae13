//! What every request passes through before its route: a request id, and the bearer
//! token check; and on the way out, a body for the router's own bodiless 405.
//!
//! One hand-written tower layer rather than two `axum::middleware::from_fn`s: each of those
//! cloned the route and boxed two futures per request, which cost 6% of `shoal up`'s
//! throughput on small-model inference (`cargo bench -p shoal-tests --bench serving`).
//! This one calls the route it wraps directly and allocates only a new request id.

use super::AppState;
use super::error::{AdminError, ApiError};
use crate::auth::{self, AuthError};
use axum::extract::Request;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::{Either, Ready, ready};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

/// The header that carries a request's id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest caller-chosen request id kept; longer ones are replaced.
const REQUEST_ID_LENGTH_MAX: usize = 128;

/// Wraps every route in [`Edge`].
#[derive(Clone)]
pub struct EdgeLayer {
    pub app: Arc<AppState>,
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, route: S) -> Edge<S> {
        Edge {
            app: self.app.clone(),
            route,
        }
    }
}

/// Gives every answer a request id — the caller's, when it sent one of sane length and
/// characters, else a new one; logs name it, so a caller's complaint can be found — and
/// checks the bearer token before anything reads the body.
#[derive(Clone)]
pub struct Edge<S> {
    app: Arc<AppState>,
    route: S,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answered<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.route.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let request_id = request_id(&request);
        let path = request.uri().path();
        let admin = path.starts_with("/api/");
        let answer = match refusal(&self.app, &request) {
            Some(refusal) => Either::Left(ready(Ok(if admin {
                AdminError(refusal).into_response()
            } else if path.starts_with("/v1/") {
                refusal.into_openai_response()
            } else {
                refusal.into_response()
            }))),
            None => {
                let span = tracing::debug_span!(
                    "request",
                    request_id = request_id.to_str().unwrap_or_default(),
                    path = %path
                );
                request
                    .headers_mut()
                    .insert(REQUEST_ID_HEADER, request_id.clone());
                Either::Right(self.route.call(request).instrument(span))
            }
        };
        Answered {
            answer,
            request_id: Some(request_id),
            admin,
        }
    }
}

/// The request's id: the caller's if it is one, else a new one.
fn request_id(request: &Request) -> HeaderValue {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Read once: `std::process::id` is a system call each time, one per request otherwise.
    static PID: LazyLock<u32> = LazyLock::new(std::process::id);
    let given = request.headers().get(REQUEST_ID_HEADER).filter(|value| {
        value.to_str().is_ok_and(|id| {
            !id.is_empty()
                && id.len() <= REQUEST_ID_LENGTH_MAX
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        })
    });
    given.cloned().unwrap_or_else(|| {
        let id = format!("{:x}-{:x}", *PID, NEXT.fetch_add(1, Ordering::Relaxed));
        HeaderValue::try_from(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    })
}

/// Why the request's bearer token does not open its route, if it does not.
fn refusal(app: &AppState, request: &Request) -> Option<ApiError> {
    let needed = auth::scope_for(request.uri().path())?;
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let error = app.tokens.check(header, needed).err()?;
    Some(match error {
        AuthError::Missing | AuthError::Invalid => ApiError::Unauthorized(error.to_string()),
        AuthError::WrongScope(_) => ApiError::Forbidden(error.to_string()),
    })
}

pin_project_lite::pin_project! {
    /// A route's answer (or the refusal) with the request id set on it.
    pub struct Answered<F> {
        #[pin]
        answer: Either<Ready<Result<Response, Infallible>>, Instrumented<F>>,
        request_id: Option<HeaderValue>,
        // Whether it is an admin route, whose errors have their own shape.
        admin: bool,
    }
}

impl<F> Future for Answered<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = std::task::ready!(this.answer.poll(cx));
        if response.status() == StatusCode::METHOD_NOT_ALLOWED
            && !response.headers().contains_key(CONTENT_TYPE)
        {
            response = method_not_allowed(response, *this.admin);
        }
        if let Some(request_id) = this.request_id.take() {
            response.headers_mut().insert(REQUEST_ID_HEADER, request_id);
        }
        Poll::Ready(Ok(response))
    }
}

/// The router's 405 (a known path, another method) with the error body every other
/// refusal has, in the route's shape. (The router adds its `Allow` header after this layer.)
fn method_not_allowed(answer: Response, admin: bool) -> Response {
    let (mut parts, _) = answer.into_parts();
    let message = "this route does not take that method; its Allow header lists those it does";
    let body = if admin {
        serde_json::json!({"error": {"code": "method_not_allowed", "message": message}})
    } else {
        serde_json::json!({"error": message})
    };
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asking(id: Option<&str>) -> Request {
        let mut request = Request::builder().uri("/v2/health/ready");
        if let Some(id) = id {
            request = request.header(REQUEST_ID_HEADER, id);
        }
        request.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn a_sane_caller_id_is_kept_and_a_missing_or_odd_one_is_made_here() {
        assert_eq!(request_id(&asking(Some("caller-42"))), "caller-42");
        let prefix = format!("{:x}-", std::process::id());
        let made: Vec<HeaderValue> = [None, Some("has space"), Some("")]
            .into_iter()
            .map(|id| request_id(&asking(id)))
            .collect();
        for id in &made {
            let id = id.to_str().unwrap();
            let counter = id.strip_prefix(&prefix).unwrap_or_else(|| panic!("{id}"));
            assert!(u64::from_str_radix(counter, 16).is_ok(), "{id}");
        }
        assert!(made[0] != made[1] && made[1] != made[2] && made[0] != made[2]);
    }
}
