//! Repartitioning: a table whose rows need the rows of several partitions (a GROUP BY or join
//! on a column that is not the source's key) is split into stages joined by internal topics,
//! so that every instance computes it right over the partitions it owns.
//!
//! ```text
//!   users (by id) ──► Repartition by department_id ──► topic ─► users' (by department_id)
//!                                                                  │ co-partitioned
//!   departments (by id) ─────────────────────────────────────────► Join ──► ...
//! ```
//!
//! A [`Repartition`] computes its input where the input's partitions are, and writes each row
//! to its topic keyed by the input's key and placed in the partition of its `by` column's
//! value (a changed row whose `by` moved is deleted from the old partition). The topic is one
//! more source of the topology, read as upserts by the instances that own its partitions, with
//! its own tasks, changelog and standbys. Rows go in the epoch's changelog transaction, so a
//! crash neither loses nor doubles them: the records of an epoch whose state is not committed
//! are aborted, and applying the same upsert twice changes nothing. A partition's rows are
//! written only by its owner: when a partition moves, its rows leave the old owner's dataflow
//! without being deleted from the topic, and the new owner derives the same rows again from
//! the same state (they change nothing downstream).
//!
//! That last point holds when the input depends on its partitions' state alone: an input that
//! reads a global source could be derived differently by the next owner (the global source
//! moved on meanwhile), leaving rows nobody deletes. Such tables, and groupings or joins on an
//! expression rather than a column, are not split: they stay [`Distribution::Partial`].

use super::{Distribution, Expr, Plan, SourceShape};
use crate::partition::murmur2;
use crate::topology::Source;
use crate::value::Column;

/// One stage boundary: `input`'s rows written to a topic and read back as source `source`.
#[derive(Clone, Debug, PartialEq)]
pub struct Repartition {
    /// Its name, `<table>.r<n>`, also the name of the source that reads it back.
    pub name: String,
    /// What it writes, computed where its sources' partitions are.
    pub input: Plan,
    /// The columns of the input's rows.
    pub columns: Vec<Column>,
    /// The input's key column: one record per key.
    pub key: usize,
    /// The column of the input whose value places a row.
    pub by: usize,
    /// Where the input's rows are (the partition each row comes from).
    pub from: (usize, usize),
    /// The source (by position) reading the topic back.
    pub source: usize,
    /// The source whose topic's partition count the topic gets (the other side of the join
    /// it feeds, or the input's own source).
    pub partitions_like: usize,
}

/// Splits one table's plan at the exchanges that need rows of several partitions.
pub(crate) struct Splitter<'a> {
    /// The topology's name and the table's, for topic and stage names.
    names: (&'a str, &'a str),
    /// The topology's sources so far.
    sources: &'a [Source],
    /// The repartitions made, each with the source reading it back (at positions
    /// `sources.len()` and on).
    pub(crate) made: Vec<(Repartition, Source)>,
}

impl<'a> Splitter<'a> {
    /// A splitter for table `table` of topology `topology`, whose sources are `sources`.
    pub(crate) fn new((topology, table): (&'a str, &'a str), sources: &'a [Source]) -> Self {
        Splitter {
            names: (topology, table),
            sources,
            made: Vec::new(),
        }
    }

    /// The source at position `s`, repartition sources made so far included.
    fn source(&self, s: usize) -> &Source {
        match s.checked_sub(self.sources.len()) {
            Some(i) => &self.made[i].1,
            None => &self.sources[s],
        }
    }

    fn shape(&self, s: usize) -> SourceShape {
        self.source(s).shape()
    }

    /// `plan` with repartitions where it needs them, and where its rows then are.
    pub(crate) fn split(&mut self, plan: &Plan) -> (Plan, Distribution) {
        match plan {
            Plan::Source { .. } => (plan.clone(), self.distribution(plan)),
            Plan::Filter {
                input,
                predicate,
                sql,
            } => {
                let (input, d) = self.split(input);
                let plan = Plan::Filter {
                    input: Box::new(input),
                    predicate: predicate.clone(),
                    sql: sql.clone(),
                };
                (plan, d)
            }
            Plan::Map { input, exprs, sql } => {
                let (input, _) = self.split(input);
                let plan = Plan::Map {
                    input: Box::new(input),
                    exprs: exprs.clone(),
                    sql: sql.clone(),
                };
                let d = self.distribution(&plan);
                (plan, d)
            }
            Plan::Reduce {
                input,
                group,
                aggregates,
                sql,
            } => {
                let (mut input, d) = self.split(input);
                let aligned = match d {
                    Distribution::Everywhere => true,
                    Distribution::Partitioned { column, .. } => {
                        group.contains(&Expr::Column(column))
                    }
                    Distribution::Partial => false,
                };
                if !aligned {
                    let by = group.iter().find_map(|g| match g {
                        Expr::Column(c) => Some(*c),
                        _ => None,
                    });
                    if let (Some(by), Distribution::Partitioned { source, .. }) = (by, d) {
                        input = self.repartition(input, by, source).unwrap_or_else(|i| i);
                    }
                }
                let plan = Plan::Reduce {
                    input: Box::new(input),
                    group: group.clone(),
                    aggregates: aggregates.clone(),
                    sql: sql.clone(),
                };
                let d = self.distribution(&plan);
                (plan, d)
            }
            Plan::Join {
                left,
                right,
                left_keys,
                right_keys,
                kind,
                right_arity,
                sql,
            } => {
                let (mut left, dl) = self.split(left);
                let (mut right, dr) = self.split(right);
                let join = |left: Plan, right: Plan| Plan::Join {
                    left: Box::new(left),
                    right: Box::new(right),
                    left_keys: left_keys.clone(),
                    right_keys: right_keys.clone(),
                    kind: *kind,
                    right_arity: *right_arity,
                    sql: sql.clone(),
                };
                let d = self.distribution(&join(left.clone(), right.clone()));
                if d != Distribution::Partial {
                    return (join(left, right), d);
                }
                let on = left_keys.iter().zip(right_keys).find_map(|pair| match pair {
                    (Expr::Column(l), Expr::Column(r)) => Some((*l, *r)),
                    _ => None,
                });
                if let (
                    Some((l, r)),
                    Distribution::Partitioned { source: ls, column: lc },
                    Distribution::Partitioned { source: rs, column: rc },
                ) = (on, dl, dr)
                {
                    if rc != r {
                        let like = if lc == l { ls } else { rs };
                        right = self.repartition(right, r, like).unwrap_or_else(|p| p);
                    }
                    if lc != l {
                        left = self.repartition(left, l, rs).unwrap_or_else(|p| p);
                    }
                }
                let plan = join(left, right);
                let d = self.distribution(&plan);
                (plan, d)
            }
        }
    }

    /// `plan` (a table's, split) placed by its output column `key`: when its rows come one
    /// from each partition but are placed by another column, the input of its SELECT list is
    /// repartitioned by the column that becomes `key`. Where its rows then are.
    pub(crate) fn place_by(&mut self, plan: Plan, key: usize) -> (Plan, Distribution) {
        let d = self.distribution(&plan);
        if matches!(d, Distribution::Partitioned { column, .. } if column == key) {
            return (plan, d);
        }
        let Plan::Map { input, exprs, sql } = plan else {
            return (plan, d);
        };
        let (Some(Expr::Column(by)), Distribution::Partitioned { source, .. }) =
            (exprs.get(key), self.distribution(&input))
        else {
            let plan = Plan::Map { input, exprs, sql };
            return (plan, d);
        };
        let input = self.repartition(*input, *by, source).unwrap_or_else(|i| i);
        let plan = Plan::Map {
            input: Box::new(input),
            exprs,
            sql,
        };
        let d = self.distribution(&plan);
        (plan, d)
    }

    /// `input` repartitioned by its column `by` into a topic with as many partitions as
    /// source `like`'s; `Err(input)` when it cannot be (see the module's documentation).
    fn repartition(&mut self, input: Plan, by: usize, like: usize) -> Result<Plan, Plan> {
        let columns = input.columns(&|s| self.source(s).columns.clone());
        let key = input.key(&|s| self.shape(s));
        let (Some(columns), Some(key)) = (columns, key) else {
            return Err(input);
        };
        self.make(input, (columns, key), by, like)
    }

    fn make(
        &mut self,
        input: Plan,
        (columns, key): (Vec<Column>, Vec<usize>),
        by: usize,
        like: usize,
    ) -> Result<Plan, Plan> {
        let mut read = Vec::new();
        input.sources(&mut read);
        let Distribution::Partitioned {
            source: from,
            column: from_column,
        } = self.distribution(&input)
        else {
            return Err(input);
        };
        if read.iter().any(|s| self.source(*s).global) {
            return Err(input);
        }
        // The topic's rows are upserts by the input's key: one column, never NULL.
        let [row_key] = key.as_slice() else {
            return Err(input);
        };
        if !input.never_null(*row_key, &|s| self.shape(s)) {
            return Err(input);
        }
        let (topology, table) = self.names;
        let name = format!("{table}.r{}", self.made.len());
        let hash = murmur2(format!("{input:?} KEY {key:?} BY {by}").as_bytes()) as u32;
        let source = self.sources.len() + self.made.len();
        let reader = Source {
            name: name.clone(),
            topic: format!("{topology}.{table}.r{}.{hash:08x}{TOPIC_SUFFIX}", self.made.len()),
            columns: columns
                .iter()
                .enumerate()
                .map(|(i, c)| Column {
                    name: format!("c{i}"),
                    ty: c.ty,
                })
                .collect(),
            key: *row_key,
            partition_column: by,
            late: None,
            tombstone_retention: Source::DEFAULT_TOMBSTONE_RETENTION,
            global: false,
        };
        let repartition = Repartition {
            name: name.clone(),
            input,
            columns,
            key: *row_key,
            by,
            from: (from, from_column),
            source,
            partitions_like: like,
        };
        self.made.push((repartition, reader));
        Ok(Plan::Source { source, name })
    }

    /// Where `plan`'s rows are, the repartition sources made so far included.
    fn distribution(&self, plan: &Plan) -> Distribution {
        plan.distribution(&|s| self.shape(s))
    }
}

/// The suffix of repartition topics' names.
pub const TOPIC_SUFFIX: &str = ".miroir-repartition";

#[cfg(test)]
mod tests {
    use crate::plan::Distribution;
    use crate::topology::Topology;

    #[test]
    fn user_directory_is_split() {
        let text = include_str!("../../../topologies/user-directory.toml");
        let t = Topology::parse("user-directory.toml", text).unwrap();
        for table in &t.tables {
            eprintln!("{} {:?} {:?}", table.name, table.split.is_some(), t.distribution(table));
        }
        eprintln!("{}", t.explain());
        assert!(t.tables.iter().all(|table| t.distribution(table) != Distribution::Partial));
    }
}
