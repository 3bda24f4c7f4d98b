//! What the workers of a runtime share: the topology, the store, the epoch's commit in the
//! making, the barrier, and the external tables' batches on their way.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use parking_lot::Mutex;

use super::backlog::Backlog;
use super::config::RuntimeConfig;
use super::epoch::EarlyEnd;
use super::stall::Stalls;
use super::status::{Status, TopicPartition};
use crate::changelog::ChangelogWriter;
use crate::ingest::ErrorSink;
use crate::metrics::Metrics;
use crate::sink::{Claim, Sequence, SinkBatch, SinkSender, TableChanges};
use crate::state::{Commit, StateStore};
use crate::topology::Topology;

/// What the workers share.
pub(super) struct Shared {
    pub(super) topology: Arc<Topology>,
    pub(super) store: StateStore,
    pub(super) metrics: Arc<Metrics>,
    pub(super) errors: Arc<dyn ErrorSink>,
    pub(super) config: RuntimeConfig,
    /// The epoch's writes, contributed by every worker.
    pub(super) commit: Mutex<Option<Commit>>,
    pub(super) barrier: Barrier,
    pub(super) shutdown: Arc<AtomicBool>,
    /// Whether the workers stop after the epoch just committed, decided by the leader.
    pub(super) stop_after_epoch: AtomicBool,
    pub(super) status: Arc<Status>,
    /// The partitions that were behind as of the last batch applied from them.
    pub(super) backlog: Backlog,
    /// The last epoch a worker ended early, under a light load.
    pub(super) early_end: EarlyEnd,
    /// Commit sequence numbers (persisted with each batch of external-table changes).
    pub(super) sequence: Sequence,
    /// Where batches of external-table changes go, when the topology has external tables.
    pub(super) sink: Option<SinkSender>,
    /// The epoch's external-table changes, contributed by every worker.
    pub(super) sink_changes: Mutex<Vec<TableChanges>>,
    /// The last applied offset of each task since the last batch, contributed by every
    /// worker (bookkeeping).
    pub(super) sink_offsets: Mutex<HashMap<TopicPartition, i64>>,
    /// The partitions whose task opened in the epoch (see [`Claim`]).
    pub(super) sink_claims: Mutex<Vec<Claim>>,
    /// Whether the last batch said `caught_up`, claiming no partition.
    pub(super) announced_caught_up: AtomicBool,
    /// Batches committed (in the outbox) but held back until every task is restored.
    pub(super) held: Mutex<Vec<SinkBatch>>,
    /// When the runtime started (holding batches back has a limit).
    pub(super) started: Instant,
    /// Where each epoch's changelog records go first, when state is logged.
    pub(super) changelog: Option<Arc<dyn ChangelogWriter>>,
    /// The stalls of the process, watched when state is logged (several instances share the
    /// partitions then).
    pub(super) stalls: Option<Arc<Stalls>>,
    /// The external tables whose changes were left out because this instance does not hold
    /// every partition they are computed from (said once per table).
    pub(super) partial_skipped: Mutex<HashSet<String>>,
}
