//! Epoch length: epochs keep to `epoch_interval` while the source keeps up, end as soon as the
//! inbox is drained under a light load, grow up to `max_epoch_interval` while it reports
//! records waiting (catching up) and records keep coming, and end at once when a revocation
//! waits for their commit.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use miroir_engine::ingest::{Message, Records};
use miroir_engine::metrics::Metrics;
use miroir_engine::runtime::{Runtime, RuntimeConfig};
use miroir_engine::state::{StateStore, TableReader};
use miroir_engine::topology::Topology;
use miroir_engine::value::Value;
use support::NoErrors;

const TOPOLOGY: &str = r#"
name = "epochs-test"
[sources.users]
topic = "users"
key = "id"
columns = { id = "text", email = "text", version = "bigint" }
late = { order_by = "version" }

[tables.emails]
query = "SELECT id, email FROM users"
store = "internal"
"#;

/// Far longer than any test waits: an epoch that ends did not end by reaching it.
const LONG: Duration = Duration::from_secs(600);

fn start(dir: &std::path::Path) -> (Runtime, StateStore) {
    start_with(dir, Duration::from_millis(10))
}

/// Starts 2 workers with epochs of `epoch_interval`, partition 0 assigned.
fn start_with(dir: &std::path::Path, epoch_interval: Duration) -> (Runtime, StateStore) {
    let topology = Arc::new(Topology::parse("t.toml", TOPOLOGY).unwrap());
    let store = StateStore::open(dir, &["emails".to_string()]).unwrap();
    let runtime = Runtime::start(
        topology,
        store.clone(),
        Arc::new(Metrics::new()),
        Arc::new(NoErrors),
        None,
        None,
        RuntimeConfig {
            workers: 2,
            epoch_interval,
            max_epoch_interval: LONG,
            max_records_per_epoch: 1_000_000,
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    runtime.broadcast(|| Message::Assign {
        tasks: vec![(0, vec![0])],
    });
    (runtime, store)
}

/// Revokes partition 0 as the Kafka source does, and waits for every worker's
/// acknowledgement (which follows the epoch's commit).
fn revoke(runtime: &Runtime) {
    let (done, acks) = crossbeam_channel::unbounded();
    runtime.broadcast(|| Message::Revoke {
        tasks: vec![(0, vec![0])],
        retract: true,
        done: done.clone(),
    });
    for _ in 0..runtime.workers() {
        acks.recv_timeout(Duration::from_secs(30))
            .expect("the revocation waited for the epoch's maximum length");
    }
}

/// A batch of one record.
fn one(offset: i64, key: &[u8], payload: &[u8]) -> Records {
    let mut records = Records::default();
    records.push(offset, Some(key), Some(payload));
    records
}

/// Sends version `version` of user `u1` at `offset` of partition 0.
fn send(runtime: &Runtime, offset: i64, version: i64, catching_up: bool) {
    runtime.send(
        0,
        Message::Records {
            source: 0,
            partition: 0,
            records: one(
                offset,
                b"u1",
                format!(r#"{{"id":"u1","email":"v{version}@example.org","version":{version}}}"#)
                    .as_bytes(),
            ),
            catching_up,
        },
    );
}

fn committed(runtime: &Runtime) -> Option<i64> {
    runtime
        .committed_offsets()
        .get(&("users".to_string(), 0))
        .copied()
}

fn wait_committed(runtime: &Runtime, offset: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed(runtime) != Some(offset) {
        assert!(
            Instant::now() < deadline,
            "offset {offset} not committed: {:?}",
            committed(runtime)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn email(store: &StateStore) -> String {
    let row = store
        .row("emails", &[Value::Text("u1".into())])
        .unwrap()
        .expect("row of u1");
    serde_json::from_slice::<serde_json::Value>(&row).unwrap()["email"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn epochs_keep_to_the_interval_while_the_source_keeps_up() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, store) = start(dir.path());
    send(&runtime, 0, 1, false);
    // Not catching up: the epoch ends after 10 ms although the maximum is 10 minutes.
    wait_committed(&runtime, 0);
    assert_eq!(email(&store), "v1@example.org");
    runtime.shutdown();
}

#[test]
fn a_light_load_ends_its_epoch_once_the_inbox_is_drained() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, store) = start_with(dir.path(), LONG);
    send(&runtime, 0, 1, false);
    // One record, then nothing: readable long before the 10-minute interval.
    wait_committed(&runtime, 0);
    assert_eq!(email(&store), "v1@example.org");
    // And again: every light epoch ends early, not only the first.
    send(&runtime, 1, 2, false);
    wait_committed(&runtime, 1);
    assert_eq!(email(&store), "v2@example.org");
    runtime.shutdown();
}

#[test]
fn a_steady_load_keeps_its_epoch_to_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, store) = start_with(dir.path(), Duration::from_secs(3));
    // More records than a light epoch holds: the epoch does not end when they stop, but at
    // the end of its interval.
    for offset in 0..40 {
        send(&runtime, offset, offset + 1, false);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(committed(&runtime), None, "a loaded epoch ended early");
    wait_committed(&runtime, 39);
    assert_eq!(email(&store), "v40@example.org");
    runtime.shutdown();
}

#[test]
fn epochs_grow_while_catching_up_and_end_once_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, store) = start(dir.path());
    for offset in 0..20 {
        send(&runtime, offset, offset + 1, true);
        std::thread::sleep(Duration::from_millis(15));
    }
    // 300 ms of records, each batch saying more are waiting: still one open epoch.
    assert_eq!(
        committed(&runtime),
        None,
        "an epoch ended while catching up"
    );
    send(&runtime, 20, 21, false);
    wait_committed(&runtime, 20);
    assert_eq!(email(&store), "v21@example.org");
    runtime.shutdown();
}

#[test]
fn a_grown_epoch_takes_in_the_records_right_after_it_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, store) = start(dir.path());
    for offset in 0..5 {
        send(&runtime, offset, offset + 1, true);
        std::thread::sleep(Duration::from_millis(15));
    }
    // The source says caught up a little before the partition's end: the last records follow
    // at once, and belong in the grown epoch rather than in one of their own.
    send(&runtime, 5, 6, false);
    send(&runtime, 6, 7, false);
    let first = loop {
        if let Some(offset) = committed(&runtime) {
            break offset;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(first, 6, "the grown epoch ended before the last records");
    assert_eq!(email(&store), "v7@example.org");
    runtime.shutdown();
}

#[test]
fn a_growing_epoch_ends_when_records_stop_coming() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, store) = start(dir.path());
    // The batch says more records wait, but none comes (say, offsets of aborted transactions,
    // never delivered): the epoch must not stay open for its 10-minute maximum.
    send(&runtime, 0, 1, true);
    wait_committed(&runtime, 0);
    assert_eq!(email(&store), "v1@example.org");
    runtime.shutdown();
}

#[test]
fn a_revocation_is_not_held_by_a_growing_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, store) = start(dir.path());
    let feeding = std::sync::atomic::AtomicBool::new(true);
    let last = std::thread::scope(|scope| {
        // Records keep coming, each batch saying more wait: the epoch grows.
        let feeder = scope.spawn(|| {
            let mut offset = 0;
            while feeding.load(std::sync::atomic::Ordering::SeqCst) {
                send(&runtime, offset, offset + 1, true);
                offset += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            offset - 1
        });
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            committed(&runtime),
            None,
            "an epoch ended while catching up"
        );
        // As the Kafka source does, stop delivering during the revocation.
        feeding.store(false, std::sync::atomic::Ordering::SeqCst);
        feeder.join().unwrap()
    });
    revoke(&runtime);
    // The revoked partition's state and offset were committed before the acknowledgement.
    assert_eq!(store.offset("users", 0).unwrap(), Some(last));
    runtime.shutdown();
}

#[test]
fn records_that_arrive_after_their_partition_was_revoked_are_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, store) = start(dir.path());
    send(&runtime, 0, 1, false);
    wait_committed(&runtime, 0);
    revoke(&runtime);
    // A batch read before the revocation, handed over after it: the partition's next owner
    // reads it again from the committed offset; this instance must not open the task again.
    send(&runtime, 1, 2, false);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(store.offset("users", 0).unwrap(), Some(0));
    assert!(
        !runtime.owns("users", 0),
        "no task of a partition not assigned"
    );
    runtime.shutdown();
}
