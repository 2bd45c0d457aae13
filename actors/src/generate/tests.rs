//! Continuous batching tests on a small seeded llama model: joining mid-flight, streaming,
//! bounds, cancellation and deadlines.

use super::*;
use crate::fixtures::{TinyLlama, tiny_llama};
use crate::runtime::{CONFIG_FILE, LlamaRuntime, TOKENIZER_FILE, WEIGHTS_FILE, WeightsFile};
use std::time::Duration;

fn model(shape: &TinyLlama) -> Arc<LlamaRuntime> {
    let files = tiny_llama(shape).unwrap();
    Arc::new(
        LlamaRuntime::load(
            &files[CONFIG_FILE],
            WeightsFile::Safetensors(&files[WEIGHTS_FILE]),
            &files[TOKENIZER_FILE],
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    )
}

/// The test model without an end token, so every sequence runs to its token limit.
fn endless() -> Arc<LlamaRuntime> {
    model(&TinyLlama {
        with_end_token: false,
        ..TinyLlama::for_tests()
    })
}

fn config(running_max: usize, queue_capacity: usize) -> GenerationConfig {
    GenerationConfig {
        running_max,
        queue_capacity,
        new_tokens_limit: 64,
        model: "tiny-llama".into(),
        version: 1,
    }
}

fn request(prompt: &str, max_new_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.into(),
        max_new_tokens: Some(max_new_tokens),
        deadline: Instant::now() + Duration::from_secs(60),
    }
}

fn pool() -> ComputePool {
    ComputePool::new(1).unwrap()
}

#[tokio::test]
async fn a_sequence_joining_mid_flight_gets_the_same_tokens_as_when_run_alone() {
    let model = endless();
    let (handle, _task) = spawn(Arc::clone(&model), config(8, 8), pool());
    let long_alone = handle.complete(&request("the long one", 24)).await.unwrap();
    let short_alone = handle.complete(&request("a late joiner", 8)).await.unwrap();

    let mut long = handle.submit(&request("the long one", 24)).unwrap();
    let mut long_tokens = Vec::new();
    for _ in 0..5 {
        long_tokens.push(long.next().await.unwrap().unwrap().token);
    }
    // The long sequence is mid-flight: the joiner starts while it runs.
    let short = handle.submit(&request("a late joiner", 8)).unwrap();
    let short_together = short.collect().await.unwrap();
    while let Some(piece) = long.next().await {
        long_tokens.push(piece.unwrap().token);
    }
    assert_eq!(short_together, short_alone);
    assert_eq!(long_tokens, long_alone.tokens);
    assert_eq!(long.finish(), Some(FinishReason::Length));
    let stats = *handle.stats().borrow();
    assert!(
        stats.step_sequences_max >= 2,
        "the two ran in one batch: {stats:?}"
    );
}

#[tokio::test]
async fn many_concurrent_sequences_each_get_their_solo_tokens() {
    let model = endless();
    let (handle, _task) = spawn(Arc::clone(&model), config(16, 32), pool());
    let prompts: Vec<String> = (0..6).map(|i| format!("prompt number {i}")).collect();
    let mut alone = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        alone.push(handle.complete(&request(prompt, 4 + i)).await.unwrap());
    }
    let streams: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| handle.submit(&request(prompt, 4 + i)).unwrap())
        .collect();
    for (stream, alone) in streams.into_iter().zip(alone) {
        assert_eq!(stream.collect().await.unwrap(), alone);
    }
    assert!(handle.stats().borrow().step_sequences_max >= 5);
}

#[tokio::test]
async fn tokens_stream_one_by_one_and_the_text_is_their_concatenation() {
    let model = endless();
    let (handle, _task) = spawn(Arc::clone(&model), config(4, 4), pool());
    let mut stream = handle.submit(&request("hello", 6)).unwrap();
    let mut pieces = Vec::new();
    while let Some(piece) = stream.next().await {
        pieces.push(piece.unwrap());
    }
    assert_eq!(pieces.len(), 6);
    let tokens: Vec<u32> = pieces.iter().map(|p| p.token).collect();
    let text: String = pieces.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(text, model.decode_text(&tokens).unwrap());
    assert_eq!(stream.finish(), Some(FinishReason::Length));
}

#[tokio::test]
async fn a_full_queue_answers_overloaded() {
    let (handle, _task) = spawn(endless(), config(1, 2), pool());
    // On this single-threaded runtime the batcher cannot take anything off the queue
    // until the test yields, so the third request finds it full.
    let first = handle.submit(&request("one", 2)).unwrap();
    let second = handle.submit(&request("two", 2)).unwrap();
    assert!(matches!(
        handle.submit(&request("three", 2)),
        Err(GenerateError::Overloaded)
    ));
    assert!(first.collect().await.is_ok());
    assert!(second.collect().await.is_ok());
}

#[tokio::test]
async fn a_cancelled_request_leaves_the_running_batch_and_the_queue() {
    let (handle, _task) = spawn(endless(), config(1, 4), pool());
    let mut running = handle.submit(&request("keeps going", 60)).unwrap();
    running.next().await.unwrap().unwrap();
    // Queued behind it (the batch holds one), then abandoned before it starts.
    let queued = handle.submit(&request("never starts", 60)).unwrap();
    drop(queued);
    drop(running);
    let mut stats = handle.stats();
    let stats = *tokio::time::timeout(
        Duration::from_secs(30),
        stats.wait_for(|s| s.cancelled_total == 2 && s.running == 0),
    )
    .await
    .expect("both cancellations are noticed")
    .unwrap();
    assert_eq!(
        stats.started_total, 1,
        "the abandoned request never started"
    );
    assert!(
        stats.steps_total < 60,
        "the cancelled sequence stopped early: {stats:?}"
    );
    // The batcher still serves.
    assert!(handle.complete(&request("after", 3)).await.is_ok());
}

#[tokio::test]
async fn a_request_past_its_deadline_is_answered_deadline_exceeded() {
    let (handle, _task) = spawn(endless(), config(4, 4), pool());
    let expired = GenerationRequest {
        deadline: Instant::now() - Duration::from_millis(1),
        ..request("too late", 8)
    };
    assert_eq!(
        handle.complete(&expired).await,
        Err(GenerateError::DeadlineExceeded)
    );
}

#[tokio::test]
async fn draining_finishes_running_sequences_and_refuses_new_ones() {
    let (handle, task) = spawn(endless(), config(4, 4), pool());
    let stream = handle.submit(&request("finish me", 10)).unwrap();
    let drained = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.drain().await })
    };
    let completion = stream.collect().await.unwrap();
    assert_eq!(completion.tokens.len(), 10);
    drained.await.unwrap();
    task.await.unwrap();
    assert!(matches!(
        handle.submit(&request("too late", 2)),
        Err(GenerateError::Draining)
    ));
}

#[tokio::test]
async fn a_sequence_that_produces_the_end_token_stops_there() {
    let model = model(&TinyLlama::for_tests());
    let end = model.eos_token().unwrap();
    let (handle, _task) = spawn(Arc::clone(&model), config(8, 64), pool());
    // Try prompts until one ends early; with seeded weights this is deterministic.
    let mut ended = None;
    for i in 0..40 {
        let completion = handle
            .complete(&request(&format!("p{i}"), 64))
            .await
            .unwrap();
        assert!(
            !completion.tokens.contains(&end),
            "the end token is not streamed"
        );
        if completion.finish == FinishReason::EndToken {
            ended = Some(completion);
            break;
        }
    }
    assert!(ended.is_some(), "some prompt reaches the end token");
}

#[tokio::test]
async fn a_prompt_that_fills_the_context_is_refused_at_once() {
    let (handle, _task) = spawn(endless(), config(4, 4), pool());
    let too_long = "x".repeat(TinyLlama::for_tests().max_positions);
    assert!(matches!(
        handle.submit(&request(&too_long, 4)),
        Err(GenerateError::Prompt(message)) if message.contains("holds")
    ));
}
