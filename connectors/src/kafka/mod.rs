//! Kafka connectors (rdkafka).

pub mod admin;
pub mod changelog;
pub mod credentials;
pub mod input;
pub mod internal;
pub mod membership;
pub mod output;
pub mod standby;
pub mod tail;

use miroir_engine::error::ErrorClass;
use miroir_engine::state::StoreError;
use rdkafka::ClientConfig;

/// Errors of the Kafka connectors and the command subsystem; [`KafkaError::class`] says what
/// to do next.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The broker or the client failed an operation.
    #[error("kafka: {source}")]
    Client {
        /// What to do next: from the error's code unless the caller knows better.
        class: ErrorClass,
        /// rdkafka's error.
        source: rdkafka::error::KafkaError,
    },
    /// The configuration or the request is wrong (a missing topic, a bad partition count, an
    /// unknown command): fatal.
    #[error("kafka: {0}")]
    Config(String),
    /// Kafka did not answer in time, or a delivery was lost on the way: transient.
    #[error("kafka: {0}")]
    Unavailable(String),
    /// Another process took this instance's place, or this one was paused or cut off for
    /// too long: fatal, what it did since must not be written.
    #[error("kafka: {0}")]
    Fenced(String),
    /// Creating or deleting a topic failed.
    #[error("kafka: cannot {action} topic {topic}: {code}")]
    Topic {
        /// `create` or `delete`.
        action: &'static str,
        /// The topic.
        topic: String,
        /// The broker's answer.
        code: rdkafka::types::RDKafkaErrorCode,
    },
    /// The state directory failed: fatal.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A thread could not start: fatal.
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// The thread's role.
        name: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A thread panicked: fatal.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

impl KafkaError {
    /// What to do next.
    pub fn class(&self) -> ErrorClass {
        match self {
            KafkaError::Client { class, .. } => *class,
            KafkaError::Unavailable(_) => ErrorClass::Transient,
            KafkaError::Topic { code, .. } => code_class(*code),
            KafkaError::Config(_)
            | KafkaError::Fenced(_)
            | KafkaError::Store(_)
            | KafkaError::Thread { .. }
            | KafkaError::Panicked(_) => ErrorClass::Fatal,
        }
    }

    /// Whether the producer that returned this error can take no further transaction:
    /// librdkafka declared it fatal (an operation in an invalid state once the broker came
    /// back, say). Only a new producer goes on.
    pub fn producer_unusable(&self) -> bool {
        matches!(
            self,
            KafkaError::Client {
                source: rdkafka::error::KafkaError::Transaction(t),
                ..
            } if t.is_fatal()
        )
    }

    /// `source`, fatal whatever its code says (the caller cannot go on after it).
    pub fn fatal(source: rdkafka::error::KafkaError) -> KafkaError {
        KafkaError::Client {
            class: ErrorClass::Fatal,
            source,
        }
    }
}

impl From<rdkafka::error::KafkaError> for KafkaError {
    fn from(source: rdkafka::error::KafkaError) -> Self {
        KafkaError::Client {
            class: client_class(&source),
            source,
        }
    }
}

/// The class of an rdkafka error: a fenced producer, a failed authorization or an invalid
/// configuration is fatal; a message the broker refuses for what it is (too large, invalid) is
/// definite; anything else (timeouts, a broker down, a coordinator moving) is transient. A
/// transaction error librdkafka calls fatal for another reason (an operation in an invalid
/// state after the broker went away) leaves that producer unusable, not the next one: it is
/// transient for a caller that makes a new producer.
pub fn client_class(e: &rdkafka::error::KafkaError) -> ErrorClass {
    if matches!(e, rdkafka::error::KafkaError::ClientConfig(..)) {
        return ErrorClass::Fatal;
    }
    e.rdkafka_error_code()
        .map_or(ErrorClass::Transient, code_class)
}

/// The class of an error code (see [`client_class`]).
fn code_class(code: rdkafka::error::RDKafkaErrorCode) -> ErrorClass {
    use rdkafka::error::RDKafkaErrorCode as Code;
    match code {
        Code::ProducerFenced
        | Code::InvalidProducerEpoch
        | Code::Fenced
        | Code::TopicAuthorizationFailed
        | Code::GroupAuthorizationFailed
        | Code::ClusterAuthorizationFailed
        | Code::TransactionalIdAuthorizationFailed
        | Code::SaslAuthenticationFailed
        | Code::Authentication => ErrorClass::Fatal,
        Code::MessageSizeTooLarge
        | Code::InvalidMessage
        | Code::InvalidMessageSize
        | Code::InvalidRecord
        | Code::BadMessage => ErrorClass::Definite,
        _ => ErrorClass::Transient,
    }
}

/// `fetch.queue.backoff.ms` of the consumers that read a backlog (sources, tails). Once 100k
/// records wait in librdkafka's local queue of a partition (`queued.min.messages`), it stops
/// fetching the partition for that long: 1 s by default, which starved the workers while
/// catching up: the source read 230-350k records/s, mostly waiting in `poll`; with 10 ms the
/// ingest benchmark went from about 185k to 300k events/s. The queue stays bounded by the
/// same thresholds.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// Connection settings shared by consumers and producers. Its `Debug` masks the values of
/// secret properties (passwords, secrets, keys).
#[derive(Clone)]
pub struct KafkaConfig {
    /// `host:port` list of bootstrap brokers.
    pub brokers: String,
    /// Extra librdkafka properties (`key=value`), applied last.
    pub extra: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = miroir_engine::topology::kafka::is_secret_property;
        let extra: Vec<(&str, &str)> = self
            .extra
            .iter()
            .map(|(k, v)| (k.as_str(), if secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("extra", &extra)
            .finish()
    }
}

impl KafkaConfig {
    /// A config for `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            extra: Vec::new(),
        }
    }

    /// This config with `defaults` (a topology's `[kafka]` section) applied before its own
    /// extra properties, which win.
    pub fn with_defaults(mut self, defaults: &[(String, String)]) -> Self {
        let own = std::mem::take(&mut self.extra);
        self.extra = defaults.iter().cloned().chain(own).collect();
        self
    }

    /// A client configuration named `miroir-<role>` (`client.id`: what the broker's request
    /// logs and quotas see), with the extra properties applied last.
    pub(crate) fn client(&self, role: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c.set("client.id", format!("miroir-{role}"));
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_debug_form_masks_secret_properties() {
        let mut config = KafkaConfig::new("b:9092");
        config.extra = vec![
            ("sasl.username".into(), "app".into()),
            ("sasl.password".into(), "hunter2".into()),
            ("ssl.key.pem".into(), "-----BEGIN".into()),
        ];
        let shown = format!("{config:?}");
        assert!(shown.contains("app") && shown.contains("b:9092"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("BEGIN"),
            "{shown}"
        );
    }
}
