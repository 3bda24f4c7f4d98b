//! Property: for any sequence of upserts and deletes, the incremental dataflow of every table
//! equals the reference evaluator over the current source contents, after every epoch; and so
//! do the plans split into stages joined by repartition topics.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use differential_dataflow::input::Input;
use miroir_engine::dataflow::Renderer;
use miroir_engine::reference::evaluate;
use miroir_engine::topology::Topology;
use miroir_engine::value::{Row, Value};
use proptest::prelude::*;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::ProbeHandle;

const TOPOLOGY: &str = r#"
name = "prop"
[sources.a]
topic = "a"
key = "id"
columns = { id = "text", g = "text", n = "bigint", note = "text" }
[sources.b]
topic = "b"
key = "id"
columns = { id = "text", name = "text", note = "text" }

[tables.mapped]
query = "SELECT id, upper(coalesce(g, 'none')) AS g, n * 2 AS n2, CASE WHEN n > 2 THEN 'big' ELSE 'small' END AS size FROM a WHERE n IS NULL OR n >= 0"
[tables.left_joined]
query = "SELECT a.id, a.n, b.name FROM a LEFT JOIN b ON a.g = b.id"
[tables.grouped]
query = """SELECT b.name, count(*) AS c, count(a.n) AS cn, sum(a.n) AS s, min(a.n) AS mn, max(a.id) AS mx, avg(a.n) AS av
FROM a JOIN b ON a.g = b.id GROUP BY b.name HAVING count(*) > 1"""
[tables.by_group]
query = "SELECT g, count(*) AS c FROM a GROUP BY g"
"#;

/// One change: upsert (Some) or delete (None) of a key of source 0 (`a`) or 1 (`b`).
#[derive(Clone, Debug)]
struct Change {
    source: usize,
    key: u8,
    row: Option<(Option<u8>, Option<i8>)>,
}

fn change() -> impl Strategy<Value = Change> {
    (
        0..2usize,
        0..6u8,
        proptest::option::weighted(
            0.8,
            (proptest::option::of(0..4u8), proptest::option::of(-2..6i8)),
        ),
    )
        .prop_map(|(source, key, row)| Change { source, key, row })
}

fn row_of(c: &Change) -> Option<Row> {
    let (g, n) = c.row?;
    Some(match c.source {
        0 => vec![
            Value::Text(format!("a{}", c.key).into()),
            g.map(|g| Value::Text(format!("b{g}").into()))
                .unwrap_or(Value::Null),
            n.map(|n| Value::Int(n as i64)).unwrap_or(Value::Null),
            Value::Text(format!("note{}", c.key).into()),
        ],
        // Department names collide on purpose, so groups merge and split; they are also
        // values of `a.g`, for joins keyed by neither side's key.
        _ => vec![
            Value::Text(format!("b{}", c.key).into()),
            Value::Text(format!("b{}", g.unwrap_or(0) % 2).into()),
            Value::Text(format!("note{}", c.key).into()),
        ],
    })
}

/// Updates captured from one table's output during an epoch.
type Capture = Rc<RefCell<Vec<(Row, isize)>>>;

fn key(row: &Row, key: &[usize]) -> Vec<Value> {
    key.iter().map(|k| row[*k].clone()).collect()
}

/// Applies a round's `deltas` to `table` as the runtime writes a table: the last row
/// inserted for a key replaces its row; a key with retractions only loses it.
fn upsert(table: &mut BTreeMap<Vec<Value>, Row>, columns: &[usize], mut deltas: Vec<(Row, isize)>) {
    differential_dataflow::consolidation::consolidate(&mut deltas);
    let inserted: Vec<Vec<Value>> = deltas
        .iter()
        .filter(|(_, d)| *d > 0)
        .map(|(r, _)| key(r, columns))
        .collect();
    for (row, d) in deltas {
        let k = key(&row, columns);
        if d > 0 {
            table.insert(k, row);
        } else if !inserted.contains(&k) {
            table.remove(&k);
        }
    }
}

fn multiset(rows: Vec<Row>) -> BTreeMap<Row, isize> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(r).or_insert(0) += 1;
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn dataflow_equals_reference_after_every_epoch(
        epochs in proptest::collection::vec(proptest::collection::vec(change(), 0..12), 1..8)
    ) {
        check(TOPOLOGY, false, epochs)?;
    }
}

/// The two sources of the tables split into stages; no table reads `note`, which the stages
/// leave out.
const SOURCES: &str = r#"
name = "prop"
[sources.a]
topic = "a"
key = "id"
columns = { id = "text", g = "text", n = "bigint", note = "text" }
[sources.b]
topic = "b"
key = "id"
columns = { id = "text", name = "text", note = "text" }
"#;

/// Tables that need rows of several partitions, split into stages.
const SPLIT: &str = r#"

[tables.grouped]
query = """SELECT b.name, count(*) AS c, count(a.n) AS cn, sum(a.n) AS s, min(a.n) AS mn, max(a.id) AS mx
FROM a JOIN b ON a.g = b.id GROUP BY b.name HAVING count(*) > 1"""
[tables.by_group]
query = "SELECT g, count(*) AS c, sum(n) AS s FROM a GROUP BY g"
[tables.b_sizes]
query = "SELECT b.id, count(a.id) AS c, max(a.n) AS mx FROM b LEFT JOIN a ON a.g = b.id GROUP BY b.id"
[tables.directory]
query = "SELECT a.id, a.n, coalesce(b.name, 'none') AS name FROM a LEFT JOIN b ON a.g = b.id WHERE a.n IS NULL OR a.n > 0"
[tables.named]
query = "SELECT a.id, b.name FROM a JOIN b ON a.g = b.id"
[tables.members]
query = "SELECT a.id, b.id AS b_id, a.n FROM b JOIN a ON a.g = b.id WHERE a.n IS NOT NULL"
"#;

/// Runs the tables of topology `text` (`split` into stages, or not) through `epochs` of
/// changes, and checks after each that every table equals the reference evaluator over the
/// written plans. Each stage's deltas (a retraction and an insertion per changed key, as its
/// topic's upserts make them) are fed back as the next stage's source, round after round
/// until no stage changes.
fn check(text: &str, split: bool, epochs: Vec<Vec<Change>>) -> Result<(), TestCaseError> {
    let topology = Topology::parse("prop.toml", text)
        .unwrap_or_else(|e| panic!("valid topology:\n{text}\n{e}"));
    let topology = match split {
        true => topology,
        false => topology.unsplit(),
    };
    // Every table is split.
    for t in topology.tables.iter().filter(|_| split) {
        assert!(
            topology.partitioned_by(t).is_some(),
            "{} is split:\n{}",
            t.name,
            topology.explain()
        );
    }
    let failure = timely::execute_directly(move |worker| -> Option<String> {
        let (tables, repartitions) = (topology.tables.clone(), topology.repartitions.clone());
        let captured: Vec<Capture> = tables.iter().map(|_| Rc::default()).collect();
        let staged: Vec<Capture> = repartitions.iter().map(|_| Rc::default()).collect();
        let probe = ProbeHandle::new();
        let mut inputs = worker.dataflow::<u64, _, _>(|scope| {
            let (inputs, collections): (Vec<_>, Vec<_>) = topology
                .sources
                .iter()
                .map(|_| scope.new_collection::<Row, isize>())
                .unzip();
            let mut renderer = Renderer::new(collections);
            let plans = tables
                .iter()
                .map(|t| (t.computed(), &t.name))
                .chain(repartitions.iter().map(|r| (&r.input, &r.name)));
            for ((plan, name), sink) in plans.zip(captured.iter().chain(&staged)) {
                let sink = sink.clone();
                renderer
                    .render(plan, name)
                    .inner
                    .probe_with(&probe)
                    .inspect_core(move |e| {
                        if let Ok((_, data)) = e {
                            sink.borrow_mut()
                                .extend(data.iter().map(|(r, _, d)| (r.clone(), *d)));
                        }
                    });
            }
            inputs
        });
        let mut contents: Vec<HashMap<u8, Row>> = vec![HashMap::new(), HashMap::new()];
        let mut outputs: Vec<BTreeMap<Row, isize>> =
            tables.iter().map(|_| BTreeMap::new()).collect();
        // Each table as the runtime writes it: upserts and deletes by key.
        let mut keyed: Vec<BTreeMap<Vec<Value>, Row>> =
            tables.iter().map(|_| BTreeMap::new()).collect();
        let mut time = 0u64;
        for (epoch, changes) in epochs.iter().enumerate() {
            for c in changes {
                if let Some(old) = contents[c.source].remove(&c.key) {
                    inputs[c.source].update(old, -1);
                }
                if let Some(new) = row_of(c) {
                    contents[c.source].insert(c.key, new.clone());
                    inputs[c.source].update(new, 1);
                }
            }
            // Round after round, each stage's changes reach the next one. A key's deletion
            // comes a round late: its writer may not be the writer of the keys inserted
            // meanwhile, and topics apply the writers' records in no agreed order.
            let mut late: Vec<Vec<(Row, isize)>> =
                repartitions.iter().map(|_| Vec::new()).collect();
            loop {
                time += 1;
                for i in inputs.iter_mut() {
                    i.advance_to(time);
                    i.flush();
                }
                worker.step_while(|| probe.less_than(&time));
                for (i, (t, cap)) in tables.iter().zip(&captured).enumerate() {
                    let deltas: Vec<(Row, isize)> = cap.borrow_mut().drain(..).collect();
                    for (row, d) in &deltas {
                        *outputs[i].entry(row.clone()).or_insert(0) += d;
                    }
                    upsert(&mut keyed[i], &t.key, deltas);
                }
                let mut fed = false;
                for ((r, stage), late) in repartitions.iter().zip(&staged).zip(late.iter_mut()) {
                    let mut deltas = std::mem::take(&mut *stage.borrow_mut());
                    differential_dataflow::consolidation::consolidate(&mut deltas);
                    let key_of = |row: &Row| -> Vec<Value> {
                        r.key.iter().map(|k| row[*k].clone()).collect()
                    };
                    let inserted: Vec<Vec<Value>> = deltas
                        .iter()
                        .filter(|(_, d)| *d > 0)
                        .map(|(row, _)| key_of(row))
                        .collect();
                    let (now, later): (Vec<_>, Vec<_>) = deltas
                        .into_iter()
                        .partition(|(row, d)| *d > 0 || inserted.contains(&key_of(row)));
                    for (row, d) in std::mem::replace(late, later).into_iter().chain(now) {
                        let key = key_of(&row);
                        let mut read = row;
                        read.push(Value::Text(format!("{key:?}").into()));
                        inputs[r.source].update(read, d);
                        fed = true;
                    }
                }
                if !fed && late.iter().all(Vec::is_empty) {
                    break;
                }
            }
            let sources: Vec<Vec<Row>> = contents
                .iter()
                .map(|m| m.values().cloned().collect())
                .collect();
            for (i, (t, out)) in tables.iter().zip(outputs.iter_mut()).enumerate() {
                out.retain(|_, d| *d != 0);
                let rows = evaluate(&t.plan, &sources);
                let by_key: BTreeMap<Vec<Value>, Row> =
                    rows.iter().map(|r| (key(r, &t.key), r.clone())).collect();
                let expected = multiset(rows);
                if *out != expected {
                    return Some(format!(
                        "table {} after epoch {epoch}:\n dataflow  {out:?}\n reference {expected:?}",
                        t.name
                    ));
                }
                if keyed[i] != by_key {
                    return Some(format!(
                        "table {} by key after epoch {epoch}:\n upserted  {:?}\n reference {by_key:?}",
                        t.name, keyed[i]
                    ));
                }
            }
        }
        None
    });
    match failure {
        Some(m) => Err(TestCaseError::fail(m)),
        None => Ok(()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn split_plans_equal_the_reference_after_every_epoch(
        epochs in proptest::collection::vec(proptest::collection::vec(change(), 0..12), 1..8)
    ) {
        check(&format!("{SOURCES}{SPLIT}"), true, epochs)?;
    }

    #[test]
    fn random_topologies_split_equal_the_reference_after_every_epoch(
        tables in proptest::collection::vec(table(), 1..4),
        global in proptest::bool::ANY,
        epochs in proptest::collection::vec(proptest::collection::vec(change(), 0..12), 1..6)
    ) {
        // With `b` global, its joins need no stage, and the GROUP BYs over them read it. A
        // LEFT JOIN keeping every row of the global `b` is refused: an
        // inner join grouped alike stands for it.
        let mut text = match global {
            true => SOURCES.replace("[sources.b]\n", "[sources.b]\nglobal = true\n"),
            false => SOURCES.to_string(),
        };
        let queries = tables.iter().map(|q| match global {
            true => q.replace("FROM b LEFT JOIN a", "FROM a JOIN b"),
            false => q.clone(),
        });
        for (i, query) in queries.enumerate() {
            text.push_str(&format!("[tables.t{i}]\nquery = \"\"\"{query}\"\"\"\n"));
        }
        check(&text, true, epochs)?;
    }
}

/// A random query of the supported SQL over sources `a` and `b`: a filter and map, a GROUP BY
/// on a column that is not the key, joins on a foreign key (inner or left, from either side)
/// keyed by the key of the side holding it, joins keyed by neither side's key, and GROUP BYs
/// over those joins.
fn table() -> impl Strategy<Value = String> {
    let aggregates = proptest::sample::subsequence(
        vec![
            "count(*) AS c",
            "count(a.n) AS cn",
            "sum(a.n) AS s",
            "min(a.n) AS mn",
            "max(a.id) AS mx",
            "avg(a.n) AS av",
        ],
        1..4,
    );
    let filter = prop_oneof![
        Just(""),
        Just(" WHERE a.n IS NOT NULL"),
        Just(" WHERE a.n > 1 OR a.g IS NULL"),
    ];
    let having = prop_oneof![Just(""), Just(" HAVING count(*) > 1")];
    let join = prop_oneof![Just("JOIN"), Just("LEFT JOIN")];
    (0..9u8, aggregates, filter, having, join).prop_map(
        |(shape, aggregates, filter, having, join)| {
            let aggregates = aggregates.join(", ");
            match shape {
                0 => format!("SELECT a.id, upper(coalesce(a.g, 'none')) AS g, a.n * 2 AS n2 FROM a{filter}"),
                1 => format!("SELECT a.g, {aggregates} FROM a{filter} GROUP BY a.g{having}"),
                2 => format!("SELECT a.id, a.n, b.name FROM a {join} b ON a.g = b.id{filter}"),
                3 => format!("SELECT a.id, b.id AS b_id, b.name FROM b JOIN a ON a.g = b.id{filter}"),
                4 => format!("SELECT b.name, {aggregates} FROM a JOIN b ON a.g = b.id{filter} GROUP BY b.name{having}"),
                5 => format!("SELECT b.id, {aggregates} FROM b LEFT JOIN a ON a.g = b.id GROUP BY b.id{having}"),
                6 => format!("SELECT a.id, b.id AS b_id, a.n, b.name FROM a {join} b ON a.g = b.name{filter}"),
                7 => format!("SELECT b.id AS b_id, a.id, a.n FROM b {join} a ON b.name = a.g{filter}"),
                _ => format!("SELECT b.name, {aggregates} FROM a JOIN b ON a.g = b.name{filter} GROUP BY b.name{having}"),
            }
        },
    )
}
