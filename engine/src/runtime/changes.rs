//! An epoch's deltas of a table as row changes: the upserts and deletes that both writers
//! take, RocksDB for internal tables ([`write_rows`]) and the outbox for external ones.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use differential_dataflow::consolidation::consolidate;
use tracing::warn;

use crate::changelog::logged_table;
use crate::partition::partition_for_key;
use crate::plan::TablePlan;
use crate::sink::TableChanges;
use crate::state::key::{encode_key, encode_row_key};
use crate::state::Commit;
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
    fn task(&self, key: &[Value]) -> (usize, u32) {
        let part = key[self.key_part].to_key_text();
        (
            self.source,
            partition_for_key(part.as_bytes(), self.partitions),
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
