//! Renders plans as differential dataflows.
//!
//! ```text
//!  source inputs (one InputSession per source, fed by the tasks of this worker)
//!        │  Row, diff ±1 (upserts: retract old, insert new)
//!        ▼
//!  Filter / Map (per record) ── Join (exchange + arrange by join key)
//!                            ── Reduce (exchange + arrange by group key)
//!        │
//!        ▼
//!  exchange by table key ──► captured per epoch ──► RocksDB table store (epoch commit)
//! ```
//!
//! The final exchange by table key makes every key of a table land on one worker, so one
//! worker owns each stored row and the deltas of an epoch never race between workers.

use differential_dataflow::VecCollection;

use crate::plan::{AggFunc, Aggregate, Expr, JoinKind, Plan};
use crate::value::{Row, Value, F64};

/// Timestamps are epochs.
pub type Epoch = u64;

/// A collection of rows at epoch timestamps.
pub type Rows<'scope> = VecCollection<'scope, Epoch, Row, isize>;

/// Renders `plan` over the source collections `sources` (by source index); `name` names the
/// operators (`Reduce: user_count`).
pub fn render<'scope>(plan: &Plan, sources: &[Rows<'scope>], name: &str) -> Rows<'scope> {
    match plan {
        Plan::Source { source, .. } => sources[*source].clone(),
        Plan::Filter {
            input, predicate, ..
        } => {
            let predicate = predicate.clone();
            render(input, sources, name).filter(move |r| predicate.holds(r))
        }
        Plan::Map { input, exprs, .. } => {
            let exprs = exprs.clone();
            render(input, sources, name).map(move |r| exprs.iter().map(|e| e.eval(&r)).collect())
        }
        Plan::Join {
            left,
            right,
            left_keys,
            right_keys,
            kind,
            right_arity,
            ..
        } => {
            let left = keyed(render(left, sources, name), left_keys.clone());
            let right = keyed(render(right, sources, name), right_keys.clone());
            // SQL equality never matches NULL: rows with a NULL join key only appear unmatched.
            let left_matchable = left.clone().filter(|(k, _)| k.iter().all(|v| !v.is_null()));
            let right_matchable = right.filter(|(k, _)| k.iter().all(|v| !v.is_null()));
            let joined =
                left_matchable
                    .clone()
                    .join(right_matchable.clone())
                    .map(|(_, (mut l, r))| {
                        l.extend(r);
                        l
                    });
            match kind {
                JoinKind::Inner => joined,
                JoinKind::Left => {
                    let arity = *right_arity;
                    let right_keys = right_matchable.map(|(k, _)| k).distinct();
                    let unmatched = left.antijoin(right_keys).map(move |(_, mut l)| {
                        l.extend(std::iter::repeat_n(Value::Null, arity));
                        l
                    });
                    joined.concat(unmatched)
                }
            }
        }
        Plan::Reduce {
            input,
            group,
            aggregates,
            ..
        } => {
            let group = group.clone();
            let aggregates = aggregates.clone();
            render(input, sources, name)
                .map(move |r| (group.iter().map(|e| e.eval(&r)).collect::<Row>(), r))
                .reduce_named(&format!("Reduce: {name}"), move |_key, rows, out| {
                    out.push((aggregate(&aggregates, rows), 1isize));
                })
                .map(|(mut key, aggs)| {
                    key.extend(aggs);
                    key
                })
        }
    }
}

fn keyed<'scope>(
    rows: Rows<'scope>,
    keys: Vec<Expr>,
) -> VecCollection<'scope, Epoch, (Row, Row), isize> {
    rows.map(move |r| (keys.iter().map(|e| e.eval(&r)).collect::<Row>(), r))
}

/// Computes the aggregates of one group from its rows with their multiplicities.
pub fn aggregate(aggregates: &[Aggregate], rows: &[(&Row, isize)]) -> Row {
    aggregates
        .iter()
        .map(|a| {
            let mut count = 0i64;
            let mut int_sum: Option<i64> = Some(0);
            let mut float_sum = 0f64;
            let mut all_int = true;
            let mut min: Option<Value> = None;
            let mut max: Option<Value> = None;
            for (row, mult) in rows {
                let m = *mult as i64;
                if a.func == AggFunc::CountStar {
                    count += m;
                    continue;
                }
                let v = a.arg.eval(row);
                if v.is_null() {
                    continue;
                }
                count += m;
                match &v {
                    Value::Int(i) => {
                        int_sum =
                            int_sum.and_then(|s| i.checked_mul(m).and_then(|x| s.checked_add(x)));
                        float_sum += *i as f64 * m as f64;
                    }
                    Value::Float(f) => {
                        all_int = false;
                        float_sum += f.0 * m as f64;
                    }
                    _ => {}
                }
                if min.as_ref().is_none_or(|x| v < *x) {
                    min = Some(v.clone());
                }
                if max.as_ref().is_none_or(|x| v > *x) {
                    max = Some(v);
                }
            }
            match a.func {
                AggFunc::CountStar | AggFunc::Count => Value::Int(count),
                AggFunc::Min => min.unwrap_or(Value::Null),
                AggFunc::Max => max.unwrap_or(Value::Null),
                AggFunc::Sum if count == 0 => Value::Null,
                AggFunc::Sum if all_int => int_sum.map(Value::Int).unwrap_or(Value::Null),
                AggFunc::Sum => Value::Float(F64(float_sum)),
                AggFunc::Avg if count == 0 => Value::Null,
                AggFunc::Avg => Value::Float(F64(float_sum / count as f64)),
            }
        })
        .collect()
}
