//! Stream sources (`kind = "stream"`): every event of the topic is a row of its own, none
//! replaces another; a history table is a table over one.
//!
//! A stream source declares a composite key (`key = ["id", "version"]`): its first column is
//! the entity's key, the one the topic's records are keyed and partitioned by; the whole key
//! identifies a row, so a re-delivered event is a duplicate and changes nothing. A stream
//! source may keep its rows for a declared time only (`retain = "400d"`, counted from the
//! timestamp column `retain_by`), or a declared number of rows per entity (`retain = 20`).
//! What the state does with one event is [`crate::ingest::upsert`]'s, as for any source:
//! keyed by the whole key, no row is ever replaced by another event's.

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

/// What a stream source keeps: its rows, for `retain` after their `retain_by` time, or the
/// newest `retain` rows of each entity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPolicy {
    /// How long a row is kept, and the timestamp column it is counted from (`retain =
    /// "400d"`); `None`: no age limit.
    pub retain: Option<Retention>,
    /// How many rows of each entity are kept, the greatest keys (`retain = 20`: an entity's
    /// 20 newest versions); `None`: no limit.
    pub rows_per_entity: Option<usize>,
}

/// A stream source's `retain` as written: an age or a number of rows per entity.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawRetain {
    /// `retain = "400d"`.
    Age(String),
    /// `retain = 20`.
    Rows(i64),
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
    pub retain: Option<&'a Spanned<RawRetain>>,
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
    } else if let Some(at) = raw
        .retain
        .map(|s| s.span().start)
        .or(raw.retain_by.map(|s| s.span().start))
    {
        r.at(
            at,
            "`retain` is for stream sources: an upsert source keeps one row per key",
            Some("declare kind = \"stream\"".into()),
        );
    }
    let policy = stream.then(|| retention(r, raw, columns));
    if r.diagnostics.len() > before {
        return None;
    }
    Some((key?, policy))
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
                Some(
                    "key = [\"id\", \"version\"]: the first column is the topic's record key"
                        .into(),
                ),
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
fn retention(r: &mut Reporter<'_>, raw: &RawKind<'_>, columns: &[Column]) -> StreamPolicy {
    let mut policy = StreamPolicy {
        retain: None,
        rows_per_entity: None,
    };
    match (
        raw.retain.map(|s| (s.get_ref(), s.span().start)),
        raw.retain_by,
    ) {
        (None, None) => {}
        (Some((RawRetain::Rows(n), at)), by) => match usize::try_from(*n) {
            Ok(n) if n > 0 && by.is_none() => policy.rows_per_entity = Some(n),
            Ok(n) if n > 0 => r.at(
                at,
                "`retain_by` is for a retention by age",
                Some("retain = 20 keeps each entity's 20 newest rows by key".into()),
            ),
            _ => r.at(
                at,
                format!("bad retain `{n}`"),
                Some("a number of rows above zero, or an age like \"400d\"".into()),
            ),
        },
        (Some((RawRetain::Age(age), at)), Some(by)) => {
            policy.retain = by_age(r, (age, at), by, columns)
        }
        (Some((RawRetain::Age(_), at)), None) => r.at(
            at,
            "`retain` needs `retain_by`, the timestamp column a row's age is counted from",
            Some("retain_by = \"updated_at\"".into()),
        ),
        (None, Some(by)) => r.at(
            by.span().start,
            "`retain_by` without `retain`",
            Some("retain = \"400d\"".into()),
        ),
    }
    policy
}

/// A retention by age: `retain` (at `at`) counted from column `by`.
fn by_age(
    r: &mut Reporter<'_>,
    (retain, at): (&str, usize),
    by: &Spanned<String>,
    columns: &[Column],
) -> Option<Retention> {
    let age = match humantime::parse_duration(retain) {
        Ok(age) if !age.is_zero() => Some(age),
        _ => {
            r.at(
                at,
                format!("bad retain `{retain}`"),
                Some("a duration above zero, like \"400d\" or \"12h\", or a number of rows".into()),
            );
            None
        }
    };
    let column = columns
        .iter()
        .position(|c| c.name == by.get_ref().to_lowercase());
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

#[cfg(test)]
mod tests {
    use crate::topology::tests::errors;
    use crate::topology::{Distribution, Topology};

    const HISTORY: &str = r#"
name = "t"
[sources.users]
topic = "user"
key = "id"
columns = { id = "text", email = "text", version = "bigint", at = "timestamptz" }
late = { order_by = "version" }

[sources.email_changes]
topic = "user"
kind = "stream"
key = ["id", "version"]
columns = { id = "text", email = "text", version = "bigint", at = "timestamptz" }
retain = "400d"
retain_by = "at"

[tables.email_history]
query = "SELECT id, version, email, at FROM email_changes"
"#;

    #[test]
    fn a_table_over_a_stream_source_is_keyed_by_its_composite_key_and_follows_the_entity() {
        let t = Topology::parse("h.toml", HISTORY).expect("valid");
        let changes = t.source("email_changes").unwrap();
        assert_eq!((changes.key, changes.identity.clone()), (0, vec![0, 2]));
        let retain = changes.stream.as_ref().unwrap().retain.unwrap();
        assert_eq!((retain.age.as_secs(), retain.by), (400 * 86_400, 3));
        assert!(t.source("users").unwrap().stream.is_none());
        let history = t.table("email_history").unwrap();
        assert_eq!(history.key, vec![0, 1], "(id, version)");
        assert_eq!(
            t.distribution(history),
            Distribution::Partitioned {
                source: 1,
                column: 0
            }
        );
        assert_eq!(t.readers_of(0).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(t.readers_of(1).collect::<Vec<_>>(), [0, 1]);
        assert!(changes.layout().contains("key id, version"));
        assert!(changes.layout().contains("stream retained 34560000s by at"));
    }

    #[test]
    fn a_row_goes_once_its_time_is_older_than_the_retention() {
        use crate::value::Value;
        let t = Topology::parse("h.toml", HISTORY).expect("valid");
        let retain = t
            .source("email_changes")
            .unwrap()
            .stream
            .as_ref()
            .unwrap()
            .retain
            .unwrap();
        let day_ms = 86_400_000;
        let now_ms = 1_000 * day_ms;
        let row = |day: i64| {
            let at = Value::Timestamp(day * day_ms * 1000);
            vec![Value::Null, Value::Null, Value::Int(1), at]
        };
        assert!(retain.expires(&row(599), now_ms));
        assert!(!retain.expires(&row(600), now_ms));
        assert!(!retain.expires(&row(999), now_ms));
        let mut untimed = row(0);
        untimed[3] = Value::Null;
        assert!(
            !retain.expires(&untimed, now_ms),
            "a row without a time stays"
        );
    }

    #[test]
    fn reports_what_a_stream_source_cannot_be() {
        let cases = [
            (
                r#"retain_by = "at""#,
                r#"retain_by = "email""#,
                "retain_by `email` is not a timestamptz column",
            ),
            (r#"retain_by = "at""#, "", "`retain` needs `retain_by`"),
            (
                r#"key = ["id", "version"]"#,
                r#"key = "id""#,
                "a stream source's key names the entity's key",
            ),
            (
                r#"key = ["id", "version"]"#,
                r#"key = ["id", "id"]"#,
                "key column `id` is named twice",
            ),
            (
                r#"key = ["id", "version"]"#,
                r#"key = ["id", "v"]"#,
                "key `v` is not a declared column",
            ),
            (
                r#"kind = "stream""#,
                r#"kind = "log""#,
                "unknown source kind `log`",
            ),
            (r#"retain = "400d""#, r#"retain = "0s""#, "bad retain `0s`"),
            (
                r#"retain_by = "at""#,
                "retain_by = \"at\"\nlate = { order_by = \"version\" }",
                "`late` has no meaning for it",
            ),
            (
                r#"retain_by = "at""#,
                "retain_by = \"at\"\nglobal = true",
                "a stream source cannot be global",
            ),
        ];
        let more = [
            (r#"retain = "400d""#, "retain = 0", "bad retain `0`"),
            (
                r#"retain = "400d""#,
                "retain = 2",
                "`retain_by` is for a retention by age",
            ),
            (
                "kind = \"stream\"\nkey = [\"id\", \"version\"]",
                "key = \"id\"",
                "`retain` is for stream sources",
            ),
            (
                "kind = \"stream\"\n",
                "",
                "an upsert source's key is one column",
            ),
            (
                "key = \"id\"\ncolumns",
                "key = \"id\"\nglobal = true\ncolumns",
                "one of them global",
            ),
        ];
        for (from, to, expected) in cases.into_iter().chain(more) {
            let e = errors(&HISTORY.replacen(from, to, 1));
            assert!(e.iter().any(|e| e.contains(expected)), "{to}: {e:?}");
        }
        let rows = HISTORY.replace("retain = \"400d\"\nretain_by = \"at\"", "retain = 20");
        let t = Topology::parse("h.toml", &rows).expect("valid");
        let policy = t.source("email_changes").unwrap().stream.clone().unwrap();
        assert_eq!((policy.retain, policy.rows_per_entity), (None, Some(20)));
    }
}
