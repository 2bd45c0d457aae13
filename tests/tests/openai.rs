//! OpenAI-compatible routes on a real cluster: a real all-MiniLM-L6-v2 pushed to a server,
//! served by an agent, asked through `/v1/embeddings`; the cosines of sentence pairs match
//! the independent reference the actors crate keeps. Errors use OpenAI's envelope. A
//! completion for a deployment scaled to zero is held until a replica is back.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use serde_json::{Value, json};
use shoal_tests::{ServerCluster, http_client, post_until_ok, write_model_dir};
use std::time::{Duration, Instant};

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_embeddings_through_the_cluster_match_the_reference() {
    let files = shoal_actors::fixtures::minilm_files().expect("MiniLM from its PyPI wheel");
    let root = tempfile::tempdir().unwrap();
    let model_dir = root.path().join("minilm");
    write_model_dir(&model_dir, &files);
    let mut cluster = ServerCluster::start(root.path(), 1);
    let http = http_client(Duration::from_secs(60));
    cluster.leader(&http, Duration::from_secs(20)).await;
    cluster.start_agent(1);
    cluster.push(1, &model_dir, "minilm");
    cluster.deploy(1, "minilm", 1, 1);

    let reference: Value = serde_json::from_str(include_str!(
        "../../actors/tests/reference/minilm_reference.json"
    ))
    .unwrap();
    let sentences: Vec<String> = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_str()
                .map_or_else(|| s["text"].as_str().unwrap().to_string(), str::to_string)
        })
        .collect();
    let url = cluster.url(1, "/v1/embeddings");
    let body = json!({"model": "minilm", "input": sentences});
    let answer = shoal_tests::post_until_ok(&http, &url, &body, Duration::from_secs(60)).await;
    assert_eq!(answer["object"], "list");
    let vectors: Vec<Vec<f64>> = answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            item["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vectors.len(), sentences.len());
    assert!(vectors.iter().all(|v| v.len() == 384));
    for pair in reference["pairs"].as_array().unwrap() {
        let (a, b) = (
            pair["a"].as_u64().unwrap() as usize,
            pair["b"].as_u64().unwrap() as usize,
        );
        let expected = pair["cosine"].as_f64().unwrap();
        let got = cosine(&vectors[a], &vectors[b]);
        assert!(
            (got - expected).abs() < 1e-3,
            "pair {a}-{b}: {got} vs reference {expected}"
        );
    }

    let models = shoal_tests::get_json(&http, &cluster.url(1, "/v1/models")).await;
    assert_eq!(models["data"][0]["id"], "minilm");
    let unknown = http
        .post(&url)
        .json(&json!({"model": "nope", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let bad = http
        .post(&url)
        .json(&json!({"model": "minilm", "input": [1, 2]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    cluster.stop_all();
}

/// Reads a server-sent event stream to its end; returns the `data:` payloads.
async fn events(answer: reqwest::Response) -> Vec<String> {
    let text = answer.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_stream_the_same_tokens_they_answer_whole() {
    let files = shoal_actors::fixtures::tiny_llama(&shoal_actors::fixtures::TinyLlama::for_tests())
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let model_dir = root.path().join("llama");
    write_model_dir(&model_dir, &files);
    // Three servers: a completion held for a scale-up reaches the leader from a follower.
    let mut cluster = ServerCluster::start(root.path(), 3);
    let http = http_client(Duration::from_secs(60));
    let leader = cluster.leader(&http, Duration::from_secs(20)).await;
    cluster.start_agent(1);
    cluster.push(1, &model_dir, "tiny");
    cluster.deploy(1, "tiny", 1, 1);

    let url = cluster.url(1, "/v1/completions");
    let request = json!({"model": "tiny", "prompt": "hello", "max_tokens": 8});
    let started = Instant::now();
    let whole: Value = loop {
        let answer = http.post(&url).json(&request).send().await.unwrap();
        if answer.status() == 200 {
            break answer.json().await.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never served: {}",
            answer.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(whole["object"], "text_completion");
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    assert_eq!(
        whole["choices"][0]["finish_reason"], "length",
        "8 tokens asked, 8 given"
    );

    // Streamed: chunks as tokens come, then [DONE]; greedy decoding gives the same text.
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let answer = http.post(&url).json(&streaming).send().await.unwrap();
    assert_eq!(answer.headers()["content-type"], "text/event-stream");
    let data = events(answer).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks.len() >= 8,
        "one chunk per token at least: {}",
        chunks.len()
    );
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);

    // Chat shape, streamed.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": true});
    let data = events(
        http.post(cluster.url(1, "/v1/chat/completions"))
            .json(&chat)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");

    // The same model over the Open Inference Protocol: BYTES prompts in, BYTES text out.
    let oip = json!({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["hello", "hi"]}]});
    let answer: Value = http
        .post(cluster.url(1, "/v2/models/tiny/infer"))
        .json(&oip)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["outputs"][0]["datatype"], "BYTES", "{answer}");
    assert_eq!(answer["outputs"][0]["shape"], json!([2]));

    // The same weights as llama.cpp's converter writes them (its tensor names and row
    // order, in GGUF), pushed as a model of their own: the same greedy completion.
    let cpp_dir = root.path().join("llama-cpp");
    let cpp =
        shoal_actors::fixtures::as_llama_cpp_gguf(&files, shoal_actors::fixtures::GgufStorage::F32)
            .unwrap();
    write_model_dir(&cpp_dir, &cpp);
    cluster.push(1, &cpp_dir, "tiny-cpp");
    cluster.deploy(1, "tiny-cpp", 1, 1);
    let request_cpp = json!({"model": "tiny-cpp", "prompt": "hello", "max_tokens": 8});
    let from_cpp = post_until_ok(&http, &url, &request_cpp, Duration::from_secs(60)).await;
    assert_eq!(from_cpp["choices"][0]["text"].as_str(), Some(text.as_str()));

    // Bad input in OpenAI's envelope.
    let bad = http
        .post(&url)
        .json(&json!({"model": "tiny", "prompt": "x", "max_tokens": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // The caller's deadline reaches the agent: with a millisecond left, the generation is
    // cut short with a 504, not run for the agent's own 30 s.
    let rushed = http
        .post(&url)
        .header("x-shoal-timeout-ms", "1")
        .json(&json!({"model": "tiny", "prompt": "hello", "max_tokens": 64}))
        .send()
        .await
        .unwrap();
    assert_eq!(rushed.status(), 504);
    let body: Value = rushed.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline"),
        "{body}"
    );

    // Idle, it scales to zero; a streamed completion sent to a follower is then held (by
    // the leader, whose autoscaler counts it) until a replica is back, and streams the
    // same tokens.
    cluster.apply_deployment(
        1,
        "tiny",
        "name = \"tiny\"\nmodel = \"tiny\"\nversion = 1\nreplicas = 1\n\
         [autoscale]\nmin = 0\nmax = 1\ntarget_ongoing_requests = 1\n\
         upscale_delay_ms = 0\ndownscale_delay_ms = 500\nscale_to_zero_after_ms = 1000\n",
    );
    let started = Instant::now();
    while cluster.replicas_wanted(&http, 1).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never scaled to zero"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let answer = http
        .post(cluster.url(follower, "/v1/completions"))
        .json(&streaming)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "text/event-stream");
    let data = events(answer).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, text);
    cluster.stop_all();
}
