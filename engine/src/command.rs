//! Commands: how the master side decides what to do with one command.
//!
//! A topology's `[commands.NAME]` section declares one business operation (`UpdateUserEmail`):
//! the command topic, the entity source it updates, the payload's columns, an authorization
//! rule, validation rules and the assignments it applies. This module holds that declaration
//! ([`CommandSpec`]) and the pure decision for one command ([`CommandSpec::decide`]); the
//! Kafka transport (transactions, retries, dead letters, replies) lives in the connectors.
//!
//! Rules and assignments are SQL expressions over one row laid out as
//! `command.*` (the payload), `entity.*` (the current entity, NULLs when there is none),
//! `principal.id` and `principal.roles` (comma-separated; `has_role('r')` tests one).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::plan::expr::cast;
use crate::plan::sql::ExprColumn;
use crate::plan::Expr;
use crate::topology::Source;
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
    /// The payload's columns.
    pub columns: Vec<Column>,
    /// The payload column holding the entity key.
    pub key: usize,
    /// Who may send the command; `None` lets every authenticated principal.
    pub authorize: Option<Rule>,
    /// Validation rules, checked in order; the first that does not hold rejects.
    pub validate: Vec<Rule>,
    /// Entity columns the command sets.
    pub set: Vec<Assignment>,
    /// Entity columns stamped on every change.
    pub stamp: Stamp,
    /// Retries of technical failures before the dead-letter topic.
    pub retry: RetryPolicy,
    /// Transactions run side by side, each for the partitions `p` with `p % lanes` equal to
    /// its number (commands of one entity stay in one partition, so in order).
    pub lanes: usize,
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
    /// The wait after failed attempt number `attempt` (1-based), without jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// The authenticated user a command acts for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// User id (`changed_by` in the entity event).
    pub id: String,
    /// Roles.
    pub roles: Vec<String>,
}

impl Principal {
    /// A principal with the roles of a comma-separated list (as carried in headers).
    pub fn new(id: impl Into<String>, roles: &str) -> Principal {
        Principal {
            id: id.into(),
            roles: roles
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect(),
        }
    }
}

/// One command as the processor sees it.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// The decoded payload (laid out as [`CommandSpec::columns`]).
    pub payload: &'a [Value],
    /// Who sent it.
    pub principal: &'a Principal,
    /// The caller stops waiting at this instant (ms since the epoch).
    pub deadline_ms: Option<i64>,
    /// Set by a dead-letter replay: the entity version when the command was parked. A replayed
    /// command whose entity moved on since is not applied.
    pub parked_at_version: Option<i64>,
}

/// The answer to a command, sent to the caller's reply topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Reply {
    /// Applied: the new entity event is at `partition`/`offset` of the entity topic.
    Accepted {
        /// The entity's new version.
        version: i64,
        /// Partition of the new entity event.
        partition: i32,
        /// Offset of the new entity event.
        offset: i64,
    },
    /// A validation or business rule does not hold; not retried.
    Rejected {
        /// Machine-readable code.
        code: String,
        /// The payload field at fault, if one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
        /// Human-readable message.
        message: String,
    },
    /// The principal may not send this command.
    Forbidden {
        /// Why.
        message: String,
    },
    /// A technical failure outlasted the retries: the command is parked in the dead-letter
    /// topic and will be applied when replayed.
    Deferred {
        /// The dead-letter topic.
        topic: String,
        /// Partition of the parked command.
        partition: i32,
        /// Offset of the parked command.
        offset: i64,
        /// The last failure.
        message: String,
    },
    /// The deadline passed before processing, or (on replay) the entity moved on since the
    /// command was parked; not applied.
    Expired {
        /// Why.
        message: String,
    },
}

impl Reply {
    /// The outcome's name, as used in metrics labels.
    pub fn outcome(&self) -> &'static str {
        match self {
            Reply::Accepted { .. } => "accepted",
            Reply::Rejected { .. } => "rejected",
            Reply::Forbidden { .. } => "forbidden",
            Reply::Deferred { .. } => "deferred",
            Reply::Expired { .. } => "expired",
        }
    }
}

/// What to do with a command.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Publish `entity` (the whole new snapshot) at `version`.
    Apply {
        /// The new entity row.
        entity: Row,
        /// Its version.
        version: i64,
    },
    /// Answer at once, change nothing.
    Answer(Reply),
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
        for name in ["id", "roles"] {
            scope.push(ExprColumn {
                qualifier: "principal".into(),
                name: name.into(),
                ty: ColumnType::Text,
            });
        }
        scope
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
        match &payload[self.key] {
            Value::Null => None,
            v => Some(v.to_key_text()),
        }
    }

    /// Decides what to do with `request`, given the current entity row (`None` when the
    /// entity does not exist) and the time (µs since the epoch). In order: deadline, replay
    /// staleness, authorization, existence, validation rules.
    pub fn decide(
        &self,
        entity: &Source,
        request: &Request<'_>,
        current: Option<&[Value]>,
        now_micros: i64,
    ) -> Decision {
        if let Some(deadline) = request.deadline_ms {
            if now_micros / 1000 > deadline {
                return Decision::Answer(Reply::Expired {
                    message: "the deadline passed before the command was processed".into(),
                });
            }
        }
        let current_version = current.and_then(|row| self.version_of(row));
        if let Some(parked) = request.parked_at_version {
            if current_version != Some(parked) {
                return Decision::Answer(Reply::Expired {
                    message: format!(
                        "the entity changed since the command was parked (version {parked}, now {})",
                        current_version.map_or("none".into(), |v| v.to_string())
                    ),
                });
            }
        }
        let mut scope: Row = request.payload.to_vec();
        match current {
            Some(row) => scope.extend_from_slice(row),
            None => scope.extend(std::iter::repeat_n(Value::Null, entity.columns.len())),
        }
        scope.push(Value::Text(request.principal.id.as_str().into()));
        scope.push(Value::Text(request.principal.roles.join(",").into()));
        if let Some(rule) = &self.authorize {
            if !rule.expr.holds(&scope) {
                return Decision::Answer(Reply::Forbidden {
                    message: rule.message.clone(),
                });
            }
        }
        let Some(current) = current else {
            return Decision::Answer(Reply::Rejected {
                code: "not_found".into(),
                field: Some(self.columns[self.key].name.clone()),
                message: format!(
                    "no {} with key {}",
                    entity.name,
                    self.entity_key(request.payload).unwrap_or_default()
                ),
            });
        };
        for rule in &self.validate {
            if !rule.expr.holds(&scope) {
                return Decision::Answer(Reply::Rejected {
                    code: rule.code.clone(),
                    field: rule.field.clone(),
                    message: rule.message.clone(),
                });
            }
        }
        let mut next = current.to_vec();
        for a in &self.set {
            next[a.column] = cast(a.expr.eval(&scope), entity.columns[a.column].ty);
        }
        let version = current_version.unwrap_or(0) + 1;
        next[self.stamp.version] = Value::Int(version);
        if let Some(i) = self.stamp.operation {
            next[i] = Value::Text(self.operation.as_str().into());
        }
        if let Some(i) = self.stamp.updated_at {
            next[i] = cast(Value::Timestamp(now_micros), entity.columns[i].ty);
        }
        if let Some(i) = self.stamp.changed_by {
            next[i] = Value::Text(request.principal.id.as_str().into());
        }
        Decision::Apply {
            entity: next,
            version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Topology;
    use crate::value::parse_timestamp;

    const MASTER: &str = r#"
name = "master"
[sources.users]
topic = "user"
key = "id"
columns = { id = "text", email = "text", version = "bigint", event_type = "text", updated_at = "timestamptz", changed_by = "text" }
late = { order_by = "version", per = "event_type" }

[tables.users_by_id]
query = "SELECT id, email FROM users"

[commands.update_email]
topic = "user.cmd.update-email"
operation = "UpdateUserEmail"
entity = "users"
key = "id"
columns = { id = "text", email = "text" }
authorize = { rule = "has_role('user-admin') OR principal.id = command.id", message = "only the user or an admin" }
validate = [
  { rule = "command.email LIKE '%_@_%._%'", field = "email", code = "invalid_email", message = "not an email address" },
  { rule = "entity.email IS NULL OR lower(command.email) <> entity.email", code = "unchanged", message = "same email" },
]
set = { email = "lower(trim(command.email))" }
"#;

    fn setup() -> (Topology, Row) {
        let t = Topology::parse("master.toml", MASTER).unwrap();
        let current = vec![
            Value::Text("u1".into()),
            Value::Text("old@example.org".into()),
            Value::Int(4),
            Value::Text("Created".into()),
            Value::Timestamp(0),
            Value::Null,
        ];
        (t, current)
    }

    fn request<'a>(payload: &'a [Value], principal: &'a Principal) -> Request<'a> {
        Request {
            payload,
            principal,
            deadline_ms: None,
            parked_at_version: None,
        }
    }

    fn payload(email: &str) -> Row {
        vec![Value::Text("u1".into()), Value::Text(email.into())]
    }

    fn user(id: &str, roles: &[&str]) -> Principal {
        Principal {
            id: id.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn accepted_command_stamps_the_entity() {
        let (t, current) = setup();
        let spec = &t.commands[0];
        let now = parse_timestamp("2026-11-26T10:00:00Z").unwrap();
        let p = payload(" New@Example.org ");
        let alice = user("alice", &["user-admin"]);
        let d = spec.decide(&t.sources[0], &request(&p, &alice), Some(&current), now);
        let Decision::Apply { entity, version } = d else {
            panic!("not applied: {d:?}");
        };
        assert_eq!(version, 5);
        assert_eq!(entity[1], Value::Text("new@example.org".into()));
        assert_eq!(entity[2], Value::Int(5));
        assert_eq!(entity[3], Value::Text("UpdateUserEmail".into()));
        assert_eq!(entity[4], Value::Timestamp(now));
        assert_eq!(entity[5], Value::Text("alice".into()));
    }

    #[test]
    fn rules_answer_in_order_forbidden_then_rejected() {
        let (t, current) = setup();
        let spec = &t.commands[0];
        let stranger = user("bob", &["reader"]);
        let p = payload("new@example.org");
        let d = spec.decide(&t.sources[0], &request(&p, &stranger), Some(&current), 0);
        assert!(
            matches!(d, Decision::Answer(Reply::Forbidden { .. })),
            "{d:?}"
        );
        // The user may change their own email, but not to something that is not one.
        let owner = user("u1", &[]);
        let p = payload("not-an-email");
        let d = spec.decide(&t.sources[0], &request(&p, &owner), Some(&current), 0);
        assert_eq!(
            d,
            Decision::Answer(Reply::Rejected {
                code: "invalid_email".into(),
                field: Some("email".into()),
                message: "not an email address".into(),
            })
        );
        let p = payload("old@example.org");
        let d = spec.decide(&t.sources[0], &request(&p, &owner), Some(&current), 0);
        assert!(
            matches!(d, Decision::Answer(Reply::Rejected { ref code, .. }) if code == "unchanged")
        );
        let p = payload("x@example.org");
        let d = spec.decide(&t.sources[0], &request(&p, &owner), None, 0);
        assert!(
            matches!(d, Decision::Answer(Reply::Rejected { ref code, .. }) if code == "not_found")
        );
    }

    #[test]
    fn expired_deadline_and_stale_replay_are_not_applied() {
        let (t, current) = setup();
        let spec = &t.commands[0];
        let admin = user("alice", &["user-admin"]);
        let p = payload("new@example.org");
        let mut r = request(&p, &admin);
        r.deadline_ms = Some(1_000);
        let d = spec.decide(&t.sources[0], &r, Some(&current), 1_001_000);
        assert!(matches!(d, Decision::Answer(Reply::Expired { .. })));
        let d = spec.decide(&t.sources[0], &r, Some(&current), 999_000);
        assert!(matches!(d, Decision::Apply { version: 5, .. }));
        let mut r = request(&p, &admin);
        r.parked_at_version = Some(3);
        let d = spec.decide(&t.sources[0], &r, Some(&current), 0);
        assert!(matches!(d, Decision::Answer(Reply::Expired { .. })));
        r.parked_at_version = Some(4);
        let d = spec.decide(&t.sources[0], &r, Some(&current), 0);
        assert!(matches!(d, Decision::Apply { version: 5, .. }));
    }

    #[test]
    fn principals_read_their_roles_from_a_list() {
        assert_eq!(
            Principal::new("a", " user-admin, ,support"),
            user("a", &["user-admin", "support"])
        );
        assert_eq!(Principal::new("a", ""), user("a", &[]));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(5), Duration::from_millis(1600));
        assert_eq!(p.delay(6), Duration::from_secs(2));
        assert_eq!(p.delay(60), Duration::from_secs(2));
    }

    #[test]
    fn replies_round_trip_as_json() {
        let r = Reply::Rejected {
            code: "invalid_email".into(),
            field: None,
            message: "m".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"outcome":"rejected","code":"invalid_email","message":"m"}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), r);
    }
}
