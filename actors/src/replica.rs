//! One replica: fetch and verify the version's files, reserve device memory, load the
//! model, warm it up, then serve through a batcher until stopped.
//!
//! Loading happens in `post_start`, so the agent that spawned the replica is not held up;
//! a load failure fails the actor, and the agent (its supervisor) reports why.

use crate::ArtifactFetcher;
use crate::agent::AgentMsg;
use crate::batcher::{self, BatcherConfig, BatcherCrashed, BatcherHandle};
use crate::compute::ComputePool;
use crate::device::{Activity, DeviceHandle};
use crate::generate::{self, GenerationConfig};
use crate::runtime::{self, LoadedModel, ModelFiles};
use crate::tensor::{NamedTensor, TensorData};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sha2::{Digest, Sha256};
use shoal_scheduler::{ArtifactFile, BatchingPolicy, DataType, DeviceId, ReplicaId, Signature};
use std::sync::Arc;
use std::time::Duration;

/// Most tokens one generation request may ask for: bounds a stream's buffer and a
/// sequence's time in the running batch.
pub const NEW_TOKENS_LIMIT: usize = 1_024;

/// Turns a version's verified files into a model on a candle device. The agent's default
/// is [`runtime::load_on`]; tests substitute their own.
pub type Loader = Arc<
    dyn Fn(&ModelFiles, &candle_core::Device) -> Result<LoadedModel, runtime::RuntimeError>
        + Send
        + Sync,
>;

/// The loader that reads every architecture Shoal knows.
pub fn default_loader() -> Loader {
    Arc::new(runtime::load_on)
}

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
    pub compute: ComputePool,
    pub loader: Loader,
}

/// A replica takes no requests through its mailbox: requests go straight to its batcher.
pub enum ReplicaMsg {
    /// Stop taking requests, finish those in flight, then stop. Answers once drained.
    Drain(Option<RpcReplyPort<()>>),
    /// The batcher's task ended: drained, or crashed after its model panicked.
    BatcherEnded(Result<(), BatcherCrashed>),
}

#[derive(Debug)]
pub struct Replica;

pub struct ReplicaState {
    args: ReplicaArgs,
    /// Kept so the batcher lives as long as the replica.
    batcher: Option<BatcherHandle>,
    draining: bool,
}

/// Why a replica could not start serving. Each repeats on a retry with the same files and
/// device, so the supervisor reports it instead of restarting.
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
    #[error("loading panicked: {0}")]
    Panicked(String),
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
            draining: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<ReplicaMsg>,
        state: &mut ReplicaState,
    ) -> Result<(), ActorProcessingErr> {
        let spec = &state.args.spec;
        let started = std::time::Instant::now();
        let activity = Activity::new();
        let device = state
            .args
            .devices
            .reserve(
                spec.id,
                spec.device,
                spec.reserved_bytes,
                Some(Arc::clone(&activity)),
            )
            .await
            .map_err(LoadError::from)?;
        let candle_device = runtime::candle_device(&device).map_err(LoadError::from)?;
        // Fetching, hashing, loading and the warm-up pass are one long job: a blocking
        // thread, bounded by the compute pool (see `ComputePool::run_long`).
        let files = spec.files.clone();
        let fetcher = Arc::clone(&state.args.fetcher);
        let loader = Arc::clone(&state.args.loader);
        let model = state
            .args
            .compute
            .run_long(move || {
                let contents = fetch_verified(fetcher.as_ref(), &files)?;
                let loaded = load_and_warm_up(&loader, &contents, &candle_device);
                drop(contents);
                // Loading copies the weights on the way in: give those pages back now
                // rather than keep them resident for the replica's life.
                shoal_ops::memory::release_freed_memory();
                loaded
            })
            .await
            .map_err(|error| LoadError::Panicked(error.to_string()))??;
        let handle = match model {
            LoadedModel::Fixed(model) => {
                let config = BatcherConfig {
                    batch_rows_max: spec.batching.batch_size_max as usize,
                    queue_delay_max: Duration::from_micros(spec.batching.queue_delay_max_us),
                    queue_capacity: spec.batching.queue_capacity as usize,
                    model: spec.model.clone(),
                    version: spec.version,
                };
                let (handle, task) =
                    batcher::spawn(model, config, state.args.compute.clone(), activity);
                let watcher = myself.clone();
                tokio::spawn(async move {
                    let ended = task
                        .await
                        .unwrap_or_else(|error| Err(BatcherCrashed(error.to_string())));
                    let _ = watcher.cast(ReplicaMsg::BatcherEnded(ended));
                });
                handle
            }
            LoadedModel::Generative(model) => {
                let signature = model.signature().clone();
                let config = GenerationConfig {
                    running_max: spec.batching.batch_size_max as usize,
                    queue_capacity: spec.batching.queue_capacity as usize,
                    new_tokens_limit: NEW_TOKENS_LIMIT,
                    model: spec.model.clone(),
                    version: spec.version,
                };
                let (generation, task) = generate::spawn(model, config, state.args.compute.clone());
                let watcher = myself.clone();
                tokio::spawn(async move {
                    let ended = task
                        .await
                        .map_err(|error| BatcherCrashed(error.to_string()));
                    let _ = watcher.cast(ReplicaMsg::BatcherEnded(ended));
                });
                batcher::for_generation(generation, signature, &spec.model, spec.version, activity)
            }
        };
        let load_time = started.elapsed();
        shoal_ops::metrics::metrics()
            .model_load_duration_seconds
            .with_label_values(&[&spec.model, &spec.version.to_string()])
            .observe(load_time.as_secs_f64());
        tracing::info!(
            replica = %spec.id,
            model = %spec.model,
            version = spec.version,
            device = %device.id,
            load_ms = load_time.as_millis() as u64,
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

    async fn handle(
        &self,
        myself: ActorRef<ReplicaMsg>,
        message: ReplicaMsg,
        state: &mut ReplicaState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ReplicaMsg::Drain(reply) => {
                state.draining = true;
                let batcher = state.batcher.clone();
                // Draining waits on in-flight requests: do it beside the mailbox, then stop.
                tokio::spawn(async move {
                    if let Some(batcher) = batcher {
                        batcher.drain().await;
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    myself.stop(Some("drained".into()));
                });
            }
            ReplicaMsg::BatcherEnded(Err(crash)) => {
                // Fail the actor: the agent, its supervisor, reports and restarts it.
                return Err(Box::new(crash));
            }
            ReplicaMsg::BatcherEnded(Ok(())) => {
                if !state.draining {
                    return Err(Box::new(BatcherCrashed("the batcher ended unasked".into())));
                }
            }
        }
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

/// Fetches every file and checks each against its digest. Blocking.
fn fetch_verified(
    fetcher: &dyn ArtifactFetcher,
    files: &[ArtifactFile],
) -> Result<ModelFiles, LoadError> {
    let mut contents = ModelFiles::new();
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
    Ok(contents)
}

/// Loads the model and runs one warm-up pass. Blocking; a long job of the compute pool.
fn load_and_warm_up(
    loader: &Loader,
    contents: &ModelFiles,
    device: &candle_core::Device,
) -> Result<LoadedModel, LoadError> {
    let model = loader(contents, device)?;
    let warm_up = zeros_for(model.signature());
    match &model {
        LoadedModel::Fixed(fixed) => {
            fixed
                .forward(&warm_up)
                .map_err(|error| LoadError::WarmUp(error.to_string()))?;
        }
        LoadedModel::Generative(generative) => {
            let prompt = generative
                .encode("warm up")
                .map_err(|error| LoadError::WarmUp(error.to_string()))?;
            if !prompt.is_empty() {
                generative
                    .prefill(&prompt)
                    .map_err(|error| LoadError::WarmUp(error.to_string()))?;
            }
        }
    }
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
