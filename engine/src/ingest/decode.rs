//! Decoding entity events (JSON snapshots) into rows.
//!
//! An event is a JSON object with at least the source's columns; extra fields are ignored,
//! missing ones are NULL. The key column must be present and non-NULL. A value of the wrong type
//! makes the whole event malformed: it is never half-applied.

use crate::topology::{Source, SourceFormat};
use crate::value::{parse_timestamp, timestamp_from_millis, ColumnType, Row, Value, F64};

/// Why an event could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is not JSON, or not a JSON object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// The key column is missing or NULL.
    #[error("missing key column `{0}`")]
    MissingKey(String),
    /// A repartition topic's payload is not a row of its columns.
    #[error("not a row of this repartition topic: {0}")]
    NotRow(String),
    /// A column holds a value of the wrong type.
    #[error("column `{column}`: expected {expected}, found {found}")]
    WrongType {
        /// The column.
        column: String,
        /// Its declared type.
        expected: String,
        /// What the event holds.
        found: String,
    },
}

/// Decodes one event payload against `source`'s columns.
///
/// The JSON is read straight into the row (no intermediate document): each field is matched
/// to its column and decoded as the column's type; unknown fields are skipped.
pub fn decode(source: &Source, payload: &[u8]) -> Result<Row, DecodeError> {
    if source.format == SourceFormat::Rows {
        return decode_row(source, payload);
    }
    let mismatch = std::cell::RefCell::new(None);
    let seed = RowSeed {
        source,
        mismatch: &mismatch,
    };
    let mut de = serde_json::Deserializer::from_slice(payload);
    let row = serde::de::DeserializeSeed::deserialize(seed, &mut de)
        .and_then(|row| de.end().map(|()| row))
        .map_err(|e| {
            mismatch
                .borrow_mut()
                .take()
                .unwrap_or_else(|| DecodeError::NotJson(e.to_string()))
        })?;
    if let Some(k) = source.identity.iter().find(|k| row[**k].is_null()) {
        return Err(DecodeError::MissingKey(source.columns[*k].name.clone()));
    }
    Ok(row)
}

/// Decodes a repartition topic's payload: the row's values in the state directory's binary
/// encoding, as many as `source` has columns, the key not NULL.
fn decode_row(source: &Source, payload: &[u8]) -> Result<Row, DecodeError> {
    let row: Row = crate::state::decode(payload).map_err(|e| DecodeError::NotRow(e.to_string()))?;
    if row.len() != source.columns.len() {
        return Err(DecodeError::NotRow(format!(
            "{} values for {} columns",
            row.len(),
            source.columns.len()
        )));
    }
    if row[source.key].is_null() {
        return Err(DecodeError::MissingKey(source.key_name().to_string()));
    }
    Ok(row)
}

/// Reads a JSON object into a row of `source`'s columns. A value of the wrong type is recorded
/// in `mismatch` (so the caller reports which column) and aborts decoding.
struct RowSeed<'a> {
    source: &'a Source,
    mismatch: &'a std::cell::RefCell<Option<DecodeError>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Row;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Row, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for RowSeed<'_> {
    type Value = Row;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Row, A::Error> {
        let columns = &self.source.columns;
        let mut row = vec![Value::Null; columns.len()];
        let mut next = 0;
        while let Some(index) = map.next_key_seed(ColumnSeed {
            source: self.source,
            guess: next,
        })? {
            match index {
                Some(i) => {
                    next = i + 1;
                    match map.next_value_seed(CellSeed { ty: columns[i].ty })? {
                        Ok(value) => row[i] = value,
                        Err(found) => {
                            *self.mismatch.borrow_mut() = Some(DecodeError::WrongType {
                                column: columns[i].name.clone(),
                                expected: columns[i].ty.to_string(),
                                found: truncate(&found),
                            });
                            return Err(serde::de::Error::custom("wrong type"));
                        }
                    }
                }
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(row)
    }
}

/// Reads one JSON value as a column of type `ty`, straight from the input (no intermediate
/// document): `Ok` with the value, or `Err` with the JSON found when its type does not fit.
/// The accepted forms: JSON null for any type; a string for text; an integer for bigint; any
/// number for double; a boolean for boolean; an RFC 3339 string or Unix seconds for
/// timestamptz.
struct CellSeed {
    ty: ColumnType,
}

impl<'de> serde::de::DeserializeSeed<'de> for CellSeed {
    type Value = Result<Value, String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for CellSeed {
    type Value = Result<Value, String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a {} value", self.ty)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Ok(Value::Null))
    }

    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Self::Value, E> {
        Ok(match self.ty {
            ColumnType::Boolean => Ok(Value::Bool(b)),
            _ => Err(b.to_string()),
        })
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
        Ok(match self.ty {
            ColumnType::Bigint => Ok(Value::Int(n)),
            ColumnType::Double => Ok(Value::Float(F64(n as f64))),
            ColumnType::Timestamptz => timestamp_from_millis(n)
                .map(Value::Timestamp)
                .ok_or_else(|| n.to_string()),
            _ => Err(n.to_string()),
        })
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Ok(match (self.ty, i64::try_from(n)) {
            (ColumnType::Double, _) => Ok(Value::Float(F64(n as f64))),
            (ColumnType::Bigint | ColumnType::Timestamptz, Ok(i)) => return self.visit_i64(i),
            _ => Err(n.to_string()),
        })
    }

    fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<Self::Value, E> {
        Ok(match self.ty {
            ColumnType::Double => Ok(Value::Float(F64(x))),
            _ => Err(serde_json::Value::from(x).to_string()),
        })
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(match self.ty {
            ColumnType::Text => Ok(Value::Text(s.into())),
            ColumnType::Timestamptz => parse_timestamp(s)
                .map(Value::Timestamp)
                .ok_or_else(|| serde_json::Value::from(s).to_string()),
            _ => Err(serde_json::Value::from(s).to_string()),
        })
    }

    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Self::Value, E> {
        match self.ty {
            ColumnType::Text => Ok(Ok(Value::Text(s.into()))),
            _ => self.visit_str(&s),
        }
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let found: serde_json::Value =
            serde::Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Err(found.to_string()))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let found: serde_json::Value =
            serde::Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(Err(found.to_string()))
    }
}

/// Reads an object key and maps it to a column position (`None` for fields not declared).
/// Events usually list their fields in the same order: the column after the previous field's
/// (`guess`) is tried first.
struct ColumnSeed<'a> {
    source: &'a Source,
    guess: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for ColumnSeed<'_> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ColumnSeed<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Option<usize>, E> {
        let columns = &self.source.columns;
        if columns.get(self.guess).is_some_and(|c| c.name == name) {
            return Ok(Some(self.guess));
        }
        Ok(columns.iter().position(|c| c.name == name))
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= 64 {
        s.to_string()
    } else {
        let mut end = 64;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Topology;

    fn users() -> Source {
        let t = Topology::parse(
            "t.toml",
            "name = \"t\"\n[sources.users]\ntopic = \"user\"\nkey = \"id\"\ncolumns = { id = \"text\", age = \"bigint\" }\n[tables.x]\nquery = \"SELECT id FROM users\"\n",
        )
        .unwrap();
        t.sources[0].clone()
    }

    #[test]
    fn decodes_and_rejects() {
        let s = users();
        assert_eq!(
            decode(&s, br#"{"id":"a","age":3,"extra":1}"#),
            Ok(vec![Value::Text("a".into()), Value::Int(3)])
        );
        assert_eq!(
            decode(&s, br#"{"id":"a"}"#),
            Ok(vec![Value::Text("a".into()), Value::Null])
        );
        assert!(matches!(decode(&s, b"{nope"), Err(DecodeError::NotJson(_))));
        assert!(matches!(decode(&s, b"[1]"), Err(DecodeError::NotJson(_))));
        assert_eq!(
            decode(&s, br#"{"age":3}"#),
            Err(DecodeError::MissingKey("id".into()))
        );
        assert!(matches!(
            decode(&s, br#"{"id":"a","age":"old"}"#),
            Err(DecodeError::WrongType { .. })
        ));
    }

    fn wrong(s: &Source, payload: &str) -> (String, String) {
        match decode(s, payload.as_bytes()) {
            Err(DecodeError::WrongType { column, found, .. }) => (column, found),
            other => panic!("{payload}: expected a wrong type, got {other:?}"),
        }
    }

    #[test]
    fn reads_every_type_and_names_what_does_not_fit() {
        let t = Topology::parse(
            "t.toml",
            "name = \"t\"\n[sources.s]\ntopic = \"s\"\nkey = \"id\"\ncolumns = { id = \"text\", n = \"bigint\", x = \"double\", b = \"boolean\", at = \"timestamptz\" }\n[tables.x]\nquery = \"SELECT id FROM s\"\n",
        )
        .unwrap();
        let s = &t.sources[0];
        let col = |name: &str| s.columns.iter().position(|c| c.name == name).unwrap();
        // Fields in any order, escaped strings, integers as doubles, Unix seconds.
        let row = decode(
            s,
            br#"{"b":true,"at":"2026-11-25T10:00:00Z","x":2,"n":-7,"id":"a\"b"}"#,
        )
        .unwrap();
        assert_eq!(row[col("id")], Value::Text("a\"b".into()));
        assert_eq!(row[col("n")], Value::Int(-7));
        assert_eq!(row[col("x")], Value::Float(F64(2.0)));
        assert_eq!(row[col("b")], Value::Bool(true));
        assert_eq!(
            row[col("at")],
            Value::Timestamp(parse_timestamp("2026-11-25T10:00:00Z").unwrap())
        );
        let row = decode(s, br#"{"id":"a","at":1764064800,"x":0.5,"n":null}"#).unwrap();
        assert_eq!(row[col("at")], Value::Timestamp(1_764_064_800_000));
        assert_eq!(row[col("x")], Value::Float(F64(0.5)));
        assert_eq!(row[col("n")], Value::Null);

        assert_eq!(
            wrong(s, r#"{"id":"a","n":1.5}"#),
            ("n".into(), "1.5".into())
        );
        assert_eq!(
            wrong(s, r#"{"id":"a","n":18446744073709551615}"#),
            ("n".into(), "18446744073709551615".into())
        );
        assert_eq!(
            wrong(s, r#"{"id":"a","n":"3"}"#),
            ("n".into(), "\"3\"".into())
        );
        assert_eq!(wrong(s, r#"{"id":"a","b":1}"#), ("b".into(), "1".into()));
        assert_eq!(wrong(s, r#"{"id":7}"#), ("id".into(), "7".into()));
        assert_eq!(
            wrong(s, r#"{"id":"a","x":[1, {"y":2}]}"#),
            ("x".into(), r#"[1,{"y":2}]"#.into())
        );
        assert_eq!(
            wrong(s, r#"{"id":{"k":1}}"#),
            ("id".into(), r#"{"k":1}"#.into())
        );
        assert_eq!(
            wrong(s, r#"{"id":"a","at":"yesterday"}"#),
            ("at".into(), "\"yesterday\"".into())
        );
        // A timestamp no calendar of miroir's names is malformed, not a value to overflow on.
        assert_eq!(
            wrong(s, r#"{"id":"a","at":-9223372036854775}"#),
            ("at".into(), "-9223372036854775".into())
        );
        // A wrong type inside an ignored field is not the event's problem.
        assert!(decode(s, br#"{"id":"a","other":[true,{"z":null}]}"#).is_ok());
    }
}
