//! The Kafka source: one consumer-group member per instance, feeding the engine's runtime.
//!
//! The consumer subscribes to every source topic of the topology with the topology's name as
//! group id. On assignment, each partition's state is first brought up to date from its
//! changelog (see [`super::changelog`]), then the partition is positioned right after the
//! offset committed in RocksDB with that state (Kafka's own committed offsets are not used, so
//! offsets and state can never disagree), and becomes a task. On revocation, the runtime
//! commits and drops the tasks before the consumer lets the partitions go. A static member
//! that stops revokes its partitions itself, without leaving the group.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use miroir_engine::error::panic_message;
use miroir_engine::ingest::{Message, Records};
use miroir_engine::metrics::Metrics;
use miroir_engine::runtime::Runtime;
use miroir_engine::topology::Topology;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message as _;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset};
use tracing::{error, info, warn};

use super::standby::Standbys;
use super::{changelog, KafkaConfig, KafkaError, FETCH_QUEUE_BACKOFF_MS};

/// How many records are handed to a worker at once.
const BATCH: usize = 512;

/// Longest a record waits in a partly filled batch before it is handed over.
const FLUSH_AFTER: Duration = Duration::from_millis(5);

/// Records of a partition still waiting in Kafka after a batch above which the engine is
/// catching up (see `RuntimeConfig::max_epoch_interval`).
const CATCHING_UP: i64 = BATCH as i64;

struct SourceContext {
    runtime: Arc<Runtime>,
    /// The sources reading each topic, in topology order: the first gets the records (see
    /// [`source_topics`]).
    topics: HashMap<String, Vec<usize>>,
    metrics: Arc<Metrics>,
    /// Set when the instance stops: its revocations then keep the tables' rows.
    stop: Arc<AtomicBool>,
    /// The last offset handed to the runtime, by topic and partition.
    delivered: Mutex<HashMap<(String, u32), i64>>,
    /// Batches read and not taken by the runtime yet (its inboxes were full), in the order
    /// read: while there are any, consumption is paused.
    waiting: Mutex<VecDeque<(u32, Message)>>,
    /// With changelogs: what restores an assigned partition's task state, and the topology.
    changelog: Option<(changelog::Restorer, Topology)>,
    /// The instance's standby replicas, which give up the partitions assigned to it.
    standbys: Option<Arc<Standbys>>,
}

/// Who the source's consumer is in its consumer group.
pub struct GroupMember<'a> {
    /// The instance's id. The consumer's `client.id` ends with it, so that the group, which
    /// sorts its members by id, sorts them by instance id (see [`super::standby`]).
    pub instance: &'a str,
    /// Whether the consumer is a static member (`group.instance.id` is the instance id):
    /// restarted within `session.timeout.ms`, it gets its partitions back without a rebalance
    /// (and a clean stop keeps them that long too).
    pub fixed: bool,
    /// The consumer group protocol.
    pub protocol: GroupProtocol,
}

/// The consumer group protocol of the source's consumer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GroupProtocol {
    /// The classic protocol with range assignment: every rebalance revokes every partition
    /// and assigns them again (eager); the session timeout is the client's (10 s).
    #[default]
    Classic,
    /// KIP-848's protocol (`group.protocol=consumer`, Kafka 4.0 or later) with the broker's
    /// range assignor: sticky and incremental, so a rebalance moves only the partitions that
    /// must move; the session timeout is the broker's (`group.consumer.session.timeout.ms`,
    /// 45 s by default).
    Consumer,
}

/// How an assigned partition's state catches up before its task opens.
pub struct Handover {
    /// From the partition's changelog.
    pub changelog: bool,
    /// The instance's standby replicas, if it keeps any: one of an assigned partition stops,
    /// and its restore starts where it got to.
    pub standbys: Option<Arc<Standbys>>,
}

impl ClientContext for SourceContext {
    /// librdkafka's statistics (every second, delivered by `poll`) carry each assigned
    /// partition's high watermark as of its last fetch: lag and readiness come from them, with
    /// no request to the broker.
    fn stats(&self, statistics: Statistics) {
        let committed = self.runtime.committed_offsets();
        let delivered = self.delivered.lock().clone();
        let mut watermarks = HashMap::new();
        let mut counts = HashMap::new();
        for (name, topic) in statistics
            .topics
            .iter()
            .filter(|(n, _)| self.topics.contains_key(*n))
        {
            let known = topic.partitions.keys().filter(|p| **p >= 0).count();
            if known > 0 {
                counts.insert(name.clone(), known as u32);
            }
            for (p, partition) in topic
                .partitions
                .iter()
                .filter(|(p, part)| **p >= 0 && part.desired)
            {
                let tp = (name.clone(), *p as u32);
                let next = committed.get(&tp).map(|o| o + 1).unwrap_or(0);
                let delivered = delivered.get(&tp).map(|o| o + 1).unwrap_or(0);
                let high = end_offset(partition, next.max(delivered));
                if high >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[name.as_str(), &p.to_string()])
                        .set((high - next).max(0));
                }
                // A negative watermark (not fetched yet) keeps the instance not ready.
                watermarks.insert(tp, high);
            }
        }
        let topics: Vec<&str> = self.topics.keys().map(String::as_str).collect();
        self.runtime.report_watermarks(&topics, watermarks);
        self.runtime.report_partition_counts(counts);
    }
}

/// The offset the engine must have committed to be caught up with `partition`: the high
/// watermark, except after transactions (read_committed), whose markers take offsets that are
/// never delivered. Once the fetcher has passed the watermark with nothing queued, every
/// record is delivered, and the end is `handed`: the offset after the last record handed to
/// the runtime (or committed, when it is further).
fn end_offset(partition: &rdkafka::statistics::Partition, handed: i64) -> i64 {
    let high = partition.hi_offset;
    if high >= 0 && partition.next_offset >= high && partition.fetchq_cnt == 0 {
        handed.min(high)
    } else {
        high
    }
}

impl SourceContext {
    /// The context of a consumer of `topics` feeding `runtime`, with what restores an
    /// assigned partition and the instance's standbys, if any.
    fn new(
        (runtime, metrics, stop): (Arc<Runtime>, Arc<Metrics>, Arc<AtomicBool>),
        topics: HashMap<String, Vec<usize>>,
        (changelog, standbys): (
            Option<(changelog::Restorer, Topology)>,
            Option<Arc<Standbys>>,
        ),
    ) -> SourceContext {
        SourceContext {
            runtime,
            topics,
            metrics,
            stop,
            delivered: Mutex::default(),
            waiting: Mutex::default(),
            changelog,
            standbys,
        }
    }

    /// Hands the waiting batches to the runtime, in the order read, while its inboxes take
    /// them; whether they took all.
    fn hand_over(&self) -> bool {
        let mut waiting = self.waiting.lock();
        while let Some((partition, message)) = waiting.pop_front() {
            if let Err(message) = self.runtime.try_send(partition, message) {
                waiting.push_front((partition, message));
                return false;
            }
        }
        true
    }

    /// Counts and logs the records of `topic`/`partition` deleted by retention before they
    /// were read: those from `next` (where reading resumes) to the partition's first offset.
    /// Reading then starts at the first record there is (`auto.offset.reset=earliest`).
    fn report_lost(&self, consumer: &BaseConsumer<Self>, topic: &str, partition: i32, next: i64) {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)) {
            Ok((low, _)) if low > next => {
                let lost = low - next;
                error!(topic, partition, from = next, to = low - 1, lost,
                       "records deleted by the topic's retention before they were read: the tables miss them");
                self.metrics
                    .records_lost
                    .with_label_values(&[topic, &partition.to_string()])
                    .inc_by(lost as u64);
            }
            Ok(_) => {}
            Err(e) => {
                warn!(topic, partition, error = %e, "cannot check for records deleted by retention")
            }
        }
    }

    /// Forgets the waiting batches of revoked partitions: whoever owns them next reads them
    /// again from the offset committed with their state.
    fn forget_waiting(&self, source: usize, partitions: &[u32]) {
        self.waiting.lock().retain(|(_, m)| match m {
            Message::Records {
                source: s,
                partition,
                ..
            } => *s != source || !partitions.contains(partition),
            _ => true,
        });
    }

    /// Restores the state of every assigned partition from its changelog, as far as the
    /// changelog goes beyond the state directory; false (the runtime then stops) when one
    /// cannot be restored.
    fn restore(&self, tpl: &TopicPartitionList) -> bool {
        let (Some((restorer, topology)), Some(store)) =
            (&self.changelog, self.runtime.state_store())
        else {
            return true;
        };
        for (source, partitions) in self.by_source(tpl) {
            for partition in partitions {
                let topic = &topology.sources[source].topic;
                let progress = |left| self.runtime.report_restore(topic, partition, Some(left));
                let restored = restorer.restore(
                    topology,
                    (&store, &self.metrics),
                    (source, partition),
                    &progress,
                );
                self.runtime.report_restore(topic, partition, None);
                if let Err(e) = restored {
                    error!(topic, partition, error = %e, "cannot restore the partition's state from its changelog; stopping");
                    self.runtime.fail(format!(
                        "cannot restore partition {partition} of {topic} from its changelog: {e}"
                    ));
                    return false;
                }
            }
        }
        true
    }

    fn by_source(&self, tpl: &TopicPartitionList) -> HashMap<usize, Vec<u32>> {
        let mut out: HashMap<usize, Vec<u32>> = HashMap::new();
        for e in tpl.elements() {
            for s in self.topics.get(e.topic()).into_iter().flatten() {
                out.entry(*s).or_default().push(e.partition() as u32);
            }
        }
        out
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let (tx, rx) = crossbeam_channel::unbounded();
            let mut revoked = Vec::new();
            let tasks: Vec<(usize, Vec<u32>)> = self.by_source(tpl).into_iter().collect();
            for (source, partitions) in &tasks {
                info!(source, ?partitions, "partitions revoked");
                self.metrics
                    .partitions_revoked
                    .inc_by(partitions.len() as u64);
                self.forget_waiting(*source, partitions);
                revoked.extend(partitions.iter().map(|p| (*source, *p)));
            }
            let mut expected = 0;
            if !tasks.is_empty() {
                let leaving = self.stop.load(Ordering::SeqCst) || self.runtime.stopped();
                self.runtime.broadcast(|| Message::Revoke {
                    tasks: tasks.clone(),
                    retract: !leaving,
                    done: tx.clone(),
                });
                expected = self.runtime.workers();
            }
            // A stopped runtime's workers confirm nothing: what they did not commit is read
            // again by the partitions' next owner.
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut confirmed = 0;
            while confirmed < expected && !self.runtime.stopped() {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(()) => confirmed += 1,
                    Err(_) if Instant::now() >= deadline => {
                        warn!("workers did not confirm revocation within 20 s");
                        break;
                    }
                    Err(_) => {}
                }
            }
            if let Some(standbys) = &self.standbys {
                standbys.release(&revoked);
            }
        }
    }

    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr::*;
        match err {
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(standbys) = &self.standbys {
                    let assigned: Vec<(usize, u32)> = self
                        .by_source(tpl)
                        .into_iter()
                        .flat_map(|(s, ps)| ps.into_iter().map(move |p| (s, p)))
                        .collect();
                    standbys.claim(&assigned);
                }
                if !self.restore(tpl) {
                    return;
                }
                // Resume each partition right after the offset committed with its state.
                let elements: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                for (topic, partition) in &elements {
                    let offset = match self.runtime.stored_offset(topic, *partition as u32) {
                        Ok(Some(o)) => {
                            self.report_lost(consumer, topic, *partition, o + 1);
                            Offset::Offset(o + 1)
                        }
                        Ok(None) => Offset::Beginning,
                        Err(e) => {
                            error!(topic, partition, error = %e, "cannot read committed offset; starting from the beginning");
                            Offset::Beginning
                        }
                    };
                    let _ = tpl.set_partition_offset(topic, *partition, offset);
                }
                let tasks: Vec<(usize, Vec<u32>)> = self.by_source(tpl).into_iter().collect();
                for (source, partitions) in &tasks {
                    info!(source, ?partitions, "partitions assigned");
                    self.metrics
                        .partitions_assigned
                        .inc_by(partitions.len() as u64);
                }
                if !tasks.is_empty() {
                    self.runtime.broadcast(|| Message::Assign {
                        tasks: tasks.clone(),
                    });
                }
                if let Err(e) = if incremental(consumer) {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                } {
                    error!(error = %e, "cannot assign partitions");
                }
                // While the runtime takes nothing, new partitions wait too.
                if !self.waiting.lock().is_empty() {
                    if let Err(e) = consumer.pause(tpl) {
                        warn!(error = %e, "cannot pause the assigned partitions");
                    }
                }
            }
            RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                if let Err(e) = unassign(consumer, tpl) {
                    error!(error = %e, "cannot unassign partitions");
                }
            }
            other => {
                error!(error = ?other, "rebalance error");
                let _ = unassign(consumer, tpl);
            }
        }
    }

    fn commit_callback(&self, _result: KafkaResult<()>, _offsets: &TopicPartitionList) {}
}

/// A running Kafka source. Dropping it without [`KafkaSource::stop`] stops it too.
pub struct KafkaSource {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KafkaSource {
    /// Subscribes to the topology's topics as `member` of the topology's consumer group and
    /// starts feeding `runtime`; assigned partitions catch up as `handover` says.
    pub fn start(
        config: &KafkaConfig,
        topology: &Topology,
        runtime: Arc<Runtime>,
        metrics: Arc<Metrics>,
        member: GroupMember<'_>,
        handover: Handover,
    ) -> Result<KafkaSource, KafkaError> {
        let topics = source_topics(topology, false);
        let client_id = format!("miroir-source-{}", member.instance);
        let mut client = source_client(config, &client_id, &topology.name);
        // The poll loop never stalls for long (bounded channels, revocations wait at most
        // 20 s), so 60 s between polls is ample.
        client.set("max.poll.interval.ms", "60000");
        match member.protocol {
            // Range assignment gives partition i of every source topic to the same member:
            // joins and the tables they feed stay partition-local. Cooperative-sticky would
            // move fewer partitions per rebalance but balances partitions over all topics
            // together (one member got every user partition, the other every department one).
            // A member that dies without leaving keeps its partitions until the coordinator
            // expires it: 10 s (librdkafka's default is 45 s) bounds that outage.
            GroupProtocol::Classic => client
                .set("partition.assignment.strategy", "range")
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "3000"),
            // The broker's range assignor keeps co-partitioned topics together too, and is
            // sticky; session and heartbeat are the broker's settings.
            GroupProtocol::Consumer => client
                .set("group.protocol", "consumer")
                .set("group.remote.assignor", "range"),
        };
        if member.fixed {
            client.set("group.instance.id", member.instance);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let changelog = match handover.changelog {
            true => Some((changelog::Restorer::new(config)?, topology.clone())),
            false => None,
        };
        let context = SourceContext::new(
            (runtime.clone(), metrics, stop.clone()),
            topics.clone(),
            (changelog, handover.standbys),
        );
        let consumer: BaseConsumer<SourceContext> = client.create_with_context(context)?;
        let names: Vec<&str> = topics.keys().map(String::as_str).collect();
        record_partition_counts(&consumer, &runtime, Duration::from_secs(10));
        consumer.subscribe(&names)?;
        let mode = match member.fixed {
            true => Leaving::Revoke,
            false => Leaving::LeaveGroup,
        };
        KafkaSource::spawn(
            consumer,
            runtime,
            topics,
            (stop, mode),
            "miroir-kafka-source",
        )
    }

    /// Reads every partition of the topology's global sources (`None` when it has none):
    /// assigned, with no consumer group, each from the offset committed with its state, so
    /// that every instance holds all their rows. Partitions added to such a topic later are
    /// read from the next start.
    pub fn start_global(
        config: &KafkaConfig,
        topology: &Topology,
        runtime: Arc<Runtime>,
        metrics: Arc<Metrics>,
        instance: &str,
    ) -> Result<Option<KafkaSource>, KafkaError> {
        let topics = source_topics(topology, true);
        if topics.is_empty() {
            return Ok(None);
        }
        // librdkafka assigns partitions only to a consumer with a group id; this one never
        // joins its group nor commits to it (offsets are kept with the state).
        let group = format!("{}.global.{instance}", topology.name);
        let client = source_client(config, &format!("miroir-global-{instance}"), &group);
        let stop = Arc::new(AtomicBool::new(false));
        let context = SourceContext::new(
            (runtime.clone(), metrics, stop.clone()),
            topics.clone(),
            (None, None),
        );
        let consumer: BaseConsumer<SourceContext> = client.create_with_context(context)?;
        let source = KafkaSource::spawn(
            consumer,
            runtime,
            topics,
            (stop, Leaving::AssignFirst),
            "miroir-kafka-global",
        )?;
        Ok(Some(source))
    }

    /// Runs `consumer`'s poll loop on a thread named `name`; a panic fails the runtime.
    fn spawn(
        consumer: BaseConsumer<SourceContext>,
        runtime: Arc<Runtime>,
        topics: HashMap<String, Vec<usize>>,
        (stop, mode): (Arc<AtomicBool>, Leaving),
        name: &str,
    ) -> Result<KafkaSource, KafkaError> {
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn({
                let stop = stop.clone();
                move || {
                    let feeding = runtime.clone();
                    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        if mode == Leaving::AssignFirst && !assign_all(&consumer, &feeding, &stop) {
                            return;
                        }
                        poll_loop(consumer, feeding, topics, (stop, mode));
                    }));
                    if let Err(panic) = polled {
                        let message = panic_message(panic.as_ref());
                        error!(error = %message, "the Kafka source panicked: stopping");
                        runtime.fail(format!("the Kafka source panicked: {message}"));
                    }
                }
            })
            .map_err(|source| KafkaError::Thread {
                name: "consumer",
                source,
            })?;
        Ok(KafkaSource {
            stop,
            thread: Some(thread),
        })
    }

    /// Leaves the consumer group (the runtime commits revoked partitions) and stops polling.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The settings both source consumers share: client id `client_id`, group `group`, no
/// offsets committed to Kafka (they are kept with the state), statistics every second.
fn source_client(config: &KafkaConfig, client_id: &str, group: &str) -> ClientConfig {
    let mut client = config.client("source");
    client
        .set("client.id", client_id)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "1000")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    client
}

/// The topics of the topology's sources that are global (`global`) or not, with the
/// positions of the sources reading each. A topic's records go to its first source's tasks,
/// which hand them to the others (see [`Topology::readers_of`]); assignments, revocations and
/// restores are each reader's.
fn source_topics(topology: &Topology, global: bool) -> HashMap<String, Vec<usize>> {
    let mut topics: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, s) in topology.sources.iter().enumerate() {
        if s.global == global {
            topics.entry(s.topic.clone()).or_default().push(i);
        }
    }
    topics
}

/// How a source's consumer gets and gives back its partitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaving {
    /// A dynamic member of the group: leaving it revokes its partitions.
    LeaveGroup,
    /// A static member: it revokes its partitions itself and stays in the group.
    Revoke,
    /// No group: it assigns itself every partition first, and revokes them at the end.
    AssignFirst,
}

/// Assigns `consumer` every partition of its topics, each from the offset committed with its
/// state, once they all exist (checked every 5 s, with a warning); false when the instance
/// stopped first.
fn assign_all(
    consumer: &BaseConsumer<SourceContext>,
    runtime: &Runtime,
    stop: &AtomicBool,
) -> bool {
    let topics = &consumer.context().topics;
    loop {
        if stop.load(Ordering::SeqCst) || runtime.stopped() {
            return false;
        }
        record_partition_counts(consumer, runtime, Duration::from_secs(5));
        let counts: Vec<(&String, Option<u32>)> = topics
            .keys()
            .map(|t| (t, runtime.partition_count(t)))
            .collect();
        if counts.iter().all(|(_, n)| n.is_some()) {
            let mut tpl = TopicPartitionList::new();
            for (topic, n) in counts {
                for p in 0..n.unwrap_or(0) {
                    tpl.add_partition(topic, p as i32);
                }
            }
            consumer.context().rebalance(
                consumer,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS,
                &mut tpl,
            );
            return true;
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

fn poll_loop(
    consumer: BaseConsumer<SourceContext>,
    runtime: Arc<Runtime>,
    topics: HashMap<String, Vec<usize>>,
    (stop, leaving): (Arc<AtomicBool>, Leaving),
) {
    let topics: HashMap<String, usize> = topics.into_iter().map(|(t, s)| (t, s[0])).collect();
    let mut batches: HashMap<(usize, u32), Records> = HashMap::new();
    let mut pending = 0usize;
    // When the oldest record of the pending batches was read.
    let mut oldest: Option<Instant> = None;
    let source_topics: HashMap<usize, String> =
        topics.iter().map(|(t, s)| (*s, t.clone())).collect();
    // The topic names as librdkafka takes them, made once (names with a NUL byte cannot exist).
    let c_topics: HashMap<usize, CString> = topics
        .iter()
        .filter_map(|(t, s)| Some((*s, CString::new(t.as_str()).ok()?)))
        .collect();
    let flush = |batches: &mut HashMap<(usize, u32), Records>| {
        for ((source, partition), records) in batches.drain() {
            let topic = &source_topics[&source];
            let Some(last) = records.last_offset() else {
                continue;
            };
            consumer
                .context()
                .delivered
                .lock()
                .insert((topic.clone(), partition), last);
            let catching_up = c_topics
                .get(&source)
                .and_then(|t| cached_high_watermark(&consumer, t, partition))
                .is_some_and(|high| high - (last + 1) > CATCHING_UP);
            let message = Message::Records {
                source,
                partition,
                records,
                catching_up,
            };
            consumer
                .context()
                .waiting
                .lock()
                .push_back((partition, message));
        }
    };
    let mut paused = false;
    while !stop.load(Ordering::SeqCst) && !runtime.stopped() {
        // In whole milliseconds, rounded down: rdkafka hands librdkafka whole milliseconds and
        // polls again until the full wait has passed, so the fraction of a millisecond left
        // after the last one would be spent spinning (a tenth of a core at 1,000 records/s).
        let wait = oldest.map_or(Duration::from_millis(50), |t| {
            let left = FLUSH_AFTER.saturating_sub(t.elapsed());
            Duration::from_millis(left.as_millis() as u64)
        });
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                let Some(source) = topics.get(m.topic()) else {
                    continue;
                };
                batches
                    .entry((*source, m.partition() as u32))
                    .or_default()
                    .push(m.offset(), m.key(), m.payload());
                pending += 1;
                let first = *oldest.get_or_insert_with(Instant::now);
                if pending >= BATCH || first.elapsed() >= FLUSH_AFTER {
                    flush(&mut batches);
                    pending = 0;
                    oldest = None;
                }
            }
            Some(Err(rdkafka::error::KafkaError::MessageConsumptionFatal(code))) => {
                let message = fatal_consumer_error(code);
                error!(error = %message, "the Kafka source cannot go on: stopping");
                runtime.fail(message);
                break;
            }
            Some(Err(e)) => warn!(error = %e, "kafka consumer error"),
            None => {
                flush(&mut batches);
                pending = 0;
                oldest = None;
            }
        }
        let taken = consumer.context().hand_over();
        if taken == paused {
            paused = pause(&consumer, !taken);
        }
    }
    flush(&mut batches);
    // What the runtime does not take now is not committed: it is read again next time.
    consumer.context().hand_over();
    if leaving != Leaving::LeaveGroup {
        // A static member keeps its place in the group for `session.timeout.ms`, so that a
        // restart moves no partition. librdkafka sends LeaveGroup on `unsubscribe` (only a
        // consumer already closing skips it): the partitions are revoked (and committed) here
        // instead, and the consumer closes with nothing assigned. A consumer without a group
        // gives back what it assigned itself the same way.
        if let Ok(assignment) = consumer.assignment() {
            consumer
                .context()
                .pre_rebalance(&consumer, &Rebalance::Revoke(&assignment));
            if let Err(e) = unassign(&consumer, &assignment) {
                warn!(error = %e, "cannot unassign partitions");
            }
        }
        info!("kafka source stopped");
        return;
    }
    // Leaving the group revokes every partition: the runtime commits them first. Unsubscribe
    // before dropping, or librdkafka's close can hang (see DESIGN, known traps).
    consumer.unsubscribe();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false)
    {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    info!("kafka source stopped");
}

/// What a fatal error of the source's consumer means for whoever runs the instance.
fn fatal_consumer_error(code: rdkafka::types::RDKafkaErrorCode) -> String {
    use rdkafka::types::RDKafkaErrorCode::UnreleasedInstanceId;
    match code {
        UnreleasedInstanceId => format!(
            "the consumer group still has a member with this --instance-id ({code}): a process \
             killed without leaving holds it until the broker's session timeout expires; start \
             again after it"
        ),
        _ => format!("the source's Kafka consumer failed: {code}"),
    }
}

/// Whether the group's rebalances are incremental (KIP-848's protocol): assignments then add
/// and remove partitions instead of replacing the whole assignment.
fn incremental(consumer: &BaseConsumer<SourceContext>) -> bool {
    matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    )
}

/// Takes `partitions` (all of the assignment, with an eager protocol) away from the consumer.
fn unassign(
    consumer: &BaseConsumer<SourceContext>,
    partitions: &TopicPartitionList,
) -> KafkaResult<()> {
    if incremental(consumer) {
        consumer.incremental_unassign(partitions)
    } else {
        consumer.unassign()
    }
}

/// Pauses (`on`) or resumes every assigned partition; returns whether consumption is paused.
/// While the runtime takes no records (its inboxes are full: the external database is slow,
/// say), the consumer stays paused and goes on polling, so it stays in its group (a consumer
/// that does not poll within `max.poll.interval.ms` leaves it, and its tables with it).
fn pause(consumer: &BaseConsumer<SourceContext>, on: bool) -> bool {
    let assignment = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "cannot read the assignment to pause or resume it");
            return !on;
        }
    };
    let done = if on {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match done {
        Ok(()) => {
            let partitions = assignment.count();
            if on {
                info!(
                    partitions,
                    "the engine is behind: consumption paused, still polling"
                );
            } else {
                info!(
                    partitions,
                    "the engine takes records again: consumption resumed"
                );
            }
            consumer.context().metrics.source_paused.set(i64::from(on));
            on
        }
        Err(e) => {
            warn!(error = %e, paused = on, "cannot pause or resume consumption");
            !on
        }
    }
}

/// The high watermark librdkafka last saw for a partition, from its fetch responses (no
/// request to the broker), if it saw one.
fn cached_high_watermark(
    consumer: &BaseConsumer<SourceContext>,
    topic: &CStr,
    partition: u32,
) -> Option<i64> {
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client handle lives as long as `consumer`; librdkafka reads the topic name
    // (a valid C string for the call) and writes the two offsets, nothing else.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition as i32,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// Records each source topic's partition count (to tell which partition a key lives in), and
/// warns about source topics that do not exist (yet).
fn record_partition_counts(
    consumer: &BaseConsumer<SourceContext>,
    runtime: &Runtime,
    timeout: Duration,
) {
    let Ok(metadata) = consumer.fetch_metadata(None, timeout) else {
        return;
    };
    for topic in consumer.context().topics.keys() {
        match metadata.topics().iter().find(|t| t.name() == topic) {
            Some(t) if !t.partitions().is_empty() => {
                runtime.report_partition_counts([(topic.clone(), t.partitions().len() as u32)]);
            }
            _ if runtime.partition_count(topic).is_none() => warn!(
                topic = %topic,
                "source topic does not exist yet; its partitions are assigned once it does"
            ),
            _ => {}
        }
    }
}
