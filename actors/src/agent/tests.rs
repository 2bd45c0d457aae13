//! Agent tests: real actors, real candle, artifacts from memory instead of a server.

use super::*;
use crate::runtime::{CONFIG_FILE, LoadedModel, ModelRuntime, RuntimeError, WEIGHTS_FILE};
use crate::tensor::{NamedTensor, TensorData};
use crate::train::{TrainConfig, train_classifier};
use crate::{FetchError, IRIS_CSV};
use sha2::{Digest, Sha256};
use shoal_scheduler::{ArtifactFile, BatchingPolicy, DeviceId, DeviceKind};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;

struct MemoryFetcher(HashMap<String, Vec<u8>>);

impl ArtifactFetcher for MemoryFetcher {
    fn fetch(&self, digest: &str) -> Result<Vec<u8>, FetchError> {
        self.0
            .get(digest)
            .cloned()
            .ok_or_else(|| FetchError::NotFound(digest.into()))
    }
}

type Report = (ReplicaId, u64, ReplicaState, Option<String>);

struct ChannelReporter(mpsc::Sender<Report>);

impl ReplicaReporter for ChannelReporter {
    fn report(&self, replica: ReplicaId, epoch: u64, state: ReplicaState, failure: Option<String>) {
        self.0
            .try_send((replica, epoch, state, failure))
            .expect("test reporter keeps up");
    }
}

/// Trains the iris model and returns its files' bytes by digest and their manifest.
fn iris_artifacts() -> (HashMap<String, Vec<u8>>, Vec<ArtifactFile>) {
    let dir = tempfile::tempdir().unwrap();
    train_classifier(IRIS_CSV, &TrainConfig::iris(), dir.path()).unwrap();
    let mut blobs = HashMap::new();
    let mut files = Vec::new();
    for name in [WEIGHTS_FILE, CONFIG_FILE] {
        let bytes = std::fs::read(dir.path().join(name)).unwrap();
        let digest = hex::encode(Sha256::digest(&bytes));
        files.push(ArtifactFile {
            name: name.into(),
            digest: digest.clone(),
            size_bytes: bytes.len() as u64,
        });
        blobs.insert(digest, bytes);
    }
    (blobs, files)
}

fn spec(id: u64, files: Vec<ArtifactFile>, reserved_bytes: u64) -> ReplicaSpec {
    ReplicaSpec {
        id: ReplicaId(id),
        epoch: 1,
        model: "iris".into(),
        version: 1,
        device: DeviceId(0),
        reserved_bytes,
        files,
        batching: BatchingPolicy::default(),
    }
}

async fn start_agent(
    blobs: HashMap<String, Vec<u8>>,
    capacity_bytes: u64,
) -> (
    AgentHandle,
    watch::Receiver<Arc<Routes>>,
    mpsc::Receiver<Report>,
) {
    start_agent_with(blobs, capacity_bytes, AgentConfig::default()).await
}

async fn start_agent_with(
    blobs: HashMap<String, Vec<u8>>,
    capacity_bytes: u64,
    config: AgentConfig,
) -> (
    AgentHandle,
    watch::Receiver<Arc<Routes>>,
    mpsc::Receiver<Report>,
) {
    let (sender, reports) = mpsc::channel(64);
    let devices = vec![Device {
        id: DeviceId(0),
        kind: DeviceKind::Cpu,
        memory_bytes: capacity_bytes,
    }];
    let (agent, routes) = start_with(
        devices,
        Arc::new(MemoryFetcher(blobs)),
        Arc::new(ChannelReporter(sender)),
        config,
    )
    .await
    .unwrap();
    (agent, routes, reports)
}

async fn next_report(reports: &mut mpsc::Receiver<Report>) -> Report {
    tokio::time::timeout(Duration::from_secs(30), reports.recv())
        .await
        .expect("a report arrives")
        .expect("reporter open")
}

#[tokio::test]
async fn an_assigned_replica_loads_reports_ready_and_serves() {
    let (blobs, files) = iris_artifacts();
    let (agent, mut routes, mut reports) = start_agent(blobs, 1 << 30).await;
    assert!(agent.reconcile(vec![spec(7, files, 1 << 20)]));
    assert_eq!(next_report(&mut reports).await.2, ReplicaState::Loading);
    assert_eq!(
        next_report(&mut reports).await,
        (ReplicaId(7), 1, ReplicaState::Ready, None)
    );
    let table = routes
        .wait_for(|r| !r.for_model("iris").is_empty())
        .await
        .unwrap()
        .clone();
    let route = &table.for_model("iris")[0];
    let features = NamedTensor {
        name: "features".into(),
        shape: vec![1, 4],
        data: TensorData::Fp32(vec![6.3, 3.3, 6.0, 2.5]),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let outputs = route.handle.infer(vec![features], deadline).await.unwrap();
    assert_eq!(outputs[1].data, TensorData::Bytes(vec!["virginica".into()]));
    agent.stop().await;
}

#[tokio::test]
async fn a_replica_whose_artifact_does_not_match_its_digest_fails_with_the_reason() {
    let (mut blobs, files) = iris_artifacts();
    let weights_digest = files[0].digest.clone();
    blobs.insert(weights_digest.clone(), b"not the weights".to_vec());
    let (agent, routes, mut reports) = start_agent(blobs, 1 << 30).await;
    agent.reconcile(vec![spec(1, files, 1 << 20)]);
    assert_eq!(next_report(&mut reports).await.2, ReplicaState::Loading);
    let (_, _, state, failure) = next_report(&mut reports).await;
    assert_eq!(state, ReplicaState::Failed);
    let failure = failure.unwrap();
    assert!(
        failure.contains(&weights_digest) && failure.contains("hashes to"),
        "{failure}"
    );
    assert!(routes.borrow().for_model("iris").is_empty());
    agent.stop().await;
}

#[tokio::test]
async fn a_replica_that_does_not_fit_its_device_fails_and_reserves_nothing() {
    let (blobs, files) = iris_artifacts();
    let (agent, _routes, mut reports) = start_agent(blobs, 1 << 20).await;
    agent.reconcile(vec![spec(1, files.clone(), 2 << 20)]);
    next_report(&mut reports).await;
    let (_, _, state, failure) = next_report(&mut reports).await;
    assert_eq!(state, ReplicaState::Failed);
    assert!(failure.unwrap().contains("free"));
    // The device is still whole: a replica that fits loads.
    agent.reconcile(vec![spec(2, files, 1 << 20)]);
    next_report(&mut reports).await;
    assert_eq!(next_report(&mut reports).await.2, ReplicaState::Ready);
    agent.stop().await;
}

#[tokio::test]
async fn an_unassigned_replica_is_stopped_and_leaves_the_routes() {
    let (blobs, files) = iris_artifacts();
    let (agent, mut routes, mut reports) = start_agent(blobs, 1 << 30).await;
    agent.reconcile(vec![spec(1, files, 1 << 20)]);
    next_report(&mut reports).await;
    next_report(&mut reports).await;
    routes
        .wait_for(|r| r.for_model("iris").len() == 1)
        .await
        .unwrap();
    agent.reconcile(vec![]);
    tokio::time::timeout(
        Duration::from_secs(10),
        routes.wait_for(|r| r.for_model("iris").is_empty()),
    )
    .await
    .expect("routes emptied")
    .unwrap();
    agent.stop().await;
}

fn features(first: f32) -> Vec<NamedTensor> {
    vec![NamedTensor {
        name: "features".into(),
        shape: vec![1, 4],
        data: TensorData::Fp32(vec![first, 3.3, 6.0, 2.5]),
    }]
}

fn soon() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(10)
}

/// The iris model, except that a first feature of 666 makes it panic and every forward
/// pass first sleeps `delay`.
struct Wrapped {
    inner: Arc<dyn ModelRuntime>,
    delay: Duration,
}

impl ModelRuntime for Wrapped {
    fn signature(&self) -> &shoal_scheduler::Signature {
        self.inner.signature()
    }

    fn forward(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, RuntimeError> {
        std::thread::sleep(self.delay);
        if let TensorData::Fp32(values) = &inputs[0].data
            && values.first() == Some(&666.0)
        {
            panic!("poisoned input");
        }
        self.inner.forward(inputs)
    }
}

fn wrapping_config(delay: Duration, restart: RestartPolicy) -> AgentConfig {
    AgentConfig {
        loader: Arc::new(
            move |files, device| match crate::runtime::load_on(files, device)? {
                LoadedModel::Fixed(inner) => {
                    Ok(LoadedModel::Fixed(Arc::new(Wrapped { inner, delay })))
                }
                other => Ok(other),
            },
        ),
        restart,
        ..AgentConfig::default()
    }
}

fn quick_restarts(restarts_max: u32) -> RestartPolicy {
    RestartPolicy {
        restarts_max,
        window: Duration::from_secs(60),
        backoff: Duration::from_millis(10),
    }
}

async fn route_for(routes: &mut watch::Receiver<Arc<Routes>>) -> Route {
    tokio::time::timeout(
        Duration::from_secs(30),
        routes.wait_for(|r| !r.for_model("iris").is_empty()),
    )
    .await
    .expect("a route appears")
    .unwrap()
    .for_model("iris")[0]
        .clone()
}

#[tokio::test]
async fn a_replica_that_panics_is_reported_and_restarted() {
    let (blobs, files) = iris_artifacts();
    let config = wrapping_config(Duration::ZERO, quick_restarts(3));
    let (agent, mut routes, mut reports) = start_agent_with(blobs, 1 << 30, config).await;
    agent.reconcile(vec![spec(3, files, 1 << 20)]);
    assert_eq!(next_report(&mut reports).await.2, ReplicaState::Loading);
    assert_eq!(next_report(&mut reports).await.2, ReplicaState::Ready);
    let route = route_for(&mut routes).await;
    match route.handle.infer(features(666.0), soon()).await {
        Err(crate::batcher::InferError::Model(message)) => {
            assert!(message.contains("poisoned input"), "{message}")
        }
        other => panic!("unexpected {other:?}"),
    }
    let (id, epoch, state, reason) = next_report(&mut reports).await;
    assert_eq!((id, epoch, state), (ReplicaId(3), 1, ReplicaState::Loading));
    let reason = reason.unwrap();
    assert!(
        reason.contains("restarting") && reason.contains("poisoned input"),
        "{reason}"
    );
    assert_eq!(next_report(&mut reports).await.2, ReplicaState::Ready);
    routes.mark_unchanged();
    let route = route_for(&mut routes).await;
    let outputs = route.handle.infer(features(6.3), soon()).await.unwrap();
    assert_eq!(outputs[1].data, TensorData::Bytes(vec!["virginica".into()]));
    agent.stop().await;
}

#[tokio::test]
async fn a_replica_that_keeps_crashing_is_reported_failed_once_its_restarts_are_spent() {
    let (blobs, files) = iris_artifacts();
    let config = wrapping_config(Duration::ZERO, quick_restarts(1));
    let (agent, mut routes, mut reports) = start_agent_with(blobs, 1 << 30, config).await;
    agent.reconcile(vec![spec(4, files, 1 << 20)]);
    next_report(&mut reports).await;
    assert_eq!(next_report(&mut reports).await.2, ReplicaState::Ready);
    for expected in [ReplicaState::Loading, ReplicaState::Failed] {
        let route = route_for(&mut routes).await;
        let _ = route.handle.infer(features(666.0), soon()).await;
        let (_, _, state, reason) = next_report(&mut reports).await;
        assert_eq!(state, expected, "{reason:?}");
        if expected == ReplicaState::Loading {
            assert_eq!(next_report(&mut reports).await.2, ReplicaState::Ready);
        }
    }
    tokio::time::timeout(
        Duration::from_secs(10),
        routes.wait_for(|r| r.for_model("iris").is_empty()),
    )
    .await
    .expect("the failed replica leaves the routes")
    .unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn an_unassigned_replica_finishes_its_in_flight_requests_before_it_stops() {
    let (blobs, files) = iris_artifacts();
    let config = wrapping_config(Duration::from_millis(300), quick_restarts(0));
    let (agent, mut routes, mut reports) = start_agent_with(blobs, 1 << 30, config).await;
    agent.reconcile(vec![spec(5, files, 1 << 20)]);
    next_report(&mut reports).await;
    assert_eq!(next_report(&mut reports).await.2, ReplicaState::Ready);
    let route = route_for(&mut routes).await;
    let handle = route.handle.clone();
    let in_flight = tokio::spawn(async move { handle.infer(features(6.3), soon()).await });
    // Let the request reach the model (it sleeps 300 ms there), then unassign the replica.
    tokio::time::sleep(Duration::from_millis(50)).await;
    agent.reconcile(vec![]);
    let outputs = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(outputs[1].data, TensorData::Bytes(vec!["virginica".into()]));
    assert!(
        matches!(
            route.handle.infer(features(6.3), soon()).await,
            Err(crate::batcher::InferError::Draining | crate::batcher::InferError::Stopped)
        ),
        "a drained replica takes no new requests"
    );
    assert!(routes.borrow().for_model("iris").is_empty());
    agent.stop().await;
}

#[tokio::test]
async fn an_idle_replica_is_evicted_when_a_new_one_needs_its_memory_and_policy_allows() {
    let (blobs, files) = iris_artifacts();
    let config = AgentConfig {
        device_policy: crate::device::DevicePolicy {
            headroom_percent: 0,
            evict_idle: true,
        },
        ..AgentConfig::default()
    };
    let (agent, _routes, mut reports) = start_agent_with(blobs, 3 << 20, config).await;
    agent.reconcile(vec![spec(1, files.clone(), 2 << 20)]);
    next_report(&mut reports).await;
    assert_eq!(next_report(&mut reports).await.2, ReplicaState::Ready);
    agent.reconcile(vec![
        spec(1, files.clone(), 2 << 20),
        spec(2, files, 2 << 20),
    ]);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let (id, _, state, reason) = next_report(&mut reports).await;
        seen.push((id, state, reason.is_some_and(|r| r.contains("evicted"))));
    }
    assert!(seen.contains(&(ReplicaId(2), ReplicaState::Loading, false)));
    assert!(
        seen.contains(&(ReplicaId(1), ReplicaState::Failed, true)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(ReplicaId(2), ReplicaState::Ready, false)),
        "{seen:?}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_generative_replica_serves_text_through_its_route() {
    let files = crate::fixtures::tiny_llama(&crate::fixtures::TinyLlama::for_tests()).unwrap();
    let (blobs, manifest) = crate::fixtures::artifacts(&files);
    let (agent, mut routes, mut reports) = start_agent(blobs, 1 << 30).await;
    let mut llama = spec(8, manifest, 16 << 20);
    llama.model = "tiny-llama".into();
    agent.reconcile(vec![llama]);
    assert_eq!(next_report(&mut reports).await.2, ReplicaState::Loading);
    let (_, _, state, failure) = next_report(&mut reports).await;
    assert_eq!(state, ReplicaState::Ready, "{failure:?}");
    let table = routes
        .wait_for(|r| !r.for_model("tiny-llama").is_empty())
        .await
        .unwrap()
        .clone();
    let route = &table.for_model("tiny-llama")[0];
    let prompts = vec!["once".to_string(), "upon a time".to_string()];
    let outputs = route
        .handle
        .infer(
            vec![NamedTensor {
                name: crate::runtime::TEXT.into(),
                shape: vec![2],
                data: TensorData::Bytes(prompts.clone()),
            }],
            soon(),
        )
        .await
        .unwrap();
    assert_eq!(outputs[0].shape, vec![2]);
    // Each row is what the model generates for that prompt on its own.
    let generation = route.handle.generation().expect("a generative route");
    for (row, prompt) in prompts.iter().enumerate() {
        let alone = generation
            .complete(&crate::generate::GenerationRequest {
                prompt: prompt.clone(),
                max_new_tokens: None,
                deadline: soon(),
            })
            .await
            .unwrap();
        let TensorData::Bytes(texts) = &outputs[0].data else {
            panic!("text out")
        };
        assert_eq!(texts[row], alone.text);
    }
    agent.stop().await;
}
