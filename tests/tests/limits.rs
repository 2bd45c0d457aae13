//! Limits a gateway enforces: a per-model bound on requests in flight (429 with
//! Retry-After, the rest served), a caller's deadline (504) and rows per request (413),
//! while serving on.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use serde_json::json;
use shoal_tests::Shoal;

fn body() -> serde_json::Value {
    json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_admission_limit_is_429_and_past_the_deadline_is_504() {
    let temp = tempfile::tempdir().unwrap();
    let mut shoal = Shoal::up_with(
        &temp.path().join("data"),
        "limits",
        &["--admission-limit", "2"],
    );
    let client = reqwest::Client::new();
    shoal.wait_ready(&client).await;
    let url = shoal.url("/v2/models/iris/infer");

    let calls: Vec<_> = (0..64)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { client.post(url).json(&body()).send().await.unwrap() })
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    for call in calls {
        let answer = call.await.unwrap();
        match answer.status().as_u16() {
            200 => served += 1,
            429 => {
                assert_eq!(answer.headers()["retry-after"], "1");
                let error: serde_json::Value = answer.json().await.unwrap();
                assert!(error["error"].as_str().unwrap().contains("limit"));
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        served >= 2 && refused >= 1,
        "served {served}, refused {refused}"
    );

    let late = client
        .post(&url)
        .header("x-shoal-timeout-ms", "0")
        .json(&body())
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 504);
    let rows: Vec<[f32; 4]> = vec![[5.1, 3.5, 1.4, 0.2]; 1_025];
    let too_many = json!({"inputs": [{"name": "features", "shape": [rows.len(), 4], "datatype": "FP32", "data": rows}]});
    let refused = client.post(&url).json(&too_many).send().await.unwrap();
    assert_eq!(
        refused.status(),
        413,
        "more rows than one request may carry"
    );
    // Its body was read whole: the connection may carry the next request.
    assert!(refused.headers().get("connection").is_none());
    let served_again = client.post(&url).json(&body()).send().await.unwrap();
    assert_eq!(served_again.status(), 200, "it keeps serving");
    shoal.interrupt();
    assert!(
        shoal
            .wait_exit(std::time::Duration::from_secs(30))
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_routes_answer_413_in_their_shape_for_a_body_over_4_mib() {
    let temp = tempfile::tempdir().unwrap();
    let mut shoal = Shoal::up(&temp.path().join("data"), "openai-413");
    let client = reqwest::Client::new();
    shoal.wait_ready(&client).await;
    // Valid JSON for each route, 5 MiB of it: only its size is wrong.
    let padding = "x".repeat(5 << 20);
    let bodies = [
        (
            "/v1/completions",
            json!({"model": "iris", "prompt": padding}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "iris", "messages": [{"role": "user", "content": padding}]}),
        ),
        ("/v1/embeddings", json!({"model": "iris", "input": padding})),
    ];
    for (path, body) in bodies {
        let answer = client
            .post(shoal.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 413, "{path}");
        let error: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error", "{path}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("over the limit"), "{path}: {message}");
    }
    shoal.interrupt();
    assert!(
        shoal
            .wait_exit(std::time::Duration::from_secs(30))
            .success()
    );
}

/// Regression: a deadline header that was not a number was ignored (the caller got 30 s),
/// and a passed deadline of 0 ms was reported as "no answer within 30 s".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_deadline_header_is_400_and_a_passed_deadline_is_named() {
    let temp = tempfile::tempdir().unwrap();
    let mut shoal = Shoal::up(&temp.path().join("data"), "deadline-header");
    let client = reqwest::Client::new();
    shoal.wait_ready(&client).await;
    let url = shoal.url("/v2/models/iris/infer");
    for value in ["abc", "-5", "1.5", "", "99999999999999999999"] {
        let answer = client
            .post(&url)
            .header("x-shoal-timeout-ms", value)
            .json(&body())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400, "{value:?}");
        let error: serde_json::Value = answer.json().await.unwrap();
        let message = error["error"].as_str().unwrap();
        assert!(
            message.contains("x-shoal-timeout-ms must be a whole number of milliseconds"),
            "{value:?}: {message}"
        );
    }
    let late = client
        .post(&url)
        .header("x-shoal-timeout-ms", "0")
        .json(&body())
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 504);
    let error: serde_json::Value = late.json().await.unwrap();
    assert_eq!(error["error"], "no answer within 0 ms");
    let served = client
        .post(&url)
        .header("x-shoal-timeout-ms", " 5000 ")
        .json(&body())
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200, "a whole number is a deadline");
    shoal.interrupt();
    assert!(
        shoal
            .wait_exit(std::time::Duration::from_secs(30))
            .success()
    );
}
