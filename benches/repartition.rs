//! The repartition hop's cost: events per second into `users_per_department` (a join on a
//! foreign key and a GROUP BY on the department's name) computed in stages joined by
//! repartition topics, against the same table computed in one stage (right with one instance
//! only), in the same run, on one instance with changelogs.
//!
//! ```sh
//! eval "$(scripts/services up)"
//! cargo bench --bench repartition                  # 1,000,000 events over 100,000 users
//! MIROIR_BENCH_EVENTS=200000 MIROIR_BENCH_USERS=50000 cargo bench --bench repartition
//! ```
//!
//! 1. publishes 100 departments and the user events to fresh topics with 4 partitions;
//! 2. runs an embedded engine on the table, split, then unsplit, then split and unsplit again
//!    (each from an empty state directory and its own consumer group), each until the table
//!    holds the count of every department;
//! 3. rewrites the `repartition` section of `docs/benchmarks.md`.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use miroir::Engine;
use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::output::Publisher;
use miroir_connectors::kafka::KafkaConfig;

use support::{brokers, delete_run_topics, env_or, replace_section, run_id};

const PARTITIONS: i32 = 4;
const DEPARTMENTS: u64 = 100;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The topology of run `run`, named after `phase` (each phase its own consumer group).
fn topology(run: &str, phase: &str) -> String {
    format!(
        r#"name = "bench-{run}-{phase}"
[sources.users]
topic = "user-{run}"
key = "id"
columns = {{ id = "text", name = "text", department_id = "text", version = "bigint" }}
late = {{ order_by = "version" }}
[sources.departments]
topic = "department-{run}"
key = "id"
columns = {{ id = "text", name = "text" }}
[tables.users_per_department]
query = """
SELECT d.name AS department, count(*) AS users, max(u.version) AS max_version
FROM users u JOIN departments d ON u.department_id = d.id
GROUP BY d.name"""
store = "internal"
"#
    )
}

/// Publishes the departments and `events` user events over `users` users; returns each
/// department name's expected user count.
fn publish(run: &str, events: u64, users: u64) -> BTreeMap<String, i64> {
    let config = KafkaConfig::new(brokers());
    let (user_topic, department_topic) = (format!("user-{run}"), format!("department-{run}"));
    create_topic(&config, &user_topic, PARTITIONS).unwrap();
    create_topic(&config, &department_topic, PARTITIONS).unwrap();
    let publisher = Publisher::new(&config).unwrap();
    for d in 0..DEPARTMENTS {
        let payload = format!("{{\"id\":\"d-{d}\",\"name\":\"Department {d}\"}}");
        publisher
            .send(
                &department_topic,
                format!("d-{d}").as_bytes(),
                Some(payload.as_bytes()),
            )
            .unwrap();
    }
    let mut department_of = vec![0u64; users as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..events {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let user = i % users;
        let department = x % DEPARTMENTS;
        department_of[user as usize] = department;
        let payload = format!(
            "{{\"id\":\"u-{user}\",\"name\":\"User {user}\",\"department_id\":\"d-{department}\",\"version\":{i}}}"
        );
        publisher
            .send(
                &user_topic,
                format!("u-{user}").as_bytes(),
                Some(payload.as_bytes()),
            )
            .unwrap();
    }
    publisher.flush().unwrap();
    let mut counts = BTreeMap::new();
    for d in department_of.iter().take(events.min(users) as usize) {
        *counts.entry(format!("Department {d}")).or_insert(0) += 1;
    }
    counts
}

/// Runs the table (split into stages or not) until it holds `expected`; the seconds taken.
fn phase(run: &str, name: &str, split: bool, expected: &BTreeMap<String, i64>) -> f64 {
    let state = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let engine = Engine::builder()
        .topology_str(topology(run, name))
        .brokers(brokers())
        .state_dir(state.path())
        .workers(2)
        .repartition(split)
        .start()
        .unwrap();
    loop {
        let rows = engine
            .scan("users_per_department", "", 10_000)
            .unwrap_or_default();
        let counts: BTreeMap<String, i64> = rows
            .iter()
            .filter_map(|r| Some((r["department"].as_str()?.to_string(), r["users"].as_i64()?)))
            .collect();
        if &counts == expected {
            break;
        }
        assert!(engine.failure().is_none(), "{:?}", engine.failure());
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "{name} stalled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = started.elapsed().as_secs_f64();
    engine.shutdown();
    secs
}

fn main() {
    let events = env_or("MIROIR_BENCH_EVENTS", 1_000_000);
    let users = env_or("MIROIR_BENCH_USERS", 100_000);
    let run = run_id();
    eprintln!("bench: publishing {events} events over {users} users");
    let expected = publish(&run, events, users);
    let mut split = Vec::new();
    let mut unsplit = Vec::new();
    for turn in 0..2 {
        split.push(phase(&run, &format!("split{turn}"), true, &expected));
        unsplit.push(phase(&run, &format!("unsplit{turn}"), false, &expected));
        eprintln!(
            "bench: turn {turn}: split {:.2} s, unsplit {:.2} s",
            split[turn], unsplit[turn]
        );
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (s, u) = (best(&split), best(&unsplit));
    let rate = |secs: f64| events as f64 / secs;
    let section = format!(
        "<!-- repartition:begin -->\n\
         ## The repartition hop\n\n\
         Command: `eval \"$(scripts/services up)\" && cargo bench --bench repartition` \
         ({events} user events over {users} users and {DEPARTMENTS} departments, {PARTITIONS} \
         partitions, single local Kafka broker, 2 cores; release build; one instance with 2 \
         workers and changelogs). `users_per_department` (a join on a foreign key and a GROUP \
         BY on the department's name), from an empty state until it holds every department's \
         count; each way twice, alternating, the faster of each kept.\n\n\
         | run | time (s) | events/s |\n|---|---|---|\n\
         | one stage (`EngineBuilder::repartition(false)`: right with one instance only; baseline) | {u:.2} | {:.0} |\n\
         | in stages: users repartitioned by department, partial counts by department name | {s:.2} | {:.0} |\n\n\
         In stages over one stage: **{:.2}** (goal: at least 0.5). The runs: in stages {}; one stage {}.\n\
         <!-- repartition:end -->\n",
        rate(u),
        rate(s),
        u / s,
        split.iter().map(|x| format!("{x:.2} s")).collect::<Vec<_>>().join(", "),
        unsplit.iter().map(|x| format!("{x:.2} s")).collect::<Vec<_>>().join(", "),
    );
    println!("{section}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/benchmarks.md");
    let current = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    std::fs::write(path, replace_section(&current, "repartition", &section)).unwrap();
    eprintln!("bench: wrote {path}");
    delete_run_topics(&run);
}
