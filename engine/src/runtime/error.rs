//! Errors that stop the runtime.

use crate::state::StoreError;

/// Errors that stop the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Timely could not start its workers.
    #[error("cannot start workers: {0}")]
    Start(String),
    /// The topology has external tables and no sink was given.
    #[error("the topology has external tables but no database connection was configured")]
    NoSink,
    /// An outbox entry could not be decoded.
    #[error("outbox entry {sequence} is corrupt: {message}")]
    Outbox {
        /// The entry's sequence.
        sequence: u64,
        /// What failed.
        message: String,
    },
}
