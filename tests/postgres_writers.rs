//! The external tables of `topologies/user-directory.toml` written by two `miroir run`
//! processes (the deployment `docker/compose.yaml` describes): each writes the rows of the
//! partitions it owns; the PostgreSQL tables equal the reference evaluator after both wrote,
//! after a `kill -9` of one writer mid-stream, and after a redeploy of both with a changed
//! query, whose table is rebuilt in one shadow table by both and swapped in once, while a
//! reader sees the old table or the new one, whole, and nothing else. And, with two sinks
//! alone: a claimed partition's rows are replaced, and its former writer's late batches leave
//! it alone; a table built through a stage is swapped in only once the stage's records another
//! instance wrote are read.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use miroir::miroir_engine::partition::partition_for_key;
use miroir::miroir_engine::sink::{Claim, Durable, ExternalSink, Offset, SinkBatch, TableChanges};
use miroir::miroir_engine::value::Value;
use miroir_connectors::postgres::sink::PostgresSink;
use support::cluster::*;
use support::*;

/// The instances named as writers of the topology's partitions in `miroir.offsets`.
fn writers(db: &mut postgres::Client, topology: &str) -> BTreeSet<String> {
    db.query(
        "SELECT DISTINCT instance FROM miroir.offsets WHERE topology = $1",
        &[&topology],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The last lines of each instance's log, and how it sees the group.
fn logs(instances: &[Instance]) -> String {
    let client = reqwest::blocking::Client::new();
    let tails: Vec<String> = instances
        .iter()
        .map(|i| {
            format!(
                "{}\n{}",
                i.log_tail(),
                get(&client, i.port, "/v1/cluster").1
            )
        })
        .collect();
    tails.join("\n---\n")
}

/// Stops `instance` with SIGTERM and waits for a clean exit.
fn stop(mut instance: Instance) {
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &instance.child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let exit = instance.child.wait().unwrap();
    assert!(
        exit.success(),
        "a clean stop exits 0: {}",
        instance.log_tail()
    );
}

/// Lines of the instances' logs under `dir` saying a rebuilt `table` was swapped in.
fn swaps(dir: &std::path::Path, table: &str) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            n += text
                .lines()
                .filter(|l| l.contains("rebuilt table swapped in") && l.contains(table))
                .count();
        }
    }
    n
}

/// Polls `table` of `topology` until `stop`; panics on a state that is neither `old` nor
/// `new`; returns how many times it saw each.
fn watch(
    topology: miroir::miroir_engine::topology::Topology,
    table: &'static str,
    (old, new): (
        BTreeMap<String, serde_json::Value>,
        BTreeMap<String, serde_json::Value>,
    ),
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let mut db = pg();
        let (mut seen_old, mut seen_new) = (0, 0);
        while !stop.load(Ordering::SeqCst) {
            let rows = pg_table(&mut db, &topology, table).expect("the table is always there");
            if rows == old {
                seen_old += 1;
            } else if rows == new {
                seen_new += 1;
            } else {
                panic!(
                    "a reader saw a table that is neither the old one nor the new one, whole: {}",
                    diff(&new, &rows)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (seen_old, seen_new)
    })
}

/// The flags `docker/compose.yaml` gives the app instances, after the topology file.
fn compose_flags() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/compose.yaml");
    let compose = std::fs::read_to_string(path).unwrap();
    let line = compose
        .lines()
        .find(|l| l.trim_start().starts_with("command:") && l.contains("user-directory.toml"))
        .expect("the app instances' command in docker/compose.yaml");
    let args: Vec<String> = serde_json::from_str(line.split_once(':').unwrap().1.trim()).unwrap();
    args[2..].to_vec()
}

#[test]
fn the_test_runs_the_app_instances_of_the_compose_file() {
    // `support::spawn` starts each `miroir run` with these flags (and the test's addresses).
    assert_eq!(compose_flags(), ["--workers", "2", "--epoch-ms", "50"]);
}

#[test]
fn two_writers_keep_the_external_tables_right_through_a_kill_and_a_redeploy() {
    let run = Run::new("writers");
    let t = user_directory(&run);
    let name = format!("it-{run}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    let (events, _) = generate(31, 200, 3000);
    publish(&t, &events);
    let mut instances = vec![start(dir.path(), &file, "a"), start(dir.path(), &file, "b")];
    let mut db = pg();

    // Both write, each its own partitions.
    let expected = only_external(expected_tables(&t.topology, &events), &t.topology);
    if let Err(e) = try_wait_for_tables(
        &expected,
        Duration::from_secs(120),
        external_tables(&mut db, &t.topology),
    ) {
        panic!("{e}\nlogs:\n{}", logs(&instances));
    }
    wait_until("both instances write", Duration::from_secs(60), || {
        writers(&mut db, &name).len() == 2
    });
    wait_for_tables(
        &expected,
        Duration::from_secs(60),
        external_tables(&mut db, &t.topology),
    );

    // `kill -9` of one writer mid-stream: the other takes its partitions over, replaces
    // their rows from the state it restores, and writes on.
    let events = kill_one_mid_stream(&t, &mut instances, events, 32);
    let expected = only_external(expected_tables(&t.topology, &events), &t.topology);
    if let Err(e) = try_wait_for_tables(
        &expected,
        Duration::from_secs(120),
        external_tables(&mut db, &t.topology),
    ) {
        panic!("{e}\nsurvivor's log:\n{}", logs(&instances));
    }
    assert_eq!(writers(&mut db, &name).len(), 1, "the survivor writes all");

    // A redeploy of both with a changed query: rebuilt by both in one shadow table, swapped
    // in once, while a reader polls it.
    let text_v2 = t.text.replace(
        "max(u.version) AS max_version,",
        "max(u.version) AS max_version, min(u.version) AS min_version,",
    );
    assert_ne!(text_v2, t.text);
    let topology_v2 = miroir::miroir_engine::topology::Topology::parse("t.toml", &text_v2).unwrap();
    let expected_v2 = only_external(expected_tables(&topology_v2, &events), &topology_v2);
    let table = "users_per_department";
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watcher = watch(
        topology_v2.clone(),
        table,
        (expected[table].clone(), expected_v2[table].clone()),
        stop_watching.clone(),
    );
    std::thread::sleep(Duration::from_millis(200));
    let swapped_before = swaps(dir.path(), table);
    for instance in instances.drain(..) {
        stop(instance);
    }
    std::fs::write(&file, &text_v2).unwrap();
    let instances = [start(dir.path(), &file, "a"), start(dir.path(), &file, "b")];
    if let Err(e) = try_wait_for_tables(
        &expected_v2,
        Duration::from_secs(120),
        external_tables(&mut db, &topology_v2),
    ) {
        panic!("{e}\nlogs:\n{}", logs(&instances));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop_watching.store(true, Ordering::SeqCst);
    let (old, new) = watcher.join().expect("the reader saw only whole tables");
    assert!(
        old > 0 && new > 0,
        "the reader saw the old table {old} times, the new one {new} times"
    );
    assert_eq!(
        swaps(dir.path(), table) - swapped_before,
        1,
        "the rebuilt table is swapped in once"
    );
    // Both write again once the group settled.
    wait_until("both instances write", Duration::from_secs(60), || {
        writers(&mut db, &name).len() == 2
    });
    wait_for_tables(
        &expected_v2,
        Duration::from_secs(60),
        external_tables(&mut db, &topology_v2),
    );
    for instance in instances {
        stop(instance);
    }
}

/// A topology whose one external table follows the partitions of its source's key, in a
/// schema of its own.
fn names_topology(run: &str) -> (Arc<miroir::miroir_engine::topology::Topology>, String) {
    one_table_topology(run, "names", "SELECT id, name FROM users")
}

/// A topology of source `users` (`id`, `name`) and one external table `table` computed by
/// `query`, in a schema of its own (returned).
fn one_table_topology(
    run: &str,
    table: &str,
    query: &str,
) -> (Arc<miroir::miroir_engine::topology::Topology>, String) {
    let schema = format!("it_{}", run.replace('-', "_"));
    let text = format!(
        r#"
name = "it-{run}"
[sources.users]
topic = "users-{run}"
key = "id"
columns = {{ id = "text", name = "text" }}
[tables.{table}]
query = "{query}"
sink = {{ postgres = {{ table = "{schema}.{table}" }} }}
"#
    );
    let topology = miroir::miroir_engine::topology::Topology::parse("t.toml", &text).unwrap();
    (Arc::new(topology), schema)
}

/// A batch of `names` rows: `(key, name)` upserts, claiming `claims` of the 4 partitions.
fn names_batch(
    topology: &miroir::miroir_engine::topology::Topology,
    sequence: u64,
    claims: &[u32],
    rows: &[(String, &str)],
) -> SinkBatch {
    let plan = topology.table("names").unwrap();
    let topic = &topology.sources[0].topic;
    SinkBatch {
        sequence,
        tables: vec![TableChanges {
            table: plan.name.clone(),
            definition: plan.definition(),
            upserts: rows
                .iter()
                .map(|(k, n)| vec![Value::Text(k.as_str().into()), Value::Text((*n).into())])
                .collect(),
            deletes: vec![],
        }],
        offsets: vec![],
        caught_up: true,
        claims: claims
            .iter()
            .map(|p| Claim {
                topic: topic.clone(),
                partition: *p,
                partitions: 4,
            })
            .collect(),
        written: vec![],
    }
}

#[test]
fn a_claimed_partition_is_replaced_and_its_former_writer_fenced() {
    let run = Run::new("fence");
    let (topology, schema) = names_topology(&run);
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let partition = |k: &String| partition_for_key(k.as_bytes(), 4);
    let named = |name: &'static str, keep: &dyn Fn(u32) -> bool| -> Vec<(String, &str)> {
        keys.iter()
            .filter(|k| keep(partition(k)))
            .map(|k| (k.clone(), name))
            .collect()
    };
    let mut a = PostgresSink::new(&database_url(), topology.clone(), "a").unwrap();
    let mut b = PostgresSink::new(&database_url(), topology.clone(), "b").unwrap();
    let done = Durable::done();

    // `a` claims every partition: its rows are the table (swapped in, complete).
    a.apply(
        &[names_batch(
            &topology,
            1,
            &[0, 1, 2, 3],
            &named("a1", &|_| true),
        )],
        &done,
    )
    .unwrap();
    // `b` claims partitions 2 and 3; a key of them was deleted while they moved (`b` does not
    // derive it again).
    let gone = keys.iter().find(|k| partition(k) == 3).unwrap().clone();
    let mut moved = named("b1", &|p| p >= 2);
    moved.retain(|(k, _)| *k != gone);
    b.apply(&[names_batch(&topology, 1, &[2, 3], &moved)], &done)
        .unwrap();
    // A late batch of `a` (made before the partitions moved) writes only its own partitions.
    a.apply(
        &[names_batch(&topology, 2, &[], &named("a2", &|_| true))],
        &done,
    )
    .unwrap();

    let mut db = pg();
    let rows: BTreeMap<String, String> = db
        .query(&format!("SELECT id, name FROM \"{schema}\".names"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: BTreeMap<String, String> = keys
        .iter()
        .filter(|k| **k != gone)
        .map(|k| {
            (
                k.clone(),
                if partition(k) >= 2 { "b1" } else { "a2" }.to_string(),
            )
        })
        .collect();
    assert_eq!(rows, expected);
    let writers: BTreeMap<i32, String> = db
        .query(
            "SELECT partition, instance FROM miroir.offsets WHERE topology = $1",
            &[&topology.name],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        writers,
        BTreeMap::from([
            (0, "a".to_string()),
            (1, "a".to_string()),
            (2, "b".to_string()),
            (3, "b".to_string())
        ])
    );
}

/// A batch of no rows that says it caught up, with its claims (each topic's partitions, 4 of
/// each), its offsets (`(topic, partition, last offset)`) and the stage records it wrote
/// (`(topic, partition, end)`).
fn caught_up_batch(
    sequence: u64,
    claims: &[&str],
    offsets: &[(&str, u32, i64)],
    written: &[(&str, u32, i64)],
) -> SinkBatch {
    let offset = |(topic, partition, offset): &(&str, u32, i64)| Offset {
        topic: topic.to_string(),
        partition: *partition,
        offset: *offset,
    };
    SinkBatch {
        sequence,
        tables: vec![],
        offsets: offsets.iter().map(offset).collect(),
        caught_up: true,
        claims: claims
            .iter()
            .flat_map(|topic| {
                (0..4).map(|partition| Claim {
                    topic: topic.to_string(),
                    partition,
                    partitions: 4,
                })
            })
            .collect(),
        written: written.iter().map(offset).collect(),
    }
}

#[test]
fn a_table_built_through_a_stage_waits_for_the_stage_records_another_instance_wrote() {
    let run = Run::new("stage-writes");
    let (topology, schema) = one_table_topology(
        &run,
        "per_name",
        "SELECT name, count(*) AS n FROM users GROUP BY name",
    );
    let users = topology.sources[0].topic.as_str();
    let stage = topology.sources[topology.repartitions[0].source]
        .topic
        .as_str();
    let mut a = PostgresSink::new(&database_url(), topology.clone(), "a").unwrap();
    let mut b = PostgresSink::new(&database_url(), topology.clone(), "b").unwrap();
    let done = Durable::done();
    let mut db = pg();
    let mut swapped = || -> bool {
        let table = format!("{schema}.per_name");
        db.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .unwrap()
            .get(0)
    };

    // `b` caught up after writing stage records up to offset 20 of partition 0.
    b.apply(&[caught_up_batch(1, &[], &[], &[(stage, 0, 20)])], &done)
        .unwrap();
    // `a` writes every partition and caught up, but read partition 0 of the stage up to 9
    // only: the table is not complete.
    let read_to = |last| [(users, 0, 5), (stage, 0, last)];
    a.apply(
        &[caught_up_batch(1, &[users, stage], &read_to(9), &[])],
        &done,
    )
    .unwrap();
    assert!(!swapped(), "swapped before the stage records were read");
    // Once `a` read them, it is.
    a.apply(&[caught_up_batch(2, &[], &read_to(19), &[])], &done)
        .unwrap();
    assert!(swapped(), "the table was not swapped in");
}
