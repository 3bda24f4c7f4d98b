//! Table keys that once read alike are distinct rows, internal and in PostgreSQL: two
//! composite keys with `|` inside a part, and a NULL group beside an empty-text group. The
//! NULL group is created, deleted and kept through a restart (the snapshot that replaces the
//! external table at a start must not drop it).

mod support;

use std::time::Duration;

use miroir::Engine;
use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::KafkaConfig;
use support::*;

fn topology(run: &str, schema: &str) -> String {
    format!(
        r#"
name = "it-{run}"
[sources.users]
topic = "users-{run}"
key = "id"
columns = {{ id = "text", a = "text", b = "text", version = "bigint" }}
late = {{ order_by = "version" }}

[tables.pairs]
query = "SELECT a, b, count(*) AS n FROM users GROUP BY a, b"
store = "internal"

[tables.pairs_pg]
query = "SELECT a, b, count(*) AS n FROM users GROUP BY a, b"
sink = {{ postgres = {{ table = "{schema}.pairs" }} }}
"#
    )
}

fn user(id: &str, a: Option<&str>, b: &str) -> Event {
    Event {
        source: 0,
        key: id.into(),
        payload: Some(serde_json::json!({ "id": id, "a": a, "b": b, "version": 1 }).to_string()),
    }
}

/// Waits until both tables equal the reference over `events`.
fn wait_for_reference(engine: &Engine, db: &mut postgres::Client, events: &[Event]) {
    let t = engine.topology();
    let expected = expected_tables(t, events);
    let groups = &expected["pairs"];
    assert_eq!(expected["pairs_pg"], *groups, "one query, one reference");
    wait_for_tables(&expected, Duration::from_secs(60), |name| {
        table_rows(engine, db, name)
    });
}

#[test]
fn keys_that_read_alike_are_distinct_rows_internal_and_external() {
    let run = Run::new("keys");
    let schema = format!("it_{}", run.replace('-', "_"));
    let text = topology(&run, &schema);
    let topic = format!("users-{run}");
    create_topic(&KafkaConfig::new(brokers()), &topic, 4).unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut db = pg();
    let mut events = vec![
        user("u1", Some("a|b"), "c"),
        user("u2", Some("a"), "b|c"),
        user("u3", None, "x"),
        user("u4", Some(""), "x"),
        user("u5", Some(""), "x"),
    ];
    publish_to(&topic, &events);
    let engine = start_engine(&text, state.path());
    wait_for_reference(&engine, &mut db, &events);
    let groups = expected_tables(engine.topology(), &events)["pairs"].len();
    assert_eq!(groups, 4, "four groups, none merged");
    let null_group = engine
        .get("pairs", "\\N|x")
        .unwrap()
        .expect("the NULL group");
    assert_eq!(null_group.row["n"], 1);
    let empty_group = engine.get("pairs", "|x").unwrap().expect("the empty group");
    assert_eq!(empty_group.row["n"], 2);

    // The NULL group goes (its delete matches NULL to NULL), another comes.
    let more = vec![
        Event {
            source: 0,
            key: "u3".into(),
            payload: None,
        },
        user("u6", None, "y"),
    ];
    publish_to(&topic, &more);
    events.extend(more);
    wait_for_reference(&engine, &mut db, &events);
    engine.shutdown();

    // A start replaces the external table by the restored state: the NULL group stays.
    let later = vec![user("u7", None, "y")];
    publish_to(&topic, &later);
    events.extend(later);
    let engine = start_engine(&text, state.path());
    wait_for_reference(&engine, &mut db, &events);
    engine.shutdown();
    db.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}
