//! Commands: how the master side decides what to do with one command.
//!
//! A topology's `[commands.NAME]` section declares one business operation (`UpdateUserEmail`):
//! the command topic, the entity source it updates, the payload's columns, an authorization
//! rule, validation rules and the assignments it applies ([`CommandSpec`]). This module holds
//! the pure handling of one command, and so every answer that does not depend on a service:
//!
//! ```text
//!  Envelope (headers and payload as they arrived)
//!    ── CommandSpec::read ──► Command     or a Reply: unknown type, newer schema,
//!                                            unauthenticated, malformed payload, wrong key
//!    ── CommandSpec::decide(current entity, now) ──► Decision::Apply(new entity, version)
//!                                            or a Reply: expired, stale replay, forbidden,
//!                                            not found, a validation rule
//! ```
//!
//! The Kafka transport (headers, transactions, retries, dead letters, replies) lives in the
//! connectors.
//!
//! Rules and assignments are SQL expressions over one row laid out as
//! `command.*` (the payload), `entity.*` (the current entity, NULLs when there is none),
//! `principal.id` and `principal.roles` (comma-separated; `has_role('r')` tests one).

use serde::{Deserialize, Serialize};

use crate::auth::{Authenticator, Unauthenticated};
use crate::ingest::decode::decode;
use crate::plan::expr::cast;
use crate::topology::command::{CommandKind, CommandSpec};
use crate::topology::Source;
use crate::value::{Row, Value};

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

/// A command as it arrived: what its headers and payload say, nothing checked yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct Envelope<'a> {
    /// The command type header.
    pub command_type: Option<&'a str>,
    /// The payload's schema version header (1 when absent).
    pub schema_version: Option<&'a str>,
    /// The bearer token header: proves who sends the command (see [`crate::auth`]).
    pub token: Option<&'a str>,
    /// The principal header: the user's id as claimed (taken as it is only by a development
    /// setting), or, on a replayed command, as verified when it was parked.
    pub principal: Option<&'a str>,
    /// The roles header: comma-separated, like the principal header.
    pub roles: Option<&'a str>,
    /// The deadline header: ms since the epoch.
    pub deadline: Option<&'a str>,
    /// The message key: the entity key, which places the command in its entity's partition.
    pub message_key: Option<&'a str>,
    /// The payload (JSON).
    pub payload: Option<&'a [u8]>,
    /// Set by a dead-letter replay: the entity version when the command was parked.
    pub parked_at_version: Option<i64>,
}

/// A command whose envelope holds: its entity key, payload and principal, read.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    /// The entity key the payload addresses (the message key too).
    pub key: String,
    /// The decoded payload (laid out as the spec's payload columns).
    pub payload: Row,
    /// Who sent it.
    pub principal: Principal,
    /// The caller stops waiting at this instant (ms since the epoch).
    pub deadline_ms: Option<i64>,
    /// Set by a dead-letter replay: the entity version when the command was parked.
    pub parked_at_version: Option<i64>,
    /// Set by a dead-letter replay: who replayed it.
    pub replayed_by: Option<String>,
}

impl Command {
    /// The command as [`CommandSpec::decide`] reads it.
    pub fn request(&self) -> Request<'_> {
        Request {
            payload: &self.payload,
            principal: &self.principal,
            deadline_ms: self.deadline_ms,
            parked_at_version: self.parked_at_version,
        }
    }
}

/// One command as the decision sees it.
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
    /// The command carries no bearer token, or one that does not hold (a wrong signature,
    /// expired, another issuer or audience).
    Unauthenticated {
        /// Why.
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
            Reply::Unauthenticated { .. } => "unauthenticated",
            Reply::Forbidden { .. } => "forbidden",
            Reply::Deferred { .. } => "deferred",
            Reply::Expired { .. } => "expired",
        }
    }
}

/// What to do with a command.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Publish `entity` (the whole new snapshot) at `version`; a delete's `entity` is
    /// [`CommandSpec::deleted`], published as a tombstone.
    Apply {
        /// The new entity row.
        entity: Row,
        /// Its version.
        version: i64,
    },
    /// Answer at once, change nothing.
    Answer(Reply),
}

/// The role that lets a principal replay parked commands (on behalf of their senders).
pub const OPERATOR_ROLE: &str = "miroir-operator";

/// Who a command acts for, and, on a replay, who replayed it. A command is sent by the
/// principal its token proves. A replayed one acts for the principal verified when it was
/// parked (its principal headers, which only the processor writes into the dead-letter
/// topic), and its token is the replayer's, who must hold [`OPERATOR_ROLE`]. Without a token,
/// the development setting takes the headers as they are.
fn principal_of(
    envelope: &Envelope<'_>,
    auth: &Authenticator,
) -> Result<(Principal, Option<String>), Reply> {
    let unauthenticated = |e: Unauthenticated| Reply::Unauthenticated { message: e.0 };
    let claimed = envelope
        .principal
        .filter(|p| !p.is_empty())
        .map(|p| (p, envelope.roles.unwrap_or_default()));
    let token = envelope.token.filter(|t| !t.is_empty());
    if envelope.parked_at_version.is_none() || (token.is_none() && auth.trusts_principal_headers())
    {
        return auth
            .principal(token, claimed)
            .map(|p| (p, None))
            .map_err(unauthenticated);
    }
    let replayer = auth.principal(token, None).map_err(unauthenticated)?;
    if !replayer.roles.iter().any(|r| r == OPERATOR_ROLE) {
        return Err(Reply::Forbidden {
            message: format!(
                "replaying a parked command takes the `{OPERATOR_ROLE}` role, which `{}` lacks",
                replayer.id
            ),
        });
    }
    let Some((id, roles)) = claimed else {
        return Err(unauthenticated(Unauthenticated(
            "the replayed command names no principal".into(),
        )));
    };
    Ok((Principal::new(id, roles), Some(replayer.id)))
}

/// A rejection with no field at fault.
fn rejected(code: &str, message: String) -> Reply {
    Reply::Rejected {
        code: code.into(),
        field: None,
        message,
    }
}

impl CommandSpec {
    /// Reads a command's envelope. In order: its type, schema version, principal (proven by
    /// `auth`), payload and entity key; the first that does not hold is the answer (and the
    /// command changes nothing).
    pub fn read(&self, envelope: &Envelope<'_>, auth: &Authenticator) -> Result<Command, Reply> {
        if envelope.command_type != Some(self.operation.as_str()) {
            return Err(rejected(
                "unknown_command",
                format!(
                    "{} accepts {} commands, not {}",
                    self.topic,
                    self.operation,
                    envelope.command_type.unwrap_or("untyped ones")
                ),
            ));
        }
        let version = envelope
            .schema_version
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1);
        if version > self.schema_version {
            return Err(rejected(
                "unsupported_schema_version",
                format!(
                    "schema version {version} is newer than the processor's {}",
                    self.schema_version
                ),
            ));
        }
        let (principal, replayed_by) = principal_of(envelope, auth)?;
        let payload = match envelope.payload.map(|p| decode(&self.payload, p)) {
            Some(Ok(row)) => row,
            Some(Err(e)) => return Err(rejected("malformed", e.to_string())),
            None => return Err(rejected("malformed", "the command has no payload".into())),
        };
        let key = self.addressed_key(&payload, envelope.message_key)?;
        Ok(Command {
            key,
            payload,
            principal,
            deadline_ms: envelope.deadline.and_then(|d| d.parse().ok()),
            parked_at_version: envelope.parked_at_version,
            replayed_by,
        })
    }

    /// The entity key of `payload`, which must be the message key: the message key places
    /// the command in its entity's partition, so in one lane and in order with the entity's
    /// other commands; a payload naming another entity would race.
    fn addressed_key(&self, payload: &[Value], message_key: Option<&str>) -> Result<String, Reply> {
        let Some(key) = self.entity_key(payload) else {
            return Err(rejected(
                "malformed",
                format!("the key field `{}` is null", self.payload.key_name()),
            ));
        };
        if message_key != Some(key.as_str()) {
            return Err(rejected(
                "malformed",
                format!(
                    "the message key ({}) must be the entity key ({key})",
                    message_key.unwrap_or("none")
                ),
            ));
        }
        Ok(key)
    }

    /// Decides what to do with `request`, given the current entity row (`None` when the
    /// entity never existed, [`CommandSpec::deleted`] when it was deleted) and the time (µs
    /// since the epoch). In order: deadline, replay staleness, authorization, existence (as
    /// the command's kind wants it), validation rules.
    pub fn decide(
        &self,
        entity: &Source,
        request: &Request<'_>,
        current: Option<&[Value]>,
        now_micros: i64,
    ) -> Decision {
        let current_version = current.and_then(|row| self.version_of(row));
        if let Some(reply) = self.outdated(request, current_version, now_micros) {
            return Decision::Answer(reply);
        }
        let existing = current.filter(|row| !self.is_deleted(row));
        let mut scope: Row = request.payload.to_vec();
        match existing {
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
        if let Some(reply) = self.existence(entity, request, existing.is_some()) {
            return Decision::Answer(reply);
        }
        for rule in &self.validate {
            if !rule.expr.holds(&scope) {
                return Decision::Answer(Reply::Rejected {
                    code: rule.code.clone(),
                    field: rule.field.clone(),
                    message: rule.message.clone(),
                });
            }
        }
        let Some(version) = current_version.unwrap_or(0).checked_add(1) else {
            return Decision::Answer(rejected(
                "version_exhausted",
                format!(
                    "the {}'s version is the largest there is: it cannot change any more",
                    entity.name
                ),
            ));
        };
        let entity_row = match (self.kind, existing) {
            (CommandKind::Delete, _) => self.deleted(entity.columns.len(), Some(version)),
            (_, Some(row)) => {
                self.changed(entity, row.to_vec(), &scope, version, request, now_micros)
            }
            (_, None) => {
                let mut row = vec![Value::Null; entity.columns.len()];
                row[entity.key] = request.payload[self.payload.key].clone();
                self.changed(entity, row, &scope, version, request, now_micros)
            }
        };
        Decision::Apply {
            entity: entity_row,
            version,
        }
    }

    /// Why `request` is not applied whatever the entity: its deadline passed, or, replayed,
    /// the entity moved on since it was parked.
    fn outdated(
        &self,
        request: &Request<'_>,
        current_version: Option<i64>,
        now_micros: i64,
    ) -> Option<Reply> {
        if let Some(deadline) = request.deadline_ms {
            if now_micros / 1000 > deadline {
                return Some(Reply::Expired {
                    message: "the deadline passed before the command was processed".into(),
                });
            }
        }
        let parked = request.parked_at_version?;
        (current_version != Some(parked)).then(|| Reply::Expired {
            message: format!(
                "the entity changed since the command was parked (version {parked}, now {})",
                current_version.map_or("none".into(), |v| v.to_string())
            ),
        })
    }

    /// The rejection of a command whose entity's existence is not what its kind needs.
    fn existence(&self, entity: &Source, request: &Request<'_>, exists: bool) -> Option<Reply> {
        let key = self.entity_key(request.payload).unwrap_or_default();
        let (code, message) = match (self.kind, exists) {
            (CommandKind::Create, true) => (
                "already_exists",
                format!("{} {key} already exists", entity.name),
            ),
            (CommandKind::Update | CommandKind::Delete, false) => {
                ("not_found", format!("no {} with key {key}", entity.name))
            }
            _ => return None,
        };
        Some(Reply::Rejected {
            code: code.into(),
            field: Some(self.payload.key_name().to_string()),
            message,
        })
    }

    /// `row` with the command's assignments (evaluated over `scope`) and stamps applied.
    fn changed(
        &self,
        entity: &Source,
        mut row: Row,
        scope: &[Value],
        version: i64,
        request: &Request<'_>,
        now_micros: i64,
    ) -> Row {
        for a in &self.set {
            row[a.column] = cast(a.expr.eval(scope), entity.columns[a.column].ty);
        }
        row[self.stamp.version] = Value::Int(version);
        if let Some(i) = self.stamp.operation {
            row[i] = Value::Text(self.operation.as_str().into());
        }
        if let Some(i) = self.stamp.updated_at {
            row[i] = cast(Value::Timestamp(now_micros), entity.columns[i].ty);
        }
        if let Some(i) = self.stamp.changed_by {
            row[i] = Value::Text(request.principal.id.as_str().into());
        }
        row
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::topology::command::RetryPolicy;
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

    const LIFECYCLE: &str = r#"
[commands.create_user]
topic = "user.cmd.create"
operation = "CreateUser"
kind = "create"
entity = "users"
key = "id"
columns = { id = "text", email = "text" }
set = { email = "lower(command.email)" }

[commands.delete_user]
topic = "user.cmd.delete"
operation = "DeleteUser"
kind = "delete"
entity = "users"
key = "id"
columns = { id = "text" }
authorize = { rule = "has_role('user-admin')", message = "admins only" }
"#;

    fn decided(
        spec: &CommandSpec,
        t: &Topology,
        payload: &[Value],
        current: Option<&[Value]>,
    ) -> Decision {
        let admin = user("root", &["user-admin"]);
        spec.decide(&t.sources[0], &request(payload, &admin), current, 7)
    }

    #[test]
    fn create_and_delete_commands_follow_the_entity_through_its_life() {
        let t = Topology::parse("master.toml", &format!("{MASTER}{LIFECYCLE}")).unwrap();
        let (create, delete) = (&t.commands[1], &t.commands[2]);
        let new = vec![Value::Text("u1".into()), Value::Text("A@X".into())];
        let key = vec![Value::Text("u1".into())];
        let Decision::Apply { entity, version } = decided(create, &t, &new, None) else {
            panic!("a new entity is created");
        };
        assert_eq!(version, 1);
        assert_eq!(
            entity,
            vec![
                Value::Text("u1".into()),
                Value::Text("a@x".into()),
                Value::Int(1),
                Value::Text("CreateUser".into()),
                Value::Timestamp(7),
                Value::Text("root".into()),
            ]
        );
        let Decision::Answer(Reply::Rejected { code, .. }) =
            decided(create, &t, &new, Some(&entity))
        else {
            panic!("an existing entity is not created again");
        };
        assert_eq!(code, "already_exists");
        let Decision::Apply {
            entity: gone,
            version,
        } = decided(delete, &t, &key, Some(&entity))
        else {
            panic!("an existing entity is deleted");
        };
        assert_eq!(version, 2);
        assert!(delete.is_deleted(&gone));
        assert_eq!(gone, delete.deleted(entity.len(), Some(2)));
        for spec in [delete, &t.commands[0]] {
            let payload = if spec.kind == CommandKind::Delete {
                key.clone()
            } else {
                payload("b@x.org")
            };
            let Decision::Answer(Reply::Rejected { code, .. }) =
                decided(spec, &t, &payload, Some(&gone))
            else {
                panic!("a deleted entity is neither deleted nor updated");
            };
            assert_eq!(code, "not_found");
        }
        let Decision::Apply { entity, version } = decided(create, &t, &new, Some(&gone)) else {
            panic!("a deleted entity is created again");
        };
        assert_eq!(
            (version, &entity[2]),
            (3, &Value::Int(3)),
            "versions continue past the delete"
        );
        let stranger = user("u1", &[]);
        let d = delete.decide(&t.sources[0], &request(&key, &stranger), Some(&entity), 7);
        assert!(
            matches!(d, Decision::Answer(Reply::Forbidden { .. })),
            "{d:?}"
        );
    }

    #[test]
    fn a_delete_sets_nothing_and_an_update_sets_something() {
        let parse = |edit: (&str, &str)| {
            let text = format!("{MASTER}{}", LIFECYCLE.replace(edit.0, edit.1));
            Topology::parse("master.toml", &text)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse(("", "")), Ok(()));
        let delete_columns = "columns = { id = \"text\" }\n";
        for (edit, message) in [
            (
                (
                    delete_columns,
                    "columns = { id = \"text\" }\nset = { email = \"'x'\" }\n",
                ),
                "a delete sets no column",
            ),
            (
                ("kind = \"delete\"", "kind = \"remove\""),
                "unknown command kind `remove`",
            ),
            (("kind = \"delete\"\n", ""), "the command sets no column"),
        ] {
            let e = parse(edit).expect_err(message);
            assert!(e.contains(message), "{e}");
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
