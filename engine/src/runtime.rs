//! The runtime: timely workers running the topology's dataflow, fed by per-partition tasks.
//!
//! ```text
//!  connector thread ──Message──► worker (partition % W) ──► task (source, partition)
//!                                                           │ decode, late policy, upsert
//!                                                           ▼
//!                                     InputSession ──► dataflow ──► captured table deltas
//!                                                                          │
//!  every worker, at the end of each epoch:  deltas + upsert entries + offsets
//!        ──► one shared RocksDB WriteBatch ──► written once (sync) by the last worker
//! ```
//!
//! A *task* is one partition of one source, pinned to worker `partition % W`, so records of a
//! key are always applied in offset order by one thread. Epochs are global: every worker feeds
//! its tasks for a while (bounded by count and time), advances all of its inputs, steps the
//! dataflow until the probe passes the epoch, encodes its writes (sorted by key) on its own,
//! adds them to the shared commit, and waits on a barrier; one worker writes the commit. A
//! crash loses at most the epoch in progress, and the replay that follows has no second effect
//! (see [`crate::upsert`]).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use differential_dataflow::input::{Input, InputSession};
use timely::dataflow::operators::{Exchange, Inspect, Probe};
use timely::dataflow::ProbeHandle;
use tracing::{debug, error, info, warn};

use crate::dataflow::{Epoch, Renderer};
use crate::decode::decode;
use crate::metrics::Metrics;
use crate::partition::worker_for_partition;
use crate::plan::TablePlan;
use crate::sink::{
    all_restored, caught_up, Durable, ExternalSink, Offset, Sequence, SinkBatch, SinkDriver,
    SinkSender, TableChanges,
};
use crate::store::{Commit, Store, StoreError};
use crate::topology::{Source, Topology};
use crate::upsert::{Event, Outcome, UpsertState};
use crate::value::{key_text, row_to_json_bytes, ColumnType, Row, Value};

/// Longest time after a start that batches of external-table changes are held back waiting
/// for every partition's task (see [`crate::sink`]).
const HOLD_LIMIT: Duration = Duration::from_secs(30);

/// Batches (of up to 512 records) a worker's inbox holds before the connector blocks:
/// consumption pauses when workers fall behind, instead of buffering without bound. Enough for
/// the connector to keep reading while the workers compute and commit an epoch.
const CHANNEL_BATCHES: usize = 512;

/// Longest pause between two batches of a growing (catching-up) epoch before it ends anyway.
const CATCHING_UP_GAP: Duration = Duration::from_millis(50);

/// Longest pause between two batches of a grown epoch once caught up, before it ends (the
/// source hands over a partial batch after 5 ms).
const TAIL_GAP: Duration = Duration::from_millis(10);

/// Longest a worker parks, waiting for its peers, before it checks its epoch again.
const PARK: Duration = Duration::from_millis(10);

/// One record read from a source partition (its bytes live in its [`Records`] batch).
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// Offset in its partition.
    pub offset: i64,
    /// Message key bytes.
    pub key: Option<&'a [u8]>,
    /// Payload bytes; `None` is a tombstone (delete).
    pub payload: Option<&'a [u8]>,
}

/// A batch of records of one partition, in offset order. Their keys and payloads share one
/// buffer: the connector thread allocates once per batch rather than twice per record, and a
/// worker frees the batch at once (the allocator's cross-thread frees cost the most).
#[derive(Clone, Debug, Default)]
pub struct Records {
    bytes: Vec<u8>,
    spans: Vec<Span>,
}

/// Where one record's key and payload are in [`Records::bytes`].
#[derive(Clone, Debug)]
struct Span {
    offset: i64,
    key: Option<std::ops::Range<usize>>,
    payload: Option<std::ops::Range<usize>>,
}

impl Records {
    /// Adds a record after the others.
    pub fn push(&mut self, offset: i64, key: Option<&[u8]>, payload: Option<&[u8]>) {
        let mut copy = |part: Option<&[u8]>| {
            part.map(|b| {
                let start = self.bytes.len();
                self.bytes.extend_from_slice(b);
                start..self.bytes.len()
            })
        };
        let key = copy(key);
        let payload = copy(payload);
        self.spans.push(Span {
            offset,
            key,
            payload,
        });
    }

    /// The records, in order.
    pub fn iter(&self) -> impl Iterator<Item = Record<'_>> {
        self.spans.iter().map(|s| Record {
            offset: s.offset,
            key: s.key.clone().map(|r| &self.bytes[r]),
            payload: s.payload.clone().map(|r| &self.bytes[r]),
        })
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the batch has no record.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> Option<i64> {
        self.spans.last().map(|s| s.offset)
    }
}

/// What a connector tells the runtime.
#[derive(Debug)]
pub enum Message {
    /// Records of one source partition, in offset order.
    Records {
        /// Source index.
        source: usize,
        /// Partition.
        partition: u32,
        /// The records.
        records: Records,
        /// Whether more records of the partition were waiting at the source when these were
        /// handed over: the engine is catching up, and epochs may grow (see
        /// [`RuntimeConfig::max_epoch_interval`]).
        catching_up: bool,
    },
    /// Partitions now owned by this instance: create their tasks.
    Assign {
        /// Source index.
        source: usize,
        /// Partitions.
        partitions: Vec<u32>,
    },
    /// Partitions taken away: commit and drop their tasks. Every worker answers on `done`
    /// once the epoch that dropped them is committed.
    Revoke {
        /// Source index.
        source: usize,
        /// Partitions.
        partitions: Vec<u32>,
        /// Whether to retract their rows from the tables: yes when another instance takes
        /// them over, no when this instance stops (the rows stay, notably in external tables,
        /// for the next start).
        retract: bool,
        /// Acknowledgements, one per worker.
        done: Sender<()>,
    },
}

/// Where malformed records are reported (a dead-letter topic, in production).
pub trait ErrorSink: Send + Sync {
    /// Reports a record that could not be decoded.
    fn malformed(&self, topic: &str, partition: u32, record: &Record, error: &str);
}

/// The partitions whose last applied batch said more records were waiting at the source (as
/// of applying, not of reading: the inboxes may hold the rest of the backlog). Epochs are
/// global, so every worker grows its epoch while any partition is behind: a worker whose own
/// partitions have not delivered yet would otherwise end its epoch early and then wait, unable
/// to read its inbox, for the others.
#[derive(Default)]
struct Backlog {
    partitions: Mutex<HashSet<(usize, u32)>>,
    /// Whether `partitions` is not empty (read on every message by the workers).
    any: AtomicBool,
}

impl Backlog {
    fn update(&self, change: impl FnOnce(&mut HashSet<(usize, u32)>)) {
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut partitions);
        self.any.store(!partitions.is_empty(), Ordering::Release);
    }

    fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }
}

/// Runtime settings.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Worker threads.
    pub workers: usize,
    /// Time an epoch feeds records before committing, when the workers keep up.
    pub epoch_interval: Duration,
    /// Longest time an epoch feeds records while more are waiting (catching up).
    pub max_epoch_interval: Duration,
    /// Most records a worker applies in one epoch.
    pub max_records_per_epoch: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        // 100 ms bounds the staleness a committed epoch adds when the workers keep up. Catching
        // up, epochs grow to 5 s or 1M records per worker: a key changed several times in one
        // epoch is one change for the dataflow, the tables and PostgreSQL, and commits (one
        // fsync each) are fewer. An epoch's changes take at most one entry per changed key, and
        // the inboxes are bounded, so its memory is bounded by the keys, not the records.
        RuntimeConfig {
            workers: 2,
            epoch_interval: Duration::from_millis(100),
            max_epoch_interval: Duration::from_secs(5),
            max_records_per_epoch: 1_000_000,
        }
    }
}

/// Errors that stop the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Timely could not start its workers.
    #[error("cannot start workers: {0}")]
    Start(String),
    /// The topology has external tables and no sink was given.
    #[error("the topology has external tables but no database connection was configured")]
    NoSink,
    /// An outbox entry could not be decoded.
    #[error("outbox entry {sequence} is corrupt: {message}")]
    Outbox {
        /// The entry's sequence.
        sequence: u64,
        /// What failed.
        message: String,
    },
}

/// Progress the outside world can observe.
#[derive(Default)]
pub struct Status {
    /// Last committed epoch.
    pub epoch: AtomicU64,
    /// Unix milliseconds of the last commit.
    pub last_commit_ms: AtomicU64,
    /// Last committed offset per (topic, partition).
    pub committed: Mutex<HashMap<(String, u32), i64>>,
    /// Set when the runtime stopped on an error.
    pub failed: Mutex<Option<String>>,
    /// High watermark of each assigned (topic, partition), refreshed by the connector
    /// (negative while unknown).
    pub watermarks: Mutex<HashMap<(String, u32), i64>>,
    /// Partition count of each source topic, filled by the connector.
    pub partitions: Mutex<HashMap<String, u32>>,
    /// The (topic, partition) of every task, restored from the store, on this instance.
    pub tasks: Mutex<std::collections::HashSet<(String, u32)>>,
    /// Set while the external database refuses batches (the sink retries).
    pub sink_error: Mutex<Option<String>>,
}

impl Status {
    /// Records not yet applied across the assigned partitions; `None` before any assignment
    /// or while a partition's high watermark is not known yet (negative).
    pub fn lag(&self) -> Option<i64> {
        let watermarks = self.watermarks.lock().unwrap_or_else(|e| e.into_inner());
        if watermarks.is_empty() || watermarks.values().any(|high| *high < 0) {
            return None;
        }
        let committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            watermarks
                .iter()
                .map(|(tp, high)| (high - committed.get(tp).map(|o| o + 1).unwrap_or(0)).max(0))
                .sum(),
        )
    }

    /// Why the external database is not up to date, while it is not.
    pub fn sink_failure(&self) -> Option<String> {
        self.sink_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The failure that stopped the runtime, if any.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A running instance of a topology's dataflow.
pub struct Runtime {
    senders: Vec<Sender<Message>>,
    shutdown: Arc<AtomicBool>,
    guards: Mutex<Option<timely::communication::initialize::WorkerGuards<()>>>,
    sink: Mutex<Option<SinkDriver>>,
    /// Observable progress.
    pub status: Arc<Status>,
}

impl Runtime {
    /// Starts `config.workers` workers running `topology` over `store`; the changes of
    /// external tables go to `sink` (required when the topology has any).
    pub fn start(
        topology: Arc<Topology>,
        store: Store,
        metrics: Arc<Metrics>,
        errors: Arc<dyn ErrorSink>,
        sink: Option<Box<dyn ExternalSink>>,
        config: RuntimeConfig,
    ) -> Result<Runtime, RuntimeError> {
        let workers = config.workers.max(1);
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| crossbeam_channel::bounded(CHANNEL_BATCHES))
            .unzip();
        let receivers: Arc<Vec<Receiver<Message>>> = Arc::new(receivers);
        let shutdown = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Status::default());
        let (sink_sender, sink_driver) = match sink {
            Some(sink) if topology.has_external_tables() => {
                let recovered = recover_outbox(&store)?;
                let (sender, driver) = SinkDriver::start(
                    sink,
                    recovered,
                    store.clone(),
                    metrics.clone(),
                    status.clone(),
                    shutdown.clone(),
                );
                (Some(sender), Some(driver))
            }
            None if topology.has_external_tables() => return Err(RuntimeError::NoSink),
            _ => {
                for (sequence, _) in store.outbox()? {
                    warn!(
                        sequence,
                        "dropping an outbox entry: the topology has no external table any more"
                    );
                    store.remove_outbox(sequence)?;
                }
                (None, None)
            }
        };
        let shared = Arc::new(Shared {
            sequence: Sequence::new(store.sequence()?),
            sink: sink_sender,
            sink_changes: Mutex::new(Vec::new()),
            sink_offsets: Mutex::new(HashMap::new()),
            announced_caught_up: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            started: Instant::now(),
            handed_over: AtomicBool::new(false),
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
        });
        let guards = timely::execute(timely::Config::process(workers), move |worker| {
            let index = worker.index();
            run_worker(worker, &shared, receivers[index].clone());
        })
        .map_err(RuntimeError::Start)?;
        Ok(Runtime {
            senders,
            shutdown,
            guards: Mutex::new(Some(guards)),
            sink: Mutex::new(sink_driver),
            status,
        })
    }

    /// Sends `message` to the worker that owns `partition`.
    pub fn send(&self, partition: u32, message: Message) {
        let w = worker_for_partition(partition, self.senders.len());
        self.deliver(w, message);
    }

    /// Blocks while the worker's inbox is full (backpressure), unless the runtime stops.
    fn deliver(&self, worker: usize, mut message: Message) {
        loop {
            match self.senders[worker].send_timeout(message, Duration::from_millis(100)) {
                Ok(()) => return,
                Err(crossbeam_channel::SendTimeoutError::Timeout(m)) if !self.stopped() => {
                    message = m
                }
                // Stopped or disconnected: the failure, if any, is in `status`.
                Err(_) => return,
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

    /// Commits the epoch in progress and stops the workers (waits for them).
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let guards = self.guards.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(guards); // joins the worker threads, dropping the sink's sender
        if let Some(mut sink) = self.sink.lock().unwrap_or_else(|e| e.into_inner()).take() {
            sink.finish();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }
}

struct Shared {
    topology: Arc<Topology>,
    store: Store,
    metrics: Arc<Metrics>,
    errors: Arc<dyn ErrorSink>,
    config: RuntimeConfig,
    commit: Mutex<Option<Commit>>,
    barrier: Barrier,
    shutdown: Arc<AtomicBool>,
    /// Whether the workers stop after the epoch just committed, decided by the leader.
    stop_after_epoch: AtomicBool,
    status: Arc<Status>,
    /// The partitions that were behind as of the last batch applied from them.
    backlog: Backlog,
    /// Commit sequence numbers (persisted with each batch of external-table changes).
    sequence: Sequence,
    /// Where batches of external-table changes go, when the topology has external tables.
    sink: Option<SinkSender>,
    /// The epoch's external-table changes, contributed by every worker.
    sink_changes: Mutex<Vec<TableChanges>>,
    /// The last applied offset of each task since the last batch, contributed by every
    /// worker (bookkeeping).
    sink_offsets: Mutex<HashMap<(String, u32), i64>>,
    /// Whether a batch said `caught_up` since the start.
    announced_caught_up: AtomicBool,
    /// Batches committed (in the outbox) but held back until every task is restored.
    held: Mutex<Vec<SinkBatch>>,
    /// When the runtime started (holding batches back has a limit).
    started: Instant,
    /// Whether a group of batches went to the sink since the start (the first one is the
    /// snapshot, when every task is restored by then).
    handed_over: AtomicBool,
}

/// One partition of one source, owned by a worker.
struct Task {
    state: UpsertState,
    /// Last applied offset, to commit.
    offset: Option<i64>,
    offset_dirty: bool,
}

impl Task {
    /// Feeds the dataflow the task's changes since its last flush (one retraction and one
    /// insertion per changed key, see [`crate::upsert`]) and adds them to `commit` (upsert
    /// entries, offset): the entries and the tables they produce commit together.
    fn flush(
        &mut self,
        source: usize,
        partition: u32,
        topic: &str,
        input: &mut InputSession<Epoch, Row, isize>,
        commit: &mut Commit,
    ) {
        self.state.drain_changes(|key, entry, before| {
            if before != entry.row {
                if let Some(old) = before {
                    input.update(old, -1);
                }
                if let Some(new) = &entry.row {
                    input.update(new.clone(), 1);
                }
            }
            commit.put_entry(source, partition, key, entry);
        });
        if self.offset_dirty {
            if let Some(offset) = self.offset {
                commit.put_offset(topic, partition, offset);
            }
            self.offset_dirty = false;
        }
    }
}

type Capture = Rc<RefCell<Vec<(Row, isize)>>>;

/// Hash of a row's key columns, to route rows by table key. `DefaultHasher::new()` has fixed
/// keys, so every worker of the process computes the same route.
fn key_hash(row: &[Value], key: &[usize]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    for i in key {
        row[*i].hash(&mut h);
    }
    h.finish()
}

fn run_worker(worker: &mut timely::worker::Worker, shared: &Shared, inbox: Receiver<Message>) {
    let topology = shared.topology.clone();
    let index = worker.index();
    let (mut inputs, probe, captures) = worker.dataflow::<Epoch, _, _>(|scope| {
        let mut sessions: Vec<InputSession<Epoch, Row, isize>> = Vec::new();
        let mut collections = Vec::new();
        for _ in &topology.sources {
            let (session, collection) = scope.new_collection::<Row, isize>();
            sessions.push(session);
            collections.push(collection);
        }
        let probe = ProbeHandle::new();
        let mut captures: Vec<Capture> = Vec::new();
        let mut renderer = Renderer::new(collections);
        for table in &topology.tables {
            let key = table.key.clone();
            let capture: Capture = Rc::new(RefCell::new(Vec::new()));
            let sink = capture.clone();
            renderer
                .render(&table.plan, &table.name)
                .inner
                .exchange(move |(row, _, _): &(Row, Epoch, isize)| key_hash(row, &key))
                .probe_with(&probe)
                .inspect_core(move |event| {
                    if let Ok((_, data)) = event {
                        sink.borrow_mut()
                            .extend(data.iter().map(|(r, _, d)| (r.clone(), *d)));
                    }
                });
            captures.push(capture);
        }
        (sessions, probe, captures)
    });

    let mut tasks: HashMap<(usize, u32), Task> = HashMap::new();
    let mut epoch: Epoch = 0;
    let mut acks: Vec<Sender<()>> = Vec::new();
    loop {
        let started = Instant::now();
        let mut applied = 0usize;
        // When an epoch that grew (see below) saw every partition caught up.
        let mut caught_up_at: Option<Duration> = None;
        let mut grew = false;
        while applied < shared.config.max_records_per_epoch
            && !shared.shutdown.load(Ordering::SeqCst)
            // A revocation (sent to every worker) waits for this epoch's commit.
            && acks.is_empty()
        {
            // Catching up (the source had records of some partition waiting), the epoch grows
            // up to `max_epoch_interval`, so more changes of a key coalesce and commits are
            // fewer. Caught up, epochs keep to `epoch_interval`. A partition counts as caught
            // up a few hundred records before its end: a grown epoch then still takes in what
            // arrives without a pause (for at most another `epoch_interval`), rather than
            // leaving those last records to an epoch and a commit of their own.
            let interval = shared.config.epoch_interval;
            let elapsed = started.elapsed();
            let behind = shared.backlog.any();
            grew |= behind && elapsed >= interval;
            let length = if behind {
                caught_up_at = None;
                shared.config.max_epoch_interval.max(interval)
            } else if grew {
                *caught_up_at.get_or_insert(elapsed) + interval
            } else {
                interval
            };
            let left = length.saturating_sub(elapsed);
            if left.is_zero() {
                break;
            }
            // Past `epoch_interval`, the epoch goes on only while records keep coming: offsets
            // that are never delivered (aborted transactions) do not hold it open.
            let until_interval = interval.saturating_sub(elapsed);
            let gap = if behind { CATCHING_UP_GAP } else { TAIL_GAP };
            let wait = if until_interval.is_zero() {
                left.min(gap)
            } else {
                until_interval
            };
            match inbox.recv_timeout(wait) {
                Ok(message) => {
                    applied += handle(shared, index, message, &mut tasks, &mut inputs, &mut acks);
                }
                // The interval is over: the loop decides whether the epoch grows.
                Err(RecvTimeoutError::Timeout) if !until_interval.is_zero() => {}
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(wait);
                    break;
                }
            }
        }
        let t_apply = started.elapsed();
        // Feed the epoch's coalesced changes and add the tasks' writes to this worker's part
        // of the epoch's commit (encoded without holding a lock; see [`Commit`]).
        let mut commit = shared.store.commit();
        if shared.sink.is_some() {
            let mut offsets = shared
                .sink_offsets
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for ((source, partition), task) in tasks.iter() {
                if let (true, Some(offset)) = (task.offset_dirty, task.offset) {
                    offsets.insert(
                        (topology.sources[*source].topic.clone(), *partition),
                        offset,
                    );
                }
            }
        }
        for ((source, partition), task) in tasks.iter_mut() {
            task.flush(
                *source,
                *partition,
                &topology.sources[*source].topic,
                &mut inputs[*source],
                &mut commit,
            );
        }
        let t_feed = started.elapsed();
        epoch += 1;
        for input in inputs.iter_mut() {
            input.advance_to(epoch);
            input.flush();
        }
        // Parks instead of spinning while other workers finish their epoch: on a machine with
        // few cores the spin takes CPU from them (and from Kafka and PostgreSQL). Data or
        // progress from a peer wakes a parked worker.
        worker.step_or_park_while(Some(PARK), || probe.less_than(&epoch));
        let t_dataflow = started.elapsed();

        // Add this worker's table changes, then hand its writes to the epoch's shared commit.
        {
            for (table, capture) in topology.tables.iter().zip(&captures) {
                let mut deltas = std::mem::take(&mut *capture.borrow_mut());
                if table.postgres().is_some() {
                    let changes = table_changes(table, &mut deltas);
                    if !changes.upserts.is_empty() || !changes.deletes.is_empty() {
                        add_changes(
                            &mut shared
                                .sink_changes
                                .lock()
                                .unwrap_or_else(|e| e.into_inner()),
                            changes,
                        );
                    }
                } else {
                    write_deltas(table, &mut deltas, &mut commit);
                }
            }
            commit.sort();
            let mut pending = shared.commit.lock().unwrap_or_else(|e| e.into_inner());
            match pending.as_mut() {
                Some(shared_commit) => shared_commit.append(commit),
                None => *pending = Some(commit),
            }
        }
        let t_tables = started.elapsed();
        if shared.barrier.wait().is_leader() {
            let mut commit = shared
                .commit
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let batch = shared
                .sink
                .as_ref()
                .and_then(|_| sink_batch(shared, &mut commit));
            // The database writes the batch while RocksDB syncs it, and commits once it is
            // durable (see [`crate::sink`]).
            let durable = Durable::pending();
            if let (Some(sink), Some(batch)) = (&shared.sink, batch) {
                hand_over(shared, sink, batch, durable.clone());
            }
            let mut committed = true;
            if let Some(commit) = commit.filter(|c| !c.is_empty()) {
                let timer = shared.metrics.epoch_commit_seconds.start_timer();
                let (writes, bytes) = (commit.len(), commit.size());
                match shared.store.write(commit) {
                    Ok(()) => debug!(epoch, writes, bytes, "epoch committed"),
                    Err(e) => {
                        committed = false;
                        error!(error = %e, "epoch commit failed; stopping");
                        *shared
                            .status
                            .failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                        shared.shutdown.store(true, Ordering::SeqCst);
                    }
                }
                timer.observe_duration();
            }
            durable.set(committed);
            shared.status.epoch.store(epoch, Ordering::SeqCst);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            shared
                .status
                .last_commit_ms
                .store(now.as_millis() as u64, Ordering::SeqCst);
            // One decision for every worker: each reads it after the next barrier, before any
            // worker can start another epoch (and overwrite it).
            let stop = shared.shutdown.load(Ordering::SeqCst);
            shared.stop_after_epoch.store(stop, Ordering::SeqCst);
        }
        shared.barrier.wait();
        let t_commit = started.elapsed();
        debug!(
            worker = index,
            epoch,
            records = applied,
            apply_ms = t_apply.as_millis() as u64,
            feed_ms = (t_feed - t_apply).as_millis() as u64,
            dataflow_ms = (t_dataflow - t_feed).as_millis() as u64,
            tables_ms = (t_tables - t_dataflow).as_millis() as u64,
            commit_ms = (t_commit - t_tables).as_millis() as u64,
            "epoch phases"
        );
        let stopping = shared.stop_after_epoch.load(Ordering::SeqCst);
        {
            let mut committed = shared
                .status
                .committed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for ((source, partition), task) in &tasks {
                if let Some(o) = task.offset {
                    committed.insert((topology.sources[*source].topic.clone(), *partition), o);
                }
            }
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        // Every worker read the leader's decision, so all leave after the same epoch.
        if stopping {
            info!(
                worker = index,
                epoch, "worker stopped after its last commit"
            );
            break;
        }
    }
}

/// Makes the epoch's batch of external-table changes, and adds it to `commit`'s outbox;
/// `None` when there is nothing to tell the database.
fn sink_batch(shared: &Shared, commit: &mut Option<Commit>) -> Option<SinkBatch> {
    let tables = std::mem::take(
        &mut *shared
            .sink_changes
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    let topics = shared.topology.topics();
    let caught_up = caught_up(&shared.status, &topics);
    let announce = caught_up && !shared.announced_caught_up.load(Ordering::SeqCst);
    if tables.is_empty() && !announce {
        // Offsets alone are bookkeeping: they travel with the next batch that has changes.
        return None;
    }
    shared
        .announced_caught_up
        .fetch_or(caught_up, Ordering::SeqCst);
    let mut offsets: Vec<Offset> = std::mem::take(
        &mut *shared
            .sink_offsets
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    )
    .into_iter()
    .map(|((topic, partition), offset)| Offset {
        topic,
        partition,
        offset,
    })
    .collect();
    offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let batch = SinkBatch {
        sequence: shared.sequence.next(),
        tables,
        offsets,
        caught_up,
    };
    let encoded = crate::store::encode(&batch);
    commit
        .get_or_insert_with(|| shared.store.commit())
        .put_outbox(batch.sequence, encoded);
    Some(batch)
}

/// Hands `batch` to the sink thread, with the batches held before it, once every task is
/// restored (or after [`HOLD_LIMIT`]); holds it otherwise. The first group of a run, when
/// every task is restored, is the tables' snapshot (see [`crate::sink`]). Blocks while the
/// database still applies the previous group: backpressure.
fn hand_over(shared: &Shared, sink: &SinkSender, batch: SinkBatch, durable: Durable) {
    let topics = shared.topology.topics();
    let mut held = shared.held.lock().unwrap_or_else(|e| e.into_inner());
    let restored = all_restored(&shared.status, &topics);
    if !restored && shared.started.elapsed() < HOLD_LIMIT {
        sink.held(1);
        held.push(batch);
        return;
    }
    if !restored && !held.is_empty() {
        warn!("not every source partition is assigned to this instance: external tables are written from the assigned ones");
    }
    let first = !shared.handed_over.swap(true, Ordering::SeqCst);
    let snapshot = restored && first;
    let mut group = std::mem::take(&mut *held);
    let counted = group.len();
    group.push(batch);
    sink.submit(group, counted, snapshot, durable);
}

/// Merges one worker's changes of a table into the epoch's (a key's changes all come from
/// the worker its table key routes to, so tables' key sets do not overlap).
fn add_changes(all: &mut Vec<TableChanges>, changes: TableChanges) {
    match all.iter_mut().find(|t| t.table == changes.table) {
        Some(t) => {
            t.upserts.extend(changes.upserts);
            t.deletes.extend(changes.deletes);
        }
        None => all.push(changes),
    }
}

/// Batches left in the outbox by the previous run, in sequence order. Their `caught_up`
/// is cleared: whether a rebuilt table may replace the old one is this run's decision.
fn recover_outbox(store: &Store) -> Result<Vec<SinkBatch>, RuntimeError> {
    store
        .outbox()?
        .into_iter()
        .map(|(sequence, bytes)| {
            let mut batch: SinkBatch =
                crate::store::decode(&bytes).map_err(|e| RuntimeError::Outbox {
                    sequence,
                    message: e.to_string(),
                })?;
            batch.caught_up = false;
            Ok(batch)
        })
        .collect()
}

/// Consolidates an epoch's deltas of a table into its upserts and deletes.
fn table_changes(table: &TablePlan, deltas: &mut Vec<(Row, isize)>) -> TableChanges {
    let consolidated = consolidate(deltas);
    let mut changes = TableChanges {
        table: table.name.clone(),
        definition: table.definition(),
        ..TableChanges::default()
    };
    let key_of = |row: &Row| -> Vec<Value> { table.key.iter().map(|k| row[*k].clone()).collect() };
    let mut put: HashMap<Vec<Value>, usize> = HashMap::new();
    for (row, diff) in consolidated.iter().filter(|(_, d)| *d > 0) {
        let key = key_of(row);
        if *diff > 1 {
            warn!(table = %table.name, key = %key_text(row, &table.key), diff, "row present more than once");
        }
        match put.get(&key) {
            // Two rows for one key cannot both be written: keep the last, say so.
            Some(&i) => {
                warn!(table = %table.name, key = %key_text(row, &table.key), "two rows for one key in an epoch");
                changes.upserts[i] = row.clone();
            }
            None => {
                put.insert(key, changes.upserts.len());
                changes.upserts.push(row.clone());
            }
        }
    }
    for (row, _) in consolidated.iter().filter(|(_, d)| *d < 0) {
        let key = key_of(row);
        if !put.contains_key(&key) {
            put.insert(key.clone(), usize::MAX);
            changes.deletes.push(key);
        }
    }
    changes
}

/// Sorts `deltas` and sums the differences of equal rows, dropping those that cancel out.
fn consolidate(deltas: &mut Vec<(Row, isize)>) -> Vec<(Row, isize)> {
    deltas.sort();
    let mut consolidated: Vec<(Row, isize)> = Vec::with_capacity(deltas.len());
    for (row, diff) in deltas.drain(..) {
        match consolidated.last_mut() {
            Some((last, d)) if *last == row => *d += diff,
            _ => consolidated.push((row, diff)),
        }
    }
    consolidated.retain(|(_, d)| *d != 0);
    consolidated
}

fn write_deltas(table: &TablePlan, deltas: &mut Vec<(Row, isize)>, commit: &mut Commit) {
    let consolidated = consolidate(deltas);
    // A key whose row changed has a retraction and an insertion in one epoch: the put alone
    // replaces the row, so only keys with no insertion are deleted.
    let removed: Vec<String> = consolidated
        .iter()
        .filter(|(_, d)| *d < 0)
        .map(|(row, _)| key_text(row, &table.key))
        .collect();
    let mut put = HashSet::new();
    for (row, diff) in consolidated.iter().filter(|(_, d)| *d > 0) {
        let key = key_text(row, &table.key);
        if *diff > 1 {
            warn!(table = %table.name, key = %key, diff, "row present more than once");
        }
        if !removed.is_empty() {
            put.insert(key.clone());
        }
        commit.put_row(&table.name, key, row_to_json_bytes(&table.columns, row));
    }
    for key in removed {
        if !put.contains(&key) {
            commit.delete_row(&table.name, key);
        }
    }
}

/// Applies one message; returns the number of records applied.
fn handle(
    shared: &Shared,
    index: usize,
    message: Message,
    tasks: &mut HashMap<(usize, u32), Task>,
    inputs: &mut [InputSession<Epoch, Row, isize>],
    acks: &mut Vec<Sender<()>>,
) -> usize {
    let workers = shared.config.workers.max(1);
    match message {
        Message::Assign { source, partitions } => {
            for p in partitions
                .into_iter()
                .filter(|p| worker_for_partition(*p, workers) == index)
            {
                if let Err(e) = open_task(shared, source, p, tasks, inputs) {
                    error!(source = %shared.topology.sources[source].name, partition = p, error = %e, "cannot restore task");
                }
            }
            0
        }
        Message::Revoke {
            source,
            partitions,
            retract,
            done,
        } => {
            shared.backlog.update(|behind| {
                for p in &partitions {
                    behind.remove(&(source, *p));
                }
            });
            for p in partitions {
                if let Some(mut task) = tasks.remove(&(source, p)) {
                    shared
                        .status
                        .tasks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&(shared.topology.sources[source].topic.clone(), p));
                    // The partition's upsert state stays committed for a later re-assignment,
                    // with the table changes of the epoch so far.
                    if task.state.has_changes() || task.offset_dirty {
                        let mut pending = shared.commit.lock().unwrap_or_else(|e| e.into_inner());
                        let commit = pending.get_or_insert_with(|| shared.store.commit());
                        let topic = &shared.topology.sources[source].topic;
                        task.flush(source, p, topic, &mut inputs[source], commit);
                    }
                    if retract {
                        for row in task.state.rows() {
                            inputs[source].update(row.clone(), -1);
                        }
                    }
                    info!(source = %shared.topology.sources[source].name, partition = p, "task dropped");
                }
            }
            acks.push(done);
            0
        }
        Message::Records {
            source,
            partition,
            records,
            catching_up,
        } => {
            shared.backlog.update(|behind| {
                if catching_up {
                    behind.insert((source, partition));
                } else {
                    behind.remove(&(source, partition));
                }
            });
            if !tasks.contains_key(&(source, partition)) {
                if let Err(e) = open_task(shared, source, partition, tasks, inputs) {
                    error!(source = %shared.topology.sources[source].name, partition, error = %e, "cannot restore task");
                    return 0;
                }
            }
            let task = tasks
                .get_mut(&(source, partition))
                .expect("task opened above");
            let src = &shared.topology.sources[source];
            let n = records.len();
            shared
                .metrics
                .records_in
                .with_label_values(&[&src.name])
                .inc_by(n as u64);
            for record in records.iter() {
                apply_record(shared, src, partition, &record, task);
                task.offset = Some(record.offset);
                task.offset_dirty = true;
            }
            n
        }
    }
}

fn open_task(
    shared: &Shared,
    source: usize,
    partition: u32,
    tasks: &mut HashMap<(usize, u32), Task>,
    inputs: &mut [InputSession<Epoch, Row, isize>],
) -> Result<(), StoreError> {
    if tasks.contains_key(&(source, partition)) {
        return Ok(());
    }
    let src = &shared.topology.sources[source];
    let entries = shared.store.upsert_entries(source, partition)?;
    let offset = shared.store.offset(&src.topic, partition)?;
    let state = UpsertState::restore(entries);
    for row in state.rows() {
        inputs[source].update(row.clone(), 1);
    }
    info!(source = %src.name, topic = %src.topic, partition, rows = state.len(), ?offset, "task created");
    shared
        .status
        .tasks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((src.topic.clone(), partition));
    tasks.insert(
        (source, partition),
        Task {
            state,
            offset,
            offset_dirty: false,
        },
    );
    Ok(())
}

fn apply_record(shared: &Shared, src: &Source, partition: u32, record: &Record, task: &mut Task) {
    let key_str = record.key.map(String::from_utf8_lossy).unwrap_or_default();
    let malformed = |error: String| {
        shared
            .metrics
            .malformed_records
            .with_label_values(&[&src.name])
            .inc();
        warn!(topic = %src.topic, partition, offset = record.offset, key = %key_str, %error, "malformed record skipped");
        shared
            .errors
            .malformed(&src.topic, partition, record, &error);
    };
    let event = match record.payload {
        None => match parse_key(src, record.key) {
            Some(key) => Event::Tombstone(key),
            None => return malformed("tombstone without a valid key".into()),
        },
        Some(payload) => match decode(src, payload) {
            Ok(row) => {
                let key = &row[src.key];
                if record.key.is_some() && !key.is_key_text(&key_str) {
                    return malformed(format!(
                        "message key `{key_str}` differs from key column `{}` = `{}`",
                        src.key_name(),
                        key.to_key_text()
                    ));
                }
                Event::Row(row)
            }
            Err(e) => return malformed(e.to_string()),
        },
    };
    match task
        .state
        .apply(src.late.as_ref(), src.key, event, record.offset)
    {
        Outcome::Changed { late } => {
            if late {
                shared
                    .metrics
                    .late_events
                    .with_label_values(&[&src.name, "kept"])
                    .inc();
                info!(topic = %src.topic, partition, offset = record.offset, key = %key_str, "late event kept");
            }
        }
        Outcome::Duplicate => {
            shared
                .metrics
                .duplicate_events
                .with_label_values(&[&src.name])
                .inc();
            debug!(topic = %src.topic, partition, offset = record.offset, key = %key_str, "duplicate event skipped");
        }
        Outcome::Late => {
            shared
                .metrics
                .late_events
                .with_label_values(&[&src.name, "dropped"])
                .inc();
            info!(topic = %src.topic, partition, offset = record.offset, key = %key_str, "late event dropped");
        }
    }
}

fn parse_key(src: &Source, key: Option<&[u8]>) -> Option<Value> {
    let text = std::str::from_utf8(key?).ok()?;
    match src.columns[src.key].ty {
        ColumnType::Text => Some(Value::Text(text.into())),
        ColumnType::Bigint => text.parse().ok().map(Value::Int),
        _ => serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|j| Value::from_json(&j, src.columns[src.key].ty)),
    }
}
