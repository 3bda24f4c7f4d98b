//! Point lookups over HTTP on two instances of one topology: answered by the instance asked
//! (local), forwarded to the other (forwarded), and the baseline (the same HTTP server
//! answering `GET /health` from memory, without RocksDB), in the same run.
//!
//! ```sh
//! eval "$(scripts/services up)"
//! cargo bench --bench lookups                      # 10 s per phase at 500 lookups/s
//! MIROIR_BENCH_SECONDS=5 MIROIR_BENCH_RATE=1000 cargo bench --bench lookups
//! ```
//!
//! 1. publishes 10,000 users to a fresh topic with 4 partitions;
//! 2. starts two embedded engines (`topologies/user-directory.toml`, its internal table) in
//!    this process, each serving HTTP, and waits until each owns some partitions and every
//!    key answers on the first;
//! 3. asks the first instance, one request at a time at a fixed rate, for: its `/health`,
//!    keys it owns, keys the other owns; in turns, twice, each phase timed from send to answer;
//! 4. rewrites the `lookups` section of `docs/benchmarks.md`.

#[path = "support/cluster.rs"]
mod cluster;
mod support;

use std::time::{Duration, Instant};

use miroir::miroir_engine::partition::partition_for_key;
use miroir::Engine;
use miroir_connectors::kafka::admin::{create_topic, delete_topics};
use miroir_connectors::kafka::output::Publisher;
use miroir_connectors::kafka::KafkaConfig;

use cluster::owned;
use support::{brokers, env_or, internal_tables_only, replace_section, run_id};

const PARTITIONS: u32 = 4;
const USERS: usize = 10_000;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The latencies of one phase, in milliseconds.
struct Phase {
    name: &'static str,
    p50: f64,
    p99: f64,
    count: usize,
}

/// Asks `paths` in turn at `rate` per second for `seconds`; each request timed alone.
fn phase(
    client: &reqwest::blocking::Client,
    name: &'static str,
    paths: &[String],
    rate: u64,
    seconds: u64,
) -> Phase {
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut next = Instant::now();
    let mut ms = Vec::new();
    for path in paths.iter().cycle() {
        if Instant::now() >= end {
            break;
        }
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        next += every;
        let sent = Instant::now();
        let status = client.get(path).send().map(|r| r.status().as_u16());
        assert_eq!(status.ok(), Some(200), "{path}");
        ms.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q) as usize];
    Phase {
        name,
        p50: at(0.50),
        p99: at(0.99),
        count: ms.len(),
    }
}

/// The partitions of `topic` the instance at `base` owns.
fn main() {
    let seconds = env_or("MIROIR_BENCH_SECONDS", 10);
    let rate = env_or("MIROIR_BENCH_RATE", 500);
    let run = run_id();
    let topic = format!("user-lookups-{run}");
    let config = KafkaConfig::new(brokers());
    create_topic(&config, &topic, PARTITIONS as i32).unwrap();
    let publisher = Publisher::new(&config).unwrap();
    for i in 0..USERS {
        let payload = format!(
            r#"{{"id":"u-{i}","email":"user{i}@example.org","name":"User {i}","department_id":"d-1","active":true,"version":1,"event_type":"created","updated_at":"2026-01-01T00:00:00Z"}}"#
        );
        publisher
            .send(
                &topic,
                format!("u-{i}").as_bytes(),
                Some(payload.as_bytes()),
            )
            .unwrap();
    }
    publisher.flush().unwrap();

    let text = std::fs::read_to_string("topologies/user-directory.toml").unwrap();
    let text = internal_tables_only(&text)
        .replace(
            "name = \"user-directory\"",
            &format!("name = \"lookups-{run}\""),
        )
        .replace("topic = \"user\"", &format!("topic = \"{topic}\""))
        .replace("topic = \"department\"", &format!("topic = \"{topic}-d\""));
    create_topic(&config, &format!("{topic}-d"), PARTITIONS as i32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engines: Vec<Engine> = ["a", "b"]
        .iter()
        .map(|name| {
            Engine::builder()
                .topology_str(text.clone())
                .brokers(brokers())
                .state_dir(dir.path().join(name))
                .listen("127.0.0.1:0".parse().unwrap())
                .start()
                .unwrap()
        })
        .collect();
    let bases: Vec<String> = engines
        .iter()
        .map(|e| format!("http://{}", e.http_addr().unwrap()))
        .collect();
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mine, theirs) = loop {
        assert!(Instant::now() < deadline, "the two instances never settled");
        std::thread::sleep(Duration::from_millis(500));
        let (a, b) = (
            owned(&client, &bases[0], &topic),
            owned(&client, &bases[1], &topic),
        );
        if a.is_empty() || b.is_empty() || a.len() + b.len() != PARTITIONS as usize {
            continue;
        }
        let keys = (0..USERS).map(|i| format!("u-{i}"));
        let (mine, theirs): (Vec<String>, Vec<String>) =
            keys.partition(|k| a.contains(&partition_for_key(k.as_bytes(), PARTITIONS)));
        let row = |k: &String| format!("{}/v1/tables/user_contacts/rows/{k}", bases[0]);
        let all_answer = mine
            .iter()
            .chain(&theirs)
            .step_by(97)
            .all(|k| client.get(row(k)).send().is_ok_and(|r| r.status() == 200));
        if all_answer {
            break (
                mine.iter().map(row).collect::<Vec<_>>(),
                theirs.iter().map(row).collect::<Vec<_>>(),
            );
        }
    };
    let health = vec![format!("{}/health", bases[0])];
    let mut phases = Vec::new();
    for _ in 0..2 {
        phases.push(phase(
            &client,
            "baseline: `GET /health`",
            &health,
            rate,
            seconds,
        ));
        phases.push(phase(
            &client,
            "local: a key the instance owns",
            &mine,
            rate,
            seconds,
        ));
        phases.push(phase(
            &client,
            "forwarded: a key the other instance owns",
            &theirs,
            rate,
            seconds,
        ));
    }
    for e in engines {
        e.shutdown();
    }
    let _ = delete_topics(&config, &[&topic, &format!("{topic}-d")]);

    let median = |name: &str, p: fn(&Phase) -> f64| {
        let mut v: Vec<f64> = phases.iter().filter(|x| x.name == name).map(p).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut section = format!(
        "<!-- lookups:begin -->\n## Point lookups over HTTP: local and forwarded\n\n\
         Command: `eval \"$(scripts/services up)\" && cargo bench --bench lookups` (MIROIR_BENCH_SECONDS={seconds}, MIROIR_BENCH_RATE={rate}): two embedded instances of `user-directory.toml`'s internal table in one process, {USERS} users over {PARTITIONS} partitions, one client asking the first instance one request at a time at {rate}/s, each phase twice in turns.\n\n\
         | phase | lookups | p50 ms | p99 ms |\n|---|---|---|---|\n"
    );
    for p in &phases {
        section.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} |\n",
            p.name, p.count, p.p50, p.p99
        ));
    }
    let local = "local: a key the instance owns";
    let forwarded = "forwarded: a key the other instance owns";
    section.push_str(&format!(
        "\nForwarded p99 over local p99 (the higher of the two turns each): **{:.2}x** (goal: at most 2x); forwarded p50 over local p50: {:.2}x.\n<!-- lookups:end -->\n",
        median(forwarded, |p| p.p99) / median(local, |p| p.p99),
        median(forwarded, |p| p.p50) / median(local, |p| p.p50),
    ));
    print!("{section}");
    let doc = "docs/benchmarks.md";
    let text = std::fs::read_to_string(doc).unwrap_or_default();
    std::fs::write(doc, replace_section(&text, "lookups", &section)).unwrap();
    eprintln!("bench: wrote {doc}");
}
