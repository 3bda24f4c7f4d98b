//! A source changed between two runs on the same state directory (a column added before the
//! others, or the sources in another order) is never read with the old
//! layout: its state is dropped, its offsets forgotten (the connector reads its topic again
//! from the beginning), and the tables rebuilt from the records read again equal the
//! reference. An unchanged source keeps its state.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use miroir_engine::ingest::decode::decode;
use miroir_engine::ingest::{Message, Records};
use miroir_engine::metrics::Metrics;
use miroir_engine::reference::evaluate_table;
use miroir_engine::runtime::{Runtime, RuntimeConfig};
use miroir_engine::state::{ScanOrder, StateStore, TableReader};
use miroir_engine::topology::Topology;
use miroir_engine::value::{key_text, Row};
use support::NoErrors;

const V1: &str = r#"
name = "layouts-test"
[sources.users]
topic = "users"
key = "id"
columns = { id = "text", name = "text", version = "bigint" }
late = { order_by = "version" }
[sources.teams]
topic = "teams"
key = "id"
columns = { id = "text", title = "text" }

[tables.names]
query = "SELECT u.id, u.name, t.title FROM users u LEFT JOIN teams t ON u.id = t.id"
store = "internal"
"#;

/// `users` gains a column before the others; `teams` is unchanged.
const V2: &str = r#"
name = "layouts-test"
[sources.users]
topic = "users"
key = "id"
columns = { email = "text", id = "text", name = "text", version = "bigint" }
late = { order_by = "version" }
[sources.teams]
topic = "teams"
key = "id"
columns = { id = "text", title = "text" }

[tables.names]
query = "SELECT u.id, u.name, t.title FROM users u LEFT JOIN teams t ON u.id = t.id"
store = "internal"
"#;

/// V2 with the two sources in the other order.
const V3: &str = r#"
name = "layouts-test"
[sources.teams]
topic = "teams"
key = "id"
columns = { id = "text", title = "text" }
[sources.users]
topic = "users"
key = "id"
columns = { email = "text", id = "text", name = "text", version = "bigint" }
late = { order_by = "version" }

[tables.names]
query = "SELECT u.id, u.name, t.title FROM users u LEFT JOIN teams t ON u.id = t.id"
store = "internal"
"#;

/// Records per topic, in offset order (partition 0).
fn records() -> BTreeMap<&'static str, Vec<(String, String)>> {
    let users = (0..20)
        .map(|i| {
            let payload = format!(
                r#"{{"id":"u{i}","email":"u{i}@example.org","name":"User {i}","version":1}}"#
            );
            (format!("u{i}"), payload)
        })
        .collect();
    let teams = (0..20)
        .step_by(3)
        .map(|i| {
            (
                format!("u{i}"),
                format!(r#"{{"id":"u{i}","title":"Team {i}"}}"#),
            )
        })
        .collect();
    BTreeMap::from([("users", users), ("teams", teams)])
}

fn start(text: &str, dir: &std::path::Path) -> (Arc<Topology>, Runtime, StateStore) {
    let topology = Arc::new(Topology::parse("t.toml", text).unwrap());
    let store = StateStore::open(dir, &["names".to_string()]).unwrap();
    let runtime = Runtime::start(
        topology.clone(),
        store.clone(),
        Arc::new(Metrics::new()),
        Arc::new(NoErrors),
        None,
        None,
        RuntimeConfig {
            workers: 2,
            epoch_interval: Duration::from_millis(10),
            max_epoch_interval: Duration::from_millis(10),
            max_records_per_epoch: 1000,
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    runtime.report_partition_counts(topology.sources.iter().map(|s| (s.topic.clone(), 1)));
    for source in 0..topology.sources.len() {
        runtime.broadcast(|| Message::Assign {
            tasks: vec![(source, vec![0])],
        });
    }
    (topology, runtime, store)
}

/// Feeds the records of `topic` after `after` (the offset the store resumes from).
fn feed(t: &Topology, runtime: &Runtime, topic: &str, after: Option<i64>) {
    let source = t.sources.iter().position(|s| s.topic == topic).unwrap();
    let mut batch = Records::default();
    for (offset, (key, payload)) in records()[topic].iter().enumerate() {
        if after.is_none_or(|a| offset as i64 > a) {
            batch.push(
                offset as i64,
                Some(key.as_bytes()),
                Some(payload.as_bytes()),
            );
        }
    }
    runtime.send(
        0,
        Message::Records {
            source,
            partition: 0,
            records: batch,
            catching_up: false,
        },
    );
}

fn expected(t: &Topology) -> BTreeMap<String, serde_json::Value> {
    let all = records();
    let sources: Vec<Vec<Row>> = t
        .sources
        .iter()
        .map(|s| {
            all[s.topic.as_str()]
                .iter()
                .map(|(_, p)| decode(s, p.as_bytes()).unwrap())
                .collect()
        })
        .collect();
    let table = t.table("names").unwrap();
    evaluate_table(table, &sources)
        .into_values()
        .map(|row| {
            let json = miroir_engine::value::row_to_json(&table.columns, &row);
            (key_text(&row, &table.key), json)
        })
        .collect()
}

fn rows(store: &StateStore, t: &Topology) -> BTreeMap<String, serde_json::Value> {
    let table = t.table("names").unwrap();
    store
        .rows(
            "names",
            &Default::default(),
            (None, ScanOrder::Ascending),
            1000,
        )
        .unwrap()
        .into_iter()
        .map(|scanned| {
            let json: serde_json::Value = serde_json::from_slice(&scanned.row).unwrap();
            let row: Row = table
                .columns
                .iter()
                .map(|c| miroir_engine::value::Value::from_json(&json[&c.name], c.ty).unwrap())
                .collect();
            (key_text(&row, &table.key), json)
        })
        .collect()
}

fn wait_for(store: &StateStore, t: &Topology) {
    let expected = expected(t);
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows(store, t) != expected {
        assert!(
            Instant::now() < deadline,
            "{:?} != {expected:?}",
            rows(store, t)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_changed_source_is_read_again_never_misread() {
    let dir = tempfile::tempdir().unwrap();
    let (t, runtime, store) = start(V1, dir.path());
    feed(&t, &runtime, "users", None);
    feed(&t, &runtime, "teams", None);
    wait_for(&store, &t);
    runtime.shutdown();
    drop(store);

    let (t, runtime, store) = start(V2, dir.path());
    assert_eq!(
        runtime.stored_offset("users", 0).unwrap(),
        None,
        "the changed source is read again from the beginning"
    );
    let teams = runtime.stored_offset("teams", 0).unwrap();
    assert!(
        teams.is_some(),
        "the unchanged one goes on where it stopped"
    );
    feed(&t, &runtime, "users", None);
    feed(&t, &runtime, "teams", teams);
    wait_for(&store, &t);
    runtime.shutdown();
    drop(store);

    // The sources swap places: each index now holds the other's state, so both are read
    // again.
    let (t, runtime, store) = start(V3, dir.path());
    assert_eq!(t.sources[0].name, "teams");
    assert_eq!(runtime.stored_offset("users", 0).unwrap(), None);
    assert_eq!(runtime.stored_offset("teams", 0).unwrap(), None);
    feed(&t, &runtime, "users", None);
    feed(&t, &runtime, "teams", None);
    wait_for(&store, &t);
    runtime.shutdown();
}
