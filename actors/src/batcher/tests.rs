//! Batcher tests with paused time: when batches close, who gets which rows, and refusals.

use super::*;
use crate::compute::ComputePool;
use crate::runtime::RuntimeError;
use crate::tensor::TensorData;
use shoal_scheduler::{DataType, TensorSpec};
use std::sync::Mutex;

/// A model that doubles its input and records the rows of every batch it is given.
struct Doubler {
    signature: Signature,
    batches: Mutex<Vec<usize>>,
}

impl Doubler {
    fn new() -> Arc<Doubler> {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 1],
        };
        Arc::new(Doubler {
            signature: Signature {
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
            },
            batches: Mutex::new(Vec::new()),
        })
    }

    fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

impl ModelRuntime for Doubler {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn forward(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, RuntimeError> {
        let TensorData::Fp32(values) = &inputs[0].data else {
            return Err(RuntimeError::Input("FP32 only".into()));
        };
        self.batches.lock().unwrap().push(inputs[0].rows());
        Ok(vec![NamedTensor {
            name: "y".into(),
            shape: inputs[0].shape.clone(),
            data: TensorData::Fp32(values.iter().map(|v| v * 2.0).collect()),
        }])
    }
}

fn config(
    batch_rows_max: usize,
    queue_delay_max: Duration,
    queue_capacity: usize,
) -> BatcherConfig {
    BatcherConfig {
        batch_rows_max,
        queue_delay_max,
        queue_capacity,
        model: "doubler".into(),
        version: 1,
    }
}

/// Inline: these tests run under paused time (see [`ComputePool::inline`]).
fn compute() -> ComputePool {
    ComputePool::inline()
}

fn x(values: &[f32]) -> Vec<NamedTensor> {
    vec![NamedTensor {
        name: "x".into(),
        shape: vec![values.len(), 1],
        data: TensorData::Fp32(values.to_vec()),
    }]
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

#[tokio::test(start_paused = true)]
async fn a_batch_closes_when_it_is_full_without_waiting_for_the_delay() {
    let model = Doubler::new();
    let (handle, _task) = spawn(
        model.clone(),
        config(4, Duration::from_secs(10), 64),
        compute(),
        Activity::new(),
    );
    let started = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.infer(x(&[i as f32]), far()).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let outputs = call.await.unwrap().unwrap();
        assert_eq!(outputs[0].data, TensorData::Fp32(vec![2.0 * i as f32]));
    }
    assert_eq!(model.batches(), vec![4]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "did not wait for the delay"
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_closes_after_the_delay_when_it_is_not_full() {
    let model = Doubler::new();
    let delay = Duration::from_millis(5);
    let (handle, _task) = spawn(
        model.clone(),
        config(8, delay, 64),
        compute(),
        Activity::new(),
    );
    let started = Instant::now();
    let (a, b) = tokio::join!(
        handle.infer(x(&[1.0]), far()),
        handle.infer(x(&[2.0, 3.0]), far())
    );
    assert_eq!(a.unwrap()[0].data, TensorData::Fp32(vec![2.0]));
    assert_eq!(b.unwrap()[0].data, TensorData::Fp32(vec![4.0, 6.0]));
    assert_eq!(model.batches(), vec![3]);
    assert!(
        started.elapsed() >= delay,
        "waited for company up to the delay"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_would_overfill_a_batch_starts_the_next_one() {
    let model = Doubler::new();
    let (handle, _task) = spawn(
        model.clone(),
        config(4, Duration::from_millis(5), 64),
        compute(),
        Activity::new(),
    );
    let (a, b) = tokio::join!(
        handle.infer(x(&[1.0, 1.0, 1.0]), far()),
        handle.infer(x(&[2.0, 2.0]), far())
    );
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(model.batches(), vec![3, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_answers_overloaded_at_once() {
    let model = Doubler::new();
    let (handle, _task) = spawn(
        model,
        config(1, Duration::from_secs(1), 2),
        compute(),
        Activity::new(),
    );
    // On this single-threaded runtime all six callers enqueue before the batcher runs
    // again, so a queue of two must refuse four of them.
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.infer(x(&[1.0]), far()).await })
        })
        .collect();
    let mut answered = 0;
    let mut refused = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => answered += 1,
            Err(InferError::Overloaded) => refused += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!((answered, refused), (2, 4));
}

#[tokio::test(start_paused = true)]
async fn a_request_past_its_deadline_is_answered_deadline_exceeded() {
    let model = Doubler::new();
    let (handle, _task) = spawn(
        model.clone(),
        config(8, Duration::from_millis(50), 64),
        compute(),
        Activity::new(),
    );
    let soon = Instant::now() + Duration::from_millis(10);
    assert_eq!(
        handle.infer(x(&[1.0]), soon).await,
        Err(InferError::DeadlineExceeded)
    );
    // The expired request never reaches the model.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(model.batches(), Vec::<usize>::new());
}

#[tokio::test(start_paused = true)]
async fn invalid_inputs_are_refused_before_queueing() {
    let model = Doubler::new();
    let (handle, _task) = spawn(
        model.clone(),
        config(8, Duration::from_millis(1), 64),
        compute(),
        Activity::new(),
    );
    let wrong = vec![NamedTensor {
        name: "z".into(),
        shape: vec![1, 1],
        data: TensorData::Fp32(vec![1.0]),
    }];
    assert!(matches!(
        handle.infer(wrong, far()).await,
        Err(InferError::Input(_))
    ));
    assert!(model.batches().is_empty());
}

#[tokio::test(start_paused = true)]
async fn draining_answers_what_is_queued_and_refuses_what_comes_after() {
    let model = Doubler::new();
    let (handle, task) = spawn(
        model.clone(),
        config(2, Duration::from_millis(5), 64),
        compute(),
        Activity::new(),
    );
    let queued: Vec<_> = (0..5)
        .map(|i| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.infer(x(&[i as f32]), far()).await })
        })
        .collect();
    tokio::task::yield_now().await;
    let drained = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.drain().await })
    };
    tokio::task::yield_now().await;
    assert_eq!(
        handle.infer(x(&[9.0]), far()).await,
        Err(InferError::Draining)
    );
    for (i, call) in queued.into_iter().enumerate() {
        let outputs = call.await.unwrap().unwrap();
        assert_eq!(outputs[0].data, TensorData::Fp32(vec![2.0 * i as f32]));
    }
    drained.await.unwrap();
    assert!(handle.is_finished());
    assert_eq!(task.await.unwrap(), Ok(()));
    assert_eq!(model.batches().iter().sum::<usize>(), 5);
    assert_eq!(
        handle.activity().in_flight(),
        0,
        "every request was counted out"
    );
}

#[tokio::test(start_paused = true)]
async fn requests_are_batched_in_arrival_order() {
    let model = Doubler::new();
    let (handle, _task) = spawn(
        model.clone(),
        config(3, Duration::from_millis(5), 64),
        compute(),
        Activity::new(),
    );
    let calls: Vec<_> = (0..7)
        .map(|i| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.infer(x(&[i as f32]), far()).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let outputs = call.await.unwrap().unwrap();
        assert_eq!(outputs[0].data, TensorData::Fp32(vec![2.0 * i as f32]));
    }
    assert_eq!(model.batches(), vec![3, 3, 1]);
}

/// A model whose forward pass panics.
struct Panicking(Signature);

impl ModelRuntime for Panicking {
    fn signature(&self) -> &Signature {
        &self.0
    }

    fn forward(&self, _inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, RuntimeError> {
        panic!("model exploded")
    }
}

#[tokio::test]
async fn a_panicking_model_fails_its_batch_and_ends_the_batcher_as_crashed() {
    let signature = Doubler::new().signature.clone();
    let (handle, task) = spawn(
        Arc::new(Panicking(signature)),
        config(4, Duration::from_millis(1), 64),
        compute(),
        Activity::new(),
    );
    match handle.infer(x(&[1.0]), far()).await {
        Err(InferError::Model(message)) => assert!(message.contains("model exploded"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }
    let ended = task.await.unwrap();
    assert!(matches!(ended, Err(BatcherCrashed(message)) if message.contains("model exploded")));
    assert_eq!(
        handle.infer(x(&[1.0]), far()).await,
        Err(InferError::Stopped)
    );
}

/// A model whose passes wait at a gate until the test opens it, counting how many run at
/// once.
struct Gated {
    signature: Signature,
    batches: Mutex<Vec<usize>>,
    /// (passes running now, most ever at once, gate open)
    state: Mutex<(usize, usize, bool)>,
    changed: std::sync::Condvar,
}

impl Gated {
    fn wait_until(&self, ready: impl Fn(&(usize, usize, bool)) -> bool) {
        let state = self.state.lock().unwrap();
        drop(
            self.changed
                .wait_while(state, |state| !ready(state))
                .unwrap(),
        );
    }

    fn open(&self) {
        self.state.lock().unwrap().2 = true;
        self.changed.notify_all();
    }
}

impl ModelRuntime for Gated {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn forward(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, RuntimeError> {
        self.batches.lock().unwrap().push(inputs[0].rows());
        {
            let mut state = self.state.lock().unwrap();
            state.0 += 1;
            state.1 = state.1.max(state.0);
            self.changed.notify_all();
            state = self.changed.wait_while(state, |state| !state.2).unwrap();
            state.0 -= 1;
        }
        Ok(vec![NamedTensor {
            name: "y".into(),
            shape: inputs[0].shape.clone(),
            data: inputs[0].data.clone(),
        }])
    }
}

impl Gated {
    fn new() -> Arc<Gated> {
        Arc::new(Gated {
            signature: Doubler::new().signature.clone(),
            batches: Mutex::new(Vec::new()),
            state: Mutex::new((0, 0, false)),
            changed: std::sync::Condvar::new(),
        })
    }

    /// Waits (off the runtime) until `running` passes are at the gate. If they never are,
    /// opens the gate, so no thread stays blocked, and fails.
    async fn running(self: &Arc<Gated>, running: usize) {
        let gate = Arc::clone(self);
        let waited = tokio::task::spawn_blocking(move || {
            gate.wait_until(|state| state.0 == running || state.2)
        });
        if tokio::time::timeout(Duration::from_secs(10), waited)
            .await
            .is_err()
        {
            self.open();
            panic!("{running} passes never ran at once");
        }
    }
}

/// A batcher of `batch_rows_max` rows on a pool with a thread to spare, so a second pass
/// could run beside the first if the batcher let it, and a first pass at the gate.
async fn a_pass_at_the_gate(
    model: &Arc<Gated>,
    batch_rows_max: usize,
) -> (
    BatcherHandle,
    tokio::task::JoinHandle<Result<Vec<NamedTensor>, InferError>>,
) {
    let (handle, _task) = spawn(
        model.clone(),
        config(batch_rows_max, Duration::ZERO, 64),
        ComputePool::new(2).unwrap(),
        Activity::new(),
    );
    let first = tokio::spawn({
        let handle = handle.clone();
        async move { handle.infer(x(&[1.0]), far()).await }
    });
    model.running(1).await;
    (handle, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_is_not_full_waits_for_the_running_pass_and_fills_meanwhile() {
    let model = Gated::new();
    let (handle, first) = a_pass_at_the_gate(&model, 8).await;
    let later: Vec<_> = (0..3)
        .map(|i| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.infer(x(&[i as f32]), far()).await })
        })
        .collect();
    // Time for a second batch to start, were one allowed to.
    tokio::time::sleep(Duration::from_millis(100)).await;
    model.open();
    first.await.unwrap().unwrap();
    for call in later {
        call.await.unwrap().unwrap();
    }
    assert_eq!(*model.batches.lock().unwrap(), vec![1, 3]);
    assert_eq!(model.state.lock().unwrap().1, 1, "passes ran one at a time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_starts_beside_the_running_pass() {
    let model = Gated::new();
    let (handle, first) = a_pass_at_the_gate(&model, 2).await;
    let full = tokio::spawn(async move { handle.infer(x(&[2.0, 3.0]), far()).await });
    model.running(2).await;
    model.open();
    first.await.unwrap().unwrap();
    full.await.unwrap().unwrap();
    assert_eq!(*model.batches.lock().unwrap(), vec![1, 2]);
}
