//! The CI-bounded chaos run: two runs of the real harness against real `shoal` processes
//! (a fixed seed, and a random one that is printed so a failure can be replayed), each with
//! every nemesis, every workload and every checker. Needs root (a network namespace,
//! iptables, a tmpfs); `.ci/run` installs iptables and faketime.

use serde_json::Value;
use std::process::Command;

/// Seconds of faults per run: two runs fit the suite's budget of about five minutes.
const DURATION_S: u64 = 110;

/// Runs `shoal-chaos run --seed seed` and returns its report.
fn chaos_run(seed: &str) -> Value {
    let out = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
    let report_dir = out.path().join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_shoal-chaos"))
        .args([
            "run",
            "--seed",
            seed,
            "--duration-s",
            &DURATION_S.to_string(),
        ])
        .arg("--shoal")
        .arg(shoal_tests::shoal_binary())
        .arg("--out")
        .arg(&report_dir)
        .output()
        .unwrap_or_else(|error| panic!("shoal-chaos: {error}"));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The seed line comes first, so a failing random run can be replayed.
    println!("{printed}");
    let report = std::fs::read_to_string(report_dir.join("report.json"))
        .unwrap_or_else(|error| panic!("no report ({error}):\n{printed}"));
    let report: Value =
        serde_json::from_str(&report).unwrap_or_else(|error| panic!("{error}: {report}"));
    assert!(
        output.status.success(),
        "the chaos run with seed {seed} failed:\n{printed}"
    );
    report
}

fn nemesis_events(report: &Value) -> u64 {
    report["nemesis_events"].as_u64().unwrap_or(0)
}

#[test]
fn a_fixed_and_a_random_seed_survive_every_nemesis_with_every_checker_passing() {
    let fixed = chaos_run("20261129");
    let random = chaos_run("random");
    for report in [&fixed, &random] {
        assert_eq!(report["passed"], Value::Bool(true), "{report:#}");
        let verdicts = report["verdicts"].as_array().cloned().unwrap_or_default();
        assert_eq!(verdicts.len(), 7, "{report:#}");
    }
    let events = nemesis_events(&fixed) + nemesis_events(&random);
    assert!(
        events >= 200,
        "only {events} nemesis events in the two runs"
    );
}
