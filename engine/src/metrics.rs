//! Prometheus metrics of an instance.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The engine's metrics, registered in their own registry (served at `GET /metrics`).
pub struct Metrics {
    /// The registry holding everything below.
    pub registry: Registry,
    /// Records read, by source.
    pub records_in: IntCounterVec,
    /// Late events, by source and action (`dropped` or `kept`).
    pub late_events: IntCounterVec,
    /// Duplicate events (re-deliveries, replays), by source.
    pub duplicate_events: IntCounterVec,
    /// Order values of business operations a key forgot at `late.max_operations`, by source.
    pub operations_forgotten: IntCounterVec,
    /// Malformed records, by source.
    pub malformed_records: IntCounterVec,
    /// Rows of stream sources past their retention (deleted, or dropped as they arrived), by
    /// source.
    pub rows_expired: IntCounterVec,
    /// Seconds to write an epoch commit.
    pub epoch_commit_seconds: Histogram,
    /// Consumer lag (high watermark minus next offset to read), by topic and partition.
    pub consumer_lag: IntGaugeVec,
    /// 1 while the source consumer is paused: the engine takes no more records for now.
    pub source_paused: IntGauge,
    /// Source partitions assigned to this instance (each time one is).
    pub partitions_assigned: IntCounter,
    /// Source partitions revoked from this instance (each time one is).
    pub partitions_revoked: IntCounter,
    /// Records deleted by a topic's retention before they were read, by topic and partition.
    pub records_lost: IntCounterVec,
    /// Row changes in the batches applied to external tables, by table and operation
    /// (`upsert` or `delete`).
    pub sink_rows: IntCounterVec,
    /// Epoch batches applied to the external database.
    pub sink_batches: IntCounter,
    /// Failed attempts to apply a batch (each one is retried).
    pub sink_retries: IntCounter,
    /// 1 while the external database accepts writes, 0 while the sink is retrying.
    pub sink_up: IntGauge,
    /// Batches committed locally and not yet confirmed by the external database.
    pub sink_pending: IntGauge,
    /// Seconds to apply one batch to the external database (one transaction), not counting
    /// the wait for the RocksDB commit of its epoch.
    pub sink_commit_seconds: Histogram,
    /// Commands processed and sent.
    pub commands: CommandMetrics,
    /// Changelogs written and restored.
    pub changelog: ChangelogMetrics,
}

/// Creates a gauge family and registers it in `registry`.
fn register_gauges(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

/// Creates a counter family and registers it in `registry`.
fn register_counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

/// Metrics of the tasks' changelogs (see [`crate::changelog`]).
#[derive(Clone)]
pub struct ChangelogMetrics {
    /// Seconds to write an epoch's changelog records (one transaction).
    pub write_seconds: Histogram,
    /// Failed attempts to write an epoch's changelog records, by error class (retried).
    pub write_failures: IntCounterVec,
    /// Changelog records read back into the state directory, by source topic.
    pub restored_records: IntCounterVec,
    /// Changelog records still to read before a partition's task is restored, by source topic
    /// and partition (0 once restored).
    pub restore_remaining: IntGaugeVec,
    /// Records of a changelog topic that are not changelog records (skipped), by source topic.
    pub malformed_records: IntCounterVec,
    /// Changelog records a standby replica has not applied yet, by source topic and partition
    /// (removed when it stops standing by).
    pub standby_lag: IntGaugeVec,
    /// Changelog records applied to standby replicas, by source topic.
    pub standby_records: IntCounterVec,
    /// Partitions assigned to this instance while it stood by for them: their restore started
    /// from the warm copy.
    pub promotions: IntCounter,
}

impl ChangelogMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> ChangelogMetrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register_counter(registry, name, help, labels)
        };
        let write_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "miroir_changelog_write_seconds",
                "Time to write an epoch's changelog records (one Kafka transaction)",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(write_seconds.clone()))
            .expect("unique metric");
        let restore_remaining = register_gauges(
            registry,
            "miroir_changelog_restore_remaining_records",
            "Changelog records still to read before a partition's task is restored",
            &["topic", "partition"],
        );
        let standby_lag = register_gauges(
            registry,
            "miroir_standby_lag_records",
            "Changelog records a standby replica has not applied yet",
            &["topic", "partition"],
        );
        let promotions = IntCounter::new(
            "miroir_standby_promotions_total",
            "Partitions assigned to this instance while it stood by for them",
        )
        .expect("valid metric");
        registry
            .register(Box::new(promotions.clone()))
            .expect("unique metric");
        ChangelogMetrics {
            write_seconds,
            write_failures: counter(
                "miroir_changelog_write_failures_total",
                "Failed attempts to write an epoch's changelog records (retried), by error class",
                &["class"],
            ),
            restored_records: counter(
                "miroir_changelog_restored_records_total",
                "Changelog records read back into the state directory",
                &["topic"],
            ),
            restore_remaining,
            malformed_records: counter(
                "miroir_changelog_malformed_records_total",
                "Records of a changelog topic that are not changelog records (skipped)",
                &["topic"],
            ),
            standby_lag,
            standby_records: counter(
                "miroir_standby_records_total",
                "Changelog records applied to standby replicas",
                &["topic"],
            ),
            promotions,
        }
    }
}

/// Metrics of commands: the processor's (master side) and the client's (app side).
#[derive(Clone)]
pub struct CommandMetrics {
    /// Commands processed, by command and outcome (`accepted`, `rejected`, `forbidden`,
    /// `deferred`, `expired`, `duplicate`).
    pub processed: IntCounterVec,
    /// Seconds from receipt to the committed reply, by command.
    pub processing_seconds: HistogramVec,
    /// Technical failures retried, by command.
    pub retries: IntCounterVec,
    /// Commands parked in the dead-letter topic, by command.
    pub dead_lettered: IntCounterVec,
    /// Commands re-submitted from the dead-letter topic, by command.
    pub replayed: IntCounterVec,
    /// Replies not sent because the reply topic is gone (its instance stopped), by command.
    pub replies_dropped: IntCounterVec,
    /// Replies not sent because the command's reply-to names a topic that is not a reply
    /// topic, by command.
    pub replies_refused: IntCounterVec,
    /// Transactions aborted after a failure, by command: their commands are read again (with
    /// those of the transaction prepared after one, which built on it).
    pub aborted_transactions: IntCounterVec,
    /// Times a processor started again after losing Kafka, by command.
    pub restarts: IntCounterVec,
    /// Command ids whose answers the processor remembers, by command (a re-delivery gets its
    /// first answer again); updated as transactions commit and old answers are forgotten.
    pub answers_kept: IntGaugeVec,
    /// Entity rows the processor holds in memory, by command: with a state directory, the
    /// rows not saved there yet (the others are read from it); without one, every row.
    pub entity_rows_in_memory: IntGaugeVec,
    /// Commands parked in the dead-letter topic and not resolved by a replay yet, by command
    /// (every instance processing the command reports the whole topic's count).
    pub dead_letters_pending: IntGaugeVec,
    /// Client: seconds from send to reply, by command type.
    pub round_trip_seconds: HistogramVec,
    /// Client: sends that timed out, by command type.
    pub timeouts: IntCounterVec,
    /// Client: replies that arrived after their send timed out (ignored).
    pub late_replies: IntCounter,
}

impl CommandMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> CommandMetrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register_counter(registry, name, help, labels)
        };
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ]),
                &["command"],
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| register_gauges(registry, name, help, &["command"]);
        let late_replies = IntCounter::new(
            "miroir_command_late_replies_total",
            "Replies received after their send timed out (ignored)",
        )
        .expect("valid metric");
        registry
            .register(Box::new(late_replies.clone()))
            .expect("unique metric");
        CommandMetrics {
            processed: counter(
                "miroir_commands_total",
                "Commands processed, by outcome",
                &["command", "outcome"],
            ),
            processing_seconds: histogram(
                "miroir_command_processing_seconds",
                "Time from receipt of a command to its committed reply",
            ),
            retries: counter(
                "miroir_command_retries_total",
                "Technical failures of commands, retried",
                &["command"],
            ),
            dead_lettered: counter(
                "miroir_command_dead_letters_total",
                "Commands parked in the dead-letter topic",
                &["command"],
            ),
            replayed: counter(
                "miroir_command_replayed_total",
                "Commands re-submitted from the dead-letter topic",
                &["command"],
            ),
            replies_dropped: counter(
                "miroir_command_replies_dropped_total",
                "Replies not sent because the reply topic no longer exists",
                &["command"],
            ),
            replies_refused: counter(
                "miroir_command_replies_refused_total",
                "Replies not sent because the reply-to header names a topic that is not a reply topic",
                &["command"],
            ),
            aborted_transactions: counter(
                "miroir_command_aborted_transactions_total",
                "Command transactions aborted after a failure; their commands are read again",
                &["command"],
            ),
            restarts: counter(
                "miroir_command_processor_restarts_total",
                "Times the command processor started again after losing Kafka (the broker down, say)",
                &["command"],
            ),
            answers_kept: gauge(
                "miroir_command_answers_kept",
                "Command ids whose answers the processor remembers",
            ),
            entity_rows_in_memory: gauge(
                "miroir_command_entity_rows_in_memory",
                "Entity rows the command processor holds in memory (the others are in the state directory)",
            ),
            dead_letters_pending: gauge(
                "miroir_command_dead_letters_pending",
                "Commands parked in the dead-letter topic and not resolved by a replay yet",
            ),
            round_trip_seconds: histogram(
                "miroir_command_round_trip_seconds",
                "Client: time from sending a command to its reply",
            ),
            timeouts: counter(
                "miroir_command_timeouts_total",
                "Client: sends that got no reply in time",
                &["command"],
            ),
            late_replies,
        }
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register_counter(&registry, name, help, labels)
        };
        let records_in = counter(
            "miroir_records_in_total",
            "Records read from sources",
            &["source"],
        );
        let late_events = counter(
            "miroir_late_events_total",
            "Late events, by action and business operation (late.per's value)",
            &["source", "action", "operation"],
        );
        let operations_forgotten = counter(
            "miroir_late_operations_forgotten_total",
            "Business operations whose order value a key forgot at late.max_operations",
            &["source"],
        );
        let duplicate_events = counter(
            "miroir_duplicate_events_total",
            "Events already applied (re-delivery or replay)",
            &["source"],
        );
        let malformed_records = counter(
            "miroir_malformed_records_total",
            "Records that could not be decoded",
            &["source"],
        );
        let rows_expired = counter(
            "miroir_rows_expired_total",
            "Rows of stream sources past their retention: deleted, or dropped as they arrived",
            &["source"],
        );
        let epoch_commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "miroir_epoch_commit_seconds",
                "Time to write an epoch commit to RocksDB",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(epoch_commit_seconds.clone()))
            .expect("unique metric");
        let consumer_lag = register_gauges(
            &registry,
            "miroir_consumer_lag",
            "Records not yet applied, by partition",
            &["topic", "partition"],
        );
        let sink_rows = counter(
            "miroir_sink_rows_total",
            "Row changes in the batches applied to external tables, by operation: upsert, delete, rejected (a row the database cannot hold, set aside; a key changed in several batches of one transaction counts once per batch)",
            &["table", "op"],
        );
        let simple_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let sink_batches = simple_counter(
            "miroir_sink_batches_total",
            "Epoch batches applied to the external database",
        );
        let partitions_assigned = simple_counter(
            "miroir_source_partitions_assigned_total",
            "Source partitions assigned to this instance by its consumer group",
        );
        let partitions_revoked = simple_counter(
            "miroir_source_partitions_revoked_total",
            "Source partitions revoked from this instance by its consumer group",
        );
        let sink_retries = simple_counter(
            "miroir_sink_retries_total",
            "Failed attempts to apply a batch to the external database (retried)",
        );
        let records_lost = counter(
            "miroir_records_lost_total",
            "Records deleted by a topic's retention before they were read (the tables miss them), by topic and partition",
            &["topic", "partition"],
        );
        let source_paused = gauge(
            "miroir_source_paused",
            "1 while consumption is paused because the engine is behind (the external database is slow or down, say); the instance stays in its consumer group",
        );
        let sink_up = gauge(
            "miroir_sink_up",
            "1 while the external database accepts writes, 0 while retrying",
        );
        let sink_pending = gauge(
            "miroir_sink_pending_batches",
            "Batches committed locally, not yet confirmed by the external database",
        );
        let sink_commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "miroir_sink_commit_seconds",
                "Time to apply one batch to the external database (without waiting for the epoch's local commit)",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(sink_commit_seconds.clone()))
            .expect("unique metric");
        let commands = CommandMetrics::register(&registry);
        let changelog = ChangelogMetrics::register(&registry);
        Metrics {
            commands,
            changelog,
            registry,
            sink_rows,
            sink_batches,
            sink_retries,
            sink_up,
            sink_pending,
            sink_commit_seconds,
            records_in,
            late_events,
            operations_forgotten,
            duplicate_events,
            malformed_records,
            rows_expired,
            epoch_commit_seconds,
            consumer_lag,
            source_paused,
            partitions_assigned,
            partitions_revoked,
            records_lost,
        }
    }

    /// Renders every metric in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        let _ = encoder.encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A business operation as the `operation` label of `miroir_late_events_total`: its text,
/// empty without `late.per`.
pub fn operation_label(operation: &crate::value::Value) -> String {
    use crate::value::Value;
    match operation {
        Value::Null => String::new(),
        Value::Text(text) => text.to_string(),
        other => other.to_key_text(),
    }
}
