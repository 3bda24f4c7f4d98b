//! Several `miroir run` processes on one topology act as one table service: the source
//! partitions spread over them, each instance publishes what it owns, and any instance answers
//! any key, forwarding the query to the owner of the key's partition.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::cluster::*;
use support::*;

/// The partitions of `topic` the instance on `port` says it owns, if it answers.
fn owned(client: &reqwest::blocking::Client, port: u16, topic: &str) -> Option<Vec<u64>> {
    let (status, view) = get(client, port, "/v1/cluster");
    if status != 200 {
        return None;
    }
    let me = view["instance"].as_str()?;
    let mine = view["instances"]
        .as_array()?
        .iter()
        .find(|m| m["instance"] == me)?;
    Some(
        mine["partitions"][topic]
            .as_array()?
            .iter()
            .filter_map(|p| p.as_u64())
            .collect(),
    )
}

/// `user_contacts` as the reference evaluates `events`, by key, and every user key of the
/// events, with a row or not.
fn contacts(
    t: &TestTopology,
    events: &[Event],
) -> (BTreeMap<String, serde_json::Value>, BTreeSet<String>) {
    let expected = expected_tables(&t.topology, events)
        .remove("user_contacts")
        .unwrap();
    let keys = events
        .iter()
        .filter(|e| e.source == 0)
        .map(|e| e.key.clone())
        .collect();
    (expected, keys)
}

/// What each test starts from: a run of the app topology with its internal table alone, its
/// file, events published, and the rows they make.
struct Setup {
    /// Deletes the run's topics when dropped.
    run: Run,
    t: TestTopology,
    dir: tempfile::TempDir,
    /// The topology file.
    file: std::path::PathBuf,
    /// `user_contacts` as the reference evaluates it, by key.
    expected: BTreeMap<String, serde_json::Value>,
    /// Every user key of the events, with a row or not.
    keys: BTreeSet<String>,
    /// The events published.
    events: Vec<Event>,
    client: reqwest::blocking::Client,
}

impl Setup {
    /// Publishes `n` events over `users` users, generated from `seed`, for a run named
    /// after `name`.
    fn new(name: &str, seed: u64, users: u64, n: usize) -> Setup {
        let run = Run::new(name);
        let t = with_internal_table_only(user_directory(&run));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("topology.toml");
        std::fs::write(&file, &t.text).unwrap();
        let (events, _) = generate(seed, users, n);
        publish(&t, &events);
        let (expected, keys) = contacts(&t, &events);
        Setup {
            run,
            t,
            dir,
            file,
            expected,
            keys,
            events,
            client: reqwest::blocking::Client::new(),
        }
    }
}

/// Publishes `n` more events over `users` users, generated from `seed`, after `events`;
/// returns every event so far, with `user_contacts` as the reference evaluates them and every
/// user key (see [`contacts`]).
fn publish_more(
    t: &TestTopology,
    events: Vec<Event>,
    (seed, users, n): (u64, u64, usize),
) -> (
    Vec<Event>,
    BTreeMap<String, serde_json::Value>,
    BTreeSet<String>,
) {
    let (more, _) = generate(seed, users, n);
    publish(t, &more);
    let all: Vec<Event> = events.into_iter().chain(more).collect();
    let (expected, keys) = contacts(t, &all);
    (all, expected, keys)
}

#[test]
fn three_instances_answer_every_key_on_every_instance() {
    let Setup {
        run: _run,
        t,
        dir,
        file,
        expected,
        mut keys,
        client,
        ..
    } = Setup::new("cluster", 5, 200, 3000);
    let instances: Vec<Instance> = (0..3)
        .map(|i| start(dir.path(), &file, &i.to_string()))
        .collect();
    // And a key that never existed.
    keys.insert("u-never".into());
    let all: Vec<&Instance> = instances.iter().collect();
    let served_by = wait_for_every_key(&client, &all, &t.user_topic, &expected, &keys);
    assert_eq!(
        served_by.len(),
        3,
        "each instance served the keys of its partitions: {served_by:?}"
    );

    // Each counts the partitions its group assigned to it.
    for instance in &instances {
        let metrics = metrics(&client, instance.port);
        assert!(
            counter(&metrics, "miroir_source_partitions_assigned_total", "") > 0,
            "{metrics}"
        );
    }

    // `miroir status` prints the three, the one asked marked.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_miroir"))
        .args([
            "status",
            "--url",
            &format!("http://127.0.0.1:{}", instances[0].port),
        ])
        .output()
        .unwrap();
    assert!(status.status.success());
    let printed = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        printed.lines().count(),
        4,
        "a heading and three instances:\n{printed}"
    );
    assert_eq!(printed.matches("(asked)").count(), 1, "{printed}");
    assert!(
        printed.contains(&format!("{}: ", t.user_topic)),
        "{printed}"
    );

    // A scan from any instance, page by page, is the whole table in key order.
    for instance in &instances {
        let mut scanned = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = "/v1/tables/user_contacts/rows?limit=37".to_string();
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let (status, page) = get(&client, instance.port, &path);
            assert_eq!(status, 200, "{page}");
            scanned.extend(page["rows"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => break,
            }
        }
        let expected_rows: Vec<&serde_json::Value> = expected.values().collect();
        let scanned_rows: Vec<&serde_json::Value> = scanned.iter().collect();
        assert_eq!(
            scanned_rows, expected_rows,
            "the scan from port {} is the whole table, in key order",
            instance.port
        );
    }
    let (status, _) = get(
        &client,
        instances[0].port,
        "/v1/tables/user_contacts/rows?after=zz",
    );
    assert_eq!(status, 400, "a cursor no scan gave");

    // `local=true` answers from the instance's own state: a key another instance owns is
    // not there.
    let (key, _) = expected.iter().next().unwrap();
    let answers: Vec<u16> = instances
        .iter()
        .map(|i| {
            get(
                &client,
                i.port,
                &format!("/v1/tables/user_contacts/rows/{key}?local=true"),
            )
            .0
        })
        .collect();
    assert_eq!(
        answers.iter().filter(|s| **s == 200).count(),
        1,
        "one instance holds the key: {answers:?}"
    );
    assert_eq!(answers.iter().filter(|s| **s == 404).count(), 2);
}

#[test]
fn an_instance_killed_and_replaced_by_a_fresh_one_never_answers_a_wrong_row() {
    let Setup {
        run: _run,
        t,
        dir,
        file,
        expected,
        keys,
        client,
        ..
    } = Setup::new("cluster-kill", 7, 200, 3000);
    let a = start(dir.path(), &file, "a");
    let mut b = start(dir.path(), &file, "b");
    wait_for_every_key(&client, &[&a, &b], &t.user_topic, &expected, &keys);

    // A client asks the surviving instance for every key, over and over, during the whole
    // episode: an answer is the right row, the right 404, or a 503 to ask again.
    let asking = Asking::start(a.port, &expected, &keys);
    std::thread::sleep(Duration::from_secs(1));
    b.child.kill().unwrap(); // SIGKILL
    b.child.wait().unwrap();
    let c = start(dir.path(), &file, "c");
    wait_for_every_key(&client, &[&a, &c], &t.user_topic, &expected, &keys);
    let answers = asking.stop();
    assert!(answers.right > keys.len(), "answers came: {answers:?}");
    assert!(
        answers.unavailable > 0,
        "the killed instance's partitions were unavailable for a while"
    );
    assert_eq!(answers.stale, 0, "no standby, no stale answer");
}

/// How the answers of a client asking for every key over and over went.
#[derive(Debug, Default)]
struct Answers {
    /// The right row (or the right 404).
    right: usize,
    /// Of those, rows marked stale (a standby's).
    stale: usize,
    /// 503: ask again.
    unavailable: usize,
}

/// A client asking one instance for every key, over and over, on its own thread.
struct Asking {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Answers, Vec<String>)>,
}

impl Asking {
    /// Starts asking the instance on `port` for each of `keys`, whose rows are `expected`.
    fn start(
        port: u16,
        expected: &BTreeMap<String, serde_json::Value>,
        keys: &BTreeSet<String>,
    ) -> Asking {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (stop, expected, keys) = (stop.clone(), expected.clone(), keys.clone());
            move || {
                let client = reqwest::blocking::Client::new();
                let (mut answers, mut wrong) = (Answers::default(), Vec::new());
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    for key in &keys {
                        let path = format!("/v1/tables/user_contacts/rows/{key}");
                        let (status, answer) = get(&client, port, &path);
                        match (expected.get(key), status) {
                            (Some(row), 200) if &answer["row"] == row => {
                                answers.right += 1;
                                if answer["freshness"]["stale"] == true
                                    && answer["freshness"]["committed_at"].is_null()
                                {
                                    answers.stale += 1;
                                }
                            }
                            (None, 404) => answers.right += 1,
                            (_, 503) => answers.unavailable += 1,
                            _ => wrong.push(format!("{key}: {status} {answer}")),
                        }
                    }
                }
                (answers, wrong)
            }
        });
        Asking { stop, thread }
    }

    /// Stops asking; fails on any wrong answer.
    fn stop(self) -> Answers {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (answers, wrong) = self.thread.join().unwrap();
        assert!(
            wrong.is_empty(),
            "{} wrong answers ({answers:?}), first: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(3)]
        );
        answers
    }
}

#[test]
fn an_instance_restarted_with_its_instance_id_gets_its_partitions_back_without_a_rebalance() {
    restart_keeps_partitions("classic");
}

#[test]
fn with_the_consumer_protocol_a_restart_with_the_same_instance_id_moves_no_partition() {
    restart_keeps_partitions("consumer");
}

/// Two static members with group protocol `protocol`; one stops cleanly and starts again on
/// its state directory and id, and gets its partitions back while the other keeps its own.
fn restart_keeps_partitions(protocol: &str) {
    let with = |id| ["--instance-id", id, "--group-protocol", protocol];
    let Setup {
        run: _run,
        t,
        dir,
        file,
        expected,
        keys,
        client,
        ..
    } = Setup::new(&format!("cluster-static-{protocol}"), 9, 100, 1000);
    // The first member of the group leads it; a restarted leader makes Kafka's group
    // coordinator run one assignment again, which an instance that does not lead is spared.
    let a = start_on(dir.path(), &file, "a", free_port(), &with("a"));
    wait_for_every_key(&client, &[&a], &t.user_topic, &expected, &keys);
    let b_port = free_port();
    let mut b = start_on(dir.path(), &file, "b", b_port, &with("b"));
    wait_for_every_key(&client, &[&a, &b], &t.user_topic, &expected, &keys);
    let a_owns = owned(&client, a.port, &t.user_topic).unwrap();
    let b_owns = owned(&client, b.port, &t.user_topic).unwrap();

    // A clean stop and a start on the same state directory and id, within
    // `session.timeout.ms`: the other instance keeps its partitions all along.
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &b.child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    assert!(b.child.wait().unwrap().success(), "a clean stop exits 0");
    drop(b);
    let b = start_on(dir.path(), &file, "b", b_port, &with("b"));
    let back = Instant::now() + Duration::from_secs(60);
    while owned(&client, b.port, &t.user_topic).as_ref() != Some(&b_owns) {
        assert_eq!(
            owned(&client, a.port, &t.user_topic).as_ref(),
            Some(&a_owns),
            "the other instance's partitions moved"
        );
        assert!(
            Instant::now() < back,
            "the restarted instance never got its partitions back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(owned(&client, a.port, &t.user_topic), Some(a_owns));
    wait_for_every_key(&client, &[&a, &b], &t.user_topic, &expected, &keys);
}

#[test]
fn the_embedded_engine_asks_the_owner_of_a_key_it_does_not_own() {
    let Setup {
        run: _run,
        t,
        dir,
        expected,
        ..
    } = Setup::new("cluster-embedded", 11, 100, 1000);
    let engines: Vec<miroir::Engine> = ["a", "b"]
        .iter()
        .map(|name| {
            miroir::Engine::builder()
                .topology_str(t.text.clone())
                .brokers(brokers())
                .state_dir(dir.path().join(name))
                .listen("127.0.0.1:0".parse().unwrap())
                .epoch_interval(Duration::from_millis(50))
                .start()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    for engine in &engines {
        loop {
            let answers: Vec<_> = expected
                .iter()
                .map(|(key, row)| (engine.get("user_contacts", key), row))
                .collect();
            let right = answers
                .iter()
                .filter(|(a, row)| matches!(a, Ok(Some(a)) if &a.row == *row))
                .count();
            let served: BTreeSet<String> = answers
                .iter()
                .filter_map(|(a, _)| a.as_ref().ok()?.as_ref().map(|a| a.served_by.clone()))
                .collect();
            if right == expected.len() && served.len() == 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{right} of {} keys right, served by {served:?}",
                expected.len()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(engine.get("user_contacts", "u-never").unwrap().is_none());
    }
}

#[test]
fn a_query_with_min_offset_or_min_version_waits_until_that_write_is_applied() {
    let Setup {
        run: _run,
        t,
        dir,
        file,
        expected,
        keys,
        client,
        ..
    } = Setup::new("cluster-min-offset", 13, 50, 300);
    let a = start(dir.path(), &file, "a");
    let b = start(dir.path(), &file, "b");
    wait_for_every_key(&client, &[&a, &b], &t.user_topic, &expected, &keys);

    // A write, and at once a read of it on each instance (one of them forwards it): no
    // polling, the answer waits for the record.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let payload = r#"{"id":"u-new","email":"New@Example.org","name":"New","department_id":"d-1","active":true,"version":1,"event_type":"created","updated_at":"2026-01-01T00:00:00Z"}"#;
    let delivered = block_on(
        producer.send(
            rdkafka::producer::FutureRecord::to(&t.user_topic)
                .key("u-new")
                .payload(payload),
            Duration::from_secs(10),
        ),
    );
    let (partition, offset) = delivered
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| e)
        .unwrap();
    for instance in [&a, &b] {
        let (status, answer) = get(
            &client,
            instance.port,
            &format!(
                "/v1/tables/user_contacts/rows/u-new?min_offset={partition}:{offset}&wait=10s"
            ),
        );
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["row"]["email"], "new@example.org");
    }
    let (status, answer) = get(
        &client,
        a.port,
        &format!(
            "/v1/tables/user_contacts/rows/u-new?min_offset={partition}:{}&wait=200ms",
            offset + 1000
        ),
    );
    assert_eq!(status, 503, "a record not there yet: {answer}");
    assert!(answer["applied_up_to"].is_i64(), "how far it got: {answer}");
    let (status, _) = get(
        &client,
        a.port,
        "/v1/tables/user_contacts/rows/u-new?min_offset=x",
    );
    assert_eq!(status, 400);

    // The same by the entity's version (the source's late.order_by), as a command's reply
    // gives it.
    let payload = payload
        .replace(r#""version":1"#, r#""version":2"#)
        .replace("New@Example.org", "second@example.org");
    block_on(
        producer.send(
            rdkafka::producer::FutureRecord::to(&t.user_topic)
                .key("u-new")
                .payload(&payload),
            Duration::from_secs(10),
        ),
    )
    .map_err(|(e, _)| e)
    .unwrap();
    for instance in [&a, &b] {
        let path = "/v1/tables/user_contacts/rows/u-new?min_version=2&wait=10s";
        let (status, answer) = get(&client, instance.port, path);
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["row"]["email"], "second@example.org");
    }
    let path = "/v1/tables/user_contacts/rows/u-new?min_version=3&wait=200ms";
    let (status, answer) = get(&client, b.port, path);
    assert_eq!(status, 503, "a version not there yet: {answer}");
    assert_eq!(answer["applied_up_to"], "2", "how far it got: {answer}");
    for bad in ["min_version=two", "min_version=2&min_offset=0:1"] {
        let (status, answer) = get(
            &client,
            b.port,
            &format!("/v1/tables/user_contacts/rows/u-new?{bad}"),
        );
        assert_eq!(status, 400, "{bad}: {answer}");
    }
}

#[test]
fn a_fresh_instance_restores_its_partitions_from_their_changelogs_not_their_topics() {
    let Setup {
        run: _run,
        t,
        dir,
        file,
        expected,
        keys,
        events,
        client,
    } = Setup::new("cluster-changelog", 11, 150, 3000);
    let mut a = start(dir.path(), &file, "a");
    wait_for_every_key(&client, &[&a], &t.user_topic, &expected, &keys);
    a.child.kill().unwrap(); // SIGKILL
    a.child.wait().unwrap();
    // Nothing is left to read in the source topics: only the changelogs hold the state,
    // including the order values that make the late events below late.
    delete_every_record(&[&t.user_topic, &t.department_topic]);

    let b = start(dir.path(), &file, "b");
    wait_for_every_key(&client, &[&b], &t.user_topic, &expected, &keys);
    let metrics = metrics(&client, b.port);
    assert!(
        counter(&metrics, "miroir_changelog_restored_records_total", "") > 0,
        "restored from the changelogs"
    );

    // More events on the same keys, many older than what the changelog holds: the tables
    // go on as the reference evaluates every event, the deleted ones included.
    let (_, expected, keys) = publish_more(&t, events, (12, 150, 1500));
    wait_for_every_key(&client, &[&b], &t.user_topic, &expected, &keys);
}

#[test]
fn a_standby_promoted_when_its_owner_dies_equals_the_reference() {
    let Setup {
        run: _run,
        t,
        dir,
        file,
        expected,
        keys,
        events,
        client,
    } = Setup::new("cluster-standby", 13, 150, 3000);
    let with = |id| ["--instance-id", id, "--standby-replicas", "1"];
    let a = start_on(dir.path(), &file, "a", free_port(), &with("a"));
    let mut b = start_on(dir.path(), &file, "b", free_port(), &with("b"));
    wait_for_every_key(&client, &[&a, &b], &t.user_topic, &expected, &keys);

    // More events while both run: the standby follows changelogs that move.
    let (all, expected, keys) = publish_more(&t, events, (14, 150, 1500));
    wait_for_every_key(&client, &[&a, &b], &t.user_topic, &expected, &keys);
    wait_until(
        "a stands by for b's partitions, caught up",
        Duration::from_secs(60),
        || {
            let view = get(&client, a.port, "/v1/cluster").1;
            let record = |id: &str| {
                view["instances"]
                    .as_array()
                    .and_then(|l| l.iter().find(|m| m["instance"] == id).cloned())
                    .unwrap_or_default()
            };
            let (of_a, of_b) = (record("a"), record("b"));
            of_b["partitions"][&t.user_topic].as_array().is_some()
                && of_a["standby"][&t.user_topic] == of_b["partitions"][&t.user_topic]
                && of_a["standby_lag"] == 0
        },
    );

    // A client asks the survivor for every key during the episode: until it owns b's
    // partitions, their rows come from its standby replica, marked stale.
    let asking = Asking::start(a.port, &expected, &keys);
    std::thread::sleep(Duration::from_secs(1));
    b.child.kill().unwrap(); // SIGKILL
    b.child.wait().unwrap();
    wait_for_every_key(&client, &[&a], &t.user_topic, &expected, &keys);
    let answers = asking.stop();
    assert!(answers.stale > 0, "the standby answered: {answers:?}");
    let metrics = metrics(&client, a.port);
    let promotions = counter(&metrics, "miroir_standby_promotions_total", "");
    let followed = counter(&metrics, "miroir_standby_records_total", "");
    let restored = counter(&metrics, "miroir_changelog_restored_records_total", "");
    assert!(
        promotions >= 2,
        "b's partitions came to their standby: {promotions}\n{}",
        a.log_tail()
    );
    assert!(
        restored * 10 <= followed,
        "the takeover read what the standby had not: {restored} restored, {followed} followed"
    );

    // Late and new events on the same keys: the promoted state goes on as the reference.
    let (_, expected, keys) = publish_more(&t, all, (15, 150, 1500));
    wait_for_every_key(&client, &[&a], &t.user_topic, &expected, &keys);
}

#[test]
fn with_the_consumer_protocol_a_joining_instance_moves_only_the_partitions_it_takes() {
    let Setup {
        run: _run,
        t,
        dir,
        file,
        expected,
        keys,
        client,
        ..
    } = Setup::new("cluster-coop", 17, 200, 3000);
    let protocol = ["--group-protocol", "consumer"];
    let a = start_on(dir.path(), &file, "a", free_port(), &protocol);
    wait_for_every_key(&client, &[&a], &t.user_topic, &expected, &keys);
    let b = start_on(dir.path(), &file, "b", free_port(), &protocol);
    wait_for_every_key(&client, &[&a, &b], &t.user_topic, &expected, &keys);

    let topics = [&t.user_topic, &t.department_topic];
    let owns = |i: &Instance, topic: &str| owned(&client, i.port, topic).unwrap_or_default();
    for i in [&a, &b] {
        assert_eq!(
            owns(i, topics[0]),
            owns(i, topics[1]),
            "partition i of both sources on one instance"
        );
    }
    let metrics = metrics(&client, a.port);
    let taken: usize = topics.iter().map(|t| owns(&b, t).len()).sum();
    assert_eq!(
        counter(&metrics, "miroir_source_partitions_revoked_total", ""),
        taken as u64,
        "a gave up what b took, and kept the rest without a revocation"
    );
    assert_eq!(
        counter(&metrics, "miroir_source_partitions_assigned_total", ""),
        8,
        "a was assigned its partitions once"
    );
}

/// Deletes every record of every partition of `topics` (their start moves to their end).
fn delete_every_record(topics: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for topic in topics {
        let metadata = rdkafka::consumer::Consumer::fetch_metadata(
            &consumer,
            Some(topic),
            Duration::from_secs(10),
        )
        .unwrap();
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::End)
                .unwrap();
        }
    }
    let done = block_on(admin.delete_records(&tpl, &AdminOptions::new())).unwrap();
    for e in done.elements() {
        assert!(
            e.error().is_ok(),
            "{}/{}: {:?}",
            e.topic(),
            e.partition(),
            e.error()
        );
    }
}

/// Runs `future` to its end on this thread.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

#[test]
fn with_the_consumer_protocol_a_static_member_restarted_after_kill_9_stops_with_a_clear_error() {
    let Setup {
        run: _run,
        t,
        dir,
        file,
        expected,
        keys,
        client,
        ..
    } = Setup::new("cluster-unreleased", 9, 100, 1000);
    let with = ["--instance-id", "a", "--group-protocol", "consumer"];
    let mut a = start_on(dir.path(), &file, "a", free_port(), &with);
    wait_for_every_key(&client, &[&a], &t.user_topic, &expected, &keys);
    a.child.kill().unwrap(); // SIGKILL: the broker keeps the member until its session expires
    a.child.wait().unwrap();
    let mut again = start_on(dir.path(), &file, "a", free_port(), &with);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = again.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running:\n{}",
            again.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status.code(), Some(1), "{}", again.log_tail());
    assert!(
        again
            .log_tail()
            .contains("still has a member with this --instance-id"),
        "{}",
        again.log_tail()
    );
}
