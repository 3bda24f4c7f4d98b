//! A check of the connection settings before anything else connects: librdkafka retries a
//! refused login or certificate forever, each client on its own, so that a wrong password
//! otherwise surfaces only as timeouts of whatever asked first.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode as Code;

use super::{KafkaConfig, KafkaError};

/// How long the check waits for the brokers: long enough for a login to be refused, short
/// enough not to delay a start when they are merely down (the clients then retry as usual).
const CHECK_FOR: Duration = Duration::from_secs(10);

/// Keeps the first refusal librdkafka reports (a login, a certificate).
#[derive(Default)]
struct Refusals(Mutex<Option<String>>);

impl ClientContext for Refusals {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let refused = matches!(
            error.rdkafka_error_code(),
            Some(Code::Authentication | Code::SaslAuthenticationFailed | Code::SSL)
        );
        if refused {
            self.0.lock().get_or_insert_with(|| reason.to_string());
        } else {
            tracing::debug!(error = %error, reason, "kafka client error while checking the connection");
        }
    }
}

impl ConsumerContext for Refusals {}

/// Connects with `config` and asks for the cluster's metadata: `Err` (fatal) when the
/// brokers refuse the login or the TLS handshake, with librdkafka's reason; `Ok` when they
/// answer, and when none does within a few seconds (an outage, which the clients ride out).
pub fn check(config: &KafkaConfig) -> Result<(), KafkaError> {
    let consumer: BaseConsumer<Refusals> = config
        .client("check")
        .create_with_context(Refusals::default())
        .map_err(KafkaError::fatal)?;
    let deadline = Instant::now() + CHECK_FOR;
    while Instant::now() < deadline {
        let answered = consumer
            .fetch_metadata(None, Duration::from_millis(500))
            .is_ok();
        // Serves the error callbacks (no record comes: nothing is assigned).
        let _ = consumer.poll(Duration::from_millis(100));
        if let Some(reason) = consumer.context().0.lock().take() {
            return Err(KafkaError::Config(format!(
                "cannot connect to {}: {reason}",
                config.brokers
            )));
        }
        if answered {
            return Ok(());
        }
    }
    Ok(())
}
