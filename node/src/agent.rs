//! `shoal agent`: the deploy agent of one host. It joins the cluster through any server
//! (retrying until one answers), renews its lease with heartbeats, long-polls its
//! assignments and has the actor system match them, reports replica states, fetches
//! artifacts by digest into a local cache, and serves its replicas on a data-plane port
//! that gateways forward requests to.

use crate::api::nodes::{Assignment, Assignments, Heartbeat, ReplicaReport};
use crate::api::{ApiError, oip};
use crate::datadir::DataDir;
use crate::store::ArtifactStore;
use anyhow::Context;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use shoal_actors::agent::{AgentHandle, Routes};
use shoal_actors::batcher::InferError;
use shoal_actors::replica::ReplicaSpec;
use shoal_actors::{ArtifactFetcher, FetchError, ReplicaReporter};
use shoal_scheduler::{NodeId, ReplicaId, ReplicaState};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Time between heartbeats; the lease outlives three of them.
pub(crate) const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long one assignments poll may wait on the server.
const POLL_WAIT: Duration = Duration::from_secs(20);
/// Pause after a failed call before trying the next server.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Reports waiting to be sent; a few per replica lifetime, so this is generous.
const REPORT_QUEUE_CAPACITY: usize = 1_024;
/// How long a replica that is no longer assigned here keeps serving before it stops.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Longest a request may take in the replica, from arrival at the agent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a cached blob no replica here uses is kept after it was last used: a replica
/// placed here again within it starts without fetching its files; past it the blob only
/// takes disk, and one fetch brings it back.
const UNUSED_CACHE_GRACE: Duration = Duration::from_secs(60 * 60);

/// Settings of `shoal agent`, validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub id: u64,
    /// Base URLs of the servers, `http://host:port`.
    pub servers: Vec<String>,
    /// Data-plane address gateways reach this agent at.
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub token: Option<String>,
}

/// Calls servers, rotating to the next on failure.
#[derive(Clone, Debug)]
struct Servers {
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    token: Option<String>,
}

impl Servers {
    fn base(&self) -> &str {
        &self.bases[self.next.load(Ordering::Relaxed) % self.bases.len()]
    }

    fn rotate(&self) {
        self.next.fetch_add(1, Ordering::Relaxed);
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base()));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

/// Fetches blobs into a local cache, from any server; verified by the replica.
struct CachingFetcher {
    cache: Arc<ArtifactStore>,
    servers: Servers,
    runtime: tokio::runtime::Handle,
}

impl ArtifactFetcher for CachingFetcher {
    fn fetch(&self, digest: &str) -> Result<Vec<u8>, FetchError> {
        if let Ok(bytes) = self.cache.fetch(digest) {
            // Used now: the cache's sweep keeps it another grace.
            self.cache.touch(digest);
            return Ok(bytes);
        }
        // Called from a blocking thread: waiting on the runtime here is allowed.
        for _ in 0..self.servers.bases.len() {
            let request = self
                .servers
                .request(reqwest::Method::GET, &format!("/api/v1/blobs/{digest}"));
            let bytes = self.runtime.block_on(async {
                let answer = request.send().await.ok()?;
                if !answer.status().is_success() {
                    return None;
                }
                answer.bytes().await.ok()
            });
            if let Some(bytes) = bytes {
                shoal_ops::metrics::metrics()
                    .artifact_fetched_bytes_total
                    .inc_by(bytes.len() as u64);
                match self.cache.put(&bytes) {
                    Ok(stored) if stored == digest => return Ok(bytes.to_vec()),
                    Ok(_) => tracing::warn!(
                        %digest,
                        "a server served a blob that does not match its digest"
                    ),
                    // The local disk, not the server: another server's copy would fail
                    // the same way.
                    Err(error) => {
                        return Err(FetchError::Io {
                            digest: digest.into(),
                            message: format!("storing it in the local cache: {error}"),
                        });
                    }
                }
            }
            self.servers.rotate();
        }
        Err(FetchError::NotFound(digest.into()))
    }
}

struct Report {
    replica: ReplicaId,
    report: ReplicaReport,
}

/// Sends replica reports to the servers, in order, through a bounded queue.
struct HttpReporter {
    reports: mpsc::Sender<Report>,
}

impl ReplicaReporter for HttpReporter {
    fn report(&self, replica: ReplicaId, epoch: u64, state: ReplicaState, failure: Option<String>) {
        let report = Report {
            replica,
            report: ReplicaReport {
                epoch,
                state,
                failure,
            },
        };
        if self.reports.try_send(report).is_err() {
            tracing::warn!(%replica, "replica report dropped: queue full");
        }
    }
}

async fn send_reports(servers: Servers, mut reports: mpsc::Receiver<Report>) {
    while let Some(Report { replica, report }) = reports.recv().await {
        // A report is retried until a server takes it or refuses it for good (a 4xx:
        // a stale epoch, a replica that no longer exists).
        for attempt in 0..20u32 {
            let answer = servers
                .request(
                    reqwest::Method::POST,
                    &format!("/api/v1/replicas/{}/state", replica.0),
                )
                .json(&report)
                .send()
                .await;
            match answer {
                Ok(answer) if answer.status().is_success() => break,
                Ok(answer) if answer.status().is_client_error() => {
                    tracing::info!(%replica, status = %answer.status(), "replica report refused");
                    break;
                }
                _ => {
                    servers.rotate();
                    tokio::time::sleep(RETRY_PAUSE * (attempt + 1).min(5)).await;
                }
            }
        }
    }
}

fn spec_of(assignment: Assignment) -> ReplicaSpec {
    ReplicaSpec {
        id: assignment.id,
        epoch: assignment.epoch,
        model: assignment.model,
        version: assignment.version,
        device: assignment.device,
        reserved_bytes: assignment.reserved_bytes,
        files: assignment.files,
        batching: assignment.batching,
    }
}

/// Polls assignments and hands them to the actors. Refuses answers older than what it has
/// seen (a lagging server), and any replica at an epoch older than one it already ran.
/// Keeps the agent's replicas as the control plane assigns them, and publishes in `in_use`
/// the digests of the files of every replica it keeps, for the cache's sweep.
async fn reconcile(
    servers: Servers,
    node: NodeId,
    agent: AgentHandle,
    in_use: watch::Sender<HashSet<String>>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut revision = 0u64;
    let mut epochs: HashMap<ReplicaId, u64> = HashMap::new();
    // Replicas no longer assigned keep serving for a grace period: gateways whose view
    // lags still send them requests for a moment.
    let mut running: HashMap<ReplicaId, ReplicaSpec> = HashMap::new();
    let mut leaving: HashMap<ReplicaId, (ReplicaSpec, std::time::Instant)> = HashMap::new();
    loop {
        let now = std::time::Instant::now();
        let expired: Vec<ReplicaId> = leaving
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= DRAIN_GRACE)
            .map(|(id, _)| *id)
            .collect();
        if !expired.is_empty() {
            for id in &expired {
                leaving.remove(id);
            }
            let keep: Vec<ReplicaSpec> = running
                .values()
                .chain(leaving.values().map(|(spec, _)| spec))
                .cloned()
                .collect();
            in_use.send_replace(digests_of(&keep));
            if !agent.reconcile(keep) {
                return;
            }
        }
        let wait = leaving
            .values()
            .map(|(_, since)| DRAIN_GRACE.saturating_sub(now.duration_since(*since)))
            .min()
            .map_or(POLL_WAIT, |left| {
                left.min(POLL_WAIT).max(Duration::from_millis(50))
            });
        let path = format!(
            "/api/v1/nodes/{}/assignments?revision={revision}&wait_ms={}",
            node.0,
            wait.as_millis()
        );
        let request = servers
            .request(reqwest::Method::GET, &path)
            .timeout(POLL_WAIT + Duration::from_secs(5));
        let polled = tokio::select! {
            _ = stopping.changed() => return,
            answer = request.send() => answer,
        };
        let answer = match polled {
            Ok(answer) if answer.status().is_success() => answer.json::<Assignments>().await,
            _ => {
                servers.rotate();
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        let Ok(assignments) = answer else {
            servers.rotate();
            continue;
        };
        if assignments.revision < revision {
            // A server behind one we heard from: its view is older than ours.
            servers.rotate();
            continue;
        }
        revision = assignments.revision;
        let mut wanted = Vec::new();
        for assignment in assignments.replicas {
            let seen = epochs.entry(assignment.id).or_insert(0);
            if assignment.epoch < *seen {
                tracing::warn!(replica = %assignment.id, epoch = assignment.epoch, newest = *seen, "refusing a stale assignment");
                continue;
            }
            if assignment.epoch > *seen {
                // The chaos harness reads these lines to check that no agent ever runs a
                // stale assignment.
                tracing::info!(
                    replica = assignment.id.0,
                    epoch = assignment.epoch,
                    "accepted an assignment"
                );
            }
            *seen = assignment.epoch;
            wanted.push(spec_of(assignment));
        }
        if !assignments.node_up {
            // Down: nothing here is ours any more; stop at once, no grace.
            tracing::warn!(%node, "this node is marked down; stopping every replica");
            running.clear();
            leaving.clear();
        }
        let now = std::time::Instant::now();
        let wanted_ids: std::collections::HashSet<ReplicaId> =
            wanted.iter().map(|spec| spec.id).collect();
        for (id, spec) in running.drain() {
            if !wanted_ids.contains(&id) && assignments.node_up {
                leaving.entry(id).or_insert((spec, now));
            }
        }
        for spec in &wanted {
            leaving.remove(&spec.id);
            running.insert(spec.id, spec.clone());
        }
        let keep: Vec<ReplicaSpec> = wanted
            .into_iter()
            .chain(leaving.values().map(|(spec, _)| spec.clone()))
            .collect();
        in_use.send_replace(digests_of(&keep));
        if !agent.reconcile(keep) {
            return;
        }
    }
}

/// The digests of the files `replicas` run from.
fn digests_of(replicas: &[ReplicaSpec]) -> HashSet<String> {
    replicas
        .iter()
        .flat_map(|spec| &spec.files)
        .map(|file| file.digest.clone())
        .collect()
}

/// Every [`crate::store::SWEEP_INTERVAL`], drops from the cache the blobs no replica here
/// runs from (as `in_use` last said) that were last used over [`UNUSED_CACHE_GRACE`] ago.
async fn sweep_cache(
    cache: Arc<ArtifactStore>,
    in_use: watch::Receiver<HashSet<String>>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stopping.changed() => return,
            () = tokio::time::sleep(crate::store::SWEEP_INTERVAL) => {}
        }
        let listed = in_use.borrow().clone();
        crate::store::sweep_in_background(&cache, listed, UNUSED_CACHE_GRACE).await;
    }
}

async fn heartbeat(
    servers: Servers,
    node: NodeId,
    mut beat: Heartbeat,
    plane: Arc<DataPlane>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut joined = false;
    let mut delivered = true;
    loop {
        // A beat that did not get through is sent again as it was, load included.
        if delivered {
            let serving = plane.routes.borrow().clone();
            beat.load = plane
                .traffic
                .take_load(|replica| serving.serves(shoal_scheduler::ReplicaId(replica)));
        }
        let answer = servers
            .request(
                reqwest::Method::POST,
                &format!("/api/v1/nodes/{}/heartbeat", node.0),
            )
            .json(&beat)
            .timeout(HEARTBEAT_INTERVAL * 2)
            .send()
            .await;
        match answer {
            Ok(answer) if answer.status().is_success() => {
                if !joined {
                    tracing::info!(%node, server = servers.base(), "joined the cluster");
                    joined = true;
                }
            }
            other => {
                let status = other
                    .map(|a| a.status().to_string())
                    .unwrap_or_else(|e| e.to_string());
                tracing::warn!(server = servers.base(), %status, "heartbeat failed; trying the next server");
                servers.rotate();
                delivered = false;
                // The lease keeps running: try the next server soon, not an interval later.
                tokio::select! {
                    _ = stopping.changed() => return,
                    () = tokio::time::sleep(RETRY_PAUSE) => {}
                }
                continue;
            }
        }
        delivered = true;
        tokio::select! {
            _ = stopping.changed() => return,
            () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
        }
    }
}

/// What the data plane's handlers reach.
struct DataPlane {
    routes: watch::Receiver<Arc<Routes>>,
    traffic: Arc<crate::load::TrafficMeter>,
}

/// `POST /internal/v1/replicas/{id}/infer`: an Open Inference Protocol request for one
/// replica of this agent, forwarded by a gateway.
async fn infer(
    State(plane): State<Arc<DataPlane>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // The gateway sends what is left of its caller's deadline; at most 30 s.
    let deadline = tokio::time::Instant::now() + crate::api::request_timeout(&headers)?;
    let received = std::time::Instant::now();
    let body = body?;
    let header_bytes = crate::api::binary_header(&headers)?;
    let mut request = oip::read_request(&body, header_bytes).map_err(ApiError::BadRequest)?;
    let routes = plane.routes.borrow().clone();
    let Some((model, route)) = routes.by_model.iter().find_map(|(model, routes)| {
        routes
            .iter()
            .find(|r| r.replica.0 == id)
            .map(|r| (model, r))
    }) else {
        return Err(ApiError::Unavailable(format!(
            "replica {id} is not serving here"
        )));
    };
    // The gateway passes requests on unread: the check happens here, once. A refused
    // request is not traffic: it must not keep an idle replica from scaling to zero.
    crate::api::check_request(route.handle.signature(), model, &request)?;
    let _tracked = plane.traffic.track(id, received);
    let outputs = route
        .handle
        .infer(std::mem::take(&mut request.inputs), deadline)
        .await
        .map_err(|error| match error {
            InferError::Input(input) => ApiError::BadRequest(input.to_string()),
            InferError::Overloaded => ApiError::Overloaded("the replica is overloaded".into()),
            InferError::DeadlineExceeded => {
                ApiError::DeadlineExceeded("no answer before the request's deadline".into())
            }
            InferError::Model(message) => ApiError::ReplicaFailed(message),
            other => ApiError::Unavailable(other.to_string()),
        })?;
    Ok(crate::api::answer(model, route.version, outputs, &request))
}

/// What `/internal/v1/replicas/{id}/generate` takes.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct GenerateRequest {
    pub prompt: String,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// What is left of the caller's deadline, in milliseconds; the generation gets at most
    /// [`REQUEST_TIMEOUT`], and that when this is absent.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// `POST /internal/v1/replicas/{id}/generate`: the tokens of one generation as they are
/// produced, one JSON object per line (`{"text": ...}`, then `{"finish": ...}` or
/// `{"error": ..., "deadline": true|false}`). Closing the connection cancels the sequence.
async fn generate(
    State(plane): State<Arc<DataPlane>>,
    Path(id): Path<u64>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let received = std::time::Instant::now();
    let body = body?;
    let request: GenerateRequest = serde_json::from_slice(&body)
        .map_err(|error| ApiError::BadRequest(format!("malformed generate request: {error}")))?;
    let routes = plane.routes.borrow().clone();
    let Some(route) = routes
        .by_model
        .values()
        .flatten()
        .find(|r| r.replica.0 == id)
    else {
        return Err(ApiError::Unavailable(format!(
            "replica {id} is not serving here"
        )));
    };
    let Some(generation) = route.handle.generation() else {
        return Err(ApiError::BadRequest(format!(
            "replica {id} does not generate text"
        )));
    };
    let stream = generation
        .submit(&shoal_actors::generate::GenerationRequest {
            prompt: request.prompt,
            max_new_tokens: request.max_tokens,
            deadline: tokio::time::Instant::now()
                + request.timeout_ms.map_or(REQUEST_TIMEOUT, |ms| {
                    Duration::from_millis(ms).min(REQUEST_TIMEOUT)
                }),
        })
        .map_err(|error| match error {
            shoal_actors::generate::GenerateError::Overloaded => {
                ApiError::Overloaded(error.to_string())
            }
            shoal_actors::generate::GenerateError::Prompt(message) => ApiError::BadRequest(message),
            other => ApiError::Unavailable(other.to_string()),
        })?;
    let lines = futures_util::stream::unfold(Some(stream), |stream| async move {
        let mut stream = stream?;
        let line = match stream.next().await {
            Some(Ok(piece)) => serde_json::json!({"text": piece.text}),
            Some(Err(error)) => serde_json::json!({
                "error": error.to_string(),
                "deadline": matches!(error, shoal_actors::generate::GenerateError::DeadlineExceeded),
            }),
            None => {
                let finish = match stream.finish() {
                    Some(shoal_actors::generate::FinishReason::EndToken) | None => "stop",
                    Some(_) => "length",
                };
                let line = format!("{}\n", serde_json::json!({"finish": finish}));
                return Some((Ok::<_, std::io::Error>(line), None));
            }
        };
        let is_error = line.get("error").is_some();
        let text = format!("{line}\n");
        Some((Ok(text), (!is_error).then_some(stream)))
    });
    let lines = plane.traffic.track(id, received).during(lines);
    Ok((
        [("content-type", "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    crate::up::listen_for_shutdown();
    shoal_ops::metrics::set_process_role("agent");
    let data_dir = DataDir::lock(&config.data_dir)?;
    let servers = Servers {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?,
        bases: Arc::new(config.servers.clone()),
        next: Arc::new(AtomicUsize::new(0)),
        token: config.token.clone(),
    };
    let cache =
        Arc::new(ArtifactStore::open(&data_dir.blobs()).context("opening the artifact cache")?);
    let fetcher = Arc::new(CachingFetcher {
        cache: cache.clone(),
        servers: servers.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    let (reports, queue) = mpsc::channel(REPORT_QUEUE_CAPACITY);
    tokio::spawn(send_reports(servers.clone(), queue));
    let devices = shoal_actors::device::discover_devices();
    let actors = shoal_actors::agent::AgentConfig {
        node: config.id.to_string(),
        ..Default::default()
    };
    let reporter = Arc::new(HttpReporter { reports });
    let (agent, routes) =
        shoal_actors::agent::start_with(devices.clone(), fetcher, reporter, actors)
            .await
            .context("starting the actor system")?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let address = listener.local_addr()?;
    let node = NodeId(config.id);
    let (stop, stopping) = watch::channel(false);
    let beat = Heartbeat {
        address: address.to_string(),
        devices,
        labels: config.labels.clone(),
        load: BTreeMap::new(),
    };
    let plane = Arc::new(DataPlane {
        routes,
        traffic: Arc::default(),
    });
    let heartbeats = tokio::spawn(heartbeat(
        servers.clone(),
        node,
        beat,
        plane.clone(),
        stopping.clone(),
    ));
    let (in_use, in_use_now) = watch::channel(HashSet::new());
    let sweeper = tokio::spawn(sweep_cache(cache, in_use_now, stopping.clone()));
    let reconciler = tokio::spawn(reconcile(servers, node, agent.clone(), in_use, stopping));
    let router = axum::Router::new()
        .route("/internal/v1/replicas/{id}/infer", post(infer))
        .route("/internal/v1/replicas/{id}/generate", post(generate))
        .route(
            "/v2/health/live",
            get(|| async { Json(serde_json::json!({"live": true})) }),
        )
        .route("/metrics", get(|| async { shoal_ops::metrics::encode() }))
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::api::REQUEST_BODY_MAX_BYTES,
        ))
        .with_state(plane);
    println!("shoal: listening on http://{address}");
    tracing::info!(%node, data_plane = %address, "agent started");
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(crate::up::shutdown_signal())
        .await;
    let _ = stop.send(true);
    let _ = tokio::join!(heartbeats, reconciler, sweeper);
    agent.stop().await;
    drop(data_dir);
    served.context("serving the data plane")?;
    tracing::info!("agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    /// A fetcher with `cache`, asking the servers at `bases`.
    fn fetcher(cache: Arc<ArtifactStore>, bases: Vec<String>) -> CachingFetcher {
        CachingFetcher {
            cache,
            servers: Servers {
                http: reqwest::Client::new(),
                bases: Arc::new(bases),
                next: Arc::default(),
                token: None,
            },
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Regression: a cache that could not store a fetched blob asked every server in turn
    /// for it, and failed with "not found" when the trouble was the local disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_cache_that_cannot_store_a_blob_fails_with_its_own_error_asking_one_server() {
        let blob = b"weights".to_vec();
        let digest = crate::store::ArtifactStore::open(tempfile::tempdir().unwrap().path())
            .unwrap()
            .put(&blob)
            .unwrap();
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let server = axum::Router::new().route(
            "/api/v1/blobs/{digest}",
            get(move || {
                counter.fetch_add(1, Ordering::Relaxed);
                let blob = blob.clone();
                async move { blob }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, server).await });

        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ArtifactStore::open(dir.path()).unwrap());
        // Where the blob would be written, a file: no write there succeeds, root or not.
        let blobs = dir.path().join("sha256");
        std::fs::remove_dir(&blobs).unwrap();
        std::fs::write(&blobs, b"not a directory").unwrap();
        let fetcher = fetcher(cache, vec![base.clone(), base]);
        let wanted = digest.clone();
        let fetched = tokio::task::spawn_blocking(move || fetcher.fetch(&wanted))
            .await
            .unwrap();
        let Err(FetchError::Io { message, .. }) = fetched else {
            panic!("a local storage error, not {fetched:?}");
        };
        assert!(
            message.contains("storing it in the local cache"),
            "{message}"
        );
        assert_eq!(asked.load(Ordering::Relaxed), 1, "one server asked");
    }

    /// A blob an agent's replica starts from is used, whatever its age on disk: the cache's
    /// sweep keeps it for another grace, and drops one nothing used.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_cache_sweep_keeps_a_blob_a_replica_just_started_from() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ArtifactStore::open(dir.path()).unwrap());
        let used = cache.put(b"weights a replica starts from").unwrap();
        let unused = cache.put(b"weights of a replica long gone").unwrap();
        let old = SystemTime::now() - 2 * UNUSED_CACHE_GRACE;
        for digest in [&used, &unused] {
            let path = dir.path().join("sha256").join(digest);
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(old).unwrap();
        }
        let fetcher = fetcher(cache.clone(), Vec::new());
        let wanted = used.clone();
        let fetched = tokio::task::spawn_blocking(move || fetcher.fetch(&wanted))
            .await
            .unwrap();
        assert!(fetched.is_ok());

        crate::store::sweep_in_background(&cache, HashSet::new(), UNUSED_CACHE_GRACE).await;
        assert!(cache.touch(&used), "a blob just used stays");
        assert!(
            !cache.touch(&unused),
            "a blob nothing used for the grace goes"
        );
    }
}
