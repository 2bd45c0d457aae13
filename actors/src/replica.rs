//! One replica: fetch and verify the version's files, reserve device memory, load the
//! model, warm it up, then serve through a batcher until stopped.
//!
//! Loading happens in `post_start`, so the agent that spawned the replica is not held up;
//! a load failure fails the actor, and the agent (its supervisor) reports why.

use crate::ArtifactFetcher;
use crate::agent::AgentMsg;
use crate::batcher::{self, BatcherConfig, BatcherHandle};
use crate::device::DeviceHandle;
use crate::runtime::{self, ModelRuntime};
use crate::tensor::{NamedTensor, TensorData};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use sha2::{Digest, Sha256};
use shoal_scheduler::{ArtifactFile, BatchingPolicy, DataType, DeviceId, ReplicaId, Signature};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Everything a replica needs to know about what it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaSpec {
    pub id: ReplicaId,
    pub epoch: u64,
    pub model: String,
    pub version: u32,
    pub device: DeviceId,
    pub reserved_bytes: u64,
    pub files: Vec<ArtifactFile>,
    pub batching: BatchingPolicy,
}

/// What a replica is started with.
pub struct ReplicaArgs {
    pub spec: ReplicaSpec,
    pub devices: DeviceHandle,
    pub fetcher: Arc<dyn ArtifactFetcher>,
    pub agent: ActorRef<AgentMsg>,
}

/// A replica takes no requests through its mailbox: requests go straight to its batcher.
#[derive(Debug)]
pub enum ReplicaMsg {}

#[derive(Debug)]
pub struct Replica;

pub struct ReplicaState {
    args: ReplicaArgs,
    /// Kept so the batcher lives as long as the replica.
    batcher: Option<BatcherHandle>,
}

/// Why a replica could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("artifact {name} ({digest}): {message}")]
    Artifact {
        name: String,
        digest: String,
        message: String,
    },
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error("the warm-up pass failed: {0}")]
    WarmUp(String),
    #[error("the loading thread panicked")]
    Panicked,
}

impl Actor for Replica {
    type Msg = ReplicaMsg;
    type State = ReplicaState;
    type Arguments = ReplicaArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ReplicaMsg>,
        args: ReplicaArgs,
    ) -> Result<ReplicaState, ActorProcessingErr> {
        Ok(ReplicaState {
            args,
            batcher: None,
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<ReplicaMsg>,
        state: &mut ReplicaState,
    ) -> Result<(), ActorProcessingErr> {
        let spec = &state.args.spec;
        let started = std::time::Instant::now();
        state
            .args
            .devices
            .reserve(spec.id, spec.device, spec.reserved_bytes)
            .await
            .map_err(LoadError::from)?;
        let files = spec.files.clone();
        let fetcher = Arc::clone(&state.args.fetcher);
        let model = tokio::task::spawn_blocking(move || load_verified(fetcher.as_ref(), &files))
            .await
            .map_err(|_| LoadError::Panicked)??;
        let batcher_config = BatcherConfig {
            batch_rows_max: spec.batching.batch_size_max as usize,
            queue_delay_max: Duration::from_micros(spec.batching.queue_delay_max_us),
            queue_capacity: spec.batching.queue_capacity as usize,
            model: spec.model.clone(),
        };
        let (handle, _task) = batcher::spawn(model, batcher_config);
        tracing::info!(
            replica = %spec.id,
            model = %spec.model,
            version = spec.version,
            load_ms = started.elapsed().as_millis() as u64,
            "replica serving"
        );
        state.batcher = Some(handle.clone());
        state.args.agent.cast(AgentMsg::Serving {
            replica: spec.id,
            epoch: spec.epoch,
            handle,
        })?;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ReplicaMsg>,
        state: &mut ReplicaState,
    ) -> Result<(), ActorProcessingErr> {
        // Queued requests still finish: the batcher stops once the last handle is gone.
        state.batcher = None;
        state
            .args
            .devices
            .release(state.args.spec.id, state.args.spec.device);
        Ok(())
    }
}

/// Fetches every file, checks each against its digest, loads the model and runs one
/// warm-up pass. Blocking.
fn load_verified(
    fetcher: &dyn ArtifactFetcher,
    files: &[ArtifactFile],
) -> Result<Arc<dyn ModelRuntime>, LoadError> {
    let mut contents = HashMap::new();
    for file in files {
        let artifact_error = |message: String| LoadError::Artifact {
            name: file.name.clone(),
            digest: file.digest.clone(),
            message,
        };
        let bytes = fetcher
            .fetch(&file.digest)
            .map_err(|error| artifact_error(error.to_string()))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != file.digest {
            return Err(artifact_error(format!("content hashes to {actual}")));
        }
        contents.insert(file.name.clone(), bytes);
    }
    let model = runtime::load(&contents)?;
    let warm_up = zeros_for(model.signature());
    model
        .forward(&warm_up)
        .map_err(|error| LoadError::WarmUp(error.to_string()))?;
    Ok(model)
}

/// One row of zeros (or empty strings) for every input of `signature`.
fn zeros_for(signature: &Signature) -> Vec<NamedTensor> {
    signature
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec.shape.iter().map(|&d| d.max(1) as usize).collect();
            let elements = shape.iter().product();
            let data = match spec.datatype {
                DataType::Fp32 => TensorData::Fp32(vec![0.0; elements]),
                DataType::Int64 => TensorData::Int64(vec![0; elements]),
                DataType::Bytes => TensorData::Bytes(vec![String::new(); elements]),
            };
            NamedTensor {
                name: spec.name.clone(),
                shape,
                data,
            }
        })
        .collect()
}
