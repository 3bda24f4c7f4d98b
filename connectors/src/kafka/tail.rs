//! Reading a whole topic, and keeping up with it: every partition, committed records only.
//!
//! The command processor keeps its view of the entities and of the answered commands this
//! way. "Caught up" means every partition reported its end (librdkafka's partition EOF), which,
//! under `read_committed`, accounts for transaction markers and aborted records that never
//! reach the application (so positions alone cannot tell it).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::admin::topics;
use super::{KafkaConfig, KafkaError, FETCH_QUEUE_BACKOFF_MS};

/// `fetch.min.bytes` of a tail.
const TAIL_FETCH_MIN_BYTES: &str = "1048576";
/// `fetch.wait.max.ms` of a tail: how late it may see another writer's records.
const TAIL_FETCH_WAIT_MS: &str = "100";

/// Logs librdkafka's errors, except the end-of-partition reports the tail asks for.
pub(crate) struct TailContext;

impl ClientContext for TailContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let eof = matches!(error, rdkafka::error::KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !eof {
            warn!(error = %error, reason, "librdkafka");
        }
    }
}

impl ConsumerContext for TailContext {}

/// How long opening a tail waits for its topic to show in the metadata: a topic created just
/// before (the instances' records at a start on a fresh broker) can take a moment.
const TOPIC_APPEARS: Duration = Duration::from_secs(5);

/// A consumer assigned to every partition of one topic, outside any consumer group.
pub struct Tail {
    consumer: BaseConsumer<TailContext>,
    topic: String,
    partitions: i32,
    /// The partitions that reported their end in a catch-up cut short by its limit, which
    /// the next one goes on with.
    unfinished: Option<HashSet<i32>>,
}

impl Tail {
    /// Opens `topic` from its beginning.
    pub fn open(config: &KafkaConfig, topic: &str) -> Result<Tail, KafkaError> {
        Tail::open_at(config, topic, &[])
    }

    /// Opens `topic` at the given next offsets (`(partition, offset)`), other partitions from
    /// their beginning.
    pub fn open_at(
        config: &KafkaConfig,
        topic: &str,
        starts: &[(i32, i64)],
    ) -> Result<Tail, KafkaError> {
        let consumer: BaseConsumer<TailContext> = config
            .client("tail")
            .set("group.id", "miroir-tail") // required by librdkafka; nothing is committed
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
            // A tail follows a topic in the background: the broker keeps its fetch until a
            // megabyte or 100 ms has come, rather than answering it for every transaction that
            // commits on the topic (one request per commit, measured in docs/benchmarks.md).
            .set("fetch.min.bytes", TAIL_FETCH_MIN_BYTES)
            .set("fetch.wait.max.ms", TAIL_FETCH_WAIT_MS)
            .create_with_context(TailContext)?;
        // A topic created just before may take a moment to show in a broker's metadata.
        let deadline = Instant::now() + TOPIC_APPEARS;
        let partitions = loop {
            let found = topics(consumer.client())?
                .into_iter()
                .find(|(t, _)| t == topic)
                .map(|(_, n)| n);
            match found {
                Some(n) => break n,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                None => return Err(KafkaError::Config(format!("topic {topic} does not exist"))),
            }
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let start = starts
                .iter()
                .find(|(q, _)| *q == p)
                .map_or(Offset::Beginning, |(_, o)| Offset::Offset(*o));
            tpl.add_partition_offset(topic, p, start)?;
        }
        consumer.assign(&tpl)?;
        Ok(Tail {
            consumer,
            topic: topic.to_string(),
            partitions,
            unfinished: None,
        })
    }

    /// The topic's partition count.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Hands every record available now to `each`, without waiting; stops at its first error.
    pub fn drain(
        &mut self,
        mut each: impl FnMut(&BorrowedMessage<'_>) -> Result<(), KafkaError>,
    ) -> Result<(), KafkaError> {
        // It may take end reports an unfinished catch-up waits for: the next one starts over.
        self.unfinished = None;
        while let Some(result) = self.consumer.poll(Duration::ZERO) {
            match result {
                Ok(m) => each(&m)?,
                Err(rdkafka::error::KafkaError::PartitionEOF(_)) => {}
                Err(e) => warn!(topic = %self.topic, error = %e, "reading"),
            }
        }
        Ok(())
    }

    /// Reads until every partition reported its end (at most `limit`); false when the limit
    /// passed first. A call after one that returned false goes on from where it stopped.
    /// Stops at the first error of `each`, after which the next call starts over.
    pub fn catch_up(
        &mut self,
        limit: Duration,
        mut each: impl FnMut(&BorrowedMessage<'_>) -> Result<(), KafkaError>,
    ) -> Result<bool, KafkaError> {
        let mut at_end = match self.unfinished.take() {
            Some(at_end) => at_end,
            None => {
                self.restart_end_reports()?;
                HashSet::new()
            }
        };
        let deadline = Instant::now() + limit;
        while at_end.len() < self.partitions as usize {
            if Instant::now() > deadline {
                info!(topic = %self.topic, ended = at_end.len(), partitions = self.partitions,
                      "not every partition reached its end in {limit:?}: not caught up yet");
                self.unfinished = Some(at_end);
                return Ok(false);
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            match self.consumer.poll(wait) {
                Some(Ok(m)) => {
                    at_end.remove(&m.partition());
                    each(&m)?;
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => warn!(topic = %self.topic, error = %e, "reading"),
                None => {}
            }
        }
        Ok(true)
    }

    /// Re-assigns every partition at its current position, which restarts the
    /// end-of-partition reports.
    fn restart_end_reports(&mut self) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        let positions = self.consumer.position()?;
        for p in 0..self.partitions {
            let offset = positions
                .find_partition(&self.topic, p)
                .map(|e| e.offset())
                .filter(|o| matches!(o, Offset::Offset(_)))
                .unwrap_or(Offset::Beginning);
            tpl.add_partition_offset(&self.topic, p, offset)?;
        }
        self.consumer.assign(&tpl)?;
        Ok(())
    }
}
