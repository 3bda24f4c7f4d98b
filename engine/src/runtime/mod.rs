//! The runtime: timely workers running the topology's dataflow, fed by per-partition tasks.
//!
//! ```text
//!  connector thread ──Message──► worker (partition % W) ──► task (source, partition)
//!                                  tasks.rs                  ingest/: decode, late, upsert
//!                                                           ▼
//!                                     InputSession ──► dataflow ──► captured table deltas
//!                                     worker.rs                            │ changes.rs
//!  every worker, at the end of each epoch (epoch.rs):  rows + upsert entries + offsets
//!        ──► one shared RocksDB WriteBatch ──► written once (sync) by the leader (commit.rs)
//! ```
//!
//! A *task* is one partition of one source, pinned to worker `partition % W`, so records of a
//! key are always applied in offset order by one thread. Epochs are global: every worker feeds
//! its tasks for a while (bounded by count and time), advances all of its inputs, steps the
//! dataflow until the probe passes the epoch, encodes its writes (sorted by key) on its own,
//! adds them to the shared commit, and waits on a barrier; one worker writes the commit. A
//! crash loses at most the epoch in progress, and the replay that follows has no second effect
//! (see [`crate::ingest::upsert`]).
//!
//! Progress (committed epoch and offsets, watermarks, failure) is kept in `status.rs`: the
//! connector reports to it and embedders read it through [`Runtime`]'s methods.

mod backlog;
mod changes;
mod commit;
mod config;
mod epoch;
mod error;
mod inbox;
mod placements;
mod shared;
mod stall;
mod status;
mod tasks;
mod worker;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::changelog::ChangelogWriter;
use crate::ingest::{ErrorSink, Message};
use crate::metrics::Metrics;
use crate::partition::worker_for_partition;
use crate::sink::{ExternalSink, Sequence, SinkDriver};
use crate::state::{offsets_prefix, positions_prefix, source_prefix, StateStore, StoreError};
use crate::topology::Topology;
use backlog::Backlog;
pub use config::RuntimeConfig;
pub use error::RuntimeError;
use inbox::{inbox, InboxReceiver, InboxSender, Refused};
use shared::Shared;
use status::Status;
pub use status::{StatusSnapshot, TopicPartition};

/// A running instance of a topology's dataflow.
pub struct Runtime {
    senders: Vec<InboxSender>,
    shutdown: Arc<AtomicBool>,
    guards: Mutex<Option<timely::communication::initialize::WorkerGuards<()>>>,
    sink: Mutex<Option<SinkDriver>>,
    /// The state store, until shutdown (which closes it once the workers are done).
    store: Mutex<Option<StateStore>>,
    status: Arc<Status>,
}

impl Runtime {
    /// Starts `config.workers` workers running `topology` over `store`; the changes of
    /// external tables go to `sink` (required when the topology has any); with `changelog`,
    /// every epoch's changes of the tasks' state (and its repartition records) are written
    /// there before they commit, and without, the tables are computed unsplit
    /// ([`Topology::unsplit`]).
    pub fn start(
        topology: Arc<Topology>,
        store: StateStore,
        metrics: Arc<Metrics>,
        errors: Arc<dyn ErrorSink>,
        sink: Option<Box<dyn ExternalSink>>,
        changelog: Option<Arc<dyn ChangelogWriter>>,
        config: RuntimeConfig,
    ) -> Result<Runtime, RuntimeError> {
        // Repartition records are written with the changelogs, in their transactions: without
        // a changelog, tables are computed unsplit (right with one instance).
        let topology = match (&changelog, topology.repartitions.is_empty()) {
            (None, false) => Arc::new(topology.unsplit()),
            _ => topology,
        };
        rebuild_changed_sources(&topology, &store)?;
        // A global source's state comes from its topic, on every instance: it is not logged.
        let store = store.logging(
            topology
                .sources
                .iter()
                .map(|s| changelog.is_some() && !s.global)
                .collect(),
        );
        let workers = config.workers.max(1);
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| inbox(config.inbox_bytes)).unzip();
        let receivers: Arc<Vec<InboxReceiver>> = Arc::new(receivers);
        let shutdown = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Status::default());
        let (sink_sender, sink_driver) = match sink {
            Some(sink) if topology.has_external_tables() => {
                let recovered = commit::recover_outbox(&store)?;
                let (sender, driver) = SinkDriver::start(
                    sink,
                    recovered,
                    store.clone(),
                    metrics.clone(),
                    status.sink.clone(),
                    shutdown.clone(),
                    stop_on_failure(status.clone(), shutdown.clone()),
                );
                (Some(sender), Some(driver))
            }
            None if topology.has_external_tables() => return Err(RuntimeError::NoSink),
            _ => {
                drop_outbox(&store)?;
                (None, None)
            }
        };
        let shared = Arc::new(Shared {
            sequence: Sequence::new(store.sequence()?),
            sink: sink_sender,
            sink_changes: Mutex::new(Vec::new()),
            sink_offsets: Mutex::new(HashMap::new()),
            announced_caught_up: AtomicBool::new(false),
            sink_claims: Mutex::new(Vec::new()),
            held: Mutex::new(Vec::new()),
            started: Instant::now(),
            partial_skipped: Mutex::new(HashSet::new()),
            stalls: changelog
                .as_ref()
                .map(|_| stall::Stalls::watch(shutdown.clone())),
            changelog,
            topology,
            store: store.clone(),
            metrics,
            errors,
            config,
            commit: Mutex::new(None),
            barrier: Barrier::new(workers),
            shutdown: shutdown.clone(),
            stop_after_epoch: AtomicBool::new(false),
            status: status.clone(),
            backlog: Backlog::default(),
            early_end: Default::default(),
        });
        let guards = timely::execute(timely::Config::process(workers), move |worker| {
            let index = worker.index();
            worker::run(worker, &shared, receivers[index].clone());
        })
        .map_err(RuntimeError::Start)?;
        Ok(Runtime {
            senders,
            shutdown,
            guards: Mutex::new(Some(guards)),
            sink: Mutex::new(sink_driver),
            store: Mutex::new(Some(store)),
            status,
        })
    }

    /// Sends `message` to the worker that owns `partition`.
    pub fn send(&self, partition: u32, message: Message) {
        let w = worker_for_partition(partition, self.senders.len());
        self.deliver(w, message);
    }

    /// Hands `message` to the worker that owns `partition` if its inbox has room, or gives
    /// it back: the caller keeps it, and keeps polling its source meanwhile. A stopped
    /// runtime takes (and drops) everything.
    pub fn try_send(&self, partition: u32, message: Message) -> Result<(), Message> {
        let w = worker_for_partition(partition, self.senders.len());
        match self.senders[w].try_send(message) {
            Err(Refused::Full(m)) if !self.stopped() => Err(m),
            _ => Ok(()),
        }
    }

    /// Blocks while the worker's inbox is full (backpressure), unless the runtime stops.
    fn deliver(&self, worker: usize, mut message: Message) {
        loop {
            match self.senders[worker].try_send(message) {
                Err(Refused::Full(m)) if !self.stopped() => {
                    message = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Taken, or stopped: the failure, if any, is in `status`.
                _ => return,
            }
        }
    }

    /// Sends a copy of an assignment change to every worker (each keeps its own partitions).
    pub fn broadcast(&self, make: impl Fn() -> Message) {
        for w in 0..self.senders.len() {
            self.deliver(w, make());
        }
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.senders.len()
    }

    /// Whether the workers stopped (shut down or failed).
    pub fn stopped(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// A copy of the runtime's progress now.
    pub fn status(&self) -> StatusSnapshot {
        self.status.snapshot()
    }

    /// The failure that stopped the runtime, if any.
    pub fn failure(&self) -> Option<String> {
        self.status.failure()
    }

    /// Stops the runtime with `failure`: what a component that cannot go on (the connector
    /// feeding it, say) calls. The failure is reported like the runtime's own.
    pub fn fail(&self, failure: String) {
        stop_on_failure(self.status.clone(), self.shutdown.clone())(failure);
    }

    /// The last committed offset of every partition committed since the start.
    pub fn committed_offsets(&self) -> HashMap<TopicPartition, i64> {
        self.status.committed()
    }

    /// The offset committed with `topic`/`partition`'s state in the state directory, where a
    /// new assignment of it resumes (after it); `None` after a shutdown too.
    pub fn stored_offset(&self, topic: &str, partition: u32) -> Result<Option<i64>, StoreError> {
        match self.store.lock().as_ref() {
            Some(store) => store.offset(topic, partition),
            None => Ok(None),
        }
    }

    /// The state store, until shutdown: where a task's changelog is restored into
    /// ([`crate::changelog::Restore`]) before its partition is assigned.
    pub fn state_store(&self) -> Option<StateStore> {
        self.store.lock().clone()
    }

    /// Reports that `partition` of `topic` has `remaining` records of its changelog to read
    /// before its task opens (`None`: its restore ended); such a partition counts as
    /// restoring.
    pub fn report_restore(&self, topic: &str, partition: u32, remaining: Option<i64>) {
        self.status.changelog_restore(topic, partition, remaining);
    }

    /// The partition count of a source topic, once the connector has seen it.
    pub fn partition_count(&self, topic: &str) -> Option<u32> {
        self.status.partition_count(topic)
    }

    /// Whether this instance owns `partition` of `topic` and its task has caught up with the
    /// partition's end as it was when the task opened: its rows are all in the tables.
    pub fn restored(&self, topic: &str, partition: u32) -> bool {
        self.status.restored(topic, partition)
    }

    /// The partitions this instance owns whose task has not caught up yet, by topic, in order.
    pub fn restoring_partitions(&self) -> std::collections::BTreeMap<String, Vec<u32>> {
        self.status.restoring()
    }

    /// The last offset of `partition` of `topic` applied and committed here, if any.
    pub fn committed_offset(&self, topic: &str, partition: u32) -> Option<i64> {
        self.status.committed_offset(topic, partition)
    }

    /// Whether this instance owns (has a task for) `partition` of `topic`.
    pub fn owns(&self, topic: &str, partition: u32) -> bool {
        self.status.owns(topic, partition)
    }

    /// The source partitions this instance owns (has a task for), by topic, in order.
    pub fn owned_partitions(&self) -> std::collections::BTreeMap<String, Vec<u32>> {
        self.status.owned()
    }

    /// Reports the high watermark of each assigned partition of `topics` (negative while
    /// unknown), replacing what was reported for them: the lag, and so readiness, follow.
    pub fn report_watermarks(&self, topics: &[&str], watermarks: HashMap<TopicPartition, i64>) {
        self.status.set_watermarks(topics, watermarks);
    }

    /// Reports the partition counts of source topics.
    pub fn report_partition_counts(&self, counts: impl IntoIterator<Item = (String, u32)>) {
        self.status.add_partition_counts(counts);
    }

    /// Commits the epoch in progress and stops the workers (waits for them).
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let guards = self.guards.lock().take();
        drop(guards); // joins the worker threads, dropping the sink's sender
        if let Some(mut sink) = self.sink.lock().take() {
            sink.finish();
        }
        self.store.lock().take();
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }
}

/// What a component calls when it fails for good: the runtime records why and stops.
fn stop_on_failure(status: Arc<Status>, shutdown: Arc<AtomicBool>) -> impl Fn(String) + Send {
    move |failure| {
        status.set_failed(failure);
        shutdown.store(true, Ordering::SeqCst);
    }
}

/// Drops the state of each source whose layout ([`crate::topology::Source::layout`]) is not
/// the one its state was written with: the source is read again from its topic's beginning
/// instead of misread. A source new on a topic other sources read already (a stream source
/// added for a history) has that topic read again from its beginning too: the others take
/// what they read again as duplicates.
fn rebuild_changed_sources(topology: &Topology, store: &StateStore) -> Result<(), StoreError> {
    for (i, source) in topology.sources.iter().enumerate() {
        if joins_a_read_topic(topology, store, i)? {
            warn!(source = %source.name, topic = %source.topic,
                  "the source is new on a topic this state directory read already: the topic is read again from its beginning");
            store.delete_prefixes(&[offsets_prefix(&source.topic)])?;
        }
        let layout = source.layout();
        let prefixes = [
            source_prefix(i),
            offsets_prefix(&source.topic),
            positions_prefix(i),
        ];
        if let Some(old) = store.keep_layout(&format!("source/{i}"), &layout, &prefixes)? {
            warn!(source = %source.name, topic = %source.topic, old, new = layout,
                  "the source changed since the state directory was written: its state is dropped and its topic read again from the beginning");
        }
    }
    Ok(())
}

/// Whether `source` has no recorded layout while another source of its topic has one.
fn joins_a_read_topic(
    topology: &Topology,
    store: &StateStore,
    source: usize,
) -> Result<bool, StoreError> {
    if store.has_layout(&format!("source/{source}"))? {
        return Ok(false);
    }
    for other in topology.readers_of(source).filter(|s| *s != source) {
        if store.has_layout(&format!("source/{other}"))? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Drops the outbox left by a run whose topology had external tables: this one has none.
fn drop_outbox(store: &StateStore) -> Result<(), StoreError> {
    for (sequence, _) in store.outbox()? {
        warn!(
            sequence,
            "dropping an outbox entry: the topology has no external table any more"
        );
        store.remove_outbox(sequence)?;
    }
    Ok(())
}
