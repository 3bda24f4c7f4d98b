//! A worker's tasks: opened when their partition is assigned (restored from the state store),
//! fed the partition's records, flushed into each epoch's commit, and dropped when the
//! partition is revoked.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use crossbeam_channel::Sender;
use differential_dataflow::input::InputSession;
use tracing::{debug, error, info, warn};

use super::shared::Shared;
use super::status::TopicPartition;
use crate::dataflow::Epoch;
use crate::ingest::task::{Origin, Task};
use crate::ingest::{Message, Records};
use crate::partition::worker_for_partition;
use crate::sink::Claim;
use crate::state::{Commit, StoreError};
use crate::value::Row;

/// The tasks of one worker, by (source, partition).
pub(super) struct Tasks {
    /// The worker's index.
    worker: usize,
    tasks: HashMap<(usize, u32), Task>,
    /// The (source, partition) pairs assigned to this worker: records of any other are not
    /// applied (a batch read before its partition was revoked and handed over after it would
    /// otherwise open the task again, on an instance that no longer owns the partition).
    assigned: HashSet<(usize, u32)>,
    /// Revocations waiting for the epoch's commit, to acknowledge after it.
    acks: Vec<Sender<()>>,
    /// An assignment or revocation for the next epoch (this one applied records).
    deferred: Option<Message>,
}

impl Tasks {
    pub(super) fn new(worker: usize) -> Tasks {
        Tasks {
            worker,
            tasks: HashMap::new(),
            assigned: HashSet::new(),
            acks: Vec::new(),
            deferred: None,
        }
    }

    /// Keeps `message` (an assignment or a revocation) for the next epoch.
    pub(super) fn defer(&mut self, message: Message) {
        self.deferred = Some(message);
    }

    /// The message kept for this epoch, if any.
    pub(super) fn take_deferred(&mut self) -> Option<Message> {
        self.deferred.take()
    }

    /// Whether a revocation waits for the epoch's commit (the epoch ends at once).
    pub(super) fn revocations_waiting(&self) -> bool {
        !self.acks.is_empty()
    }

    /// Applies one message; returns the number of records applied.
    pub(super) fn handle(
        &mut self,
        shared: &Shared,
        message: Message,
        inputs: &mut [InputSession<Epoch, Row, isize>],
    ) -> usize {
        match message {
            Message::Assign { tasks } => {
                let (workers, worker) = (shared.config.workers.max(1), self.worker);
                for (source, partitions) in tasks {
                    for p in partitions
                        .into_iter()
                        .filter(|p| worker_for_partition(*p, workers) == worker)
                    {
                        self.assigned.insert((source, p));
                        self.open(shared, source, p, inputs);
                    }
                }
                0
            }
            Message::Revoke {
                tasks,
                retract,
                done,
            } => {
                for (source, partitions) in tasks {
                    self.revoke(shared, source, &partitions, retract, inputs);
                }
                self.acks.push(done);
                0
            }
            Message::Records {
                source,
                partition,
                records,
                catching_up,
            } => {
                let mut applied = 0;
                for reader in shared.topology.readers_of(source) {
                    shared.backlog.update(|behind| {
                        if catching_up {
                            behind.insert((reader, partition));
                        } else {
                            behind.remove(&(reader, partition));
                        }
                    });
                    applied = applied.max(self.apply(shared, reader, partition, &records, inputs));
                }
                applied
            }
        }
    }

    fn apply(
        &mut self,
        shared: &Shared,
        source: usize,
        partition: u32,
        records: &Records,
        inputs: &mut [InputSession<Epoch, Row, isize>],
    ) -> usize {
        if !self.assigned.contains(&(source, partition)) {
            let topic = &shared.topology.sources[source].topic;
            debug!(%topic, partition, records = records.len(),
                   "records of a partition not assigned (revoked meanwhile) dropped: its owner reads them from its committed offset");
            return 0;
        }
        let Some(task) = self.open(shared, source, partition, inputs) else {
            return 0;
        };
        task.apply(&origin(shared, source, partition), records);
        records.len()
    }

    /// The task of `source`/`partition`, restored from the state store if it is not open
    /// yet; `None` (logged) when the store cannot restore it.
    fn open(
        &mut self,
        shared: &Shared,
        source: usize,
        partition: u32,
        inputs: &mut [InputSession<Epoch, Row, isize>],
    ) -> Option<&mut Task> {
        let src = &shared.topology.sources[source];
        match self.tasks.entry((source, partition)) {
            Entry::Occupied(task) => Some(task.into_mut()),
            Entry::Vacant(slot) => match restore(shared, source, partition, &mut inputs[source]) {
                Ok(task) => {
                    info!(source = %src.name, topic = %src.topic, partition, rows = task.len(), offset = ?task.offset(), "task created");
                    shared.status.task_opened(&src.topic, partition);
                    claim(shared, &src.topic, partition);
                    Some(slot.insert(task))
                }
                Err(e) => {
                    error!(source = %src.name, topic = %src.topic, partition, error = %e, "cannot restore task");
                    None
                }
            },
        }
    }

    /// Drops the tasks of `partitions`: what they changed in the epoch so far joins its
    /// commit (their upsert state stays committed for a later re-assignment), and with
    /// `retract` their rows leave the tables.
    fn revoke(
        &mut self,
        shared: &Shared,
        source: usize,
        partitions: &[u32],
        retract: bool,
        inputs: &mut [InputSession<Epoch, Row, isize>],
    ) {
        shared.backlog.update(|behind| {
            for p in partitions {
                behind.remove(&(source, *p));
            }
        });
        let src = &shared.topology.sources[source];
        for p in partitions {
            self.assigned.remove(&(source, *p));
            let Some(mut task) = self.tasks.remove(&(source, *p)) else {
                continue;
            };
            shared.status.task_dropped(&src.topic, *p);
            if task.has_changes() {
                let mut pending = shared.commit.lock();
                let commit = pending.get_or_insert_with(|| shared.store.commit());
                let origin = origin(shared, source, *p);
                task.flush((source, &origin), &mut inputs[source], commit);
            }
            if retract {
                task.retract(&mut inputs[source]);
            }
            info!(source = %src.name, topic = %src.topic, partition = p, "task dropped");
        }
    }

    /// Feeds the epoch's coalesced changes of every task to the dataflow and adds their
    /// writes to `commit`; notes their offsets for the external tables' bookkeeping.
    pub(super) fn flush(
        &mut self,
        shared: &Shared,
        inputs: &mut [InputSession<Epoch, Row, isize>],
        commit: &mut Commit,
    ) {
        let topology = &shared.topology;
        if shared.sink.is_some() {
            let mut offsets = shared.sink_offsets.lock();
            for ((source, partition), task) in &self.tasks {
                if let Some(offset) = task.unflushed_offset() {
                    offsets.insert(
                        (topology.sources[*source].topic.clone(), *partition),
                        offset,
                    );
                }
            }
        }
        for ((source, partition), task) in self.tasks.iter_mut() {
            let origin = origin(shared, *source, *partition);
            task.flush((*source, &origin), &mut inputs[*source], commit);
        }
    }

    /// After the epoch's commit: records the tasks' offsets as committed and acknowledges
    /// the revocations that waited for it.
    pub(super) fn committed(&mut self, shared: &Shared) {
        let offsets = self.tasks.iter().filter_map(|((source, partition), task)| {
            let tp: TopicPartition = (shared.topology.sources[*source].topic.clone(), *partition);
            task.offset().map(|o| (tp, o))
        });
        shared.status.offsets_committed(offsets);
        for ack in self.acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

/// Names a partition whose task opened in the epoch's batch of external-table changes: its
/// rows there are derived again from the restored state (see [`crate::sink::Claim`]).
fn claim(shared: &Shared, topic: &str, partition: u32) {
    if shared.sink.is_none() {
        return;
    }
    match shared.status.partition_count(topic) {
        Some(partitions) => shared.sink_claims.lock().push(Claim {
            topic: topic.to_string(),
            partition,
            partitions,
        }),
        None => {
            warn!(%topic, partition, "partition count unknown: the external tables keep the partition's former rows")
        }
    }
}

/// Restores the task of `source`/`partition` from its committed upsert entries and offset.
fn restore(
    shared: &Shared,
    source: usize,
    partition: u32,
    input: &mut InputSession<Epoch, Row, isize>,
) -> Result<Task, StoreError> {
    let entries = shared.store.upsert_entries(
        source,
        partition,
        crate::ingest::upsert::Entry::decode_stored,
    )?;
    let offset = shared
        .store
        .offset(&shared.topology.sources[source].topic, partition)?;
    let mut task = Task::restore(entries, offset, input);
    if shared.changelog.is_some()
        && !shared.topology.sources[source].global
        && shared
            .store
            .changelog_position(source, partition)?
            .is_none()
    {
        task.log_whole_state();
    }
    Ok(task)
}

/// Where the records of `source`'s `partition` come from, and where what goes wrong with them
/// is told.
fn origin(shared: &Shared, source: usize, partition: u32) -> Origin<'_> {
    Origin {
        source: &shared.topology.sources[source],
        partition,
        metrics: &shared.metrics,
        errors: (shared.topology.readers_of(source).next() == Some(source))
            .then_some(shared.errors.as_ref()),
    }
}
