//! The HTTP surface: Open Inference Protocol v2, the admin API and `/metrics`, on axum.
//!
//! Only this module knows HTTP status codes and JSON shapes.

mod admin;
mod blobs;
pub mod cluster;
pub mod deployments;
mod edge;
mod error;
pub mod explain;
#[cfg(test)]
mod fixtures;
pub mod gateway;
mod infer_json;
mod inference;
pub mod nodes;
pub mod oip;
mod openai;

pub(crate) use inference::{
    TIMEOUT_HEADER, answer, binary_header, check_request, framing, request_timeout, set_framing,
    whole_millis,
};

use crate::auth::Tokens;
use crate::control::ControlPlane;
use crate::store::ArtifactStore;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use shoal_actors::agent::Routes;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use tokio::sync::watch;

pub use error::{AdminError, ApiError};

/// Largest artifact accepted by `PUT /api/v1/blobs/{digest}`.
pub const BLOB_BODY_MAX_BYTES: usize = 512 << 20;

/// Largest request body accepted, in bytes: room for a batch of a few thousand rows of
/// JSON, small enough that a bad client cannot make the gateway buffer much.
pub const REQUEST_BODY_MAX_BYTES: usize = 4 << 20;

/// What every handler can reach.
#[derive(Debug)]
pub struct AppState {
    pub control: ControlPlane,
    pub routes: watch::Receiver<Arc<Routes>>,
    /// Round-robin position across a model's serving replicas.
    pub next_route: AtomicUsize,
    /// Models that must have a serving replica before `/v2/health/ready` answers 200
    /// (in `shoal up`, the demo model, which may not be deployed yet at startup).
    pub required_models: Vec<String>,
    pub store: Arc<ArtifactStore>,
    /// Forwards writes to the leader; `None` where this process is the only member.
    pub forwarder: Option<cluster::Forwarder>,
    /// Accepted bearer tokens; empty means authentication is off.
    pub tokens: Tokens,
    /// This process's raft member id.
    pub member_id: u64,
    /// Node leases, on servers (the leader uses them); `None` in `shoal up`.
    pub leases: Option<Arc<crate::leases::Leases>>,
    /// Sends requests to replicas on agents.
    pub gateway: gateway::Gateway,
    /// Live load reported by agents and held at the gateway.
    pub load: Arc<crate::load::LoadBoard>,
    /// Counts the traffic of the replicas this process serves itself (`shoal up`), for
    /// its autoscaler; `None` where agents count their own.
    pub traffic: Option<Arc<crate::load::TrafficMeter>>,
    /// Per-model bound on requests in flight through this gateway.
    pub admission: Admission,
    /// `shoal up`: replicas run only in this process; there are no agents to send to.
    pub embedded: bool,
}

/// Default bound on one model's requests in flight through one gateway: far above what a
/// replica's queue holds, so it only bites when the model is already overloaded.
pub const ADMISSION_LIMIT_DEFAULT: usize = 4_096;

/// Counts each model's requests in flight and refuses those beyond the limit (429). Only
/// models with requests in flight have an entry, so names nobody serves (any a caller may
/// make up) do not pile up.
#[derive(Debug)]
pub struct Admission {
    limit: usize,
    in_flight: std::sync::Mutex<std::collections::HashMap<Arc<str>, usize>>,
}

/// A request counted against its model until dropped.
#[derive(Debug)]
pub struct Admitted<'a> {
    admission: &'a Admission,
    /// The map's own key: sharing it costs no allocation while the model has requests.
    model: Arc<str>,
}

impl Admission {
    pub fn new(limit: usize) -> Admission {
        Admission {
            limit,
            in_flight: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts a request for `model`, or `None` when the model is at its limit.
    pub fn admit(&self, model: &str) -> Option<Admitted<'_>> {
        let mut in_flight = self.in_flight.lock().ok()?;
        if let Some((key, count)) = in_flight.get_key_value(model) {
            if *count >= self.limit {
                return None;
            }
            let key = key.clone();
            *in_flight.get_mut(model)? += 1;
            return Some(Admitted {
                admission: self,
                model: key,
            });
        }
        if self.limit == 0 {
            return None;
        }
        let key: Arc<str> = Arc::from(model);
        in_flight.insert(key.clone(), 1);
        Some(Admitted {
            admission: self,
            model: key,
        })
    }

    /// How many models have requests in flight.
    #[cfg(test)]
    fn models_in_flight(&self) -> usize {
        self.in_flight.lock().map_or(0, |in_flight| in_flight.len())
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if let Ok(mut in_flight) = self.admission.in_flight.lock()
            && let Some(count) = in_flight.get_mut(&*self.model)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                in_flight.remove(&*self.model);
            }
        }
    }
}

/// The router of the embedded `shoal up` process: inference, admin and metrics together.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2", get(inference::server_metadata))
        .route("/v2/health/live", get(inference::live))
        .route("/v2/health/ready", get(inference::ready))
        .route("/v2/models/{model}", get(inference::model_metadata))
        .route("/v2/models/{model}/ready", get(inference::model_ready))
        .route("/v2/models/{model}/infer", post(inference::infer))
        .route("/v2/models/{model}/explain", post(explain::explain))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(inference::version_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(inference::version_ready),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(inference::version_infer),
        )
        .route(
            "/v2/models/{model}/versions/{version}/explain",
            post(explain::version_explain),
        )
        .route("/v1/models", get(openai::models))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/api/v1/models", get(admin::list_models))
        .route("/api/v1/cluster", get(cluster::status))
        .route("/api/v1/cluster/members", post(cluster::add_member))
        .route(
            "/api/v1/cluster/members/{id}",
            delete(cluster::remove_member),
        )
        .route(
            "/api/v1/cluster/transfer-leader",
            post(cluster::transfer_leader),
        )
        .route(
            "/api/v1/cluster/servers/{id}",
            put(cluster::register_server),
        )
        .route(
            "/api/v1/models/{model}/aliases/{alias}",
            get(cluster::get_alias)
                .put(cluster::set_alias)
                .delete(cluster::delete_alias),
        )
        .route(
            "/api/v1/models/{model}/versions",
            post(cluster::register_version),
        )
        .route(
            "/api/v1/blobs/{digest}",
            get(blobs::get)
                .put(blobs::put)
                .layer(DefaultBodyLimit::max(BLOB_BODY_MAX_BYTES)),
        )
        .route(
            "/api/v1/deployments",
            get(admin::list_deployments).post(deployments::apply),
        )
        .route("/api/v1/deployments/{name}", delete(deployments::delete))
        .route("/api/v1/deployments/{name}/scale", post(deployments::scale))
        .route(
            "/api/v1/deployments/{name}/rollback",
            post(deployments::rollback),
        )
        .route("/api/v1/state", get(nodes::state))
        .route("/api/v1/nodes", get(nodes::list))
        .route("/api/v1/nodes/{id}/heartbeat", post(nodes::heartbeat))
        .route("/api/v1/nodes/{id}/assignments", get(nodes::assignments))
        .route("/api/v1/nodes/{id}/drain", post(nodes::drain))
        .route("/api/v1/nodes/{id}/undrain", post(nodes::undrain))
        .route("/api/v1/replicas/{id}/state", post(nodes::report))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_MAX_BYTES))
        .layer(edge::EdgeLayer { app: state.clone() })
        .with_state(state)
}

async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shoal_ops::metrics::encode(),
    )
}

async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    use axum::response::IntoResponse;
    let error = ApiError::NotFound(format!("no route {}", uri.path()));
    // Under /api/ the admin shape, as every admin error has.
    if uri.path().starts_with("/api/") {
        AdminError(error).into_response()
    } else {
        error.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_at_its_limit_is_refused_until_a_request_ends() {
        let admission = Admission::new(2);
        let first = admission.admit("iris");
        let second = admission.admit("iris");
        assert!(first.is_some() && second.is_some());
        assert!(admission.admit("iris").is_none());
        assert!(
            admission.admit("other").is_some(),
            "each model has its own limit"
        );
        drop(first);
        assert!(admission.admit("iris").is_some());
    }

    /// Regression: every model name ever asked for kept an entry, so a caller making up
    /// names grew the map without bound.
    #[test]
    fn a_model_with_nothing_in_flight_keeps_no_entry() {
        let admission = Admission::new(4);
        for name in ["a", "b", "c"] {
            let admitted = admission.admit(name);
            assert!(admitted.is_some());
        }
        assert_eq!(admission.models_in_flight(), 0);
        let held = admission.admit("iris");
        assert_eq!(admission.models_in_flight(), 1);
        drop(held);
        assert_eq!(admission.models_in_flight(), 0);
    }
}
