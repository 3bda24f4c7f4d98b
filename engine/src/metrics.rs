//! Prometheus metrics of an instance.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

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
    /// Malformed records, by source.
    pub malformed_records: IntCounterVec,
    /// Seconds to write an epoch commit.
    pub epoch_commit_seconds: Histogram,
    /// Consumer lag (high watermark minus next offset to read), by topic and partition.
    pub consumer_lag: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let records_in = counter(
            "miroir_records_in_total",
            "Records read from sources",
            &["source"],
        );
        let late_events = counter(
            "miroir_late_events_total",
            "Late events, by action",
            &["source", "action"],
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
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "miroir_consumer_lag",
                "Records not yet applied, by partition",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(consumer_lag.clone()))
            .expect("unique metric");
        Metrics {
            registry,
            records_in,
            late_events,
            duplicate_events,
            malformed_records,
            epoch_commit_seconds,
            consumer_lag,
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
