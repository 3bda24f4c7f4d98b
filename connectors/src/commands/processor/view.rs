//! What a processor's lanes share: the command's declaration, the view of the entities (the
//! current row of each key, as committed on the entity topic), the answers of the commands
//! already processed, and what the lanes last learned of the reply topics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use miroir_engine::auth::Authenticator;
use miroir_engine::command::Reply;
use miroir_engine::ingest::decode::decode;
use miroir_engine::metrics::CommandMetrics;
use miroir_engine::state::{Commit, StateStore};
use miroir_engine::topology::command::CommandSpec;
use miroir_engine::topology::Source;
use miroir_engine::value::Row;
use parking_lot::Mutex;
use rdkafka::message::Message;
use tracing::{debug, warn};

use super::answered::{keep_until, AnsweredIds};
use super::dependency::Dependency;
use super::entities::EntityView;
use crate::commands::wire::{self, header, now_ms, text_header};
use crate::kafka::KafkaError;

/// What the lanes share: the command's declaration and the views.
pub(super) struct Shared {
    pub(super) spec: CommandSpec,
    pub(super) entity: Source,
    pub(super) metrics: CommandMetrics,
    pub(super) dependency: Option<Arc<dyn Dependency>>,
    /// Proves who sends each command.
    pub(super) auth: Arc<Authenticator>,
    /// Current entity rows by key, as committed on the entity topic.
    pub(super) entities: Mutex<EntityView>,
    /// Answers of commands already processed, by command id.
    pub(super) answered: Mutex<AnsweredIds>,
    /// Reply topics known to exist.
    pub(super) reply_topics: Mutex<ReplyTopics>,
}

/// What the lanes last learned of the reply topics: whether each exists, and when.
#[derive(Default)]
pub(super) struct ReplyTopics {
    pub(super) seen: HashMap<String, (bool, Instant)>,
}

impl ReplyTopics {
    /// How long a reply topic found is trusted: a stopped instance's topic is deleted, and
    /// a transaction producing to a deleted topic fails.
    const FOUND_FOR: Duration = Duration::from_secs(5);
    /// How long a reply topic not found is trusted (its client may be creating it: it waits
    /// for the topic before sending).
    const MISSING_FOR: Duration = Duration::from_millis(20);

    /// Whether `topic` must be looked up again before a reply is sent to it.
    pub(super) fn stale(&self, topic: &str) -> bool {
        self.seen.get(topic).is_none_or(|(exists, at)| {
            let trusted = if *exists {
                Self::FOUND_FOR
            } else {
                Self::MISSING_FOR
            };
            at.elapsed() >= trusted
        })
    }

    /// Whether `topic` existed when last looked up.
    pub(super) fn exists(&self, topic: &str) -> bool {
        self.seen.get(topic).is_some_and(|(exists, _)| *exists)
    }

    /// Records what a lookup of `topic` found (and forgets what is no longer trusted, once
    /// many instances have come and gone).
    pub(super) fn note(&mut self, topic: &str, exists: bool) {
        if self.seen.len() >= 1024 {
            self.seen
                .retain(|_, (_, at)| at.elapsed() < Self::FOUND_FOR);
        }
        self.seen
            .insert(topic.to_string(), (exists, Instant::now()));
    }
}

impl Shared {
    /// Applies a committed entity event to the view (newest version wins), and remembers the
    /// command that wrote it (its `miroir-command-id` header) as accepted; returns what changed.
    pub(super) fn entity_event(
        &self,
        m: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Result<EntityChange, KafkaError> {
        let mut change = EntityChange::default();
        let Some(key) = m.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
            return Ok(change);
        };
        let row = match m.payload().map(|payload| decode(&self.entity, payload)) {
            None => None,
            Some(Ok(row)) => Some(row),
            Some(Err(e)) => {
                debug!(topic = %self.entity.topic, partition = m.partition(), offset = m.offset(), key, error = %e,
                             "entity event not understood; the view keeps the previous one");
                return Ok(change);
            }
        };
        // A delete's tombstone has its version in a header.
        let version = match &row {
            Some(row) => self.spec.version_of(row),
            None => text_header(m, header::ENTITY_VERSION).and_then(|v| v.parse().ok()),
        };
        if let (Some(id), Some(version)) = (text_header(m, header::COMMAND_ID), version) {
            let reply = Reply::Accepted {
                version,
                partition: m.partition(),
                offset: m.offset(),
            };
            if let Some(until_ms) = answer_until(m) {
                self.answered
                    .lock()
                    .remember(id.clone(), until_ms, reply.clone());
                change.answer = Some((id, until_ms, reply));
            }
        }
        let taken = self.entities.lock().read(&self.spec, &key, row, version)?;
        change.row = taken.map(|row| (key, row));
        Ok(change)
    }

    /// Sets the gauge of the command ids remembered.
    pub(super) fn report_answers_kept(&self, kept: usize) {
        self.metrics
            .answers_kept
            .with_label_values(&[&self.spec.name])
            .set(kept as i64);
    }

    pub(super) fn answer_record(&self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(id) = m.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
            return;
        };
        match m.payload().map(serde_json::from_slice::<Reply>) {
            Some(Ok(reply)) => {
                if let Some(until_ms) = answer_until(m) {
                    self.answered.lock().remember(id, until_ms, reply);
                }
            }
            None => {
                self.answered.lock().forget(&id);
            }
            Some(Err(e)) => {
                warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), key = id, error = %e, "bad answer record")
            }
        }
    }
}

/// Until when (ms since the epoch) the answer written by `m` (an entity event or an
/// answered-id record) is kept: its `miroir-answer-until` header, or for records written before
/// it, the retention from the record's time; `None` once that time has passed.
fn answer_until(m: &impl Message) -> Option<i64> {
    let until = wire::answer_until(m).unwrap_or_else(|| {
        keep_until(
            m.timestamp().to_millis().unwrap_or_else(now_ms),
            None,
            false,
        )
    });
    (until >= now_ms()).then_some(until)
}

/// Writes a change of the command view to the state directory.
pub(super) fn write_view(store: &StateStore, commit: Commit) -> Result<(), KafkaError> {
    store.write_unsynced(commit).map_err(KafkaError::Store)
}

/// What one entity event changed.
#[derive(Default)]
pub(super) struct EntityChange {
    /// The key and its new row, if the view changed.
    row: Option<(String, Row)>,
    /// The id, time to forget (ms since the epoch) and answer of the command that wrote the
    /// event.
    answer: Option<(String, i64, Reply)>,
}

/// What one read of the entity topic changed in the view.
#[derive(Default)]
pub(super) struct ViewChanges {
    pub(super) rows: HashMap<String, Row>,
    pub(super) answers: Vec<(String, i64, Reply)>,
    /// Next offset to read, by partition.
    pub(super) next: HashMap<i32, i64>,
}

impl ViewChanges {
    pub(super) fn note(&mut self, m: &rdkafka::message::BorrowedMessage<'_>, change: EntityChange) {
        if let Some((key, row)) = change.row {
            self.rows.insert(key, row);
        }
        self.answers.extend(change.answer);
        self.next.insert(m.partition(), m.offset() + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_topics_are_looked_up_again_once_no_longer_trusted() {
        let mut known = ReplyTopics::default();
        assert!(known.stale("r1") && !known.exists("r1"), "never looked up");
        known.note("r1", true);
        known.note("r2", false);
        assert!(!known.stale("r1") && known.exists("r1"));
        assert!(!known.stale("r2") && !known.exists("r2"));
        std::thread::sleep(ReplyTopics::MISSING_FOR + Duration::from_millis(5));
        assert!(
            known.stale("r2"),
            "a missing topic is asked about again soon"
        );
        assert!(!known.stale("r1"), "a found topic is trusted for longer");
        assert!(known.exists("r1"));
    }
}
