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
    /// `has_role(role)` in command rules: whether the comma-separated role list (the
    /// principal's roles, first argument) holds the role (second argument).
    HasRole,
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
    /// `e [NOT] LIKE pattern` (`ILIKE` when case-insensitive): `%` matches any run of
    /// characters, `_` any one character, `\\` escapes the next one.
    Like {
        /// The text to match.
        expr: Box<Expr>,
        /// The pattern.
        pattern: Box<Expr>,
        /// `NOT LIKE`.
        negated: bool,
        /// `ILIKE`.
        case_insensitive: bool,
    },
    /// `CAST(e AS ty)`
    Cast(Box<Expr>, ColumnType),
    /// `CASE WHEN c THEN v ... ELSE e END`
    Case(Vec<(Expr, Expr)>, Option<Box<Expr>>),
}

impl Expr {
    /// The input columns the expression reads, one reference per occurrence (to read them,
    /// or to renumber them when its input changes shape).
    pub(crate) fn columns_mut(&mut self) -> Vec<&mut usize> {
        let mut out = Vec::new();
        self.push_columns(&mut out);
        out
    }

    fn push_columns<'a>(&'a mut self, out: &mut Vec<&'a mut usize>) {
        match self {
            Expr::Column(c) => out.push(c),
            Expr::Literal(_) => {}
            Expr::Binary(_, l, r) => {
                l.push_columns(out);
                r.push_columns(out);
            }
            Expr::Not(e) | Expr::Neg(e) | Expr::IsNull(e, _) | Expr::Cast(e, _) => {
                e.push_columns(out)
            }
            Expr::Call(_, args) => args.iter_mut().for_each(|a| a.push_columns(out)),
            Expr::Like { expr, pattern, .. } => {
                expr.push_columns(out);
                pattern.push_columns(out);
            }
            Expr::Case(arms, otherwise) => {
                for (when, then) in arms {
                    when.push_columns(out);
                    then.push_columns(out);
                }
                if let Some(e) = otherwise {
                    e.push_columns(out);
                }
            }
        }
    }

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
            Expr::Like {
                expr,
                pattern,
                negated,
                case_insensitive,
            } => match (expr.eval(row), pattern.eval(row)) {
                (Value::Text(text), Value::Text(pattern)) => {
                    let matched = if *case_insensitive {
                        like(&text.to_lowercase(), &pattern.to_lowercase())
                    } else {
                        like(&text, &pattern)
                    };
                    Value::Bool(matched != *negated)
                }
                _ => Value::Null,
            },
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
        Concat => Value::Text(compact_str::format_compact!(
            "{}{}",
            l.to_key_text(),
            r.to_key_text()
        )),
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

/// SQL `LIKE` matching of `text` against `pattern`.
fn like(text: &str, pattern: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let pattern: Vec<char> = pattern.chars().collect();
    // Iterative matching with backtracking to the last `%`: linear in practice.
    let (mut t, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('%') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some('_') => {
                t += 1;
                p += 1;
                continue;
            }
            Some('\\') if p + 1 < pattern.len() && pattern[p + 1] == text[t] => {
                t += 1;
                p += 2;
                continue;
            }
            Some(c) if *c != '\\' && *c == text[t] => {
                t += 1;
                p += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|c| *c == '%')
}

fn call(func: Func, args: &[Expr], row: &[Value]) -> Value {
    match func {
        Func::HasRole => match (args[0].eval(row), args[1].eval(row)) {
            (Value::Text(roles), Value::Text(role)) => {
                Value::Bool(roles.split(',').any(|r| r.trim() == role))
            }
            _ => Value::Bool(false),
        },
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
            Value::Text(out.into())
        }
        Func::Lower | Func::Upper | Func::Trim | Func::Length => match args[0].eval(row) {
            Value::Text(s) => match func {
                Func::Lower => Value::Text(s.to_lowercase()),
                Func::Upper => Value::Text(s.to_uppercase()),
                Func::Trim => Value::Text(s.trim().into()),
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
        (v, ColumnType::Text) => Some(Value::Text(v.to_key_text().into())),
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
    fn like_patterns() {
        for (text, pattern, expected) in [
            ("ada@example.org", "%_@_%._%", true),
            ("ada@example", "%_@_%._%", false),
            ("@example.org", "%_@_%._%", false),
            ("abc", "a_c", true),
            ("abc", "a%", true),
            ("abc", "%c", true),
            ("abc", "b%", false),
            ("", "%", true),
            ("", "_", false),
            ("50%", "50\\%", true),
            ("500", "50\\%", false),
            ("aXbXc", "%X%X%", true),
        ] {
            assert_eq!(like(text, pattern), expected, "{text:?} LIKE {pattern:?}");
        }
        let ilike = Expr::Like {
            expr: lit(Value::Text("ADA@Example.org".into())),
            pattern: lit(Value::Text("%@example.ORG".into())),
            negated: false,
            case_insensitive: true,
        };
        assert_eq!(ilike.eval(&[]), Value::Bool(true));
        let not_like_null = Expr::Like {
            expr: lit(Value::Null),
            pattern: lit(Value::Text("%".into())),
            negated: true,
            case_insensitive: false,
        };
        assert_eq!(not_like_null.eval(&[]), Value::Null);
    }

    #[test]
    fn has_role_matches_whole_roles() {
        let roles = |list: &str, role: &str| {
            Expr::Call(
                Func::HasRole,
                vec![
                    Expr::Literal(Value::Text(list.into())),
                    Expr::Literal(Value::Text(role.into())),
                ],
            )
            .eval(&[])
        };
        assert_eq!(roles("user-admin,support", "support"), Value::Bool(true));
        assert_eq!(roles("user-admin", "admin"), Value::Bool(false));
        assert_eq!(roles("", "admin"), Value::Bool(false));
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
