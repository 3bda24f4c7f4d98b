//! Rows PostgreSQL cannot hold do not stop the instance: a NUL in a text, a timestamp outside
//! its range, and rows a constraint refuses are
//! set aside in `miroir.rejects`, counted and left out of the external table (with the key's
//! earlier row), while the internal table keeps them and everything else goes on. A later
//! good version of a key comes back; a restart keeps it all. A timestamp no calendar names
//! (it once overflowed the conversion) is a malformed record.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use miroir::Engine;
use miroir_connectors::kafka::admin::create_topic;
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
