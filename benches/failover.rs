//! Failover, with and without a standby: two `miroir run` processes share a topology; one is
//! killed with SIGKILL, and the other is asked for the dead one's keys until every one answers
//! its row again. Then the same with `--standby-replicas 1`. The baseline is the consumer
//! group's `session.timeout.ms` (10 s), the time Kafka takes to notice a member that died
//! without leaving: what follows it (the rebalance, the restore from the changelog, reading up
//! to the partitions' ends) is miroir's part.
//!
//! ```sh
//! eval "$(scripts/services up)"
//! cargo bench --bench failover
//! MIROIR_BENCH_USERS=100000 cargo bench --bench failover   # more state to restore
//! ```

#[path = "support/cluster.rs"]
mod cluster;
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use miroir::miroir_engine::partition::partition_for_key;
use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::output::Publisher;
use miroir_connectors::kafka::KafkaConfig;

use cluster::owned;
use support::{brokers, delete_run_topics, env_or, internal_tables_only, replace_section, run_id};

const PARTITIONS: u32 = 4;
/// The source consumer's `session.timeout.ms` (see `connectors/src/kafka/input.rs`).
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// A `miroir run` process, killed when dropped.
struct Instance {
    child: Child,
    base: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(file: &std::path::Path, state: &std::path::Path, more: &[&str]) -> Instance {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_miroir"))
        .args(["run", file.to_str().unwrap(), "--brokers", &brokers()])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(more)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Instance {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

fn publish(config: &KafkaConfig, topic: &str, users: usize) {
    let publisher = Publisher::new(config).unwrap();
    for i in 0..users {
        let payload = format!(
            r#"{{"id":"u-{i}","email":"user{i}@example.org","name":"User {i}","department_id":"d-1","active":true,"version":1,"event_type":"created","updated_at":"2026-01-01T00:00:00Z"}}"#
        );
        publisher
            .send(topic, format!("u-{i}").as_bytes(), Some(payload.as_bytes()))
            .unwrap();
    }
    publisher.flush().unwrap();
}

/// How the row paths in `paths` answer on `client`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answered {
    /// Not every one with its row.
    No,
    /// Every one with its row, some from a standby (stale).
    ByStandby,
    /// Every one with its row, from its partition's owner.
    ByOwner,
}

/// With `stop_at_stale`, the first answer from a standby ends the pass (what is measured
/// then is when the owner answers them all).
fn answered(client: &reqwest::blocking::Client, paths: &[String], stop_at_stale: bool) -> Answered {
    let mut from_standby = false;
    for path in paths {
        let Some(answer) = client
            .get(path)
            .send()
            .ok()
            .filter(|r| r.status() == 200)
            .and_then(|r| r.json::<serde_json::Value>().ok())
        else {
            return Answered::No;
        };
        // A standby's answer has no commit time of its own.
        from_standby |= answer["freshness"]["committed_at"].is_null();
        if from_standby && stop_at_stale {
            return Answered::ByStandby;
        }
    }
    if from_standby {
        Answered::ByStandby
    } else {
        Answered::ByOwner
    }
}

fn main() {
    let users = env_or("MIROIR_BENCH_USERS", 10_000) as usize;
    let run = run_id();
    let topic = format!("user-failover-{run}");
    let config = KafkaConfig::new(brokers());
    create_topic(&config, &topic, PARTITIONS as i32).unwrap();
    create_topic(&config, &format!("{topic}-d"), PARTITIONS as i32).unwrap();
    publish(&config, &topic, users);
    let text = std::fs::read_to_string("topologies/user-directory.toml").unwrap();
    let text = internal_tables_only(&text)
        .replace("topic = \"user\"", &format!("topic = \"{topic}\""))
        .replace("topic = \"department\"", &format!("topic = \"{topic}-d\""));
    let (_, cold, asked) = failover(&text, &format!("failover-{run}"), &topic, users, &[]);
    let standby = ["--standby-replicas", "1"];
    let (stale, warm, _) = failover(&text, &format!("failover-{run}-s"), &topic, users, &standby);
    let baseline = SESSION_TIMEOUT.as_secs_f64();
    let row = |what: &str, t: Duration| {
        let secs = t.as_secs_f64();
        format!(
            "| {what} | {secs:.2} | **{:.0}%** | {:.1} |\n",
            secs / baseline * 100.0,
            secs - baseline
        )
    };
    let report = format!(
        "<!-- failover:begin -->\n\
         ## Failover, with and without a standby\n\n\
         Command: `eval \"$(scripts/services up)\" && cargo bench --bench failover` (two `miroir \
         run` processes, release build, {users} users over {PARTITIONS} partitions, internal \
         table alone; one killed with SIGKILL, the other asked for {asked} of its keys until each \
         answers its row; then the same with `--standby-replicas 1` on both, on a topology of \
         its own).\n\n\
         | | seconds | of `session.timeout.ms` | past it (s) |\n|---|---|---|---|\n\
         | `session.timeout.ms`: Kafka notices the dead member (baseline) | {baseline:.1} | 100% | 0 |\n\
         {}{}{}\n\
         Without a standby, a query for those keys answers 503 with `Retry-After` until the \
         new owner has them (never a 404 or a wrong row: `tests/cluster.rs`); past the \
         session timeout the rest is the rebalance, the changelog restore of the partitions \
         and reading up to their ends. With one, the survivor answers from its standby \
         (marked stale) as soon as it finds the owner unreachable: the first pass over the \
         keys after the kill; its own answers follow the session timeout and a restore of \
         only what the standby had not read.\n\
         <!-- failover:end -->\n",
        row("from SIGKILL to every asked key answered by its new owner, no standby", cold),
        row("with a standby: every asked key answered (stale, by the standby)", stale),
        row("with a standby: every asked key answered by its new owner", warm),
    );
    println!("{report}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/benchmarks.md");
    let current = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, replace_section(&current, "failover", &report)).unwrap();
    delete_run_topics(&run);
}

/// Runs two instances of the topology `text`, named `name`, with `more` arguments; kills one
/// once they settled, and times until every tenth key of its partitions answers on the other.
/// Returns the time until they answered (from a standby or not), until their new owner
/// answered them all, and the number of keys asked.
fn failover(
    text: &str,
    name: &str,
    topic: &str,
    users: usize,
    more: &[&str],
) -> (Duration, Duration, usize) {
    let text = text.replace("name = \"user-directory\"", &format!("name = \"{name}\""));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, text).unwrap();
    let a = start(&file, &dir.path().join("a"), more);
    let mut b = start(&file, &dir.path().join("b"), more);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    // Settled: each owns partitions, and every tenth key of the other's answers on the first.
    let deadline = Instant::now() + Duration::from_secs(120);
    let theirs = loop {
        assert!(Instant::now() < deadline, "the two instances never settled");
        std::thread::sleep(Duration::from_millis(500));
        let (mine, other) = (
            owned(&client, &a.base, topic),
            owned(&client, &b.base, topic),
        );
        if mine.is_empty() || other.is_empty() || mine.len() + other.len() != PARTITIONS as usize {
            continue;
        }
        let theirs: Vec<String> = (0..users)
            .map(|i| format!("u-{i}"))
            .filter(|k| other.contains(&partition_for_key(k.as_bytes(), PARTITIONS)))
            .step_by(10)
            .map(|k| format!("{}/v1/tables/user_contacts/rows/{k}", a.base))
            .collect();
        if answered(&client, &theirs, true) == Answered::ByOwner
            && standing_by(&client, &a.base, topic, &other, more)
        {
            break theirs;
        }
    };

    b.child.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    b.child.wait().unwrap();
    // Answered again: every asked key of the dead instance's partitions answers its row
    // (a standby's, stale, or the new owner's); then every one from its new owner.
    let mut first = None;
    while killed.elapsed() < Duration::from_secs(120) {
        match answered(&client, &theirs, first.is_some()) {
            Answered::No => {}
            Answered::ByStandby => {
                first.get_or_insert(killed.elapsed());
            }
            Answered::ByOwner => {
                let owned = killed.elapsed();
                return (first.unwrap_or(owned), owned, theirs.len());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the dead instance's keys never answered again");
}

/// Whether, when `more` asks for standbys, the instance at `base` stands by for the
/// partitions `other` of `topic`, caught up.
fn standing_by(
    client: &reqwest::blocking::Client,
    base: &str,
    topic: &str,
    other: &[u32],
    more: &[&str],
) -> bool {
    if !more.contains(&"--standby-replicas") {
        return true;
    }
    let Some(view) = client
        .get(format!("{base}/v1/cluster"))
        .send()
        .ok()
        .and_then(|r| r.json::<serde_json::Value>().ok())
    else {
        return false;
    };
    let me = &view["instance"];
    view["instances"].as_array().is_some_and(|live| {
        live.iter().any(|m| {
            &m["instance"] == me
                && m["standby_lag"] == 0
                && m["standby"][topic]
                    .as_array()
                    .is_some_and(|ps| ps.len() == other.len())
        })
    })
}
