//! Ingest: the records of a source partition, from the bytes a connector hands over to the
//! row changes a dataflow input receives.
//!
//! ```text
//!  connector ──Message::Records──► task (source, partition)          task.rs
//!                                    │ decode JSON against the columns  decode.rs
//!                                    │   └─ malformed ─► ErrorSink (counted, logged)
//!                                    │ late policy                      late.rs
//!                                    │   └─ late, duplicate ─► dropped (counted, logged)
//!                                    ▼
//!                                  upsert state: last row and versions per key  upsert/
//!                                    │ end of epoch: one retraction and one insertion
//!                                    ▼ per changed key
//!                                  dataflow input  +  the commit's upsert entries and offset
//! ```
//!
//! The connector protocol ([`Message`], [`Records`], [`ErrorSink`]) is in `protocol.rs`.

pub mod decode;
pub mod late;
mod protocol;
mod stream;
pub(crate) mod task;
pub mod upsert;

pub use protocol::{ErrorSink, Message, Record, Records};
