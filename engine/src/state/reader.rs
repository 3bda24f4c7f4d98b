//! The read side of internal tables: what queries (HTTP, embedding API) may do with the state
//! store, and nothing more.

use rocksdb::IteratorMode;

use super::{key, table_cf, StateStore, StoreError};
use crate::value::{KeyPrefix, Value};

/// Read-only access to the rows of internal tables, as JSON objects.
pub trait TableReader: Send + Sync {
    /// The row of `table` whose primary key is `key` (its values in key order).
    fn row(&self, table: &str, key: &[Value]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` rows of `table` whose key starts with `prefix` and, given `after` (a
    /// [`ScanRow::key`]), comes after it, in key order.
    fn rows(
        &self,
        table: &str,
        prefix: &KeyPrefix,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<ScanRow>, StoreError>;
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
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<ScanRow>, StoreError> {
        let Some(cf) = self.db.cf_handle(&table_cf(table)) else {
            return Ok(Vec::new());
        };
        let prefix = key::encode_key_prefix(&prefix.values, prefix.text.as_deref());
        let from = after.filter(|a| *a > prefix.as_slice()).unwrap_or(&prefix);
        let mode = IteratorMode::From(from, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(&cf, mode) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            if Some(&*k) == after {
                continue;
            }
            out.push(ScanRow {
                key: k.to_vec(),
                row: v.to_vec(),
            });
        }
        Ok(out)
    }
}
