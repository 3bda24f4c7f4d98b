//! `miroir reset`: deletes what a topology's instances made for themselves (changelogs, the
//! instances' topic, the consumer group, a state directory) once confirmed, refuses while an
//! instance runs, and a start afterwards rebuilds the tables from the sources alone.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use miroir_connectors::kafka::internal;
use miroir_connectors::kafka::KafkaConfig;
use support::*;

/// Runs `miroir reset` on `file` with `stdin` as its input; its exit code and stderr.
fn reset(
    file: &std::path::Path,
    state: &std::path::Path,
    more: &[&str],
    stdin: &str,
) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_miroir"))
        .arg("reset")
        .arg(file)
        .args(["--brokers", &brokers(), "--state-dir"])
        .arg(state)
        .args(more)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The internal topics of `t`'s topology that exist.
fn existing(t: &TestTopology) -> Vec<String> {
    internal::find(&KafkaConfig::new(brokers()), &t.topology)
        .unwrap()
        .into_iter()
        .filter(|topic| topic.partitions.is_some())
        .map(|topic| topic.name)
        .collect()
}

/// Whether the broker knows consumer group `group`.
fn group_exists(group: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let groups = consumer
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .unwrap();
    groups
        .groups()
        .iter()
        .any(|g| g.name() == group && g.state() != "Dead")
}

#[test]
fn reset_deletes_the_internal_topics_group_and_state_and_a_start_rebuilds_from_the_sources() {
    let run = Run::new("reset");
    let t = with_internal_table_only(user_directory(&run));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, &t.text).unwrap();
    let state = dir.path().join("state");
    let (events, _) = generate(21, 100, 1000);
    publish(&t, &events);
    let expected = expected_tables(&t.topology, &events);
    let mut db = pg();
    let engine = start_engine(&t.text, &state);
    wait_for_tables(&expected, Duration::from_secs(90), |name| {
        table_rows(&engine, &mut db, name)
    });
    let name = t.topology.name.clone();
    assert!(group_exists(&name));
    let made = existing(&t);
    assert_eq!(
        made.len(),
        3,
        "two changelogs and the instances' topic: {made:?}"
    );

    // While an instance runs, the group has a member: nothing is deleted.
    let (code, stderr) = reset(&file, &state, &["--yes"], "");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("stop every instance"), "{stderr}");
    assert_eq!(existing(&t), made);
    engine.shutdown();

    // Not confirmed: nothing is deleted.
    let (code, stderr) = reset(&file, &state, &[], "not-the-name\n");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nothing deleted"), "{stderr}");
    assert!(state.exists());
    assert_eq!(existing(&t), made);

    // Confirmed with the topology's name: all of it goes.
    let (code, stderr) = reset(&file, &state, &[], &format!("{name}\n"));
    assert_eq!(code, 0, "{stderr}");
    for topic in &made {
        assert!(stderr.contains(topic.as_str()), "lists {topic}: {stderr}");
    }
    assert!(!state.exists(), "the state directory is gone");
    assert!(!group_exists(&name), "the consumer group is gone");
    wait_until("the topics are deleted", Duration::from_secs(30), || {
        existing(&t).is_empty()
    });

    // A start from nothing reads the sources again and makes the same tables.
    let engine = start_engine(&t.text, &state);
    wait_for_tables(&expected, Duration::from_secs(90), |name| {
        table_rows(&engine, &mut db, name)
    });
    assert_eq!(existing(&t), made, "made again");
    engine.shutdown();
}
