//! Engine values in PostgreSQL's binary format, for binary `COPY`.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use miroir_engine::value::{ColumnType, Value};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

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
        match (self.0, ty) {
            (Value::Null, _) => return Ok(IsNull::Yes),
            (Value::Text(s), &Type::TEXT) => out.put_slice(s.as_bytes()),
            (Value::Int(i), &Type::INT8) => out.put_i64(*i),
            (Value::Int(i), &Type::FLOAT8) => out.put_f64(*i as f64),
            (Value::Float(f), &Type::FLOAT8) => out.put_f64(f.0),
            (Value::Bool(b), &Type::BOOL) => out.put_u8(u8::from(*b)),
            (Value::Timestamp(us), &Type::TIMESTAMPTZ) => out.put_i64(us - PG_EPOCH_MICROS),
            (value, ty) => return Err(format!("cannot write {value:?} as {ty}").into()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use miroir_engine::value::F64;

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
    fn a_value_of_another_type_is_an_error() {
        let mut out = BytesMut::new();
        assert!(Cell(&Value::Text("x".into()))
            .to_sql(&Type::INT8, &mut out)
            .is_err());
    }
}
