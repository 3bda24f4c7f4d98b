//! End to end on a real Kafka broker: generated entity events (late, duplicated, deleted and
//! malformed ones included) are materialized by an embedded engine with 2 workers, and every
//! table is compared row by row with the reference evaluator; then a graceful restart resumes
//! from the committed state without reading anything twice.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use miroir::Engine;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use support::*;

/// A table's rows: from the engine for internal tables, from PostgreSQL for external ones.
fn table_contents(
    engine: &Engine,
    db: &mut postgres::Client,
    table: &str,
) -> BTreeMap<String, serde_json::Value> {
    let plan = engine.topology().table(table).unwrap();
    if plan.postgres().is_some() {
        return pg_table(db, engine.topology(), table).unwrap_or_default();
    }
    engine
        .scan(table, "", 1_000_000)
        .unwrap()
        .into_iter()
        .map(|row| (json_key(&row, plan), row))
        .collect()
}

fn start(t: &TestTopology, state: &std::path::Path, listen: bool) -> Engine {
    let mut builder = Engine::builder()
        .topology_str(t.text.clone())
        .brokers(brokers())
        .state_dir(state)
        .workers(2)
        .epoch_interval(Duration::from_millis(50));
    if listen {
        builder = builder.listen("127.0.0.1:0".parse().unwrap());
    }
    builder.start().unwrap()
}

/// The records read from the declared sources (the stages' repartition topics are sources
/// too, counted under their own names).
fn source_records(metrics: &str) -> u64 {
    ["users", "departments"]
        .iter()
        .map(|s| {
            counter(
                metrics,
                "miroir_records_in_total",
                &format!("source=\"{s}\""),
            )
        })
        .sum()
}

#[test]
fn tables_match_the_reference_and_survive_a_graceful_restart() {
    let run = Run::new("mat");
    let t = user_directory(&run);
    let (events, _) = generate(7, 300, 4000);
    let (first, second) = events.split_at(events.len() / 2);
    let (_, first_counts) = {
        // Counts of the first half alone, for exact metric checks.
        let malformed = first.iter().filter(|e| is_malformed(&t, e)).count();
        ((), malformed)
    };
    publish(&t, first);
    let state = tempfile::tempdir().unwrap();

    let engine = start(&t, state.path(), true);
    let mut db = pg();
    let expected = expected_tables(&t.topology, first);
    assert!(
        expected["user_contacts"].len() > 100,
        "the generator should produce a sizeable table"
    );
    wait_for_tables(&expected, Duration::from_secs(90), |name| {
        table_contents(&engine, &mut db, name)
    });

    let metrics = engine.metrics();
    // Every late event dropped, counted under its business operation, as the reference
    // evaluator drops them.
    let late = replay(&t.topology, first).late;
    assert!(
        late.len() > 1,
        "late events of several operations: {late:?}"
    );
    for ((source, operation), n) in &late {
        let labels = [
            format!("source=\"{source}\""),
            format!("operation=\"{operation}\""),
            "action=\"dropped\"".to_string(),
        ];
        let counted: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("miroir_late_events_total"))
            .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(counted as u64, *n, "{source} {operation}: {metrics}");
    }
    assert!(
        counter(&metrics, "miroir_duplicate_events_total", "") > 0,
        "{metrics}"
    );
    assert_eq!(
        counter(
            &metrics,
            "miroir_malformed_records_total",
            "source=\"users\""
        ),
        first_counts as u64,
        "{metrics}"
    );
    assert_eq!(source_records(&metrics), first.len() as u64);
    check_http(&engine, &expected);
    check_error_topic(&t, first_counts);
    engine.shutdown();

    // Graceful restart: only the new events are read, and the tables catch up exactly.
    publish(&t, second);
    let engine = start(&t, state.path(), false);
    let expected = expected_tables(&t.topology, &events);
    wait_for_tables(&expected, Duration::from_secs(90), |name| {
        table_contents(&engine, &mut db, name)
    });
    let metrics = engine.metrics();
    assert_eq!(
        source_records(&metrics),
        second.len() as u64,
        "a restart must resume after the committed offsets, not re-read"
    );
    engine.shutdown();
}

fn is_malformed(t: &TestTopology, e: &Event) -> bool {
    match &e.payload {
        None => false,
        Some(p) => {
            match miroir::miroir_engine::ingest::decode::decode(
                &t.topology.sources[e.source],
                p.as_bytes(),
            ) {
                Err(_) => true,
                Ok(row) => row[t.topology.sources[e.source].key].to_key_text() != e.key,
            }
        }
    }
}

fn check_http(engine: &Engine, expected: &BTreeMap<String, BTreeMap<String, serde_json::Value>>) {
    let base = format!("http://{}", engine.http_addr().unwrap());
    let client = reqwest::blocking::Client::new();
    let get = |path: &str| client.get(format!("{base}{path}")).send().unwrap();

    assert_eq!(get("/health").status(), 200);
    // Readiness follows the watermarks, refreshed every second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get("/ready").status() != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {}",
            get("/ready").text().unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (key, row) = expected["user_contacts"].iter().next().unwrap();
    let answer: serde_json::Value = get(&format!("/v1/tables/user_contacts/rows/{key}"))
        .json()
        .unwrap();
    assert_eq!(&answer["row"], row);
    let partition = answer["partition"]
        .as_u64()
        .expect("a source-keyed table reports its partition");
    assert_eq!(
        partition as u32,
        miroir::miroir_engine::partition::partition_for_key(key.as_bytes(), 4),
        "the reported partition is Kafka's murmur2 partition"
    );
    assert_eq!(answer["freshness"]["stale"], false);

    assert_eq!(
        get("/v1/tables/user_contacts/rows/no-such-user").status(),
        404
    );
    assert_eq!(get("/v1/tables/no_such_table/rows/x").status(), 404);
    assert_eq!(
        get("/v1/tables/user_contacts/rows?limit=zero").status(),
        400
    );
    let external = get("/v1/tables/user_directory/rows/u-1");
    assert_eq!(external.status(), 404);
    assert!(
        external.text().unwrap().contains("is external"),
        "a query of an external table says where the table is"
    );
    let scan: serde_json::Value = get("/v1/tables/user_contacts/rows?prefix=u-1&limit=5")
        .json()
        .unwrap();
    let rows = scan["rows"].as_array().unwrap();
    assert!(!rows.is_empty() && rows.len() <= 5);
    assert!(rows
        .iter()
        .all(|r| r["id"].as_str().unwrap().starts_with("u-1")));
    let metrics = get("/metrics").text().unwrap();
    assert!(
        metrics.contains("miroir_late_events_total")
            && metrics.contains("miroir_epoch_commit_seconds")
    );
    assert_eq!(counter(&metrics, "miroir_sink_up", ""), 1, "{metrics}");
    assert!(
        counter(&metrics, "miroir_sink_batches_total", "") > 0,
        "{metrics}"
    );
    let topology: serde_json::Value = get("/v1/topology").json().unwrap();
    assert_eq!(topology["tables"].as_array().unwrap().len(), 5);
    assert_eq!(topology["tables"][0]["store"], "internal");
    assert!(topology["tables"][1]["store"]["postgres"]
        .as_str()
        .unwrap()
        .ends_with(".user_directory"));
}

fn check_error_topic(t: &TestTopology, expected: usize) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("errors"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer
        .subscribe(&[&format!("{}.miroir-errors", t.user_topic)])
        .unwrap();
    let mut seen = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen < expected && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m.headers().expect("malformed copies carry headers");
            let names: Vec<&str> = headers.iter().map(|h| h.key).collect();
            assert!(
                names.contains(&"miroir.error") && names.contains(&"miroir.source.offset"),
                "{names:?}"
            );
            seen += 1;
        }
    }
    consumer.unsubscribe();
    assert_eq!(
        seen, expected,
        "every malformed record is copied to the error topic"
    );
}
