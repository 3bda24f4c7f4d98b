//! Rows PostgreSQL cannot hold do not stop the instance: a NUL in a text, a timestamp outside
//! its range, and rows a constraint refuses are
//! set aside in `miroir.rejects`, counted and left out of the external table (with the key's
//! earlier row), while the internal table keeps them and everything else goes on. A later
//! good version of a key comes back; a restart keeps it all. A timestamp no calendar names
//! (it once overflowed the conversion) is a malformed record.
//!
//! Poison records on a source (lone surrogates, bytes that are not UTF-8, numbers and
//! timestamps out of range, a 10 MB payload, records without a key) are counted and copied to
//! the errors topic, a copy too large for it without its payload; the other records, a valid
//! 10 MB one and one with an ignored field nested 5,000 deep included, are applied.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use miroir::Engine;
use miroir_connectors::commands::wire::text_header;
use miroir_connectors::kafka::admin::{create_topic, create_topic_with};
use miroir_connectors::kafka::output::{header as error_header, ERRORS_SUFFIX};
use miroir_connectors::kafka::tail::Tail;
use miroir_connectors::kafka::KafkaConfig;
use serde_json::json;
use support::*;

fn topology(run: &str, schema: &str) -> String {
    format!(
        r#"
name = "it-{run}"
[sources.users]
topic = "users-{run}"
key = "id"
columns = {{ id = "text", name = "text", born = "timestamptz", version = "bigint" }}
late = {{ order_by = "version" }}

[tables.people]
query = "SELECT id, name, born FROM users"
store = "internal"

[tables.people_pg]
query = "SELECT id, name, born FROM users"
sink = {{ postgres = {{ table = "{schema}.people" }} }}
"#
    )
}

/// A user event; `born` in epoch milliseconds.
fn user(id: &str, version: i64, name: &str, born: i64) -> Event {
    Event {
        source: 0,
        key: id.into(),
        payload: Some(
            json!({ "id": id, "name": name, "born": born, "version": version }).to_string(),
        ),
    }
}

/// Waits until the internal table equals the reference over `events`, and the external one
/// the same without the keys in `left_out`.
fn wait_for_reference(
    engine: &Engine,
    db: &mut postgres::Client,
    events: &[Event],
    left_out: &[&str],
) {
    let mut expected = expected_tables(engine.topology(), events);
    let external = expected.get_mut("people_pg").unwrap();
    for key in left_out {
        assert!(external.remove(*key).is_some(), "{key} is in the reference");
    }
    wait_for_tables(&expected, Duration::from_secs(60), |name| {
        table_rows(engine, db, name)
    });
}

/// `miroir.rejects` for the schema: key -> (column, SQLSTATE).
fn rejects(
    db: &mut postgres::Client,
    schema: &str,
) -> BTreeMap<String, (Option<String>, Option<String>)> {
    db.query(
        "SELECT key, column_name, sqlstate FROM miroir.rejects WHERE schema_name = $1",
        &[&schema],
    )
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect()
}

const BORN: i64 = 631_152_000_000; // 1990-01-01

#[test]
fn rows_postgres_cannot_hold_are_set_aside_and_the_rest_goes_on() {
    let run = Run::new("poison");
    let schema = format!("it_{}", run.replace('-', "_"));
    let text = topology(&run, &schema);
    let topic = format!("users-{run}");
    create_topic(&KafkaConfig::new(brokers()), &topic, 2).unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut db = pg();

    let mut events = vec![
        user("u1", 1, "Ann", BORN),
        user("u2", 1, "a\u{0}b", BORN),
        user("u3", 1, "Cid", -377_705_116_800_000), // 10,000 BC: before PostgreSQL's range
        user("u4", 1, "Dan", -9_223_372_036_854_775), // no date: malformed, in no table
        user("u5", 1, "Eve", BORN),
        user("u6", 1, "Fay", BORN),
    ];
    publish_to(&topic, &events);
    let engine = start_engine(&text, state.path());
    wait_for_reference(&engine, &mut db, &events, &["u2", "u3"]);
    let malformed = counter(&engine.metrics(), "miroir_malformed_records_total", "");
    assert_eq!(malformed, 1, "u4");
    assert!(
        engine.wait_ready(Duration::from_secs(30)),
        "{:?}",
        engine.status()
    );

    // What the database refuses itself: a check constraint added behind miroir's back.
    db.batch_execute(&format!(
        "ALTER TABLE {schema}.people ADD CONSTRAINT no_forbidden CHECK (name <> 'forbidden')"
    ))
    .unwrap();
    let more = vec![
        user("u1", 2, "Ann\u{0}", BORN), // its earlier row leaves the table too
        user("u2", 2, "Bea", BORN),      // fixed: back in the table
        user("u5", 2, "forbidden", BORN),
        user("u7", 1, "forbidden", BORN),
        Event {
            source: 0,
            key: "u6".into(),
            payload: None,
        },
        user("u8", 1, "Zed", BORN),
    ];
    publish_to(&topic, &more);
    events.extend(more);
    let left_out = ["u1", "u3", "u5", "u7"];
    wait_for_reference(&engine, &mut db, &events, &left_out);
    assert!(
        engine.wait_ready(Duration::from_secs(30)),
        "{:?}",
        engine.status()
    );

    let set_aside = rejects(&mut db, &schema);
    let expected: BTreeMap<String, (Option<String>, Option<String>)> = [
        ("u1", Some("name"), None),
        ("u3", Some("born"), None),
        ("u5", None, Some("23514")),
        ("u7", None, Some("23514")),
    ]
    .into_iter()
    .map(|(k, c, s)| {
        (
            json!([k]).to_string(),
            (c.map(str::to_string), s.map(str::to_string)),
        )
    })
    .collect();
    assert_eq!(set_aside, expected, "u2 left miroir.rejects when fixed");
    let metrics = engine.metrics();
    let rejected = counter(&metrics, "miroir_sink_rows_total", "op=\"rejected\"");
    assert_eq!(
        rejected, 5,
        "u1, u2, u3, u5, u7 each refused once\n{metrics}"
    );
    engine.shutdown();

    // A start replaces the external table by the restored state: the same rows are left out
    // and set aside, once each.
    let engine = start_engine(&text, state.path());
    wait_for_reference(&engine, &mut db, &events, &left_out);
    assert!(
        engine.wait_ready(Duration::from_secs(30)),
        "{:?}",
        engine.status()
    );
    assert_eq!(rejects(&mut db, &schema), expected);
    engine.shutdown();
    db.batch_execute(&format!(
        "DROP SCHEMA {schema} CASCADE; DELETE FROM miroir.rejects WHERE schema_name = '{schema}'"
    ))
    .unwrap();
}

/// A record as published: its Kafka key and payload.
type Raw = (Option<String>, Option<Vec<u8>>);

/// `n` bytes of text for a payload.
fn filler(n: usize) -> String {
    "x".repeat(n)
}

#[test]
fn poison_records_are_counted_and_set_aside_and_the_rest_goes_on() {
    let run = Run::new("poison-in");
    let schema = format!("it_{}", run.replace('-', "_"));
    let text = topology(&run, &schema);
    let topic = format!("users-{run}");
    let config = KafkaConfig::new(brokers());
    let big = ("max.message.bytes", "12582912");
    create_topic_with(&config, &topic, 2, &[big]).unwrap();
    let state = tempfile::tempdir().unwrap();

    let good = |id: &str, version: i64| user(id, version, &format!("User {id}"), BORN);
    let raw = |key: Option<&str>, payload: Vec<u8>| (key.map(str::to_string), Some(payload));
    let nested = format!(
        "{{\"id\":\"p9\",\"deep\":{}1{},\"version\":1}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    // (Kafka key, payload), and whether the record is malformed.
    let records: Vec<(Raw, bool)> = vec![
        (
            raw(Some("g1"), good("g1", 1).payload.unwrap().into_bytes()),
            false,
        ),
        (
            raw(
                Some("p1"),
                br#"{"id":"p1","name":"\ud800","version":1}"#.to_vec(),
            ),
            true,
        ),
        (
            raw(
                Some("p2"),
                b"{\"id\":\"p2\",\"name\":\"\xff\xfe\",\"version\":1}".to_vec(),
            ),
            true,
        ),
        (
            raw(Some("p3"), br#"{"id":"p3","version":1e400}"#.to_vec()),
            true,
        ),
        (
            raw(
                Some("p4"),
                br#"{"id":"p4","version":18446744073709551616}"#.to_vec(),
            ),
            true,
        ),
        (
            raw(
                Some("p5"),
                br#"{"id":"p5","born":"+275760-09-13T00:00:00Z","version":1}"#.to_vec(),
            ),
            true,
        ),
        (
            raw(
                Some("p6"),
                format!("{{\"id\":\"p6\",\"name\":\"{}", filler(10 << 20)).into_bytes(),
            ),
            true,
        ),
        (
            raw(
                Some("p7"),
                format!(
                    "{{\"id\":\"p7\",\"name\":\"{}\",\"version\":1}}",
                    filler(10 << 20)
                )
                .into_bytes(),
            ),
            false,
        ),
        (
            raw(None, good("p8", 1).payload.unwrap().into_bytes()),
            false,
        ),
        ((None, None), true),
        // An ignored field is skipped whatever its depth.
        (raw(Some("p9"), nested.into_bytes()), false),
        (
            raw(Some("g2"), good("g2", 1).payload.unwrap().into_bytes()),
            false,
        ),
    ];
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.max.bytes", "12582912")
        .create()
        .unwrap();
    for ((key, payload), _) in &records {
        let mut record = rdkafka::producer::BaseRecord::<str, [u8]>::to(&topic).partition(0);
        if let Some(k) = key {
            record = record.key(k.as_str());
        }
        if let Some(p) = payload {
            record = record.payload(p.as_slice());
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).unwrap();
    }

    // The reference reads the same records (a record without a key stands for its
    // payload's).
    let events: Vec<Event> = records
        .iter()
        .filter_map(|((key, payload), _)| {
            let payload = String::from_utf8(payload.clone()?).ok()?;
            let id = serde_json::from_str::<serde_json::Value>(&payload)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string));
            Some(Event {
                source: 0,
                key: key.clone().or(id)?,
                payload: Some(payload),
            })
        })
        .collect();
    let engine = start_engine(&text, state.path());
    let mut db = pg();
    wait_for_reference(&engine, &mut db, &events, &[]);
    assert!(
        engine.wait_ready(Duration::from_secs(60)),
        "{:?}",
        engine.status()
    );
    for key in ["g1", "g2", "p7", "p8", "p9"] {
        assert!(engine.get("people", key).unwrap().is_some(), "{key}");
    }
    let malformed = records.iter().filter(|(_, bad)| *bad).count() as u64;
    let counted = counter(&engine.metrics(), "miroir_malformed_records_total", "");
    assert_eq!(counted, malformed);

    // Every malformed record is in the errors topic (the one too large for it without its
    // payload, saying so).
    let mut copies = Tail::open(&config, &format!("{topic}{ERRORS_SUFFIX}")).unwrap();
    let mut seen = Vec::new();
    assert!(copies
        .catch_up(Duration::from_secs(30), |m| {
            let offset = text_header(m, error_header::SOURCE_OFFSET).unwrap();
            let trimmed = text_header(m, error_header::COPY).is_some();
            seen.push((offset.parse::<i64>().unwrap(), trimmed));
            Ok(())
        })
        .unwrap());
    seen.sort();
    let expected: Vec<(i64, bool)> = records
        .iter()
        .enumerate()
        .filter(|(_, (_, bad))| *bad)
        .map(|(i, _)| (i as i64, i == 6))
        .collect();
    assert_eq!(seen, expected, "(offset, sent without its payload)");
    assert_eq!(engine.failure(), None);
    engine.shutdown();
    db.batch_execute(&format!(
        "DROP SCHEMA {schema} CASCADE; DELETE FROM miroir.rejects WHERE schema_name = '{schema}'"
    ))
    .unwrap();
}
