//! The command processor (master side): one thread per `[commands.NAME]` section.
//!
//! ```text
//!  command topic ──► decide (deadline, authorize, validate, apply)        one Kafka transaction
//!  (consumer group,      │  current entity: a view of the entity topic   ┌──────────────────────┐
//!   read_committed)      │  answered ids: a view of <topic>.miroir-done  │ new entity event     │
//!                        ▼                                               │ reply to the sender  │
//!            dependency failure? retry with backoff, then park ────────► │ dead letter, if any  │
//!                                                                        │ answered id          │
//!                                                                        │ consumed offsets     │
//!                                                                        └──────────────────────┘
//! ```
//!
//! Everything a command causes is committed together with its consumed offset, so a crash
//! replays the command from scratch; the answered-id view makes a re-delivered command (same
//! command id) get its first answer again instead of a second effect.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use miroir_engine::command::{CommandSpec, Decision, Principal, Reply, Request};
use miroir_engine::decode::decode;
use miroir_engine::metrics::CommandMetrics;
use miroir_engine::topology::{Source, Topology};
use miroir_engine::value::{row_to_json, row_to_json_bytes, Row, Value};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::admin::{create_topic, create_topic_with, partition_count, topics};
use super::tail::Tail;
use super::{KafkaConfig, KafkaError};

/// Header names of commands, replies and dead letters.
pub mod header {
    /// The command's id: a re-delivered command keeps it and is answered, not re-applied.
    pub const COMMAND_ID: &str = "miroir-command-id";
    /// Matches a reply to its request.
    pub const CORRELATION_ID: &str = "miroir-correlation-id";
    /// The topic to reply to.
    pub const REPLY_TO: &str = "miroir-reply-to";
    /// When the caller stops waiting, in ms since the epoch.
    pub const DEADLINE: &str = "miroir-deadline";
    /// The authenticated user's id.
    pub const PRINCIPAL: &str = "miroir-principal";
    /// The user's roles, comma-separated.
    pub const ROLES: &str = "miroir-roles";
    /// The command type (the business operation, `UpdateUserEmail`).
    pub const COMMAND_TYPE: &str = "miroir-command-type";
    /// The payload's schema version.
    pub const SCHEMA_VERSION: &str = "miroir-schema-version";
    /// On a replayed command: the entity version when it was parked.
    pub const PARKED_VERSION: &str = "miroir-parked-version";
    /// Dead letters: `dependency` (a dependency kept failing).
    pub const ERROR_CLASS: &str = "miroir-error-class";
    /// Dead letters: the last error.
    pub const ERROR_MESSAGE: &str = "miroir-error-message";
    /// Dead letters: attempts made.
    pub const ATTEMPTS: &str = "miroir-attempts";
    /// Dead letters: first failure, RFC 3339.
    pub const FIRST_FAILURE: &str = "miroir-first-failure";
    /// Dead letters: last failure, RFC 3339.
    pub const LAST_FAILURE: &str = "miroir-last-failure";
    /// Dead letters: where the command was read (`topic/partition/offset`).
    pub const ORIGIN: &str = "miroir-origin";
    /// Dead letters: the entity version when the command was parked.
    pub const ENTITY_VERSION: &str = "miroir-entity-version";
}

/// Suffix of a command topic's dead-letter topic.
pub const DLQ_SUFFIX: &str = ".dlq";
/// Suffix of the compacted topic of answered command ids.
pub const DONE_SUFFIX: &str = ".miroir-done";

/// A service the processor consults before applying a command (a directory, a fraud check).
/// An error is technical: the command is retried with backoff, then parked in the dead-letter
/// topic.
pub trait Dependency: Send + Sync {
    /// Checks the command for `key`; `Err` carries what failed.
    fn check(
        &self,
        command: &CommandSpec,
        key: &str,
        payload: &serde_json::Value,
    ) -> Result<(), String>;
}

/// A running command processor.
pub struct CommandProcessor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    status: Arc<ProcessorStatus>,
}

/// What a processor reports about itself.
#[derive(Default)]
pub struct ProcessorStatus {
    ready: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl ProcessorStatus {
    /// Whether the processor has caught up with its views and consumes commands.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The error that stopped the processor, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("status lock").clone()
    }
}

impl CommandProcessor {
    /// Starts processing the command `name` of `topology`. `instance` (stable across restarts
    /// of the same state directory) names the transactional producer, so a restarted
    /// instance fences its predecessor and aborts what it left open.
    pub fn start(
        config: &KafkaConfig,
        topology: Arc<Topology>,
        name: &str,
        instance: &str,
        metrics: CommandMetrics,
        dependency: Option<Arc<dyn Dependency>>,
    ) -> Result<CommandProcessor, KafkaError> {
        let index = topology
            .commands
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| KafkaError::Definite(format!("no command `{name}` in the topology")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(ProcessorStatus::default());
        let worker = Worker::new(config, topology, index, instance, metrics, dependency)?;
        let thread = std::thread::Builder::new()
            .name(format!("miroir-cmd-{name}"))
            .spawn({
                let stop = stop.clone();
                let status = status.clone();
                move || worker.run(&stop, &status)
            })
            .map_err(|e| KafkaError::Definite(format!("cannot start the processor: {e}")))?;
        Ok(CommandProcessor {
            stop,
            thread: Some(thread),
            status,
        })
    }

    /// The processor's status.
    pub fn status(&self) -> Arc<ProcessorStatus> {
        self.status.clone()
    }

    /// Finishes the batch in hand, leaves the consumer group and stops.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CommandProcessor {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Longest wait for the views to catch up after an assignment.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);
/// Commands handled in one transaction at most.
const BATCH: usize = 256;
const TX_TIMEOUT: Duration = Duration::from_secs(30);

struct Worker {
    spec: CommandSpec,
    entity: Source,
    /// The command payload's schema, as a source for the decoder.
    payload: Source,
    config: KafkaConfig,
    consumer: BaseConsumer,
    producer: FutureProducer,
    metrics: CommandMetrics,
    dependency: Option<Arc<dyn Dependency>>,
    /// Current entity rows by key, as committed on the entity topic.
    entities: HashMap<String, Row>,
    /// Answers of commands already processed, by command id.
    answered: HashMap<String, Reply>,
    /// Reply topics known to exist, refreshed from metadata.
    reply_topics: HashSet<String>,
    reply_topics_at: Option<Instant>,
    /// Consecutive failed transactions (the backoff grows with them).
    tx_failures: u32,
}

/// One command in a batch, and what became of it.
struct Incoming {
    message: OwnedMessage,
    received: Instant,
    command_id: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    key: Option<String>,
}

enum Step {
    /// Answer without changing the entity; `remember` records the answer under the id
    /// (false for a re-delivery, which gets its first answer again).
    Answer { reply: Reply, remember: bool },
    /// Publish the new entity row.
    Apply { key: String, row: Row, version: i64 },
    /// A dependency kept failing: park the command.
    Park {
        error: String,
        attempts: u32,
        first: SystemTime,
        last: SystemTime,
        entity_version: Option<i64>,
    },
}

impl Worker {
    fn new(
        config: &KafkaConfig,
        topology: Arc<Topology>,
        index: usize,
        instance: &str,
        metrics: CommandMetrics,
        dependency: Option<Arc<dyn Dependency>>,
    ) -> Result<Worker, KafkaError> {
        let spec = topology.commands[index].clone();
        let entity = topology.sources[spec.entity].clone();
        let partitions = partition_count(config, &entity.topic)?.unwrap_or(1);
        // Commands for one entity meet its events' partition: same count, same partitioner.
        create_topic(config, &spec.topic, partitions)?;
        create_topic(config, &format!("{}{DLQ_SUFFIX}", spec.topic), partitions)?;
        create_topic_with(
            config,
            &format!("{}{DONE_SUFFIX}", spec.topic),
            partitions,
            &[
                ("cleanup.policy", "compact,delete"),
                ("retention.ms", "604800000"),
            ],
        )?;
        create_topic(config, &entity.topic, partitions)?;
        let group = format!("{}.{}", topology.name, spec.name);
        let consumer: BaseConsumer = config
            .client()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()?;
        let producer: FutureProducer = config
            .client()
            .set("transactional.id", format!("miroir.{group}.{instance}"))
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "0")
            // A reply topic that disappeared must fail fast, not be re-created by producing.
            .set("allow.auto.create.topics", "false")
            .set("topic.metadata.propagation.max.ms", "2000")
            .set("transaction.timeout.ms", "60000")
            // The coordinator answers "concurrent transactions" while the previous commit's
            // markers are written; librdkafka's default 100 ms backoff before retrying would
            // be most of a command's round trip (measured in docs/benchmarks.md).
            .set("retry.backoff.ms", "5")
            .create()?;
        let payload = Source {
            name: spec.name.clone(),
            topic: spec.topic.clone(),
            columns: spec.columns.clone(),
            key: spec.key,
            late: None,
        };
        Ok(Worker {
            spec,
            entity,
            payload,
            config: config.clone(),
            consumer,
            producer,
            metrics,
            dependency,
            entities: HashMap::new(),
            answered: HashMap::new(),
            reply_topics: HashSet::new(),
            reply_topics_at: None,
            tx_failures: 0,
        })
    }

    fn run(mut self, stop: &AtomicBool, status: &ProcessorStatus) {
        if let Err(e) = self.serve(stop, status) {
            error!(command = %self.spec.name, error = %e, "the command processor stopped");
            *status.failure.lock().expect("status lock") = Some(e.to_string());
        }
        status.ready.store(false, Ordering::Release);
        self.consumer.unsubscribe();
    }

    fn serve(&mut self, stop: &AtomicBool, status: &ProcessorStatus) -> Result<(), KafkaError> {
        self.producer.init_transactions(TX_TIMEOUT)?;
        let mut entities = Tail::open(&self.config, &self.entity.topic)?;
        let mut answered = Tail::open(&self.config, &format!("{}{DONE_SUFFIX}", self.spec.topic))?;
        self.consumer.subscribe(&[&self.spec.topic])?;
        let mut assignment = TopicPartitionList::new();
        info!(command = %self.spec.name, topic = %self.spec.topic, "command processor started");
        while !stop.load(Ordering::Acquire) {
            let batch = self.poll_batch();
            let now = self.consumer.assignment()?;
            if now.elements().len() != assignment.elements().len()
                || now
                    .elements()
                    .iter()
                    .zip(assignment.elements().iter())
                    .any(|(a, b)| a.partition() != b.partition())
            {
                // Partitions moved: what their previous owner committed must be in the views
                // before their next command.
                status.ready.store(false, Ordering::Release);
                entities.catch_up(CATCH_UP_LIMIT, |m| self.entity_event(m))?;
                answered.catch_up(CATCH_UP_LIMIT, |m| self.answer_record(m))?;
                info!(command = %self.spec.name, partitions = now.count(), entities = self.entities.len(), "assignment ready");
                assignment = now;
                status.ready.store(true, Ordering::Release);
            } else {
                entities.drain(|m| self.entity_event(m));
                answered.drain(|m| self.answer_record(m));
            }
            if batch.is_empty() {
                continue;
            }
            self.process(batch, stop)?;
        }
        Ok(())
    }

    fn poll_batch(&mut self) -> Vec<Incoming> {
        let mut batch = Vec::new();
        let mut wait = Duration::from_millis(100);
        while batch.len() < BATCH {
            match self.consumer.poll(wait) {
                Some(Ok(m)) => {
                    let message = m.detach();
                    batch.push(Incoming {
                        command_id: text_header(&message, header::COMMAND_ID),
                        correlation_id: text_header(&message, header::CORRELATION_ID),
                        reply_to: text_header(&message, header::REPLY_TO),
                        key: message
                            .key()
                            .map(|k| String::from_utf8_lossy(k).into_owned()),
                        received: Instant::now(),
                        message,
                    });
                    wait = Duration::ZERO;
                }
                Some(Err(e)) => {
                    warn!(topic = %self.spec.topic, error = %e, "consuming commands");
                    break;
                }
                None => break,
            }
        }
        batch
    }

    /// Applies a committed entity event to the view (newest version wins).
    fn entity_event(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(key) = m.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
            return;
        };
        let Some(payload) = m.payload() else {
            self.entities.remove(&key);
            return;
        };
        match decode(&self.entity, payload) {
            Ok(row) => {
                let version = |r: &Row| match r[self.spec.stamp.version] {
                    Value::Int(v) => v,
                    _ => i64::MIN,
                };
                let newer = self
                    .entities
                    .get(&key)
                    .is_none_or(|old| version(&row) > version(old));
                if newer {
                    self.entities.insert(key, row);
                }
            }
            Err(e) => {
                debug!(topic = %self.entity.topic, partition = m.partition(), offset = m.offset(), key, error = %e,
                             "entity event not understood; the view keeps the previous one")
            }
        }
    }

    fn answer_record(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(id) = m.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
            return;
        };
        match m.payload().map(serde_json::from_slice::<Reply>) {
            Some(Ok(reply)) => {
                self.answered.insert(id, reply);
            }
            None => {
                self.answered.remove(&id);
            }
            Some(Err(e)) => {
                warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = id, error = %e, "bad answer record")
            }
        }
    }

    /// Processes a batch in one transaction. A failed transaction is aborted, the consumer
    /// rewound to the committed offsets, and the batch read again (by this instance, or by the
    /// partition's new owner), after a backoff that grows with consecutive failures.
    fn process(&mut self, batch: Vec<Incoming>, stop: &AtomicBool) -> Result<(), KafkaError> {
        match self.transaction(&batch, stop) {
            Ok(()) => {
                self.tx_failures = 0;
                Ok(())
            }
            Err(TxError::Fatal(e)) => Err(e),
            Err(TxError::Retry(e)) => {
                self.tx_failures += 1;
                let wait = self.spec.retry.delay(self.tx_failures);
                warn!(command = %self.spec.name, error = %e, failures = self.tx_failures,
                      "command transaction failed; aborting, reading the batch again in {wait:?}");
                if let Err(e) = self.producer.abort_transaction(TX_TIMEOUT) {
                    if let TxError::Fatal(e) = TxError::from(e) {
                        return Err(e);
                    }
                }
                self.reply_topics_at = None;
                self.rewind()?;
                std::thread::sleep(wait);
                Ok(())
            }
        }
    }

    /// Seeks every assigned partition back to its committed offset.
    fn rewind(&mut self) -> Result<(), KafkaError> {
        let committed = self.consumer.committed(Duration::from_secs(10))?;
        for e in committed.elements() {
            let offset = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            if let Err(err) =
                self.consumer
                    .seek(e.topic(), e.partition(), offset, Duration::from_secs(10))
            {
                warn!(topic = e.topic(), partition = e.partition(), error = %err, "cannot rewind");
            }
        }
        Ok(())
    }

    fn transaction(&mut self, batch: &[Incoming], stop: &AtomicBool) -> Result<(), TxError> {
        let started = Instant::now();
        self.producer.begin_transaction().map_err(TxError::from)?;
        // Entity rows written in this transaction (commands later in the batch see them).
        let mut written: HashMap<String, Row> = HashMap::new();
        let mut steps = Vec::with_capacity(batch.len());
        let mut deliveries = Vec::new();
        for incoming in batch {
            let step = self.step(incoming, &written, stop);
            match &step {
                Step::Apply { key, row, .. } => {
                    let payload = row_to_json_bytes(&self.entity.columns, row);
                    let headers = command_headers(incoming);
                    let record = FutureRecord::to(&self.entity.topic)
                        .key(key.as_bytes())
                        .payload(payload.as_slice())
                        .headers(headers);
                    deliveries.push(Some(self.send(record)?));
                    written.insert(key.clone(), row.clone());
                }
                Step::Park {
                    error,
                    attempts,
                    first,
                    last,
                    entity_version,
                } => {
                    let m = &incoming.message;
                    let origin = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
                    let attempts = attempts.to_string();
                    let first = rfc3339(*first);
                    let last = rfc3339(*last);
                    let version = entity_version.map(|v| v.to_string());
                    let mut headers = m.headers().cloned().unwrap_or_default();
                    for (key, value) in [
                        (header::ERROR_CLASS, Some("dependency")),
                        (header::ERROR_MESSAGE, Some(error.as_str())),
                        (header::ATTEMPTS, Some(attempts.as_str())),
                        (header::FIRST_FAILURE, Some(first.as_str())),
                        (header::LAST_FAILURE, Some(last.as_str())),
                        (header::ORIGIN, Some(origin.as_str())),
                        (header::ENTITY_VERSION, version.as_deref()),
                    ] {
                        if let Some(value) = value {
                            headers = headers.insert(Header {
                                key,
                                value: Some(value),
                            });
                        }
                    }
                    let dlq = format!("{}{DLQ_SUFFIX}", self.spec.topic);
                    let mut record = FutureRecord::to(&dlq)
                        .headers(headers)
                        .partition(m.partition());
                    if let Some(k) = m.key() {
                        record = record.key(k);
                    }
                    if let Some(p) = m.payload() {
                        record = record.payload(p);
                    }
                    deliveries.push(Some(self.send(record)?));
                }
                Step::Answer { .. } => deliveries.push(None),
            }
            steps.push(step);
        }
        // The consumed offsets join the transaction while the writes are in flight.
        let mut offsets = TopicPartitionList::new();
        for incoming in batch {
            let m = &incoming.message;
            offsets
                .add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))
                .map_err(|e| TxError::Fatal(e.into()))?;
        }
        let group = self.consumer.group_metadata().ok_or_else(|| {
            TxError::Fatal(KafkaError::Definite("no consumer group metadata".into()))
        })?;
        self.producer
            .send_offsets_to_transaction(&offsets, &group, TX_TIMEOUT)
            .map_err(TxError::from)?;
        let offsets_sent = started.elapsed();
        // The replies carry where the entity event or the dead letter landed.
        let mut replies = Vec::with_capacity(batch.len());
        for ((incoming, step), delivery) in batch.iter().zip(steps).zip(deliveries) {
            let landed = match delivery {
                Some(d) => Some(wait_delivery(d)?),
                None => None,
            };
            let (partition, offset) = landed.unwrap_or((-1, -1));
            let (reply, remember) = match step {
                Step::Answer { reply, remember } => (reply, remember),
                Step::Apply { version, .. } => (
                    Reply::Accepted {
                        version,
                        partition,
                        offset,
                    },
                    true,
                ),
                Step::Park { error, .. } => (
                    Reply::Deferred {
                        topic: format!("{}{DLQ_SUFFIX}", self.spec.topic),
                        partition,
                        offset,
                        message: error,
                    },
                    true,
                ),
            };
            replies.push((incoming, reply, remember));
        }
        // A reply topic not seen yet is most likely new (its client waited for it to exist).
        let unseen = replies.iter().any(|(i, _, _)| {
            i.reply_to
                .as_ref()
                .is_some_and(|t| !self.reply_topics.contains(t))
        });
        let written_at = started.elapsed();
        self.refresh_reply_topics(unseen);
        // Awaited here: a commit left to flush them waits on rust-rdkafka's 100 ms poll.
        let mut replies_sent = Vec::new();
        let done_topic = format!("{}{DONE_SUFFIX}", self.spec.topic);
        for (incoming, reply, remember) in &replies {
            let body = serde_json::to_vec(reply).expect("replies serialize");
            if let (true, Some(id)) = (*remember, &incoming.command_id) {
                let record = FutureRecord::to(&done_topic)
                    .key(id.as_bytes())
                    .payload(body.as_slice());
                replies_sent.push(self.send(record)?);
            }
            match &incoming.reply_to {
                Some(topic) if self.reply_topics.contains(topic) => {
                    let mut headers = OwnedHeaders::new();
                    if let Some(c) = &incoming.correlation_id {
                        headers = headers.insert(Header {
                            key: header::CORRELATION_ID,
                            value: Some(c.as_str()),
                        });
                    }
                    if let Some(c) = &incoming.command_id {
                        headers = headers.insert(Header {
                            key: header::COMMAND_ID,
                            value: Some(c.as_str()),
                        });
                    }
                    let mut record = FutureRecord::to(topic)
                        .payload(body.as_slice())
                        .headers(headers);
                    if let Some(k) = &incoming.key {
                        record = record.key(k.as_bytes());
                    }
                    replies_sent.push(self.send(record)?);
                }
                Some(topic) => {
                    info!(topic = %self.spec.topic, partition = incoming.message.partition(), offset = incoming.message.offset(),
                          key = ?incoming.key, reply_to = %topic, "the reply topic is gone (its instance stopped): reply not sent");
                    self.metrics
                        .replies_dropped
                        .with_label_values(&[&self.spec.name])
                        .inc();
                }
                None => {}
            }
        }
        for d in replies_sent {
            wait_delivery(d)?;
        }
        // rust-rdkafka's commit flushes first, and a flush that finds a delivery report not yet
        // released by the producer's polling thread waits 100 ms for another one: let the
        // polling thread finish first (microseconds).
        let settle = Instant::now();
        while self.producer.in_flight_count() > 0 && settle.elapsed() < Duration::from_millis(20) {
            std::thread::yield_now();
        }
        let replied_at = started.elapsed();
        self.producer
            .commit_transaction(TX_TIMEOUT)
            .map_err(TxError::from)?;
        debug!(command = %self.spec.name, commands = batch.len(), offsets_sent = ?offsets_sent,
               written = ?written_at, replied = ?replied_at, committed = ?started.elapsed(), "transaction committed");
        // Committed: the views take what the transaction wrote.
        self.entities.extend(written);
        for (incoming, reply, remember) in replies {
            let m = &incoming.message;
            // Only re-deliveries' answers are not remembered again.
            let outcome = if remember {
                reply.outcome()
            } else {
                "duplicate"
            };
            if remember {
                if let Some(id) = &incoming.command_id {
                    self.answered.insert(id.clone(), reply.clone());
                }
            }
            self.metrics
                .processed
                .with_label_values(&[&self.spec.name, outcome])
                .inc();
            self.metrics
                .processing_seconds
                .with_label_values(&[&self.spec.name])
                .observe(incoming.received.elapsed().as_secs_f64());
            if matches!(reply, Reply::Deferred { .. }) {
                self.metrics
                    .dead_lettered
                    .with_label_values(&[&self.spec.name])
                    .inc();
            }
            if text_header(m, header::PARKED_VERSION).is_some() {
                self.metrics
                    .replayed
                    .with_label_values(&[&self.spec.name])
                    .inc();
            }
            debug!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = ?incoming.key,
                   command_id = ?incoming.command_id, outcome, "command answered");
        }
        Ok(())
    }

    /// Decides one command: duplicates get their first answer, dependency failures are
    /// retried here (the batch's transaction stays open) and then parked.
    fn step(&self, incoming: &Incoming, written: &HashMap<String, Row>, stop: &AtomicBool) -> Step {
        let m = &incoming.message;
        let replay = text_header(m, header::PARKED_VERSION);
        if let Some(previous) = incoming
            .command_id
            .as_ref()
            .and_then(|id| self.answered.get(id))
        {
            // A re-delivery: same answer, no second effect. A replay may take up a parked one.
            if !(replay.is_some() && matches!(previous, Reply::Deferred { .. })) {
                info!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = ?incoming.key,
                      command_id = ?incoming.command_id, "command already answered: sending the same answer");
                return Step::Answer {
                    reply: previous.clone(),
                    remember: false,
                };
            }
        }
        let reject = |code: &str, message: String| Step::Answer {
            reply: Reply::Rejected {
                code: code.into(),
                field: None,
                message,
            },
            remember: true,
        };
        let command_type = text_header(m, header::COMMAND_TYPE);
        if command_type.as_deref() != Some(self.spec.operation.as_str()) {
            warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = ?incoming.key,
                  command_type = ?command_type, "unknown command type");
            return reject(
                "unknown_command",
                format!(
                    "{} accepts {} commands, not {}",
                    self.spec.topic,
                    self.spec.operation,
                    command_type.as_deref().unwrap_or("untyped ones")
                ),
            );
        }
        let version = text_header(m, header::SCHEMA_VERSION)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1);
        if version > self.spec.schema_version {
            return reject(
                "unsupported_schema_version",
                format!(
                    "schema version {version} is newer than the processor's {}",
                    self.spec.schema_version
                ),
            );
        }
        let Some(principal_id) = text_header(m, header::PRINCIPAL).filter(|p| !p.is_empty()) else {
            return Step::Answer {
                reply: Reply::Forbidden {
                    message: "the command carries no principal".into(),
                },
                remember: true,
            };
        };
        let principal = Principal {
            id: principal_id,
            roles: text_header(m, header::ROLES)
                .map(|r| {
                    r.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        };
        let payload = match m.payload().map(|p| decode(&self.payload, p)) {
            Some(Ok(row)) => row,
            Some(Err(e)) => {
                warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = ?incoming.key, error = %e, "malformed command");
                return reject("malformed", e.to_string());
            }
            None => return reject("malformed", "the command has no payload".into()),
        };
        let Some(key) = self.spec.entity_key(&payload) else {
            return reject(
                "malformed",
                format!(
                    "the key field `{}` is null",
                    self.spec.columns[self.spec.key].name
                ),
            );
        };
        let current = written.get(&key).or_else(|| self.entities.get(&key));
        let request = Request {
            payload: &payload,
            principal: &principal,
            deadline_ms: text_header(m, header::DEADLINE).and_then(|d| d.parse().ok()),
            parked_at_version: replay.and_then(|v| v.parse().ok()),
        };
        let now = now_micros();
        let decision = self
            .spec
            .decide(&self.entity, &request, current.map(|r| r.as_slice()), now);
        let (row, version) = match decision {
            Decision::Answer(reply) => {
                info!(
                    topic = m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    key,
                    outcome = reply.outcome(),
                    "command not applied"
                );
                return Step::Answer {
                    reply,
                    remember: true,
                };
            }
            Decision::Apply { entity, version } => (entity, version),
        };
        let Some(dependency) = self.dependency.clone() else {
            return Step::Apply { key, row, version };
        };
        let json = row_to_json(&self.spec.columns, &payload);
        let mut first = None;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match dependency.check(&self.spec, &key, &json) {
                Ok(()) => return Step::Apply { key, row, version },
                Err(error) => {
                    let failed_at = SystemTime::now();
                    let first = *first.get_or_insert(failed_at);
                    if attempts >= self.spec.retry.attempts || stop.load(Ordering::Acquire) {
                        warn!(
                            topic = m.topic(),
                            partition = m.partition(),
                            offset = m.offset(),
                            key,
                            attempts,
                            error,
                            "dependency kept failing: the command goes to the dead-letter topic"
                        );
                        return Step::Park {
                            error,
                            attempts,
                            first,
                            last: failed_at,
                            entity_version: current.map(|r| &r[self.spec.stamp.version]).and_then(
                                |v| match v {
                                    Value::Int(v) => Some(*v),
                                    _ => None,
                                },
                            ),
                        };
                    }
                    self.metrics
                        .retries
                        .with_label_values(&[&self.spec.name])
                        .inc();
                    let wait = self.spec.retry.delay(attempts);
                    info!(
                        topic = m.topic(),
                        partition = m.partition(),
                        offset = m.offset(),
                        key,
                        attempts,
                        error,
                        "dependency failed; retrying in {wait:?}"
                    );
                    std::thread::sleep(wait);
                }
            }
        }
    }

    fn send(
        &self,
        mut record: FutureRecord<'_, [u8], [u8]>,
    ) -> Result<rdkafka::producer::DeliveryFuture, TxError> {
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(TxError::from(e)),
            }
        }
    }

    /// Refreshes the set of existing reply topics: every 5 s (topics of stopped instances
    /// leave it), and at once when `unseen` names a topic not in it.
    fn refresh_reply_topics(&mut self, unseen: bool) {
        let fresh = if unseen {
            Duration::from_millis(20)
        } else {
            Duration::from_secs(5)
        };
        if self.reply_topics_at.is_some_and(|t| t.elapsed() < fresh) {
            return;
        }
        // The producer's connections, not the consumer's: a consumer connection waits out its
        // long-polling fetch before it answers a metadata request.
        match topics(self.producer.client()) {
            Ok(list) => {
                self.reply_topics = list.into_iter().map(|(t, _)| t).collect();
                self.reply_topics_at = Some(Instant::now());
            }
            Err(e) => {
                warn!(error = %e, "cannot list topics; keeping the previous list of reply topics")
            }
        }
    }
}

/// A transaction failure: retry the batch, or stop (the producer was fenced or broke).
enum TxError {
    Retry(KafkaError),
    Fatal(KafkaError),
}

impl From<rdkafka::error::KafkaError> for TxError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        match &e {
            rdkafka::error::KafkaError::Transaction(t) if t.is_fatal() => TxError::Fatal(e.into()),
            _ => TxError::Retry(e.into()),
        }
    }
}

fn wait_delivery(d: rdkafka::producer::DeliveryFuture) -> Result<(i32, i64), TxError> {
    match futures_executor::block_on(d) {
        Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
        Ok(Err((e, _))) => Err(TxError::from(e)),
        Err(_) => Err(TxError::Retry(KafkaError::Definite(
            "the producer dropped a delivery".into(),
        ))),
    }
}

fn command_headers(incoming: &Incoming) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(id) = &incoming.command_id {
        headers = headers.insert(Header {
            key: header::COMMAND_ID,
            value: Some(id.as_str()),
        });
    }
    if let Some(p) = text_header(&incoming.message, header::PRINCIPAL) {
        headers = headers.insert(Header {
            key: header::PRINCIPAL,
            value: Some(p.as_str()),
        });
    }
    headers
}

/// The text of header `name`, if present and UTF-8.
pub fn text_header(m: &impl Message, name: &str) -> Option<String> {
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn rfc3339(t: SystemTime) -> String {
    let micros = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    miroir_engine::value::format_timestamp(micros)
}
