//! Producing to Kafka: the malformed-record topic and a plain publisher.

use std::time::{Duration, Instant};

use miroir_engine::error::ErrorClass;
use miroir_engine::ingest::{ErrorSink, Record};
use parking_lot::Mutex;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, DeliveryResult, Producer, ProducerContext, ThreadedProducer,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tracing::warn;

use super::{client_class, KafkaConfig, KafkaError};

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
    /// Set on a copy sent without the record's payload, and why.
    pub const COPY: &str = "miroir.copy";
}

fn producer_config(config: &KafkaConfig) -> rdkafka::ClientConfig {
    let mut c = config.client("producer");
    // Kafka's Java client partitions keys with murmur2; so must we, for keys to meet their
    // partition (and for query routing to agree with the producer).
    c.set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("enable.idempotence", "true");
    c
}

fn producer(config: &KafkaConfig) -> Result<ThreadedProducer<DefaultProducerContext>, KafkaError> {
    Ok(producer_config(config).create()?)
}

/// Copies malformed records to `<topic>.miroir-errors`, with the error and origin in headers.
/// [`ErrorSink::settle`] waits for the copies' acknowledgements and sends the failed ones
/// again: a copy the broker refuses for its size goes again without its payload (its origin
/// headers still say where the record is).
pub struct KafkaErrorSink {
    producer: ThreadedProducer<CopyContext>,
}

/// Keeps the copies whose delivery failed, to send them again.
#[derive(Default)]
struct CopyContext {
    failed: Mutex<Vec<(OwnedMessage, rdkafka::error::KafkaError)>>,
}

impl ClientContext for CopyContext {}

impl ProducerContext for CopyContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            self.failed.lock().push((m.detach(), e.clone()));
        }
    }
}

impl KafkaErrorSink {
    /// Connects a producer.
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        Ok(KafkaErrorSink {
            producer: producer_config(config).create_with_context(CopyContext::default())?,
        })
    }

    /// Queues a copy; blocks while the producer's queue is full.
    fn queue(&self, mut record: BaseRecord<'_, [u8], [u8]>) {
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, r)) => {
                    // Kept as a failed delivery: settle sends it again.
                    let m = OwnedMessage::new(
                        r.payload.map(<[u8]>::to_vec),
                        r.key.map(<[u8]>::to_vec),
                        r.topic.to_string(),
                        rdkafka::Timestamp::NotAvailable,
                        -1,
                        -1,
                        r.headers,
                    );
                    self.producer.context().failed.lock().push((m, e));
                    return;
                }
            }
        }
    }

    /// Sends a failed copy again: without its payload when the broker refuses its size.
    fn resend(&self, m: &OwnedMessage, e: &rdkafka::error::KafkaError) {
        let too_large = client_class(e) == ErrorClass::Definite;
        warn!(topic = m.topic(), error = %e, without_payload = too_large, "a malformed record's copy failed: sending it again");
        let mut headers = m.headers().cloned().unwrap_or_default();
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(m.topic());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if too_large {
            let note = format!("payload left out: {e}");
            headers = headers.insert(Header {
                key: header::COPY,
                value: Some(note.as_str()),
            });
            self.queue(record.headers(headers));
        } else {
            if let Some(p) = m.payload() {
                record = record.payload(p);
            }
            self.queue(record.headers(headers));
        }
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
        self.queue(r);
    }

    fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.producer.in_flight_count() > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                let _ = self.producer.flush(left);
            }
            let failed = std::mem::take(&mut *self.producer.context().failed.lock());
            if failed.is_empty() && self.producer.in_flight_count() == 0 {
                return true;
            }
            for (m, e) in &failed {
                self.resend(m, e);
            }
            if Instant::now() >= deadline {
                return false;
            }
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
        self.flush_within(Duration::from_secs(60))
    }

    /// Waits until every queued message is acknowledged, at most `wait`.
    pub fn flush_within(&self, wait: Duration) -> Result<(), KafkaError> {
        Ok(self.producer.flush(wait)?)
    }
}
