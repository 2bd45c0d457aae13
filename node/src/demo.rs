//! The embedded demo: on first start, train the `iris` classifier, store its files,
//! register it as a version and deploy it. Later starts find it in the replicated state
//! and do nothing.

use crate::control::ControlPlane;
use crate::store::ArtifactStore;
use crate::store::version_command;
use anyhow::Context;
use shoal_actors::runtime::{CONFIG_FILE, WEIGHTS_FILE};
use shoal_actors::train::{TrainConfig, train_classifier};
use shoal_scheduler::{Command, DeploymentSpec, Outcome};
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
                spec: DeploymentSpec::new(DEMO_MODEL, DEMO_MODEL, version, 1),
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
    let (command, accuracy) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let report = train_classifier(shoal_actors::IRIS_CSV, &TrainConfig::iris(), &dir)
            .context("training the demo model")?;
        let mut files = Vec::new();
        for name in [WEIGHTS_FILE, CONFIG_FILE] {
            let bytes = std::fs::read(dir.join(name)).with_context(|| format!("reading {name}"))?;
            let digest = store
                .put(&bytes)
                .with_context(|| format!("storing {name}"))?;
            files.push((name.to_string(), digest));
        }
        std::fs::remove_dir_all(&dir).ok();
        let command = version_command(&store, DEMO_MODEL, files, "safetensors")
            .map_err(|message| anyhow::anyhow!("describing the demo model: {message}"))?;
        Ok((command, report.accuracy))
    })
    .await??;
    tracing::info!(
        model = DEMO_MODEL,
        accuracy = format!("{:.3}", accuracy),
        rows = 150,
        "trained the demo model"
    );
    match control
        .propose(&command)
        .await
        .context("registering the demo model")?
    {
        Outcome::VersionRegistered { version, .. } => Ok(version),
        other => anyhow::bail!("registering the demo model answered {other:?}"),
    }
}
