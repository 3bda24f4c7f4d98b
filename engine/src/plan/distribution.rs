//! Where a plan's rows are when several instances split the sources' partitions.
//!
//! Each instance computes every table over the partitions it owns (partition `i` of every
//! partitioned source, by range assignment) and over every partition of the global sources.
//! A row is right on such an instance when all the rows it comes from are there too: rows of
//! one source key, a join whose other side is global, a join of two sources on both their
//! keys (co-partitioned), a GROUP BY that includes the partitioning column. Anything else
//! needs the rows of several instances and is [`Distribution::Partial`].

use super::{Expr, JoinKind, Plan, TablePlan};

/// What the distribution of a plan depends on about a source.
#[derive(Clone, Debug)]
pub struct SourceShape {
    /// Positions of the columns that identify its rows (its key, or a stream source's
    /// composite key).
    pub key: Vec<usize>,
    /// Position of the column whose value tells a row's partition (the key, except in a
    /// repartition topic).
    pub partition: usize,
    /// Its number of columns.
    pub arity: usize,
    /// Whether every instance reads all its partitions.
    pub global: bool,
}

/// Where the rows of a plan live across instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// On every instance: the plan reads global sources only.
    Everywhere,
    /// Each row on the instance owning one partition of `source`'s topic: that of the value of
    /// `column` (which holds the source's key).
    Partitioned {
        /// The source whose partitions the rows follow.
        source: usize,
        /// The column of the rows holding that source's key.
        column: usize,
    },
    /// Computed from the rows of several partitions that no single instance is sure to hold
    /// (a GROUP BY or join on a column that is not the partitioning one), or rows whose
    /// partition no column tells any more: right, and found, only on an instance holding
    /// every partition of the sources it reads.
    Partial,
}

impl Plan {
    /// Where the plan's rows live; `sources` describes a source by index.
    pub fn distribution(&self, sources: &impl Fn(usize) -> SourceShape) -> Distribution {
        use Distribution::*;
        match self {
            Plan::Source { source, .. } => {
                let shape = sources(*source);
                match shape.global {
                    true => Everywhere,
                    false => Partitioned {
                        source: *source,
                        column: shape.partition,
                    },
                }
            }
            Plan::Filter { input, .. } => input.distribution(sources),
            Plan::Map { input, exprs, .. } => match input.distribution(sources) {
                Partitioned { source, column } => match position(exprs, column) {
                    Some(column) => Partitioned { source, column },
                    None => Partial,
                },
                other => other,
            },
            Plan::Reduce { input, group, .. } => match input.distribution(sources) {
                Everywhere => Everywhere,
                Partitioned { source, column } => match position(group, column) {
                    Some(column) => Partitioned { source, column },
                    None => Partial,
                },
                Partial => Partial,
            },
            Plan::Join {
                left,
                right,
                left_keys,
                right_keys,
                kind,
                ..
            } => {
                let left_arity = left.arity(sources);
                let shifted = |d: Distribution| match d {
                    Partitioned { source, column } => Partitioned {
                        source,
                        column: column + left_arity,
                    },
                    other => other,
                };
                match (left.distribution(sources), right.distribution(sources)) {
                    (Partial, _) | (_, Partial) => Partial,
                    (l, Everywhere) => l,
                    (Everywhere, r) if *kind == JoinKind::Inner => shifted(r),
                    (Everywhere, _) => Partial,
                    (Partitioned { source, column: l }, Partitioned { column: r, .. })
                        if left_keys
                            .iter()
                            .zip(right_keys)
                            .any(|(a, b)| *a == Expr::Column(l) && *b == Expr::Column(r)) =>
                    {
                        Partitioned { source, column: l }
                    }
                    _ => Partial,
                }
            }
        }
    }

    /// The number of columns of the plan's rows.
    pub(crate) fn arity(&self, sources: &impl Fn(usize) -> SourceShape) -> usize {
        match self {
            Plan::Source { source, .. } => sources(*source).arity,
            Plan::Filter { input, .. } => input.arity(sources),
            Plan::Map { exprs, .. } => exprs.len(),
            Plan::Join {
                left, right_arity, ..
            } => left.arity(sources) + right_arity,
            Plan::Reduce {
                group, aggregates, ..
            } => group.len() + aggregates.len(),
        }
    }
}

impl Plan {
    /// The global source whose every row a LEFT JOIN of the plan keeps while the other side
    /// is partitioned: such a join needs the rows of every partition (see
    /// [`Distribution::Partial`]).
    pub fn global_rows_kept(&self, sources: &impl Fn(usize) -> SourceShape) -> Option<usize> {
        match self {
            Plan::Source { .. } => None,
            Plan::Filter { input, .. } | Plan::Map { input, .. } | Plan::Reduce { input, .. } => {
                input.global_rows_kept(sources)
            }
            Plan::Join {
                left, right, kind, ..
            } => {
                let everywhere = |p: &Plan| p.distribution(sources) == Distribution::Everywhere;
                if *kind == JoinKind::Left && everywhere(left) && !everywhere(right) {
                    let mut read = Vec::new();
                    left.sources(&mut read);
                    return read.first().copied();
                }
                left.global_rows_kept(sources)
                    .or_else(|| right.global_rows_kept(sources))
            }
        }
    }
}

/// The position of the first expression that is column `column` of the input.
fn position(exprs: &[Expr], column: usize) -> Option<usize> {
    exprs.iter().position(|e| *e == Expr::Column(column))
}

impl TablePlan {
    /// Where the table's rows live across instances.
    pub fn distribution(&self, sources: &impl Fn(usize) -> SourceShape) -> Distribution {
        self.computed().distribution(sources)
    }

    /// The source whose partitions the table's rows follow and the part of the table's key
    /// that tells the partition: a row is served by the owner of that source's partition
    /// of that key part. `None` for a table whose rows are everywhere, or partial.
    pub fn partitioned_by(
        &self,
        sources: &impl Fn(usize) -> SourceShape,
    ) -> Option<(usize, usize)> {
        match self.distribution(sources) {
            Distribution::Partitioned { source, column } => {
                Some((source, self.key.iter().position(|k| *k == column)?))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Topology;

    const SOURCES: &str = r#"
name = "t"
[sources.users]
topic = "user"
key = "id"
columns = { id = "text", department_id = "text", name = "text" }
[sources.departments]
topic = "department"
key = "id"
columns = { id = "text", name = "text" }
[sources.cities]
topic = "city"
key = "id"
global = true
columns = { id = "text", name = "text" }
"#;

    fn distributions(tables: &str) -> Vec<(Distribution, Option<(usize, usize)>)> {
        let t = Topology::parse("t.toml", &format!("{SOURCES}{tables}")).unwrap();
        let shapes = |s: usize| t.source_shape(s);
        // Where the written plans' rows are, before any split into stages.
        t.tables
            .iter()
            .map(|table| TablePlan {
                split: None,
                ..table.clone()
            })
            .map(|table| (table.distribution(&shapes), table.partitioned_by(&shapes)))
            .collect()
    }

    #[test]
    fn rows_follow_the_partitioning_column() {
        use Distribution::*;
        let got = distributions(
            r#"
[tables.a]
query = "SELECT name, id FROM users WHERE name IS NOT NULL"
[tables.b]
query = "SELECT * FROM cities"
[tables.c]
query = "SELECT u.id, c.name FROM users u LEFT JOIN cities c ON u.name = c.id"
[tables.d]
query = "SELECT u.id, c.name FROM cities c JOIN users u ON u.name = c.id"
[tables.e]
query = "SELECT d.id, count(*) AS n FROM departments d JOIN users u ON u.id = d.id GROUP BY d.id"
[tables.f]
query = "SELECT name, count(*) AS n FROM cities GROUP BY name"
"#,
        );
        let partitioned = |source, column| Partitioned { source, column };
        assert_eq!(got[0], (partitioned(0, 1), Some((0, 0))));
        assert_eq!(got[1], (Everywhere, None));
        assert_eq!(got[2], (partitioned(0, 0), Some((0, 0))));
        assert_eq!(got[3], (partitioned(0, 0), Some((0, 0))));
        assert_eq!(got[4], (partitioned(1, 0), Some((1, 0))));
        assert_eq!(got[5], (Everywhere, None));
    }

    #[test]
    fn rows_from_several_partitions_are_partial() {
        let got = distributions(
            r#"
[tables.a]
query = "SELECT department_id, count(*) AS n FROM users GROUP BY department_id"
[tables.b]
query = "SELECT u.id, d.name FROM users u LEFT JOIN departments d ON u.department_id = d.id"
[tables.c]
query = "SELECT u.name, count(*) AS n FROM users u JOIN cities c ON u.name = c.id GROUP BY u.name"
"#,
        );
        for (table, (distribution, partitioned_by)) in got.into_iter().enumerate() {
            assert_eq!(distribution, Distribution::Partial, "table {table}");
            assert_eq!(partitioned_by, None, "table {table}");
        }
    }

    #[test]
    fn a_left_join_keeping_every_row_of_a_global_source_is_refused() {
        let text = format!(
            "{SOURCES}{}",
            r#"
[tables.kept]
query = "SELECT c.id, count(u.id) AS n FROM cities c LEFT JOIN users u ON u.name = c.id GROUP BY c.id"
[tables.inner]
query = "SELECT c.id, count(u.id) AS n FROM cities c JOIN users u ON u.name = c.id GROUP BY c.id"
"#
        );
        let error = Topology::parse("t.toml", &text)
            .expect_err("refused")
            .to_string();
        assert!(
            error.starts_with("t.toml:18:9: table `kept`: this LEFT JOIN keeps every row of the global source `cities`")
                && error.contains("hint: declare `cities` without `global = true`")
                && !error.contains("`inner`"),
            "{error}"
        );
        // Not global, the cities are split into stages.
        let text = text.replace("global = true\n", "");
        assert!(Topology::parse("t.toml", &text).is_ok());
    }
}
