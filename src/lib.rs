//! # miroir
//!
//! Materialized tables from Kafka entity streams. A *topology* file declares entity sources
//! (Kafka topics of full snapshots keyed by id) and tables computed from them in SQL; miroir
//! keeps the tables up to date, drops late events, and serves the rows by key.
//!
//! miroir runs three ways:
//! - the CLI (`miroir run topology.toml`), see `src/main.rs`;
//! - embedded in an application instance, with [`Engine`];
//! - as an HTTP query endpoint ([`http`]), started by both.
//!
//! ```text
//!  Kafka topics ─► connectors (consumer group) ─► engine runtime (timely workers)
//!                                                   │ tasks: decode, late policy, upsert
//!                                                   ▼
//!                                      differential dataflow ─► RocksDB tables
//!                                                                  ▲
//!                         Engine::get / Engine::scan / HTTP ───────┘
//! ```
//!
//! ```no_run
//! let engine = miroir::Engine::builder()
//!     .topology_file("topologies/user-directory.toml")
//!     .brokers("127.0.0.1:19092")
//!     .state_dir("/tmp/miroir-state")
//!     .start()?;
//! if let Some(row) = engine.get("user_contacts", "u-1")? {
//!     println!("{}", row.row);
//! }
//! engine.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod access;
mod checks;
pub mod commands;
pub mod http;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use miroir_connectors::commands::processor::{CommandProcessor, ProcessorStatus};
use miroir_connectors::kafka::changelog::{self, KafkaChangelog};
pub use miroir_connectors::kafka::input::GroupProtocol;
use miroir_connectors::kafka::input::{GroupMember, Handover, KafkaSource};
use miroir_connectors::kafka::internal;
use miroir_connectors::kafka::membership::{Member, Membership, Ownership};
use miroir_connectors::kafka::output::KafkaErrorSink;
use miroir_connectors::kafka::standby::{StandbyRunner, Standbys};
use miroir_connectors::kafka::{KafkaConfig, KafkaError};
use miroir_connectors::postgres::sink::PostgresSink;
use miroir_connectors::postgres::{database_url, PostgresError};
pub use miroir_engine::auth::AuthConfig;
use miroir_engine::auth::{AuthError, Authenticator};
use miroir_engine::changelog::logged_table;
use miroir_engine::changelog::ChangelogWriter;
use miroir_engine::command::Principal;
use miroir_engine::ingest::upsert::Entry;
use miroir_engine::metrics::Metrics;
use miroir_engine::partition::partition_of_value;
use miroir_engine::plan::Distribution;
use miroir_engine::runtime::{Runtime, RuntimeConfig, RuntimeError, StatusSnapshot};
use miroir_engine::state::key::{encode_key, key_hex};
pub use miroir_engine::state::ScanOrder;
use miroir_engine::state::{StateStore, StoreError, TableReader};
use miroir_engine::topology::{Source, Topology, TopologyError};
use miroir_engine::value::{
    format_timestamp, parse_key_prefix, parse_key_text, ColumnType, KeyTextError, Value,
};
use serde::{Deserialize, Serialize};
pub use tls::{HttpTls, TlsError};

pub use miroir_engine;

/// Errors starting or querying an [`Engine`].
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The topology is invalid (every problem, with file positions).
    #[error("invalid topology:\n{0}")]
    Topology(#[from] TopologyError),
    /// A required setting is missing.
    #[error("missing setting: {0}")]
    Config(&'static str),
    /// Settings that cannot go together.
    #[error("conflicting settings: {0}")]
    Conflict(&'static str),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runtime could not start.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Kafka failed.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The PostgreSQL settings are wrong.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// The query forwarder's thread could not start.
    #[error("cannot start the query forwarder: {0}")]
    Forwarder(std::io::Error),
    /// The token keys cannot be used.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The HTTP endpoint's TLS material cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The HTTP listener could not start.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Errors of a query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No table of that name in the topology.
    #[error("unknown table `{0}`")]
    UnknownTable(String),
    /// The table lives in PostgreSQL, not in this instance.
    #[error("table `{table}` is external: query PostgreSQL table {target}")]
    External {
        /// The table.
        table: String,
        /// `schema.table` in PostgreSQL.
        target: String,
    },
    /// The key is not a key of the table (wrong number of parts, or a part of the wrong type).
    #[error("bad key for table `{table}`: {source}")]
    BadKey {
        /// The table.
        table: String,
        /// What is wrong.
        source: KeyTextError,
    },
    /// The instance that owns the key's partition cannot answer now (it is moving, restoring,
    /// or did not answer): ask again.
    #[error("{0}")]
    Unavailable(String),
    /// The instance owning the key refused the caller's token (401) or its roles (403).
    #[error("refused by the owner of the key: {0}")]
    Refused(String),
    /// The scan cursor (`after`) is not one a scan gave.
    #[error("bad cursor `{0}`: pass the `next` of the page before")]
    BadCursor(String),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The encoded key of `cursor` (a scan cursor: the row's encoded key, [`key_hex`]); `None`
/// when it is not one.
fn cursor_key(cursor: &str) -> Option<Vec<u8>> {
    if !cursor.len().is_multiple_of(2) {
        return None;
    }
    (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Says at start how the commands' principals are established, when that is not by tokens.
fn warn_of_trust(auth: &Authenticator, topology: &Topology) {
    if topology.commands.is_empty() {
        return;
    }
    if auth.trusts_principal_headers() {
        tracing::warn!("commands without a token are believed on the principal they claim (--trust-principal-headers): anyone who can write a command topic can act as anyone; for development only");
    } else if !auth.verifies_tokens() {
        tracing::warn!("no key verifies bearer tokens (--auth-keys, or MIROIR_AUTH_HS256_SECRET): every command is answered `unauthenticated`");
    }
}

enum TopologySource {
    File(PathBuf),
    Text(String),
}

/// Builds an [`Engine`]. Required: a topology, brokers and a state directory.
#[derive(Default)]
pub struct EngineBuilder {
    topology: Option<TopologySource>,
    brokers: Option<String>,
    state_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    workers: Option<usize>,
    epoch_interval: Option<Duration>,
    max_epoch_interval: Option<Duration>,
    inbox_bytes: Option<usize>,
    kafka_extra: Vec<(String, String)>,
    database_url: Option<String>,
    dependency: Option<Arc<dyn commands::Dependency>>,
    command_client: bool,
    instance_id: Option<String>,
    advertise: Option<String>,
    /// Set by [`EngineBuilder::changelog`]`(false)`.
    no_changelog: bool,
    /// Set by [`EngineBuilder::repartition`]`(false)`.
    unsplit: bool,
    standby_replicas: usize,
    group_protocol: GroupProtocol,
    auth: AuthConfig,
    tls: Option<HttpTls>,
}

impl EngineBuilder {
    /// Reads the topology from a file.
    pub fn topology_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.topology = Some(TopologySource::File(path.into()));
        self
    }

    /// Takes the topology from a string.
    pub fn topology_str(mut self, text: impl Into<String>) -> Self {
        self.topology = Some(TopologySource::Text(text.into()));
        self
    }

    /// Kafka bootstrap servers (`host:port,...`).
    pub fn brokers(mut self, brokers: impl Into<String>) -> Self {
        self.brokers = Some(brokers.into());
        self
    }

    /// Directory of the RocksDB state (created if missing).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Serve `/health`, `/ready` and `/metrics` on `addr` instead of on the API's address (port
    /// 0 picks a free port; see [`Engine::admin_addr`]): probes and scrapes stay on a network
    /// of their own, and the API's address serves queries only.
    pub fn admin_listen(mut self, addr: SocketAddr) -> Self {
        self.admin_listen = Some(addr);
        self
    }

    /// Serve the HTTP API over TLS, and forward queries to the other instances over TLS (they
    /// must serve it too); the admin address stays plain HTTP.
    pub fn tls(mut self, tls: HttpTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Also serve the HTTP API on `addr` (port 0 picks a free port; see [`Engine::http_addr`]).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Worker threads (default 2).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Epoch when the engine keeps up (default 100 ms): how long applied events may wait
    /// before they are committed and visible.
    pub fn epoch_interval(mut self, interval: Duration) -> Self {
        self.epoch_interval = Some(interval);
        self
    }

    /// Longest epoch while records are waiting (default 5 s): catching up, epochs grow so that
    /// a key changed several times in one epoch is written once, and commits are fewer.
    pub fn max_epoch_interval(mut self, interval: Duration) -> Self {
        self.max_epoch_interval = Some(interval);
        self
    }

    /// Most bytes of records waiting for each worker (default 64 MiB): past it, the consumer
    /// pauses (and keeps polling, staying in its group) until the worker takes some.
    pub fn inbox_bytes(mut self, bytes: usize) -> Self {
        self.inbox_bytes = Some(bytes);
        self
    }

    /// The PostgreSQL database of external tables whose sink names no `url` (default: the
    /// `DATABASE_URL` environment variable).
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// A service the command processors consult before applying a command; its failures are
    /// retried with backoff, then the command is parked in the dead-letter topic; its
    /// rejections answer the command. Not with a topology whose commands declare HTTP checks
    /// (`check = { url }`), which are the processors' dependency then.
    pub fn dependency(mut self, dependency: Arc<dyn commands::Dependency>) -> Self {
        self.dependency = Some(dependency);
        self
    }

    /// Also start a command client (see [`Engine::commands`]) with this instance's reply
    /// topic, named after the topology.
    pub fn command_client(mut self) -> Self {
        self.command_client = true;
        self
    }

    /// This instance's id among the instances of the topology (default: the id its state
    /// directory was given when it was created, so a restart on the same directory keeps it).
    /// Given explicitly, it also makes the instance a static member of its consumer group
    /// (`group.instance.id`): restarted within `session.timeout.ms` (10 s), it gets its
    /// partitions back without a rebalance, and a clean stop leaves them assigned that long.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// The `host:port` other instances reach this one's HTTP API at, to forward queries for the
    /// keys it owns (default: the address it listens on; `127.0.0.1` for an unspecified one).
    pub fn advertise(mut self, addr: impl Into<String>) -> Self {
        self.advertise = Some(addr.into());
        self
    }

    /// Whether each task's state is logged to its source's compacted changelog topic (default:
    /// yes), so that an instance taking a partition over restores its state from there and
    /// goes on where the previous owner stopped. Without it, a partition that reaches an
    /// instance without its state is read again from the beginning of its topic, which is
    /// wrong once the topic is compacted (compaction may keep a late event a task dropped).
    pub fn changelog(mut self, on: bool) -> Self {
        self.no_changelog = !on;
        self
    }

    /// Whether tables that need the rows of several partitions are split into stages joined
    /// by repartition topics (default: yes, with changelogs), which makes them right with
    /// several instances. Without, they are computed in one stage: right with one instance
    /// only (an instance that does not hold every partition answers 503 for them), without the
    /// repartition topics' hops.
    pub fn repartition(mut self, on: bool) -> Self {
        self.unsplit = !on;
        self
    }

    /// How many other instances keep a warm copy of each partition's state (default 0), fed
    /// from its changelog: each stands by where range assignment would move the partition if
    /// its owner left, so that a partition taken over restores only what its standby had not
    /// read yet. Needs changelogs.
    pub fn standby_replicas(mut self, replicas: usize) -> Self {
        self.standby_replicas = replicas;
        self
    }

    /// The source consumer's group protocol (default: classic; see [`GroupProtocol`]). Give
    /// every instance of a topology the same one.
    pub fn group_protocol(mut self, protocol: GroupProtocol) -> Self {
        self.group_protocol = protocol;
        self
    }

    /// How the bearer tokens of commands are verified (default: none is, so every command is
    /// answered `unauthenticated`; see [`AuthConfig`]).
    pub fn auth(mut self, auth: AuthConfig) -> Self {
        self.auth = auth;
        self
    }

    /// An extra librdkafka property for every Kafka client (applied after the topology's
    /// `[kafka]` section).
    pub fn kafka_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka_extra.push((key.into(), value.into()));
        self
    }

    /// Validates the topology, opens the state, joins the consumer group and starts serving.
    pub fn start(self) -> Result<Engine, EngineError> {
        let topology = match self.topology.ok_or(EngineError::Config("topology"))? {
            TopologySource::File(path) => Topology::load(&path)?,
            TopologySource::Text(text) => Topology::parse("<string>", &text)?,
        };
        for warning in &topology.warnings {
            tracing::warn!(%warning, "topology warning");
        }
        // Repartition records are written with the changelogs, in their transactions.
        let topology = match self.no_changelog || self.unsplit {
            true => Arc::new(topology.unsplit()),
            false => Arc::new(topology),
        };
        let state_dir = self.state_dir.ok_or(EngineError::Config("state_dir"))?;
        let mut kafka = KafkaConfig::new(self.brokers.ok_or(EngineError::Config("brokers"))?);
        kafka.extra = self.kafka_extra;
        let kafka = kafka.with_defaults(&topology.kafka);
        miroir_connectors::kafka::credentials::check(&kafka)?;
        let tables: Vec<String> = topology
            .tables
            .iter()
            .filter(|t| t.postgres().is_none())
            .map(|t| t.name.clone())
            .collect();
        let store = StateStore::open(&state_dir, &tables)?;
        let sink: Option<Box<dyn miroir_engine::sink::ExternalSink>> =
            if topology.has_external_tables() {
                let fallback = self
                    .database_url
                    .or_else(|| std::env::var("DATABASE_URL").ok());
                let url = database_url(&topology, fallback.as_deref())?;
                Some(Box::new(PostgresSink::new(
                    &url,
                    topology.clone(),
                    &store.instance_id()?,
                )?))
            } else {
                None
            };
        let metrics = Arc::new(Metrics::new());
        let errors = Arc::new(KafkaErrorSink::new(&kafka)?);
        let mut config = RuntimeConfig::default();
        if let Some(w) = self.workers {
            config.workers = w.max(1);
        }
        if let Some(e) = self.epoch_interval {
            config.epoch_interval = e;
        }
        if let Some(b) = self.inbox_bytes {
            config.inbox_bytes = b;
        }
        if let Some(e) = self.max_epoch_interval {
            config.max_epoch_interval = e;
        }
        // Standbys answer for the rows their owners log.
        config.log_rows = self.standby_replicas > 0;
        if self.no_changelog && self.standby_replicas > 0 {
            return Err(EngineError::Conflict(
                "standby replicas are fed from changelogs: they need changelogs on",
            ));
        }
        // An id given explicitly makes the instance a static member of its consumer group.
        let fixed = self.instance_id.is_some();
        let instance = match self.instance_id {
            Some(id) => id,
            None => store.instance_id()?,
        };
        let changelog: Option<Arc<dyn ChangelogWriter>> = if self.no_changelog {
            None
        } else {
            internal::create_repartition_topics(&kafka, &topology)?;
            changelog::create_topics(&kafka, &topology)?;
            let id = format!("miroir.{}.{instance}.changelog", topology.name);
            Some(Arc::new(KafkaChangelog::new(&kafka, &topology, &id)?))
        };
        let handover = Handover {
            changelog: changelog.is_some(),
            standbys: match self.standby_replicas {
                0 => None,
                _ => Some(Standbys::new(
                    &kafka,
                    &topology,
                    store.clone(),
                    metrics.clone(),
                )?),
            },
        };
        let standbys = handover.standbys.clone();
        let runtime = Arc::new(Runtime::start(
            topology.clone(),
            store.clone(),
            metrics.clone(),
            errors,
            sink,
            changelog,
            config,
        )?);
        let source = KafkaSource::start(
            &kafka,
            &topology,
            runtime.clone(),
            metrics.clone(),
            GroupMember {
                instance: &instance,
                fixed,
                protocol: self.group_protocol,
            },
            handover,
        )?;
        let global = KafkaSource::start_global(
            &kafka,
            &topology,
            runtime.clone(),
            metrics.clone(),
            &instance,
        )?;
        let listener = self.listen.map(http::bind).transpose()?;
        let admin_listener = self.admin_listen.map(http::bind).transpose()?;
        let advertise = self.advertise.or_else(|| {
            listener
                .as_ref()
                .map(|(_, addr)| http::advertised(*addr).to_string())
        });
        let membership = Arc::new(Membership::start(
            &kafka,
            &topology.name,
            &instance,
            advertise,
            {
                let (runtime, standbys) = (runtime.clone(), standbys.clone());
                let global: Vec<String> = topology
                    .sources
                    .iter()
                    .filter(|s| s.global)
                    .map(|s| s.topic.clone())
                    .collect();
                move || {
                    let standby = standbys.as_ref().map(|s| s.summary()).unwrap_or_default();
                    // Every instance reads the global sources' partitions: nobody owns them.
                    let mut partitions = runtime.owned_partitions();
                    partitions.retain(|topic, _| !global.contains(topic));
                    Ownership {
                        partitions,
                        restoring: runtime.restoring_partitions(),
                        lag: runtime.status().lag,
                        restore_remaining: runtime.status().restore_remaining,
                        standby: standby.partitions,
                        standby_lag: standby.lag,
                    }
                }
            },
        )?);
        let standby = match &standbys {
            Some(s) => Some(s.start(&instance, self.standby_replicas, {
                let membership = membership.clone();
                move || membership.live()
            })?),
            None => None,
        };
        let auth = Arc::new(Authenticator::new(self.auth)?);
        warn_of_trust(&auth, &topology);
        let dependency = match (self.dependency, checks::HttpChecks::of(&topology)) {
            (Some(_), Some(_)) => {
                return Err(EngineError::Conflict(
                    "the topology's commands declare HTTP checks and the app sets a dependency: keep one",
                ))
            }
            (Some(app), None) => Some(app),
            (None, Some(http)) => Some(Arc::new(http) as Arc<dyn commands::Dependency>),
            (None, None) => None,
        };
        let mut processors = Vec::new();
        for command in &topology.commands {
            processors.push(CommandProcessor::start(
                &kafka,
                topology.clone(),
                &command.name,
                &store.instance_id()?,
                metrics.commands.clone(),
                (dependency.clone(), auth.clone()),
                Some(store.clone()),
            )?);
        }
        let client = if self.command_client {
            Some(commands::Client::start(
                &kafka,
                &topology.name,
                metrics.commands.clone(),
            )?)
        } else {
            None
        };
        let forwarder = http::Forwarder::new(&metrics.registry, self.tls.as_ref())?;
        let server_tls = self.tls.as_ref().map(HttpTls::server_config).transpose()?;
        let inner = Arc::new(Inner {
            processors: processors
                .iter()
                .zip(&topology.commands)
                .map(|(p, c)| (c.name.clone(), p.status()))
                .collect(),
            topology,
            tables: Arc::new(store),
            runtime,
            metrics,
            state_dir,
            membership,
            standbys,
            forwarder,
            auth,
        });
        let admin = match admin_listener {
            Some(listener) => Some(http::Server::start(
                http::router(inner.clone(), http::Routes::Probes),
                listener,
                None,
            )?),
            None => None,
        };
        let routes = match admin {
            Some(_) => http::Routes::Queries,
            None => http::Routes::All,
        };
        let server = match listener {
            Some(listener) => Some(http::Server::start(
                http::router(inner.clone(), routes),
                listener,
                server_tls,
            )?),
            None => None,
        };
        Ok(Engine {
            inner,
            source: Some(source),
            global,
            standby,
            processors,
            client,
            server,
            admin,
        })
    }
}

pub(crate) struct Inner {
    topology: Arc<Topology>,
    tables: Arc<dyn TableReader>,
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
    state_dir: PathBuf,
    /// The command processors' status, by command.
    processors: Vec<(String, Arc<ProcessorStatus>)>,
    /// The instances of the topology, and who owns which partition.
    membership: Arc<Membership>,
    /// The standby replicas this instance keeps, if any.
    standbys: Option<Arc<Standbys>>,
    /// Sends queries on to the instance that owns their key.
    forwarder: http::Forwarder,
    /// Proves who asks a query.
    auth: Arc<Authenticator>,
}

/// An entity whose version a query waits for (see [`Inner::version_target`]).
pub(crate) struct VersionTarget {
    /// Its source, by position.
    source: usize,
    /// Its key's partition, once the source's partition count is known.
    partition: Option<u32>,
    /// Its key in the source.
    key: Value,
    /// The version awaited.
    pub(crate) wanted: Value,
}

/// Where the row of a key is served.
pub(crate) enum Route {
    /// By this instance: it owns the key's partition, or the table's rows are on every
    /// instance, or it holds every partition a partial table needs.
    Here,
    /// By no instance now: the table is computed from the rows of several partitions and
    /// this instance does not hold them all (why, in words).
    Incomplete(String),
    /// By another instance.
    At(Member),
    /// By no instance now: its partition is moving.
    Moving,
    /// By this instance once it has read its partition up to where it was when the partition
    /// came (until then, a row that exists may be missing).
    Restoring,
}

/// A row as served: the row and where and how fresh it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RowAnswer {
    /// The table.
    pub table: String,
    /// The row's key text.
    pub key: String,
    /// The row, as a JSON object.
    pub row: serde_json::Value,
    /// The source partition the key belongs to, when the table is keyed by a source key.
    pub partition: Option<u32>,
    /// The instance that answered.
    pub served_by: String,
    /// How fresh the answer is.
    pub freshness: Freshness,
}

/// How fresh the state behind an answer is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Freshness {
    /// Last committed epoch.
    pub epoch: u64,
    /// When it was committed (RFC 3339), if any epoch was.
    pub committed_at: Option<String>,
    /// Records not yet applied on this instance's partitions (`None` before assignment).
    pub lag: Option<i64>,
    /// Whether the instance is still catching up (the answer may be behind the topic).
    pub stale: bool,
}

impl Inner {
    fn freshness(&self) -> Freshness {
        let status = self.runtime.status();
        Freshness {
            epoch: status.epoch,
            committed_at: status
                .last_commit_ms
                .map(|ms| format_timestamp(ms as i64 * 1000)),
            lag: status.lag,
            stale: status.lag != Some(0),
        }
    }

    /// The plan of an internal table.
    fn internal(&self, table: &str) -> Result<&miroir_engine::plan::TablePlan, QueryError> {
        let plan = self
            .topology
            .table(table)
            .ok_or_else(|| QueryError::UnknownTable(table.to_string()))?;
        match plan.postgres() {
            Some(pg) => Err(QueryError::External {
                table: table.to_string(),
                target: pg.qualified(),
            }),
            None => Ok(plan),
        }
    }

    /// The plan of internal table `table` and `key` (its URL form) parsed as its key.
    fn internal_key(
        &self,
        table: &str,
        key: &str,
    ) -> Result<(&miroir_engine::plan::TablePlan, Vec<Value>), QueryError> {
        let plan = self.internal(table)?;
        let values =
            parse_key_text(key, &key_types(plan)).map_err(|source| QueryError::BadKey {
                table: table.to_string(),
                source,
            })?;
        Ok((plan, values))
    }

    fn get(&self, table: &str, key: &str) -> Result<Option<RowAnswer>, QueryError> {
        let (plan, values) = self.internal_key(table, key)?;
        let Some(bytes) = self.tables.row(table, &values)? else {
            return Ok(None);
        };
        let row = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        let partition = self.partition_of(plan, &values).map(|(_, p)| p);
        Ok(Some(RowAnswer {
            table: table.to_string(),
            key: key.to_string(),
            row,
            partition,
            served_by: self.membership.me().to_string(),
            freshness: self.freshness(),
        }))
    }

    /// The source topic and partition of `key` in `plan`, when the table is keyed by a source
    /// key and the topic's partition count is known.
    fn partition_of<'a>(
        &'a self,
        plan: &miroir_engine::plan::TablePlan,
        key: &[miroir_engine::value::Value],
    ) -> Option<(&'a str, u32)> {
        let (source, part) = self.topology.partitioned_by(plan)?;
        let topic = &self.topology.sources[source].topic;
        let partitions = self.runtime.partition_count(topic)?;
        Some((topic, partition_of_value(&key[part], partitions)))
    }

    /// The row of `key` in `table` as this instance's standby replica of the key's partition
    /// holds it, marked stale with the standby's lag; unavailable when it does not stand by
    /// for the partition or has no row for the key (a standby cannot tell a key without a row
    /// from a row its owner did not log).
    pub(crate) fn get_standby(&self, table: &str, key: &str) -> Result<RowAnswer, QueryError> {
        let (plan, values) = self.internal_key(table, key)?;
        let unavailable = |why: &str| {
            QueryError::Unavailable(format!(
                "instance {} {why} key `{key}` of `{table}`; ask again",
                self.membership.me()
            ))
        };
        let placed = self
            .topology
            .partitioned_by(plan)
            .map(|(s, _)| s)
            .zip(self.partition_of(plan, &values));
        let (Some((source, (topic, partition))), Some(standbys), Some(store)) =
            (placed, &self.standbys, self.runtime.state_store())
        else {
            return Err(unavailable("keeps no standby replica for"));
        };
        let lag = standbys
            .lag(topic, partition)
            .ok_or_else(|| unavailable("keeps no standby replica for"))?;
        let bytes = store
            .standby_row(
                (source, partition),
                &logged_table(plan),
                &encode_key(&values),
            )?
            .ok_or_else(|| unavailable("has no standby row for"))?;
        Ok(RowAnswer {
            table: table.to_string(),
            key: key.to_string(),
            row: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            partition: Some(partition),
            served_by: self.membership.me().to_string(),
            freshness: Freshness {
                epoch: self.runtime.status().epoch,
                committed_at: None,
                lag: Some(lag),
                stale: true,
            },
        })
    }

    /// A live instance (this one first) that keeps a standby replica of the partition of
    /// `key` in `table`, other than its owner `but`.
    pub(crate) fn standby_of(&self, table: &str, key: &str, but: Option<&str>) -> Option<Member> {
        let (plan, values) = self.internal_key(table, key).ok()?;
        let (topic, partition) = self.partition_of(plan, &values)?;
        let mut standbys: Vec<Member> = self
            .membership
            .live()
            .into_iter()
            .filter(|m| Some(m.instance.as_str()) != but && m.advertise.is_some())
            .filter(|m| {
                m.standby
                    .get(topic)
                    .is_some_and(|ps| ps.contains(&partition))
            })
            .collect();
        standbys.sort_by_key(|m| m.instance != self.membership.me());
        standbys.into_iter().next()
    }

    /// The row of `key` in `table` from a standby replica of its partition, when the
    /// partition's owner cannot answer; `None` when no standby can either.
    fn get_from_standby(
        &self,
        (table, key): (&str, &str),
        owner: Option<&str>,
        token: Option<&str>,
    ) -> Option<RowAnswer> {
        let standby = self.standby_of(table, key, owner)?;
        if standby.instance == self.membership.me() {
            return self.get_standby(table, key).ok();
        }
        let (status, body) = self
            .forwarder
            .fetch_blocking(
                self.membership.me(),
                &standby,
                (table, key),
                (Some("standby=true"), token),
            )
            .ok()?;
        (status.as_u16() == 200)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten()
    }

    /// The row of `key` in `table`, from the instance that owns the key's partition (or,
    /// while it cannot answer, from a standby replica of the partition), asked with the
    /// caller's `token`, if any.
    fn get_routed(
        &self,
        table: &str,
        key: &str,
        token: Option<&str>,
    ) -> Result<Option<RowAnswer>, QueryError> {
        let owner = match self.route(table, key)? {
            Route::Here => return self.get(table, key),
            Route::At(owner) => owner,
            Route::Moving => {
                if let Some(answer) = self.get_from_standby((table, key), None, token) {
                    return Ok(Some(answer));
                }
                return Err(QueryError::Unavailable(format!(
                    "the partition of key `{key}` of `{table}` is moving to another instance; ask again"
                )));
            }
            Route::Restoring => {
                return Err(QueryError::Unavailable(format!(
                    "this instance is reading the partition of key `{key}` of `{table}`; ask again"
                )))
            }
            Route::Incomplete(why) => return Err(QueryError::Unavailable(why)),
        };
        let unavailable = |why: String| {
            QueryError::Unavailable(format!(
                "instance {} (owner of key `{key}` of `{table}`) {why}; ask again",
                owner.instance
            ))
        };
        let Ok((status, body)) = self.forwarder.fetch_blocking(
            self.membership.me(),
            &owner,
            (table, key),
            (None, token),
        ) else {
            return match self.get_from_standby((table, key), Some(&owner.instance), token) {
                Some(answer) => Ok(Some(answer)),
                None => Err(unavailable("did not answer".into())),
            };
        };
        match status.as_u16() {
            200 => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| unavailable(format!("answered what is not a row ({e})"))),
            404 => Ok(None),
            401 | 403 => Err(QueryError::Refused(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body)
            ))),
            _ => Err(unavailable(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&body)
            ))),
        }
    }

    /// The source whose partitions `table`'s rows live with; why not, for a table that is not
    /// keyed by a source key (`what` names what then does not apply).
    fn source_of(&self, table: &str, what: &str) -> Result<(usize, &Source), String> {
        let plan = self.internal(table).map_err(|e| e.to_string())?;
        self.topology
            .partitioned_by(plan)
            .map(|(s, _)| (s, &self.topology.sources[s]))
            .ok_or_else(|| {
                format!("table `{table}` is not keyed by a source key: {what} does not apply")
            })
    }

    /// Where the version of the entity of `key` in `table` is kept, and the version `wanted`
    /// parsed as one; why not, for a table or a text this does not apply to.
    fn version_target(
        &self,
        table: &str,
        key: &str,
        wanted: &str,
    ) -> Result<VersionTarget, String> {
        let (source, src) = self.source_of(table, "min_version")?;
        let late = src.late.as_ref().ok_or_else(|| {
            format!(
                "source `{}` has no late.order_by: min_version does not apply",
                src.name
            )
        })?;
        let ty = src.columns[late.order_by].ty;
        let wanted = Value::parse_key_text(wanted, ty)
            .ok_or_else(|| format!("min_version `{wanted}` is not a {}", ty.name()))?;
        let plan = self.internal(table).map_err(|e| e.to_string())?;
        let mut values = parse_key_text(key, &key_types(plan)).map_err(|e| e.to_string())?;
        let partition = self.partition_of(plan, &values).map(|(_, p)| p);
        let part = self
            .topology
            .partitioned_by(plan)
            .map_or(0, |(_, part)| part);
        Ok(VersionTarget {
            source,
            partition,
            key: values.swap_remove(part),
            wanted,
        })
    }

    /// The version (the source's `late.order_by` value) of the last event applied to
    /// `target`'s entity and committed here.
    fn applied_version(&self, target: &VersionTarget) -> Result<Option<Value>, String> {
        let (Some(partition), Some(store)) = (target.partition, self.runtime.state_store()) else {
            return Ok(None);
        };
        let stored = store
            .upsert_entry(target.source, partition, &target.key)
            .map_err(|e| e.to_string())?;
        let entry = stored
            .map(|bytes| Entry::decode_stored(&bytes))
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok(entry.and_then(|e| e.versions.into_vec().into_iter().map(|(_, v)| v).max()))
    }

    /// Where the row of `key` in `table` is served.
    fn route(&self, table: &str, key: &str) -> Result<Route, QueryError> {
        let (plan, values) = self.internal_key(table, key)?;
        if let Some(why) = self.incomplete(plan) {
            return Ok(Route::Incomplete(why));
        }
        let Some((topic, partition)) = self.partition_of(plan, &values) else {
            return Ok(Route::Here);
        };
        if self.runtime.owns(topic, partition) {
            return Ok(if self.runtime.restored(topic, partition) {
                Route::Here
            } else {
                Route::Restoring
            });
        }
        Ok(match self.membership.owner(topic, partition) {
            Some(owner) if owner.instance != self.membership.me() && owner.advertise.is_some() => {
                Route::At(owner)
            }
            _ => Route::Moving,
        })
    }

    /// Up to `limit` rows of `table` on this instance whose key starts with `prefix` and comes
    /// after cursor `after` in `order`, in that order, that `admit` takes (reading on past
    /// those it does not), each with its cursor.
    fn scan(
        &self,
        table: &str,
        (prefix, (after, order), limit): (&str, (Option<&str>, ScanOrder), usize),
        admit: &dyn Fn(&serde_json::Value) -> bool,
    ) -> Result<Vec<(String, serde_json::Value)>, QueryError> {
        let plan = self.internal(table)?;
        if let Some(why) = self.incomplete(plan) {
            return Err(QueryError::Unavailable(why));
        }
        let prefix =
            parse_key_prefix(prefix, &key_types(plan)).map_err(|source| QueryError::BadKey {
                table: table.to_string(),
                source,
            })?;
        let mut after = after
            .map(|c| cursor_key(c).ok_or_else(|| QueryError::BadCursor(c.to_string())))
            .transpose()?;
        let mut admitted = Vec::new();
        loop {
            let read = self
                .tables
                .rows(table, &prefix, (after.as_deref(), order), limit)?;
            let whole = read.len() >= limit;
            after = read.last().map(|r| r.key.clone());
            for r in read {
                let row = serde_json::from_slice(&r.row).unwrap_or(serde_json::Value::Null);
                if admit(&row) {
                    admitted.push((key_hex(&r.key), row));
                }
                if admitted.len() >= limit {
                    return Ok(admitted);
                }
            }
            if !whole {
                return Ok(admitted);
            }
        }
    }

    /// Which rows of `table` `caller` is served: those its row filter holds for (an
    /// unauthenticated caller is served no row of a filtered table); every row of a table
    /// without one. The table is looked up once, not per row.
    fn admits<'a>(
        &'a self,
        table: &str,
        caller: Option<&'a Principal>,
    ) -> impl Fn(&serde_json::Value) -> bool + 'a {
        let filtered = self
            .topology
            .table(table)
            .and_then(|plan| Some((&plan.columns, plan.row_filter.as_ref()?)));
        move |row| filtered.is_none_or(|(columns, filter)| filter.admits(columns, row, caller))
    }

    /// Whether the caller of a request with `headers` may query `table` (see [`access`]);
    /// `Err` is the answer when it may not. An unknown table is left to the query to answer.
    fn may_read(
        &self,
        table: &str,
        headers: &axum::http::HeaderMap,
    ) -> Result<Option<Principal>, access::Refused> {
        let plan = self.topology.table(table);
        let readers = plan.map_or(&[][..], |t| t.readers());
        let filtered = plan.is_some_and(|t| t.row_filter.is_some());
        let what = format!("table `{table}`");
        access::may_read(&self.auth, (&what, readers, filtered), headers)
    }

    /// Whether a scan of `table` gathers the rows of every instance: those of a table
    /// partitioned by a source key live with their partitions, one instance each.
    fn scatters(&self, table: &str) -> bool {
        self.topology.table(table).is_some_and(|plan| {
            plan.postgres().is_none() && self.topology.partitioned_by(plan).is_some()
        })
    }

    /// Why this instance cannot answer for `plan` now, if it cannot: a table whose rows
    /// are not placed by a part of their key (computed from the rows of several partitions,
    /// see [`Distribution::Partial`]) is right and whole only on an instance holding every
    /// partition of the partitioned sources it reads.
    fn incomplete(&self, plan: &miroir_engine::plan::TablePlan) -> Option<String> {
        if self.topology.distribution(plan) == Distribution::Everywhere
            || self.topology.partitioned_by(plan).is_some()
        {
            return None;
        }
        let owned = self.runtime.owned_partitions();
        let mut sources = Vec::new();
        plan.computed().sources(&mut sources);
        sources.iter().find_map(|s| {
            let source = &self.topology.sources[*s];
            let held = owned.get(&source.topic).map_or(0, Vec::len);
            let count = self.runtime.partition_count(&source.topic);
            let complete = source.global || count.is_some_and(|c| held >= c as usize);
            let count = count.map_or_else(|| "?".to_string(), |c| c.to_string());
            (!complete).then(|| {
                format!(
                    "table `{}` is computed from the rows of every partition of `{}` (a GROUP BY \
                     or join on a column that is not its key), and instance {} holds {held} of \
                     its {count}: with several instances, only one holding every partition \
                     answers for such a table (with `--no-changelog`, tables are computed \
                     without stages: see `miroir explain`)",
                    plan.name,
                    source.topic,
                    self.membership.me()
                )
            })
        })
    }

    /// The failure that stopped the runtime or a command processor, if any: the instance
    /// is not healthy.
    fn failure(&self) -> Option<String> {
        self.runtime.failure().or_else(|| {
            self.processors
                .iter()
                .find_map(|(name, p)| Some(format!("command `{name}`: {}", p.failure()?)))
        })
    }

    fn ready(&self) -> bool {
        let status = self.runtime.status();
        status.failure.is_none()
            && status.sink_failure.is_none()
            && status.lag == Some(0)
            && self
                .processors
                .iter()
                .all(|(_, p)| p.ready() && p.failure().is_none())
    }
}

/// The types of `plan`'s key columns, in key order.
fn key_types(plan: &miroir_engine::plan::TablePlan) -> Vec<ColumnType> {
    plan.key.iter().map(|k| plan.columns[*k].ty).collect()
}

/// A running miroir instance embedded in the current process.
pub struct Engine {
    inner: Arc<Inner>,
    source: Option<KafkaSource>,
    /// The reader of the global sources, if the topology has any.
    global: Option<KafkaSource>,
    /// The standby replicas being fed, if the instance keeps any.
    standby: Option<StandbyRunner>,
    processors: Vec<CommandProcessor>,
    client: Option<commands::Client>,
    server: Option<http::Server>,
    /// The probes' and metrics' own server, if any.
    admin: Option<http::Server>,
}

impl Engine {
    /// Starts building an engine.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// The row of `table` with key `key`, in its URL form ([`miroir_engine::value::key_text`]:
    /// composite keys join their parts with `|`, a `|` or `\` inside a part is escaped with a
    /// `\`, and NULL is `\N`). Asked of an instance that does not own the key's partition, it
    /// asks the owner, as the HTTP API does; [`QueryError::Unavailable`] while the partition
    /// has no owner that can answer. The owner is asked without a token: use
    /// [`Engine::get_as`] when the instances verify bearer tokens.
    pub fn get(&self, table: &str, key: &str) -> Result<Option<RowAnswer>, QueryError> {
        self.inner.get_routed(table, key, None)
    }

    /// [`Engine::get`] for the caller whose bearer token is `token`: an owner that verifies
    /// tokens answers the caller's query as it would over HTTP (a table's `readers` and
    /// `row_filter` apply there; rows held here are the embedding app's own to read).
    pub fn get_as(
        &self,
        table: &str,
        key: &str,
        token: &str,
    ) -> Result<Option<RowAnswer>, QueryError> {
        self.inner.get_routed(table, key, Some(token))
    }

    /// Up to `limit` rows of `table` whose key starts with `prefix`, in key order. The prefix is
    /// a key's URL form cut short: whole parts, then the beginning of a text part (a part of
    /// another type is whole); ending with `|`, whole parts only (`u-1|`: user `u-1`'s rows
    /// of a table keyed by user and version).
    pub fn scan(
        &self,
        table: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<serde_json::Value>, QueryError> {
        self.scan_in(table, (prefix, ScanOrder::Ascending), limit)
    }

    /// [`Engine::scan`] in `order`: [`ScanOrder::Descending`] gives a history keyed by
    /// (entity, version) newest first.
    pub fn scan_in(
        &self,
        table: &str,
        (prefix, order): (&str, ScanOrder),
        limit: usize,
    ) -> Result<Vec<serde_json::Value>, QueryError> {
        Ok(self
            .inner
            .scan(table, (prefix, (None, order), limit), &|_| true)?
            .into_iter()
            .map(|(_, row)| row)
            .collect())
    }

    /// Whether every assigned partition is applied up to its high watermark (and the
    /// external database, if any, accepts writes).
    pub fn ready(&self) -> bool {
        self.inner.ready()
    }

    /// Waits until [`Engine::ready`], up to `timeout`; returns whether it became ready.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.ready() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The command client, when built with [`EngineBuilder::command_client`].
    pub fn commands(&self) -> Option<&commands::Client> {
        self.client.as_ref()
    }

    /// Prometheus metrics text.
    pub fn metrics(&self) -> String {
        self.inner.metrics.render()
    }

    /// The validated topology.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// The address the HTTP API listens on, when started with [`EngineBuilder::listen`].
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(|s| s.addr)
    }

    /// The address of the probes and metrics, when started with
    /// [`EngineBuilder::admin_listen`].
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|s| s.addr)
    }

    /// A copy of the runtime's progress: committed epoch and offsets, lag, failures.
    pub fn status(&self) -> StatusSnapshot {
        self.inner.runtime.status()
    }

    /// The failure that stopped the engine or one of its command processors, if any.
    pub fn failure(&self) -> Option<String> {
        self.inner.failure()
    }

    /// Commits, leaves the consumer group and stops (the HTTP server too).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(client) = self.client.take() {
            client.shutdown();
        }
        for p in self.processors.drain(..) {
            p.stop();
        }
        drop(self.standby.take());
        if let Some(source) = self.source.take() {
            source.stop(); // revokes partitions: the workers commit them
        }
        if let Some(global) = self.global.take() {
            global.stop();
        }
        self.inner.membership.leave();
        self.inner.runtime.shutdown();
        for server in [self.server.take(), self.admin.take()]
            .into_iter()
            .flatten()
        {
            server.stop();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}
