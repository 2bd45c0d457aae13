//! The embedded demo: on first start, train the `iris` classifier, store its files,
//! register it as a version and deploy it. Later starts find it in the replicated state
//! and do nothing.

use crate::control::ControlPlane;
use crate::store::ArtifactStore;
use anyhow::Context;
use sha2::{Digest, Sha256};
use shoal_actors::runtime::{CONFIG_FILE, WEIGHTS_FILE, memory_estimate_bytes, signature_of};
use shoal_actors::train::{TrainConfig, train_classifier};
use shoal_scheduler::{ArtifactFile, BatchingPolicy, Command, Outcome};
use std::path::Path;
use std::sync::Arc;

/// The demo model's (and its deployment's) name.
pub const DEMO_MODEL: &str = "iris";

/// Makes sure the demo model is registered and deployed.
pub async fn ensure(
    control: &ControlPlane,
    store: &Arc<ArtifactStore>,
    scratch: &Path,
) -> anyhow::Result<()> {
    let state = control.state();
    let version = match state
        .models
        .get(DEMO_MODEL)
        .and_then(|m| m.versions.keys().next_back())
    {
        Some(&version) => {
            tracing::info!(
                model = DEMO_MODEL,
                version,
                "demo model found in the log; not training"
            );
            version
        }
        None => register(control, store, scratch).await?,
    };
    if !state.deployments.contains_key(DEMO_MODEL) {
        control
            .propose(&Command::CreateDeployment {
                name: DEMO_MODEL.into(),
                model: DEMO_MODEL.into(),
                version,
                replicas: 1,
                batching: BatchingPolicy::default(),
            })
            .await
            .context("deploying the demo model")?;
        tracing::info!(deployment = DEMO_MODEL, version, "demo model deployed");
    }
    Ok(())
}

async fn register(
    control: &ControlPlane,
    store: &Arc<ArtifactStore>,
    scratch: &Path,
) -> anyhow::Result<u32> {
    let dir = scratch.join("iris-training");
    let store = Arc::clone(store);
    // Training and hashing are CPU work: keep them off the async workers.
    let (files, config_json, accuracy) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let report = train_classifier(shoal_actors::IRIS_CSV, &TrainConfig::iris(), &dir)
                .context("training the demo model")?;
            let mut files = Vec::new();
            let mut config_json = Vec::new();
            for name in [WEIGHTS_FILE, CONFIG_FILE] {
                let bytes =
                    std::fs::read(dir.join(name)).with_context(|| format!("reading {name}"))?;
                let digest = store
                    .put(&bytes)
                    .with_context(|| format!("storing {name}"))?;
                files.push(ArtifactFile {
                    name: name.into(),
                    digest,
                    size_bytes: bytes.len() as u64,
                });
                if name == CONFIG_FILE {
                    config_json = bytes;
                }
            }
            std::fs::remove_dir_all(&dir).ok();
            Ok((files, config_json, report.accuracy))
        })
        .await??;
    tracing::info!(
        model = DEMO_MODEL,
        accuracy = format!("{:.3}", accuracy),
        rows = 150,
        "trained the demo model"
    );

    let signature = signature_of(&config_json)?;
    let weights_bytes = files
        .iter()
        .find(|file| file.name == WEIGHTS_FILE)
        .map_or(0, |file| file.size_bytes);
    let command = Command::RegisterModelVersion {
        model: DEMO_MODEL.into(),
        manifest_digest: manifest_digest(&files),
        files,
        format: "safetensors".into(),
        memory_bytes: memory_estimate_bytes(weights_bytes),
        signature,
        created_at_ms: now_ms(),
    };
    match control
        .propose(&command)
        .await
        .context("registering the demo model")?
    {
        Outcome::VersionRegistered { version, .. } => Ok(version),
        other => anyhow::bail!("registering the demo model answered {other:?}"),
    }
}

/// A version's identity: the sha256 of its files' names, digests and sizes, in name order.
pub fn manifest_digest(files: &[ArtifactFile]) -> String {
    let mut sorted: Vec<&ArtifactFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut hasher = Sha256::new();
    for file in sorted {
        hasher.update(format!(
            "{}\t{}\t{}\n",
            file.name, file.digest, file.size_bytes
        ));
    }
    hex::encode(hasher.finalize())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}
