//! Shard tests: a llama model split into stages gives the unsplit result, in process and
//! with a stage on the far side of a TCP data-plane connection.

use super::*;
use crate::fixtures::{TinyLlama, tiny_llama};
use crate::runtime::{CONFIG_FILE, LlamaRuntime, TOKENIZER_FILE, WEIGHTS_FILE, WeightsFile};

/// A 4-layer test model, so it splits into several stages.
fn model() -> LlamaRuntime {
    let files = tiny_llama(&TinyLlama {
        layers: 4,
        ..TinyLlama::for_tests()
    })
    .unwrap();
    LlamaRuntime::load(
        &files[CONFIG_FILE],
        WeightsFile::Safetensors(&files[WEIGHTS_FILE]),
        &files[TOKENIZER_FILE],
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

fn values(activation: Activation) -> Vec<f32> {
    match activation {
        Activation::Hidden { values, .. } => values,
        Activation::Tokens(_) => panic!("expected logits"),
    }
}

fn assert_close(sharded: &[f32], whole: &[f32]) {
    assert_eq!(sharded.len(), whole.len());
    let worst = sharded
        .iter()
        .zip(whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-5, "sharded differs from unsharded by {worst}");
}

#[tokio::test]
async fn a_model_in_three_in_process_stages_equals_the_whole_model() {
    let model = model();
    let compute = ComputePool::new(2).unwrap();
    let stages: Vec<Arc<dyn Stage>> = vec![
        Arc::new(model.stage(0..1).unwrap()),
        Arc::new(model.stage(1..3).unwrap()),
        Arc::new(model.stage(3..4).unwrap()),
    ];
    let pipeline = Pipeline::start(stages, None, &compute).await.unwrap();
    // Several requests in flight at once overlap across stages and keep their order.
    let prompts = ["one prompt", "another, longer prompt", "x"];
    let calls: Vec<_> = prompts
        .iter()
        .map(|prompt| pipeline.forward(Activation::Tokens(model.encode(prompt).unwrap())))
        .collect();
    for (prompt, call) in prompts.iter().zip(calls) {
        let sharded = values(call.await.unwrap());
        let whole: Vec<f32> = model
            .forward_full(&model.encode(prompt).unwrap())
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_close(&sharded, &whole);
    }
}

#[tokio::test]
async fn a_stage_on_another_host_over_tcp_gives_the_same_result() {
    let model = model();
    let compute = ComputePool::new(2).unwrap();
    // "Host B" serves the last two layers on a data-plane port.
    let far = Pipeline::start(vec![Arc::new(model.stage(2..4).unwrap())], None, &compute)
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(listener, far.entry().unwrap().clone()));
    // "Host A" runs the first two and hands on over TCP.
    let near = Pipeline::start(
        vec![Arc::new(model.stage(0..2).unwrap())],
        Some(RemoteStage::new(address)),
        &compute,
    )
    .await
    .unwrap();
    for prompt in ["across hosts", "again, on the same connection"] {
        let tokens = model.encode(prompt).unwrap();
        let sharded = values(
            near.forward(Activation::Tokens(tokens.clone()))
                .await
                .unwrap(),
        );
        let whole: Vec<f32> = model.forward_full(&tokens).unwrap().to_vec1().unwrap();
        assert_close(&sharded, &whole);
    }
    server.abort();
}

#[tokio::test]
async fn a_stage_error_reaches_the_caller_across_the_wire() {
    let model = model();
    let compute = ComputePool::new(1).unwrap();
    let far = Pipeline::start(vec![Arc::new(model.stage(2..4).unwrap())], None, &compute)
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(listener, far.entry().unwrap().clone()));
    let remote = RemoteStage::new(address);
    // A middle stage given tokens instead of hidden states refuses them.
    let answer = remote.forward(Activation::Tokens(vec![1, 2, 3])).await;
    assert!(matches!(answer, Err(ShardError::Stage(message)) if message.contains("wrong kind")));
    server.abort();
}

#[tokio::test]
async fn an_unreachable_remote_stage_is_a_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let remote = RemoteStage::new(address);
    assert!(matches!(
        remote.forward(Activation::Tokens(vec![1])).await,
        Err(ShardError::Transport(_))
    ));
}
