//! Commands and replies over Kafka: an app asks the master of an entity to change it, and
//! waits for the answer on a topic of its own.
//!
//! ```text
//!  app instance                          master instance
//!  client.rs ── command topic ─────────► processor/ ── decide (miroir_engine::command)
//!     ▲         (key = entity key)          │ one Kafka transaction per batch:
//!     │                                     │ entity event, reply, answered id,
//!     └──────── reply topic ◄───────────────┘ dead letter, consumed offsets
//!               (one per instance)
//!  dlq.rs: list the dead letters of a command topic, replay them in order through a client
//! ```
//!
//! - [`wire`]: topic names, header names and the headers of each record: the one place the
//!   protocol is written.
//! - [`client`]: sends a command and waits for its reply, with a timeout, never re-sending.
//! - [`processor`]: the master side: reads commands, keeps the views it decides from, and
//!   commits everything a command causes in one transaction.
//! - [`dlq`]: parked commands, listed and replayed in order.

pub mod client;
pub mod dlq;
pub mod processor;
pub mod wire;
