//! Typed values and rows.
//!
//! A [`Row`] is a vector of [`Value`]s decoded once from an entity event against the columns its
//! source declares. Values are totally ordered (so rows can live in differential arrangements):
//! `Null` sorts first, then values of the same type by their natural order; floats use IEEE
//! total order, so `NaN` is a value like any other and never breaks sorting.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// The SQL types a column may declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ColumnType {
    /// UTF-8 text (`text`, `varchar`).
    Text,
    /// 64-bit signed integer (`bigint`, `int`, `integer`).
    Bigint,
    /// 64-bit float (`double`, `float8`, `real`).
    Double,
    /// `boolean`.
    Boolean,
    /// Instant with microsecond precision (`timestamptz`, `timestamp`), stored as UTC micros.
    Timestamptz,
}

impl ColumnType {
    /// Parses a declared type name (case-insensitive, with the usual PostgreSQL aliases).
    pub fn parse(name: &str) -> Option<ColumnType> {
        match name.trim().to_ascii_lowercase().as_str() {
            "text" | "varchar" | "string" | "character varying" => Some(ColumnType::Text),
            "bigint" | "int" | "integer" | "int8" | "int4" | "smallint" => Some(ColumnType::Bigint),
            "double" | "double precision" | "float8" | "float" | "real" | "numeric" => {
                Some(ColumnType::Double)
            }
            "boolean" | "bool" => Some(ColumnType::Boolean),
            "timestamptz" | "timestamp" | "timestamp with time zone" => {
                Some(ColumnType::Timestamptz)
            }
            _ => None,
        }
    }

    /// The type's canonical SQL name.
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Bigint => "bigint",
            ColumnType::Double => "double precision",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamptz => "timestamptz",
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A 64-bit float with a total order (IEEE `totalOrder`), so it can be a key.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct F64(pub f64);

impl PartialEq for F64 {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0) == Ordering::Equal
    }
}
impl Eq for F64 {}
impl PartialOrd for F64 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for F64 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}
impl Hash for F64 {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

/// One typed value. `Null` is a value of every type.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A boolean.
    Bool(bool),
    /// A 64-bit integer.
    Int(i64),
    /// A 64-bit float.
    Float(F64),
    /// Text; up to 24 bytes are kept inline, without an allocation (entity ids, names, codes,
    /// most e-mail addresses), which spares the upsert lookups and comparisons a pointer chase.
    Text(CompactString),
    /// An instant, in microseconds since the Unix epoch (UTC).
    Timestamp(i64),
}

impl Value {
    /// Whether this is SQL NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Renders the value as JSON (timestamps as RFC 3339 strings).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(f.0)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Text(s) => serde_json::Value::String(s.to_string()),
            Value::Timestamp(t) => serde_json::Value::String(format_timestamp(*t)),
        }
    }

    /// Whether `text` is this value's key text (see [`Value::to_key_text`]), without
    /// allocating for text values.
    pub fn is_key_text(&self, text: &str) -> bool {
        match self {
            Value::Text(s) => s == text,
            other => other.to_key_text() == text,
        }
    }

    /// Renders the value as key text, as a Kafka message key carries it (a text as is). The
    /// URL form of a whole key is [`key_text`].
    pub fn to_key_text(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.0.to_string(),
            Value::Text(s) => s.to_string(),
            Value::Timestamp(t) => format_timestamp(*t),
        }
    }

    /// Reads `text` as a value of type `ty`, written as [`Value::to_key_text`] writes it (as
    /// a Kafka message key is): text as is, numbers and booleans as literals, timestamps in
    /// RFC 3339 or as a JSON value. `None` when it is not one.
    pub fn parse_key_text(text: &str, ty: ColumnType) -> Option<Value> {
        match ty {
            ColumnType::Text => Some(Value::Text(text.into())),
            ColumnType::Bigint => text.parse().ok().map(Value::Int),
            ColumnType::Double => text.parse().ok().map(|f| Value::Float(F64(f))),
            ColumnType::Boolean => text.parse().ok().map(Value::Bool),
            ColumnType::Timestamptz => parse_timestamp(text).map(Value::Timestamp).or_else(|| {
                serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .and_then(|j| Value::from_json(&j, ty))
            }),
        }
    }

    /// Decodes a JSON value as `ty`. Integers are accepted for doubles, and RFC 3339 strings or
    /// integer epoch milliseconds for timestamps. Returns `None` on a type mismatch.
    pub fn from_json(json: &serde_json::Value, ty: ColumnType) -> Option<Value> {
        use serde_json::Value as J;
        Some(match (json, ty) {
            (J::Null, _) => Value::Null,
            (J::String(s), ColumnType::Text) => Value::Text(s.as_str().into()),
            (J::Number(n), ColumnType::Bigint) => Value::Int(n.as_i64()?),
            (J::Number(n), ColumnType::Double) => Value::Float(F64(n.as_f64()?)),
            (J::Bool(b), ColumnType::Boolean) => Value::Bool(*b),
            (J::String(s), ColumnType::Timestamptz) => Value::Timestamp(parse_timestamp(s)?),
            (J::Number(n), ColumnType::Timestamptz) => {
                Value::Timestamp(timestamp_from_millis(n.as_i64()?)?)
            }
            _ => return None,
        })
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Text(s) => write!(f, "'{s}'"),
            other => f.write_str(&other.to_key_text()),
        }
    }
}

/// Epoch milliseconds as UTC microseconds, if they name a date miroir can write (years
/// -262143 to 262142): a timestamp beyond is malformed input, not a value.
pub fn timestamp_from_millis(ms: i64) -> Option<i64> {
    ms.checked_mul(1000)
        .filter(|us| chrono::DateTime::from_timestamp_micros(*us).is_some())
}

/// Parses an RFC 3339 timestamp into UTC microseconds; years outside 0000-9999 are read with
/// their sign, as [`format_timestamp`] writes them.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| s.parse::<chrono::DateTime<chrono::FixedOffset>>())
        .ok()
        .map(|d| d.timestamp_micros())
}

/// Formats UTC microseconds as RFC 3339 with microseconds.
pub fn format_timestamp(micros: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(micros) {
        Some(d) => d.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        None => micros.to_string(),
    }
}

/// A row: values in the column order of its schema.
pub type Row = Vec<Value>;

/// A named, typed column of a schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// Column name (lower case, as written in the topology).
    pub name: String,
    /// Declared or inferred type.
    pub ty: ColumnType,
}

/// The URL form of a NULL key part.
const NULL_PART: &str = "\\N";

/// Renders the primary key of `row` (columns `key`) in its URL form: how keys appear in URLs,
/// answers and logs. Composite keys join their parts with `|`; in a part, `\` is written
/// `\\`, `|` is written `\|` (composite keys only) and NULL is `\N`, so every key has one
/// form and [`parse_key_text`] reads it back. Rows are stored under [`crate::state::key`]'s
/// binary encoding, not under this form.
pub fn key_text(row: &[Value], key: &[usize]) -> String {
    let mut out = String::new();
    for (n, i) in key.iter().enumerate() {
        if n > 0 {
            out.push('|');
        }
        match &row[*i] {
            Value::Null => out.push_str(NULL_PART),
            value => {
                for c in value.to_key_text().chars() {
                    if c == '\\' || (c == '|' && key.len() > 1) {
                        out.push('\\');
                    }
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Why a key's URL form does not name a key of a table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyTextError {
    /// The number of `|`-separated parts is not the number of key columns.
    #[error("the key has {expected} part(s) separated by `|`, found {found}")]
    Parts {
        /// Key columns.
        expected: usize,
        /// Parts given.
        found: usize,
    },
    /// A part is not a value of its column's type.
    #[error("key part {part} `{text}` is not a {ty}")]
    Type {
        /// Position of the part (from 1).
        part: usize,
        /// The part as given.
        text: String,
        /// The column's type.
        ty: ColumnType,
    },
}

/// Reads a key's URL form (see [`key_text`]) against the types of the key columns.
pub fn parse_key_text(text: &str, types: &[ColumnType]) -> Result<Vec<Value>, KeyTextError> {
    let parts = split_key_text(text, types.len());
    if parts.len() != types.len() {
        return Err(KeyTextError::Parts {
            expected: types.len(),
            found: parts.len(),
        });
    }
    parts
        .iter()
        .zip(types)
        .enumerate()
        .map(|(n, (part, ty))| parse_part(n, part, *ty))
        .collect()
}

/// The start of a key in URL form, for a scan: the whole parts before the last `|`, and the
/// last part, which is the beginning of a text when its column is text (and a whole value
/// otherwise). A `|` at the end leaves no last part: `u-1|` is every key whose first part is
/// `u-1` (where `u-1` alone is also `u-10`'s). An empty text is the start of every key.
pub fn parse_key_prefix(text: &str, types: &[ColumnType]) -> Result<KeyPrefix, KeyTextError> {
    if text.is_empty() {
        return Ok(KeyPrefix::default());
    }
    let mut parts = split_key_text(text, types.len());
    if parts.len() > types.len() {
        return Err(KeyTextError::Parts {
            expected: types.len(),
            found: parts.len(),
        });
    }
    let last = parts.pop().unwrap_or_default();
    let mut values = parts
        .iter()
        .zip(types)
        .enumerate()
        .map(|(n, (part, ty))| parse_part(n, part, *ty))
        .collect::<Result<Vec<_>, _>>()?;
    if last.text.is_empty() && !parts.is_empty() {
        return Ok(KeyPrefix { values, text: None });
    }
    let n = values.len();
    let text = match types[n] {
        ColumnType::Text if last.text != NULL_PART => Some(last.unescaped),
        ty => {
            values.push(parse_part(n, &last, ty)?);
            None
        }
    };
    Ok(KeyPrefix { values, text })
}

/// The start of a table's keys, for a scan: whole key parts, then the beginning of a text
/// part.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyPrefix {
    /// Leading key parts, whole.
    pub values: Vec<Value>,
    /// The beginning of the next part, a text.
    pub text: Option<String>,
}

/// One part of a key's URL form: as written, and with its escapes resolved.
#[derive(Default)]
struct KeyPart {
    text: String,
    unescaped: String,
}

/// Splits a key's URL form into its parts (on `|` not escaped, when the key has several
/// columns). An unknown escape keeps its backslash.
fn split_key_text(text: &str, columns: usize) -> Vec<KeyPart> {
    let mut parts = vec![KeyPart::default()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let part = parts.last_mut().expect("one part at least");
        match (c, chars.peek()) {
            ('\\', Some(&next)) if next == '\\' || next == '|' => {
                chars.next();
                part.text.extend([c, next]);
                part.unescaped.push(next);
            }
            ('|', _) if columns > 1 => parts.push(KeyPart::default()),
            _ => {
                part.text.push(c);
                part.unescaped.push(c);
            }
        }
    }
    parts
}

fn parse_part(n: usize, part: &KeyPart, ty: ColumnType) -> Result<Value, KeyTextError> {
    if part.text == NULL_PART {
        return Ok(Value::Null);
    }
    Value::parse_key_text(&part.unescaped, ty).ok_or_else(|| KeyTextError::Type {
        part: n + 1,
        text: part.text.clone(),
        ty,
    })
}

/// Renders a row as a JSON object using the schema's column names.
pub fn row_to_json(columns: &[Column], row: &[Value]) -> serde_json::Value {
    let mut map = serde_json::Map::with_capacity(columns.len());
    for (c, v) in columns.iter().zip(row) {
        map.insert(c.name.clone(), v.to_json());
    }
    serde_json::Value::Object(map)
}

/// Serializes a row straight to JSON object bytes (what the table store serves), without
/// building an intermediate document. Same output as [`row_to_json`].
pub fn row_to_json_bytes(columns: &[Column], row: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&RowJson { columns, row }).expect("rows serialize")
}

struct RowJson<'a> {
    columns: &'a [Column],
    row: &'a [Value],
}

impl Serialize for RowJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.columns.len()))?;
        for (c, v) in self.columns.iter().zip(self.row) {
            map.serialize_entry(&c.name, &ValueJson(v))?;
        }
        map.end()
    }
}

struct ValueJson<'a>(&'a Value);

impl Serialize for ValueJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(f) if f.0.is_finite() => s.serialize_f64(f.0),
            Value::Float(_) => s.serialize_unit(),
            Value::Text(t) => s.serialize_str(t),
            Value::Timestamp(t) => s.serialize_str(&format_timestamp(*t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_timestamp_miroir_reads_is_written_back_the_same() {
        let day = 86_400_000;
        for ms in [
            0,
            -377_705_116_800_000,   // 10,000 BC
            253_402_300_800_000,    // 10000-01-01
            8_210_266_876_799_999,  // the last millisecond of 262142
            -8_334_601_228_800_000, // the first of -262143
            day - 1,
        ] {
            let us = timestamp_from_millis(ms).expect("in range");
            let text = format_timestamp(us);
            assert_eq!(parse_timestamp(&text), Some(us), "{ms} ms written {text}");
        }
        assert_eq!(timestamp_from_millis(-9_223_372_036_854_775), None);
        assert_eq!(timestamp_from_millis(i64::MAX), None);
    }

    #[test]
    fn a_key_prefix_ends_inside_a_text_part_or_after_whole_parts() {
        let types = [ColumnType::Text, ColumnType::Bigint];
        let prefix = |t: &str| parse_key_prefix(t, &types);
        let text = |t: &str| Value::Text(t.into());
        assert_eq!(
            prefix("u-1").unwrap(),
            KeyPrefix {
                values: vec![],
                text: Some("u-1".into())
            },
            "u-1, u-10, ..."
        );
        assert_eq!(
            prefix("u-1|").unwrap(),
            KeyPrefix {
                values: vec![text("u-1")],
                text: None
            },
            "u-1's keys only"
        );
        assert_eq!(
            prefix("u-1|5").unwrap().values,
            vec![text("u-1"), Value::Int(5)]
        );
        assert!(prefix("u-1|x").is_err());
        assert!(prefix("u-1|5|").is_err(), "three parts for two columns");
    }

    #[test]
    fn decodes_declared_types_and_rejects_mismatches() {
        let j = serde_json::json!(42);
        assert_eq!(
            Value::from_json(&j, ColumnType::Bigint),
            Some(Value::Int(42))
        );
        assert_eq!(
            Value::from_json(&j, ColumnType::Double),
            Some(Value::Float(F64(42.0)))
        );
        assert_eq!(Value::from_json(&j, ColumnType::Text), None);
        let s = serde_json::json!("2024-01-02T03:04:05Z");
        let Some(Value::Timestamp(t)) = Value::from_json(&s, ColumnType::Timestamptz) else {
            panic!("timestamp not decoded")
        };
        assert_eq!(format_timestamp(t), "2024-01-02T03:04:05Z");
        assert_eq!(
            Value::from_json(&serde_json::json!("nope"), ColumnType::Timestamptz),
            None
        );
        assert_eq!(
            Value::from_json(&serde_json::Value::Null, ColumnType::Bigint),
            Some(Value::Null)
        );
    }

    #[test]
    fn row_json_bytes_match_the_json_document() {
        let columns = vec![
            Column {
                name: "id".into(),
                ty: ColumnType::Text,
            },
            Column {
                name: "n".into(),
                ty: ColumnType::Double,
            },
            Column {
                name: "at".into(),
                ty: ColumnType::Timestamptz,
            },
            Column {
                name: "x".into(),
                ty: ColumnType::Bigint,
            },
        ];
        let row = vec![
            Value::Text("a\"b".into()),
            Value::Float(F64(f64::NAN)),
            Value::Timestamp(0),
            Value::Null,
        ];
        let bytes = row_to_json_bytes(&columns, &row);
        let parsed: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(parsed, row_to_json(&columns, &row));
    }

    #[test]
    fn floats_are_totally_ordered() {
        let nan = Value::Float(F64(f64::NAN));
        let one = Value::Float(F64(1.0));
        assert_eq!(nan.cmp(&nan), Ordering::Equal);
        assert_ne!(nan.cmp(&one), Ordering::Equal);
        assert!(Value::Null < one);
    }

    proptest::proptest! {
        #[test]
        fn the_url_form_of_a_key_reads_back_as_the_key(
            parts in proptest::collection::vec(proptest::option::of("[a|\\\\N]{0,4}"), 1..4),
            n in proptest::prelude::any::<i64>(),
        ) {
            let mut row: Row = parts
                .iter()
                .map(|p| p.as_deref().map_or(Value::Null, |t| Value::Text(t.into())))
                .collect();
            row.push(Value::Int(n));
            let key: Vec<usize> = (0..row.len()).collect();
            let mut types = vec![ColumnType::Text; parts.len()];
            types.push(ColumnType::Bigint);
            let text = key_text(&row, &key);
            proptest::prop_assert_eq!(parse_key_text(&text, &types), Ok(row));
        }
    }

    #[test]
    fn a_single_column_key_keeps_its_separators_and_reads_escapes_leniently() {
        let types = [ColumnType::Text];
        let row = vec![Value::Text("a|b".into())];
        assert_eq!(key_text(&row, &[0]), "a|b");
        assert_eq!(parse_key_text("a|b", &types), Ok(row.clone()));
        assert_eq!(parse_key_text("a\\|b", &types), Ok(row));
        assert_eq!(
            parse_key_text("a\\xb", &types),
            Ok(vec![Value::Text("a\\xb".into())])
        );
        assert_eq!(parse_key_text("\\N", &types), Ok(vec![Value::Null]));
        assert_eq!(
            parse_key_text("1|2", &[ColumnType::Bigint]),
            Err(KeyTextError::Type {
                part: 1,
                text: "1|2".into(),
                ty: ColumnType::Bigint
            })
        );
        assert_eq!(
            parse_key_text("1", &[ColumnType::Bigint, ColumnType::Text]),
            Err(KeyTextError::Parts {
                expected: 2,
                found: 1
            })
        );
    }
}
