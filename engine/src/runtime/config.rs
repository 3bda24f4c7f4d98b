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
    /// Most bytes of records waiting in a worker's inbox: then the connector stops handing
    /// records over (and pauses its consumer) until the worker takes some.
    pub inbox_bytes: usize,
    /// With changelogs, also log each changed row of the internal tables keyed by a source key
    /// (see [`crate::changelog`]), so that standby replicas can answer for them.
    pub log_rows: bool,
}

impl RuntimeConfig {
    /// Worker threads by default: the cores of a small machine.
    pub const DEFAULT_WORKERS: usize = 2;
    /// 100 ms bounds the staleness a committed epoch adds when the workers keep up.
    pub const DEFAULT_EPOCH_INTERVAL: Duration = Duration::from_millis(100);
    /// Catching up, epochs grow to 5 s (or [`Self::DEFAULT_MAX_RECORDS_PER_EPOCH`] records per
    /// worker): a key changed several times in one epoch is one change for the dataflow, the
    /// tables and PostgreSQL, and commits (one fsync each) are fewer. An epoch's changes take
    /// at most one entry per changed key, and the inboxes are bounded, so its memory is bounded
    /// by the keys, not the records.
    pub const DEFAULT_MAX_EPOCH_INTERVAL: Duration = Duration::from_secs(5);
    /// Most records a worker applies in one epoch by default.
    pub const DEFAULT_MAX_RECORDS_PER_EPOCH: usize = 1_000_000;
    /// 64 MiB per worker: enough for the connector to keep reading while the workers compute
    /// and commit an epoch (about 250,000 records of the demo's size).
    pub const DEFAULT_INBOX_BYTES: usize = 64 << 20;
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            workers: Self::DEFAULT_WORKERS,
            epoch_interval: Self::DEFAULT_EPOCH_INTERVAL,
            max_epoch_interval: Self::DEFAULT_MAX_EPOCH_INTERVAL,
            max_records_per_epoch: Self::DEFAULT_MAX_RECORDS_PER_EPOCH,
            inbox_bytes: Self::DEFAULT_INBOX_BYTES,
            log_rows: false,
        }
    }
}
