//! A real Prometheus server for the tests, from Debian's `prometheus` package: scraping
//! Shoal processes on loopback every second, with Shoal's alert rules loaded, queried
//! through its HTTP API. `promtool` comes with it.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository's `dashboards/` directory.
pub fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("dashboards")
}

/// Makes sure `prometheus` and `promtool` are on the PATH, installing Debian's package
/// when they are not (which needs root); panics with what to do otherwise.
pub fn ensure_installed() {
    let present = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if present("prometheus") && present("promtool") {
        return;
    }
    let installed = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "prometheus"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        installed && present("prometheus") && present("promtool"),
        "prometheus and promtool are missing and installing Debian's `prometheus` package \
         failed: install it (.ci/run does) or run the tests as root"
    );
}

/// Runs `promtool` with `args` in `dir`, feeding it `stdin`; returns its exit success and
/// everything it printed.
pub fn promtool(dir: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    ensure_installed();
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut input = child.stdin.take().expect("piped stdin");
    if let Some(text) = stdin {
        input
            .write_all(text.as_bytes())
            .expect("promtool reads stdin");
    }
    drop(input);
    let output = child.wait_with_output().expect("promtool finishes");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

/// A Prometheus server scraping a fixed set of targets; killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    pub base: String,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus in `dir` scraping every `(job, targets)` at 1 s, with the rule
    /// file `rules` loaded, and waits until it is ready.
    pub async fn start(dir: &Path, jobs: &[(&str, Vec<String>)], rules: &Path) -> Prometheus {
        ensure_installed();
        std::fs::create_dir_all(dir).expect("prometheus dir");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n",
        );
        config.push_str(&format!("rule_files:\n  - {}\n", rules.display()));
        config.push_str("scrape_configs:\n");
        for (job, targets) in jobs {
            let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("prometheus config");
        let address = crate::free_addresses(1).remove(0);
        let log = dir.join("prometheus.stderr");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("prometheus log"))
            .spawn()
            .expect("prometheus starts");
        let prometheus = Prometheus {
            child,
            base: format!("http://{address}"),
            log,
        };
        let http = crate::http_client(Duration::from_secs(5));
        let started = Instant::now();
        loop {
            if let Ok(answer) = http
                .get(format!("{}/-/ready", prometheus.base))
                .send()
                .await
                && answer.status() == 200
            {
                return prometheus;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "prometheus never became ready: {}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Calls `path` of the HTTP API with `query` as form parameters; returns its `data`,
    /// or the error Prometheus gave.
    pub async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let http = crate::http_client(Duration::from_secs(10));
        let form: Vec<String> = query
            .iter()
            .map(|(key, value)| format!("{key}={}", form_encode(value)))
            .collect();
        let url = format!("{}{path}", self.base);
        // Endpoints with parameters take them as a form; the others are GET only.
        let request = if query.is_empty() {
            http.get(url)
        } else {
            http.post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form.join("&"))
        };
        let answer = request.send().await.map_err(|error| error.to_string())?;
        let body: Value = answer.json().await.map_err(|error| error.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"].clone())
    }

    /// Evaluates `expr` now; returns the result vector (or an error Prometheus gave).
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await?;
        match &data["result"] {
            Value::Array(series) => Ok(series.clone()),
            // A scalar or string result is one value.
            other => Ok(vec![other.clone()]),
        }
    }

    /// Waits until every scrape target is up; panics naming the ones that are not.
    pub async fn wait_for_targets_up(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            let targets = self
                .api("/api/v1/targets?state=active", &[])
                .await
                .unwrap_or(Value::Null);
            let active = targets["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let down: Vec<String> = active
                .iter()
                .filter(|target| target["health"] != "up")
                .map(|target| format!("{} ({})", target["scrapeUrl"], target["lastError"]))
                .collect();
            if !active.is_empty() && down.is_empty() {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "scrape targets not up: {down:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `value` percent-encoded for an `application/x-www-form-urlencoded` body.
fn form_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
