//! `shoal up` end to end: the real binary on a free port in a temp dir, the demo model
//! trained and served, every kind of bad input answered, a graceful stop, a restart that
//! recovers from the raft log without training again, and a deployment that scales with
//! its load.

use serde_json::{Value, json};
use shoal_tests::{Shoal, infer_iris_binary, shoal_binary};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const SAMPLES: [([f32; 4], &str); 3] = [
    ([5.1, 3.5, 1.4, 0.2], "setosa"),
    ([6.4, 3.2, 4.5, 1.5], "versicolor"),
    ([6.3, 3.3, 6.0, 2.5], "virginica"),
];

fn features(rows: &[[f32; 4]]) -> Value {
    json!({"inputs": [{"name": "features", "shape": [rows.len(), 4], "datatype": "FP32", "data": rows}]})
}

/// Asks iris about `rows` as JSON; the answer must be 200 with JSON.
async fn infer(client: &reqwest::Client, shoal: &Shoal, rows: &[[f32; 4]]) -> Value {
    let response = client
        .post(shoal.url("/v2/models/iris/infer"))
        .json(&features(rows))
        .send()
        .await
        .unwrap_or_else(|error| panic!("infer request: {error:?}\nshoal log:\n{}", shoal.stderr()));
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON answer");
    assert_eq!(body["model_name"], "iris");
    body
}

async fn infer_labels(client: &reqwest::Client, shoal: &Shoal, rows: &[[f32; 4]]) -> Vec<String> {
    let body = infer(client, shoal, rows).await;
    let label = body["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .find(|output| output["name"] == "label")
        .expect("a label output");
    assert_eq!(label["datatype"], "BYTES");
    assert_eq!(label["shape"], json!([rows.len()]));
    serde_json::from_value(label["data"].clone()).expect("labels are strings")
}

/// Sends `body` to `path` and checks the status and that the error body is JSON
/// `{"error": "..."}` with a non-empty message.
async fn expect_error(
    client: &reqwest::Client,
    shoal: &Shoal,
    path: &str,
    body: Vec<u8>,
    status: u16,
) {
    let response = client
        .post(shoal.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), status, "{path}");
    assert!(
        response.headers().contains_key("x-request-id"),
        "every answer has a request id"
    );
    if status == 413 {
        // Regression: without this the client reused the half-read connection and its
        // next request was lost.
        assert_eq!(response.headers()["connection"], "close");
    }
    let error: Value = response.json().await.expect("error body is JSON");
    let message = error["error"].as_str().expect("{\"error\": \"...\"}");
    assert!(!message.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_serves_iris_refuses_bad_input_stops_gracefully_and_recovers() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let client = reqwest::Client::new();

    let mut shoal = Shoal::up(&data_dir, "first");
    shoal.wait_ready(&client).await;
    assert!(
        shoal.stderr().contains("trained the demo model"),
        "{}",
        shoal.stderr()
    );

    // One sample of each species, one at a time and as one batch.
    for (row, species) in SAMPLES {
        assert_eq!(infer_labels(&client, &shoal, &[row]).await, vec![species]);
    }
    let rows: Vec<[f32; 4]> = SAMPLES.iter().map(|(row, _)| *row).collect();
    assert_eq!(
        infer_labels(&client, &shoal, &rows).await,
        vec!["setosa", "versicolor", "virginica"]
    );

    // The same rows as binary tensor data (OIP's binary extension), with the probabilities
    // answered as binary too: the same numbers as the JSON answer gives.
    let binary = infer_iris_binary(&client, &shoal.url("/v2/models/iris/infer"), &rows).await;
    assert_eq!(binary.labels, ["setosa", "versicolor", "virginica"]);
    let json_probabilities: Vec<f32> = infer(&client, &shoal, &rows).await["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|output| output["name"] == "probabilities")
        .and_then(|output| serde_json::from_value(output["data"].clone()).ok())
        .expect("probabilities as JSON");
    assert_eq!(binary.probabilities, json_probabilities);

    // Metadata names the signature.
    let metadata = shoal_tests::get_json(&client, &shoal.url("/v2/models/iris")).await;
    assert_eq!(
        metadata["inputs"][0],
        json!({"name": "features", "datatype": "FP32", "shape": [-1, 4]})
    );

    // A caller's request id comes back with the answer.
    let echoed = client
        .get(shoal.url("/v2/health/ready"))
        .header("x-request-id", "caller-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "caller-chosen-42");

    // Every bad input gets its status and a JSON error, and the server keeps serving.
    let infer = "/v2/models/iris/infer";
    let wrong_name = json!({"inputs": [{"name": "petals", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    let wrong_shape = json!({"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]});
    let wrong_type = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]});
    let wrong_count = json!({"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (infer, b"{\"inputs\": [".to_vec(), 400),
        (infer, b"not json at all".to_vec(), 400),
        (infer, wrong_name.to_string().into_bytes(), 400),
        (infer, wrong_shape.to_string().into_bytes(), 400),
        (infer, wrong_type.to_string().into_bytes(), 400),
        (infer, wrong_count.to_string().into_bytes(), 400),
        (
            "/v2/models/no-such-model/infer",
            features(&[SAMPLES[0].0]).to_string().into_bytes(),
            404,
        ),
        (
            "/v2/models/iris/versions/9/infer",
            features(&[SAMPLES[0].0]).to_string().into_bytes(),
            404,
        ),
        // An unknown model is the first thing wrong, whatever the body.
        (
            "/v2/models/no-such-model/infer",
            b"not json at all".to_vec(),
            404,
        ),
        (infer, vec![b' '; 5 << 20], 413),
    ];
    for (path, body, status) in cases {
        expect_error(&client, &shoal, path, body, status).await;
        assert_eq!(
            infer_labels(&client, &shoal, &[SAMPLES[2].0]).await,
            vec!["virginica"]
        );
    }

    // A second `shoal up` on the same data dir is refused with a clear message.
    let second = std::process::Command::new(shoal_binary())
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .output()
        .expect("second shoal runs");
    assert!(!second.status.success());
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(
        message.contains("in use by another shoal process"),
        "{message}"
    );
    assert_eq!(
        infer_labels(&client, &shoal, &[SAMPLES[0].0]).await,
        vec!["setosa"]
    );

    // Ctrl-C while a request is in flight: the request still gets its answer.
    let address = shoal.base_url.trim_start_matches("http://").to_string();
    let body = features(&[SAMPLES[1].0]).to_string();
    let mut in_flight = TcpStream::connect(&address).unwrap();
    in_flight
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        in_flight,
        "POST /v2/models/iris/infer HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let (head, tail) = body.split_at(body.len() / 2);
    in_flight.write_all(head.as_bytes()).unwrap();
    in_flight.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    shoal.interrupt();
    tokio::time::sleep(Duration::from_millis(300)).await;
    in_flight.write_all(tail.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\"versicolor\"") {
        let read = in_flight
            .read(&mut buffer)
            .expect("the in-flight request is answered");
        assert!(
            read > 0,
            "connection closed before the answer: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buffer[..read]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    drop(in_flight);
    let status = shoal.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "clean exit after Ctrl-C: {status}\n{}",
        shoal.stderr()
    );
    drop(shoal);

    // Restart on the same dir: state comes back from the raft log, nothing is retrained.
    let mut again = Shoal::up(&data_dir, "second");
    again.wait_ready(&client).await;
    let log = again.stderr();
    assert!(
        log.contains("demo model found in the log; not training"),
        "{log}"
    );
    assert!(!log.contains("trained the demo model"), "{log}");
    for (row, species) in SAMPLES {
        assert_eq!(infer_labels(&client, &again, &[row]).await, vec![species]);
    }
    let models = shoal_tests::get_json(&client, &again.url("/api/v1/models")).await;
    assert_eq!(
        models.as_array().map(Vec::len),
        Some(1),
        "still one version: {models}"
    );
    again.interrupt();
    assert!(again.wait_exit(Duration::from_secs(30)).success());
}

/// `shoal up`'s iris deployment as the admin API shows it.
async fn iris_deployment(client: &reqwest::Client, shoal: &Shoal) -> Value {
    let deployments: Value = client
        .get(shoal.url("/api/v1/deployments"))
        .send()
        .await
        .expect("deployments asked")
        .json()
        .await
        .expect("deployments as JSON");
    deployments
        .as_array()
        .into_iter()
        .flatten()
        .find(|deployment| deployment["name"] == "iris")
        .cloned()
        .expect("iris is deployed")
}

/// The replicas `shoal up` wants for its iris deployment.
async fn iris_replicas_wanted(client: &reqwest::Client, shoal: &Shoal) -> u64 {
    iris_deployment(client, shoal).await["replicas_wanted"]
        .as_u64()
        .expect("a replica count")
}

/// How many of iris's replicas are ready.
async fn iris_replicas_ready(client: &reqwest::Client, shoal: &Shoal) -> usize {
    iris_deployment(client, shoal).await["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|replica| replica["state"] == "Ready")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_scales_a_deployment_up_with_load_to_zero_when_idle_and_back_for_a_request() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let client = reqwest::Client::new();
    let mut shoal = Shoal::up(&data_dir, "autoscale");
    shoal.wait_ready(&client).await;
    let spec = temp.path().join("iris.toml");
    std::fs::write(
        &spec,
        "name = \"iris\"\nmodel = \"iris\"\nversion = 1\nreplicas = 1\n\
         [autoscale]\nmin = 0\nmax = 3\ntarget_ongoing_requests = 1\n\
         upscale_delay_ms = 500\ndownscale_delay_ms = 1500\nscale_to_zero_after_ms = 2500\n",
    )
    .unwrap();
    shoal_tests::run_shoal(&[
        "deploy",
        "apply",
        "-f",
        spec.to_str().unwrap(),
        "--addr",
        &shoal.url(""),
    ]);

    // Many callers at once: more requests in flight than one replica's target.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..32)
        .map(|caller| {
            let (client, url, stop) = (
                client.clone(),
                shoal.url("/v2/models/iris/infer"),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (row, _) = SAMPLES[caller % SAMPLES.len()];
                    match client.post(&url).json(&features(&[row])).send().await {
                        Ok(answer) if answer.status() == 200 => {}
                        Ok(answer) => failures.push(answer.status().to_string()),
                        Err(error) => failures.push(error.to_string()),
                    }
                }
                failures
            })
        })
        .collect();
    let started = std::time::Instant::now();
    while iris_replicas_ready(&client, &shoal).await < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "load never scaled iris up to two ready replicas:\n{}",
            shoal.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for caller in callers {
        let failures = caller.await.unwrap();
        assert!(
            failures.is_empty(),
            "requests failed while scaling: {failures:?}"
        );
    }

    // Idle: down to no replica, and the last one gone from the gateway's routes (until
    // then a request is served by it and wakes nothing).
    let started = std::time::Instant::now();
    while iris_replicas_wanted(&client, &shoal).await > 0
        || client
            .get(shoal.url("/v2/models/iris/ready"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "idleness never scaled iris to zero"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A completion asked of a model that cannot generate is refused, and wakes nothing.
    let refused = client
        .post(shoal.url("/v1/completions"))
        .json(&json!({"model": "iris", "prompt": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(iris_replicas_wanted(&client, &shoal).await, 0);

    // The next request is held until a replica is back, then answered.
    let (row, species) = SAMPLES[1];
    assert_eq!(infer_labels(&client, &shoal, &[row]).await, vec![species]);
    assert!(iris_replicas_wanted(&client, &shoal).await >= 1);
    stop_shoal(shoal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_holds_a_completion_for_a_deployment_scaled_to_zero_until_it_is_back() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let client = reqwest::Client::new();
    let mut shoal = Shoal::up(&data_dir, "generation");
    shoal.wait_ready(&client).await;
    let files = shoal_actors::fixtures::tiny_llama(&shoal_actors::fixtures::TinyLlama::for_tests())
        .unwrap();
    let model_dir = temp.path().join("tiny");
    shoal_tests::write_model_dir(&model_dir, &files);
    let address = shoal.url("");
    let model_dir = model_dir.to_str().unwrap();
    shoal_tests::run_shoal(&[
        "model", "push", model_dir, "--name", "tiny", "--addr", &address,
    ]);
    let spec = temp.path().join("tiny.toml");
    let spec = spec.to_str().unwrap();
    let completion = json!({"model": "tiny", "prompt": "hello", "max_tokens": 4});

    // Set to no replica by hand, it stays so: refused at once, not held.
    std::fs::write(
        spec,
        "name = \"tiny\"\nmodel = \"tiny\"\nversion = 1\nreplicas = 0\n",
    )
    .unwrap();
    shoal_tests::run_shoal(&["deploy", "apply", "-f", spec, "--addr", &address]);
    let refused = client
        .post(shoal.url("/v1/completions"))
        .json(&completion)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);

    // Scaled to zero by the autoscaler, it comes back for the request.
    std::fs::write(
        spec,
        "name = \"tiny\"\nmodel = \"tiny\"\nversion = 1\nreplicas = 0\n\
         [autoscale]\nmin = 0\nmax = 1\ntarget_ongoing_requests = 1\n\
         upscale_delay_ms = 0\ndownscale_delay_ms = 500\nscale_to_zero_after_ms = 1000\n",
    )
    .unwrap();
    shoal_tests::run_shoal(&["deploy", "apply", "-f", spec, "--addr", &address]);
    let answer = client
        .post(shoal.url("/v1/completions"))
        .json(&completion)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", shoal.stderr());
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
    stop_shoal(shoal);
}

/// Regression: `shoal model list | head -1` panicked with "failed printing to stdout:
/// Broken pipe" once `head` had closed the pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_exit_quietly_when_their_output_pipe_is_closed() {
    let temp = tempfile::tempdir().unwrap();
    let mut shoal = Shoal::up(&temp.path().join("data"), "closed-pipe");
    let client = reqwest::Client::new();
    shoal.wait_ready(&client).await;
    let commands: [&[&str]; 5] = [
        &["model", "list"],
        &["model", "list", "--output", "json"],
        &["deploy", "list"],
        &["model", "show", "iris"],
        &["token", "new"],
    ];
    for args in commands {
        // The reading end is closed before the command starts: its first line fails.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = std::process::Command::new(shoal_binary())
            .args(args)
            .env("SHOAL_ADDR", &shoal.base_url)
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stderr.is_empty(),
            "shoal {args:?}: {}\n{stderr}",
            output.status
        );
    }
    stop_shoal(shoal);
}

/// A `shoal up` of its own in a fresh temp dir, ready; the dir lasts as long as the guard
/// returned with it.
async fn ready_shoal(client: &reqwest::Client, log_name: &str) -> (tempfile::TempDir, Shoal) {
    let temp = tempfile::tempdir().expect("a temp dir");
    let mut shoal = Shoal::up(&temp.path().join("data"), log_name);
    shoal.wait_ready(client).await;
    (temp, shoal)
}

/// Stops `shoal` as Ctrl-C does and checks that it exits cleanly.
fn stop_shoal(mut shoal: Shoal) {
    shoal.interrupt();
    assert!(shoal.wait_exit(Duration::from_secs(30)).success());
}

/// Regression: with iris at versions 1 (the demo) and 2 (pushed), a deleted iris deployment
/// came back at the newest version when `shoal up` restarted on the same data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_restarted_leaves_a_deleted_demo_deployment_deleted() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let client = reqwest::Client::new();
    let mut shoal = Shoal::up(&data_dir, "demo-deleted-first");
    shoal.wait_ready(&client).await;
    let other = temp.path().join("other-seed");
    let other = other.to_str().expect("a UTF-8 temp path");
    // The demo's own seed is 7: another seed is another version.
    shoal.cli(&["model", "demo", "--out", other, "--seed", "8"]);
    let pushed = shoal.cli(&["model", "push", other, "--name", "iris"]);
    assert_eq!(pushed.trim(), "iris version 2 (new)");
    shoal.cli(&["deploy", "delete", "iris"]);
    shoal.interrupt();
    assert!(shoal.wait_exit(Duration::from_secs(30)).success());
    drop(shoal);

    let mut again = Shoal::up(&data_dir, "demo-deleted-second");
    let started = std::time::Instant::now();
    while !again.stderr().contains("demo model found in the log") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            again.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    again.wait_ready(&client).await;
    let deployments = shoal_tests::get_json(&client, &again.url("/api/v1/deployments")).await;
    assert_eq!(deployments, json!([]), "{}", again.stderr());
    assert!(
        !again.stderr().contains("demo model deployed"),
        "{}",
        again.stderr()
    );
    again.interrupt();
    assert!(again.wait_exit(Duration::from_secs(30)).success());
}

/// Regression: `shoal model show` (and `/api/v1/models`) showed no aliases, so an alias
/// set with `shoal model alias` was nowhere to be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_show_lists_the_aliases_set_with_model_alias() {
    let client = reqwest::Client::new();
    let (_temp, shoal) = ready_shoal(&client, "aliases-shown").await;
    shoal.cli(&["model", "alias", "iris", "stable", "1"]);

    let shown = shoal.cli(&["model", "show", "iris"]);
    assert!(shown.contains("iris version 1 (stable):"), "{shown}");
    assert!(shown.contains("aliases: stable -> 1"), "{shown}");
    let shown: Value =
        serde_json::from_str(&shoal.cli(&["model", "show", "iris", "-o", "json"])).expect("JSON");
    assert_eq!(shown[0]["aliases"], json!({"stable": 1}), "{shown}");
    let models = shoal_tests::get_json(&client, &shoal.url("/api/v1/models")).await;
    assert_eq!(models[0]["aliases"], json!({"stable": 1}), "{models}");

    // An alias named like a version number is refused: "5" would read as version 5.
    let numeric = client
        .put(shoal.url("/api/v1/models/iris/aliases/5"))
        .json(&json!({"version": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(numeric.status(), 400);
    let numeric = numeric.text().await.unwrap();
    assert!(numeric.contains("all digits"), "{numeric}");
    stop_shoal(shoal);
}

/// Writes `spec` to `name.toml` in `dir` and applies it with `shoal deploy apply -f`; the
/// CLI's output.
fn apply_deployment(shoal: &Shoal, dir: &std::path::Path, name: &str, spec: &str) -> String {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, spec).expect("a deployment file");
    shoal.cli(&[
        "deploy",
        "apply",
        "-f",
        file.to_str().expect("a UTF-8 path"),
    ])
}

/// Pushes a second iris version (the demo trained with another seed) to `shoal`.
fn push_second_iris_version(shoal: &Shoal, temp: &std::path::Path) {
    let other = temp.join("other-seed");
    let other = other.to_str().expect("a UTF-8 temp path");
    shoal.cli(&["model", "demo", "--out", other, "--seed", "8"]);
    let pushed = shoal.cli(&["model", "push", other, "--name", "iris"]);
    assert_eq!(pushed.trim(), "iris version 2 (new)");
}

/// Regression: `deploy list` and `deploy show` of a traffic split showed only its heaviest
/// version ("1"), and nothing said which alias a deployment followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_list_and_show_name_a_traffic_split_and_a_followed_alias() {
    let client = reqwest::Client::new();
    let (temp, shoal) = ready_shoal(&client, "split-shown").await;
    push_second_iris_version(&shoal, temp.path());
    shoal.cli(&["model", "alias", "iris", "stable", "2"]);
    apply_deployment(
        &shoal,
        temp.path(),
        "split",
        "name = \"iris\"\nmodel = \"iris\"\nreplicas = 1\n\
         split = [{version = 1, weight = 90}, {version = 2, weight = 10}]\n",
    );
    apply_deployment(
        &shoal,
        temp.path(),
        "follows",
        "name = \"iris-stable\"\nmodel = \"iris\"\nalias = \"stable\"\nreplicas = 0\n",
    );

    let listed = shoal.cli(&["deploy", "list"]);
    assert!(listed.contains("1 (90%), 2 (10%)"), "{listed}");
    assert!(listed.contains("2 (alias stable)"), "{listed}");
    let shown = shoal.cli(&["deploy", "show", "iris"]);
    assert!(
        shown.contains("model iris versions 1 (90%), 2 (10%),"),
        "{shown}"
    );
    let shown = shoal.cli(&["deploy", "show", "iris-stable"]);
    assert!(
        shown.contains("model iris version 2 (alias stable),"),
        "{shown}"
    );
    let deployments = shoal_tests::get_json(&client, &shoal.url("/api/v1/deployments")).await;
    let selectors: Vec<&Value> = deployments
        .as_array()
        .unwrap()
        .iter()
        .map(|deployment| &deployment["selector"])
        .collect();
    assert_eq!(
        selectors,
        [
            &json!({"split": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]}),
            &json!({"alias": "stable"}),
        ]
    );
    stop_shoal(shoal);
}

/// Regression: an input given twice was answered 200, an output asked for twice was
/// answered once, and `[[1, 2], [3, 4]]` was taken for shape `[1, 4]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_inputs_repeated_outputs_and_data_nested_against_its_shape_are_400() {
    let client = reqwest::Client::new();
    let (_temp, shoal) = ready_shoal(&client, "lenient-input").await;
    let infer = "/v2/models/iris/infer";
    let features = json!({"name": "features", "shape": [1, 4], "datatype": "FP32",
        "data": [5.1, 3.5, 1.4, 0.2]});
    let bodies = [
        json!({"inputs": [features, features]}),
        json!({"inputs": [features], "outputs": [{"name": "label"}, {"name": "label"}]}),
        json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
            "data": [[5.1, 3.5], [1.4, 0.2]]}]}),
    ];
    for body in bodies {
        expect_error(&client, &shoal, infer, body.to_string().into_bytes(), 400).await;
    }
    // Flat data and data nested as its shape are still served.
    for data in [json!([5.1, 3.5, 1.4, 0.2]), json!([[5.1, 3.5, 1.4, 0.2]])] {
        let body = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
            "data": data}]});
        let answer = client
            .post(shoal.url(infer))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{data}");
    }
    stop_shoal(shoal);
}

/// Regression: a version that exists but no deployment serves was answered 503 "has no
/// ready replica yet" with Retry-After, so clients retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_no_deployment_serves_is_404_until_one_does() {
    let client = reqwest::Client::new();
    let (temp, shoal) = ready_shoal(&client, "not-deployed").await;
    push_second_iris_version(&shoal, temp.path());
    let second = shoal.url("/v2/models/iris/versions/2/infer");
    let row = [[5.1f32, 3.5, 1.4, 0.2]];

    let refused = client
        .post(&second)
        .json(&features(&row))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    assert!(!refused.headers().contains_key("retry-after"));
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"], "version 2 of iris is not deployed");

    // Once a deployment selects it, it is served (503 only while its replica loads).
    apply_deployment(
        &shoal,
        temp.path(),
        "split",
        "name = \"iris\"\nmodel = \"iris\"\nreplicas = 2\n\
         split = [{version = 1, weight = 50}, {version = 2, weight = 50}]\n",
    );
    let started = std::time::Instant::now();
    loop {
        let answer = client
            .post(&second)
            .json(&features(&row))
            .send()
            .await
            .unwrap();
        match answer.status().as_u16() {
            200 => break,
            503 => {}
            other => panic!("{other}: {}", answer.text().await.unwrap_or_default()),
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "version 2 never served:\n{}",
            shoal.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_shoal(shoal);
}

/// Regression: `shoal model push --format pickle` (and `"format": "pickle"` in the
/// registration API) was accepted, and metadata then named the platform "shoal_pickle".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_in_a_format_shoal_does_not_load_is_refused_naming_those_it_does() {
    let client = reqwest::Client::new();
    let (temp, shoal) = ready_shoal(&client, "pickle-refused").await;
    let content = b"iris value 1";
    let digest = shoal_tests::sha256_hex(content);
    let stored = client
        .put(shoal.url(&format!("/api/v1/blobs/{digest}")))
        .body(content.to_vec())
        .send()
        .await
        .unwrap();
    assert!(stored.status().is_success());
    let registration = client
        .post(shoal.url("/api/v1/models/pickled/versions"))
        .json(&json!({"format": "pickle", "files": [{"name": "value.txt", "digest": digest}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(registration.status(), 400);
    let error: Value = registration.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("safetensors, gguf, raw"), "{error}");

    let model = temp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("value.txt"), content).unwrap();
    let pushed = std::process::Command::new(shoal_binary())
        .args([
            "model",
            "push",
            model.to_str().unwrap(),
            "--name",
            "pickled",
        ])
        .args(["--format", "pickle"])
        .env("SHOAL_ADDR", &shoal.base_url)
        .output()
        .unwrap();
    assert!(!pushed.status.success());
    let stderr = String::from_utf8_lossy(&pushed.stderr);
    assert!(stderr.contains("safetensors, gguf, raw"), "{stderr}");
    let models = shoal.cli(&["model", "list"]);
    assert!(!models.contains("pickled"), "{models}");
    stop_shoal(shoal);
}

/// Regression: `-o json` was ignored by `model alias` and `model demo`, deploy writes
/// printed raw JSON in table mode, `--addr host:port` failed with "relative URL without a
/// base", `--data '{"x":1}'` said "element 0 is null", and an upload was "on 1 servers".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_output_follows_the_output_flag_and_reads_plainly() {
    let client = reqwest::Client::new();
    let (temp, shoal) = ready_shoal(&client, "cli-edges").await;

    let alias: Value =
        serde_json::from_str(&shoal.cli(&["model", "alias", "iris", "stable", "1", "-o", "json"]))
            .expect("model alias -o json is JSON");
    assert_eq!(alias["version"], 1, "{alias}");
    let out = temp.path().join("demo");
    let demo: Value = serde_json::from_str(&shoal.cli(&[
        "model",
        "demo",
        "--out",
        out.to_str().unwrap(),
        "-o",
        "json",
    ]))
    .expect("model demo -o json is JSON");
    assert!(demo["accuracy"].as_f64().is_some(), "{demo}");

    let pushed = std::process::Command::new(shoal_binary())
        .args(["model", "push", out.to_str().unwrap(), "--name", "other"])
        .env("SHOAL_ADDR", &shoal.base_url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&pushed.stderr);
    assert!(stderr.contains("bytes, on 1 server)"), "{stderr}");

    let scaled = shoal.cli(&["deploy", "scale", "iris", "2"]);
    assert_eq!(scaled.trim(), "deployment iris scaled to 2 replicas");
    let scaled: Value =
        serde_json::from_str(&shoal.cli(&["deploy", "scale", "iris", "1", "-o", "json"]))
            .expect("deploy scale -o json is JSON");
    assert_eq!(scaled["replicas"], 1, "{scaled}");
    let applied = apply_deployment(
        &shoal,
        temp.path(),
        "other",
        "name = \"other\"\nmodel = \"other\"\nversion = 1\nreplicas = 0\n",
    );
    assert_eq!(applied.trim(), "deployment other created");
    let deleted = shoal.cli(&["deploy", "delete", "other"]);
    assert_eq!(deleted.trim(), "deployment other deleted");

    let address = shoal.base_url.trim_start_matches("http://");
    let listed = shoal.cli(&["model", "list", "--addr", address]);
    assert!(listed.contains("iris"), "{listed}");

    let refused = shoal.cli_failing(&["infer", "iris", "--data", "{\"x\":1}"]);
    assert!(
        refused.contains("must be a JSON array of rows"),
        "{refused}"
    );
    stop_shoal(shoal);
}

/// Regression: a version pushed with its weights in GGUF was registered, and every replica
/// of it failed ("the version has no model.safetensors file"). The demo's own weights in
/// GGUF answer as they do in safetensors; a push with no config is refused before it
/// uploads anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_pushed_in_gguf_answers_as_its_weights_do_in_safetensors() {
    use shoal_actors::fixtures::{GgufStorage, as_gguf};
    let client = reqwest::Client::new();
    let (temp, shoal) = ready_shoal(&client, "gguf").await;
    // The demo's default seed: the same weights as iris version 1.
    let demo = temp.path().join("demo");
    shoal.cli(&["model", "demo", "--out", demo.to_str().unwrap()]);
    let files: std::collections::HashMap<String, Vec<u8>> = std::fs::read_dir(&demo)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    let gguf = temp.path().join("gguf");
    shoal_tests::write_model_dir(&gguf, &as_gguf(&files, GgufStorage::F32).unwrap());
    let gguf = gguf.to_str().unwrap();

    let pushed = shoal.cli(&["model", "push", gguf, "--name", "iris-gguf"]);
    assert_eq!(pushed.trim(), "iris-gguf version 1 (new)");
    let shown = shoal.cli(&["model", "show", "iris-gguf"]);
    assert!(shown.contains("gguf"), "{shown}");
    apply_deployment(
        &shoal,
        temp.path(),
        "iris-gguf",
        "name = \"iris-gguf\"\nmodel = \"iris-gguf\"\nversion = 1\nreplicas = 1\n",
    );

    let rows: Vec<[f32; 4]> = SAMPLES.iter().map(|(row, _)| *row).collect();
    let url = shoal.url("/v2/models/iris-gguf/infer");
    let from_gguf =
        shoal_tests::post_until_ok(&client, &url, &features(&rows), Duration::from_secs(30)).await;
    let from_safetensors = infer(&client, &shoal, &rows).await;
    assert_eq!(from_gguf["outputs"], from_safetensors["outputs"]);

    std::fs::remove_file(std::path::Path::new(gguf).join("config.json")).unwrap();
    let refused = shoal.cli_failing(&["model", "push", gguf, "--name", "no-config"]);
    assert!(refused.contains("needs a config.json"), "{refused}");
    assert!(
        !refused.contains("uploaded"),
        "refused before uploading: {refused}"
    );
    stop_shoal(shoal);
}

/// A data dir whose cluster state is in a format this build does not read is refused at
/// once, by name, before anything decodes it.
#[test]
fn shoal_up_refuses_a_data_dir_in_another_state_format() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("STATE_FORMAT"), "0\n").unwrap();
    let mut child = std::process::Command::new(shoal_binary())
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("shoal up started on a data dir in another format");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("holds cluster state in format 0, and this build reads format 1"),
        "{stderr}"
    );
}
