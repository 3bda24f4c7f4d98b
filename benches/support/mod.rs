//! Helpers shared by the benchmark harnesses.
#![allow(dead_code)] // each harness uses a different part

/// The local broker's address, as `scripts/services up` exports it.
pub fn brokers() -> String {
    std::env::var("MIROIR_BROKERS")
        .expect("MIROIR_BROKERS: run `eval \"$(scripts/services up)\"` first")
}

/// The Kafka Streams peer's jar (`benches/peers/kafka-streams`), built with Maven when
/// missing.
pub fn peer_jar() -> std::path::PathBuf {
    let project =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/kafka-streams");
    let jar = project.join("target/peer.jar");
    if !jar.exists() {
        eprintln!("bench: building the Kafka Streams peer with Maven");
        let status = std::process::Command::new("mvn")
            .args(["-q", "-B", "package", "-DskipTests", "-f"])
            .arg(project.join("pom.xml"))
            .status()
            .expect("mvn: install Maven and a JDK 17 to run the peer");
        assert!(status.success(), "building the peer failed");
    }
    jar
}

/// This process's peak resident memory (`VmHWM`), in MiB.
pub fn peak_rss_mib() -> f64 {
    status_mib("self", "VmHWM:")
}

/// Process `pid`'s resident memory now (`VmRSS`), in MiB; 0 once it is gone.
pub fn rss_mib(pid: &str) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A memory figure (`field`, in kB) of process `pid`'s status, in MiB.
fn status_mib(pid: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// User + system CPU seconds of process `pid` (`self` for this one).
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0 // utime, stime (fields 14, 15 of stat), in USER_HZ (100 on Linux)
}

/// Deletes the broker's topics whose names contain `run`: a run leaves hundreds of MB
/// otherwise.
pub fn delete_run_topics(run: &str) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let listed = miroir_connectors::kafka::admin::topics(consumer.client()).unwrap_or_default();
    let mine: Vec<&str> = listed
        .iter()
        .map(|(t, _)| t.as_str())
        .filter(|t| t.contains(run))
        .collect();
    let config = miroir_connectors::kafka::KafkaConfig::new(brokers());
    if let Err(e) = miroir_connectors::kafka::admin::delete_topics(&config, &mine) {
        eprintln!("bench: could not delete the run's topics: {e}");
    }
}

/// The environment variable `name` as a number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A name for this run (seconds since the Unix epoch), to keep its topics and tables apart.
pub fn run_id() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string()
}

/// `topologies/user-directory.toml`'s text up to its external tables (which follow the internal
/// one in the file): the app with its internal table alone.
pub fn internal_tables_only(text: &str) -> &str {
    let end = text
        .find("\n# Left join with the departments")
        .expect("the external tables' comment in user-directory.toml");
    &text[..end]
}

/// `topologies/user-directory.toml` without its history (the stream source and its tables):
/// the figures measured before it stay comparable.
pub fn without_history(text: &str) -> &str {
    let end = text
        .find("\n# Every User event again")
        .expect("the history's comment in user-directory.toml");
    &text[..end]
}

/// `text` with its `<!-- name:begin -->` ... `<!-- name:end -->` section replaced by
/// `section` (appended when missing), stamped with what produced it (see [`setup`]).
pub fn replace_section(text: &str, name: &str, section: &str) -> String {
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->\n"),
    );
    let section = match section.find(&end) {
        Some(e) => format!("{}\nSetup: {}.\n{}", &section[..e], setup(), &section[e..]),
        None => section.to_string(),
    };
    match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) => format!("{}{}{}", &text[..b], section, &text[e + end.len()..]),
        _ => format!("{text}\n{section}"),
    }
}

/// What a figure was measured with: miroir's commit, the compiler, the broker, PostgreSQL,
/// the JVM, and the machine's cores and memory (found once per process).
pub fn setup() -> &'static str {
    static SETUP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SETUP.get_or_init(find_setup)
}

fn find_setup() -> String {
    let first_line = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .and_then(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| format!("{program}: unknown"))
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let commit = first_line("git", &["-C", root, "rev-parse", "--short", "HEAD"]);
    let changed = std::process::Command::new("git")
        .args(["-C", root, "diff", "--quiet", "HEAD", "--", ".", ":!docs"])
        .status()
        .is_ok_and(|s| !s.success());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = memory_mib() / 1024.0;
    format!(
        "miroir {commit}{}, {}; Kafka {} (one local broker); {}; {}; {cores} cores, {memory:.0} GiB",
        if changed { " with local changes" } else { "" },
        first_line("rustc", &["--version"]),
        kafka_version(),
        first_line("psql", &["--version"]),
        first_line("java", &["-version"]),
    )
}

/// The rest of the line of a child process's output that starts with `prefix`; panics with
/// its standard error, naming it `what`, when it printed none.
pub fn reported(out: &std::process::Output, prefix: &str, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().find_map(|l| l.strip_prefix(prefix)) {
        Some(rest) => rest.to_string(),
        None => panic!("{what} failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// The machine's memory (`MemTotal`), in MiB.
pub fn memory_mib() -> f64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(16_384.0, |kb| kb / 1024.0)
}

/// The version of the broker `scripts/services` runs, from its jar's name.
fn kafka_version() -> String {
    let home = std::env::var("MIROIR_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.cache/miroir",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    std::fs::read_dir(format!("{home}/kafka/libs"))
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let version = name.strip_prefix("kafka_2.13-")?.strip_suffix(".jar")?;
            Some(version.to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The benchmark's events, the same in every phase: (key number, version, late, payload).
/// One event in a hundred is late (an older version).
pub fn generate(events: u64, keys: u64) -> impl Iterator<Item = (usize, i64, bool, String)> {
    let mut version = vec![0i64; keys as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    (0..events).map(move |i| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let k = (rng % keys) as usize;
        let late = i % 100 == 50 && version[k] > 1;
        if !late {
            version[k] += 1;
        }
        let v = if late { version[k] - 1 } else { version[k] };
        let op = ["created", "email-changed", "renamed"][(rng >> 40) as usize % 3];
        let payload = format!(
            "{{\"id\":\"u-{k}\",\"email\":\"User{k}.V{v}@Example.com\",\"name\":\"User {k}\",\"department_id\":\"d-{}\",\"active\":{},\"version\":{v},\"event_type\":\"{op}\",\"updated_at\":\"2026-11-25T10:00:00Z\"}}",
            k % 20,
            !k.is_multiple_of(10)
        );
        (k, v, late, payload)
    })
}
