//! How long an epoch feeds records before it commits.
//!
//! While the source keeps up, an epoch lasts at most `epoch_interval`: one that applied
//! records ends at the first pause of [`TAIL_GAP`] once a tenth of the interval has passed (the
//! input is drained: under a light load, waiting out the interval would only delay when the
//! records are readable), and so do the workers that applied none (the epoch's dataflow and
//! commit wait for every worker); one that keeps receiving ends at the interval. While the source
//! reports records waiting (catching up), the epoch grows up to `max_epoch_interval`, so more
//! changes of a key coalesce and commits are fewer; once caught up, a grown epoch still takes
//! in what arrives for another `epoch_interval`, and ends at the first pause. An assignment or a revocation
//! has an epoch to itself: one that applied records ends, and the next one opens or drops the
//! tasks and ends at once (the partitions go only after their commit).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use differential_dataflow::input::InputSession;

use super::config::RuntimeConfig;
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
struct Length {
    /// `epoch_interval`.
    interval: Duration,
    /// `max_epoch_interval`.
    max_interval: Duration,
    /// When an epoch that grew saw every partition caught up.
    caught_up_at: Option<Duration>,
    /// Whether the epoch grew past `epoch_interval` while catching up.
    grew: bool,
}

impl Length {
    fn new(config: &RuntimeConfig) -> Length {
        Length {
            interval: config.epoch_interval,
            max_interval: config.max_epoch_interval,
            caught_up_at: None,
            grew: false,
        }
    }

    /// Whether the epoch, which applied `applied` records `elapsed` after it started, ends at
    /// the next pause of [`TAIL_GAP`]: it keeps up (`behind` is false), did not grow, and
    /// lasted a tenth of `epoch_interval` (at most ten commits per interval under a light
    /// load).
    fn drained(&self, behind: bool, elapsed: Duration, applied: usize) -> bool {
        applied > 0 && !self.grew && !behind && elapsed >= self.interval / 10
    }

    /// How long to wait for the next message, `elapsed` after the epoch started, having
    /// applied `applied` records, while the source is `behind` or not and another worker
    /// ended the epoch as drained or not; `None` when the epoch is over.
    fn wait(
        &mut self,
        behind: bool,
        elapsed: Duration,
        applied: usize,
        others_drained: bool,
    ) -> Option<Duration> {
        let interval = self.interval;
        self.grew |= behind && elapsed >= interval;
        let length = if behind {
            self.caught_up_at = None;
            self.max_interval.max(interval)
        } else if self.grew {
            *self.caught_up_at.get_or_insert(elapsed) + interval
        } else {
            interval
        };
        let left = length.saturating_sub(elapsed);
        let idle = applied == 0 && !behind && !self.grew;
        if left.is_zero() || (idle && others_drained) {
            return None;
        }
        // Past `epoch_interval`, or once drained, the epoch goes on only while records keep
        // coming: offsets that are never delivered (aborted transactions) do not hold it open.
        let until_interval = interval.saturating_sub(elapsed);
        let gap = if behind { CATCHING_UP_GAP } else { TAIL_GAP };
        Some(
            if until_interval.is_zero() || self.drained(behind, elapsed, applied) {
                left.min(gap)
            } else if applied > 0 && !behind && !self.grew {
                // Until the tenth of the interval an epoch of a light load lasts at least.
                (interval / 10)
                    .saturating_sub(elapsed)
                    .max(Duration::from_millis(1))
            } else if idle {
                // In slices, to see another worker end the epoch as drained.
                until_interval.min(TAIL_GAP)
            } else {
                until_interval
            },
        )
    }
}

/// Applies the messages of `inbox` to `tasks` until epoch `epoch` ends; returns the number of
/// records applied.
pub(super) fn gather(
    shared: &Shared,
    inbox: &InboxReceiver,
    tasks: &mut Tasks,
    (inputs, epoch): (&mut [InputSession<Epoch, Row, isize>], Epoch),
) -> usize {
    // A change of partitions has an epoch to itself: what the tasks derive when they open
    // or go is told apart from what their records change (see `Message::Assign`).
    if let Some(message) = tasks.take_deferred() {
        tasks.handle(shared, message, inputs);
        return 0;
    }
    let started = Instant::now();
    let mut length = Length::new(&shared.config);
    let mut applied = 0usize;
    while applied < shared.config.max_records_per_epoch
        && !shared.shutdown.load(Ordering::SeqCst)
        // A revocation (sent to every worker) waits for this epoch's commit.
        && !tasks.revocations_waiting()
    {
        let elapsed = started.elapsed();
        let behind = shared.backlog.any();
        let others_drained = shared.drained_epoch.load(Ordering::Acquire) >= epoch;
        let Some(wait) = length.wait(behind, elapsed, applied, others_drained) else {
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
            // The input drained: the epoch ends here, and at the other workers.
            Err(RecvTimeoutError::Timeout)
                if within_interval && length.drained(behind, started.elapsed(), applied) =>
            {
                shared.drained_epoch.fetch_max(epoch, Ordering::AcqRel);
                break;
            }
            // The interval is over, or a slice of it: the loop decides whether the epoch
            // grows or ends.
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn length() -> Length {
        Length::new(&RuntimeConfig {
            epoch_interval: 100 * MS,
            max_epoch_interval: 1000 * MS,
            ..RuntimeConfig::default()
        })
    }

    #[test]
    fn a_light_load_ends_the_epoch_at_the_first_pause_past_a_tenth_of_the_interval() {
        let mut l = length();
        assert_eq!(
            l.wait(false, Duration::ZERO, 0, false),
            Some(TAIL_GAP),
            "nothing applied: the interval, in slices"
        );
        assert_eq!(
            l.wait(false, 30 * MS, 0, true),
            None,
            "another worker drained it"
        );
        assert_eq!(
            l.wait(false, 2 * MS, 1, false),
            Some(8 * MS),
            "applied: wait for the tenth"
        );
        assert!(!l.drained(false, 2 * MS, 1));
        assert_eq!(
            l.wait(false, 10 * MS, 1, false),
            Some(TAIL_GAP),
            "then for a pause"
        );
        assert!(l.drained(false, 10 * MS, 1));
        assert_eq!(
            l.wait(false, 95 * MS, 7, false),
            Some(5 * MS),
            "never past the interval"
        );
        assert_eq!(l.wait(false, 100 * MS, 7, false), None);
    }

    #[test]
    fn catching_up_grows_the_epoch_and_keeps_it_grown() {
        let mut l = length();
        assert!(!l.drained(true, 50 * MS, 10), "behind: not drained");
        assert!(
            l.wait(true, 30 * MS, 0, true).is_some(),
            "behind, another worker draining does not end it"
        );
        assert_eq!(
            l.wait(true, 50 * MS, 10, false),
            Some(50 * MS),
            "to the interval first"
        );
        assert_eq!(
            l.wait(true, 100 * MS, 10, false),
            Some(CATCHING_UP_GAP),
            "grew"
        );
        assert_eq!(
            l.wait(false, 300 * MS, 10, false),
            Some(TAIL_GAP),
            "caught up: a pause ends it"
        );
        assert!(
            !l.drained(false, 300 * MS, 10),
            "a grown epoch is not a light load"
        );
        assert_eq!(
            l.wait(false, 400 * MS, 10, false),
            None,
            "an interval after catching up"
        );
    }
}
