//! # miroir-engine
//!
//! The engine of miroir: it turns entity streams (full snapshots keyed by id) into materialized
//! tables, incrementally, with timely and differential dataflow. It never talks to Kafka or
//! PostgreSQL itself: connectors feed it [`runtime::Message`]s and receive malformed records
//! through [`runtime::ErrorSink`].
//!
//! ```text
//!  topology file ─► topology (TOML + SQL) ─► plan ─► dataflow (per worker)
//!                                                        ▲            │
//!  connector ─► runtime::Message ─► task (decode, late, upsert)      ▼
//!                                                  store (RocksDB: tables, state, offsets)
//! ```
//!
//! - [`topology`]: parse and validate topology files, with positioned diagnostics.
//! - [`plan`]: the logical plan of each table, planned from SQL.
//! - [`late`], [`upsert`]: the late-event policy and the per-key upsert state.
//! - [`dataflow`]: plans rendered as differential dataflows.
//! - [`runtime`]: workers, tasks, epochs and commits. [`store`]: RocksDB.
//! - [`sink`]: external tables: per-epoch batches, the outbox and the sink thread.
//! - [`command`]: what the master side does with one command (rules, assignments, replies).
//! - [`reference`]: a plain evaluator used as the tests' oracle.
//!
//! **Delivery guarantee.** Each epoch commits table rows, upsert state and offsets in one
//! RocksDB write batch. Every event carries a version that grows per key (its business version
//! under a late policy, its offset otherwise); an event that is not newer than the applied one
//! changes nothing. So a replay after a crash, or a re-delivery, has no second effect.

pub mod command;
pub mod dataflow;
pub mod decode;
pub mod late;
pub mod metrics;
pub mod partition;
pub mod plan;
pub mod reference;
pub mod runtime;
pub mod sink;
pub mod store;
pub mod topology;
pub mod upsert;
pub mod value;
