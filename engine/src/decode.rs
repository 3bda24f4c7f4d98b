//! Decoding entity events (JSON snapshots) into rows.
//!
//! An event is a JSON object with at least the source's columns; extra fields are ignored,
//! missing ones are NULL. The key column must be present and non-NULL. A value of the wrong type
//! makes the whole event malformed: it is never half-applied.

use crate::topology::Source;
use crate::value::{Row, Value};

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
pub fn decode(source: &Source, payload: &[u8]) -> Result<Row, DecodeError> {
    let json: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let serde_json::Value::Object(map) = json else {
        return Err(DecodeError::NotJson("the payload is not an object".into()));
    };
    let mut row = Vec::with_capacity(source.columns.len());
    for column in &source.columns {
        let value = match map.get(&column.name) {
            None => Value::Null,
            Some(j) => Value::from_json(j, column.ty).ok_or_else(|| DecodeError::WrongType {
                column: column.name.clone(),
                expected: column.ty.to_string(),
                found: truncate(&j.to_string()),
            })?,
        };
        row.push(value);
    }
    if row[source.key].is_null() {
        return Err(DecodeError::MissingKey(source.key_name().to_string()));
    }
    Ok(row)
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
