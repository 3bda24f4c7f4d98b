//! Changelogs: every task's state, written at the end of each epoch to a compacted topic
//! before the state directory commits it, so that an instance taking a partition over restores
//! the task's state from there and goes on at exactly the source offset that state is at.
//!
//! Rebuilding a partition's state from its source topic alone is wrong once the topic is
//! compacted: compaction keeps each key's newest *offset*, which may be a late event the task
//! dropped. The changelog keeps what the task decided instead.
//!
//! A changelog partition belongs to the source partition of the same number. It holds, per key,
//! the record `0x01 ++ key` (the key's bincode, as in the state directory) whose value is the
//! key's upsert entry as stored (no value: the entry was forgotten), and the record `0x00`
//! whose value is the offset of the last source record applied (8 bytes, big endian). An epoch
//! writes each partition's changed entries, then its `0x00` record, in one transaction; the
//! state directory keeps, with the task's state, the changelog offset it is at (its
//! *position*), so a later restore reads only what was written after it.
//!
//! With rows logged (for standby replicas that answer queries, see
//! [`crate::runtime::RuntimeConfig::log_rows`]), an epoch also writes each row of the internal
//! tables keyed by a source key whose key's entry changed to that source's changelog, in the
//! partition of the row's key: `0x02 ++ table ++ 0x00 ++ key` (`table` is the table's name and
//! a hash of its definition, [`logged_table`]; `key` the row key's binary encoding) whose
//! value is the row as served (no value: the row went). Rows that only come back (a task
//! opening) or go (a task revoked) without a change of their key's entry are not logged again
//! ([`without_rederived_rows`]). A task's restore skips row records: an owner derives its rows
//! from its state.
//!
//! A stage reading a global source also logs where it placed each key derived from the
//! partition's rows: `0x03 ++ stage ++ 0x00 ++ key` (`stage` is the stage's topic, `key` the
//! key's values in bincode) whose value is the partition of the stage's topic the key's record
//! is in (4 bytes, big endian; no value: it has none). A restore keeps them with the task's
//! state (see `runtime::placements`).

use std::collections::HashSet;

use crate::error::ErrorClass;
use crate::partition::murmur2;
use crate::plan::TablePlan;
use crate::state::key::encode_key;
use crate::state::{decode, Commit, StateStore, StoreError};
use crate::value::Value;

/// The key of a changelog partition's offset record.
pub const OFFSET_KEY: &[u8] = &[0];
/// The first byte of an entry record's key.
const ENTRY_TAG: u8 = 1;
/// The first byte of a row record's key.
const ROW_TAG: u8 = 2;
/// The first byte of a placement record's key.
const PLACEMENT_TAG: u8 = 3;

/// One record for a task's changelog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangelogRecord {
    /// The task's source, by its position in the topology.
    pub source: usize,
    /// The task's partition (the changelog partition of the same number).
    pub partition: u32,
    /// The record's key: [`OFFSET_KEY`] or `0x01 ++ key`.
    pub key: Vec<u8>,
    /// The record's value; `None` deletes the key from the compacted topic.
    pub value: Option<Vec<u8>>,
    /// Which topic it goes to.
    pub topic: RecordTopic,
}

/// The topic a record of an epoch's transaction goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordTopic {
    /// The changelog of the record's source.
    Changelog,
    /// The record's source's own topic: a repartition topic, written by the stage before it
    /// (see [`crate::plan::repartition`]).
    Source,
}

impl ChangelogRecord {
    /// The record of an upsert entry (`key`: the key's stored bincode; `entry`: the stored
    /// entry, `None` when forgotten).
    pub fn entry(source: usize, partition: u32, key: &[u8], entry: Option<Vec<u8>>) -> Self {
        let mut k = Vec::with_capacity(key.len() + 1);
        k.push(ENTRY_TAG);
        k.extend_from_slice(key);
        ChangelogRecord {
            source,
            partition,
            key: k,
            value: entry,
            topic: RecordTopic::Changelog,
        }
    }

    /// The record of a row of internal table `table` (`key`: the row key's binary encoding;
    /// `row`: the row as served, `None` when it went).
    pub fn row(
        (source, partition): (usize, u32),
        table: &str,
        key: &[u8],
        row: Option<Vec<u8>>,
    ) -> Self {
        ChangelogRecord {
            source,
            partition,
            key: named_key(ROW_TAG, table, key),
            value: row,
            topic: RecordTopic::Changelog,
        }
    }

    /// The record of where stage `stage` placed `key` (its values in bincode), derived from
    /// `task`'s rows: `partition` of its topic, `None` when it has no record.
    pub fn placement(
        (source, partition): (usize, u32),
        stage: &str,
        key: &[u8],
        placed: Option<u32>,
    ) -> Self {
        ChangelogRecord {
            source,
            partition,
            key: named_key(PLACEMENT_TAG, stage, key),
            value: placed.map(|p| p.to_be_bytes().to_vec()),
            topic: RecordTopic::Changelog,
        }
    }

    /// A record of repartition topic `source` (by the source reading it back), in
    /// `partition`: `row` (encoded) upserted under `key`, or `None` to delete it.
    pub fn repartitioned(source: usize, partition: u32, key: &str, row: Option<Vec<u8>>) -> Self {
        ChangelogRecord {
            source,
            partition,
            key: key.as_bytes().to_vec(),
            value: row,
            topic: RecordTopic::Source,
        }
    }

    /// The record of the last source offset applied.
    pub fn offset(source: usize, partition: u32, offset: i64) -> Self {
        ChangelogRecord {
            source,
            partition,
            key: OFFSET_KEY.to_vec(),
            value: Some(offset.to_be_bytes().to_vec()),
            topic: RecordTopic::Changelog,
        }
    }
}

/// The name `table`'s rows are logged under: its name and a hash of its definition, so that a
/// standby never answers with a row an earlier definition made.
pub fn logged_table(table: &TablePlan) -> String {
    let hash = murmur2(table.definition().as_bytes()) as u32;
    format!("{}#{hash:08x}", table.name)
}

/// `records` without the row records whose key's upsert entry did not change with them: a
/// row of a table keyed by a source key changes only with its key's entry, so the others
/// re-derive what the changelog holds already (a task opening puts its rows back into the
/// tables, a revoked one takes them out).
pub fn without_rederived_rows(records: Vec<ChangelogRecord>) -> Vec<ChangelogRecord> {
    if !records.iter().any(|r| r.key.first() == Some(&ROW_TAG)) {
        return records;
    }
    let changed: HashSet<(usize, u32, Vec<u8>)> = records
        .iter()
        .filter_map(|r| {
            let [ENTRY_TAG, key @ ..] = r.key.as_slice() else {
                return None;
            };
            if r.topic == RecordTopic::Source {
                return None;
            }
            let value: Value = decode(key).ok()?;
            Some((r.source, r.partition, encode_key(&[value])))
        })
        .collect();
    records
        .into_iter()
        .filter(|r| match read_record(Some(&r.key), r.value.as_deref()) {
            _ if r.topic == RecordTopic::Source => true,
            Ok(Logged::Row { key, .. }) => changed.contains(&(r.source, r.partition, key.to_vec())),
            _ => true,
        })
        .collect()
}

/// A changelog record read back.
#[derive(Debug, PartialEq, Eq)]
pub enum Logged<'a> {
    /// The last source offset applied as of this record.
    Offset(i64),
    /// A key's upsert entry (`None`: forgotten).
    Entry {
        /// The key's stored bincode.
        key: &'a [u8],
        /// The stored entry.
        entry: Option<&'a [u8]>,
    },
    /// A row of an internal table (`None`: it went).
    Row {
        /// The table's name.
        table: &'a str,
        /// The row key's binary encoding.
        key: &'a [u8],
        /// The row as served.
        row: Option<&'a [u8]>,
    },
    /// Where a stage reading a global source placed a key (`None`: it has no record).
    Placement {
        /// The stage's topic.
        stage: &'a str,
        /// The key's values in bincode.
        key: &'a [u8],
        /// The partition of the stage's topic its record is in.
        partition: Option<u32>,
    },
}

/// Reads a changelog record's key and value.
pub fn read_record<'a>(
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
) -> Result<Logged<'a>, ChangelogError> {
    match key {
        Some(k) if k == OFFSET_KEY => {
            let bytes: [u8; 8] = value
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| ChangelogError::malformed("an offset record is not 8 bytes"))?;
            Ok(Logged::Offset(i64::from_be_bytes(bytes)))
        }
        Some([ENTRY_TAG, rest @ ..]) if !rest.is_empty() => Ok(Logged::Entry {
            key: rest,
            entry: value,
        }),
        Some([ROW_TAG, rest @ ..]) => {
            let (table, key) = named(rest, "a row record's table")?;
            Ok(Logged::Row {
                table,
                key,
                row: value,
            })
        }
        Some([PLACEMENT_TAG, rest @ ..]) => {
            let (stage, key) = named(rest, "a placement record's stage")?;
            let partition = value
                .map(|v| {
                    v.try_into().map(u32::from_be_bytes).map_err(|_| {
                        ChangelogError::malformed("a placement record's value is not 4 bytes")
                    })
                })
                .transpose()?;
            Ok(Logged::Placement {
                stage,
                key,
                partition,
            })
        }
        _ => Err(ChangelogError::malformed(
            "the key is not an offset record's, an entry's, a row's or a placement's",
        )),
    }
}

/// The record key `tag ++ name ++ 0x00 ++ key` (read back by [`named`]).
fn named_key(tag: u8, name: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + key.len() + 2);
    k.push(tag);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// A record key's `name ++ 0x00 ++ key` split in two (`what` names the name in errors).
fn named<'a>(rest: &'a [u8], what: &str) -> Result<(&'a str, &'a [u8]), ChangelogError> {
    let at = rest
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| ChangelogError::malformed(&format!("{what} is missing")))?;
    let name = std::str::from_utf8(&rest[..at])
        .map_err(|_| ChangelogError::malformed(&format!("{what} is not UTF-8")))?;
    Ok((name, &rest[at + 1..]))
}

/// Where a task's changelog stands after a write: the changelog offset after the last record
/// written for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Where the records went: the source's changelog, or the source's own topic (a stage's
    /// repartition topic).
    pub topic: RecordTopic,
    /// The task's source.
    pub source: usize,
    /// The task's partition.
    pub partition: u32,
    /// The offset after the task's last record there.
    pub next: i64,
}

/// Writes the tasks' changelogs (the Kafka connector implements it).
pub trait ChangelogWriter: Send + Sync {
    /// Writes `records` (each partition's in order) atomically and durably; returns the
    /// position of every partition written to. Called once per epoch, before the state
    /// directory commits it: an epoch whose changelog is not written is not committed.
    fn write(&self, records: &[ChangelogRecord]) -> Result<Vec<Position>, ChangelogError>;
}

/// A changelog that could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("changelog: {message}")]
pub struct ChangelogError {
    /// What to do next.
    pub class: ErrorClass,
    /// What happened.
    pub message: String,
}

impl ChangelogError {
    /// A record that is not a changelog record: definite (skip it).
    pub fn malformed(message: &str) -> Self {
        ChangelogError {
            class: ErrorClass::Definite,
            message: message.to_string(),
        }
    }
}

/// What an assignment does with a task's changelog, from the task's position in the state
/// directory and the changelog partition's first and next offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestorePlan {
    /// Read the changelog from this offset (the local position) to its end, over the local
    /// state.
    From(i64),
    /// Drop the local state and read the whole changelog.
    Whole,
    /// The changelog has nothing: keep the local state, and log all of it with the next
    /// epoch (a state directory written before changelogs, or a changelog recreated).
    LogLocal,
}

/// Decides how to restore a task whose state directory is at `position` (none: never logged)
/// and holds state or not (`local_state`), given its changelog partition's `low` and `high`
/// watermarks.
pub fn plan_restore(position: Option<i64>, local_state: bool, low: i64, high: i64) -> RestorePlan {
    let empty = high <= low;
    match position {
        _ if empty && local_state => RestorePlan::LogLocal,
        Some(p) if p >= low && p <= high => RestorePlan::From(p),
        // Behind the changelog's start, or past its end (the topic was recreated).
        Some(p) if p > high && local_state => RestorePlan::LogLocal,
        _ => RestorePlan::Whole,
    }
}

/// Most records restored before they are written to the state directory (unsynced: only the
/// final write, with the offset and position, makes the restored state count).
const RESTORE_CHUNK: usize = 10_000;

/// A task's state being restored from its changelog into the state directory.
pub struct Restore {
    store: StateStore,
    source: usize,
    partition: u32,
    topic: String,
    commit: Commit,
    offset: Option<i64>,
    records: u64,
    /// Whether the rows logged are kept too, as a standby's (see [`Restore::standby`]).
    rows: bool,
}

impl Restore {
    /// Starts restoring `source`/`partition` (read from `topic`); with `whole`, the local state
    /// of the task is dropped first.
    pub fn start(
        store: &StateStore,
        source: usize,
        partition: u32,
        topic: &str,
        whole: bool,
    ) -> Result<Restore, StoreError> {
        if whole {
            store.drop_task(source, partition, topic)?;
        }
        Ok(Restore {
            store: store.clone(),
            source,
            partition,
            topic: topic.to_string(),
            commit: store.commit(),
            offset: None,
            records: 0,
            rows: false,
        })
    }

    /// Like [`Restore::start`], for a standby replica: the rows logged are kept as the
    /// partition's standby rows ([`StateStore::standby_row`]); with `whole`, the standby rows
    /// kept before are dropped too. Its [`Restore::finish`] marks them complete up to where it
    /// got.
    pub fn standby(
        store: &StateStore,
        (source, partition): (usize, u32),
        topic: &str,
        whole: bool,
    ) -> Result<Restore, StoreError> {
        if whole {
            store.drop_standby_rows(source, partition)?;
        }
        let mut restore = Restore::start(store, source, partition, topic, whole)?;
        restore.rows = true;
        Ok(restore)
    }

    /// Applies one changelog record; a malformed one is refused (the caller logs and skips it).
    pub fn apply(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<(), RestoreError> {
        match read_record(key, value)? {
            Logged::Offset(offset) => self.offset = Some(offset),
            Logged::Entry { key, entry } => {
                self.commit
                    .put_stored_entry(self.source, self.partition, key, entry);
            }
            Logged::Row { table, key, row } if self.rows => {
                self.commit
                    .put_standby_row((self.source, self.partition), table, key, row);
            }
            Logged::Row { .. } => {}
            Logged::Placement {
                stage,
                key,
                partition,
            } => {
                self.commit.put_stored_placement(
                    (self.source, self.partition),
                    stage,
                    key,
                    partition,
                );
            }
        }
        self.records += 1;
        if self.commit.len() >= RESTORE_CHUNK {
            let chunk = std::mem::replace(&mut self.commit, self.store.commit());
            self.store.write_unsynced(chunk)?;
        }
        Ok(())
    }

    /// Records read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Ends the restore at changelog offset `next`: writes what is left, the source offset
    /// and the position, durably. Returns the source offset the task is at.
    pub fn finish(mut self, next: i64) -> Result<Option<i64>, StoreError> {
        if let Some(offset) = self.offset {
            self.commit.put_offset(&self.topic, self.partition, offset);
        }
        self.commit
            .put_changelog_position(self.source, self.partition, next);
        if self.rows {
            self.commit
                .mark_standby_rows(self.source, self.partition, next);
        }
        self.store.write(self.commit)?;
        self.store.offset(&self.topic, self.partition)
    }
}

/// A restore that failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A record is not a changelog record (skip it).
    #[error(transparent)]
    Malformed(#[from] ChangelogError),
    /// The state directory failed: fatal.
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back() {
        let offset = ChangelogRecord::offset(0, 3, 41);
        assert_eq!(
            read_record(Some(&offset.key), offset.value.as_deref()).unwrap(),
            Logged::Offset(41)
        );
        let entry = ChangelogRecord::entry(0, 3, b"k", Some(b"e".to_vec()));
        assert_eq!(
            read_record(Some(&entry.key), entry.value.as_deref()).unwrap(),
            Logged::Entry {
                key: b"k",
                entry: Some(b"e")
            }
        );
        let row = ChangelogRecord::row((0, 3), "t", b"k", Some(b"{}".to_vec()));
        assert_eq!(
            read_record(Some(&row.key), row.value.as_deref()).unwrap(),
            Logged::Row {
                table: "t",
                key: b"k",
                row: Some(b"{}")
            }
        );
        let forgotten = ChangelogRecord::entry(0, 3, b"k", None);
        assert_eq!(
            read_record(Some(&forgotten.key), None).unwrap(),
            Logged::Entry {
                key: b"k",
                entry: None
            }
        );
    }

    #[test]
    fn placements_are_kept_logged_restored_and_dropped_with_their_task() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), &[])
            .unwrap()
            .logging(vec![true]);
        let mut c = store.commit();
        c.put_placement((0, 3), "stage", b"k1", Some(7));
        c.put_placement((0, 3), "stage", b"k2", Some(1));
        c.put_placement((0, 3), "other", b"k1", Some(2));
        c.put_placement((0, 4), "stage", b"k3", Some(5));
        let logged = c.take_changelog();
        store.write(c).unwrap();
        assert_eq!(store.placement((0, 3), "stage", b"k1").unwrap(), Some(7));
        assert_eq!(store.placement((0, 3), "stage", b"k3").unwrap(), None);
        assert_eq!(
            store.placements((0, 3), "stage").unwrap(),
            [(b"k1".to_vec(), 7), (b"k2".to_vec(), 1)]
        );

        // Another instance restores them from the changelog, a deletion included.
        let gone = ChangelogRecord::placement((0, 3), "stage", b"k2", None);
        assert_eq!(
            read_record(Some(&gone.key), None).unwrap(),
            Logged::Placement {
                stage: "stage",
                key: b"k2",
                partition: None
            }
        );
        let other = tempfile::tempdir().unwrap();
        let restored = StateStore::open(other.path(), &[]).unwrap();
        let mut restore = Restore::start(&restored, 0, 3, "users", false).unwrap();
        for r in logged.iter().chain([&gone]).filter(|r| r.partition == 3) {
            restore.apply(Some(&r.key), r.value.as_deref()).unwrap();
        }
        restore.finish(9).unwrap();
        assert_eq!(
            restored.placements((0, 3), "stage").unwrap(),
            [(b"k1".to_vec(), 7)]
        );
        assert_eq!(restored.placement((0, 3), "other", b"k1").unwrap(), Some(2));
        assert_eq!(restored.placements((0, 4), "stage").unwrap(), []);

        // A malformed value is refused, not stored.
        let mut restore = Restore::start(&restored, 0, 3, "users", false).unwrap();
        assert!(restore.apply(Some(&gone.key), Some(b"xyz")).is_err());

        store.drop_task(0, 3, "users").unwrap();
        assert_eq!(store.placements((0, 3), "stage").unwrap(), []);
        assert_eq!(store.placement((0, 3), "other", b"k1").unwrap(), None);
        assert_eq!(store.placement((0, 4), "stage", b"k3").unwrap(), Some(5));
    }

    #[test]
    fn rows_are_logged_with_a_change_of_their_key_only() {
        let key = |k: &str| Value::Text(k.into());
        let store_key = crate::state::encode(&key("u-1"));
        let changed = ChangelogRecord::entry(0, 1, &store_key, Some(b"e".to_vec()));
        let row = |k: &str, p: u32| {
            ChangelogRecord::row((0, p), "t#0", &encode_key(&[key(k)]), Some(b"{}".to_vec()))
        };
        let records = vec![
            changed.clone(),
            row("u-1", 1),
            // Re-derived: no entry changed with it.
            row("u-2", 1),
            // The same key in another partition is another task's.
            row("u-1", 2),
            ChangelogRecord::offset(0, 1, 9),
        ];
        assert_eq!(
            without_rederived_rows(records),
            vec![changed, row("u-1", 1), ChangelogRecord::offset(0, 1, 9)]
        );
    }

    #[test]
    fn foreign_records_are_malformed() {
        for (key, value) in [
            (None, Some(&b"x"[..])),
            (Some(&b"\x03k"[..]), Some(&b"x"[..])),
            (Some(&b"\x02k"[..]), Some(&b"x"[..])),
            (Some(&b"\x01"[..]), Some(&b"x"[..])),
            (Some(OFFSET_KEY), Some(&b"123"[..])),
            (Some(OFFSET_KEY), None),
        ] {
            let err = read_record(key, value).unwrap_err();
            assert_eq!(err.class, ErrorClass::Definite);
        }
    }

    #[test]
    fn restore_plans() {
        use RestorePlan::*;
        // Never logged, nothing local: the whole changelog.
        assert_eq!(plan_restore(None, false, 0, 0), Whole);
        assert_eq!(plan_restore(None, false, 0, 10), Whole);
        // Local state from before changelogs, changelog empty: log it.
        assert_eq!(plan_restore(None, true, 0, 0), LogLocal);
        // Local state at a position: from there.
        assert_eq!(plan_restore(Some(7), true, 0, 10), From(7));
        assert_eq!(plan_restore(Some(10), true, 0, 10), From(10));
        // Behind the changelog's start: the whole changelog.
        assert_eq!(plan_restore(Some(2), true, 5, 10), Whole);
        // Past its end: the topic was recreated; the local state is logged again.
        assert_eq!(plan_restore(Some(20), true, 0, 10), LogLocal);
        assert_eq!(plan_restore(Some(20), true, 0, 0), LogLocal);
        // Another writer's state and no local state: the whole changelog.
        assert_eq!(plan_restore(None, true, 0, 10), Whole);
    }
}
