//! Tables whose rows do not all follow one source key, across several `miroir run` processes:
//! GROUP BYs on non-key columns and joins on foreign keys (split into stages joined by
//! repartition topics) and joins with a global source (read whole by every instance) are
//! right on every instance, also after one is killed mid-stream, and after one paused long
//! enough to lose its partitions resumes (it stops instead of writing). A table computed
//! without stages (`--no-changelog`) is never answered partially: an instance that does not
//! hold every partition answers 503, and one that holds them all answers the reference's
//! rows.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::cluster::*;
use support::*;

/// Two internal tables joining the users with their department, keyed by the user: a LEFT
/// JOIN, and an inner join with the departments on the left.
const JOINED_TABLES: &str = r#"
[tables.user_departments]
query = """
SELECT u.id, u.name, coalesce(d.name, 'unassigned') AS department
FROM users u LEFT JOIN departments d ON u.department_id = d.id"""
store = "internal"

[tables.department_members]
query = """
SELECT u.id, d.id AS department_id, d.name AS department
FROM departments d JOIN users u ON u.department_id = d.id"""
store = "internal"
"#;

/// The app topology with the departments global and three internal tables over them: two
/// joins, and a GROUP BY over a join (split into stages reading the global source).
fn topology(run: &str) -> TestTopology {
    let mut t = with_internal_table_only(user_directory(run));
    let departments = "[sources.departments]\n";
    assert!(t.text.contains(departments), "the departments source moved");
    t.text = t
        .text
        .replace(departments, &format!("{departments}global = true\n"));
    t.text.push_str(JOINED_TABLES);
    t.text.push_str(
        r#"
[tables.users_per_department]
query = """
SELECT d.name AS department, count(*) AS users
FROM users u JOIN departments d ON u.department_id = d.id
GROUP BY d.name"""
store = "internal"
"#,
    );
    t.topology = miroir::miroir_engine::topology::Topology::parse("scale-out.toml", &t.text)
        .expect("the test topology plans");
    t
}

/// The app topology with six internal tables that need the rows of several partitions:
/// split into stages.
fn repartitioned(run: &str) -> TestTopology {
    let mut t = with_internal_table_only(user_directory(run));
    t.text.push_str(
        r#"
[tables.users_per_department]
query = """
SELECT d.name AS department, count(*) AS users, max(u.version) AS max_version
FROM users u JOIN departments d ON u.department_id = d.id
GROUP BY d.name"""
store = "internal"

[tables.department_sizes]
query = """
SELECT d.id, count(u.id) AS users, min(u.name) AS first_name
FROM departments d LEFT JOIN users u ON u.department_id = d.id
GROUP BY d.id"""
store = "internal"

[tables.users_per_department_id]
query = """
SELECT department_id, count(*) AS users, sum(CASE WHEN active THEN 1 ELSE 0 END) AS active
FROM users WHERE department_id IS NOT NULL
GROUP BY department_id"""
store = "internal"

[tables.same_version]
query = """
SELECT u.id, d.id AS department_id, u.version
FROM users u LEFT JOIN departments d ON u.version = d.version"""
store = "internal"
"#,
    );
    t.text.push_str(JOINED_TABLES);
    t.topology = miroir::miroir_engine::topology::Topology::parse("repartitioned.toml", &t.text)
        .expect("the test topology plans");
    for table in &t.topology.tables {
        assert!(
            t.topology.partitioned_by(table).is_some(),
            "{} is split",
            table.name
        );
    }
    t
}

/// The tables computed with the global source and right on every instance.
const JOINED: [&str; 3] = [
    "user_departments",
    "department_members",
    "users_per_department",
];

/// The split tables: GROUP BYs on non-key columns, a LEFT JOIN and an inner join on a foreign
/// key, and a LEFT JOIN keyed by neither side's key.
const SPLIT: [&str; 6] = [
    "users_per_department",
    "department_sizes",
    "users_per_department_id",
    "same_version",
    "user_departments",
    "department_members",
];

/// Waits until every instance answers every key of `tables` as the reference evaluates
/// `events` (and 404 for a key that never existed), and a scan of each table from every
/// instance gives the reference's rows: no row the reference does not have.
fn wait_for_every_table(
    client: &reqwest::blocking::Client,
    instances: &[&Instance],
    (t, tables): (&TestTopology, &[&str]),
    events: &[Event],
) {
    let expected = expected_tables(&t.topology, events);
    for table in tables {
        assert!(!expected[*table].is_empty(), "{table} has rows");
        let mut keys: BTreeSet<String> = expected[*table].keys().cloned().collect();
        let parts = t.topology.table(table).map_or(1, |t| t.key.len());
        keys.insert(vec!["never"; parts].join("|"));
        wait_for_every_row(
            client,
            instances,
            &t.user_topic,
            (table, &expected[*table]),
            &keys,
        );
        let rows: BTreeSet<String> = expected[*table].values().map(|r| r.to_string()).collect();
        for instance in instances {
            wait_for_scan(client, instance, table, &rows);
        }
    }
}

/// Waits until a scan of `table` from `instance` gives `expected` (each row's JSON text).
fn wait_for_scan(
    client: &reqwest::blocking::Client,
    instance: &Instance,
    table: &str,
    expected: &BTreeSet<String>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, page) = get(
            client,
            instance.port,
            &format!("/v1/tables/{table}/rows?limit=10000"),
        );
        let rows: BTreeSet<String> = page["rows"]
            .as_array()
            .map(|rows| rows.iter().map(|r| r.to_string()).collect())
            .unwrap_or_default();
        if status == 200 && rows == *expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "a scan of {table} from port {}: {status}\n extra: {:?}\n missing: {:?}\n{}",
            instance.port,
            rows.difference(expected).take(3).collect::<Vec<_>>(),
            expected.difference(&rows).take(3).collect::<Vec<_>>(),
            instance.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Publishes events generated from `seed` and starts `t` on three instances (`a`, `b`, `c`),
/// with their state directories under the returned one.
fn three_instances(t: &TestTopology, seed: u64) -> (tempfile::TempDir, Vec<Instance>, Vec<Event>) {
    let dir = instances_dir();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    let (events, _) = generate(seed, 200, 3000);
    publish(t, &events);
    let instances = ["a", "b", "c"]
        .iter()
        .map(|name| start(dir.path(), &file, name))
        .collect();
    (dir, instances, events)
}

#[test]
fn groupings_and_joins_on_non_key_columns_are_right_on_every_instance() {
    let run = Run::new("repartition");
    let t = repartitioned(&run);
    let (_dir, mut instances, events) = three_instances(&t, 13);
    let client = reqwest::blocking::Client::new();
    let all: Vec<&Instance> = instances.iter().collect();
    wait_for_every_table(&client, &all, (&t, &SPLIT), &events);

    let events = kill_one_mid_stream(&t, &mut instances, events, 14);
    let left: Vec<&Instance> = instances.iter().collect();
    wait_for_every_table(&client, &left, (&t, &SPLIT), &events);
}

#[test]
fn joins_with_a_global_source_are_right_on_every_instance() {
    let run = Run::new("scale-out");
    let t = topology(&run);
    let (_dir, mut instances, events) = three_instances(&t, 11);
    let client = reqwest::blocking::Client::new();
    let all: Vec<&Instance> = instances.iter().collect();
    wait_for_every_table(&client, &all, (&t, &JOINED), &events);

    // Every instance reads every department partition, and none owns them.
    for instance in &instances {
        let (_, view) = get(&client, instance.port, "/v1/cluster");
        for member in view["instances"].as_array().unwrap() {
            assert!(
                member["partitions"][&t.department_topic].is_null(),
                "a global source's partitions are nobody's: {view}"
            );
        }
    }

    // `kill -9` of one instance while more events come: the two left are right.
    let events = kill_one_mid_stream(&t, &mut instances, events, 12);
    let left: Vec<&Instance> = instances.iter().collect();
    wait_for_every_table(&client, &left, (&t, &JOINED), &events);
}

#[test]
fn tables_computed_without_stages_are_never_served_partly() {
    let run = Run::new("unsplit");
    let t = repartitioned(&run);
    let dir = instances_dir();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    let (events, _) = generate(15, 200, 3000);
    publish(&t, &events);
    let table = "users_per_department_id";
    let mut instances: Vec<Instance> = ["a", "b"]
        .iter()
        .map(|name| start_on(dir.path(), &file, name, free_port(), &["--no-changelog"]))
        .collect();
    let client = reqwest::blocking::Client::new();
    let expected = expected_tables(&t.topology, &events);
    let (department, _) = expected[table].iter().next().unwrap();

    // A GROUP BY on a non-key column needs the rows of every partition: while two instances
    // share them, neither answers.
    let views = || -> Vec<serde_json::Value> {
        let view = |i: &Instance| get(&client, i.port, "/v1/cluster").1;
        instances.iter().map(view).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !settled(&views(), &t.user_topic) {
        assert!(Instant::now() < deadline, "never settled: {:?}", views());
        std::thread::sleep(Duration::from_millis(500));
    }
    for instance in &instances {
        let (status, answer) = get(&client, instance.port, &row_path(table, department));
        assert_eq!(status, 503, "{answer}");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("computed without stages")),
            "{answer}"
        );
        let (status, _) = get(&client, instance.port, &format!("/v1/tables/{table}/rows"));
        assert_eq!(status, 503);
    }

    // Alone, an instance holds every partition: it answers the table as the reference.
    drop(instances.remove(1));
    let rows: BTreeSet<String> = expected[table].values().map(|r| r.to_string()).collect();
    wait_for_scan(&client, &instances[0], table, &rows);
}

#[test]
fn a_stage_reading_a_global_source_leaves_no_record_behind_when_its_partitions_move() {
    let run = Run::new("global-stage");
    let t = topology(&run);
    let dir = instances_dir();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    let (mut events, _) = generate(15, 200, 3000);
    publish(&t, &events);
    let mut instances: Vec<Instance> = ["a", "b"]
        .iter()
        .map(|name| start(dir.path(), &file, name))
        .collect();
    let client = reqwest::blocking::Client::new();
    let table = ["users_per_department"];
    let all: Vec<&Instance> = instances.iter().collect();
    wait_for_every_table(&client, &all, (&t, &table), &events);

    // `kill -9` of one, then every department renamed before its partitions move: their
    // next owner derives other groups than the ones the dead instance wrote, which it must
    // delete.
    let mut killed = instances.remove(1);
    killed.child.kill().unwrap(); // SIGKILL
    killed.child.wait().unwrap();
    let renames: Vec<Event> = (0..6)
        .map(|d| department(d, 1_000_000, &format!("Renamed {d}")))
        .collect();
    publish(&t, &renames);
    events.extend(renames);
    let left: Vec<&Instance> = instances.iter().collect();
    wait_for_every_table(&client, &left, (&t, &table), &events);
    assert!(
        std::fs::read_to_string(&left[0].log)
            .unwrap()
            .contains("the stage records its rows no longer derive are deleted"),
        "the moved partitions were swept"
    );
}

#[test]
fn a_paused_instance_whose_partitions_moved_writes_nothing_when_it_resumes() {
    let run = Run::new("zombie");
    let t = repartitioned(&run);
    let dir = instances_dir();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    let (mut events, _) = generate(21, 200, 3000);
    publish(&t, &events);
    let mut instances: Vec<Instance> = ["a", "b"]
        .iter()
        .map(|name| start(dir.path(), &file, name))
        .collect();
    let client = reqwest::blocking::Client::new();
    let tables = ["users_per_department_id", "users_per_department"];
    let all: Vec<&Instance> = instances.iter().collect();
    wait_for_every_table(&client, &all, (&t, &tables), &events);

    // `b` is paused in the middle of a stream of changes, with an epoch under way (its
    // transaction open or not, as it falls).
    let burst = std::thread::spawn({
        let t = t.clone();
        move || {
            let burst = later(generate(22, 200, 3000).0, 1_000_000);
            publish_paced(&t, &burst, Duration::from_millis(10));
            burst
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let b = instances[1].child.id().to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &b])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name} {b}");
    };
    signal("-STOP");
    events.extend(burst.join().unwrap());

    // `a` takes every partition over, and the same users change again: what `b` applied
    // before its pause is older than what `a` writes now.
    let a = [&instances[0]];
    wait_for_every_table(&client, &a, (&t, &tables), &events);
    let more = later(generate(23, 200, 1500).0, 2_000_000);
    publish(&t, &more);
    events.extend(more);
    wait_for_every_table(&client, &a, (&t, &tables), &events);

    // Resumed, `b` commits nothing, and stops, saying why: it notices it did not run long
    // enough to lose its place in the group, or the broker aborted the transaction the pause
    // caught open.
    signal("-CONT");
    let mut b = instances.remove(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = b.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "b goes on: {}", b.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(&b.log).unwrap();
    let refused = ["the process did not run for", "producer was fenced"]
        .iter()
        .any(|why| log.contains(why));
    assert!(!status.success() && refused, "{}", b.log_tail());
    let paused_log = b.log_tail();
    drop(b);
    let live: Vec<&Instance> = instances.iter().collect();
    let right = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for_every_table(&client, &live, (&t, &tables), &events)
    }));
    if right.is_err() {
        panic!(
            "wrong after the paused instance stopped\nits log:\n{paused_log}\nthe survivor's:\n{}",
            instances[0].log_tail()
        );
    }
}
