//! A lane: the transactions of the command partitions mapped to it, written by three
//! producers in turn and committed on their own threads. Lanes run their transactions side by
//! side, so one slow transaction does not hold every partition.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use miroir_engine::command::{Decision, Principal, Reply, Request};
use miroir_engine::decode::decode;
use miroir_engine::value::{row_to_json, row_to_json_bytes, Row};
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::{header, text_header, Incoming, ReplyTopics, Shared, DONE_SUFFIX, TX_TIMEOUT};
use crate::kafka::dlq::dlq_topic;
use crate::kafka::{KafkaConfig, KafkaError};

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

/// Three transactional producers taking turns, the transaction committing, and the lane's run
/// of failures.
///
/// Transactions overlap by half: once a transaction's records are all sent, its commit
/// (waiting for the replies to be written, then `EndTxn`) runs on a thread of its own while
/// the next batch is decided and written by the next producer, on its own connections. The
/// next transaction builds on the rows the previous one wrote, produces its entity events
/// after the previous one's are in the log (so each key's events keep their order), and
/// commits only once the previous one has: if that one fails, both are aborted and their
/// commands read again.
///
/// Taking turns keeps librdkafka's fixed 20 ms retry out of the way: until the markers of a
/// producer's last transaction are written, the coordinator answers its next transaction with
/// "concurrent transactions", and librdkafka retries adding a partition (which the first
/// record to it does) after 20 ms. With two producers, a producer's next transaction started
/// as soon as its last one committed (the other one's ran meanwhile) and met the retry in about
/// 1% of transactions; with three, a whole transaction runs in between. Adding the offsets
/// first instead would rule the retry out, but costs every transaction the round trips the
/// offsets now take while the entity events are written (measured in docs/benchmarks.md).
pub(super) struct Lane {
    producers: [FutureProducer; 3],
    /// Which producer runs the next transaction.
    turn: usize,
    /// Whether that producer has a transaction open (not yet handed to its commit).
    open: bool,
    /// The previous transaction, while it commits.
    committing: Option<Committing>,
    /// Consecutive failed transactions (the backoff grows with them).
    pub(super) failures: u32,
}

/// A transaction whose records are all sent, committing on its own thread.
struct Committing {
    /// The entity rows it wrote: the next transaction builds on them.
    written: Arc<HashMap<String, Row>>,
    thread: JoinHandle<Result<(), TxError>>,
}

/// What a transaction answered a command, kept for after its commit.
struct Answered {
    /// Where the command was read in the command topic.
    partition: i32,
    offset: i64,
    key: Option<String>,
    command_id: Option<String>,
    reply: Reply,
    /// False for a re-delivery, which got its first answer again.
    remember: bool,
    /// Until when the answer is remembered (ms since the epoch).
    until_ms: i64,
    received: Instant,
    replayed: bool,
}

impl Lane {
    /// A lane for `transactional_id` (its producers are `<transactional_id>`,
    /// `<transactional_id>.b` and `<transactional_id>.c`); fences and aborts what previous
    /// holders of the ids left.
    pub(super) fn new(config: &KafkaConfig, transactional_id: &str) -> Result<Lane, KafkaError> {
        Ok(Lane {
            producers: [
                Lane::transactional(config, transactional_id)?,
                Lane::transactional(config, &format!("{transactional_id}.b"))?,
                Lane::transactional(config, &format!("{transactional_id}.c"))?,
            ],
            turn: 0,
            open: false,
            committing: None,
            failures: 0,
        })
    }

    fn transactional(
        config: &KafkaConfig,
        transactional_id: &str,
    ) -> Result<FutureProducer, KafkaError> {
        let producer: FutureProducer = config
            .client("lane")
            .set("transactional.id", transactional_id)
            .set("partitioner", "murmur2_random")
            // Half a millisecond gathers the replies of a transaction, which go out as their
            // entity events land, into fewer produce requests: at 1,000 commands/s the p99
            // round trip went from 23-33 ms to 19-25 ms (p50 12.6 to 11.2 ms) in alternated
            // runs; 1 ms was no better (docs/benchmarks.md).
            .set("linger.ms", "0.5")
            // A reply topic that disappeared must fail fast, not be re-created by producing.
            .set("allow.auto.create.topics", "false")
            .set("topic.metadata.propagation.max.ms", "2000")
            .set("transaction.timeout.ms", "60000")
            // A record the broker keeps refusing (its reply topic was deleted after it was last
            // looked up: the broker answers "unknown partition", which librdkafka retries) fails
            // after 10 s instead of the transaction's 60 s, and with it the transaction, which
            // is then retried; meanwhile the lane waits.
            .set("message.timeout.ms", "10000")
            // The coordinator answers "concurrent transactions" while the previous commit's
            // markers are written, which a busy lane meets at the start of most transactions;
            // librdkafka's default 100 ms backoff before retrying would be most of a command's
            // round trip, and 5 ms still doubled the time to add the offsets at the 90th
            // percentile (measured in docs/benchmarks.md).
            .set("retry.backoff.ms", "1")
            // librdkafka doubles the backoff at each retry (up to 1 s by default): the
            // markers take milliseconds, so retry at a steady pace instead.
            .set("retry.backoff.max.ms", "2")
            .create()?;
        producer.init_transactions(TX_TIMEOUT)?;
        Ok(producer)
    }

    /// The producer of the current transaction.
    fn producer(&self) -> &FutureProducer {
        &self.producers[self.turn]
    }

    /// Aborts the open transaction (after a failure).
    /// Returns whether a transaction was open.
    pub(super) fn abort(&mut self) -> Result<bool, KafkaError> {
        if !std::mem::take(&mut self.open) {
            return Ok(false);
        }
        match self.producer().abort_transaction(TX_TIMEOUT) {
            Ok(()) => Ok(true),
            Err(e) => match TxError::from(e) {
                TxError::Fatal(e) => Err(e),
                TxError::Retry(_) => Ok(true),
            },
        }
    }

    /// Processes `batch` (commands of this lane's partitions, in order) in one transaction:
    /// entity events, dead letters, replies, the ids of the commands not accepted, and the
    /// consumed offsets. Returns once the records are sent and the previous transaction has
    /// committed; this one commits on its own thread (see [`Lane::settle`]). An error leaves
    /// this transaction open, for [`Lane::abort`].
    pub(super) fn transaction(
        &mut self,
        shared: &Arc<Shared>,
        batch: &[&Incoming],
        group: &ConsumerGroupMetadata,
        stop: &AtomicBool,
    ) -> Result<(), TxError> {
        let started = Instant::now();
        self.producer().begin_transaction().map_err(TxError::from)?;
        self.open = true;
        // Entity rows written in this transaction (commands later in the batch see them).
        let mut written: HashMap<String, Row> = HashMap::new();
        let mut steps = Vec::with_capacity(batch.len());
        let mut deliveries = Vec::new();
        // Computed once: the entity event, the answered-id record and the view carry the same.
        let untils: Vec<i64> = batch.iter().map(|i| i.answer_until()).collect();
        for (incoming, until) in batch.iter().zip(&untils) {
            let step = shared.step(incoming, &self.unsaved(&written), stop);
            match &step {
                Step::Apply { key, row, .. } => {
                    let payload = row_to_json_bytes(&shared.entity.columns, row);
                    let headers = command_headers(incoming, *until);
                    let record = FutureRecord::to(&shared.entity.topic)
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
                    let dlq = dlq_topic(&shared.spec.topic);
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
        self.producer()
            .send_offsets_to_transaction(&offsets, group, TX_TIMEOUT)
            .map_err(TxError::from)?;
        let offsets_sent = started.elapsed();
        let reply_exists: Vec<bool> = {
            let mut known = shared.reply_topics.lock().expect("reply topics lock");
            let mut stale: Vec<&str> = batch
                .iter()
                .filter_map(|i| i.reply_to.as_deref())
                .filter(|t| known.stale(t))
                .collect();
            stale.sort_unstable();
            stale.dedup();
            for topic in stale {
                self.check_reply_topic(&mut known, topic);
            }
            batch
                .iter()
                .map(|i| i.reply_to.as_deref().is_some_and(|t| known.exists(t)))
                .collect()
        };
        // Awaited by the commit: a commit left to flush them waits on rust-rdkafka's 100 ms poll.
        let mut replies_sent = Vec::new();
        let done_topic = format!("{}{DONE_SUFFIX}", shared.spec.topic);
        // Every answered id of the transaction goes to one partition of the topic, the first
        // command's: each partition a transaction touches costs the broker a produce request,
        // a check that the partition joined the transaction, and a marker. Where an id lands
        // does not matter: every processor reads the whole topic.
        let done_partition = batch.first().map_or(0, |i| i.message.partition());
        // The replies carry where the entity event or the dead letter landed; each goes out as
        // soon as its command's record has landed, so the reply topic joins the transaction
        // while the other partitions' records are still being written.
        let mut answered = Vec::with_capacity(batch.len());
        for ((((incoming, step), delivery), exists), until_ms) in batch
            .iter()
            .zip(steps)
            .zip(deliveries)
            .zip(reply_exists)
            .zip(untils)
        {
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
                        topic: dlq_topic(&shared.spec.topic),
                        partition,
                        offset,
                        message: error,
                    },
                    true,
                ),
            };
            let body = serde_json::to_vec(&reply).expect("replies serialize");
            // An accepted command's id is in its entity event's headers, where every processor
            // reads it back: only the other answers need a record of their own.
            let accepted = matches!(reply, Reply::Accepted { .. });
            if let (true, false, Some(id)) = (remember, accepted, &incoming.command_id) {
                let headers = OwnedHeaders::new().insert(Header {
                    key: header::ANSWER_UNTIL,
                    value: Some(until_ms.to_string().as_str()),
                });
                let record = FutureRecord::to(&done_topic)
                    .key(id.as_bytes())
                    .payload(body.as_slice())
                    .headers(headers)
                    .partition(done_partition);
                replies_sent.push(self.send(record)?);
            }
            match &incoming.reply_to {
                Some(topic) if exists => {
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
                    info!(topic = %shared.spec.topic, partition = incoming.message.partition(), offset = incoming.message.offset(),
                          key = ?incoming.key, reply_to = %topic, "the reply topic is gone (its instance stopped): reply not sent");
                    shared
                        .metrics
                        .replies_dropped
                        .with_label_values(&[&shared.spec.name])
                        .inc();
                }
                None => {}
            }
            answered.push(Answered {
                partition: incoming.message.partition(),
                offset: incoming.message.offset(),
                key: incoming.key.clone(),
                command_id: incoming.command_id.clone(),
                reply,
                remember,
                until_ms,
                received: incoming.received,
                replayed: incoming.parked_version.is_some(),
            });
        }
        let written_at = started.elapsed();
        // This transaction built on what the previous one wrote: it commits after it.
        self.settle(true)?;
        let written = Arc::new(written);
        let thread = std::thread::Builder::new()
            .name("miroir-commit".into())
            .spawn({
                let (shared, producer, written) =
                    (shared.clone(), self.producer().clone(), written.clone());
                let commands = batch.len();
                move || {
                    let timing = Timing {
                        started,
                        commands,
                        offsets_sent,
                        written: written_at,
                    };
                    commit(&shared, &producer, replies_sent, answered, &written, timing)
                }
            })
            .map_err(|e| {
                TxError::Fatal(KafkaError::Definite(format!(
                    "cannot start a commit thread: {e}"
                )))
            })?;
        self.committing = Some(Committing { written, thread });
        self.open = false;
        self.turn = (self.turn + 1) % self.producers.len();
        Ok(())
    }

    /// The rows of an uncommitted transaction, newest first: this one's, then the previous
    /// one's while it commits.
    fn unsaved<'a>(&'a self, written: &'a HashMap<String, Row>) -> Unsaved<'a> {
        Unsaved {
            this: written,
            previous: self.committing.as_ref().map(|c| &*c.written),
        }
    }

    /// Waits for the transaction committing, if any (`wait`), or takes its result if it is
    /// done. A failed commit has aborted its transaction.
    pub(super) fn settle(&mut self, wait: bool) -> Result<(), TxError> {
        match self.committing.take() {
            Some(c) if wait || c.thread.is_finished() => {
                c.thread.join().unwrap_or_else(|_| {
                    Err(TxError::Fatal(KafkaError::Definite(
                        "a commit thread panicked".into(),
                    )))
                })?;
                self.failures = 0;
                Ok(())
            }
            other => {
                self.committing = other;
                Ok(())
            }
        }
    }

    fn send(
        &self,
        mut record: FutureRecord<'_, [u8], [u8]>,
    ) -> Result<rdkafka::producer::DeliveryFuture, TxError> {
        loop {
            match self.producer().send_result(record) {
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

    /// Asks the broker whether reply topic `topic` exists (only that topic: listing every
    /// topic of a large cluster for each new reply topic would cost it far more).
    fn check_reply_topic(&self, known: &mut ReplyTopics, topic: &str) {
        // The producer's connections, not the consumer's: a consumer connection waits out its
        // long-polling fetch before it answers a metadata request.
        match self
            .producer()
            .client()
            .fetch_metadata(Some(topic), TX_TIMEOUT)
        {
            Ok(metadata) => {
                let exists = metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none());
                known.note(topic, exists);
            }
            Err(e) => {
                warn!(reply_to = %topic, error = %e, "cannot look the reply topic up; keeping what was known of it")
            }
        }
    }
}

impl Shared {
    /// Decides one command: duplicates get their first answer, dependency failures are
    /// retried here (the batch's transaction stays open) and then parked.
    fn step(&self, incoming: &Incoming, written: &Unsaved<'_>, stop: &AtomicBool) -> Step {
        let m = &incoming.message;
        if let Some(previous) = incoming.command_id.as_ref().and_then(|id| {
            self.answered
                .lock()
                .expect("answered lock")
                .get(id)
                .cloned()
        }) {
            // A re-delivery: same answer, no second effect. A replay may take up a parked one.
            if !(incoming.parked_version.is_some() && matches!(previous, Reply::Deferred { .. })) {
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
        let roles = text_header(m, header::ROLES).unwrap_or_default();
        let principal = Principal::new(principal_id, &roles);
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
        // The message key places the command in its entity's partition, so in one lane and in
        // order with the entity's other commands: a payload naming another entity would race.
        if incoming.key.as_deref() != Some(key.as_str()) {
            return reject(
                "malformed",
                format!(
                    "the message key ({}) must be the entity key ({key})",
                    incoming.key.as_deref().unwrap_or("none")
                ),
            );
        }
        let current: Option<Row> = written.get(&key).cloned().or_else(|| {
            self.entities
                .lock()
                .expect("entities lock")
                .get(&key)
                .cloned()
        });
        let request = Request {
            payload: &payload,
            principal: &principal,
            deadline_ms: text_header(m, header::DEADLINE).and_then(|d| d.parse().ok()),
            parked_at_version: incoming.parked_version,
        };
        let now = now_micros();
        let decision = self
            .spec
            .decide(&self.entity, &request, current.as_deref(), now);
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
                            entity_version: current.as_ref().and_then(|r| self.spec.version_of(r)),
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
}

/// Rows written by transactions not committed yet.
struct Unsaved<'a> {
    this: &'a HashMap<String, Row>,
    previous: Option<&'a HashMap<String, Row>>,
}

impl Unsaved<'_> {
    fn get(&self, key: &str) -> Option<&Row> {
        self.this
            .get(key)
            .or_else(|| self.previous.and_then(|p| p.get(key)))
    }
}

/// When a transaction's steps ended, for its debug line.
struct Timing {
    started: Instant,
    commands: usize,
    offsets_sent: Duration,
    written: Duration,
}

/// Commits a transaction once its last records are written (on its own thread), then
/// updates the views and the metrics; aborts it on failure.
fn commit(
    shared: &Shared,
    producer: &FutureProducer,
    sent: Vec<rdkafka::producer::DeliveryFuture>,
    answered: Vec<Answered>,
    written: &HashMap<String, Row>,
    timing: Timing,
) -> Result<(), TxError> {
    let committed = (|| {
        for d in sent {
            wait_delivery(d)?;
        }
        // rust-rdkafka's commit flushes first, and a flush that finds a delivery report not
        // yet released by the producer's polling thread waits 100 ms for another one: let the
        // polling thread finish first (microseconds).
        let settle = Instant::now();
        while producer.in_flight_count() > 0 && settle.elapsed() < Duration::from_millis(20) {
            std::thread::yield_now();
        }
        let replied = timing.started.elapsed();
        producer
            .commit_transaction(TX_TIMEOUT)
            .map_err(TxError::from)?;
        Ok(replied)
    })();
    let replied = match committed {
        Ok(replied) => replied,
        Err(e) => {
            shared
                .metrics
                .aborted_transactions
                .with_label_values(&[&shared.spec.name])
                .inc();
            return match producer
                .abort_transaction(TX_TIMEOUT)
                .map_err(TxError::from)
            {
                Err(TxError::Fatal(fatal)) => Err(TxError::Fatal(fatal)),
                _ => Err(e),
            };
        }
    };
    debug!(command = %shared.spec.name, commands = timing.commands, offsets_sent = ?timing.offsets_sent,
           written = ?timing.written, replied = ?replied, committed = ?timing.started.elapsed(), "transaction committed");
    // Committed: the views take what the transaction wrote.
    shared
        .entities
        .lock()
        .expect("entities lock")
        .extend(written.iter().map(|(k, r)| (k.clone(), r.clone())));
    for a in answered {
        // Only re-deliveries' answers are not remembered again.
        let outcome = if a.remember {
            a.reply.outcome()
        } else {
            "duplicate"
        };
        let name = shared.spec.name.as_str();
        let metrics = &shared.metrics;
        metrics.processed.with_label_values(&[name, outcome]).inc();
        metrics
            .processing_seconds
            .with_label_values(&[name])
            .observe(a.received.elapsed().as_secs_f64());
        if matches!(a.reply, Reply::Deferred { .. }) {
            metrics.dead_lettered.with_label_values(&[name]).inc();
        }
        if a.replayed {
            metrics.replayed.with_label_values(&[name]).inc();
        }
        debug!(topic = %shared.spec.topic, partition = a.partition, offset = a.offset, key = ?a.key,
               command_id = ?a.command_id, outcome, "command answered");
        if let (true, Some(id)) = (a.remember, a.command_id) {
            shared
                .answered
                .lock()
                .expect("answered lock")
                .remember(id, a.until_ms, a.reply);
        }
    }
    shared.report_answers_kept(shared.answered.lock().expect("answered lock").len());
    Ok(())
}

/// A transaction failure: retry the batch, or stop (the producer was fenced or broke).
pub(super) enum TxError {
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

/// The headers of a command's entity event: its command id, until when processors remember its
/// answer (`until`, ms since the epoch), and its principal.
fn command_headers(incoming: &Incoming, until: i64) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(id) = &incoming.command_id {
        let until = until.to_string();
        headers = headers
            .insert(Header {
                key: header::COMMAND_ID,
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: header::ANSWER_UNTIL,
                value: Some(until.as_str()),
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
