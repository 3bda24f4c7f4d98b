//! Upsert sources: an entity event replaces the previous row of its key.
//!
//! For each key the state keeps the last applied row (or none after a delete) and, per business
//! operation, the order value of the last applied event. Late and duplicate events change
//! nothing (see [`crate::ingest::late`]); deletes (Kafka tombstones) keep the versions, so a late event
//! cannot resurrect a deleted key.
//!
//! Without `late.owns` an applied event replaces the row whole. With it (see
//! [`crate::topology::late::Ownership`]) the event writes only the columns its operation may
//! write, each only when the event is newer than the one that wrote that column last: the
//! state keeps that order value per column. A key without a row takes its first event whole.
//!
//! The changes of an epoch are coalesced per key: the dataflow gets, once per changed key and
//! epoch, a retraction of the row the key had before the epoch and an insertion of the row it
//! has after (see [`UpsertState::drain_changes`]). A key updated ten times in one epoch costs the
//! dataflow, the stored tables and PostgreSQL one change, not ten: the same result, since an
//! epoch's changes become visible together anyway.
//!
//! The state of a partition is persisted with each epoch commit (see [`crate::state`]) because
//! both the late policy and the retraction need it after a restart.

pub mod types;

use std::borrow::Cow;
use std::collections::HashMap;

use super::late::{verdict, Verdict};
use crate::topology::late::{LateAction, LatePolicy, Ownership};
use crate::value::{key_text, Row, Value};
pub use types::{Entry, Event, LateEvent, Outcome};

/// The upsert state of one partition of one source.
///
/// Keys are hashed with foldhash (seeded per process) rather than SipHash: the lookup is on
/// every record's path, and foldhash is several times faster on short keys.
#[derive(Debug, Default)]
pub struct UpsertState {
    entries: HashMap<Value, Entry, foldhash::quality::RandomState>,
    /// Keys changed since the last [`UpsertState::drain_changes`], once each, with the row each
    /// had before the first of those changes (kept here rather than in every entry: only the
    /// keys of one epoch need it).
    changed: Vec<(Value, Option<Row>)>,
}

impl UpsertState {
    /// A state restored from persisted entries.
    pub fn restore(entries: impl IntoIterator<Item = (Value, Entry)>) -> Self {
        UpsertState {
            entries: entries.into_iter().collect(),
            changed: Vec::new(),
        }
    }

    /// Applies `event` at source `offset`; an entity event's key is its columns `identity`
    /// (one column, or a stream source's several, see [`identity_key`]).
    pub fn apply(
        &mut self,
        policy: Option<&LatePolicy>,
        identity: &[usize],
        event: Event,
        offset: i64,
    ) -> Outcome {
        let (key, row) = match &event {
            Event::Row(row) => (identity_key(row, identity), Some(row)),
            Event::Tombstone(key) => (Cow::Borrowed(key), None),
        };
        let key = key.as_ref();
        let mut slot = self.entries.get_mut(key);
        let entry = slot.as_deref();
        // Without a policy (and for tombstones, which carry no version) the offset orders.
        let by_offset = Value::Int(offset);
        let (operation, order) = match (policy, row) {
            (Some(p), Some(r)) => (p.operation(r), p.order(r)),
            _ => (&Value::Null, &by_offset),
        };
        if let Some(e) = entry {
            if offset <= e.offset && policy.is_none() {
                return Outcome::Duplicate;
            }
        }
        let mut late = None;
        if row.is_some() && policy.is_some() {
            let applied = entry.and_then(|e| e.version_of(operation));
            let event = || LateEvent {
                operation: operation.clone(),
                incoming: order.clone(),
                applied: applied.cloned().unwrap_or(Value::Null),
            };
            match verdict(applied, order) {
                Verdict::Apply => {}
                Verdict::Duplicate => return Outcome::Duplicate,
                Verdict::Late if policy.is_some_and(|p| p.action == LateAction::Keep) => {
                    late = Some(event())
                }
                Verdict::Late => return Outcome::Late(event()),
            }
        } else if row.is_none() {
            match entry {
                // A tombstone for a key that is already absent (or a replayed one) changes nothing.
                None => return Outcome::Duplicate,
                Some(e) if e.row.is_none() || offset <= e.offset => return Outcome::Duplicate,
                Some(_) => {}
            }
        }
        // Under `late.owns` the event is merged into the row, by its operation and order.
        let owned = policy
            .and_then(|p| p.owns.as_ref())
            .map(|owns| (owns, operation.clone(), order.clone()));
        // The key is copied for a new entry.
        let entry = match slot.take() {
            Some(entry) => entry,
            None => self.entries.entry(key.clone()).or_default(),
        };
        let mut forgotten = None;
        if row.is_some() {
            // Without a policy the entry's offset orders, and no version is kept.
            if let Some(p) = policy {
                forgotten = entry.record_version(operation, order, p.max_operations);
            }
            entry.deleted_ms = None;
        }
        // The key is copied once per epoch, into `changed`.
        let first_change = (!entry.changed).then(|| key.clone());
        let row = match (event, owned) {
            (Event::Row(row), None) => Some(row),
            (Event::Row(row), Some((owns, operation, order))) => {
                Some(merge(entry, owns, &operation, &order, row))
            }
            (Event::Tombstone(_), _) => None,
        };
        let before = std::mem::replace(&mut entry.row, row);
        entry.offset = entry.offset.max(offset);
        if let Some(key) = first_change {
            entry.changed = true;
            self.changed.push((key, before));
        }
        Outcome::Changed { late, forgotten }
    }

    /// Hands every key changed since the last call to `change`, once per key, with its entry
    /// now and the row it had before the first of those changes. A key deleted meanwhile is
    /// recorded as deleted at `now_ms`.
    pub fn drain_changes(
        &mut self,
        now_ms: i64,
        mut change: impl FnMut(&Value, &Entry, Option<Row>),
    ) {
        for (key, before) in self.changed.drain(..) {
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.changed = false;
                if entry.row.is_none() && entry.deleted_ms.is_none() {
                    entry.deleted_ms = Some(now_ms);
                }
                change(&key, entry, before);
            }
        }
    }

    /// Forgets the keys deleted at least `retention_ms` before `now_ms` (a late event older
    /// than their delete then applies again: the retention is the trade-off between memory
    /// and that protection); returns them. A deleted key without a deletion time (stored by
    /// an earlier version) is taken as deleted now.
    pub fn forget_deleted(&mut self, now_ms: i64, retention_ms: i64) -> Vec<Value> {
        let mut forgotten = Vec::new();
        self.entries.retain(|key, entry| {
            if entry.row.is_some() || entry.changed {
                return true;
            }
            let deleted = *entry.deleted_ms.get_or_insert(now_ms);
            let keep = now_ms.saturating_sub(deleted) < retention_ms;
            if !keep {
                forgotten.push(key.clone());
            }
            keep
        });
        forgotten
    }

    /// Deletes the rows `expired` says are past their retention (a stream source's, see
    /// [`crate::topology::stream::Retention`]), each as a change of its key: the next
    /// [`UpsertState::drain_changes`] retracts them, and their keys are then deleted keys
    /// like any other. Returns how many rows went.
    pub fn expire(&mut self, expired: impl Fn(&Row) -> bool) -> usize {
        let mut gone = 0;
        for (key, entry) in self.entries.iter_mut() {
            if entry.row.as_ref().is_some_and(&expired) {
                delete_row(&mut self.changed, key, entry);
                gone += 1;
            }
        }
        gone
    }

    /// Deletes `key`'s row, as [`UpsertState::expire`] does; whether it had one.
    pub fn delete(&mut self, key: &Value) -> bool {
        match self.entries.get_mut(key) {
            Some(entry) if entry.row.is_some() => {
                delete_row(&mut self.changed, key, entry);
                true
            }
            _ => false,
        }
    }

    /// Marks every key changed, without changing its row: the next
    /// [`UpsertState::drain_changes`] hands all of them over (to be logged whole).
    pub fn mark_all_changed(&mut self) {
        for (key, entry) in self.entries.iter_mut() {
            if !entry.changed {
                entry.changed = true;
                self.changed.push((key.clone(), entry.row.clone()));
            }
        }
    }

    /// Whether some key changed since the last [`UpsertState::drain_changes`].
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty()
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

/// Deletes `entry`'s row, recording `key` in `changed` on its first change since the last
/// drain.
fn delete_row(changed: &mut Vec<(Value, Option<Row>)>, key: &Value, entry: &mut Entry) {
    let row = entry.row.take();
    if !entry.changed {
        entry.changed = true;
        changed.push((key.clone(), row));
    }
}

/// The key of `row` under `identity`: the value of its one column, or for a stream source's
/// composite key the URL form of its values (`u-1|5`), which tells every two keys apart.
pub fn identity_key<'a>(row: &'a Row, identity: &[usize]) -> Cow<'a, Value> {
    match identity {
        [column] => Cow::Borrowed(&row[*column]),
        columns => Cow::Owned(Value::Text(key_text(row, columns).into())),
    }
}

/// The row `entry`'s key has after an event of `operation` at `order` carrying `event` (see
/// the module's documentation); records the order of each column it writes.
fn merge(entry: &mut Entry, owns: &Ownership, operation: &Value, order: &Value, event: Row) -> Row {
    let Some(current) = entry.row.as_ref() else {
        entry.columns = vec![order.clone(); event.len()].into();
        return event;
    };
    let mut row = current.clone();
    if entry.columns.len() != row.len() {
        let mut columns = std::mem::take(&mut entry.columns).into_vec();
        columns.resize(row.len(), Value::Null);
        entry.columns = columns.into();
    }
    let writes = owns.writes(operation);
    for (c, value) in event.into_iter().enumerate() {
        if writes(c) && order > &entry.columns[c] {
            row[c] = value;
            entry.columns[c] = order.clone();
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event applied without anything forgotten.
    const APPLIED: Outcome = Outcome::Changed {
        late: None,
        forgotten: None,
    };

    fn policy(per: bool) -> LatePolicy {
        LatePolicy {
            order_by: 1,
            per: per.then_some(2),
            action: LateAction::Drop,
            max_operations: LatePolicy::DEFAULT_MAX_OPERATIONS,
            owns: None,
        }
    }

    fn row(k: &str, v: i64, op: &str) -> Row {
        vec![Value::Text(k.into()), Value::Int(v), Value::Text(op.into())]
    }

    fn key(k: &str) -> Value {
        Value::Text(k.into())
    }

    /// The drained changes as (key, row before, row after), in key order.
    type Change = (Value, Option<Row>, Option<Row>);

    fn drain(s: &mut UpsertState) -> Vec<Change> {
        let mut changes = Vec::new();
        s.drain_changes(0, |k, e, before| {
            changes.push((k.clone(), before, e.row.clone()))
        });
        changes.sort();
        changes
    }

    #[test]
    fn a_deleted_key_is_forgotten_once_its_retention_passed_and_not_before() {
        let p = policy(false);
        let mut s = UpsertState::default();
        s.apply(Some(&p), &[0], Event::Row(row("a", 5, "x")), 0);
        s.apply(Some(&p), &[0], Event::Row(row("b", 1, "x")), 1);
        s.apply(Some(&p), &[0], Event::Tombstone(key("a")), 2);
        // Drained at 0: `a` is recorded deleted then.
        drain(&mut s);
        assert_eq!(s.forget_deleted(99, 100), Vec::<Value>::new());
        assert!(
            matches!(
                s.apply(Some(&p), &[0], Event::Row(row("a", 3, "x")), 3),
                Outcome::Late(_)
            ),
            "within the retention, the delete's versions hold"
        );
        assert_eq!(s.forget_deleted(100, 100), vec![key("a")]);
        assert_eq!(
            s.forget_deleted(10_000, 100),
            Vec::<Value>::new(),
            "b has a row"
        );
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 3, "x")), 4),
            APPLIED,
            "past it, an event older than the delete applies again"
        );
    }

    #[test]
    fn late_and_duplicate_events_change_nothing() {
        let p = policy(false);
        let mut s = UpsertState::default();
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 2, "x")), 0),
            APPLIED
        );
        assert_eq!(
            drain(&mut s),
            vec![(key("a"), None, Some(row("a", 2, "x")))]
        );
        assert!(matches!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 1, "x")), 1),
            Outcome::Late(_)
        ));
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 2, "x")), 2),
            Outcome::Duplicate
        );
        assert!(
            !s.has_changes(),
            "late and duplicate events leave no change"
        );
        s.apply(Some(&p), &[0], Event::Row(row("a", 3, "x")), 3);
        assert_eq!(
            drain(&mut s),
            vec![(key("a"), Some(row("a", 2, "x")), Some(row("a", 3, "x")))]
        );
    }

    #[test]
    fn under_a_composite_key_every_event_is_a_row_and_a_copy_changes_nothing() {
        let mut s = UpsertState::default();
        let identity = [0, 1];
        s.apply(None, &identity, Event::Row(row("a", 2, "x")), 0);
        s.apply(None, &identity, Event::Row(row("a", 1, "x")), 1);
        assert_eq!(
            s.apply(None, &identity, Event::Row(row("a", 2, "x")), 0),
            Outcome::Duplicate,
            "read again from its offset"
        );
        let changes = drain(&mut s);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(changes[0].0, Value::Text("a|1".into()));
        assert_eq!(changes[1].0, Value::Text("a|2".into()));
        assert_eq!(s.len(), 2, "the older event did not replace the newer");
        assert_eq!(s.expire(|r| r[1] == Value::Int(1)), 1);
        assert_eq!(
            drain(&mut s),
            vec![(Value::Text("a|1".into()), Some(row("a", 1, "x")), None)]
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s.expire(|r| r[1] == Value::Int(1)), 0, "gone already");
    }

    #[test]
    fn changes_of_a_key_coalesce_until_drained() {
        let p = policy(false);
        let mut s = UpsertState::default();
        s.apply(Some(&p), &[0], Event::Row(row("a", 1, "x")), 0);
        s.apply(Some(&p), &[0], Event::Row(row("b", 1, "x")), 1);
        drain(&mut s);
        for (offset, version) in [(2, 2), (3, 3), (4, 4)] {
            s.apply(Some(&p), &[0], Event::Row(row("a", version, "x")), offset);
        }
        s.apply(Some(&p), &[0], Event::Tombstone(key("b")), 5);
        s.apply(Some(&p), &[0], Event::Row(row("c", 1, "x")), 6);
        assert_eq!(
            drain(&mut s),
            vec![
                (key("a"), Some(row("a", 1, "x")), Some(row("a", 4, "x"))),
                (key("b"), Some(row("b", 1, "x")), None),
                (key("c"), None, Some(row("c", 1, "x"))),
            ],
            "one change per key, from its row before the first event to its row after the last"
        );
        assert!(!s.has_changes());
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn a_key_forgets_the_operation_applied_longest_ago_past_max_operations() {
        let p = LatePolicy {
            max_operations: 2,
            ..policy(true)
        };
        let mut s = UpsertState::default();
        s.apply(Some(&p), &[0], Event::Row(row("a", 5, "email")), 0);
        s.apply(Some(&p), &[0], Event::Row(row("a", 6, "name")), 1);
        // "email" applied again: now "name" is the one applied longest ago.
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 7, "email")), 2),
            APPLIED
        );
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 8, "phone")), 3),
            Outcome::Changed {
                late: None,
                forgotten: Some(Value::Text("name".into()))
            }
        );
        assert!(
            matches!(
                s.apply(Some(&p), &[0], Event::Row(row("a", 6, "email")), 4),
                Outcome::Late(_)
            ),
            "the operations kept still drop their late events"
        );
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 2, "name")), 5),
            Outcome::Changed {
                late: None,
                forgotten: Some(Value::Text("email".into()))
            },
            "a forgotten operation's late event is no longer recognized"
        );
        let versions = &s.entries[&key("a")].versions;
        assert_eq!(versions.len(), 2, "{versions:?}");
    }

    #[test]
    fn without_policy_no_version_is_kept() {
        let mut s = UpsertState::default();
        s.apply(None, &[0], Event::Row(row("a", 5, "x")), 0);
        s.apply(None, &[0], Event::Row(row("a", 6, "y")), 1);
        let entry = &s.entries[&key("a")];
        assert!(entry.versions.is_empty(), "{:?}", entry.versions);
        assert_eq!(entry.offset, 1);
    }

    #[test]
    fn versions_are_per_business_operation() {
        let p = policy(true);
        let mut s = UpsertState::default();
        s.apply(Some(&p), &[0], Event::Row(row("a", 5, "email")), 0);
        // An older version of another operation is not late.
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 3, "name")), 1),
            APPLIED
        );
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 4, "email")), 2),
            Outcome::Late(LateEvent {
                operation: Value::Text("email".into()),
                incoming: Value::Int(4),
                applied: Value::Int(5),
            })
        );
    }

    #[test]
    fn tombstones_delete_and_keep_versions() {
        let p = policy(false);
        let mut s = UpsertState::default();
        s.apply(Some(&p), &[0], Event::Row(row("a", 2, "x")), 0);
        drain(&mut s);
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Tombstone(key("a")), 1),
            APPLIED
        );
        assert_eq!(
            drain(&mut s),
            vec![(key("a"), Some(row("a", 2, "x")), None)]
        );
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Tombstone(key("a")), 1),
            Outcome::Duplicate
        );
        assert!(matches!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 1, "x")), 2),
            Outcome::Late(_)
        ));
        assert!(s.is_empty());
    }

    /// A user row under `late.owns`: id, version, operation, email, name.
    fn user(version: i64, op: &str, email: &str, name: &str) -> Row {
        vec![
            Value::Text("a".into()),
            Value::Int(version),
            Value::Text(op.into()),
            Value::Text(email.into()),
            Value::Text(name.into()),
        ]
    }

    fn owning() -> LatePolicy {
        LatePolicy {
            owns: Some(Ownership {
                operations: vec![
                    (Value::Text("email".into()), vec![3]),
                    (Value::Text("name".into()), vec![4]),
                ],
                owned: vec![false, false, false, true, true],
            }),
            ..policy(true)
        }
    }

    fn current(s: &UpsertState) -> Row {
        s.rows().next().cloned().expect("a row")
    }

    #[test]
    fn a_late_event_of_one_operation_does_not_revert_another_s_columns() {
        let p = owning();
        let mut s = UpsertState::default();
        s.apply(
            Some(&p),
            &[0],
            Event::Row(user(1, "created", "a@x", "A")),
            0,
        );
        s.apply(Some(&p), &[0], Event::Row(user(5, "email", "b@x", "A")), 1);
        // The name change at version 4 was made before the email change: its snapshot holds
        // the old email.
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Row(user(4, "name", "a@x", "Ann")), 2),
            APPLIED
        );
        assert_eq!(
            current(&s),
            user(5, "email", "b@x", "Ann"),
            "the name changes, the email and the unowned columns keep the newest event's"
        );
        // An operation that is not listed writes every column, each only when newer.
        s.apply(
            Some(&p),
            &[0],
            Event::Row(user(3, "created", "c@x", "C")),
            3,
        );
        assert_eq!(current(&s), user(5, "email", "b@x", "Ann"));
        s.apply(
            Some(&p),
            &[0],
            Event::Row(user(6, "imported", "d@x", "D")),
            4,
        );
        assert_eq!(current(&s), user(6, "imported", "d@x", "D"));
    }

    #[test]
    fn a_key_takes_its_first_event_whole_and_its_columns_date_from_it() {
        let p = owning();
        let mut s = UpsertState::default();
        s.apply(
            Some(&p),
            &[0],
            Event::Row(user(5, "email", "b@x", "Bea")),
            0,
        );
        assert_eq!(current(&s), user(5, "email", "b@x", "Bea"));
        // The name at version 3 is older than the snapshot that brought "Bea".
        s.apply(Some(&p), &[0], Event::Row(user(3, "name", "a@x", "Ann")), 1);
        assert_eq!(current(&s), user(5, "email", "b@x", "Bea"));
        // After a delete, the next event re-creates the row whole.
        s.apply(Some(&p), &[0], Event::Tombstone(key("a")), 2);
        s.apply(Some(&p), &[0], Event::Row(user(7, "name", "e@x", "Eve")), 3);
        assert_eq!(current(&s), user(7, "name", "e@x", "Eve"));
    }

    #[test]
    fn keep_applies_late_events_and_flags_them() {
        let p = LatePolicy {
            action: LateAction::Keep,
            ..policy(false)
        };
        let mut s = UpsertState::default();
        s.apply(Some(&p), &[0], Event::Row(row("a", 2, "x")), 0);
        drain(&mut s);
        assert_eq!(
            s.apply(Some(&p), &[0], Event::Row(row("a", 1, "x")), 1),
            Outcome::Changed {
                late: Some(LateEvent {
                    operation: Value::Null,
                    incoming: Value::Int(1),
                    applied: Value::Int(2),
                }),
                forgotten: None
            }
        );
        assert_eq!(
            drain(&mut s),
            vec![(key("a"), Some(row("a", 2, "x")), Some(row("a", 1, "x")))]
        );
    }

    #[test]
    fn without_policy_offsets_order_and_replays_are_duplicates() {
        let mut s = UpsertState::default();
        s.apply(None, &[0], Event::Row(row("a", 9, "x")), 5);
        assert_eq!(
            s.apply(None, &[0], Event::Row(row("a", 1, "x")), 5),
            Outcome::Duplicate
        );
        assert_eq!(
            s.apply(None, &[0], Event::Row(row("a", 1, "x")), 6),
            APPLIED
        );
        assert_eq!(
            drain(&mut s),
            vec![(key("a"), None, Some(row("a", 1, "x")))],
            "two changes of one key drain once"
        );
    }
}
