//! Agent tests: real actors, real candle, artifacts from memory instead of a server.

use super::*;
use crate::runtime::{CONFIG_FILE, WEIGHTS_FILE};
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
    let (sender, reports) = mpsc::channel(64);
    let devices = vec![Device {
        id: DeviceId(0),
        kind: DeviceKind::Cpu,
        memory_bytes: capacity_bytes,
    }];
    let (agent, routes) = start(
        devices,
        Arc::new(MemoryFetcher(blobs)),
        Arc::new(ChannelReporter(sender)),
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
