//! A service the processor consults before it applies a command.

use miroir_engine::error::ErrorClass;
use miroir_engine::topology::command::CommandSpec;

/// A service the processor consults before applying a command (a directory, a fraud check).
pub trait Dependency: Send + Sync {
    /// Checks the command for `key`. A [`DependencyError::Failed`] is technical: the command
    /// is retried with the command's backoff, then parked in the dead-letter topic. A
    /// [`DependencyError::Rejected`] is the service's business answer: the command is
    /// rejected with it, and not retried.
    fn check(
        &self,
        command: &CommandSpec,
        key: &str,
        payload: &serde_json::Value,
    ) -> Result<(), DependencyError>;
}

/// Why a dependency did not let a command through.
#[derive(Debug, thiserror::Error)]
pub enum DependencyError {
    /// The service could not check the command (unreachable, timed out, failed).
    #[error("{message}")]
    Failed {
        /// What failed, as the dead letter and the deferred reply give it.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The service refused the command: the caller gets it as a rejection.
    #[error("rejected ({code}): {message}")]
    Rejected {
        /// Machine-readable code of the rejection.
        code: String,
        /// The payload field at fault, if one.
        field: Option<String>,
        /// Human-readable message.
        message: String,
    },
}

impl DependencyError {
    /// A technical failure described by `message`.
    pub fn new(message: impl Into<String>) -> DependencyError {
        DependencyError::Failed {
            message: message.into(),
            source: None,
        }
    }

    /// A business refusal of the command.
    pub fn rejected(
        code: impl Into<String>,
        field: Option<String>,
        message: impl Into<String>,
    ) -> DependencyError {
        DependencyError::Rejected {
            code: code.into(),
            field,
            message: message.into(),
        }
    }

    /// What to do next: retry a failure (the command is parked once its retries are spent);
    /// answer a rejection.
    pub fn class(&self) -> ErrorClass {
        match self {
            DependencyError::Failed { .. } => ErrorClass::Transient,
            DependencyError::Rejected { .. } => ErrorClass::Definite,
        }
    }
}
