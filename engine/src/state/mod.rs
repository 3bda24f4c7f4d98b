//! RocksDB state of an instance: upsert state, source offsets and internal table rows.
//!
//! Column families:
//! - `state`: per source partition, the upsert [`Entry`] of each key
//!   (`u/{source}/{partition}/{key}`, key and entry in bincode) and the last applied offset
//!   (`o/{topic}/{partition}`) and, with changelogs, the changelog offset the task's state is
//!   at (`l/{source}/{partition}`, see [`crate::changelog`]); a standby replica's rows of
//!   internal tables (`s/{source}/{partition}/{table}\0{key}`) and the changelog offset up to
//!   which they are complete (`r/{source}/{partition}`); where a stage reading a global
//!   source placed each key of the partition (`g/{source}/{partition}/{stage}\0{key}`, the
//!   key's values in bincode, the partition of the stage's topic as 4 bytes big endian; see
//!   [`StateStore::placements`]); the instance's id (`m/instance`) and last commit sequence
//!   (`m/sequence`); the layout each part of the state was written with (`m/layout/{what}`,
//!   see [`StateStore::keep_layout`]); and the *outbox* of external-table changes not yet
//!   confirmed by their database (`x/{sequence}`);
//! - `table.{name}`: the rows of internal table `name`, keyed by the binary encoding of their
//!   primary key ([`key`]), as JSON objects ready to serve.
//!
//! An epoch commit is one [`rocksdb::WriteBatch`] with the table deltas, upsert entries and
//! offsets of every task (each worker's writes sorted by key), written with `sync`: after a
//! crash the three agree. Table rows are derived data: [`StateStore::open`] clears them, and each
//! task re-inserts its partition's rows when it is assigned, so rows of partitions this
//! instance no longer owns never linger. Rows written under an earlier key encoding (the
//! URL form of the key) are gone after an open for the same reason: nothing to migrate.
//!
//! Queries read rows through [`TableReader`], the read-only view of the tables.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::changelog::ChangelogRecord;
use crate::value::Value;

pub mod key;
mod reader;

pub use reader::{ScanOrder, ScanRow, TableReader};

const STATE_CF: &str = "state";

/// A RocksDB failure, with the store's path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB returned an error.
    #[error("state store at {path}: {source}")]
    Rocks {
        /// The store's directory.
        path: PathBuf,
        /// The RocksDB error.
        source: rocksdb::Error,
    },
    /// The store's directory could not be created.
    #[error("state store at {path}: {source}")]
    Io {
        /// The store's directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store was written by a miroir that laid its values out differently.
    #[error("state store at {path}: written in state format {found}, this miroir reads format {FORMAT}; remove the directory to rebuild the state from the topics")]
    Incompatible {
        /// The store's directory.
        path: PathBuf,
        /// The format found.
        found: String,
    },
    /// A stored value could not be decoded (the store was written by an incompatible version).
    #[error("state store at {path}: corrupt entry {key}: {message}")]
    Corrupt {
        /// The store's directory.
        path: PathBuf,
        /// The key of the entry.
        key: String,
        /// What failed.
        message: String,
    },
}

impl StoreError {
    /// What to do next: stop. The state directory is unreadable, full, corrupt or of another
    /// format, and the instance cannot commit without it.
    pub fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::Fatal
    }
}

/// The instance's state store. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct StateStore {
    db: Arc<DB>,
    path: PathBuf,
    /// The internal tables, each in column family `table.{name}`.
    tables: Arc<[String]>,
    /// Whether commits also gather the tasks' changelog records, by source
    /// ([`StateStore::logging`]); empty when no source's are.
    logged: Arc<[bool]>,
}

/// How stored values are encoded: bincode with variable-length integers (a row of short
/// strings and small numbers takes about a third less than with fixed-width lengths).
fn codec() -> impl bincode::Options {
    bincode::DefaultOptions::new()
}

/// Encodes a value to store (upsert entries, rows, outbox batches).
pub(crate) fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    use bincode::Options;
    codec().serialize(value).expect("stored values serialize")
}

/// Decodes a stored value.
pub(crate) fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, bincode::Error> {
    use bincode::Options;
    codec().deserialize(bytes)
}

fn table_cf(table: &str) -> String {
    format!("table.{table}")
}

fn upsert_prefix(source: usize, partition: u32) -> Vec<u8> {
    format!("u/{source}/{partition:08x}/").into_bytes()
}

/// The prefix of the standby rows of `source`/`partition`.
fn standby_prefix(source: usize, partition: u32) -> Vec<u8> {
    format!("s/{source}/{partition:08x}/").into_bytes()
}

fn standby_row_key(source: usize, partition: u32, table: &str, key: &[u8]) -> Vec<u8> {
    let mut k = standby_prefix(source, partition);
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// The prefix of where the stages reading a global source placed the keys of
/// `source`/`partition`.
fn placements_prefix(source: usize, partition: u32) -> Vec<u8> {
    format!("g/{source}/{partition:08x}/").into_bytes()
}

/// The prefix of where stage `stage` placed the keys of `source`/`partition`.
fn stage_placements_prefix((source, partition): (usize, u32), stage: &str) -> Vec<u8> {
    let mut k = placements_prefix(source, partition);
    k.extend_from_slice(stage.as_bytes());
    k.push(0);
    k
}

/// The key of the changelog offset up to which the standby rows of a partition are complete.
fn standby_mark_key(source: usize, partition: u32) -> Vec<u8> {
    format!("r/{source}/{partition:08x}").into_bytes()
}

const INSTANCE_KEY: &[u8] = b"m/instance";
/// The layout of the stored values (`m/format`); stores from before it have none (format 1,
/// fixed-width bincode).
const FORMAT_KEY: &[u8] = b"m/format";
const FORMAT: &str = "2";
const SEQUENCE_KEY: &[u8] = b"m/sequence";
const OUTBOX_PREFIX: &[u8] = b"x/";

fn outbox_key(sequence: u64) -> Vec<u8> {
    let mut k = OUTBOX_PREFIX.to_vec();
    k.extend(sequence.to_be_bytes());
    k
}

/// Keys of a command processor's view of its entities: `c/<command>/e/<key>` (the row),
/// `c/<command>/o/<partition>` (the next offset of the entity topic to read) and
/// `c/<command>/k/<command id>` (the answer of a command read back from its entity event, with
/// until when it is kept; `c/<command>/a/<command id>` before, with when it was given).
fn command_key(command: &str, kind: char, rest: &str) -> Vec<u8> {
    format!("c/{command}/{kind}/{rest}").into_bytes()
}

/// A command processor's view as stored (see [`StateStore::command_view`]).
#[derive(Debug, Default)]
pub struct CommandView {
    /// The next offset of the entity topic to read, by partition.
    pub offsets: Vec<(i32, i64)>,
    /// The answers of the commands read back from their entity events.
    pub answers: Vec<StoredAnswer>,
}

/// A command's answer kept in a command processor's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    /// The command id.
    pub id: String,
    /// How long it is kept.
    pub kept: AnswerTime,
    /// The answer, as the caller serialized it.
    pub reply: Vec<u8>,
}

/// What a stored answer says of how long it is kept, in ms since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerTime {
    /// When it was given (answers stored before they carried their own time to be
    /// forgotten): the processor keeps them for its whole retention.
    AnsweredAt(i64),
    /// Until when it is kept.
    KeptUntil(i64),
}

fn offset_key(topic: &str, partition: u32) -> Vec<u8> {
    format!("o/{topic}/{partition:08x}").into_bytes()
}

fn position_key(source: usize, partition: u32) -> Vec<u8> {
    format!("l/{source}/{partition:08x}").into_bytes()
}

/// The prefix of the changelog positions of a source's partitions.
pub fn positions_prefix(source: usize) -> Vec<u8> {
    format!("l/{source}/").into_bytes()
}

/// The prefix of every key of a source: its upsert entries.
pub fn source_prefix(source: usize) -> Vec<u8> {
    format!("u/{source}/").into_bytes()
}

/// The prefix of the offsets of `topic`'s partitions.
pub fn offsets_prefix(topic: &str) -> Vec<u8> {
    format!("o/{topic}/").into_bytes()
}

/// The prefix of every key of a command processor's view `command`.
pub fn command_prefix(command: &str) -> Vec<u8> {
    format!("c/{command}/").into_bytes()
}

fn layout_key(what: &str) -> Vec<u8> {
    format!("m/layout/{what}").into_bytes()
}

/// The first key after every key that starts with `prefix` (which ends with `/`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

impl StateStore {
    /// Opens (or creates) the store in `dir` for the tables `tables`, clearing their rows.
    pub fn open(dir: &Path, tables: &[String]) -> Result<StateStore, StoreError> {
        let rocks = |source| StoreError::Rocks {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let existing = DB::list_cf(&opts, dir).unwrap_or_default();
        let mut cfs: Vec<String> = vec!["default".into(), STATE_CF.into()];
        for c in &existing {
            if !cfs.contains(c) {
                cfs.push(c.clone());
            }
        }
        let descriptors = cfs
            .iter()
            .map(|c| ColumnFamilyDescriptor::new(c, Options::default()));
        let mut db = DB::open_cf_descriptors(&opts, dir, descriptors).map_err(rocks)?;
        for cf in existing.iter().filter(|c| c.starts_with("table.")) {
            db.drop_cf(cf).map_err(rocks)?;
        }
        for t in tables {
            db.create_cf(table_cf(t), &Options::default())
                .map_err(rocks)?;
        }
        let store = StateStore {
            db: Arc::new(db),
            path: dir.to_path_buf(),
            tables: tables.into(),
            logged: Arc::new([]),
        };
        if store.get_state(INSTANCE_KEY)?.is_none() {
            let id = new_instance_id();
            let mut batch = WriteBatch::default();
            batch.put_cf(store.state_cf(), INSTANCE_KEY, id.as_bytes());
            batch.put_cf(store.state_cf(), FORMAT_KEY, FORMAT.as_bytes());
            store.db.write(batch).map_err(|e| store.rocks(e))?;
        }
        let format = store.get_state(FORMAT_KEY)?;
        if format.as_deref() != Some(FORMAT.as_bytes()) {
            return Err(StoreError::Incompatible {
                path: dir.to_path_buf(),
                found: format.map_or("1".into(), |f| String::from_utf8_lossy(&f).into_owned()),
            });
        }
        Ok(store)
    }

    /// The id of the store in `dir` without opening it for writing; `None` when there is no
    /// store there yet.
    pub fn peek_instance_id(dir: &Path) -> Result<Option<String>, StoreError> {
        if !dir.join("CURRENT").exists() {
            return Ok(None);
        }
        let opts = Options::default();
        let db = DB::open_cf_for_read_only(&opts, dir, [STATE_CF], false).map_err(|source| {
            StoreError::Rocks {
                path: dir.to_path_buf(),
                source,
            }
        })?;
        let cf = db
            .cf_handle(STATE_CF)
            .expect("opened with the state family");
        let id = db
            .get_cf(cf, INSTANCE_KEY)
            .map_err(|source| StoreError::Rocks {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(id.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    fn state_cf(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(STATE_CF)
            .expect("state column family exists")
    }

    fn get_state(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.state_cf(), key)
            .map_err(|e| self.rocks(e))
    }

    /// This store's id, made when it was created: external tables record which store built
    /// them, and a new store (a wiped state directory) rebuilds them.
    pub fn instance_id(&self) -> Result<String, StoreError> {
        Ok(self
            .get_state(INSTANCE_KEY)?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    }

    /// The sequence number of the last commit (0 before the first).
    pub fn sequence(&self) -> Result<u64, StoreError> {
        match self.get_state(SEQUENCE_KEY)? {
            None => Ok(0),
            Some(bytes) => bytes
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    key: "m/sequence".into(),
                    message: "sequence is not 8 bytes".into(),
                }),
        }
    }

    /// The outbox: encoded external-table changes not yet confirmed, by sequence.
    pub fn outbox(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.state_cf(), OUTBOX_PREFIX) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(OUTBOX_PREFIX) {
                break;
            }
            let sequence = k[OUTBOX_PREFIX.len()..]
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    key: String::from_utf8_lossy(&k).into_owned(),
                    message: "outbox key is not a sequence".into(),
                })?;
            out.push((sequence, v.to_vec()));
        }
        Ok(out)
    }

    /// Removes an outbox entry once its database confirmed it (not synced: losing the removal
    /// only makes the next start offer the entry again, and the database skips it).
    pub fn remove_outbox(&self, sequence: u64) -> Result<(), StoreError> {
        self.db
            .delete_cf(self.state_cf(), outbox_key(sequence))
            .map_err(|e| self.rocks(e))
    }

    fn rocks(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            path: self.path.clone(),
            source,
        }
    }

    /// A command processor's persisted view, without its entity rows (read one by one with
    /// [`StateStore::command_row`]): the next offset of the entity topic to read by partition,
    /// and the answers of the commands read back.
    pub fn command_view(&self, command: &str) -> Result<CommandView, StoreError> {
        let mut view = CommandView::default();
        self.each_command_item(command, 'o', |partition, v| {
            let partition = partition.parse().ok();
            let next = <[u8; 8]>::try_from(v).ok().map(i64::from_be_bytes);
            let (Some(p), Some(n)) = (partition, next) else {
                return Err("not a partition offset".into());
            };
            view.offsets.push((p, n));
            Ok(())
        })?;
        for (kind, kept) in [
            ('a', AnswerTime::AnsweredAt as fn(i64) -> AnswerTime),
            ('k', AnswerTime::KeptUntil),
        ] {
            self.each_command_item(command, kind, |id, v| {
                let Some((ms, reply)) = v.split_first_chunk::<8>() else {
                    return Err("not a command answer".into());
                };
                view.answers.push(StoredAnswer {
                    id: id.to_string(),
                    kept: kept(i64::from_be_bytes(*ms)),
                    reply: reply.to_vec(),
                });
                Ok(())
            })?;
        }
        Ok(view)
    }

    /// The entity row of `key` in command processor `command`'s view, if it has one.
    pub fn command_row(&self, command: &str, key: &str) -> Result<Option<Vec<Value>>, StoreError> {
        let item = command_key(command, 'e', key);
        let Some(bytes) = self.get_state(&item)? else {
            return Ok(None);
        };
        decode(&bytes).map(Some).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            key: String::from_utf8_lossy(&item).into_owned(),
            message: e.to_string(),
        })
    }

    /// Hands each item of kind `kind` of command `command`'s view to `each` (the rest of its
    /// key, its value); what `each` cannot read is reported as corrupt.
    fn each_command_item(
        &self,
        command: &str,
        kind: char,
        mut each: impl FnMut(&str, &[u8]) -> Result<(), String>,
    ) -> Result<(), StoreError> {
        let prefix = command_key(command, kind, "");
        for item in self.db.prefix_iterator_cf(self.state_cf(), &prefix) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let rest = String::from_utf8_lossy(&k[prefix.len()..]);
            each(&rest, &v).map_err(|message| StoreError::Corrupt {
                path: self.path.clone(),
                key: String::from_utf8_lossy(&k).into_owned(),
                message,
            })?;
        }
        Ok(())
    }

    /// Writes `commit` without waiting for the disk (for state that can be read again, such
    /// as a command processor's view).
    pub fn write_unsynced(&self, commit: Commit) -> Result<(), StoreError> {
        self.db.write(self.batch(commit)).map_err(|e| self.rocks(e))
    }

    /// The last committed offset of `topic`/`partition`.
    pub fn offset(&self, topic: &str, partition: u32) -> Result<Option<i64>, StoreError> {
        self.get_i64(&offset_key(topic, partition))
    }

    /// The persisted upsert entry of `key` in `source`/`partition`, as stored (see
    /// [`crate::ingest::upsert::Entry::decode_stored`]).
    pub fn upsert_entry(
        &self,
        source: usize,
        partition: u32,
        key: &Value,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut k = upsert_prefix(source, partition);
        bincode::Options::serialize_into(codec(), &mut k, key).expect("values serialize");
        self.get_state(&k)
    }

    /// The persisted upsert entries of `source`/`partition` (see
    /// [`crate::ingest::upsert::Entry`]), each decoded by `decode_entry`.
    pub fn upsert_entries<E>(
        &self,
        source: usize,
        partition: u32,
        decode_entry: impl Fn(&[u8]) -> Result<E, bincode::Error>,
    ) -> Result<Vec<(Value, E)>, StoreError> {
        let cf = self
            .db
            .cf_handle(STATE_CF)
            .expect("state column family exists");
        let prefix = upsert_prefix(source, partition);
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(&cf, &prefix) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let corrupt = |message: String| StoreError::Corrupt {
                path: self.path.clone(),
                key: String::from_utf8_lossy(&k).into_owned(),
                message,
            };
            let key: Value = decode(&k[prefix.len()..]).map_err(|e| corrupt(e.to_string()))?;
            let entry = decode_entry(&v).map_err(|e| corrupt(e.to_string()))?;
            out.push((key, entry));
        }
        Ok(out)
    }

    /// The partition of stage `stage`'s topic the record of `key` (its values in bincode),
    /// derived from `task`'s rows, was last written to; `None` when it has none.
    pub fn placement(
        &self,
        task: (usize, u32),
        stage: &str,
        key: &[u8],
    ) -> Result<Option<u32>, StoreError> {
        let mut k = stage_placements_prefix(task, stage);
        k.extend_from_slice(key);
        self.get_state(&k)?
            .map(|bytes| self.read_placement(&k, &bytes))
            .transpose()
    }

    /// Every key stage `stage` placed from `task`'s rows, with the partition of its record.
    pub fn placements(
        &self,
        task: (usize, u32),
        stage: &str,
    ) -> Result<Vec<(Vec<u8>, u32)>, StoreError> {
        let prefix = stage_placements_prefix(task, stage);
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.state_cf(), &prefix) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push((k[prefix.len()..].to_vec(), self.read_placement(&k, &v)?));
        }
        Ok(out)
    }

    fn read_placement(&self, key: &[u8], bytes: &[u8]) -> Result<u32, StoreError> {
        self.read_bytes(key, bytes).map(u32::from_be_bytes)
    }

    /// Forgets everything the store knows of `key` in `source` (its row and the order values
    /// of its last events, in whichever partition), so the next event of the key applies
    /// whatever its order value: the repair of a key frozen by an event with an order value
    /// far too large. Returns the entries removed. The instance must be stopped; its next
    /// start re-derives the tables without the key.
    pub fn forget_key(&self, source: usize, key: &Value) -> Result<usize, StoreError> {
        let prefix = source_prefix(source);
        // `u/{source}/` then the partition (8 hex digits) and `/`.
        let key_at = prefix.len() + 9;
        let mut forgotten = Vec::new();
        for item in self.db.prefix_iterator_cf(self.state_cf(), &prefix) {
            let (k, _) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            if k.len() > key_at && decode::<Value>(&k[key_at..]).ok().as_ref() == Some(key) {
                forgotten.push(k.to_vec());
            }
        }
        let mut batch = WriteBatch::default();
        for k in &forgotten {
            batch.delete_cf(self.state_cf(), k);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(|e| self.rocks(e))?;
        Ok(forgotten.len())
    }

    /// Records that the state under `prefixes` (named `what`) is written with `layout` (what
    /// the stored values' positions depend on: a source's columns, say). When another layout
    /// was recorded, that state is deleted first, to be rebuilt from its topic rather than
    /// misread; returns the layout it had then. A store from before layouts were recorded is
    /// taken to have the current one.
    pub fn keep_layout(
        &self,
        what: &str,
        layout: &str,
        prefixes: &[Vec<u8>],
    ) -> Result<Option<String>, StoreError> {
        let key = layout_key(what);
        let recorded = self.get_state(&key)?;
        if recorded.as_deref() == Some(layout.as_bytes()) {
            return Ok(None);
        }
        let mut batch = WriteBatch::default();
        let cf = self.state_cf();
        let changed = recorded.map(|r| String::from_utf8_lossy(&r).into_owned());
        if changed.is_some() {
            for prefix in prefixes {
                batch.delete_range_cf(cf, prefix.as_slice(), prefix_end(prefix).as_slice());
            }
        }
        batch.put_cf(cf, key, layout.as_bytes());
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(|e| self.rocks(e))?;
        Ok(changed)
    }

    /// Whether a layout was recorded for `what` (see [`StateStore::keep_layout`]).
    pub fn has_layout(&self, what: &str) -> Result<bool, StoreError> {
        Ok(self.get_state(&layout_key(what))?.is_some())
    }

    /// Deletes every state key starting with one of `prefixes`, durably.
    pub fn delete_prefixes(&self, prefixes: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for prefix in prefixes {
            let end = prefix_end(prefix);
            batch.delete_range_cf(self.state_cf(), prefix.as_slice(), end.as_slice());
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(|e| self.rocks(e))
    }

    /// Writes `commit` atomically and durably.
    pub fn write(&self, commit: Commit) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .write_opt(self.batch(commit), &opts)
            .map_err(|e| self.rocks(e))
    }

    /// Starts an empty commit.
    pub fn commit(&self) -> Commit {
        Commit {
            tables: self.tables.clone(),
            writes: Vec::new(),
            bytes: 0,
            changelog: self.logged.contains(&true).then(Vec::new),
            logged: self.logged.clone(),
        }
    }

    /// This store, whose commits also gather the changelog records of the changes of the
    /// tasks of each source `logged` says (by source position; [`Commit::take_changelog`]).
    pub fn logging(mut self, logged: Vec<bool>) -> StateStore {
        self.logged = logged.into();
        self
    }

    /// The changelog offset the state of `source`/`partition` is at, if it was ever logged.
    pub fn changelog_position(
        &self,
        source: usize,
        partition: u32,
    ) -> Result<Option<i64>, StoreError> {
        self.get_i64(&position_key(source, partition))
    }

    /// Whether the state directory holds upsert entries of `source`/`partition`.
    pub fn has_entries(&self, source: usize, partition: u32) -> Result<bool, StoreError> {
        let prefix = upsert_prefix(source, partition);
        match self.db.prefix_iterator_cf(self.state_cf(), &prefix).next() {
            Some(item) => Ok(item.map_err(|e| self.rocks(e))?.0.starts_with(&prefix)),
            None => Ok(false),
        }
    }

    /// Drops the state of the task of `source`/`partition` (read from `topic`): its upsert
    /// entries, the placements of its stages' keys, offset and changelog position, durably.
    pub fn drop_task(&self, source: usize, partition: u32, topic: &str) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let cf = self.state_cf();
        for prefix in [
            upsert_prefix(source, partition),
            placements_prefix(source, partition),
        ] {
            batch.delete_range_cf(cf, prefix.as_slice(), prefix_end(&prefix).as_slice());
        }
        batch.delete_cf(cf, offset_key(topic, partition));
        batch.delete_cf(cf, position_key(source, partition));
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(|e| self.rocks(e))
    }

    /// The row of `key` (its binary encoding) in internal table `table` as the standby replica
    /// of `source`/`partition` holds it.
    pub fn standby_row(
        &self,
        (source, partition): (usize, u32),
        table: &str,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_state(&standby_row_key(source, partition, table, key))
    }

    /// The changelog offset up to which the standby rows of `source`/`partition` are complete:
    /// a standby kept them from the changelog's start to there.
    pub fn standby_rows_at(
        &self,
        source: usize,
        partition: u32,
    ) -> Result<Option<i64>, StoreError> {
        self.get_i64(&standby_mark_key(source, partition))
    }

    /// Drops the standby rows of `source`/`partition` and their mark, durably.
    pub fn drop_standby_rows(&self, source: usize, partition: u32) -> Result<(), StoreError> {
        let prefix = standby_prefix(source, partition);
        let mut batch = WriteBatch::default();
        let cf = self.state_cf();
        batch.delete_range_cf(cf, prefix.as_slice(), prefix_end(&prefix).as_slice());
        batch.delete_cf(cf, standby_mark_key(source, partition));
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(|e| self.rocks(e))
    }

    /// Forgets the changelog position of `source`/`partition`: its task logs its whole state
    /// with the next epoch.
    pub fn forget_changelog_position(
        &self,
        source: usize,
        partition: u32,
    ) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .delete_cf_opt(self.state_cf(), position_key(source, partition), &opts)
            .map_err(|e| self.rocks(e))
    }

    /// The 8-byte big-endian number stored under `key` in the state, if any.
    fn get_i64(&self, key: &[u8]) -> Result<Option<i64>, StoreError> {
        self.get_state(key)?
            .map(|bytes| self.read_i64(key, &bytes))
            .transpose()
    }

    fn read_i64(&self, key: &[u8], bytes: &[u8]) -> Result<i64, StoreError> {
        self.read_bytes(key, bytes).map(i64::from_be_bytes)
    }

    /// The `N` bytes stored under `key`; corrupt when there are not exactly `N`.
    fn read_bytes<const N: usize>(&self, key: &[u8], bytes: &[u8]) -> Result<[u8; N], StoreError> {
        bytes.try_into().map_err(|_| StoreError::Corrupt {
            path: self.path.clone(),
            key: String::from_utf8_lossy(key).into_owned(),
            message: format!("not {N} bytes"),
        })
    }

    /// The write batch of `commit`, sized once for all its writes.
    fn batch(&self, commit: Commit) -> WriteBatch {
        // RocksDB adds a few bytes per write (type, family, two varint lengths).
        let mut batch =
            WriteBatch::with_capacity_bytes(commit.bytes + 16 * commit.writes.len() + 12);
        let state = self.state_cf();
        let tables: Vec<&rocksdb::ColumnFamily> = self
            .tables
            .iter()
            .map(|t| {
                self.db
                    .cf_handle(&table_cf(t))
                    .expect("table column family created at open")
            })
            .collect();
        for write in commit.writes {
            let cf = match write.family {
                Family::State => state,
                Family::Table(i) => tables[i],
            };
            match write.value {
                Some(value) => batch.put_cf(cf, write.key, value),
                None => batch.delete_cf(cf, write.key),
            }
        }
        batch
    }
}

/// The column family a write goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    State,
    /// An internal table, by its position in the store's tables.
    Table(usize),
}

/// One put (`value`) or delete (`None`).
struct Write {
    family: Family,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

/// The writes of one epoch. Each worker fills its own commit (encoding in parallel, without a
/// lock), sorts it ([`Commit::sort`]) and [`Commit::append`]s it to the epoch's; the store then
/// writes them in one [`WriteBatch`].
pub struct Commit {
    tables: Arc<[String]>,
    writes: Vec<Write>,
    /// Bytes of keys and values, to size the batch.
    bytes: usize,
    /// The changelog records of the tasks' changes, when the store logs them.
    changelog: Option<Vec<ChangelogRecord>>,
    /// Whether the tasks of each source are logged.
    logged: Arc<[bool]>,
}

impl Commit {
    fn push(&mut self, family: Family, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.bytes += key.len() + value.as_ref().map_or(0, Vec::len);
        self.writes.push(Write { family, key, value });
    }

    fn table(&self, table: &str) -> Family {
        Family::Table(
            self.tables
                .iter()
                .position(|t| t == table)
                .expect("table column family created at open"),
        )
    }

    /// Where the changes of `source`'s tasks are logged, if they are.
    fn log_of(&mut self, source: usize) -> Option<&mut Vec<ChangelogRecord>> {
        match self.logged.get(source) {
            Some(true) => self.changelog.as_mut(),
            _ => None,
        }
    }

    /// Puts a table row under its encoded key ([`key::encode_row_key`]).
    pub fn put_row(&mut self, table: &str, key: Vec<u8>, json: Vec<u8>) {
        let family = self.table(table);
        self.push(family, key, Some(json));
    }

    /// Deletes a table row by its encoded key.
    pub fn delete_row(&mut self, table: &str, key: Vec<u8>) {
        let family = self.table(table);
        self.push(family, key, None);
    }

    /// Persists the upsert entry of `key` (see [`crate::ingest::upsert::Entry`]).
    pub fn put_entry<E: serde::Serialize>(
        &mut self,
        source: usize,
        partition: u32,
        key: &Value,
        entry: &E,
    ) {
        let mut k = upsert_prefix(source, partition);
        let at = k.len();
        bincode::Options::serialize_into(codec(), &mut k, key).expect("values serialize");
        let value = encode(entry);
        if let Some(log) = self.log_of(source) {
            log.push(ChangelogRecord::entry(
                source,
                partition,
                &k[at..],
                Some(value.clone()),
            ));
        }
        self.push(Family::State, k, Some(value));
    }

    /// Deletes the upsert entry of `key` in `source`/`partition`.
    pub fn delete_entry(&mut self, source: usize, partition: u32, key: &Value) {
        let mut k = upsert_prefix(source, partition);
        let at = k.len();
        bincode::Options::serialize_into(codec(), &mut k, key).expect("values serialize");
        if let Some(log) = self.log_of(source) {
            log.push(ChangelogRecord::entry(source, partition, &k[at..], None));
        }
        self.push(Family::State, k, None);
    }

    /// Puts an upsert entry as a changelog holds it (`key` and `entry` encoded as stored;
    /// `None` deletes it). Not logged: it comes from the changelog.
    pub fn put_stored_entry(
        &mut self,
        source: usize,
        partition: u32,
        key: &[u8],
        entry: Option<&[u8]>,
    ) {
        let mut k = upsert_prefix(source, partition);
        k.extend_from_slice(key);
        self.push(Family::State, k, entry.map(<[u8]>::to_vec));
    }

    /// Records that stage `stage`'s record of `key` (its values in bincode), derived from
    /// `task`'s rows, is in `partition` of its topic now (`None`: it has none), and logs it
    /// to the task's changelog when the store logs.
    pub fn put_placement(
        &mut self,
        task: (usize, u32),
        stage: &str,
        key: &[u8],
        partition: Option<u32>,
    ) {
        if let Some(log) = self.changelog.as_mut() {
            log.push(ChangelogRecord::placement(task, stage, key, partition));
        }
        self.put_stored_placement(task, stage, key, partition);
    }

    /// Puts a placement as a changelog holds it (see [`Commit::put_placement`]). Not logged:
    /// it comes from the changelog.
    pub fn put_stored_placement(
        &mut self,
        task: (usize, u32),
        stage: &str,
        key: &[u8],
        partition: Option<u32>,
    ) {
        let mut k = stage_placements_prefix(task, stage);
        k.extend_from_slice(key);
        self.push(
            Family::State,
            k,
            partition.map(|p| p.to_be_bytes().to_vec()),
        );
    }

    /// Puts a row a standby replica read from the changelog of `source`/`partition` (`None`
    /// deletes it).
    pub fn put_standby_row(
        &mut self,
        (source, partition): (usize, u32),
        table: &str,
        key: &[u8],
        row: Option<&[u8]>,
    ) {
        let k = standby_row_key(source, partition, table, key);
        self.push(Family::State, k, row.map(<[u8]>::to_vec));
    }

    /// Records that the standby rows of `source`/`partition` are complete up to changelog
    /// offset `next`.
    pub fn mark_standby_rows(&mut self, source: usize, partition: u32, next: i64) {
        self.push(
            Family::State,
            standby_mark_key(source, partition),
            Some(next.to_be_bytes().to_vec()),
        );
    }

    /// Logs a row change of internal table `table` to the changelog partition of the row's
    /// key (`key`: the row key's encoding; `row`: the row as served, `None` when it went),
    /// when the store logs.
    pub fn log_row(&mut self, task: (usize, u32), table: &str, key: &[u8], row: Option<&[u8]>) {
        if let Some(log) = self.changelog.as_mut() {
            log.push(ChangelogRecord::row(
                task,
                table,
                key,
                row.map(<[u8]>::to_vec),
            ));
        }
    }

    /// Adds a record of a repartition topic to the epoch's transaction, when the store logs
    /// (a topology with repartitions runs with changelogs).
    pub fn produce(&mut self, record: ChangelogRecord) {
        if let Some(log) = self.changelog.as_mut() {
            log.push(record);
        }
    }

    /// Records the last applied offset of a partition.
    pub fn put_offset(&mut self, topic: &str, partition: u32, offset: i64) {
        self.push(
            Family::State,
            offset_key(topic, partition),
            Some(offset.to_be_bytes().to_vec()),
        );
    }

    /// Records the last applied offset of `source`'s partition (of `topic`), and logs it
    /// after the partition's entries.
    pub fn put_task_offset(&mut self, (source, topic): (usize, &str), partition: u32, offset: i64) {
        if let Some(log) = self.changelog.as_mut() {
            log.push(ChangelogRecord::offset(source, partition, offset));
        }
        self.put_offset(topic, partition, offset);
    }

    /// Records the changelog offset the state of `source`/`partition` is at.
    pub fn put_changelog_position(&mut self, source: usize, partition: u32, next: i64) {
        self.push(
            Family::State,
            position_key(source, partition),
            Some(next.to_be_bytes().to_vec()),
        );
    }

    /// The changelog records gathered so far (in the order of the changes), leaving none.
    pub fn take_changelog(&mut self) -> Vec<ChangelogRecord> {
        self.changelog
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Puts an entity row of command `command`'s view.
    pub fn put_command_row(&mut self, command: &str, key: &str, row: &[Value]) {
        self.push(
            Family::State,
            command_key(command, 'e', key),
            Some(encode(row)),
        );
    }

    /// Records the answer (`reply`, serialized by the caller) of command `id`, kept until
    /// `until_ms` (ms since the epoch), in command `command`'s view.
    pub fn put_command_answer(&mut self, command: &str, id: &str, until_ms: i64, reply: &[u8]) {
        let mut value = until_ms.to_be_bytes().to_vec();
        value.extend_from_slice(reply);
        self.push(Family::State, command_key(command, 'k', id), Some(value));
    }

    /// Forgets the answer of command `id` in command `command`'s view.
    pub fn delete_command_answer(&mut self, command: &str, id: &str) {
        self.push(Family::State, command_key(command, 'k', id), None);
        self.push(Family::State, command_key(command, 'a', id), None);
    }

    /// Records the next offset of the entity topic's `partition` for command `command`'s view.
    pub fn put_command_offset(&mut self, command: &str, partition: i32, next: i64) {
        self.push(
            Family::State,
            command_key(command, 'o', &partition.to_string()),
            Some(next.to_be_bytes().to_vec()),
        );
    }

    /// Records the commit's sequence number and its outbox entry (external-table changes).
    pub fn put_outbox(&mut self, sequence: u64, changes: Vec<u8>) {
        self.push(
            Family::State,
            SEQUENCE_KEY.to_vec(),
            Some(sequence.to_be_bytes().to_vec()),
        );
        self.push(Family::State, outbox_key(sequence), Some(changes));
    }

    /// Orders the writes by column family and key, keeping the order of writes to the same
    /// key. RocksDB inserts a batch's keys into its memtables one by one; in key order each
    /// insertion starts where the previous one ended instead of searching from the top.
    pub fn sort(&mut self) {
        self.writes
            .sort_by(|a, b| (a.family, &a.key).cmp(&(b.family, &b.key)));
    }

    /// Adds `other`'s writes after this commit's.
    pub fn append(&mut self, mut other: Commit) {
        self.bytes += other.bytes;
        self.writes.append(&mut other.writes);
        if let (Some(log), Some(other)) = (self.changelog.as_mut(), other.changelog.as_mut()) {
            log.append(other);
        }
    }

    /// Bytes of keys and values in the commit.
    pub fn size(&self) -> usize {
        self.bytes
    }

    /// Number of writes in the commit.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether the commit writes nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// A fresh id: time and process-local randomness, hex. Unique enough to tell two state
/// directories apart.
fn new_instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    format!("{:016x}{:08x}", h.finish(), (nanos & 0xffff_ffff) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_in_another_format_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), &[]).unwrap();
        drop(store);
        // Reopening a store of this format works.
        let store = StateStore::open(dir.path(), &[]).unwrap();
        // A store from before the format key (format 1).
        store.db.delete_cf(store.state_cf(), FORMAT_KEY).unwrap();
        drop(store);
        let err = StateStore::open(dir.path(), &[]).err().expect("refused");
        assert!(
            matches!(&err, StoreError::Incompatible { found, .. } if found == "1"),
            "{err}"
        );
        assert!(err.to_string().contains("remove the directory"), "{err}");
    }

    #[test]
    fn a_forgotten_key_leaves_every_partition_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), &[]).unwrap();
        let (a, b) = (Value::Text("a".into()), Value::Text("b".into()));
        let mut c = store.commit();
        c.put_entry(0, 0, &a, &1u8);
        c.put_entry(0, 1, &a, &2u8);
        c.put_entry(0, 1, &b, &3u8);
        c.put_entry(1, 0, &a, &4u8);
        store.write(c).unwrap();
        assert_eq!(store.forget_key(0, &a).unwrap(), 2);
        assert!(store
            .upsert_entries(0, 0, |b| decode::<u8>(b))
            .unwrap()
            .is_empty());
        assert_eq!(
            store.upsert_entries(0, 1, |b| decode::<u8>(b)).unwrap(),
            vec![(b, 3)]
        );
        assert_eq!(
            store.upsert_entries(1, 0, |b| decode::<u8>(b)).unwrap(),
            vec![(a, 4)]
        );
    }

    #[test]
    fn command_views_round_trip_apart_from_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), &[]).unwrap();
        let row = vec![Value::Text("u-1".into()), Value::Int(3)];
        let mut c = store.commit();
        c.put_command_row("update_email", "u-1", &row);
        c.put_command_row("update_name", "u-1", &row);
        c.put_command_offset("update_email", 0, 42);
        c.put_command_offset("update_email", 11, 7);
        c.put_command_answer("update_email", "cmd-1", 1_700_000_000_000, b"{\"ok\":1}");
        c.put_command_answer("update_email", "cmd-2", 5, b"");
        c.delete_command_answer("update_email", "cmd-2");
        store.write_unsynced(c).unwrap();
        let mut view = store.command_view("update_email").unwrap();
        view.offsets.sort();
        assert_eq!(
            store.command_row("update_email", "u-1").unwrap(),
            Some(row.clone())
        );
        assert_eq!(store.command_row("update_email", "u-2").unwrap(), None);
        assert_eq!(view.offsets, vec![(0, 42), (11, 7)]);
        let answer = StoredAnswer {
            id: "cmd-1".into(),
            kept: AnswerTime::KeptUntil(1_700_000_000_000),
            reply: b"{\"ok\":1}".to_vec(),
        };
        assert_eq!(view.answers, vec![answer.clone()]);
        let other = store.command_view("update_name").unwrap();
        assert_eq!((other.offsets.len(), other.answers.len()), (0, 0));
        assert_eq!(
            store.command_row("update_name", "u-1").unwrap(),
            Some(row.clone())
        );
        drop(store);
        let reopened = StateStore::open(dir.path(), &[]).unwrap();
        let view = reopened.command_view("update_email").unwrap();
        assert_eq!(view.answers, vec![answer]);
        assert_eq!(
            reopened.command_row("update_email", "u-1").unwrap(),
            Some(row)
        );
    }

    #[test]
    fn answers_stored_with_their_time_given_are_read_and_forgotten_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), &[]).unwrap();
        let mut c = store.commit();
        let mut value = 1_600_000_000_000i64.to_be_bytes().to_vec();
        value.extend_from_slice(b"{}");
        c.push(
            Family::State,
            command_key("update_email", 'a', "legacy"),
            Some(value),
        );
        c.put_command_answer("update_email", "new", 1_700_000_000_000, b"{}");
        store.write_unsynced(c).unwrap();
        let view = store.command_view("update_email").unwrap();
        let kept: Vec<_> = view
            .answers
            .iter()
            .map(|a| (a.id.as_str(), a.kept))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("legacy", AnswerTime::AnsweredAt(1_600_000_000_000)),
                ("new", AnswerTime::KeptUntil(1_700_000_000_000)),
            ]
        );
        let mut c = store.commit();
        c.delete_command_answer("update_email", "legacy");
        store.write_unsynced(c).unwrap();
        let view = store.command_view("update_email").unwrap();
        assert_eq!(view.answers.len(), 1, "the old kind is deleted too");
    }
}
