//! Shared helpers of the engine's integration tests.
#![allow(dead_code)] // each test file uses a different part

use std::time::{Duration, Instant};

use miroir_engine::ingest::{ErrorSink, Record};

/// An error sink for tests whose records are all well formed: a malformed one fails the test.
pub struct NoErrors;

impl ErrorSink for NoErrors {
    fn malformed(&self, _: &str, _: u32, _: &Record, error: &str) {
        panic!("unexpected malformed record: {error}");
    }
}

/// Polls `done` every 10 ms until it holds; fails with `what` after 20 s.
pub fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
