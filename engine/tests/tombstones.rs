//! A deleted key's state (the order values that keep a late event from bringing it back) is
//! kept for the source's `late.tombstone_retention`, then forgotten, in memory and in the
//! state directory: memory does not grow with every key ever deleted.

mod support;

use std::sync::Arc;
use std::time::Duration;

use miroir_engine::ingest::upsert::Entry;
use miroir_engine::ingest::{Message, Records};
use miroir_engine::metrics::Metrics;
use miroir_engine::runtime::{Runtime, RuntimeConfig};
use miroir_engine::state::{StateStore, TableReader};
use miroir_engine::topology::Topology;
use miroir_engine::value::Value;
use support::{wait, NoErrors};

const TOPOLOGY: &str = r#"
name = "tombstones-test"
[sources.users]
topic = "users"
key = "id"
columns = { id = "text", name = "text", version = "bigint" }
late = { order_by = "version", tombstone_retention = "1s" }

[tables.names]
query = "SELECT id, name FROM users"
store = "internal"
"#;

fn send(runtime: &Runtime, offset: i64, version: Option<i64>) {
    let mut records = Records::default();
    let payload = version.map(|v| format!(r#"{{"id":"k1","name":"v{v}","version":{v}}}"#));
    records.push(offset, Some(b"k1"), payload.as_deref().map(str::as_bytes));
    runtime.send(
        0,
        Message::Records {
            source: 0,
            partition: 0,
            records,
            catching_up: false,
        },
    );
}

#[test]
fn a_deleted_key_is_forgotten_after_its_retention() {
    let topology = Arc::new(Topology::parse("t.toml", TOPOLOGY).unwrap());
    assert_eq!(
        topology.sources[0].tombstone_retention,
        Duration::from_secs(1)
    );
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), &["names".to_string()]).unwrap();
    let runtime = Runtime::start(
        topology,
        store.clone(),
        Arc::new(Metrics::new()),
        Arc::new(NoErrors),
        None,
        None,
        RuntimeConfig {
            workers: 1,
            epoch_interval: Duration::from_millis(10),
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    runtime.broadcast(|| Message::Assign {
        tasks: vec![(0, vec![0])],
    });
    let row = || store.row("names", &[Value::Text("k1".into())]).unwrap();
    let entries = || {
        store
            .upsert_entries(0, 0, Entry::decode_stored)
            .unwrap()
            .len()
    };
    send(&runtime, 0, Some(5));
    send(&runtime, 1, None);
    wait("the delete is committed", || {
        runtime.committed_offsets().get(&("users".into(), 0)) == Some(&1)
    });
    assert_eq!(row(), None);
    assert_eq!(entries(), 1, "the deleted key's versions are kept");
    // Within the retention, an event older than the delete is late.
    send(&runtime, 2, Some(3));
    wait("the late event is read", || {
        runtime.committed_offsets().get(&("users".into(), 0)) == Some(&2)
    });
    assert_eq!(row(), None, "a late event does not bring the key back");

    wait("the deleted key is forgotten", || entries() == 0);
    send(&runtime, 3, Some(2));
    wait("an event older than the delete applies again", || {
        row().is_some()
    });
    runtime.shutdown();
}
