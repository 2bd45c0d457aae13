//! A model's lifecycle end to end on `shoal up`: a version trained from a CSV with
//! `shoal model train`, a smaller one made from it with `shoal model optimise`, both
//! served side by side, and what each says of where it came from.

use serde_json::{Value, json};
use shoal_tests::Shoal;
use std::path::Path;
use std::time::Duration;

/// The Iris data set the demo trains on, as `shoal model train` reads it.
fn iris_csv() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../actors/data/iris.csv")
}

/// Every row of the data set: its features and its species.
fn iris_rows() -> (Vec<[f32; 4]>, Vec<String>) {
    let text = std::fs::read_to_string(iris_csv()).expect("the Iris CSV");
    text.lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let mut features = [0f32; 4];
            for (slot, field) in features.iter_mut().zip(&fields) {
                *slot = field.parse().expect("a number");
            }
            (features, fields[4].to_string())
        })
        .unzip()
}

/// The labels `version` of iris gives `rows`, once a replica of it serves.
async fn labels(
    client: &reqwest::Client,
    shoal: &Shoal,
    version: u64,
    rows: &[[f32; 4]],
) -> Vec<String> {
    let body = json!({
        "inputs": [{"name": "features", "shape": [rows.len(), 4], "datatype": "FP32", "data": rows}],
        "outputs": [{"name": "label"}],
    });
    let url = shoal.url(&format!("/v2/models/iris/versions/{version}/infer"));
    let answer = shoal_tests::post_until_ok(client, &url, &body, Duration::from_secs(30)).await;
    serde_json::from_value(answer["outputs"][0]["data"].clone()).expect("labels")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trained_version_and_one_optimised_from_it_serve_and_name_their_parents() {
    let client = shoal_tests::http_client(Duration::from_secs(30));
    let temp = tempfile::tempdir().unwrap();
    let mut shoal = Shoal::up(&temp.path().join("data"), "lifecycle");
    shoal.wait_ready(&client).await;
    let csv = iris_csv();
    let csv = csv.to_str().unwrap();

    // Trained here with a fifth of the rows held out and scored: version 2, after the demo.
    let trained: Value = serde_json::from_str(&shoal.cli(&[
        "model", "train", "iris", "--data", csv, "--hidden", "64,64", "-o", "json",
    ]))
    .unwrap();
    assert_eq!(
        (trained["version"].as_u64(), trained["created"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(
        (trained["rows"].as_u64(), trained["holdout_rows"].as_u64()),
        (Some(120), Some(30))
    );
    let held_out = trained["holdout_accuracy"].as_f64().unwrap();
    assert!(held_out >= 0.8, "held-out accuracy {held_out}");

    // Another version trained after it (3) and kept on disk, so that the newest is not
    // the one optimised from.
    let dir = temp.path().join("trained");
    let dir = dir.to_str().unwrap();
    let again = shoal.cli(&[
        "model", "train", "iris", "--data", csv, "--seed", "9", "--out", dir,
    ]);
    assert!(again.contains("iris version 3 (new)"), "{again}");
    let refused = shoal.cli_failing(&["model", "train", "iris", "--data", csv, "--out", dir]);
    assert!(refused.contains("not empty"), "{refused}");

    // Pruned and quantized from version 2, and checked against it on the data set before
    // it is pushed: version 4, a GGUF file under half the size.
    let from_2 = [
        "model",
        "optimise",
        "iris",
        "--version",
        "2",
        "--check-data",
        csv,
    ];
    let optimised: Value = serde_json::from_str(
        &shoal.cli(
            &[
                &from_2[..],
                &[
                    "--prune",
                    "0.3",
                    "--quantize",
                    "q8_0",
                    "--min-agreement",
                    "0.9",
                    "-o",
                    "json",
                ],
            ]
            .concat(),
        ),
    )
    .unwrap();
    let check = &optimised["check"];
    assert_eq!(check["rows"].as_u64(), Some(150), "{optimised}");
    assert!(check["agreement"].as_f64().unwrap() >= 0.9, "{check}");
    // Nearly every weight gone: it no longer labels as its parent does, and is not pushed.
    let refused =
        shoal.cli_failing(&[&from_2[..], &["--prune", "0.97", "--min-agreement", "1"]].concat());
    assert!(refused.contains("not pushed"), "{refused}");
    assert_eq!(
        (
            optimised["version"].as_u64(),
            optimised["from_version"].as_u64()
        ),
        (Some(4), Some(2))
    );
    assert_eq!(optimised["format"], "gguf");
    let (before, after) = (
        optimised["weights_bytes_before"].as_u64().unwrap(),
        optimised["weights_bytes_after"].as_u64().unwrap(),
    );
    assert!(after * 2 < before, "{before} -> {after} bytes");
    let stored: Vec<&str> = optimised["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["stored_as"].as_str().unwrap())
        .collect();
    assert_eq!(
        stored,
        ["f32", "q8_0", "q8_0"],
        "rows of 4 are no whole block of 32"
    );

    // What would change nothing, or come from nowhere, is refused and adds no version.
    let refused = shoal.cli_failing(&[
        "model",
        "optimise",
        "iris",
        "--version",
        "1",
        "--quantize",
        "q8_0",
    ]);
    assert!(refused.contains("would change nothing"), "{refused}");
    let refused = shoal.cli_failing(&["model", "push", dir, "--name", "iris", "--parent", "9"]);
    assert!(refused.contains("no version 9"), "{refused}");
    let shown = shoal.cli(&["model", "show", "iris"]);
    let line = |version: u32| {
        shown
            .lines()
            .find(|line| line.starts_with(&format!("iris version {version}: ")))
            .unwrap_or_else(|| panic!("no version {version} in {shown}"))
    };
    assert!(!line(1).contains("from version"), "{shown}");
    assert!(line(2).contains("from version 1,"), "{shown}");
    assert!(line(3).contains("from version 2,"), "{shown}");
    assert!(
        line(4).contains("from version 2,"),
        "made from 2, not the newest: {shown}"
    );
    assert!(!shown.contains("iris version 5"), "{shown}");

    // Both serve, side by side, and the optimised version labels the data set as its parent
    // does, nearly everywhere.
    let spec = temp.path().join("iris.toml");
    std::fs::write(
        &spec,
        "name = \"iris\"\nmodel = \"iris\"\nreplicas = 2\nsplit = [{version = 2, weight = 50}, {version = 4, weight = 50}]\n",
    )
    .unwrap();
    shoal.cli(&["deploy", "apply", "-f", spec.to_str().unwrap()]);
    let (rows, species) = iris_rows();
    let parent = labels(&client, &shoal, 2, &rows).await;
    let child = labels(&client, &shoal, 4, &rows).await;
    let agree = parent.iter().zip(&child).filter(|(a, b)| a == b).count();
    assert!(
        agree * 100 >= rows.len() * 95,
        "{agree} of {} labels agree",
        rows.len()
    );
    let right = child.iter().zip(&species).filter(|(a, b)| a == b).count();
    assert!(
        right * 100 >= rows.len() * 90,
        "{right} of {} right",
        rows.len()
    );

    shoal.interrupt();
    assert!(shoal.wait_exit(Duration::from_secs(30)).success());
}
