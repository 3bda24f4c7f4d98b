//! History tables on a real broker and PostgreSQL: the User events of
//! `topologies/user-directory.toml` are also read by the stream source `user_events`, whose
//! every event is a row; `email_history` (RocksDB) and `email_history_sql` (PostgreSQL) equal
//! the reference evaluator after email changes by several principals with late, duplicated,
//! deleted, malformed and expired events, and one user's history is served by prefix, newest
//! or oldest first, page by page.

mod support;

use std::time::Duration;

use miroir::miroir_engine::topology::Topology;
use miroir::miroir_engine::value::{format_timestamp, timestamp_from_millis};
use miroir::Engine;
use support::*;

const DAY_MS: i64 = 86_400_000;

/// The time `days_ago` days before now, as the events write it.
fn days_ago(days_ago: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    format_timestamp(timestamp_from_millis(now - days_ago * DAY_MS).unwrap())
}

/// An event of user `id` at `version`, by `operation` of `who`, `days` days ago.
fn user(id: &str, version: i64, (operation, who): (&str, &str), email: &str, days: i64) -> Event {
    let payload = serde_json::json!({
        "id": id, "email": email, "name": format!("User {id}"), "department_id": null,
        "active": true, "version": version, "event_type": operation,
        "updated_at": days_ago(days), "changed_by": who,
    });
    Event {
        source: 0,
        key: id.to_string(),
        payload: Some(payload.to_string()),
    }
}

/// Email changes of three users by several principals, with a late event, a copy, a rename
/// (no email change), a delete, a malformed event and an event older than the retention.
fn history_events() -> Vec<Event> {
    let bob_v2 = user("u-1", 2, ("email-changed", "bob"), "b@example.com", 9);
    vec![
        user("u-1", 1, ("created", "alice"), "a@example.com", 10),
        bob_v2.clone(),
        user("u-1", 4, ("UpdateUserEmail", "carol"), "c@example.com", 7),
        // Late for the user's row (the email stays c@, written at version 4): a row of the
        // history all the same.
        user("u-1", 3, ("email-changed", "bob"), "b3@example.com", 8),
        bob_v2,
        user("u-1", 5, ("renamed", "dave"), "c@example.com", 6),
        user("u-2", 1, ("created", "alice"), "old@example.com", 500),
        user("u-2", 2, ("email-changed", "alice"), "new@example.com", 2),
        Event {
            source: 0,
            key: "u-2".into(),
            payload: None,
        },
        Event {
            source: 0,
            key: "u-2".into(),
            payload: Some(r#"{"id": "u-2", "version": "three"}"#.into()),
        },
        user("u-10", 1, ("created", "carol"), "ten@example.com", 1),
    ]
}

#[test]
fn email_history_is_exact_over_http_and_in_postgresql() {
    let run = Run::new("history");
    let t = user_directory(&run);
    let events = history_events();
    publish(&t, &events);
    let expected = expected_tables(&t.topology, &events);
    let history = &expected["email_history"];
    let keys: Vec<&str> = history.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["u-10|1", "u-1|1", "u-1|2", "u-1|3", "u-1|4", "u-2|2"],
        "the reference keeps the late event, drops the rename and the expired event, and \
         keeps u-2's history past its delete"
    );
    assert_eq!(history["u-1|4"]["changed_by"], "carol");
    assert_eq!(history["u-1|4"]["operation"], "UpdateUserEmail");
    assert_eq!(expected["email_history_sql"], *history);

    let state = tempfile::tempdir().unwrap();
    let engine = Engine::builder()
        .topology_str(t.text.clone())
        .brokers(brokers())
        .state_dir(state.path())
        .workers(2)
        .epoch_interval(Duration::from_millis(50))
        .listen("127.0.0.1:0".parse().unwrap())
        .start()
        .unwrap();
    let mut db = pg();
    wait_for_tables(&expected, Duration::from_secs(90), |name| {
        table_rows(&engine, &mut db, name)
    });
    let metrics = engine.metrics();
    assert_eq!(
        counter(
            &metrics,
            "miroir_rows_expired_total",
            "source=\"user_events\""
        ),
        1,
        "{metrics}"
    );
    assert_eq!(
        counter(
            &metrics,
            "miroir_malformed_records_total",
            "source=\"user_events\""
        ),
        1,
        "{metrics}"
    );

    let base = format!("http://{}", engine.http_addr().unwrap());
    let client = reqwest::blocking::Client::new();
    let scan = |query: &[(&str, &str)]| -> serde_json::Value {
        let answer = client
            .get(format!("{base}/v1/tables/email_history/rows"))
            .query(query)
            .send()
            .unwrap();
        assert_eq!(answer.status(), 200);
        answer.json().unwrap()
    };
    let versions = |page: &serde_json::Value| -> Vec<i64> {
        let rows = page["rows"].as_array().unwrap();
        assert!(rows.iter().all(|r| r["id"] == "u-1"), "{page}");
        rows.iter()
            .map(|r| r["version"].as_i64().unwrap())
            .collect()
    };
    let newest = scan(&[("prefix", "u-1|"), ("order", "desc"), ("limit", "3")]);
    assert_eq!(versions(&newest), [4, 3, 2]);
    let next = newest["next"].as_str().expect("a next page");
    let rest = scan(&[("prefix", "u-1|"), ("order", "desc"), ("after", next)]);
    assert_eq!(versions(&rest), [1]);
    assert!(rest["next"].is_null());
    let oldest = scan(&[("prefix", "u-1|")]);
    assert_eq!(versions(&oldest), [1, 2, 3, 4], "key order, u-10 left out");
    let key =
        |r: &serde_json::Value| (r["id"].as_str().unwrap().to_string(), r["version"].as_i64());
    let all: Vec<_> = scan(&[("order", "desc")])["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(key)
        .collect();
    let mut newest_first: Vec<_> = history.values().map(key).collect();
    newest_first.sort();
    newest_first.reverse();
    assert_eq!(all, newest_first, "every row, in reverse key order");
    let topology: serde_json::Value = client
        .get(format!("{base}/v1/topology"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let events = &topology["sources"][2];
    assert_eq!(
        (&events["name"], &events["kind"], &events["row_key"]),
        (
            &serde_json::json!("user_events"),
            &serde_json::json!("stream"),
            &serde_json::json!(["id", "version"])
        )
    );
    let bad = client
        .get(format!("{base}/v1/tables/email_history/rows?order=newest"))
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
    engine.shutdown();
}

#[test]
fn a_history_added_to_a_deployed_topology_holds_the_events_read_before() {
    let run = Run::new("history-added");
    let full = user_directory(&run);
    let before = with_internal_table_only(full.clone());
    let with_history = with_history_only(full);
    let (after_text, after) = (with_history.text, with_history.topology);
    assert!(
        after.repartitions.is_empty(),
        "the stream source is a source the state directory never had"
    );
    let (events, _) = generate(31, 50, 600);
    let (first, second) = events.split_at(events.len() / 2);
    publish(&before, first);
    let state = tempfile::tempdir().unwrap();
    let engine = start_engine(&before.text, state.path());
    let expected = expected_tables(&before.topology, first);
    wait_for_tables(&expected, Duration::from_secs(90), |name| {
        internal_rows(&engine, name)
    });
    engine.shutdown();

    // The history starts with the events read before it was declared.
    publish(&before, second);
    let engine = start_engine(&after_text, state.path());
    let expected = expected_tables(&after, &events);
    assert!(expected["email_history"].len() > 300);
    wait_for_tables(&expected, Duration::from_secs(90), |name| {
        internal_rows(&engine, name)
    });
    engine.shutdown();
}

#[test]
fn a_history_kept_to_a_number_of_rows_per_user_keeps_the_newest() {
    let run = Run::new("history-rows");
    let mut t = with_history_only(user_directory(&run));
    let age = "retain = \"400d\"\nretain_by = \"updated_at\"";
    assert!(t.text.contains(age), "the history's retention moved");
    t.text = t.text.replace(age, "retain = 2");
    t.topology = Topology::parse("t.toml", &t.text).unwrap();
    let (events, _) = generate(41, 30, 800);
    let events: Vec<Event> = history_events().into_iter().chain(events).collect();
    publish(&t, &events);
    let expected = expected_tables(&t.topology, &events);
    let history = expected["email_history"].len();
    assert!(history > 30 && history <= 2 * 33, "{history} rows");
    let state = tempfile::tempdir().unwrap();
    let engine = start_engine(&t.text, state.path());
    wait_for_tables(&expected, Duration::from_secs(90), |name| {
        internal_rows(&engine, name)
    });
    let metrics = engine.metrics();
    let expired = counter(
        &metrics,
        "miroir_rows_expired_total",
        "source=\"user_events\"",
    );
    assert!(expired > 100, "{metrics}");
    engine.shutdown();
}

/// `t` with its internal tables only: `user_contacts` and the history `email_history`.
fn with_history_only(t: TestTopology) -> TestTopology {
    let from = t.text.find("\n# Every User event again").unwrap();
    let to = t.text.find("\n# The same history in PostgreSQL").unwrap();
    let history = t.text[from..to].to_string();
    let mut t = with_internal_table_only(t);
    t.text.push_str(&history);
    t.topology = Topology::parse("t.toml", &t.text).unwrap();
    t
}
