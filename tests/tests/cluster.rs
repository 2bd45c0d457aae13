//! The whole system as processes: three `shoal server`s and two `shoal agent`s on
//! loopback. A model is trained, pushed and deployed with two replicas; inference goes
//! through any server's gateway to the agents. Killing an agent under steady load fails no
//! request (the gateway retries another replica) and its replica is placed again;
//! killing the leader keeps inference answering and admin writes resume.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use serde_json::{Value, json};
use shoal_tests::{ServerCluster, http_client, post_until_ok, run_shoal};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const SAMPLES: [([f32; 4], &str); 3] = [
    ([5.1, 3.5, 1.4, 0.2], "setosa"),
    ([6.4, 3.2, 4.5, 1.5], "versicolor"),
    ([6.3, 3.3, 6.0, 2.5], "virginica"),
];

async fn ready_replicas(cluster: &ServerCluster, http: &reqwest::Client, via: u64) -> Vec<Value> {
    let Ok(answer) = http
        .get(cluster.url(via, "/api/v1/deployments"))
        .send()
        .await
    else {
        return Vec::new();
    };
    let deployments: Value = answer.json().await.unwrap_or_default();
    deployments[0]["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["state"] == "Ready")
        .cloned()
        .collect()
}

async fn wait_ready(cluster: &ServerCluster, http: &reqwest::Client, via: u64, count: usize) {
    let started = Instant::now();
    while ready_replicas(cluster, http, via).await.len() < count {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{count} replicas never became ready; agents:\n{}\n---\n{}",
            cluster.agent_log(1),
            cluster.agent_log(2)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One inference request; the client tries the next server if one is unreachable or dies
/// mid-request, as a client behind a load balancer would. HTTP errors are not retried.
async fn classify(
    http: &reqwest::Client,
    servers: &[String],
    row: [f32; 4],
) -> Result<String, String> {
    let body = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [row]}]});
    let mut last = String::new();
    for server in servers {
        match http
            .post(format!("http://{server}/v2/models/iris/infer"))
            .json(&body)
            .send()
            .await
        {
            Ok(answer) => {
                let status = answer.status();
                let answer: Value = answer.json().await.map_err(|e| e.to_string())?;
                if !status.is_success() {
                    return Err(format!("{status}: {answer}"));
                }
                let label = answer["outputs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|o| o["name"] == "label")
                    .unwrap();
                return Ok(label["data"][0].as_str().unwrap().to_string());
            }
            // The server went away (refused, or reset while it had our request, as when it
            // is killed): inference is idempotent, so ask the next one.
            Err(error) => last = error.to_string(),
        }
    }
    Err(format!("no server reachable: {last}"))
}

/// Sends requests from `clients` tasks until stopped; counts successes and failures.
fn load(
    http: &reqwest::Client,
    servers: Vec<String>,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<Vec<String>>, Arc<AtomicUsize>) {
    let done = Arc::new(AtomicUsize::new(0));
    let (http, counter) = (http.clone(), done.clone());
    let task = tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut turn = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let (row, species) = SAMPLES[turn % 3];
            let mut order = servers.clone();
            order.rotate_left(turn % servers.len());
            turn += 1;
            match classify(&http, &order, row).await {
                Ok(label) if label == species => {}
                Ok(label) => failures.push(format!("wrong label {label} for {species}")),
                Err(error) => failures.push(error),
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
        failures
    });
    (task, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_pushed_and_deployed_on_agents_survives_an_agent_and_a_leader_kill() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = ServerCluster::start(root.path(), 3);
    let http = http_client(Duration::from_secs(35));
    let leader = cluster.leader(&http, Duration::from_secs(20)).await;
    cluster.start_agent(1);
    cluster.start_agent(2);
    // Both agents join before the deployment, so its replicas spread over them.
    let started = Instant::now();
    loop {
        let nodes = shoal_tests::get_json(&http, &cluster.url(leader, "/api/v1/nodes")).await;
        if nodes.as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the agents never joined"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Train, push, deploy two replicas, through the CLI against a follower.
    let follower = cluster.live().into_iter().find(|&id| id != leader).unwrap();
    let model_dir = root.path().join("iris");
    run_shoal(&["model", "demo", "--out", model_dir.to_str().unwrap()]);
    let pushed = cluster.push(follower, &model_dir, "iris");
    assert!(pushed.contains("iris version 1"), "{pushed}");
    cluster.deploy(follower, "iris", 1, 2);
    wait_ready(&cluster, &http, follower, 2).await;

    let servers: Vec<String> = cluster.http.values().cloned().collect();
    for (row, species) in SAMPLES {
        assert_eq!(classify(&http, &servers, row).await.unwrap(), species);
    }

    // Steady load; kill -9 the agent of one replica.
    let stop = Arc::new(AtomicBool::new(false));
    let (traffic, sent) = load(&http, servers.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = ready_replicas(&cluster, &http, follower).await[0]["node"]
        .as_u64()
        .unwrap();
    cluster.kill_agent(victim);
    // Its lease runs out, its node goes Down and the replica is placed again.
    let started = Instant::now();
    loop {
        let ready = ready_replicas(&cluster, &http, follower).await;
        if ready.len() == 2 && ready.iter().all(|r| r["node"].as_u64() != Some(victim)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the replica was not rescheduled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Kill -9 the leader: inference goes on through the other servers; admin writes
    // resume once a new leader is elected.
    let leader = cluster.leader(&http, Duration::from_secs(20)).await;
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let survivor = cluster.live()[0];
    let started = Instant::now();
    loop {
        let answer = http
            .post(cluster.url(survivor, "/api/v1/deployments/iris/scale"))
            .json(&json!({"replicas": 2}))
            .send()
            .await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "admin writes did not resume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let failures = traffic.await.unwrap();
    let total = sent.load(Ordering::Relaxed);
    eprintln!("{total} requests under faults, {} failed", failures.len());
    assert!(total > 50, "too little load to mean anything: {total}");
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    cluster.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_scales_a_deployment_up_idleness_to_zero_and_a_request_brings_it_back() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = ServerCluster::start(root.path(), 3);
    let http = http_client(Duration::from_secs(35));
    let leader = cluster.leader(&http, Duration::from_secs(20)).await;
    cluster.start_agent(1);
    let addr = format!("http://{}", cluster.http[&1]);
    let model_dir = root.path().join("iris");
    run_shoal(&["model", "demo", "--out", model_dir.to_str().unwrap()]);
    run_shoal(&[
        "model",
        "push",
        model_dir.to_str().unwrap(),
        "--name",
        "iris",
        "--addr",
        &addr,
    ]);
    let deployment = root.path().join("iris.toml");
    std::fs::write(
        &deployment,
        "name = \"iris\"\nmodel = \"iris\"\nversion = 1\nreplicas = 1\n\
         [autoscale]\nmin = 0\nmax = 3\ntarget_ongoing_requests = 1\n\
         upscale_delay_ms = 500\ndownscale_delay_ms = 1500\nscale_to_zero_after_ms = 2500\n",
    )
    .unwrap();
    run_shoal(&[
        "deploy",
        "apply",
        "-f",
        deployment.to_str().unwrap(),
        "--addr",
        &addr,
    ]);
    wait_ready(&cluster, &http, 1, 1).await;
    // Every server routes to it (a follower applies the replica's state a moment later).
    let servers: Vec<String> = cluster.http.values().cloned().collect();
    for server in &servers {
        let started = Instant::now();
        while classify(&http, std::slice::from_ref(server), SAMPLES[0].0)
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{server} never routed to the replica"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Many callers at once: more requests in flight than one replica's target.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = (0..12)
        .map(|_| load(&http, servers.clone(), stop.clone()))
        .collect();
    let started = Instant::now();
    while cluster.replicas_wanted(&http, 1).await < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "load never scaled the deployment up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_ready(&cluster, &http, 1, 2).await;
    stop.store(true, Ordering::Relaxed);
    for (task, _) in traffic {
        let failures = task.await.unwrap();
        assert!(
            failures.is_empty(),
            "requests failed while scaling: {:?}",
            &failures[..failures.len().min(5)]
        );
    }

    // Idle: down to zero replicas.
    let started = Instant::now();
    while cluster.replicas_wanted(&http, 1).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "idleness never scaled to zero"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The next request, sent to a follower, is held by the leader (whose autoscaler
    // counts it) until a replica is back, then answered.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let asked = Instant::now();
    assert_eq!(
        classify(&http, &[cluster.http[&follower].clone()], SAMPLES[2].0)
            .await
            .unwrap(),
        "virginica"
    );
    eprintln!("answered from zero replicas in {:?}", asked.elapsed());
    assert!(cluster.replicas_wanted(&http, 1).await >= 1);
    cluster.stop_all();
}

async fn ready_versions(cluster: &ServerCluster, http: &reqwest::Client) -> Vec<u64> {
    let mut versions: Vec<u64> = ready_replicas(cluster, http, 1)
        .await
        .iter()
        .filter_map(|replica| replica["version"].as_u64())
        .collect();
    versions.sort_unstable();
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_and_its_rollback_fail_no_request() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = ServerCluster::start(root.path(), 1);
    let http = http_client(Duration::from_secs(35));
    cluster.leader(&http, Duration::from_secs(20)).await;
    cluster.start_agent(1);
    cluster.start_agent(2);
    let addr = format!("http://{}", cluster.http[&1]);
    for (seed, version) in [("7", "1"), ("8", "2"), ("9", "3")] {
        let dir = root.path().join(format!("iris-{seed}"));
        shoal_tests::write_demo_model(&dir, seed);
        let pushed = run_shoal(&[
            "model",
            "push",
            dir.to_str().unwrap(),
            "--name",
            "iris",
            "--addr",
            &addr,
        ]);
        assert!(
            pushed.contains(&format!("iris version {version} (new)")),
            "{pushed}"
        );
    }
    let deployment = root.path().join("iris.toml");
    let apply = |version: u32| {
        std::fs::write(
            &deployment,
            format!("name = \"iris\"\nmodel = \"iris\"\nversion = {version}\nreplicas = 2\n"),
        )
        .unwrap();
        run_shoal(&[
            "deploy",
            "apply",
            "-f",
            deployment.to_str().unwrap(),
            "--addr",
            &addr,
        ]);
    };
    apply(1);
    wait_ready(&cluster, &http, 1, 2).await;

    let servers: Vec<String> = cluster.http.values().cloned().collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (traffic, sent) = load(&http, servers, stop.clone());
    // Version 2 is pushed but never deployed: the rollback from 3 returns to 1, the one
    // that ran before. (It went to 2, the version 3 was made from.)
    for (version, expected) in [(3u32, vec![3u64, 3]), (1, vec![1, 1])] {
        if version == 3 {
            apply(version);
        } else {
            run_shoal(&["deploy", "rollback", "iris", "--addr", &addr]);
        }
        let started = Instant::now();
        while ready_versions(&cluster, &http).await != expected {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the rollout to version {version} did not finish: {:?}",
                ready_versions(&cluster, &http).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Let traffic run on the new version for a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let failures = traffic.await.unwrap();
    let total = sent.load(Ordering::Relaxed);
    let shown = run_shoal(&["deploy", "show", "iris", "--addr", &addr]);
    assert!(shown.contains("version 1, 2/2 ready"), "{shown}");
    assert!(total > 50, "too little load: {total}");
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    cluster.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traffic_split_sends_requests_to_both_versions() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = ServerCluster::start(root.path(), 1);
    let http = http_client(Duration::from_secs(35));
    cluster.leader(&http, Duration::from_secs(20)).await;
    cluster.start_agent(1);
    cluster.start_agent(2);
    for seed in ["7", "8"] {
        let dir = root.path().join(format!("iris-{seed}"));
        cluster.cli(
            1,
            &[
                "model",
                "demo",
                "--out",
                dir.to_str().unwrap(),
                "--seed",
                seed,
            ],
        );
        cluster.push(1, &dir, "iris");
    }
    let file = root.path().join("split.toml");
    std::fs::write(
        &file,
        "name = \"iris\"\nmodel = \"iris\"\nreplicas = 2\nsplit = [{version = 1, weight = 50}, {version = 2, weight = 50}]\n",
    )
    .unwrap();
    cluster.cli(1, &["deploy", "apply", "-f", file.to_str().unwrap()]);
    let started = Instant::now();
    while ready_versions(&cluster, &http).await != vec![1, 2] {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the split never ran both versions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}]});
    let mut served = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let answer: Value = http
            .post(cluster.url(1, "/v2/models/iris/infer"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        *served
            .entry(answer["model_version"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(served.len(), 2, "both versions serve: {served:?}");
    assert!(
        served.values().all(|count| *count >= 10),
        "roughly half each: {served:?}"
    );

    // An explanation's rows go to replicas on the agents as inference does, all to the one
    // version it names: its prediction is what that version answers.
    let explain = json!({"inputs": body["inputs"], "method": "ablation"});
    for _ in 0..4 {
        let within = Duration::from_secs(30);
        let url = cluster.url(1, "/v2/models/iris/explain");
        let explained = post_until_ok(&http, &url, &explain, within).await;
        let version = explained["model_version"].as_str().unwrap().to_string();
        let url = cluster.url(1, &format!("/v2/models/iris/versions/{version}/infer"));
        let answer = post_until_ok(&http, &url, &body, within).await;
        let probabilities = answer["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|output| output["name"] == "probabilities")
            .unwrap();
        // The same numbers, up to the last bits a batch of another size rounds otherwise.
        let numbers = |value: &Value| -> Vec<f64> {
            value
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_f64().unwrap())
                .collect()
        };
        let predicted = numbers(&explained["explanations"][0]["prediction"]);
        let answered = numbers(&probabilities["data"]);
        assert_eq!(predicted.len(), answered.len());
        assert!(
            predicted
                .iter()
                .zip(&answered)
                .all(|(a, b)| (a - b).abs() <= 1e-4),
            "version {version}: {predicted:?} against {answered:?}"
        );
    }

    // A split has no single version to roll back to; the refusal says so. (It said the
    // deployment ran version 1.)
    let refused = http
        .post(cluster.url(1, "/api/v1/deployments/iris/rollback"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    let refused = refused.text().await.unwrap();
    assert!(refused.contains("splits its traffic"), "{refused}");
    cluster.stop_all();
}
