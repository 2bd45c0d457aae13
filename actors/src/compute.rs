//! The compute pool: a fixed number of OS threads that run batches' forward passes, so
//! one never runs on a tokio worker thread nor on `spawn_blocking`'s unbounded pool.
//!
//! The threads are a rayon pool, the same kind candle's CPU kernels split their work
//! over. A kernel called from one of this pool's threads splits across this pool by work
//! stealing, with the calling thread doing its share. Called from any other thread, every
//! matmul would instead be handed to rayon's global pool while the caller slept on a latch:
//! two extra threads per core, and a sleep and a wake-up per kernel, which on a virtual
//! machine cost more than the small kernels themselves.
//!
//! A thread that waits inside a kernel for the other half of its work runs whatever job is
//! queued meanwhile, and its own job ends only after that one: a small model's batch can
//! wait out another model's batch (or a generative model's prefill) queued on the same
//! host. So only jobs of one forward pass or decode step belong here; a model load, the
//! longest, goes to [`ComputePool::run_long`] instead.
//!
//! Callers submit a closure and await its result; a closure that panics is answered with
//! [`ComputeError::Panicked`] and the thread lives on. The submission queue is bounded and
//! `run` waits for room rather than refusing: admission control happens earlier, in
//! each batcher's bounded queue, so the pool only ever sees a few batches per replica.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Jobs waiting for a compute thread. Each running batcher submits at most two at a time,
/// so this only has to cover the replicas of one host; beyond it submitters wait.
pub const COMPUTE_QUEUE_CAPACITY: usize = 256;

/// Why a submitted job gave no result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ComputeError {
    #[error("the compute job panicked: {0}")]
    Panicked(String),
    #[error("the compute pool is shut down")]
    ShutDown,
}

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
    threads: Arc<rayon::ThreadPool>,
    /// One permit per free queue slot.
    room: Arc<tokio::sync::Semaphore>,
    /// One permit per long job that may run at once: one per pool thread.
    long_jobs: Arc<tokio::sync::Semaphore>,
}

/// Stack of each pool thread. A thread waiting inside a kernel may run another queued
/// job on top of its own, so allow for a few nested forward passes (only the pages used
/// are ever resident).
const THREAD_STACK_BYTES: usize = 16 * 1024 * 1024;

impl ComputePool {
    /// Starts `threads` compute threads (at least one), named `shoal-compute-{i}`.
    pub fn new(threads: usize) -> Result<ComputePool, std::io::Error> {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|index| format!("shoal-compute-{index}"))
            .stack_size(THREAD_STACK_BYTES)
            .build()
            .map_err(std::io::Error::other)?;
        Ok(ComputePool {
            queue: Some(Queue {
                threads: Arc::new(pool),
                room: Arc::new(tokio::sync::Semaphore::new(COMPUTE_QUEUE_CAPACITY)),
                long_jobs: Arc::new(tokio::sync::Semaphore::new(threads)),
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
        // Waiting for a permit keeps the number of queued jobs bounded; rayon's own queue
        // is not.
        let permit = Arc::clone(&queue.room)
            .acquire_owned()
            .await
            .map_err(|_| ComputeError::ShutDown)?;
        let (reply, answer) = oneshot::channel();
        queue.threads.spawn(move || {
            let result = run_catching(work);
            drop(permit);
            // The submitter may have gone (cancelled); the result is simply dropped.
            let _ = reply.send(result);
        });
        answer.await.map_err(|_| ComputeError::ShutDown)?
    }

    /// Runs a long job (fetching and loading a model) on a blocking thread, never on the
    /// pool's threads, where a thread waiting inside a kernel could pick it up and hold its
    /// batch for the whole load. At most one long job per pool thread runs at once, so
    /// replicas starting together do not all hold a load's copies in memory together.
    pub async fn run_long<T, F>(&self, work: F) -> Result<T, ComputeError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let Some(queue) = &self.queue else {
            return run_catching(work);
        };
        let _permit = queue
            .long_jobs
            .acquire()
            .await
            .map_err(|_| ComputeError::ShutDown)?;
        tokio::task::spawn_blocking(move || run_catching(work))
            .await
            .map_err(|_| ComputeError::ShutDown)?
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
    use std::time::Duration;

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

    /// Jobs that record how many of them run at once.
    #[derive(Clone, Default)]
    struct Overlap {
        running: Arc<std::sync::atomic::AtomicUsize>,
        peak: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Overlap {
        /// A job that holds its thread for `hold` and returns the thread's name.
        fn job(
            &self,
            hold: std::time::Duration,
        ) -> impl FnOnce() -> Option<String> + Send + 'static {
            use std::sync::atomic::Ordering::SeqCst;
            let overlap = self.clone();
            move || {
                let now = overlap.running.fetch_add(1, SeqCst) + 1;
                overlap.peak.fetch_max(now, SeqCst);
                std::thread::sleep(hold);
                overlap.running.fetch_sub(1, SeqCst);
                std::thread::current().name().map(str::to_string)
            }
        }

        fn peak(&self) -> usize {
            self.peak.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_jobs_run_off_the_pool_no_more_than_one_per_thread_at_once() {
        let pool = ComputePool::new(2).unwrap();
        let overlap = Overlap::default();
        let jobs: Vec<_> = (0..6)
            .map(|_| {
                let (pool, job) = (pool.clone(), overlap.job(Duration::from_millis(50)));
                tokio::spawn(async move { pool.run_long(job).await })
            })
            .collect();
        for job in jobs {
            let name = job.await.unwrap().unwrap();
            assert!(
                !name.is_some_and(|name| name.starts_with("shoal-compute-")),
                "a long job ran on a pool thread"
            );
        }
        assert_eq!(overlap.peak(), 2);
        let panicked = pool.run_long(|| -> u32 { panic!("load failed") }).await;
        assert_eq!(panicked, Err(ComputeError::Panicked("load failed".into())));
    }

    #[tokio::test]
    async fn no_more_than_the_configured_threads_run_at_once() {
        let pool = ComputePool::new(3).unwrap();
        let overlap = Overlap::default();
        let jobs: Vec<_> = (0..12)
            .map(|_| {
                let (pool, job) = (pool.clone(), overlap.job(Duration::from_millis(5)));
                tokio::spawn(async move { pool.run(job).await })
            })
            .collect();
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        assert!(overlap.peak() <= 3);
        assert!(overlap.peak() >= 2, "the pool does run jobs in parallel");
    }
}
