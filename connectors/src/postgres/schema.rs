//! The objects miroir keeps in the app's database, and how a start changes them.
//!
//! For each external table `s.t`:
//! - the table, with the query's columns (types mapped by [`crate::postgres::cell::pg_type`]),
//!   a primary key on the table's key (`t_pkey`; a unique constraint with NULLS NOT DISTINCT,
//!   `t_key`, when a key column may hold NULL) and the declared indexes (`t_idx0`, ...),
//!   with `fillfactor = 80` (room for updates in place);
//! - `SELECT` for each reader role (created `NOLOGIN` when missing), nothing for `PUBLIC`;
//! - a row in `miroir.tables`: the definition it was built from and the instance that
//!   swapped it in.
//!
//! And per topology: `miroir.progress` (the last batch sequence each instance applied),
//! `miroir.offsets` (each source partition's writer and last applied offset: see
//! [`super::ownership`]) and `miroir.rejects` (rows PostgreSQL cannot hold, set aside: see
//! [`super::rejects`]).
//!
//! A table is kept when its stored definition matches; otherwise it is built anew in a shadow
//! table `t__miroir_new` (recorded in `miroir.shadows`) while `t` keeps serving. Every instance
//! that starts with the same definition writes its partitions into the same shadow table; it
//! is swapped in, in one transaction, once every partition was written there by its owner
//! and caught up (`miroir.shadow_partitions`), and every stage record another instance wrote
//! before it caught up was read by the stage partition's owner (`miroir.shadow_stage_writes`).

use miroir_engine::plan::{PostgresTable, TablePlan};
use miroir_engine::topology::Topology;
use tokio_postgres::{Client, GenericClient};

use super::cell::pg_type;
use super::{ident, qualified, PostgresError};

/// The bookkeeping schema (idempotent).
const CATALOG: &str = r#"
CREATE SCHEMA IF NOT EXISTS miroir;
CREATE TABLE IF NOT EXISTS miroir.tables (
    schema_name text NOT NULL,
    table_name text NOT NULL,
    topology text NOT NULL,
    definition text NOT NULL,
    instance text NOT NULL,
    indexes text NOT NULL,
    readers text NOT NULL,
    built_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schema_name, table_name)
);
CREATE TABLE IF NOT EXISTS miroir.progress (
    topology text NOT NULL,
    instance text NOT NULL,
    sequence bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topology, instance)
);
CREATE TABLE IF NOT EXISTS miroir.offsets (
    topology text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    "offset" bigint NOT NULL,
    instance text NOT NULL,
    sequence bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topology, topic, partition)
);
CREATE TABLE IF NOT EXISTS miroir.rejects (
    topology text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    key text NOT NULL,
    row_data text NOT NULL,
    column_name text,
    sqlstate text,
    message text NOT NULL,
    sequence bigint NOT NULL,
    instance text NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topology, schema_name, table_name, key)
);
ALTER TABLE miroir.offsets ADD COLUMN IF NOT EXISTS partitions integer;
CREATE TABLE IF NOT EXISTS miroir.shadows (
    schema_name text NOT NULL,
    table_name text NOT NULL,
    definition text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schema_name, table_name)
);
CREATE TABLE IF NOT EXISTS miroir.shadow_partitions (
    schema_name text NOT NULL,
    table_name text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    instance text NOT NULL,
    ready_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schema_name, table_name, topic, partition)
);
CREATE TABLE IF NOT EXISTS miroir.shadow_stage_writes (
    schema_name text NOT NULL,
    table_name text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    instance text NOT NULL,
    next bigint NOT NULL,
    PRIMARY KEY (schema_name, table_name, topic, partition, instance)
);
"#;

/// What a start does to one external table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The table does not exist: it is built in a shadow table and appears complete.
    Create,
    /// The table exists but is out of date: rebuilt in a shadow table, then swapped.
    Rebuild {
        /// Why.
        reason: String,
    },
    /// The table is up to date: written in place (indexes and grants are brought in line).
    Keep,
    /// The table belongs to someone else (another topology, or not miroir at all): the start
    /// refuses to touch it.
    Refuse {
        /// Why.
        reason: String,
    },
}

/// One external table's fate at the next start.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Table name in the topology.
    pub table: String,
    /// `schema.table`.
    pub target: String,
    /// What happens.
    pub action: Action,
    /// What a kept table has changed in place (indexes, readers).
    pub notes: Vec<String>,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.action {
            Action::Create => write!(f, "create   {} (table {}): new table, built in a shadow table and shown when complete", self.target, self.table),
            Action::Rebuild { reason } => write!(f, "rebuild  {} (table {}): {reason}; the current table serves until the rebuilt one replaces it", self.target, self.table),
            Action::Refuse { reason } => write!(f, "refuse   {} (table {}): {reason}", self.target, self.table),
            Action::Keep if self.notes.is_empty() => write!(f, "keep     {} (table {}): up to date", self.target, self.table),
            Action::Keep => write!(f, "keep     {} (table {}): {}", self.target, self.table, self.notes.join("; ")),
        }
    }
}

/// An external table as the sink writes it.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) plan: TablePlan,
    pub(crate) pg: PostgresTable,
    /// The plan's definition, as batches name it.
    pub(crate) definition: String,
    /// The definition `miroir.tables` and `miroir.shadows` record (see [`catalog_definition`]).
    pub(crate) catalog: String,
    /// The topic whose partitions the rows follow and the part of the key that tells the
    /// partition, for a table whose rows follow one source's partitions.
    pub(crate) placement: Option<(String, usize)>,
    /// The topics of the sources it is computed from, through its stages, each with whether
    /// it is a global source's.
    pub(crate) topics: Vec<(String, bool)>,
    /// Whether a key column may hold NULL (see [`key_may_be_null`]).
    pub(crate) nullable_key: bool,
    /// Where rows go now: the table itself, or its shadow while it is built.
    pub(crate) building: bool,
}

/// Whether a key column of `plan` may hold NULL: unless each is a source's own key carried
/// through (see [`TablePlan::key_never_null`]); a GROUP BY groups NULLs together, a LEFT JOIN
/// pads with them. Such a table's key is a unique constraint with NULLS NOT DISTINCT
/// (PostgreSQL 15 or later) instead of a primary key, so a NULL group is a row of its own,
/// apart from the empty-text group.
pub(crate) fn key_may_be_null(topology: &Topology, plan: &TablePlan) -> bool {
    !plan.key_never_null(&|s| topology.source_shape(s))
}

/// The definition the catalog (`miroir.tables`) records for a table: the plan's, the kind
/// of key constraint, and the layout of each source it reads. A table built with another kind
/// of key is rebuilt, and so is one whose source changed: the instance then reads that source
/// again from its beginning, and the table is built anew in a shadow table meanwhile.
fn catalog_definition(topology: &Topology, plan: &TablePlan) -> String {
    let mut definition = plan.definition();
    if key_may_be_null(topology, plan) {
        definition.push_str("\nkey: unique, nulls not distinct");
    }
    let mut sources = Vec::new();
    plan.plan.sources(&mut sources);
    sources.sort_unstable();
    sources.dedup();
    for s in sources {
        definition.push_str(&format!("\nsource: {}", topology.sources[s].layout()));
    }
    definition
}

/// The name of a table's key constraint (and of its index).
fn key_name(table: &str, nullable_key: bool) -> String {
    if nullable_key {
        format!("{table}_key")
    } else {
        format!("{table}_pkey")
    }
}

impl Target {
    pub(crate) fn written(&self) -> String {
        if self.building {
            qualified(&self.pg.schema, &shadow_name(&self.pg.table))
        } else {
            qualified(&self.pg.schema, &self.pg.table)
        }
    }
}

/// Share of each page filled by inserts (percent); the rest is kept for updates.
const FILLFACTOR: u32 = 80;

fn shadow_name(table: &str) -> String {
    format!("{table}__miroir_new")
}

fn index_name(table: &str, i: usize) -> String {
    format!("{table}_idx{i}")
}

fn external(topology: &Topology) -> impl Iterator<Item = (&TablePlan, &PostgresTable)> {
    topology
        .tables
        .iter()
        .filter_map(|t| t.postgres().map(|pg| (t, pg)))
}

fn indexes_text(pg: &PostgresTable) -> String {
    serde_json::to_string(&pg.indexes).unwrap_or_default()
}

fn readers_text(pg: &PostgresTable) -> String {
    serde_json::to_string(&pg.readers).unwrap_or_default()
}

/// Decides, without changing anything, what a start of `topology` does to each external
/// table.
pub async fn decide(
    client: &impl GenericClient,
    topology: &Topology,
) -> Result<Vec<Decision>, PostgresError> {
    let has_catalog: bool = client
        .query_one("SELECT to_regclass('miroir.tables') IS NOT NULL", &[])
        .await?
        .get(0);
    let mut out = Vec::new();
    for (plan, pg) in external(topology) {
        let exists: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&qualified(&pg.schema, &pg.table)],
            )
            .await?
            .get(0);
        let stored = if has_catalog {
            client
                .query_opt(
                    "SELECT definition, instance, indexes, readers, topology FROM miroir.tables WHERE schema_name = $1 AND table_name = $2",
                    &[&pg.schema, &pg.table],
                )
                .await?
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        r.get::<_, String>(1),
                        r.get::<_, String>(2),
                        r.get::<_, String>(3),
                        r.get::<_, String>(4),
                    )
                })
        } else {
            None
        };
        let mut notes = Vec::new();
        let action = match (exists, stored) {
            (false, _) => Action::Create,
            (true, None) => Action::Refuse {
                reason: "a table of that name exists and miroir did not build it; give this table another name, or drop that one".into(),
            },
            (true, Some((.., owner))) if owner != topology.name => Action::Refuse {
                reason: format!(
                    "it is kept by topology `{owner}`; give this table another name, or drop it there first"
                ),
            },
            (true, Some((definition, ..)))
                if definition != catalog_definition(topology, plan) =>
            {
                Action::Rebuild {
                    reason: "its definition, or a source it reads, changed".into(),
                }
            }
            (true, Some((_, _, indexes, readers, _))) => {
                if indexes != indexes_text(pg) {
                    notes.push(format!(
                        "indexes recreated in place ({indexes} -> {})",
                        indexes_text(pg)
                    ));
                }
                if readers != readers_text(pg) {
                    notes.push(format!(
                        "readers changed in place ({readers} -> {})",
                        readers_text(pg)
                    ));
                }
                Action::Keep
            }
        };
        out.push(Decision {
            table: plan.name.clone(),
            target: pg.qualified(),
            action,
            notes,
        });
    }
    Ok(out)
}

/// Creates the bookkeeping schema, the schemas, roles, shadow tables, indexes and grants a
/// start of `topology` needs; returns where each external table is written.
pub(crate) async fn prepare(
    client: &mut Client,
    topology: &Topology,
) -> Result<Vec<Target>, PostgresError> {
    let tx = client.transaction().await?;
    // One instance prepares at a time (CREATE ... IF NOT EXISTS races otherwise).
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('miroir.prepare'))",
        &[],
    )
    .await?;
    tx.batch_execute(CATALOG).await?;
    let decisions = decide(&tx, topology).await?;
    if let Some(refused) = decisions
        .iter()
        .find(|d| matches!(d.action, Action::Refuse { .. }))
    {
        return Err(PostgresError::Config(refused.to_string()));
    }
    let mut targets = Vec::new();
    for ((plan, pg), decision) in external(topology).zip(decisions) {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            ident(&pg.schema)
        ))
        .await?;
        for reader in &pg.readers {
            ensure_role(&tx, reader).await?;
            tx.batch_execute(&format!(
                "GRANT USAGE ON SCHEMA {} TO {}",
                ident(&pg.schema),
                ident(reader)
            ))
            .await?;
        }
        let building = decision.action != Action::Keep;
        let catalog = catalog_definition(topology, plan);
        if building {
            prepare_shadow(&tx, topology, plan, pg, &catalog).await?;
        } else {
            refresh_in_place(&tx, topology, pg).await?;
        }
        let placement = topology
            .partitioned_by(plan)
            .map(|(source, part)| (topology.sources[source].topic.clone(), part));
        let topics = topology
            .table_topics(plan)
            .into_iter()
            .map(|t| (t.to_string(), topology.global_topics().contains(&t)))
            .collect();
        targets.push(Target {
            plan: plan.clone(),
            pg: pg.clone(),
            definition: plan.definition(),
            catalog,
            placement,
            topics,
            nullable_key: key_may_be_null(topology, plan),
            building,
        });
    }
    tx.commit().await?;
    Ok(targets)
}

/// Makes the shadow table a rebuild writes into: the one other instances already build with
/// the same definition, or a new one (then no partition is written there yet).
async fn prepare_shadow(
    tx: &impl GenericClient,
    topology: &Topology,
    plan: &TablePlan,
    pg: &PostgresTable,
    catalog: &str,
) -> Result<(), PostgresError> {
    let shadow = shadow_name(&pg.table);
    let building: Option<String> = tx
        .query_opt(
            "SELECT s.definition FROM miroir.shadows s WHERE s.schema_name = $1 AND s.table_name = $2 AND to_regclass($3) IS NOT NULL",
            &[&pg.schema, &pg.table, &qualified(&pg.schema, &shadow)],
        )
        .await?
        .map(|r| r.get(0));
    if building.as_deref() == Some(catalog) {
        tracing::info!(table = %pg.qualified(), "writing into the shadow table being built with the same definition");
        return Ok(());
    }
    tx.batch_execute(&format!(
        "DROP TABLE IF EXISTS {}",
        qualified(&pg.schema, &shadow)
    ))
    .await?;
    create_table(tx, plan, pg, &shadow, key_may_be_null(topology, plan)).await?;
    forget_shadow_progress(tx, pg).await?;
    tx.execute(
        "INSERT INTO miroir.shadows (schema_name, table_name, definition) VALUES ($1, $2, $3)
         ON CONFLICT (schema_name, table_name) DO UPDATE SET definition = EXCLUDED.definition, created_at = now()",
        &[&pg.schema, &pg.table, &catalog],
    )
    .await?;
    tracing::info!(table = %pg.qualified(), "building the table in a new shadow table");
    Ok(())
}

async fn ensure_role(tx: &impl GenericClient, role: &str) -> Result<(), PostgresError> {
    let exists = tx
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await?
        .is_some();
    if !exists {
        tx.batch_execute(&format!("CREATE ROLE {} NOLOGIN", ident(role)))
            .await
            .map_err(|e| {
                PostgresError::Config(format!(
                    "reader role `{role}` does not exist and cannot be created ({e}): create it, or give the sink's role CREATEROLE"
                ))
            })?;
        tracing::info!(role, "created reader role (NOLOGIN)");
    }
    Ok(())
}

/// Creates table `name` (the table itself or its shadow) with its key, indexes and grants.
async fn create_table(
    tx: &impl GenericClient,
    plan: &TablePlan,
    pg: &PostgresTable,
    name: &str,
    nullable_key: bool,
) -> Result<(), PostgresError> {
    let columns: Vec<String> = plan
        .columns
        .iter()
        .map(|c| format!("{} {}", ident(&c.name), pg_type(c.ty).name()))
        .collect();
    let key: Vec<String> = plan
        .key
        .iter()
        .map(|k| ident(&plan.columns[*k].name))
        .collect();
    let table = qualified(&pg.schema, name);
    // Every write is an update of a row by key: leaving a fifth of each page free lets most
    // updates stay on their page without touching the indexes (HOT), which halved the
    // merge's time in a measurement on this machine (docs/benchmarks.md).
    let kind = if nullable_key {
        "UNIQUE NULLS NOT DISTINCT"
    } else {
        "PRIMARY KEY"
    };
    tx.batch_execute(&format!(
        "CREATE TABLE {table} ({}, CONSTRAINT {} {kind} ({})) WITH (fillfactor = {FILLFACTOR})",
        columns.join(", "),
        ident(&key_name(name, nullable_key)),
        key.join(", ")
    ))
    .await?;
    for (i, index) in pg.indexes.iter().enumerate() {
        create_index(tx, &table, &index_name(name, i), index).await?;
    }
    grant(tx, &table, &pg.readers, &[]).await
}

async fn create_index(
    tx: &impl GenericClient,
    table: &str,
    name: &str,
    columns: &[String],
) -> Result<(), PostgresError> {
    let cols: Vec<String> = columns.iter().map(|c| ident(c)).collect();
    tx.batch_execute(&format!(
        "CREATE INDEX IF NOT EXISTS {} ON {table} ({})",
        ident(name),
        cols.join(", ")
    ))
    .await?;
    Ok(())
}

/// Readers get `SELECT` and nothing else; nobody else gets anything but the owner (the
/// sink's role).
async fn grant(
    tx: &impl GenericClient,
    table: &str,
    readers: &[String],
    former: &[String],
) -> Result<(), PostgresError> {
    tx.batch_execute(&format!("REVOKE ALL ON {table} FROM PUBLIC"))
        .await?;
    for role in former.iter().filter(|r| !readers.contains(r)) {
        let exists = tx
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[role])
            .await?
            .is_some();
        if exists {
            tx.batch_execute(&format!("REVOKE ALL ON {table} FROM {}", ident(role)))
                .await?;
        }
    }
    for role in readers {
        tx.batch_execute(&format!("REVOKE ALL ON {table} FROM {}", ident(role)))
            .await?;
        tx.batch_execute(&format!("GRANT SELECT ON {table} TO {}", ident(role)))
            .await?;
    }
    Ok(())
}

/// Brings a kept table's indexes and grants in line with the topology.
async fn refresh_in_place(
    tx: &impl GenericClient,
    topology: &Topology,
    pg: &PostgresTable,
) -> Result<(), PostgresError> {
    let row = tx
        .query_one(
            "SELECT indexes, readers FROM miroir.tables WHERE schema_name = $1 AND table_name = $2",
            &[&pg.schema, &pg.table],
        )
        .await?;
    let former_indexes: Vec<Vec<String>> =
        serde_json::from_str(row.get::<_, &str>(0)).unwrap_or_default();
    let former_readers: Vec<String> =
        serde_json::from_str(row.get::<_, &str>(1)).unwrap_or_default();
    let table = qualified(&pg.schema, &pg.table);
    if former_indexes != pg.indexes {
        for i in 0..former_indexes.len() {
            tx.batch_execute(&format!(
                "DROP INDEX IF EXISTS {}",
                qualified(&pg.schema, &index_name(&pg.table, i))
            ))
            .await?;
        }
        for (i, index) in pg.indexes.iter().enumerate() {
            create_index(tx, &table, &index_name(&pg.table, i), index).await?;
        }
    }
    grant(tx, &table, &pg.readers, &former_readers).await?;
    tx.execute(
        "UPDATE miroir.tables SET indexes = $3, readers = $4, topology = $5 WHERE schema_name = $1 AND table_name = $2",
        &[&pg.schema, &pg.table, &indexes_text(pg), &readers_text(pg), &topology.name],
    )
    .await?;
    Ok(())
}

/// Replaces the table by its complete shadow, in the caller's transaction: readers block
/// for the instant of the swap and then see the new table, never an empty or partial one.
pub(crate) async fn swap(
    tx: &impl GenericClient,
    topology: &Topology,
    target: &Target,
    instance: &str,
) -> Result<(), PostgresError> {
    let pg = &target.pg;
    let shadow = shadow_name(&pg.table);
    tx.batch_execute(&format!(
        "DROP TABLE IF EXISTS {}",
        qualified(&pg.schema, &pg.table)
    ))
    .await?;
    tx.batch_execute(&format!(
        "ALTER TABLE {} RENAME TO {}",
        qualified(&pg.schema, &shadow),
        ident(&pg.table)
    ))
    .await?;
    let nullable = target.nullable_key;
    let mut renames = vec![(key_name(&shadow, nullable), key_name(&pg.table, nullable))];
    for i in 0..pg.indexes.len() {
        renames.push((index_name(&shadow, i), index_name(&pg.table, i)));
    }
    for (from, to) in renames {
        tx.batch_execute(&format!(
            "ALTER INDEX {} RENAME TO {}",
            qualified(&pg.schema, &from),
            ident(&to)
        ))
        .await?;
    }
    tx.execute(
        "INSERT INTO miroir.tables (schema_name, table_name, topology, definition, instance, indexes, readers, built_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, now())
         ON CONFLICT (schema_name, table_name) DO UPDATE SET topology = EXCLUDED.topology,
           definition = EXCLUDED.definition, instance = EXCLUDED.instance, indexes = EXCLUDED.indexes,
           readers = EXCLUDED.readers, built_at = EXCLUDED.built_at",
        &[&pg.schema, &pg.table, &topology.name, &target.catalog, &instance, &indexes_text(pg), &readers_text(pg)],
    )
    .await?;
    tx.execute(
        "DELETE FROM miroir.shadows WHERE schema_name = $1 AND table_name = $2",
        &[&pg.schema, &pg.table],
    )
    .await?;
    forget_shadow_progress(tx, pg).await
}

/// Forgets which partitions of `pg`'s shadow table are complete, and the stage records they
/// wait for: the shadow table starts over, or was swapped in.
async fn forget_shadow_progress(
    tx: &impl GenericClient,
    pg: &PostgresTable,
) -> Result<(), PostgresError> {
    for table in ["miroir.shadow_partitions", "miroir.shadow_stage_writes"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE schema_name = $1 AND table_name = $2"),
            &[&pg.schema, &pg.table],
        )
        .await?;
    }
    Ok(())
}

/// What a start of `topology` will do to each external table, without changing anything.
pub fn plan(url: &str, topology: &Topology) -> Result<Vec<Decision>, PostgresError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PostgresError::Config(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        let client = super::connect(url).await?;
        decide(&client, topology).await
    })
}
