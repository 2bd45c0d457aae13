//! The embedded demo: on the first start of a data dir, train the `iris` classifier, store
//! its files, register it as a version and deploy it. Later starts find it in the
//! replicated state and change nothing: what the operator did since (a deleted deployment,
//! versions pushed, a rollout) stands.

use crate::control::ControlPlane;
use crate::store::ArtifactStore;
use crate::store::version_command;
use anyhow::Context;
use shoal_actors::runtime::{CONFIG_FILE, WEIGHTS_FILE};
use shoal_actors::train::{TrainConfig, train_classifier};
use shoal_scheduler::{ClusterState, Command, DeploymentSpec, Outcome};
use std::path::Path;
use std::sync::Arc;

/// The demo model's (and its deployment's) name.
pub const DEMO_MODEL: &str = "iris";

/// Whether this data dir's first start set the demo up already: its model is in the log.
///
/// A first start stopped between registering the model and deploying it counts as set up
/// too: the log cannot tell that from an operator who deleted the deployment, and
/// redeploying what an operator deleted is the worse mistake.
pub fn is_set_up(state: &ClusterState) -> bool {
    state.models.contains_key(DEMO_MODEL)
}

/// Sets the demo up on a data dir's first start: trains and registers its model, and
/// deploys that version. Does nothing once [`is_set_up`].
pub async fn ensure(
    control: &ControlPlane,
    store: &Arc<ArtifactStore>,
    scratch: &Path,
) -> anyhow::Result<()> {
    if is_set_up(&control.state()) {
        tracing::info!(
            model = DEMO_MODEL,
            "demo model found in the log; not training or deploying it again"
        );
        return Ok(());
    }
    let version = register(control, store, scratch).await?;
    control
        .propose(&Command::CreateDeployment {
            spec: DeploymentSpec::new(DEMO_MODEL, DEMO_MODEL, version, 1),
        })
        .await
        .context("deploying the demo model")?;
    tracing::info!(deployment = DEMO_MODEL, version, "demo model deployed");
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
