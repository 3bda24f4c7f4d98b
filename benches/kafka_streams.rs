//! Ingest into the `user-directory` tables, and updates once loaded: miroir next to Kafka
//! Streams, on the same broker, the same events, in the same run.
//!
//! ```sh
//! eval "$(scripts/services up)"
//! cargo bench --bench kafka_streams                 # 1,000,000 events over 100,000 keys, 3 turns
//! MIROIR_BENCH_EVENTS=200000 MIROIR_BENCH_RUNS=5 cargo bench --bench kafka_streams
//! MIROIR_BENCH_SCALE=10000,100000,1000000 cargo bench --bench kafka_streams   # cost against keys
//! MIROIR_BENCH_UPDATES=20000 cargo bench --bench kafka_streams   # updates after the load (10,000)
//! RUST_LOG=miroir_connectors=info cargo bench --bench kafka_streams   # miroir's logs on stderr
//! MIROIR_BENCH_MEMORY_MIB=8192 cargo bench --bench kafka_streams   # a child over it is stopped
//! MIROIR_BENCH_PEER_MINUTES=60 cargo bench --bench kafka_streams   # the peer's time to catch up (30)
//! ```
//!
//! 1. builds the peer (`benches/peers/kafka-streams`, Maven) unless its jar is there;
//! 2. publishes 100,000 events over 10,000 keys to warm-up topics;
//! 3. for each turn, publishes 20 departments and N `User` events over K keys (the ingest
//!    benchmark's events: 1% late) to topics of the turn's own, and runs in a child process
//!    miroir (2 workers, changelogs on), then the peer's JVM (exactly-once v2, RocksDB stores,
//!    2 stream threads, its record cache as built): each first over the warm-up topics, then
//!    over the turn's until done, then over the updates (a newer email for existing users)
//!    published once it said it was loaded. Both keep the three tables in RocksDB (the
//!    topology's external tables become internal ones, and `users_per_department` leaves out
//!    `max(u.version)`, which a KTable aggregation cannot keep under retractions without
//!    keeping every value);
//! 4. checks that both ended with the same tables (row counts, and each department's counts);
//! 5. rewrites the `kafka-streams` section of `docs/benchmarks.md` with the medians, the spread
//!    and the ratios; with `MIROIR_BENCH_SCALE`, runs each number of keys (twice as many
//!    events) instead and rewrites the `kafka-streams-scale` section.
//!
//! CPU seconds are each process's own (user and system), from the measured run's start to its
//! end; the broker's are not counted on either side.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::output::Publisher;
use miroir_connectors::kafka::KafkaConfig;

mod support;

use support::{
    brokers, cpu_seconds, delete_run_topics, env_or, generate, memory_mib, peak_rss_mib, peer_jar,
    replace_section, rss_mib, run_id, without_history,
};

const PARTITIONS: i32 = 4;
const DEPARTMENTS: usize = 20;
/// Events of the warm-up topics (over a tenth as many keys).
const WARM_EVENTS: u64 = 100_000;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match std::env::var("MIROIR_BENCH_PHASE").as_deref() {
        Ok("miroir") => miroir_phase(),
        _ => orchestrate(),
    }
}

/// What a run ended with and what it cost.
#[derive(Debug, Default)]
struct Outcome {
    seconds: f64,
    cpu: f64,
    /// JIT compilation and garbage collection seconds (the JVM's).
    jit: f64,
    gc: f64,
    peak_rss_mib: f64,
    /// The tables' contents, summed up: row counts, and each department's users and active users.
    tables: Tables,
    /// Seconds and CPU seconds the updates sent after the load took, when some were.
    updates: Option<(f64, f64)>,
    /// Why the run stopped before its end, when it did (over the memory budget, or the peer
    /// not caught up in its time): its figures are then not known.
    stopped: Option<String>,
}

/// The tables a run ends with, summed up as both engines report them.
#[derive(Debug, Default, PartialEq)]
struct Tables {
    rows: BTreeMap<String, usize>,
    counts: BTreeMap<String, (i64, i64)>,
}

impl Tables {
    /// The lines `ROWS table n` and `COUNT department users active` of a run's output.
    fn parse(output: &str) -> Tables {
        let mut tables = Tables::default();
        for line in output.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["ROWS", table, n] => {
                    tables.rows.insert(table.to_string(), n.parse().unwrap());
                }
                ["COUNT", department, users, active] => {
                    tables.counts.insert(
                        department.replace('_', " "),
                        (users.parse().unwrap(), active.parse().unwrap()),
                    );
                }
                _ => {}
            }
        }
        tables
    }

    fn print(&self) {
        for (table, n) in &self.rows {
            println!("ROWS {table} {n}");
        }
        for (department, (users, active)) in &self.counts {
            println!("COUNT {} {users} {active}", department.replace(' ', "_"));
        }
    }
}

/// Publishes the departments and `events` user events over `keys` keys to `run`'s topics.
fn publish(config: &KafkaConfig, run: &str, events: u64, keys: u64) {
    let (users, departments) = (format!("user-{run}"), format!("department-{run}"));
    create_topic(config, &users, PARTITIONS).unwrap();
    create_topic(config, &departments, PARTITIONS).unwrap();
    let publisher = Publisher::new(config).unwrap();
    for d in 0..DEPARTMENTS {
        let payload = format!("{{\"id\":\"d-{d}\",\"name\":\"Department {d}\",\"version\":1}}");
        let key = format!("d-{d}");
        publisher
            .send(&departments, key.as_bytes(), Some(payload.as_bytes()))
            .unwrap();
    }
    for (k, _, _, payload) in generate(events, keys) {
        let key = format!("u-{k}");
        publisher
            .send(&users, key.as_bytes(), Some(payload.as_bytes()))
            .unwrap();
    }
    publisher.flush().unwrap();
}

/// The users `events` user events over `keys` keys name, in order.
fn seen_keys(events: u64, keys: u64) -> Vec<usize> {
    let mut seen = vec![false; keys as usize];
    for (k, _, _, _) in generate(events, keys) {
        seen[k] = true;
    }
    (0..keys as usize).filter(|&k| seen[k]).collect()
}

/// The tables end with the users `users_seen` (see [`seen_keys`]).
fn expected(users_seen: &[usize]) -> Tables {
    // The generator gives user k the department d-(k % 20), active unless k is a multiple of 10.
    let mut expected = Tables::default();
    let active = |k: &&usize| !(*k).is_multiple_of(10);
    expected.rows.insert(
        "user_contacts".into(),
        users_seen.iter().filter(active).count(),
    );
    expected
        .rows
        .insert("user_directory".into(), users_seen.len());
    for k in users_seen {
        let count = expected
            .counts
            .entry(format!("Department {}", k % DEPARTMENTS))
            .or_default();
        count.0 += 1;
        count.1 += i64::from(active(&k));
    }
    expected
}

fn orchestrate() {
    let turns = env_or("MIROIR_BENCH_RUNS", 3) as usize;
    let count = env_or("MIROIR_BENCH_UPDATES", 10_000) as usize;
    let run = run_id();
    let jar = peer_jar();
    let config = KafkaConfig::new(brokers());
    let warm = format!("{run}-warm");
    publish(&config, &warm, WARM_EVENTS, WARM_EVENTS / 10);
    let compare = |name: &str, events: u64, keys: u64| {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for turn in 0..turns {
            // Topics of the turn's own: the updates of one turn are not in the next one's load.
            let topics = format!("{name}-t{turn}");
            eprintln!("bench: publishing {events} events over {keys} keys");
            publish(&config, &topics, events, keys);
            let users = seen_keys(events, keys);
            let updates = updates(&users, count);
            // Each engine's topics (changelogs, stages) go once it is done, and the turn's
            // own once both are: at 10^7 keys they all would not fit on the disk at once.
            let m = miroir_child(&topics, &warm, (events, keys), &updates);
            delete_run_topics(&format!("bench-{topics}-miroir"));
            let k = peer_child(&jar, &topics, &warm, &updates);
            delete_run_topics(&topics);
            eprintln!(
                "bench: {keys} keys, turn {turn}: miroir {:.2} s, {:.2} CPU-s, updates {:?}; \
                 Kafka Streams {:.2} s, {:.2} CPU-s, updates {:?}",
                m.seconds, m.cpu, m.updates, k.seconds, k.cpu, k.updates
            );
            let expected = expected(&users);
            for (who, o) in [("miroir", &m), ("the peer", &k)] {
                assert!(
                    o.stopped.is_some() || o.tables == expected,
                    "{who}'s tables are not the expected ones"
                );
            }
            ours.push(m);
            theirs.push(k);
        }
        (ours, theirs)
    };
    let (name, section) = match std::env::var("MIROIR_BENCH_SCALE") {
        Ok(sizes) => {
            let mut rows = Vec::new();
            for keys in sizes.split(',').map(|k| k.trim().parse::<u64>().unwrap()) {
                let (ours, theirs) = compare(&format!("{run}-k{keys}"), 2 * keys, keys);
                rows.push((keys, ours, theirs));
            }
            ("kafka-streams-scale", scale_report(turns, count, &rows))
        }
        Err(_) => {
            let events = env_or("MIROIR_BENCH_EVENTS", 1_000_000);
            let keys = env_or("MIROIR_BENCH_KEYS", 100_000);
            let (ours, theirs) = compare(&run, events, keys);
            ("kafka-streams", report(events, keys, count, &ours, &theirs))
        }
    };
    println!("{section}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/benchmarks.md");
    let current = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    std::fs::write(path, replace_section(&current, name, &section)).unwrap();
    eprintln!("bench: wrote {path}");
    delete_run_topics(&run);
}

/// The scaling section: for each number of keys (twice as many events), each engine's events
/// per CPU-second, peak memory and CPU per update after the load (medians of the turns).
fn scale_report(turns: usize, count: usize, rows: &[(u64, Vec<Outcome>, Vec<Outcome>)]) -> String {
    let median_of = |runs: &[Outcome], f: &dyn Fn(&Outcome) -> f64| {
        median_spread(runs.iter().map(f).collect()).0
    };
    let per_update = |o: &Outcome| per_update(o, count);
    let mut table = String::new();
    for (keys, ours, theirs) in rows {
        let events = (2 * keys) as f64;
        // A side with a turn stopped before its end has no figures: its cells say why.
        let cell = |runs: &[Outcome], f: &dyn Fn(&Outcome) -> f64, digits: usize| match runs
            .iter()
            .find_map(|o| o.stopped.as_ref())
        {
            Some(why) => (f64::NAN, format!("stopped: {why}")),
            None => {
                let m = median_of(runs, f);
                (m, format!("{m:.digits$}"))
            }
        };
        let ratio = |x: f64| match x.is_nan() {
            true => "-".to_string(),
            false => format!("**{x:.1}x**"),
        };
        let (r, r_text) = cell(ours, &|o| events / o.cpu, 0);
        let (k, k_text) = cell(theirs, &|o| events / o.cpu, 0);
        let (_, mr) = cell(ours, &|o| o.peak_rss_mib, 0);
        let (_, mk) = cell(theirs, &|o| o.peak_rss_mib, 0);
        let (ur, ur_text) = cell(ours, &per_update, 0);
        let (uk, uk_text) = cell(theirs, &per_update, 0);
        table.push_str(&format!(
            "| {keys} | {r_text} | {k_text} | {} | {mr} | {mk} | {ur_text} | {uk_text} | {} |\n",
            ratio(r / k),
            ratio(uk / ur),
        ));
    }
    format!(
        "<!-- kafka-streams-scale:begin -->\n\
         ## How cost grows with the keys, next to Kafka Streams\n\n\
         Command: `eval \"$(scripts/services up)\" && MIROIR_BENCH_SCALE={} \
         MIROIR_BENCH_RUNS={turns} cargo bench --bench kafka_streams` (for each number of keys, \
         twice as many events; then {count} updates of an email, timed apart; medians of {turns} \
         turn(s); the same engines, settings and machine as the section above).\n\n\
         | keys | miroir events per CPU-second | Kafka Streams events per CPU-second | ratio | \
         miroir peak RSS (MiB) | Kafka Streams peak RSS (MiB) | miroir CPU µs per update | \
         Kafka Streams CPU µs per update | ratio |\n\
         |---|---|---|---|---|---|---|---|---|\n\
         {table}\
         <!-- kafka-streams-scale:end -->\n",
        rows.iter()
            .map(|(k, ..)| k.to_string())
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// The median of `values`, and their smallest and largest.
fn median_spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

fn report(events: u64, keys: u64, count: usize, ours: &[Outcome], theirs: &[Outcome]) -> String {
    assert!(
        ours.iter().chain(theirs).all(|o| o.stopped.is_none()),
        "a turn stopped before its end: no figures to report"
    );
    let figure =
        |runs: &[Outcome], f: &dyn Fn(&Outcome) -> f64| median_spread(runs.iter().map(f).collect());
    let row = |name: &str, runs: &[Outcome], jvm: bool| {
        let (s, s0, s1) = figure(runs, &|o| o.seconds);
        let (c, c0, c1) = figure(runs, &|o| o.cpu);
        let (r, r0, r1) = figure(runs, &|o| events as f64 / o.cpu);
        let (m, m0, m1) = figure(runs, &|o| o.peak_rss_mib);
        let (u, u0, u1) = figure(runs, &|o| per_update(o, count));
        let jvm = if jvm {
            let (j, _, _) = figure(runs, &|o| o.jit);
            let (g, _, _) = figure(runs, &|o| o.gc);
            let (w, _, _) = figure(runs, &|o| events as f64 / (o.cpu - o.jit));
            format!("{j:.1} / {g:.1} | {w:.0}")
        } else {
            "- | -".into()
        };
        format!(
            "| {name} | {s:.2} ({s0:.2}-{s1:.2}) | {c:.2} ({c0:.2}-{c1:.2}) | {r:.0} ({r0:.0}-{r1:.0}) | {jvm} | {m:.0} ({m0:.0}-{m1:.0}) | {u:.0} ({u0:.0}-{u1:.0}) |\n"
        )
    };
    let per_cpu = |runs: &[Outcome]| figure(runs, &|o| events as f64 / o.cpu).0;
    let rss = |runs: &[Outcome]| figure(runs, &|o| o.peak_rss_mib).0;
    let update = |runs: &[Outcome]| figure(runs, &|o| per_update(o, count)).0;
    let java = Command::new("java")
        .arg("-version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    format!(
        "<!-- kafka-streams:begin -->\n\
         ## Ingest next to Kafka Streams\n\n\
         Command: `eval \"$(scripts/services up)\" && cargo bench --bench kafka_streams` \
         ({events} events over {keys} keys, 1% late, 20 departments, {PARTITIONS} partitions; \
         {} turns, each engine first warmed up on {WARM_EVENTS} events over a tenth as many keys, \
         then sent {count} updates of an email once loaded; single local Kafka \
         broker, 2 cores, 24 GiB; miroir release build with 2 workers and changelogs; Kafka \
         Streams 4.1.2 on {java}, default JVM options, exactly-once v2, 2 stream threads, \
         RocksDB stores, record cache as built).\n\n\
         Both keep `user_contacts`, `user_directory` and `users_per_department` in RocksDB, \
         with the late policy, and end with the same tables (checked). Medians, with the \
         smallest and largest turn:\n\n\
         | engine | time (s) | CPU (s) | events per CPU-second | JIT / GC (s) | events per CPU-second, JIT left out | peak RSS (MiB) | CPU µs per update, loaded |\n\
         |---|---|---|---|---|---|---|---|\n\
         {}{}\n\
         miroir's events per CPU-second over Kafka Streams': **{:.1}x** (target: at least 10x). \
         Peak memory, Kafka Streams' over miroir's: **{:.1}x** (target: above 1). CPU per \
         update, Kafka Streams' over miroir's: **{:.1}x**. CPU seconds \
         count the whole process: for the JVM, its JIT compiler threads (their time, reported by \
         the JVM, is left out in the second rate) and its garbage collector; time and memory \
         include what each engine holds from its warm-up.\n\
         <!-- kafka-streams:end -->\n",
        ours.len(),
        row("miroir", ours, false),
        row("Kafka Streams (the peer)", theirs, true),
        per_cpu(ours) / per_cpu(theirs),
        rss(theirs) / rss(ours),
        update(theirs) / update(ours),
    )
}

/// CPU microseconds per update of a turn that was sent `count` updates after its load.
fn per_update(o: &Outcome, count: usize) -> f64 {
    o.updates
        .map_or(f64::NAN, |(_, cpu)| cpu * 1e6 / count as f64)
}

/// A run's outcome from its output: `RESULT seconds cpu jit gc rss`, the tables' lines, and
/// `UPDATED seconds cpu` when updates followed the load.
fn outcome(who: &str, status: std::process::ExitStatus, stdout: &str) -> Outcome {
    let Some(result) = stdout.lines().find(|l| l.starts_with("RESULT")) else {
        // The peer says why it stopped (not caught up in its time); anything else is a failure.
        let why = stdout
            .lines()
            .find_map(|l| l.strip_prefix("STOPPED "))
            .unwrap_or_else(|| panic!("{who} failed: {status}"));
        return Outcome {
            stopped: Some(why.to_string()),
            ..Outcome::default()
        };
    };
    let updates = stdout
        .lines()
        .find_map(|l| l.strip_prefix("UPDATED "))
        .map(|l| {
            let f: Vec<f64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            (f[0], f[1])
        });
    let f: Vec<f64> = result
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    Outcome {
        seconds: f[0],
        cpu: f[1],
        jit: f[2],
        gc: f[3],
        peak_rss_mib: f[4],
        tables: Tables::parse(stdout),
        updates,
        stopped: None,
    }
}

/// Runs a turn's child process to its end; when it says `LOADED`, publishes `updates` (key,
/// payload) to `topic` and tells it to go on.
fn run_child(
    who: &str,
    mut command: Command,
    updates: &[(String, String)],
    topic: &str,
) -> Outcome {
    use std::io::{BufRead, BufReader, Write};
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{who}: {e}"));
    let budget = env_or("MIROIR_BENCH_MEMORY_MIB", memory_mib() as u64 * 3 / 4);
    let over_budget = watch_memory(who, child.id(), budget as f64);
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line == "LOADED" {
            let publisher = Publisher::new(&KafkaConfig::new(brokers())).unwrap();
            for (key, payload) in updates {
                publisher
                    .send(topic, key.as_bytes(), Some(payload.as_bytes()))
                    .unwrap();
            }
            publisher.flush().unwrap();
            writeln!(stdin, "GO").unwrap();
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = child.wait().unwrap();
    if over_budget.load(std::sync::atomic::Ordering::SeqCst) {
        return Outcome {
            stopped: Some(format!("over {budget} MiB")),
            ..Outcome::default()
        };
    }
    outcome(who, status, &stdout)
}

/// Watches process `pid`'s resident memory, and kills it once over `budget` MiB
/// (`MIROIR_BENCH_MEMORY_MIB`, three quarters of the machine's memory by default), which
/// would otherwise push the broker and the system into swap. The flag tells whether it did.
fn watch_memory(who: &str, pid: u32, budget: f64) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let over = std::sync::Arc::new(AtomicBool::new(false));
    let (flag, who, pid) = (over.clone(), who.to_string(), pid.to_string());
    std::thread::spawn(move || loop {
        let rss = rss_mib(&pid);
        if rss == 0.0 {
            return;
        }
        if rss > budget {
            eprintln!("bench: {who} over the memory budget ({rss:.0} > {budget:.0} MiB): stopped");
            flag.store(true, Ordering::SeqCst);
            let _ = Command::new("kill").args(["-9", &pid]).status();
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    });
    over
}

/// `count` updates of the users in `users`, in turns: a newer email for each, nothing else
/// changed (so the tables' counts stay), as (key, payload).
fn updates(users: &[usize], count: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|i| {
            let k = users[i % users.len()];
            let payload = format!(
                "{{\"id\":\"u-{k}\",\"email\":\"update{i}@example.org\",\"name\":\"User {k}\",\"department_id\":\"d-{}\",\"active\":{},\"version\":{},\"event_type\":\"email-changed\",\"updated_at\":\"2026-11-26T10:00:00Z\"}}",
                k % DEPARTMENTS,
                !k.is_multiple_of(10),
                UPDATE_VERSIONS + i as i64
            );
            (format!("u-{k}"), payload)
        })
        .collect()
}

/// Versions of the updates start here, above any the generator gives.
const UPDATE_VERSIONS: i64 = 1_000_000_000;

/// One turn of miroir over `run`'s topics (`events` over `keys` keys), warmed up on `warm`'s,
/// sent `updates` after the load.
fn miroir_child(run: &str, warm: &str, sizes: (u64, u64), updates: &[(String, String)]) -> Outcome {
    let (events, keys) = sizes;
    // The state directory is the bench's, so that a child stopped for its memory leaves no
    // state behind.
    let state = tempfile::tempdir().unwrap();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .env("MIROIR_BENCH_STATE", state.path())
        .env("MIROIR_BENCH_PHASE", "miroir")
        .env("MIROIR_BENCH_RUN", run)
        .env("MIROIR_BENCH_WARM", warm)
        .env("MIROIR_BENCH_EVENTS", events.to_string())
        .env("MIROIR_BENCH_KEYS", keys.to_string())
        .env("MIROIR_BENCH_UPDATES", updates.len().to_string());
    run_child("miroir", command, updates, &format!("user-{run}"))
}

/// One turn of the peer over `run`'s topics, warmed up on `warm`'s, sent `updates` after the
/// load.
fn peer_child(jar: &Path, run: &str, warm: &str, updates: &[(String, String)]) -> Outcome {
    let mut command = Command::new("java");
    command
        .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
        .arg("-jar")
        .arg(jar)
        .arg("tables")
        .arg(format!("brokers={}", brokers()))
        .arg(format!("app=bench-{run}-peer"))
        .arg(format!("users=user-{run}"))
        .arg(format!("departments=department-{run}"))
        .arg(format!("warm-users=user-{warm}"))
        .arg(format!("warm-departments=department-{warm}"))
        .arg(format!("updates={}", updates.len()))
        .arg(format!(
            "deadline-minutes={}",
            env_or("MIROIR_BENCH_PEER_MINUTES", 30)
        ));
    run_child("the peer", command, updates, &format!("user-{run}"))
}

/// The topology both engines run: every table internal, `users_per_department` without
/// `max(u.version)`, over `run`'s topics, under a name of its own (its own consumer group and
/// changelogs).
fn topology(run: &str, name: &str) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/topologies/user-directory.toml"
    ))
    .unwrap();
    let internal: Vec<&str> = without_history(&text)
        .lines()
        .map(|l| {
            if l.starts_with("sink = ") {
                "store = \"internal\""
            } else {
                l
            }
        })
        .collect();
    internal
        .join("\n")
        .replace(" max(u.version) AS max_version,", "")
        .replace("name = \"user-directory\"", &format!("name = \"{name}\""))
        .replace("topic = \"user\"", &format!("topic = \"user-{run}\""))
        .replace(
            "topic = \"department\"",
            &format!("topic = \"department-{run}\""),
        )
}

/// Runs `topology` until it holds the tables `done` accepts; the engine, still running.
fn run_until(
    topology: String,
    state: &Path,
    done: impl Fn(&miroir::Engine) -> bool,
) -> miroir::Engine {
    let engine = miroir::Engine::builder()
        .topology_str(topology)
        .brokers(brokers())
        .state_dir(state)
        .workers(2)
        .start()
        .unwrap();
    let started = Instant::now();
    while !done(&engine) {
        assert!(engine.failure().is_none(), "{:?}", engine.failure());
        assert!(started.elapsed() < Duration::from_secs(1800), "stalled");
        std::thread::sleep(Duration::from_millis(100));
    }
    engine
}

/// The tables of a running engine, summed up.
fn tables_of(engine: &miroir::Engine) -> Tables {
    let mut tables = Tables::default();
    for table in ["user_contacts", "user_directory"] {
        let rows = engine.scan(table, "", 10_000_000).unwrap_or_default();
        tables.rows.insert(table.into(), rows.len());
    }
    tables.counts = department_counts(engine);
    tables
}

/// Each department's users and active users in a running engine's `users_per_department`.
fn department_counts(engine: &miroir::Engine) -> BTreeMap<String, (i64, i64)> {
    let rows = engine
        .scan("users_per_department", "", 10_000)
        .unwrap_or_default();
    rows.iter()
        .map(|row| {
            let name = row["department"].as_str().unwrap_or_default().to_string();
            let users = row["users"].as_i64().unwrap_or_default();
            let active = row["active_users"].as_i64().unwrap_or_default();
            (name, (users, active))
        })
        .collect()
}

/// Whether `engine` has applied and committed every event of `topic` (`events` of them).
fn committed_all(engine: &miroir::Engine, topic: &str, events: i64) -> bool {
    let status = engine.status();
    let applied: i64 = status
        .committed
        .iter()
        .filter(|((t, _), _)| t == topic)
        .map(|(_, o)| o + 1)
        .sum();
    applied >= events && status.lag == Some(0)
}

/// One turn of miroir: warms up on the warm-up topics, then runs over the measured ones until
/// it holds the expected tables, and prints what that cost.
fn miroir_phase() {
    let run = std::env::var("MIROIR_BENCH_RUN").unwrap();
    let events = env_or("MIROIR_BENCH_EVENTS", 0) as i64;
    let warm = std::env::var("MIROIR_BENCH_WARM").unwrap();
    let state = PathBuf::from(std::env::var("MIROIR_BENCH_STATE").unwrap());
    let warm_topic = format!("user-{warm}");
    run_until(
        topology(&warm, &format!("bench-{run}-warm")),
        &state.join("warm"),
        |e| committed_all(e, &warm_topic, WARM_EVENTS as i64),
    )
    .shutdown();
    let users = seen_keys(events as u64, env_or("MIROIR_BENCH_KEYS", 0));
    let expected = expected(&users);
    // The updates the bench sends after the load, known before any clock runs.
    let sent = updates(&users, env_or("MIROIR_BENCH_UPDATES", 0) as usize);
    let topic = format!("user-{run}");
    let (cpu, started) = (cpu_seconds("self"), Instant::now());
    // Timed until every event is committed with nothing left to read, and the department
    // counts (after both repartition hops, 20 rows) are right; the whole tables are checked
    // once the clock stopped, since reading a million rows costs more than an epoch.
    let engine = run_until(
        topology(&run, &format!("bench-{run}-miroir")),
        &state.join("run"),
        |e| committed_all(e, &topic, events) && department_counts(e) == expected.counts,
    );
    let seconds = started.elapsed().as_secs_f64();
    let (cpu, rss) = (cpu_seconds("self") - cpu, peak_rss_mib());
    let deadline = Instant::now() + Duration::from_secs(60);
    while tables_of(&engine) != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("RESULT {seconds} {cpu} 0 0 {rss}");
    tables_of(&engine).print();
    if !sent.is_empty() {
        measure_updates(&engine, &topic, events, &sent);
    }
    engine.shutdown();
}

/// Says `LOADED`, waits for the go (the updates `sent` are published), and prints `UPDATED
/// seconds cpu` once they, which follow the `events`, are committed and the last of them
/// readable in `user_directory`, after its repartition hops.
fn measure_updates(engine: &miroir::Engine, topic: &str, events: i64, sent: &[(String, String)]) {
    use std::io::BufRead;
    let count = sent.len();
    let last: Vec<(String, String)> = (count.saturating_sub(64)..count)
        .map(|i| (sent[i].0.clone(), format!("update{i}@example.org")))
        .collect();
    println!("LOADED");
    let mut go = String::new();
    std::io::stdin().lock().read_line(&mut go).unwrap();
    let (cpu, started) = (cpu_seconds("self"), Instant::now());
    let visible = |e: &miroir::Engine| {
        last.iter().all(|(key, email)| {
            e.get("user_directory", key)
                .ok()
                .flatten()
                .is_some_and(|r| r.row["email"] == email.as_str())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(1800);
    while !(committed_all(engine, topic, events + count as i64) && visible(engine)) {
        assert!(Instant::now() < deadline, "updates stalled");
        std::thread::sleep(Duration::from_millis(100));
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("UPDATED {seconds} {}", cpu_seconds("self") - cpu);
}
