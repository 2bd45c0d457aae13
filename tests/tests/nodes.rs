//! The agent protocol against real servers: heartbeats register a node and renew its lease
//! on the leader; silence marks it Down (a raft transition), a heartbeat brings it back;
//! assignments are a blocking query on the state revision; operators drain through the CLI.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use serde_json::{Value, json};
use shoal_tests::{ServerCluster, get_json, http_client, write_demo_model};
use std::time::{Duration, Instant};

async fn node_status(cluster: &ServerCluster, http: &reqwest::Client, via: u64) -> Value {
    let nodes = get_json(http, &cluster.url(via, "/api/v1/nodes")).await;
    nodes[0]["status"].clone()
}

async fn beat(cluster: &ServerCluster, http: &reqwest::Client, via: u64) -> reqwest::StatusCode {
    let body = json!({
        "address": "127.0.0.1:9999",
        "devices": [{"id": 0, "kind": "Cpu", "memory_bytes": 1u64 << 30}],
        "labels": {"zone": "a"},
    });
    http.post(cluster.url(via, "/api/v1/nodes/7/heartbeat"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_goes_down_and_a_heartbeat_brings_it_back() {
    let root = tempfile::tempdir().unwrap();
    let cluster = ServerCluster::start(root.path(), 3);
    let http = http_client(Duration::from_secs(35));
    let leader = cluster.leader(&http, Duration::from_secs(20)).await;
    let follower = cluster.live().into_iter().find(|&id| id != leader).unwrap();

    // Heartbeats go to any server and reach the leader: a follower forwards them once it
    // has heard from the new leader, waiting up to 2 s for that. Should it still answer
    // 503 `not_leader`, the test retries, as an agent does.
    let started = Instant::now();
    loop {
        let status = beat(&cluster, &http, follower).await;
        if status.is_success() {
            break;
        }
        assert!(
            status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                && started.elapsed() < Duration::from_secs(10),
            "a heartbeat through a follower answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    while node_status(&cluster, &http, follower).await != "Ready" {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the node never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A blocking query: waits while nothing changes, answers when something does.
    let revision = {
        let answer = get_json(
            &http,
            &cluster.url(follower, "/api/v1/nodes/7/assignments?revision=0"),
        )
        .await;
        assert_eq!(answer["node_up"], true);
        answer["revision"].as_u64().unwrap()
    };
    let poll = {
        let (http, url) = (
            http.clone(),
            cluster.url(
                follower,
                &format!("/api/v1/nodes/7/assignments?revision={revision}&wait_ms=20000"),
            ),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let answer: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            (started.elapsed(), answer)
        })
    };

    // Silence: within a few lease lengths the leader marks it Down; that change also
    // answers the waiting poll, telling the node it is down.
    let silent = Instant::now();
    while node_status(&cluster, &http, follower).await != "Down" {
        assert!(
            silent.elapsed() < Duration::from_secs(15),
            "the node never went down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        silent.elapsed() >= Duration::from_secs(2),
        "not before its lease ran out"
    );
    let (waited, answer) = poll.await.unwrap();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    assert!(answer["revision"].as_u64().unwrap() > revision);
    assert_eq!(answer["node_up"], false);

    // A heartbeat brings it back.
    assert!(beat(&cluster, &http, leader).await.is_success());
    let started = Instant::now();
    while node_status(&cluster, &http, follower).await != "Ready" {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the node never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Operators drain and undrain it through the CLI.
    cluster.cli(follower, &["node", "drain", "7"]);
    assert_eq!(node_status(&cluster, &http, leader).await, "Draining");
    let listed = cluster.cli(follower, &["node", "list"]);
    assert!(
        listed.contains("Draining") && listed.contains("127.0.0.1:9999"),
        "{listed}"
    );
    cluster.cli(follower, &["node", "undrain", "7"]);
}

async fn metrics_text(http: &reqwest::Client, cluster: &ServerCluster) -> String {
    let answer = http.get(cluster.url(1, "/metrics")).send().await.unwrap();
    answer.text().await.unwrap()
}

/// One server and one agent, and the demo model pushed as a version of `model` for each
/// `(seed, loadable)`; where `loadable` is false, its `config.json` asks for a hidden layer
/// wider than its weights, which only loading the weights finds out.
async fn one_agent_with_demo_versions(
    root: &std::path::Path,
    http: &reqwest::Client,
    model: &str,
    versions: &[(&str, bool)],
) -> ServerCluster {
    let mut cluster = ServerCluster::start(root, 1);
    cluster.leader(http, Duration::from_secs(30)).await;
    cluster.start_agent(1);
    for (seed, loadable) in versions {
        let dir = root.join(format!("{model}-{seed}"));
        write_demo_model(&dir, seed);
        if !loadable {
            let path = dir.join("config.json");
            let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let hidden = config["layer_sizes"][1].as_u64().unwrap();
            config["layer_sizes"][1] = json!(hidden + 1);
            std::fs::write(&path, config.to_string()).unwrap();
        }
        cluster.push(1, &dir, model);
    }
    cluster
}

/// One flower to classify, through server 1.
async fn infer_iris(http: &reqwest::Client, cluster: &ServerCluster) -> reqwest::Response {
    let request = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
        "data": [5.1, 3.5, 1.4, 0.2]}]});
    let url = cluster.url(1, "/v2/models/iris/infer");
    http.post(url).json(&request).send().await.unwrap()
}

async fn wait_iris_serving(http: &reqwest::Client, cluster: &ServerCluster) {
    let started = Instant::now();
    while infer_iris(http, cluster).await.status() != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "iris never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Regression: a version that can never load (its config wider than its weights) was placed
/// again the moment it failed: about 8,000 raft entries in 10 s, replicated to every
/// server, and the replica so seldom `Failed` that its reason never showed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_load_shows_its_failure_and_is_retried_with_growing_waits() {
    let root = tempfile::tempdir().unwrap();
    let http = http_client(Duration::from_secs(10));
    let mut cluster =
        one_agent_with_demo_versions(root.path(), &http, "unloadable", &[("7", false)]).await;
    cluster.deploy(1, "unloadable", 1, 1);

    // Its failure and the reason are on show, in the API and in the metrics.
    let started = Instant::now();
    loop {
        let deployments = get_json(&http, &cluster.url(1, "/api/v1/deployments")).await;
        let replica = &deployments[0]["replicas"][0];
        if replica["state"] == "Failed" {
            let failure = replica["failure"].as_str().unwrap();
            assert!(failure.contains("do not match the config"), "{failure}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never seen failed: {deployments}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = metrics_text(&http, &cluster).await;
    assert!(
        metrics.contains(r#"shoal_deployment_replicas{deployment="unloadable",state="failed"} 1"#),
        "{metrics}"
    );

    // Attempts come further and further apart: three entries each (placed, loading,
    // failed), and the waits add up to 7.5 s by the sixth. Retried at once: 2,158 entries
    // in these 5 s.
    let commit = |status: Value| status["commit_index"].as_u64().unwrap();
    let before = commit(get_json(&http, &cluster.url(1, "/api/v1/cluster")).await);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = commit(get_json(&http, &cluster.url(1, "/api/v1/cluster")).await);
    assert!(after - before < 60, "{} entries in 5 s", after - before);
    cluster.stop_all();
}

/// Regression: with its only agent killed, a deployment's requests got 502 ("the model
/// failed") until the agent's lease ran out, and its groups went on counting as ready in
/// `shoal_deployment_replicas`, so the no-ready-replica alert never fired while every
/// request failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_whose_only_agent_dies_answers_503_and_counts_its_groups_lost() {
    let root = tempfile::tempdir().unwrap();
    let http = http_client(Duration::from_secs(10));
    let mut cluster =
        one_agent_with_demo_versions(root.path(), &http, "iris", &[("7", true)]).await;
    cluster.deploy(1, "iris", 1, 1);
    wait_iris_serving(&http, &cluster).await;

    cluster.kill_agent(1);
    // Before its lease runs out the gateway still tries it: no replica can be reached.
    let answer = infer_iris(&http, &cluster).await;
    assert_eq!(answer.status(), 503, "{:?}", answer.text().await);

    // Once the node is down, its group counts as lost.
    let started = Instant::now();
    while node_status(&cluster, &http, 1).await != "Down" {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the node never went down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = infer_iris(&http, &cluster).await;
    assert_eq!(answer.status(), 503, "{:?}", answer.text().await);
    let started = Instant::now();
    loop {
        let metrics = metrics_text(&http, &cluster).await;
        if metrics.contains(r#"shoal_deployment_replicas{deployment="iris",state="lost"} 1"#) {
            assert!(
                metrics.contains(r#"shoal_deployment_replicas{deployment="iris",state="ready"} 0"#),
                "{metrics}"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop_all();
}

/// A rollout to a version that cannot load (its config wider than its weights) is given up after a
/// few tries: the deployment is back on the version it ran, which served all along. (It
/// retried the new version for as long as anyone let it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_to_a_version_that_cannot_load_is_rolled_back_while_the_old_one_serves() {
    let root = tempfile::tempdir().unwrap();
    let http = http_client(Duration::from_secs(10));
    let versions = [("7", true), ("8", false)];
    let mut cluster = one_agent_with_demo_versions(root.path(), &http, "iris", &versions).await;
    cluster.deploy(1, "iris", 1, 1);
    wait_iris_serving(&http, &cluster).await;

    cluster.deploy(1, "iris", 2, 1);
    let started = Instant::now();
    loop {
        // Version 1 answers throughout.
        let answer = infer_iris(&http, &cluster).await;
        assert_eq!(answer.status(), 200, "{:?}", answer.text().await);
        let answer: Value = answer.json().await.unwrap();
        assert_eq!(answer["model_version"], "1", "{answer}");
        let deployments = get_json(&http, &cluster.url(1, "/api/v1/deployments")).await;
        let versions: Vec<u64> = deployments[0]["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|replica| replica["version"].as_u64().unwrap())
            .collect();
        if versions == [1] && cluster.log(1).contains("NewVersionFailed") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never rolled back: {deployments}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop_all();
}
