//! The read side of internal tables: what queries (HTTP, embedding API) may do with the state
//! store, and nothing more.

use rocksdb::{Direction, IteratorMode};

use super::{key, table_cf, StateStore, StoreError};
use crate::value::{KeyPrefix, Value};

/// Read-only access to the rows of internal tables, as JSON objects.
pub trait TableReader: Send + Sync {
    /// The row of `table` whose primary key is `key` (its values in key order).
    fn row(&self, table: &str, key: &[Value]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` rows of `table` whose key starts with `prefix` and, given `after` (a
    /// [`ScanRow::key`]), comes after it in `order`, in that order.
    fn rows(
        &self,
        table: &str,
        prefix: &KeyPrefix,
        from: (Option<&[u8]>, ScanOrder),
        limit: usize,
    ) -> Result<Vec<ScanRow>, StoreError>;
}

/// The order of a scan's rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScanOrder {
    /// Key order (`order=asc`, the default).
    #[default]
    Ascending,
    /// Reverse key order (`order=desc`): a history keyed by (entity, version) newest first.
    Descending,
}

/// A row of a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanRow {
    /// Its key, encoded: the byte order of encoded keys is the tables' key order, so it is
    /// where a scan goes on from, and how scans of several instances merge.
    pub key: Vec<u8>,
    /// The row, as a JSON object.
    pub row: Vec<u8>,
}

impl TableReader for StateStore {
    fn row(&self, table: &str, key: &[Value]) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(cf) = self.db.cf_handle(&table_cf(table)) else {
            return Ok(None);
        };
        self.db
            .get_cf(&cf, key::encode_key(key))
            .map_err(|e| self.rocks(e))
    }

    fn rows(
        &self,
        table: &str,
        prefix: &KeyPrefix,
        (after, order): (Option<&[u8]>, ScanOrder),
        limit: usize,
    ) -> Result<Vec<ScanRow>, StoreError> {
        let Some(cf) = self.db.cf_handle(&table_cf(table)) else {
            return Ok(Vec::new());
        };
        let prefix = key::encode_key_prefix(&prefix.values, prefix.text.as_deref());
        let end = upper_bound(&prefix);
        let mode = match order {
            ScanOrder::Ascending => {
                let from = after.filter(|a| *a > prefix.as_slice()).unwrap_or(&prefix);
                IteratorMode::From(from, Direction::Forward)
            }
            ScanOrder::Descending => {
                let below_end = |a: &&[u8]| end.as_deref().is_none_or(|end| *a < end);
                match after.filter(below_end).or(end.as_deref()) {
                    Some(from) => IteratorMode::From(from, Direction::Reverse),
                    None => IteratorMode::End,
                }
            }
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(&cf, mode) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if Some(&*k) == after || Some(&*k) == end.as_deref() {
                continue;
            }
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(ScanRow {
                key: k.to_vec(),
                row: v.to_vec(),
            });
        }
        Ok(out)
    }
}

/// The least key above every key starting with `prefix` (`None`: there is none, every key
/// from `prefix` on starts with it).
fn upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while end.last() == Some(&0xFF) {
        end.pop();
    }
    *end.last_mut()? += 1;
    Some(end)
}
