//! Explaining a prediction end to end: `shoal up` serving the trained iris classifier,
//! `POST /v2/models/iris/explain` and `shoal explain`. Every figure an explanation gives
//! is checked against plain inference on the same `shoal up`.

use serde_json::{Value, json};
use shoal_tests::Shoal;
use std::time::Duration;

const ROW: [f32; 4] = [6.3, 3.3, 6.0, 2.5];
const BASELINE: [f32; 4] = [5.8, 3.0, 3.8, 1.2];

async fn post(client: &reqwest::Client, shoal: &Shoal, path: &str, body: &Value) -> (u16, Value) {
    let answer = client
        .post(shoal.url(path))
        .json(body)
        .send()
        .await
        .expect("the request is sent");
    let status = answer.status().as_u16();
    (status, answer.json().await.expect("a JSON answer"))
}

/// iris's probabilities for each of `rows`, by plain inference.
async fn probabilities(
    client: &reqwest::Client,
    shoal: &Shoal,
    rows: &[[f32; 4]],
) -> Vec<Vec<f32>> {
    let body = json!({
        "inputs": [{"name": "features", "shape": [rows.len(), 4], "datatype": "FP32", "data": rows}],
        "outputs": [{"name": "probabilities"}],
    });
    let (status, answer) = post(client, shoal, "/v2/models/iris/infer", &body).await;
    assert_eq!(status, 200, "{answer}");
    let values: Vec<f32> =
        serde_json::from_value(answer["outputs"][0]["data"].clone()).expect("probabilities");
    values.chunks(3).map(<[f32]>::to_vec).collect()
}

fn floats(value: &Value) -> Vec<f32> {
    serde_json::from_value(value.clone()).unwrap_or_else(|_| panic!("numbers: {value}"))
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-4
}

fn all_close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| close(*a, *b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explanation_of_iris_adds_up_and_matches_what_inference_answers() {
    let client = shoal_tests::http_client(Duration::from_secs(30));
    let temp = tempfile::tempdir().unwrap();
    let mut shoal = Shoal::up(&temp.path().join("data"), "explain");
    shoal.wait_ready(&client).await;

    // Shapley values: the prediction and the baseline's are what inference answers for
    // the row and the baseline, and each output's attributions add up to their difference.
    let request = json!({
        "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [ROW]}],
        "baseline": BASELINE,
    });
    let (status, shapley) = post(&client, &shoal, "/v2/models/iris/explain", &request).await;
    assert_eq!(status, 200, "{shapley}");
    assert_eq!(
        (shapley["method"].as_str(), shapley["output"].as_str()),
        (Some("shapley"), Some("probabilities"))
    );
    assert_eq!(shapley["output_shape"], json!([3]));
    let expected = probabilities(&client, &shoal, &[ROW, BASELINE]).await;
    let explanation = &shapley["explanations"][0];
    let prediction = floats(&explanation["prediction"]);
    let baseline = floats(&explanation["baseline_prediction"]);
    // The same numbers, up to the last bits a batch of another size rounds otherwise.
    assert!(
        all_close(&prediction, &expected[0]),
        "{prediction:?} against {:?}",
        expected[0]
    );
    assert!(
        all_close(&baseline, &expected[1]),
        "{baseline:?} against {:?}",
        expected[1]
    );
    let attributions = attributions_of(&shapley, 0);
    assert_eq!((attributions.len(), attributions[0].len()), (3, 4));
    for j in 0..3 {
        let total: f32 = attributions[j].iter().sum();
        assert!(
            close(total, prediction[j] - baseline[j]),
            "output {j}: {total} against {}",
            prediction[j] - baseline[j]
        );
    }
    assert!(
        attributions.iter().flatten().any(|a| a.abs() > 0.1),
        "some feature matters: {attributions:?}"
    );

    // 100 rows by Shapley values are 1,600 model rows: two requests of the infer path, whose
    // answers are put back together in order.
    let many: Vec<[f32; 4]> = (0..100)
        .map(|i| {
            let t = i as f32 / 100.0;
            let u = (i * 37 % 100) as f32 / 100.0;
            [4.5 + 3.0 * t, 2.0 + 2.0 * u, 1.0 + 5.5 * t, 0.1 + 2.4 * u]
        })
        .collect();
    let request = json!({
        "inputs": [{"name": "features", "shape": [100, 4], "datatype": "FP32", "data": many}],
        "baseline": BASELINE,
    });
    let (status, answer) = post(&client, &shoal, "/v2/models/iris/explain", &request).await;
    assert_eq!(status, 200, "{answer}");
    let answered = probabilities(&client, &shoal, &many).await;
    let explanations = answer["explanations"].as_array().unwrap();
    assert_eq!(explanations.len(), 100);
    for (row, explanation) in explanations.iter().enumerate() {
        let prediction = floats(&explanation["prediction"]);
        assert!(all_close(&prediction, &answered[row]), "row {row}");
        assert!(all_close(
            &floats(&explanation["baseline_prediction"]),
            &baseline
        ));
        let attributions = attributions_of(&answer, row);
        for j in 0..3 {
            let total: f32 = attributions[j].iter().sum();
            assert!(
                close(total, prediction[j] - baseline[j]),
                "row {row} output {j}"
            );
        }
    }

    // Ablation: each feature's attribution is the prediction less inference's answer for
    // the row with that feature alone at the baseline.
    let request = json!({
        "inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": [ROW, BASELINE]}],
        "baseline": BASELINE,
        "method": "ablation",
    });
    let (status, ablation) = post(&client, &shoal, "/v2/models/iris/explain", &request).await;
    assert_eq!(status, 200, "{ablation}");
    let without: Vec<[f32; 4]> = (0..4)
        .map(|i| {
            let mut row = ROW;
            row[i] = BASELINE[i];
            row
        })
        .collect();
    let answers = probabilities(&client, &shoal, &without).await;
    let attributions = attributions_of(&ablation, 0);
    for j in 0..3 {
        for i in 0..4 {
            assert!(
                close(attributions[j][i], expected[0][j] - answers[i][j]),
                "output {j} feature {i}"
            );
        }
    }
    // The baseline row explained against itself: nothing moved.
    let still = attributions_of(&ablation, 1);
    assert!(still.iter().flatten().all(|a| *a == 0.0), "{still:?}");

    // The CLI prints a feature per line with the attributions, and the figures of the API.
    let args = [
        "explain",
        "iris",
        "--data",
        "[[6.3, 3.3, 6.0, 2.5]]",
        "--baseline",
        "[5.8, 3.0, 3.8, 1.2]",
    ];
    let cli = shoal.cli(&args);
    assert!(cli.contains("PROBABILITIES[2]"), "{cli}");
    let first = format!("{:+.4}", attributions_of(&shapley, 0)[2][2]);
    assert!(cli.contains(&first), "{first} in {cli}");
    let json_out: Value =
        serde_json::from_str(&shoal.cli(&[&args[..], &["-o", "json"]].concat())).unwrap();
    assert_eq!(json_out["explanations"], shapley["explanations"]);

    // Bad requests are refused saying what is wrong, and run nothing.
    let features = |rows: Value, shape: Value| json!([{"name": "features", "shape": shape, "datatype": "FP32", "data": rows}]);
    let refusals = [
        (
            json!({"inputs": features(json!([ROW]), json!([1, 4])), "output": "label"}),
            400,
            "no FP32 output \"label\"",
        ),
        (
            json!({"inputs": features(json!([ROW]), json!([1, 4])), "baseline": [1.0, 2.0]}),
            400,
            "the baseline has 2 values",
        ),
        (
            json!({"inputs": features(json!([ROW]), json!([1, 4])), "method": "lime"}),
            400,
            "unknown variant",
        ),
        (
            json!({"inputs": features(json!([ROW]), json!([1, 4])), "baselin": 0}),
            400,
            "unknown field",
        ),
        (
            json!({"inputs": features(json!([[1.0, 2.0]]), json!([1, 2]))}),
            400,
            "features",
        ),
        (
            json!({"inputs": features(json!(vec![ROW; 1025]), json!([1025, 4]))}),
            413,
            "limit",
        ),
    ];
    for (body, status, words) in refusals {
        let (got, answer) = post(&client, &shoal, "/v2/models/iris/explain", &body).await;
        assert_eq!(got, status, "{body} → {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(words), "{words:?} in {message:?}");
    }
    let (status, answer) = post(&client, &shoal, "/v2/models/nope/explain", &request).await;
    assert_eq!(status, 404, "{answer}");

    shoal.interrupt();
    assert!(shoal.wait_exit(Duration::from_secs(30)).success());
}

/// `attributions[j][i]` of row `row`'s explanation in an explain answer.
fn attributions_of(answer: &Value, row: usize) -> Vec<Vec<f32>> {
    serde_json::from_value(answer["explanations"][row]["attributions"].clone())
        .unwrap_or_else(|_| panic!("attributions in {answer}"))
}
