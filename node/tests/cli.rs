//! The `shoal` binary's command line, run as a user would. (Being an integration test of
//! this package also makes `cargo test --workspace` build the binary that `tests/` drives.)

use std::process::Command;

fn shoal(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env_remove("SHOAL_ADDR")
        .output()
        .expect("shoal runs")
}

#[test]
fn help_lists_every_subcommand() {
    let output = shoal(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for command in ["up", "model", "deploy", "infer"] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
}

#[test]
fn a_client_command_with_no_server_says_where_it_looked() {
    // Port 9 (discard) on loopback: nothing of ours listens there.
    let output = shoal(&["model", "list", "--addr", "http://127.0.0.1:9"]);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("cannot reach Shoal at http://127.0.0.1:9"),
        "{error}"
    );
}

#[test]
fn an_unparsable_listen_address_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let output = shoal(&[
        "up",
        "--listen",
        "not-an-address",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not-an-address"));
    assert!(!dir.path().join("raft").exists(), "nothing was created");
}

#[test]
fn infer_data_that_is_not_json_is_refused_by_the_cli() {
    let output = shoal(&[
        "infer",
        "iris",
        "--data",
        "[[1,2",
        "--addr",
        "http://127.0.0.1:9",
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--data is not JSON"));
}
