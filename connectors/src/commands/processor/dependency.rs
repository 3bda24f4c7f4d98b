//! A service the processor consults before it applies a command.

use miroir_engine::error::ErrorClass;
use miroir_engine::topology::command::CommandSpec;

/// A service the processor consults before applying a command (a directory, a fraud check).
pub trait Dependency: Send + Sync {
    /// Checks the command for `key`. An error is technical: the command is retried with the
    /// command's backoff, then parked in the dead-letter topic.
    fn check(
        &self,
        command: &CommandSpec,
        key: &str,
        payload: &serde_json::Value,
    ) -> Result<(), DependencyError>;
}

/// Why a dependency could not check a command: a technical failure.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DependencyError {
    /// What failed, as the dead letter and the deferred reply give it.
    pub message: String,
    /// The underlying error, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl DependencyError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> DependencyError {
        DependencyError {
            message: message.into(),
            source: None,
        }
    }

    /// What to do next: retry (the command is parked once its retries are spent).
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Transient
    }
}
