//! An epoch's deltas of a table as row changes: the upserts and deletes that both writers
//! take, RocksDB for internal tables ([`write_rows`]) and the outbox for external ones; and
//! the deltas of a repartition as the records of its topic ([`repartition_records`]).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use differential_dataflow::consolidation::consolidate;
use tracing::warn;

use super::shared::Shared;
use crate::changelog::{logged_table, ChangelogRecord};
use crate::partition::partition_of_value;
use crate::plan::repartition::Repartition;
use crate::plan::{Distribution, TablePlan};
use crate::sink::TableChanges;
use crate::state::key::{encode_key, encode_row_key, key_hex};
use crate::state::{encode, Commit};
use crate::value::{key_text, row_to_json_bytes, Row, Value};

/// Consolidates an epoch's `deltas` of `table` into its changes: at most one new row per key,
/// and the keys whose row went without a new one. A key whose row changed has a retraction
/// and an insertion: the upsert alone replaces the row.
pub(crate) fn table_changes(table: &TablePlan, mut deltas: Vec<(Row, isize)>) -> TableChanges {
    consolidate(&mut deltas);
    let mut changes = TableChanges {
        table: table.name.clone(),
        definition: table.definition(),
        ..TableChanges::default()
    };
    let key_of = |row: &Row| -> Vec<Value> { table.key.iter().map(|k| row[*k].clone()).collect() };
    let (inserted, retracted): (Vec<_>, Vec<_>) = deltas.into_iter().partition(|(_, d)| *d > 0);
    // Where each key's row is in `changes.upserts` (rows are moved, not copied).
    let mut put: HashMap<Vec<Value>, usize> = HashMap::with_capacity(inserted.len());
    for (row, diff) in inserted {
        if diff > 1 {
            warn!(table = %table.name, key = %key_text(&row, &table.key), diff, "row present more than once");
        }
        match put.entry(key_of(&row)) {
            // Two rows for one key cannot both be written: keep the last, say so.
            Entry::Occupied(at) => {
                warn!(table = %table.name, key = %key_text(&row, &table.key), "two rows for one key in an epoch");
                changes.upserts[*at.get()] = row;
            }
            Entry::Vacant(slot) => {
                slot.insert(changes.upserts.len());
                changes.upserts.push(row);
            }
        }
    }
    for (row, _) in retracted {
        if let Entry::Vacant(slot) = put.entry(key_of(&row)) {
            changes.deletes.push(slot.key().clone());
            slot.insert(usize::MAX);
        }
    }
    changes
}

/// Where the rows of a table partitioned by a source key are logged: the changelog of that
/// source, in the partition of that part of each row's key.
pub(crate) struct RowPlacement {
    /// The source, by position.
    pub(crate) source: usize,
    /// Its topic's partition count.
    pub(crate) partitions: u32,
    /// The part of the table's key holding the source's key.
    pub(crate) key_part: usize,
}

impl RowPlacement {
    /// Where `table`'s rows are, when they follow a source's partitions and that source's
    /// partition count is known.
    pub(crate) fn of(shared: &Shared, table: &TablePlan) -> Option<RowPlacement> {
        let (source, key_part) = shared.topology.partitioned_by(table)?;
        let partitions = shared
            .status
            .partition_count(&shared.topology.sources[source].topic)?;
        Some(RowPlacement {
            source,
            partitions,
            key_part,
        })
    }

    fn task(&self, key: &[Value]) -> (usize, u32) {
        (
            self.source,
            partition_of_value(&key[self.key_part], self.partitions),
        )
    }
}

/// Adds an internal table's changes to `commit`, each row under its encoded key; with a
/// `placement`, the changes are logged too.
pub(crate) fn write_rows(
    table: &TablePlan,
    changes: &TableChanges,
    commit: &mut Commit,
    placement: Option<RowPlacement>,
) {
    let logged = placement.as_ref().map(|_| logged_table(table));
    for row in &changes.upserts {
        let json = row_to_json_bytes(&table.columns, row);
        let key = encode_row_key(row, &table.key);
        if let (Some(place), Some(name)) = (&placement, &logged) {
            let values: Vec<Value> = table.key.iter().map(|k| row[*k].clone()).collect();
            commit.log_row(place.task(&values), name, &key, Some(&json));
        }
        commit.put_row(&table.name, key, json);
    }
    for key in &changes.deletes {
        let encoded = encode_key(key);
        if let (Some(place), Some(name)) = (&placement, &logged) {
            commit.log_row(place.task(key), name, &encoded, None);
        }
        commit.delete_row(&table.name, encoded);
    }
}

/// The changes of external table `table` this instance writes: those of rows in partitions
/// it owns (a revoked partition's rows leave the dataflow, not the database: its next owner
/// writes them); for a table computed from every partition, all of them when this instance
/// holds every partition, none otherwise (said once).
pub(crate) fn owned_changes(
    shared: &Shared,
    table: &TablePlan,
    mut changes: TableChanges,
) -> TableChanges {
    let topology = &shared.topology;
    let status = &shared.status;
    if topology.partitioned_by(table).is_some() {
        let Some(place) = RowPlacement::of(shared, table) else {
            return changes;
        };
        let topic = &topology.sources[place.source].topic;
        let owned = |key: &[Value]| status.owns(topic, place.task(key).1);
        changes.upserts.retain(|row| {
            let key: Vec<Value> = table.key.iter().map(|k| row[*k].clone()).collect();
            owned(&key)
        });
        changes.deletes.retain(|key| owned(key));
        return changes;
    }
    if topology.distribution(table) == Distribution::Everywhere
        || status.all_restored(&topology.table_topics(table))
    {
        return changes;
    }
    if shared.partial_skipped.lock().insert(table.name.clone()) {
        warn!(table = %table.name, "this instance does not hold every partition the table is computed from, and the table is computed without stages (`--no-changelog`; see `miroir explain`): its changes are not written here");
    }
    changes.upserts.clear();
    changes.deletes.clear();
    changes
}

/// One key's change in a stage's epoch: its upstream partition, its row before (if any)
/// and after (if any).
pub(crate) struct KeyChange {
    /// The stage's key.
    pub(crate) key: Vec<Value>,
    /// The upstream partition the key's rows come from.
    pub(crate) upstream: u32,
    /// Its row now, if any.
    pub(crate) new: Option<Row>,
    /// Its row before the epoch, if any.
    pub(crate) old: Option<Row>,
}

/// An epoch's changes of a stage's keys derived from upstream partitions this instance owns,
/// with its topic's partition count.
pub(crate) struct StageChanges {
    /// The partition count of the stage's topic.
    pub(crate) partitions: u32,
    /// The changed keys.
    pub(crate) keys: Vec<KeyChange>,
}

/// Groups an epoch's `deltas` of `repartition` by key, leaving out the rows of upstream
/// partitions this instance does not own (any more): a revoked partition's rows stay in the
/// topic for its next owner. `None` while a partition count is unknown (logged).
pub(crate) fn stage_changes(
    shared: &Shared,
    repartition: &Repartition,
    mut deltas: Vec<(Row, isize)>,
) -> Option<StageChanges> {
    consolidate(&mut deltas);
    let sources = &shared.topology.sources;
    let (from, from_column) = repartition.from;
    let (from_topic, topic) = (&sources[from].topic, &sources[repartition.source].topic);
    let (Some(from_count), Some(partitions)) = (
        shared.status.partition_count(from_topic),
        shared.status.partition_count(topic),
    ) else {
        warn!(repartition = %repartition.name, %topic, "partition counts unknown: the epoch's repartition records wait for none");
        return None;
    };
    let mut changes: HashMap<Vec<Value>, (Option<Row>, Option<Row>)> = HashMap::new();
    for (row, diff) in deltas {
        let key: Vec<Value> = repartition.key.iter().map(|k| row[*k].clone()).collect();
        let change = changes.entry(key).or_default();
        match diff > 0 {
            true => change.1 = Some(row),
            false => change.0 = Some(row),
        }
    }
    let keys = changes
        .into_iter()
        .filter_map(|(key, (old, new))| {
            let any = new.as_ref().or(old.as_ref())?;
            let upstream = partition_of_value(&any[from_column], from_count);
            shared
                .status
                .owns(from_topic, upstream)
                .then_some(KeyChange {
                    key,
                    upstream,
                    new,
                    old,
                })
        })
        .collect();
    Some(StageChanges { partitions, keys })
}

/// The partition of `repartition`'s topic (of `partitions`) `row` goes to.
pub(crate) fn placed(repartition: &Repartition, partitions: u32, row: &Row) -> u32 {
    partition_of_value(&row[repartition.by], partitions)
}

/// Adds to `records` what a key's change writes to `repartition`'s topic: a delete from the
/// partition its record was in (`before`) when it moved or went, and its new row (`new`).
pub(crate) fn stage_records(
    repartition: &Repartition,
    (partitions, key): (u32, &[Value]),
    before: Option<u32>,
    new: Option<Row>,
    records: &mut Vec<ChangelogRecord>,
) {
    let key = key_hex(&encode_key(key));
    let now = new.as_ref().map(|row| placed(repartition, partitions, row));
    if let Some(before) = before.filter(|b| Some(*b) != now) {
        records.push(ChangelogRecord::repartitioned(
            repartition.source,
            before,
            &key,
            None,
        ));
    }
    if let (Some(mut row), Some(at)) = (new, now) {
        row.push(Value::Text(key.as_str().into()));
        records.push(ChangelogRecord::repartitioned(
            repartition.source,
            at,
            &key,
            Some(encode(&row)),
        ));
    }
}

/// The records of an epoch's `deltas` of `repartition` (see [`crate::plan::repartition`]):
/// each changed key's row upserted in the partition of its `by` value, and deleted from the
/// partition it was in when that changed or the row went.
pub(crate) fn repartition_records(
    shared: &Shared,
    repartition: &Repartition,
    deltas: Vec<(Row, isize)>,
) -> Vec<ChangelogRecord> {
    let Some(stage) = stage_changes(shared, repartition, deltas) else {
        return Vec::new();
    };
    let mut records = Vec::with_capacity(stage.keys.len());
    for change in stage.keys {
        let before = change
            .old
            .as_ref()
            .map(|row| placed(repartition, stage.partitions, row));
        stage_records(
            repartition,
            (stage.partitions, &change.key),
            before,
            change.new,
            &mut records,
        );
    }
    records
}
