//! Repartitioning: a table whose rows need the rows of several partitions (a GROUP BY or join
//! on a column that is not the source's key) is split into stages joined by internal topics,
//! so that every instance computes it right over the partitions it owns.
//!
//! ```text
//!   users (by id) ──► Repartition by department_id ──► topic ──► users (by department_id)
//!                                                                   │ co-partitioned
//!   departments (by id) ──────────────────────────────────────────► Join
//!                                                                   │
//!        Reduce GROUP BY d.name, department_id (partial aggregates) ◄┘
//!                                                                   │
//!        Repartition by d.name ──► topic ──► Reduce GROUP BY d.name (the partials combined)
//! ```
//!
//! A [`Repartition`] computes its input where the input's partitions are, and writes each row
//! to its topic as an upsert keyed by the input's key and placed in the partition of its `by`
//! column's value (a changed row whose `by` moved is deleted from the old partition). The
//! topic is one more source of the topology (its rows in the state directory's binary
//! encoding), read by the instances that own its partitions, with its own tasks, changelog and
//! standbys. A GROUP BY is computed in two phases: partial aggregates per group and
//! partitioning value, where the rows are, then their combination per group (`count` and
//! `sum` add up, `min` and `max` take the least and the greatest; an `avg` is a sum and a
//! count, divided once combined).
//!
//! Records go in the epoch's changelog transaction, so a crash neither loses nor doubles
//! them: the records of an epoch whose state is not committed are aborted, and applying the
//! same upsert twice changes nothing. A key has one writer: its row's partition upstream is
//! told by the key itself (so a row never moves between upstream partitions), and only that
//! partition's owner writes it. When a partition moves, its rows leave the old owner's
//! dataflow without being deleted from the topic, and the new owner derives the same rows
//! again from the same state.
//!
//! That holds when the input depends on its partitions' state alone. An input that reads a
//! global source can be derived differently by the next owner (the global source moved on
//! meanwhile): a key may then go to another partition of the topic, or not be derived at all.
//! Such a stage ([`Repartition::reads_global`]) keeps where it placed each key with the
//! upstream partition's state (see `runtime::placements`), so that the next owner deletes
//! the records its own derivation does not write again.

use super::expr::BinaryOp;
use super::{AggFunc, Aggregate, Distribution, Expr, JoinKind, Plan};
use crate::partition::murmur2;
use crate::topology::{Source, SourceFormat};
use crate::value::{Column, ColumnType};

/// One stage boundary: `input`'s rows written to a topic and read back as source `source`.
#[derive(Clone, Debug, PartialEq)]
pub struct Repartition {
    /// Its name, `<table>.r<n>`, also the name of the source that reads it back.
    pub name: String,
    /// What it writes, computed where its sources' partitions are.
    pub input: Plan,
    /// The input's key columns: one record per key.
    pub key: Vec<usize>,
    /// The column of the input whose value places a row.
    pub by: usize,
    /// Where the input's rows come from: the source and the column of the input whose value
    /// tells the partition (a key column).
    pub from: (usize, usize),
    /// The source (by position) reading the topic back: the input's columns, then
    /// [`KEY_COLUMN`].
    pub source: usize,
    /// The source whose topic's partition count the topic gets (the other side of the join
    /// it feeds, or the input's own source).
    pub partitions_like: usize,
    /// Whether the input reads a global source: its rows may differ from one owner of an
    /// upstream partition to the next, so where each key was placed is kept.
    pub reads_global: bool,
}

/// The last column of a repartition source: the record's key (the hexadecimal of the input
/// key's encoding).
pub const KEY_COLUMN: &str = "__key";

/// Splits one table's plan at the exchanges that need rows of several partitions.
pub(crate) struct Splitter<'a> {
    /// The topology's name and the table's, for topic and stage names.
    names: (&'a str, &'a str),
    /// The topology's sources so far.
    sources: &'a [Source],
    /// The repartitions made, each with the source reading it back (at positions
    /// `sources.len()` and on).
    pub(crate) made: Vec<(Repartition, Source)>,
    /// Whether a join on a foreign key is brought back to the partitions of the key of the
    /// side holding it (see [`Splitter::back_to_side`]).
    keyed_back: bool,
}

impl<'a> Splitter<'a> {
    /// A splitter for table `table` of topology `topology`, whose sources are `sources`.
    pub(crate) fn new((topology, table): (&'a str, &'a str), sources: &'a [Source]) -> Self {
        Splitter {
            names: (topology, table),
            sources,
            made: Vec::new(),
            keyed_back: false,
        }
    }

    /// A splitter that brings joins on a foreign key back to the partitions of the key of the
    /// side holding it, for a table keyed by that key (see [`Splitter::back_to_side`]).
    pub(crate) fn keyed_back(mut self) -> Self {
        self.keyed_back = true;
        self
    }

    /// The source at position `s`, repartition sources made so far included.
    fn source(&self, s: usize) -> &Source {
        match s.checked_sub(self.sources.len()) {
            Some(i) => &self.made[i].1,
            None => &self.sources[s],
        }
    }

    /// Where `plan`'s rows are, the repartition sources made so far included.
    pub(crate) fn distribution(&self, plan: &Plan) -> Distribution {
        plan.distribution(&|s| self.source(s).shape())
    }

    /// `plan` with repartitions where it needs them.
    pub(crate) fn split(&mut self, plan: &Plan) -> Plan {
        match plan {
            Plan::Source { .. } => plan.clone(),
            Plan::Filter {
                input,
                predicate,
                sql,
            } => Plan::Filter {
                input: Box::new(self.split(input)),
                predicate: predicate.clone(),
                sql: sql.clone(),
            },
            Plan::Map { input, exprs, sql } => Plan::Map {
                input: Box::new(self.split(input)),
                exprs: exprs.clone(),
                sql: sql.clone(),
            },
            Plan::Reduce {
                input,
                group,
                aggregates,
                sql,
            } => {
                let input = self.split(input);
                let plan = Plan::Reduce {
                    input: Box::new(input.clone()),
                    group: group.clone(),
                    aggregates: aggregates.clone(),
                    sql: sql.clone(),
                };
                match self.distribution(&plan) {
                    Distribution::Partial => self
                        .two_phases(input, group, aggregates, sql)
                        .unwrap_or(plan),
                    _ => plan,
                }
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
                let original = (left.as_ref().clone(), right.as_ref().clone());
                let (mut left, mut right) = (self.split(left), self.split(right));
                let join = |left: Plan, right: Plan| Plan::Join {
                    left: Box::new(left),
                    right: Box::new(right),
                    left_keys: left_keys.clone(),
                    right_keys: right_keys.clone(),
                    kind: *kind,
                    right_arity: *right_arity,
                    sql: sql.clone(),
                };
                let (dl, dr) = (self.distribution(&left), self.distribution(&right));
                let partial =
                    self.distribution(&join(left.clone(), right.clone())) == Distribution::Partial;
                let on = left_keys
                    .iter()
                    .zip(right_keys)
                    .find_map(|pair| match pair {
                        (Expr::Column(l), Expr::Column(r)) => Some((*l, *r)),
                        _ => None,
                    });
                if let (
                    true,
                    Some((l, r)),
                    Distribution::Partitioned {
                        source: ls,
                        column: lc,
                    },
                    Distribution::Partitioned {
                        source: rs,
                        column: rc,
                    },
                ) = (partial, on, dl, dr)
                {
                    let left_arity = left.arity(&|s| self.source(s).shape());
                    let row_key = join(original.0.clone(), original.1.clone())
                        .key(&|s| self.source(s).shape());
                    // A join on a foreign key: one side joined on its key, the other's rows
                    // (and the joined rows) go where the first one's are. A join keyed by
                    // neither side's key: both sides go where the join value's are, and the
                    // joined rows come back to the left side's.
                    let foreign = match (lc == l, rc == r, row_key) {
                        (false, _, Some(row_key)) => Some(ForeignKey {
                            side: original.0,
                            offset: 0,
                            key: (ls, lc),
                            column: l,
                            row_key,
                        }),
                        (true, false, Some(row_key)) if *kind == JoinKind::Inner => {
                            Some(ForeignKey {
                                side: original.1,
                                offset: left_arity,
                                key: (rs, rc),
                                column: r,
                                row_key,
                            })
                        }
                        _ => None,
                    };
                    if rc != r {
                        let like = if lc == l { ls } else { rs };
                        right = self.repartition(right, r, like).unwrap_or_else(|p| p);
                    }
                    if lc != l {
                        left = self.repartition(left, l, rs).unwrap_or_else(|p| p);
                    }
                    if let (true, Some(foreign)) = (self.keyed_back, foreign) {
                        return self
                            .back_to_side(join(left, right), foreign)
                            .unwrap_or_else(|p| p);
                    }
                }
                join(left, right)
            }
        }
    }

    /// A join on a foreign key (`foreign.column` of one side, the other side's key, or a
    /// column of each side), computed where the join value's rows are (`joined`), brought
    /// back to the partitions of the first side's key: its rows are repartitioned keyed by
    /// their key and the join value (a row whose join value changed is written by the owner
    /// of each value's partition, under two keys, so each key keeps one writer), placed by
    /// that side's key, and joined there with the side as it is now, keeping the row of its
    /// current join value only. The other one, until its writer deletes it, is hidden.
    /// `Err(joined)` when it cannot be.
    fn back_to_side(&mut self, joined: Plan, foreign: ForeignKey) -> Result<Plan, Plan> {
        let ForeignKey {
            side,
            offset,
            key: (source, key),
            column,
            mut row_key,
        } = foreign;
        let shape = |s| self.source(s).shape();
        let arity = joined.arity(&shape);
        let (key_out, column_out) = (offset + key, offset + column);
        // Where the joined rows are: the foreign key's partition, told by the foreign key or,
        // in an inner join, by the other side's key equal to it.
        let Distribution::Partitioned { column: placed, .. } = self.distribution(&joined) else {
            return Err(joined);
        };
        if !row_key.contains(&placed) {
            row_key.push(placed);
        }
        let read = self.make(joined, row_key, key_out, source)?;
        // Of the side as it is now, only its key and join value are read (computed from
        // its input's columns when the side is itself a projection).
        let (input, exprs) = match side {
            Plan::Map { input, exprs, .. } => {
                (*input, vec![exprs[key].clone(), exprs[column].clone()])
            }
            side => (side, vec![Expr::Column(key), Expr::Column(column)]),
        };
        let side = Plan::Map {
            input: Box::new(input),
            exprs,
            sql: "its key and join value".into(),
        };
        let (column, now) = (column_out, arity + 2);
        let same = |a: Expr, b: Expr| Expr::Binary(BinaryOp::Eq, Box::new(a), Box::new(b));
        let both_null = Expr::Binary(
            BinaryOp::And,
            Box::new(Expr::IsNull(Box::new(Expr::Column(column)), false)),
            Box::new(Expr::IsNull(Box::new(Expr::Column(now)), false)),
        );
        let current = Expr::Binary(
            BinaryOp::Or,
            Box::new(same(Expr::Column(column), Expr::Column(now))),
            Box::new(both_null),
        );
        let back = Plan::Join {
            left: Box::new(read),
            right: Box::new(side),
            left_keys: vec![Expr::Column(key_out)],
            right_keys: vec![Expr::Column(0)],
            kind: JoinKind::Inner,
            right_arity: 2,
            sql: "the joined rows with their row as it is now".into(),
        };
        Ok(Plan::Map {
            input: Box::new(Plan::Filter {
                input: Box::new(back),
                predicate: current,
                sql: "the row of its current join value".into(),
            }),
            exprs: (0..arity).map(Expr::Column).collect(),
            sql: format!("the {arity} columns of the joined rows"),
        })
    }

    /// A GROUP BY whose input is partitioned by a column it does not group by, in two
    /// phases: partial aggregates per group and partitioning value where the rows are, then,
    /// repartitioned by the first group value, their combination per group (an `avg` goes
    /// through as a sum and a count, divided at the end). `None` when it cannot be split (an
    /// input not partitioned, or the repartition refused).
    fn two_phases(
        &mut self,
        input: Plan,
        group: &[Expr],
        aggregates: &[Aggregate],
        sql: &str,
    ) -> Option<Plan> {
        let Distribution::Partitioned { source, column } = self.distribution(&input) else {
            return None;
        };
        let groups = group.len();
        let mut partial_group = group.to_vec();
        partial_group.push(Expr::Column(column));
        // Each aggregate's partial ones: itself, or an avg's sum and count.
        let mut partials = Vec::new();
        let mut slots = Vec::new();
        for a in aggregates {
            slots.push(partials.len());
            match a.func {
                AggFunc::Avg => {
                    partials.extend([AggFunc::Sum, AggFunc::Count].map(|func| Aggregate {
                        func,
                        arg: a.arg.clone(),
                    }))
                }
                _ => partials.push(a.clone()),
            }
        }
        let combined = Plan::Reduce {
            input: Box::new(
                self.make(
                    Plan::Reduce {
                        input: Box::new(input),
                        group: partial_group,
                        aggregates: partials.clone(),
                        sql: format!("{sql}, per partition"),
                    },
                    (0..=groups).collect(),
                    0,
                    source,
                )
                .ok()?,
            ),
            group: (0..groups).map(Expr::Column).collect(),
            aggregates: partials
                .iter()
                .enumerate()
                .map(|(i, a)| Aggregate {
                    func: match a.func {
                        AggFunc::CountStar | AggFunc::Count | AggFunc::Sum => AggFunc::Sum,
                        other => other,
                    },
                    arg: Expr::Column(groups + 1 + i),
                })
                .collect(),
            sql: format!("{sql}, the partitions' partial aggregates combined"),
        };
        if partials.len() == aggregates.len() {
            return Some(combined);
        }
        let value = |(a, slot): (&Aggregate, usize)| match a.func {
            AggFunc::Avg => Expr::Binary(
                BinaryOp::Div,
                Box::new(Expr::Cast(
                    Box::new(Expr::Column(groups + slot)),
                    ColumnType::Double,
                )),
                Box::new(Expr::Column(groups + slot + 1)),
            ),
            _ => Expr::Column(groups + slot),
        };
        Some(Plan::Map {
            input: Box::new(combined),
            exprs: (0..groups)
                .map(Expr::Column)
                .chain(aggregates.iter().zip(slots).map(value))
                .collect(),
            sql: "each avg, the sum over the count".into(),
        })
    }

    /// `input` repartitioned by its column `by` into a topic with as many partitions as
    /// source `like`'s; `Err(input)` when it cannot be (see the module's documentation).
    fn repartition(&mut self, input: Plan, by: usize, like: usize) -> Result<Plan, Plan> {
        let Some(key) = input.key(&|s| self.source(s).shape()) else {
            return Err(input);
        };
        let arity = input.arity(&|s| self.source(s).shape());
        let read = self.make(input, key, by, like)?;
        Ok(Plan::Map {
            input: Box::new(read),
            exprs: (0..arity).map(Expr::Column).collect(),
            sql: format!("the {arity} columns of the repartitioned rows"),
        })
    }

    /// Makes the repartition of `input` (keyed by `key`, placed by column `by`, with as many
    /// partitions as source `like`'s) and returns the plan reading it back (the input's
    /// columns, then [`KEY_COLUMN`]); `Err(input)` when its rows may move between upstream
    /// partitions.
    fn make(&mut self, input: Plan, key: Vec<usize>, by: usize, like: usize) -> Result<Plan, Plan> {
        let mut read = Vec::new();
        input.sources(&mut read);
        let from = match self.distribution(&input) {
            Distribution::Partitioned { source, column } if key.contains(&column) => {
                (source, column)
            }
            _ => return Err(input),
        };
        let reads_global = read.iter().any(|s| self.source(*s).global);
        let (topology, table) = self.names;
        let n = self.made.len();
        let name = format!("{table}.r{n}");
        let hash = murmur2(format!("{input:?} KEY {key:?} BY {by}").as_bytes()) as u32;
        let source = self.sources.len() + n;
        let arity = input.arity(&|s| self.source(s).shape());
        let mut columns: Vec<Column> = (0..arity)
            .map(|i| Column {
                name: format!("c{i}"),
                // Read back in binary: the values keep their types whatever is declared.
                ty: ColumnType::Text,
            })
            .collect();
        columns.push(Column {
            name: KEY_COLUMN.into(),
            ty: ColumnType::Text,
        });
        let reader = Source {
            name: name.clone(),
            topic: format!("{topology}.{table}.r{n}.{hash:08x}{TOPIC_SUFFIX}"),
            columns,
            key: arity,
            identity: vec![arity],
            stream: None,
            partition_column: by,
            late: None,
            tombstone_retention: Source::DEFAULT_TOMBSTONE_RETENTION,
            global: false,
            format: SourceFormat::Rows,
        };
        let repartition = Repartition {
            name: name.clone(),
            input,
            key,
            by,
            from,
            source,
            partitions_like: like,
            reads_global,
        };
        self.made.push((repartition, reader));
        Ok(Plan::Source { source, name })
    }
}

/// The side of a join on a foreign key that holds it (or, in a join keyed by neither side's
/// key, the left side): its plan, where its columns start in the joined rows, its source and
/// key column, the column it joins on, and the key of the joined rows.
struct ForeignKey {
    side: Plan,
    offset: usize,
    key: (usize, usize),
    column: usize,
    row_key: Vec<usize>,
}

/// The suffix of repartition topics' names.
pub const TOPIC_SUFFIX: &str = ".miroir-repartition";

/// Whether `topic` is a repartition topic (a stage's).
pub fn is_stage_topic(topic: &str) -> bool {
    topic.ends_with(TOPIC_SUFFIX)
}

#[cfg(test)]
mod tests {
    use crate::plan::Distribution;
    use crate::topology::Topology;

    #[test]
    fn a_group_by_after_a_join_on_a_foreign_key_is_split() {
        let text = include_str!("../../../topologies/user-directory.toml");
        let t = Topology::parse("user-directory.toml", text).unwrap();
        let per_department = t.table("users_per_department").unwrap();
        assert!(per_department.split.is_some());
        assert_eq!(
            t.partitioned_by(per_department),
            Some((t.sources.len() - 1, 0)),
            "placed by the department's name in the last repartition topic:\n{}",
            t.explain()
        );
        let names: Vec<&str> = t.repartitions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "user_directory.r0",
                "user_directory.r1",
                "users_per_department.r1"
            ]
        );
        // A LEFT JOIN keyed by the user, joined where the departments are: brought back to
        // the user's partitions, keyed by the user.
        let directory = t.table("user_directory").unwrap();
        assert!(directory.split.is_some());
        let back = t.source("user_directory.r1").unwrap();
        assert_eq!(
            t.partitioned_by(directory),
            Some((
                t.sources.iter().position(|s| s.name == back.name).unwrap(),
                0
            )),
            "{}",
            t.explain()
        );
        let r1 = &t.repartitions[1];
        assert_eq!(
            t.sources[r1.partitions_like].name, "users",
            "as many partitions as the users' topic"
        );
        // The GROUP BY above the same join needs no way back, and shares the users'
        // repartition by department.
        let per_department_reads = t.repartitions[2].input.clone();
        let mut read = Vec::new();
        per_department_reads.sources(&mut read);
        assert!(read.contains(&t.repartitions[0].source), "{}", t.explain());
        assert!(t.repartitions[2..]
            .iter()
            .all(|r| t.sources[r.partitions_like].name != "users"));
        assert_ne!(t.distribution(directory), Distribution::Partial);
    }
}
