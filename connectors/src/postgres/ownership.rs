//! Which instance writes which rows of the external tables, and when a rebuilt table is
//! complete.
//!
//! A table whose rows follow one source's partitions (a table keyed by the source's key, or
//! a stage's) is written by several instances at once, each writing the rows of the
//! partitions it owns. `miroir.offsets` names each partition's writer: the instance whose
//! task opened last claims it ([`claim`]), in the transaction that replaces the partition's
//! rows with those it derived again from its restored state. An instance writes only the rows
//! of the partitions the table names it the writer of ([`owned`], locked until the
//! transaction ends), so a former owner's late batches (applied after the partition moved)
//! leave the partition to its new writer.
//!
//! Every transaction that writes rows takes a shared advisory lock of the topology, a swap an
//! exclusive one ([`lock_writers`]): a shadow table is never swapped while rows are written
//! into it, and every transaction sees the definitions as they are ([`check_definitions`]).
//! A rebuilt table is complete when each partition of every topic it is computed from was
//! claimed into the shadow table by its current writer and caught up there ([`mark_ready`],
//! [`shadow_complete`]).

use std::collections::{HashMap, HashSet};

use miroir_engine::partition::partition_of_value;
use miroir_engine::sink::{Claims, Offset};
use miroir_engine::value::Value;
use tokio_postgres::GenericClient;
use tracing::info;

use super::schema::Target;
use super::PostgresError;

/// Waits for the topology's writers lock: shared for a transaction writing rows, exclusive
/// for one swapping a shadow table in.
pub(crate) async fn lock_writers(
    tx: &impl GenericClient,
    topology: &str,
    exclusive: bool,
) -> Result<(), PostgresError> {
    let function = match exclusive {
        true => "pg_advisory_xact_lock",
        false => "pg_advisory_xact_lock_shared",
    };
    tx.execute(
        &format!("SELECT {function}(hashtext('miroir.writers:' || $1))"),
        &[&topology],
    )
    .await?;
    Ok(())
}

/// Brings each target in line with the catalog: a table being rebuilt whose definition
/// another instance swapped in is now written in place. A table whose catalog holds another
/// definition than this instance's (a later start of the topology changed it) is a
/// configuration error: this instance must not write it any more.
pub(crate) async fn check_definitions(
    tx: &impl GenericClient,
    targets: &mut [Target],
) -> Result<(), PostgresError> {
    for target in targets.iter_mut() {
        let pg = &target.pg;
        let row = tx
            .query_one(
                "SELECT (SELECT definition FROM miroir.tables WHERE schema_name = $1 AND table_name = $2),
                        (SELECT definition FROM miroir.shadows WHERE schema_name = $1 AND table_name = $2)",
                &[&pg.schema, &pg.table],
            )
            .await?;
        let (table, shadow): (Option<String>, Option<String>) = (row.get(0), row.get(1));
        let mine = Some(&target.catalog);
        if target.building && table.as_ref() == mine {
            info!(table = %pg.qualified(), "the rebuilt table was swapped in by another instance: writing it in place");
            target.building = false;
        } else if target.building && shadow.as_ref() != mine
            || !target.building && table.as_ref() != mine
        {
            return Err(PostgresError::Config(format!(
                "table {} is built from another definition by a later start of this topology: this instance runs an outdated one and stops writing it; restart it with the current topology file",
                pg.qualified()
            )));
        }
    }
    Ok(())
}

/// Names `instance` the writer of each claimed partition, global sources' left out (every
/// instance reads them).
pub(crate) async fn claim(
    tx: &impl GenericClient,
    topology: &str,
    instance: &str,
    claims: &Claims,
    global: &[&str],
) -> Result<(), PostgresError> {
    let mut claimed: Vec<(&str, u32, u32)> = claims
        .iter()
        .filter(|(topic, ..)| !global.contains(topic))
        .collect();
    if claimed.is_empty() {
        return Ok(());
    }
    // One order for every instance: fewer deadlocks between concurrent claims.
    claimed.sort_unstable();
    let topics: Vec<&str> = claimed.iter().map(|c| c.0).collect();
    let partitions: Vec<i32> = claimed.iter().map(|c| c.1 as i32).collect();
    let counts: Vec<i32> = claimed.iter().map(|c| c.2 as i32).collect();
    tx.execute(
        "INSERT INTO miroir.offsets (topology, topic, partition, \"offset\", instance, sequence, partitions, updated_at)
         SELECT $1, t, p, -1, $2, 0, c, now() FROM unnest($3::text[], $4::int[], $5::int[]) AS u(t, p, c)
         ON CONFLICT (topology, topic, partition) DO UPDATE SET instance = EXCLUDED.instance,
           partitions = EXCLUDED.partitions, updated_at = EXCLUDED.updated_at",
        &[&topology, &instance, &topics, &partitions, &counts],
    )
    .await?;
    info!(
        partitions = claimed.len(),
        "claimed partitions of the external tables"
    );
    Ok(())
}

/// The partitions an instance writes, per topic: the topic's partition count (unknown for a
/// partition claimed before counts were recorded) and the partitions.
#[derive(Debug, Default)]
pub(crate) struct Owned(HashMap<String, (Option<u32>, HashSet<u32>)>);

/// The partitions `instance` writes, locked until the transaction ends (a claim by another
/// instance waits for it).
pub(crate) async fn owned(
    tx: &impl GenericClient,
    topology: &str,
    instance: &str,
) -> Result<Owned, PostgresError> {
    let rows = tx
        .query(
            "SELECT topic, partition, partitions FROM miroir.offsets WHERE topology = $1 AND instance = $2
             ORDER BY topic, partition FOR UPDATE",
            &[&topology, &instance],
        )
        .await?;
    let mut owned = Owned::default();
    for row in rows {
        let (topic, partition, count): (String, i32, Option<i32>) =
            (row.get(0), row.get(1), row.get(2));
        let entry = owned.0.entry(topic).or_default();
        entry.0 = entry.0.or(count.map(|c| c as u32));
        entry.1.insert(partition as u32);
    }
    Ok(owned)
}

impl Owned {
    /// Whether `partition` of `topic` is written here.
    pub(crate) fn contains(&self, topic: &str, partition: u32) -> bool {
        self.0
            .get(topic)
            .is_some_and(|(_, ps)| ps.contains(&partition))
    }

    /// The partitions of `topic` written here.
    pub(crate) fn partitions(&self, topic: &str) -> impl Iterator<Item = u32> + '_ {
        self.0
            .get(topic)
            .into_iter()
            .flat_map(|(_, ps)| ps.iter().copied())
    }

    /// Keeps the changes of `target` in the partitions written here; returns how many it
    /// left out. A table not following one source's partitions keeps all its changes (the
    /// engine gives it changes only where they are whole).
    pub(crate) fn keep(
        &self,
        target: &Target,
        upserts: &mut Vec<&[Value]>,
        deletes: &mut Vec<&[Value]>,
    ) -> usize {
        let Some((topic, part)) = &target.placement else {
            return 0;
        };
        let before = upserts.len() + deletes.len();
        match self.0.get(topic) {
            None => {
                upserts.clear();
                deletes.clear();
            }
            // Claimed before partition counts were recorded: this instance wrote the
            // partitions alone then.
            Some((None, _)) => {}
            Some((Some(count), ps)) => {
                let mine = |key_part: &Value| ps.contains(&partition_of_value(key_part, *count));
                let key = &target.plan.key;
                upserts.retain(|row| mine(&row[key[*part]]));
                deletes.retain(|k| mine(&k[*part]));
            }
        }
        before - upserts.len() - deletes.len()
    }
}

/// Records that the partitions in `ready` (per topic: claimed into `target`'s shadow table
/// since this instance started, and caught up) are complete there, written by `instance`.
pub(crate) async fn mark_ready(
    tx: &impl GenericClient,
    target: &Target,
    ready: &[(&str, u32)],
    instance: &str,
) -> Result<(), PostgresError> {
    if ready.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = ready.iter().map(|r| r.0).collect();
    let partitions: Vec<i32> = ready.iter().map(|r| r.1 as i32).collect();
    tx.execute(
        "INSERT INTO miroir.shadow_partitions (schema_name, table_name, topic, partition, instance, ready_at)
         SELECT $1, $2, t, p, $3, now() FROM unnest($4::text[], $5::int[]) AS u(t, p)
         ON CONFLICT (schema_name, table_name, topic, partition) DO UPDATE SET instance = EXCLUDED.instance,
           ready_at = EXCLUDED.ready_at",
        &[&target.pg.schema, &target.pg.table, &instance, &topics, &partitions],
    )
    .await?;
    Ok(())
}

/// Records the ends of the stage records `instance` wrote (`written`: topic, partition and
/// the offset after its last record, as it caught up) to the partitions of the stage topics
/// `target` is computed from: its shadow table is not complete before each partition's
/// writer read them (see [`shadow_complete`]).
pub(crate) async fn record_stage_writes(
    tx: &impl GenericClient,
    target: &Target,
    written: &[&Offset],
    instance: &str,
) -> Result<(), PostgresError> {
    let written: Vec<&&Offset> = written
        .iter()
        .filter(|w| target.topics.iter().any(|(topic, _)| *topic == w.topic))
        .collect();
    if written.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = written.iter().map(|w| w.topic.as_str()).collect();
    let partitions: Vec<i32> = written.iter().map(|w| w.partition as i32).collect();
    let next: Vec<i64> = written.iter().map(|w| w.offset).collect();
    tx.execute(
        "INSERT INTO miroir.shadow_stage_writes (schema_name, table_name, topic, partition, instance, next)
         SELECT $1, $2, t, p, $3, n FROM unnest($4::text[], $5::int[], $6::bigint[]) AS u(t, p, n)
         ON CONFLICT (schema_name, table_name, topic, partition, instance)
           DO UPDATE SET next = GREATEST(miroir.shadow_stage_writes.next, EXCLUDED.next)",
        &[&target.pg.schema, &target.pg.table, &instance, &topics, &partitions, &next],
    )
    .await?;
    Ok(())
}

/// Whether `target`'s shadow table is complete: every partition of every topic it is
/// computed from (through its stages; global ones left out) was claimed into it and caught
/// up by the partition's current writer, who read every stage record the instances wrote
/// there before they caught up (see [`record_stage_writes`]). A partition that moved since
/// was written somewhere else meanwhile; one read by an instance that runs another
/// definition (a topology changed while some instances still run the former one) feeds the
/// former table, not this one.
pub(crate) async fn shadow_complete(
    tx: &impl GenericClient,
    topology: &str,
    target: &Target,
) -> Result<bool, PostgresError> {
    for (topic, _) in target.topics.iter().filter(|(_, global)| !global) {
        let row = tx
            .query_one(
                "SELECT (SELECT max(partitions) FROM miroir.offsets WHERE topology = $1 AND topic = $2),
                        (SELECT count(*) FROM miroir.shadow_partitions r JOIN miroir.offsets o
                           ON o.topology = $1 AND o.topic = r.topic AND o.partition = r.partition AND o.instance = r.instance
                         WHERE r.schema_name = $3 AND r.table_name = $4 AND r.topic = $2)",
                &[&topology, topic, &target.pg.schema, &target.pg.table],
            )
            .await?;
        let (count, ready): (Option<i32>, i64) = (row.get(0), row.get(1));
        if count.is_none_or(|n| ready < i64::from(n)) {
            return Ok(false);
        }
        let unread: i64 = tx
            .query_one(
                "SELECT count(*) FROM miroir.shadow_stage_writes w
                   JOIN miroir.shadow_partitions r ON r.schema_name = w.schema_name
                     AND r.table_name = w.table_name AND r.topic = w.topic AND r.partition = w.partition
                   JOIN miroir.offsets o ON o.topology = $1 AND o.topic = w.topic
                     AND o.partition = w.partition AND o.instance = r.instance
                 WHERE w.schema_name = $3 AND w.table_name = $4 AND w.topic = $2 AND o.\"offset\" + 1 < w.next",
                &[&topology, topic, &target.pg.schema, &target.pg.table],
            )
            .await?
            .get(0);
        if unread > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}
