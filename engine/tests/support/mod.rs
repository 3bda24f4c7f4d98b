//! Shared helpers of the engine's integration tests.

use miroir_engine::ingest::{ErrorSink, Record};

/// An error sink for tests whose records are all well formed: a malformed one fails the test.
pub struct NoErrors;

impl ErrorSink for NoErrors {
    fn malformed(&self, _: &str, _: u32, _: &Record, error: &str) {
        panic!("unexpected malformed record: {error}");
    }
}
