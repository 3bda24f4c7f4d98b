//! Stream sources (`kind = "stream"`): every event of the topic is a row of its own, none
//! replaces another; a history table is a table over one.
//!
//! A stream source declares a composite key (`key = ["id", "version"]`): its first column is
//! the entity's key, the one the topic's records are keyed and partitioned by; the whole key
//! identifies a row, so a re-delivered event is a duplicate and changes nothing. A stream
//! source may keep its rows for a declared time only (`retain = "400d"`, counted from the
//! timestamp column `retain_by`). What the state does with one event is
//! [`crate::ingest::upsert`]'s, as for any source: keyed by the whole key, no row is ever
//! replaced by another event's.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Reporter;
use crate::value::{Column, ColumnType, Row, Value};

/// A source's `key` as written: one column, or several (a stream source's composite key).
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawKey {
    /// `key = "id"`.
    One(String),
    /// `key = ["id", "version"]`.
    Several(Vec<String>),
}

impl RawKey {
    fn columns(&self) -> Vec<&str> {
        match self {
            RawKey::One(c) => vec![c.as_str()],
            RawKey::Several(cs) => cs.iter().map(String::as_str).collect(),
        }
    }
}

/// What a stream source keeps: its rows, for `retain` after their `retain_by` time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPolicy {
    /// How long a row is kept, and the timestamp column it is counted from; `None` keeps
    /// every row.
    pub retain: Option<Retention>,
}

/// How long a stream source keeps a row (`retain = "400d"`, `retain_by = "updated_at"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The age past which a row goes.
    pub age: Duration,
    /// The timestamp column the age is counted from (a row whose time is NULL is kept).
    pub by: usize,
}

impl Retention {
    /// Whether `row` is past the retention at `now_ms` (ms since the epoch): its `by` time is
    /// older than `age`. A row without a time is kept.
    pub fn expires(&self, row: &Row, now_ms: i64) -> bool {
        let Value::Timestamp(time_us) = row[self.by] else {
            return false;
        };
        let age_ms = i64::try_from(self.age.as_millis()).unwrap_or(i64::MAX);
        time_us.div_euclid(1000) < now_ms.saturating_sub(age_ms)
    }
}

/// The parts of a source section that tell its kind, as written.
pub(super) struct RawKind<'a> {
    pub kind: Option<&'a Spanned<String>>,
    pub key: &'a Spanned<RawKey>,
    pub retain: Option<&'a Spanned<String>>,
    pub retain_by: Option<&'a Spanned<String>>,
    /// Where `late` is declared, if it is.
    pub late_at: Option<usize>,
    /// Whether the source is global.
    pub global: bool,
}

/// The source's key columns (one, or a stream source's several) and, for a stream source, its
/// policy; errors are reported to `r`.
pub(super) fn validate(
    r: &mut Reporter<'_>,
    raw: &RawKind<'_>,
    columns: &[Column],
) -> Option<(Vec<usize>, Option<StreamPolicy>)> {
    let before = r.diagnostics.len();
    let stream = match raw.kind.map(|k| k.get_ref().as_str()) {
        None | Some("upsert") => false,
        Some("stream") => true,
        Some(other) => {
            r.at(
                raw.kind.map_or(0, |k| k.span().start),
                format!("unknown source kind `{other}`"),
                Some("kind = \"upsert\" (the default: an event replaces its key's row) or \"stream\" (every event is a row)".into()),
            );
            return None;
        }
    };
    let key = key_columns(r, raw.key, columns, stream);
    if stream {
        if let Some(at) = raw.late_at {
            r.at(
                at,
                "a stream source keeps every event: `late` has no meaning for it",
                Some("its key (say [\"id\", \"version\"]) makes a re-delivered event a duplicate; remove `late`".into()),
            );
        }
        if raw.global {
            r.at(
                raw.key.span().start,
                "a stream source cannot be global",
                None,
            );
        }
    } else if let Some(at) = raw.retain.map(|s| s.span().start).or(raw.retain_by.map(|s| s.span().start)) {
        r.at(
            at,
            "`retain` is for stream sources: an upsert source keeps one row per key",
            Some("declare kind = \"stream\"".into()),
        );
    }
    let retain = if stream { retention(r, raw, columns) } else { None };
    if r.diagnostics.len() > before {
        return None;
    }
    Some((key?, stream.then_some(StreamPolicy { retain })))
}

/// The key's columns: one for an upsert source, two or more for a stream source.
fn key_columns(
    r: &mut Reporter<'_>,
    key: &Spanned<RawKey>,
    columns: &[Column],
    stream: bool,
) -> Option<Vec<usize>> {
    let at = key.span().start;
    let names = key.get_ref().columns();
    match (stream, names.len()) {
        (false, 1) | (true, 2..) => {}
        (false, _) => {
            r.at(
                at,
                "an upsert source's key is one column",
                Some("a composite key is for a stream source (kind = \"stream\"), whose rows are its events".into()),
            );
            return None;
        }
        (true, _) => {
            r.at(
                at,
                "a stream source's key names the entity's key and what tells its events apart",
                Some("key = [\"id\", \"version\"]: the first column is the topic's record key".into()),
            );
            return None;
        }
    }
    let mut out = Vec::new();
    for name in names {
        match columns.iter().position(|c| c.name == name.to_lowercase()) {
            Some(i) if !out.contains(&i) => out.push(i),
            Some(_) => r.at(at, format!("key column `{name}` is named twice"), None),
            None => r.at(
                at,
                format!("key `{name}` is not a declared column"),
                Some("declare it in `columns`".into()),
            ),
        }
    }
    Some(out)
}

/// A stream source's `retain` and `retain_by`.
fn retention(r: &mut Reporter<'_>, raw: &RawKind<'_>, columns: &[Column]) -> Option<Retention> {
    let (retain, by) = match (raw.retain, raw.retain_by) {
        (None, None) => return None,
        (Some(retain), Some(by)) => (retain, by),
        (Some(retain), None) => {
            r.at(
                retain.span().start,
                "`retain` needs `retain_by`, the timestamp column a row's age is counted from",
                Some("retain_by = \"updated_at\"".into()),
            );
            return None;
        }
        (None, Some(by)) => {
            r.at(by.span().start, "`retain_by` without `retain`", Some("retain = \"400d\"".into()));
            return None;
        }
    };
    let age = match humantime::parse_duration(retain.get_ref()) {
        Ok(age) if !age.is_zero() => Some(age),
        _ => {
            r.at(
                retain.span().start,
                format!("bad retain `{}`", retain.get_ref()),
                Some("a duration above zero, like \"400d\" or \"12h\"".into()),
            );
            None
        }
    };
    let column = columns.iter().position(|c| c.name == by.get_ref().to_lowercase());
    match column {
        Some(c) if columns[c].ty == ColumnType::Timestamptz => {}
        Some(_) => r.at(
            by.span().start,
            format!("retain_by `{}` is not a timestamptz column", by.get_ref()),
            None,
        ),
        None => r.at(
            by.span().start,
            format!("retain_by `{}` is not a declared column", by.get_ref()),
            None,
        ),
    }
    Some(Retention {
        age: age?,
        by: column.filter(|c| columns[*c].ty == ColumnType::Timestamptz)?,
    })
}
