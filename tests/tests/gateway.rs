//! `shoal gateway` alone: no raft member, it follows the state from a server, serves
//! inference through the agents, answers readiness, and forwards admin writes.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use serde_json::{Value, json};
use shoal_tests::{ServerCluster, free_addresses, http_client, infer_iris_binary, shoal_binary};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends each bad request to iris through `base` and checks its status and message.
async fn expect_refusals(http: &reqwest::Client, base: &str, refused: &[(Value, u16, &str)]) {
    for (bad, status, says) in refused {
        let answer = http
            .post(format!("{base}/v2/models/iris/infer"))
            .json(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(
            answer.status(),
            *status,
            "a request that should say {says:?}"
        );
        let message: Value = answer.json().await.unwrap();
        assert!(
            message["error"].as_str().unwrap().contains(says),
            "{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_follows_the_state_and_serves_through_agents() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = ServerCluster::start(root.path(), 1);
    let http = http_client(Duration::from_secs(30));
    cluster.leader(&http, Duration::from_secs(20)).await;
    cluster.start_agent(1);
    let model_dir = root.path().join("iris");
    cluster.cli(1, &["model", "demo", "--out", model_dir.to_str().unwrap()]);
    cluster.push(1, &model_dir, "iris");
    cluster.deploy(1, "iris", 1, 1);

    let listen = free_addresses(1).remove(0);
    let gateway = Command::new(shoal_binary())
        .args([
            "gateway",
            "--servers",
            &cluster.http[&1],
            "--listen",
            &listen,
            "--data-dir",
        ])
        .arg(root.path().join("gateway"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.path().join("gateway.stderr")).unwrap())
        .spawn()
        .unwrap();
    // Stopped however the test ends, a failed assertion included.
    let _gateway = KillOnDrop(gateway);
    let base = format!("http://{listen}");
    let started = Instant::now();
    loop {
        if let Ok(answer) = http.get(format!("{base}/v2/health/ready")).send().await
            && answer.status() == 200
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the gateway never became ready: {}",
            std::fs::read_to_string(root.path().join("gateway.stderr")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [[6.3, 3.3, 6.0, 2.5]]}]});
    let answer: Value = http
        .post(format!("{base}/v2/models/iris/infer"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let label = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "label")
        .unwrap();
    assert_eq!(label["data"][0], "virginica");
    // Binary tensor data passes through the gateway to the agent and back.
    let binary = infer_iris_binary(
        &http,
        &format!("{base}/v2/models/iris/infer"),
        &[[6.3, 3.3, 6.0, 2.5], [5.1, 3.5, 1.4, 0.2]],
    )
    .await;
    assert_eq!(binary.labels, ["virginica", "setosa"]);
    assert_eq!(binary.probabilities.len(), 6);

    // The agent keeps to the deadline a gateway passes on with the request: what is left
    // of the caller's (it gave every request a fresh 30 s).
    let deployments = shoal_tests::get_json(&http, &cluster.url(1, "/api/v1/deployments")).await;
    let replica = deployments[0]["replicas"][0]["id"].as_u64().unwrap();
    let agent = format!(
        "http://{}/internal/v1/replicas/{replica}/infer",
        cluster.agent_address(1)
    );
    for (deadline, status) in [("0", 504), ("soon", 400), ("10000", 200)] {
        let answer = http
            .post(&agent)
            .header("x-shoal-timeout-ms", deadline)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            answer.status(),
            status,
            "{deadline}: {:?}",
            answer.text().await
        );
    }

    // The gateway is no raft member: the cluster's status comes from the leader. (It
    // showed an empty picture of a member 0 in term 0.)
    let status = shoal_tests::get_json(&http, &format!("{base}/api/v1/cluster")).await;
    assert_eq!(status["id"], 1, "{status}");
    assert_eq!(status["leader"], 1, "{status}");
    assert_eq!(status["members"][0]["role"], "voter", "{status}");

    // What the router refuses itself has the body every refusal has, in the route's shape.
    let unknown = http
        .get(format!("{base}/api/v1/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let unknown: Value = unknown.json().await.unwrap();
    assert_eq!(unknown["error"]["code"], "not_found", "{unknown}");
    let wrong_method = http
        .get(format!("{base}/v2/models/iris/infer"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "POST");
    let wrong_method: Value = wrong_method.json().await.unwrap();
    assert!(
        wrong_method["error"]
            .as_str()
            .unwrap()
            .contains("does not take that method"),
        "{wrong_method}"
    );

    // The gateway passes requests on unread; the agent refuses bad ones with the same
    // statuses and messages a gateway serving the model itself gives.
    let too_many = vec![[6.3, 3.3, 6.0, 2.5]; 1_025];
    let refused = [
        (
            json!({"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}),
            400,
            "shape",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}], "outputs": [{"name": "logits"}]}),
            400,
            "has no output \"logits\"",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1_025, 4], "datatype": "FP32", "data": too_many}]}),
            413,
            "the limit is 1024",
        ),
        (
            json!({"inputs": "features"}),
            400,
            "malformed infer request",
        ),
    ];
    expect_refusals(&http, &base, &refused).await;

    // A version that exists but no deployment runs: 404, not deployed (no Retry-After,
    // which had clients retry for ever), and serving goes on.
    let second = root.path().join("iris-2");
    cluster.cli(
        1,
        &[
            "model",
            "demo",
            "--out",
            second.to_str().unwrap(),
            "--seed",
            "8",
        ],
    );
    cluster.push(1, &second, "iris");
    let started = Instant::now();
    loop {
        let answer = http
            .post(format!("{base}/v2/models/iris/versions/2/infer"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404);
        assert!(answer.headers().get("retry-after").is_none());
        let message = answer.text().await.unwrap();
        if message.contains("version 2 of iris is not deployed") {
            break;
        }
        // The gateway has not followed the new version yet: an unknown version.
        assert!(started.elapsed() < Duration::from_secs(10), "{message}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = http
        .post(format!("{base}/v2/models/iris/versions/1/infer"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);

    // An admin write through the gateway reaches the leader.
    let scaled = http
        .post(format!("{base}/api/v1/deployments/iris/scale"))
        .json(&json!({"replicas": 2}))
        .send()
        .await
        .unwrap();
    assert!(
        scaled.status().is_success(),
        "{}",
        scaled.text().await.unwrap()
    );

    // With no agent to answer, a bad request is still refused for what is wrong with it.
    cluster.kill_agent(1);
    expect_refusals(&http, &base, &refused).await;
    cluster.stop_all();
}
