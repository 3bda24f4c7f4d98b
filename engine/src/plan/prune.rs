//! Projection pruning: the sources a table reads cut to the columns read above them.
//!
//! A join arranges each input's rows by join key, whole rows as values, and a repartition
//! writes its input's rows to a topic that is read back and kept per key (see
//! [`super::repartition`]). `SELECT u.name, d.name FROM users u JOIN departments d ON ...`
//! reads 3 of a user's 8 columns: the other 5 would be arranged, written, read back and kept
//! for nothing. Pruning puts a projection on each source a plan reads, keeping the columns
//! read above it (by a SELECT list, a predicate, a join's keys, a GROUP BY's values and
//! aggregates) and the source's key and partitioning columns, from which a plan's key and
//! distribution follow: the pruned plan has the same output, the same key and the same
//! distribution, and splits into the same stages, narrower.
//!
//! A source is cut alike in every table, to the columns any of them reads: two tables whose
//! stages repartition the same source the same way then still share one stage.
//!
//! The reference evaluator runs the plans as written, so the tests that compare the two check
//! the pruning too.

use std::collections::HashMap;

use super::{Expr, Plan, SourceShape};

/// `plans` with the sources they read cut to the columns some plan reads (see the module's
/// documentation); their outputs are the same.
pub(crate) fn pruned<'a>(
    plans: impl Iterator<Item = &'a Plan> + Clone,
    sources: &impl Fn(usize) -> SourceShape,
) -> Vec<Plan> {
    let mut reads = HashMap::new();
    // Once to learn what each source is read for, once to cut it to that.
    for plan in plans.clone() {
        whole(plan, sources, &mut reads);
    }
    plans.map(|p| whole(p, sources, &mut reads)).collect()
}

/// Which columns of each source (by index) are read, so far.
type Reads = HashMap<usize, Vec<bool>>;

/// `plan` pruned, its every output column kept.
fn whole(plan: &Plan, sources: &impl Fn(usize) -> SourceShape, reads: &mut Reads) -> Plan {
    let all = vec![true; plan.arity(sources)];
    Pruning { sources, reads }.prune(plan.clone(), all).0
}

/// Where each column of a plan went once pruned: its new position, `None` when dropped.
type Kept = Vec<Option<usize>>;

/// The sources' shapes, and what is read of each.
struct Pruning<'a, S> {
    sources: &'a S,
    reads: &'a mut Reads,
}

impl<S: Fn(usize) -> SourceShape> Pruning<'_, S> {
    /// `plan` keeping at least its columns `needed` says; and where each of them went.
    fn prune(&mut self, plan: Plan, mut needed: Vec<bool>) -> (Plan, Kept) {
        match plan {
            Plan::Source { source, name } => {
                let shape = (self.sources)(source);
                for c in shape.key.iter().chain([&shape.partition]) {
                    needed[*c] = true;
                }
                let read = self
                    .reads
                    .entry(source)
                    .or_insert_with(|| vec![false; needed.len()]);
                for (r, n) in read.iter_mut().zip(&mut needed) {
                    *r |= *n;
                    *n = *r;
                }
                project(Plan::Source { source, name }, &needed)
            }
            Plan::Filter {
                input,
                mut predicate,
                sql,
            } => {
                read(&mut needed, &mut predicate);
                let (input, kept) = self.prune(*input, needed);
                renumber(&mut predicate, &kept);
                let plan = Plan::Filter {
                    input: Box::new(input),
                    predicate,
                    sql,
                };
                (plan, kept)
            }
            Plan::Map {
                input,
                mut exprs,
                sql,
            } => {
                let input = self.beneath(*input, exprs.iter_mut().collect());
                let arity = exprs.len();
                let plan = Plan::Map {
                    input: Box::new(input),
                    exprs,
                    sql,
                };
                (plan, (0..arity).map(Some).collect())
            }
            Plan::Join {
                left,
                right,
                mut left_keys,
                mut right_keys,
                kind,
                right_arity: _,
                sql,
            } => {
                let left_arity = left.arity(self.sources);
                let mut read_right = needed.split_off(left_arity);
                left_keys.iter_mut().for_each(|e| read(&mut needed, e));
                right_keys.iter_mut().for_each(|e| read(&mut read_right, e));
                let (left, kept_left) = self.prune(*left, needed);
                let (right, kept_right) = self.prune(*right, read_right);
                left_keys.iter_mut().for_each(|e| renumber(e, &kept_left));
                right_keys.iter_mut().for_each(|e| renumber(e, &kept_right));
                let (left_arity, right_arity) =
                    (left.arity(self.sources), right.arity(self.sources));
                let kept = kept_left
                    .into_iter()
                    .chain(kept_right.into_iter().map(|k| k.map(|c| left_arity + c)))
                    .collect();
                let plan = Plan::Join {
                    left: Box::new(left),
                    right: Box::new(right),
                    left_keys,
                    right_keys,
                    kind,
                    right_arity,
                    sql,
                };
                (plan, kept)
            }
            Plan::Reduce {
                input,
                mut group,
                mut aggregates,
                sql,
            } => {
                let arity = group.len() + aggregates.len();
                // What a GROUP BY evaluates on its input rows: its group values and its
                // aggregates' arguments.
                let evaluated = group
                    .iter_mut()
                    .chain(aggregates.iter_mut().map(|a| &mut a.arg));
                let input = self.beneath(*input, evaluated.collect());
                let plan = Plan::Reduce {
                    input: Box::new(input),
                    group,
                    aggregates,
                    sql,
                };
                (plan, (0..arity).map(Some).collect())
            }
        }
    }

    /// `input` cut to the columns `exprs` read, which are renumbered to it: the input of an
    /// operator whose output is its own expressions (a map, a GROUP BY).
    fn beneath(&mut self, input: Plan, mut exprs: Vec<&mut Expr>) -> Plan {
        let mut read_below = vec![false; input.arity(self.sources)];
        exprs.iter_mut().for_each(|e| read(&mut read_below, e));
        let (input, kept) = self.prune(input, read_below);
        exprs.iter_mut().for_each(|e| renumber(e, &kept));
        input
    }
}

/// `plan` (a source) projected on its columns `needed` says, unless that is all of them.
fn project(plan: Plan, needed: &[bool]) -> (Plan, Kept) {
    let columns: Vec<usize> = (0..needed.len()).filter(|c| needed[*c]).collect();
    let mut kept = vec![None; needed.len()];
    for (to, from) in columns.iter().enumerate() {
        kept[*from] = Some(to);
    }
    if columns.len() == needed.len() {
        return (plan, kept);
    }
    let sql = format!(
        "the {} of {} columns read above",
        columns.len(),
        needed.len()
    );
    let plan = Plan::Map {
        input: Box::new(plan),
        exprs: columns.into_iter().map(Expr::Column).collect(),
        sql,
    };
    (plan, kept)
}

/// Marks the columns `expr` reads in `needed`.
fn read(needed: &mut [bool], expr: &mut Expr) {
    for c in expr.columns_mut() {
        needed[*c] = true;
    }
}

/// Renumbers the columns `expr` reads by where they went (`kept`, which holds every one).
fn renumber(expr: &mut Expr, kept: &Kept) {
    for c in expr.columns_mut() {
        *c = kept[*c].expect("a column read above is kept");
    }
}

#[cfg(test)]
mod tests {
    use super::pruned;
    use crate::plan::Plan;
    use crate::reference::evaluate;
    use crate::topology::Topology;
    use crate::value::{ColumnType, Row, Value, F64};

    const TOPOLOGIES: [(&str, &str); 2] = [
        (
            "user-directory.toml",
            include_str!("../../../topologies/user-directory.toml"),
        ),
        (
            "user-referential.toml",
            include_str!("../../../topologies/user-referential.toml"),
        ),
    ];

    #[test]
    fn a_stage_carries_the_columns_some_table_reads_and_is_shared() {
        let (name, text) = TOPOLOGIES[0];
        let t = Topology::parse(name, text).unwrap();
        let r0 = &t.repartitions[0];
        // Of the users' id, email, name, department_id, active, version, event_type and
        // updated_at, the three tables read the first six.
        let Plan::Map { input, exprs, .. } = &r0.input else {
            panic!("{}", t.explain())
        };
        assert!(matches!(**input, Plan::Source { source: 0, .. }));
        assert_eq!(exprs.len(), 6, "{}", t.explain());
        let mut readers = Vec::new();
        for r in &t.repartitions[1..] {
            r.input.sources(&mut readers);
        }
        assert!(
            readers.iter().filter(|s| **s == r0.source).count() == 2,
            "both joins read the one stage:\n{}",
            t.explain()
        );
    }

    #[test]
    fn pruned_plans_compute_the_rows_of_the_plans_as_written() {
        for (name, text) in TOPOLOGIES {
            let t = Topology::parse(name, text).unwrap();
            let rows: Vec<Vec<Row>> = t
                .sources
                .iter()
                .enumerate()
                .map(|(s, source)| {
                    let types: Vec<ColumnType> = source.columns.iter().map(|c| c.ty).collect();
                    (0..24).map(|i| row(&types, s * 31 + i)).collect()
                })
                .collect();
            let plans = t.tables.iter().map(|t| &t.plan);
            let pruned = pruned(plans, &|s| t.sources[s].shape());
            let mut joined = 0;
            for (table, pruned) in t.tables.iter().zip(pruned) {
                let (mut want, mut got) = (evaluate(&table.plan, &rows), evaluate(&pruned, &rows));
                want.sort();
                got.sort();
                assert_eq!(got, want, "{name}: table {}", table.name);
                joined += want.len();
            }
            assert!(joined > 0, "{name}: the rows meet");
        }
    }

    /// Row `i` of a source of columns `types`: values from small domains, so that joins
    /// match and groups gather; a NULL now and then.
    fn row(types: &[ColumnType], i: usize) -> Row {
        types
            .iter()
            .enumerate()
            .map(|(c, ty)| {
                let v = (i * 7 + c * 13) % 5;
                match (c, ty) {
                    // The key: distinct per row.
                    (0, ColumnType::Text) => Value::Text(format!("k{i}").into()),
                    (0, _) => Value::Int(i as i64),
                    (_, _) if v == 4 => Value::Null,
                    (_, ColumnType::Text) => Value::Text(format!("k{v}").into()),
                    (_, ColumnType::Bigint) => Value::Int(v as i64),
                    (_, ColumnType::Double) => Value::Float(F64(v as f64)),
                    (_, ColumnType::Boolean) => Value::Bool(v.is_multiple_of(2)),
                    (_, ColumnType::Timestamptz) => Value::Timestamp(v as i64),
                }
            })
            .collect()
    }
}
