//! Commands and replies against the real broker: every outcome, duplicate delivery, a failing
//! dependency (retries, dead letters, replay in order), concurrent clients, a client timing
//! out while the processor is stopped, a processor killed with SIGKILL mid-stream, and a failed
//! transaction taking the one prepared after it down with it; commands are sent with bearer
//! tokens, and claimed principals count for nothing.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use miroir::commands::{
    self, Client, Command, Dependency, DependencyError, Principal, Replayed, Reply, SendError,
};
use miroir::miroir_engine::metrics::Metrics;
use miroir::miroir_engine::topology::command::CommandSpec;
use miroir::Engine;
use miroir_connectors::commands::wire::{header, text_header};
use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::tail::Tail;
use miroir_connectors::kafka::KafkaConfig;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use serde_json::json;
use support::*;

const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

fn admin() -> Principal {
    Principal {
        id: "alice".into(),
        roles: vec!["user-admin".into()],
    }
}

fn user(id: &str) -> Principal {
    Principal {
        id: id.into(),
        roles: vec![],
    }
}

/// A command updating `id`'s email, with the bearer token of `who`.
fn update(spec: &CommandSpec, id: &str, email: &str, who: Principal) -> Command {
    let token = token_for(&who);
    Command::new(spec, &json!({ "id": id, "email": email }), who)
        .unwrap()
        .with_token(token)
}

/// The operator who replays parked commands.
fn operator() -> Principal {
    Principal {
        id: "ops".into(),
        roles: vec!["miroir-operator".into()],
    }
}

fn start_master(
    m: &MasterTopology,
    state: &std::path::Path,
    dependency: Option<Arc<dyn Dependency>>,
) -> Engine {
    let mut builder = Engine::builder()
        .topology_str(m.text.clone())
        .brokers(brokers())
        .state_dir(state)
        .auth(test_auth())
        .epoch_interval(Duration::from_millis(50));
    if let Some(d) = dependency {
        builder = builder.dependency(d);
    }
    let engine = builder.start().unwrap();
    assert!(
        engine.wait_ready(Duration::from_secs(60)),
        "the master never became ready"
    );
    engine
}

fn master_row(master: &Engine, id: &str) -> serde_json::Value {
    master
        .get("users_by_id", id)
        .unwrap()
        .map(|a| a.row)
        .unwrap_or(serde_json::Value::Null)
}

/// The committed entity events written by commands: (partition, offset) -> (key, command id,
/// payload).
fn command_events(topic: &str) -> BTreeMap<(i32, i64), (String, String, serde_json::Value)> {
    let mut tail = Tail::open(&KafkaConfig::new(brokers()), topic).unwrap();
    let mut out = BTreeMap::new();
    assert!(tail
        .catch_up(Duration::from_secs(30), |m| {
            if let (Some(id), Some(payload)) = (text_header(m, header::COMMAND_ID), m.payload()) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                out.insert(
                    (m.partition(), m.offset()),
                    (key, id, serde_json::from_slice(payload).unwrap()),
                );
            }
            Ok(())
        })
        .unwrap());
    out
}

/// Exactly once: `commands` entity events, one per command id, and per user the versions
/// 2, 3, ... without gaps or repeats.
fn assert_applied_once(
    events: &BTreeMap<(i32, i64), (String, String, serde_json::Value)>,
    commands: usize,
) {
    assert_eq!(
        assert_at_most_once(events),
        commands,
        "every command applied"
    );
}

/// At most once: one entity event per command id, and per user the versions 2, 3, ...
/// without gaps or repeats. Returns how many commands were applied.
fn assert_at_most_once(
    events: &BTreeMap<(i32, i64), (String, String, serde_json::Value)>,
) -> usize {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut versions: HashMap<&str, Vec<i64>> = HashMap::new();
    for (key, id, event) in events.values() {
        *ids.entry(id.as_str()).or_default() += 1;
        versions
            .entry(key.as_str())
            .or_default()
            .push(event["version"].as_i64().unwrap());
    }
    assert!(ids.values().all(|n| *n == 1), "a command was applied twice");
    for (key, mut v) in versions {
        v.sort();
        assert_eq!(v, (2..2 + v.len() as i64).collect::<Vec<_>>(), "{key}");
    }
    ids.len()
}

/// One command sent by [`send_stream`].
struct Sent {
    start: Instant,
    end: Instant,
    email: String,
    result: Result<Reply, SendError>,
}

/// Sender `t` of four: email changes while `more(i)` holds for the `i`th, round robin over
/// its own active users (u-t, u-(t+4), u-(t+8)), each after `pace` and given `timeout`,
/// counted in `answered` as they return.
fn send_stream(
    client: &Client,
    spec: &CommandSpec,
    t: usize,
    more: impl Fn(usize) -> bool,
    pace: Duration,
    timeout: Duration,
    answered: &AtomicUsize,
) -> Vec<Sent> {
    let users: Vec<String> = (0..3)
        .map(|k| t + 4 * k)
        .filter(|i| i % 3 != 2)
        .map(|i| format!("u-{i}"))
        .collect();
    (0..)
        .take_while(|i| more(*i))
        .map(|i| {
            std::thread::sleep(pace);
            let email = format!("t{t}-{i}@example.org");
            let start = Instant::now();
            let result = client.send(
                &update(spec, &users[i % users.len()], &email, admin()),
                timeout,
            );
            answered.fetch_add(1, Ordering::SeqCst);
            Sent {
                start,
                end: Instant::now(),
                email,
                result,
            }
        })
        .collect()
}

/// The app side: user-directory on the master's entity stream, with a command client.
fn start_app(run: &str, state: &std::path::Path) -> Engine {
    let app_topology = user_directory(run);
    create_topic(
        &KafkaConfig::new(brokers()),
        &app_topology.department_topic,
        4,
    )
    .unwrap();
    Engine::builder()
        .topology_str(app_topology.text.clone())
        .brokers(brokers())
        .state_dir(state)
        .command_client()
        .start()
        .unwrap()
}

/// The app's `user_contacts` row of `id` once it has `email`, or once it has none (`None`).
fn wait_for_contact(app: &Engine, id: &str, email: Option<&str>) {
    wait_until(
        &format!("the app's {id} has email {email:?}"),
        Duration::from_secs(30),
        || match app.get("user_contacts", id) {
            Ok(Some(a)) => email.is_some_and(|e| a.row["email"] == e),
            Ok(None) => email.is_none(),
            Err(_) => false,
        },
    );
}

#[test]
fn a_user_is_created_updated_deleted_and_created_again_by_commands() {
    let run = Run::new("cmd-life");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 1);
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(&m, &dir.path().join("master"), None);
    let app = start_app(&run, &dir.path().join("app"));
    let client = app.commands().expect("a command client");
    let spec = |name: &str| m.topology.command(name).unwrap();
    let send = |name: &str, payload: serde_json::Value| {
        let command = Command::new(spec(name), &payload, admin())
            .unwrap()
            .with_token(token_for(&admin()));
        client.send(&command, REPLY_TIMEOUT).unwrap()
    };
    let create = || {
        send(
            "create_user",
            json!({"id": "u-new", "email": " New@X.org ", "name": "New"}),
        )
    };
    let rejected = |reply: Reply| match reply {
        Reply::Rejected { code, .. } => code,
        other => panic!("not rejected: {other:?}"),
    };

    assert!(matches!(create(), Reply::Accepted { version: 1, .. }));
    wait_for_contact(&app, "u-new", Some("new@x.org"));
    assert_eq!(rejected(create()), "already_exists");
    let reply = send(
        "update_email",
        json!({"id": "u-new", "email": "second@x.org"}),
    );
    assert!(
        matches!(reply, Reply::Accepted { version: 2, .. }),
        "{reply:?}"
    );
    wait_for_contact(&app, "u-new", Some("second@x.org"));

    let reply = send("delete_user", json!({"id": "u-new"}));
    assert!(
        matches!(reply, Reply::Accepted { version: 3, .. }),
        "{reply:?}"
    );
    wait_for_contact(&app, "u-new", None);
    wait_until("the master's row is gone", Duration::from_secs(30), || {
        master_row(&master, "u-new").is_null()
    });
    assert_eq!(
        rejected(send("delete_user", json!({"id": "u-new"}))),
        "not_found"
    );
    let update = send(
        "update_email",
        json!({"id": "u-new", "email": "third@x.org"}),
    );
    assert_eq!(rejected(update), "not_found");

    // Created again, its versions continue past the delete: the app's late-event state,
    // which keeps the deleted user's versions, takes it.
    let reply = create();
    assert!(
        matches!(reply, Reply::Accepted { version: 4, .. }),
        "{reply:?}"
    );
    wait_for_contact(&app, "u-new", Some("new@x.org"));
    wait_until("the master has it again", Duration::from_secs(30), || {
        master_row(&master, "u-new")["version"] == 4
    });
    let row = master_row(&master, "u-new");
    assert_eq!(
        (row["event_type"].as_str(), row["changed_by"].as_str()),
        (Some("CreateUser"), Some("alice"))
    );
    assert_eq!(outcomes(&master, "accepted"), 4);
    app.shutdown();
    master.shutdown();
}

#[test]
fn every_outcome_is_answered_and_the_app_reads_its_write() {
    let run = Run::new("cmd-outcomes");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 6);
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(&m, &dir.path().join("master"), None);
    let app = start_app(&run, &dir.path().join("app"));
    let client = app.commands().expect("a command client");
    assert!(client
        .reply_topic()
        .starts_with(&format!("miroir.reply.it-{run}.")));
    let spec = m.topology.command("update_email").unwrap();

    let reply = client
        .send(
            &update(spec, "u-0", " Ada@Example.ORG ", admin()),
            REPLY_TIMEOUT,
        )
        .unwrap();
    assert!(
        matches!(reply, Reply::Accepted { version: 2, .. }),
        "{reply:?}"
    );
    // Read your write: the app's table shows the new email; the master's shows who changed it.
    wait_until(
        "the app reads the new email",
        Duration::from_secs(30),
        || {
            // While the app still reads its partitions, a query says to ask again.
            app.get("user_contacts", "u-0")
                .ok()
                .flatten()
                .is_some_and(|a| a.row["email"] == "ada@example.org")
        },
    );
    wait_until(
        "the master's table has the change",
        Duration::from_secs(30),
        || master_row(&master, "u-0")["version"] == 2,
    );
    let row = master_row(&master, "u-0");
    assert_eq!(row["changed_by"], "alice");
    assert_eq!(row["event_type"], "UpdateUserEmail");
    assert!(row["updated_at"].is_string());

    let cases: Vec<(Command, &str)> = vec![
        (
            update(spec, "u-1", "not-an-email", user("u-1")),
            "rejected:invalid_email",
        ),
        (
            update(spec, "u-1", "x@example.org", user("mallory")),
            "forbidden",
        ),
        (
            update(spec, "u-2", "x@example.org", admin()),
            "rejected:inactive_user",
        ),
        (
            update(spec, "u-99", "x@example.org", admin()),
            "rejected:not_found",
        ),
        (
            Command {
                command_type: "DeleteUser".into(),
                ..update(spec, "u-1", "x@example.org", admin())
            },
            "rejected:unknown_command",
        ),
        (
            Command {
                payload: b"{\"id\": \"u-1\", \"email\": 5}".to_vec(),
                ..update(spec, "u-1", "x@example.org", admin())
            },
            "rejected:malformed",
        ),
        (
            // The message key must be the entity key (its partition, its order).
            Command {
                key: "u-3".into(),
                ..update(spec, "u-1", "x@example.org", admin())
            },
            "rejected:malformed",
        ),
        (
            update(spec, "u-1", "x@example.org", user("")),
            "unauthenticated",
        ),
    ];
    for (command, expected) in cases {
        let reply = client.send(&command, REPLY_TIMEOUT).unwrap();
        let got = match &reply {
            Reply::Rejected { code, .. } => format!("rejected:{code}"),
            other => other.outcome().to_string(),
        };
        assert_eq!(got, expected, "{reply:?}");
    }
    // The user may change their own email (the rule reads principal.id).
    let reply = client
        .send(
            &update(spec, "u-1", "me@example.org", user("u-1")),
            REPLY_TIMEOUT,
        )
        .unwrap();
    assert!(
        matches!(reply, Reply::Accepted { version: 2, .. }),
        "{reply:?}"
    );

    // A re-delivered command (same id) gets its first answer and has no second effect.
    let mut twice = update(spec, "u-3", "dup@example.org", admin());
    twice.command_id = Some(format!("dup-{run}"));
    let first = client.send(&twice, REPLY_TIMEOUT).unwrap();
    let second = client.send(&twice, REPLY_TIMEOUT).unwrap();
    assert!(
        matches!(first, Reply::Accepted { version: 2, .. }),
        "{first:?}"
    );
    assert_eq!(first, second);
    let events = command_events(&m.user_topic);
    let dup_events = events
        .values()
        .filter(|(_, id, _)| *id == format!("dup-{run}"))
        .count();
    assert_eq!(dup_events, 1, "a re-delivered command was applied twice");
    assert_eq!(
        events.len(),
        3,
        "accepted commands: u-0, u-1, u-3: {events:?}"
    );

    let metrics = master.metrics();
    assert_eq!(
        counter(&metrics, "miroir_commands_total", "outcome=\"accepted\""),
        3
    );
    assert_eq!(
        counter(&metrics, "miroir_commands_total", "outcome=\"duplicate\""),
        1
    );
    assert_eq!(
        counter(&metrics, "miroir_commands_total", "outcome=\"rejected\""),
        6
    );
    assert_eq!(
        counter(&metrics, "miroir_commands_total", "outcome=\"forbidden\""),
        1
    );
    assert_eq!(
        counter(
            &metrics,
            "miroir_commands_total",
            "outcome=\"unauthenticated\""
        ),
        1
    );
    assert_eq!(
        counter(
            &app.metrics(),
            "miroir_command_round_trip_seconds_count",
            ""
        ),
        12
    );
    let reply_topic = client.reply_topic().to_string();
    app.shutdown();
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    wait_until(
        "the reply topic is deleted at shutdown",
        Duration::from_secs(20),
        || {
            !miroir_connectors::kafka::admin::topics(consumer.client())
                .unwrap()
                .iter()
                .any(|(t, _)| *t == reply_topic)
        },
    );
    master.shutdown();
}

/// A dependency that fails while `failing` is set.
#[derive(Default)]
struct Flaky {
    failing: AtomicBool,
    calls: AtomicUsize,
}

impl Dependency for Flaky {
    fn check(
        &self,
        _: &CommandSpec,
        key: &str,
        _: &serde_json::Value,
    ) -> Result<(), DependencyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            Err(DependencyError::new(format!(
                "directory unavailable for {key}"
            )))
        } else {
            Ok(())
        }
    }
}

#[test]
fn failing_dependency_retries_then_parks_and_replay_keeps_order_skipping_the_stale() {
    let run = Run::new("cmd-dlq");
    let mut m = user_referential(&run);
    m.text = m.text.replace(
        "retry = { attempts = 5, backoff = \"100ms\", max_backoff = \"2s\" }",
        "retry = { attempts = 3, backoff = \"20ms\", max_backoff = \"50ms\" }",
    );
    assert!(m.text.contains("attempts = 3"));
    seed_users(&m.user_topic, 6);
    let dir = tempfile::tempdir().unwrap();
    let flaky = Arc::new(Flaky::default());
    flaky.failing.store(true, Ordering::SeqCst);
    let master = start_master(&m, &dir.path().join("master"), Some(flaky.clone()));
    let config = KafkaConfig::new(brokers());
    let client_metrics = Metrics::new();
    let client = Client::start(&config, "dlq-test", client_metrics.commands.clone()).unwrap();
    let spec = m.topology.command("update_email").unwrap();

    let a = client
        .send(
            &update(spec, "u-0", "a@example.org", admin()),
            REPLY_TIMEOUT,
        )
        .unwrap();
    let b = client
        .send(
            &update(spec, "u-1", "b@example.org", admin()),
            REPLY_TIMEOUT,
        )
        .unwrap();
    for reply in [&a, &b] {
        match reply {
            Reply::Deferred { topic, message, .. } => {
                assert_eq!(*topic, format!("{}.dlq", m.command_topic));
                assert!(message.contains("directory unavailable"), "{message}");
            }
            other => panic!("expected Deferred, got {other:?}"),
        }
    }
    assert_eq!(
        flaky.calls.load(Ordering::SeqCst),
        6,
        "3 attempts per command"
    );
    let metrics = master.metrics();
    assert_eq!(counter(&metrics, "miroir_command_retries_total", ""), 4);
    assert_eq!(
        counter(&metrics, "miroir_command_dead_letters_total", ""),
        2
    );

    let parked = commands::dead_letters(&config, &m.command_topic).unwrap();
    assert_eq!(parked.len(), 2);
    assert_eq!(parked[0].key.as_deref(), Some("u-0"));
    assert_eq!(parked[1].key.as_deref(), Some("u-1"));
    for p in &parked {
        assert_eq!(p.attempts, Some(3));
        assert_eq!(p.error_class.as_deref(), Some("dependency"));
        assert_eq!(p.entity_version, Some(1));
        assert_eq!(p.principal.as_deref(), Some("alice"));
        assert!(p.origin.as_deref().unwrap().starts_with(&m.command_topic));
        assert!(p.first_failure <= p.last_failure);
    }
    // The CLI lists them as it reads them, up to --limit, and counts them all.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_miroir"))
        .args(["dlq", "list", &m.command_topic, "--json", "--limit", "1"])
        .env("MIROIR_BROKERS", brokers())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(["u-0", "u-1"].contains(&lines[0]["key"].as_str().unwrap()));
    assert!(String::from_utf8_lossy(&listed.stderr).contains("2 parked command(s)"));
    // A parked command re-delivered as such (not as a replay) stays parked.
    let mut again = update(spec, "u-0", "a@example.org", admin());
    again.command_id = parked[0].command_id.clone();
    assert!(matches!(
        client.send(&again, REPLY_TIMEOUT).unwrap(),
        Reply::Deferred { .. }
    ));

    // The dependency recovers; u-0 moves on before the replay.
    flaky.failing.store(false, Ordering::SeqCst);
    let c = client
        .send(
            &update(spec, "u-0", "c@example.org", admin()),
            REPLY_TIMEOUT,
        )
        .unwrap();
    assert!(matches!(c, Reply::Accepted { version: 2, .. }), "{c:?}");

    let mut seen = Vec::new();
    // Replaying takes the operator role: without it, each is refused, and stays parked.
    let token = token_for(&user("u-0"));
    let refused = commands::replay(&client, &parked, (REPLY_TIMEOUT, Some(&token)), |_, _| {});
    assert!(
        refused
            .iter()
            .all(|r| matches!(r, Replayed::Answered(Reply::Forbidden { .. }))),
        "{refused:?}"
    );
    let pending = || counter(&master.metrics(), "miroir_command_dead_letters_pending", "");
    wait_until(
        "a refused replay leaves the commands pending",
        Duration::from_secs(30),
        || pending() == 2,
    );
    let token = token_for(&operator());
    let results = commands::replay(&client, &parked, (REPLY_TIMEOUT, Some(&token)), |p, r| {
        seen.push((p.key.clone().unwrap(), format!("{r:?}")));
    });
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, "u-0", "replayed in the original order");
    wait_until("no command pending", Duration::from_secs(30), || {
        pending() == 0
    });
    assert!(commands::dead_letters(&config, &m.command_topic)
        .unwrap()
        .is_empty());
    assert!(
        matches!(&results[0], Replayed::Skipped(why) if why.contains("changed")),
        "{results:?}"
    );
    assert!(
        matches!(
            &results[1],
            Replayed::Applied(Reply::Accepted { version: 2, .. })
        ),
        "{results:?}"
    );
    wait_until(
        "the replayed change is applied",
        Duration::from_secs(30),
        || {
            master_row(&master, "u-1")["email"] == "b@example.org"
                && master_row(&master, "u-0")["email"] == "c@example.org"
        },
    );
    // Re-submitted four times: twice refused, twice taken up.
    assert_eq!(
        counter(&master.metrics(), "miroir_command_replayed_total", ""),
        4
    );
    client.shutdown();
    master.shutdown();
}

#[test]
fn two_clients_sending_concurrently_get_their_own_replies() {
    let run = Run::new("cmd-concurrent");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 12);
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(&m, &dir.path().join("master"), None);
    let config = KafkaConfig::new(brokers());
    let spec = m.topology.command("update_email").unwrap();
    let active: Vec<String> = (0..12)
        .filter(|i| i % 3 != 2)
        .map(|i| format!("u-{i}"))
        .collect();
    let sent: Vec<(String, Reply)> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for c in 0..2 {
            let client = Arc::new(
                Client::start(&config, &format!("app{c}"), Metrics::new().commands.clone())
                    .unwrap(),
            );
            for t in 0..3 {
                let client = client.clone();
                let active = &active;
                handles.push(s.spawn(move || {
                    (0..12)
                        .map(|i| {
                            let email = format!("c{c}-t{t}-{i}@example.org");
                            let id = &active[(i + t * 5 + c * 3) % active.len()];
                            let reply = client
                                .send(&update(spec, id, &email, admin()), REPLY_TIMEOUT)
                                .unwrap();
                            (email, reply)
                        })
                        .collect::<Vec<_>>()
                }));
            }
        }
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(sent.len(), 72);
    // Each reply points at the entity event its own command wrote.
    let events = command_events(&m.user_topic);
    assert_eq!(events.len(), 72);
    for (email, reply) in &sent {
        let Reply::Accepted {
            partition,
            offset,
            version,
        } = reply
        else {
            panic!("{email}: {reply:?}");
        };
        let (_, _, event) = &events[&(*partition, *offset)];
        assert_eq!(event["email"], *email, "a reply crossed to another request");
        assert_eq!(event["version"], *version);
    }
    assert_applied_once(&events, 72);
    master.shutdown();
}

#[test]
fn a_client_times_out_while_the_processor_is_stopped_and_ignores_the_late_reply() {
    let run = Run::new("cmd-timeout");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 3);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("master");
    let master = start_master(&m, &state, None);
    master.shutdown();
    let config = KafkaConfig::new(brokers());
    let metrics = Metrics::new();
    let client = Client::start(&config, "timeout-test", metrics.commands.clone()).unwrap();
    let spec = m.topology.command("update_email").unwrap();
    let started = Instant::now();
    let result = client.send(
        &update(spec, "u-0", "late@example.org", admin()),
        Duration::from_secs(1),
    );
    assert!(matches!(result, Err(SendError::Timeout(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        counter(&metrics.render(), "miroir_command_timeouts_total", ""),
        1
    );

    // Back up, the processor answers Expired (the deadline passed); the client ignores it.
    let master = start_master(&m, &state, None);
    wait_until("the late reply arrives", Duration::from_secs(30), || {
        counter(&metrics.render(), "miroir_command_late_replies_total", "") == 1
    });
    assert_eq!(
        counter(
            &master.metrics(),
            "miroir_commands_total",
            "outcome=\"expired\""
        ),
        1
    );
    assert_eq!(
        master_row(&master, "u-0")["version"],
        1,
        "an expired command changes nothing"
    );
    // The client goes on working.
    let reply = client
        .send(
            &update(spec, "u-0", "now@example.org", admin()),
            REPLY_TIMEOUT,
        )
        .unwrap();
    assert!(
        matches!(reply, Reply::Accepted { version: 2, .. }),
        "{reply:?}"
    );
    client.shutdown();
    master.shutdown();
}

#[test]
fn processor_killed_mid_stream_answers_every_command_once() {
    let run = Run::new("cmd-kill");
    // Several lanes: their transactions side by side, each fenced and aborted on restart.
    let m = with_lanes(user_referential(&run), 4);
    seed_users(&m.user_topic, 12);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("master.toml");
    std::fs::write(&file, &m.text).unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let first_log = dir.path().join("first.log");
    let mut child = spawn_master(&file, &state, port, &first_log);
    let ready = |port: u16| {
        reqwest::blocking::get(format!("http://127.0.0.1:{port}/ready"))
            .is_ok_and(|r| r.status().is_success())
    };
    wait_until("the master is ready", Duration::from_secs(60), || {
        ready(port)
    });
    let config = KafkaConfig::new(brokers());
    let client = Client::start(&config, "kill-test", Metrics::new().commands.clone()).unwrap();
    let spec = m.topology.command("update_email").unwrap();
    let answered = AtomicUsize::new(0);
    let killed_at = std::sync::Mutex::new(None::<Instant>);
    let sent: Vec<Sent> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (client, answered) = (&client, &answered);
                s.spawn(move || {
                    send_stream(
                        client,
                        spec,
                        t,
                        |i| i < 30,
                        Duration::ZERO,
                        Duration::from_secs(90),
                        answered,
                    )
                })
            })
            .collect();
        // SIGKILL once a fifth is answered, while the others are in flight; then restart.
        wait_until("commands are answered", Duration::from_secs(60), || {
            answered.load(Ordering::SeqCst) >= 24
        });
        child.kill().unwrap();
        child.wait().unwrap();
        *killed_at.lock().unwrap() = Some(Instant::now());
        let port = free_port();
        child = spawn_master(&file, &state, port, &dir.path().join("second.log"));
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let killed_at = killed_at.lock().unwrap().unwrap();
    assert_eq!(sent.len(), 120);
    let mut across = 0;
    for Sent {
        start,
        end,
        email,
        result,
    } in &sent
    {
        match result {
            Ok(Reply::Accepted { .. }) => {}
            other => panic!("{email}: {other:?}"),
        }
        if *start < killed_at && *end > killed_at {
            across += 1;
        }
    }
    assert!(across >= 1, "no command was in flight across the kill");
    assert_applied_once(&command_events(&m.user_topic), 120);
    client.shutdown();
    let _ = child.kill();
    let _ = child.wait();
    // The processors verified 120 tokens, and logged none of them, nor the secret.
    let token = token_for(&admin());
    let signature = token.rsplit('.').next().unwrap();
    for log in [first_log, dir.path().join("second.log")] {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains(TEST_SECRET) && !text.contains(signature));
        assert!(!text.contains("eyJ"), "a JWT in {}", log.display());
    }
}

/// A transaction that fails aborts the one prepared after it too (that one built on its rows
/// and commits only after it): both batches are read again, and every command is applied once,
/// each user's versions without a gap. The failure: while two clients write to the same users,
/// one client's reply topic is deleted under the processor, which still trusts it exists.
#[test]
fn a_failed_transaction_aborts_the_one_after_it_and_every_command_is_applied_once() {
    let run = Run::new("cmd-abort");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 12);
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(&m, &dir.path().join("master"), None);
    let config = KafkaConfig::new(brokers());
    let spec = m.topology.command("update_email").unwrap();
    let live = Client::start(&config, "abort-live", Metrics::new().commands.clone()).unwrap();
    let doomed = Client::start(&config, "abort-doomed", Metrics::new().commands.clone()).unwrap();
    let doomed_topic = doomed.reply_topic().to_string();
    let answered = AtomicUsize::new(0);
    let deleted = AtomicBool::new(false);
    let (live_sent, doomed_count) = std::thread::scope(|s| {
        let streams: Vec<_> = (0..4)
            .map(|t| {
                let (client, answered) = (&live, &answered);
                s.spawn(move || {
                    let timeout = Duration::from_secs(30);
                    send_stream(
                        client,
                        spec,
                        t,
                        |i| i < 40,
                        Duration::from_millis(2),
                        timeout,
                        answered,
                    )
                })
            })
            .collect();
        // The doomed client changes the first stream's users (u-0 and u-4) between its
        // commands, and goes on for three commands once its reply topic is gone.
        let doomed_stream = s.spawn(|| {
            let (mut sent, mut after) = (0, 0);
            while after < 3 {
                if deleted.load(Ordering::SeqCst) {
                    after += 1;
                }
                let user = ["u-0", "u-4"][sent % 2];
                let email = format!("doomed-{sent}@example.org");
                // Answered until the topic goes; then the replies are dropped (a timeout here).
                let _ = doomed.send(&update(spec, user, &email, admin()), Duration::from_secs(3));
                sent += 1;
            }
            sent
        });
        wait_until("commands are answered", Duration::from_secs(60), || {
            answered.load(Ordering::SeqCst) >= 40
        });
        miroir_connectors::kafka::admin::delete_topics(&config, &[&doomed_topic]).unwrap();
        deleted.store(true, Ordering::SeqCst);
        let live_sent: Vec<Sent> = streams
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        (live_sent, doomed_stream.join().unwrap())
    });
    assert_eq!(live_sent.len(), 160);
    for sent in &live_sent {
        assert!(
            matches!(sent.result, Ok(Reply::Accepted { .. })),
            "{}: {:?}",
            sent.email,
            sent.result
        );
    }
    // A transaction stuck on a record for the deleted topic fails only when the record times
    // out (10 s), possibly after the clients are done: wait until every command is answered.
    wait_until("every command is answered", Duration::from_secs(60), || {
        assert_eq!(master.failure(), None, "the master failed");
        counter(&master.metrics(), "miroir_commands_total", "") >= (160 + doomed_count) as u64
    });
    // Each command at most once, every live one once, each user's versions without a gap. The
    // doomed client's last commands may be answered Expired instead: their 3 s ran out while
    // the failed transaction waited for its records to time out.
    let events = command_events(&m.user_topic);
    assert!(assert_at_most_once(&events) <= 160 + doomed_count);
    for sent in &live_sent {
        let applied = events
            .values()
            .filter(|(_, _, e)| e["email"] == sent.email.as_str())
            .count();
        assert_eq!(applied, 1, "{} applied {applied} times", sent.email);
    }
    let metrics = master.metrics();
    assert!(
        counter(&metrics, "miroir_command_aborted_transactions_total", "") >= 1,
        "no transaction failed: the test did not test anything"
    );
    assert!(counter(&metrics, "miroir_command_replies_dropped_total", "") >= 1);
    live.shutdown();
    doomed.shutdown();
    master.shutdown();
}

#[test]
fn reply_topics_of_dead_instances_are_reaped_and_live_ones_kept() {
    let config = KafkaConfig::new(brokers());
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let now = now_ms();
    let run = unique("reap").replace('-', "");
    let ghost = format!("miroir.reply.{run}.{}.ghost", now - 120_000);
    create_topic(&config, &ghost, 1).unwrap();
    // An old topic whose instance is alive: its consumer group has a member. The other tests'
    // clients reap orphans as they start; one that looked at the group before the member
    // joined may delete the topic after: then the check is made again with another one.
    let (alive, young, member, names) = (0..5)
        .find_map(|attempt| {
            let alive = format!("miroir.reply.{run}.{}.alive{attempt}", now - 120_000);
            create_topic(&config, &alive, 1).unwrap();
            let member: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("group.id", &alive)
                .create()
                .unwrap();
            member.subscribe(&[&alive]).unwrap();
            let joined = Instant::now();
            while !member.assignment().is_ok_and(|a| a.count() > 0) {
                if joined.elapsed() > Duration::from_secs(10) {
                    member.unsubscribe();
                    return None;
                }
                member.poll(Duration::from_millis(50));
            }
            // A young topic, made just now (a minute of attempts would age one made before).
            let young = format!("miroir.reply.{run}.{}.young{attempt}", now_ms());
            create_topic(&config, &young, 1).unwrap();
            let reaped = miroir_connectors::commands::client::reap_orphans(&config).unwrap();
            // (Another test's client may have reaped the ghost first: it is gone either way.)
            assert!(
                !reaped.contains(&alive),
                "a topic with a live member is kept: {reaped:?}"
            );
            assert!(
                !reaped.contains(&young),
                "a topic younger than a minute is kept: {reaped:?}"
            );
            let names: Vec<String> = miroir_connectors::kafka::admin::topics(member.client())
                .unwrap()
                .into_iter()
                .map(|(t, _)| t)
                .collect();
            if !names.contains(&alive) {
                member.unsubscribe();
                miroir_connectors::kafka::admin::delete_topics(&config, &[&young]).unwrap();
                return None;
            }
            Some((alive, young, member, names))
        })
        .expect("the live instance's topic is kept");
    assert!(
        !names.contains(&ghost),
        "the dead instance's topic is reaped"
    );
    assert!(names.contains(&young), "the young topic is kept");
    member.unsubscribe();
    drop(member);
    miroir_connectors::kafka::admin::delete_topics(&config, &[&alive, &young]).unwrap();
}

#[test]
fn commands_stay_exactly_once_while_processors_join_and_leave() {
    let run = Run::new("cmd-rebalance");
    // Several lanes: partitions moving between instances while transactions run side by side.
    let m = with_lanes(user_referential(&run), 4);
    seed_users(&m.user_topic, 12);
    let dir = tempfile::tempdir().unwrap();
    let first = start_master(&m, &dir.path().join("a"), None);
    let config = KafkaConfig::new(brokers());
    let client = Client::start(&config, "rebalance-test", Metrics::new().commands.clone()).unwrap();
    let spec = m.topology.command("update_email").unwrap();
    let answered = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let accepted =
        |engine: &Engine| counter(&engine.metrics(), "miroir_commands_total", "accepted");
    let sent: Vec<Sent> = std::thread::scope(|s| {
        // Paced, and going on until told to stop: the stream outlasts every step below, however
        // long the second processor takes to start.
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (client, answered, stop) = (&client, &answered, &stop);
                s.spawn(move || {
                    send_stream(
                        client,
                        spec,
                        t,
                        |_| !stop.load(Ordering::SeqCst),
                        Duration::from_millis(100),
                        Duration::from_secs(90),
                        answered,
                    )
                })
            })
            .collect();
        // A second processor joins mid-stream (the partitions are split), then the first
        // leaves (the second takes them all).
        wait_until("commands are answered", Duration::from_secs(60), || {
            answered.load(Ordering::SeqCst) >= 20
        });
        let second = Engine::builder()
            .topology_str(m.text.clone())
            .brokers(brokers())
            .state_dir(dir.path().join("b"))
            .auth(test_auth())
            .start()
            .unwrap();
        assert!(second.wait_ready(Duration::from_secs(60)));
        wait_until(
            "the second processor answers while the first runs",
            Duration::from_secs(60),
            || accepted(&second) > 0,
        );
        assert!(accepted(&first) > 0, "the first processor answered");
        first.shutdown();
        let left_at = answered.load(Ordering::SeqCst);
        wait_until(
            "the second processor answers alone",
            Duration::from_secs(60),
            || answered.load(Ordering::SeqCst) >= left_at + 40,
        );
        stop.store(true, Ordering::SeqCst);
        let sent: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        second.shutdown();
        sent
    });
    for Sent { email, result, .. } in &sent {
        assert!(
            matches!(result, Ok(Reply::Accepted { .. })),
            "{email}: {result:?}"
        );
    }
    assert_applied_once(&command_events(&m.user_topic), sent.len());
    client.shutdown();
}

#[test]
fn the_cli_sends_commands_and_lists_dead_letters() {
    let run = Run::new("cmd-cli");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 3);
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(&m, &dir.path().join("master"), None);
    let file = dir.path().join("master.toml");
    std::fs::write(&file, &m.text).unwrap();
    let miroir = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_miroir"))
            .args(args)
            .env("MIROIR_BROKERS", brokers())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let token = token_for(&user("u-0"));
    let send = |command: &str, json: &str, extra: &[&str]| {
        let mut args = vec![
            "command",
            "send",
            file.to_str().unwrap(),
            command,
            "--json",
            json,
        ];
        args.extend_from_slice(extra);
        miroir(&args)
    };
    let accepted = send(
        "update_email",
        r#"{"id":"u-0","email":"cli@example.org"}"#,
        &["--token", &token],
    );
    assert_eq!(accepted.status.code(), Some(0), "{accepted:?}");
    let reply: serde_json::Value = serde_json::from_slice(&accepted.stdout).unwrap();
    assert_eq!(reply["outcome"], "accepted");
    assert_eq!(reply["version"], 2);
    // The command type works as well as the section name; a rejection exits 2.
    let rejected = send(
        "UpdateUserEmail",
        r#"{"id":"u-0","email":"nope"}"#,
        &["--token", &token],
    );
    assert_eq!(rejected.status.code(), Some(2), "{rejected:?}");
    assert!(String::from_utf8_lossy(&rejected.stdout).contains("invalid_email"));
    // Bad input is a clear error, exit 1.
    let unknown = send("archive_user", "{}", &[]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no command `archive_user`"));
    let not_json = send("update_email", "{id:", &[]);
    assert_eq!(not_json.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&not_json.stderr).contains("--json is not valid JSON"));
    let no_key = send(
        "update_email",
        r#"{"email":"x@example.org"}"#,
        &["--token", &token],
    );
    assert_eq!(no_key.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("key field `id`"));
    // Nothing parked: an empty list; a replay of an unknown id is an error.
    let list = miroir(&["dlq", "list", &m.command_topic]);
    assert_eq!(list.status.code(), Some(0), "{list:?}");
    assert!(String::from_utf8_lossy(&list.stderr).contains("0 parked command(s)"));
    let replay = miroir(&["dlq", "replay", &m.command_topic, "--id", "nope"]);
    assert_eq!(replay.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&replay.stderr).contains("no parked command with id nope"));
    master.shutdown();
}

#[test]
fn a_restarted_processor_keeps_its_view_of_the_entities_in_the_state_directory() {
    let run = Run::new("cmd-view");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 3);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("master");
    let master = start_master(&m, &state, None);
    wait_until(
        "the master reads the users",
        Duration::from_secs(30),
        || master_row(&master, "u-0")["version"] == 1,
    );
    // An accepted command: its id is remembered from its entity event's header alone.
    let config = KafkaConfig::new(brokers());
    let client = Client::start(&config, "view-test", Metrics::new().commands.clone()).unwrap();
    let spec = m.topology.command("update_email").unwrap();
    let mut once = update(spec, "u-1", "once@example.org", admin());
    once.command_id = Some(format!("once-{run}"));
    let first = client.send(&once, REPLY_TIMEOUT).unwrap();
    assert!(
        matches!(first, Reply::Accepted { version: 2, .. }),
        "{first:?}"
    );
    // A graceful stop reads its own last write back and saves it with the view.
    master.shutdown();
    // Delete every record of the entity topic: only the stored view still knows the users
    // and the accepted command.
    let kafka_admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap();
    let mut all = rdkafka::TopicPartitionList::new();
    for p in 0..4 {
        all.add_partition_offset(&m.user_topic, p, rdkafka::Offset::End)
            .unwrap();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(kafka_admin.delete_records(&all, &rdkafka::admin::AdminOptions::new()))
        .unwrap();
    assert!(command_events(&m.user_topic).is_empty());

    let master = start_master(&m, &state, None);
    // Sent again (a re-delivery): the first answer, no second effect.
    let again = client.send(&once, REPLY_TIMEOUT).unwrap();
    assert_eq!(
        again, first,
        "the restarted processor forgot an accepted command"
    );
    let reply = client
        .send(
            &update(spec, "u-0", "kept@example.org", admin()),
            REPLY_TIMEOUT,
        )
        .unwrap();
    assert!(
        matches!(reply, Reply::Accepted { version: 2, .. }),
        "the restarted processor lost its view: {reply:?}"
    );
    let events = command_events(&m.user_topic);
    let keys: Vec<&str> = events.values().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        vec!["u-0"],
        "only the new command wrote an entity event: {events:?}"
    );
    let rows_in_memory = |master: &Engine| {
        let metrics = master.metrics();
        let name = "miroir_command_entity_rows_in_memory";
        let label = "command=\"update_email\"";
        metrics
            .contains(&format!("{name}{{{label}}}"))
            .then(|| counter(&metrics, name, label))
    };
    wait_until(
        "the written row, read back, leaves memory",
        Duration::from_secs(30),
        || rows_in_memory(&master) == Some(0),
    );
    client.shutdown();
    master.shutdown();
}

/// The `miroir-answer-until` header (ms since the epoch) of each entity event, by command id.
fn answer_untils(topic: &str) -> HashMap<String, i64> {
    let mut tail = Tail::open(&KafkaConfig::new(brokers()), topic).unwrap();
    let mut out = HashMap::new();
    assert!(tail
        .catch_up(Duration::from_secs(30), |m| {
            if let Some(id) = text_header(m, header::COMMAND_ID) {
                let until = text_header(m, header::ANSWER_UNTIL).and_then(|u| u.parse().ok());
                out.insert(
                    id,
                    until.expect("an entity event without its answer's time"),
                );
            }
            Ok(())
        })
        .unwrap());
    out
}

#[test]
fn single_use_command_ids_are_remembered_past_their_deadline_chosen_ones_for_a_week() {
    let run = Run::new("cmd-until");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 2);
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(&m, &dir.path().join("master"), None);
    let config = KafkaConfig::new(brokers());
    let client = Client::start(&config, "until-test", Metrics::new().commands.clone()).unwrap();
    let spec = m.topology.command("update_email").unwrap();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let before = now_ms();
    // No command id: the client uses the correlation id, good for this one send only.
    let single = client
        .send(
            &update(spec, "u-0", "single@example.org", admin()),
            REPLY_TIMEOUT,
        )
        .unwrap();
    let mut chosen = update(spec, "u-1", "chosen@example.org", admin());
    chosen.command_id = Some(format!("chosen-{run}"));
    let chosen_reply = client.send(&chosen, REPLY_TIMEOUT).unwrap();
    let after = now_ms();
    assert!(matches!(single, Reply::Accepted { .. }), "{single:?}");
    assert!(
        matches!(chosen_reply, Reply::Accepted { .. }),
        "{chosen_reply:?}"
    );

    let untils = answer_untils(&m.user_topic);
    assert_eq!(untils.len(), 2, "{untils:?}");
    let timeout = REPLY_TIMEOUT.as_millis() as i64;
    let ten_minutes = 600_000;
    let week = 7 * 24 * 3_600_000;
    let single_until = untils
        .iter()
        .find(|(id, _)| !id.starts_with("chosen-"))
        .map(|(_, u)| *u)
        .unwrap();
    assert!(
        (before + timeout + ten_minutes..=after + timeout + ten_minutes).contains(&single_until),
        "a single-use id is kept until 10 minutes after its deadline: {single_until} not in {before}..{after} + {}",
        timeout + ten_minutes
    );
    let chosen_until = untils[&format!("chosen-{run}")];
    assert!(
        (before + week..=after + week).contains(&chosen_until),
        "an id the caller chose is kept a week: {chosen_until}"
    );

    // The same command record delivered twice (a producer retry): the id, single-use, is still
    // remembered, so the copy gets the first answer and has no effect.
    let mut original = None;
    let mut commands = Tail::open(&config, &spec.topic).unwrap();
    assert!(commands
        .catch_up(Duration::from_secs(30), |m| {
            if m.key() == Some(b"u-0".as_slice()) {
                original = Some(m.detach());
            }
            Ok(())
        })
        .unwrap());
    let original = original.expect("the command record");
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let copy = rdkafka::producer::BaseRecord::to(&spec.topic)
        .key(original.key().unwrap())
        .payload(original.payload().unwrap())
        .headers(original.headers().unwrap().clone());
    producer.send(copy).map_err(|(e, _)| e).unwrap();
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();
    wait_until(
        "the copy is answered as a duplicate",
        Duration::from_secs(30),
        || {
            counter(
                &master.metrics(),
                "miroir_commands_total",
                "outcome=\"duplicate\"",
            ) == 1
        },
    );
    assert_eq!(
        command_events(&m.user_topic).len(),
        2,
        "the copy was applied again"
    );
    assert_eq!(
        counter(
            &master.metrics(),
            "miroir_command_answers_kept",
            "command=\"update_email\""
        ),
        2,
        "the two ids, each once"
    );
    client.shutdown();
    master.shutdown();
}

#[test]
fn copies_of_a_command_read_in_one_batch_are_applied_once() {
    let run = Run::new("cmd-copies");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 3);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("master");
    let master = start_master(&m, &state, None);
    master.shutdown();

    // With the processor stopped, the same command three times (a producer retrying, a
    // client sending again under the same id), then another command and a copy of it.
    let spec = m.topology.command("update_email").unwrap();
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for (id, user, email, copies) in [
        ("first", "u-0", "one@example.org", 3),
        ("second", "u-1", "two@example.org", 2),
    ] {
        for _ in 0..copies {
            send_raw(&producer, spec, &format!("{id}-{run}"), user, email);
        }
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();

    let master = start_master(&m, &state, None);
    let outcomes = |outcome: &str| outcomes(&master, outcome);
    wait_until("every copy is answered", Duration::from_secs(30), || {
        outcomes("accepted") + outcomes("duplicate") >= 5
    });
    assert_eq!(outcomes("accepted"), 2, "one per command id");
    assert_eq!(outcomes("duplicate"), 3, "the copies");
    let events = command_events(&m.user_topic);
    assert_applied_once(&events, 2);
    assert_eq!(master_row(&master, "u-0")["version"], 2);
    assert_eq!(master_row(&master, "u-1")["version"], 2);
    master.shutdown();
}

/// Produces an email change of `user` by an admin under command id `id`, as a client would,
/// without waiting for an answer (copies of one command, for instance).
fn send_raw(
    producer: &rdkafka::producer::BaseProducer,
    spec: &CommandSpec,
    id: &str,
    user: &str,
    email: &str,
) {
    let headers = miroir_connectors::commands::wire::CommandHeaders {
        command_id: Some(id.to_string()),
        command_type: Some(spec.operation.clone()),
        token: Some(token_for(&admin())),
        ..Default::default()
    };
    let payload = json!({ "id": user, "email": email }).to_string();
    let record = rdkafka::producer::BaseRecord::to(&spec.topic)
        .key(user)
        .payload(&payload)
        .headers(headers.to_owned_headers());
    producer.send(record).map_err(|(e, _)| e).unwrap();
}

/// The commands `master` answered with `outcome`.
fn outcomes(master: &Engine, outcome: &str) -> u64 {
    counter(
        &master.metrics(),
        "miroir_commands_total",
        &format!("outcome=\"{outcome}\""),
    )
}

/// A dependency that says when it is first asked, then takes 300 ms: the copy of the command
/// it holds is produced meanwhile, and read in the next batch, while the first batch's
/// transaction commits.
struct Holds {
    asked: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl Dependency for Holds {
    fn check(
        &self,
        _: &CommandSpec,
        _: &str,
        _: &serde_json::Value,
    ) -> Result<(), DependencyError> {
        if let Some(asked) = self.asked.lock().unwrap().take() {
            let _ = asked.send(());
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }
}

#[test]
fn a_copy_read_while_the_first_transaction_commits_is_applied_once() {
    let run = Run::new("cmd-overlap");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 2);
    let dir = tempfile::tempdir().unwrap();
    let (asked, first_asked) = std::sync::mpsc::channel();
    let holds = Holds {
        asked: std::sync::Mutex::new(Some(asked)),
    };
    let master = start_master(&m, &dir.path().join("master"), Some(Arc::new(holds)));
    let spec = m.topology.command("update_email").unwrap();
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let id = format!("overlap-{run}");
    let send = || {
        send_raw(&producer, spec, &id, "u-1", "one@example.org");
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();
    };
    send();
    first_asked
        .recv_timeout(Duration::from_secs(60))
        .expect("the processor takes the command up");
    send();
    let outcomes = |outcome: &str| outcomes(&master, outcome);
    wait_until("both copies are answered", Duration::from_secs(30), || {
        outcomes("accepted") + outcomes("duplicate") >= 2
    });
    assert_eq!(
        (outcomes("accepted"), outcomes("duplicate")),
        (1, 1),
        "(accepted, duplicate)"
    );
    assert_applied_once(&command_events(&m.user_topic), 1);
    assert_eq!(master_row(&master, "u-1")["version"], 2);
    master.shutdown();
}

/// A dependency with a bug: it panics.
struct Panics;

impl Dependency for Panics {
    fn check(
        &self,
        _: &CommandSpec,
        _: &str,
        _: &serde_json::Value,
    ) -> Result<(), DependencyError> {
        panic!("dependency bug");
    }
}

#[test]
fn a_panic_in_the_processor_fails_the_instance_with_its_message() {
    let run = Run::new("cmd-panic");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 2);
    let dir = tempfile::tempdir().unwrap();
    let master = Engine::builder()
        .topology_str(m.text.clone())
        .brokers(brokers())
        .state_dir(dir.path().join("master"))
        .auth(test_auth())
        .listen("127.0.0.1:0".parse().unwrap())
        .dependency(Arc::new(Panics))
        .start()
        .unwrap();
    assert!(master.wait_ready(Duration::from_secs(60)), "master ready");
    let health = || {
        let url = format!("http://{}/health", master.http_addr().unwrap());
        let response = reqwest::blocking::get(url).unwrap();
        (response.status().as_u16(), response.text().unwrap())
    };
    assert_eq!(health().0, 200);
    let config = KafkaConfig::new(brokers());
    let client = Client::start(&config, "panic-test", Metrics::new().commands.clone()).unwrap();
    let spec = m.topology.command("update_email").unwrap();
    let reply = client.send(
        &update(spec, "u-1", "new@example.org", admin()),
        Duration::from_secs(5),
    );
    assert!(
        matches!(reply, Err(SendError::Timeout(_))),
        "a processor that panicked does not answer: {reply:?}"
    );
    wait_until(
        "the instance reports the failure",
        Duration::from_secs(30),
        || master.failure().is_some(),
    );
    let failure = master.failure().unwrap();
    assert!(
        failure.contains("update_email") && failure.contains("panicked: dependency bug"),
        "{failure}"
    );
    let (status, body) = health();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("dependency bug"), "{body}");
    assert!(!master.ready(), "a failed instance is not ready");
    assert!(
        command_events(&m.user_topic)
            .values()
            .all(|(k, _, _)| k != "u-1"),
        "nothing applied"
    );
    client.shutdown();
    master.shutdown();
}

#[test]
fn commands_carry_a_token_not_a_claim() {
    use miroir::miroir_engine::auth::{issue, SigningKey, TokenClaims};
    let run = Run::new("cmd-tokens");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 3);
    let dir = tempfile::tempdir().unwrap();
    let master = Engine::builder()
        .topology_str(m.text.clone())
        .brokers(brokers())
        .state_dir(dir.path().join("master"))
        .auth(miroir::AuthConfig {
            audience: Some("referential".into()),
            ..test_auth()
        })
        .epoch_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    assert!(master.wait_ready(Duration::from_secs(60)));
    let metrics = Metrics::new();
    let client = Client::start(
        &KafkaConfig::new(brokers()),
        "tokens",
        metrics.commands.clone(),
    )
    .unwrap();
    let spec = m.topology.command("update_email").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signed = |who: &Principal, (secret, audience, at): (&str, &str, u64)| {
        let claims = TokenClaims {
            subject: who.id.clone(),
            roles: who.roles.clone(),
            valid_for: 3600,
            issuer: None,
            audience: Some(audience.into()),
        };
        issue(&SigningKey::Secret(secret.into()), &claims, at).unwrap()
    };
    let valid = (TEST_SECRET, "referential", now);
    // Each command claims the admin in its headers: only the token counts.
    let send = |token: Option<String>| {
        let mut command = update(spec, "u-1", "t@example.org", admin());
        command.token = token;
        client.send(&command, REPLY_TIMEOUT).unwrap()
    };
    let unauthenticated = |reply: Reply, why: &str| match reply {
        Reply::Unauthenticated { message } => assert!(message.contains(why), "{message}"),
        other => panic!("{why}: {other:?}"),
    };
    unauthenticated(send(None), "no bearer token");
    let expired = (TEST_SECRET, "referential", now - 7200);
    unauthenticated(send(Some(signed(&admin(), expired))), "Expired");
    let forged = ("someone else's secret", "referential", now);
    unauthenticated(send(Some(signed(&admin(), forged))), "InvalidSignature");
    let elsewhere = (TEST_SECRET, "elsewhere", now);
    unauthenticated(send(Some(signed(&admin(), elsewhere))), "InvalidAudience");
    // A valid token of a user without the role, for another user: forbidden.
    let reply = send(Some(signed(&user("u-2"), valid)));
    assert!(matches!(reply, Reply::Forbidden { .. }), "{reply:?}");
    // With the role: accepted, and the entity says who did it, as the token says.
    let carol = Principal {
        id: "carol".into(),
        roles: vec!["user-admin".into()],
    };
    let reply = send(Some(signed(&carol, valid)));
    assert!(matches!(reply, Reply::Accepted { .. }), "{reply:?}");
    wait_until(
        "the master's table has the change",
        Duration::from_secs(30),
        || master_row(&master, "u-1")["changed_by"] == "carol",
    );
    client.shutdown();
}

#[test]
fn a_reply_to_naming_a_topic_that_is_not_a_reply_topic_gets_no_reply() {
    let run = Run::new("cmd-reply-to");
    let m = user_referential(&run);
    seed_users(&m.user_topic, 2);
    // A topic the sender may not write to, but the master could.
    let foreign = format!("it-foreign-{run}");
    let config = KafkaConfig::new(brokers());
    create_topic(&config, &foreign, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let master = start_master(&m, &dir.path().join("master"), None);
    let spec = m.topology.command("update_email").unwrap();
    let headers = miroir_connectors::commands::wire::CommandHeaders {
        command_id: Some(format!("c-{run}")),
        command_type: Some(spec.operation.clone()),
        token: Some(token_for(&admin())),
        reply_to: Some(foreign.clone()),
        ..Default::default()
    };
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let payload = json!({ "id": "u-0", "email": "r@example.org" }).to_string();
    let record = rdkafka::producer::BaseRecord::to(&spec.topic)
        .key("u-0")
        .payload(&payload)
        .headers(headers.to_owned_headers());
    producer.send(record).map_err(|(e, _)| e).unwrap();
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();

    // The command is applied, its reply refused and counted, and the topic stays empty.
    let refused = || {
        counter(
            &master.metrics(),
            "miroir_command_replies_refused_total",
            "",
        )
    };
    // The refusal is counted as the reply is built, the outcome once the transaction commits.
    wait_until(
        "the reply is refused and the command accepted",
        Duration::from_secs(30),
        || refused() == 1 && outcomes(&master, "accepted") == 1,
    );
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let (low, high) = consumer
        .fetch_watermarks(&foreign, 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!((low, high), (0, 0), "nothing written to {foreign}");
    master.shutdown();
}
