//! Engine values in PostgreSQL's binary format, for binary `COPY`.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use miroir_engine::value::{format_timestamp, ColumnType, Value, F64};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The earliest timestamp PostgreSQL holds (4714-11-24 BC), in microseconds from its epoch.
const PG_MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;

/// The first timestamp past PostgreSQL's range (294277-01-01), from its epoch.
const PG_END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;

/// A value PostgreSQL cannot hold in its column: the row is at fault (set it aside), retrying
/// changes nothing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unwritable(pub String);

/// Whether PostgreSQL can hold `value` in a column of type `ty`: texts cannot hold a NUL
/// character, timestamps must fall in 4714 BC to 294276 AD.
pub fn check(value: &Value, ty: &Type) -> Result<(), Unwritable> {
    match (value, ty) {
        (Value::Null, _)
        | (Value::Int(_), &Type::INT8 | &Type::FLOAT8)
        | (Value::Float(_), &Type::FLOAT8)
        | (Value::Bool(_), &Type::BOOL) => Ok(()),
        (Value::Text(s), &Type::TEXT) if s.contains('\0') => Err(Unwritable(
            "a text with a NUL character (PostgreSQL texts cannot hold one)".into(),
        )),
        (Value::Text(_), &Type::TEXT) => Ok(()),
        (Value::Timestamp(us), &Type::TIMESTAMPTZ) => match pg_micros(*us) {
            Some(_) => Ok(()),
            None => Err(Unwritable(format!(
                "timestamp {} is outside PostgreSQL's range (4714 BC to 294276 AD)",
                format_timestamp(*us)
            ))),
        },
        (value, ty) => Err(Unwritable(format!("cannot write {value:?} as {ty}"))),
    }
}

/// `us` (from the Unix epoch) as microseconds from PostgreSQL's epoch, if in its range.
fn pg_micros(us: i64) -> Option<i64> {
    us.checked_sub(PG_EPOCH_MICROS)
        .filter(|t| (PG_MIN_TIMESTAMP..PG_END_TIMESTAMP).contains(t))
}

/// The PostgreSQL type of a column type.
pub fn pg_type(ty: ColumnType) -> Type {
    match ty {
        ColumnType::Text => Type::TEXT,
        ColumnType::Bigint => Type::INT8,
        ColumnType::Double => Type::FLOAT8,
        ColumnType::Boolean => Type::BOOL,
        ColumnType::Timestamptz => Type::TIMESTAMPTZ,
    }
}

/// One value, written as the column's type.
#[derive(Debug)]
pub struct Cell<'a>(pub &'a Value);

impl ToSql for Cell<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        check(self.0, ty)?;
        match self.0 {
            Value::Null => return Ok(IsNull::Yes),
            Value::Text(s) => out.put_slice(s.as_bytes()),
            Value::Int(i) if *ty == Type::FLOAT8 => out.put_f64(*i as f64),
            Value::Int(i) => out.put_i64(*i),
            Value::Float(f) => out.put_f64(f.0),
            Value::Bool(b) => out.put_u8(u8::from(*b)),
            Value::Timestamp(us) => out.put_i64(pg_micros(*us).unwrap_or_default()),
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        [
            Type::TEXT,
            Type::INT8,
            Type::FLOAT8,
            Type::BOOL,
            Type::TIMESTAMPTZ,
        ]
        .contains(ty)
    }

    to_sql_checked!();
}

/// One value read back from PostgreSQL's binary format (the types [`pg_type`] writes).
#[derive(Debug, PartialEq)]
pub struct ReadCell(pub Value);

impl<'a> FromSql<'a> for ReadCell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        let eight = || -> Result<[u8; 8], Box<dyn Error + Sync + Send>> {
            Ok(raw
                .try_into()
                .map_err(|_| format!("{ty} of {} bytes", raw.len()))?)
        };
        Ok(ReadCell(match *ty {
            Type::TEXT => Value::Text(std::str::from_utf8(raw)?.into()),
            Type::INT8 => Value::Int(i64::from_be_bytes(eight()?)),
            Type::FLOAT8 => Value::Float(F64(f64::from_be_bytes(eight()?))),
            Type::BOOL => Value::Bool(raw.first().is_some_and(|b| *b != 0)),
            Type::TIMESTAMPTZ => Value::Timestamp(i64::from_be_bytes(eight()?) + PG_EPOCH_MICROS),
            _ => return Err(format!("cannot read a {ty}").into()),
        }))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(ReadCell(Value::Null))
    }

    fn accepts(ty: &Type) -> bool {
        <Cell as ToSql>::accepts(ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(v: &Value, ty: Type) -> Option<Vec<u8>> {
        let mut out = BytesMut::new();
        match Cell(v).to_sql(&ty, &mut out).expect("encodes") {
            IsNull::Yes => None,
            IsNull::No => Some(out.to_vec()),
        }
    }

    #[test]
    fn values_encode_as_postgres_binary() {
        assert_eq!(encode(&Value::Null, Type::INT8), None);
        assert_eq!(
            encode(&Value::Int(1), Type::INT8),
            Some(1i64.to_be_bytes().to_vec())
        );
        assert_eq!(
            encode(&Value::Int(2), Type::FLOAT8),
            Some(2f64.to_be_bytes().to_vec())
        );
        assert_eq!(
            encode(&Value::Float(F64(0.5)), Type::FLOAT8),
            Some(0.5f64.to_be_bytes().to_vec())
        );
        assert_eq!(encode(&Value::Bool(true), Type::BOOL), Some(vec![1]));
        assert_eq!(
            encode(&Value::Text("é".into()), Type::TEXT),
            Some("é".as_bytes().to_vec())
        );
        // 2000-01-01T00:00:00Z is PostgreSQL's zero.
        assert_eq!(
            encode(&Value::Timestamp(PG_EPOCH_MICROS), Type::TIMESTAMPTZ),
            Some(vec![0; 8])
        );
    }

    #[test]
    fn values_read_back_as_written() {
        for (value, ty) in [
            (Value::Int(-7), Type::INT8),
            (Value::Float(F64(0.25)), Type::FLOAT8),
            (Value::Bool(true), Type::BOOL),
            (Value::Text("é".into()), Type::TEXT),
            (Value::Timestamp(1_700_000_000_123_456), Type::TIMESTAMPTZ),
        ] {
            let raw = encode(&value, ty.clone()).expect("not null");
            assert_eq!(ReadCell::from_sql(&ty, &raw).unwrap(), ReadCell(value));
        }
        assert_eq!(
            ReadCell::from_sql_null(&Type::TEXT).unwrap(),
            ReadCell(Value::Null)
        );
        assert!(ReadCell::from_sql(&Type::INT8, &[1, 2]).is_err());
    }

    #[test]
    fn a_value_postgres_cannot_hold_is_unwritable_not_a_panic() {
        for (value, ty) in [
            (Value::Text("x".into()), Type::INT8),
            (Value::Text("a\0b".into()), Type::TEXT),
            (Value::Timestamp(i64::MIN), Type::TIMESTAMPTZ),
            (
                Value::Timestamp(-9_000_000_000_000_000_000),
                Type::TIMESTAMPTZ,
            ),
        ] {
            let mut out = BytesMut::new();
            let Err(err) = Cell(&value).to_sql(&ty, &mut out) else {
                panic!("{value:?} written as {ty}");
            };
            assert!(
                err.downcast_ref::<Unwritable>().is_some(),
                "{value:?}: {err}"
            );
        }
        // The edges of PostgreSQL's range are held.
        let first = PG_MIN_TIMESTAMP + PG_EPOCH_MICROS;
        assert_eq!(
            encode(&Value::Timestamp(first), Type::TIMESTAMPTZ),
            Some(PG_MIN_TIMESTAMP.to_be_bytes().to_vec())
        );
        assert!(check(&Value::Timestamp(first - 1), &Type::TIMESTAMPTZ).is_err());
    }
}
