//! Operations that own columns (`late.owns`): the engine's upsert state against the reference
//! evaluator on random sequences of entity events (late, duplicated, deleted, of listed and
//! unlisted operations), against the master's own history (delivered in any order, the last
//! snapshot wins column by column), and end to end on a real broker: a late rename does not
//! put back the email of a newer email change.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use miroir::miroir_engine::ingest::decode::decode;
use miroir::miroir_engine::ingest::upsert::{Event as Change, UpsertState};
use miroir::miroir_engine::value::Value;
use miroir::Engine;
use support::*;

const OPS: [&str; 5] = [
    "created",
    "email-changed",
    "renamed",
    "UpdateUserEmail",
    "imported",
];

/// The users' rows the engine's upsert state holds after `events`, in key order.
fn engine_rows(t: &TestTopology, events: &[Event]) -> Vec<Vec<Value>> {
    let users = &t.topology.sources[0];
    let mut state = UpsertState::default();
    for (offset, e) in events.iter().enumerate() {
        let change = match &e.payload {
            None => Change::Tombstone(Value::Text(e.key.as_str().into())),
            Some(payload) => Change::Row(decode(users, payload.as_bytes()).unwrap()),
        };
        state.apply(users.late.as_ref(), &users.identity, change, offset as i64);
    }
    let mut rows: Vec<Vec<Value>> = state.rows().cloned().collect();
    rows.sort();
    rows
}

/// The users' rows the reference evaluator derives from `events`, in key order.
fn reference_rows(t: &TestTopology, events: &[Event]) -> Vec<Vec<Value>> {
    let mut rows = replay(&t.topology, events).rows.swap_remove(0);
    rows.sort();
    rows
}

/// A user event: every column of the snapshot at `version`.
fn user(key: &str, version: i64, op: &str, email: &str, name: &str, dept: &str) -> Event {
    Event {
        source: 0,
        key: key.to_string(),
        payload: Some(format!(
            r#"{{"id":"{key}","email":"{email}","name":"{name}","department_id":"{dept}","active":true,"version":{version},"event_type":"{op}","updated_at":"2026-01-01T00:00:{:02}Z"}}"#,
            version % 60
        )),
    }
}

#[test]
fn the_engine_applies_ownership_as_the_reference_does() {
    let t = user_directory("ownership");
    for seed in 1..=400 {
        let mut rng = Rng::new(seed);
        let events: Vec<Event> = (0..60)
            .map(|_| {
                let key = format!("u-{}", rng.below(4));
                if rng.chance(5) {
                    return Event {
                        source: 0,
                        key,
                        payload: None,
                    };
                }
                let v = 1 + rng.below(12) as i64;
                let op = OPS[rng.below(OPS.len() as u64) as usize];
                let (e, n, d) = (rng.below(3), rng.below(3), rng.below(3));
                user(
                    &key,
                    v,
                    op,
                    &format!("e{e}v{v}@x"),
                    &format!("n{n}v{v}"),
                    &format!("d-{d}"),
                )
            })
            .collect();
        assert_eq!(
            engine_rows(&t, &events),
            reference_rows(&t, &events),
            "seed {seed}: {events:#?}"
        );
    }
}

/// The master's history of one user: version 1 creates it, each next version is one operation
/// changing only what it owns (an unlisted one, `imported`, changes everything).
fn history(rng: &mut Rng, key: &str, versions: i64) -> Vec<Event> {
    let (mut email, mut name, mut dept) = (
        "first@x".to_string(),
        "First".to_string(),
        "d-0".to_string(),
    );
    let mut events = vec![user(key, 1, "created", &email, &name, &dept)];
    for v in 2..=versions {
        let op = OPS[1 + rng.below(OPS.len() as u64 - 1) as usize];
        match op {
            "email-changed" | "UpdateUserEmail" => email = format!("{op}-{v}@x"),
            "renamed" => name = format!("name-{v}"),
            _ => {
                email = format!("imported-{v}@x");
                name = format!("imported-{v}");
                dept = format!("d-{v}");
            }
        }
        events.push(user(key, v, op, &email, &name, &dept));
    }
    events
}

#[test]
fn delivered_in_any_order_the_master_s_snapshots_give_its_last_one() {
    let t = user_directory("ownership");
    for seed in 1..=300 {
        let mut rng = Rng::new(seed);
        let mut last = Vec::new();
        let mut events = Vec::new();
        for k in 0..3 {
            let versions = 2 + rng.below(15) as i64;
            let history = history(&mut rng, &format!("u-{k}"), versions);
            last.push(history.last().unwrap().clone());
            events.extend(history);
        }
        // Shuffled, with some events delivered twice.
        for i in (1..events.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            events.swap(i, j);
        }
        for _ in 0..rng.below(5) {
            let again = events[rng.below(events.len() as u64) as usize].clone();
            events.push(again);
        }
        assert_eq!(
            engine_rows(&t, &events),
            reference_rows(&t, &last),
            "seed {seed}: {events:#?}"
        );
    }
}

#[test]
fn a_late_rename_does_not_put_back_an_older_email() {
    let run = Run::new("owns");
    let t = with_internal_table_only(user_directory(&run));
    let events = [
        user("u-1", 1, "created", "old@x", "Ada", "d-1"),
        user("u-1", 5, "email-changed", "new@x", "Ada", "d-1"),
        // Renamed at version 4, before the email change: its snapshot holds the old email.
        user("u-1", 4, "renamed", "old@x", "Ada Lovelace", "d-1"),
        // And a late email change of the same operation is dropped.
        user("u-1", 3, "email-changed", "older@x", "Ada", "d-1"),
    ];
    publish(&t, &events);
    let state = tempfile::tempdir().unwrap();
    let engine = Engine::builder()
        .topology_str(t.text.clone())
        .brokers(brokers())
        .state_dir(state.path())
        .epoch_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    let expected: BTreeMap<String, serde_json::Value> = [(
        "u-1".to_string(),
        serde_json::json!({"id": "u-1", "email": "new@x", "name": "Ada Lovelace", "department_id": "d-1"}),
    )]
    .into();
    let tables = BTreeMap::from([("user_contacts".to_string(), expected.clone())]);
    assert_eq!(expected_tables(&t.topology, &events), tables);
    wait_for_tables(&tables, Duration::from_secs(60), |name| {
        engine
            .scan(name, "", 100)
            .unwrap()
            .into_iter()
            .map(|row| (row["id"].as_str().unwrap().to_string(), row))
            .collect()
    });
    let metrics = engine.metrics();
    assert_eq!(
        counter(
            &metrics,
            "miroir_late_events_total",
            "operation=\"email-changed\""
        ),
        1,
        "{metrics}"
    );
    engine.shutdown();
}
