//! Harness for end-to-end tests: start the real `shoal` binary, find its port, wait until
//! it is ready, stop it with a signal.
//!
//! Tests here never reach into Shoal's crates: they see what an operator sees, a process,
//! its HTTP endpoint, its output and its exit code.

pub mod linearizability;
pub mod load;
pub mod prometheus;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest a fresh `shoal up` may take to become ready (it trains the demo model).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// An HTTP client whose every request gives up after `timeout`.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("an HTTP client")
}

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
        Shoal::up_with(data_dir, log_name, &[])
    }

    /// Like [`Shoal::up`], with extra arguments for `shoal up`.
    pub fn up_with(data_dir: &Path, log_name: &str, args: &[&str]) -> Shoal {
        let stderr_path = data_dir
            .parent()
            .unwrap_or(data_dir)
            .join(format!("{log_name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr log file");
        let mut child = Command::new(shoal_binary())
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("SHOAL_TEST_LOG")
                    .unwrap_or_else(|_| "info,raft=warn,raft_engine=warn".into()),
            )
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

    /// Runs a CLI command against this `shoal up`; its stdout, panicking with its stderr if
    /// it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_output(args);
        assert!(
            output.status.success(),
            "shoal {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs a CLI command against this `shoal up` expecting it to fail; its stderr.
    pub fn cli_failing(&self, args: &[&str]) -> String {
        let output = self.cli_output(args);
        assert!(!output.status.success(), "shoal {args:?} succeeded");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    fn cli_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(shoal_binary())
            .args(args)
            .env("SHOAL_ADDR", &self.base_url)
            .output()
            .expect("shoal runs")
    }

    /// Polls `/v2/health/ready` until it answers 200.
    pub async fn wait_ready(&mut self, client: &reqwest::Client) {
        let started = Instant::now();
        loop {
            if let Ok(response) = client.get(self.url("/v2/health/ready")).send().await {
                let ready = response.status() == reqwest::StatusCode::OK;
                // Read the body so the pooled connection is left clean for the next call.
                let _ = response.bytes().await;
                if ready {
                    return;
                }
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

    /// The process id, as `libc`'s signal calls take it.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// The process id, as `/proc` names it.
    pub fn id(&self) -> u32 {
        self.child.id()
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

/// Runs `shoal` with `args` and returns its stdout, panicking with its stderr when it
/// fails.
pub fn run_shoal(args: &[&str]) -> String {
    let output = Command::new(shoal_binary())
        .args(args)
        .output()
        .expect("shoal runs");
    assert!(
        output.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Free loopback addresses, found by binding port 0 and releasing it.
pub fn free_addresses(count: usize) -> Vec<String> {
    let listeners: Vec<_> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("bound").to_string())
        .collect()
}

/// A `shoal server` process of a [`ServerCluster`].
#[derive(Debug)]
struct ServerProcess {
    child: Child,
}

/// Several `shoal server` processes on loopback, each with its own data dir.
#[derive(Debug)]
pub struct ServerCluster {
    root: PathBuf,
    /// Raft and HTTP address of each member.
    pub raft: std::collections::BTreeMap<u64, String>,
    pub http: std::collections::BTreeMap<u64, String>,
    processes: std::collections::BTreeMap<u64, ServerProcess>,
    /// Agents by node id, with their data-plane address.
    agents: std::collections::BTreeMap<u64, (Child, String)>,
    /// Extra arguments and environment every server is started with.
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
}

impl ServerCluster {
    /// Starts `size` servers that bootstrap one control plane.
    pub fn start(root: &Path, size: u64) -> ServerCluster {
        ServerCluster::start_with(root, size, &[], &[])
    }

    /// Like [`ServerCluster::start`], each server also given `args` and `env`.
    pub fn start_with(
        root: &Path,
        size: u64,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> ServerCluster {
        let addresses = free_addresses(2 * size as usize);
        let raft = (1..=size)
            .zip(addresses[..size as usize].iter().cloned())
            .collect();
        let http = (1..=size)
            .zip(addresses[size as usize..].iter().cloned())
            .collect();
        let mut cluster = ServerCluster {
            root: root.to_path_buf(),
            raft,
            http,
            processes: std::collections::BTreeMap::new(),
            agents: std::collections::BTreeMap::new(),
            extra_args: args.iter().map(|arg| (*arg).to_string()).collect(),
            extra_env: env
                .iter()
                .map(|(key, value)| ((*key).to_string(), (*value).to_string()))
                .collect(),
        };
        for id in 1..=size {
            cluster.start_member(id);
        }
        cluster
    }

    fn list(map: &std::collections::BTreeMap<u64, String>) -> String {
        map.iter()
            .map(|(id, address)| format!("{id}={address}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts a new server `id` on fresh addresses with `--join`: it waits to be added
    /// (`shoal cluster add`) instead of bootstrapping.
    pub fn start_joining_member(&mut self, id: u64) {
        let mut addresses = free_addresses(2);
        self.http
            .insert(id, addresses.pop().expect("two addresses"));
        self.raft
            .insert(id, addresses.pop().expect("two addresses"));
        self.spawn(id, true, false);
    }

    /// Starts (or restarts) member `id` on its data dir.
    pub fn start_member(&mut self, id: u64) {
        self.spawn(id, false, false);
    }

    /// Like [`ServerCluster::start_member`], but as a shell starts a background job without
    /// job control: with SIGINT ignored until the process installs its own handler.
    pub fn start_member_as_background_job(&mut self, id: u64) {
        self.spawn(id, false, true);
    }

    #[allow(
        unsafe_code,
        reason = "setting a signal's disposition in the child before it runs shoal"
    )]
    fn spawn(&mut self, id: u64, join: bool, interrupt_ignored: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("server-{id}.stderr")))
            .expect("log file");
        let mut command = Command::new(shoal_binary());
        command
            .arg("server")
            .args(["--id", &id.to_string()])
            .args(["--peers", &Self::list(&self.raft)])
            .args(["--http-peers", &Self::list(&self.http)])
            .args(["--raft-listen", &self.raft[&id]])
            .args(["--listen", &self.http[&id]])
            .arg("--data-dir")
            .arg(self.root.join(format!("server-{id}")))
            .args(join.then_some("--join"))
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(key, value)| (key, value)))
            .env("RUST_LOG", "info,raft=warn,raft_engine=warn")
            .stdout(Stdio::null())
            .stderr(log);
        if interrupt_ignored {
            use std::os::unix::process::CommandExt;
            // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
            unsafe {
                command.pre_exec(|| {
                    libc::signal(libc::SIGINT, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("shoal server starts");
        self.processes.insert(id, ServerProcess { child });
    }

    /// Starts `shoal agent` for node `id`, joining through every server.
    pub fn start_agent(&mut self, id: u64) {
        let address = free_addresses(1).remove(0);
        let servers: Vec<&str> = self.http.values().map(String::as_str).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("agent-{id}.stderr")))
            .expect("log file");
        let child = Command::new(shoal_binary())
            .arg("agent")
            .args(["--id", &id.to_string()])
            .args(["--servers", &servers.join(",")])
            .args(["--listen", &address])
            .arg("--data-dir")
            .arg(self.root.join(format!("agent-{id}")))
            .envs(self.extra_env.iter().map(|(key, value)| (key, value)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("shoal agent starts");
        self.agents.insert(id, (child, address));
    }

    /// Pushes the model files in `dir` as model `name` through member `via`; returns what
    /// the CLI printed.
    pub fn push(&self, via: u64, dir: &Path, name: &str) -> String {
        let dir = dir.to_str().expect("a UTF-8 path");
        self.cli(via, &["model", "push", dir, "--name", name])
    }

    /// Applies a fixed-size deployment named after its model through member `via`.
    pub fn deploy(&self, via: u64, model: &str, version: u32, replicas: u32) {
        let file = self.root.join(format!("{model}.toml"));
        let spec = format!(
            "name = \"{model}\"\nmodel = \"{model}\"\nversion = {version}\nreplicas = {replicas}\n"
        );
        std::fs::write(&file, spec).expect("deployment file");
        self.cli(
            via,
            &[
                "deploy",
                "apply",
                "-f",
                file.to_str().expect("a UTF-8 path"),
            ],
        );
    }

    /// The process id of server `id`, if it runs.
    pub fn server_pid(&self, id: u64) -> Option<u32> {
        self.processes.get(&id).map(|process| process.child.id())
    }

    /// The process id of agent `id`, if it runs.
    pub fn agent_pid(&self, id: u64) -> Option<u32> {
        self.agents.get(&id).map(|(child, _)| child.id())
    }

    /// The data-plane address (`host:port`) of agent `id`, where it also serves `/metrics`.
    pub fn agent_address(&self, id: u64) -> &str {
        &self.agents[&id].1
    }

    /// The replicas the first deployment wants, as member `via` answers.
    pub async fn replicas_wanted(&self, client: &reqwest::Client, via: u64) -> u64 {
        let deployments: serde_json::Value = client
            .get(self.url(via, "/api/v1/deployments"))
            .send()
            .await
            .expect("deployments asked")
            .json()
            .await
            .expect("deployments as JSON");
        deployments[0]["replicas_wanted"]
            .as_u64()
            .expect("a replica count")
    }

    /// Applies the deployment described by the TOML `spec` through member `via`.
    pub fn apply_deployment(&self, via: u64, name: &str, spec: &str) {
        let file = self.root.join(format!("{name}.toml"));
        std::fs::write(&file, spec).expect("deployment file");
        let path = file.to_str().expect("a UTF-8 path");
        self.cli(via, &["deploy", "apply", "-f", path]);
    }

    /// SIGKILLs agent `id`.
    pub fn kill_agent(&mut self, id: u64) {
        if let Some((mut child, _)) = self.agents.remove(&id) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What agent `id` logged.
    pub fn agent_log(&self, id: u64) -> String {
        std::fs::read_to_string(self.root.join(format!("agent-{id}.stderr"))).unwrap_or_default()
    }

    /// SIGKILLs member `id` and reaps it.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut process) = self.processes.remove(&id) {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }

    /// Sends SIGINT to member `id`, as Ctrl-C or a supervisor's stop would, and waits at
    /// most `timeout` for it to exit; false if it still runs (it is then killed).
    pub fn interrupt(&mut self, id: u64, timeout: Duration) -> bool {
        let Some(mut process) = self.processes.remove(&id) else {
            return true;
        };
        if let Ok(pid) = i32::try_from(process.child.id()) {
            signal(pid, libc::SIGINT);
        }
        let started = std::time::Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(_)) = process.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = process.child.kill();
        let _ = process.child.wait();
        false
    }

    /// Sends SIGINT to every member and agent and waits for them.
    pub fn stop_all(&mut self) {
        for (_, (mut child, _)) in std::mem::take(&mut self.agents) {
            if let Ok(pid) = i32::try_from(child.id()) {
                signal(pid, libc::SIGINT);
            }
            let _ = child.wait();
        }
        for (_, mut process) in std::mem::take(&mut self.processes) {
            if let Ok(pid) = i32::try_from(process.child.id()) {
                signal(pid, libc::SIGINT);
            }
            let _ = process.child.wait();
        }
    }

    pub fn live(&self) -> Vec<u64> {
        self.processes.keys().copied().collect()
    }

    pub fn url(&self, id: u64, path: &str) -> String {
        format!("http://{}{path}", self.http[&id])
    }

    /// Runs the `shoal` CLI against member `id`'s HTTP address; returns stdout, panicking
    /// with stderr when the command fails.
    pub fn cli(&self, id: u64, args: &[&str]) -> String {
        let addr = format!("http://{}", self.http[&id]);
        run_shoal(&[args, &["--addr", &addr]].concat())
    }

    /// What member `id` logged.
    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.root.join(format!("server-{id}.stderr"))).unwrap_or_default()
    }

    /// Waits until a live member reports itself leader and returns it.
    pub async fn leader(&self, client: &reqwest::Client, timeout: Duration) -> u64 {
        let started = Instant::now();
        loop {
            for id in self.live() {
                let mut request = client.get(self.url(id, "/api/v1/cluster"));
                if let Some((_, token)) =
                    self.extra_env.iter().find(|(key, _)| key == "SHOAL_TOKEN")
                {
                    request = request.bearer_auth(token);
                }
                if let Ok(response) = request.send().await
                    && let Ok(status) = response.json::<serde_json::Value>().await
                    && status["is_leader"] == serde_json::Value::Bool(true)
                {
                    return id;
                }
            }
            assert!(
                started.elapsed() < timeout,
                "no leader within {timeout:?}; logs:\n{}",
                self.live()
                    .iter()
                    .map(|id| self.log(*id))
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl ServerCluster {
    /// Registers versions `1..=values` of `model`, each one small file, so that an alias
    /// of the model can serve as a register holding one of those values. The file is
    /// uploaded to every live server (a registration reads its blobs on the leader).
    pub async fn register_model(&self, client: &reqwest::Client, model: &str, values: u32) {
        let leader = self.leader(client, Duration::from_secs(20)).await;
        let token = self
            .extra_env
            .iter()
            .find(|(key, _)| key == "SHOAL_TOKEN")
            .map(|(_, token)| token.clone());
        for value in 1..=values {
            let content = format!("{model} value {value}");
            let digest = sha256_hex(content.as_bytes());
            // One upload; the server copies it to the others before answering.
            let mut upload = client
                .put(self.url(leader, &format!("/api/v1/blobs/{digest}")))
                .body(content);
            if let Some(token) = &token {
                upload = upload.bearer_auth(token);
            }
            let stored = upload.send().await.expect("blob upload");
            assert!(stored.status().is_success(), "upload: {}", stored.status());
            let body = serde_json::json!({
                "format": "raw",
                "files": [{"name": "value.txt", "digest": digest}],
            });
            let mut registration = client
                .post(self.url(leader, &format!("/api/v1/models/{model}/versions")))
                .json(&body);
            if let Some(token) = &token {
                registration = registration.bearer_auth(token);
            }
            let answer = registration.send().await.expect("registration");
            let status = answer.status();
            assert!(
                status.is_success(),
                "{status}: {}",
                answer.text().await.unwrap_or_default()
            );
        }
    }
}

/// Trains the demo iris classifier from `seed` into `dir` (`shoal model demo`), ready to
/// push; another seed is another version.
pub fn write_demo_model(dir: &Path, seed: &str) {
    let dir = dir.to_str().expect("a UTF-8 path");
    run_shoal(&["model", "demo", "--out", dir, "--seed", seed]);
}

/// Writes model `files` (name to contents, as the fixtures make them) into `dir`, creating
/// it, so the CLI can push the directory.
pub fn write_model_dir(dir: &Path, files: &std::collections::HashMap<String, Vec<u8>>) {
    std::fs::create_dir_all(dir).expect("model directory");
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("model file");
    }
}

/// The resident set size of process `pid` in bytes, from `/proc`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// GETs `url` and reads the answer as JSON.
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let answer = client.get(url).send().await.expect("the request is sent");
    answer.json().await.expect("a JSON answer")
}

/// POSTs `body` to `url` until it is answered 200 (a deployment coming up answers 503
/// meanwhile), and gives the answer's JSON; fails the test past `within`.
pub async fn post_until_ok(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    within: Duration,
) -> serde_json::Value {
    let started = std::time::Instant::now();
    loop {
        let answer = client
            .post(url)
            .json(body)
            .send()
            .await
            .expect("the request is sent");
        if answer.status() == 200 {
            return answer.json().await.expect("a 200 answer is JSON");
        }
        assert!(
            started.elapsed() < within,
            "{url} never answered 200: {} {}",
            answer.status(),
            answer.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lower-case hex sha256, as blobs are addressed.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

impl Drop for ServerCluster {
    fn drop(&mut self) {
        for (_, (mut child, _)) in std::mem::take(&mut self.agents) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (_, mut process) in std::mem::take(&mut self.processes) {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }
}

/// What an iris request in OIP's binary tensor data extension got back.
#[derive(Debug)]
pub struct BinaryIrisAnswer {
    /// `probabilities`, answered as binary tensor data.
    pub probabilities: Vec<f32>,
    /// `label`, answered as JSON.
    pub labels: Vec<String>,
}

/// Asks `url` (an iris `…/infer`) about `rows` with the features as binary tensor data,
/// `probabilities` asked for as binary and `label` as JSON, and decodes the answer.
pub async fn infer_iris_binary(
    client: &reqwest::Client,
    url: &str,
    rows: &[[f32; 4]],
) -> BinaryIrisAnswer {
    let features: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let header = serde_json::json!({
        "inputs": [{"name": "features", "shape": [rows.len(), 4], "datatype": "FP32",
                    "parameters": {"binary_data_size": features.len()}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}},
                    {"name": "label"}],
    })
    .to_string();
    let answer = client
        .post(url)
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", header.len())
        .body([header.as_bytes(), &features].concat())
        .send()
        .await
        .unwrap_or_else(|error| panic!("binary infer request: {error:?}"));
    assert_eq!(answer.status(), 200, "{:?}", answer.text().await);
    let content_types: Vec<_> = answer.headers().get_all("content-type").iter().collect();
    assert_eq!(content_types, ["application/octet-stream"]);
    let header_bytes: usize = answer.headers()["inference-header-content-length"]
        .to_str()
        .ok()
        .and_then(|text| text.parse().ok())
        .expect("a binary answer names its JSON length");
    let body = answer.bytes().await.expect("the answer's body");
    let header: serde_json::Value =
        serde_json::from_slice(&body[..header_bytes]).expect("the answer's JSON part");
    let outputs = header["outputs"].as_array().expect("outputs");
    let output = |name: &str| {
        outputs
            .iter()
            .find(|output| output["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {header}"))
    };
    let size = output("probabilities")["parameters"]["binary_data_size"]
        .as_u64()
        .expect("probabilities come as binary data") as usize;
    assert_eq!(header_bytes + size, body.len(), "{header}");
    let probabilities = body[header_bytes..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let labels = serde_json::from_value(output("label")["data"].clone()).expect("labels");
    BinaryIrisAnswer {
        probabilities,
        labels,
    }
}
