//! Several `miroir run` processes of one test: start them, ask them, wait until their group
//! settled and every instance answers every key as the reference evaluator says.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{free_port, generate, publish, spawn_with, spawn_with_env, Event, TestTopology};

/// One running instance: its process and its HTTP port.
pub struct Instance {
    pub child: std::process::Child,
    pub port: u16,
    /// Where the process logs.
    pub log: std::path::PathBuf,
}

impl Instance {
    /// The last lines of the instance's log, for a failure message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn get(client: &reqwest::blocking::Client, port: u16, path: &str) -> (u16, serde_json::Value) {
    match client.get(format!("http://127.0.0.1:{port}{path}")).send() {
        Ok(r) => (r.status().as_u16(), r.json().unwrap_or_default()),
        Err(_) => (0, serde_json::Value::Null),
    }
}

/// The metrics of the instance on `port`, as exposed.
pub fn metrics(client: &reqwest::blocking::Client, port: u16) -> String {
    client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap()
}

/// The keys of `expected` whose row an instance does not answer as expected (wrong row, or
/// absent), and the instances that served the others.
fn mismatches(
    client: &reqwest::blocking::Client,
    port: u16,
    (table, expected): (&str, &BTreeMap<String, serde_json::Value>),
    keys: &BTreeSet<String>,
) -> (Vec<String>, BTreeSet<String>) {
    let mut wrong = Vec::new();
    let mut served_by = BTreeSet::new();
    for key in keys {
        let (status, answer) = get(client, port, &row_path(table, key));
        match (expected.get(key), status) {
            (Some(row), 200) if &answer["row"] == row => {
                served_by.insert(answer["served_by"].as_str().unwrap_or_default().to_string());
            }
            (None, 404) => {}
            (row, _) => wrong.push(format!("{key}: {status} {answer}, expected {row:?}")),
        }
    }
    (wrong, served_by)
}

/// The path of `table`'s row of `key` (its URL form, with `%` and `\` escaped: a URL takes a
/// bare `\` for a `/`).
pub fn row_path(table: &str, key: &str) -> String {
    let key = key.replace('%', "%25").replace('\\', "%5C");
    format!("/v1/tables/{table}/rows/{key}")
}

/// Whether every view in `views` (each instance's `/v1/cluster`) lists the same instances, one
/// per view, each owning at least one partition of `topic`, all four partitions owned once,
/// and none restoring.
pub fn settled(views: &[serde_json::Value], topic: &str) -> bool {
    let owned = |view: &serde_json::Value| -> Option<Vec<Vec<u64>>> {
        let live = view["instances"].as_array()?;
        live.iter()
            .map(|m| {
                let ps = m["partitions"][topic].as_array()?;
                Some(ps.iter().filter_map(|p| p.as_u64()).collect())
            })
            .collect()
    };
    let Some(first) = views.first().and_then(owned) else {
        return false;
    };
    let mut all: Vec<u64> = first.iter().flatten().copied().collect();
    all.sort_unstable();
    !views.is_empty()
        && first.len() == views.len()
        && first.iter().all(|ps| !ps.is_empty())
        && all == [0, 1, 2, 3]
        && views.iter().all(|v| owned(v).as_ref() == Some(&first))
        && views.iter().all(|v| {
            v["instances"].as_array().is_some_and(|live| {
                live.iter()
                    .all(|m| m["restoring"] == serde_json::json!({}) && m["lag"].is_i64())
            })
        })
}

/// Waits until the instances' group settled (see [`settled`]) and each instance answers every
/// key in `keys` of `user_contacts` as `expected` says; returns the instances that served the
/// rows.
pub fn wait_for_every_key(
    client: &reqwest::blocking::Client,
    instances: &[&Instance],
    topic: &str,
    expected: &BTreeMap<String, serde_json::Value>,
    keys: &BTreeSet<String>,
) -> BTreeSet<String> {
    wait_for_every_row(client, instances, topic, ("user_contacts", expected), keys)
}

/// Waits until the instances' group settled (see [`settled`]) and each instance answers every
/// key in `keys` of `table` as `expected` says; returns the instances that served the rows.
pub fn wait_for_every_row(
    client: &reqwest::blocking::Client,
    instances: &[&Instance],
    topic: &str,
    (table, expected): (&str, &BTreeMap<String, serde_json::Value>),
    keys: &BTreeSet<String>,
) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut views = Vec::new();
    while !settled(&views, topic) {
        if Instant::now() >= deadline {
            let logs: Vec<String> = instances.iter().map(|i| i.log_tail()).collect();
            panic!("never settled: {views:?}\nlogs:\n{}", logs.join("\n---\n"));
        }
        std::thread::sleep(Duration::from_millis(500));
        views = instances
            .iter()
            .map(|i| get(client, i.port, "/v1/cluster").1)
            .collect();
    }
    let mut served_by = BTreeSet::new();
    for instance in instances {
        loop {
            let (wrong, served) = mismatches(client, instance.port, (table, expected), keys);
            if wrong.is_empty() {
                served_by.extend(served);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "instance on port {}: {} keys of {table} answered wrong, first: {:?}",
                instance.port,
                wrong.len(),
                &wrong[..wrong.len().min(3)]
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    served_by
}

/// A directory for instances' topology, state and logs, removed after the test; with
/// `MIROIR_TEST_KEEP` set it is kept, and its path printed, to read the logs of a failure.
pub fn instances_dir() -> tempfile::TempDir {
    let keep = std::env::var_os("MIROIR_TEST_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix("miroir-instances-")
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    if keep {
        eprintln!("instances' directory kept: {}", dir.path().display());
    }
    dir
}

/// Starts `miroir run` on `file` with state directory `state-<name>` (under `dir`).
pub fn start(dir: &std::path::Path, file: &std::path::Path, name: &str) -> Instance {
    start_on(dir, file, name, free_port(), &[])
}

/// [`start`] on `port`, with more arguments.
pub fn start_on(
    dir: &std::path::Path,
    file: &std::path::Path,
    name: &str,
    port: u16,
    more: &[&str],
) -> Instance {
    let state = dir.join(format!("state-{name}"));
    let log = dir.join(format!("instance-{name}.log"));
    Instance {
        child: spawn_with(file, &state, port, &log, more),
        port,
        log,
    }
}

/// [`start`] of an instance verifying bearer tokens signed with [`super::TEST_SECRET`].
pub fn start_verifying(dir: &std::path::Path, file: &std::path::Path, name: &str) -> Instance {
    let (state, log) = (
        dir.join(format!("state-{name}")),
        dir.join(format!("instance-{name}.log")),
    );
    let port = free_port();
    let secret = [("MIROIR_AUTH_HS256_SECRET", super::TEST_SECRET)];
    Instance {
        child: spawn_with_env(file, &state, port, &log, (&[], &secret)),
        port,
        log,
    }
}

/// `kill -9` of `instances[1]` while more events (generated from `seed`) come; returns every
/// event.
pub fn kill_one_mid_stream(
    t: &TestTopology,
    instances: &mut Vec<Instance>,
    mut events: Vec<Event>,
    seed: u64,
) -> Vec<Event> {
    let more = std::thread::spawn({
        let t = t.clone();
        move || {
            let (more, _) = generate(seed, 260, 2000);
            for chunk in more.chunks(200) {
                publish(&t, chunk);
                std::thread::sleep(Duration::from_millis(100));
            }
            more
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut killed = instances.remove(1);
    killed.child.kill().unwrap(); // SIGKILL
    killed.child.wait().unwrap();
    events.extend(more.join().unwrap());
    events
}
