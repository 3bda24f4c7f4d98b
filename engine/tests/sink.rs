//! The runtime's external-table path with an in-memory database behind the `ExternalSink`
//! trait: batches reach the database in order, once, through failures, restarts and replays,
//! and the database's table equals the reference evaluator.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use miroir_engine::error::ErrorClass;
use miroir_engine::ingest::{Message, Records};
use miroir_engine::metrics::Metrics;
use miroir_engine::reference::evaluate_table;
use miroir_engine::runtime::{Runtime, RuntimeConfig};
use miroir_engine::sink::{Applied, Claims, Durable, ExternalSink, SinkBatch, SinkError};
use miroir_engine::state::StateStore;
use miroir_engine::topology::Topology;
use miroir_engine::value::{key_text, Row};
use support::NoErrors;

const TOPOLOGY: &str = r#"
name = "sink-test"
[sources.users]
topic = "users"
key = "id"
columns = { id = "text", dept = "text", version = "bigint" }
late = { order_by = "version" }
[sources.depts]
topic = "depts"
key = "id"
columns = { id = "text", name = "text" }

[tables.per_dept]
query = "SELECT d.name, count(*) AS users FROM users u JOIN depts d ON u.dept = d.id GROUP BY d.name"
sink = { postgres = { table = "app.per_dept" } }
[tables.directory]
query = "SELECT u.id, d.name FROM users u LEFT JOIN depts d ON u.dept = d.id"
store = "internal"
"#;

const PARTITIONS: u32 = 2;

/// The database: one table, the last applied sequence, and the transactions it saw.
#[derive(Default)]
struct Db {
    rows: BTreeMap<String, Row>,
    sequence: u64,
    transactions: usize,
    /// Attempts left to fail before accepting.
    failures: usize,
    /// Refuse every batch with an error of this class (retrying does not help).
    refusal: Option<ErrorClass>,
    /// Every state a reader could have seen (after each transaction).
    snapshots: Vec<BTreeMap<String, Row>>,
}

struct FakeSink {
    db: Arc<Mutex<Db>>,
    key: Vec<usize>,
}

impl ExternalSink for FakeSink {
    fn apply(&mut self, batches: &[SinkBatch], durable: &Durable) -> Result<Applied, SinkError> {
        durable.wait()?;
        let mut db = self.db.lock().unwrap();
        if let Some(class) = db.refusal {
            return Err(SinkError::Database {
                class,
                source: "permission denied for table per_dept".into(),
            });
        }
        if db.failures > 0 {
            db.failures -= 1;
            return Err(SinkError::Database {
                class: ErrorClass::Transient,
                source: "connection refused".into(),
            });
        }
        // The table is computed from every partition of both sources: a group claiming them
        // all is the whole table.
        let fresh = batches.iter().filter(|b| b.sequence > db.sequence);
        let claims = Claims::of(fresh);
        if claims.covers("users") && claims.covers("depts") {
            db.rows.clear();
        }
        for batch in batches {
            if batch.sequence <= db.sequence {
                continue; // already applied: a replay
            }
            assert!(
                db.sequence == 0 || batch.sequence == db.sequence + 1,
                "batches in order, none skipped: {} after {}",
                batch.sequence,
                db.sequence
            );
            for t in &batch.tables {
                for row in &t.upserts {
                    let k = key_text(row, &self.key);
                    db.rows.insert(k, row.clone());
                }
                for key in &t.deletes {
                    let k = key_text(key, &(0..key.len()).collect::<Vec<_>>());
                    db.rows.remove(&k);
                }
            }
            db.sequence = batch.sequence;
        }
        db.transactions += 1;
        let snapshot = db.rows.clone();
        db.snapshots.push(snapshot);
        Ok(Applied::default())
    }
}

fn topology() -> Arc<Topology> {
    Arc::new(Topology::parse("t.toml", TOPOLOGY).unwrap())
}

/// Events: (source, partition, key, payload).
fn events() -> Vec<(usize, u32, String, String)> {
    let mut out = Vec::new();
    for d in 0..3 {
        out.push((
            1,
            d % PARTITIONS,
            format!("d{d}"),
            format!(r#"{{"id":"d{d}","name":"Dept {d}"}}"#),
        ));
    }
    for i in 0..200u32 {
        let u = i % 37;
        let version = i / 37 + 1;
        out.push((
            0,
            u % PARTITIONS,
            format!("u{u}"),
            format!(
                r#"{{"id":"u{u}","dept":"d{}","version":{version}}}"#,
                (i * 7) % 4
            ),
        ));
    }
    out
}

fn expected(t: &Topology, events: &[(usize, u32, String, String)]) -> BTreeMap<String, Row> {
    let mut sources: Vec<BTreeMap<String, Row>> = vec![BTreeMap::new(), BTreeMap::new()];
    for (source, _, key, payload) in events {
        let row =
            miroir_engine::ingest::decode::decode(&t.sources[*source], payload.as_bytes()).unwrap();
        sources[*source].insert(key.clone(), row);
    }
    let sources: Vec<Vec<Row>> = sources
        .into_iter()
        .map(|s| s.into_values().collect())
        .collect();
    evaluate_table(t.table("per_dept").unwrap(), &sources)
}

fn start(t: &Arc<Topology>, dir: &std::path::Path, db: &Arc<Mutex<Db>>) -> Runtime {
    let store = StateStore::open(dir, &["directory".to_string()]).unwrap();
    let sink = FakeSink {
        db: db.clone(),
        key: t.table("per_dept").unwrap().key.clone(),
    };
    let runtime = Runtime::start(
        t.clone(),
        store,
        Arc::new(Metrics::new()),
        Arc::new(NoErrors),
        Some(Box::new(sink)),
        None,
        RuntimeConfig {
            workers: 2,
            epoch_interval: Duration::from_millis(20),
            max_epoch_interval: Duration::from_millis(20),
            max_records_per_epoch: 10,
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    runtime.report_partition_counts(t.sources.iter().map(|s| (s.topic.clone(), PARTITIONS)));
    runtime
}

fn feed(runtime: &Runtime, events: &[(usize, u32, String, String)], first_offset: i64) {
    for (i, (source, partition, key, payload)) in events.iter().enumerate() {
        runtime.send(
            *partition,
            Message::Records {
                source: *source,
                partition: *partition,
                records: {
                    let mut records = Records::default();
                    records.push(
                        first_offset + i as i64,
                        Some(key.as_bytes()),
                        Some(payload.as_bytes()),
                    );
                    records
                },
                catching_up: false,
            },
        );
    }
}

fn assign(runtime: &Runtime) {
    for source in 0..2 {
        runtime.broadcast(|| Message::Assign {
            tasks: vec![(source, (0..PARTITIONS).collect())],
        });
    }
}

fn wait_for(db: &Arc<Mutex<Db>>, expected: &BTreeMap<String, Row>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if db.lock().unwrap().rows == *expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "database {:?} != expected {:?}",
            db.lock().unwrap().rows,
            expected
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn batches_survive_failures_and_restarts_and_match_the_reference() {
    let t = topology();
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Mutex::new(Db {
        failures: 3,
        ..Db::default()
    }));
    let mut all = events();
    // Right after the restart, a department is renamed: its old group must leave the
    // database although the restarted dataflow, which re-derives the table from empty, never
    // emits it (restored and renamed in the same epoch).
    all.insert(
        120,
        (
            1,
            0,
            "d0".into(),
            r#"{"id":"d0","name":"Dept 0 renamed"}"#.into(),
        ),
    );
    let (first, second) = all.split_at(120);

    let runtime = start(&t, dir.path(), &db);
    assign(&runtime);
    // Offsets only need to grow per partition; one counter is enough.
    feed(&runtime, first, 0);
    wait_for(&db, &expected(&t, first));
    assert_eq!(db.lock().unwrap().failures, 0, "the failures were retried");
    runtime.shutdown();

    // A restart re-derives the tables from the restored state: the database sees the same
    // rows again (idempotent), then the new events.
    let runtime = start(&t, dir.path(), &db);
    assign(&runtime);
    feed(&runtime, second, first.len() as i64);
    wait_for(&db, &expected(&t, &all));
    runtime.shutdown();

    // The join of a restart's first epochs never shows: every state a reader could have seen
    // after the first complete one has all three departments' groups, or is a later state.
    let db = db.lock().unwrap();
    assert!(db.transactions > 2);
    let full = expected(&t, first);
    let first_full = db
        .snapshots
        .iter()
        .position(|s| *s == full)
        .expect("the first half was applied whole");
    let renamed = expected(&t, &all);
    for s in &db.snapshots[first_full..] {
        let keys: Vec<_> = s.keys().collect();
        assert!(
            keys == full.keys().collect::<Vec<_>>() || keys == renamed.keys().collect::<Vec<_>>(),
            "a reader saw a partial table: {s:?}"
        );
    }
    // Nothing is left in the outbox.
    let store = StateStore::open(dir.path(), &[]).unwrap();
    assert!(store.outbox().unwrap().is_empty());
}

#[test]
fn a_batch_left_in_the_outbox_is_applied_at_the_next_start() {
    let t = topology();
    let dir = tempfile::tempdir().unwrap();
    let all = events();
    // The database is down for the whole first run: every batch stays in the outbox.
    let down = Arc::new(Mutex::new(Db {
        failures: usize::MAX,
        ..Db::default()
    }));
    // Few events: with the database down, backpressure soon stops the workers, and the
    // feeding would block.
    let fed = &all[..30];
    let runtime = start(&t, dir.path(), &down);
    assign(&runtime);
    feed(&runtime, fed, 0);
    std::thread::sleep(Duration::from_millis(500));
    runtime.shutdown();
    assert!(down.lock().unwrap().rows.is_empty());
    // What the first run committed (and put in its outbox): the events up to each
    // partition's committed offset.
    let applied: Vec<_> = {
        let store = StateStore::open(dir.path(), &[]).unwrap();
        assert!(
            !store.outbox().unwrap().is_empty(),
            "unapplied batches stay in the outbox"
        );
        fed.iter()
            .enumerate()
            .filter(|(i, (source, partition, _, _))| {
                store
                    .offset(&t.sources[*source].topic, *partition)
                    .unwrap()
                    .is_some_and(|o| *i as i64 <= o)
            })
            .map(|(_, e)| e.clone())
            .collect()
    };
    assert!(!applied.is_empty());

    // The next start applies them before anything else, with no new event at all.
    let up = Arc::new(Mutex::new(Db::default()));
    let runtime = start(&t, dir.path(), &up);
    wait_for(&up, &expected(&t, &applied));
    runtime.shutdown();
    let sequence = up.lock().unwrap().sequence;

    // Offered again (as after a crash before the outbox entry was removed), they change
    // nothing: the database skips sequences it has.
    let mut again = FakeSink {
        db: up.clone(),
        key: t.table("per_dept").unwrap().key.clone(),
    };
    let replay = SinkBatch {
        sequence,
        tables: vec![],
        offsets: vec![],
        caught_up: false,
        claims: vec![],
        written: vec![],
    };
    again.apply(&[replay], &Durable::done()).unwrap();
    assert_eq!(up.lock().unwrap().rows, expected(&t, &applied));
}

#[test]
fn a_batch_the_database_refuses_for_good_stops_the_runtime_and_stays_in_the_outbox() {
    let t = topology();
    let dir = tempfile::tempdir().unwrap();
    let fed = &events()[..30];
    for class in [ErrorClass::Fatal, ErrorClass::Definite] {
        let refusing = Arc::new(Mutex::new(Db {
            refusal: Some(class),
            ..Db::default()
        }));
        let runtime = start(&t, dir.path(), &refusing);
        assign(&runtime);
        feed(&runtime, fed, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !runtime.stopped() {
            assert!(
                Instant::now() < deadline,
                "{class}: the runtime keeps going"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let failure = runtime.failure().expect("the runtime says why it stopped");
        assert!(
            failure.contains("refuses batch") && failure.contains("permission denied"),
            "{failure}"
        );
        runtime.shutdown();
        assert_eq!(refusing.lock().unwrap().transactions, 0);
    }
    let store = StateStore::open(dir.path(), &[]).unwrap();
    assert!(!store.outbox().unwrap().is_empty(), "the batches are kept");
    drop(store);

    // Once the database accepts them, the next start applies them, and the records after
    // them, read again.
    let up = Arc::new(Mutex::new(Db::default()));
    let runtime = start(&t, dir.path(), &up);
    assign(&runtime);
    feed(&runtime, fed, 0);
    wait_for(&up, &expected(&t, fed));
    runtime.shutdown();
}
