//! How long an epoch feeds records before it commits.
//!
//! While the source keeps up, an epoch lasts `epoch_interval`. While it reports records
//! waiting (catching up), the epoch grows up to `max_epoch_interval`, so more changes of a key
//! coalesce and commits are fewer; once caught up, a grown epoch still takes in what arrives
//! for another `epoch_interval`, and ends at the first pause. An assignment or a revocation
//! has an epoch to itself: one that applied records ends, and the next one opens or drops the
//! tasks and ends at once (the partitions go only after their commit).

use std::sync::atomic::Ordering;
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

/// The length of the epoch so far, as it decides when the epoch ends.
#[derive(Default)]
struct Length {
    /// When an epoch that grew saw every partition caught up.
    caught_up_at: Option<Duration>,
    /// Whether the epoch grew past `epoch_interval` while catching up.
    grew: bool,
}

impl Length {
    /// How long to wait for the next message; `None` when the epoch is over.
    fn wait(&mut self, shared: &Shared, elapsed: Duration) -> Option<Duration> {
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
        } else {
            until_interval
        })
    }
}

/// Applies the messages of `inbox` to `tasks` until the epoch ends; returns the number of
/// records applied.
pub(super) fn gather(
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
        let Some(wait) = length.wait(shared, elapsed) else {
            break;
        };
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
