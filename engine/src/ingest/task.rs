//! A task: one partition of one source, owned by one worker, so the records of a key are
//! always applied in offset order by one thread.
//!
//! A task decodes each record, puts it through the late policy and its upsert state, and at
//! the end of each epoch hands the dataflow one retraction and one insertion per changed key
//! and the epoch's commit its upsert entries and last offset.

use differential_dataflow::input::InputSession;
use tracing::{debug, info, warn};

use super::decode::decode;
use super::protocol::{ErrorSink, Record, Records};
use super::stream::EntityRows;
use super::upsert::{Entry, Event, LateEvent, Outcome, UpsertState};
use crate::dataflow::Epoch;
use crate::metrics::{operation_label, Metrics};
use crate::state::Commit;
use crate::topology::Source;
use crate::value::{Row, Value};

/// One partition of one source.
pub(crate) struct Task {
    state: UpsertState,
    /// Last applied offset.
    offset: Option<i64>,
    /// Whether `offset` moved since the last flush.
    offset_dirty: bool,
    /// When deleted keys past their retention were last forgotten (ms since the epoch).
    forgot_at_ms: i64,
    /// For a stream source keeping a number of rows per entity: each entity's rows, made
    /// from the state on the first record.
    entities: Option<EntityRows>,
}

/// Where a task's records come from and where what goes wrong with them is told.
pub(crate) struct Origin<'a> {
    /// The source.
    pub source: &'a Source,
    /// The partition.
    pub partition: u32,
    /// Counters of records, late, duplicate and malformed events.
    pub metrics: &'a Metrics,
    /// Where malformed records are copied: by the first source reading the topic only, so
    /// that a record several sources cannot decode is copied once (each source counts and
    /// logs it).
    pub errors: Option<&'a dyn ErrorSink>,
}

impl Task {
    /// A task restored from its persisted upsert `entries` and last applied `offset`; its
    /// rows are inserted into `input`.
    pub(crate) fn restore(
        entries: Vec<(Value, Entry)>,
        offset: Option<i64>,
        input: &mut InputSession<Epoch, Row, isize>,
    ) -> Task {
        let state = UpsertState::restore(entries);
        for row in state.rows() {
            input.update(row.clone(), 1);
        }
        Task {
            state,
            offset,
            offset_dirty: false,
            forgot_at_ms: now_ms(),
            entities: None,
        }
    }

    /// Deletes the rows of `row`'s entity past the `limit` newest (a stream source's
    /// `retain = N`).
    fn keep_rows_per_entity(&mut self, origin: &Origin<'_>, row: &Row, limit: usize) {
        let identity = &origin.source.identity;
        let state = &self.state;
        let entities = self
            .entities
            .get_or_insert_with(|| EntityRows::new(limit, identity, state.rows()));
        let mut gone = 0;
        for key in entities.add(row, identity) {
            gone += usize::from(self.state.delete(&key));
        }
        count_expired(origin, gone);
    }

    /// Makes the next flush write the task's whole state (every entry and its offset), for a
    /// changelog that lacks it.
    pub(crate) fn log_whole_state(&mut self) {
        self.state.mark_all_changed();
        self.offset_dirty = self.offset.is_some();
    }

    /// Rows of the task's keys.
    pub(crate) fn len(&self) -> usize {
        self.state.len()
    }

    /// Last applied offset.
    pub(crate) fn offset(&self) -> Option<i64> {
        self.offset
    }

    /// Last applied offset, when it moved since the last flush.
    pub(crate) fn unflushed_offset(&self) -> Option<i64> {
        self.offset.filter(|_| self.offset_dirty)
    }

    /// Whether anything changed since the last flush.
    pub(crate) fn has_changes(&self) -> bool {
        self.state.has_changes() || self.offset_dirty
    }

    /// Applies `records` in order.
    pub(crate) fn apply(&mut self, origin: &Origin<'_>, records: &Records) {
        origin
            .metrics
            .records_in
            .with_label_values(&[&origin.source.name])
            .inc_by(records.len() as u64);
        for record in records.iter() {
            self.apply_record(origin, &record);
            self.offset = Some(record.offset);
            self.offset_dirty = true;
        }
    }

    fn apply_record(&mut self, origin: &Origin<'_>, record: &Record) {
        let src = origin.source;
        let key_text = record.key.map(String::from_utf8_lossy).unwrap_or_default();
        let event = match event(src, record, &key_text) {
            Ok(event) => event,
            Err(error) => return malformed(origin, record, &key_text, &error),
        };
        if let Some(stream) = &src.stream {
            let retain = stream.retain.as_ref();
            match &event {
                Event::Tombstone(_) => {
                    return debug!(topic = %src.topic, partition = origin.partition, offset = record.offset, key = %key_text,
                                  "tombstone ignored: a stream source keeps its rows until their retention");
                }
                Event::Row(row) if retain.is_some_and(|r| r.expires(row, now_ms())) => {
                    count_expired(origin, 1);
                    return debug!(topic = %src.topic, partition = origin.partition, offset = record.offset, key = %key_text,
                                  "event dropped: past the stream source's retention as it arrived");
                }
                Event::Row(_) => {}
            }
        }
        let kept = match (&event, src.stream.as_ref().and_then(|s| s.rows_per_entity)) {
            (Event::Row(row), Some(limit)) => Some((row.clone(), limit)),
            _ => None,
        };
        let outcome = self
            .state
            .apply(src.late.as_ref(), &src.identity, event, record.offset);
        if let (Some((row, limit)), Outcome::Changed { .. }) = (kept, &outcome) {
            self.keep_rows_per_entity(origin, &row, limit);
        }
        let (topic, partition, offset) = (&src.topic, origin.partition, record.offset);
        let count = |metric: &prometheus::IntCounterVec, labels: &[&str]| {
            metric.with_label_values(labels).inc();
        };
        match outcome {
            Outcome::Changed { late, forgotten } => {
                if let Some(late) = late {
                    late_event(origin, (record, &key_text), &late, "kept");
                }
                if let Some(operation) = forgotten {
                    count(&origin.metrics.operations_forgotten, &[&src.name]);
                    warn!(%topic, partition, offset, key = %key_text, operation = %operation,
                          "the key reached late.max_operations: it forgot this operation's order value, so a late event of it would apply");
                }
            }
            Outcome::Duplicate => {
                count(&origin.metrics.duplicate_events, &[&src.name]);
                debug!(%topic, partition, offset, key = %key_text, "duplicate event skipped");
            }
            Outcome::Late(late) => late_event(origin, (record, &key_text), &late, "dropped"),
        }
    }

    /// Feeds `input` the task's changes since its last flush (one retraction and one
    /// insertion per changed key, see [`crate::ingest::upsert`]) and adds them to `commit`
    /// (upsert entries, offset): the entries and the tables they produce commit together.
    /// Every tenth of the source's tombstone retention (at most every hour), it also forgets
    /// the keys deleted longer ago than the retention.
    pub(crate) fn flush(
        &mut self,
        (source, origin): (usize, &Origin<'_>),
        input: &mut InputSession<Epoch, Row, isize>,
        commit: &mut Commit,
    ) {
        let (src, partition) = (origin.source, origin.partition);
        let now = now_ms();
        let retention = src.tombstone_retention.as_millis() as i64;
        if now - self.forgot_at_ms >= (retention / 10).min(FORGET_EVERY_MS) {
            self.forgot_at_ms = now;
            let forgotten = self.state.forget_deleted(now, retention);
            if !forgotten.is_empty() {
                debug!(topic = %src.topic, partition, keys = forgotten.len(), "deleted keys past their retention forgotten");
            }
            for key in &forgotten {
                commit.delete_entry(source, partition, key);
            }
        }
        let topic = &src.topic;
        self.state.drain_changes(now, |key, entry, before| {
            if before != entry.row {
                if let Some(old) = before {
                    input.update(old, -1);
                }
                if let Some(new) = &entry.row {
                    input.update(new.clone(), 1);
                }
            }
            commit.put_entry(source, partition, key, entry);
        });
        if let Some(offset) = self.unflushed_offset() {
            commit.put_task_offset((source, topic), partition, offset);
            self.offset_dirty = false;
        }
    }

    /// Retracts the task's rows from `input` (its partition moves to another instance).
    pub(crate) fn retract(&self, input: &mut InputSession<Epoch, Row, isize>) {
        for row in self.state.rows() {
            input.update(row.clone(), -1);
        }
    }
}

/// The longest time between two passes forgetting deleted keys past their retention.
const FORGET_EVERY_MS: i64 = 3_600_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The entity event a record carries, or why it is malformed.
fn event(src: &Source, record: &Record, key_text: &str) -> Result<Event, String> {
    let Some(payload) = record.payload else {
        let key = record
            .key
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|text| Value::parse_key_text(text, src.columns[src.key].ty));
        return key
            .map(Event::Tombstone)
            .ok_or_else(|| "tombstone without a valid key".to_string());
    };
    let row = decode(src, payload).map_err(|e| e.to_string())?;
    let key = &row[src.key];
    if record.key.is_some() && !key.is_key_text(key_text) {
        return Err(format!(
            "message key `{key_text}` differs from key column `{}` = `{}`",
            src.key_name(),
            key.to_key_text()
        ));
    }
    Ok(Event::Row(row))
}

/// Counts rows of a stream source past its retention.
fn count_expired(origin: &Origin<'_>, rows: usize) {
    if rows > 0 {
        let source = &origin.source.name;
        origin
            .metrics
            .rows_expired
            .with_label_values(&[source])
            .inc_by(rows as u64);
        debug!(topic = %origin.source.topic, partition = origin.partition, rows, "rows past the stream source's retention deleted");
    }
}

/// Counts and logs a late event, `kept` or `dropped`, with its operation and the incoming and
/// applied order values.
fn late_event(origin: &Origin<'_>, (record, key): (&Record, &str), late: &LateEvent, action: &str) {
    let src = origin.source;
    let operation = operation_label(&late.operation);
    origin
        .metrics
        .late_events
        .with_label_values(&[&src.name, action, &operation])
        .inc();
    info!(topic = %src.topic, partition = origin.partition, offset = record.offset, key, operation,
          incoming = %late.incoming, applied = %late.applied, action,
          "late event: older than the version applied for its operation");
}

/// Counts, logs and reports a record that cannot be applied.
fn malformed(origin: &Origin<'_>, record: &Record, key_text: &str, error: &str) {
    let src = origin.source;
    origin
        .metrics
        .malformed_records
        .with_label_values(&[&src.name])
        .inc();
    warn!(topic = %src.topic, partition = origin.partition, offset = record.offset, key = %key_text, %error, "malformed record skipped");
    if let Some(errors) = origin.errors {
        errors.malformed(&src.topic, origin.partition, record, error);
    }
}
