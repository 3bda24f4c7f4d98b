//! # miroir-connectors
//!
//! The outside world of miroir's engine: Kafka (through rdkafka) and PostgreSQL (through
//! tokio-postgres).
//!
//! - [`kafka::input`]: a consumer-group source feeding the engine's runtime; partitions
//!   assigned to the instance become tasks, resumed from the offsets committed in RocksDB.
//! - [`kafka::output`]: the malformed-record topic (`<topic>.miroir-errors`) and a plain
//!   publisher used by the demo and the tests.

//! - [`postgres`]: external tables in the app's PostgreSQL database.

pub mod kafka;
pub mod postgres;
