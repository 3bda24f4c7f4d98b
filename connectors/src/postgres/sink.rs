//! [`PostgresSink`]: batches of external-table changes, one transaction each.
//!
//! For a group of batches, the last with sequence `n`, from instance `i` of topology `t` (the
//! net change of each key over the group is written once):
//!
//! ```sql
//! BEGIN;
//! SELECT pg_advisory_xact_lock_shared(...);         -- writers share; a swap excludes them
//! SELECT sequence FROM miroir.progress WHERE topology = t AND instance = i FOR UPDATE;
//! -- already >= n: a replay, nothing to do (COMMIT)
//! -- the catalog's definitions: a rebuilt table swapped in elsewhere is written in place
//! upsert miroir.offsets SET instance = i            -- the partitions the group claims
//! SELECT ... FROM miroir.offsets WHERE instance = i FOR UPDATE;  -- the partitions i writes
//! -- per table: the changes of rows in those partitions
//! COPY pg_temp.miroir_up_k FROM STDIN BINARY;      -- new rows
//! INSERT INTO s.t SELECT * FROM miroir_up_k ON CONFLICT (key) DO UPDATE ... WHERE changed;
//! -- claimed partitions: their rows the group does not write are deleted
//! COPY pg_temp.miroir_del_k FROM STDIN BINARY;     -- deleted keys
//! DELETE FROM s.t USING miroir_del_k WHERE key matches;
//! update miroir.offsets, miroir.progress (sequence = n);
//! -- caught up: the partitions claimed into shadow tables are complete there
//! COMMIT;
//! -- caught up: complete shadow tables are swapped in (exclusive lock, a transaction each)
//! ```
//!
//! See [`super::ownership`] for who writes which rows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use miroir_engine::error::ErrorClass;
use miroir_engine::partition::partition_of_value;
use miroir_engine::sink::{
    Applied, Claims, Durable, ExternalSink, Offset, SinkBatch, SinkError, TableChanges,
};
use miroir_engine::topology::Topology;
use miroir_engine::value::Value;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};
use tracing::{debug, info, warn};

use super::cell::{pg_type, Cell, ReadCell};
use super::ownership;
use super::rejects::{self, Rejection};
use super::schema::{prepare, swap, Target};
use super::{connect, ident, PostgresError};

/// Writes a topology's external tables to one PostgreSQL database.
pub struct PostgresSink {
    url: String,
    topology: Arc<Topology>,
    instance: String,
    rt: Arc<tokio::runtime::Runtime>,
    client: Option<Client>,
    /// Staging tables created on the current connection (temporary tables die with it).
    staged: HashSet<usize>,
    /// Set once the schema objects are prepared (on the first connection).
    targets: Option<Vec<Target>>,
    /// Per target, the keys set aside in `miroir.rejects` (as committed).
    set_aside: Vec<HashSet<String>>,
    /// The partitions claimed since the start and still written here (as committed): their
    /// rows in a shadow table are this instance's.
    claimed: HashSet<(String, u32)>,
}

impl PostgresSink {
    /// A sink for `topology`'s external tables in the database at `url`, writing as the state
    /// directory `instance`. It connects lazily: a database that is down at start is retried
    /// like one that goes down later.
    pub fn new(
        url: &str,
        topology: Arc<Topology>,
        instance: &str,
    ) -> Result<PostgresSink, PostgresError> {
        // The URL and its TLS settings are checked now (a CA file that cannot be read, say).
        super::tls::connection(url)?;
        // The connection runs on a thread of its own: a connection given up after an error
        // closes at once, ending its transaction (and releasing its locks, which other
        // writers wait for) without waiting for the next batch to drive the runtime.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("miroir-postgres")
            .enable_all()
            .build()
            .map_err(|e| PostgresError::Config(format!("cannot start a runtime: {e}")))?;
        Ok(PostgresSink {
            url: url.to_string(),
            topology,
            instance: instance.to_string(),
            rt: Arc::new(rt),
            client: None,
            staged: HashSet::new(),
            targets: None,
            set_aside: Vec::new(),
            claimed: HashSet::new(),
        })
    }

    /// Connects (again, after a failure) and checks the tables, once.
    async fn ready(&mut self) -> Result<(), PostgresError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(connect(&self.url).await?);
            self.staged.clear();
        }
        if self.targets.is_none() {
            let client = self.client.as_mut().expect("connected above");
            let targets = prepare(client, &self.topology).await?;
            let mut set_aside = rejects::outstanding(client, &self.topology.name).await?;
            self.set_aside = targets
                .iter()
                .map(|t| {
                    let table = (t.pg.schema.clone(), t.pg.table.clone());
                    set_aside.remove(&table).unwrap_or_default()
                })
                .collect();
            self.targets = Some(targets);
        }
        Ok(())
    }

    /// Applies `batches` in one transaction (see the module's doc). With `one_by_one`, rows
    /// are staged one at a time, each in a savepoint, so that those the database refuses are
    /// set aside ([`rejects`]).
    async fn try_apply(
        &mut self,
        batches: &[SinkBatch],
        durable: &Durable,
        one_by_one: bool,
    ) -> Result<Applied, PostgresError> {
        self.ready().await?;
        let client = self.client.as_mut().expect("connected by ready");
        let targets = self.targets.as_mut().expect("prepared by ready");
        let topology = &self.topology.name;
        let tx = client.transaction().await?;
        ownership::lock_writers(&tx, topology, false).await?;
        let applied: Option<i64> = tx
            .query_opt(
                "SELECT sequence FROM miroir.progress WHERE topology = $1 AND instance = $2 FOR UPDATE",
                &[topology, &self.instance],
            )
            .await?
            .map(|r| r.get(0));
        let fresh: Vec<&SinkBatch> = batches
            .iter()
            .filter(|b| applied.is_none_or(|a| b.sequence as i64 > a))
            .collect();
        let Some(last) = fresh.last() else {
            info!(sequence = ?batches.last().map(|b| b.sequence), "batches already applied (replay): skipped");
            durable.wait()?;
            tx.commit().await?;
            return Ok(Applied::default());
        };
        let sequence = last.sequence as i64;
        ownership::check_definitions(&tx, targets).await?;
        let claims = Claims::of(fresh.iter().copied());
        let global = self.topology.global_topics();
        ownership::claim(&tx, topology, &self.instance, &claims, &global).await?;
        let owned = ownership::owned(&tx, topology, &self.instance).await?;
        let mut applied = Applied::default();
        let mut settled = Vec::new();
        let at = rejects::Where {
            topology,
            instance: &self.instance,
            sequence,
        };
        for (k, target) in targets.iter().enumerate() {
            let (mut upserts, mut deletes) = final_changes(target, &fresh);
            let fenced = owned.keep(target, &mut upserts, &mut deletes);
            if fenced > 0 {
                warn!(table = %target.plan.name, rows = fenced, "changes of partitions another instance writes now: left to it");
            }
            let (replace, gone) = replacement(&tx, target, &claims, &upserts).await?;
            deletes.extend(gone.iter().map(Vec::as_slice));
            if upserts.is_empty() && deletes.is_empty() && !replace {
                continue;
            }
            if !self.staged.contains(&k) {
                create_staging(&tx, target, k).await?;
                self.staged.insert(k);
            }
            let set_aside = &self.set_aside[k];
            let written = if set_aside.is_empty() || replace {
                Vec::new()
            } else {
                written_keys(target, &upserts, &deletes)
            };
            let changes = Changes {
                upserts,
                deletes,
                replace,
                one_by_one,
            };
            let rejected = write_changes(&tx, target, k, changes).await?;
            let change =
                rejects::settle(&tx, &at, target, set_aside, written, replace, &rejected).await?;
            settled.push((k, change));
            if !rejected.is_empty() {
                let table = target.plan.name.clone();
                applied.rejected.push((table, rejected.len() as u64));
            }
        }
        record_offsets(&tx, (topology, &self.instance), &fresh, &owned, sequence).await?;
        let caught_up = fresh.iter().any(|b| b.caught_up);
        let mut claimed = self.claimed.clone();
        claimed.extend(claims.iter().map(|(t, p, _)| (t.to_string(), p)));
        claimed.retain(|(t, p)| owned.contains(t, *p));
        if caught_up {
            let written: Vec<&Offset> = fresh.iter().flat_map(|b| &b.written).collect();
            for target in targets.iter().filter(|t| t.building) {
                let ready: Vec<(&str, u32)> = target
                    .topics
                    .iter()
                    .flat_map(|(topic, _)| owned.partitions(topic).map(|p| (topic.as_str(), p)))
                    .filter(|(topic, p)| claimed.contains(&(topic.to_string(), *p)))
                    .collect();
                ownership::mark_ready(&tx, target, &ready, &self.instance).await?;
                ownership::record_stage_writes(&tx, target, &written, &self.instance).await?;
            }
        }
        // The database never leads RocksDB: the commit waits for the epoch's to be durable.
        durable.wait()?;
        tx.commit().await?;
        self.claimed = claimed;
        for (k, change) in settled {
            change.apply(&mut self.set_aside[k]);
        }
        if caught_up {
            self.swap_complete().await;
        }
        Ok(applied)
    }

    /// Swaps in each table being rebuilt whose shadow table is complete (see
    /// [`ownership::shadow_complete`]). A failure is logged: the next caught-up batch tries
    /// again.
    async fn swap_complete(&mut self) {
        let building = self.targets.iter().flatten().filter(|t| t.building).count();
        for _ in 0..building {
            match self.try_swap().await {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    warn!(error = %e, "cannot swap a rebuilt table in yet: the next caught-up batch tries again");
                    self.client = None;
                    return;
                }
            }
        }
    }

    /// Swaps in the first table being rebuilt whose shadow table is complete, in a
    /// transaction of its own that waits for every writer; false when there is none.
    async fn try_swap(&mut self) -> Result<bool, PostgresError> {
        let client = self.client.as_mut().expect("connected by ready");
        let targets = self.targets.as_mut().expect("prepared by ready");
        let tx = client.transaction().await?;
        ownership::lock_writers(&tx, &self.topology.name, true).await?;
        ownership::check_definitions(&tx, targets).await?;
        for target in targets.iter_mut().filter(|t| t.building) {
            let complete = ownership::shadow_complete(&tx, &self.topology.name, target).await?;
            if !complete {
                debug!(table = %target.pg.qualified(), "the rebuilt table waits for partitions other instances write");
                continue;
            }
            swap(&tx, &self.topology, target, &self.instance).await?;
            tx.commit().await?;
            target.building = false;
            info!(table = %target.pg.qualified(), "rebuilt table swapped in");
            return Ok(true);
        }
        // Explicitly: a dropped transaction rolls back only when the connection is next
        // used, and its lock would keep every writer waiting meanwhile.
        tx.rollback().await?;
        Ok(false)
    }
}

/// Records the last applied offsets of `fresh`'s partitions that `instance` writes, with the
/// sequence of the last batch, and `instance`'s progress.
async fn record_offsets(
    tx: &Transaction<'_>,
    (topology, instance): (&str, &str),
    fresh: &[&SinkBatch],
    owned: &ownership::Owned,
    sequence: i64,
) -> Result<(), PostgresError> {
    let mut offsets: HashMap<(&str, u32), i64> = HashMap::new();
    for o in fresh.iter().flat_map(|b| &b.offsets) {
        if owned.contains(&o.topic, o.partition) {
            offsets.insert((o.topic.as_str(), o.partition), o.offset);
        }
    }
    let topics: Vec<&str> = offsets.keys().map(|(t, _)| *t).collect();
    let partitions: Vec<i32> = offsets.keys().map(|(_, p)| *p as i32).collect();
    let offsets: Vec<i64> = offsets.values().copied().collect();
    tx.execute(
        "UPDATE miroir.offsets o SET \"offset\" = u.o, sequence = $6, updated_at = now()
         FROM unnest($2::text[], $3::int[], $4::bigint[]) AS u(t, p, o)
         WHERE o.topology = $1 AND o.topic = u.t AND o.partition = u.p AND o.instance = $5",
        &[
            &topology,
            &topics,
            &partitions,
            &offsets,
            &instance,
            &sequence,
        ],
    )
    .await?;
    tx.execute(
        "INSERT INTO miroir.progress (topology, instance, sequence, updated_at) VALUES ($1, $2, $3, now())
         ON CONFLICT (topology, instance) DO UPDATE SET sequence = EXCLUDED.sequence, updated_at = EXCLUDED.updated_at",
        &[&topology, &instance, &sequence],
    )
    .await?;
    Ok(())
}

/// How the claims of a group replace `target`'s rows: whole (every partition of its source
/// claimed: the upserts are the table), or the keys to delete of the claimed partitions'
/// rows the group does not write (read from the table, whose rows of those partitions this
/// instance alone writes now).
async fn replacement(
    tx: &Transaction<'_>,
    target: &Target,
    claims: &Claims,
    upserts: &[&[Value]],
) -> Result<(bool, Vec<Vec<Value>>), PostgresError> {
    let Some((topic, part)) = &target.placement else {
        let whole =
            !target.topics.is_empty() && target.topics.iter().all(|(t, _)| claims.covers(t));
        return Ok((whole, Vec::new()));
    };
    let Some((count, claimed)) = claims.of_topic(topic) else {
        return Ok((false, Vec::new()));
    };
    if claims.covers(topic) {
        return Ok((true, Vec::new()));
    }
    let key = &target.plan.key;
    let written: HashSet<Vec<&Value>> = upserts
        .iter()
        .map(|row| key.iter().map(|i| &row[*i]).collect())
        .collect();
    let rows = tx
        .query(
            &format!(
                "SELECT {} FROM {}",
                key_names(target).join(", "),
                target.written()
            ),
            &[],
        )
        .await?;
    let mut gone = Vec::new();
    for row in rows {
        let values: Vec<Value> = (0..key.len())
            .map(|i| row.try_get::<_, ReadCell>(i).map(|c| c.0))
            .collect::<Result<_, _>>()?;
        let mine = claimed.contains(&partition_of_value(&values[*part], count));
        if mine && !written.contains(&values.iter().collect::<Vec<_>>()) {
            gone.push(values);
        }
    }
    debug!(table = %target.plan.name, deleted = gone.len(), "claimed partitions' rows not derived again");
    Ok((false, gone))
}

/// The net effect of `batches` (in order) on `target`: the last row of each key written, and
/// the keys whose last change is a delete. Changes made under another definition of the
/// table (batches recovered from the outbox after a redeploy) are left out: the table is
/// rebuilt from the current state anyway.
fn final_changes<'a>(
    target: &Target,
    batches: &[&'a SinkBatch],
) -> (Vec<&'a [Value]>, Vec<&'a [Value]>) {
    let current = |batch: &SinkBatch, changes: &TableChanges| {
        let current = changes.definition == target.definition;
        if !current {
            warn!(table = %changes.table, sequence = batch.sequence, "changes made under another definition of the table: skipped (it is rebuilt)");
        }
        current
    };
    let mine = |batch: &'a SinkBatch| batch.tables.iter().filter(|t| t.table == target.plan.name);
    // One batch's changes of a table name each key once already (the engine makes them so):
    // nothing to keep the last of.
    if let [batch] = batches {
        if let [changes] = mine(batch).collect::<Vec<_>>()[..] {
            if !current(batch, changes) {
                return (Vec::new(), Vec::new());
            }
            return (
                changes.upserts.iter().map(Vec::as_slice).collect(),
                changes.deletes.iter().map(Vec::as_slice).collect(),
            );
        }
    }
    let mut last: HashMap<Vec<&'a Value>, Result<&'a [Value], &'a [Value]>> = HashMap::new();
    for batch in batches {
        forget_claimed(target, batch, &mut last);
        for changes in mine(batch) {
            if !current(batch, changes) {
                continue;
            }
            for row in &changes.upserts {
                let key = target.plan.key.iter().map(|i| &row[*i]).collect();
                last.insert(key, Ok(row.as_slice()));
            }
            for key in &changes.deletes {
                last.insert(key.iter().collect(), Err(key.as_slice()));
            }
        }
    }
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    for change in last.into_values() {
        match change {
            Ok(row) => upserts.push(row),
            Err(key) => deletes.push(key),
        }
    }
    (upserts, deletes)
}

/// Forgets the changes of `last` (by key) in the partitions `batch` claims: the rows of a
/// claimed partition are those from the claim on (earlier ones are from a former ownership).
fn forget_claimed<T>(target: &Target, batch: &SinkBatch, last: &mut HashMap<Vec<&Value>, T>) {
    let Some((topic, part)) = &target.placement else {
        return;
    };
    let claims = Claims::of([batch]);
    let Some((count, claimed)) = claims.of_topic(topic) else {
        return;
    };
    last.retain(|key, _| !claimed.contains(&partition_of_value(key[*part], count)));
}

impl ExternalSink for PostgresSink {
    fn connect(&mut self) -> Result<(), SinkError> {
        let rt = self.rt.clone();
        rt.block_on(self.ready()).map_err(|e| {
            self.client = None;
            database_error(e)
        })
    }

    fn apply(&mut self, batches: &[SinkBatch], durable: &Durable) -> Result<Applied, SinkError> {
        let rt = self.rt.clone();
        let mut result = rt.block_on(self.try_apply(batches, durable, false));
        if let Err(e) = &result {
            if e.class() == ErrorClass::Definite {
                warn!(error = %e, "the database refuses a row of these batches: applying them again a row at a time, to set the refused rows aside");
                self.client = None;
                result = rt.block_on(self.try_apply(batches, durable, true));
            }
        }
        result.map_err(|e| {
            // A failed transaction may leave the connection unusable: start afresh.
            self.client = None;
            database_error(e)
        })
    }
}

/// The engine's view of a PostgreSQL error: its class, and the error itself.
fn database_error(e: PostgresError) -> SinkError {
    match e {
        PostgresError::NotDurable(e) => e,
        e => SinkError::Database {
            class: e.class(),
            source: Box::new(e),
        },
    }
}

fn staging(k: usize) -> (String, String) {
    (format!("miroir_up_{k}"), format!("miroir_del_{k}"))
}

/// The connection's staging tables of target `k`: one for new rows, one for deleted keys.
async fn create_staging(
    tx: &Transaction<'_>,
    target: &Target,
    k: usize,
) -> Result<(), PostgresError> {
    let (up, del) = staging(k);
    let columns = |only_key: bool| -> String {
        target
            .plan
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !only_key || target.plan.key.contains(i))
            .map(|(_, c)| format!("{} {}", ident(&c.name), pg_type(c.ty).name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS;
         CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS",
        ident(&up),
        columns(false),
        ident(&del),
        columns(true)
    ))
    .await?;
    Ok(())
}

/// Writes `rows` into `table` (a quoted name) with a binary `COPY`.
async fn copy_rows<'a>(
    tx: &Transaction<'_>,
    table: &str,
    types: &[Type],
    rows: impl Iterator<Item = &'a [Value]>,
) -> Result<(), PostgresError> {
    let sink = tx
        .copy_in(&format!("COPY {table} FROM STDIN BINARY"))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, types);
    let mut writer = std::pin::pin!(writer);
    for row in rows {
        writer.as_mut().write_raw(row.iter().map(Cell)).await?;
    }
    writer.as_mut().finish().await?;
    Ok(())
}

/// Whether `table` (a quoted name) has no row.
async fn is_empty(tx: &Transaction<'_>, table: &str) -> Result<bool, PostgresError> {
    let row = tx
        .query_one(&format!("SELECT NOT EXISTS (SELECT 1 FROM {table})"), &[])
        .await?;
    Ok(row.get(0))
}

/// The condition that rows `a` and `b` have the same key (columns `key_names`). With `nulls`,
/// NULL matches NULL (a key that may hold NULL is unique with NULLS NOT DISTINCT); the
/// condition is then written so that each column's index serves both of its cases.
fn same_key(key_names: &[String], a: &str, b: &str, nulls: bool) -> String {
    let column = |n: &String| {
        if nulls {
            format!("({a}.{n} = {b}.{n} OR ({a}.{n} IS NULL AND {b}.{n} IS NULL))")
        } else {
            format!("{a}.{n} = {b}.{n}")
        }
    };
    key_names
        .iter()
        .map(column)
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The keys (as `miroir.rejects` names them) of rows written or deleted.
fn written_keys(target: &Target, upserts: &[&[Value]], deletes: &[&[Value]]) -> Vec<String> {
    let key = &target.plan.key;
    let written = upserts
        .iter()
        .map(|row| rejects::key_json(key.iter().map(|i| row[*i].clone())));
    let deleted = deletes.iter().map(|k| rejects::key_json(k.iter().cloned()));
    written.chain(deleted).collect()
}

/// One table's net changes in a group of batches, and how to write them.
struct Changes<'a> {
    /// The last row written of each key.
    upserts: Vec<&'a [Value]>,
    /// The keys whose last change is a delete.
    deletes: Vec<&'a [Value]>,
    /// The upserts are the whole table: other rows go.
    replace: bool,
    /// Stage rows one at a time, setting aside those the database refuses.
    one_by_one: bool,
}

/// Stages a table's changes and merges them into the table it is written to (or copies them
/// straight in when it is empty); returns the rows set aside, whose keys' rows are deleted.
async fn write_changes<'a>(
    tx: &Transaction<'_>,
    target: &Target,
    k: usize,
    changes: Changes<'a>,
) -> Result<Vec<Rejection<'a>>, PostgresError> {
    let Changes {
        upserts,
        deletes,
        replace,
        one_by_one,
    } = changes;
    let (upserts, mut rejected) = rejects::split(target, upserts);
    let plan = &target.plan;
    let (up, del) = staging(k);
    let (up, del) = (ident(&up), ident(&del));
    let table = target.written();
    let types: Vec<Type> = plan.columns.iter().map(|c| pg_type(c.ty)).collect();
    if !upserts.is_empty() && !one_by_one && is_empty(tx, &table).await? {
        // A first load or a rebuild into a new (shadow) table: the rows (one per key) go
        // straight in, at the speed of a plain COPY; there is nothing to merge or delete.
        copy_rows(tx, &table, &types, upserts.into_iter()).await?;
        return Ok(rejected);
    }
    if one_by_one && !upserts.is_empty() {
        let statement = upsert_statement(target, &values(types.len()));
        let (kept, refused) = rejects::one_by_one(tx, &statement, &types, upserts).await?;
        rejected.extend(refused);
        if replace {
            copy_rows(tx, &up, &types, kept.into_iter()).await?;
        }
    } else if !upserts.is_empty() {
        copy_rows(tx, &up, &types, upserts.into_iter()).await?;
        let names: Vec<String> = plan.columns.iter().map(|c| ident(&c.name)).collect();
        let staged = format!("SELECT {} FROM {up}", names.join(", "));
        tx.batch_execute(&upsert_statement(target, &staged)).await?;
    }
    if replace {
        // The staged rows are the whole table: the others go.
        tx.batch_execute(&format!(
            "DELETE FROM {table} AS t WHERE NOT EXISTS (SELECT 1 FROM {up} AS s WHERE {})",
            same_key(&key_names(target), "s", "t", target.nullable_key)
        ))
        .await?;
    }
    // A refused row's key loses its earlier row.
    let refused_keys: Vec<Vec<Value>> = rejected
        .iter()
        .map(|r| plan.key.iter().map(|i| r.row[*i].clone()).collect())
        .collect();
    let deletes = deletes
        .into_iter()
        .chain(refused_keys.iter().map(Vec::as_slice))
        .collect();
    delete_keys(tx, target, &del, deletes, one_by_one).await?;
    Ok(rejected)
}

/// The quoted names of `target`'s key columns, in key order.
fn key_names(target: &Target) -> Vec<String> {
    let plan = &target.plan;
    plan.key
        .iter()
        .map(|i| ident(&plan.columns[*i].name))
        .collect()
}

/// `VALUES ($1, ..., $n)`.
fn values(n: usize) -> String {
    let placeholders: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    format!("VALUES ({})", placeholders.join(", "))
}

/// The statement that writes the rows `source` (a query of all columns, in order) into
/// `target`, a row whose key exists replacing it when it differs.
fn upsert_statement(target: &Target, source: &str) -> String {
    let plan = &target.plan;
    let names: Vec<String> = plan.columns.iter().map(|c| ident(&c.name)).collect();
    let others: Vec<&String> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| !plan.key.contains(i))
        .map(|(_, n)| n)
        .collect();
    let on_conflict = if others.is_empty() {
        "DO NOTHING".to_string()
    } else {
        let set: Vec<String> = others
            .iter()
            .map(|n| format!("{n} = EXCLUDED.{n}"))
            .collect();
        let old: Vec<String> = others.iter().map(|n| format!("t.{n}")).collect();
        let new: Vec<String> = others.iter().map(|n| format!("EXCLUDED.{n}")).collect();
        format!(
            "DO UPDATE SET {} WHERE ({}) IS DISTINCT FROM ({})",
            set.join(", "),
            old.join(", "),
            new.join(", ")
        )
    };
    format!(
        "INSERT INTO {table} AS t ({cols}) {source} ON CONFLICT ({key}) {on_conflict}",
        table = target.written(),
        cols = names.join(", "),
        key = key_names(target).join(", "),
    )
}

/// Deletes the rows of `keys` (key columns in key order) from `target`, through the staging
/// table `del` (quoted). A key PostgreSQL cannot hold was never written: it is skipped.
async fn delete_keys(
    tx: &Transaction<'_>,
    target: &Target,
    del: &str,
    keys: Vec<&[Value]>,
    one_by_one: bool,
) -> Result<(), PostgresError> {
    let keys: Vec<&[Value]> = keys
        .into_iter()
        .filter(|key| rejects::key_writable(target, key))
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    let plan = &target.plan;
    let types: Vec<Type> = plan
        .key
        .iter()
        .map(|i| pg_type(plan.columns[*i].ty))
        .collect();
    let nulls = target.nullable_key && keys.iter().any(|k| k.iter().any(Value::is_null));
    if one_by_one {
        let insert = format!("INSERT INTO {del} {}", values(types.len()));
        rejects::one_by_one(tx, &insert, &types, keys).await?;
    } else {
        copy_rows(tx, del, &types, keys.into_iter()).await?;
    }
    tx.batch_execute(&format!(
        "DELETE FROM {} AS t USING {del} AS d WHERE {}",
        target.written(),
        same_key(&key_names(target), "t", "d", nulls)
    ))
    .await?;
    Ok(())
}
