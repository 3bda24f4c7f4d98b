//! A lane: the transactions of the command partitions mapped to it, written by three
//! producers in turn and committed on their own threads. Lanes run their transactions side by
//! side, so one slow transaction does not hold every partition.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use miroir_engine::command::{Command, Decision, Principal, Reply};
use miroir_engine::error::ErrorClass;
use miroir_engine::value::{row_to_json, row_to_json_bytes, Row};
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::dependency::DependencyError;
use super::incoming::Incoming;
use super::view::{ReplyTopics, Shared};
use crate::commands::wire::{
    answer_headers, dead_letter_headers, dlq_topic, done_topic, is_reply_topic, now_micros,
    resolution_headers, Parking,
};
use crate::kafka::{KafkaConfig, KafkaError};

/// Longest wait for the transaction coordinator (init, offsets, commit, abort) and for a reply
/// topic's metadata.
const TX_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether an answer is kept under its command's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kept {
    /// The command's answer: remembered, so that a re-delivery gets it again.
    Yes,
    /// A re-delivery's: its first answer again, counted as a duplicate.
    Again,
    /// Who sends it is not established (or may not replay it): not the command's answer, so
    /// a later send or replay of the id is decided anew.
    No,
}

enum Step {
    /// Answer without changing the entity.
    Answer { reply: Reply, kept: Kept },
    /// Publish the new entity row.
    Apply {
        command: Command,
        row: Row,
        version: i64,
    },
    /// A re-delivery of the command at this index of the same transaction: it gets that
    /// command's answer, and has no effect of its own.
    Again { first: usize },
    /// A dependency kept failing: park the command, with the principal it acts for.
    Park(Parking, Principal),
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
    /// The answers it gives, by command id: the next transaction answers a re-delivery with
    /// them.
    answers: Arc<HashMap<String, Reply>>,
    thread: JoinHandle<Result<(), KafkaError>>,
}

/// What a transaction answered a command, kept for after its commit.
struct Answered {
    /// Where the command was read in the command topic.
    partition: i32,
    offset: i64,
    key: Option<String>,
    command_id: Option<String>,
    reply: Reply,
    kept: Kept,
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
            Err(e) => match KafkaError::from(e) {
                e if e.class() == ErrorClass::Fatal => Err(e),
                _ => Ok(true),
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
    ) -> Result<(), KafkaError> {
        let started = Instant::now();
        self.producer()
            .begin_transaction()
            .map_err(KafkaError::from)?;
        self.open = true;
        // Entity rows written in this transaction (commands later in the batch see them).
        let mut written: HashMap<String, Row> = HashMap::new();
        // The command ids answered in this transaction: a re-delivery in the same batch gets
        // the first one's answer.
        let mut firsts: HashMap<&str, usize> = HashMap::new();
        let mut steps = Vec::with_capacity(batch.len());
        let mut deliveries = Vec::new();
        // Computed once: the entity event, the answered-id record and the view carry the same.
        let untils: Vec<i64> = batch.iter().map(|i| i.answer_until()).collect();
        for (index, (incoming, until)) in batch.iter().zip(&untils).enumerate() {
            let id = incoming.headers.command_id.as_deref();
            let step = match id.and_then(|id| firsts.get(id)) {
                Some(&first) => {
                    let m = &incoming.message;
                    info!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = ?incoming.key,
                          command_id = ?id, "command delivered twice in one transaction: the copy gets the first answer");
                    Step::Again { first }
                }
                None => shared.step(incoming, &self.unsaved(&written), stop)?,
            };
            if let (Some(id), false) = (
                id,
                matches!(
                    step,
                    Step::Answer {
                        kept: Kept::Again | Kept::No,
                        ..
                    } | Step::Again { .. }
                ),
            ) {
                firsts.insert(id, index);
            }
            match &step {
                Step::Apply {
                    command,
                    row,
                    version,
                } => {
                    let key = &command.key;
                    // A delete is a tombstone: no payload, its version in a header.
                    let payload = (!shared.spec.is_deleted(row))
                        .then(|| row_to_json_bytes(&shared.entity.columns, row));
                    let headers = incoming.headers.entity_event(*until, command, *version);
                    let mut record = FutureRecord::to(&shared.entity.topic)
                        .key(key.as_bytes())
                        .headers(headers);
                    if let Some(payload) = &payload {
                        record = record.payload(payload.as_slice());
                    }
                    deliveries.push(Some(self.send(record)?));
                    written.insert(key.clone(), row.clone());
                }
                Step::Park(parking, principal) => {
                    let m = &incoming.message;
                    let verified = incoming.headers.verified(principal);
                    let headers = dead_letter_headers(m, &verified, parking);
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
                Step::Answer { .. } | Step::Again { .. } => deliveries.push(None),
            }
            steps.push(step);
        }
        // The consumed offsets join the transaction while the writes are in flight.
        let mut offsets = TopicPartitionList::new();
        for incoming in batch {
            let m = &incoming.message;
            offsets
                .add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))
                .map_err(KafkaError::fatal)?;
        }
        self.producer()
            .send_offsets_to_transaction(&offsets, group, TX_TIMEOUT)
            .map_err(KafkaError::from)?;
        let offsets_sent = started.elapsed();
        let reply_exists: Vec<bool> = {
            let mut known = shared.reply_topics.lock();
            let mut stale: Vec<&str> = batch
                .iter()
                .filter_map(|i| i.headers.reply_to.as_deref())
                .filter(|t| is_reply_topic(t) && known.stale(t))
                .collect();
            stale.sort_unstable();
            stale.dedup();
            for topic in stale {
                self.check_reply_topic(&mut known, topic);
            }
            batch
                .iter()
                .map(|i| {
                    i.headers
                        .reply_to
                        .as_deref()
                        .is_some_and(|t| known.exists(t))
                })
                .collect()
        };
        // Awaited by the commit: a commit left to flush them waits on rust-rdkafka's 100 ms poll.
        let mut replies_sent = Vec::new();
        let done_topic = done_topic(&shared.spec.topic);
        let dlq = dlq_topic(&shared.spec.topic);
        // Every answered id of the transaction goes to one partition of the topic, the first
        // command's: each partition a transaction touches costs the broker a produce request,
        // a check that the partition joined the transaction, and a marker. Where an id lands
        // does not matter: every processor reads the whole topic.
        let done_partition = batch.first().map_or(0, |i| i.message.partition());
        // The replies carry where the entity event or the dead letter landed; each goes out as
        // soon as its command's record has landed, so the reply topic joins the transaction
        // while the other partitions' records are still being written.
        let mut answered: Vec<Answered> = Vec::with_capacity(batch.len());
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
            let (reply, kept) = match step {
                Step::Answer { reply, kept } => (reply, kept),
                Step::Again { first } => (answered[first].reply.clone(), Kept::Again),
                Step::Apply { version, .. } => (
                    Reply::Accepted {
                        version,
                        partition,
                        offset,
                    },
                    Kept::Yes,
                ),
                Step::Park(parking, _) => (
                    Reply::Deferred {
                        topic: dlq_topic(&shared.spec.topic),
                        partition,
                        offset,
                        message: parking.error,
                    },
                    Kept::Yes,
                ),
            };
            let body = serde_json::to_vec(&reply).expect("replies serialize");
            // An accepted command's id is in its entity event's headers, where every processor
            // reads it back: only the other answers need a record of their own.
            let accepted = matches!(reply, Reply::Accepted { .. });
            if let (Kept::Yes, false, Some(id)) = (kept, accepted, &incoming.headers.command_id) {
                let headers = answer_headers(until_ms);
                let record = FutureRecord::to(&done_topic)
                    .key(id.as_bytes())
                    .payload(body.as_slice())
                    .headers(headers)
                    .partition(done_partition);
                replies_sent.push(self.send(record)?);
            }
            if kept != Kept::No {
                if let Some(record) = resolution(&dlq, incoming) {
                    replies_sent.push(self.send(record)?);
                }
            }
            match &incoming.headers.reply_to {
                Some(topic) if !is_reply_topic(topic) => {
                    warn!(topic = %shared.spec.topic, partition = incoming.message.partition(), offset = incoming.message.offset(),
                          key = ?incoming.key, reply_to = %topic, "the reply-to header names a topic that is not a reply topic (miroir.reply.*): reply not sent");
                    shared
                        .metrics
                        .replies_refused
                        .with_label_values(&[&shared.spec.name])
                        .inc();
                }
                Some(topic) if exists => {
                    let mut record = FutureRecord::to(topic)
                        .payload(body.as_slice())
                        .headers(incoming.headers.reply());
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
                command_id: incoming.headers.command_id.clone(),
                reply,
                kept,
                until_ms,
                received: incoming.received,
                replayed: incoming.replayed(),
            });
        }
        let written_at = started.elapsed();
        // This transaction built on what the previous one wrote: it commits after it.
        self.settle(true)?;
        let written = Arc::new(written);
        let answers: HashMap<String, Reply> = answered
            .iter()
            .filter(|a| a.kept == Kept::Yes)
            .filter_map(|a| Some((a.command_id.clone()?, a.reply.clone())))
            .collect();
        let answers = Arc::new(answers);
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
            .map_err(|source| KafkaError::Thread {
                name: "commit",
                source,
            })?;
        self.committing = Some(Committing {
            written,
            answers,
            thread,
        });
        self.open = false;
        self.turn = (self.turn + 1) % self.producers.len();
        Ok(())
    }

    /// What uncommitted transactions did: the rows this one wrote, then the previous one's
    /// rows and answers while it commits.
    fn unsaved<'a>(&'a self, written: &'a HashMap<String, Row>) -> Unsaved<'a> {
        Unsaved {
            this: written,
            previous: self.committing.as_ref().map(|c| &*c.written),
            previous_answers: self.committing.as_ref().map(|c| &*c.answers),
        }
    }

    /// Waits for the transaction committing, if any (`wait`), or takes its result if it is
    /// done. A failed commit has aborted its transaction.
    pub(super) fn settle(&mut self, wait: bool) -> Result<(), KafkaError> {
        match self.committing.take() {
            Some(c) if wait || c.thread.is_finished() => {
                c.thread
                    .join()
                    .unwrap_or(Err(KafkaError::Panicked("commit")))?;
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
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
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
                Err((e, _)) => return Err(KafkaError::from(e)),
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
    fn step(
        &self,
        incoming: &Incoming,
        written: &Unsaved<'_>,
        stop: &AtomicBool,
    ) -> Result<Step, KafkaError> {
        let m = &incoming.message;
        if let Some(previous) = self.previous_answer(incoming, written) {
            info!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = ?incoming.key,
                  command_id = ?incoming.headers.command_id, "command already answered: sending the same answer");
            return Ok(Step::Answer {
                reply: previous,
                kept: Kept::Again,
            });
        }
        let envelope = incoming
            .headers
            .envelope(incoming.key.as_deref(), m.payload());
        let command = match self.spec.read(&envelope, &self.auth) {
            Ok(command) => command,
            Err(reply) => {
                warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = ?incoming.key,
                      outcome = reply.outcome(), ?reply, "command not read");
                // Reading checks who sends it before anything else of the command's own.
                let kept = match reply {
                    Reply::Unauthenticated { .. } | Reply::Forbidden { .. } => Kept::No,
                    _ => Kept::Yes,
                };
                return Ok(Step::Answer { reply, kept });
            }
        };
        if let Some(replayer) = &command.replayed_by {
            info!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                key = command.key,
                principal = command.principal.id,
                replayed_by = replayer,
                "replaying a parked command"
            );
        }
        let current: Option<Row> = match written.get(&command.key) {
            Some(row) => Some(row.clone()),
            None => self.entities.lock().get(&command.key)?,
        };
        let decision = self.spec.decide(
            &self.entity,
            &command.request(),
            current.as_deref(),
            now_micros(),
        );
        Ok(match decision {
            Decision::Answer(reply) => {
                info!(
                    topic = m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    key = command.key,
                    outcome = reply.outcome(),
                    "command not applied"
                );
                Step::Answer {
                    reply,
                    kept: Kept::Yes,
                }
            }
            Decision::Apply { entity, version } => {
                let parked_at = current.as_ref().and_then(|r| self.spec.version_of(r));
                match self.check_dependency(m, &command, parked_at, stop) {
                    Ok(()) => Step::Apply {
                        command,
                        row: entity,
                        version,
                    },
                    Err(Refusal::Park(parking)) => Step::Park(parking, command.principal),
                    Err(Refusal::Reject(reply)) => Step::Answer {
                        reply,
                        kept: Kept::Yes,
                    },
                }
            }
        })
    }

    /// The answer already given to the command's id (by a committed transaction, or by the
    /// one committing), unless it is a replay taking up a parked command: a re-delivery gets
    /// it again and has no second effect.
    fn previous_answer(&self, incoming: &Incoming, unsaved: &Unsaved<'_>) -> Option<Reply> {
        let id = incoming.headers.command_id.as_ref()?;
        let committing = unsaved.previous_answers.and_then(|a| a.get(id).cloned());
        let previous = committing.or_else(|| self.answered.lock().get(id).cloned())?;
        let taken_up = incoming.replayed() && matches!(previous, Reply::Deferred { .. });
        (!taken_up).then_some(previous)
    }

    /// Asks the dependency, if any, about `command`, retrying failures with the command's
    /// backoff: the service's rejection, or why to park the command when it kept failing (or
    /// the processor stops meanwhile).
    fn check_dependency(
        &self,
        m: &OwnedMessage,
        command: &Command,
        entity_version: Option<i64>,
        stop: &AtomicBool,
    ) -> Result<(), Refusal> {
        let Some(dependency) = self.dependency.as_ref() else {
            return Ok(());
        };
        let json = row_to_json(&self.spec.payload.columns, &command.payload);
        let key = &command.key;
        let mut delays = self.spec.retry.delays();
        let mut first = None;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match dependency.check(&self.spec, key, &json) {
                Ok(()) => return Ok(()),
                Err(DependencyError::Rejected {
                    code,
                    field,
                    message,
                }) => {
                    info!(
                        topic = m.topic(),
                        partition = m.partition(),
                        offset = m.offset(),
                        key,
                        code,
                        message,
                        "the dependency rejected the command"
                    );
                    return Err(Refusal::Reject(Reply::Rejected {
                        code,
                        field,
                        message,
                    }));
                }
                Err(failed) => failed.to_string(),
            };
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
                return Err(Refusal::Park(Parking {
                    error,
                    attempts,
                    first,
                    last: failed_at,
                    entity_version,
                }));
            }
            self.metrics
                .retries
                .with_label_values(&[&self.spec.name])
                .inc();
            let wait = delays.next().unwrap_or(self.spec.retry.max_backoff);
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

/// The resolution record of a replayed command, written with its answer (see
/// [`crate::commands::dlq`]). A command is parked in the partition of its dead-letter topic
/// that has its command partition's number, and replayed by key into that partition: a
/// `miroir-parked-at` naming another partition is not believed.
fn resolution<'a>(dlq: &'a str, incoming: &'a Incoming) -> Option<FutureRecord<'a, [u8], [u8]>> {
    let parked_at = incoming.headers.parked_at.as_deref()?;
    let m = &incoming.message;
    let partition = parked_at
        .split('/')
        .next()
        .and_then(|p| p.parse::<i32>().ok());
    if partition != Some(m.partition()) {
        warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = ?incoming.key, parked_at,
              "a replay names a parking place outside its partition: no resolution recorded");
        return None;
    }
    let record = FutureRecord::to(dlq)
        .partition(m.partition())
        .headers(resolution_headers(&incoming.headers, parked_at));
    Some(match &incoming.key {
        Some(key) => record.key(key.as_bytes()),
        None => record,
    })
}

/// Why a dependency did not let a command through.
enum Refusal {
    /// It kept failing: park the command.
    Park(Parking),
    /// It rejected the command: answer so.
    Reject(Reply),
}

/// Rows written, and answers given, by transactions not committed yet.
struct Unsaved<'a> {
    this: &'a HashMap<String, Row>,
    previous: Option<&'a HashMap<String, Row>>,
    previous_answers: Option<&'a HashMap<String, Reply>>,
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
) -> Result<(), KafkaError> {
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
            .map_err(KafkaError::from)?;
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
                .map_err(KafkaError::from)
            {
                Err(fatal) if fatal.class() == ErrorClass::Fatal => Err(fatal),
                _ => Err(e),
            };
        }
    };
    debug!(command = %shared.spec.name, commands = timing.commands, offsets_sent = ?timing.offsets_sent,
           written = ?timing.written, replied = ?replied, committed = ?timing.started.elapsed(), "transaction committed");
    // Committed: the views take what the transaction wrote.
    shared.entities.lock().written(written);
    for a in answered {
        let outcome = match a.kept {
            Kept::Yes | Kept::No => a.reply.outcome(),
            Kept::Again => "duplicate",
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
        if let (Kept::Yes, Some(id)) = (a.kept, a.command_id) {
            shared.answered.lock().remember(id, a.until_ms, a.reply);
        }
    }
    shared.report_answers_kept(shared.answered.lock().len());
    Ok(())
}

fn wait_delivery(d: rdkafka::producer::DeliveryFuture) -> Result<(i32, i64), KafkaError> {
    match futures_executor::block_on(d) {
        Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
        Ok(Err((e, _))) => Err(KafkaError::from(e)),
        Err(_) => Err(KafkaError::Unavailable(
            "the producer dropped a delivery".into(),
        )),
    }
}
