//! How long an epoch feeds records before it commits.
//!
//! While the source keeps up, an epoch lasts `epoch_interval`. While it reports records
//! waiting (catching up), the epoch grows up to `max_epoch_interval`, so more changes of a key
//! coalesce and commits are fewer; once caught up, a grown epoch still takes in what arrives
//! for another `epoch_interval`, and ends at the first pause. Under a light load (no partition
//! behind, and at most `LIGHT_EPOCH_RECORDS` records applied by the worker), an epoch ends as
//! soon as a worker that applied records finds its inbox drained, for every worker: a change
//! is readable a few milliseconds after it arrives, not at the end of the interval, while a
//! steady load keeps its epochs (and their commits) as long as before. An assignment or a revocation
//! has an epoch to itself: one that applied records ends, and the next one opens or drops the
//! tasks and ends at once (the partitions go only after their commit).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use differential_dataflow::input::InputSession;

use super::inbox::InboxReceiver;
use super::shared::Shared;
use super::tasks::Tasks;
use crate::dataflow::Epoch;
use crate::value::Row;

/// Longest pause between two batches of a growing (catching-up) epoch before it ends anyway.
const CATCHING_UP_GAP: Duration = Duration::from_millis(50);

/// Longest pause between two batches of a grown epoch once caught up, before it ends (the
/// source hands over a partial batch after 5 ms).
const TAIL_GAP: Duration = Duration::from_millis(10);

/// Records a worker may have applied in an epoch for the load to count as light: the epoch
/// then ends once its inbox is drained (see the module's documentation).
const LIGHT_EPOCH_RECORDS: usize = 16;

/// How often a worker that applied nothing in a light epoch looks whether another worker
/// ended it.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// The last epoch a worker ended early, under a light load: every worker ends it then (the
/// workers commit each epoch together, so one that went on would hold the others back).
#[derive(Default)]
pub(super) struct EarlyEnd(AtomicU64);

impl EarlyEnd {
    fn request(&self, epoch: Epoch) {
        self.0.fetch_max(epoch, Ordering::AcqRel);
    }

    fn requested(&self, epoch: Epoch) -> bool {
        self.0.load(Ordering::Acquire) >= epoch
    }
}

/// The length of the epoch so far, as it decides when the epoch ends.
#[derive(Default)]
struct Length {
    /// When an epoch that grew saw every partition caught up.
    caught_up_at: Option<Duration>,
    /// Whether the epoch grew past `epoch_interval` while catching up.
    grew: bool,
}

impl Length {
    /// How long to wait for the next message, after `applied` records; `None` when the epoch
    /// is over.
    fn wait(&mut self, shared: &Shared, elapsed: Duration, applied: usize) -> Option<Duration> {
        let interval = shared.config.epoch_interval;
        let behind = shared.backlog.any();
        self.grew |= behind && elapsed >= interval;
        let length = if behind {
            self.caught_up_at = None;
            shared.config.max_epoch_interval.max(interval)
        } else if self.grew {
            *self.caught_up_at.get_or_insert(elapsed) + interval
        } else {
            interval
        };
        let left = length.saturating_sub(elapsed);
        if left.is_zero() {
            return None;
        }
        // Past `epoch_interval`, the epoch goes on only while records keep coming: offsets
        // that are never delivered (aborted transactions) do not hold it open.
        let until_interval = interval.saturating_sub(elapsed);
        let gap = if behind { CATCHING_UP_GAP } else { TAIL_GAP };
        Some(if until_interval.is_zero() {
            left.min(gap)
        } else if self.light(shared, applied) {
            until_interval.min(if applied == 0 { IDLE_POLL } else { TAIL_GAP })
        } else {
            until_interval
        })
    }

    /// Whether the epoch may end before `epoch_interval` once the inbox is drained.
    fn light(&self, shared: &Shared, applied: usize) -> bool {
        !self.grew && applied <= LIGHT_EPOCH_RECORDS && !shared.backlog.any()
    }
}

/// Applies the messages of `inbox` to `tasks` until epoch `epoch` ends; returns the number of
/// records applied.
pub(super) fn gather(
    epoch: Epoch,
    shared: &Shared,
    inbox: &InboxReceiver,
    tasks: &mut Tasks,
    inputs: &mut [InputSession<Epoch, Row, isize>],
) -> usize {
    // A change of partitions has an epoch to itself: what the tasks derive when they open
    // or go is told apart from what their records change (see `Message::Assign`).
    if let Some(message) = tasks.take_deferred() {
        tasks.handle(shared, message, inputs);
        return 0;
    }
    let started = Instant::now();
    let mut length = Length::default();
    let mut applied = 0usize;
    while applied < shared.config.max_records_per_epoch
        && !shared.shutdown.load(Ordering::SeqCst)
        // A revocation (sent to every worker) waits for this epoch's commit.
        && !tasks.revocations_waiting()
    {
        let elapsed = started.elapsed();
        let Some(wait) = length.wait(shared, elapsed, applied) else {
            break;
        };
        if shared.early_end.requested(epoch) {
            break;
        }
        let within_interval = elapsed < shared.config.epoch_interval;
        match inbox.recv_timeout(wait) {
            Ok(message) if message.moves_partitions() => {
                match applied {
                    0 => {
                        tasks.handle(shared, message, inputs);
                    }
                    _ => tasks.defer(message),
                }
                break;
            }
            Ok(message) => applied += tasks.handle(shared, message, inputs),
            // Drained under a light load: the epoch ends now, for every worker.
            Err(RecvTimeoutError::Timeout) if applied > 0 && length.light(shared, applied) => {
                shared.early_end.request(epoch);
                break;
            }
            // The interval is over: the loop decides whether the epoch grows.
            Err(RecvTimeoutError::Timeout) if within_interval => {}
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(wait);
                break;
            }
        }
    }
    applied
}
