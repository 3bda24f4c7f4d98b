//! Logical plans: what a table's query computes, as a tree of operators.
//!
//! ```text
//!   Source(users) ──► Filter ──► Join ◄── Source(departments)
//!                                 │
//!                                 ▼
//!                               Reduce (GROUP BY) ──► Filter (HAVING) ──► Map (SELECT list)
//! ```
//!
//! Every plan node knows its output schema and its primary key (column positions). The key is
//! what makes a table an upsert target: each key has at most one row at any time. It comes from
//! the source key, the GROUP BY columns, or the keys of a join's inputs, and must survive the
//! SELECT list. The planner ([`sql`]) builds plans from SQL; the dataflow
//! ([`crate::dataflow`]) and the reference evaluator ([`crate::reference`]) both run them.

pub mod distribution;
pub mod expr;
mod prune;
pub mod repartition;
pub mod sql;

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::value::{Column, Value};
pub use distribution::{Distribution, SourceShape};
pub use expr::{BinaryOp, Expr, Func};
pub(crate) use prune::pruned;

/// Aggregate functions of a `GROUP BY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AggFunc {
    /// `count(*)`: rows in the group.
    CountStar,
    /// `count(e)`: rows where `e` is not NULL.
    Count,
    /// `sum(e)` over non-NULL values; NULL when there are none.
    Sum,
    /// `min(e)`
    Min,
    /// `max(e)`
    Max,
    /// `avg(e)` as a double.
    Avg,
}

/// One aggregate: a function over an expression of the reduce's input row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// The function.
    pub func: AggFunc,
    /// Its argument (ignored for `count(*)`).
    pub arg: Expr,
}

/// Join flavours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinKind {
    /// Only matching pairs.
    Inner,
    /// Matching pairs, plus unmatched left rows padded with NULLs.
    Left,
}

/// A logical operator tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Plan {
    /// The current rows of a source (upserted by key).
    Source {
        /// Index of the source in the topology.
        source: usize,
        /// Source name, for display.
        name: String,
    },
    /// Rows of `input` for which `predicate` is true.
    Filter {
        /// Input plan.
        input: Box<Plan>,
        /// The predicate.
        predicate: Expr,
        /// The predicate as written, for `explain`.
        sql: String,
    },
    /// One output row per input row, computed by `exprs`.
    Map {
        /// Input plan.
        input: Box<Plan>,
        /// One expression per output column.
        exprs: Vec<Expr>,
        /// The SELECT list as written, for `explain`.
        sql: String,
    },
    /// Equi-join of two inputs; output rows are left columns then right columns.
    Join {
        /// Left input.
        left: Box<Plan>,
        /// Right input.
        right: Box<Plan>,
        /// Join key expressions over left rows.
        left_keys: Vec<Expr>,
        /// Join key expressions over right rows (same length as `left_keys`).
        right_keys: Vec<Expr>,
        /// Inner or left.
        kind: JoinKind,
        /// Number of right columns (for NULL padding).
        right_arity: usize,
        /// The joined relation and ON condition as written, for `explain`.
        sql: String,
    },
    /// `GROUP BY`: output rows are the group values then the aggregates.
    Reduce {
        /// Input plan.
        input: Box<Plan>,
        /// Group expressions over input rows.
        group: Vec<Expr>,
        /// Aggregates over input rows.
        aggregates: Vec<Aggregate>,
        /// The GROUP BY and aggregates as written, for `explain`.
        sql: String,
    },
}

impl Plan {
    /// Reads, instead of each source `moved` names, the one it names (index and name).
    pub(crate) fn move_sources(&mut self, moved: &HashMap<usize, (usize, String)>) {
        match self {
            Plan::Source { source, name } => {
                if let Some((to, to_name)) = moved.get(source) {
                    (*source, *name) = (*to, to_name.clone());
                }
            }
            Plan::Filter { input, .. } | Plan::Map { input, .. } | Plan::Reduce { input, .. } => {
                input.move_sources(moved)
            }
            Plan::Join { left, right, .. } => {
                left.move_sources(moved);
                right.move_sources(moved);
            }
        }
    }

    /// Indices of the sources this plan reads.
    pub fn sources(&self, out: &mut Vec<usize>) {
        match self {
            Plan::Source { source, .. } => out.push(*source),
            Plan::Filter { input, .. } | Plan::Map { input, .. } | Plan::Reduce { input, .. } => {
                input.sources(out)
            }
            Plan::Join { left, right, .. } => {
                left.sources(out);
                right.sources(out);
            }
        }
    }

    /// Writes the operator graph, one operator per line, inputs indented below; `reads` says
    /// how a source (by index) is read.
    pub fn explain(&self, out: &mut String, depth: usize, reads: &dyn Fn(usize) -> String) {
        let pad = "  ".repeat(depth);
        let _ = match self {
            Plan::Source { name, source } => {
                writeln!(out, "{pad}Source {name} ({})", reads(*source))
            }
            Plan::Filter { sql, .. } => writeln!(out, "{pad}Filter {sql}"),
            Plan::Map { sql, .. } => writeln!(out, "{pad}Map {sql}"),
            Plan::Join { kind, sql, .. } => {
                writeln!(out, "{pad}Join {kind:?} {sql} (exchange by join key)")
            }
            Plan::Reduce { sql, .. } => writeln!(out, "{pad}Reduce {sql} (exchange by group key)"),
        };
        match self {
            Plan::Source { .. } => {}
            Plan::Filter { input, .. } | Plan::Map { input, .. } | Plan::Reduce { input, .. } => {
                input.explain(out, depth + 1, reads)
            }
            Plan::Join { left, right, .. } => {
                left.explain(out, depth + 1, reads);
                right.explain(out, depth + 1, reads);
            }
        }
    }
}

/// The key of a join's rows, from its inputs' keys (`left`, `right`) and its equalities
/// (`on`: the left and right expressions): when the right key is fully bound by the
/// equalities, each left row matches at most one right row, so the left key identifies output
/// rows (and symmetrically for an inner join); otherwise both keys together do.
pub fn join_key(
    (left, right): (&[usize], &[usize]),
    (left_on, right_on): (&[Expr], &[Expr]),
    kind: JoinKind,
    left_arity: usize,
) -> Vec<usize> {
    let bound = |on: &[Expr], key: &[usize]| key.iter().all(|k| on.contains(&Expr::Column(*k)));
    if bound(right_on, right) {
        left.to_vec()
    } else if kind == JoinKind::Inner && bound(left_on, left) {
        right.iter().map(|k| k + left_arity).collect()
    } else {
        left.iter()
            .copied()
            .chain(right.iter().map(|k| k + left_arity))
            .collect()
    }
}

impl Plan {
    /// The key of the plan's rows when it reads sources, filters, joins and projects them on
    /// columns that keep the key (`None` above a grouping or an expression computed over
    /// them); `sources` describes a source by index.
    pub fn key(&self, sources: &impl Fn(usize) -> SourceShape) -> Option<Vec<usize>> {
        match self {
            Plan::Source { source, .. } => Some(sources(*source).key),
            Plan::Filter { input, .. } => input.key(sources),
            Plan::Join {
                left,
                right,
                left_keys,
                right_keys,
                kind,
                ..
            } => Some(join_key(
                (&left.key(sources)?, &right.key(sources)?),
                (left_keys, right_keys),
                *kind,
                left.arity(sources),
            )),
            Plan::Map { input, exprs, .. } => input
                .key(sources)?
                .iter()
                .map(|k| exprs.iter().position(|e| *e == Expr::Column(*k)))
                .collect(),
            Plan::Reduce { .. } => None,
        }
    }
}

/// Where a table's rows go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableStore {
    /// Partition-local RocksDB state, served over HTTP.
    Internal {
        /// Roles whose bearer tokens may query it; empty: any authenticated caller (or
        /// anyone, when the instance verifies no token).
        readers: Vec<String>,
    },
    /// A table in the app's PostgreSQL database, written once per epoch.
    Postgres(PostgresTable),
}

/// An external table's PostgreSQL settings (`sink = { postgres = { ... } }`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresTable {
    /// Schema of the table (`public` when the name is not qualified).
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Connection URL; `None` takes `DATABASE_URL` (or the CLI's `--database-url`).
    pub url: Option<String>,
    /// Roles granted `SELECT` (and nothing else).
    pub readers: Vec<String>,
    /// Declared secondary indexes, each a list of column names.
    pub indexes: Vec<Vec<String>>,
}

impl PostgresTable {
    /// `schema.table`, as written in the topology.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

impl TablePlan {
    /// Whether every key column is a source's key column, carried through filters,
    /// projections, the left side of joins, the right side of inner joins and groupings: such
    /// a key never holds NULL. `sources` describes a source by index.
    pub fn key_never_null(&self, sources: &impl Fn(usize) -> SourceShape) -> bool {
        self.key.iter().all(|k| self.plan.never_null(*k, sources))
    }
}

impl Plan {
    /// Whether `column` of the plan's rows is a source's key column (see
    /// [`TablePlan::key_never_null`]).
    fn never_null(&self, column: usize, sources: &impl Fn(usize) -> SourceShape) -> bool {
        let passed = |input: &Plan, expr: Option<&Expr>| matches!(expr, Some(Expr::Column(c)) if input.never_null(*c, sources));
        match self {
            Plan::Source { source, .. } => sources(*source).key.contains(&column),
            Plan::Filter { input, .. } => input.never_null(column, sources),
            Plan::Map { input, exprs, .. } => passed(input, exprs.get(column)),
            Plan::Reduce { input, group, .. } => passed(input, group.get(column)),
            Plan::Join {
                left, right, kind, ..
            } => {
                let left_arity = left.arity(sources);
                if column < left_arity {
                    left.never_null(column, sources)
                } else {
                    *kind == JoinKind::Inner && right.never_null(column - left_arity, sources)
                }
            }
        }
    }
}

impl TablePlan {
    /// The roles that may query the table over HTTP (empty: no role needed).
    pub fn readers(&self) -> &[String] {
        match &self.store {
            TableStore::Internal { readers } => readers,
            TableStore::Postgres(_) => &[],
        }
    }

    /// The table's PostgreSQL settings when it is external.
    pub fn postgres(&self) -> Option<&PostgresTable> {
        match &self.store {
            TableStore::Postgres(pg) => Some(pg),
            TableStore::Internal { .. } => None,
        }
    }

    /// What the table's rows are, as one text: the query (whitespace collapsed), the columns
    /// with their types and the key. A stored external table whose definition differs is
    /// rebuilt.
    pub fn definition(&self) -> String {
        let query = self.sql.split_whitespace().collect::<Vec<_>>().join(" ");
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("{} {}", c.name, c.ty.name()))
            .collect();
        let key: Vec<&str> = self
            .key
            .iter()
            .map(|k| self.columns[*k].name.as_str())
            .collect();
        format!(
            "{query}\ncolumns: {}\nkey: {}",
            columns.join(", "),
            key.join(", ")
        )
    }
}

/// A planned table: its query plan, schema and key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TablePlan {
    /// Table name.
    pub name: String,
    /// The SQL it was planned from.
    pub sql: String,
    /// The operator tree.
    pub plan: Plan,
    /// Output columns.
    pub columns: Vec<Column>,
    /// Positions of the primary-key columns in `columns`.
    pub key: Vec<usize>,
    /// Where its rows are kept.
    pub store: TableStore,
    /// The plan as instances compute it, reading repartition topics where `plan` needs the
    /// rows of several partitions (see [`repartition`]); `None` when `plan` needs none.
    #[serde(default)]
    pub split: Option<Plan>,
    /// An internal table's rule on each row served over HTTP, if any.
    #[serde(default)]
    pub row_filter: Option<RowFilter>,
}

/// A rule an internal table's row must meet to be served to a caller, beyond the table's
/// readers: a boolean expression over the row's columns and the caller (`principal.id`,
/// `principal.roles`, `has_role('r')`), laid out as the table's columns then those two.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowFilter {
    /// The rule as written.
    pub sql: String,
    /// The rule, planned.
    pub expr: Expr,
}

impl RowFilter {
    /// Whether `row` (a served row, as JSON) of a table with `columns` is served to
    /// `principal` (none: an unauthenticated caller, who is served no row).
    pub fn admits(
        &self,
        columns: &[Column],
        row: &serde_json::Value,
        principal: Option<&crate::command::Principal>,
    ) -> bool {
        let Some(principal) = principal else {
            return false;
        };
        let mut values: Vec<Value> = columns
            .iter()
            .map(|c| Value::from_json(&row[c.name.as_str()], c.ty).unwrap_or(Value::Null))
            .collect();
        values.push(Value::Text(principal.id.as_str().into()));
        values.push(Value::Text(principal.roles.join(",").into()));
        self.expr.holds(&values)
    }
}

impl TablePlan {
    /// The plan instances compute: [`TablePlan::split`] if any, else [`TablePlan::plan`].
    pub fn computed(&self) -> &Plan {
        self.split.as_ref().unwrap_or(&self.plan)
    }
}
