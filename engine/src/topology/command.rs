//! `[commands.NAME]` sections: the declaration of one business operation the master accepts
//! ([`CommandSpec`]), and its parsing and validation. What the master does with one command is
//! [`crate::command`]'s.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

use super::{check_name, parse_columns, position_in_string, Reporter, Source};
use crate::plan::sql::{plan_expression, ExprColumn};
use crate::plan::Expr;
use crate::value::{Column, ColumnType, Row, Value};

/// One business operation the master accepts, as declared in the topology.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    /// The section name (`update_email`).
    pub name: String,
    /// The command topic (`user.cmd.update-email`), partitioned by entity key.
    pub topic: String,
    /// The command type carried in headers and written into the entity event
    /// (`UpdateUserEmail`).
    pub operation: String,
    /// The schema version of the payload this processor accepts.
    pub schema_version: u32,
    /// Index of the entity source (in the topology's sources) the command updates.
    pub entity: usize,
    /// Position of the key column in the entity's rows.
    pub entity_key: usize,
    /// Whether the command creates, updates or deletes its entity.
    pub kind: CommandKind,
    /// The payload's schema, as a source for the decoder: its columns and the one holding
    /// the entity key (named after the section, on the command topic).
    pub payload: Source,
    /// Who may send the command; `None` lets every authenticated principal.
    pub authorize: Option<Rule>,
    /// Validation rules, checked in order; the first that does not hold rejects.
    pub validate: Vec<Rule>,
    /// Entity columns the command sets.
    pub set: Vec<Assignment>,
    /// Entity columns stamped on every change.
    pub stamp: Stamp,
    /// The HTTP service asked before the command is applied (`check`), if any.
    pub check: Option<HttpCheck>,
    /// Retries of technical failures before the dead-letter topic.
    pub retry: RetryPolicy,
    /// Transactions run side by side, each for the partitions `p` with `p % lanes` equal to
    /// its number (commands of one entity stay in one partition, so in order).
    pub lanes: usize,
}

/// What a command does to its entity (`kind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommandKind {
    /// Creates the entity: rejected with `already_exists` when it exists. Its columns start
    /// NULL, but for the key (the command's) and what the command sets and stamps.
    Create,
    /// Updates an existing entity: rejected with `not_found` otherwise (the default).
    #[default]
    Update,
    /// Deletes an existing entity (a tombstone on the entity topic): rejected with
    /// `not_found` otherwise.
    Delete,
}

/// Suffix of a command topic's dead-letter topic.
pub const DLQ_SUFFIX: &str = ".dlq";

/// The dead-letter topic of a command topic (either name is accepted).
pub fn dlq_topic(topic: &str) -> String {
    if topic.ends_with(DLQ_SUFFIX) {
        topic.to_string()
    } else {
        format!("{topic}{DLQ_SUFFIX}")
    }
}

/// A boolean rule and what to answer when it does not hold.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The rule as written.
    pub sql: String,
    /// The planned rule.
    pub expr: Expr,
    /// Machine-readable code of the rejection (`invalid_email`).
    pub code: String,
    /// The payload field at fault, if one.
    pub field: Option<String>,
    /// Human-readable message.
    pub message: String,
}

/// `entity.column = expression`.
#[derive(Clone, Debug)]
pub struct Assignment {
    /// Entity column index.
    pub column: usize,
    /// The value, cast to the column's type.
    pub expr: Expr,
}

/// Entity columns the processor writes on every accepted command.
#[derive(Clone, Debug, PartialEq)]
pub struct Stamp {
    /// The version column (bigint), incremented.
    pub version: usize,
    /// The column naming the business operation (set to the command type).
    pub operation: Option<usize>,
    /// The change time.
    pub updated_at: Option<usize>,
    /// The principal who sent the command.
    pub changed_by: Option<usize>,
}

/// An HTTP service that checks each command before it is applied (`check = { url, timeout }`):
/// it gets the command as JSON in a POST; a 2xx lets it through, a 4xx rejects it with the
/// service's answer, anything else (a 5xx, a 408 or 429, no answer within `timeout`) is a
/// technical failure, retried, then parked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCheck {
    /// The service's URL (http or https).
    pub url: String,
    /// How long one attempt waits for the answer.
    pub timeout: Duration,
}

impl HttpCheck {
    /// 2 s: a check is on the command's path, whose caller waits.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
}

/// Exponential backoff of technical failures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all (the first one included) before the dead-letter topic.
    pub attempts: u32,
    /// Wait after the first failure.
    pub backoff: Duration,
    /// Longest wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The waits between attempts (backon's exponential backoff, without jitter): `backoff`,
    /// doubling up to `max_backoff`, to the millisecond (backon multiplies in floating point).
    pub fn delays(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(self.backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(2.0)
            .without_max_times()
            .build()
            .map(|d| Duration::from_millis((d.as_secs_f64() * 1000.0).round() as u64))
    }

    /// The wait after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let n = attempt.saturating_sub(1) as usize;
        self.delays().nth(n).unwrap_or(self.max_backoff)
    }
}

impl CommandSpec {
    /// The columns rules and assignments may name, in the order of the row they read.
    pub fn scope(columns: &[Column], entity: &Source) -> Vec<ExprColumn> {
        let column = |qualifier: &str, c: &Column| ExprColumn {
            qualifier: qualifier.into(),
            name: c.name.clone(),
            ty: c.ty,
        };
        let mut scope: Vec<ExprColumn> = columns.iter().map(|c| column("command", c)).collect();
        scope.extend(entity.columns.iter().map(|c| column("entity", c)));
        scope.extend(principal_scope());
        scope
    }

    /// What the master's view holds for an entity it deleted at `version` (a tombstone
    /// carries no version, and a re-creation continues from it): a row of `arity` NULLs but
    /// for the version. An entity row never has a NULL key, so it cannot be taken for one.
    pub fn deleted(&self, arity: usize, version: Option<i64>) -> Row {
        let mut row = vec![Value::Null; arity];
        row[self.stamp.version] = version.map_or(Value::Null, Value::Int);
        row
    }

    /// Whether `row` is what the view holds for a deleted entity (see
    /// [`CommandSpec::deleted`]).
    pub fn is_deleted(&self, row: &[Value]) -> bool {
        row[self.entity_key].is_null()
    }

    /// The version of an entity row (`None` when NULL).
    pub fn version_of(&self, row: &[Value]) -> Option<i64> {
        match row[self.stamp.version] {
            Value::Int(v) => Some(v),
            _ => None,
        }
    }

    /// The entity key a payload addresses (`None` when the key field is NULL).
    pub fn entity_key(&self, payload: &[Value]) -> Option<String> {
        match &payload[self.payload.key] {
            Value::Null => None,
            v => Some(v.to_key_text()),
        }
    }
}

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
    #[serde(default)]
    kind: Option<Spanned<String>>,
    #[serde(default)]
    set: Option<Spanned<IndexMap<String, Spanned<String>>>>,
    #[serde(default)]
    stamp: Option<Spanned<RawStamp>>,
    #[serde(default)]
    retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    check: Option<Spanned<RawCheck>>,
    #[serde(default)]
    lanes: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    url: Spanned<String>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
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
    let check = c.check.as_ref().and_then(|raw| check(r, raw.get_ref()));
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
    let kind = kind(r, c);
    let mut set = Vec::new();
    let no_set = IndexMap::new();
    for (column, sql) in c.set.as_ref().map_or(&no_set, |s| s.get_ref()) {
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
    if r.diagnostics.len() > before {
        return None;
    }
    Some(CommandSpec {
        name: name.to_string(),
        topic: c.topic.get_ref().clone(),
        operation,
        schema_version,
        entity,
        entity_key: source.key,
        kind,
        payload: Source {
            name: name.to_string(),
            topic: c.topic.get_ref().clone(),
            columns,
            key: key?,
            identity: vec![key?],
            stream: None,
            partition_column: key?,
            late: None,
            tombstone_retention: Source::DEFAULT_TOMBSTONE_RETENTION,
            global: false,
            format: crate::topology::SourceFormat::Json,
        },
        authorize,
        validate,
        set,
        stamp: stamp?,
        check,
        retry,
        lanes,
    })
}

/// The command's `check`: an http(s) URL and a timeout above zero.
fn check(r: &mut Reporter<'_>, raw: &RawCheck) -> Option<HttpCheck> {
    let url = raw.url.get_ref().trim();
    let scheme_ok = ["http://", "https://"].iter().any(|s| url.starts_with(s)) && url.len() > 8;
    if !scheme_ok {
        r.at(
            raw.url.span().start,
            format!("check.url `{url}` is not an http or https URL"),
            Some("check = { url = \"http://127.0.0.1:8089/check\", timeout = \"2s\" }".into()),
        );
    }
    let timeout = match &raw.timeout {
        None => HttpCheck::DEFAULT_TIMEOUT,
        Some(t) => match humantime::parse_duration(t.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                r.at(
                    t.span().start,
                    format!("bad check.timeout `{}`", t.get_ref()),
                    Some("a duration above zero, like \"2s\" or \"500ms\"".into()),
                );
                HttpCheck::DEFAULT_TIMEOUT
            }
        },
    };
    scheme_ok.then(|| HttpCheck {
        url: url.to_string(),
        timeout,
    })
}

/// The command's `kind`: an update unless it says otherwise. An update sets some column; a
/// delete sets none.
fn kind(r: &mut Reporter<'_>, c: &RawCommand) -> CommandKind {
    let kind = match c
        .kind
        .as_ref()
        .map(|k| (k.get_ref().as_str(), k.span().start))
    {
        None | Some(("update", _)) => CommandKind::Update,
        Some(("create", _)) => CommandKind::Create,
        Some(("delete", _)) => CommandKind::Delete,
        Some((other, at)) => {
            r.at(
                at,
                format!("unknown command kind `{other}`"),
                Some("create, update (the default) or delete".into()),
            );
            CommandKind::Update
        }
    };
    let set = c.set.as_ref().filter(|s| !s.get_ref().is_empty());
    match (kind, set) {
        (CommandKind::Update, None) => r.at(
            c.set
                .as_ref()
                .map_or(c.topic.span().start, |s| s.span().start),
            "the command sets no column",
            Some("set = { column = \"expression\" }, or kind = \"delete\"".into()),
        ),
        (CommandKind::Delete, Some(s)) => r.at(
            s.span().start,
            "a delete sets no column: the entity is gone",
            None,
        ),
        _ => {}
    }
    kind
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

/// The caller's columns a rule may name: `principal.id` and `principal.roles` (the roles,
/// comma-separated), after the row's.
pub(super) fn principal_scope() -> [ExprColumn; 2] {
    ["id", "roles"].map(|name| ExprColumn {
        qualifier: "principal".into(),
        name: name.into(),
        ty: ColumnType::Text,
    })
}

/// Plans rule or assignment `sql` over `scope`, of type `expect` if given; reports why not.
pub(super) fn expression(
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
