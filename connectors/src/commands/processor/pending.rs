//! The dead letters of a command still pending (parked, and not resolved by a replay since;
//! see [`crate::commands::dlq`]), counted from its dead-letter topic for
//! `miroir_command_dead_letters_pending`. Every processor of the command reads the whole
//! topic, so every instance reports the same count.

use std::collections::HashSet;

use prometheus::IntGauge;

use crate::commands::dlq::DeadLetter;
use crate::kafka::tail::Tail;
use crate::kafka::KafkaError;

/// The pending dead letters of one command, by position (`partition/offset`).
pub(super) struct PendingDeadLetters {
    tail: Tail,
    parked: HashSet<String>,
    gauge: IntGauge,
}

impl PendingDeadLetters {
    /// Reads `dlq` from its beginning; `gauge` follows the count.
    pub(super) fn new(tail: Tail, gauge: IntGauge) -> PendingDeadLetters {
        PendingDeadLetters {
            tail,
            parked: HashSet::new(),
            gauge,
        }
    }

    /// Takes what the dead-letter topic got since the last call, and sets the gauge.
    pub(super) fn update(&mut self) -> Result<(), KafkaError> {
        let parked = &mut self.parked;
        self.tail.drain(|m| {
            match DeadLetter::of(m) {
                DeadLetter::Parked(position) => parked.insert(position),
                DeadLetter::Resolves(position) => parked.remove(&position),
            };
            Ok(())
        })?;
        self.gauge.set(self.parked.len() as i64);
        Ok(())
    }
}
