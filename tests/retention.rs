//! Records a topic's retention deleted before the instance read them: the instance resumes at
//! the first record there is, counts the records lost in `miroir_records_lost_total` and logs
//! the range, instead of skipping them silently. Its tables hold what it read before and what
//! is left after.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{Offset, TopicPartitionList};
use support::*;

fn topology(run: &str) -> String {
    format!(
        r#"
name = "it-{run}"
[sources.users]
topic = "users-{run}"
key = "id"
columns = {{ id = "text", name = "text", version = "bigint" }}
late = {{ order_by = "version" }}

[tables.names]
query = "SELECT id, name FROM users"
store = "internal"
"#
    )
}

fn users(range: std::ops::Range<usize>) -> Vec<Event> {
    range
        .map(|i| Event {
            source: 0,
            key: format!("k{i}"),
            payload: Some(format!(r#"{{"id":"k{i}","name":"User {i}","version":1}}"#)),
        })
        .collect()
}

/// Deletes the records of partition 0 of `topic` before `offset`, as retention would.
fn delete_before(topic: &str, offset: i64) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt
        .block_on(admin.delete_records(&tpl, &AdminOptions::new()))
        .unwrap();
    for e in result.elements() {
        assert!(e.error().is_ok(), "{:?}", e.error());
    }
}

#[test]
fn records_deleted_before_they_were_read_are_counted_not_skipped_silently() {
    let run = Run::new("retention");
    let text = topology(&run);
    let topic = format!("users-{run}");
    create_topic(&KafkaConfig::new(brokers()), &topic, 1).unwrap();
    let state = tempfile::tempdir().unwrap();
    let read = users(0..10);
    publish_to(&topic, &read);
    let engine = start_engine(&text, state.path());
    let t = engine.topology().clone();
    let expected = |events: &[Event]| -> BTreeMap<String, BTreeMap<String, serde_json::Value>> {
        expected_tables(&t, events)
    };
    wait_for_tables(&expected(&read), Duration::from_secs(60), |name| {
        internal_rows(&engine, name)
    });
    engine.shutdown();

    // Offsets 10..19 are written while the instance is down; 10..14 are deleted.
    let missed = users(10..20);
    publish_to(&topic, &missed);
    delete_before(&topic, 15);
    let engine = start_engine(&text, state.path());
    let kept: Vec<Event> = read.iter().chain(&missed[5..]).cloned().collect();
    wait_for_tables(&expected(&kept), Duration::from_secs(60), |name| {
        internal_rows(&engine, name)
    });
    let lost = counter(&engine.metrics(), "miroir_records_lost_total", "");
    assert_eq!(lost, 5, "offsets 10 to 14");
    engine.shutdown();
}
