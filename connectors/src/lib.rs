//! # miroir-connectors
//!
//! The outside world of miroir's engine: Kafka (through rdkafka) and PostgreSQL (through
//! tokio-postgres).
//!
//! - [`kafka`]: the consumer-group source feeding the engine's runtime ([`kafka::input`]:
//!   assigned partitions become tasks, resumed from the offsets committed in RocksDB), the
//!   malformed-record topic and a plain publisher ([`kafka::output`]), topic administration
//!   and reading a topic to its end ([`kafka::tail`]).
//! - [`commands`]: commands and replies over Kafka: the wire protocol, the client (app side),
//!   the processor (master side) and the dead letters.
//! - [`postgres`]: external tables in the app's PostgreSQL database.
//! - [`tls`]: the cryptography of every TLS connection.

pub mod commands;
pub mod kafka;
pub mod postgres;
pub mod tls;
