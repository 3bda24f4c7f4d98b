//! `[commands.NAME]` sections: parsing and validation into [`CommandSpec`]s.

use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

use super::{check_name, parse_columns, position_in_string, Reporter, Source};
use crate::command::{Assignment, CommandSpec, RetryPolicy, Rule, Stamp};
use crate::plan::sql::{plan_expression, ExprColumn};
use crate::plan::Expr;
use crate::value::ColumnType;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCommand {
    topic: Spanned<String>,
    entity: Spanned<String>,
    key: Spanned<String>,
    #[serde(default)]
    operation: Option<Spanned<String>>,
    #[serde(default)]
    schema_version: Option<Spanned<i64>>,
    columns: Spanned<IndexMap<String, Spanned<String>>>,
    #[serde(default)]
    authorize: Option<Spanned<RawRule>>,
    #[serde(default)]
    validate: Vec<Spanned<RawRule>>,
    set: Spanned<IndexMap<String, Spanned<String>>>,
    #[serde(default)]
    stamp: Option<Spanned<RawStamp>>,
    #[serde(default)]
    retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    lanes: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    rule: Spanned<String>,
    #[serde(default)]
    message: Option<Spanned<String>>,
    #[serde(default)]
    field: Option<Spanned<String>>,
    #[serde(default)]
    code: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStamp {
    #[serde(default)]
    version: Option<Spanned<String>>,
    #[serde(default)]
    operation: Option<Spanned<String>>,
    #[serde(default)]
    updated_at: Option<Spanned<String>>,
    #[serde(default)]
    changed_by: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    attempts: Option<Spanned<i64>>,
    #[serde(default)]
    backoff: Option<Spanned<String>>,
    #[serde(default)]
    max_backoff: Option<Spanned<String>>,
}

/// Transactions side by side when a command section does not say: one, since fewer and
/// larger transactions cost the broker less per command (docs/commands.md, `lanes`).
const DEFAULT_LANES: usize = 1;

/// Validates one command section against the (valid) sources.
pub(super) fn validate_command(
    r: &mut Reporter<'_>,
    name: &str,
    raw: &Spanned<RawCommand>,
    sources: &[Source],
) -> Option<CommandSpec> {
    let before = r.diagnostics.len();
    check_name(r, name, raw.span().start, "command");
    let c = raw.get_ref();
    if c.topic.get_ref().trim().is_empty() {
        r.at(c.topic.span().start, "empty command topic", None);
    }
    let Some(entity) = sources.iter().position(|s| &s.name == c.entity.get_ref()) else {
        let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        r.at(
            c.entity.span().start,
            format!("unknown entity source `{}`", c.entity.get_ref()),
            Some(format!("sources: {}", names.join(", "))),
        );
        return None;
    };
    let source = &sources[entity];
    let columns = parse_columns(r, c.columns.get_ref(), "command column");
    let key = columns
        .iter()
        .position(|x| x.name == c.key.get_ref().to_lowercase());
    match key {
        None => r.at(
            c.key.span().start,
            format!("key `{}` is not a column of the command", c.key.get_ref()),
            Some("declare it in the command's `columns`".into()),
        ),
        Some(k) if columns[k].ty != source.columns[source.key].ty => r.at(
            c.key.span().start,
            format!(
                "key `{}` is {}, the key of `{}` is {}",
                columns[k].name, columns[k].ty, source.name, source.columns[source.key].ty
            ),
            None,
        ),
        Some(_) => {}
    }
    let stamp = stamp(r, c, source);
    let schema_version = match &c.schema_version {
        None => 1,
        Some(v) if (1..=i64::from(u32::MAX)).contains(v.get_ref()) => *v.get_ref() as u32,
        Some(v) => {
            r.at(
                v.span().start,
                "schema_version must be a positive integer",
                None,
            );
            1
        }
    };
    if r.diagnostics.len() > before {
        return None;
    }
    let retry = retry(r, c.retry.as_ref());
    let lanes = match &c.lanes {
        None => DEFAULT_LANES,
        Some(n) if (1..=64).contains(n.get_ref()) => *n.get_ref() as usize,
        Some(n) => {
            r.at(n.span().start, "lanes must be between 1 and 64", None);
            DEFAULT_LANES
        }
    };
    let scope = CommandSpec::scope(&columns, source);
    let operation = c
        .operation
        .as_ref()
        .map(|o| o.get_ref().clone())
        .unwrap_or_else(|| name.to_string());
    let authorize = c.authorize.as_ref().and_then(|a| {
        rule(
            r,
            a,
            &scope,
            "forbidden",
            &format!("the principal may not send {operation}"),
        )
    });
    let validate: Vec<Rule> = c
        .validate
        .iter()
        .filter_map(|v| rule(r, v, &scope, "invalid", "the command is not valid"))
        .collect();
    let mut set = Vec::new();
    for (column, sql) in c.set.get_ref() {
        let Some(i) = source.columns.iter().position(|x| &x.name == column) else {
            r.at(
                sql.span().start,
                format!("`{column}` is not a column of `{}`", source.name),
                None,
            );
            continue;
        };
        if i == source.key || Some(i) == stamp.as_ref().map(|s| s.version) {
            r.at(
                sql.span().start,
                format!("`{column}` cannot be set by a command (it is the key or the version)"),
                None,
            );
            continue;
        }
        if let Some(expr) = expression(r, sql, &scope, None) {
            set.push(Assignment { column: i, expr });
        }
    }
    if c.set.get_ref().is_empty() {
        r.at(c.set.span().start, "the command sets no column", None);
    }
    if r.diagnostics.len() > before {
        return None;
    }
    Some(CommandSpec {
        name: name.to_string(),
        topic: c.topic.get_ref().clone(),
        operation,
        schema_version,
        entity,
        columns,
        key: key?,
        authorize,
        validate,
        set,
        stamp: stamp?,
        retry,
        lanes,
    })
}

/// The stamped columns: explicit, else the late policy's version and operation columns and
/// the columns named `updated_at` and `changed_by` when the entity has them.
fn stamp(r: &mut Reporter<'_>, c: &RawCommand, source: &Source) -> Option<Stamp> {
    let raw = c.stamp.as_ref().map(|s| s.get_ref());
    let find =
        |r: &mut Reporter<'_>, named: Option<&Spanned<String>>, default: Option<usize>| match named
        {
            None => Some(default),
            Some(n) => match source.columns.iter().position(|x| &x.name == n.get_ref()) {
                Some(i) => Some(Some(i)),
                None => {
                    r.at(
                        n.span().start,
                        format!("`{}` is not a column of `{}`", n.get_ref(), source.name),
                        None,
                    );
                    None
                }
            },
        };
    let by_name = |n: &str| source.columns.iter().position(|x| x.name == n);
    let late = source.late.as_ref();
    let version = find(
        r,
        raw.and_then(|s| s.version.as_ref()),
        late.map(|l| l.order_by),
    )?;
    let operation = find(
        r,
        raw.and_then(|s| s.operation.as_ref()),
        late.and_then(|l| l.per),
    )?;
    let updated_at = find(
        r,
        raw.and_then(|s| s.updated_at.as_ref()),
        by_name("updated_at"),
    )?;
    let changed_by = find(
        r,
        raw.and_then(|s| s.changed_by.as_ref()),
        by_name("changed_by"),
    )?;
    let at = c
        .stamp
        .as_ref()
        .map_or(c.entity.span().start, |s| s.span().start);
    let Some(version) = version.filter(|v| source.columns[*v].ty == ColumnType::Bigint) else {
        r.at(
            at,
            format!(
                "the command needs a bigint version column of `{}`",
                source.name
            ),
            Some(
                "order the source's late policy by it, or set stamp = { version = \"...\" }".into(),
            ),
        );
        return None;
    };
    for (what, i, ok) in [
        ("operation", operation, &[ColumnType::Text][..]),
        ("changed_by", changed_by, &[ColumnType::Text][..]),
        (
            "updated_at",
            updated_at,
            &[ColumnType::Timestamptz, ColumnType::Text][..],
        ),
    ] {
        if let Some(i) = i.filter(|i| !ok.contains(&source.columns[*i].ty)) {
            r.at(
                at,
                format!(
                    "stamp.{what} `{}` is {}, not {}",
                    source.columns[i].name, source.columns[i].ty, ok[0]
                ),
                None,
            );
            return None;
        }
    }
    Some(Stamp {
        version,
        operation,
        updated_at,
        changed_by,
    })
}

fn retry(r: &mut Reporter<'_>, raw: Option<&Spanned<RawRetry>>) -> RetryPolicy {
    let mut policy = RetryPolicy::default();
    let Some(raw) = raw.map(|x| x.get_ref()) else {
        return policy;
    };
    if let Some(a) = &raw.attempts {
        match u32::try_from(*a.get_ref()) {
            Ok(n) if n >= 1 => policy.attempts = n,
            _ => r.at(a.span().start, "retry.attempts must be at least 1", None),
        }
    }
    for (field, target) in [
        (&raw.backoff, &mut policy.backoff),
        (&raw.max_backoff, &mut policy.max_backoff),
    ] {
        if let Some(d) = field {
            match humantime::parse_duration(d.get_ref()) {
                Ok(v) => *target = v,
                Err(e) => r.at(
                    d.span().start,
                    format!("bad duration `{}`: {e}", d.get_ref()),
                    Some("write it like \"100ms\", \"2s\" or \"1m\"".into()),
                ),
            }
        }
    }
    policy
}

fn rule(
    r: &mut Reporter<'_>,
    raw: &Spanned<RawRule>,
    scope: &[ExprColumn],
    default_code: &str,
    default_message: &str,
) -> Option<Rule> {
    let raw = raw.get_ref();
    let expr = expression(r, &raw.rule, scope, Some(ColumnType::Boolean))?;
    Some(Rule {
        sql: raw.rule.get_ref().clone(),
        expr,
        code: raw
            .code
            .as_ref()
            .map_or(default_code.into(), |c| c.get_ref().clone()),
        field: raw.field.as_ref().map(|f| f.get_ref().clone()),
        message: raw
            .message
            .as_ref()
            .map_or(default_message.into(), |m| m.get_ref().clone()),
    })
}

fn expression(
    r: &mut Reporter<'_>,
    sql: &Spanned<String>,
    scope: &[ExprColumn],
    expect: Option<ColumnType>,
) -> Option<Expr> {
    match plan_expression(sql.get_ref(), scope) {
        Ok((expr, ty)) => match expect {
            Some(want) if ty.is_some_and(|t| t != want) => {
                r.at(
                    sql.span().start,
                    format!(
                        "`{}` is {}, a rule must be boolean",
                        sql.get_ref(),
                        ty.map_or("null".into(), |t| t.to_string())
                    ),
                    None,
                );
                None
            }
            _ => Some(expr),
        },
        Err(e) => {
            let at = position_in_string(r.text, sql.span().start, e.line, e.col);
            r.push(at, e.message, e.hint);
            None
        }
    }
}
