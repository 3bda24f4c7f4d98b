//! A source's late-event policy, as the topology file declares it (`late = { ... }`): which
//! column orders a key's events, per which business operation, and what to do with a late
//! one, and which columns each operation owns. What the policy decides for one event is
//! [`crate::ingest::late`]'s.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::Reporter;
use crate::value::{Column, ColumnType, Value};

/// The most business operations `late.max_operations` lets a key keep: every event of the
/// key looks its operation up among them.
const MAX_OPERATIONS_LIMIT: usize = 1024;

/// `late = { ... }` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLate {
    order_by: Spanned<String>,
    #[serde(default)]
    per: Option<Spanned<String>>,
    #[serde(default)]
    action: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tombstone_retention: Option<Spanned<String>>,
    #[serde(default)]
    max_operations: Option<Spanned<i64>>,
    #[serde(default)]
    owns: Option<Spanned<IndexMap<String, Vec<Spanned<String>>>>>,
}

/// What to do with a late event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LateAction {
    /// Drop it (logged and counted): the default.
    Drop,
    /// Apply it anyway (logged and counted).
    Keep,
}

/// A source's late-event policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatePolicy {
    /// Column whose value orders events (a version or a timestamp).
    pub order_by: usize,
    /// Column naming the business operation; `None` orders all events of a key together.
    pub per: Option<usize>,
    /// What to do with late events.
    pub action: LateAction,
    /// How many business operations a key keeps an order value for (`late.max_operations`);
    /// past it, the one applied longest ago is forgotten.
    pub max_operations: usize,
    /// Which columns each business operation owns (`late.owns`); `None` applies every event
    /// as a full snapshot.
    pub owns: Option<Ownership>,
}

/// Which columns the events of each business operation may write (`late.owns`).
///
/// An event of a listed operation writes the columns it owns and the columns no operation
/// owns (the version, the event type, a timestamp); an event of an operation that is not
/// listed writes every column. A column takes an event's value only when that event is newer
/// than the one that wrote the column last, so no late event of one operation can revert
/// another's change (see [`crate::ingest::upsert`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// Per listed operation (a value of the `per` column), the columns it owns.
    pub operations: Vec<(Value, Vec<usize>)>,
    /// Per column, whether some operation owns it.
    pub owned: Vec<bool>,
}

impl Ownership {
    /// Which columns an event of `operation` may write (the operation is looked up once, for
    /// all of an event's columns).
    pub fn writes(&self, operation: &Value) -> impl Fn(usize) -> bool + '_ {
        let own = self
            .operations
            .iter()
            .find(|(op, _)| op == operation)
            .map(|(_, columns)| columns);
        move |column| own.is_none_or(|own| !self.owned[column] || own.contains(&column))
    }

    /// Describes the ownership with column names, for `explain` and the state's layout.
    pub fn describe(&self, columns: &[Column]) -> String {
        let operations: Vec<String> = self
            .operations
            .iter()
            .map(|(op, owned)| {
                let names: Vec<&str> = owned.iter().map(|&c| columns[c].name.as_str()).collect();
                format!("{} owns [{}]", op.to_key_text(), names.join(", "))
            })
            .collect();
        operations.join(", ")
    }
}

impl LatePolicy {
    /// 64: business operations are a short list (`EmailUpdated`, `NameChanged`, ...); more
    /// distinct values of `per` for one key means the column is not one.
    pub const DEFAULT_MAX_OPERATIONS: usize = 64;

    /// Describes the policy with column names, for `explain`.
    pub fn describe(&self, columns: &[Column]) -> String {
        let owns = self
            .owns
            .as_ref()
            .map(|o| format!("; {}", o.describe(columns)))
            .unwrap_or_default();
        format!(
            "order by {} per {}, {}{owns}",
            columns[self.order_by].name,
            self.per.map(|p| columns[p].name.as_str()).unwrap_or("key"),
            match self.action {
                LateAction::Drop => "drop late events",
                LateAction::Keep => "keep late events",
            }
        )
    }

    /// The business operation of `row` (NULL when ordering per key).
    pub fn operation<'a>(&self, row: &'a [Value]) -> &'a Value {
        const PER_KEY: &Value = &Value::Null;
        self.per.map_or(PER_KEY, |p| &row[p])
    }

    /// The order value of `row`.
    pub fn order<'a>(&self, row: &'a [Value]) -> &'a Value {
        &row[self.order_by]
    }
}

/// Checks a source's late policy against its `columns` (known good); reports what is wrong.
pub(super) fn validate(
    r: &mut Reporter<'_>,
    late: &Spanned<RawLate>,
    columns: &[Column],
) -> Option<LatePolicy> {
    let before = r.diagnostics.len();
    let l = late.get_ref();
    let order_by = order_by(r, &l.order_by, columns);
    let per = per(r, l.per.as_ref(), columns);
    let action = action(r, l.action.as_ref());
    let max_operations = max_operations(r, l);
    let owns = match (&l.owns, per) {
        (Some(owns), _) => ownership(r, owns, columns, (per, order_by, action)),
        (None, Some(_)) => {
            r.warn_at(
                late.span().start,
                "late.per without late.owns: every event is applied as a full snapshot, so an \
                 event that arrives after a newer event of another operation puts back that \
                 one's columns",
                Some(
                    "declare which columns each operation changes: \
                     owns = { UpdateUserEmail = [\"email\"], ... }"
                        .into(),
                ),
            );
            None
        }
        (None, None) => None,
    };
    if r.diagnostics.len() > before {
        return None;
    }
    Some(LatePolicy {
        order_by: order_by?,
        per,
        action,
        max_operations,
        owns,
    })
}

fn find(columns: &[Column], name: &str) -> Option<usize> {
    columns.iter().position(|c| c.name == name.to_lowercase())
}

fn order_by(r: &mut Reporter<'_>, name: &Spanned<String>, columns: &[Column]) -> Option<usize> {
    let at = name.span().start;
    let found = find(columns, name.get_ref());
    match found.map(|i| columns[i].ty) {
        None => r.at(
            at,
            format!(
                "late.order_by `{}` is not a declared column",
                name.get_ref()
            ),
            None,
        ),
        Some(ColumnType::Bigint | ColumnType::Timestamptz | ColumnType::Double) => {}
        Some(other) => r.at(
            at,
            format!(
                "late.order_by must be a bigint, double or timestamptz column, `{}` is {other}",
                name.get_ref()
            ),
            None,
        ),
    }
    found
}

fn per(r: &mut Reporter<'_>, per: Option<&Spanned<String>>, columns: &[Column]) -> Option<usize> {
    let p = per.filter(|p| p.get_ref() != "key")?;
    let found = find(columns, p.get_ref());
    if found.is_none() {
        r.at(
            p.span().start,
            format!("late.per `{}` is not a declared column", p.get_ref()),
            Some("per = \"key\" or the column naming the business operation".into()),
        );
    }
    found
}

fn action(r: &mut Reporter<'_>, action: Option<&Spanned<String>>) -> LateAction {
    match action.map(|a| (a.get_ref().as_str(), a.span().start)) {
        None | Some(("drop", _)) => LateAction::Drop,
        Some(("keep", _)) => LateAction::Keep,
        Some((other, at)) => {
            r.at(
                at,
                format!("unknown late.action `{other}`"),
                Some("drop (default) or keep".into()),
            );
            LateAction::Drop
        }
    }
}

fn max_operations(r: &mut Reporter<'_>, l: &RawLate) -> usize {
    match &l.max_operations {
        None => LatePolicy::DEFAULT_MAX_OPERATIONS,
        Some(m) if l.per.is_none() => {
            r.at(
                m.span().start,
                "late.max_operations needs late.per".to_string(),
                Some("without `per`, a key has one order value".into()),
            );
            LatePolicy::DEFAULT_MAX_OPERATIONS
        }
        Some(m) => match usize::try_from(*m.get_ref()) {
            Ok(n @ 1..=MAX_OPERATIONS_LIMIT) => n,
            _ => {
                r.at(
                    m.span().start,
                    format!("bad late.max_operations `{}`", m.get_ref()),
                    Some(format!("a number from 1 to {MAX_OPERATIONS_LIMIT}")),
                );
                LatePolicy::DEFAULT_MAX_OPERATIONS
            }
        },
    }
}

/// Checks `late.owns`: it needs a text `per` column and `action = "drop"`, and names declared
/// columns other than the ones every event carries (`per`, `order_by`).
fn ownership(
    r: &mut Reporter<'_>,
    owns: &Spanned<IndexMap<String, Vec<Spanned<String>>>>,
    columns: &[Column],
    (per, order_by, action): (Option<usize>, Option<usize>, LateAction),
) -> Option<Ownership> {
    let at = owns.span().start;
    let Some(per) = per else {
        r.at(
            at,
            "late.owns needs late.per",
            Some("per = the column naming the business operation".into()),
        );
        return None;
    };
    if columns[per].ty != ColumnType::Text {
        r.at(
            at,
            format!(
                "late.owns needs a text `per` column, `{}` is {}",
                columns[per].name, columns[per].ty
            ),
            None,
        );
    }
    if action == LateAction::Keep {
        r.at(
            at,
            "late.owns keeps late events from putting back other operations' columns, \
             action = \"keep\" applies them whole",
            Some("drop `action = \"keep\"` or `owns`".into()),
        );
    }
    let mut ownership = Ownership {
        operations: Vec::new(),
        owned: vec![false; columns.len()],
    };
    for (operation, names) in owns.get_ref() {
        let mut owned = Vec::new();
        for name in names {
            let column = owned_column(r, name, columns, [Some(per), order_by]);
            if let Some(c) = column.filter(|c| !owned.contains(c)) {
                ownership.owned[c] = true;
                owned.push(c);
            }
        }
        ownership
            .operations
            .push((Value::Text(operation.as_str().into()), owned));
    }
    Some(ownership)
}

/// The column `name` of an operation's `owns` list, when an operation may own it (not one of
/// the columns `every_event` carries).
fn owned_column(
    r: &mut Reporter<'_>,
    name: &Spanned<String>,
    columns: &[Column],
    every_event: [Option<usize>; 2],
) -> Option<usize> {
    let at = name.span().start;
    match find(columns, name.get_ref()) {
        None => r.at(
            at,
            format!("late.owns: `{}` is not a declared column", name.get_ref()),
            None,
        ),
        Some(c) if every_event.contains(&Some(c)) => r.at(
            at,
            format!(
                "late.owns: every event carries `{}`, no operation owns it",
                name.get_ref()
            ),
            Some("the columns no operation owns take the newest event's value".into()),
        ),
        Some(c) => return Some(c),
    }
    None
}
