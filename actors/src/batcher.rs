//! Dynamic batching: requests queue in front of one model; a batch closes when it holds
//! `batch_rows_max` rows or its first request has waited `queue_delay_max`, whichever
//! comes first; the forward pass runs on a blocking thread; each caller gets its rows back.
//!
//! The queue is bounded: when it is full a request is refused as `Overloaded` at once.
//! One batch runs at a time per replica; requests arriving meanwhile form the next batch.

use crate::runtime::ModelRuntime;
use crate::tensor::{InputError, NamedTensor, concat_rows, split_rows, validate_inputs};
use shoal_scheduler::Signature;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How one batcher behaves.
#[derive(Clone, Debug)]
pub struct BatcherConfig {
    /// Most rows in one forward pass. A single request with more rows runs alone.
    pub batch_rows_max: usize,
    /// Longest the first request of a batch waits for company.
    pub queue_delay_max: Duration,
    /// Requests that may wait; beyond this they are refused as overloaded.
    pub queue_capacity: usize,
    /// The model's name, for metric labels.
    pub model: String,
}

/// Why a request got no result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("the replica's queue is full")]
    Overloaded,
    #[error("the deadline passed before the result was ready")]
    DeadlineExceeded,
    #[error("the replica stopped before answering")]
    Stopped,
    #[error("the model failed: {0}")]
    Model(String),
}

struct Job {
    inputs: Vec<NamedTensor>,
    rows: usize,
    enqueued_at: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<NamedTensor>, InferError>>,
}

/// The sending side of a batcher; clone it freely. The batcher stops, after answering
/// everything queued, once every handle is dropped.
#[derive(Clone, Debug)]
pub struct BatcherHandle {
    jobs: mpsc::Sender<Job>,
    signature: Arc<Signature>,
    model: Arc<str>,
}

impl BatcherHandle {
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Validates `inputs`, queues them, and waits for their rows of a batch's output.
    pub async fn infer(
        &self,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
    ) -> Result<Vec<NamedTensor>, InferError> {
        let rows = validate_inputs(&self.signature, &inputs)?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            inputs,
            rows,
            enqueued_at: Instant::now(),
            deadline,
            reply,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                shoal_ops::metrics::metrics()
                    .overloaded_total
                    .with_label_values(&[&self.model])
                    .inc();
                return Err(InferError::Overloaded);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(InferError::Stopped),
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(InferError::Stopped),
            Err(_) => Err(InferError::DeadlineExceeded),
        }
    }
}

/// Starts a batcher over `model` on the current runtime.
pub fn spawn(
    model: Arc<dyn ModelRuntime>,
    config: BatcherConfig,
) -> (BatcherHandle, JoinHandle<()>) {
    let (jobs, queue) = mpsc::channel(config.queue_capacity.max(1));
    let handle = BatcherHandle {
        jobs,
        signature: Arc::new(model.signature().clone()),
        model: Arc::from(config.model.as_str()),
    };
    let task = tokio::spawn(run(model, config, queue));
    (handle, task)
}

async fn run(model: Arc<dyn ModelRuntime>, config: BatcherConfig, mut queue: mpsc::Receiver<Job>) {
    let metrics = shoal_ops::metrics::metrics();
    let batch_rows = metrics.batch_rows.with_label_values(&[&config.model]);
    let queue_seconds = metrics
        .queue_duration_seconds
        .with_label_values(&[&config.model]);
    let compute_seconds = metrics
        .compute_duration_seconds
        .with_label_values(&[&config.model]);
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let close_at = first.enqueued_at + config.queue_delay_max;
        let mut rows = first.rows;
        let mut batch = vec![first];
        while rows < config.batch_rows_max {
            match tokio::time::timeout_at(close_at, queue.recv()).await {
                Ok(Some(job)) if rows + job.rows > config.batch_rows_max => {
                    carried = Some(job);
                    break;
                }
                Ok(Some(job)) => {
                    rows += job.rows;
                    batch.push(job);
                }
                Ok(None) | Err(_) => break,
            }
        }

        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for job in batch {
            if job.reply.is_closed() {
                continue;
            }
            if job.deadline <= now {
                let _ = job.reply.send(Err(InferError::DeadlineExceeded));
                continue;
            }
            queue_seconds.observe(now.duration_since(job.enqueued_at).as_secs_f64());
            live.push(job);
        }
        if live.is_empty() {
            continue;
        }
        let rows_per_job: Vec<usize> = live.iter().map(|job| job.rows).collect();
        let inputs = {
            let slices: Vec<&[NamedTensor]> =
                live.iter().map(|job| job.inputs.as_slice()).collect();
            concat_rows(&slices)
        };
        batch_rows.observe(rows_per_job.iter().sum::<usize>() as f64);
        let started = std::time::Instant::now();
        let runner = Arc::clone(&model);
        let result = tokio::task::spawn_blocking(move || runner.forward(&inputs)).await;
        compute_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(outputs)) => {
                for (job, outputs) in live.into_iter().zip(split_rows(&outputs, &rows_per_job)) {
                    let _ = job.reply.send(Ok(outputs));
                }
            }
            Ok(Err(error)) => {
                let message = error.to_string();
                tracing::warn!(model = %config.model, error = %message, "forward pass failed");
                for job in live {
                    let _ = job.reply.send(Err(InferError::Model(message.clone())));
                }
            }
            Err(join_error) => {
                let message = format!("forward pass panicked: {join_error}");
                tracing::error!(model = %config.model, "{message}");
                for job in live {
                    let _ = job.reply.send(Err(InferError::Model(message.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
