//! PostgreSQL restarted mid-stream: the sink retries with backoff, the instance reports it
//! (not ready, `miroir_sink_up` 0), and once the database is back the external tables equal
//! the reference evaluation of every event: nothing lost, nothing applied twice.
//!
//! Alone in its test binary: it stops the shared PostgreSQL server (`scripts/services`).

mod support;

use std::process::Command;
use std::time::Duration;

use miroir::Engine;
use support::*;

fn services(args: &[&str]) {
    let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "scripts/services {args:?} failed");
}

#[test]
fn postgres_restarted_mid_stream_loses_nothing() {
    let run = Run::new("pgrestart");
    let t = user_directory(&run);
    let (events, _) = generate(31, 300, 4500);
    let third = events.len() / 3;
    publish(&t, &events[..third]);
    let state = tempfile::tempdir().unwrap();
    let engine = Engine::builder()
        .topology_str(t.text.clone())
        .brokers(brokers())
        .state_dir(state.path())
        .workers(2)
        .epoch_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    let external: Vec<String> = t
        .topology
        .tables
        .iter()
        .filter(|t| t.postgres().is_some())
        .map(|t| t.name.clone())
        .collect();
    let expected_of = |upto: usize| {
        let mut all = expected_tables(&t.topology, &events[..upto]);
        all.retain(|name, _| external.contains(name));
        all
    };
    let read = |name: &str| {
        let Ok(mut db) = postgres::Client::connect(&database_url(), postgres::NoTls) else {
            return Default::default();
        };
        pg_table(&mut db, &t.topology, name).unwrap_or_default()
    };
    wait_for_tables(&expected_of(third), Duration::from_secs(90), read);

    services(&["down", "postgres"]);
    publish(&t, &events[third..2 * third]);
    wait_until(
        "the sink never noticed the database was down",
        Duration::from_secs(30),
        || engine.status().sink_failure.is_some(),
    );
    assert!(!engine.ready(), "not ready while the database is down");
    services(&["up"]);
    publish(&t, &events[2 * third..]);

    wait_for_tables(&expected_of(events.len()), Duration::from_secs(120), read);
    assert!(engine.status().sink_failure.is_none());
    let metrics = engine.metrics();
    assert!(
        counter(&metrics, "miroir_sink_retries_total", "") > 0,
        "{metrics}"
    );
    assert_eq!(counter(&metrics, "miroir_sink_up", ""), 1, "{metrics}");
    engine.shutdown();
}
