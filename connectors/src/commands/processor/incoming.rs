//! One command of a polled batch: the message, its headers read once, and when it arrived.

use std::time::Instant;

use rdkafka::message::{Message, OwnedMessage};

use super::answered::keep_until;
use crate::commands::wire::{now_ms, CommandHeaders};

/// One command in a batch.
pub(super) struct Incoming {
    pub(super) message: OwnedMessage,
    pub(super) received: Instant,
    pub(super) headers: CommandHeaders,
    /// The message key (the entity key).
    pub(super) key: Option<String>,
}

impl Incoming {
    pub(super) fn new(message: OwnedMessage) -> Incoming {
        Incoming {
            headers: CommandHeaders::read(&message),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            received: Instant::now(),
            message,
        }
    }

    /// Until when (ms since the epoch) the command's answer is kept if it is answered now: a
    /// command id the client generated for this send (the correlation id) until shortly after
    /// the deadline, others for the retention (see [`super::answered`]).
    pub(super) fn answer_until(&self) -> i64 {
        let h = &self.headers;
        let single_use = h.command_id.is_some() && h.command_id == h.correlation_id;
        keep_until(now_ms(), h.deadline_ms(), single_use)
    }

    /// Whether it is a replay of a parked command.
    pub(super) fn replayed(&self) -> bool {
        self.headers.parked_version.is_some()
    }
}
