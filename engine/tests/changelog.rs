//! Changelogs: every epoch logs each task's changed entries and offset before it commits, and
//! waits while the changelog cannot be written; the records restore the same state into an
//! empty state directory; a state directory written without changelogs logs its whole state
//! with its first epoch. The changelog here is an in-memory log per partition.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use miroir_engine::changelog::{
    ChangelogError, ChangelogRecord, ChangelogWriter, Position, RecordTopic, Restore,
};
use miroir_engine::error::ErrorClass;
use miroir_engine::ingest::upsert::Entry;
use miroir_engine::ingest::{Message, Records};
use miroir_engine::metrics::Metrics;
use miroir_engine::runtime::{Runtime, RuntimeConfig};
use miroir_engine::state::StateStore;
use miroir_engine::topology::Topology;
use support::{wait, NoErrors};

const TOPOLOGY: &str = r#"
name = "changelog-test"
[sources.users]
topic = "users"
key = "id"
columns = { id = "text", name = "text", version = "bigint" }
late = { order_by = "version" }

[tables.names]
query = "SELECT id, name FROM users"
store = "internal"
"#;

/// A changelog in memory: the records of each partition in order; the next `failures` writes
/// fail as a broker outage would.
#[derive(Default)]
struct MemoryChangelog {
    partitions: Mutex<BTreeMap<u32, Vec<ChangelogRecord>>>,
    failures: AtomicUsize,
}

impl ChangelogWriter for MemoryChangelog {
    fn write(&self, records: &[ChangelogRecord]) -> Result<Vec<Position>, ChangelogError> {
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
            .is_ok()
        {
            return Err(ChangelogError {
                class: ErrorClass::Transient,
                message: "broker down".into(),
            });
        }
        let mut partitions = self.partitions.lock().unwrap();
        for r in records {
            partitions.entry(r.partition).or_default().push(r.clone());
        }
        Ok(partitions
            .iter()
            .map(|(p, log)| Position {
                topic: RecordTopic::Changelog,
                source: 0,
                partition: *p,
                next: log.len() as i64,
            })
            .collect())
    }
}

impl MemoryChangelog {
    fn records(&self, partition: u32) -> Vec<ChangelogRecord> {
        self.partitions
            .lock()
            .unwrap()
            .get(&partition)
            .cloned()
            .unwrap_or_default()
    }
}

fn start(store: &StateStore, changelog: Option<Arc<MemoryChangelog>>) -> Runtime {
    let topology = Arc::new(Topology::parse("t.toml", TOPOLOGY).unwrap());
    let runtime = Runtime::start(
        topology,
        store.clone(),
        Arc::new(Metrics::new()),
        Arc::new(NoErrors),
        None,
        changelog.map(|c| c as Arc<dyn ChangelogWriter>),
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
    runtime
}

/// Sends `(offset, key, version)` events to partition 0.
fn send(runtime: &Runtime, events: &[(i64, &str, i64)]) {
    let mut records = Records::default();
    for (offset, key, version) in events {
        let payload = format!(r#"{{"id":"{key}","name":"{key}-v{version}","version":{version}}}"#);
        records.push(*offset, Some(key.as_bytes()), Some(payload.as_bytes()));
    }
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

fn committed(runtime: &Runtime) -> Option<i64> {
    runtime
        .committed_offsets()
        .get(&("users".into(), 0))
        .copied()
}

/// The state `records` restore into an empty state directory: its entries and offset.
fn restored(records: &[ChangelogRecord]) -> (Vec<(String, Entry)>, Option<i64>) {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), &[]).unwrap();
    let mut restore = Restore::start(&store, 0, 0, "users", true).unwrap();
    for r in records {
        restore.apply(Some(&r.key), r.value.as_deref()).unwrap();
    }
    let offset = restore.finish(records.len() as i64).unwrap();
    assert_eq!(
        store.changelog_position(0, 0).unwrap(),
        Some(records.len() as i64)
    );
    (entries(&store), offset)
}

fn entries(store: &StateStore) -> Vec<(String, Entry)> {
    store
        .upsert_entries(0, 0, Entry::decode_stored)
        .unwrap()
        .into_iter()
        .map(|(k, e)| (k.to_key_text(), e))
        .collect()
}

#[test]
fn every_epoch_is_logged_before_it_commits_and_the_log_restores_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), &["names".to_string()]).unwrap();
    let changelog = Arc::new(MemoryChangelog::default());
    let runtime = start(&store, Some(changelog.clone()));
    // k1's version 3 is late: the restored state must keep version 5, or a later event with
    // version 4 would apply.
    send(&runtime, &[(0, "k1", 5), (1, "k2", 1), (2, "k1", 3)]);
    wait("the epoch commits", || committed(&runtime) == Some(2));
    let logged = changelog.records(0);
    assert!(!logged.is_empty());
    assert_eq!(restored(&logged), (entries(&store), Some(2)));
    assert_eq!(
        store.changelog_position(0, 0).unwrap(),
        Some(logged.len() as i64),
        "the state directory records how far into the changelog its state is"
    );

    // The changelog cannot be written for two attempts: the epoch waits, then commits.
    changelog.failures.store(2, Ordering::SeqCst);
    send(&runtime, &[(3, "k2", 2), (4, "k3", 1)]);
    wait("the epoch commits once the changelog takes it", || {
        committed(&runtime) == Some(4)
    });
    assert_eq!(changelog.failures.load(Ordering::SeqCst), 0);
    assert_eq!(restored(&changelog.records(0)), (entries(&store), Some(4)));
    runtime.shutdown();
}

#[test]
fn a_state_directory_written_without_changelogs_logs_its_whole_state_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), &["names".to_string()]).unwrap();
    let runtime = start(&store, None);
    send(&runtime, &[(0, "k1", 5), (1, "k2", 1), (2, "k3", 7)]);
    wait("the epoch commits", || committed(&runtime) == Some(2));
    runtime.shutdown();
    drop(runtime);
    let before = entries(&store);
    assert_eq!(store.changelog_position(0, 0).unwrap(), None);

    let changelog = Arc::new(MemoryChangelog::default());
    let runtime = start(&store, Some(changelog.clone()));
    wait("the whole state is logged", || {
        store.changelog_position(0, 0).unwrap().is_some()
    });
    let logged = changelog.records(0);
    assert_eq!(logged.len(), 4, "three entries and the offset: {logged:?}");
    assert_eq!(restored(&logged), (before, Some(2)));
    runtime.shutdown();
}
