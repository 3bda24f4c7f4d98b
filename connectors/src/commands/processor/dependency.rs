//! A service the processor consults before it applies a command.

use miroir_engine::topology::command::CommandSpec;

/// A service the processor consults before applying a command (a directory, a fraud check).
/// An error is technical: the command is retried with backoff, then parked in the dead-letter
/// topic.
pub trait Dependency: Send + Sync {
    /// Checks the command for `key`; `Err` carries what failed.
    fn check(
        &self,
        command: &CommandSpec,
        key: &str,
        payload: &serde_json::Value,
    ) -> Result<(), String>;
}
