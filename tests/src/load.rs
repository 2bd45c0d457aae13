//! A load generator for the benchmarks, closed loop and open loop.
//!
//! Closed loop: `concurrency` callers, each sending its next request when the last one is
//! answered. Open loop: requests leave on a fixed schedule whatever happens to earlier
//! ones, and each latency is measured from the request's *scheduled* send time, so a
//! server that falls behind shows its queueing in the latencies instead of hiding it by
//! slowing the generator down (coordinated omission).

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    /// The machine's cores' busy time over the run, all cores added up: the generator's,
    /// the server's and anything else the host ran.
    pub busy: Duration,
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

    /// Core time per successful request: what one request cost the whole machine.
    pub fn core_time_per_request(&self) -> Duration {
        self.per_request(self.busy)
    }

    /// `time` (spent over the run) shared out among the successful requests.
    pub fn per_request(&self, time: Duration) -> Duration {
        time.div_f64(self.ok.max(1) as f64)
    }

    /// How many of the machine's cores were busy over the run, on average.
    pub fn busy_cores(&self) -> f64 {
        self.busy.as_secs_f64() / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn merge(
        parts: Vec<(usize, usize, Vec<Duration>)>,
        elapsed: Duration,
        busy: Duration,
    ) -> LoadResult {
        let mut result = LoadResult {
            elapsed,
            busy,
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

/// A reading of how long the machine's cores have sat idle, to measure the busy core
/// time between two readings: all cores added up, the generator's, the server's and
/// anything else the host ran.
///
/// Busy is the rest of the cores' time, not the kernel's busy counters: those count in
/// ticks sampled while a core runs, and a core that wakes for a few microseconds at a time,
/// as under a light load, misses most of them, while idle time is clocked exactly on
/// entering and leaving idle. Waiting for IO and time stolen by the hypervisor count as
/// idle. Without `/proc/stat` (not Linux), every reading is zero.
#[derive(Clone, Copy, Debug)]
pub struct CoreClock {
    at: Instant,
    idle: Duration,
}

impl CoreClock {
    pub fn now() -> CoreClock {
        CoreClock {
            at: Instant::now(),
            idle: CoreStat::read().idle,
        }
    }

    /// The cores' busy time since this reading.
    pub fn busy(&self) -> Duration {
        let at = Instant::now();
        let stat = CoreStat::read();
        let time = (at - self.at) * stat.cores;
        match stat.idle.checked_sub(self.idle) {
            Some(idle) if self.idle > Duration::ZERO => time.saturating_sub(idle),
            _ => Duration::ZERO,
        }
    }
}

/// What `/proc/stat` says of the machine's cores: how many it counts (every core of the
/// machine, which a container's CPU limit does not change), and their idle, IO-wait and
/// stolen time since boot, all added up. Zeros where there is no `/proc/stat`.
struct CoreStat {
    cores: u32,
    idle: Duration,
}

/// How many of `/proc`'s clock ticks make a second.
#[allow(unsafe_code, reason = "sysconf has no safe wrapper in libc")]
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant and has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

impl CoreStat {
    fn read() -> CoreStat {
        let ticks_per_second = ticks_per_second();
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let mut lines = stat.lines();
        let ticks: Vec<u64> = lines
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .map(|fields| {
                fields
                    .split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let cores = lines.take_while(|line| line.starts_with("cpu")).count();
        // user nice system idle iowait irq softirq steal ...
        let idle: u64 = [3, 4, 7].iter().filter_map(|&i| ticks.get(i)).sum();
        CoreStat {
            cores: u32::try_from(cores).unwrap_or(u32::MAX),
            idle: Duration::from_secs_f64(idle as f64 / ticks_per_second),
        }
    }
}

/// A reading of how long each thread of one process has run, to split a run's core time
/// among the process's kinds of thread: an async runtime's workers, a compute pool's
/// threads, the rest.
///
/// A thread's time is the scheduler's own count of the nanoseconds it ran
/// (`/proc/PID/task/TID/schedstat`), exact where the tick-sampled `utime` and `stime` are
/// not (see [`CoreClock`]); it includes the system calls the thread makes, such as its TCP
/// sends, though not the softirq work they raise where the kernel accounts interrupt time
/// apart (that lands outside every thread). Without schedstat (or where it reads zero, as
/// with the scheduler's statistics off) the ticks are used. A thread that ends between two
/// readings is not counted; one that starts counts from nothing.
#[derive(Clone, Debug)]
pub struct ThreadClock {
    pid: u32,
    at_start: HashMap<u32, Duration>,
}

impl ThreadClock {
    pub fn now(pid: u32) -> ThreadClock {
        ThreadClock {
            pid,
            at_start: thread_times(pid)
                .into_iter()
                .map(|thread| (thread.tid, thread.ran))
                .collect(),
        }
    }

    /// Each kind of thread's run time since this reading, by [`thread_kind`]: empty when
    /// the process is gone or not Linux.
    pub fn since(&self) -> BTreeMap<String, Duration> {
        let mut kinds = BTreeMap::new();
        for thread in thread_times(self.pid) {
            let before = self.at_start.get(&thread.tid).copied().unwrap_or_default();
            *kinds
                .entry(thread_kind(&thread.name).to_string())
                .or_insert(Duration::ZERO) += thread.ran.saturating_sub(before);
        }
        kinds
    }
}

/// A thread's kind: its name less a trailing `-N`, so that a pool's threads
/// (`shoal-compute-0`, `shoal-compute-1`) count together. Linux keeps the first 15 bytes of
/// a name: `shoal-compute-17` reads as `shoal-compute-1`, of the same kind.
pub fn thread_kind(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((kind, index)) if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) => {
            kind
        }
        _ => name,
    }
}

struct ThreadTime {
    tid: u32,
    name: String,
    ran: Duration,
}

/// Every live thread of `pid`, with how long it has run.
fn thread_times(pid: u32) -> Vec<ThreadTime> {
    let ticks_per_second = ticks_per_second();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let read = |dir: &std::path::Path, file: &str| std::fs::read_to_string(dir.join(file));
    tasks
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let tid = dir.file_name()?.to_str()?.parse().ok()?;
            let name = read(&dir, "comm").ok()?.trim_end().to_string();
            let scheduled = read(&dir, "schedstat")
                .ok()
                .and_then(|schedstat| schedstat.split_whitespace().next()?.parse().ok())
                .filter(|&nanoseconds: &u64| nanoseconds > 0);
            let ran = match scheduled {
                Some(nanoseconds) => Duration::from_nanos(nanoseconds),
                None => {
                    let ticks = stat_run_ticks(&read(&dir, "stat").ok()?)?;
                    Duration::from_secs_f64(ticks as f64 / ticks_per_second)
                }
            };
            Some(ThreadTime { tid, name, ran })
        })
        .collect()
}

/// A thread's `utime` plus `stime` from its `/proc/…/stat` line: proc(5)'s fields 14 and
/// 15, the 12th and 13th after the `)` that closes field 2 (the name, which may itself
/// hold `)` and spaces).
fn stat_run_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// One prepared request: where it goes and its bytes on the wire, built once.
///
/// The generator speaks HTTP/1.1 itself over keep-alive connections instead of going
/// through a general client: it shares the machine's two cores with the server it
/// measures, and every microsecond it spends per request is one the server does not get.
/// Like `wrk`, it writes the prepared bytes and parses only the answer's head.
#[derive(Clone, Debug)]
pub struct Target {
    address: SocketAddr,
    request: Arc<[u8]>,
}

impl Target {
    /// A `POST` of `body` as JSON to `url`, which is `http://host:port/path`.
    pub fn post_json(url: &str, body: &[u8]) -> Target {
        Target::post(url, &[("content-type", "application/json")], body)
    }

    /// A `POST` of `body` to `url` (`http://host:port/path`) with `headers`.
    pub fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Target {
        let rest = url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("{url:?} is not an http:// URL"));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let address = authority
            .to_socket_addrs()
            .ok()
            .and_then(|mut addresses| addresses.next())
            .unwrap_or_else(|| panic!("{authority:?} does not resolve"));
        let mut head = format!("POST {path} HTTP/1.1\r\nhost: {authority}\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        Target {
            address,
            request: request.into(),
        }
    }
}

/// Longest answer head the generator reads; the server's are a few hundred bytes.
const HEAD_BYTES_MAX: usize = 16 * 1024;

/// Most header lines in an answer the generator parses.
const HEADERS_MAX: usize = 32;

/// A keep-alive connection to a target's server.
struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

/// What one exchange got back.
struct Answer {
    status: u16,
    /// Whether the server keeps the connection open for the next request.
    reusable: bool,
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

impl Connection {
    async fn open(address: SocketAddr) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            buffer: Vec::with_capacity(4096),
        })
    }

    /// Reads more of the answer into the buffer; the end of the stream is an error here.
    async fn fill(&mut self) -> std::io::Result<()> {
        self.buffer.reserve(4096);
        if self.stream.read_buf(&mut self.buffer).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Writes as much of `request` as the socket takes at once, without waiting, and
    /// returns how much that was. It needs no async context, so the open loop's pacer
    /// sends on time itself instead of waking a task to do it.
    fn send_now(&self, request: &[u8]) -> usize {
        let mut written = 0;
        while written < request.len() {
            match self.stream.try_write(&request[written..]) {
                Ok(0) | Err(_) => break,
                Ok(more) => written += more,
            }
        }
        written
    }

    /// Sends what is left of `request` after its first `written` bytes, and reads its
    /// whole answer (head and body).
    async fn exchange(&mut self, request: &[u8], written: usize) -> std::io::Result<Answer> {
        self.stream.write_all(&request[written..]).await?;
        self.buffer.clear();
        let (head_bytes, body_bytes, answer) = loop {
            self.fill().await?;
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.buffer) {
                Ok(httparse::Status::Complete(head_bytes)) => {
                    let (body_bytes, reusable) = framing(response.headers)?;
                    let status = response.code.unwrap_or_default();
                    let reusable = reusable && response.version == Some(1);
                    break (head_bytes, body_bytes, Answer { status, reusable });
                }
                Ok(httparse::Status::Partial) if self.buffer.len() < HEAD_BYTES_MAX => {}
                Ok(httparse::Status::Partial) => {
                    return Err(invalid(format!(
                        "an answer head over {HEAD_BYTES_MAX} bytes"
                    )));
                }
                Err(error) => return Err(invalid(format!("a malformed answer: {error}"))),
            }
        };
        while self.buffer.len() < head_bytes + body_bytes {
            self.fill().await?;
        }
        if self.buffer.len() > head_bytes + body_bytes {
            return Err(invalid("bytes after the answer to a lone request".into()));
        }
        Ok(answer)
    }
}

/// The body length and whether the connection stays open, from a message's headers (an
/// answer's, or a request's at the [`Floor`]). Shoal's answers to the requests benchmarks
/// send carry a `content-length`, as those requests do; a chunked body is refused rather
/// than misread.
fn framing(headers: &[httparse::Header]) -> std::io::Result<(usize, bool)> {
    let mut length = None;
    let mut reusable = true;
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|text| text.trim().parse::<usize>().ok());
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(
                "a chunked body: the generator and the floor read sized ones".into(),
            ));
        } else if header.name.eq_ignore_ascii_case("connection") {
            reusable = !header.value.eq_ignore_ascii_case(b"close");
        }
    }
    let length = length.ok_or_else(|| invalid("an answer without content-length".into()))?;
    Ok((length, reusable))
}

/// Sends the target's request on `connection` (opening one when there is none), its
/// first `written` bytes already sent, and reports whether it was answered 2xx. A
/// connection that failed or that the server closes is dropped, and the next request
/// opens a new one.
async fn post(connection: &mut Option<Connection>, target: &Target, written: usize) -> bool {
    if connection.is_none() {
        *connection = Connection::open(target.address).await.ok();
    }
    let Some(open) = connection.as_mut() else {
        return false;
    };
    match open.exchange(&target.request, written).await {
        Ok(answer) => {
            if !answer.reusable {
                *connection = None;
            }
            (200..300).contains(&answer.status)
        }
        Err(_) => {
            *connection = None;
            false
        }
    }
}

/// `concurrency` closed-loop callers, each on its own connection, sending the target's
/// request for `duration`.
pub async fn closed_loop(target: &Target, concurrency: usize, duration: Duration) -> LoadResult {
    let cores = CoreClock::now();
    let started = Instant::now();
    let stop_at = started + duration;
    let callers: Vec<_> = (0..concurrency)
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move {
                let (mut ok, mut errors, mut latencies) = (0, 0, Vec::new());
                let mut connection = None;
                while Instant::now() < stop_at {
                    let sent = Instant::now();
                    if post(&mut connection, &target, 0).await {
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
    let elapsed = started.elapsed();
    LoadResult::merge(parts, elapsed, cores.busy())
}

/// Sends the target's request at `rate` per second for `duration`, on schedule; latencies
/// count from each request's scheduled time. A request takes an idle connection, or opens
/// one when all are busy, so a slow answer never delays the next send.
///
/// The schedule is kept by an OS thread sleeping with `nanosleep`, not by tokio's timer,
/// whose millisecond wheel would add up to a millisecond of the generator's own lateness
/// to every latency. The thread still wakes late when its core is asleep (on the 2-core
/// virtual machine the benchmarks ran on, about 0.06 ms at the median and 0.5 ms at the
/// 99th percentile), and that lateness is counted as latency: a generator's error that
/// errs against the server.
pub async fn open_loop(target: &Target, rate: f64, duration: Duration) -> LoadResult {
    let cores = CoreClock::now();
    let count = (rate * duration.as_secs_f64()).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let runtime = tokio::runtime::Handle::current();
    let idle: Arc<Mutex<Vec<Connection>>> = Arc::default();
    let target = target.clone();
    let pacer = std::thread::spawn(move || {
        exact_timers();
        let started = Instant::now();
        let mut requests = Vec::with_capacity(count);
        for index in 0..count {
            let scheduled = started + interval * index as u32;
            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // The pacer writes the request itself when a connection is idle: handing the
            // write to a task would add a thread's wake-up (up to a millisecond on a
            // virtual machine) to every latency, a delay of the generator's, not the server's.
            let mut connection = idle.lock().ok().and_then(|mut idle| idle.pop());
            let written = connection
                .as_ref()
                .map_or(0, |open| open.send_now(&target.request));
            let (target, idle) = (target.clone(), Arc::clone(&idle));
            requests.push(runtime.spawn(async move {
                let answered = post(&mut connection, &target, written).await;
                let latency = scheduled.elapsed();
                if let (Some(connection), Ok(mut idle)) = (connection, idle.lock()) {
                    idle.push(connection);
                }
                (answered, latency)
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
    LoadResult::merge(vec![(ok, errors, latencies)], elapsed, cores.busy())
}

/// The name of the [`Floor`]'s thread, to tell its run time from the generator's.
pub const FLOOR_THREAD: &str = "floor-server";

/// A server that does nothing but HTTP framing: it reads each request whole and writes
/// back the same prepared answer. Loaded like Shoal, it measures the transport floor, what
/// the generator and loopback TCP cost per request with no server work on top, which no
/// server, however lean, can take below.
///
/// It runs on one thread of its own, [`FLOOR_THREAD`], as `shoal up` serves HTTP on one
/// runtime thread, and stops when dropped.
pub struct Floor {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Floor {
    /// Starts answering every request with `answer` (a whole HTTP/1.1 answer, head and
    /// body) on a port of 127.0.0.1.
    pub fn start(answer: Vec<u8>) -> Floor {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let address = listener.local_addr().expect("the floor's address");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let answer: Arc<[u8]> = answer.into();
        let serve = move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .expect("the floor's runtime");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                let accept = async {
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(answer_each(stream, Arc::clone(&answer)));
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        };
        let thread = std::thread::Builder::new()
            .name(FLOOR_THREAD.into())
            .spawn(serve)
            .expect("the floor's thread");
        Floor {
            address,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:port` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads the requests on `stream` one after another, each whole, and answers each with
/// `answer`, until the peer closes or sends something that is not a sized request.
async fn answer_each(stream: TcpStream, answer: Arc<[u8]>) {
    let mut stream = stream;
    if stream.set_nodelay(true).is_err() {
        return;
    }
    let mut buffer = Vec::with_capacity(FLOOR_READ_BYTES);
    loop {
        match whole_request(&buffer) {
            Ok(Some((head, body))) => {
                buffer.drain(..head + body);
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(_) => return,
        }
        buffer.reserve(FLOOR_READ_BYTES);
        if !matches!(stream.read_buf(&mut buffer).await, Ok(read) if read > 0) {
            return;
        }
    }
}

/// The head's and the body's lengths of the request at the start of `buffer` once all of
/// it is there, `None` while more is to come; an error for a head over [`HEAD_BYTES_MAX`]
/// bytes, a malformed one, or a body not sized by `content-length`.
fn whole_request(buffer: &[u8]) -> std::io::Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buffer) {
        Ok(httparse::Status::Complete(head)) => {
            let (body, _) = framing(request.headers)?;
            Ok((buffer.len() >= head + body).then_some((head, body)))
        }
        Ok(httparse::Status::Partial) if buffer.len() < HEAD_BYTES_MAX => Ok(None),
        Ok(httparse::Status::Partial) => Err(invalid(format!(
            "a request head over {HEAD_BYTES_MAX} bytes"
        ))),
        Err(error) => Err(invalid(format!("a malformed request: {error}"))),
    }
}

/// Room the floor makes for each read: a whole 15 KB request of the bench in one.
const FLOOR_READ_BYTES: usize = 32 * 1024;

/// Asks Linux to fire this thread's timers on time: by default it may delay a sleeping
/// thread's wake-up by up to 50 µs to batch wake-ups together.
#[allow(unsafe_code)]
fn exact_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and changes only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
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

    /// Serves each connection the scripted answers in turn, one per request read.
    async fn scripted_server(answers: Vec<&'static str>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = vec![0; 64 * 1024];
                // One answer per read: the generator sends a small request in one write.
                while let Ok(read) = stream.read(&mut request).await {
                    let Some(answer) = answers.next().filter(|_| read > 0) else {
                        break;
                    };
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        break;
                    }
                    if answer.contains("connection: close") {
                        break;
                    }
                }
            }
        });
        format!("http://{address}/v2/models/m/infer")
    }

    #[tokio::test]
    async fn the_generator_counts_2xx_reads_whole_bodies_and_reopens_closed_connections() {
        let url = scripted_server(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}",
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ])
        .await;
        let target = Target::post_json(&url, b"{}");
        let mut connection = None;
        let mut answered = Vec::new();
        for _ in 0..5 {
            answered.push(post(&mut connection, &target, 0).await);
        }
        assert_eq!(answered, [true, false, true, true, false]);
        assert!(
            connection.is_none(),
            "a refused answer drops its connection"
        );
    }

    /// Answers 200 to every whole request whose body is `expected`, 400 otherwise.
    async fn checking_server(expected: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let expected = Arc::new(expected);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let expected = Arc::clone(&expected);
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    loop {
                        let whole =
                            whole_request(&buffer).expect("the generator sends sized requests");
                        if let Some((head, length)) = whole {
                            let intact = buffer[head..head + length] == expected[..];
                            buffer.drain(..head + length);
                            let answer: &[u8] = if intact {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                            } else {
                                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
                            };
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        buffer.reserve(64 * 1024);
                        if !matches!(stream.read_buf(&mut buffer).await, Ok(read) if read > 0) {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{address}/v2/models/m/infer")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_open_loop_sends_every_request_whole_even_past_a_full_socket_buffer() {
        // Larger than a socket's send buffer: the pacer's own write is partial, and the
        // request's task sends the rest.
        let body: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let url = checking_server(body.clone()).await;
        let target = Target::post(&url, &[], &body);
        let run = open_loop(&target, 50.0, Duration::from_millis(400));
        let result = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("every request is answered: none was sent short");
        assert_eq!((result.ok, result.errors), (20, 0));
        // A small request fits the socket: the pacer sends all of it.
        let url = checking_server(b"{}".to_vec()).await;
        let small = Target::post_json(&url, b"{}");
        let run = open_loop(&small, 200.0, Duration::from_millis(250));
        let result = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("every request is answered");
        assert_eq!((result.ok, result.errors), (50, 0));
    }

    #[tokio::test]
    async fn sending_without_waiting_writes_what_the_socket_takes_and_no_more() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // The server accepts but never reads: the socket's buffers fill.
        let accepted = tokio::spawn(async move { listener.accept().await.unwrap() });
        let connection = Connection::open(address).await.unwrap();
        let _held = accepted.await.unwrap();
        assert_eq!(connection.send_now(b"small"), 5);
        let large = vec![7u8; 64 * 1024 * 1024];
        let written = connection.send_now(&large);
        assert!(
            written > 0 && written < large.len(),
            "a write that does not fit is partial: {written} of {}",
            large.len()
        );
    }

    #[test]
    fn a_target_is_the_prepared_request_bytes() {
        let target = Target::post_json("http://127.0.0.1:7070/v2/models/m/infer", b"{\"a\":1}");
        let text = std::str::from_utf8(&target.request).unwrap();
        assert!(
            text.starts_with("POST /v2/models/m/infer HTTP/1.1\r\n"),
            "{text}"
        );
        assert!(
            text.contains("content-length: 7\r\n\r\n{\"a\":1}"),
            "{text}"
        );
        assert_eq!(target.address, "127.0.0.1:7070".parse().unwrap());
    }

    #[tokio::test]
    async fn the_floor_answers_every_whole_request_with_its_answer() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec();
        let floor = Floor::start(answer);
        let target = Target::post_json(&floor.url("/v2/models/m/infer"), &[b'7'; 100_000]);
        let result = closed_loop(&target, 4, Duration::from_millis(200)).await;
        assert!(result.ok > 4, "{result:?}");
        assert_eq!(result.errors, 0);
        // A body it cannot size ends the connection instead of being answered.
        let mut connection = None;
        let chunked = Target::post(
            &floor.url("/"),
            &[("transfer-encoding", "chunked")],
            b"0\r\n\r\n",
        );
        assert!(!post(&mut connection, &chunked, 0).await);
    }

    #[test]
    fn the_core_clock_counts_a_spinning_thread() {
        let clock = CoreClock::now();
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(300) {
            std::hint::black_box(0);
        }
        let busy = clock.busy();
        // At least half: the clock ticks in hundredths of a second, and the hypervisor
        // may take the core away for a while (stolen time counts as idle).
        assert!(busy >= Duration::from_millis(150), "{busy:?}");
    }

    #[test]
    fn a_pools_threads_are_one_kind() {
        assert_eq!(thread_kind("shoal-compute-0"), "shoal-compute");
        assert_eq!(thread_kind("shoal-compute-17"), "shoal-compute");
        assert_eq!(thread_kind("shoal-runtime"), "shoal-runtime");
        assert_eq!(thread_kind("floor-server"), "floor-server");
        assert_eq!(thread_kind("worker-"), "worker-");
        assert_eq!(thread_kind("7"), "7");
    }

    #[test]
    fn run_ticks_are_read_past_a_name_with_parentheses_and_spaces() {
        let stat = "4242 (odd) name (x) S 1 4242 4242 0 -1 4194560 120 0 0 0 37 5 0 0 20 0 1";
        assert_eq!(stat_run_ticks(stat), Some(42));
        assert_eq!(stat_run_ticks("4242 (short) S 1 2 3"), None);
        assert_eq!(stat_run_ticks("no name here"), None);
    }

    #[test]
    fn the_thread_clock_counts_a_spinning_thread_under_its_kind() {
        let clock = ThreadClock::now(std::process::id());
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let spinner = std::thread::Builder::new()
            .name("spinner-3".into())
            .spawn(move || {
                let spin = Instant::now();
                while spin.elapsed() < Duration::from_millis(300) {
                    std::hint::black_box(0);
                }
                // Stay alive until read: an ended thread is not counted.
                let _ = wait.recv();
            })
            .expect("a thread");
        std::thread::sleep(Duration::from_millis(400));
        let kinds = clock.since();
        drop(done);
        spinner.join().expect("the spinner");
        let spun = kinds.get("spinner").copied().unwrap_or_default();
        // The hypervisor may take the core away for a while; the scheduler does not count
        // that as run time.
        assert!(spun >= Duration::from_millis(150), "{kinds:?}");
        assert!(spun <= Duration::from_millis(400), "{kinds:?}");
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
            Duration::from_millis(30),
        );
        assert_eq!((merged.ok, merged.errors), (3, 1));
        assert_eq!(merged.core_time_per_request(), Duration::from_millis(10));
        assert!((merged.busy_cores() - 0.03).abs() < 1e-9);
        assert_eq!(merged.latencies[0], Duration::from_millis(1));
        assert!((merged.rate() - 3.0).abs() < 1e-9);
    }
}
