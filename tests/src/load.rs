//! A load generator for the benchmarks, closed loop and open loop.
//!
//! Closed loop: `concurrency` callers, each sending its next request when the last one is
//! answered. Open loop: requests leave on a fixed schedule whatever happens to earlier
//! ones, and each latency is measured from the request's *scheduled* send time, so a
//! server that falls behind shows its queueing in the latencies instead of hiding it by
//! slowing the generator down (coordinated omission).

use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one load run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Requests answered 2xx.
    pub ok: usize,
    /// Requests answered otherwise, or not at all.
    pub errors: usize,
    pub elapsed: Duration,
    /// Latencies of the successful requests, sorted.
    pub latencies: Vec<Duration>,
}

impl LoadResult {
    /// Successful requests per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// The nearest-rank `q`-quantile (0..=1) of the latencies; zero when there are none.
    pub fn quantile(&self, q: f64) -> Duration {
        quantile(&self.latencies, q)
    }

    fn merge(parts: Vec<(usize, usize, Vec<Duration>)>, elapsed: Duration) -> LoadResult {
        let mut result = LoadResult {
            elapsed,
            ..LoadResult::default()
        };
        for (ok, errors, latencies) in parts {
            result.ok += ok;
            result.errors += errors;
            result.latencies.extend(latencies);
        }
        result.latencies.sort_unstable();
        result
    }
}

/// The nearest-rank `q`-quantile of `sorted`.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A client for load: keep-alive connections, enough of them for every caller.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1_024)
        .tcp_nodelay(true)
        .build()
        .unwrap_or_else(|error| panic!("building the HTTP client: {error}"))
}

/// POSTs `body` to `url` and reports whether it was answered 2xx.
async fn post(client: &reqwest::Client, url: &str, body: &'static [u8]) -> bool {
    let answer = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match answer {
        Ok(response) => {
            let success = response.status().is_success();
            // Read the whole answer: a request is done when its body has arrived.
            response.bytes().await.is_ok() && success
        }
        Err(_) => false,
    }
}

/// `concurrency` closed-loop callers POSTing `body` to `url` for `duration`.
pub async fn closed_loop(
    client: &reqwest::Client,
    url: &str,
    body: &'static [u8],
    concurrency: usize,
    duration: Duration,
) -> LoadResult {
    let started = Instant::now();
    let stop_at = started + duration;
    let url: Arc<str> = Arc::from(url);
    let callers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url) = (client.clone(), Arc::clone(&url));
            tokio::spawn(async move {
                let (mut ok, mut errors, mut latencies) = (0, 0, Vec::new());
                while Instant::now() < stop_at {
                    let sent = Instant::now();
                    if post(&client, &url, body).await {
                        ok += 1;
                        latencies.push(sent.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (ok, errors, latencies)
            })
        })
        .collect();
    let mut parts = Vec::with_capacity(concurrency);
    for caller in callers {
        if let Ok(part) = caller.await {
            parts.push(part);
        }
    }
    LoadResult::merge(parts, started.elapsed())
}

/// POSTs `body` to `url` at `rate` requests per second for `duration`, on schedule;
/// latencies count from each request's scheduled time.
///
/// The schedule is kept by an OS thread sleeping with `nanosleep` (tens of microseconds
/// late at most), not by tokio's timer, whose millisecond wheel would add up to a
/// millisecond of the generator's own lateness to every latency.
pub async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    body: &'static [u8],
    rate: f64,
    duration: Duration,
) -> LoadResult {
    let count = (rate * duration.as_secs_f64()).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let runtime = tokio::runtime::Handle::current();
    let (client, url) = (client.clone(), Arc::<str>::from(url));
    let pacer = std::thread::spawn(move || {
        let started = Instant::now();
        let mut requests = Vec::with_capacity(count);
        for index in 0..count {
            let scheduled = started + interval * index as u32;
            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (client, url) = (client.clone(), Arc::clone(&url));
            requests.push(runtime.spawn(async move {
                let answered = post(&client, &url, body).await;
                (answered, scheduled.elapsed())
            }));
        }
        requests
    });
    let requests = tokio::task::spawn_blocking(move || pacer.join())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let (mut ok, mut errors, mut latencies) = (0, 0, Vec::with_capacity(count));
    for request in requests {
        match request.await {
            Ok((true, latency)) => {
                ok += 1;
                latencies.push(latency);
            }
            _ => errors += 1,
        }
    }
    // The schedule's length, not the last answer's: the rate is what was offered.
    let elapsed = interval * count as u32;
    LoadResult::merge(vec![(ok, errors, latencies)], elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&sorted, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&sorted, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&sorted, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&sorted, 0.0), Duration::from_millis(1));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn merged_results_are_sorted_and_summed() {
        let merged = LoadResult::merge(
            vec![
                (
                    2,
                    1,
                    vec![Duration::from_millis(5), Duration::from_millis(1)],
                ),
                (1, 0, vec![Duration::from_millis(3)]),
            ],
            Duration::from_secs(1),
        );
        assert_eq!((merged.ok, merged.errors), (3, 1));
        assert_eq!(merged.latencies[0], Duration::from_millis(1));
        assert!((merged.rate() - 3.0).abs() < 1e-9);
    }
}
