//! Changelog topics: the Kafka side of [`miroir_engine::changelog`].
//!
//! Each source has one compacted changelog topic, `<topology>.<source>.<layout>.miroir-changelog`
//! with as many partitions as the source topic. `<layout>` is a hash of the source's layout
//! (its columns and late policy, [`miroir_engine::topology::Source::layout`]): a source that
//! changes gets a new changelog, never entries written for other columns.
//!
//! [`KafkaChangelog`] writes each epoch's records in one transaction (its transactional id is
//! the instance's: a restarted instance fences its previous incarnation). [`restore`] reads a
//! task's changelog into the state directory when its partition is assigned, before the task
//! opens.

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use miroir_engine::changelog::{
    plan_restore, ChangelogError, ChangelogRecord, ChangelogWriter, Position, RecordTopic, Restore,
    RestoreError, RestorePlan,
};
use miroir_engine::error::ErrorClass;
use miroir_engine::metrics::Metrics;
use miroir_engine::partition::murmur2;
use miroir_engine::state::StateStore;
use miroir_engine::topology::Topology;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{info, warn};

use super::admin::{create_topics_with, topics};
use super::tail::TailContext;
use super::{KafkaConfig, KafkaError};

/// Suffix of the changelog topics.
pub const CHANGELOG_SUFFIX: &str = ".miroir-changelog";

/// Longest wait for a transaction to commit or abort.
const TX_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a restore goes without reading anything before it gives up.
const RESTORE_STALL: Duration = Duration::from_secs(60);

/// The largest changelog record: an entity event of up to a megabyte plus its versions.
pub(crate) const MAX_RECORD_BYTES: &str = "16777216";

/// The changelog topic of the topology's source `source`.
pub fn topic(topology: &Topology, source: usize) -> String {
    let src = &topology.sources[source];
    let layout = murmur2(src.layout().as_bytes()) as u32;
    format!(
        "{}.{}.{layout:08x}{CHANGELOG_SUFFIX}",
        topology.name, src.name
    )
}

/// Creates the changelog topic of every source that does not have one yet, compacted, with
/// the source topic's partition count.
pub fn create_topics(config: &KafkaConfig, topology: &Topology) -> Result<(), KafkaError> {
    let consumer: BaseConsumer = config.client("admin").create()?;
    let existing: HashMap<String, i32> = topics(consumer.client())?.into_iter().collect();
    let mut missing = Vec::new();
    // A global source's state is read from its topic on every instance: it has no changelog.
    for (i, src) in topology
        .sources
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.global)
    {
        let partitions = existing.get(&src.topic).ok_or_else(|| {
            KafkaError::Config(format!(
                "source topic {} does not exist: its changelog cannot be created",
                src.topic
            ))
        })?;
        let changelog = topic(topology, i);
        if !existing.contains_key(&changelog) {
            missing.push((changelog, *partitions));
        }
    }
    let missing: Vec<(&str, i32)> = missing.iter().map(|(t, p)| (t.as_str(), *p)).collect();
    create_topics_with(
        config,
        &missing,
        &[
            ("cleanup.policy", "compact"),
            ("max.message.bytes", MAX_RECORD_BYTES),
        ],
    )
}

/// Collects the offset of each record delivered, by topic and partition.
#[derive(Default)]
struct Deliveries {
    last: Mutex<HashMap<(String, i32), i64>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Ok(m) = result {
            let mut last = self.last.lock();
            let at = last
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(m.offset());
            *at = (*at).max(m.offset());
        }
    }
}

/// A changelog producer being made.
type Starting = JoinHandle<Result<BaseProducer<Deliveries>, KafkaError>>;

/// Writes the tasks' changelogs, one transaction per epoch.
pub struct KafkaChangelog {
    config: KafkaConfig,
    transactional_id: String,
    /// The changelog topic of each source, by the source's position.
    topics: Vec<String>,
    /// Each source's own topic, for repartition records.
    source_topics: Vec<String>,
    /// The producer, once made; `None` after a failure to make one (the next write tries).
    producer: Mutex<Option<BaseProducer<Deliveries>>>,
    /// The producer being made at start (its transactions take half a second to initialize,
    /// which the instance spends joining its group and reading meanwhile).
    starting: Mutex<Option<Starting>>,
}

impl KafkaChangelog {
    /// A writer for `topology`'s changelogs with transactional id `transactional_id`; its
    /// producer starts in the background and, before the first write, fences and aborts what
    /// an earlier holder of the id left open.
    pub fn new(
        config: &KafkaConfig,
        topology: &Topology,
        transactional_id: &str,
    ) -> Result<KafkaChangelog, KafkaError> {
        let starting = std::thread::Builder::new()
            .name("miroir-changelog-start".into())
            .spawn({
                let (config, id) = (config.clone(), transactional_id.to_string());
                move || transactional(&config, &id)
            })
            .map_err(|source| KafkaError::Thread {
                name: "changelog-start",
                source,
            })?;
        Ok(KafkaChangelog {
            config: config.clone(),
            transactional_id: transactional_id.to_string(),
            topics: (0..topology.sources.len())
                .map(|i| topic(topology, i))
                .collect(),
            source_topics: topology.sources.iter().map(|s| s.topic.clone()).collect(),
            producer: Mutex::new(None),
            starting: Mutex::new(Some(starting)),
        })
    }

    /// The producer made at start, or a new one when there is none.
    fn make_producer(&self) -> Result<BaseProducer<Deliveries>, KafkaError> {
        match self.starting.lock().take() {
            Some(starting) => starting
                .join()
                .map_err(|_| KafkaError::Panicked("changelog-start"))?,
            None => transactional(&self.config, &self.transactional_id),
        }
    }

    fn transaction(
        &self,
        producer: &BaseProducer<Deliveries>,
        records: &[ChangelogRecord],
    ) -> Result<(), KafkaError> {
        producer.context().last.lock().clear();
        producer.begin_transaction()?;
        for r in records {
            let topic = match r.topic {
                RecordTopic::Changelog => &self.topics[r.source],
                RecordTopic::Source => &self.source_topics[r.source],
            };
            let mut record = BaseRecord::to(topic)
                .partition(r.partition as i32)
                .key(r.key.as_slice());
            if let Some(value) = &r.value {
                record = record.payload(value.as_slice());
            }
            send(producer, record)?;
        }
        await_deliveries(producer);
        producer.commit_transaction(TX_TIMEOUT)?;
        Ok(())
    }

    fn positions(&self, producer: &BaseProducer<Deliveries>) -> Vec<Position> {
        let last = producer.context().last.lock();
        last.iter()
            .filter_map(|((topic, partition), offset)| {
                let (kind, source) = match self.topics.iter().position(|t| t == topic) {
                    Some(source) => (RecordTopic::Changelog, source),
                    None => (
                        RecordTopic::Source,
                        self.source_topics.iter().position(|t| t == topic)?,
                    ),
                };
                Some(Position {
                    topic: kind,
                    source,
                    partition: *partition as u32,
                    next: offset + 1,
                })
            })
            .collect()
    }
}

/// Sends `record`, waiting while the producer's queue is full.
/// Serves the producer's delivery reports until its records are delivered (for at most
/// [`TX_TIMEOUT`]; the commit then reports what is still in flight). rust-rdkafka's commit
/// flushes with polls of up to 100 ms, which a small transaction would wait out whole: an
/// epoch of a few records would become readable 100 ms later than it needs to.
fn await_deliveries(producer: &BaseProducer<Deliveries>) {
    let deadline = Instant::now() + TX_TIMEOUT;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        producer.poll(Duration::from_millis(1));
    }
}

fn send(
    producer: &BaseProducer<Deliveries>,
    mut record: BaseRecord<'_, [u8], [u8]>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                r,
            )) => {
                record = r;
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

impl ChangelogWriter for KafkaChangelog {
    fn write(&self, records: &[ChangelogRecord]) -> Result<Vec<Position>, ChangelogError> {
        let failed = |e: KafkaError| ChangelogError {
            class: e.class(),
            message: e.to_string(),
        };
        let mut slot = self.producer.lock();
        if slot.is_none() {
            *slot = Some(self.make_producer().map_err(failed)?);
        }
        let producer = slot.as_ref().expect("made above");
        match self.transaction(producer, records).map_err(fenced_producer) {
            Ok(()) => Ok(self.positions(producer)),
            Err(e) => {
                let _ = producer.abort_transaction(TX_TIMEOUT);
                if e.producer_unusable() && e.class() != ErrorClass::Fatal {
                    // Only a new producer goes on (made at the next write); it aborts what
                    // this one left open.
                    *slot = None;
                }
                Err(failed(e))
            }
        }
    }
}

/// A transaction refused because its producer was fenced, said for whoever runs the
/// instance: another process took the instance's transactional id over, or this one was
/// paused (or cut off) longer than the transaction timeout, and the broker aborted it.
fn fenced_producer(e: KafkaError) -> KafkaError {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let code = match &e {
        KafkaError::Client { source, .. } => source.rdkafka_error_code(),
        _ => None,
    };
    match code {
        Some(Code::ProducerFenced | Code::InvalidProducerEpoch | Code::Fenced) => {
            KafkaError::Fenced(format!(
                "the changelog's producer was fenced ({e}): another process runs with this \
                 instance's id, or this one was paused or cut off longer than the transaction \
                 timeout (10 s); its epoch is refused and it stops"
            ))
        }
        _ => e,
    }
}

fn transactional(
    config: &KafkaConfig,
    transactional_id: &str,
) -> Result<BaseProducer<Deliveries>, KafkaError> {
    let producer: BaseProducer<Deliveries> = config
        .client("changelog")
        .set("transactional.id", transactional_id)
        .set("linger.ms", "1")
        .set("message.max.bytes", MAX_RECORD_BYTES)
        // A transaction left open by a killed instance holds back every read_committed reader
        // of its partitions (a restore, a standby) until it times out: epochs commit in
        // milliseconds, so 10 s is ample.
        .set("transaction.timeout.ms", "10000")
        .create_with_context(Deliveries::default())?;
    producer.init_transactions(TX_TIMEOUT)?;
    Ok(producer)
}

/// A consumer of changelog partitions (assigned, outside any group), committed records only,
/// that reports the end of each partition it reaches.
pub(crate) fn reader(
    config: &KafkaConfig,
    role: &str,
) -> Result<BaseConsumer<TailContext>, KafkaError> {
    Ok(config
        .client(role)
        .set("group.id", "miroir-restore") // required by librdkafka; nothing is committed
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        // A partition with nothing new to restore (only the marker of its last
        // transaction) ends at the first fetch: the broker must not hold it for 500 ms.
        .set("fetch.wait.max.ms", "10")
        .create_with_context(TailContext)?)
}

/// Counts and logs a record of a changelog that is not a changelog record.
pub(crate) fn skip_malformed(
    metrics: &Metrics,
    (changelog, source_topic): (&str, &str),
    partition: u32,
    offset: i64,
    error: &ChangelogError,
) {
    metrics
        .changelog
        .malformed_records
        .with_label_values(&[source_topic])
        .inc();
    warn!(topic = %changelog, partition, offset, error = %error, "not a changelog record: skipped");
}

/// A consumer that reads changelog partitions into the state directory, outside any group.
pub struct Restorer {
    consumer: BaseConsumer<TailContext>,
}

impl Restorer {
    /// A restorer on `config`'s brokers.
    pub fn new(config: &KafkaConfig) -> Result<Restorer, KafkaError> {
        Ok(Restorer {
            consumer: reader(config, "restore")?,
        })
    }

    /// Restores the state of `source`/`partition` from its changelog into `store`, as far as
    /// the changelog goes beyond the state directory's position (see [`plan_restore`]);
    /// returns the number of records read. `progress` hears the records still to read, now
    /// and then.
    pub fn restore(
        &self,
        topology: &Topology,
        (store, metrics): (&StateStore, &Metrics),
        task: (usize, u32),
        progress: &dyn Fn(i64),
    ) -> Result<u64, KafkaError> {
        let restored = restore(&self.consumer, topology, (store, metrics), task, progress);
        self.consumer.unassign()?;
        restored
    }
}

/// How long the watermarks of a changelog partition are asked for again while the broker
/// answers with a transient error: a topic another instance just created has no leader for a
/// moment.
const WATERMARKS_RETRY: Duration = Duration::from_secs(30);

/// The low and high watermarks of `partition` of `changelog`, asked again for
/// [`WATERMARKS_RETRY`] after transient errors.
fn watermarks(
    consumer: &BaseConsumer<TailContext>,
    changelog: &str,
    partition: u32,
) -> Result<(i64, i64), KafkaError> {
    let deadline = Instant::now() + WATERMARKS_RETRY;
    loop {
        match consumer.fetch_watermarks(changelog, partition as i32, TX_TIMEOUT) {
            Ok(marks) => return Ok(marks),
            Err(e) => {
                let e = KafkaError::from(e);
                if e.class() != ErrorClass::Transient || Instant::now() >= deadline {
                    return Err(e);
                }
                warn!(topic = %changelog, partition, error = %e, "cannot read the changelog's watermarks yet; asking again");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn restore(
    consumer: &BaseConsumer<TailContext>,
    topology: &Topology,
    (store, metrics): (&StateStore, &Metrics),
    (source, partition): (usize, u32),
    progress: &dyn Fn(i64),
) -> Result<u64, KafkaError> {
    let changelog = topic(topology, source);
    let src_topic = &topology.sources[source].topic;
    let (low, high) = watermarks(consumer, &changelog, partition)?;
    let position = store.changelog_position(source, partition)?;
    let local =
        store.has_entries(source, partition)? || store.offset(src_topic, partition)?.is_some();
    let start = match plan_restore(position, local, low, high) {
        RestorePlan::Whole if high <= low => {
            // Nothing logged yet: the task starts from nothing.
            store.drop_task(source, partition, src_topic)?;
            return Ok(0);
        }
        RestorePlan::LogLocal => {
            info!(topic = %changelog, partition, "the changelog lacks this state: the task logs all of it with its first epoch");
            store.forget_changelog_position(source, partition)?;
            return Ok(0);
        }
        RestorePlan::From(p) if p >= high => return Ok(0),
        RestorePlan::From(p) => Offset::Offset(p),
        RestorePlan::Whole => Offset::Beginning,
    };
    let whole = start == Offset::Beginning;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&changelog, partition as i32, start)?;
    consumer.assign(&tpl)?;
    let mut restore = Restore::start(store, source, partition, src_topic, whole)?;
    let remaining = metrics
        .changelog
        .restore_remaining
        .with_label_values(&[src_topic.as_str(), &partition.to_string()]);
    let restored = metrics
        .changelog
        .restored_records
        .with_label_values(&[src_topic.as_str()]);
    let started = Instant::now();
    info!(topic = %changelog, partition, from = ?start, to = high, "restoring a task's state from its changelog");
    let mut next = match start {
        Offset::Offset(p) => p,
        _ => low,
    };
    progress((high - next).max(0));
    let (mut last_read, mut last_log) = (Instant::now(), Instant::now());
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last_read = Instant::now();
                next = m.offset() + 1;
                match restore.apply(m.key(), m.payload()) {
                    Ok(()) => {}
                    Err(RestoreError::Malformed(e)) => skip_malformed(
                        metrics,
                        (&changelog, src_topic),
                        partition,
                        m.offset(),
                        &e,
                    ),
                    Err(RestoreError::Store(e)) => return Err(e.into()),
                }
                restored.inc();
                remaining.set((high - next).max(0));
                if restore.records() % 1000 == 0 {
                    progress((high - next).max(0));
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => warn!(topic = %changelog, partition, error = %e, "reading the changelog"),
            None if last_read.elapsed() > RESTORE_STALL => {
                return Err(KafkaError::Unavailable(format!(
                    "the changelog {changelog} partition {partition} gave nothing for {RESTORE_STALL:?}"
                )))
            }
            None => {}
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            info!(topic = %changelog, partition, read = restore.records(), remaining = (high - next).max(0), "restoring");
        }
    }
    if let Ok(positions) = consumer.position() {
        if let Some(Offset::Offset(p)) = positions
            .find_partition(&changelog, partition as i32)
            .map(|e| e.offset())
        {
            next = next.max(p);
        }
    }
    let records = restore.records();
    let offset = restore.finish(next)?;
    remaining.set(0);
    info!(topic = %changelog, partition, records, offset = ?offset, seconds = started.elapsed().as_secs_f64(), "task state restored from its changelog");
    Ok(records)
}
