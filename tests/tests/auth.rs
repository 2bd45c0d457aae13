//! Scoped bearer tokens on a real `shoal server`: 401 without, 403 with the wrong scope,
//! the right scope through, open health checks, forwarded writes keep their credentials,
//! and no exposed listener without tokens.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use shoal_tests::{ServerCluster, http_client, shoal_binary};
use std::time::Duration;

const ADMIN: &str = "shoal_admin_token_for_tests";
const INFER: &str = "shoal_infer_token_for_tests";

fn hash(token: &str) -> String {
    let output = std::process::Command::new(shoal_binary())
        .args(["token", "hash", token])
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_gate_each_route_by_scope_and_survive_forwarding() {
    let root = tempfile::tempdir().unwrap();
    let tokens_file = root.path().join("tokens");
    std::fs::write(
        &tokens_file,
        format!(
            "# test tokens\nadmin {}\ninfer {}\n",
            hash(ADMIN),
            hash(INFER)
        ),
    )
    .unwrap();
    let cluster = ServerCluster::start_with(
        root.path(),
        3,
        &["--tokens", tokens_file.to_str().unwrap()],
        &[("SHOAL_TOKEN", ADMIN)],
    );
    let http = http_client(Duration::from_secs(5));
    // Health stays open for probes; wait for a leader through it.
    let leader = cluster.leader(&http, Duration::from_secs(20)).await;
    let follower = cluster.live().into_iter().find(|&id| id != leader).unwrap();

    let models = cluster.url(follower, "/api/v1/models");
    let missing = http.get(&models).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert!(
        missing.headers().contains_key("x-request-id"),
        "a refused request has a request id too"
    );
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let wrong = http
        .get(&models)
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let scope = http.get(&models).bearer_auth(INFER).send().await.unwrap();
    assert_eq!(scope.status(), 403);
    let admin = http.get(&models).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(admin.status(), 200);

    // The infer scope reaches inference routes (here: an unknown model, so 404, not 401).
    let infer_url = cluster.url(follower, "/v2/models/nothing/infer");
    let body = serde_json::json!({"inputs": []});
    assert_eq!(
        http.post(&infer_url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let allowed = http
        .post(&infer_url)
        .bearer_auth(INFER)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 404);
    // An OpenAI-compatible route refuses in OpenAI's envelope, as its other errors are.
    let openai = http
        .post(cluster.url(follower, "/v1/embeddings"))
        .json(&serde_json::json!({"model": "nothing", "input": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(openai.status(), 401);
    assert_eq!(openai.headers()["www-authenticate"], "Bearer");
    let openai: serde_json::Value = openai.json().await.unwrap();
    assert_eq!(openai["error"]["type"], "authentication_error", "{openai}");
    assert_eq!(
        http.get(cluster.url(follower, "/v2/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A write on a follower is forwarded with the caller's token: it works with admin,
    // and the leader refuses it with infer.
    let alias = cluster.url(follower, "/api/v1/models/absent/aliases/a");
    let refused = http
        .put(&alias)
        .bearer_auth(INFER)
        .json(&serde_json::json!({"version": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let forwarded = http
        .put(&alias)
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"version": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        forwarded.status(),
        404,
        "reached the leader, which knows no such model"
    );

    // The CLI takes the token from SHOAL_TOKEN; without it it is refused.
    let cli = |token: Option<&str>| {
        let mut command = std::process::Command::new(shoal_binary());
        command
            .args(["cluster", "status", "--addr"])
            .arg(format!("http://{}", cluster.http[&follower]))
            .env_remove("SHOAL_TOKEN");
        if let Some(token) = token {
            command.env("SHOAL_TOKEN", token);
        }
        command.output().unwrap()
    };
    let refused = cli(None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    assert!(cli(Some(ADMIN)).status.success());

    // Every server registered its address, through forwarding, with its own token.
    let started = std::time::Instant::now();
    loop {
        let status: serde_json::Value = http
            .get(cluster.url(leader, "/api/v1/cluster"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["servers"].as_object().map(serde_json::Map::len) == Some(3) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "servers never registered: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_server_refuses_an_exposed_listener_without_tokens() {
    let root = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(shoal_binary())
        .args([
            "server",
            "--id",
            "1",
            "--peers",
            "1=127.0.0.1:1",
            "--raft-listen",
            "127.0.0.1:0",
        ])
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(root.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("without tokens") && message.contains("--insecure"),
        "{message}"
    );
    assert!(!root.path().join("data").exists(), "nothing was created");
}
