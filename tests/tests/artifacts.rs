//! Pushing a model version to a 3-server control plane: files streamed by digest, each
//! durable on a majority before the version is acknowledged, surviving the loss of a
//! server; bad uploads leave nothing behind; only data formats are accepted.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use shoal_tests::{ServerCluster, http_client, sha256_hex, shoal_binary};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// A valid safetensors file with one F32 tensor of four zeros.
fn safetensors() -> Vec<u8> {
    let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 16]);
    bytes
}

/// Pushes `dir` as a version of `name` in the `raw` format: these tests' files are data,
/// not a model any runtime loads.
fn push(cluster: &ServerCluster, via: u64, dir: &Path, name: &str) -> std::process::Output {
    std::process::Command::new(shoal_binary())
        .args(["model", "push"])
        .arg(dir)
        .args([
            "--format",
            "raw",
            "--name",
            name,
            "--addr",
            &format!("http://{}", cluster.http[&via]),
        ])
        .output()
        .unwrap()
}

async fn holders(cluster: &ServerCluster, http: &reqwest::Client, digest: &str) -> usize {
    let mut count = 0;
    for id in cluster.live() {
        let url = cluster.url(id, &format!("/api/v1/blobs/{digest}"));
        if let Ok(answer) = http.get(url).send().await
            && answer.status() == 200
            && sha256_hex(&answer.bytes().await.unwrap()) == digest
        {
            count += 1;
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_version_is_durable_on_a_majority_and_survives_losing_a_server() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = ServerCluster::start(root.path(), 3);
    let http = http_client(Duration::from_secs(10));
    let leader = cluster.leader(&http, Duration::from_secs(20)).await;
    let follower = cluster.live().into_iter().find(|&id| id != leader).unwrap();

    let model = root.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("weights.safetensors"), safetensors()).unwrap();
    std::fs::write(model.join("meta.json"), br#"{"note": "test model"}"#).unwrap();
    let pushed = push(&cluster, follower, &model, "pushed");
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    assert!(String::from_utf8_lossy(&pushed.stdout).contains("pushed version 1 (new)"));
    let progress = String::from_utf8_lossy(&pushed.stderr);
    assert!(
        progress.contains("uploaded weights.safetensors"),
        "plain lines off a terminal: {progress}"
    );

    let weights = sha256_hex(&safetensors());
    assert!(
        holders(&cluster, &http, &weights).await >= 2,
        "on a majority"
    );
    // Pushing the same files again is the same version: content addressed.
    let again = push(&cluster, leader, &model, "pushed");
    assert!(String::from_utf8_lossy(&again.stdout).contains("pushed version 1 (existing)"));

    // Lose any one server: the version is still listed and its files still served.
    cluster.kill(leader);
    let survivor = cluster.leader(&http, Duration::from_secs(20)).await;
    assert!(holders(&cluster, &http, &weights).await >= 1);
    let models = shoal_tests::get_json(&http, &cluster.url(survivor, "/api/v1/models")).await;
    assert!(
        models
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["model"] == "pushed")
    );
    cluster.start_member(leader);
    cluster.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_and_code_are_refused_and_leave_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let cluster = ServerCluster::start(root.path(), 3);
    let http = http_client(Duration::from_secs(10));
    let leader = cluster.leader(&http, Duration::from_secs(20)).await;

    // Content that does not hash to the digest it claims.
    let claimed = sha256_hex(b"what it should be");
    let wrong = http
        .put(cluster.url(leader, &format!("/api/v1/blobs/{claimed}")))
        .body("something else")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 400);
    assert!(wrong.text().await.unwrap().contains("hashes to"));
    assert_eq!(holders(&cluster, &http, &claimed).await, 0);

    // An upload that breaks off half way.
    let whole = vec![7u8; 64 << 10];
    let digest = sha256_hex(&whole);
    let mut socket = std::net::TcpStream::connect(&cluster.http[&leader]).unwrap();
    write!(
        socket,
        "PUT /api/v1/blobs/{digest} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        whole.len()
    )
    .unwrap();
    socket.write_all(&whole[..1000]).unwrap();
    drop(socket);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        holders(&cluster, &http, &digest).await,
        0,
        "a truncated upload is not stored"
    );
    let registration = http
        .post(cluster.url(leader, "/api/v1/models/broken/versions"))
        .json(&serde_json::json!({"format": "raw", "files": [{"name": "data.txt", "digest": digest}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        registration.status(),
        400,
        "a version of a missing blob is not registered"
    );

    // Code is not a model file; a symlink out of the model is not followed.
    let model = root.path().join("with-code");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("weights.safetensors"), safetensors()).unwrap();
    std::fs::write(model.join("model.py"), b"import os\nos.system('true')\n").unwrap();
    let refused = push(&cluster, leader, &model, "with-code");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("only data formats"));
    let escaping = root.path().join("escaping");
    std::fs::create_dir(&escaping).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", escaping.join("config.json")).unwrap();
    let refused = push(&cluster, leader, &escaping, "escaping");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("points outside"));
    let models = shoal_tests::get_json(&http, &cluster.url(leader, "/api/v1/models")).await;
    assert_eq!(models, serde_json::json!([]), "nothing was registered");
}

/// Regression: `shoal up` registered the demo's files in one order and `shoal model push`
/// of the same files listed them in another: 409 "same manifest digest and other
/// contents". The same files are the same version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_pushed_to_a_fresh_shoal_up_is_its_existing_version() {
    let temp = tempfile::tempdir().unwrap();
    let mut shoal = shoal_tests::Shoal::up(&temp.path().join("data"), "demo-push");
    shoal
        .wait_ready(&http_client(Duration::from_secs(30)))
        .await;
    let fresh = temp.path().join("fresh");
    let cli = |args: &[&std::ffi::OsStr]| {
        let output = std::process::Command::new(shoal_binary())
            .args(args)
            .env("SHOAL_ADDR", &shoal.base_url)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    cli(&[
        "model".as_ref(),
        "demo".as_ref(),
        "--out".as_ref(),
        fresh.as_os_str(),
    ]);
    let pushed = cli(&[
        "model".as_ref(),
        "push".as_ref(),
        fresh.as_os_str(),
        "--name".as_ref(),
        "iris".as_ref(),
    ]);
    assert_eq!(pushed.trim(), "iris version 1 (existing)");
    shoal.interrupt();
    assert!(shoal.wait_exit(Duration::from_secs(30)).success());
}
