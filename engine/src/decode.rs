//! Decoding entity events (JSON snapshots) into rows.
//!
//! An event is a JSON object with at least the source's columns; extra fields are ignored,
//! missing ones are NULL. The key column must be present and non-NULL. A value of the wrong type
//! makes the whole event malformed: it is never half-applied.

use crate::topology::Source;
use crate::value::{ColumnType, Row, Value};

/// Why an event could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is not JSON, or not a JSON object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// The key column is missing or NULL.
    #[error("missing key column `{0}`")]
    MissingKey(String),
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
        while let Some(index) = map.next_key_seed(ColumnSeed {
            source: self.source,
        })? {
            match index {
                Some(i) => {
                    let json: serde_json::Value = map.next_value()?;
                    let decoded = match (json, columns[i].ty) {
                        (serde_json::Value::String(s), ColumnType::Text) => Ok(Value::Text(s)),
                        (json, ty) => Value::from_json(&json, ty).ok_or(json),
                    };
                    row[i] = match decoded {
                        Ok(v) => v,
                        Err(json) => {
                            *self.mismatch.borrow_mut() = Some(DecodeError::WrongType {
                                column: columns[i].name.clone(),
                                expected: columns[i].ty.to_string(),
                                found: truncate(&json.to_string()),
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

/// Reads an object key and maps it to a column position (`None` for fields not declared).
struct ColumnSeed<'a> {
    source: &'a Source,
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
        Ok(self.source.columns.iter().position(|c| c.name == name))
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
}
