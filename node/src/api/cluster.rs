//! Admin routes that change or read the replicated state: cluster membership, leadership,
//! aliases, artifacts and versions. Writes that land on a follower are forwarded to the
//! leader once; reads are linearizable (raft read index) unless `?consistency=stale`.

use super::{AdminError, ApiError, AppState};
use crate::control::{ControlError, ControlPlane};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shoal_consensus::{MembershipChange, ProposeError, RaftStatus};
use shoal_scheduler::{ClusterState, Command, Outcome};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The leader's answer to a forwarded request, passed on with the header a client acts on.
fn relay(status: StatusCode, answer: &HeaderMap, body: axum::body::Body) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    // Admin answers are JSON; an inference answer may carry binary tensor data, and a
    // generation's may be server-sent events: the body is framed as the leader framed it.
    super::set_framing(headers, super::binary_header(answer).unwrap_or(None));
    for name in [CONTENT_TYPE, RETRY_AFTER] {
        if let Some(value) = answer.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    response
}

/// Marks a request another server forwarded, so it is never forwarded again.
pub const FORWARDED_HEADER: &str = "x-shoal-forwarded";

/// Longest a forwarded request may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// What a follower allows beyond a request's own deadline for the way to the leader and
/// back.
const LEADER_HOP: Duration = Duration::from_secs(5);

/// Sends writes that reached a follower to the leader's HTTP address.
#[derive(Debug)]
pub struct Forwarder {
    http: reqwest::Client,
    /// Raft id to `http://host:port`.
    peers: BTreeMap<u64, String>,
}

impl Forwarder {
    pub fn new(peers: BTreeMap<u64, String>) -> Result<Forwarder, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(FORWARD_TIMEOUT)
            .build()?;
        Ok(Forwarder { http, peers })
    }

    /// The HTTP client, for other server-to-server calls.
    pub fn client(&self) -> &reqwest::Client {
        &self.http
    }

    /// `http://host:port` of every other server: the replicated list, else the configured
    /// peers.
    pub fn addresses(&self, state: &ClusterState, me: u64) -> BTreeMap<u64, String> {
        let mut addresses = self.peers.clone();
        for (id, address) in &state.servers {
            addresses.insert(*id, format!("http://{address}"));
        }
        addresses.remove(&me);
        addresses
    }

    /// Passes a request that must be held for a deployment scaled to zero to the leader,
    /// whose autoscaler counts held requests: with the caller's credentials, its body's
    /// framing and what is left of its deadline (`remaining`, sent as
    /// [`super::inference::TIMEOUT_HEADER`]). The answer streams back as the leader writes it (a
    /// generation's tokens as they come), for that long and a hop.
    pub async fn forward_held(
        &self,
        control: &ControlPlane,
        leader: u64,
        sent: AsSent,
        remaining: Duration,
    ) -> Result<Response, ApiError> {
        let AsSent {
            path,
            headers,
            body,
        } = sent;
        let mut extra = super::framing(super::binary_header(&headers)?);
        extra.push((
            HeaderName::from_static(super::inference::TIMEOUT_HEADER),
            HeaderValue::from(super::inference::whole_millis(remaining)),
        ));
        let call = LeaderCall {
            method: Method::POST,
            path: &path,
            authorization: headers.get(axum::http::header::AUTHORIZATION).cloned(),
            headers: extra,
            body,
        };
        let answer = self
            .call_leader(control, leader, call, remaining + LEADER_HOP)
            .await?;
        let (status, headers) = (answer.status(), answer.headers().clone());
        let body = axum::body::Body::from_stream(answer.bytes_stream());
        Ok(relay(status, &headers, body))
    }

    /// Sends the request to `leader`.
    async fn forward(
        &self,
        control: &ControlPlane,
        leader: u64,
        request: WriteRequest,
    ) -> Result<Response, ApiError> {
        let WriteRequest {
            method,
            uri,
            authorization,
            body,
            ..
        } = request;
        let call = LeaderCall {
            method,
            path: uri.path_and_query().map_or("/", |p| p.as_str()),
            authorization,
            headers: super::framing(None),
            body,
        };
        self.send_to_leader(control, leader, call).await
    }

    /// One forwarded call, its answer read whole and relayed as it came.
    async fn send_to_leader(
        &self,
        control: &ControlPlane,
        leader: u64,
        call: LeaderCall<'_>,
    ) -> Result<Response, ApiError> {
        let answer = self
            .call_leader(control, leader, call, FORWARD_TIMEOUT)
            .await?;
        let (status, headers) = (answer.status(), answer.headers().clone());
        let bytes = answer.bytes().await.map_err(|error| {
            ApiError::DeadlineExceeded(format!("reading the leader's answer: {error}"))
        })?;
        Ok(relay(status, &headers, bytes.into()))
    }

    /// Sends `call` to `leader`, found in the replicated server list or, before it
    /// registered itself there, in the configured peers (where it is not one, waited for in
    /// the list as long as a member waits for a leader); marked forwarded, with the
    /// caller's credentials and the call's own headers; the answer's head back within
    /// `limit`, which also bounds reading its body.
    async fn call_leader(
        &self,
        control: &ControlPlane,
        leader: u64,
        call: LeaderCall<'_>,
        limit: Duration,
    ) -> Result<reqwest::Response, ApiError> {
        let LeaderCall {
            method,
            path,
            authorization,
            headers,
            body,
        } = call;
        let listed = control.state().servers.get(&leader).cloned();
        let registered = match listed {
            Some(address) => Some(address),
            // A leader just elected registers its address a moment later: wait for it, as a
            // member that knows no leader waits for one.
            None if !self.peers.contains_key(&leader) => {
                control.wait_for_server_address(leader).await
            }
            None => None,
        }
        .map(|address| format!("http://{address}"));
        let Some(base) = registered.as_ref().or_else(|| self.peers.get(&leader)) else {
            return Err(ApiError::NotLeader {
                leader: Some(leader),
                message: format!(
                    "this server is not the leader and does not know member {leader}'s address"
                ),
            });
        };
        let mut forwarded = self
            .http
            .request(method, format!("{base}{path}"))
            .timeout(limit)
            .header(FORWARDED_HEADER, "1");
        for (name, value) in headers {
            forwarded = forwarded.header(name, value);
        }
        if let Some(authorization) = authorization {
            forwarded = forwarded.header(axum::http::header::AUTHORIZATION, authorization);
        }
        forwarded.body(body).send().await.map_err(|error| {
            // The leader may have acted on it before the connection broke.
            ApiError::DeadlineExceeded(format!("forwarding to the leader ({base}) failed: {error}"))
        })
    }
}

/// A request as it came, to pass on to the leader as it is.
pub struct AsSent {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A request for the leader, as [`Forwarder::call_leader`] sends it.
struct LeaderCall<'a> {
    method: Method,
    path: &'a str,
    /// The caller's credentials, for the leader to check again.
    authorization: Option<HeaderValue>,
    /// The body's framing, and what else the call carries (a deadline).
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

/// What a write did: applied here, or answered by the leader it was forwarded to.
pub(super) enum Written {
    Here(Outcome),
    Forwarded(Response),
}

/// The parts of a request a write needs to forward it.
pub struct WriteRequest {
    method: Method,
    uri: Uri,
    forwarded: bool,
    /// Passed on when forwarding, so the leader checks the same credentials.
    authorization: Option<axum::http::HeaderValue>,
    body: Bytes,
}

/// A write handler takes its request as a `WriteRequest`: the body (within the router's
/// limit) and what forwarding it to the leader needs.
impl<S: Send + Sync> axum::extract::FromRequest<S> for WriteRequest {
    type Rejection = AdminError;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<WriteRequest, AdminError> {
        let method = request.method().clone();
        let uri = request.uri().clone();
        let headers = request.headers();
        let forwarded = headers.contains_key(FORWARDED_HEADER);
        let authorization = headers.get(axum::http::header::AUTHORIZATION).cloned();
        let body = Bytes::from_request(request, state)
            .await
            .map_err(ApiError::from)?;
        Ok(WriteRequest {
            method,
            uri,
            forwarded,
            authorization,
            body,
        })
    }
}

impl WriteRequest {
    /// The body as `T`, or a 400 saying why it is not.
    pub(super) fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ApiError> {
        json_body(&self.body)
    }

    /// Forwards to `leader` if this request may be, else gives the not-leader error back.
    pub(super) async fn forward_or(
        self,
        app: &AppState,
        error: ControlError,
    ) -> Result<Written, AdminError> {
        if let ControlError::Consensus(ProposeError::NotLeader {
            leader: Some(leader),
        }) = &error
            && !self.forwarded
            && let Some(forwarder) = &app.forwarder
        {
            let response = forwarder.forward(&app.control, *leader, self).await?;
            return Ok(Written::Forwarded(response));
        }
        Err(error.into())
    }
}

impl WriteRequest {
    /// For work only the leader may do: on the leader, the request back to go ahead with;
    /// elsewhere, the leader's answer (or why it could not be reached).
    pub(super) async fn leader_or_forward(
        self,
        app: &AppState,
    ) -> Result<Result<Self, Response>, AdminError> {
        let mut status = app.control.raft_status();
        if !status.is_leader && status.leader.is_none() && app.control.wait_for_leader().await {
            status = app.control.raft_status();
        }
        if status.is_leader {
            return Ok(Ok(self));
        }
        let error = ControlError::Consensus(ProposeError::NotLeader {
            leader: status.leader,
        });
        match self.forward_or(app, error).await? {
            Written::Forwarded(response) => Ok(Err(response)),
            Written::Here(_) => Err(ApiError::Internal("forwarding answered here".into()).into()),
        }
    }
}

pub(super) async fn propose(
    app: &AppState,
    request: WriteRequest,
    command: &Command,
) -> Result<Written, AdminError> {
    match app.control.propose(command).await {
        Ok(outcome) => Ok(Written::Here(outcome)),
        Err(error) => request.forward_or(app, error).await,
    }
}

pub(super) fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::BadRequest(format!("malformed JSON body: {error}")))
}

#[derive(Debug, Deserialize)]
pub struct ReadOptions {
    /// `linearizable` (default) or `stale` (this server's current view, no round trip).
    #[serde(default)]
    consistency: Option<String>,
}

/// The state a read should see.
async fn read_state(app: &AppState, options: &ReadOptions) -> Result<Arc<ClusterState>, ApiError> {
    match options.consistency.as_deref() {
        None | Some("linearizable") => Ok(app.control.linearizable_state().await?),
        Some("stale") => Ok(app.control.state()),
        Some(other) => Err(ApiError::BadRequest(format!(
            "consistency {other:?} is not one of linearizable, stale"
        ))),
    }
}

#[derive(Debug, Serialize)]
pub struct MemberView {
    pub id: u64,
    pub role: &'static str,
    pub leader: bool,
}

#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub id: u64,
    pub term: u64,
    pub leader: Option<u64>,
    pub is_leader: bool,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub storage_stalled: bool,
    pub members: Vec<MemberView>,
    pub nodes: usize,
    /// HTTP address of each server that registered one.
    pub servers: BTreeMap<u64, String>,
}

pub async fn status(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let status = app.control.raft_status();
    // A standalone gateway is no member: its own picture would be an empty one of member
    // 0, so it asks the leader it follows.
    if !app.control.is_member()
        && let (Some(leader), Some(forwarder)) = (status.leader, &app.forwarder)
    {
        let call = LeaderCall {
            method: Method::GET,
            path: "/api/v1/cluster",
            authorization: headers.get(axum::http::header::AUTHORIZATION).cloned(),
            headers: Vec::new(),
            body: Bytes::new(),
        };
        return forwarder
            .send_to_leader(&app.control, leader, call)
            .await
            .unwrap_or_else(IntoResponse::into_response);
    }
    let mut members: Vec<MemberView> = status
        .voters
        .iter()
        .map(|&id| (id, "voter"))
        .chain(status.learners.iter().map(|&id| (id, "learner")))
        .map(|(id, role)| MemberView {
            id,
            role,
            leader: status.leader == Some(id),
        })
        .collect();
    members.sort_by_key(|member| member.id);
    Json(ClusterView {
        id: status.id,
        term: status.term,
        leader: status.leader,
        is_leader: status.is_leader,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        snapshot_index: status.snapshot_index,
        storage_stalled: status.storage_stalled,
        members,
        nodes: app.control.state().nodes.len(),
        servers: app.control.state().servers.clone(),
    })
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    id: u64,
    /// Its raft address, `host:port`.
    address: String,
    /// `voter` (default) or `learner`.
    #[serde(default)]
    role: Option<String>,
}

pub async fn add_member(
    State(app): State<Arc<AppState>>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let add: AddMember = write.json()?;
    if add.address.parse::<std::net::SocketAddr>().is_err() {
        return Err(
            ApiError::BadRequest(format!("address {:?} is not host:port", add.address)).into(),
        );
    }
    if app.embedded {
        return Err(ApiError::Conflict(
            "`shoal up` runs a control plane of one member with no raft transport, so no \
             server can join it; run `shoal server` members for a cluster"
                .into(),
        )
        .into());
    }
    let learner = MembershipChange::AddLearner {
        id: add.id,
        address: add.address.clone(),
    };
    match add.role.as_deref() {
        Some("learner") => change_membership(&app, write, learner).await,
        None | Some("voter") => add_voter(&app, write, add.id, add.address, learner).await,
        Some(other) => {
            Err(ApiError::BadRequest(format!("role {other:?} is not voter or learner")).into())
        }
    }
}

/// How long a new member has, as a learner, to catch up with the log before it is made a
/// voter: a server started with `--join` fetches a snapshot and the log's tail in well
/// under a second here. The leader's forward limit ([`FORWARD_TIMEOUT`]) leaves room for
/// it and the two changes.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// Adds a voter the safe way: first as a learner, which does not count towards the
/// quorum, and only once its log has caught up as a voter. Added as a voter at once, a
/// member that never came (a wrong address, a server not started) counted in every
/// majority: the one member of a single-server cluster could commit nothing more, and
/// could not even remove it again.
async fn add_voter(
    app: &AppState,
    write: WriteRequest,
    id: u64,
    address: String,
    learner: MembershipChange,
) -> Result<Response, AdminError> {
    // Only the leader knows how far a learner got: elsewhere the leader does all of it.
    let write = match write.leader_or_forward(app).await? {
        Ok(write) => write,
        Err(answer) => return Ok(answer),
    };
    let status = app.control.raft_status();
    if status.voters.contains(&id) {
        return change_membership(app, write, MembershipChange::AddVoter { id, address }).await;
    }
    if !status.learners.contains(&id) {
        app.control.change_membership(learner).await?;
    }
    // Done when it has caught up, or when this member no longer leads (and so no longer
    // knows how far it got).
    let caught_up = |status: &RaftStatus| {
        !status.is_leader
            || status
                .matched
                .get(&id)
                .is_some_and(|&matched| matched >= status.commit_index)
    };
    let deadline = tokio::time::Instant::now() + CATCH_UP_TIMEOUT;
    let mut raft = app.control.watch_raft();
    // (The status the wait gives back is not kept: it must not live across an await.)
    let in_time = matches!(
        tokio::time::timeout_at(deadline, raft.wait_for(caught_up)).await,
        Ok(Ok(_))
    );
    let status = app.control.raft_status();
    if in_time && !status.is_leader {
        return Err(
            ApiError::from(ControlError::Consensus(ProposeError::NotLeader {
                leader: status.leader,
            }))
            .into(),
        );
    }
    if !in_time {
        return Err(ApiError::DeadlineExceeded(format!(
            "member {id} at {address} did not catch up with the log within {} s, so it stays \
             a learner: it receives the log but does not vote, and the quorum is unchanged. \
             Start it with `shoal server --join`, then run `shoal cluster add` again to make it \
             a voter, or `shoal cluster remove {id}`",
            CATCH_UP_TIMEOUT.as_secs()
        ))
        .into());
    }
    change_membership(app, write, MembershipChange::AddVoter { id, address }).await
}

pub async fn remove_member(
    State(app): State<Arc<AppState>>,
    Path(id): Path<u64>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let request = write;
    change_membership(&app, request, MembershipChange::Remove { id }).await
}

async fn change_membership(
    app: &AppState,
    request: WriteRequest,
    change: MembershipChange,
) -> Result<Response, AdminError> {
    match app.control.change_membership(change.clone()).await {
        Ok(()) => Ok(Json(serde_json::json!({"changed": format!("{change:?}")})).into_response()),
        Err(error) => match request.forward_or(app, error).await? {
            Written::Forwarded(response) => Ok(response),
            Written::Here(_) => {
                Err(ApiError::Internal("a membership change has no outcome".into()).into())
            }
        },
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferLeader {
    to: u64,
}

pub async fn transfer_leader(
    State(app): State<Arc<AppState>>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let transfer: TransferLeader = write.json()?;
    let status = app.control.raft_status();
    if !status.voters.contains(&transfer.to) {
        return Err(ApiError::BadRequest(format!("member {} is not a voter", transfer.to)).into());
    }
    let request = write;
    if let Err(answer) = request.leader_or_forward(&app).await? {
        return Ok(answer);
    }
    app.control.transfer_leader(transfer.to)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"transferring_to": transfer.to})),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterServer {
    http_address: String,
}

/// `PUT /api/v1/cluster/servers/{id}`: where server `id` serves HTTP. Servers call it for
/// themselves at start; the address is replicated so any server can forward to any leader.
pub async fn register_server(
    State(app): State<Arc<AppState>>,
    Path(id): Path<u64>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let register: RegisterServer = write.json()?;
    let command = Command::RegisterServer {
        id,
        http_address: register.http_address.clone(),
    };
    match propose(&app, write, &command).await? {
        Written::Forwarded(response) => Ok(response),
        Written::Here(_) => Ok(Json(
            serde_json::json!({"id": id, "http_address": register.http_address}),
        )
        .into_response()),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AliasView {
    pub model: String,
    pub alias: String,
    pub version: u32,
}

pub async fn get_alias(
    State(app): State<Arc<AppState>>,
    Path((model, alias)): Path<(String, String)>,
    Query(options): Query<ReadOptions>,
) -> Result<Json<AliasView>, AdminError> {
    let state = read_state(&app, &options).await?;
    let Some(known) = state.models.get(&model) else {
        return Err(ApiError::NotFound(format!("unknown model {model:?}")).into());
    };
    let Some(&version) = known.aliases.get(&alias) else {
        return Err(ApiError::NotFound(format!("model {model:?} has no alias {alias:?}")).into());
    };
    Ok(Json(AliasView {
        model,
        alias,
        version,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAlias {
    version: u32,
}

pub async fn set_alias(
    State(app): State<Arc<AppState>>,
    Path((model, alias)): Path<(String, String)>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let set: SetAlias = write.json()?;
    if !alias.is_empty() && alias.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(ApiError::BadRequest(format!(
            "alias {alias:?} is all digits and would read as a version number; give it a name \
             with a letter in it"
        ))
        .into());
    }
    let command = Command::SetAlias {
        model: model.clone(),
        alias: alias.clone(),
        version: set.version,
    };
    match propose(&app, write, &command).await? {
        Written::Forwarded(response) => Ok(response),
        Written::Here(_) => Ok(Json(AliasView {
            model,
            alias,
            version: set.version,
        })
        .into_response()),
    }
}

pub async fn delete_alias(
    State(app): State<Arc<AppState>>,
    Path((model, alias)): Path<(String, String)>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let command = Command::RemoveAlias { model, alias };
    match propose(&app, write, &command).await? {
        Written::Forwarded(response) => Ok(response),
        Written::Here(_) => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewVersion {
    /// The version's files, each already stored with `PUT /api/v1/blobs/{digest}`.
    files: Vec<NewFile>,
    /// Weight format, e.g. `safetensors`.
    format: String,
    /// The version of the same model this one was made from (quantized, pruned, trained
    /// further); the newest version when not given.
    #[serde(default)]
    parent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewFile {
    name: String,
    digest: String,
}

#[derive(Debug, Serialize)]
pub struct VersionRegistered {
    pub model: String,
    pub version: u32,
    pub created: bool,
}

/// `POST /api/v1/models/{model}/versions`: registers a version from stored blobs. The
/// leader copies any blob it lacks from another server before checking the files.
pub async fn register_version(
    State(app): State<Arc<AppState>>,
    Path(model): Path<String>,
    write: WriteRequest,
) -> Result<Response, AdminError> {
    let new: NewVersion = write.json()?;
    if new.files.is_empty() {
        return Err(ApiError::BadRequest("a version needs at least one file".into()).into());
    }
    let request = match write.leader_or_forward(&app).await? {
        Ok(request) => request,
        Err(answer) => return Ok(answer),
    };
    for file in &new.files {
        super::blobs::ensure_local(&app, &file.digest, request.authorization.as_ref()).await?;
    }
    let store = app.store.clone();
    let parent = new.parent;
    let command = tokio::task::spawn_blocking(move || {
        crate::store::version_command(
            &store,
            &model,
            new.files.into_iter().map(|f| (f.name, f.digest)).collect(),
            &new.format,
        )
    })
    .await
    .map_err(|error| ApiError::Internal(error.to_string()))?
    .map_err(ApiError::BadRequest)?;
    let Command::RegisterModelVersion { model, .. } = &command else {
        return Err(ApiError::Internal("version_command built another command".into()).into());
    };
    let model = model.clone();
    let command = match parent {
        Some(parent) => command.derived_from(parent),
        None => command,
    };
    match propose(&app, request, &command).await? {
        Written::Forwarded(response) => Ok(response),
        Written::Here(Outcome::VersionRegistered { version, created }) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((
                status,
                Json(VersionRegistered {
                    model,
                    version,
                    created,
                }),
            )
                .into_response())
        }
        Written::Here(other) => {
            Err(ApiError::Internal(format!("unexpected outcome {other:?}")).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::oip;
    use super::*;
    use axum::http::header::CONTENT_TYPE;

    #[test]
    fn a_relayed_answer_keeps_its_content_type_retry_after_and_binary_header() {
        let mut answer = HeaderMap::new();
        answer.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(oip::BINARY_CONTENT_TYPE),
        );
        answer.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        answer.insert(
            HeaderName::from_static(oip::BINARY_HEADER_LENGTH),
            HeaderValue::from_static("42"),
        );
        answer.insert("x-other", HeaderValue::from_static("dropped"));
        let relayed = relay(StatusCode::OK, &answer, Bytes::from_static(b"{}").into());
        let headers = relayed.headers();
        assert_eq!(headers[CONTENT_TYPE], oip::BINARY_CONTENT_TYPE);
        assert_eq!(headers[RETRY_AFTER], "1");
        assert_eq!(headers[oip::BINARY_HEADER_LENGTH], "42");
        assert!(headers.get("x-other").is_none());

        assert_eq!(headers.get_all(CONTENT_TYPE).iter().count(), 1);

        let plain = relay(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::from_static(b"{}").into(),
        );
        assert_eq!(plain.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(plain.headers().get_all(CONTENT_TYPE).iter().count(), 1);

        // A generation streamed from the leader stays server-sent events.
        let mut events = HeaderMap::new();
        events.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        let relayed = relay(StatusCode::OK, &events, axum::body::Body::empty());
        assert_eq!(relayed.headers()[CONTENT_TYPE], "text/event-stream");
        assert_eq!(relayed.headers().get_all(CONTENT_TYPE).iter().count(), 1);
    }
}
