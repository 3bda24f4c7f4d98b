//! Shared helpers of the integration tests: a generator of entity events with the unhappy
//! paths (late, duplicated, deleted, malformed), an independent simulation of the upsert and
//! late-event semantics, and the comparison of the engine's tables with the reference
//! evaluator over the simulated source contents.
#![allow(dead_code)] // each test file uses a different part

pub mod cluster;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use miroir::miroir_engine::ingest::decode::decode;
use miroir::miroir_engine::reference::evaluate_table;
use miroir::miroir_engine::topology::late::Ownership;
use miroir::miroir_engine::topology::{Source, Topology};
use miroir::miroir_engine::value::{key_text, row_to_json, Value};
use miroir_connectors::kafka::admin::{create_topic, delete_topics, topics};
use miroir_connectors::kafka::output::Publisher;
use miroir_connectors::kafka::KafkaConfig;

/// The broker started by `scripts/services up`.
pub fn brokers() -> String {
    std::env::var("MIROIR_BROKERS").expect(
        "MIROIR_BROKERS is not set: run the tests with scripts/test, which starts Kafka, \
         or `eval \"$(scripts/services up)\"` first",
    )
}

/// A test's name for its topics (which all contain it) and consumer groups, unique to the
/// run. Dropping it, whether the test passed or panicked, deletes the topics whose names
/// contain it: the dev broker otherwise keeps hundreds of partitions after each run of the
/// suite, which slows what runs next on it (docs/benchmarks.md).
pub struct Run(String);

impl Run {
    /// A run name starting with `prefix`.
    pub fn new(prefix: &str) -> Run {
        Run(unique(prefix))
    }
}

impl std::ops::Deref for Run {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let config = KafkaConfig::new(brokers());
        let listed = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create::<rdkafka::consumer::BaseConsumer>()
            .map_err(|e| e.to_string())
            .and_then(|c| {
                topics(rdkafka::consumer::Consumer::client(&c)).map_err(|e| e.to_string())
            });
        let deleted = listed.and_then(|all| {
            let mine: Vec<&str> = all
                .iter()
                .map(|(t, _)| t.as_str())
                .filter(|t| t.contains(self.0.as_str()))
                .collect();
            delete_topics(&config, &mine).map_err(|e| e.to_string())
        });
        if let Err(e) = deleted {
            eprintln!("could not delete the topics of {}: {e}", self.0);
        }
    }
}

/// A name unique to this test run, for topics and consumer groups.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// An engine running topology `text` on the local broker, with 2 workers and 50 ms epochs.
pub fn start_engine(text: &str, state: &std::path::Path) -> miroir::Engine {
    miroir::Engine::builder()
        .topology_str(text)
        .brokers(brokers())
        .state_dir(state)
        .workers(2)
        .epoch_interval(Duration::from_millis(50))
        .start()
        .unwrap()
}

/// The database started by `scripts/services up`.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run the tests with scripts/test, which starts PostgreSQL, \
         or `eval \"$(scripts/services up)\"` first",
    )
}

/// A connection to the test database.
pub fn pg() -> postgres::Client {
    postgres::Client::connect(&database_url(), postgres::NoTls).expect("connect to PostgreSQL")
}

/// The rows of an external table, as key -> JSON row, in the JSON the engine serves (each
/// value of a column of `table` read back through its type: timestamps in UTC).
pub fn pg_table(
    client: &mut postgres::Client,
    t: &Topology,
    table: &str,
) -> Result<BTreeMap<String, serde_json::Value>, postgres::Error> {
    let plan = t.table(table).expect("table of the topology");
    let pg = plan.postgres().expect("an external table");
    let sql = format!(
        "SELECT row_to_json(t)::text FROM \"{}\".\"{}\" t",
        pg.schema, pg.table
    );
    let mut out = BTreeMap::new();
    for row in client.query(&sql, &[])? {
        let mut json: serde_json::Value = serde_json::from_str(row.get::<_, &str>(0)).unwrap();
        for c in &plan.columns {
            if let Some(v) = json.get_mut(&c.name) {
                *v = Value::from_json(v, c.ty)
                    .expect("a value of the column's type")
                    .to_json();
            }
        }
        out.insert(json_key(&json, plan), json);
    }
    Ok(out)
}

/// Reads external table `name` of `t` (empty while it cannot be read).
pub fn external_tables<'a>(
    db: &'a mut postgres::Client,
    t: &miroir::miroir_engine::topology::Topology,
) -> impl FnMut(&str) -> BTreeMap<String, serde_json::Value> + 'a {
    let t = t.clone();
    move |name| pg_table(db, &t, name).unwrap_or_default()
}

/// The tables of `expected` that are external tables of `t`.
pub fn only_external(
    expected: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    t: &miroir::miroir_engine::topology::Topology,
) -> BTreeMap<String, BTreeMap<String, serde_json::Value>> {
    expected
        .into_iter()
        .filter(|(name, _)| t.table(name).unwrap().postgres().is_some())
        .collect()
}

/// The key of a JSON row in its URL form, as the reference evaluator names rows.
pub fn json_key(row: &serde_json::Value, plan: &miroir::miroir_engine::plan::TablePlan) -> String {
    let values: Vec<Value> = plan
        .columns
        .iter()
        .map(|c| Value::from_json(&row[&c.name], c.ty).expect("a value of the column's type"))
        .collect();
    key_text(&values, &plan.key)
}

/// The user-directory topology with its topics and group renamed for this run, and its
/// external tables in a schema of their own.
#[derive(Clone)]
pub struct TestTopology {
    pub text: String,
    pub topology: Topology,
    pub user_topic: String,
    pub department_topic: String,
    pub schema: String,
}

pub fn user_directory(run: &str) -> TestTopology {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/topologies/user-directory.toml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let user_topic = format!("user-{run}");
    let department_topic = format!("department-{run}");
    let schema = format!("it_{}", run.replace('-', "_"));
    let text = text
        .replace("name = \"user-directory\"", &format!("name = \"it-{run}\""))
        .replace("table = \"app.", &format!("table = \"{schema}."))
        .replace("topic = \"user\"", &format!("topic = \"{user_topic}\""))
        .replace(
            "topic = \"department\"",
            &format!("topic = \"{department_topic}\""),
        );
    let topology = Topology::parse("user-directory.toml", &text).unwrap();
    TestTopology {
        text,
        topology,
        user_topic,
        department_topic,
        schema,
    }
}

/// `t` with its internal table alone (`user_contacts`): no PostgreSQL.
pub fn with_internal_table_only(mut t: TestTopology) -> TestTopology {
    let end = t
        .text
        .find("\n# Left join with the departments")
        .expect("the external tables' comment in user-directory.toml");
    t.text.truncate(end);
    t.topology = Topology::parse("user-directory.toml", &t.text).unwrap();
    t
}

/// `t` with the users' `late.max_operations` set to `n`.
pub fn with_max_operations(mut t: TestTopology, n: usize) -> TestTopology {
    let per = r#"per = "event_type", action = "drop""#;
    assert!(t.text.contains(per), "the users' late policy moved");
    t.text = t.text.replace(per, &format!("{per}, max_operations = {n}"));
    t.topology = Topology::parse("user-directory.toml", &t.text).unwrap();
    t
}

/// One message to publish: topic index (0 users, 1 departments), key, payload (None: tombstone).
#[derive(Clone, Debug)]
pub struct Event {
    pub source: usize,
    pub key: String,
    pub payload: Option<String>,
}

/// What the generator produced, by kind.
#[derive(Default, Debug)]
pub struct Counts {
    pub late: usize,
    pub duplicates: usize,
    pub tombstones: usize,
    pub malformed: usize,
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const OPS: [&str; 3] = ["created", "email-changed", "renamed"];

/// Generates `n` user events over `users` keys and some department events, with late,
/// duplicated, deleted and malformed ones mixed in.
pub fn generate(seed: u64, users: u64, n: usize) -> (Vec<Event>, Counts) {
    let mut rng = Rng::new(seed);
    let mut counts = Counts::default();
    let mut events = Vec::with_capacity(n + 64);
    let mut versions: HashMap<u64, i64> = HashMap::new();
    let mut sent: HashMap<u64, String> = HashMap::new();
    for d in 0..6 {
        events.push(department(d, 1, &format!("Department {d}")));
    }
    for i in 0..n {
        if i % 50 == 25 {
            // Departments change too: a rename, sometimes a late one.
            let d = rng.below(6);
            let v = if rng.chance(20) { 1 } else { 2 + i as i64 };
            events.push(department(d, v, &format!("Dept {d} v{v}")));
            continue;
        }
        let u = rng.below(users);
        let key = format!("u-{u}");
        let roll = rng.below(100);
        if roll < 6 && sent.contains_key(&u) {
            counts.duplicates += 1;
            events.push(Event {
                source: 0,
                key,
                payload: sent.get(&u).cloned(),
            });
            continue;
        }
        if roll < 10 {
            counts.tombstones += 1;
            events.push(Event {
                source: 0,
                key,
                payload: None,
            });
            continue;
        }
        if roll < 14 {
            counts.malformed += 1;
            let payload = match rng.below(4) {
                0 => format!("{{\"id\": \"{key}\", \"email\": "),
                1 => format!(
                    "{{\"id\": \"{key}\", \"version\": \"seven\", \"event_type\": \"created\"}}"
                ),
                2 => "{\"email\": \"nobody@example.com\", \"version\": 3}".to_string(),
                _ => format!(
                    "{{\"id\": \"u-{}\", \"version\": 3, \"event_type\": \"created\"}}",
                    users + 7
                ),
            };
            events.push(Event {
                source: 0,
                key,
                payload: Some(payload),
            });
            continue;
        }
        let current = versions.entry(u).or_insert(0);
        let version = if roll < 24 && *current > 2 {
            counts.late += 1;
            *current - 1 - rng.below(2) as i64
        } else {
            *current += 1;
            *current
        };
        let op = OPS[rng.below(3) as usize];
        let email = match rng.below(10) {
            0 => "null".to_string(),
            1 => format!("\"  User{u}.V{version}@Example.COM \""),
            _ => format!("\"user{u}.v{version}@example.com\""),
        };
        let dept = match rng.below(10) {
            0 => "null".to_string(),
            1 => "\"d-99\"".to_string(),
            d => format!("\"d-{}\"", d % 6),
        };
        let payload = format!(
            "{{\"id\":\"{key}\",\"email\":{email},\"name\":\"User {u} v{version}\",\"department_id\":{dept},\"active\":{},\"version\":{version},\"event_type\":\"{op}\",\"updated_at\":\"2026-01-01T00:00:{:02}Z\"}}",
            rng.chance(80),
            version % 60
        );
        sent.insert(u, payload.clone());
        events.push(Event {
            source: 0,
            key,
            payload: Some(payload),
        });
    }
    (events, counts)
}

/// `events` with the version of each event raised by `by`: a later stream of the same keys,
/// none of it late against the events before.
pub fn later(mut events: Vec<Event>, by: i64) -> Vec<Event> {
    const FIELD: &str = "\"version\":";
    for e in &mut events {
        let Some(payload) = e.payload.as_mut() else {
            continue;
        };
        let Some(at) = payload.find(FIELD).map(|i| i + FIELD.len()) else {
            continue;
        };
        let digits = payload[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .count();
        if let Ok(version) = payload[at..at + digits].parse::<i64>() {
            payload.replace_range(at..at + digits, &(version + by).to_string());
        }
    }
    events
}

/// The event of department `d-{d}` named `name` at `version`.
pub fn department(d: u64, version: i64, name: &str) -> Event {
    Event {
        source: 1,
        key: format!("d-{d}"),
        payload: Some(format!(
            "{{\"id\":\"d-{d}\",\"name\":\"{name}\",\"version\":{version}}}"
        )),
    }
}

/// Creates the topics (4 partitions) and publishes `events` in order.
pub fn publish(t: &TestTopology, events: &[Event]) {
    let config = KafkaConfig::new(brokers());
    create_topic(&config, &t.user_topic, 4).unwrap();
    create_topic(&config, &t.department_topic, 4).unwrap();
    let publisher = Publisher::new(&config).unwrap();
    for e in events {
        let topic = if e.source == 0 {
            &t.user_topic
        } else {
            &t.department_topic
        };
        publisher
            .send(
                topic,
                e.key.as_bytes(),
                e.payload.as_deref().map(str::as_bytes),
            )
            .unwrap();
    }
    publisher.flush().unwrap();
}

/// Publishes `events` (whose topics exist) in order with one producer, 20 at a time with a
/// `pause` after each: a steady stream.
pub fn publish_paced(t: &TestTopology, events: &[Event], pause: std::time::Duration) {
    let publisher = Publisher::new(&KafkaConfig::new(brokers())).unwrap();
    for chunk in events.chunks(20) {
        for e in chunk {
            let topic = match e.source {
                0 => &t.user_topic,
                _ => &t.department_topic,
            };
            let payload = e.payload.as_deref().map(str::as_bytes);
            publisher.send(topic, e.key.as_bytes(), payload).unwrap();
        }
        publisher.flush().unwrap();
        std::thread::sleep(pause);
    }
}

/// Publishes `events` on `topic` (which exists), in order.
pub fn publish_to(topic: &str, events: &[Event]) {
    let publisher = Publisher::new(&KafkaConfig::new(brokers())).unwrap();
    for e in events {
        let payload = e.payload.as_deref().map(str::as_bytes);
        publisher.send(topic, e.key.as_bytes(), payload).unwrap();
    }
    publisher.flush().unwrap();
}

/// The rows of `engine`'s table `name` as key -> JSON row: read from PostgreSQL for an
/// external table (empty while it does not exist), from the engine for an internal one.
pub fn table_rows(
    engine: &miroir::Engine,
    db: &mut postgres::Client,
    name: &str,
) -> BTreeMap<String, serde_json::Value> {
    let t = engine.topology();
    let plan = t.table(name).expect("a table of the topology");
    if plan.postgres().is_some() {
        return pg_table(db, t, name).unwrap_or_default();
    }
    internal_rows(engine, name)
}

/// The rows of `engine`'s internal table `name` as key -> JSON row.
pub fn internal_rows(engine: &miroir::Engine, name: &str) -> BTreeMap<String, serde_json::Value> {
    let plan = engine
        .topology()
        .table(name)
        .expect("a table of the topology");
    let rows = engine.scan(name, "", 1_000_000).unwrap();
    rows.into_iter()
        .map(|row| (json_key(&row, plan), row))
        .collect()
}

/// The simulated state of one source key: its row, the events applied since the row was
/// created (order, operation, row), and per operation the last applied order and when (the
/// how-manieth event of the key) it was applied.
#[derive(Default)]
struct SimEntry {
    row: Option<Vec<Value>>,
    history: Vec<(Value, Value, Vec<Value>)>,
    versions: HashMap<Value, (Value, u64)>,
    applied: u64,
}

/// The row a key's applied `history` leaves: without `late.owns` its last event; with it,
/// each column from the newest event (the first of equals) that may write the column. The
/// event that created the row may write all; an operation listed in `owns` its own columns
/// and those nobody owns; any other operation all.
fn row_of(history: &[(Value, Value, Vec<Value>)], owns: Option<&Ownership>) -> Vec<Value> {
    let (_, _, last) = history.last().expect("an applied event");
    let Some(owns) = owns else {
        return last.clone();
    };
    let owner_of = |c: usize| owns.operations.iter().find(|(_, cols)| cols.contains(&c));
    let may_write = |i: usize, op: &Value, c: usize| {
        i == 0
            || owner_of(c).is_none()
            || owns
                .operations
                .iter()
                .find(|(o, _)| o == op)
                .is_none_or(|(_, cols)| cols.contains(&c))
    };
    (0..last.len())
        .map(|c| {
            let mut newest: Option<&(Value, Value, Vec<Value>)> = None;
            for (i, event) in history.iter().enumerate() {
                if may_write(i, &event.1, c) && newest.is_none_or(|n| event.0 > n.0) {
                    newest = Some(event);
                }
            }
            newest.expect("the first event writes all").2[c].clone()
        })
        .collect()
}

/// What [`replay`] found: each source's rows, and the late events it dropped.
pub struct Replayed {
    /// The rows of each source, in source order.
    pub rows: Vec<Vec<Vec<Value>>>,
    /// Late events dropped (older than the applied version of their operation, not equal to
    /// it: that is a duplicate), by source name and operation label (empty without
    /// `late.per`), as `miroir_late_events_total{action="dropped"}` counts them.
    pub late: BTreeMap<(String, String), u64>,
}

/// The sources' rows after `events` (see [`replay`]).
pub fn simulate(t: &Topology, events: &[Event]) -> Vec<Vec<Vec<Value>>> {
    replay(t, events).rows
}

/// Replays `events` with the documented semantics, written independently of the engine's
/// upsert code: per key in order, a malformed event is skipped, a tombstone deletes, an event
/// not newer than the last applied one of its operation is dropped; a key that reaches
/// `late.max_operations` forgets the operation applied longest ago; under `late.owns` the row
/// is recomputed from every event applied since its creation (see [`row_of`]).
///
/// An event of a topic goes to every source reading it. A stream source keeps each decoded
/// event as a row of its own, by its whole key (a copy replaces it with itself), ignores
/// tombstones, and keeps no row whose `retain_by` time is older than `retain`.
pub fn replay(t: &Topology, events: &[Event]) -> Replayed {
    let mut state: Vec<BTreeMap<String, SimEntry>> =
        t.sources.iter().map(|_| BTreeMap::new()).collect();
    let mut dropped = BTreeMap::new();
    for e in events {
        let topic = &t.sources[e.source].topic;
        for s in (0..t.sources.len()).filter(|s| t.sources[*s].topic == *topic) {
            let event = Event {
                source: s,
                ..e.clone()
            };
            match t.sources[s].stream {
                Some(_) => stream_event(&t.sources[s], &mut state[s], &event),
                None => upsert_event(&t.sources[s], &mut state[s], &event, &mut dropped),
            }
        }
    }
    let rows = state
        .into_iter()
        .zip(&t.sources)
        .map(|(s, source)| {
            let rows = s.into_values().filter_map(|e| e.row).collect();
            match source.stream.as_ref().and_then(|s| s.rows_per_entity) {
                Some(n) => newest_per_entity(rows, &source.identity, n),
                None => rows,
            }
        })
        .collect();
    Replayed {
        rows,
        late: dropped,
    }
}

/// The `n` rows of each entity (the first of `identity`'s columns) with the greatest key.
fn newest_per_entity(mut rows: Vec<Vec<Value>>, identity: &[usize], n: usize) -> Vec<Vec<Value>> {
    let key =
        |row: &Vec<Value>| -> Vec<Value> { identity.iter().map(|c| row[*c].clone()).collect() };
    rows.sort_by_key(|row| std::cmp::Reverse(key(row)));
    let mut kept: HashMap<Value, usize> = HashMap::new();
    rows.retain(|row| {
        let count = kept.entry(row[identity[0]].clone()).or_default();
        *count += 1;
        *count <= n
    });
    rows
}

/// Applies `e` to the state of stream source `source` (see [`replay`]).
fn stream_event(source: &Source, state: &mut BTreeMap<String, SimEntry>, e: &Event) {
    let Some(row) = e
        .payload
        .as_ref()
        .and_then(|p| decode(source, p.as_bytes()).ok())
    else {
        return;
    };
    if row[source.key].to_key_text() != e.key {
        return;
    }
    let retain = source.stream.as_ref().and_then(|s| s.retain);
    if let Some(retain) = retain {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_micros() as i64;
        let oldest_us = now_us - retain.age.as_micros() as i64;
        if matches!(row[retain.by], Value::Timestamp(at) if at < oldest_us) {
            return;
        }
    }
    let key = key_text(&row, &source.identity);
    state.entry(key).or_default().row = Some(row);
}

/// Applies `e` to the state of upsert source `source` (see [`replay`]); counts the late
/// events it drops in `dropped`.
fn upsert_event(
    source: &Source,
    state: &mut BTreeMap<String, SimEntry>,
    e: &Event,
    dropped: &mut BTreeMap<(String, String), u64>,
) {
    let entry = state.entry(e.key.clone()).or_default();
    let Some(payload) = &e.payload else {
        entry.row = None;
        entry.history.clear();
        return;
    };
    let Ok(row) = decode(source, payload.as_bytes()) else {
        return;
    };
    if row[source.key].to_key_text() != e.key {
        return; // message key and key column disagree: malformed
    }
    let late = source
        .late
        .as_ref()
        .expect("test sources declare a late policy");
    let op = late.per.map(|p| row[p].clone()).unwrap_or(Value::Null);
    let order = row[late.order_by].clone();
    if let Some((applied, _)) = entry.versions.get(&op) {
        if order < *applied {
            *dropped
                .entry((
                    source.name.clone(),
                    miroir::miroir_engine::metrics::operation_label(&op),
                ))
                .or_insert(0) += 1;
        }
        if order <= *applied {
            return;
        }
    }
    if !entry.versions.contains_key(&op) && entry.versions.len() >= late.max_operations {
        let oldest = entry
            .versions
            .iter()
            .min_by_key(|(_, (_, at))| *at)
            .map(|(op, _)| op.clone());
        entry
            .versions
            .remove(&oldest.expect("a key at its limit has operations"));
    }
    entry.applied += 1;
    entry
        .versions
        .insert(op.clone(), (order.clone(), entry.applied));
    entry.history.push((order, op, row));
    entry.row = Some(row_of(&entry.history, late.owns.as_ref()));
}

/// The expected contents of every table, as key -> JSON row.
pub fn expected_tables(
    t: &Topology,
    events: &[Event],
) -> BTreeMap<String, BTreeMap<String, serde_json::Value>> {
    let sources = simulate(t, events);
    t.tables
        .iter()
        .map(|table| {
            let rows = evaluate_table(table, &sources)
                .into_iter()
                .map(|(k, row)| (k, row_to_json(&table.columns, &row)))
                .collect();
            (table.name.clone(), rows)
        })
        .collect()
}

/// Describes the first differences between two tables.
pub fn diff(
    expected: &BTreeMap<String, serde_json::Value>,
    actual: &BTreeMap<String, serde_json::Value>,
) -> String {
    let mut out = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            None => out.push(format!("missing {k}: {v}")),
            Some(a) if a != v => out.push(format!("differs {k}: expected {v}, got {a}")),
            _ => {}
        }
    }
    for (k, v) in actual {
        if !expected.contains_key(k) {
            out.push(format!("unexpected {k}: {v}"));
        }
    }
    let total = out.len();
    out.truncate(8);
    format!("{total} differences, first: {out:#?}")
}

/// Polls `actual` until it equals `expected` for every table, or fails after `timeout`.
pub fn wait_for_tables(
    expected: &BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    timeout: Duration,
    actual: impl FnMut(&str) -> BTreeMap<String, serde_json::Value>,
) {
    if let Err(e) = try_wait_for_tables(expected, timeout, actual) {
        panic!("{e}");
    }
}

/// As [`wait_for_tables`], returning the differences instead of panicking.
pub fn try_wait_for_tables(
    expected: &BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    timeout: Duration,
    mut actual: impl FnMut(&str) -> BTreeMap<String, serde_json::Value>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mismatches: Vec<String> = expected
            .iter()
            .filter_map(|(name, rows)| {
                let got = actual(name);
                (got != *rows).then(|| format!("table {name}: {}", diff(rows, &got)))
            })
            .collect();
        if mismatches.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "tables differ from the reference evaluator after {timeout:?}:\n{}",
                mismatches.join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads one counter of Prometheus text (sum over label sets matching `labels`).
pub fn counter(metrics: &str, name: &str, labels: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Polls `done` until it holds, or fails with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} (after {timeout:?})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The user-referential (master) topology with its name and topics renamed for this run.
pub struct MasterTopology {
    pub text: String,
    pub topology: Topology,
    pub user_topic: String,
    pub command_topic: String,
}

pub fn user_referential(run: &str) -> MasterTopology {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/topologies/user-referential.toml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let user_topic = format!("user-{run}");
    let command_topic = format!("user-{run}.cmd.update-email");
    let text = text
        .replace(
            "name = \"user-referential\"",
            &format!("name = \"master-{run}\""),
        )
        .replace("topic = \"user\"", &format!("topic = \"{user_topic}\""))
        .replace(
            "topic = \"user.cmd.update-email\"",
            &format!("topic = \"{command_topic}\""),
        )
        .replace("topic = \"user.cmd.", &format!("topic = \"user-{run}.cmd."));
    let topology = Topology::parse("user-referential.toml", &text).unwrap();
    MasterTopology {
        text,
        topology,
        user_topic,
        command_topic,
    }
}

/// `m` with its command processed in `lanes` lanes (transactions side by side).
pub fn with_lanes(m: MasterTopology, lanes: usize) -> MasterTopology {
    let line = format!("topic = \"{}\"", m.command_topic);
    let text = m.text.replace(&line, &format!("{line}\nlanes = {lanes}"));
    let topology = Topology::parse("user-referential.toml", &text).unwrap();
    assert_eq!(topology.command("update_email").unwrap().lanes, lanes);
    MasterTopology {
        text,
        topology,
        ..m
    }
}

/// Publishes users `u-0 .. u-{n-1}` at version 1 (every third one inactive) on `topic`.
pub fn seed_users(topic: &str, n: usize) {
    let config = KafkaConfig::new(brokers());
    create_topic(&config, topic, 4).unwrap();
    let publisher = Publisher::new(&config).unwrap();
    for i in 0..n {
        let payload = serde_json::json!({
            "id": format!("u-{i}"), "email": format!("user{i}@example.org"), "name": format!("User {i}"),
            "department_id": "d-1", "active": i % 3 != 2, "version": 1, "event_type": "UserCreated",
        });
        publisher
            .send(
                topic,
                format!("u-{i}").as_bytes(),
                Some(payload.to_string().as_bytes()),
            )
            .unwrap();
    }
    publisher.flush().unwrap();
}

/// A port for an instance to listen on, free when asked. It is taken below Linux's ephemeral
/// range (32768 and up), so no outgoing connection (a Kafka client's, say) can take it before
/// the instance binds it; each call of one test process gets a different port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % COUNT;
    loop {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The HS256 secret the tests' instances verify bearer tokens with.
pub const TEST_SECRET: &str = "miroir integration tests: a development secret";

/// How the tests' engines verify bearer tokens: with [`TEST_SECRET`].
pub fn test_auth() -> miroir::AuthConfig {
    miroir::AuthConfig {
        keys: Some(miroir::miroir_engine::auth::KeySource::Secret(
            TEST_SECRET.into(),
        )),
        ..Default::default()
    }
}

/// A bearer token for `principal`, valid for an hour, signed with [`TEST_SECRET`].
pub fn token_for(principal: &miroir::commands::Principal) -> String {
    use miroir::miroir_engine::auth::{issue_now, SigningKey, TokenClaims};
    let claims = TokenClaims::of(principal, 3600);
    issue_now(&SigningKey::Secret(TEST_SECRET.into()), &claims).unwrap()
}

/// Starts `miroir run`; its log (level `MIROIR_TEST_LOG`, default `info`) goes to `log`
/// (after what earlier runs wrote there).
pub fn spawn(
    topology: &std::path::Path,
    state: &std::path::Path,
    port: u16,
    log: &std::path::Path,
) -> std::process::Child {
    spawn_with(topology, state, port, log, &[])
}

/// [`spawn`] with more arguments for `miroir run`.
pub fn spawn_with(
    topology: &std::path::Path,
    state: &std::path::Path,
    port: u16,
    log: &std::path::Path,
    more: &[&str],
) -> std::process::Child {
    spawn_with_env(topology, state, port, log, (more, &[]))
}

/// [`spawn`] of a master verifying bearer tokens signed with [`TEST_SECRET`].
pub fn spawn_master(
    topology: &std::path::Path,
    state: &std::path::Path,
    port: u16,
    log: &std::path::Path,
) -> std::process::Child {
    let secret = [("MIROIR_AUTH_HS256_SECRET", TEST_SECRET)];
    spawn_with_env(topology, state, port, log, (&[], &secret))
}

/// [`spawn`] with more arguments and environment variables for `miroir run`; `--brokers` in
/// `more` replaces the local broker's plain listener.
pub fn spawn_with_env(
    topology: &std::path::Path,
    state: &std::path::Path,
    port: u16,
    log: &std::path::Path,
    (more, env): (&[&str], &[(&str, &str)]),
) -> std::process::Child {
    let level = std::env::var("MIROIR_TEST_LOG").unwrap_or_else(|_| "info,librdkafka=warn".into());
    let brokers = match more.contains(&"--brokers") {
        true => vec![],
        false => vec!["--brokers".to_string(), brokers()],
    };
    std::process::Command::new(env!("CARGO_BIN_EXE_miroir"))
        .args(["run", topology.to_str().unwrap()])
        .args(brokers)
        .args(["--workers", "2", "--epoch-ms", "50"])
        .args([
            "--state-dir",
            state.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(more)
        .envs(env.iter().copied())
        .env("RUST_LOG", level)
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap()
}
