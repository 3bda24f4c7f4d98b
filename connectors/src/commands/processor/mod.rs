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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use miroir_engine::command::Reply;
use miroir_engine::error::{panic_message, retry_delays, ErrorClass};
use miroir_engine::metrics::CommandMetrics;
use miroir_engine::state::{command_prefix, AnswerTime, StateStore};
use miroir_engine::topology::Topology;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::ClientContext;
use rdkafka::Offset;
use tracing::{debug, error, info, warn};

use super::wire::{dlq_topic, done_topic, now_ms};
use crate::kafka::admin::{create_topic, create_topic_with, partition_count};
use crate::kafka::tail::Tail;
use crate::kafka::{KafkaConfig, KafkaError};

mod answered;
pub mod dependency;
mod entities;
mod incoming;
mod lane;
mod pending;
mod view;

use answered::{keep_until, ANSWER_RETENTION};
use dependency::Dependency;
use entities::EntityView;
use incoming::Incoming;
use lane::Lane;
use miroir_engine::auth::Authenticator;
use pending::PendingDeadLetters;
use view::{write_view, Shared, ViewChanges};

/// How often a running processor forgets the answers whose time has passed.
const FORGET_EVERY: Duration = Duration::from_secs(60);
/// How many changed entity rows a read of the entity topic gathers before it saves them.
const SAVE_EVERY: usize = 10_000;

/// The name of command `command`'s stored view of entity topic `topic` (a topology that
/// points the command at another topic starts a new view).
fn view_name(command: &str, topic: &str) -> String {
    format!("{command}@{topic}")
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
        self.failure.lock().clone()
    }

    fn fail(&self, command: &str, failure: String) {
        error!(command, error = %failure, "the command processor stopped");
        *self.failure.lock() = Some(failure);
        self.ready.store(false, Ordering::Release);
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
        (dependency, auth): (Option<Arc<dyn Dependency>>, Arc<Authenticator>),
        store: Option<StateStore>,
    ) -> Result<CommandProcessor, KafkaError> {
        let index = topology
            .commands
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| KafkaError::Config(format!("no command `{name}` in the topology")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(ProcessorStatus::default());
        let config = config.clone();
        let instance = instance.to_string();
        let build = move || {
            Worker::new(
                &config,
                topology.clone(),
                index,
                &instance,
                metrics.clone(),
                (dependency.clone(), auth.clone()),
                store.clone(),
            )
        };
        // The first worker is built here: a configuration error fails the start.
        let worker = build()?;
        let thread = std::thread::Builder::new()
            .name(format!("miroir-cmd-{name}"))
            .spawn({
                let stop = stop.clone();
                let status = status.clone();
                move || supervise(worker, build, &stop, &status)
            })
            .map_err(|source| KafkaError::Thread {
                name: "command processor",
                source,
            })?;
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

/// Runs `worker`, and after a transient failure (the broker unreachable, say) a new one made
/// by `build`, with a backoff of 0.5 s to 10 s, until the processor stops: an outage of any
/// length ends with the processor consuming again. A failure of another class, or a panic,
/// ends the processor with the failure in `status`.
fn supervise(
    first: Worker,
    build: impl Fn() -> Result<Worker, KafkaError>,
    stop: &AtomicBool,
    status: &ProcessorStatus,
) {
    let name = first.shared.spec.name.clone();
    let mut delays = restart_delays();
    let mut next = Some(first);
    loop {
        let mut worker = match next.take() {
            Some(worker) => worker,
            None => match build() {
                Ok(worker) => {
                    let metrics = &worker.shared.metrics;
                    metrics.restarts.with_label_values(&[&name]).inc();
                    worker
                }
                Err(e) if e.class() == ErrorClass::Transient => {
                    if !wait_to_restart(&name, &e, &mut delays, stop) {
                        return;
                    }
                    continue;
                }
                Err(e) => return status.fail(&name, e.to_string()),
            },
        };
        let started = Instant::now();
        let ran =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run(stop, status)));
        // Its consumer and producers go before another worker takes their place.
        drop(worker);
        let error = match ran {
            Ok(Ok(())) => return,
            Ok(Err(e)) if e.class() == ErrorClass::Transient => e,
            Ok(Err(e)) => return status.fail(&name, e.to_string()),
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                return status.fail(&name, format!("panicked: {message}"));
            }
        };
        if started.elapsed() > RESTART_RESET {
            delays = restart_delays();
        }
        if !wait_to_restart(&name, &error, &mut delays, stop) {
            return;
        }
    }
}

/// Logs why the processor starts again and waits the next delay; false when it stops
/// meanwhile.
fn wait_to_restart(
    command: &str,
    error: &KafkaError,
    delays: &mut impl Iterator<Item = Duration>,
    stop: &AtomicBool,
) -> bool {
    let delay = delays.next().unwrap_or(MAX_RESTART_DELAY);
    warn!(command, error = %error, retry_in_ms = delay.as_millis() as u64,
          "the command processor stopped on a transient error (Kafka unreachable, or a producer left unusable by an outage); starting it again");
    sleep_unless_stopped(delay, stop)
}

/// The longest wait between two attempts to start a processor again.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);

/// A processor that ran this long before failing starts again with the shortest delay.
const RESTART_RESET: Duration = Duration::from_secs(60);

fn restart_delays() -> impl Iterator<Item = Duration> {
    retry_delays(Duration::from_millis(500), MAX_RESTART_DELAY)
}

/// Sleeps for `delay`, waking early when `stop` is set; false when it was.
fn sleep_unless_stopped(delay: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + delay;
    while Instant::now() < until {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
    }
    !stop.load(Ordering::Acquire)
}

/// Longest wait for the views to catch up after an assignment.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);
/// Longest read of the entity topic when the processor stops.
const STOP_CATCH_UP_LIMIT: Duration = Duration::from_secs(5);
/// Commands handled in one transaction at most.
const BATCH: usize = 256;

/// The processor's thread: polls commands, keeps the views, hands batches to the lanes.
struct Worker {
    shared: Arc<Shared>,
    config: KafkaConfig,
    consumer: BaseConsumer<Rebalances>,
    lanes: Vec<Lane>,
    /// Where the view of the entities is kept across restarts, if anywhere.
    store: Option<StateStore>,
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

impl Worker {
    fn new(
        config: &KafkaConfig,
        topology: Arc<Topology>,
        index: usize,
        instance: &str,
        metrics: CommandMetrics,
        (dependency, auth): (Option<Arc<dyn Dependency>>, Arc<Authenticator>),
        store: Option<StateStore>,
    ) -> Result<Worker, KafkaError> {
        let spec = topology.commands[index].clone();
        let entity = topology.sources[spec.entity].clone();
        let partitions = partition_count(config, &entity.topic)?.unwrap_or(1);
        // Commands for one entity meet its events' partition: same count, same partitioner.
        create_topic(config, &spec.topic, partitions)?;
        create_topic(config, &dlq_topic(&spec.topic), partitions)?;
        create_topic_with(
            config,
            &done_topic(&spec.topic),
            partitions,
            &[
                ("cleanup.policy", "compact,delete"),
                ("retention.ms", &ANSWER_RETENTION.as_millis().to_string()),
            ],
        )?;
        create_topic(config, &entity.topic, partitions)?;
        let group = format!("{}.{}", topology.name, spec.name);
        let view = view_name(&spec.name, &entity.topic);
        let in_memory = metrics
            .entity_rows_in_memory
            .with_label_values(&[&spec.name]);
        let entities = EntityView::new(store.clone().map(|s| (s, view)), in_memory);
        let consumer: BaseConsumer<Rebalances> = config
            .client("command")
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            // As the source's: a member lost without leaving (a crash, a processor started
            // again after an outage) holds its partitions for 10 s, not librdkafka's 45 s.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "3000")
            .create_with_context(Rebalances::default())?;
        Ok(Worker {
            shared: Arc::new(Shared {
                spec,
                entity,
                metrics,
                dependency,
                auth,
                entities: Mutex::new(entities),
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

    /// Serves until `stop`, or until an error.
    fn run(&mut self, stop: &AtomicBool, status: &ProcessorStatus) -> Result<(), KafkaError> {
        let served = self.serve(stop, status);
        status.ready.store(false, Ordering::Release);
        // The last transactions finish committing (their commands are read again otherwise).
        let settled = self.settle(true);
        self.consumer.unsubscribe();
        served.and(settled).map(|_| ())
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
        let mut answered = Tail::open(&self.config, &done_topic(&spec.topic))?;
        let mut pending = PendingDeadLetters::new(
            Tail::open(&self.config, &dlq_topic(&spec.topic))?,
            self.shared
                .metrics
                .dead_letters_pending
                .with_label_values(&[&spec.name]),
        );
        self.consumer.subscribe(&[&spec.topic])?;
        let mut seen = u64::MAX;
        let mut forgot_at = Instant::now();
        info!(command = %spec.name, topic = %spec.topic, lanes = spec.lanes, "command processor started");
        while !stop.load(Ordering::Acquire) {
            if forgot_at.elapsed() >= FORGET_EVERY {
                self.forget_old_answers()?;
                forgot_at = Instant::now();
            }
            pending.update()?;
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
                // before their next command. Until they are, no command is decided: the
                // next turn reads its commands again and goes on catching up.
                status.ready.store(false, Ordering::Release);
                if !self.catch_up(&mut entities, &mut answered)? {
                    continue;
                }
                let partitions = self.consumer.assignment()?.count();
                info!(command = %self.shared.spec.name, partitions, "assignment ready");
                seen = rebalances;
                status.ready.store(true, Ordering::Release);
            } else {
                let mut view = ViewChanges::default();
                entities.drain(|m| self.read_entity(m, &mut view))?;
                self.save_view(view)?;
                answered.drain(|m| {
                    self.shared.answer_record(m);
                    Ok(())
                })?;
            }
            if batch.is_empty() {
                continue;
            }
            self.process(batch, stop)?;
        }
        self.save_on_stop(&mut entities)
    }

    /// On a graceful stop, once the last transactions committed, saves the view up to the
    /// entity topic's end (for at most [`STOP_CATCH_UP_LIMIT`]): what this processor wrote
    /// last is in the state directory, and the next start reads on from there.
    fn save_on_stop(&mut self, entities: &mut Tail) -> Result<(), KafkaError> {
        if self.store.is_none() {
            return Ok(());
        }
        self.settle(true)?;
        let mut view = ViewChanges::default();
        let complete =
            entities.catch_up(STOP_CATCH_UP_LIMIT, |m| self.read_entity(m, &mut view))?;
        self.save_view(view)?;
        if !complete {
            info!(command = %self.shared.spec.name, "stopping before the entity topic was read to its end: the next start reads on from where this stopped");
        }
        Ok(())
    }

    /// Reads the entity topic and the answered ids up to their ends, for at most
    /// [`CATCH_UP_LIMIT`] each; whether both got there (a call after one that did not goes
    /// on from where it stopped).
    fn catch_up(&self, entities: &mut Tail, answered: &mut Tail) -> Result<bool, KafkaError> {
        let mut view = ViewChanges::default();
        let complete = entities.catch_up(CATCH_UP_LIMIT, |m| self.read_entity(m, &mut view))?;
        self.save_view(view)?;
        let complete = complete
            && answered.catch_up(CATCH_UP_LIMIT, |m| {
                self.shared.answer_record(m);
                Ok(())
            })?;
        if !complete {
            warn!(command = %self.shared.spec.name, "the views are not caught up yet: no command is decided until they are");
        }
        Ok(complete)
    }

    /// Forgets the answers whose time has passed, in memory and in the state directory, as a
    /// restart would: a long-running processor's memory stays bounded by the commands of the
    /// last few minutes (single-use ids) and of the retention period (the others).
    fn forget_old_answers(&self) -> Result<(), KafkaError> {
        let (old, kept) = {
            let mut answered = self.shared.answered.lock();
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

    /// The stored view's name.
    fn view_name(&self) -> String {
        view_name(&self.shared.spec.name, &self.shared.entity.topic)
    }

    /// Loads the stored view of the entities and of the accepted commands (forgetting those
    /// whose time has passed); returns where to go on reading the entity topic.
    fn load_view(&self) -> Result<Vec<(i32, i64)>, KafkaError> {
        let Some(store) = &self.store else {
            return Ok(Vec::new());
        };
        let command = &self.view_name();
        let layout = self.shared.entity.layout();
        let prefixes = [command_prefix(command)];
        if let Some(old) = store.keep_layout(&format!("command/{command}"), &layout, &prefixes)? {
            warn!(command = %self.shared.spec.name, old, new = layout,
                  "the entity source changed since the view was stored: the view is read again from the entity topic");
        }
        let view = store.command_view(command)?;
        let now = now_ms();
        let mut forget = store.commit();
        let mut answers = 0;
        {
            let mut answered = self.shared.answered.lock();
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
        info!(command = %self.shared.spec.name, answers, forgotten,
              "entity view opened in the state directory");
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
            commit.put_command_row(command, key, row);
        }
        for (id, until_ms, reply) in &view.answers {
            let reply = serde_json::to_vec(reply).expect("replies serialize");
            commit.put_command_answer(command, id, *until_ms, &reply);
        }
        for (partition, next) in &view.next {
            commit.put_command_offset(command, *partition, *next);
        }
        write_view(store, commit)?;
        self.shared.entities.lock().saved(&view.rows);
        Ok(())
    }

    /// Takes one entity event into `view`, which is saved every [`SAVE_EVERY`] rows: reading
    /// a whole entity topic does not gather it in memory.
    fn read_entity(
        &self,
        m: &rdkafka::message::BorrowedMessage<'_>,
        view: &mut ViewChanges,
    ) -> Result<(), KafkaError> {
        view.note(m, self.shared.entity_event(m)?);
        if view.rows.len() >= SAVE_EVERY {
            self.save_view(std::mem::take(view))?;
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
                    batch.push(Incoming::new(message));
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
            .ok_or_else(|| KafkaError::Unavailable("no consumer group metadata".into()))?;
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
        let results: Vec<(usize, Result<(), KafkaError>)> = if busy.len() == 1 {
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
                        let r = t
                            .join()
                            .unwrap_or_else(|_| Err(KafkaError::Panicked("lane")));
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
    fn conclude(
        &mut self,
        results: Vec<(usize, Result<(), KafkaError>)>,
    ) -> Result<bool, KafkaError> {
        let mut wait = None;
        for (i, result) in results {
            let lane = &mut self.lanes[i];
            match result {
                Ok(()) => {}
                Err(e) if e.class() == ErrorClass::Fatal => return Err(e),
                // Its producers start over: the processor is made again (see `supervise`).
                Err(e) if e.producer_unusable() => {
                    warn!(command = %self.shared.spec.name, lane = i, error = %e, failures = lane.failures + 1,
                          "command transaction failed; the processor starts again with new producers");
                    return Err(e);
                }
                Err(e) => {
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
                Err(e) if e.class() == ErrorClass::Fatal => return Err(e),
                Err(e) => {
                    warn!(command = %self.shared.spec.name, lane = i, error = %e, "command transaction failed");
                }
            }
        }
        self.shared.reply_topics.lock().seen.clear();
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
