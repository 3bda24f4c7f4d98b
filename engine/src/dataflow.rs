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
//! [`Renderer`] shares rendered subtrees and arrangements between the tables of a topology.

use std::collections::HashMap;

use differential_dataflow::consolidation::consolidate;
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::trace::{Cursor, Navigable};
use differential_dataflow::AsCollection;
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;

use crate::plan::{AggFunc, Aggregate, Expr, JoinKind, Plan};
use crate::value::{Row, Value, F64};

/// Timestamps are epochs.
pub type Epoch = u64;

/// A collection of rows at epoch timestamps.
pub type Rows<'scope> = VecCollection<'scope, Epoch, Row, isize>;

/// Rows arranged by join key (rows whose key has a NULL are left out: they never match).
pub type RowArrangement<'scope> = Arranged<'scope, TraceAgent<ValSpine<Row, Row, Epoch, isize>>>;

/// Renders plans into one dataflow, sharing work between tables: each plan subtree is rendered
/// once, and each arrangement (a subtree arranged by some join key) is built once, however
/// many joins use it. Arrangements hold every row of their input, so sharing them saves both
/// memory and the work of maintaining them.
pub struct Renderer<'scope> {
    sources: Vec<Rows<'scope>>,
    rendered: HashMap<String, Rows<'scope>>,
    arranged: HashMap<String, RowArrangement<'scope>>,
}

impl<'scope> Renderer<'scope> {
    /// A renderer over the source collections (by source index).
    pub fn new(sources: Vec<Rows<'scope>>) -> Self {
        Renderer {
            sources,
            rendered: HashMap::new(),
            arranged: HashMap::new(),
        }
    }

    /// Renders `plan`; `name` names its operators (`Reduce: user_count`).
    pub fn render(&mut self, plan: &Plan, name: &str) -> Rows<'scope> {
        let id = format!("{plan:?}");
        if let Some(rows) = self.rendered.get(&id) {
            return rows.clone();
        }
        let rows = self.render_new(plan, name);
        self.rendered.insert(id, rows.clone());
        rows
    }

    fn render_new(&mut self, plan: &Plan, name: &str) -> Rows<'scope> {
        match plan {
            Plan::Source { source, .. } => self.sources[*source].clone(),
            Plan::Filter {
                input, predicate, ..
            } => {
                let predicate = predicate.clone();
                self.render(input, name).filter(move |r| predicate.holds(r))
            }
            Plan::Map { input, exprs, .. } => {
                let exprs = exprs.clone();
                self.render(input, name)
                    .map(move |r| exprs.iter().map(|e| e.eval(&r)).collect())
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
                let left_arranged = self.arrange(left, left_keys, name);
                let right_arranged = self.arrange(right, right_keys, name);
                let joined =
                    left_arranged
                        .clone()
                        .join_core(right_arranged.clone(), |_key, l, r| {
                            let mut row = Vec::with_capacity(l.len() + r.len());
                            row.extend(l.iter().cloned());
                            row.extend(r.iter().cloned());
                            Some(row)
                        });
                match kind {
                    JoinKind::Inner => joined,
                    JoinKind::Left => {
                        // Unmatched left rows: those whose key no right row has, found through
                        // the (small, rarely changing) set of such keys, so a change of a left
                        // row whose key matches costs nothing here. Rows with a NULL key are
                        // not in the arrangement and never match.
                        let nulls = vec![Value::Null; *right_arity];
                        let unmatched_keys = key_counts(left_arranged.clone())
                            .distinct()
                            .concat(key_counts(right_arranged).distinct().negate())
                            .threshold_named(&format!("Unmatched keys: {name}"), |_, c| {
                                isize::from(*c > 0)
                            })
                            .map(|k| (k, ()))
                            .arrange_by_key_named(&format!("Arrange: {name} unmatched keys"));
                        let padding = nulls.clone();
                        let unmatched =
                            left_arranged.join_core(unmatched_keys, move |_key, l, _| {
                                let mut row = Vec::with_capacity(l.len() + padding.len());
                                row.extend(l.iter().cloned());
                                row.extend(padding.iter().cloned());
                                Some(row)
                            });
                        let keys = left_keys.clone();
                        let null_keyed = self
                            .render(left, name)
                            .filter(move |r| keys.iter().any(|e| e.eval(r).is_null()))
                            .map(move |mut l| {
                                l.extend(nulls.iter().cloned());
                                l
                            });
                        joined.concat(unmatched).concat(null_keyed)
                    }
                }
            }
            Plan::Reduce {
                input,
                group,
                aggregates,
                ..
            } => {
                // The reduce arranges its input by group: each row goes in as its aggregates'
                // arguments only, so rows alike in those (the members of a group that count
                // alike) are one entry with a multiplicity, not a row each.
                let group = group.clone();
                let (arguments, aggregates) = arguments_of(aggregates);
                self.render(input, name)
                    .map(move |r| {
                        let key: Row = group.iter().map(|e| e.eval(&r)).collect();
                        (key, arguments.iter().map(|e| e.eval(&r)).collect::<Row>())
                    })
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

    /// `plan` arranged by `keys`, built once per (plan, keys).
    fn arrange(&mut self, plan: &Plan, keys: &[Expr], name: &str) -> RowArrangement<'scope> {
        let id = format!("{plan:?} BY {keys:?}");
        if let Some(arranged) = self.arranged.get(&id) {
            return arranged.clone();
        }
        let keys = keys.to_vec();
        let arranged = self
            .render(plan, name)
            .flat_map(move |r| {
                let key: Row = keys.iter().map(|e| e.eval(&r)).collect();
                // SQL equality never matches NULL.
                (!key.iter().any(Value::is_null)).then_some((key, r))
            })
            .arrange_by_key_named(&format!("Arrange: {name}"));
        self.arranged.insert(id, arranged.clone());
        arranged
    }
}

/// The expressions a reduce evaluates on each input row (one per aggregate, a NULL for
/// `count(*)`, which reads none), and the aggregates over the rows of those values.
fn arguments_of(aggregates: &[Aggregate]) -> (Vec<Expr>, Vec<Aggregate>) {
    aggregates
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let argument = match a.func {
                AggFunc::CountStar => Expr::Literal(Value::Null),
                _ => a.arg.clone(),
            };
            let over_argument = Aggregate {
                func: a.func,
                arg: Expr::Column(i),
            };
            (argument, over_argument)
        })
        .unzip()
}

/// How many rows each key of `arranged` gained or lost, one update per key and time of each
/// batch: the updates of the rows of a key cancel out here, before anything is allocated for
/// them, unless rows of that key appear or disappear overall.
fn key_counts<'scope>(arranged: RowArrangement<'scope>) -> Rows<'scope> {
    arranged
        .stream
        .unary(Pipeline, "KeyCounts", |_, _| {
            move |input, output| {
                let mut sums: Vec<(Epoch, isize)> = Vec::new();
                input.for_each(|time, spans| {
                    let mut session = output.session(&time);
                    for batch in spans.iter().filter_map(|span| span.inner.as_ref()) {
                        let mut cursor = batch.cursor();
                        while let Some(key) = cursor.get_key(batch) {
                            sums.clear();
                            while cursor.get_val(batch).is_some() {
                                cursor.map_times(batch, |t, d| sums.push((*t, *d)));
                                cursor.step_val(batch);
                            }
                            consolidate(&mut sums);
                            for (t, d) in sums.drain(..) {
                                session.give((key.clone(), t, d));
                            }
                            cursor.step_key(batch);
                        }
                    }
                });
            }
        })
        .as_collection()
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
