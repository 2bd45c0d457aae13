//! Continuous batching for token generation: sequences join and leave the running batch at
//! every decode step, and each token streams to its caller as soon as it is produced.
//!
//! One task owns the running batch. Each iteration it admits waiting requests (up to
//! `running_max`), drops sequences whose caller went away or whose deadline passed, then
//! runs one compute job that prefills the newcomers and advances every other running
//! sequence by one token in a single batched decode step. Finished sequences (end token,
//! token limit, context full) leave at once, so a newcomer never waits for a whole batch.
//!
//! Bounds: `queue_capacity` requests may wait (beyond that `Overloaded`), at most
//! `running_max` run, and each stream holds at most one sequence's tokens.

use crate::batcher::Queued;
use crate::compute::ComputePool;
use crate::runtime::RuntimeError;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A model that generates tokens one step at a time with a cache per sequence.
pub trait Generator: Send + Sync + 'static {
    /// One sequence's cache.
    type Sequence: Send + 'static;

    fn encode(&self, prompt: &str) -> Result<Vec<u32>, RuntimeError>;
    fn decode_text(&self, tokens: &[u32]) -> Result<String, RuntimeError>;
    fn eos_token(&self) -> Option<u32>;
    /// Most tokens (prompt and generated) one sequence may hold.
    fn context_tokens_max(&self) -> usize;
    /// Tokens `sequence`'s cache holds now.
    fn cached_tokens(&self, sequence: &Self::Sequence) -> usize;
    fn default_max_new_tokens(&self) -> usize;
    /// Runs the prompts (in one batch where the model can) and returns each new sequence
    /// and its first generated token, in order.
    fn start(&self, prompts: &[&[u32]]) -> Result<Vec<(Self::Sequence, u32)>, RuntimeError>;
    /// Appends `last_tokens[i]` to sequence `i` and returns each one's next token.
    fn step(
        &self,
        sequences: &mut [&mut Self::Sequence],
        last_tokens: &[u32],
    ) -> Result<Vec<u32>, RuntimeError>;
}

/// How one continuous batcher behaves.
#[derive(Clone, Debug)]
pub struct GenerationConfig {
    /// Most sequences in the running batch.
    pub running_max: usize,
    /// Requests that may wait for a place; beyond this they are refused as overloaded.
    pub queue_capacity: usize,
    /// Upper bound on `max_new_tokens` a request may ask for.
    pub new_tokens_limit: usize,
    /// The model's name and version, for logs and metric labels.
    pub model: String,
    pub version: u32,
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: String,
    /// Tokens to generate at most; the model's default when `None`.
    pub max_new_tokens: Option<usize>,
    pub deadline: Instant,
}

/// Why a generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced its end token.
    EndToken,
    /// `max_new_tokens` were generated.
    Length,
    /// The sequence reached the model's context size.
    ContextFull,
}

/// One generated token as it streams out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenPiece {
    pub token: u32,
    /// The text this token adds to what came before.
    pub text: String,
}

/// A finished generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
}

/// Why a generation gave no (further) result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GenerateError {
    #[error("the generation queue is full")]
    Overloaded,
    #[error("the deadline passed before generation finished")]
    DeadlineExceeded,
    #[error("the replica is draining and takes no new requests")]
    Draining,
    #[error("the generator stopped")]
    Stopped,
    #[error("the prompt cannot be run: {0}")]
    Prompt(String),
    #[error("the model failed: {0}")]
    Model(String),
}

/// What a stream carries.
enum Event {
    Token(TokenPiece),
    Done(FinishReason),
    Failed(GenerateError),
}

/// The tokens of one request as they are produced. Dropping it cancels the request: the
/// sequence leaves the queue or the running batch at the next step.
pub struct TokenStream {
    events: mpsc::Receiver<Event>,
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
}

impl TokenStream {
    /// The next token; `None` once the generation finished (see [`TokenStream::finish`]).
    pub async fn next(&mut self) -> Option<Result<TokenPiece, GenerateError>> {
        match self.events.recv().await {
            Some(Event::Token(piece)) => {
                self.tokens.push(piece.token);
                self.text.push_str(&piece.text);
                Some(Ok(piece))
            }
            Some(Event::Done(reason)) => {
                self.finish = Some(reason);
                None
            }
            Some(Event::Failed(error)) => Some(Err(error)),
            None if self.finish.is_none() => Some(Err(GenerateError::Stopped)),
            None => None,
        }
    }

    /// Why the generation finished, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Waits for every token and returns the whole completion.
    pub async fn collect(mut self) -> Result<Completion, GenerateError> {
        while let Some(piece) = self.next().await {
            piece?;
        }
        Ok(Completion {
            tokens: self.tokens,
            text: self.text,
            finish: self.finish.unwrap_or(FinishReason::Length),
        })
    }
}

struct Pending {
    prompt: Vec<u32>,
    max_new_tokens: usize,
    deadline: Instant,
    events: mpsc::Sender<Event>,
    submitted_at: Instant,
    /// Counts the request in `shoal_queued_requests` until it starts (or is dropped).
    queued: Option<Queued>,
}

/// The metrics one continuous batcher updates, resolved once for its model and version.
#[derive(Clone, Debug)]
struct TokenMetrics {
    queued: prometheus::IntGauge,
    first_token_seconds: prometheus::Histogram,
    inter_token_seconds: prometheus::Histogram,
    tokens: prometheus::IntCounter,
}

impl TokenMetrics {
    fn new(model: &str, version: u32) -> TokenMetrics {
        let metrics = shoal_ops::metrics::metrics();
        let labels = [model, &version.to_string()];
        TokenMetrics {
            queued: metrics.queued_requests.with_label_values(&labels),
            first_token_seconds: metrics
                .time_to_first_token_seconds
                .with_label_values(&labels),
            inter_token_seconds: metrics
                .inter_token_latency_seconds
                .with_label_values(&labels),
            tokens: metrics.generated_tokens_total.with_label_values(&labels),
        }
    }
}

/// The sending side of a continuous batcher; clone it freely.
#[derive(Clone, Debug)]
pub struct GenerationHandle {
    queue: mpsc::Sender<Pending>,
    encoder: Encoder,
    default_max_new_tokens: usize,
    new_tokens_limit: usize,
    context_tokens_max: usize,
    draining: Arc<watch::Sender<bool>>,
    finished: watch::Receiver<bool>,
    stats: watch::Receiver<GenerationStats>,
    metrics: TokenMetrics,
}

/// What the continuous batcher has done, published after every step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenerationStats {
    /// Sequences in the running batch now.
    pub running: usize,
    /// Sequences started (prefilled) so far.
    pub started_total: u64,
    /// Sequences dropped before finishing, queued or running: caller gone or deadline passed.
    pub cancelled_total: u64,
    /// Decode steps run so far.
    pub steps_total: u64,
    /// Most sequences one decode step advanced.
    pub step_sequences_max: usize,
}

/// The model's tokenizer, so prompts are encoded (and refused) on the caller's task.
#[derive(Clone)]
struct Encoder(Arc<EncodeFn>);

type EncodeFn = dyn Fn(&str) -> Result<Vec<u32>, RuntimeError> + Send + Sync;

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoder")
    }
}

impl GenerationHandle {
    /// Queues a request and returns its token stream at once; refuses with `Overloaded`
    /// when the queue is full.
    pub fn submit(&self, request: &GenerationRequest) -> Result<TokenStream, GenerateError> {
        if *self.draining.borrow() {
            return Err(GenerateError::Draining);
        }
        let prompt = (self.encoder.0)(&request.prompt)
            .map_err(|error| GenerateError::Prompt(error.to_string()))?;
        if prompt.is_empty() {
            return Err(GenerateError::Prompt("the prompt has no tokens".into()));
        }
        if prompt.len() >= self.context_tokens_max {
            return Err(GenerateError::Prompt(format!(
                "the prompt has {} tokens; the model holds {}",
                prompt.len(),
                self.context_tokens_max
            )));
        }
        let max_new_tokens = request
            .max_new_tokens
            .unwrap_or(self.default_max_new_tokens)
            .clamp(1, self.new_tokens_limit);
        // Room for every token and the end: the decode loop never waits on a slow reader.
        let (events, receiver) = mpsc::channel(max_new_tokens + 1);
        let pending = Pending {
            prompt,
            max_new_tokens,
            deadline: request.deadline,
            events,
            submitted_at: Instant::now(),
            queued: Some(Queued::new(&self.metrics.queued)),
        };
        match self.queue.try_send(pending) {
            Ok(()) => Ok(TokenStream {
                events: receiver,
                tokens: Vec::new(),
                text: String::new(),
                finish: None,
            }),
            Err(mpsc::error::TrySendError::Full(_)) => Err(GenerateError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) if *self.draining.borrow() => {
                Err(GenerateError::Draining)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(GenerateError::Stopped),
        }
    }

    /// Generates to the end and returns the completion.
    pub async fn complete(&self, request: &GenerationRequest) -> Result<Completion, GenerateError> {
        self.submit(request)?.collect().await
    }

    /// Stops admission, lets running and queued sequences finish, returns when done.
    pub async fn drain(&self) {
        self.draining.send_replace(true);
        let mut finished = self.finished.clone();
        let _ = finished.wait_for(|done| *done).await;
    }

    /// Turns true once the batcher has ended.
    pub fn finished(&self) -> watch::Receiver<bool> {
        self.finished.clone()
    }

    /// What the batcher has done so far; changes after every step.
    pub fn stats(&self) -> watch::Receiver<GenerationStats> {
        self.stats.clone()
    }
}

/// A sequence in the running batch.
struct Running<S> {
    sequence: S,
    last_token: u32,
    /// When the previous token was streamed (the request's submission, before the first).
    last_token_at: Instant,
    generated: Vec<u32>,
    /// Text already streamed, to send only what each token adds.
    text_sent: String,
    max_new_tokens: usize,
    deadline: Instant,
    events: mpsc::Sender<Event>,
}

/// Starts a continuous batcher over `model` on the current runtime.
pub fn spawn<G: Generator>(
    model: Arc<G>,
    config: GenerationConfig,
    compute: ComputePool,
) -> (GenerationHandle, tokio::task::JoinHandle<()>) {
    let (queue, waiting) = mpsc::channel(config.queue_capacity.max(1));
    let (draining, draining_seen) = watch::channel(false);
    let (finished_sender, finished) = watch::channel(false);
    let (stats_sender, stats) = watch::channel(GenerationStats::default());
    let encoder_model = Arc::clone(&model);
    let metrics = TokenMetrics::new(&config.model, config.version);
    let handle = GenerationHandle {
        queue,
        encoder: Encoder(Arc::new(move |text: &str| encoder_model.encode(text))),
        default_max_new_tokens: model.default_max_new_tokens(),
        new_tokens_limit: config.new_tokens_limit.max(1),
        context_tokens_max: model.context_tokens_max(),
        draining: Arc::new(draining),
        finished,
        stats,
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(async move {
        run(
            model,
            config,
            compute,
            waiting,
            draining_seen,
            stats_sender,
            metrics,
        )
        .await;
        finished_sender.send_replace(true);
    });
    (handle, task)
}

/// What one compute job does: start the newcomers, advance the others by one token.
struct StepOutcome<S> {
    running: Vec<Running<S>>,
    newcomers: Vec<Pending>,
    started: Result<Vec<(S, u32)>, RuntimeError>,
    stepped: Result<Vec<u32>, RuntimeError>,
}

async fn run<G: Generator>(
    model: Arc<G>,
    config: GenerationConfig,
    compute: ComputePool,
    mut waiting: mpsc::Receiver<Pending>,
    mut draining: watch::Receiver<bool>,
    stats: watch::Sender<GenerationStats>,
    metrics: TokenMetrics,
) {
    let mut running: Vec<Running<G::Sequence>> = Vec::new();
    let mut open = true;
    loop {
        if *draining.borrow() && open {
            waiting.close();
        }
        // Admit: block only when nothing runs.
        let mut newcomers = Vec::new();
        if running.is_empty() {
            tokio::select! {
                next = waiting.recv() => match next {
                    Some(pending) => newcomers.push(pending),
                    None => return,
                },
                changed = draining.changed(), if open => {
                    if changed.is_err() || *draining.borrow() {
                        waiting.close();
                        open = false;
                    }
                    continue;
                }
            }
        }
        while running.len() + newcomers.len() < config.running_max.max(1) {
            match waiting.try_recv() {
                Ok(pending) => newcomers.push(pending),
                Err(_) => break,
            }
        }
        for pending in &mut newcomers {
            pending.queued = None;
        }
        let now = Instant::now();
        let before = newcomers.len() + running.len();
        newcomers.retain(|pending| admit(pending, now));
        running.retain(|sequence| keep(sequence, now));
        let cancelled = before - newcomers.len() - running.len();
        let stepping = running.len();
        stats.send_modify(|stats| {
            stats.cancelled_total += cancelled as u64;
            stats.started_total += newcomers.len() as u64;
            if stepping > 0 {
                stats.steps_total += 1;
                stats.step_sequences_max = stats.step_sequences_max.max(stepping);
            }
        });
        if running.is_empty() && newcomers.is_empty() {
            stats.send_modify(|stats| stats.running = 0);
            continue;
        }

        let worker = Arc::clone(&model);
        let outcome = compute
            .run(move || {
                let started = if newcomers.is_empty() {
                    Ok(Vec::new())
                } else {
                    let prompts: Vec<&[u32]> =
                        newcomers.iter().map(|p| p.prompt.as_slice()).collect();
                    worker.start(&prompts)
                };
                let stepped = if running.is_empty() {
                    Ok(Vec::new())
                } else {
                    let last_tokens: Vec<u32> = running.iter().map(|r| r.last_token).collect();
                    let mut sequences: Vec<&mut G::Sequence> =
                        running.iter_mut().map(|r| &mut r.sequence).collect();
                    worker.step(&mut sequences, &last_tokens)
                };
                StepOutcome {
                    running,
                    newcomers,
                    started,
                    stepped,
                }
            })
            .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                // The running batch was lost with the panic; its streams end as Stopped.
                tracing::error!(model = %config.model, %error, "decode step panicked");
                running = Vec::new();
                continue;
            }
        };
        running = outcome.running;
        match outcome.stepped {
            Ok(next_tokens) => {
                for (sequence, token) in running.iter_mut().zip(next_tokens) {
                    sequence.last_token = token;
                    sequence.generated.push(token);
                }
            }
            Err(error) => {
                tracing::warn!(model = %config.model, %error, "decode step failed");
                for sequence in running.drain(..) {
                    let _ = sequence
                        .events
                        .try_send(Event::Failed(GenerateError::Model(error.to_string())));
                }
            }
        }
        match outcome.started {
            Ok(started) => {
                for (pending, (sequence, token)) in outcome.newcomers.into_iter().zip(started) {
                    running.push(Running {
                        sequence,
                        last_token: token,
                        generated: vec![token],
                        text_sent: String::new(),
                        max_new_tokens: pending.max_new_tokens,
                        deadline: pending.deadline,
                        events: pending.events,
                        last_token_at: pending.submitted_at,
                    });
                }
            }
            Err(error) => {
                for pending in outcome.newcomers {
                    let _ = pending
                        .events
                        .try_send(Event::Failed(GenerateError::Prompt(error.to_string())));
                }
            }
        }
        // Stream the newest token of each sequence and retire the finished ones.
        let now = Instant::now();
        running.retain_mut(|sequence| emit(model.as_ref(), sequence, &metrics, now));
        stats.send_modify(|stats| stats.running = running.len());
    }
}

/// Whether a waiting request still wants an answer; answers it if its deadline passed.
fn admit(pending: &Pending, now: Instant) -> bool {
    if pending.events.is_closed() {
        return false;
    }
    if pending.deadline <= now {
        let _ = pending
            .events
            .try_send(Event::Failed(GenerateError::DeadlineExceeded));
        return false;
    }
    true
}

/// Whether a running sequence stays: its caller is still there and within its deadline.
fn keep<S>(sequence: &Running<S>, now: Instant) -> bool {
    if sequence.events.is_closed() {
        return false;
    }
    if sequence.deadline <= now {
        let _ = sequence
            .events
            .try_send(Event::Failed(GenerateError::DeadlineExceeded));
        return false;
    }
    true
}

/// Sends the sequence's newest token; returns whether it keeps running.
fn emit<G: Generator>(
    model: &G,
    sequence: &mut Running<G::Sequence>,
    metrics: &TokenMetrics,
    now: Instant,
) -> bool {
    let Some(&token) = sequence.generated.last() else {
        return true;
    };
    // The first token's wait runs from submission (queue and prefill); later ones from
    // the token before.
    let waited = now.duration_since(sequence.last_token_at).as_secs_f64();
    if sequence.generated.len() == 1 {
        metrics.first_token_seconds.observe(waited);
    } else {
        metrics.inter_token_seconds.observe(waited);
    }
    metrics.tokens.inc();
    sequence.last_token_at = now;
    let ended = model.eos_token() == Some(token);
    if !ended {
        let text = model
            .decode_text(&sequence.generated)
            .unwrap_or_else(|_| sequence.text_sent.clone());
        let added = text
            .strip_prefix(sequence.text_sent.as_str())
            .unwrap_or(&text)
            .to_string();
        sequence.text_sent = text;
        // The stream has room for every token (see `submit`); a full one means the caller
        // left, which the next step notices.
        let _ = sequence
            .events
            .try_send(Event::Token(TokenPiece { token, text: added }));
    }
    let finish = if ended {
        Some(FinishReason::EndToken)
    } else if sequence.generated.len() >= sequence.max_new_tokens {
        Some(FinishReason::Length)
    } else if model.cached_tokens(&sequence.sequence) >= model.context_tokens_max() {
        Some(FinishReason::ContextFull)
    } else {
        None
    };
    match finish {
        Some(reason) => {
            let _ = sequence.events.try_send(Event::Done(reason));
            false
        }
        None => true,
    }
}

#[cfg(test)]
mod tests;
