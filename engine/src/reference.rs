//! The reference evaluator: a plain, non-incremental evaluation of a plan.
//!
//! It recomputes a table from the final contents of its sources with nested loops and sorted
//! groups, sharing no code with the dataflow beyond scalar expressions. Tests compare the
//! engine's tables with it row by row; it is deliberately simple rather than fast.

use std::collections::BTreeMap;

use crate::plan::{AggFunc, JoinKind, Plan, TablePlan};
use crate::value::{key_text, Row, Value, F64};

/// Evaluates `table` over `sources` (the current rows of each source, by source index) and
/// returns its rows by key text. Panics if two rows share a key: a planner bug.
pub fn evaluate_table(table: &TablePlan, sources: &[Vec<Row>]) -> BTreeMap<String, Row> {
    let mut out = BTreeMap::new();
    for row in evaluate(&table.plan, sources) {
        let key = key_text(&row, &table.key);
        if let Some(previous) = out.insert(key.clone(), row.clone()) {
            panic!(
                "table {}: key {key} is not unique: {previous:?} and {row:?}",
                table.name
            );
        }
    }
    out
}

/// Evaluates a plan into a multiset of rows.
pub fn evaluate(plan: &Plan, sources: &[Vec<Row>]) -> Vec<Row> {
    match plan {
        Plan::Source { source, .. } => sources[*source].clone(),
        Plan::Filter {
            input, predicate, ..
        } => evaluate(input, sources)
            .into_iter()
            .filter(|r| predicate.holds(r))
            .collect(),
        Plan::Map { input, exprs, .. } => evaluate(input, sources)
            .into_iter()
            .map(|r| exprs.iter().map(|e| e.eval(&r)).collect())
            .collect(),
        Plan::Join {
            left,
            right,
            left_keys,
            right_keys,
            kind,
            right_arity,
            ..
        } => {
            let rights = evaluate(right, sources);
            let mut out = Vec::new();
            for l in evaluate(left, sources) {
                let lk: Vec<Value> = left_keys.iter().map(|e| e.eval(&l)).collect();
                let mut matched = false;
                for r in &rights {
                    let rk: Vec<Value> = right_keys.iter().map(|e| e.eval(r)).collect();
                    if lk.iter().all(|v| !v.is_null()) && lk == rk {
                        matched = true;
                        out.push(l.iter().chain(r.iter()).cloned().collect());
                    }
                }
                if !matched && *kind == JoinKind::Left {
                    let mut padded = l.clone();
                    padded.extend(std::iter::repeat_n(Value::Null, *right_arity));
                    out.push(padded);
                }
            }
            out
        }
        Plan::Reduce {
            input,
            group,
            aggregates,
            ..
        } => {
            let mut groups: BTreeMap<Vec<Value>, Vec<Row>> = BTreeMap::new();
            for r in evaluate(input, sources) {
                groups
                    .entry(group.iter().map(|e| e.eval(&r)).collect())
                    .or_default()
                    .push(r);
            }
            groups
                .into_iter()
                .map(|(mut key, rows)| {
                    for a in aggregates {
                        let values: Vec<Value> = rows
                            .iter()
                            .map(|r| a.arg.eval(r))
                            .filter(|v| !v.is_null())
                            .collect();
                        key.push(match a.func {
                            AggFunc::CountStar => Value::Int(rows.len() as i64),
                            AggFunc::Count => Value::Int(values.len() as i64),
                            AggFunc::Min => values.iter().min().cloned().unwrap_or(Value::Null),
                            AggFunc::Max => values.iter().max().cloned().unwrap_or(Value::Null),
                            AggFunc::Sum if values.is_empty() => Value::Null,
                            AggFunc::Sum if values.iter().all(|v| matches!(v, Value::Int(_))) => {
                                let total = values.iter().try_fold(0i64, |acc, v| match v {
                                    Value::Int(i) => acc.checked_add(*i),
                                    _ => None,
                                });
                                total.map(Value::Int).unwrap_or(Value::Null)
                            }
                            AggFunc::Sum => Value::Float(F64(values.iter().map(as_f64).sum())),
                            AggFunc::Avg if values.is_empty() => Value::Null,
                            AggFunc::Avg => {
                                Value::Float(F64(
                                    values.iter().map(as_f64).sum::<f64>() / values.len() as f64
                                ))
                            }
                        });
                    }
                    key
                })
                .collect()
        }
    }
}

fn as_f64(v: &Value) -> f64 {
    match v {
        Value::Int(i) => *i as f64,
        Value::Float(f) => f.0,
        _ => 0.0,
    }
}
