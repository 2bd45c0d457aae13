//! The clients: control-plane operations (the register alias, version registrations,
//! re-applying and scaling the deployment, draining) and inference, each recorded as invoked and then ok, fail or
//! unknown. A 4xx answer is a definite refusal (fail); a 5xx or no answer may or may not
//! have taken effect (unknown), except for reads and inference, where any answer is a
//! clear error.

use crate::history::{History, Member, Micros, OpKind, Operation, Outcome};
use crate::net::http_address;
use crate::rng::Rng;
use serde_json::{Value, json};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The model whose alias is the register; it has versions `1..=REGISTER_VALUES`.
pub const REGISTER_MODEL: &str = "register";
pub const REGISTER_ALIAS: &str = "chaos";
pub const REGISTER_VALUES: u32 = 3;
/// The model new versions are registered to during the run.
pub const VERSIONS_MODEL: &str = "versions";
/// The deployment the workload scales and the inference clients call.
pub const DEPLOYMENT: &str = "iris";
/// The node the workload drains and undrains.
pub const DRAINED_NODE: u64 = 2;

/// Longest a control-plane call waits for an answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longer than the gateway's own 30 s deadline: a request is answered or it is lost.
pub const INFER_TIMEOUT: Duration = Duration::from_secs(35);

/// The history being written, with the run's clock.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    pub history: Mutex<History>,
}

impl Recorder {
    pub fn new(seed: u64) -> Recorder {
        Recorder {
            start: Instant::now(),
            history: Mutex::new(History {
                seed,
                ..History::default()
            }),
        }
    }

    pub fn now(&self) -> Micros {
        self.start.elapsed().as_micros() as u64
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut History) -> R) -> R {
        let mut history = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut history)
    }

    pub fn record(&self, operation: Operation) {
        self.with(|history| history.operations.push(operation));
    }
}

/// How a write answer reads: 2xx ok, 4xx a refusal, anything else unknown.
fn write_outcome(answer: Result<reqwest::Response, reqwest::Error>) -> Outcome {
    match answer {
        Ok(response) if response.status().is_success() => Outcome::Ok,
        Ok(response) if response.status().is_client_error() => {
            Outcome::Fail(response.status().to_string())
        }
        Ok(response) => Outcome::Unknown(response.status().to_string()),
        Err(error) => no_answer(&error),
    }
}

/// A call that got no answer: failed for sure if the connection was never made (the
/// server never saw it), unknown otherwise.
fn no_answer(error: &reqwest::Error) -> Outcome {
    if error.is_connect() {
        Outcome::Fail(format!("not sent: {error}"))
    } else {
        Outcome::Unknown(error.to_string())
    }
}

fn base(server: u64) -> String {
    format!("http://{}", http_address(server))
}

/// Points the register alias at `value` through `server`.
async fn alias_write(http: &reqwest::Client, server: u64, value: u32) -> Outcome {
    let url = format!(
        "{}/api/v1/models/{REGISTER_MODEL}/aliases/{REGISTER_ALIAS}",
        base(server)
    );
    let answer = http
        .put(url)
        .json(&json!({"version": value}))
        .timeout(CONTROL_TIMEOUT)
        .send()
        .await;
    write_outcome(answer)
}

/// Reads the register alias through `server` (linearizable); `Some(0)` when unset.
pub async fn alias_read(http: &reqwest::Client, server: u64) -> (Outcome, Option<u32>) {
    let url = format!(
        "{}/api/v1/models/{REGISTER_MODEL}/aliases/{REGISTER_ALIAS}",
        base(server)
    );
    let answer = http.get(url).timeout(CONTROL_TIMEOUT).send().await;
    match answer {
        Ok(response) if response.status() == 200 => match response.json::<Value>().await {
            Ok(body) => (
                Outcome::Ok,
                Some(body["version"].as_u64().unwrap_or(0) as u32),
            ),
            Err(error) => (Outcome::Unknown(error.to_string()), None),
        },
        Ok(response) if response.status() == 404 => {
            let body: Value = response.json().await.unwrap_or_default();
            let message = body["error"]["message"].as_str().unwrap_or_default();
            if message.contains("has no alias") {
                (Outcome::Ok, Some(0))
            } else {
                (Outcome::Fail(message.to_string()), None)
            }
        }
        Ok(response) => (Outcome::Fail(response.status().to_string()), None),
        Err(error) => (no_answer(&error), None),
    }
}

/// Uploads `content` as a blob through `server`; returns its digest.
pub async fn upload_blob(
    http: &reqwest::Client,
    server: u64,
    content: Vec<u8>,
) -> Result<String, String> {
    let digest = shoal_tests::sha256_hex(&content);
    let answer = http
        .put(format!("{}/api/v1/blobs/{digest}", base(server)))
        .body(content)
        .timeout(CONTROL_TIMEOUT)
        .send()
        .await
        .map_err(|error| error.to_string())?;
    if !answer.status().is_success() {
        return Err(answer.status().to_string());
    }
    Ok(digest)
}

/// Registers a version of `model` made of the one file `digest`.
pub async fn register(
    http: &reqwest::Client,
    server: u64,
    model: &str,
    digest: &str,
) -> (Outcome, Option<u32>) {
    let body = json!({"format": "raw", "files": [{"name": "value.txt", "digest": digest}]});
    let answer = http
        .post(format!("{}/api/v1/models/{model}/versions", base(server)))
        .json(&body)
        .timeout(CONTROL_TIMEOUT)
        .send()
        .await;
    match answer {
        Ok(response) if response.status().is_success() => {
            let body: Value = response.json().await.unwrap_or_default();
            match body["version"].as_u64() {
                Some(version) => (Outcome::Ok, Some(version as u32)),
                None => (Outcome::Unknown(format!("no version in {body}")), None),
            }
        }
        other => (write_outcome(other), None),
    }
}

/// One control-plane client: a random operation through a random server, until `stop`.
pub async fn control_client(
    client: u32,
    servers: u64,
    recorder: &Recorder,
    mut rng: Rng,
    stop: &AtomicBool,
) {
    let http = shoal_tests::http_client(CONTROL_TIMEOUT);
    let mut counter = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let server = rng.range(1, servers + 1);
        let roll = rng.range(0, 100);
        let invoked = recorder.now();
        let (kind, outcome) = if roll < 40 {
            let value = rng.range(1, u64::from(REGISTER_VALUES) + 1) as u32;
            let outcome = alias_write(&http, server, value).await;
            (OpKind::AliasWrite { value }, outcome)
        } else if roll < 70 {
            let (outcome, value) = alias_read(&http, server).await;
            (OpKind::AliasRead { value }, outcome)
        } else if roll < 80 {
            counter += 1;
            let content = format!("client {client} version {counter} seed {}", rng.next_u64());
            let (outcome, version) = match upload_blob(&http, server, content.into_bytes()).await {
                Ok(digest) => register(&http, server, VERSIONS_MODEL, &digest).await,
                Err(error) => (Outcome::Fail(format!("blob upload: {error}")), None),
            };
            let kind = OpKind::RegisterVersion {
                model: VERSIONS_MODEL.to_string(),
                version,
            };
            (kind, outcome)
        } else if roll < 85 {
            let replicas = rng.range(1, 3) as u32;
            let spec = json!({"name": DEPLOYMENT, "model": DEPLOYMENT, "version": 1,
                "replicas": replicas});
            let answer = http
                .post(format!("{}/api/v1/deployments", base(server)))
                .json(&spec)
                .timeout(CONTROL_TIMEOUT)
                .send()
                .await;
            let kind = OpKind::Deploy {
                deployment: DEPLOYMENT.to_string(),
                replicas,
            };
            (kind, write_outcome(answer))
        } else if roll < 90 {
            let replicas = rng.range(1, 3) as u32;
            let answer = http
                .post(format!(
                    "{}/api/v1/deployments/{DEPLOYMENT}/scale",
                    base(server)
                ))
                .json(&json!({"replicas": replicas}))
                .timeout(CONTROL_TIMEOUT)
                .send()
                .await;
            let kind = OpKind::Scale {
                deployment: DEPLOYMENT.to_string(),
                replicas,
            };
            (kind, write_outcome(answer))
        } else {
            let drain = rng.chance(0.5);
            let verb = if drain { "drain" } else { "undrain" };
            let answer = http
                .post(format!(
                    "{}/api/v1/nodes/{DRAINED_NODE}/{verb}",
                    base(server)
                ))
                .timeout(CONTROL_TIMEOUT)
                .send()
                .await;
            let kind = if drain {
                OpKind::Drain { node: DRAINED_NODE }
            } else {
                OpKind::Undrain { node: DRAINED_NODE }
            };
            (kind, write_outcome(answer))
        };
        recorder.record(Operation {
            client,
            kind,
            invoked,
            completed: recorder.now(),
            outcome,
        });
        tokio::time::sleep(Duration::from_millis(rng.range(10, 60))).await;
    }
}

/// One inference client: the classifier through a random server's gateway, until `stop`.
pub async fn inference_client(
    client: u32,
    servers: u64,
    recorder: &Recorder,
    mut rng: Rng,
    stop: &AtomicBool,
) {
    let http = shoal_tests::http_client(INFER_TIMEOUT);
    let body = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
        "data": [5.1, 3.5, 1.4, 0.2]}]});
    while !stop.load(Ordering::Relaxed) {
        let server = rng.range(1, servers + 1);
        let invoked = recorder.now();
        let answer = http
            .post(format!("{}/v2/models/{DEPLOYMENT}/infer", base(server)))
            .json(&body)
            .send()
            .await;
        let (status, outcome) = match answer {
            Ok(response) => {
                let status = response.status();
                // The answer is only complete once its body has arrived.
                match response.bytes().await {
                    Ok(_) if status.is_success() => (Some(status.as_u16()), Outcome::Ok),
                    Ok(_) => (Some(status.as_u16()), Outcome::Fail(status.to_string())),
                    Err(error) => (None, Outcome::Unknown(error.to_string())),
                }
            }
            Err(error) => (None, no_answer(&error)),
        };
        recorder.record(Operation {
            client,
            kind: OpKind::Infer {
                gateway: Member::Server(server),
                status,
            },
            invoked,
            completed: recorder.now(),
            outcome,
        });
        tokio::time::sleep(Duration::from_millis(rng.range(5, 30))).await;
    }
}
