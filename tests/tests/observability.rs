//! Observability end to end: every process's `/metrics` passes `promtool check metrics`,
//! and a real Prometheus scraping a real cluster under load answers every dashboard
//! panel's query with data and evaluates every alert rule without error.

use serde_json::{Value, json};
use shoal_tests::prometheus::{Prometheus, dashboards_dir, promtool};
use shoal_tests::{
    ServerCluster, Shoal, free_addresses, http_client, shoal_binary, write_model_dir,
};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The window that stands in for Grafana's `$__rate_interval` (Prometheus scrapes every
/// second here, so ten seconds hold several samples).
const RATE_INTERVAL: &str = "10s";

/// `promtool check metrics` on what `url` serves; panics with promtool's complaints.
async fn assert_promtool_accepts(http: &reqwest::Client, url: &str) {
    let text = http
        .get(url)
        .send()
        .await
        .unwrap_or_else(|error| panic!("GET {url}: {error}"))
        .text()
        .await
        .unwrap_or_default();
    assert!(text.contains("shoal_build_info"), "{url} served: {text}");
    let (clean, printed) = promtool(&std::env::temp_dir(), &["check", "metrics"], Some(&text));
    assert!(clean, "promtool check metrics on {url}:\n{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_serves_metrics_that_promtool_accepts() {
    let root = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
    let mut shoal = Shoal::up(root.path(), "up.stderr");
    let http = http_client(Duration::from_secs(30));
    shoal.wait_ready(&http).await;
    let infer = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
        "data": [5.1, 3.5, 1.4, 0.2]}]});
    let answer = http
        .post(shoal.url("/v2/models/iris/infer"))
        .json(&infer)
        .send()
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(answer.status(), 200);
    let metrics_url = shoal.url("/metrics");
    assert_promtool_accepts(&http, &metrics_url).await;
    let text = http
        .get(metrics_url)
        .send()
        .await
        .unwrap_or_else(|error| panic!("{error}"))
        .text()
        .await
        .unwrap_or_default();
    for series in [
        "shoal_build_info{role=\"up\"",
        "shoal_requests_total{code=\"200\",model=\"iris\",version=\"1\"} 1",
        "shoal_batch_rows_count{model=\"iris\",version=\"1\"}",
        "shoal_model_load_duration_seconds_count{model=\"iris\",version=\"1\"} 1",
        "shoal_device_memory_total_bytes{device=",
        "shoal_node_status{node=\"1\",status=\"ready\"} 1",
        "shoal_deployment_replicas{deployment=\"iris\",state=\"ready\"} 1",
        "shoal_raft_role{role=\"leader\"} 1",
    ] {
        assert!(text.contains(series), "no {series} in:\n{text}");
    }
    shoal.interrupt();
}

/// Every panel query of every dashboard, with its dashboard and panel title.
fn panel_queries() -> Vec<(String, String, String)> {
    let mut queries = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dashboards_dir())
        .unwrap_or_else(|error| panic!("dashboards/: {error}"))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let dashboard: Value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let variables: Vec<String> = dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|variable| variable["name"].as_str().map(str::to_string))
            .collect();
        let title = dashboard["title"].as_str().unwrap_or("?").to_string();
        let mut panels = Vec::new();
        collect_panels(&dashboard["panels"], &mut panels);
        for panel in panels {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let Some(expr) = target["expr"].as_str() else {
                    continue;
                };
                let mut expr = expr.replace("$__rate_interval", RATE_INTERVAL);
                for variable in &variables {
                    // Every variable is "All" here: a regex that matches anything.
                    expr = expr
                        .replace(&format!("${{{variable}}}"), ".*")
                        .replace(&format!("${variable}"), ".*");
                }
                let panel_title = panel["title"].as_str().unwrap_or("?").to_string();
                queries.push((title.clone(), panel_title, expr));
            }
        }
    }
    queries
}

fn collect_panels(panels: &Value, into: &mut Vec<Value>) {
    for panel in panels.as_array().into_iter().flatten() {
        into.push(panel.clone());
        collect_panels(&panel["panels"], into);
    }
}

/// Waits until `url` answers 200, or panics after `timeout`.
async fn wait_for_status_200(http: &reqwest::Client, url: &str, body: &Value, timeout: Duration) {
    let started = Instant::now();
    loop {
        if let Ok(answer) = http.post(url).json(body).send().await
            && answer.status() == 200
        {
            return;
        }
        assert!(started.elapsed() < timeout, "{url} never answered 200");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends inference until `stop`: good OIP requests, malformed ones (400), requests for a
/// model nobody deployed (404) and streamed completions, so every serving metric moves.
async fn drive_load(base: String, stop: Arc<AtomicBool>) {
    let http = http_client(Duration::from_secs(30));
    let good = json!({"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
        "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]}]});
    let bad = json!({"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32",
        "data": [1.0, 2.0, 3.0]}]});
    let completion = json!({"model": "tiny", "prompt": "hello", "max_tokens": 6, "stream": true});
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let mut requests = Vec::new();
        for _ in 0..8 {
            requests.push(
                http.post(format!("{base}/v2/models/iris/infer"))
                    .json(&good)
                    .send(),
            );
        }
        let answers = futures_join_all(requests).await;
        for answer in answers.into_iter().flatten() {
            let _ = answer.bytes().await;
        }
        if round.is_multiple_of(4) {
            let _ = http
                .post(format!("{base}/v2/models/iris/infer"))
                .json(&bad)
                .send()
                .await;
            let _ = http
                .post(format!("{base}/v2/models/nobody/infer"))
                .json(&good)
                .send()
                .await;
            if let Ok(answer) = http
                .post(format!("{base}/v1/completions"))
                .json(&completion)
                .send()
                .await
            {
                let _ = answer.bytes().await;
            }
            // An explanation: its own counter, and 16 inference rows in the others.
            if let Ok(answer) = http
                .post(format!("{base}/v2/models/iris/explain"))
                .json(&good)
                .send()
                .await
            {
                let _ = answer.bytes().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits every future, in order (the tests crate has no futures dependency).
async fn futures_join_all<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(output) = handle.await {
            outputs.push(output);
        }
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_answers_every_dashboard_panel_and_evaluates_every_alert_rule() {
    let root = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
    let mut cluster = ServerCluster::start(root.path(), 3);
    let http = http_client(Duration::from_secs(60));
    let leader = cluster.leader(&http, Duration::from_secs(20)).await;
    cluster.start_agent(1);

    // A gateway process, so its /metrics is checked too.
    let gateway_address = free_addresses(1).remove(0);
    let mut gateway = Command::new(shoal_binary())
        .args(["gateway", "--servers", &cluster.http[&leader]])
        .args(["--listen", &gateway_address, "--data-dir"])
        .arg(root.path().join("gateway"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("shoal gateway: {error}"));

    // The classifier (autoscaled, with a latency objective) and a generative model.
    let iris = root.path().join("iris");
    let demo = Command::new(shoal_binary())
        .args(["model", "demo", "--out"])
        .arg(&iris)
        .status()
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(demo.success());
    cluster.push(leader, &iris, "iris");
    cluster.apply_deployment(
        leader,
        "iris",
        "name = \"iris\"\nmodel = \"iris\"\nversion = 1\nreplicas = 1\n\
         latency_objective_ms = 250\n\
         [autoscale]\nmin = 1\nmax = 2\ntarget_ongoing_requests = 16\n",
    );
    let llama = root.path().join("tiny");
    let files = shoal_actors::fixtures::tiny_llama(&shoal_actors::fixtures::TinyLlama::for_tests())
        .unwrap_or_else(|error| panic!("{error}"));
    write_model_dir(&llama, &files);
    cluster.push(leader, &llama, "tiny");
    cluster.deploy(leader, "tiny", 1, 1);

    let base = format!("http://{}", cluster.http[&leader]);
    let one = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
        "data": [5.1, 3.5, 1.4, 0.2]}]});
    let timeout = Duration::from_secs(60);
    wait_for_status_200(
        &http,
        &format!("{base}/v2/models/iris/infer"),
        &one,
        timeout,
    )
    .await;
    let completion = json!({"model": "tiny", "prompt": "hi", "max_tokens": 2});
    wait_for_status_200(
        &http,
        &format!("{base}/v1/completions"),
        &completion,
        timeout,
    )
    .await;

    let servers: Vec<String> = cluster.http.values().cloned().collect();
    let agent = cluster.agent_address(1).to_string();
    let mut processes: Vec<String> = servers.clone();
    processes.push(agent.clone());
    processes.push(gateway_address.clone());
    for address in &processes {
        assert_promtool_accepts(&http, &format!("http://{address}/metrics")).await;
    }

    let prometheus = Prometheus::start(
        &root.path().join("prometheus"),
        &[
            ("shoal-servers", servers),
            ("shoal-agents", vec![agent]),
            ("shoal-gateways", vec![gateway_address]),
        ],
        &dashboards_dir().join("alerts.yml"),
    )
    .await;
    prometheus
        .wait_for_targets_up(Duration::from_secs(30))
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(drive_load(base, Arc::clone(&stop)));

    // Every panel query answers with data: retried while the first scrapes of the load
    // arrive, then each empty or failing one is reported.
    let queries = panel_queries();
    assert!(queries.len() >= 40, "only {} panel queries", queries.len());
    let started = Instant::now();
    let failures = loop {
        let mut failures = Vec::new();
        for (dashboard, panel, expr) in &queries {
            match prometheus.query(expr).await {
                Ok(series) if !series.is_empty() => {}
                Ok(_) => failures.push(format!("{dashboard} / {panel}: no data for {expr}")),
                Err(error) => failures.push(format!("{dashboard} / {panel}: {error} in {expr}")),
            }
        }
        if failures.is_empty() || started.elapsed() > Duration::from_secs(60) {
            break failures;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(
        failures.is_empty(),
        "{} of {} panel queries failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );

    // Every alert rule is loaded and evaluates without error; none fires on this healthy
    // cluster.
    let started = Instant::now();
    loop {
        let rules = prometheus
            .api("/api/v1/rules", &[])
            .await
            .unwrap_or_else(|error| panic!("rules: {error}"));
        let all: Vec<Value> = rules["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert!(all.len() >= 8, "only {} rules loaded", all.len());
        let broken: Vec<String> = all
            .iter()
            .filter(|rule| rule["health"] == "err")
            .map(|rule| format!("{}: {}", rule["name"], rule["lastError"]))
            .collect();
        assert!(broken.is_empty(), "rules failing to evaluate: {broken:?}");
        if all.iter().all(|rule| rule["health"] == "ok") {
            let firing: Vec<String> = all
                .iter()
                .filter(|rule| rule["state"] == "firing")
                .map(|rule| rule["name"].to_string())
                .collect();
            assert!(
                firing.is_empty(),
                "alerts firing on a healthy cluster: {firing:?}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "rules never evaluated: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let _ = gateway.kill();
    let _ = gateway.wait();
    cluster.stop_all();
}
