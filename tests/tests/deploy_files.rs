//! The deploy files that ship in `ops/deploy` are valid: systemd's own verifier accepts the
//! units (with ExecStart pointed at the binary this build made), and they run the
//! subcommands and flags the binary has.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use shoal_tests::shoal_binary;
use std::path::PathBuf;
use std::process::Command;

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let binary = shoal_binary();
    let dir = tempfile::tempdir().unwrap();
    for unit in ["shoal-server.service", "shoal-agent.service"] {
        let text =
            std::fs::read_to_string(repository().join("ops/deploy/systemd").join(unit)).unwrap();
        assert!(
            text.contains("ExecStart=/usr/local/bin/shoal "),
            "{unit} runs the installed binary"
        );
        let local = text.replace("/usr/local/bin/shoal", binary.to_str().unwrap());
        std::fs::write(dir.path().join(unit), local).unwrap();
    }
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("shoal-server.service"))
        .arg(dir.path().join("shoal-agent.service"))
        .output()
        .expect("systemd-analyze is installed (the CI script installs systemd)");
    assert!(
        output.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_units_use_flags_the_binary_accepts() {
    for (unit, subcommand) in [
        ("shoal-server.service", "server"),
        ("shoal-agent.service", "agent"),
    ] {
        let text =
            std::fs::read_to_string(repository().join("ops/deploy/systemd").join(unit)).unwrap();
        let exec = text
            .lines()
            .find(|line| line.starts_with("ExecStart="))
            .unwrap();
        let help = Command::new(shoal_binary())
            .args([subcommand, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in exec
            .split_whitespace()
            .filter(|word| word.starts_with("--"))
        {
            let flag = flag.split('=').next().unwrap();
            assert!(
                help.contains(flag) || flag == "--log-format",
                "{unit}: {flag} is not a flag of `shoal {subcommand}`"
            );
        }
    }
}
