//! Value types of the upsert state.

use serde::{Deserialize, Serialize};

use crate::value::{Row, Value};

/// What the state keeps per key, for every key of a source: its lists are boxed slices (two
/// words, not three), and the row before an epoch's first change is kept with the changed
/// keys, not here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The last applied row; `None` after a delete.
    pub row: Option<Row>,
    /// Per business operation, the order value of the last applied event; empty without a
    /// late policy (the offset orders then).
    pub versions: Box<[(Value, Value)]>,
    /// Offset of the last applied event.
    pub offset: i64,
    /// When the key was deleted (ms since the epoch, as of the end of the epoch that deleted
    /// it); `None` while it has a row. The entry is forgotten once the source's
    /// `tombstone_retention` has passed.
    pub deleted_ms: Option<i64>,
    /// Under `late.owns`, per column, the order value of the event that wrote it last (see
    /// [`crate::topology::late::Ownership`]); empty otherwise.
    pub columns: Box<[Value]>,
    /// Whether the key changed since the last drain (see
    /// [`crate::ingest::upsert::UpsertState::drain_changes`]). Not persisted.
    #[serde(skip)]
    pub(crate) changed: bool,
}

/// An entry as stored before entries recorded the versions of their columns.
#[derive(Deserialize)]
struct EntryWithoutColumns {
    row: Option<Row>,
    versions: Box<[(Value, Value)]>,
    offset: i64,
    deleted_ms: Option<i64>,
}

/// An entry as stored before entries recorded when their key was deleted.
#[derive(Deserialize)]
struct EntryWithoutDeletion {
    row: Option<Row>,
    versions: Box<[(Value, Value)]>,
    offset: i64,
}

impl Entry {
    /// Decodes a stored entry, also one written before entries recorded their columns'
    /// versions (stored only under `late.owns`, which came with them) or their deletion time
    /// (a deleted key's clock then starts now).
    pub fn decode_stored(bytes: &[u8]) -> Result<Entry, bincode::Error> {
        let state = |row, versions, offset, deleted_ms| Entry {
            row,
            versions,
            offset,
            deleted_ms,
            columns: Box::default(),
            changed: false,
        };
        crate::state::decode::<Entry>(bytes)
            .or_else(|e| {
                let old: EntryWithoutColumns = crate::state::decode(bytes).map_err(|_| e)?;
                Ok(state(old.row, old.versions, old.offset, old.deleted_ms))
            })
            .or_else(|e: bincode::Error| {
                let old: EntryWithoutDeletion = crate::state::decode(bytes).map_err(|_| e)?;
                Ok(state(old.row, old.versions, old.offset, None))
            })
    }

    /// The order value last applied for `operation`.
    pub fn version_of(&self, operation: &Value) -> Option<&Value> {
        self.versions
            .iter()
            .find(|(op, _)| op == operation)
            .map(|(_, v)| v)
    }

    /// Records `order` as the newest applied for `operation` (kept as the maximum). The
    /// operations are kept in the order they were last applied; a new one beyond
    /// `max_operations` makes the key forget the one applied longest ago, which is returned.
    pub fn record_version(
        &mut self,
        operation: &Value,
        order: &Value,
        max_operations: usize,
    ) -> Option<Value> {
        match self.versions.iter().position(|(op, _)| op == operation) {
            Some(at) => {
                // Moved to the end, as the operation applied last.
                self.versions[at..].rotate_left(1);
                let (_, v) = self.versions.last_mut().expect("found above");
                if order > v {
                    *v = order.clone();
                }
                None
            }
            None => {
                let mut versions = std::mem::take(&mut self.versions).into_vec();
                let forgotten =
                    (versions.len() >= max_operations.max(1)).then(|| versions.remove(0).0);
                // Grown by one, not to four: most keys see one or two operations.
                versions.reserve_exact(1);
                versions.push((operation.clone(), order.clone()));
                self.versions = versions.into_boxed_slice();
                forgotten
            }
        }
    }
}

/// What one record says about its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An entity event: the key's new row (the key is one of its columns).
    Row(Row),
    /// A tombstone: the key is deleted.
    Tombstone(Value),
}

/// The effect of applying one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The key's row changed (see [`crate::ingest::upsert::UpsertState::drain_changes`]); `late` when a
    /// late event was kept.
    Changed {
        /// The late event applied by `action = "keep"`, if this was one.
        late: Option<LateEvent>,
        /// The business operation whose order value the key forgot to make room for this
        /// one's (see [`Entry::record_version`]): a late event of it is no longer recognized.
        forgotten: Option<Value>,
    },
    /// Already applied (same version, a replay or a re-delivery): no effect.
    Duplicate,
    /// Older than the version applied for its business operation, and dropped.
    Late(LateEvent),
}

/// An event older than the one applied last for the same key and business operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LateEvent {
    /// The event's business operation (`late.per`'s column; NULL without one).
    pub operation: Value,
    /// The event's order value (`late.order_by`).
    pub incoming: Value,
    /// The order value applied last for that operation.
    pub applied: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_stored_before_deletion_times_reads_back() {
        #[derive(Serialize)]
        struct Old {
            row: Option<Row>,
            versions: Vec<(Value, Value)>,
            offset: i64,
        }
        let old = Old {
            row: None,
            versions: vec![(Value::Null, Value::Int(7))],
            offset: 42,
        };
        let entry = Entry::decode_stored(&crate::state::encode(&old)).unwrap();
        assert_eq!(entry.row, None);
        assert_eq!(entry.versions, old.versions.clone().into());
        assert_eq!(entry.offset, 42);
        assert_eq!(entry.deleted_ms, None);
        #[derive(Serialize)]
        struct WithoutColumns {
            row: Option<Row>,
            versions: Vec<(Value, Value)>,
            offset: i64,
            deleted_ms: Option<i64>,
        }
        let without_columns = WithoutColumns {
            row: Some(vec![Value::Int(1)]),
            versions: old.versions.clone(),
            offset: 43,
            deleted_ms: Some(5),
        };
        let entry = Entry::decode_stored(&crate::state::encode(&without_columns)).unwrap();
        assert_eq!(entry.row, without_columns.row);
        assert_eq!((entry.offset, entry.deleted_ms), (43, Some(5)));
        assert!(entry.columns.is_empty());
        let new = Entry {
            deleted_ms: Some(5),
            columns: vec![Value::Int(3)].into(),
            ..entry.clone()
        };
        assert_eq!(
            Entry::decode_stored(&crate::state::encode(&new)).unwrap(),
            new
        );
    }
}
