//! Fuzzing of what comes from outside: topology files, the SQL of their tables (planned, then
//! evaluated over rows with extreme values) and the events a source decodes. Every input ends
//! in a value or an error, never a panic.
//!
//! Each target runs `MIROIR_FUZZ_CASES` inputs (default 2,000: the short run of the test
//! suite); docs/reliability.md gives the long runs and their figures:
//!
//! ```sh
//! MIROIR_FUZZ_CASES=1000000 cargo test -p miroir-engine --test fuzz -- --nocapture
//! ```

use miroir_engine::ingest::decode::decode;
use miroir_engine::reference::evaluate;
use miroir_engine::topology::Topology;
use miroir_engine::value::{Row, Value, F64};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Inputs per target.
fn cases() -> u32 {
    std::env::var("MIROIR_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

/// Runs `test` on `cases()` inputs of `strategy`, printing how many ran and how many `test`
/// accepted (returned true for: a topology that parses, an event that decodes).
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> bool) {
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let started = std::time::Instant::now();
    TestRunner::new(config)
        .run(&strategy, |input| {
            if test(input) {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "fuzz {name}: {} inputs ({} accepted), no panic, {:.1?}",
        cases(),
        accepted.into_inner(),
        started.elapsed()
    );
}

const SOURCES: &str = r#"
name = "fuzz"
[sources.a]
topic = "a"
key = "id"
columns = { id = "text", g = "text", n = "bigint", x = "double", b = "boolean", t = "timestamptz" }
late = { order_by = "n" }
[sources.b]
topic = "b"
key = "id"
columns = { id = "text", name = "text", n = "bigint" }
"#;

/// Seeds for the mutations of whole topology files.
fn seeds() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../topologies");
    let mut seeds: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    seeds.push(format!(
        "{SOURCES}\n[tables.t]\nquery = \"SELECT g, count(*) AS c, sum(n) AS s FROM a GROUP BY g\"\n"
    ));
    seeds.sort();
    seeds
}

/// Pieces that mean something to TOML, SQL or JSON, for the mutations to insert.
const TOKENS: &[&str] = &[
    "\"",
    "'",
    "=",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\n",
    "#",
    ".",
    "\\",
    "\\u0000",
    "\u{0}",
    "é",
    "SELECT",
    "FROM",
    "WHERE",
    "JOIN",
    "LEFT JOIN",
    "ON",
    "GROUP BY",
    "HAVING",
    "CASE WHEN",
    "END",
    "NULL",
    "AND",
    "OR",
    "NOT",
    "*",
    "(",
    ")",
    "+",
    "-",
    "/",
    "%",
    "||",
    "9223372036854775807",
    "-9223372036854775808",
    "1e308",
    "0",
    "count(*)",
    "sum(",
    "max(",
    "coalesce(",
    "upper(",
    "[sources.x]",
    "[tables.y]",
    "[commands.z]",
    "query = ",
    "columns = ",
    "key = ",
    "late = ",
    "store = \"internal\"",
    "sink = ",
    "order_by",
    "per",
    "topic = \"t\"",
    "text",
    "bigint",
    "timestamptz",
    "boolean",
    "double",
    "true",
    "false",
    "\"\"\"",
    "'''",
];

/// One change to a text.
#[derive(Clone, Debug)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, token: usize },
    Byte { at: usize, byte: u8 },
    Duplicate { at: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..40usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, token)| Mutation::Insert { at, token }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Byte { at, byte }),
        (any::<usize>(), 1..80usize).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
    ]
}

/// `text` with `mutations` applied (as bytes; the result is read back as UTF-8, lossily).
fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for m in mutations {
        let n = bytes.len().max(1);
        match *m {
            Mutation::Delete { at, len } => {
                let at = at % n;
                let end = (at + len).min(bytes.len());
                bytes.drain(at.min(end)..end);
            }
            Mutation::Insert { at, token } => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, TOKENS[token].bytes());
            }
            Mutation::Byte { at, byte } => {
                if !bytes.is_empty() {
                    bytes[at % n] = byte;
                }
            }
            Mutation::Duplicate { at, len } => {
                let at = at % n;
                let end = (at + len).min(bytes.len());
                let copy = bytes[at.min(end)..end].to_vec();
                bytes.splice(at..at, copy);
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Rows of sources `a` and `b` with extreme and ordinary values.
fn rows() -> impl Strategy<Value = Vec<Vec<Row>>> {
    let text = prop_oneof![
        Just(Value::Null),
        "[a-c]{0,3}".prop_map(|s| Value::Text(s.into())),
        Just(Value::Text("\u{0}|\\".into())),
    ];
    let int = prop_oneof![
        Just(Value::Null),
        Just(Value::Int(i64::MAX)),
        Just(Value::Int(i64::MIN)),
        Just(Value::Int(0)),
        (-3i64..3).prop_map(Value::Int),
    ];
    let float = prop_oneof![
        Just(Value::Null),
        Just(Value::Float(F64(f64::NAN))),
        Just(Value::Float(F64(f64::INFINITY))),
        Just(Value::Float(F64(-0.0))),
        (-2.0f64..2.0).prop_map(|f| Value::Float(F64(f)))
    ];
    let a = (
        "[a-d]",
        text.clone(),
        int.clone(),
        float,
        prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool)],
        prop_oneof![Just(Value::Null), any::<i64>().prop_map(Value::Timestamp)],
    )
        .prop_map(|(id, g, n, x, b, t)| vec![Value::Text(id.into()), g, n, x, b, t]);
    let b = ("[a-d]", text, int).prop_map(|(id, name, n)| vec![Value::Text(id.into()), name, n]);
    (
        proptest::collection::btree_map("[a-d]", a, 0..4),
        proptest::collection::btree_map("[a-d]", b, 0..4),
    )
        .prop_map(|(a, b)| {
            let key = |(id, mut row): (String, Row)| {
                row[0] = Value::Text(id.into());
                row
            };
            vec![
                a.into_iter().map(key).collect(),
                b.into_iter().map(key).collect(),
            ]
        })
}

/// Leaves of one SQL type.
fn leaves(names: &[&'static str]) -> BoxedStrategy<String> {
    prop::sample::select(names.to_vec())
        .prop_map(str::to_string)
        .boxed()
}

/// SQL expressions over the columns of `a` and `b`, mostly well typed: numbers, texts and
/// conditions, combined with the operators and functions of each type.
fn expressions() -> (
    BoxedStrategy<String>,
    BoxedStrategy<String>,
    BoxedStrategy<String>,
) {
    let number = prop_oneof![
        leaves(&[
            "a.n",
            "b.n",
            "a.x",
            "0",
            "1",
            "-1",
            "9223372036854775807",
            "2.5",
            "NULL"
        ]),
        any::<i64>().prop_map(|i| i.to_string()),
    ]
    .boxed();
    let text = leaves(&[
        "a.id", "a.g", "b.name", "'x'", "'it''s'", "''", "NULL", "'%'",
    ]);
    let condition = leaves(&["a.b", "TRUE", "FALSE", "NULL"]);
    let number = number.prop_recursive(3, 16, 3, |n| {
        prop_oneof![
            (n.clone(), leaves(&["+", "-", "*", "/", "%"]), n.clone())
                .prop_map(|(l, op, r)| format!("({l} {op} {r})")),
            n.clone().prop_map(|e| format!("abs({e})")),
            n.clone().prop_map(|e| format!("-({e})")),
            (n.clone(), n).prop_map(|(a, b)| format!("coalesce({a}, {b})")),
        ]
    });
    let text = text.prop_recursive(3, 16, 3, |t| {
        prop_oneof![
            (leaves(&["upper", "lower", "trim"]), t.clone()).prop_map(|(f, e)| format!("{f}({e})")),
            (t.clone(), t.clone()).prop_map(|(a, b)| format!("({a} || {b})")),
            (t.clone(), t).prop_map(|(a, b)| format!("coalesce({a}, {b})")),
        ]
    });
    let number = prop_oneof![
        3 => number,
        1 => text.clone().prop_map(|t| format!("length({t})")),
    ]
    .boxed();
    let condition = prop_oneof![
        condition,
        (
            number.clone(),
            leaves(&["=", "<>", "<", ">=", ">"]),
            number.clone()
        )
            .prop_map(|(l, op, r)| format!("{l} {op} {r}")),
        (
            text.clone(),
            leaves(&["=", "<>", "LIKE", "<"]),
            text.clone()
        )
            .prop_map(|(l, op, r)| format!("{l} {op} {r}")),
        text.clone().prop_map(|t| format!("{t} IS NULL")),
    ]
    .boxed();
    let condition = condition
        .prop_recursive(2, 8, 2, |c| {
            prop_oneof![
                (c.clone(), leaves(&["AND", "OR"]), c.clone())
                    .prop_map(|(l, op, r)| format!("({l} {op} {r})")),
                c.prop_map(|e| format!("NOT ({e})")),
            ]
        })
        .boxed();
    let case = |of: BoxedStrategy<String>| {
        (condition.clone(), of.clone(), of)
            .prop_map(|(c, t, e)| format!("CASE WHEN {c} THEN {t} ELSE {e} END"))
    };
    let number = prop_oneof![4 => number.clone(), 1 => case(number)].boxed();
    let text = prop_oneof![4 => text.clone(), 1 => case(text.boxed())].boxed();
    (number, text, condition)
}

/// A column of a query: a number or a text.
fn expression() -> BoxedStrategy<String> {
    let (number, text, _) = expressions();
    prop_oneof![number, text].boxed()
}

/// A query over `a` and `b`: a projection, a join, a filter, a grouping.
fn query() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(expression(), 1..4),
        0..3usize,
        proptest::option::of(expressions().2),
        proptest::option::of((expression(), proptest::option::of(expressions().2))),
        proptest::collection::vec(mutation(), 0..2),
    )
        .prop_map(|(columns, join, filter, group, mutations)| {
            let from = [
                "a",
                "a JOIN b ON a.id = b.id",
                "a LEFT JOIN b ON a.g = b.id",
            ][join];
            let mut sql = match &group {
                Some((key, _)) => {
                    let aggregates: Vec<String> = columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            format!("{}({c}) AS v{i}", ["count", "sum", "max", "min"][i % 4])
                        })
                        .collect();
                    format!("SELECT {key} AS k, {} FROM {from}", aggregates.join(", "))
                }
                None => {
                    let columns: Vec<String> = columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| format!("{c} AS c{i}"))
                        .collect();
                    format!("SELECT a.id, {} FROM {from}", columns.join(", "))
                }
            };
            if let Some(f) = filter {
                sql.push_str(&format!(" WHERE {f}"));
            }
            if let Some((key, having)) = group {
                sql.push_str(&format!(" GROUP BY {key}"));
                if let Some(h) = having {
                    sql.push_str(&format!(" HAVING {h}"));
                }
            }
            mutate(&sql, &mutations)
        })
}

#[test]
fn topology_files_never_panic() {
    let seeds = seeds();
    let n = seeds.len();
    let strategy = (0..n, proptest::collection::vec(mutation(), 1..6));
    fuzz("topology files", strategy, |(seed, mutations)| {
        let text = mutate(&seeds[seed], &mutations);
        let Ok(t) = Topology::parse("fuzz.toml", &text) else {
            return false;
        };
        let _ = t.explain();
        for table in &t.tables {
            let _ = table.definition();
        }
        true
    });
}

#[test]
fn planned_queries_never_panic_planning_or_evaluating() {
    fuzz("SQL planner", (query(), rows()), |(sql, sources)| {
        let text = format!(
            "{SOURCES}\n[tables.t]\nquery = '''{}'''\n",
            sql.replace("'''", "' ''")
        );
        let Ok(t) = Topology::parse("fuzz.toml", &text) else {
            return false;
        };
        let _ = evaluate(&t.tables[0].plan, &sources);
        true
    });
}

/// A JSON-ish event: objects and arrays nested, strings with escapes (NUL, lone surrogates),
/// numbers beyond every range, fields of the source and others, duplicated.
fn event() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        prop::sample::select(vec![
            "null",
            "true",
            "false",
            "0",
            "-0",
            "1e400",
            "-1e400",
            "18446744073709551616",
            "9223372036854775807",
            "-9223372036854775809",
            "1.5",
            "\"\"",
            "\"a\\u0000b\"",
            "\"\\ud800\"",
            "\"\\udc00\\ud800\"",
            "\"\\ud83d\\ude00\"",
            "\"2026-11-25T10:00:00Z\"",
            "\"-262144-01-01T00:00:00Z\"",
            "\"+262143-12-31T23:59:59Z\"",
            "\"x\\\"y\"",
            "\"\\q\"",
        ])
        .prop_map(str::to_string),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        "\"[a-z|\\\\]{0,4}\"",
    ];
    let value = scalar.prop_recursive(6, 64, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec(
                (
                    prop::sample::select(vec!["id", "g", "n", "x", "b", "t", "other"]),
                    inner
                ),
                0..5
            )
            .prop_map(|fields| {
                let fields: Vec<String> =
                    fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    });
    let deep = (1..3000usize)
        .prop_map(|depth| format!("{{\"id\":{}1{}}}", "[".repeat(depth), "]".repeat(depth)));
    let field = prop::sample::select(vec!["g", "n", "x", "b", "t", "other", "id"]);
    let fields = proptest::collection::vec((field, value.clone()), 0..6);
    let event = ("[a-c]{0,2}", any::<i64>(), fields).prop_map(|(id, n, fields)| {
        let fields: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!(",\"{k}\":{v}"))
            .collect();
        format!("{{\"id\":\"{id}\",\"n\":{n}{}}}", fields.concat())
    });
    prop_oneof![8 => event, 2 => value, 1 => deep]
}

#[test]
fn events_never_panic_the_decoder() {
    let t = Topology::parse(
        "fuzz.toml",
        &format!("{SOURCES}\n[tables.t]\nquery = \"SELECT id FROM a\"\n"),
    )
    .unwrap();
    let source = &t.sources[0];
    let bytes = proptest::collection::vec(any::<u8>(), 0..64);
    let strategy = prop_oneof![
        4 => (event(), proptest::collection::vec(mutation(), 0..2)).prop_map(|(e, m)| mutate(&e, &m).into_bytes()),
        1 => bytes,
    ];
    fuzz("event decoder", strategy, |payload| {
        decode(source, &payload).is_ok()
    });
}
