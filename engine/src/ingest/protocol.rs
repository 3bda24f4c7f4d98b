//! What a connector tells the runtime: records of a source partition, and assignment
//! changes. Malformed records go back out through [`ErrorSink`].

use crossbeam_channel::Sender;

/// One record read from a source partition (its bytes live in its [`Records`] batch).
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// Offset in its partition.
    pub offset: i64,
    /// Message key bytes.
    pub key: Option<&'a [u8]>,
    /// Payload bytes; `None` is a tombstone (delete).
    pub payload: Option<&'a [u8]>,
}

/// A batch of records of one partition, in offset order. Their keys and payloads share one
/// buffer: the connector thread allocates once per batch rather than twice per record, and a
/// worker frees the batch at once (the allocator's cross-thread frees cost the most).
#[derive(Clone, Debug, Default)]
pub struct Records {
    bytes: Vec<u8>,
    spans: Vec<Span>,
}

/// Where one record's key and payload are in [`Records::bytes`].
#[derive(Clone, Debug)]
struct Span {
    offset: i64,
    key: Option<std::ops::Range<usize>>,
    payload: Option<std::ops::Range<usize>>,
}

impl Records {
    /// The memory the records take: their bytes and where each one is.
    pub fn size(&self) -> usize {
        self.bytes.len() + self.spans.len() * std::mem::size_of::<Span>()
    }

    /// Adds a record after the others.
    pub fn push(&mut self, offset: i64, key: Option<&[u8]>, payload: Option<&[u8]>) {
        let mut copy = |part: Option<&[u8]>| {
            part.map(|b| {
                let start = self.bytes.len();
                self.bytes.extend_from_slice(b);
                start..self.bytes.len()
            })
        };
        let key = copy(key);
        let payload = copy(payload);
        self.spans.push(Span {
            offset,
            key,
            payload,
        });
    }

    /// The records, in order.
    pub fn iter(&self) -> impl Iterator<Item = Record<'_>> {
        self.spans.iter().map(|s| Record {
            offset: s.offset,
            key: s.key.clone().map(|r| &self.bytes[r]),
            payload: s.payload.clone().map(|r| &self.bytes[r]),
        })
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the batch has no record.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> Option<i64> {
        self.spans.last().map(|s| s.offset)
    }
}

/// What a connector tells the runtime.
#[derive(Debug)]
pub enum Message {
    /// Records of one source partition, in offset order.
    Records {
        /// Source index.
        source: usize,
        /// Partition.
        partition: u32,
        /// The records.
        records: Records,
        /// Whether more records of the partition were waiting at the source when these were
        /// handed over: the engine is catching up, and epochs may grow (see
        /// [`crate::runtime::RuntimeConfig::max_epoch_interval`]).
        catching_up: bool,
    },
    /// Partitions now owned by this instance: create their tasks, all in one epoch (so the
    /// tables derived from partition `i` of several sources, and the repartition records
    /// written from them, come from their states as committed together).
    Assign {
        /// The partitions, by source index.
        tasks: Vec<(usize, Vec<u32>)>,
    },
    /// Partitions taken away: commit and drop their tasks, all in one epoch. Every worker
    /// answers on `done` once the epoch that dropped them is committed.
    Revoke {
        /// The partitions, by source index.
        tasks: Vec<(usize, Vec<u32>)>,
        /// Whether to retract their rows from the tables: yes when another instance takes
        /// them over, no when this instance stops (the rows stay, notably in external tables,
        /// for the next start).
        retract: bool,
        /// Acknowledgements, one per worker.
        done: Sender<()>,
    },
}

impl Message {
    /// Whether the message assigns or revokes partitions.
    pub fn moves_partitions(&self) -> bool {
        matches!(self, Message::Assign { .. } | Message::Revoke { .. })
    }

    /// The memory of the records it carries (none for an assignment change).
    pub fn size(&self) -> usize {
        match self {
            Message::Records { records, .. } => records.size(),
            _ => 0,
        }
    }
}

/// Where malformed records are reported (a dead-letter topic, in production).
pub trait ErrorSink: Send + Sync {
    /// Reports a record that could not be decoded.
    fn malformed(&self, topic: &str, partition: u32, record: &Record, error: &str);

    /// Waits, at most `timeout`, until every report so far is safely kept (sending again
    /// those that failed); whether they all are. The epoch that read the records commits
    /// only then: a report is never lost with its record's offset committed.
    fn settle(&self, timeout: std::time::Duration) -> bool {
        let _ = timeout;
        true
    }
}
