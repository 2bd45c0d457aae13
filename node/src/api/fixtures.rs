//! Test fixtures shared by the API's unit tests: a model version and a state built by
//! applying commands, as the control plane would.

use shoal_scheduler::{ArtifactFile, ClusterState, Command, Signature};

/// The state after `commands`, each applied in turn.
pub(super) fn applied(commands: Vec<Command>) -> ClusterState {
    let mut state = ClusterState::default();
    for (index, command) in commands.into_iter().enumerate() {
        shoal_scheduler::apply(&mut state, index as u64 + 1, command)
            .expect("setup command applies");
    }
    state
}

/// Registers a one-file version of `model` whose manifest digest is `digest`.
pub(super) fn version(model: &str, digest: &str) -> Command {
    Command::RegisterModelVersion {
        model: model.into(),
        manifest_digest: digest.into(),
        files: vec![ArtifactFile {
            name: "model.safetensors".into(),
            digest: "ab".repeat(32),
            size_bytes: 1_000,
        }],
        format: "safetensors".into(),
        memory_bytes: 1 << 20,
        signature: Signature::default(),
        created_at_ms: 1,
    }
}
