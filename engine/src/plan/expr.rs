//! Scalar expressions over a row, and their evaluation.
//!
//! Expressions refer to columns by position in their input row. Evaluation follows SQL's
//! three-valued logic: comparisons and arithmetic with a NULL operand yield NULL; `AND`/`OR`
//! short-circuit on a definite `false`/`true`; a `WHERE` keeps a row only when its predicate is
//! `true` (NULL filters it out). Errors that data can cause (integer overflow, division by zero,
//! a failed cast) evaluate to NULL rather than failing the dataflow, like `TRY_CAST`; the plan
//! types every expression, so type errors are caught before anything runs.

use serde::{Deserialize, Serialize};

use crate::value::{parse_timestamp, ColumnType, Value, F64};

/// Binary operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BinaryOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `%`
    Mod,
    /// `=`
    Eq,
    /// `<>`
    NotEq,
    /// `<`
    Lt,
    /// `<=`
    LtEq,
    /// `>`
    Gt,
    /// `>=`
    GtEq,
    /// `AND`
    And,
    /// `OR`
    Or,
    /// `||` (text concatenation)
    Concat,
}

/// Scalar functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Func {
    /// `lower(text)`
    Lower,
    /// `upper(text)`
    Upper,
    /// `trim(text)`
    Trim,
    /// `length(text)`
    Length,
    /// `concat(a, b, ...)`: NULLs are skipped, as in PostgreSQL.
    Concat,
    /// `coalesce(a, b, ...)`: the first non-NULL argument.
    Coalesce,
}

/// A typed scalar expression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Expr {
    /// The value of input column `n`.
    Column(usize),
    /// A constant.
    Literal(Value),
    /// `l op r`
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `NOT e`
    Not(Box<Expr>),
    /// `-e`
    Neg(Box<Expr>),
    /// `e IS NULL` (or `IS NOT NULL` when negated).
    IsNull(Box<Expr>, bool),
    /// A function call.
    Call(Func, Vec<Expr>),
    /// `CAST(e AS ty)`
    Cast(Box<Expr>, ColumnType),
    /// `CASE WHEN c THEN v ... ELSE e END`
    Case(Vec<(Expr, Expr)>, Option<Box<Expr>>),
}

impl Expr {
    /// Evaluates the expression against `row`.
    pub fn eval(&self, row: &[Value]) -> Value {
        match self {
            Expr::Column(i) => row[*i].clone(),
            Expr::Literal(v) => v.clone(),
            Expr::Binary(BinaryOp::And, l, r) => match (l.eval(row), r.eval(row)) {
                (Value::Bool(false), _) | (_, Value::Bool(false)) => Value::Bool(false),
                (Value::Bool(true), Value::Bool(true)) => Value::Bool(true),
                _ => Value::Null,
            },
            Expr::Binary(BinaryOp::Or, l, r) => match (l.eval(row), r.eval(row)) {
                (Value::Bool(true), _) | (_, Value::Bool(true)) => Value::Bool(true),
                (Value::Bool(false), Value::Bool(false)) => Value::Bool(false),
                _ => Value::Null,
            },
            Expr::Binary(op, l, r) => binary(*op, l.eval(row), r.eval(row)),
            Expr::Not(e) => match e.eval(row) {
                Value::Bool(b) => Value::Bool(!b),
                _ => Value::Null,
            },
            Expr::Neg(e) => match e.eval(row) {
                Value::Int(i) => i.checked_neg().map(Value::Int).unwrap_or(Value::Null),
                Value::Float(f) => Value::Float(F64(-f.0)),
                _ => Value::Null,
            },
            Expr::IsNull(e, negated) => Value::Bool(e.eval(row).is_null() != *negated),
            Expr::Call(func, args) => call(*func, args, row),
            Expr::Cast(e, ty) => cast(e.eval(row), *ty),
            Expr::Case(branches, otherwise) => {
                for (cond, value) in branches {
                    if cond.eval(row) == Value::Bool(true) {
                        return value.eval(row);
                    }
                }
                otherwise
                    .as_ref()
                    .map(|e| e.eval(row))
                    .unwrap_or(Value::Null)
            }
        }
    }

    /// Whether the expression, as a predicate, holds for `row` (NULL counts as false).
    pub fn holds(&self, row: &[Value]) -> bool {
        self.eval(row) == Value::Bool(true)
    }
}

fn binary(op: BinaryOp, l: Value, r: Value) -> Value {
    use std::cmp::Ordering::*;
    use BinaryOp::*;
    if l.is_null() || r.is_null() {
        return Value::Null;
    }
    match op {
        Eq | NotEq | Lt | LtEq | Gt | GtEq => {
            let ord = match (&l, &r) {
                (Value::Int(a), Value::Float(b)) => F64(*a as f64).cmp(b),
                (Value::Float(a), Value::Int(b)) => a.cmp(&F64(*b as f64)),
                _ => l.cmp(&r),
            };
            Value::Bool(match op {
                Eq => ord == Equal,
                NotEq => ord != Equal,
                Lt => ord == Less,
                LtEq => ord != Greater,
                Gt => ord == Greater,
                _ => ord != Less,
            })
        }
        Concat => Value::Text(format!("{}{}", l.to_key_text(), r.to_key_text())),
        Add | Sub | Mul | Div | Mod => match (l, r) {
            (Value::Int(a), Value::Int(b)) => match op {
                Add => a.checked_add(b),
                Sub => a.checked_sub(b),
                Mul => a.checked_mul(b),
                Div => a.checked_div(b),
                _ => a.checked_rem(b),
            }
            .map(Value::Int)
            .unwrap_or(Value::Null),
            (a, b) => match (as_f64(&a), as_f64(&b)) {
                (Some(a), Some(b)) => {
                    let v = match op {
                        Add => a + b,
                        Sub => a - b,
                        Mul => a * b,
                        Div if b == 0.0 => return Value::Null,
                        Div => a / b,
                        _ if b == 0.0 => return Value::Null,
                        _ => a % b,
                    };
                    Value::Float(F64(v))
                }
                _ => Value::Null,
            },
        },
        And | Or => unreachable!("AND/OR are evaluated with short-circuit above"),
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(f.0),
        _ => None,
    }
}

fn call(func: Func, args: &[Expr], row: &[Value]) -> Value {
    match func {
        Func::Coalesce => args
            .iter()
            .map(|a| a.eval(row))
            .find(|v| !v.is_null())
            .unwrap_or(Value::Null),
        Func::Concat => {
            let mut out = String::new();
            for a in args {
                let v = a.eval(row);
                if !v.is_null() {
                    out.push_str(&v.to_key_text());
                }
            }
            Value::Text(out)
        }
        Func::Lower | Func::Upper | Func::Trim | Func::Length => match args[0].eval(row) {
            Value::Text(s) => match func {
                Func::Lower => Value::Text(s.to_lowercase()),
                Func::Upper => Value::Text(s.to_uppercase()),
                Func::Trim => Value::Text(s.trim().to_string()),
                _ => Value::Int(s.chars().count() as i64),
            },
            _ => Value::Null,
        },
    }
}

/// Casts a value to `ty`; a value that does not convert becomes NULL.
pub fn cast(v: Value, ty: ColumnType) -> Value {
    let converted = match (v, ty) {
        (Value::Null, _) => None,
        (v @ Value::Text(_), ColumnType::Text)
        | (v @ Value::Int(_), ColumnType::Bigint)
        | (v @ Value::Float(_), ColumnType::Double)
        | (v @ Value::Bool(_), ColumnType::Boolean)
        | (v @ Value::Timestamp(_), ColumnType::Timestamptz) => Some(v),
        (v, ColumnType::Text) => Some(Value::Text(v.to_key_text())),
        (Value::Float(f), ColumnType::Bigint) => {
            let r = f.0.round();
            (r.is_finite() && r.abs() < 9.2e18).then_some(Value::Int(r as i64))
        }
        (Value::Int(i), ColumnType::Double) => Some(Value::Float(F64(i as f64))),
        (Value::Bool(b), ColumnType::Bigint) => Some(Value::Int(b as i64)),
        (Value::Text(s), ColumnType::Bigint) => s.trim().parse().ok().map(Value::Int),
        (Value::Text(s), ColumnType::Double) => s.trim().parse().ok().map(|f| Value::Float(F64(f))),
        (Value::Text(s), ColumnType::Boolean) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "1" => Some(Value::Bool(true)),
            "false" | "f" | "no" | "0" => Some(Value::Bool(false)),
            _ => None,
        },
        (Value::Text(s), ColumnType::Timestamptz) => {
            parse_timestamp(s.trim()).map(Value::Timestamp)
        }
        _ => None,
    };
    converted.unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(v: Value) -> Box<Expr> {
        Box::new(Expr::Literal(v))
    }

    #[test]
    fn three_valued_logic() {
        let null_and_false = Expr::Binary(BinaryOp::And, lit(Value::Null), lit(Value::Bool(false)));
        assert_eq!(null_and_false.eval(&[]), Value::Bool(false));
        let null_or_false = Expr::Binary(BinaryOp::Or, lit(Value::Null), lit(Value::Bool(false)));
        assert_eq!(null_or_false.eval(&[]), Value::Null);
        assert!(!null_or_false.holds(&[]));
        let eq_null = Expr::Binary(BinaryOp::Eq, lit(Value::Null), lit(Value::Null));
        assert_eq!(eq_null.eval(&[]), Value::Null);
    }

    #[test]
    fn arithmetic_overflow_and_division_by_zero_are_null() {
        let overflow = Expr::Binary(BinaryOp::Add, lit(Value::Int(i64::MAX)), lit(Value::Int(1)));
        assert_eq!(overflow.eval(&[]), Value::Null);
        let div0 = Expr::Binary(BinaryOp::Div, lit(Value::Int(1)), lit(Value::Int(0)));
        assert_eq!(div0.eval(&[]), Value::Null);
        let mixed = Expr::Binary(
            BinaryOp::Mul,
            lit(Value::Int(2)),
            lit(Value::Float(F64(1.5))),
        );
        assert_eq!(mixed.eval(&[]), Value::Float(F64(3.0)));
    }

    #[test]
    fn functions_case_and_cast() {
        let row = vec![Value::Text("  Ada@Example.COM ".into()), Value::Null];
        let e = Expr::Call(
            Func::Lower,
            vec![Expr::Call(Func::Trim, vec![Expr::Column(0)])],
        );
        assert_eq!(e.eval(&row), Value::Text("ada@example.com".into()));
        let c = Expr::Call(
            Func::Coalesce,
            vec![Expr::Column(1), Expr::Literal(Value::Int(7))],
        );
        assert_eq!(c.eval(&row), Value::Int(7));
        let case = Expr::Case(
            vec![(
                Expr::IsNull(Box::new(Expr::Column(1)), false),
                Expr::Literal(Value::Text("none".into())),
            )],
            None,
        );
        assert_eq!(case.eval(&row), Value::Text("none".into()));
        assert_eq!(
            cast(Value::Text("12".into()), ColumnType::Bigint),
            Value::Int(12)
        );
        assert_eq!(
            cast(Value::Text("x".into()), ColumnType::Bigint),
            Value::Null
        );
    }
}
