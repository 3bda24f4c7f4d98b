//! A worker's inbox: the messages the connector hands it, bounded by the bytes of the records
//! they hold, so its memory does not depend on the records' sizes (a few 10 MB records, or
//! millions of small ones). A message that arrives while the inbox is empty is always taken,
//! whatever its size: one record larger than the bound still goes through.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::ingest::Message;

/// The sending end of an inbox (the connector's).
pub(crate) struct InboxSender {
    tx: Sender<Message>,
    held: Arc<AtomicUsize>,
    limit: usize,
}

/// The receiving end of an inbox (the worker's).
#[derive(Clone)]
pub(crate) struct InboxReceiver {
    rx: Receiver<Message>,
    held: Arc<AtomicUsize>,
}

/// An inbox holding at most `limit` bytes of records.
pub(crate) fn inbox(limit: usize) -> (InboxSender, InboxReceiver) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let held = Arc::new(AtomicUsize::new(0));
    (
        InboxSender {
            tx,
            held: held.clone(),
            limit,
        },
        InboxReceiver { rx, held },
    )
}

/// Why [`InboxSender::try_send`] gave a message back.
pub(crate) enum Refused {
    /// The inbox is full: try again later.
    Full(Message),
    /// The worker is gone.
    Gone,
}

impl InboxSender {
    /// Adds `message` unless the records held would pass the limit (a message without
    /// records, an assignment change, is always taken).
    pub(crate) fn try_send(&self, message: Message) -> Result<(), Refused> {
        let size = message.size();
        let held = self.held.load(Ordering::Acquire);
        if size > 0 && held > 0 && held + size > self.limit {
            return Err(Refused::Full(message));
        }
        self.held.fetch_add(size, Ordering::AcqRel);
        self.tx.send(message).map_err(|_| Refused::Gone)
    }
}

impl InboxReceiver {
    /// The next message, waiting at most `wait`.
    pub(crate) fn recv_timeout(&self, wait: Duration) -> Result<Message, RecvTimeoutError> {
        let message = self.rx.recv_timeout(wait)?;
        self.held.fetch_sub(message.size(), Ordering::AcqRel);
        Ok(message)
    }
}
