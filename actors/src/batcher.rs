//! Dynamic batching: requests queue in front of one model; a batch closes when it holds
//! `batch_rows_max` rows or its first request has waited `queue_delay_max`, whichever
//! comes first; joining its rows, the forward pass and splitting the answers run on the
//! compute pool; each caller gets its rows back.
//!
//! The queue is bounded: when it is full a request is refused as `Overloaded` at once.
//! While a batch's forward pass runs, requests arriving meanwhile form the next batch,
//! which starts when the pass ends, or beside it once full: batches grow with the load.
//! Forward passes run on the host's [`ComputePool`], never on an async worker thread.
//!
//! Draining stops admission (new requests get `Draining`), answers everything already
//! queued, then ends the batcher. Generative models sit behind the same handle: each row
//! of a `text` input becomes one sequence of the [`crate::generate`] continuous batcher.

use crate::compute::ComputePool;
use crate::device::Activity;
use crate::generate::{GenerateError, GenerationHandle, GenerationRequest};
use crate::runtime::{ModelRuntime, RuntimeError};
use crate::tensor::{
    InputError, NamedTensor, TensorData, concat_rows, split_rows, validate_inputs,
};
use shoal_scheduler::Signature;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
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
    /// The model's name and version, for metric labels.
    pub model: String,
    pub version: u32,
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
    #[error("the replica is draining and takes no new requests")]
    Draining,
    #[error("the model failed: {0}")]
    Model(String),
}

struct Job {
    inputs: Vec<NamedTensor>,
    rows: usize,
    enqueued_at: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<NamedTensor>, InferError>>,
    /// Counts the job in `shoal_queued_requests` until its batch starts (or it is dropped).
    queued: Option<Queued>,
}

/// One request in the queued-requests gauge, for as long as it lives.
pub(crate) struct Queued(prometheus::IntGauge);

impl Queued {
    pub(crate) fn new(gauge: &prometheus::IntGauge) -> Queued {
        gauge.inc();
        Queued(gauge.clone())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The sending side of a batcher; clone it freely. The batcher stops, after answering
/// everything queued, once every handle is dropped or [`BatcherHandle::drain`] is called.
#[derive(Clone, Debug)]
pub struct BatcherHandle {
    queue: Queue,
    signature: Arc<Signature>,
    control: Arc<Control>,
    metrics: HandleMetrics,
}

/// The metrics a handle updates, resolved once for its model and version.
#[derive(Clone, Debug)]
struct HandleMetrics {
    overloaded: prometheus::IntCounter,
    queued: prometheus::IntGauge,
}

impl HandleMetrics {
    fn new(model: &str, version: u32) -> HandleMetrics {
        let metrics = shoal_ops::metrics::metrics();
        let labels = [model, &version.to_string()];
        HandleMetrics {
            overloaded: metrics.overloaded_total.with_label_values(&labels),
            queued: metrics.queued_requests.with_label_values(&labels),
        }
    }
}

#[derive(Clone, Debug)]
enum Queue {
    /// Fixed-shape models: rows go to the dynamic batcher.
    Rows(mpsc::Sender<Job>),
    /// Generative models: each row is one sequence of the continuous batcher.
    Tokens(GenerationHandle),
}

/// Shared between the handles and the batcher task.
#[derive(Debug)]
struct Control {
    draining: watch::Sender<bool>,
    finished: watch::Receiver<bool>,
    activity: Arc<Activity>,
}

/// Counts a request as in flight for as long as it lives, even when the caller goes away.
struct InFlight<'a>(&'a Activity);

impl<'a> InFlight<'a> {
    fn new(activity: &'a Activity) -> InFlight<'a> {
        activity.begin();
        InFlight(activity)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl BatcherHandle {
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The generation handle of a generative model (streaming, per-token), if this is one.
    pub fn generation(&self) -> Option<&GenerationHandle> {
        match &self.queue {
            Queue::Tokens(handle) => Some(handle),
            Queue::Rows(_) => None,
        }
    }

    /// Validates `inputs`, queues them, and waits for their rows of a batch's output.
    pub async fn infer(
        &self,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
    ) -> Result<Vec<NamedTensor>, InferError> {
        let rows = validate_inputs(&self.signature, &inputs)?;
        if *self.control.draining.borrow() {
            return Err(InferError::Draining);
        }
        let _in_flight = InFlight::new(&self.control.activity);
        match &self.queue {
            Queue::Rows(jobs) => self.infer_rows(jobs, inputs, rows, deadline).await,
            Queue::Tokens(generation) => generate_rows(generation, inputs, deadline).await,
        }
    }

    async fn infer_rows(
        &self,
        jobs: &mpsc::Sender<Job>,
        inputs: Vec<NamedTensor>,
        rows: usize,
        deadline: Instant,
    ) -> Result<Vec<NamedTensor>, InferError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            inputs,
            rows,
            enqueued_at: Instant::now(),
            deadline,
            reply,
            queued: Some(Queued::new(&self.metrics.queued)),
        };
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.overloaded.inc();
                return Err(InferError::Overloaded);
            }
            Err(mpsc::error::TrySendError::Closed(_)) if *self.control.draining.borrow() => {
                return Err(InferError::Draining);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(InferError::Stopped),
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(InferError::Stopped),
            Err(_) => Err(InferError::DeadlineExceeded),
        }
    }

    /// Stops admission, lets everything queued finish, and returns once the batcher is done.
    pub async fn drain(&self) {
        self.control.draining.send_replace(true);
        if let Queue::Tokens(generation) = &self.queue {
            generation.drain().await;
        }
        let mut finished = self.control.finished.clone();
        let _ = finished.wait_for(|done| *done).await;
    }

    /// Whether the batcher has stopped (drained, or its task ended).
    pub fn is_finished(&self) -> bool {
        *self.control.finished.borrow()
    }

    /// The request tally the device manager reads to find idle replicas.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.control.activity
    }
}

/// Runs each `text` row as one generated sequence and answers the texts in row order.
/// Every row is queued before any is awaited, so they run together in the batch.
async fn generate_rows(
    generation: &GenerationHandle,
    inputs: Vec<NamedTensor>,
    deadline: Instant,
) -> Result<Vec<NamedTensor>, InferError> {
    let Some(TensorData::Bytes(prompts)) = inputs.into_iter().next().map(|input| input.data) else {
        return Err(InferError::Model(
            "a generative model takes BYTES prompts".into(),
        ));
    };
    let rows = prompts.len();
    let mut streams = Vec::with_capacity(rows);
    for prompt in prompts {
        streams.push(generation.submit(&GenerationRequest {
            prompt,
            max_new_tokens: None,
            deadline,
        })?);
    }
    let mut texts = Vec::with_capacity(rows);
    for stream in streams {
        texts.push(stream.collect().await?.text);
    }
    Ok(vec![NamedTensor {
        name: crate::runtime::TEXT.into(),
        shape: vec![rows],
        data: TensorData::Bytes(texts),
    }])
}

impl From<GenerateError> for InferError {
    fn from(error: GenerateError) -> Self {
        match error {
            GenerateError::Overloaded => InferError::Overloaded,
            GenerateError::DeadlineExceeded => InferError::DeadlineExceeded,
            GenerateError::Draining => InferError::Draining,
            GenerateError::Stopped => InferError::Stopped,
            other => InferError::Model(other.to_string()),
        }
    }
}

/// Starts a batcher over `model` on the current runtime; forward passes run on `compute`.
pub fn spawn(
    model: Arc<dyn ModelRuntime>,
    config: BatcherConfig,
    compute: ComputePool,
    activity: Arc<Activity>,
) -> (BatcherHandle, JoinHandle<Result<(), BatcherCrashed>>) {
    let (jobs, queue) = mpsc::channel(config.queue_capacity.max(1));
    let (draining, draining_seen) = watch::channel(false);
    let (finished_sender, finished) = watch::channel(false);
    let handle = BatcherHandle {
        queue: Queue::Rows(jobs),
        signature: Arc::new(model.signature().clone()),
        metrics: HandleMetrics::new(&config.model, config.version),
        control: Arc::new(Control {
            draining,
            finished,
            activity,
        }),
    };
    let task = tokio::spawn(async move {
        let ended = run(model, config, compute, queue, draining_seen).await;
        finished_sender.send_replace(true);
        ended
    });
    (handle, task)
}

/// A handle over a continuous batcher, so generative replicas route like the others.
pub fn for_generation(
    generation: GenerationHandle,
    signature: Signature,
    model: &str,
    version: u32,
    activity: Arc<Activity>,
) -> BatcherHandle {
    let (draining, _) = watch::channel(false);
    BatcherHandle {
        signature: Arc::new(signature),
        metrics: HandleMetrics::new(model, version),
        control: Arc::new(Control {
            draining,
            finished: generation.finished(),
            activity,
        }),
        queue: Queue::Tokens(generation),
    }
}

/// Takes the next job: from the carried-over one, the queue, or nothing once the queue is
/// closed and empty. Closes the queue when draining starts, so it empties and then ends.
async fn next_job(
    carried: &mut Option<Job>,
    queue: &mut mpsc::Receiver<Job>,
    draining: &mut watch::Receiver<bool>,
) -> Option<Job> {
    if let Some(job) = carried.take() {
        return Some(job);
    }
    loop {
        // Draining (or every handle gone): take nothing new, finish what is queued.
        let closing = draining.has_changed().is_err() || *draining.borrow();
        if closing {
            queue.close();
            return queue.recv().await;
        }
        tokio::select! {
            job = queue.recv() => return job,
            _ = draining.changed() => {}
        }
    }
}

/// Batches of a replica in a forward pass at once; the second only when it is full.
///
/// While a pass runs the next batch fills, and starts beside it only once it holds
/// `batch_rows_max` rows: a pass's kernels already split across every thread of the pool,
/// and a batch started as soon as one request was queued shared the pool with the running
/// one. On the 2-core bench host that kept batches of the MLP at c=64 at 12 rows; filling
/// them served 13% more requests per second (14% at c=8), MiniLM 11% more at c=32 and
/// 19% at c=8, with lower p50s (`cargo bench -p shoal-tests --bench serving`,
/// BENCHMARKS.md). A full batch (always, with `batch_rows_max` 1) gains nothing by waiting,
/// so two passes still run at once under a load that fills them. So that the pool does not
/// wait between passes, a batch's task reports its pass over before it answers its
/// callers, and the batcher hands over the next batch first. Not measured on a GPU.
const BATCHES_IN_FLIGHT_MAX: usize = 2;

/// The metrics one batcher updates.
struct BatchMetrics {
    batch_rows: prometheus::Histogram,
    queue_seconds: prometheus::Histogram,
    compute_seconds: prometheus::Histogram,
}

async fn run(
    model: Arc<dyn ModelRuntime>,
    config: BatcherConfig,
    compute: ComputePool,
    mut queue: mpsc::Receiver<Job>,
    mut draining: watch::Receiver<bool>,
) -> Result<(), BatcherCrashed> {
    let metrics = shoal_ops::metrics::metrics();
    let labels = [config.model.as_str(), &config.version.to_string()];
    let metrics = Arc::new(BatchMetrics {
        batch_rows: metrics.batch_rows.with_label_values(&labels),
        queue_seconds: metrics.queue_duration_seconds.with_label_values(&labels),
        compute_seconds: metrics.compute_duration_seconds.with_label_values(&labels),
    });
    let mut carried: Option<Job> = None;
    // Batches whose forward pass is not over, oldest first.
    let mut computing: VecDeque<oneshot::Receiver<Result<(), BatcherCrashed>>> = VecDeque::new();
    // Every batch's task, until it has answered its callers.
    let mut answering: VecDeque<JoinHandle<()>> = VecDeque::new();
    loop {
        while answering.front().is_some_and(JoinHandle::is_finished) {
            if let Some(task) = answering.pop_front() {
                finished_batch(answered(task.await), &mut queue, &mut carried)?;
            }
        }
        if computing.len() >= BATCHES_IN_FLIGHT_MAX {
            finished_batch(pass_over(&mut computing).await, &mut queue, &mut carried)?;
        }
        // Wait for the next request, noticing meanwhile when a forward pass ends.
        let first = tokio::select! {
            job = next_job(&mut carried, &mut queue, &mut draining) => Some(job),
            ended = pass_over(&mut computing) => {
                finished_batch(ended, &mut queue, &mut carried)?;
                None
            }
        };
        let first = match first {
            None => continue,
            Some(None) => break,
            Some(Some(job)) => job,
        };
        let close_at = first.enqueued_at + config.queue_delay_max;
        let mut rows = first.rows;
        let mut batch = vec![first];
        while rows < config.batch_rows_max {
            // What is queued already joins without arming a timer; only an empty queue
            // waits, and no longer than the first request's delay allows.
            let next = match queue.try_recv() {
                Ok(job) => Some(job),
                // A pass is running: the batch fills until it ends, and starts beside it
                // only if it fills up.
                Err(mpsc::error::TryRecvError::Empty) if !computing.is_empty() => {
                    tokio::select! {
                        job = queue.recv() => job,
                        ended = pass_over(&mut computing) => {
                            finished_batch(ended, &mut queue, &mut carried)?;
                            continue;
                        }
                    }
                }
                // The delay is spent (or zero): close now. Arming a timer anyway would
                // cost a tick of tokio's millisecond timer wheel.
                Err(mpsc::error::TryRecvError::Empty) if Instant::now() >= close_at => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(close_at, queue.recv())
                        .await
                        .ok()
                        .flatten()
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            match next {
                Some(job) if rows + job.rows > config.batch_rows_max => {
                    carried = Some(job);
                    break;
                }
                Some(job) => {
                    rows += job.rows;
                    batch.push(job);
                }
                None => break,
            }
        }

        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for mut job in batch {
            job.queued = None;
            if job.reply.is_closed() {
                continue;
            }
            if job.deadline <= now {
                let _ = job.reply.send(Err(InferError::DeadlineExceeded));
                continue;
            }
            metrics
                .queue_seconds
                .observe(now.duration_since(job.enqueued_at).as_secs_f64());
            live.push(job);
        }
        if live.is_empty() {
            continue;
        }
        let (done, computed) = oneshot::channel();
        computing.push_back(computed);
        answering.push_back(tokio::spawn(run_batch(
            Arc::clone(&model),
            live,
            compute.clone(),
            Arc::clone(&metrics),
            config.model.clone(),
            done,
        )));
    }
    while !computing.is_empty() {
        finished_batch(pass_over(&mut computing).await, &mut queue, &mut carried)?;
    }
    while let Some(task) = answering.pop_front() {
        finished_batch(answered(task.await), &mut queue, &mut carried)?;
    }
    Ok(())
}

/// Waits for the oldest running pass to end, takes it off `computing` and gives its
/// outcome; a task that ended without reporting (cancelled before the pass was over)
/// counts as a crash. Never ends while no pass runs.
async fn pass_over(
    computing: &mut VecDeque<oneshot::Receiver<Result<(), BatcherCrashed>>>,
) -> Result<(), BatcherCrashed> {
    let Some(oldest) = computing.front_mut() else {
        return std::future::pending().await;
    };
    let report = oldest.await;
    computing.pop_front();
    report.unwrap_or_else(|_| {
        Err(BatcherCrashed(
            "a batch's task ended before its forward pass did".into(),
        ))
    })
}

/// How a batch's task ended once it answered its callers: a panic there is a crash too.
fn answered(ended: Result<(), tokio::task::JoinError>) -> Result<(), BatcherCrashed> {
    ended.map_err(|join_error| BatcherCrashed(join_error.to_string()))
}

/// Runs one batch on the compute pool, reports through `done` that the pass is over (so
/// the batcher hands the pool the next batch before this one's callers are answered), and
/// answers its callers.
async fn run_batch(
    model: Arc<dyn ModelRuntime>,
    mut live: Vec<Job>,
    compute: ComputePool,
    metrics: Arc<BatchMetrics>,
    model_name: String,
    done: oneshot::Sender<Result<(), BatcherCrashed>>,
) {
    let rows_per_job: Vec<usize> = live.iter().map(|job| job.rows).collect();
    let requests: Vec<Vec<NamedTensor>> = live
        .iter_mut()
        .map(|job| std::mem::take(&mut job.inputs))
        .collect();
    metrics
        .batch_rows
        .observe(rows_per_job.iter().sum::<usize>() as f64);
    let started = std::time::Instant::now();
    // Joining the rows and splitting the answers run on the pool too: the runtime thread
    // is the busier one. After a pass, the requests' tensors come back to be freed here,
    // on the thread that allocated them: glibc's allocator locks the arena of a chunk freed
    // on another thread, and the runtime thread allocating the next requests' tensors waits
    // on it. (A failed or panicked pass frees them on the pool; that is rare.)
    let result = compute
        .run(move || {
            let slices: Vec<&[NamedTensor]> = requests.iter().map(Vec::as_slice).collect();
            let outputs = model.forward(&concat_rows(&slices))?;
            Ok::<_, RuntimeError>((split_rows(&outputs, &rows_per_job), requests))
        })
        .await;
    metrics
        .compute_seconds
        .observe(started.elapsed().as_secs_f64());
    let _ = done.send(match &result {
        Ok(_) => Ok(()),
        Err(compute_error) => Err(BatcherCrashed(compute_error.to_string())),
    });
    // With one runtime thread the batcher runs only when this task yields: let it start
    // the next pass first, so the pool does not wait on these answers.
    tokio::task::yield_now().await;
    match result {
        Ok(Ok((outputs, requests))) => {
            for (job, outputs) in live.into_iter().zip(outputs) {
                let _ = job.reply.send(Ok(outputs));
            }
            drop(requests);
        }
        Ok(Err(error)) => {
            let message = error.to_string();
            tracing::warn!(model = %model_name, error = %message, "forward pass failed");
            for job in live {
                let _ = job.reply.send(Err(InferError::Model(message.clone())));
            }
        }
        Err(compute_error) => {
            let message = compute_error.to_string();
            tracing::error!(model = %model_name, error = %message, "forward pass panicked");
            for job in live {
                let _ = job.reply.send(Err(InferError::Model(message.clone())));
            }
        }
    }
}

/// Takes a finished batch's outcome. After a panic the model may be left in any state:
/// refuse everything queued and end the batcher, so the replica fails and its supervisor
/// reloads it.
fn finished_batch(
    ended: Result<(), BatcherCrashed>,
    queue: &mut mpsc::Receiver<Job>,
    carried: &mut Option<Job>,
) -> Result<(), BatcherCrashed> {
    let Err(crash) = ended else {
        return Ok(());
    };
    queue.close();
    while let Ok(job) = queue.try_recv() {
        let _ = job.reply.send(Err(InferError::Stopped));
    }
    if let Some(job) = carried.take() {
        let _ = job.reply.send(Err(InferError::Stopped));
    }
    Err(crash)
}

/// How a batcher's task ends when its model panicked; the replica watching the task turns
/// it into an actor failure, and its supervisor restarts it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the batcher stopped after a crash: {0}")]
pub struct BatcherCrashed(pub String);

#[cfg(test)]
mod tests;
