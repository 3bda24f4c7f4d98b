//! Outages of the real services while events and commands flow.
//! - The broker stopped for 30 s, then for 90 s: the sources, the external-table sink and the
//!   command processor resume by themselves (no component fails for good, no restart of the
//!   instance), the tables equal the reference evaluator, and every command is answered once
//!   and applied at most once. A slow dependency keeps a command transaction open when the
//!   broker stops: the processor loses it, and starts again. Every malformed record has its
//!   copy in the errors topic (a copy lost in the outage holds its epoch back).
//! - PostgreSQL stopped for 90 s (longer than `max.poll.interval.ms`) while events keep
//!   coming: consumption pauses, the instance stays in its consumer group (its internal tables
//!   keep their rows and serve), and once the database is back the tables catch up.
//!
//! The tests here stop and start the shared services (`scripts/services`): they run one at a
//! time, and only when the services were started by that script.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::process::Command as Process;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use miroir::commands::{Client, Command, Dependency, DependencyError, Principal, Reply};
use miroir::miroir_engine::metrics::Metrics;
use miroir::miroir_engine::topology::command::CommandSpec;
use miroir::Engine;
use miroir_connectors::commands::wire::{header, text_header};
use miroir_connectors::kafka::output::{header as error_header, ERRORS_SUFFIX};
use miroir_connectors::kafka::tail::Tail;
use miroir_connectors::kafka::KafkaConfig;
use rdkafka::message::Message;
use serde_json::json;
use support::*;

/// One fault at a time: the services are shared.
static SERVICES: Mutex<()> = Mutex::new(());

/// Runs `scripts/services` with `args`; panics when it fails.
fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services");
    let out = Process::new(script).args(args).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scripts/services {args:?}: {said}");
    assert!(
        !said.contains("not started by this script"),
        "the tests can only stop services that scripts/services started: {said}"
    );
}

fn start(text: &str, state: &std::path::Path) -> Engine {
    Engine::builder()
        .topology_str(text)
        .brokers(brokers())
        .state_dir(state)
        .workers(2)
        .epoch_interval(Duration::from_millis(50))
        .start()
        .unwrap()
}

/// A dependency that takes 500 ms per command: a transaction is always open when the broker
/// stops, so the outage makes it fail (and its abort, and the rewind after it).
struct Slow;

impl Dependency for Slow {
    fn check(
        &self,
        _: &CommandSpec,
        _: &str,
        _: &serde_json::Value,
    ) -> Result<(), DependencyError> {
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }
}

/// Sends email changes to the active users `u-0`, `u-1`, `u-3`, `u-4` until `stop`, each
/// with a 5 s timeout; returns the replies.
fn send_until(client: &Client, m: &MasterTopology, stop: &AtomicBool) -> Vec<Reply> {
    let spec = m.topology.command("update_email").unwrap();
    let admin = Principal {
        id: "alice".into(),
        roles: vec!["user-admin".into()],
    };
    let mut replies = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let user = ["u-0", "u-1", "u-3", "u-4"][i % 4];
        let payload = json!({ "id": user, "email": format!("e{i}@example.org") });
        let command = Command::new(spec, &payload, admin.clone())
            .unwrap()
            .with_token(token_for(&admin));
        if let Ok(reply) = client.send(&command, Duration::from_secs(5)) {
            replies.push(reply);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    replies
}

/// The command ids of the committed entity events on `topic`, with how many events each.
fn applied_ids(topic: &str) -> HashMap<String, usize> {
    let mut tail = Tail::open(&KafkaConfig::new(brokers()), topic).unwrap();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let complete = tail
        .catch_up(Duration::from_secs(60), |m| {
            if let Some(id) = text_header(m, header::COMMAND_ID) {
                *ids.entry(id).or_default() += 1;
            }
            Ok(())
        })
        .unwrap();
    assert!(complete, "the entity topic was read to its end");
    ids
}

/// The (partition, offset) of every record of `t`'s user topic that does not decode, or whose
/// key is not its key column.
fn malformed_records(t: &TestTopology) -> BTreeSet<(i32, i64)> {
    let source = &t.topology.sources[0];
    let mut tail = Tail::open(&KafkaConfig::new(brokers()), &t.user_topic).unwrap();
    let mut out = BTreeSet::new();
    let complete = tail
        .catch_up(Duration::from_secs(60), |m| {
            let (Some(payload), Some(key)) = (m.payload(), m.key()) else {
                return Ok(());
            };
            let key = String::from_utf8_lossy(key);
            let bad = match miroir::miroir_engine::ingest::decode::decode(source, payload) {
                Ok(row) => row[source.key].to_key_text() != key,
                Err(_) => true,
            };
            if bad {
                out.insert((m.partition(), m.offset()));
            }
            Ok(())
        })
        .unwrap();
    assert!(complete, "the user topic was read to its end");
    out
}

/// The (partition, offset) of the source records copied to `t`'s users' errors topic.
fn copied_records(t: &TestTopology) -> BTreeSet<(i32, i64)> {
    let topic = format!("{}{ERRORS_SUFFIX}", t.user_topic);
    let mut tail = Tail::open(&KafkaConfig::new(brokers()), &topic).unwrap();
    let mut out = BTreeSet::new();
    let complete = tail
        .catch_up(Duration::from_secs(60), |m| {
            let at = |name| text_header(m, name).and_then(|v| v.parse().ok());
            let partition = at(error_header::SOURCE_PARTITION).expect("a partition header");
            out.insert((partition as i32, at(error_header::SOURCE_OFFSET).unwrap()));
            Ok(())
        })
        .unwrap();
    assert!(complete, "the errors topic was read to its end");
    out
}

/// The records on the command topic.
fn commands_sent(topic: &str) -> usize {
    let mut tail = Tail::open(&KafkaConfig::new(brokers()), topic).unwrap();
    let mut n = 0;
    let complete = tail
        .catch_up(Duration::from_secs(60), |m| {
            n += usize::from(m.payload().is_some());
            Ok(())
        })
        .unwrap();
    assert!(complete, "the command topic was read to its end");
    n
}

/// The members of consumer group `group`.
fn group_members(group: &str) -> usize {
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let groups = rdkafka::consumer::Consumer::fetch_group_list(
        &consumer,
        Some(group),
        Duration::from_secs(10),
    )
    .unwrap();
    groups.groups().iter().map(|g| g.members().len()).sum()
}

fn answered(master: &Engine) -> u64 {
    counter(&master.metrics(), "miroir_commands_total", "")
}

#[test]
fn a_broker_outage_of_30_then_90_seconds_stops_nothing_for_good() {
    let _one = SERVICES.lock().unwrap_or_else(|e| e.into_inner());
    // What the processor and the sink did is printed if the test fails.
    let filter = std::env::var("RUST_LOG")
        .unwrap_or_else(|_| "miroir_connectors::commands::processor=info,error".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
    let run = Run::new("fault-kafka");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 6);
    let app = user_directory(&format!("{run}-app"));
    let (events, _) = generate(41, 60, 900);
    let thirds: Vec<&[Event]> = events.chunks(events.len() / 3 + 1).collect();
    publish(&app, thirds[0]);
    let dir = tempfile::tempdir().unwrap();
    let master = Engine::builder()
        .topology_str(m.text.clone())
        .brokers(brokers())
        .state_dir(dir.path().join("master"))
        .auth(test_auth())
        .epoch_interval(Duration::from_millis(50))
        .dependency(Arc::new(Slow))
        .start()
        .unwrap();
    let directory = start(&app.text, &dir.path().join("app"));
    assert!(master.wait_ready(Duration::from_secs(60)), "master ready");
    let config = KafkaConfig::new(brokers());
    let client =
        Arc::new(Client::start(&config, "fault-test", Metrics::new().commands.clone()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (client, stop) = (client.clone(), stop.clone());
        let m = user_referential(&run);
        std::thread::spawn(move || send_until(&client, &m, &stop))
    };
    let mut db = pg();
    let mut published = thirds[0].len();
    for (outage, next) in [(30, thirds[1]), (90, thirds[2])] {
        wait_until("commands are answered", Duration::from_secs(60), || {
            answered(&master) > 0
        });
        services(&["down", "kafka"]);
        std::thread::sleep(Duration::from_secs(outage));
        for engine in [&master, &directory] {
            assert_eq!(
                engine.failure(),
                None,
                "no component gave up after {outage} s"
            );
        }
        services(&["up"]);
        publish(&app, next);
        published += next.len();
        let expected = expected_tables(&app.topology, &events[..published]);
        wait_for_tables(&expected, Duration::from_secs(120), |name| {
            table_rows(&directory, &mut db, name)
        });
        let before = answered(&master);
        wait_until(
            &format!("commands are answered again after a {outage} s outage"),
            Duration::from_secs(120),
            || answered(&master) > before,
        );
    }
    stop.store(true, Ordering::SeqCst);
    let replies = sender.join().unwrap();
    assert!(
        replies.iter().any(|r| matches!(r, Reply::Accepted { .. })),
        "{replies:?}"
    );
    let sent = commands_sent(&m.command_topic);
    wait_until(
        "every command record is answered",
        Duration::from_secs(60),
        || answered(&master) as usize >= sent,
    );
    assert_eq!(
        answered(&master) as usize,
        sent,
        "each command answered once"
    );
    let ids = applied_ids(&m.user_topic);
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "commands applied twice: {twice:?}");
    for engine in [&master, &directory] {
        assert_eq!(engine.failure(), None);
    }
    let malformed = malformed_records(&app);
    assert!(
        !malformed.is_empty(),
        "the generator makes malformed events"
    );
    let copied = copied_records(&app);
    let lost: Vec<_> = malformed.difference(&copied).collect();
    assert!(
        lost.is_empty(),
        "malformed records without a copy: {lost:?}"
    );
    let restarts = counter(
        &master.metrics(),
        "miroir_command_processor_restarts_total",
        "",
    );
    assert!(
        restarts >= 1,
        "the processor lost Kafka and started again: {restarts}"
    );
    Arc::try_unwrap(client).ok().unwrap().shutdown();
    directory.shutdown();
    master.shutdown();
}

#[test]
fn a_postgres_outage_of_90_seconds_pauses_consumption_and_keeps_the_group() {
    let _one = SERVICES.lock().unwrap_or_else(|e| e.into_inner());
    let run = Run::new("fault-pg");
    let app = user_directory(&run);
    let (events, _) = generate(43, 300, 20_000);
    let (first, _) = events.split_at(2000);
    publish(&app, first);
    let dir = tempfile::tempdir().unwrap();
    // Small inboxes and short epochs: they fill within the outage, as large ones would with
    // more traffic.
    let engine = Engine::builder()
        .topology_str(app.text.clone())
        .brokers(brokers())
        .state_dir(dir.path())
        .workers(2)
        .epoch_interval(Duration::from_millis(50))
        .max_epoch_interval(Duration::from_millis(100))
        .inbox_bytes(16 * 1024)
        .start()
        .unwrap();
    let mut db = pg();
    let before = expected_tables(&app.topology, first);
    wait_for_tables(&before, Duration::from_secs(90), |name| {
        table_rows(&engine, &mut db, name)
    });
    drop(db);

    services(&["down", "postgres"]);
    let outage = std::time::Instant::now();
    // Events keep coming throughout the outage.
    let paused = || counter(&engine.metrics(), "miroir_source_paused", "") == 1;
    let mut published = first.len();
    let mut was_paused = false;
    while outage.elapsed() < Duration::from_secs(90) {
        let next = (published + 200).min(events.len());
        publish(&app, &events[published..next]);
        published = next;
        was_paused |= paused();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(was_paused, "consumption paused while the database was down");
    // Still in the group (a member that stops polling for max.poll.interval.ms leaves it,
    // and the revocation empties its tables): the internal table keeps its rows and serves.
    assert_eq!(
        group_members(&app.topology.name),
        1,
        "the instance left its group"
    );
    let internal = internal_rows(&engine, "user_contacts");
    assert!(
        internal.len() >= before["user_contacts"].len() / 2,
        "{} rows",
        internal.len()
    );
    assert_eq!(engine.failure(), None);
    assert!(paused(), "still paused while the database is down");
    publish(&app, &events[published..]);
    assert_eq!(engine.failure(), None);

    services(&["up"]);
    let mut db = pg();
    let after = expected_tables(&app.topology, &events);
    wait_for_tables(&after, Duration::from_secs(120), |name| {
        table_rows(&engine, &mut db, name)
    });
    wait_until("consumption resumes", Duration::from_secs(30), || !paused());
    engine.shutdown();
}
