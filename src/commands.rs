//! Commands and replies: change data another service owns, and hear back.
//!
//! The app side sends with a [`Client`] (its own reply topic, correlation ids, per-request
//! timeouts, never a re-send); the master side declares `[commands.NAME]` sections in its
//! topology and `miroir run` processes them (see `docs/commands.md`).
//!
//! ```no_run
//! use std::time::Duration;
//! use miroir::commands::{Client, Command, Principal, Reply};
//! use miroir::miroir_engine::metrics::Metrics;
//! use miroir::miroir_engine::topology::Topology;
//! use miroir_connectors::kafka::KafkaConfig;
//!
//! let master = Topology::load("topologies/user-referential.toml".as_ref())?;
//! let spec = master.command("update_email").expect("declared");
//! let metrics = Metrics::new();
//! let client = Client::start(&KafkaConfig::new("127.0.0.1:19092"), "app", metrics.commands.clone())?;
//! let principal = Principal { id: "alice".into(), roles: vec!["user-admin".into()] };
//! let command = Command::new(spec, &serde_json::json!({"id": "u-1", "email": "ada@example.org"}), principal)?;
//! match client.send(&command, Duration::from_secs(5))? {
//!     Reply::Accepted { version, .. } => println!("now at version {version}"),
//!     other => println!("not applied: {other:?}"),
//! }
//! client.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub use miroir_connectors::commands::client::{Command, CommandClient as Client, SendError};
pub use miroir_connectors::commands::dlq::{
    each as each_dead_letter, list as dead_letters, replay, Parked, Replayed,
};
pub use miroir_connectors::commands::processor::dependency::{Dependency, DependencyError};
pub use miroir_engine::command::{Principal, Reply};
