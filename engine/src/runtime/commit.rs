//! The end of an epoch: each worker adds its writes to the epoch's commit; at a barrier the
//! leader hands the external tables' changes to the sink thread and writes the commit (rows,
//! upsert state, offsets and outbox in one synced RocksDB batch); at a second barrier every
//! worker learns whether to stop. See [`crate::sink`] for the outbox and its hand-over.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{debug, error, warn};

use super::error::RuntimeError;
use super::shared::Shared;
use super::stall::STALL_LIMIT;
use crate::changelog::{without_rederived_rows, RecordTopic};
use crate::dataflow::Epoch;
use crate::error::{retry_delays, ErrorClass};
use crate::plan::repartition::is_stage_topic;
use crate::sink::{Durable, Offset, SinkBatch, SinkSender, TableChanges};
use crate::state::{decode, encode, Commit, StateStore};

/// Longest time after a start that batches of external-table changes are held back waiting
/// for every partition's task (see [`crate::sink`]).
const HOLD_LIMIT: Duration = Duration::from_secs(30);

/// Adds a worker's writes (encoded without holding a lock, then sorted) to the epoch's
/// shared commit.
pub(super) fn contribute(shared: &Shared, mut commit: Commit) {
    commit.sort();
    let mut pending = shared.commit.lock();
    match pending.as_mut() {
        Some(shared_commit) => shared_commit.append(commit),
        None => *pending = Some(commit),
    }
}

/// Merges one worker's changes of an external table into the epoch's (a key's changes all
/// come from the worker its table key routes to, so tables' key sets do not overlap).
pub(super) fn add_sink_changes(shared: &Shared, changes: TableChanges) {
    let mut all = shared.sink_changes.lock();
    match all.iter_mut().find(|t| t.table == changes.table) {
        Some(t) => {
            t.upserts.extend(changes.upserts);
            t.deletes.extend(changes.deletes);
        }
        None => all.push(changes),
    }
}

/// Waits for every worker's writes, lets the leader commit them, and returns whether the
/// workers stop after this epoch (one decision, read by every worker before any can start
/// another epoch).
pub(super) fn finish(shared: &Shared, epoch: Epoch) -> bool {
    if shared.barrier.wait().is_leader() {
        write_epoch(shared, epoch);
        let stop = shared.shutdown.load(Ordering::SeqCst);
        shared.stop_after_epoch.store(stop, Ordering::SeqCst);
    }
    shared.barrier.wait();
    shared.stop_after_epoch.load(Ordering::SeqCst)
}

/// Longest wait for the malformed records' reports once the instance stops: then the epoch
/// is not committed, and its records are read again at the next start.
const REPORTS_GRACE: Duration = Duration::from_secs(10);

/// The leader's part: hands the epoch's external-table changes over and writes the commit.
fn write_epoch(shared: &Shared, epoch: Epoch) {
    if !reports_kept(shared) {
        warn!(epoch, "stopping before the malformed records' reports were kept: the epoch is not committed, its records are read again at the next start");
        shared.commit.lock().take();
        return;
    }
    let mut commit = shared.commit.lock().take();
    if stalled(shared, epoch) {
        return;
    }
    if !changelog_written(shared, epoch, commit.as_mut()) {
        warn!(epoch, "stopping before the epoch's changelog was written: the epoch is not committed, its records are read again at the next start");
        return;
    }
    let batch = shared
        .sink
        .as_ref()
        .and_then(|_| sink_batch(shared, &mut commit));
    // The database writes the batch while RocksDB syncs it, and commits once it is durable
    // (see [`crate::sink`]).
    let durable = Durable::pending();
    if let (Some(sink), Some(batch)) = (&shared.sink, batch) {
        hand_over(shared, sink, batch, durable.clone());
    }
    let committed = match commit.filter(|c| !c.is_empty()) {
        Some(commit) => write_commit(shared, epoch, commit),
        None => true,
    };
    durable.set(committed);
    shared.status.epoch_committed(epoch);
}

/// Whether the process did not run for longer than [`STALL_LIMIT`] since the last epoch (see
/// [`super::stall`]): its partitions may have moved meanwhile, so the epoch is not committed
/// and the instance stops.
fn stalled(shared: &Shared, epoch: Epoch) -> bool {
    let Some(stalls) = &shared.stalls else {
        return false;
    };
    let longest = stalls.take_longest();
    if longest < STALL_LIMIT {
        return false;
    }
    let message = format!(
        "the process did not run for {:.1} s (stopped or starved), long enough to lose its \
         place in the consumer group: its partitions may belong to another instance now, so \
         the epoch is not committed and the instance stops; start it again to rejoin",
        longest.as_secs_f64()
    );
    error!(epoch, stalled_seconds = longest.as_secs_f64(), "{message}");
    shared.status.set_failed(message);
    shared.shutdown.store(true, Ordering::SeqCst);
    true
}

/// Waits until the epoch's malformed-record reports are kept (the errors topic may be down:
/// the epoch waits, and so does consumption); false when the instance stops first.
fn reports_kept(shared: &Shared) -> bool {
    let mut stopping_since = None;
    loop {
        if shared.errors.settle(Duration::from_secs(1)) {
            return true;
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            let since = *stopping_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= REPORTS_GRACE {
                return false;
            }
        }
        warn!("the malformed records' reports are not acknowledged yet: the epoch waits");
    }
}

/// Writes the epoch's changelog records, if any, and adds the positions they reach to
/// `commit`. While the changelog cannot be written, the epoch waits (and so does consumption),
/// retrying; false when the instance stops first, or on a fatal error (it then stops).
fn changelog_written(shared: &Shared, epoch: Epoch, commit: Option<&mut Commit>) -> bool {
    let (Some(writer), Some(commit)) = (&shared.changelog, commit) else {
        return true;
    };
    let records = without_rederived_rows(commit.take_changelog());
    if records.is_empty() {
        return true;
    }
    let mut delays = retry_delays(Duration::from_millis(100), Duration::from_secs(5));
    let mut stopping_since = None;
    loop {
        let timer = shared.metrics.changelog.write_seconds.start_timer();
        match writer.write(&records) {
            Ok(positions) => {
                timer.observe_duration();
                for p in positions {
                    match p.topic {
                        RecordTopic::Changelog => {
                            commit.put_changelog_position(p.source, p.partition, p.next)
                        }
                        RecordTopic::Source => shared.status.stage_written(
                            &shared.topology.sources[p.source].topic,
                            p.partition,
                            p.next,
                        ),
                    }
                }
                return true;
            }
            // A record the changelog refuses for what it is would be refused forever.
            Err(e) if e.class != ErrorClass::Transient => {
                error!(epoch, error = %e, "the changelog cannot be written; stopping");
                shared.status.set_failed(e.to_string());
                shared.shutdown.store(true, Ordering::SeqCst);
                return false;
            }
            Err(e) => {
                shared
                    .metrics
                    .changelog
                    .write_failures
                    .with_label_values(&[e.class.name()])
                    .inc();
                warn!(epoch, error = %e, class = %e.class, "the changelog cannot be written: the epoch waits");
            }
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            let since = *stopping_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= REPORTS_GRACE {
                return false;
            }
        }
        std::thread::sleep(delays.next().unwrap_or(Duration::from_secs(5)));
    }
}

/// Writes the epoch's commit; on a failure the runtime stops (returns false).
fn write_commit(shared: &Shared, epoch: Epoch, commit: Commit) -> bool {
    let timer = shared.metrics.epoch_commit_seconds.start_timer();
    let (writes, bytes) = (commit.len(), commit.size());
    let written = match shared.store.write(commit) {
        Ok(()) => {
            debug!(epoch, writes, bytes, "epoch committed");
            true
        }
        Err(e) => {
            error!(error = %e, "epoch commit failed; stopping");
            shared.status.set_failed(e.to_string());
            shared.shutdown.store(true, Ordering::SeqCst);
            false
        }
    };
    timer.observe_duration();
    written
}

/// Makes the epoch's batch of external-table changes, and adds it to `commit`'s outbox;
/// `None` when there is nothing to tell the database.
fn sink_batch(shared: &Shared, commit: &mut Option<Commit>) -> Option<SinkBatch> {
    let tables = std::mem::take(&mut *shared.sink_changes.lock());
    let claims = std::mem::take(&mut *shared.sink_claims.lock());
    let caught_up = shared
        .status
        .caught_up_here(&shared.topology.global_topics());
    let announce = caught_up && !shared.announced_caught_up.load(Ordering::SeqCst);
    // Offsets alone are bookkeeping: they travel with the next batch that has changes. But a
    // table being rebuilt waits for the stage partitions' writers to read what other
    // instances wrote there, which may change no row.
    let stages_read = shared
        .sink_offsets
        .lock()
        .keys()
        .any(|(topic, _)| is_stage_topic(topic));
    if tables.is_empty() && claims.is_empty() && !announce && !stages_read {
        return None;
    }
    // A batch that claims partitions is followed by one saying when they caught up (a table
    // being rebuilt waits for that), even when no change comes.
    let announced = caught_up && claims.is_empty();
    shared
        .announced_caught_up
        .store(announced, Ordering::SeqCst);
    let mut offsets: Vec<Offset> = std::mem::take(&mut *shared.sink_offsets.lock())
        .into_iter()
        .map(|((topic, partition), offset)| Offset {
            topic,
            partition,
            offset,
        })
        .collect();
    offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let written = match announce {
        true => shared.status.stage_writes(),
        false => Vec::new(),
    };
    let batch = SinkBatch {
        sequence: shared.sequence.next(),
        tables,
        offsets,
        caught_up,
        claims,
        written,
    };
    let encoded = encode(&batch);
    commit
        .get_or_insert_with(|| shared.store.commit())
        .put_outbox(batch.sequence, encoded);
    Some(batch)
}

/// Hands `batch` to the sink thread, with the batches held before it, once the partitions
/// the external tables wait for are restored (see [`restored_for_sink`]) or after
/// [`HOLD_LIMIT`]; holds it otherwise. Blocks while the database still applies the previous
/// group: backpressure.
fn hand_over(shared: &Shared, sink: &SinkSender, batch: SinkBatch, durable: Durable) {
    let mut held = shared.held.lock();
    let restored = restored_for_sink(shared);
    if !restored && shared.started.elapsed() < HOLD_LIMIT {
        sink.held(1);
        held.push(batch);
        return;
    }
    if !restored && !held.is_empty() {
        warn!("the global sources are not restored yet: external tables are written without them meanwhile");
    }
    let mut group = std::mem::take(&mut *held);
    let counted = group.len();
    group.push(batch);
    sink.submit(group, counted, durable);
}

/// Whether every partition of the global sources has its task here, and, when an external
/// table is computed without stages ([`crate::plan::Distribution::Partial`]), every
/// partition of every source too: until then, a join with a source not restored yet would
/// show readers an intermediate table.
fn restored_for_sink(shared: &Shared) -> bool {
    let topology = &shared.topology;
    let partial = topology.tables.iter().any(|t| {
        t.postgres().is_some() && topology.distribution(t) == crate::plan::Distribution::Partial
    });
    let topics = match partial {
        true => topology.topics(),
        false => topology.global_topics(),
    };
    shared.status.all_restored(&topics)
}

/// Batches left in the outbox by the previous run, in sequence order. Their `caught_up`
/// is cleared: whether a rebuilt table may replace the old one is this run's decision.
pub(super) fn recover_outbox(store: &StateStore) -> Result<Vec<SinkBatch>, RuntimeError> {
    store
        .outbox()?
        .into_iter()
        .map(|(sequence, bytes)| {
            let mut batch: SinkBatch = decode(&bytes).map_err(|e| RuntimeError::Outbox {
                sequence,
                message: e.to_string(),
            })?;
            batch.caught_up = false;
            Ok(batch)
        })
        .collect()
}
