//! Upsert sources: an entity event replaces the previous row of its key.
//!
//! For each key the state keeps the last applied row (or none after a delete) and, per business
//! operation, the order value of the last applied event. Applying an event yields the change to
//! feed the dataflow: retract the old row, insert the new one. Late and duplicate events change
//! nothing (see [`crate::late`]); deletes (Kafka tombstones) keep the versions, so a late event
//! cannot resurrect a deleted key.
//!
//! The state of a partition is persisted with each epoch commit (see [`crate::store`]) because
//! both the late policy and the retraction need it after a restart.

pub mod types;

use std::collections::HashMap;

use crate::late::{verdict, LateAction, LatePolicy, Verdict};
use crate::value::{Row, Value};
pub use types::{Entry, Outcome};

/// The upsert state of one partition of one source.
#[derive(Debug, Default)]
pub struct UpsertState {
    entries: HashMap<Value, Entry>,
    /// Keys changed since the last [`UpsertState::drain_dirty`], to persist at commit.
    dirty: Vec<Value>,
}

impl UpsertState {
    /// A state restored from persisted entries.
    pub fn restore(entries: impl IntoIterator<Item = (Value, Entry)>) -> Self {
        UpsertState {
            entries: entries.into_iter().collect(),
            dirty: Vec::new(),
        }
    }

    /// Applies an event (`Some(row)`) or a tombstone (`None`) for `key` at source `offset`.
    pub fn apply(
        &mut self,
        policy: Option<&LatePolicy>,
        key: Value,
        row: Option<Row>,
        offset: i64,
    ) -> Outcome {
        let entry = self.entries.get(&key);
        let (operation, order) = match (policy, &row) {
            (Some(p), Some(r)) => (p.operation(r), p.order(r)),
            // Without a policy (and for tombstones, which carry no version) the offset orders.
            _ => (Value::Null, Value::Int(offset)),
        };
        if let Some(e) = entry {
            if offset <= e.offset && policy.is_none() {
                return Outcome::Duplicate;
            }
        }
        let mut late = false;
        if row.is_some() && policy.is_some() {
            match verdict(entry.and_then(|e| e.version_of(&operation)), &order) {
                Verdict::Apply => {}
                Verdict::Duplicate => return Outcome::Duplicate,
                Verdict::Late if policy.is_some_and(|p| p.action == LateAction::Keep) => {
                    late = true
                }
                Verdict::Late => return Outcome::Late,
            }
        } else if row.is_none() {
            match entry {
                // A tombstone for a key that is already absent (or a replayed one) changes nothing.
                None => return Outcome::Duplicate,
                Some(e) if e.row.is_none() || offset <= e.offset => return Outcome::Duplicate,
                Some(_) => {}
            }
        }
        let entry = self.entries.entry(key.clone()).or_default();
        let old = std::mem::replace(&mut entry.row, row.clone());
        entry.offset = entry.offset.max(offset);
        if row.is_some() {
            entry.record_version(operation, order);
        }
        self.dirty.push(key);
        Outcome::Changed {
            old,
            new: row,
            late,
        }
    }

    /// Hands every key changed since the last call, with its entry, to `persist` (once per
    /// key, in key order).
    pub fn drain_dirty(&mut self, mut persist: impl FnMut(&Value, &Entry)) {
        let mut keys = std::mem::take(&mut self.dirty);
        keys.sort();
        keys.dedup();
        for k in &keys {
            if let Some(e) = self.entries.get(k) {
                persist(k, e);
            }
        }
    }

    /// Whether some key changed since the last [`UpsertState::drain_dirty`].
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The current rows (for restoring the dataflow, or retracting on revocation).
    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.entries.values().filter_map(|e| e.row.as_ref())
    }

    /// Number of keys with a current row.
    pub fn len(&self) -> usize {
        self.entries.values().filter(|e| e.row.is_some()).count()
    }

    /// Whether no key has a current row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(per: bool) -> LatePolicy {
        LatePolicy {
            order_by: 1,
            per: per.then_some(2),
            action: LateAction::Drop,
        }
    }

    fn row(k: &str, v: i64, op: &str) -> Row {
        vec![Value::Text(k.into()), Value::Int(v), Value::Text(op.into())]
    }

    fn key(k: &str) -> Value {
        Value::Text(k.into())
    }

    #[test]
    fn late_and_duplicate_events_change_nothing() {
        let p = policy(false);
        let mut s = UpsertState::default();
        assert!(matches!(
            s.apply(Some(&p), key("a"), Some(row("a", 2, "x")), 0),
            Outcome::Changed { old: None, .. }
        ));
        assert_eq!(
            s.apply(Some(&p), key("a"), Some(row("a", 1, "x")), 1),
            Outcome::Late
        );
        assert_eq!(
            s.apply(Some(&p), key("a"), Some(row("a", 2, "x")), 2),
            Outcome::Duplicate
        );
        let Outcome::Changed { old, new, late } =
            s.apply(Some(&p), key("a"), Some(row("a", 3, "x")), 3)
        else {
            panic!("newer event not applied")
        };
        assert_eq!(
            (old, new, late),
            (Some(row("a", 2, "x")), Some(row("a", 3, "x")), false)
        );
    }

    #[test]
    fn versions_are_per_business_operation() {
        let p = policy(true);
        let mut s = UpsertState::default();
        s.apply(Some(&p), key("a"), Some(row("a", 5, "email")), 0);
        // An older version of another operation is not late.
        assert!(matches!(
            s.apply(Some(&p), key("a"), Some(row("a", 3, "name")), 1),
            Outcome::Changed { .. }
        ));
        assert_eq!(
            s.apply(Some(&p), key("a"), Some(row("a", 4, "email")), 2),
            Outcome::Late
        );
    }

    #[test]
    fn tombstones_delete_and_keep_versions() {
        let p = policy(false);
        let mut s = UpsertState::default();
        s.apply(Some(&p), key("a"), Some(row("a", 2, "x")), 0);
        assert!(matches!(
            s.apply(Some(&p), key("a"), None, 1),
            Outcome::Changed { new: None, .. }
        ));
        assert_eq!(s.apply(Some(&p), key("a"), None, 1), Outcome::Duplicate);
        assert_eq!(
            s.apply(Some(&p), key("a"), Some(row("a", 1, "x")), 2),
            Outcome::Late
        );
        assert!(s.is_empty());
    }

    #[test]
    fn keep_applies_late_events_and_flags_them() {
        let p = LatePolicy {
            action: LateAction::Keep,
            ..policy(false)
        };
        let mut s = UpsertState::default();
        s.apply(Some(&p), key("a"), Some(row("a", 2, "x")), 0);
        assert!(matches!(
            s.apply(Some(&p), key("a"), Some(row("a", 1, "x")), 1),
            Outcome::Changed { late: true, .. }
        ));
    }

    #[test]
    fn without_policy_offsets_order_and_replays_are_duplicates() {
        let mut s = UpsertState::default();
        s.apply(None, key("a"), Some(row("a", 9, "x")), 5);
        assert_eq!(
            s.apply(None, key("a"), Some(row("a", 1, "x")), 5),
            Outcome::Duplicate
        );
        assert!(matches!(
            s.apply(None, key("a"), Some(row("a", 1, "x")), 6),
            Outcome::Changed { .. }
        ));
        let mut persisted = 0;
        s.drain_dirty(|_, _| persisted += 1);
        assert_eq!(persisted, 1, "two changes of one key persist once");
        assert!(!s.has_dirty());
    }
}
