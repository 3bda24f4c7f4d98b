//! Table keys in the state store: keys whose URL forms once read alike are distinct rows
//! (composite keys with `|` inside a part, a NULL group and an empty-text group), each is
//! found by its URL form, and rows stored by an earlier key encoding do not survive a start.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use miroir_engine::ingest::decode::decode;
use miroir_engine::ingest::{Message, Records};
use miroir_engine::metrics::Metrics;
use miroir_engine::reference::evaluate_table;
use miroir_engine::runtime::{Runtime, RuntimeConfig};
use miroir_engine::state::{ScanOrder, StateStore, TableReader};
use miroir_engine::topology::Topology;
use miroir_engine::value::{key_text, parse_key_prefix, parse_key_text, ColumnType, Row};
use support::NoErrors;

const TOPOLOGY: &str = r#"
name = "keys-test"
[sources.users]
topic = "users"
key = "id"
columns = { id = "text", a = "text", b = "text" }

[tables.pairs]
query = "SELECT a, b, count(*) AS n FROM users GROUP BY a, b"
store = "internal"
"#;

/// (user, a, b): the first two pairs read `a|b|c` joined with `|`; the last two groups are a
/// NULL and an empty text.
const USERS: &[(&str, Option<&str>, &str)] = &[
    ("u1", Some("a|b"), "c"),
    ("u2", Some("a"), "b|c"),
    ("u3", None, "x"),
    ("u4", Some(""), "x"),
    ("u5", Some(""), "x"),
    ("u6", Some("a\\"), "|c"),
];

fn payload(id: &str, a: Option<&str>, b: &str) -> String {
    serde_json::json!({ "id": id, "a": a, "b": b }).to_string()
}

fn start(topology: &Arc<Topology>, store: &StateStore) -> Runtime {
    let runtime = Runtime::start(
        topology.clone(),
        store.clone(),
        Arc::new(Metrics::new()),
        Arc::new(NoErrors),
        None,
        None,
        RuntimeConfig {
            workers: 2,
            epoch_interval: Duration::from_millis(10),
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    runtime.broadcast(|| Message::Assign {
        tasks: vec![(0, vec![0])],
    });
    runtime
}

/// Sends `records` of partition 0 and waits until the last one is committed.
fn send(runtime: &Runtime, records: Records) {
    let last = records.last_offset().expect("records to send");
    runtime.send(
        0,
        Message::Records {
            source: 0,
            partition: 0,
            records,
            catching_up: false,
        },
    );
    wait_committed(runtime, last);
}

fn wait_committed(runtime: &Runtime, offset: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let committed = runtime
            .committed_offsets()
            .get(&("users".to_string(), 0))
            .copied();
        if committed == Some(offset) {
            return;
        }
        assert!(Instant::now() < deadline, "offset {offset} not committed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every row of `pairs`, by the URL form of its key, read back from the store.
fn stored(store: &StateStore, plan: &miroir_engine::plan::TablePlan) -> BTreeMap<String, Row> {
    store
        .rows(
            "pairs",
            &Default::default(),
            (None, ScanOrder::Ascending),
            100,
        )
        .unwrap()
        .into_iter()
        .map(|scanned| {
            let json: serde_json::Value = serde_json::from_slice(&scanned.row).unwrap();
            let row: Row = plan
                .columns
                .iter()
                .map(|c| miroir_engine::value::Value::from_json(&json[&c.name], c.ty).unwrap())
                .collect();
            (key_text(&row, &plan.key), row)
        })
        .collect()
}

#[test]
fn keys_that_read_alike_are_distinct_rows_found_by_their_url_form() {
    let topology = Arc::new(Topology::parse("t.toml", TOPOLOGY).unwrap());
    let plan = topology.table("pairs").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), &["pairs".to_string()]).unwrap();
    let runtime = start(&topology, &store);
    let mut records = Records::default();
    let mut rows = Vec::new();
    for (offset, (id, a, b)) in USERS.iter().enumerate() {
        let json = payload(id, *a, b);
        rows.push(decode(&topology.sources[0], json.as_bytes()).unwrap());
        records.push(offset as i64, Some(id.as_bytes()), Some(json.as_bytes()));
    }
    send(&runtime, records);
    runtime.shutdown();

    let expected = evaluate_table(plan, &[rows]);
    assert_eq!(expected.len(), 5, "five groups: {expected:?}");
    assert_eq!(stored(&store, plan), expected);
    let types = [ColumnType::Text, ColumnType::Text];
    for (url, n) in [
        ("a\\|b|c", 1),
        ("a|b\\|c", 1),
        ("\\N|x", 1),
        ("|x", 2),
        ("a\\\\|\\|c", 1),
    ] {
        let key = parse_key_text(url, &types).unwrap();
        let row = store.row("pairs", &key).unwrap().expect(url);
        let json: serde_json::Value = serde_json::from_slice(&row).unwrap();
        assert_eq!(json["n"], n, "{url}: {json}");
    }
    // A scan by prefix: the groups whose `a` starts with `a` (not the NULL or empty ones).
    let prefix = parse_key_prefix("a", &types).unwrap();
    assert_eq!(
        store
            .rows("pairs", &prefix, (None, ScanOrder::Ascending), 100)
            .unwrap()
            .len(),
        3
    );
    let prefix = parse_key_prefix("a|", &types).unwrap();
    assert_eq!(
        store
            .rows("pairs", &prefix, (None, ScanOrder::Ascending), 100)
            .unwrap()
            .len(),
        1
    );
    // Page by page, each going on after the last key of the one before: every row once.
    let prefix = parse_key_prefix("a", &types).unwrap();
    let whole = store
        .rows("pairs", &prefix, (None, ScanOrder::Ascending), 100)
        .unwrap();
    let mut paged = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store
            .rows(
                "pairs",
                &prefix,
                (after.as_deref(), ScanOrder::Ascending),
                2,
            )
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        paged.extend(page);
    }
    assert_eq!(paged, whole);
    assert!(
        whole.windows(2).all(|w| w[0].key < w[1].key),
        "in key order"
    );
    // Newest first, page by page: the same rows, in reverse key order.
    let mut reversed = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let from = (after.as_deref(), ScanOrder::Descending);
        let page = store.rows("pairs", &prefix, from, 2).unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        reversed.extend(page);
    }
    reversed.reverse();
    assert_eq!(reversed, whole);
    let all = (None, ScanOrder::Descending);
    let every = store.rows("pairs", &Default::default(), all, 100).unwrap();
    assert_eq!(every.len(), 5, "every row, from the last key on");
    let prefix = parse_key_prefix("b|", &types).unwrap();
    assert!(store.rows("pairs", &prefix, all, 100).unwrap().is_empty());
}

#[test]
fn rows_stored_under_the_url_form_of_their_key_are_gone_after_a_start() {
    let topology = Arc::new(Topology::parse("t.toml", TOPOLOGY).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), &["pairs".to_string()]).unwrap();
    let runtime = start(&topology, &store);
    let mut records = Records::default();
    let json = payload("u1", Some("a"), "b");
    records.push(0, Some(b"u1"), Some(json.as_bytes()));
    send(&runtime, records);
    runtime.shutdown();
    drop((runtime, store));
    // What an earlier miroir wrote: the row under the text `a|b`.
    {
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), dir.path()).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path(), cfs).unwrap();
        let cf = db.cf_handle("table.pairs").unwrap();
        db.put_cf(&cf, b"a|b", br#"{"a":"a","b":"b","n":7}"#)
            .unwrap();
    }

    let store = StateStore::open(dir.path(), &["pairs".to_string()]).unwrap();
    assert!(
        store
            .rows(
                "pairs",
                &Default::default(),
                (None, ScanOrder::Ascending),
                10
            )
            .unwrap()
            .is_empty(),
        "rows are derived: an open clears them"
    );
    let runtime = start(&topology, &store);
    let key = parse_key_text("a|b", &[ColumnType::Text, ColumnType::Text]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let row = loop {
        if let Some(row) = store.row("pairs", &key).unwrap() {
            break row;
        }
        assert!(Instant::now() < deadline, "row not restored");
        std::thread::sleep(Duration::from_millis(5));
    };
    runtime.shutdown();
    let json: serde_json::Value = serde_json::from_slice(&row).unwrap();
    assert_eq!(json["n"], 1, "restored from the upsert state: {json}");
    assert_eq!(
        store
            .rows(
                "pairs",
                &Default::default(),
                (None, ScanOrder::Ascending),
                10
            )
            .unwrap()
            .len(),
        1
    );
}
