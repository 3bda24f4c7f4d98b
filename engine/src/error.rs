//! How miroir classifies errors: by what the caller does next, not by where they came from.
//!
//! Every error type of the engine and the connectors says its [`ErrorClass`]: the Kafka and
//! PostgreSQL errors from their codes (Kafka's fatal transaction errors and authorization
//! failures, PostgreSQL's SQLSTATE classes), configuration and state-directory errors as
//! fatal.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// The waits before each new attempt at a [`ErrorClass::Transient`] failure: from `min`,
/// doubling up to `max`, with jitter (so that instances that failed together do not retry
/// together), without end.
pub fn retry_delays(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The text of a panic's payload (what `panic!` was given), for the failure it causes.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// What the caller of a failed operation does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Retry later: the same request may succeed (a connection lost, a busy coordinator, a
    /// deadlock, a serialization failure).
    Transient,
    /// This input is bad: set it aside (count it, report where it came from) and go on with
    /// the rest; retrying it changes nothing.
    Definite,
    /// Stop, with a clear message: the configuration, a permission or a schema is wrong, or the
    /// instance lost its right to write (a fenced producer).
    Fatal,
}

impl ErrorClass {
    /// The class's name, as logs and metrics labels give it.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Definite => "definite",
            ErrorClass::Fatal => "fatal",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
