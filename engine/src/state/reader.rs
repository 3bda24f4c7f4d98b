//! The read side of internal tables: what queries (HTTP, embedding API) may do with the state
//! store, and nothing more.

use rocksdb::IteratorMode;

use super::{key, table_cf, StateStore, StoreError};
use crate::value::{KeyPrefix, Value};

/// Read-only access to the rows of internal tables, as JSON objects.
pub trait TableReader: Send + Sync {
    /// The row of `table` whose primary key is `key` (its values in key order).
    fn row(&self, table: &str, key: &[Value]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` rows of `table` whose key starts with `prefix`, in key order.
    fn rows(
        &self,
        table: &str,
        prefix: &KeyPrefix,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError>;
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
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let Some(cf) = self.db.cf_handle(&table_cf(table)) else {
            return Ok(Vec::new());
        };
        let start = key::encode_key_prefix(&prefix.values, prefix.text.as_deref());
        let mode = IteratorMode::From(&start, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(&cf, mode) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(&start) || out.len() >= limit {
                break;
            }
            out.push(v.to_vec());
        }
        Ok(out)
    }
}
