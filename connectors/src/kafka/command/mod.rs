//! The command processor (master side): one thread per `[commands.NAME]` section.
//!
//! ```text
//!  command topic ──► decide (deadline, authorize, validate, apply)        one Kafka transaction
//!  (consumer group,      │  current entity: a view of the entity topic   ┌──────────────────────┐
//!   read_committed)      │  answered ids: command ids of entity events,  │ new entity event     │
//!                        │    <topic>.miroir-done for other answers      │ reply to the sender  │
//!                        ▼                                               │ dead letter, if any  │
//!            dependency failure? retry with backoff, then park ────────► │ answered id, unless  │
//!                                                                        │   accepted           │
//!                                                                        │ consumed offsets     │
//!                                                                        └──────────────────────┘
//! ```
//!
//! Everything a command causes is committed together with its consumed offset, so a crash
//! replays the command from scratch; the answered-id view makes a re-delivered command (same
//! command id) get its first answer again instead of a second effect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use miroir_engine::command::{CommandSpec, Reply};
use miroir_engine::decode::decode;
use miroir_engine::metrics::CommandMetrics;
use miroir_engine::topology::{Source, Topology};
use miroir_engine::value::Row;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::ClientContext;
use rdkafka::Offset;
use tracing::{debug, error, info, warn};

use super::admin::{create_topic, create_topic_with, partition_count};
use super::dlq::dlq_topic;
use super::reply::now_ms;
use super::tail::Tail;
use super::{KafkaConfig, KafkaError};
use miroir_engine::store::{AnswerTime, Commit, Store};

mod answered;
mod lane;

use answered::{keep_until, AnsweredIds, ANSWER_RETENTION};
use lane::{Lane, TxError};

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
    /// Entity events and answered-id records: until when (ms since the epoch) processors
    /// remember the command's answer.
    pub const ANSWER_UNTIL: &str = "miroir-answer-until";
}

/// Suffix of a command topic's dead-letter topic.
pub const DLQ_SUFFIX: &str = ".dlq";
/// Suffix of the compacted topic of answered command ids (accepted commands excepted: their
/// entity events carry their ids).
pub const DONE_SUFFIX: &str = ".miroir-done";
/// How often a running processor forgets the answers whose time has passed.
const FORGET_EVERY: Duration = Duration::from_secs(60);

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
    /// instance fences its predecessor and aborts what it left open. With a `store`, the view
    /// of the entities is kept there too, and a restart reads the entity topic from where it
    /// stopped instead of from its beginning.
    pub fn start(
        config: &KafkaConfig,
        topology: Arc<Topology>,
        name: &str,
        instance: &str,
        metrics: CommandMetrics,
        dependency: Option<Arc<dyn Dependency>>,
        store: Option<Store>,
    ) -> Result<CommandProcessor, KafkaError> {
        let index = topology
            .commands
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| KafkaError::Definite(format!("no command `{name}` in the topology")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(ProcessorStatus::default());
        let worker = Worker::new(
            config, topology, index, instance, metrics, dependency, store,
        )?;
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

/// What the lanes share: the command's declaration and the views.
struct Shared {
    spec: CommandSpec,
    entity: Source,
    /// The command payload's schema, as a source for the decoder.
    payload: Source,
    metrics: CommandMetrics,
    dependency: Option<Arc<dyn Dependency>>,
    /// Current entity rows by key, as committed on the entity topic.
    entities: Mutex<HashMap<String, Row>>,
    /// Answers of commands already processed, by command id.
    answered: Mutex<AnsweredIds>,
    /// Reply topics known to exist.
    reply_topics: Mutex<ReplyTopics>,
}

/// What the lanes last learned of the reply topics: whether each exists, and when.
#[derive(Default)]
struct ReplyTopics {
    seen: HashMap<String, (bool, Instant)>,
}

impl ReplyTopics {
    /// How long a reply topic found is trusted: a stopped instance's topic is deleted, and
    /// a transaction producing to a deleted topic fails.
    const FOUND_FOR: Duration = Duration::from_secs(5);
    /// How long a reply topic not found is trusted (its client may be creating it: it waits
    /// for the topic before sending).
    const MISSING_FOR: Duration = Duration::from_millis(20);

    /// Whether `topic` must be looked up again before a reply is sent to it.
    fn stale(&self, topic: &str) -> bool {
        self.seen.get(topic).is_none_or(|(exists, at)| {
            let trusted = if *exists {
                Self::FOUND_FOR
            } else {
                Self::MISSING_FOR
            };
            at.elapsed() >= trusted
        })
    }

    /// Whether `topic` existed when last looked up.
    fn exists(&self, topic: &str) -> bool {
        self.seen.get(topic).is_some_and(|(exists, _)| *exists)
    }

    /// Records what a lookup of `topic` found (and forgets what is no longer trusted, once
    /// many instances have come and gone).
    fn note(&mut self, topic: &str, exists: bool) {
        if self.seen.len() >= 1024 {
            self.seen
                .retain(|_, (_, at)| at.elapsed() < Self::FOUND_FOR);
        }
        self.seen
            .insert(topic.to_string(), (exists, Instant::now()));
    }
}

/// The processor's thread: polls commands, keeps the views, hands batches to the lanes.
struct Worker {
    shared: Arc<Shared>,
    config: KafkaConfig,
    consumer: BaseConsumer<Rebalances>,
    lanes: Vec<Lane>,
    /// Where the view of the entities is kept across restarts, if anywhere.
    store: Option<Store>,
    /// Lane `i`'s producers are `<transactional_id>.<i>` (and the same with `.b` and `.c`):
    /// stable across restarts of the same state directory, so a restarted instance fences its
    /// predecessor.
    transactional_id: String,
}

/// Counts the consumer's rebalances (each one starts a new group generation).
#[derive(Default)]
struct Rebalances {
    count: AtomicU64,
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }
}

impl Shared {
    /// Applies a committed entity event to the view (newest version wins), and remembers the
    /// command that wrote it (its `miroir-command-id` header) as accepted; returns what changed.
    fn entity_event(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> EntityChange {
        let mut change = EntityChange::default();
        let Some(key) = m.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
            return change;
        };
        let Some(payload) = m.payload() else {
            self.entities.lock().expect("entities lock").remove(&key);
            change.row = Some((key, None));
            return change;
        };
        let row = match decode(&self.entity, payload) {
            Ok(row) => row,
            Err(e) => {
                debug!(topic = %self.entity.topic, partition = m.partition(), offset = m.offset(), key, error = %e,
                             "entity event not understood; the view keeps the previous one");
                return change;
            }
        };
        if let (Some(id), Some(version)) = (
            text_header(m, header::COMMAND_ID),
            self.spec.version_of(&row),
        ) {
            let reply = Reply::Accepted {
                version,
                partition: m.partition(),
                offset: m.offset(),
            };
            if let Some(until_ms) = answer_until(m) {
                self.answered.lock().expect("answered lock").remember(
                    id.clone(),
                    until_ms,
                    reply.clone(),
                );
                change.answer = Some((id, until_ms, reply));
            }
        }
        let mut entities = self.entities.lock().expect("entities lock");
        if entities
            .get(&key)
            .is_none_or(|old| self.spec.version_of(&row) > self.spec.version_of(old))
        {
            entities.insert(key.clone(), row.clone());
            change.row = Some((key, Some(row)));
        }
        change
    }

    /// Sets the gauge of the command ids remembered.
    fn report_answers_kept(&self, kept: usize) {
        self.metrics
            .answers_kept
            .with_label_values(&[&self.spec.name])
            .set(kept as i64);
    }

    fn answer_record(&self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(id) = m.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
            return;
        };
        match m.payload().map(serde_json::from_slice::<Reply>) {
            Some(Ok(reply)) => {
                if let Some(until_ms) = answer_until(m) {
                    self.answered
                        .lock()
                        .expect("answered lock")
                        .remember(id, until_ms, reply);
                }
            }
            None => {
                self.answered.lock().expect("answered lock").forget(&id);
            }
            Some(Err(e)) => {
                warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = id, error = %e, "bad answer record")
            }
        }
    }
}

/// Until when (ms since the epoch) the answer written by `m` (an entity event or an
/// answered-id record) is kept: its `miroir-answer-until` header, or for records written before
/// it, the retention from the record's time; `None` once that time has passed.
fn answer_until(m: &impl Message) -> Option<i64> {
    let until = text_header(m, header::ANSWER_UNTIL)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| {
            keep_until(
                m.timestamp().to_millis().unwrap_or_else(now_ms),
                None,
                false,
            )
        });
    (until >= now_ms()).then_some(until)
}

/// Writes a change of the command view to the state directory.
fn write_view(store: &Store, commit: Commit) -> Result<(), KafkaError> {
    store
        .write_unsynced(commit)
        .map_err(|e| KafkaError::Definite(format!("writing the command view: {e}")))
}

/// What one entity event changed.
#[derive(Default)]
struct EntityChange {
    /// The key and its new row (`None`: deleted), if the view changed.
    row: Option<(String, Option<Row>)>,
    /// The id, time to forget (ms since the epoch) and answer of the command that wrote the
    /// event.
    answer: Option<(String, i64, Reply)>,
}

/// What one read of the entity topic changed in the view.
#[derive(Default)]
struct ViewChanges {
    rows: HashMap<String, Option<Row>>,
    answers: Vec<(String, i64, Reply)>,
    /// Next offset to read, by partition.
    next: HashMap<i32, i64>,
}

impl ViewChanges {
    fn note(&mut self, m: &rdkafka::message::BorrowedMessage<'_>, change: EntityChange) {
        if let Some((key, row)) = change.row {
            self.rows.insert(key, row);
        }
        self.answers.extend(change.answer);
        self.next.insert(m.partition(), m.offset() + 1);
    }
}

/// One command in a batch, and what became of it.
struct Incoming {
    message: OwnedMessage,
    received: Instant,
    command_id: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    key: Option<String>,
    /// Set on a replay: the entity version the command was parked at.
    parked_version: Option<i64>,
}

impl Incoming {
    /// Until when (ms since the epoch) the command's answer is kept if it is answered now: a
    /// command id the client generated for this send (the correlation id) until shortly after
    /// the deadline, others for the retention (see [`answered`]).
    fn answer_until(&self) -> i64 {
        let single_use = self.command_id.is_some() && self.command_id == self.correlation_id;
        let deadline = text_header(&self.message, header::DEADLINE).and_then(|d| d.parse().ok());
        keep_until(now_ms(), deadline, single_use)
    }
}

impl Worker {
    fn new(
        config: &KafkaConfig,
        topology: Arc<Topology>,
        index: usize,
        instance: &str,
        metrics: CommandMetrics,
        dependency: Option<Arc<dyn Dependency>>,
        store: Option<Store>,
    ) -> Result<Worker, KafkaError> {
        let spec = topology.commands[index].clone();
        let entity = topology.sources[spec.entity].clone();
        let partitions = partition_count(config, &entity.topic)?.unwrap_or(1);
        // Commands for one entity meet its events' partition: same count, same partitioner.
        create_topic(config, &spec.topic, partitions)?;
        create_topic(config, &dlq_topic(&spec.topic), partitions)?;
        create_topic_with(
            config,
            &format!("{}{DONE_SUFFIX}", spec.topic),
            partitions,
            &[
                ("cleanup.policy", "compact,delete"),
                ("retention.ms", &ANSWER_RETENTION.as_millis().to_string()),
            ],
        )?;
        create_topic(config, &entity.topic, partitions)?;
        let group = format!("{}.{}", topology.name, spec.name);
        let consumer: BaseConsumer<Rebalances> = config
            .client("command")
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create_with_context(Rebalances::default())?;
        let payload = Source {
            name: spec.name.clone(),
            topic: spec.topic.clone(),
            columns: spec.columns.clone(),
            key: spec.key,
            late: None,
        };
        Ok(Worker {
            shared: Arc::new(Shared {
                spec,
                entity,
                payload,
                metrics,
                dependency,
                entities: Mutex::default(),
                answered: Mutex::default(),
                reply_topics: Mutex::default(),
            }),
            config: config.clone(),
            consumer,
            lanes: Vec::new(),
            store,
            transactional_id: format!("miroir.{group}.{instance}"),
        })
    }

    fn run(mut self, stop: &AtomicBool, status: &ProcessorStatus) {
        let served = self.serve(stop, status);
        // The last transactions finish committing (their commands are read again otherwise).
        let settled = self.settle(true);
        if let Err(e) = served.and(settled) {
            error!(command = %self.shared.spec.name, error = %e, "the command processor stopped");
            *status.failure.lock().expect("status lock") = Some(e.to_string());
        }
        status.ready.store(false, Ordering::Release);
        self.consumer.unsubscribe();
    }

    fn serve(&mut self, stop: &AtomicBool, status: &ProcessorStatus) -> Result<(), KafkaError> {
        let spec = &self.shared.spec;
        for i in 0..spec.lanes {
            self.lanes.push(Lane::new(
                &self.config,
                &format!("{}.{i}", self.transactional_id),
            )?);
        }
        let starts = self.load_view()?;
        let mut entities = Tail::open_at(&self.config, &self.shared.entity.topic, &starts)?;
        let mut answered = Tail::open(&self.config, &format!("{}{DONE_SUFFIX}", spec.topic))?;
        self.consumer.subscribe(&[&spec.topic])?;
        let mut seen = u64::MAX;
        let mut forgot_at = Instant::now();
        info!(command = %spec.name, topic = %spec.topic, lanes = spec.lanes, "command processor started");
        while !stop.load(Ordering::Acquire) {
            if forgot_at.elapsed() >= FORGET_EVERY {
                self.forget_old_answers()?;
                forgot_at = Instant::now();
            }
            let mut batch = self.poll_batch();
            let rebalances = self.consumer.context().count.load(Ordering::Acquire);
            // Commits that failed meanwhile rewind the consumer: the batch is read again.
            if !self.settle(rebalances != seen)? {
                continue;
            }
            if rebalances != seen {
                // A rebalance may have happened in the middle of the batch: its commands are
                // read again from the committed offsets, where they now belong (here or on the
                // partition's new owner), never committed under the new generation by mistake.
                if !batch.is_empty() {
                    batch.clear();
                    self.rewind()?;
                }
                // Partitions moved: what their previous owner committed must be in the views
                // before their next command.
                status.ready.store(false, Ordering::Release);
                let mut view = ViewChanges::default();
                entities.catch_up(CATCH_UP_LIMIT, |m| {
                    view.note(m, self.shared.entity_event(m))
                })?;
                self.save_view(view)?;
                answered.catch_up(CATCH_UP_LIMIT, |m| self.shared.answer_record(m))?;
                let partitions = self.consumer.assignment()?.count();
                info!(command = %self.shared.spec.name, partitions, "assignment ready");
                seen = rebalances;
                status.ready.store(true, Ordering::Release);
            } else {
                let mut view = ViewChanges::default();
                entities.drain(|m| view.note(m, self.shared.entity_event(m)));
                self.save_view(view)?;
                answered.drain(|m| self.shared.answer_record(m));
            }
            if batch.is_empty() {
                continue;
            }
            self.process(batch, stop)?;
        }
        Ok(())
    }

    /// Forgets the answers whose time has passed, in memory and in the state directory, as a
    /// restart would: a long-running processor's memory stays bounded by the commands of the
    /// last few minutes (single-use ids) and of the retention period (the others).
    fn forget_old_answers(&self) -> Result<(), KafkaError> {
        let (old, kept) = {
            let mut answered = self.shared.answered.lock().expect("answered lock");
            (answered.forget_expired(now_ms()), answered.len())
        };
        debug!(command = %self.shared.spec.name, forgotten = old.len(), kept, "answers whose time has passed forgotten");
        self.shared.report_answers_kept(kept);
        let Some(store) = &self.store else {
            return Ok(());
        };
        if old.is_empty() {
            return Ok(());
        }
        let command = &self.view_name();
        let mut forget = store.commit();
        for id in &old {
            forget.delete_command_answer(command, id);
        }
        write_view(store, forget)
    }

    /// The stored view's name: the command and its entity topic (a topology that points the
    /// command at another topic starts a new view).
    fn view_name(&self) -> String {
        format!("{}@{}", self.shared.spec.name, self.shared.entity.topic)
    }

    /// Loads the stored view of the entities and of the accepted commands (forgetting those
    /// whose time has passed); returns where to go on reading the entity topic.
    fn load_view(&self) -> Result<Vec<(i32, i64)>, KafkaError> {
        let Some(store) = &self.store else {
            return Ok(Vec::new());
        };
        let command = &self.view_name();
        let view = store
            .command_view(command)
            .map_err(|e| KafkaError::Definite(format!("reading the command view: {e}")))?;
        let now = now_ms();
        let mut forget = store.commit();
        let mut answers = 0;
        {
            let mut answered = self.shared.answered.lock().expect("answered lock");
            for a in view.answers {
                let until_ms = match a.kept {
                    AnswerTime::KeptUntil(until) => until,
                    AnswerTime::AnsweredAt(at) => keep_until(at, None, false),
                };
                match serde_json::from_slice::<Reply>(&a.reply) {
                    Ok(reply) if until_ms >= now => {
                        answered.remember(a.id, until_ms, reply);
                        answers += 1;
                    }
                    Ok(_) => forget.delete_command_answer(command, &a.id),
                    Err(e) => {
                        warn!(command = %self.shared.spec.name, command_id = a.id, error = %e, "stored answer not understood; forgotten");
                        forget.delete_command_answer(command, &a.id);
                    }
                }
            }
        }
        let forgotten = forget.len();
        write_view(store, forget)?;
        self.shared.report_answers_kept(answers);
        info!(command = %self.shared.spec.name, entities = view.rows.len(), answers, forgotten,
              "entity view loaded from the state directory");
        self.shared
            .entities
            .lock()
            .expect("entities lock")
            .extend(view.rows);
        Ok(view.offsets)
    }

    /// Stores what the entity topic changed in the view, with the offsets read.
    fn save_view(&self, view: ViewChanges) -> Result<(), KafkaError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        if view.next.is_empty() {
            return Ok(());
        }
        let command = &self.view_name();
        let mut commit = store.commit();
        for (key, row) in &view.rows {
            match row {
                Some(row) => commit.put_command_row(command, key, row),
                None => commit.delete_command_row(command, key),
            }
        }
        for (id, until_ms, reply) in &view.answers {
            let reply = serde_json::to_vec(reply).expect("replies serialize");
            commit.put_command_answer(command, id, *until_ms, &reply);
        }
        for (partition, next) in &view.next {
            commit.put_command_offset(command, *partition, *next);
        }
        write_view(store, commit)
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
                        parked_version: text_header(&message, header::PARKED_VERSION)
                            .and_then(|v| v.parse().ok()),
                        key: message
                            .key()
                            .map(|k| String::from_utf8_lossy(k).into_owned()),
                        received: Instant::now(),
                        message,
                    });
                    wait = Duration::ZERO;
                }
                Some(Err(e)) => {
                    warn!(topic = %self.shared.spec.topic, error = %e, "consuming commands");
                    break;
                }
                None => break,
            }
        }
        batch
    }

    /// Processes a batch: each lane commits its partitions' commands in one transaction,
    /// side by side. A failed transaction is aborted, the consumer rewound to the committed
    /// offsets, and the commands read again (by this instance, or by the partition's new
    /// owner), after a backoff that grows with the lane's consecutive failures.
    fn process(&mut self, batch: Vec<Incoming>, stop: &AtomicBool) -> Result<(), KafkaError> {
        let group = self
            .consumer
            .group_metadata()
            .ok_or_else(|| KafkaError::Definite("no consumer group metadata".into()))?;
        let lanes = self.lanes.len();
        let mut parts: Vec<Vec<&Incoming>> = vec![Vec::new(); lanes];
        for incoming in &batch {
            parts[incoming.message.partition() as usize % lanes].push(incoming);
        }
        let shared = &self.shared;
        let busy: Vec<(usize, &mut Lane)> = self
            .lanes
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| !parts[*i].is_empty())
            .collect();
        let results: Vec<(usize, Result<(), TxError>)> = if busy.len() == 1 {
            busy.into_iter()
                .map(|(i, lane)| (i, lane.transaction(shared, &parts[i], &group, stop)))
                .collect()
        } else {
            std::thread::scope(|s| {
                let running: Vec<_> = busy
                    .into_iter()
                    .map(|(i, lane)| {
                        let (part, group) = (&parts[i], &group);
                        (
                            i,
                            s.spawn(move || lane.transaction(shared, part, group, stop)),
                        )
                    })
                    .collect();
                running
                    .into_iter()
                    .map(|(i, t)| {
                        let r = t.join().unwrap_or_else(|_| {
                            Err(TxError::Fatal(KafkaError::Definite(
                                "a lane panicked".into(),
                            )))
                        });
                        (i, r)
                    })
                    .collect()
            })
        };
        self.conclude(results)?;
        Ok(())
    }

    /// Takes the results of the lanes' commits: all of them (`wait`), or those done. Returns
    /// false when one failed, and the consumer was rewound.
    fn settle(&mut self, wait: bool) -> Result<bool, KafkaError> {
        let results = self
            .lanes
            .iter_mut()
            .enumerate()
            .map(|(i, lane)| (i, lane.settle(wait)))
            .collect();
        self.conclude(results)
    }

    /// Counts the lanes' failures; after one, aborts what the lanes have open, waits for
    /// their commits, rewinds the consumer to the committed offsets and backs off. Returns
    /// false when it rewound.
    fn conclude(&mut self, results: Vec<(usize, Result<(), TxError>)>) -> Result<bool, KafkaError> {
        let mut wait = None;
        for (i, result) in results {
            let lane = &mut self.lanes[i];
            match result {
                Ok(()) => {}
                Err(TxError::Fatal(e)) => return Err(e),
                Err(TxError::Retry(e)) => {
                    lane.failures += 1;
                    let delay = self.shared.spec.retry.delay(lane.failures);
                    warn!(command = %self.shared.spec.name, lane = i, error = %e, failures = lane.failures,
                          "command transaction failed; aborting, reading its commands again in {delay:?}");
                    if lane.abort()? {
                        self.shared
                            .metrics
                            .aborted_transactions
                            .with_label_values(&[&self.shared.spec.name])
                            .inc();
                    }
                    wait = wait.max(Some(delay));
                }
            }
        }
        let Some(wait) = wait else {
            return Ok(true);
        };
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            // Commits still running land (or fail) before the consumer goes back to the
            // committed offsets.
            match lane.settle(true) {
                Ok(()) => {}
                Err(TxError::Fatal(e)) => return Err(e),
                Err(TxError::Retry(e)) => {
                    warn!(command = %self.shared.spec.name, lane = i, error = %e, "command transaction failed");
                }
            }
        }
        self.shared
            .reply_topics
            .lock()
            .expect("reply topics lock")
            .seen
            .clear();
        self.rewind()?;
        std::thread::sleep(wait);
        Ok(false)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_topics_are_looked_up_again_once_no_longer_trusted() {
        let mut known = ReplyTopics::default();
        assert!(known.stale("r1") && !known.exists("r1"), "never looked up");
        known.note("r1", true);
        known.note("r2", false);
        assert!(!known.stale("r1") && known.exists("r1"));
        assert!(!known.stale("r2") && !known.exists("r2"));
        std::thread::sleep(ReplyTopics::MISSING_FOR + Duration::from_millis(5));
        assert!(
            known.stale("r2"),
            "a missing topic is asked about again soon"
        );
        assert!(!known.stale("r1"), "a found topic is trusted for longer");
        assert!(known.exists("r1"));
    }
}
