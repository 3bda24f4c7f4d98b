//! The runtime's settings.

use std::time::Duration;

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
