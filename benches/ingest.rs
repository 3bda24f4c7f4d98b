//! End-to-end ingest benchmark: miroir next to the raw rdkafka consumer, same topic, same run.
//!
//! ```sh
//! eval "$(scripts/services up)"                  # Kafka and PostgreSQL (DATABASE_URL)
//! cargo bench --bench ingest                     # 1,000,000 events over 100,000 keys
//! MIROIR_BENCH_EVENTS=200000 cargo bench --bench ingest
//! MIROIR_BENCH_RUNS=5 cargo bench --bench ingest   # turns of the raw and engine phases (3)
//! ```
//!
//! 1. publishes N `User` entity events (1% late, 1% duplicates) over K keys to a fresh topic
//!    with 4 partitions;
//! 2. in a child process, reads the whole topic with a plain rdkafka `BaseConsumer` (the
//!    baseline: the rate no consumer-based engine can beat on this machine), once per turn
//!    next to the engine's runs below, and its fastest turn is the baseline (each engine
//!    figure is its median turn, with the fastest and slowest shown);
//! 3. in another child process, runs `topologies/user-directory.toml` with an embedded engine
//!    (2 workers) for its internal table alone, until every offset is committed (the measure
//!    the foundation's target is set on); then, in a fresh process and state directory, for
//!    all its tables (the two external ones in PostgreSQL, schema `bench_<run>`) until every
//!    offset is committed and every batch applied in PostgreSQL;
//! 4. in two more child processes, miroir's PostgreSQL sink alone on the same events'
//!    `user_directory` changes: in incremental batches of 25,000 events, and in one batch of
//!    every final row into an empty table (the catch-up path);
//! 5. in a last child process, the PostgreSQL baseline: a plain binary `COPY` of the final rows
//!    of `user_directory` into an equivalent table (same columns, primary key and index);
//! 6. prints both comparisons and rewrites the `ingest` and `postgres` sections of
//!    `docs/benchmarks.md`.
//!
//! Children keep the peak RSS (`VmHWM`) of each phase separate.

use std::process::Command;
use std::time::{Duration, Instant};

use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::output::Publisher;
use miroir_connectors::kafka::{KafkaConfig, FETCH_QUEUE_BACKOFF_MS};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

mod support;

use support::{
    brokers, delete_run_topics, env_or, generate, internal_tables_only, peak_rss_mib,
    replace_section, reported, run_id, without_history,
};

const PARTITIONS: i32 = 4;

/// Events per batch of the sink-alone phase.
const ALONE_BATCH_EVENTS: u64 = 25_000;

/// As in the `miroir` binary (src/main.rs): an embedding application should do the same.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    match std::env::var("MIROIR_BENCH_PHASE").as_deref() {
        Ok("consume") => consume_phase(),
        Ok("engine") => engine_phase(Tables::All),
        Ok("engine-internal") => engine_phase(Tables::Internal),
        Ok("engine-unlogged") => engine_phase(Tables::Unlogged),
        Ok("engine-rows") => engine_phase(Tables::Rows),
        Ok("copy") => copy_phase(),
        Ok("sink") => sink_phase(false),
        Ok("sink-load") => sink_phase(true),
        Ok("restore") => restore_phase(),
        Ok("changelog-consume") => changelog_consume_phase(),
        _ => orchestrate(),
    }
}

/// Which of the topology's tables an engine phase maintains.
#[derive(Clone, Copy)]
enum Tables {
    /// The internal table alone (`user_contacts`): the foundation's measure.
    Internal,
    /// Every table, the two external ones in PostgreSQL included.
    All,
    /// The internal table alone, without changelogs: what they cost.
    Unlogged,
    /// The internal table alone, its rows logged too (`--standby-replicas 1`): what standbys
    /// that answer queries cost their owner.
    Rows,
}

fn topology_text(run: &str, tables: Tables) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/topologies/user-directory.toml"
    ))
    .unwrap();
    let t = turn_suffix();
    let (text, name) = match tables {
        Tables::All => (without_history(&text), format!("bench-{run}-all{t}")),
        Tables::Internal => (
            internal_tables_only(&text),
            format!("bench-{run}-internal{t}"),
        ),
        Tables::Unlogged => (
            internal_tables_only(&text),
            format!("bench-{run}-unlogged{t}"),
        ),
        Tables::Rows => (internal_tables_only(&text), format!("bench-{run}-rows{t}")),
    };
    // One topology name per run: each starts from nothing (its own consumer group and
    // changelogs, which the other run would otherwise restore its state from).
    text.replace("name = \"user-directory\"", &format!("name = \"{name}\""))
        .replace("topic = \"user\"", &format!("topic = \"user-{run}\""))
        .replace("table = \"app.", &format!("table = \"{}.", schema(run)))
        .replace(
            "topic = \"department\"",
            &format!("topic = \"department-{run}\""),
        )
}

/// The suffix of a turn's names (topology, consumer group, PostgreSQL schema): none for the
/// first turn (`MIROIR_BENCH_TURN`, 0 by default), so that phases that read what the first
/// turn left (the restore, the sink alone) find it.
fn turn_suffix() -> String {
    match env_or("MIROIR_BENCH_TURN", 0) {
        0 => String::new(),
        t => format!("-t{t}"),
    }
}

/// The PostgreSQL schema of a turn's external tables.
fn schema(run: &str) -> String {
    format!("bench_{run}{}", turn_suffix().replace('-', "_"))
}

fn orchestrate() {
    let events = env_or("MIROIR_BENCH_EVENTS", 1_000_000);
    let keys = env_or("MIROIR_BENCH_KEYS", 100_000);
    let run = run_id();
    let config = KafkaConfig::new(brokers());
    let topic = format!("user-{run}");
    create_topic(&config, &topic, PARTITIONS).unwrap();
    create_topic(&config, &format!("department-{run}"), PARTITIONS).unwrap();

    eprintln!("bench: publishing {events} events over {keys} keys to {topic}");
    let publisher = Publisher::new(&config).unwrap();
    let started = Instant::now();
    let mut bytes = 0usize;
    for (k, _, _, payload) in generate(events, keys) {
        bytes += payload.len();
        publisher
            .send(
                &topic,
                format!("u-{k}").as_bytes(),
                Some(payload.as_bytes()),
            )
            .unwrap();
    }
    publisher.flush().unwrap();
    let publish_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "bench: published in {publish_secs:.1} s ({:.0} events/s)",
        events as f64 / publish_secs
    );

    let turns = env_or("MIROIR_BENCH_RUNS", 3).max(1);
    let child = |phase: &str, turn: u64| -> Vec<f64> {
        let out = Command::new(std::env::current_exe().unwrap())
            .env("MIROIR_BENCH_PHASE", phase)
            .env("MIROIR_BENCH_TURN", turn.to_string())
            .env("MIROIR_BENCH_RUN", &run)
            .env("MIROIR_BENCH_EVENTS", events.to_string())
            .env("MIROIR_BENCH_KEYS", keys.to_string())
            .output()
            .unwrap();
        reported(&out, "RESULT", &format!("phase {phase}"))
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect()
    };
    // Turns interleave the phases, so a slower stretch of the machine's time falls on all of
    // them alike.
    let phases = [
        "consume",
        "engine-internal",
        "engine-unlogged",
        "engine-rows",
        "engine",
    ];
    let mut results: Vec<Vec<Vec<f64>>> = vec![Vec::new(); phases.len()];
    for turn in 0..turns {
        for (phase, runs) in phases.iter().zip(&mut results) {
            runs.push(child(phase, turn));
        }
    }
    // The raw consumer's fastest turn is the baseline: the machine's noise cannot flatter
    // miroir's share. Each of miroir's runs is its median turn by time.
    let [raw_runs, internal_runs, unlogged_runs, rows_runs, engine_runs] =
        <[Vec<Vec<f64>>; 5]>::try_from(results).unwrap();
    let raw = raw_runs
        .iter()
        .min_by(|a, b| a[0].total_cmp(&b[0]))
        .unwrap()
        .clone();
    let (internal, unlogged, rows, engine) = (
        median_turn(&internal_runs),
        median_turn(&unlogged_runs),
        median_turn(&rows_runs),
        median_turn(&engine_runs),
    );
    // The first turn's internal run's changelog, restored into an empty state directory, and
    // read by a raw consumer.
    let restore = child("restore", 0);
    let changelog_raw = child("changelog-consume", 0);
    // The sink alone gets incremental batches: what an instance that keeps up writes (100 ms
    // epochs at 250k events/s), through the staging table and the merge.
    let alone = child("sink", 0);
    // The sink alone on the catch-up path: every final row in one batch, into an empty table.
    let load = child("sink-load", 0);
    let copy = child("copy", 0);
    let raw_rate = events as f64 / raw[0];
    assert_eq!(
        internal[2], engine[2],
        "both engine runs must end with the same internal table"
    );
    let internal_rate = events as f64 / internal[0];
    let engine_rate = events as f64 / engine[0];
    // A time with the fastest and slowest of its turns.
    let span = |runs: &[Vec<f64>], shown: f64| {
        let (fastest, slowest) = runs
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(r[0]), hi.max(r[0])));
        format!("{shown:.2} ({fastest:.2}-{slowest:.2})")
    };
    let report = format!(
        "<!-- ingest:begin -->\n\
         ## Ingest: `topologies/user-directory.toml` into internal tables\n\n\
         Command: `eval \"$(scripts/services up)\" && cargo bench --bench ingest` \
         ({events} events over {keys} keys, {PARTITIONS} partitions, ~{} bytes per event, \
         single local Kafka broker, 2 cores, 24 GiB; release build; miroir with 2 workers; {turns} turns, the phases interleaved).\n\n\
         | run | time (s), median (fastest-slowest) | events/s | of the raw consumer | peak RSS (MiB) |\n|---|---|---|---|---|\n\
         | raw rdkafka `BaseConsumer` (baseline: its fastest turn) | {} | {:.0} | 100% | {:.0} |\n\
         | miroir, the internal table alone (`user_contacts`: late policy, filter, map) | {} | {:.0} | **{:.0}%** | {:.0} |\n\
         | miroir, the internal table alone, without changelogs (`--no-changelog`) | {} | {:.0} | {:.0}% | {:.0} |\n\
         | miroir, the internal table alone, its rows logged for standbys (`--standby-replicas 1`) | {} | {:.0} | {:.0}% | {:.0} |\n\
         | miroir, all 3 tables (the internal one; a left join, and a join + group by, in PostgreSQL) | {} | {:.0} | {:.0}% | {:.0} |\n\n\
         Target: at least 50% of the raw consumer rate for the internal table. A miroir time \
         runs from `Engine::start` (group join included) until every offset is committed with its \
         state (and, for all 3 tables, every batch is applied in PostgreSQL); the internal table \
         then holds {} rows.\n\
         <!-- ingest:end -->\n",
        bytes / events as usize,
        span(&raw_runs, raw[0]),
        raw_rate,
        raw[1],
        span(&internal_runs, internal[0]),
        internal_rate,
        internal_rate / raw_rate * 100.0,
        internal[1],
        span(&unlogged_runs, unlogged[0]),
        events as f64 / unlogged[0],
        events as f64 / unlogged[0] / raw_rate * 100.0,
        unlogged[1],
        span(&rows_runs, rows[0]),
        events as f64 / rows[0],
        events as f64 / rows[0] / raw_rate * 100.0,
        rows[1],
        span(&engine_runs, engine[0]),
        engine_rate,
        engine_rate / raw_rate * 100.0,
        engine[1],
        engine[2] as u64,
    );
    println!("{report}");
    // engine: [secs, rss, internal rows, sink rows, sink seconds, sink batches]
    // alone: [secs, rows, batches]; copy: [secs, rows]
    let sink_rate = engine[3] / engine[4];
    let alone_rate = alone[1] / alone[0];
    let load_rate = load[1] / load[0];
    let copy_rate = copy[1] / copy[0];
    let postgres = format!(
        "<!-- postgres:begin -->\n\
         ## External tables: `topologies/user-directory.toml` into PostgreSQL\n\n\
         Same command and run as above; PostgreSQL 15 (Debian) on 127.0.0.1, `fsync=on`, \
         started by `scripts/services up`.\n\n\
         | writer | rows | seconds | rows/s | of `COPY` |\n|---|---|---|---|---|\n\
         | plain binary `COPY` of the {} final `user_directory` rows into an equivalent table (baseline) | {} | {:.3} | {:.0} | 100% |\n\
         | miroir's sink alone, first load: the same final rows in one batch, into a fresh table | {} | {:.3} | {:.0} | **{:.0}%** |\n\
         | miroir's sink inside the engine run above: {} batches, both external tables, sharing the 2 cores with the engine | {} | {:.3} | {:.0} | {:.0}% |\n\
         | miroir's sink alone, incremental: the same events' `user_directory` changes in {} batches of {ALONE_BATCH_EVENTS} events, into a fresh table | {} | {:.3} | {:.0} | {:.0}% |\n\n\
         Rates count the rows written over the time spent inside the sink's transactions (target: \
         at least 70% of `COPY`; the first-load row compares like with like, both alone on the \
         machine). Catching up, the engine coalesces the backlog into few large \
         epochs (one change per key and epoch), and a batch into a table with no row yet is \
         copied straight in: that is the engine run, where the sink shares the 2 cores with the \
         workers and with the epoch's RocksDB commit, which its `COPY` overlaps (its time leaves \
         out the wait for that commit). Incremental batches go through a binary \
         `COPY` into a staging table, one `INSERT ... SELECT ... ON CONFLICT DO UPDATE ... WHERE \
         changed` and one `DELETE`, then the offsets and the sequence; most of their rows are \
         updates of existing keys, which cost an index probe and a new row version each. End to \
         end, the events were applied and written in {:.1} s.\n\
         <!-- postgres:end -->\n",
        copy[1] as u64,
        copy[1] as u64,
        copy[0],
        copy_rate,
        load[1] as u64,
        load[0],
        load_rate,
        load_rate / copy_rate * 100.0,
        engine[5] as u64,
        engine[3] as u64,
        engine[4],
        sink_rate,
        sink_rate / copy_rate * 100.0,
        alone[2] as u64,
        alone[1] as u64,
        alone[0],
        alone_rate,
        alone_rate / copy_rate * 100.0,
        engine[0],
    );
    println!("{postgres}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/benchmarks.md");
    let current = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    let updated = replace_section(&current, "ingest", &report);
    let updated = replace_section(&updated, "postgres", &postgres);
    let updated = replace_section(
        &updated,
        "restore",
        &restore_report(&restore, &changelog_raw),
    );
    std::fs::write(path, updated).unwrap();
    eprintln!("bench: wrote {path}");
    delete_run_topics(&run);
}

/// The restore section: `restore` is [secs, records], `raw` is [secs, records].
fn restore_report(restore: &[f64], raw: &[f64]) -> String {
    let restore_rate = restore[1] / restore[0];
    let raw_rate = raw[1] / raw[0];
    format!(
        "<!-- restore:begin -->\n\
         ## Restoring a partition's state from its changelog\n\n\
         Same command and run as the ingest benchmark: the changelog the internal-table run \
         wrote (`users`, {PARTITIONS} partitions, compacted, one transaction per epoch) is \
         restored into an empty state directory, partition after partition, as an instance \
         taking the partitions over does; the baseline reads the same changelog with a raw \
         `read_committed` consumer.\n\n\
         | reader | records | seconds | records/s | of the raw consumer |\n|---|---|---|---|---|\n\
         | raw rdkafka `BaseConsumer`, `read_committed` (baseline) | {} | {:.3} | {:.0} | 100% |\n\
         | miroir's restore (entries into RocksDB, then the offset and position, synced) | {} | {:.3} | {:.0} | **{:.0}%** |\n\n\
         Target: at least 50% of the raw consumer's rate.\n\
         <!-- restore:end -->\n",
        raw[1] as u64,
        raw[0],
        raw_rate,
        restore[1] as u64,
        restore[0],
        restore_rate,
        restore_rate / raw_rate * 100.0,
    )
}

/// The turn whose time is the median of `runs` (each `[seconds, ...]`).
fn median_turn(runs: &[Vec<f64>]) -> Vec<f64> {
    let mut sorted: Vec<&Vec<f64>> = runs.iter().collect();
    sorted.sort_by(|a, b| a[0].total_cmp(&b[0]));
    sorted[sorted.len() / 2].clone()
}

/// Restores the internal run's `users` changelog into an empty state directory.
fn restore_phase() {
    use miroir::miroir_engine::metrics::Metrics;
    use miroir::miroir_engine::state::StateStore;
    use miroir::miroir_engine::topology::Topology;
    use miroir_connectors::kafka::changelog::Restorer;
    let run = std::env::var("MIROIR_BENCH_RUN").unwrap();
    let topology = Topology::parse("bench", &topology_text(&run, Tables::Internal)).unwrap();
    let state = tempfile::tempdir().unwrap();
    let store = StateStore::open(state.path(), &[]).unwrap();
    let restorer = Restorer::new(&KafkaConfig::new(brokers())).unwrap();
    let metrics = Metrics::new();
    let started = Instant::now();
    let mut records = 0;
    for p in 0..PARTITIONS as u32 {
        records += restorer
            .restore(&topology, (&store, &metrics), (0, p), &|_| {})
            .unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!("RESULT {secs} {records}");
}

/// Reads the internal run's `users` changelog with a raw `read_committed` consumer.
fn changelog_consume_phase() {
    use miroir::miroir_engine::topology::Topology;
    let run = std::env::var("MIROIR_BENCH_RUN").unwrap();
    let topology = Topology::parse("bench", &topology_text(&run, Tables::Internal)).unwrap();
    let topic = miroir_connectors::kafka::changelog::topic(&topology, 0);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("bench-raw-changelog-{run}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let started = Instant::now();
    let (mut records, mut ended) = (0u64, 0);
    let mut bytes = 0usize;
    while ended < PARTITIONS {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                bytes += rdkafka::Message::payload(&m).map_or(0, <[u8]>::len);
                records += 1;
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => ended += 1,
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "stalled at {records}"
        );
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("raw changelog: {records} records, {bytes} bytes");
    println!("RESULT {secs} {records}");
}

/// Reads `value` of a Prometheus sample line `name ... value` (summed over label sets).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn copy_phase() {
    let run = std::env::var("MIROIR_BENCH_RUN").unwrap();
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL: run `eval \"$(scripts/services up)\"` first");
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let schema = format!("bench_{run}");
    let rows: Vec<[String; 4]> = db
        .query(
            &format!("SELECT id, name, email, department FROM \"{schema}\".user_directory"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let text = |i: usize| r.get::<_, Option<String>>(i).unwrap_or_default();
            [text(0), text(1), text(2), text(3)]
        })
        .collect();
    db.batch_execute(&format!(
        "CREATE TABLE \"{schema}\".copy_baseline (LIKE \"{schema}\".user_directory INCLUDING ALL)"
    ))
    .unwrap();
    let types = [postgres::types::Type::TEXT; 4];
    let started = Instant::now();
    let mut tx = db.transaction().unwrap();
    let sink = tx
        .copy_in(&format!(
            "COPY \"{schema}\".copy_baseline FROM STDIN BINARY"
        ))
        .unwrap();
    let mut writer = postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
    for row in &rows {
        writer.write(&[&row[0], &row[1], &row[2], &row[3]]).unwrap();
    }
    writer.finish().unwrap();
    tx.commit().unwrap();
    let secs = started.elapsed().as_secs_f64();
    db.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .unwrap();
    println!("RESULT {secs} {}", rows.len());
}

/// miroir's PostgreSQL sink alone, without the engine competing for the 2 cores: the
/// `user_directory` changes of the same events, cut into batches of `ALONE_BATCH_EVENTS` events
/// (late events left out), or all in one batch (`first_load`), applied by `PostgresSink` into
/// a fresh table (a rebuild's shadow table).
fn sink_phase(first_load: bool) {
    use miroir::miroir_engine::sink::{Claim, Durable, ExternalSink, SinkBatch, TableChanges};
    use miroir::miroir_engine::value::Value;

    let run = std::env::var("MIROIR_BENCH_RUN").unwrap();
    let events = env_or("MIROIR_BENCH_EVENTS", 0);
    let keys = env_or("MIROIR_BENCH_KEYS", 100_000);
    let per_batch = if first_load {
        events as usize
    } else {
        ALONE_BATCH_EVENTS as usize
    };
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    // Tables of its own, fresh: the engine run's are full, and so are the other phase's.
    let phase = if first_load { "load" } else { "alone" };
    let text = topology_text(&run, Tables::All)
        .replace(
            &format!("name = \"bench-{run}-all\""),
            &format!("name = \"bench-{run}-sink-{phase}\""),
        )
        .replace(
            &format!("table = \"bench_{run}."),
            &format!("table = \"bench_{run}_{phase}."),
        );
    let topology = std::sync::Arc::new(
        miroir::miroir_engine::topology::Topology::parse("bench.toml", &text).unwrap(),
    );
    let plan = topology.table("user_directory").unwrap().clone();
    let mut sink = miroir_connectors::postgres::sink::PostgresSink::new(
        &url,
        topology.clone(),
        if first_load {
            "bench-sink-load"
        } else {
            "bench-sink-alone"
        },
    )
    .unwrap();
    // As the engine's sink thread does when it starts: connect and check the tables before
    // the first batch, outside its timed transaction.
    sink.connect().unwrap();
    let mut batch = std::collections::HashMap::new();
    let mut sequence = 0;
    let (mut rows, mut secs) = (0usize, 0.0f64);
    // The first batch claims every partition the table's rows follow, as a single
    // instance's first epoch does: the sink writes only the rows of partitions it claimed.
    let (source, _) = topology
        .partitioned_by(&plan)
        .expect("user_directory is split");
    let claims: Vec<Claim> = (0..PARTITIONS as u32)
        .map(|partition| Claim {
            topic: topology.sources[source].topic.clone(),
            partition,
            partitions: PARTITIONS as u32,
        })
        .collect();
    let mut flush = |batch: &mut std::collections::HashMap<usize, Vec<Value>>| {
        sequence += 1;
        let upserts: Vec<Vec<Value>> = batch.drain().map(|(_, row)| row).collect();
        rows += upserts.len();
        let b = SinkBatch {
            sequence,
            tables: vec![TableChanges {
                table: plan.name.clone(),
                definition: plan.definition(),
                upserts,
                deletes: vec![],
            }],
            offsets: vec![],
            caught_up: false,
            claims: if sequence == 1 {
                claims.clone()
            } else {
                vec![]
            },
            written: vec![],
        };
        let started = Instant::now();
        sink.apply(&[b], &Durable::done()).unwrap();
        secs += started.elapsed().as_secs_f64();
    };
    for (i, (k, v, late, _)) in generate(events, keys).enumerate() {
        if !late {
            batch.insert(
                k,
                vec![
                    Value::Text(format!("u-{k}").into()),
                    Value::Text(format!("User {k}").into()),
                    Value::Text(format!("User{k}.V{v}@Example.com").into()),
                    Value::Text("unassigned".into()),
                ],
            );
        }
        if (i + 1) % per_batch == 0 {
            flush(&mut batch);
        }
    }
    flush(&mut batch);
    println!("RESULT {secs} {rows} {sequence}");
}

fn consume_phase() {
    let run = std::env::var("MIROIR_BENCH_RUN").unwrap();
    let events = env_or("MIROIR_BENCH_EVENTS", 0);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("bench-raw-{run}"))
        .set("enable.auto.commit", "false")
        // As miroir's source sets it: the baseline gets the same tuning.
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&format!("user-{run}"), p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let started = Instant::now();
    let mut seen = 0u64;
    let mut bytes = 0usize;
    while seen < events {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            // Touch the payload, as any consumer must.
            bytes += rdkafka::Message::payload(&m).map(|p| p.len()).unwrap_or(0);
            seen += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "raw consumer stalled at {seen}"
        );
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("raw: {seen} messages, {bytes} bytes");
    println!("RESULT {secs} {}", peak_rss_mib());
}

/// Whether the run's external tables are in place (not only their shadows).
fn tables_swapped_in(db: &mut postgres::Client, run: &str) -> bool {
    let row = db
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
            &[
                &format!("{}.user_directory", schema(run)),
                &format!("{}.users_per_department", schema(run)),
            ],
        )
        .unwrap();
    row.get(0)
}

fn engine_phase(tables: Tables) {
    let run = std::env::var("MIROIR_BENCH_RUN").unwrap();
    let events = env_or("MIROIR_BENCH_EVENTS", 0) as i64;
    let state = tempfile::tempdir().unwrap();
    // With the external tables, the run ends once readers see them: the first load is built
    // in shadow tables, swapped in by the first batch after the engine caught up (its lag,
    // from librdkafka's statistics, can take a second to say so after the last record).
    let mut db = matches!(tables, Tables::All).then(|| {
        let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
        postgres::Client::connect(&url, postgres::NoTls).unwrap()
    });
    let started = Instant::now();
    let engine = miroir::Engine::builder()
        .topology_str(topology_text(&run, tables))
        .brokers(brokers())
        .state_dir(state.path())
        .workers(2)
        .changelog(!matches!(tables, Tables::Unlogged))
        .standby_replicas(usize::from(matches!(tables, Tables::Rows)))
        .start()
        .unwrap();
    let topic = format!("user-{run}");
    loop {
        let applied: i64 = engine
            .status()
            .committed
            .iter()
            .filter(|((t, _), _)| *t == topic)
            .map(|(_, o)| o + 1)
            .sum();
        let pending = metric(&engine.metrics(), "miroir_sink_pending_batches");
        if applied >= events
            && pending == 0.0
            && db.as_mut().is_none_or(|db| tables_swapped_in(db, &run))
        {
            break;
        }
        assert!(
            engine.failure().is_none(),
            "engine failed: {:?}",
            engine.failure()
        );
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "engine stalled at {applied}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = started.elapsed().as_secs_f64();
    let rows = engine.scan("user_contacts", "", 1_000_000).unwrap().len();
    let metrics = engine.metrics();
    println!(
        "RESULT {secs} {} {rows} {} {} {}",
        peak_rss_mib(),
        metric(&metrics, "miroir_sink_rows_total"),
        metric(&metrics, "miroir_sink_commit_seconds_sum"),
        metric(&metrics, "miroir_sink_batches_total"),
    );
    engine.shutdown();
}
