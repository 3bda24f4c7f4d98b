//! Value types of the upsert state.

use serde::{Deserialize, Serialize};

use crate::value::{Row, Value};

/// What the state keeps per key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The last applied row; `None` after a delete.
    pub row: Option<Row>,
    /// Per business operation, the order value of the last applied event.
    pub versions: Vec<(Value, Value)>,
    /// Offset of the last applied event.
    pub offset: i64,
    /// The row before the first change since the last drain (see
    /// [`crate::ingest::upsert::UpsertState::drain_changes`]); `None` when unchanged since. Not
    /// persisted.
    #[serde(skip)]
    pub(crate) before: Option<Option<Row>>,
}

impl Entry {
    /// The order value last applied for `operation`.
    pub fn version_of(&self, operation: &Value) -> Option<&Value> {
        self.versions
            .iter()
            .find(|(op, _)| op == operation)
            .map(|(_, v)| v)
    }

    /// Records `order` as the newest applied for `operation` (kept as the maximum).
    pub fn record_version(&mut self, operation: &Value, order: &Value) {
        match self.versions.iter_mut().find(|(op, _)| op == operation) {
            Some((_, v)) => {
                if order > v {
                    *v = order.clone();
                }
            }
            None => self.versions.push((operation.clone(), order.clone())),
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The key's row changed (see [`crate::ingest::upsert::UpsertState::drain_changes`]); `late` when a
    /// late event was kept.
    Changed {
        /// Whether this was a late event applied by `action = "keep"`.
        late: bool,
    },
    /// Already applied (same version, a replay or a re-delivery): no effect.
    Duplicate,
    /// Older than the applied version and dropped.
    Late,
}
