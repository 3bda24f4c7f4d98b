//! # miroir-engine
//!
//! The engine of miroir: it turns entity streams (full snapshots keyed by id) into materialized
//! tables, incrementally, with timely and differential dataflow. It never talks to Kafka or
//! PostgreSQL itself: connectors feed it [`ingest::Message`]s, receive malformed records through
//! [`ingest::ErrorSink`] and write external tables behind [`sink::ExternalSink`].
//!
//! The path of one record, each step with its file:
//!
//! ```text
//!  connector ─► Runtime::send (runtime/mod.rs) ─► worker inbox, partition % W
//!    ─► epoch::gather (runtime/epoch.rs) ─► Tasks::handle (runtime/tasks.rs)
//!    ─► Task::apply (ingest/task.rs): decode (ingest/decode.rs), late verdict
//!       (ingest/late.rs), upsert state (ingest/upsert/)
//!    ─► end of epoch: Task::flush feeds the dataflow (dataflow.rs, runtime/worker.rs)
//!    ─► table deltas ─► table_changes (runtime/changes.rs)
//!         internal: rows under their binary key (state/key.rs) in the epoch's commit
//!         external: a SinkBatch in the outbox (sink.rs)
//!    ─► commit::finish (runtime/commit.rs): one synced RocksDB batch (state/mod.rs)
//!    ─► queries read it through state::TableReader (state/reader.rs)
//! ```
//!
//! - [`topology`]: parse and validate topology files, with positioned diagnostics.
//! - [`plan`]: the logical plan of each table, planned from SQL.
//! - [`ingest`]: a source partition's records to row changes: decode, late verdict, upsert.
//! - [`dataflow`]: plans rendered as differential dataflows.
//! - [`runtime`]: workers, tasks, epochs and commits; progress ([`runtime::StatusSnapshot`]).
//! - [`state`]: RocksDB: upsert state, offsets, internal table rows, the outbox.
//! - [`sink`]: external tables: per-epoch batches, the outbox and the sink thread.
//! - [`command`]: what the master side does with one command (rules, assignments, replies).
//! - [`error`]: the error classes (transient: retry; definite: set the input aside; fatal: stop).
//! - [`reference`]: a plain evaluator used as the tests' oracle.
//!
//! **Delivery guarantee.** Each epoch commits table rows, upsert state and offsets in one
//! RocksDB write batch. Every event carries a version that grows per key (its business version
//! under a late policy, its offset otherwise); an event that is not newer than the applied one
//! changes nothing. So a replay after a crash, or a re-delivery, has no second effect.

pub mod auth;
pub mod changelog;
pub mod command;
pub mod dataflow;
pub mod error;
pub mod ingest;
pub mod metrics;
pub mod partition;
pub mod plan;
pub mod reference;
pub mod runtime;
pub mod sink;
pub mod state;
pub mod topology;
pub mod value;
