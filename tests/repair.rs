//! A key frozen by an event whose order value is far too large (every later event is late)
//! is repaired with `miroir forget-key` on the stopped instance: the next event of the key
//! applies again, and nothing else changes.

mod support;

use std::time::Duration;

use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::KafkaConfig;
use support::*;

fn user(id: &str, name: &str, version: i64) -> Event {
    Event {
        source: 0,
        key: id.into(),
        payload: Some(format!(
            r#"{{"id":"{id}","name":"{name}","version":{version}}}"#
        )),
    }
}

/// The name of `id`, once the engine answers (it says to ask again while it reads its
/// partitions after a start).
fn name_of(engine: &miroir::Engine, id: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match engine.get("names", id) {
            Ok(answer) => return answer.map(|a| a.row["name"].as_str().unwrap().to_string()),
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_key_frozen_by_a_huge_order_value_is_repaired_by_forgetting_it() {
    let run = Run::new("repair");
    let text = format!(
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
    );
    let topic = format!("users-{run}");
    create_topic(&KafkaConfig::new(brokers()), &topic, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(&file, &text).unwrap();
    let state = dir.path().join("state");
    publish_to(
        &topic,
        &[
            user("k1", "one", 1),
            user("k2", "two", 1),
            user("k1", "typo", 9_000_000_000_000_000_000),
            user("k1", "fixed", 2),
        ],
    );
    let engine = start_engine(&text, &state);
    wait_until("the late event is dropped", Duration::from_secs(60), || {
        counter(&engine.metrics(), "miroir_late_events_total", "") == 1
    });
    assert_eq!(name_of(&engine, "k1").as_deref(), Some("typo"), "frozen");
    engine.shutdown();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_miroir"))
        .arg("forget-key")
        .arg(&file)
        .arg("--state-dir")
        .arg(&state)
        .args(["--source", "users", "--key", "k1"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("1 entry of key `k1` forgotten"), "{said}");

    publish_to(&topic, &[user("k1", "repaired", 3)]);
    let engine = start_engine(&text, &state);
    wait_until("the key applies again", Duration::from_secs(60), || {
        name_of(&engine, "k1").as_deref() == Some("repaired")
    });
    assert_eq!(name_of(&engine, "k2").as_deref(), Some("two"));
    engine.shutdown();
}
