//! Producing to Kafka: the malformed-record topic and a plain publisher.

use std::time::Duration;

use miroir_engine::ingest::{ErrorSink, Record};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use tracing::warn;

use super::{KafkaConfig, KafkaError};

/// Suffix of the topic that receives a source's malformed records.
pub const ERRORS_SUFFIX: &str = ".miroir-errors";

/// Header names of a malformed record's copy. Dotted, unlike the commands' headers
/// ([`crate::commands::wire::header`]): consumers of the errors topic read these names.
pub mod header {
    /// Why the record could not be applied.
    pub const ERROR: &str = "miroir.error";
    /// The source topic it was read from.
    pub const SOURCE_TOPIC: &str = "miroir.source.topic";
    /// Its partition there.
    pub const SOURCE_PARTITION: &str = "miroir.source.partition";
    /// Its offset there.
    pub const SOURCE_OFFSET: &str = "miroir.source.offset";
}

fn producer(config: &KafkaConfig) -> Result<ThreadedProducer<DefaultProducerContext>, KafkaError> {
    let mut c = config.client("producer");
    // Kafka's Java client partitions keys with murmur2; so must we, for keys to meet their
    // partition (and for query routing to agree with the producer).
    c.set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("enable.idempotence", "true");
    Ok(c.create()?)
}

/// Copies malformed records to `<topic>.miroir-errors`, with the error and origin in headers.
pub struct KafkaErrorSink {
    producer: ThreadedProducer<DefaultProducerContext>,
}

impl KafkaErrorSink {
    /// Connects a producer.
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        Ok(KafkaErrorSink {
            producer: producer(config)?,
        })
    }
}

impl ErrorSink for KafkaErrorSink {
    fn malformed(&self, topic: &str, partition: u32, record: &Record, error: &str) {
        let target = format!("{topic}{ERRORS_SUFFIX}");
        let partition_text = partition.to_string();
        let offset_text = record.offset.to_string();
        let mut headers = OwnedHeaders::new();
        for (key, value) in [
            (header::ERROR, error),
            (header::SOURCE_TOPIC, topic),
            (header::SOURCE_PARTITION, &partition_text),
            (header::SOURCE_OFFSET, &offset_text),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&target).headers(headers);
        if let Some(k) = record.key {
            r = r.key(k);
        }
        if let Some(p) = record.payload {
            r = r.payload(p);
        }
        if let Err((e, _)) = self.producer.send(r) {
            warn!(topic, partition, offset = record.offset, error = %e, "cannot copy malformed record to {target}");
        }
    }
}

impl Drop for KafkaErrorSink {
    fn drop(&mut self) {
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}

/// Publishes keyed messages (entity events, or tombstones when the payload is `None`).
pub struct Publisher {
    producer: ThreadedProducer<DefaultProducerContext>,
}

impl Publisher {
    /// Connects a producer.
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        Ok(Publisher {
            producer: producer(config)?,
        })
    }

    /// Queues one message; blocks while the producer's queue is full.
    pub fn send(&self, topic: &str, key: &[u8], payload: Option<&[u8]>) -> Result<(), KafkaError> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(key);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Waits until every queued message is acknowledged.
    pub fn flush(&self) -> Result<(), KafkaError> {
        Ok(self.producer.flush(Duration::from_secs(60))?)
    }
}
