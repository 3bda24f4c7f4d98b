//! Dead letters: commands parked after their retries, listed and replayed in order.
//!
//! A replay re-submits each parked command through a [`CommandClient`] (same command id,
//! principal as verified when it was parked, and payload; the replayer's token) with the
//! entity version it was parked at and where it was parked, and waits for its reply before
//! the next one, so the original order holds. The processor answers `Expired` when the entity
//! moved on since; a command answered before (replayed already) gets its first answer again.
//!
//! The processor that answers a replay (but for a replayer it does not believe) writes a
//! *resolution record* in the dead-letter topic, in the transaction of its answer: no payload,
//! a `miroir-resolves` header naming the parked command's `partition/offset`. A parked
//! command is *pending* until a resolution record names it; listings show pending commands
//! only, and the processors count them (`miroir_command_dead_letters_pending`).

use std::collections::HashSet;
use std::time::Duration;

use miroir_engine::command::{Principal, Reply};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use serde::Serialize;

use super::client::{Command, CommandClient, SendError};
use super::wire::{dlq_topic, header, text_header, DLQ_SUFFIX};
use crate::kafka::tail::Tail;
use crate::kafka::{KafkaConfig, KafkaError};

/// One parked command.
#[derive(Clone, Debug, Serialize)]
pub struct Parked {
    /// The dead-letter topic.
    pub topic: String,
    /// Partition in the dead-letter topic.
    pub partition: i32,
    /// Offset in the dead-letter topic.
    pub offset: i64,
    /// The command's id.
    pub command_id: Option<String>,
    /// The command type.
    pub command_type: Option<String>,
    /// The entity key.
    pub key: Option<String>,
    /// Who sent it.
    pub principal: Option<String>,
    /// `dependency`.
    pub error_class: Option<String>,
    /// The last error.
    pub error: Option<String>,
    /// Attempts made.
    pub attempts: Option<u32>,
    /// First failure (RFC 3339).
    pub first_failure: Option<String>,
    /// Last failure (RFC 3339).
    pub last_failure: Option<String>,
    /// Where the command was read: `topic/partition/offset`.
    pub origin: Option<String>,
    /// The entity version when it was parked.
    pub entity_version: Option<i64>,
    /// The payload, as sent.
    pub payload: Option<String>,
    #[serde(skip)]
    headers: Vec<(String, String)>,
}

impl Parked {
    /// The command topic it came from.
    pub fn command_topic(&self) -> &str {
        self.topic.strip_suffix(DLQ_SUFFIX).unwrap_or(&self.topic)
    }

    fn origin_position(&self) -> (i32, i64) {
        let mut parts = self.origin.as_deref().unwrap_or("").rsplit('/');
        let offset = parts
            .next()
            .and_then(|o| o.parse().ok())
            .unwrap_or(i64::MAX);
        let partition = parts
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(i32::MAX);
        (partition, offset)
    }
}

/// What one record of a dead-letter topic is.
pub enum DeadLetter {
    /// A parked command, at `partition/offset`.
    Parked(String),
    /// A resolution record: the parked command (`partition/offset`) a replay answered.
    Resolves(String),
}

impl DeadLetter {
    /// What dead-letter record `m` is.
    pub fn of(m: &impl Message) -> DeadLetter {
        match text_header(m, header::RESOLVES) {
            Some(position) => DeadLetter::Resolves(position),
            None => DeadLetter::Parked(position(m.partition(), m.offset())),
        }
    }
}

/// A dead letter's position as resolution records name it.
pub fn position(partition: i32, offset: i64) -> String {
    format!("{partition}/{offset}")
}

/// Hands every pending command (see the module's documentation) parked in the dead-letter
/// topic of `topic` to `each`, as it reads them: each partition in order (so each entity's
/// commands in the order they failed), the partitions interleaved. Holds one at a time; reads
/// the topic twice, first for its resolution records. Returns how many were resolved.
pub fn each(
    config: &KafkaConfig,
    topic: &str,
    mut each: impl FnMut(Parked),
) -> Result<usize, KafkaError> {
    let dlq = dlq_topic(topic);
    let mut resolved = HashSet::new();
    read(config, &dlq, |m| {
        if let DeadLetter::Resolves(position) = DeadLetter::of(m) {
            resolved.insert(position);
        }
    })?;
    read(config, &dlq, |m| {
        if let DeadLetter::Parked(position) = DeadLetter::of(m) {
            if !resolved.contains(&position) {
                each(parked(&dlq, m));
            }
        }
    })?;
    Ok(resolved.len())
}

/// Hands every record of `dlq` to `each`, to the topic's end.
fn read(
    config: &KafkaConfig,
    dlq: &str,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<(), KafkaError> {
    let mut tail = Tail::open(config, dlq)?;
    let complete = tail.catch_up(Duration::from_secs(30), |m| {
        each(m);
        Ok(())
    })?;
    if !complete {
        return Err(KafkaError::Unavailable(format!(
            "could not read {dlq} to its end"
        )));
    }
    Ok(())
}

/// Every pending command parked in the dead-letter topic of `topic`, in their original order
/// (by first failure; commands of one entity failed in the order they were sent): what a
/// replay goes through.
pub fn list(config: &KafkaConfig, topic: &str) -> Result<Vec<Parked>, KafkaError> {
    let mut parked = Vec::new();
    each(config, topic, |p| parked.push(p))?;
    parked.sort_by(|a, b| {
        (&a.first_failure, a.origin_position()).cmp(&(&b.first_failure, b.origin_position()))
    });
    Ok(parked)
}

/// The parked command of dead letter `m` (read from `dlq`).
fn parked(dlq: &str, m: &impl Message) -> Parked {
    let h = |name: &str| text_header(m, name);
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .filter_map(|x| {
                    Some((
                        x.key.to_string(),
                        std::str::from_utf8(x.value?).ok()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Parked {
        topic: dlq.to_string(),
        partition: m.partition(),
        offset: m.offset(),
        command_id: h(header::COMMAND_ID),
        command_type: h(header::COMMAND_TYPE),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        principal: h(header::PRINCIPAL),
        error_class: h(header::ERROR_CLASS),
        error: h(header::ERROR_MESSAGE),
        attempts: h(header::ATTEMPTS).and_then(|a| a.parse().ok()),
        first_failure: h(header::FIRST_FAILURE),
        last_failure: h(header::LAST_FAILURE),
        origin: h(header::ORIGIN),
        entity_version: h(header::ENTITY_VERSION).and_then(|v| v.parse().ok()),
        payload: m.payload().map(|p| String::from_utf8_lossy(p).into_owned()),
        headers,
    }
}

/// What a replay did with one parked command.
#[derive(Debug)]
pub enum Replayed {
    /// Applied now.
    Applied(Reply),
    /// Not applied: the entity changed since the command was parked.
    Skipped(String),
    /// Any other answer (rejected, forbidden, deferred again, or the first answer of a
    /// command replayed before).
    Answered(Reply),
    /// No answer: the replay stops there, to keep the order.
    Failed(SendError),
}

/// Re-submits `parked` in order through `client`, waiting up to `timeout` for each reply,
/// with the replayer's bearer `token` (the processor takes replays from principals with the
/// `miroir-operator` role, on behalf of the principal verified when each command was
/// parked). Stops at the first command that gets no reply. `report` sees each result as it
/// comes.
pub fn replay(
    client: &CommandClient,
    parked: &[Parked],
    (timeout, token): (Duration, Option<&str>),
    mut report: impl FnMut(&Parked, &Replayed),
) -> Vec<Replayed> {
    let mut results = Vec::new();
    for p in parked {
        let command = Command {
            topic: p.command_topic().to_string(),
            command_type: p.command_type.clone().unwrap_or_default(),
            schema_version: header_value(p, header::SCHEMA_VERSION)
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            key: p.key.clone().unwrap_or_default(),
            payload: p.payload.clone().unwrap_or_default().into_bytes(),
            token: token.map(str::to_string),
            principal: Principal::new(
                p.principal.clone().unwrap_or_default(),
                header_value(p, header::ROLES).unwrap_or_default(),
            ),
            command_id: p.command_id.clone(),
            parked_version: Some(p.entity_version.unwrap_or(-1)),
            parked_at: Some(position(p.partition, p.offset)),
        };
        let result = match client.send(&command, timeout) {
            Ok(reply @ Reply::Accepted { .. }) => Replayed::Applied(reply),
            Ok(Reply::Expired { message }) => Replayed::Skipped(message),
            Ok(other) => Replayed::Answered(other),
            Err(e) => Replayed::Failed(e),
        };
        report(p, &result);
        let failed = matches!(result, Replayed::Failed(_));
        results.push(result);
        if failed {
            break;
        }
    }
    results
}

fn header_value<'a>(p: &'a Parked, name: &str) -> Option<&'a str> {
    p.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
