//! The wire protocol of commands: topic names, header names, and the headers each record
//! carries. Every other part of the command subsystem reads and writes headers through here.
//!
//! | record | topic | headers |
//! | --- | --- | --- |
//! | command | `<command topic>` | command id, correlation id, reply-to, deadline, token (and claimed principal, roles), command type, schema version (and parked version on a replay) |
//! | entity event | the entity's topic | command id, answer-until, verified principal (and who replayed it) |
//! | reply | the sender's reply topic (`miroir.reply.<app>.<ms>.<uuid>`) | correlation id, command id |
//! | answered id | `<command topic>.miroir-done` | answer-until |
//! | dead letter | `<command topic>.dlq` | the command's own (the token left out, the principal and roles as verified), then error class and message, attempts, first and last failure, origin, entity version |

use std::time::{SystemTime, UNIX_EPOCH};

use miroir_engine::command::{Command, Envelope, Principal};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};

/// Header names of commands, replies, entity events and dead letters.
pub mod header {
    /// The command's id: a re-delivered command keeps it and is answered, not re-applied.
    pub const COMMAND_ID: &str = "miroir-command-id";
    /// Matches a reply to its request.
    pub const CORRELATION_ID: &str = "miroir-correlation-id";
    /// The topic to reply to.
    pub const REPLY_TO: &str = "miroir-reply-to";
    /// When the caller stops waiting, in ms since the epoch.
    pub const DEADLINE: &str = "miroir-deadline";
    /// The caller's bearer token (a JWT): proves who sends the command. Only on commands;
    /// the processor never writes it anywhere.
    pub const TOKEN: &str = "miroir-token";
    /// The user's id: as claimed on a command (believed only by a development setting); as
    /// verified by the processor on entity events and dead letters.
    pub const PRINCIPAL: &str = "miroir-principal";
    /// The user's roles, comma-separated, like the principal.
    pub const ROLES: &str = "miroir-roles";
    /// Entity events of a replayed command: who replayed it.
    pub const REPLAYED_BY: &str = "miroir-replayed-by";
    /// The command type (the business operation, `UpdateUserEmail`).
    pub const COMMAND_TYPE: &str = "miroir-command-type";
    /// The payload's schema version.
    pub const SCHEMA_VERSION: &str = "miroir-schema-version";
    /// On a replayed command: the entity version when it was parked.
    pub const PARKED_VERSION: &str = "miroir-parked-version";
    /// Dead letters: `dependency` (a dependency kept failing).
    pub const ERROR_CLASS: &str = "miroir-error-class";
    /// Dead letters: the last error.
    pub const ERROR_MESSAGE: &str = "miroir-error-message";
    /// Dead letters: attempts made.
    pub const ATTEMPTS: &str = "miroir-attempts";
    /// Dead letters: first failure, RFC 3339.
    pub const FIRST_FAILURE: &str = "miroir-first-failure";
    /// Dead letters: last failure, RFC 3339.
    pub const LAST_FAILURE: &str = "miroir-last-failure";
    /// Dead letters: where the command was read (`topic/partition/offset`).
    pub const ORIGIN: &str = "miroir-origin";
    /// Dead letters: the entity version when the command was parked; entity events written by
    /// commands: the entity's version (a delete's tombstone has no other place for it).
    pub const ENTITY_VERSION: &str = "miroir-entity-version";
    /// A replayed command: where it was parked (`partition/offset` of the dead-letter topic).
    pub const PARKED_AT: &str = "miroir-parked-at";
    /// A dead-letter topic's resolution record: the parked command it resolves
    /// (`partition/offset`), answered by a replay.
    pub const RESOLVES: &str = "miroir-resolves";
    /// Entity events and answered-id records: until when (ms since the epoch) processors
    /// remember the command's answer.
    pub const ANSWER_UNTIL: &str = "miroir-answer-until";
}

pub use miroir_engine::topology::command::{dlq_topic, DLQ_SUFFIX};

/// Suffix of the compacted topic of answered command ids (accepted commands excepted: their
/// entity events carry their ids).
pub const DONE_SUFFIX: &str = ".miroir-done";
/// Prefix of the clients' reply topics: `miroir.reply.<app>.<ms>.<uuid>`.
pub const REPLY_PREFIX: &str = "miroir.reply.";

/// Whether `topic` is a reply topic (`miroir.reply.<app>...`): the only topics a processor
/// sends replies to, whatever a command's reply-to header names, so that a sender cannot
/// make it write where the sender may not.
pub fn is_reply_topic(topic: &str) -> bool {
    topic.len() > REPLY_PREFIX.len() && topic.starts_with(REPLY_PREFIX)
}

/// The topic of a command topic's answered ids.
pub fn done_topic(topic: &str) -> String {
    format!("{topic}{DONE_SUFFIX}")
}

/// The text of header `name`, if present and UTF-8.
pub fn text_header(m: &impl Message, name: &str) -> Option<String> {
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

/// Milliseconds since the epoch, as deadlines and answer times are written.
pub fn now_ms() -> i64 {
    since_epoch(SystemTime::now()).as_millis() as i64
}

/// Microseconds since the epoch, as the engine's timestamps are.
pub fn now_micros() -> i64 {
    since_epoch(SystemTime::now()).as_micros() as i64
}

/// `t` in RFC 3339, as dead letters give their failure times.
pub fn rfc3339(t: SystemTime) -> String {
    miroir_engine::value::format_timestamp(since_epoch(t).as_micros() as i64)
}

fn since_epoch(t: SystemTime) -> std::time::Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Adds `(name, value)` headers, leaving out the absent values.
fn with<'a>(
    mut headers: OwnedHeaders,
    values: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> OwnedHeaders {
    for (key, value) in values {
        if let Some(value) = value {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
    }
    headers
}

/// The headers of a command, read once when it is consumed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandHeaders {
    /// The command's id (the correlation id when the caller chose none).
    pub command_id: Option<String>,
    /// Matches the reply to the request.
    pub correlation_id: Option<String>,
    /// Where to reply.
    pub reply_to: Option<String>,
    /// The command type.
    pub command_type: Option<String>,
    /// The payload's schema version, as written.
    pub schema_version: Option<String>,
    /// The bearer token.
    pub token: Option<String>,
    /// The principal's id.
    pub principal: Option<String>,
    /// The principal's roles, comma-separated.
    pub roles: Option<String>,
    /// The deadline, as written (ms since the epoch).
    pub deadline: Option<String>,
    /// Set on a replay: the entity version when the command was parked.
    pub parked_version: Option<i64>,
    /// Set on a replay: where the command was parked (`partition/offset`).
    pub parked_at: Option<String>,
}

impl CommandHeaders {
    /// Reads the headers of command message `m`.
    pub fn read(m: &impl Message) -> CommandHeaders {
        CommandHeaders {
            command_id: text_header(m, header::COMMAND_ID),
            correlation_id: text_header(m, header::CORRELATION_ID),
            reply_to: text_header(m, header::REPLY_TO),
            command_type: text_header(m, header::COMMAND_TYPE),
            schema_version: text_header(m, header::SCHEMA_VERSION),
            token: text_header(m, header::TOKEN),
            principal: text_header(m, header::PRINCIPAL),
            roles: text_header(m, header::ROLES),
            deadline: text_header(m, header::DEADLINE),
            parked_version: text_header(m, header::PARKED_VERSION).and_then(|v| v.parse().ok()),
            parked_at: text_header(m, header::PARKED_AT),
        }
    }

    /// The deadline, when it is a number.
    pub fn deadline_ms(&self) -> Option<i64> {
        self.deadline.as_deref().and_then(|d| d.parse().ok())
    }

    /// What the engine reads of the command: these headers, its key and its payload.
    pub fn envelope<'a>(&'a self, key: Option<&'a str>, payload: Option<&'a [u8]>) -> Envelope<'a> {
        Envelope {
            command_type: self.command_type.as_deref(),
            schema_version: self.schema_version.as_deref(),
            token: self.token.as_deref(),
            principal: self.principal.as_deref(),
            roles: self.roles.as_deref(),
            deadline: self.deadline.as_deref(),
            message_key: key,
            payload,
            parked_at_version: self.parked_version,
        }
    }

    /// The headers of the command as sent: every field present.
    pub fn to_owned_headers(&self) -> OwnedHeaders {
        let parked = self.parked_version.map(|v| v.to_string());
        with(
            OwnedHeaders::new(),
            [
                (header::COMMAND_ID, self.command_id.as_deref()),
                (header::CORRELATION_ID, self.correlation_id.as_deref()),
                (header::REPLY_TO, self.reply_to.as_deref()),
                (header::DEADLINE, self.deadline.as_deref()),
                (header::TOKEN, self.token.as_deref()),
                (header::PRINCIPAL, self.principal.as_deref()),
                (header::ROLES, self.roles.as_deref()),
                (header::COMMAND_TYPE, self.command_type.as_deref()),
                (header::SCHEMA_VERSION, self.schema_version.as_deref()),
                (header::PARKED_VERSION, parked.as_deref()),
                (header::PARKED_AT, self.parked_at.as_deref()),
            ],
        )
    }

    /// The headers of the entity event an accepted command writes: its id, until when its
    /// answer is remembered (`until`, ms since the epoch), its verified principal, who
    /// replayed it, and the entity's new `version`.
    pub fn entity_event(&self, until: i64, command: &Command, version: i64) -> OwnedHeaders {
        let until = until.to_string();
        let version = version.to_string();
        let id = self.command_id.as_deref();
        with(
            OwnedHeaders::new(),
            [
                (header::COMMAND_ID, id),
                (header::ANSWER_UNTIL, id.map(|_| until.as_str())),
                (header::PRINCIPAL, Some(command.principal.id.as_str())),
                (header::REPLAYED_BY, command.replayed_by.as_deref()),
                (header::ENTITY_VERSION, Some(version.as_str())),
            ],
        )
    }

    /// These headers with the principal as `principal` (verified) and no token: what a dead
    /// letter keeps of a command.
    pub fn verified(&self, principal: &Principal) -> CommandHeaders {
        CommandHeaders {
            token: None,
            principal: Some(principal.id.clone()),
            roles: Some(principal.roles.join(",")),
            ..self.clone()
        }
    }

    /// The headers of the reply to the command.
    pub fn reply(&self) -> OwnedHeaders {
        with(
            OwnedHeaders::new(),
            [
                (header::CORRELATION_ID, self.correlation_id.as_deref()),
                (header::COMMAND_ID, self.command_id.as_deref()),
            ],
        )
    }
}

/// The headers of an answered-id record: until when its answer is remembered.
pub fn answer_headers(until_ms: i64) -> OwnedHeaders {
    let until = until_ms.to_string();
    with(
        OwnedHeaders::new(),
        [(header::ANSWER_UNTIL, Some(until.as_str()))],
    )
}

/// Until when (ms since the epoch) a record says its answer is remembered.
pub fn answer_until(m: &impl Message) -> Option<i64> {
    text_header(m, header::ANSWER_UNTIL).and_then(|t| t.parse().ok())
}

/// Why a command was parked in its dead-letter topic.
#[derive(Clone, Debug)]
pub struct Parking {
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// First failure.
    pub first: SystemTime,
    /// Last failure.
    pub last: SystemTime,
    /// The entity version when it was parked.
    pub entity_version: Option<i64>,
}

/// The headers of the dead letter of command `m` (whose headers are `headers`, with the
/// principal as verified and no token), then why it was parked.
pub fn dead_letter_headers(
    m: &OwnedMessage,
    headers: &CommandHeaders,
    parking: &Parking,
) -> OwnedHeaders {
    let origin = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
    let attempts = parking.attempts.to_string();
    let (first, last) = (rfc3339(parking.first), rfc3339(parking.last));
    let version = parking.entity_version.map(|v| v.to_string());
    with(
        headers.to_owned_headers(),
        [
            (header::ERROR_CLASS, Some("dependency")),
            (header::ERROR_MESSAGE, Some(parking.error.as_str())),
            (header::ATTEMPTS, Some(attempts.as_str())),
            (header::FIRST_FAILURE, Some(first.as_str())),
            (header::LAST_FAILURE, Some(last.as_str())),
            (header::ORIGIN, Some(origin.as_str())),
            (header::ENTITY_VERSION, version.as_deref()),
        ],
    )
}

/// The headers of the resolution record of the parked command at `parked_at`
/// (`partition/offset`), answered by a replay with `headers` (see [`crate::commands::dlq`]).
pub fn resolution_headers(headers: &CommandHeaders, parked_at: &str) -> OwnedHeaders {
    with(
        OwnedHeaders::new(),
        [
            (header::RESOLVES, Some(parked_at)),
            (header::COMMAND_ID, headers.command_id.as_deref()),
        ],
    )
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;

    use super::*;

    fn message(headers: OwnedHeaders) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(b"u-1".to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            3,
            42,
            Some(headers),
        )
    }

    #[test]
    fn command_headers_read_back_what_they_write() {
        let sent = CommandHeaders {
            command_id: Some("c".into()),
            correlation_id: Some("r".into()),
            reply_to: Some("miroir.reply.app.1.x".into()),
            command_type: Some("UpdateUserEmail".into()),
            schema_version: Some("1".into()),
            token: Some("a.b.c".into()),
            principal: Some("alice".into()),
            roles: Some("admin,user".into()),
            deadline: Some("1700000000000".into()),
            parked_version: Some(7),
            parked_at: Some("3/14".into()),
        };
        let read = CommandHeaders::read(&message(sent.to_owned_headers()));
        assert_eq!(read, sent);
        assert_eq!(read.deadline_ms(), Some(1_700_000_000_000));
        // The entity event names the verified principal, not the claimed one.
        let command = Command {
            key: "u-1".into(),
            payload: vec![],
            principal: Principal::new("bob", ""),
            deadline_ms: None,
            parked_at_version: Some(3),
            replayed_by: Some("ops".into()),
        };
        let event = message(read.entity_event(99, &command, 4));
        assert_eq!(answer_until(&event), Some(99));
        assert_eq!(
            text_header(&event, header::ENTITY_VERSION).as_deref(),
            Some("4")
        );
        assert_eq!(
            text_header(&event, header::COMMAND_ID).as_deref(),
            Some("c")
        );
        assert_eq!(
            text_header(&event, header::PRINCIPAL).as_deref(),
            Some("bob")
        );
        assert_eq!(
            text_header(&event, header::REPLAYED_BY).as_deref(),
            Some("ops")
        );
        assert_eq!(text_header(&event, header::TOKEN), None);
    }

    #[test]
    fn a_dead_letter_keeps_the_command_headers_and_says_why() {
        let headers = CommandHeaders {
            command_id: Some("c".into()),
            token: Some("a.b.c".into()),
            principal: Some("mallory".into()),
            ..CommandHeaders::default()
        };
        let command = message(headers.to_owned_headers());
        let parking = Parking {
            error: "directory down".into(),
            attempts: 5,
            first: UNIX_EPOCH,
            last: UNIX_EPOCH,
            entity_version: Some(4),
        };
        let verified = headers.verified(&Principal::new("alice", "user-admin"));
        let letter = message(dead_letter_headers(&command, &verified, &parking));
        // The principal as verified, and no token.
        let kept = CommandHeaders::read(&letter);
        assert_eq!(kept.principal.as_deref(), Some("alice"));
        assert_eq!(kept.roles.as_deref(), Some("user-admin"));
        assert_eq!(kept.token, None);
        assert_eq!(
            text_header(&letter, header::COMMAND_ID).as_deref(),
            Some("c")
        );
        assert_eq!(
            text_header(&letter, header::ORIGIN).as_deref(),
            Some("t/3/42")
        );
        assert_eq!(text_header(&letter, header::ATTEMPTS).as_deref(), Some("5"));
        assert_eq!(
            text_header(&letter, header::ENTITY_VERSION).as_deref(),
            Some("4")
        );
        assert_eq!(dlq_topic("t"), "t.dlq");
        assert_eq!(dlq_topic("t.dlq"), "t.dlq");
    }
}
