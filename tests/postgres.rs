//! External tables in a real PostgreSQL: readers may only read; `miroir plan` says what a
//! start will do; a changed definition is rebuilt in a shadow table and swapped in while a
//! reader queries throughout (it sees the old table or the new one, complete, nothing else);
//! a database that cannot be reached makes the instance not ready instead of failing.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use miroir::Engine;
use miroir_connectors::postgres::schema::{plan, Action};
use support::*;

const READER: &str = "miroir_it_reader";
const OUTSIDER: &str = "miroir_it_outsider";

fn login_role(db: &mut postgres::Client, role: &str) {
    db.batch_execute(&format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
             CREATE ROLE {role} LOGIN PASSWORD 'secret';
           END IF;
         END $$"
    ))
    .unwrap();
}

fn connect_as(role: &str) -> postgres::Client {
    let mut config: postgres::Config = database_url().parse().unwrap();
    config.user(role).password("secret");
    config.connect(postgres::NoTls).unwrap()
}

/// Asserts that `role` gets a permission error reading `table`.
fn cannot_read(role: &str, table: &str, why: &str) {
    let err = connect_as(role)
        .query(&format!("SELECT * FROM {table}"), &[])
        .expect_err(why);
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{why}: {err}"
    );
}

/// Waits until each table of `expected` exists, and checks it holds `expected`'s rows as soon
/// as it does: a table is swapped in once its rows went through every stage.
fn appears_complete(
    db: &mut postgres::Client,
    t: &miroir::miroir_engine::topology::Topology,
    expected: &BTreeMap<String, BTreeMap<String, serde_json::Value>>,
) {
    for (table, want) in expected {
        let pg = t.table(table).unwrap().postgres().unwrap().qualified();
        wait_until(&format!("{pg} appears"), Duration::from_secs(90), || {
            db.query_one("SELECT to_regclass($1) IS NOT NULL", &[&pg])
                .unwrap()
                .get(0)
        });
        let rows = pg_table(db, t, table).unwrap();
        assert_eq!(
            rows,
            *want,
            "{table} appeared incomplete: {}",
            diff(want, &rows)
        );
    }
}

#[test]
fn readers_only_read_and_a_changed_table_is_swapped_in_whole() {
    let run = Run::new("pg");
    let mut t = user_directory(&run);
    let mut db = pg();
    login_role(&mut db, READER);
    login_role(&mut db, OUTSIDER);
    t.text = t.text.replace(
        "readers = [\"app_reader\"]",
        &format!("readers = [\"app_reader\", \"{READER}\"]"),
    );
    t.topology = miroir::miroir_engine::topology::Topology::parse("t.toml", &t.text).unwrap();
    let (events, _) = generate(23, 200, 2500);
    publish(&t, &events);
    let state = tempfile::tempdir().unwrap();

    // Nothing exists yet: everything is created.
    let before = plan(&database_url(), &t.topology).unwrap();
    assert!(
        before.iter().all(|d| d.action == Action::Create),
        "{before:?}"
    );

    let engine = start_engine(&t.text, state.path());
    let expected_v1 = only_external(expected_tables(&t.topology, &events), &t.topology);
    // Every event was published before the start: each table appears complete.
    appears_complete(&mut db, &t.topology, &expected_v1);

    // The reader role reads and cannot write; a role that is not a reader cannot even read.
    let table = format!("\"{}\".\"user_directory\"", t.schema);
    let mut reader = connect_as(READER);
    let n: i64 = reader
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .unwrap()
        .get(0);
    assert_eq!(n as usize, expected_v1["user_directory"].len());
    for write in [
        format!("UPDATE {table} SET name = 'x'"),
        format!("DELETE FROM {table}"),
        format!("INSERT INTO {table} (id) VALUES ('intruder')"),
        format!("TRUNCATE {table}"),
    ] {
        let err = reader.batch_execute(&write).expect_err(&write);
        assert_eq!(
            err.code(),
            Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{write}: {err}"
        );
    }
    cannot_read(OUTSIDER, &table, "an outsider cannot read");
    let metrics = engine.metrics();
    assert!(
        counter(&metrics, "miroir_sink_rows_total", "op=\"upsert\"") > 0,
        "{metrics}"
    );
    engine.shutdown();

    // Same topology: nothing to rebuild.
    let same = plan(&database_url(), &t.topology).unwrap();
    assert!(same.iter().all(|d| d.action == Action::Keep), "{same:?}");
    // Another topology may not take these tables over.
    let intruder = miroir::miroir_engine::topology::Topology::parse(
        "t.toml",
        &t.text
            .replace(&format!("name = \"it-{run}\""), "name = \"another-app\""),
    )
    .unwrap();
    let refused = plan(&database_url(), &intruder).unwrap();
    assert!(
        refused
            .iter()
            .all(|d| matches!(d.action, Action::Refuse { ref reason } if reason.contains(&format!("it-{run}")))),
        "{refused:?}"
    );
    // Nor may a topology take over a table miroir did not build.
    db.batch_execute(&format!("CREATE TABLE \"{}\".not_ours (id text)", t.schema))
        .unwrap();
    let squatter = miroir::miroir_engine::topology::Topology::parse(
        "t.toml",
        &t.text.replace(".users_per_department\"", ".not_ours\""),
    )
    .unwrap();
    let refused = plan(&database_url(), &squatter).unwrap();
    assert!(
        refused.iter().any(|d| matches!(d.action, Action::Refuse { ref reason } if reason.contains("did not build"))),
        "{refused:?}"
    );

    // A changed query: only that table is rebuilt, in a shadow table.
    let text_v2 = t.text.replace(
        "max(u.version) AS max_version,",
        "max(u.version) AS max_version, min(u.version) AS min_version,",
    );
    let topology_v2 = miroir::miroir_engine::topology::Topology::parse("t.toml", &text_v2).unwrap();
    let decisions = plan(&database_url(), &topology_v2).unwrap();
    let action = |table: &str| {
        decisions
            .iter()
            .find(|d| d.table == table)
            .unwrap()
            .action
            .clone()
    };
    assert_eq!(action("user_directory"), Action::Keep);
    assert!(
        matches!(action("users_per_department"), Action::Rebuild { ref reason } if reason.contains("definition")),
        "{decisions:?}"
    );
    let expected_v2 = only_external(expected_tables(&topology_v2, &events), &topology_v2);

    // A reader polls the rebuilt table throughout the redeploy.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let t2 = topology_v2.clone();
        let (v1, v2) = (
            expected_v1["users_per_department"].clone(),
            expected_v2["users_per_department"].clone(),
        );
        std::thread::spawn(move || {
            let mut db = pg();
            let (mut old, mut new) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                // Read with the new definition's key: both definitions share it.
                // Both definitions have the same key, so either reads both tables.
                let rows = pg_table(&mut db, &t2, "users_per_department")
                    .expect("the table is always there");
                if rows == v1 {
                    old += 1;
                } else if rows == v2 {
                    new += 1;
                } else {
                    panic!("a reader saw a table that is neither the old one nor the new one, whole: {}", diff(&v2, &rows));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (old, new)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let engine = start_engine(&text_v2, state.path());
    wait_for_tables(
        &expected_v2,
        Duration::from_secs(90),
        external_tables(&mut db, &topology_v2),
    );
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (old, new) = watcher.join().expect("the reader saw only whole tables");
    assert!(
        old > 0 && new > 0,
        "the reader saw the old table {old} times, the new one {new} times"
    );
    // The readers keep their rights on the rebuilt table.
    let n: i64 = connect_as(READER)
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".\"users_per_department\"",
                t.schema
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n as usize, expected_v2["users_per_department"].len());
    engine.shutdown();
    let after = plan(&database_url(), &topology_v2).unwrap();
    assert!(after.iter().all(|d| d.action == Action::Keep), "{after:?}");

    // New indexes and fewer readers are applied in place: no rebuild.
    let text_v3 = text_v2
        .replace(
            "indexes = [[\"department\"]]",
            "indexes = [[\"department\"], [\"email\", \"name\"]]",
        )
        .replace(
            &format!("readers = [\"app_reader\", \"{READER}\"]"),
            "readers = [\"app_reader\"]",
        );
    assert_ne!(text_v3, text_v2);
    let topology_v3 = miroir::miroir_engine::topology::Topology::parse("t.toml", &text_v3).unwrap();
    let decisions = plan(&database_url(), &topology_v3).unwrap();
    assert!(
        decisions.iter().all(|d| d.action == Action::Keep),
        "{decisions:?}"
    );
    let said = decisions
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        said.contains("indexes recreated in place") && said.contains("readers changed in place"),
        "{said}"
    );
    let engine = start_engine(&text_v3, state.path());
    wait_for_tables(
        &expected_v2,
        Duration::from_secs(90),
        external_tables(&mut db, &topology_v3),
    );
    // The start prepares the tables with its first transaction (the snapshot).
    let wanted = [
        "user_directory_idx0",
        "user_directory_idx1",
        "user_directory_pkey",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let indexes: Vec<String> = db
            .query(
                "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = 'user_directory' ORDER BY 1",
                &[&t.schema],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if indexes == wanted {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "indexes: {indexes:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    engine.shutdown();
    cannot_read(
        READER,
        &table,
        "a reader taken out of the topology cannot read any more",
    );
}

#[test]
fn an_unreachable_database_makes_the_instance_not_ready() {
    let run = Run::new("pgdown");
    let t = user_directory(&run);
    let (events, _) = generate(5, 50, 300);
    publish(&t, &events);
    let state = tempfile::tempdir().unwrap();
    let engine = Engine::builder()
        .topology_str(t.text.clone())
        .brokers(brokers())
        .state_dir(state.path())
        .database_url("postgres://miroir:miroir@127.0.0.1:1/miroir")
        .epoch_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    wait_until(
        "the sink never reported the failure",
        Duration::from_secs(30),
        || engine.status().sink_failure.is_some(),
    );
    assert!(!engine.ready());
    let metrics = engine.metrics();
    assert_eq!(counter(&metrics, "miroir_sink_up", ""), 0, "{metrics}");
    assert!(
        counter(&metrics, "miroir_sink_retries_total", "") > 0,
        "{metrics}"
    );
    // Internal tables keep being served, once the instance has read its partitions.
    let expected = expected_tables(&t.topology, &events);
    let (first, _) = expected["user_contacts"].iter().next().unwrap();
    wait_until(
        "the instance read its partitions",
        Duration::from_secs(30),
        || engine.get("user_contacts", first).is_ok(),
    );
    let mut contacts = BTreeMap::new();
    for (key, row) in &expected["user_contacts"] {
        if engine.get("user_contacts", key).unwrap().is_some() {
            contacts.insert(key.clone(), row.clone());
        }
    }
    assert!(
        !contacts.is_empty(),
        "internal tables are served while the database is down"
    );
    engine.shutdown(); // gives up on the batches after a grace period; they stay in the outbox
}

#[test]
fn a_database_url_that_is_not_postgres_is_refused() {
    let run = Run::new("pgnone");
    let t = user_directory(&run);
    let state = tempfile::tempdir().unwrap();
    let builder = Engine::builder()
        .topology_str(t.text.replace(
            "sink = { postgres = { table = \"",
            "sink = { postgres = { url = \"mysql://nope\", table = \"",
        ))
        .brokers(brokers())
        .state_dir(state.path());
    let err = builder.start().err().expect("a bad url is refused");
    assert!(err.to_string().contains("postgres://"), "{err}");
}

#[test]
fn a_new_table_appears_complete() {
    let run = Run::new("pg-appears");
    let t = user_directory(&run);
    let mut db = pg();
    // A few events, all published before the start: the first epochs hold all of them, and
    // the tables must not be swapped in before their rows went through every stage.
    let (events, _) = generate(29, 12, 40);
    publish(&t, &events);
    let state = tempfile::tempdir().unwrap();
    let engine = start_engine(&t.text, state.path());
    let expected = only_external(expected_tables(&t.topology, &events), &t.topology);
    appears_complete(&mut db, &t.topology, &expected);
    engine.shutdown();
}
