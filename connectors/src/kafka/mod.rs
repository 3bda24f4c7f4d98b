//! Kafka connectors (rdkafka).

pub mod admin;
pub mod input;
pub mod output;
pub mod tail;

use rdkafka::ClientConfig;

/// Errors of the Kafka connectors, grouped by what to do next.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// Kafka refused or failed an operation; retrying later may work.
    #[error("kafka: {0}")]
    Transient(#[from] rdkafka::error::KafkaError),
    /// The configuration or the request is wrong; retrying will not help.
    #[error("kafka: {0}")]
    Definite(String),
}

/// `fetch.queue.backoff.ms` of the consumers that read a backlog (sources, tails). Once 100k
/// records wait in librdkafka's local queue of a partition (`queued.min.messages`), it stops
/// fetching the partition for that long: 1 s by default, which starved the workers while
/// catching up: the source read 230-350k records/s, mostly waiting in `poll`; with 10 ms the
/// ingest benchmark went from about 185k to 300k events/s. The queue stays bounded by the
/// same thresholds.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// Connection settings shared by consumers and producers.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port` list of bootstrap brokers.
    pub brokers: String,
    /// Extra librdkafka properties (`key=value`), applied last.
    pub extra: Vec<(String, String)>,
}

impl KafkaConfig {
    /// A config for `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            extra: Vec::new(),
        }
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
