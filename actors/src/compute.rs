//! The compute pool: a fixed number of OS threads that run forward passes, so a forward
//! pass never runs on a tokio worker thread nor on `spawn_blocking`'s unbounded pool.
//!
//! Callers submit a closure and await its result; a closure that panics is answered with
//! [`ComputeError::Panicked`] and the thread lives on. The submission queue is bounded and
//! `run` waits for room rather than refusing: admission control happens earlier, in
//! each batcher's bounded queue, so the pool only ever sees one batch per replica at a time.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Jobs waiting for a compute thread. Each running batcher submits one job at a time, so
/// this only has to cover the replicas of one host; beyond it submitters wait.
pub const COMPUTE_QUEUE_CAPACITY: usize = 256;

/// Why a submitted job gave no result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ComputeError {
    #[error("the compute job panicked: {0}")]
    Panicked(String),
    #[error("the compute pool is shut down")]
    ShutDown,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A handle to the pool; clone it freely. The threads exit when the last handle is dropped
/// and the queue is empty.
#[derive(Clone, Debug)]
pub struct ComputePool {
    /// `None` for an inline pool.
    queue: Option<Queue>,
    threads: usize,
}

#[derive(Clone, Debug)]
struct Queue {
    jobs: crossbeam_channel::Sender<Job>,
    /// One permit per free queue slot.
    room: Arc<tokio::sync::Semaphore>,
}

impl ComputePool {
    /// Starts `threads` compute threads (at least one), named `shoal-compute-{i}`.
    pub fn new(threads: usize) -> Result<ComputePool, std::io::Error> {
        let threads = threads.max(1);
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(COMPUTE_QUEUE_CAPACITY);
        for index in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("shoal-compute-{index}"))
                .spawn(move || {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                })?;
        }
        Ok(ComputePool {
            queue: Some(Queue {
                jobs,
                room: Arc::new(tokio::sync::Semaphore::new(COMPUTE_QUEUE_CAPACITY)),
            }),
            threads,
        })
    }

    /// A pool that runs each job on the caller's thread. Only for tests under
    /// `tokio::time::pause()`: there, waiting on another thread leaves the runtime idle and
    /// the paused clock jumps to the next timer, firing deadlines that never passed.
    pub fn inline() -> ComputePool {
        ComputePool {
            queue: None,
            threads: 0,
        }
    }

    /// A pool sized to the host: one thread per available core.
    pub fn per_core() -> Result<ComputePool, std::io::Error> {
        ComputePool::new(std::thread::available_parallelism().map_or(1, usize::from))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `work` on a compute thread and returns its result.
    pub async fn run<T, F>(&self, work: F) -> Result<T, ComputeError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let Some(queue) = &self.queue else {
            return run_catching(work);
        };
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            let result = run_catching(work);
            // The submitter may have gone (cancelled); the result is simply dropped.
            let _ = reply.send(result);
        });
        // Waiting for a permit, not for the channel, keeps a full queue off the async
        // workers' backs: `send` below never blocks because a permit guarantees room.
        let permit = Arc::clone(&queue.room)
            .acquire_owned()
            .await
            .map_err(|_| ComputeError::ShutDown)?;
        let job: Job = Box::new(move || {
            let _permit = permit;
            job();
        });
        queue.jobs.send(job).map_err(|_| ComputeError::ShutDown)?;
        answer.await.map_err(|_| ComputeError::ShutDown)?
    }
}

/// Runs `work`, turning a panic into [`ComputeError::Panicked`] with its message.
fn run_catching<T, F: FnOnce() -> T>(work: F) -> Result<T, ComputeError> {
    catch_unwind(AssertUnwindSafe(work)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with no message".to_string());
        ComputeError::Panicked(message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_off_the_async_threads_and_returns_its_result() {
        let pool = ComputePool::new(2).unwrap();
        let name = pool
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("shoal-compute-"));
    }

    #[tokio::test]
    async fn a_panicking_job_is_reported_and_the_pool_keeps_working() {
        let pool = ComputePool::new(1).unwrap();
        let result = pool.run(|| -> u32 { panic!("boom") }).await;
        assert_eq!(result, Err(ComputeError::Panicked("boom".into())));
        assert_eq!(pool.run(|| 7).await, Ok(7));
    }

    #[tokio::test]
    async fn no_more_than_the_configured_threads_run_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pool = ComputePool::new(3).unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs: Vec<_> = (0..12)
            .map(|_| {
                let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
                tokio::spawn(async move {
                    pool.run(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                })
            })
            .collect();
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(
            peak.load(Ordering::SeqCst) >= 2,
            "the pool does run jobs in parallel"
        );
    }
}
