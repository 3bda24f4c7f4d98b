//! Rows PostgreSQL cannot hold: found, set aside in `miroir.rejects`, and left out of their
//! table, so that one bad value never stops the instance.
//!
//! Two nets catch them. [`split`] checks every value before it is written
//! ([`cell::check`]: a NUL in a text, a timestamp outside PostgreSQL's range); this costs a
//! scan of the values and catches what is known. A row the database still refuses with a
//! data exception (SQLSTATE class 22, or an integrity violation, 23: a server encoding that
//! cannot represent a character, say) fails the whole transaction; the sink then applies the
//! group again with [`one_by_one`], each row written by its own statement inside a
//! savepoint, and sets aside the rows the database refuses.
//!
//! A refused row is not in its table, and neither is the key's earlier row: the table never
//! shows a version older than the one refused. `miroir.rejects` holds one row per key left
//! out this way, with the row (JSON), the column, the SQLSTATE and the message, written in
//! the batch's own transaction (and a `warn` log line with the same); a later version of the
//! key that the database accepts, or the key's deletion, removes it.

use std::collections::{HashMap, HashSet};

use miroir_engine::error::ErrorClass;
use miroir_engine::value::Value;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Transaction};
use tracing::warn;

use super::cell::{check, pg_type, Cell};
use super::schema::Target;
use super::PostgresError;

/// A row the database cannot hold, and why.
#[derive(Debug)]
pub(crate) struct Rejection<'a> {
    /// The row (all of its columns).
    pub(crate) row: &'a [Value],
    /// The column at fault, when known.
    pub(crate) column: Option<String>,
    /// The database's SQLSTATE; `None` when refused before it was sent.
    pub(crate) sqlstate: Option<String>,
    /// Why.
    pub(crate) message: String,
}

/// Splits `rows` of `target` into those PostgreSQL can hold and those it cannot.
pub(crate) fn split<'a>(
    target: &Target,
    rows: Vec<&'a [Value]>,
) -> (Vec<&'a [Value]>, Vec<Rejection<'a>>) {
    let columns = &target.plan.columns;
    let mut kept = Vec::with_capacity(rows.len());
    let mut rejected = Vec::new();
    for row in rows {
        let fault = row
            .iter()
            .zip(columns)
            .find_map(|(v, c)| check(v, &pg_type(c.ty)).err().map(|e| (c, e)));
        match fault {
            None => kept.push(row),
            Some((column, e)) => rejected.push(Rejection {
                row,
                column: Some(column.name.clone()),
                sqlstate: None,
                message: e.to_string(),
            }),
        }
    }
    (kept, rejected)
}

/// Whether PostgreSQL can hold every value of a deleted key (columns in key order): a key it
/// cannot hold was never written, so there is nothing to delete.
pub(crate) fn key_writable(target: &Target, key: &[Value]) -> bool {
    let plan = &target.plan;
    key.iter()
        .zip(&plan.key)
        .all(|(v, i)| check(v, &pg_type(plan.columns[*i].ty)).is_ok())
}

/// Runs `statement` (with one parameter per value, of `types`) for each of `rows`, each
/// inside a savepoint; returns the rows it wrote and those the database refused with a
/// definite error. Any other error ends the transaction.
pub(crate) async fn one_by_one<'a>(
    tx: &Transaction<'_>,
    statement: &str,
    types: &[Type],
    rows: Vec<&'a [Value]>,
) -> Result<(Vec<&'a [Value]>, Vec<Rejection<'a>>), PostgresError> {
    let statement = tx.prepare_typed(statement, types).await?;
    let mut kept = Vec::with_capacity(rows.len());
    let mut rejected = Vec::new();
    for row in rows {
        tx.batch_execute("SAVEPOINT miroir_row").await?;
        let cells: Vec<Cell> = row.iter().map(Cell).collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            cells.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        match tx
            .execute(&statement, &params)
            .await
            .map_err(PostgresError::Db)
        {
            Ok(_) => {
                tx.batch_execute("RELEASE SAVEPOINT miroir_row").await?;
                kept.push(row);
            }
            Err(e) if e.class() == ErrorClass::Definite => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT miroir_row").await?;
                rejected.push(refusal(row, &e));
            }
            Err(e) => return Err(e),
        }
    }
    Ok((kept, rejected))
}

/// The rejection of `row` for the database's error `e`.
fn refusal<'a>(row: &'a [Value], e: &PostgresError) -> Rejection<'a> {
    let db = match e {
        PostgresError::Db(e) => e.as_db_error(),
        _ => None,
    };
    Rejection {
        row,
        column: db.and_then(|d| d.column()).map(str::to_string),
        sqlstate: db.map(|d| d.code().code().to_string()),
        message: db.map_or_else(|| e.to_string(), |d| d.message().to_string()),
    }
}

/// The JSON text of a key's values (the form `miroir.rejects` names keys by).
pub(crate) fn key_json(key: impl Iterator<Item = Value>) -> String {
    serde_json::Value::Array(key.map(|v| v.to_json()).collect()).to_string()
}

/// The keys set aside for each external table of `topology`, by (schema, table).
pub(crate) async fn outstanding(
    client: &impl GenericClient,
    topology: &str,
) -> Result<HashMap<(String, String), HashSet<String>>, PostgresError> {
    let rows = client
        .query(
            "SELECT schema_name, table_name, key FROM miroir.rejects WHERE topology = $1",
            &[&topology],
        )
        .await?;
    let mut keys: HashMap<(String, String), HashSet<String>> = HashMap::new();
    for row in rows {
        keys.entry((row.get(0), row.get(1)))
            .or_default()
            .insert(row.get(2));
    }
    Ok(keys)
}

/// What a transaction did to the keys set aside for one table (applied to the sink's copy
/// once it commits).
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// Every earlier key was cleared first (the batch replaced the table).
    pub(crate) cleared: bool,
    /// Keys no longer set aside.
    pub(crate) removed: Vec<String>,
    /// Keys set aside now.
    pub(crate) added: Vec<String>,
}

impl Settled {
    /// Applies the change to `keys`, the table's keys set aside.
    pub(crate) fn apply(self, keys: &mut HashSet<String>) {
        if self.cleared {
            keys.clear();
        }
        for k in &self.removed {
            keys.remove(k);
        }
        keys.extend(self.added);
    }
}

/// Brings `miroir.rejects` in line with one table's changes in a batch (in its transaction):
/// `written` are the keys the batch wrote or deleted, `rejected` the rows it set aside, and
/// `outstanding` the keys set aside before. With `replace`, the batch is the whole table.
pub(crate) async fn settle(
    tx: &Transaction<'_>,
    at: &Where<'_>,
    target: &Target,
    outstanding: &HashSet<String>,
    written: Vec<String>,
    replace: bool,
    rejected: &[Rejection<'_>],
) -> Result<Settled, PostgresError> {
    let plan = &target.plan;
    let added: Vec<String> = rejected
        .iter()
        .map(|r| key_json(plan.key.iter().map(|i| r.row[*i].clone())))
        .collect();
    let removed: Vec<String> = if replace {
        outstanding.iter().cloned().collect()
    } else {
        written
            .into_iter()
            .filter(|k| outstanding.contains(k) && !added.contains(k))
            .collect()
    };
    if !removed.is_empty() {
        tx.execute(
            "DELETE FROM miroir.rejects WHERE topology = $1 AND schema_name = $2 AND table_name = $3 AND key = ANY($4)",
            &[&at.topology, &target.pg.schema, &target.pg.table, &removed],
        )
        .await?;
    }
    record(tx, at, target, rejected, &added).await?;
    Ok(Settled {
        cleared: replace,
        removed,
        added,
    })
}

/// Where a batch comes from: its topology, the instance, its sequence.
pub(crate) struct Where<'a> {
    pub(crate) topology: &'a str,
    pub(crate) instance: &'a str,
    pub(crate) sequence: i64,
}

/// Sets `rejected` rows of `target` (keys `keys`, as JSON) aside in `miroir.rejects`, and
/// logs each.
async fn record(
    tx: &Transaction<'_>,
    at: &Where<'_>,
    target: &Target,
    rejected: &[Rejection<'_>],
    keys: &[String],
) -> Result<(), PostgresError> {
    if rejected.is_empty() {
        return Ok(());
    }
    let plan = &target.plan;
    let mut rows = Vec::with_capacity(rejected.len());
    for (r, key) in rejected.iter().zip(keys) {
        let row: serde_json::Map<String, serde_json::Value> = plan
            .columns
            .iter()
            .zip(r.row)
            .map(|(c, v)| (c.name.clone(), v.to_json()))
            .collect();
        warn!(
            table = %target.pg.qualified(),
            key = %key,
            column = r.column.as_deref().unwrap_or("-"),
            sqlstate = r.sqlstate.as_deref().unwrap_or("-"),
            error = %r.message,
            sequence = at.sequence,
            "PostgreSQL cannot hold this row: set aside in miroir.rejects, the key's row is left out of the table"
        );
        rows.push(serde_json::Value::Object(row).to_string());
    }
    let columns: Vec<Option<&str>> = rejected.iter().map(|r| r.column.as_deref()).collect();
    let states: Vec<Option<&str>> = rejected.iter().map(|r| r.sqlstate.as_deref()).collect();
    let messages: Vec<&str> = rejected.iter().map(|r| r.message.as_str()).collect();
    tx.execute(
        "INSERT INTO miroir.rejects AS r (topology, schema_name, table_name, key, row_data, column_name, sqlstate, message, sequence, instance)
         SELECT $1, $2, $3, k, d, c, s, m, $8, $9
         FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $10::text[]) AS u(k, d, c, s, m)
         ON CONFLICT (topology, schema_name, table_name, key) DO UPDATE SET row_data = EXCLUDED.row_data,
           column_name = EXCLUDED.column_name, sqlstate = EXCLUDED.sqlstate, message = EXCLUDED.message,
           sequence = EXCLUDED.sequence, instance = EXCLUDED.instance, rejected_at = now()",
        &[
            &at.topology,
            &target.pg.schema,
            &target.pg.table,
            &keys,
            &rows,
            &columns,
            &states,
            &at.sequence,
            &at.instance,
            &messages,
        ],
    )
    .await?;
    Ok(())
}
