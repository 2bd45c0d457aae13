//! Harness for end-to-end tests: start the real `shoal` binary, find its port, wait until
//! it is ready, stop it with a signal.
//!
//! Tests here never reach into Shoal's crates: they see what an operator sees, a process,
//! its HTTP endpoint, its output and its exit code.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest a fresh `shoal up` may take to become ready (it trains the demo model).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The `shoal` binary: `$SHOAL_BIN`, else `shoal` next to this test's `deps` directory
/// (cargo builds it there when `cargo test --workspace` runs).
pub fn shoal_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SHOAL_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let binary = profile_dir.join("shoal");
    assert!(
        binary.exists(),
        "{} is missing: run the suite with `cargo test --workspace`, or build it with \
         `cargo build -p shoal-node` (or set SHOAL_BIN)",
        binary.display()
    );
    binary
}

/// A running `shoal up`. Killed on drop if still running.
#[derive(Debug)]
pub struct Shoal {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    stderr_path: PathBuf,
}

impl Shoal {
    /// Starts `shoal up` on `data_dir` with a free loopback port and waits for the line
    /// that names the port. Logs go to `data_dir/../<name>.stderr` for post-mortems.
    pub fn up(data_dir: &Path, log_name: &str) -> Shoal {
        let stderr_path = data_dir
            .parent()
            .unwrap_or(data_dir)
            .join(format!("{log_name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr log file");
        let mut child = Command::new(shoal_binary())
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info,raft=warn,raft_engine=warn")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("shoal starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base_url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("shoal: listening on ") {
                        break url.trim().to_string();
                    }
                }
                _ => {
                    let status = child.wait().expect("wait for shoal");
                    panic!(
                        "shoal exited ({status}) before listening:\n{}",
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
            }
        };
        // Keep draining stdout so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Shoal {
            child,
            base_url,
            stderr_path,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Polls `/v2/health/ready` until it answers 200.
    pub async fn wait_ready(&mut self, client: &reqwest::Client) {
        let started = Instant::now();
        loop {
            if let Ok(response) = client.get(self.url("/v2/health/ready")).send().await
                && response.status() == reqwest::StatusCode::OK
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("shoal exited ({status}) before ready:\n{}", self.stderr());
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "not ready after {READY_TIMEOUT:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Everything the process logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// Sends SIGINT, as Ctrl-C does.
    pub fn interrupt(&self) {
        signal(self.pid(), libc::SIGINT);
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "shoal did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Shoal {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[allow(unsafe_code)]
fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid fails with ESRCH.
    let result = unsafe { libc::kill(pid, signal) };
    assert_eq!(result, 0, "kill({pid}, {signal})");
}
