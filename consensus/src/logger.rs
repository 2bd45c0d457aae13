//! Bridges raft-rs's `slog` logging into `tracing`, so raft's lines land with ours.

use slog::{Drain, KV, Level, OwnedKVList, Record};
use std::fmt::Write as _;

/// A `slog` drain that re-emits every record as a `tracing` event under target `raft`.
#[derive(Debug)]
struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut fields = FieldText(String::new());
        // Formatting into a String cannot fail.
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let message = record.msg();
        let fields = fields.0;
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", %fields, "{message}"),
            Level::Warning => tracing::warn!(target: "raft", %fields, "{message}"),
            Level::Info => tracing::info!(target: "raft", %fields, "{message}"),
            Level::Debug => tracing::debug!(target: "raft", %fields, "{message}"),
            Level::Trace => tracing::trace!(target: "raft", %fields, "{message}"),
        }
        Ok(())
    }
}

/// Collects slog key-values as `key=value` pairs.
struct FieldText(String);

impl slog::Serializer for FieldText {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments<'_>) -> slog::Result {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = write!(self.0, "{key}={value}");
        Ok(())
    }
}

/// The logger handed to `RawNode::new`.
pub(crate) fn raft_logger(id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("raft_id" => id))
}
