//! External tables: the changes of each epoch, handed to a database through an outbox.
//!
//! ```text
//!  leader, end of epoch:  RocksDB batch { rows, upsert state, offsets, outbox[seq] = SinkBatch }
//!                              │ (synced)
//!                              ▼
//!  sink thread:  ExternalSink::apply([SinkBatch])   one database transaction, retried
//!                              │ ok
//!                              ▼
//!                      remove outbox[seq]
//! ```
//!
//! A partition's rows are written by the instance that owns the partition. When a task opens
//! (at a start, or when a partition moves to this instance), the dataflow derives the
//! partition's rows again from the restored state, from empty: its changes are relative to
//! nothing, while the database holds the partition's rows as the last writer left them. So the
//! epoch names the partition in its batch's [`Claim`]s: the rows of a claimed partition that
//! the batches from the claim on do not name are deleted, and the database records this
//! instance as the partition's writer, so that a former owner's late batches leave it alone.
//! A table whose rows do not follow one source's partitions is replaced whole once a group
//! of batches claims every partition of its sources. Until the global sources' partitions
//! (and, for such a table, every partition) are restored, batches are held (still written to
//! the outbox), so that readers never see intermediate results (a join whose other side is not
//! restored yet).
//!
//! The database only ever lags RocksDB, never leads it: a batch's transaction commits only
//! once the RocksDB commit that produced it is durable ([`Durable`]), and a batch left in the
//! outbox by a crash is applied again at the next start. The leader hands a batch over before
//! writing its RocksDB commit, so the database writes the rows while RocksDB syncs, and waits
//! for it only to commit. The database records the last sequence it applied (in the same
//! transaction), so a batch offered twice is applied once. Batches are applied in sequence
//! order, so an older row never overwrites a newer one.
//!
//! Backpressure: while the sink thread applies a group, the leader adds the next batches to
//! one waiting group (each key is then written once for all of them), up to 16 batches.
//! While the database is down, that group fills, the leader waits, the workers wait at their
//! barrier and the connector's bounded inboxes fill: consumption pauses instead of buffering.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::error::{retry_delays, ErrorClass};
use crate::metrics::Metrics;
use crate::state::StateStore;
use crate::value::{Row, Value};

/// How long a stopping instance keeps retrying its last batches before leaving them in the
/// outbox for the next start.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The changes of one external table in one batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TableChanges {
    /// Table name (as in the topology).
    pub table: String,
    /// The table's definition when the batch was made ([`crate::plan::TablePlan::definition`]):
    /// a batch recovered from the outbox is not applied to a table built from another one.
    pub definition: String,
    /// New rows and new versions of rows, at most one per key.
    pub upserts: Vec<Row>,
    /// Keys (the key columns' values, in key order) of rows that no longer exist.
    pub deletes: Vec<Vec<Value>>,
}

/// The last applied offset of one source partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Last applied offset.
    pub offset: i64,
}

/// A source partition whose task opened in a batch's epoch: its rows in the external tables
/// are those the batch and the later ones name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The topic's partition count.
    pub partitions: u32,
}

/// The partitions a group of batches claims (see [`Claim`]).
#[derive(Clone, Debug, Default)]
pub struct Claims(HashMap<String, (u32, HashSet<u32>)>);

impl Claims {
    /// The claims of `batches`.
    pub fn of<'a>(batches: impl IntoIterator<Item = &'a SinkBatch>) -> Claims {
        let mut claims = Claims::default();
        for claim in batches.into_iter().flat_map(|b| &b.claims) {
            let (count, partitions) = claims
                .0
                .entry(claim.topic.clone())
                .or_insert_with(|| (claim.partitions, HashSet::new()));
            *count = claim.partitions;
            partitions.insert(claim.partition);
        }
        claims
    }

    /// The claimed partitions of `topic`, and its partition count.
    pub fn of_topic(&self, topic: &str) -> Option<(u32, &HashSet<u32>)> {
        self.0.get(topic).map(|(count, ps)| (*count, ps))
    }

    /// Whether every partition of `topic` is claimed.
    pub fn covers(&self, topic: &str) -> bool {
        self.of_topic(topic)
            .is_some_and(|(count, ps)| (0..count).all(|p| ps.contains(&p)))
    }

    /// Every claim, as (topic, partition, partition count).
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32, u32)> {
        self.0
            .iter()
            .flat_map(|(topic, (count, ps))| ps.iter().map(move |p| (topic.as_str(), *p, *count)))
    }
}

/// Everything one epoch changed in external tables, applied in one database transaction.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SinkBatch {
    /// The commit's sequence number: grows by one per batch, across restarts.
    pub sequence: u64,
    /// Changes, per table that changed.
    pub tables: Vec<TableChanges>,
    /// Offsets of this instance's tasks as of this batch (bookkeeping).
    pub offsets: Vec<Offset>,
    /// Whether every task of this instance, and every partition of the global sources, was
    /// read up to its high watermark: a table being rebuilt is complete in this instance's
    /// partitions.
    pub caught_up: bool,
    /// Partitions whose task opened in the batch's epoch.
    pub claims: Vec<Claim>,
    /// When the batch is the first to say `caught_up` since a claim: the end (offset after
    /// the last record) of the stage records this instance wrote to each partition of a
    /// stage topic. A table being rebuilt is not complete before each partition's writer
    /// read them. Not kept in the outbox: a batch recovered at start does not say
    /// `caught_up`.
    #[serde(skip)]
    pub written: Vec<Offset>,
}

impl SinkBatch {
    /// Number of row changes in the batch.
    pub fn rows(&self) -> usize {
        self.tables
            .iter()
            .map(|t| t.upserts.len() + t.deletes.len())
            .sum()
    }
}

/// Whether the external database accepts batches: the sink thread sets it, readiness reads it.
#[derive(Debug, Default)]
pub struct SinkHealth(Mutex<Option<String>>);

impl SinkHealth {
    fn set(&self, failure: Option<String>) {
        *self.0.lock() = failure;
    }

    /// Why the database refuses batches, while it does.
    pub fn failure(&self) -> Option<String> {
        self.0.lock().clone()
    }
}

/// What applying a group of batches did besides writing their rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Rows the database refused (a value it cannot hold), per table: set aside where the
    /// sink keeps them, not written; the key's earlier row, if any, is gone.
    pub rejected: Vec<(String, u64)>,
}

/// A sink failure.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The database is unreachable or refused the batch; `class` says whether retrying may
    /// help.
    #[error("{source}")]
    Database {
        /// What to do next.
        class: ErrorClass,
        /// The database's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The epoch commit of these changes failed: they are not in the outbox and must not be
    /// applied (the instance stops).
    #[error("the epoch commit of these changes failed: not applied")]
    NotDurable,
}

impl SinkError {
    /// What to do next.
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::Database { class, .. } => *class,
            SinkError::NotDurable => ErrorClass::Fatal,
        }
    }
}

/// Whether the RocksDB commit holding a group of batches (in its outbox) is durable yet. A
/// sink writes the batches meanwhile, and waits for it before it commits them: a database
/// never shows a change that a crash could take back.
#[derive(Clone, Debug)]
pub struct Durable(Arc<DurableState>);

#[derive(Debug)]
struct DurableState {
    /// `Some(written)` once the commit is over.
    written: Mutex<Option<bool>>,
    over: Condvar,
    /// Time [`Durable::wait`] spent blocked (not the database's: left out of its metric).
    waited: Mutex<Duration>,
}

impl Durable {
    fn new(written: Option<bool>) -> Durable {
        Durable(Arc::new(DurableState {
            written: Mutex::new(written),
            over: Condvar::new(),
            waited: Mutex::new(Duration::ZERO),
        }))
    }

    /// Batches already durable (read back from the outbox, or made by a test).
    pub fn done() -> Durable {
        Durable::new(Some(true))
    }

    /// Batches whose commit is still being written.
    pub(crate) fn pending() -> Durable {
        Durable::new(None)
    }

    /// Records whether the commit was written.
    pub(crate) fn set(&self, written: bool) {
        *self.0.written.lock() = Some(written);
        self.0.over.notify_all();
    }

    /// Waits until the commit is written; an error when writing it failed (the batches are
    /// not in the outbox and must not be applied).
    pub fn wait(&self) -> Result<(), SinkError> {
        let started = Instant::now();
        let result = self.wait_over();
        *self.0.waited.lock() += started.elapsed();
        result
    }

    /// Takes the time spent in [`Durable::wait`] so far.
    fn take_waited(&self) -> Duration {
        std::mem::take(&mut *self.0.waited.lock())
    }

    fn wait_over(&self) -> Result<(), SinkError> {
        let mut state = self.0.written.lock();
        loop {
            match *state {
                Some(true) => return Ok(()),
                Some(false) => return Err(SinkError::NotDurable),
                None => self.0.over.wait(&mut state),
            }
        }
    }

    fn failed(&self) -> bool {
        *self.0.written.lock() == Some(false)
    }
}

/// A database that keeps external tables.
pub trait ExternalSink: Send {
    /// Applies `batches` (in sequence order) in one transaction, recording the last
    /// sequence; a batch whose sequence was already applied changes nothing. The rows of a
    /// partition the batches claim ([`Claim`]) that they do not name are deleted. A row the
    /// database cannot hold is set aside (reported in [`Applied`]), not an error. The transaction commits only after `durable.wait()`
    /// returned `Ok`; on an error it is rolled back: a transient error is retried, another
    /// stops the instance.
    fn apply(&mut self, batches: &[SinkBatch], durable: &Durable) -> Result<Applied, SinkError>;

    /// Gets ready to write (connects, checks the tables) before the first batch arrives, so
    /// the first epoch's changes do not wait for it. A failure is only logged: `apply` tries
    /// again, with its retries.
    fn connect(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Most batches the waiting group gathers while the database applies the previous one;
/// then the leader waits (backpressure).
const MAX_WAITING: usize = 16;

/// Batches applied in one transaction.
struct Group {
    batches: Vec<SinkBatch>,
    /// The commit of the last batch (commits are written in order: the earlier ones are
    /// durable when it is).
    durable: Durable,
}

/// The group waiting for the sink thread. While the thread applies a group, the leader adds
/// the next epochs' batches to the waiting one (each key is then written once for all of
/// them), up to [`MAX_WAITING`] batches; then it waits.
#[derive(Default)]
struct Mailbox {
    state: Mutex<MailboxState>,
    changed: Condvar,
}

#[derive(Default)]
struct MailboxState {
    waiting: Option<Group>,
    /// No more submissions (the runtime stopped).
    closed: bool,
    /// The thread ended (it gave up while stopping): submissions stay in the outbox.
    gone: bool,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, MailboxState> {
        self.state.lock()
    }

    /// The next group to apply; `None` once closed and empty.
    fn take(&self) -> Option<Group> {
        let mut state = self.lock();
        loop {
            if let Some(group) = state.waiting.take() {
                self.changed.notify_all();
                return Some(group);
            }
            if state.closed {
                return None;
            }
            self.changed.wait(&mut state);
        }
    }

    fn set(&self, f: impl FnOnce(&mut MailboxState)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// The leader's end of the sink thread's mailbox.
pub(crate) struct SinkSender {
    mailbox: Arc<Mailbox>,
    metrics: Arc<Metrics>,
}

impl SinkSender {
    /// Hands `batches` over: they join the waiting group, or wait while it is full. The
    /// first `counted` were counted as pending when held; `durable` tells when the last one's
    /// commit is written.
    pub(crate) fn submit(&self, batches: Vec<SinkBatch>, counted: usize, durable: Durable) {
        self.metrics
            .sink_pending
            .add((batches.len() - counted) as i64);
        let mut state = self.mailbox.lock();
        loop {
            if state.gone {
                return; // the batches are in the outbox, for the next start
            }
            match &mut state.waiting {
                None => {
                    state.waiting = Some(Group { batches, durable });
                    break;
                }
                Some(waiting) if waiting.batches.len() + batches.len() <= MAX_WAITING => {
                    waiting.batches.extend(batches);
                    waiting.durable = durable;
                    break;
                }
                Some(_) => self.mailbox.changed.wait(&mut state),
            }
        }
        drop(state);
        self.mailbox.changed.notify_all();
    }

    /// Counts batches held back (not yet handed over) as pending.
    pub(crate) fn held(&self, n: usize) {
        self.metrics.sink_pending.add(n as i64);
    }
}

impl Drop for SinkSender {
    fn drop(&mut self) {
        self.mailbox.set(|s| s.closed = true);
    }
}

/// The thread that applies batches in order, retrying each until it is applied. It ends
/// when every [`SinkSender`] is dropped and it has applied what it holds (for at most
/// [`STOP_GRACE`] of retries once the instance stops), or when the database refuses a group
/// for a reason retrying does not change: then it stops the instance through `fail`.
pub(crate) struct SinkDriver {
    thread: Option<JoinHandle<()>>,
}

impl SinkDriver {
    /// Starts the thread; it first applies `recovered` (batches left in the outbox).
    pub(crate) fn start(
        mut sink: Box<dyn ExternalSink>,
        recovered: Vec<SinkBatch>,
        store: StateStore,
        metrics: Arc<Metrics>,
        health: Arc<SinkHealth>,
        stop: Arc<AtomicBool>,
        fail: impl Fn(String) + Send + 'static,
    ) -> (SinkSender, SinkDriver) {
        let mailbox = Arc::new(Mailbox::default());
        metrics.sink_up.set(1);
        metrics.sink_pending.set(recovered.len() as i64);
        let sender = SinkSender {
            mailbox: mailbox.clone(),
            metrics: metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("miroir-sink".into())
            .spawn(move || {
                if let Err(e) = sink.connect() {
                    warn!(error = %e, "external database not ready yet; the first batch retries");
                }
                if !recovered.is_empty() {
                    info!(batches = recovered.len(), "applying batches left in the outbox");
                }
                let first = (!recovered.is_empty()).then_some(Group {
                    batches: recovered,
                    durable: Durable::done(),
                });
                let groups = first.into_iter().chain(std::iter::from_fn(|| mailbox.take()));
                for group in groups {
                    let sequence = group.batches.first().map(|b| b.sequence);
                    match apply_with_retry(sink.as_mut(), &group, &metrics, &health, &stop) {
                        Outcome::Applied => {}
                        Outcome::Left if group.durable.failed() => {
                            // The runtime stops too: what follows is not in the outbox either.
                            error!(sequence, "the epoch commit of these batches failed: not applied");
                            mailbox.set(|s| s.gone = true);
                            return;
                        }
                        Outcome::Left => {
                            warn!(sequence, "stopping with batches not applied: they stay in the outbox for the next start");
                            mailbox.set(|s| s.gone = true);
                            return;
                        }
                        Outcome::Refused(e) => {
                            let failure = format!(
                                "the external database refuses batch {} ({} error): {e}; the batches stay in the outbox and are applied at the next start",
                                sequence.unwrap_or_default(),
                                e.class()
                            );
                            error!(sequence, error = %e, class = %e.class(), "the external database refuses a batch for a reason retrying does not change: stopping");
                            fail(failure);
                            mailbox.set(|s| s.gone = true);
                            return;
                        }
                    }
                    for batch in &group.batches {
                        if let Err(e) = store.remove_outbox(batch.sequence) {
                            warn!(sequence = batch.sequence, error = %e, "cannot remove an applied outbox entry (the next start skips it)");
                        }
                    }
                    metrics.sink_pending.sub(group.batches.len() as i64);
                }
            })
            .expect("spawn the sink thread");
        (
            sender,
            SinkDriver {
                thread: Some(thread),
            },
        )
    }

    /// Waits for the thread (call once every sender is dropped).
    pub(crate) fn finish(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How [`apply_with_retry`] ended.
#[derive(Debug)]
enum Outcome {
    /// The group is in the database.
    Applied,
    /// Not applied: the instance stops, or the commit of its batches failed.
    Left,
    /// Not applied: the database refuses it for a reason retrying does not change.
    Refused(SinkError),
}

/// Applies `group`, retrying transient errors with exponential backoff (100 ms to 5 s) until
/// it succeeds.
fn apply_with_retry(
    sink: &mut dyn ExternalSink,
    group: &Group,
    metrics: &Metrics,
    health: &SinkHealth,
    stop: &AtomicBool,
) -> Outcome {
    let mut delays = retry_delays(Duration::from_millis(100), Duration::from_secs(5));
    let mut stop_deadline: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let batches = &group.batches;
        let sequence = batches.last().map(|b| b.sequence).unwrap_or_default();
        let applied = sink.apply(batches, &group.durable);
        // The database's time: waiting for the RocksDB commit is not.
        let spent = started
            .elapsed()
            .saturating_sub(group.durable.take_waited());
        match applied {
            Ok(applied) => {
                metrics.sink_commit_seconds.observe(spent.as_secs_f64());
                metrics.sink_batches.inc_by(batches.len() as u64);
                for t in batches.iter().flat_map(|b| &b.tables) {
                    metrics
                        .sink_rows
                        .with_label_values(&[&t.table, "upsert"])
                        .inc_by(t.upserts.len() as u64);
                    metrics
                        .sink_rows
                        .with_label_values(&[&t.table, "delete"])
                        .inc_by(t.deletes.len() as u64);
                }
                for (table, n) in &applied.rejected {
                    metrics
                        .sink_rows
                        .with_label_values(&[table, "rejected"])
                        .inc_by(*n);
                }
                if metrics.sink_up.get() == 0 {
                    info!(sequence, "external database reachable again");
                }
                metrics.sink_up.set(1);
                health.set(None);
                let rows: usize = batches.iter().map(SinkBatch::rows).sum();
                let claims = batches.iter().map(|b| b.claims.len()).sum::<usize>();
                let caught_up = batches.iter().any(|b| b.caught_up);
                debug!(
                    sequence,
                    batches = batches.len(),
                    rows,
                    claims,
                    caught_up,
                    "batches applied"
                );
                return Outcome::Applied;
            }
            Err(_) if group.durable.failed() => return Outcome::Left,
            Err(e) if e.class() != ErrorClass::Transient => return Outcome::Refused(e),
            Err(e) => {
                metrics.sink_retries.inc();
                metrics.sink_up.set(0);
                health.set(Some(e.to_string()));
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                error!(sequence, error = %e, class = %e.class(), retry_in_ms = delay.as_millis() as u64, "cannot apply a batch to the external database");
                if stop.load(Ordering::SeqCst) {
                    let deadline =
                        *stop_deadline.get_or_insert_with(|| Instant::now() + STOP_GRACE);
                    if Instant::now() >= deadline {
                        return Outcome::Left;
                    }
                }
                std::thread::sleep(delay);
            }
        }
    }
}

/// Batches a sequence counter hands out.
pub(crate) struct Sequence(AtomicU64);

impl Sequence {
    pub(crate) fn new(last: u64) -> Sequence {
        Sequence(AtomicU64::new(last))
    }

    pub(crate) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the sequences it commits; waits for durability like a database sink.
    struct Recording(Arc<Mutex<Vec<u64>>>);

    impl ExternalSink for Recording {
        fn apply(
            &mut self,
            batches: &[SinkBatch],
            durable: &Durable,
        ) -> Result<Applied, SinkError> {
            durable.wait()?;
            self.0.lock().extend(batches.iter().map(|b| b.sequence));
            Ok(Applied::default())
        }
    }

    fn group(sequence: u64, durable: &Durable) -> Group {
        Group {
            batches: vec![SinkBatch {
                sequence,
                ..SinkBatch::default()
            }],
            durable: durable.clone(),
        }
    }

    #[test]
    fn a_group_commits_once_its_epoch_is_durable_and_never_if_that_failed() {
        let metrics = Metrics::new();
        let health = SinkHealth::default();
        let stop = AtomicBool::new(false);
        let committed = Arc::new(Mutex::new(Vec::new()));
        let mut sink = Recording(committed.clone());

        let durable = Durable::pending();
        let writer = {
            let (durable, committed) = (durable.clone(), committed.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let early = committed.lock().clone();
                durable.set(true);
                early
            })
        };
        assert!(matches!(
            apply_with_retry(&mut sink, &group(1, &durable), &metrics, &health, &stop),
            Outcome::Applied
        ));
        assert_eq!(
            writer.join().unwrap(),
            Vec::<u64>::new(),
            "nothing committed before the epoch was durable"
        );
        assert_eq!(*committed.lock(), vec![1]);

        let failed = Durable::pending();
        failed.set(false);
        assert!(matches!(
            apply_with_retry(&mut sink, &group(2, &failed), &metrics, &health, &stop),
            Outcome::Left
        ));
        assert_eq!(*committed.lock(), vec![1], "a failed epoch is not applied");
        assert_eq!(metrics.sink_retries.get(), 0, "and not retried");
    }
}
