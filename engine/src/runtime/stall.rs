//! Notices when the process did not run for a while: stopped (`SIGSTOP`, a frozen
//! container) or starved. Its consumer group may then have given its partitions to another
//! instance, which goes on from their last commit: what this process computed before the
//! stall must not be committed on top of the new owner's writes (to the changelogs and the
//! stages' topics). A thread ticks every [`TICK`] and keeps the longest gap between two
//! ticks; the leader reads it before each epoch's changelog transaction (see
//! `commit::write_epoch`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

/// How often the watching thread ticks.
const TICK: Duration = Duration::from_millis(100);

/// The longest stall an instance goes on after: the source consumer's session timeout (10 s)
/// less its heartbeat interval (3 s). A process that did not run that long may have missed
/// the heartbeats that kept it in its group.
pub(super) const STALL_LIMIT: Duration = Duration::from_secs(7);

/// The longest gap between two ticks of the watching thread since it was last read.
pub(super) struct Stalls {
    /// What the ticks are counted from.
    base: Instant,
    /// The last tick, in milliseconds from `base`.
    last_tick_ms: AtomicU64,
    /// The longest gap between two ticks since the last read, in milliseconds.
    longest_ms: AtomicU64,
}

impl Stalls {
    fn new() -> Stalls {
        Stalls {
            base: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            longest_ms: AtomicU64::new(0),
        }
    }

    /// Starts the watching thread; it ends once `shutdown` is set.
    pub(super) fn watch(shutdown: Arc<AtomicBool>) -> Arc<Stalls> {
        let stalls = Arc::new(Stalls::new());
        let watched = stalls.clone();
        let spawned = std::thread::Builder::new()
            .name("miroir-stalls".into())
            .spawn(move || {
                while !shutdown.load(Ordering::SeqCst) {
                    std::thread::sleep(TICK);
                    watched.tick();
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the thread that notices stalls of the process");
        }
        stalls
    }

    /// Milliseconds from `base` to now.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records a tick, and the gap since the last one.
    fn tick(&self) {
        let now = self.now_ms();
        let last = self.last_tick_ms.swap(now, Ordering::SeqCst);
        self.longest_ms
            .fetch_max(now.saturating_sub(last), Ordering::SeqCst);
    }

    /// The longest gap between two ticks since the last call, counting the one under way (a
    /// stall just ended may not have its tick yet), and starts over.
    pub(super) fn take_longest(&self) -> Duration {
        let under_way = self
            .now_ms()
            .saturating_sub(self.last_tick_ms.load(Ordering::SeqCst));
        let longest = self.longest_ms.swap(0, Ordering::SeqCst);
        Duration::from_millis(longest.max(under_way))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_is_read_once_and_the_one_under_way_counts() {
        let s = Stalls::new();
        s.tick();
        s.longest_ms.store(9_000, Ordering::SeqCst);
        assert!(s.take_longest() >= Duration::from_secs(9));
        assert!(s.take_longest() < Duration::from_secs(1));
        // A tick that has not come for a while: the gap under way counts.
        s.last_tick_ms.store(0, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert!(s.take_longest() >= Duration::from_millis(50));
    }
}
