//! Topology files: what to read, and which tables to build from it.
//!
//! A topology is a TOML document (see `docs/topology.md`):
//!
//! ```toml
//! name = "user-directory"
//!
//! [sources.users]
//! topic = "user"
//! key = "id"
//! columns = { id = "text", email = "text", version = "bigint", event_type = "text" }
//! late = { order_by = "version", per = "event_type", action = "drop" }
//!
//! [tables.user_contacts]
//! query = "SELECT id, lower(email) AS email FROM users WHERE email IS NOT NULL"
//! store = "internal"
//! ```
//!
//! [`Topology::parse`] checks everything it can before anything runs and reports every problem
//! as a [`Diagnostic`] with the file, line and column, and a hint.

pub mod command;
pub mod diagnostic;
pub mod kafka;
pub mod late;
pub mod stream;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use indexmap::IndexMap;

use serde::Deserialize;
use toml::Spanned;

pub use diagnostic::{Diagnostic, Position, TopologyError};

use crate::plan::repartition::{Repartition, Splitter};
use crate::plan::sql::{plan_query, ExprColumn, SourceSchema};
use crate::plan::{
    Distribution, Plan, PostgresTable, RowFilter, SourceShape, TablePlan, TableStore,
};
use crate::value::{Column, ColumnType};
use command::CommandSpec;
use late::LatePolicy;
use stream::StreamPolicy;

/// A validated topology: its sources and planned tables.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The topology's name; also the Kafka consumer group id.
    pub name: String,
    /// Sources, in file order.
    pub sources: Vec<Source>,
    /// Tables, in file order.
    pub tables: Vec<TablePlan>,
    /// The stage boundaries of the tables that need the rows of several partitions, each read
    /// back by a source of its own (after the declared ones).
    pub repartitions: Vec<Repartition>,
    /// Commands this topology processes (the master side), in file order.
    pub commands: Vec<CommandSpec>,
    /// librdkafka properties of the `[kafka]` section, in file order (see [`kafka`]).
    pub kafka: Vec<(String, String)>,
    /// What works but probably not as meant (`miroir validate` prints it, a start logs it).
    pub warnings: Vec<Diagnostic>,
}

/// An entity stream: a Kafka topic of full snapshots keyed by id.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    /// Source name (as used in SQL).
    pub name: String,
    /// Kafka topic.
    pub topic: String,
    /// Declared columns, in declaration order.
    pub columns: Vec<Column>,
    /// Position of the key column: the entity's key, which the topic's records are keyed by.
    pub key: usize,
    /// The columns that identify a row: the key, or a stream source's composite key (the key
    /// first).
    pub identity: Vec<usize>,
    /// For a stream source (`kind = "stream"`), whose every event is a row: how long rows are
    /// kept. `None` for an upsert source.
    pub stream: Option<StreamPolicy>,
    /// Position of the column whose value tells a record's partition: the key, except in a
    /// repartition topic (see [`crate::plan::repartition`]).
    pub partition_column: usize,
    /// Late-event policy; without one, events are ordered by their offset.
    pub late: Option<LatePolicy>,
    /// How long the state of a deleted key (the order values that keep a late event from
    /// bringing it back) is kept after its delete (`late.tombstone_retention`, default 7
    /// days).
    pub tombstone_retention: Duration,
    /// How its records' payloads are encoded.
    pub format: SourceFormat,
    /// Whether every instance reads every partition of the topic (`global = true`, Kafka
    /// Streams' GlobalKTable): joins with the source need no partition of the other side to
    /// match, and its state is rebuilt from the topic itself, with no changelog.
    pub global: bool,
}

/// How a source's record payloads are encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceFormat {
    /// A JSON object per record (the format of declared sources).
    #[default]
    Json,
    /// The row's values in the state directory's binary encoding (repartition topics).
    Rows,
}

impl Source {
    /// 7 days: a late event older than a delete arrives within days (a producer retried, a
    /// backlog replayed), not weeks; past it, the deleted key's state goes.
    pub const DEFAULT_TOMBSTONE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

    /// What the plans' distribution and keys depend on about the source.
    pub fn shape(&self) -> SourceShape {
        SourceShape {
            key: self.identity.clone(),
            partition: self.partition_column,
            arity: self.columns.len(),
            global: self.global,
        }
    }

    /// The key column's name.
    pub fn key_name(&self) -> &str {
        &self.columns[self.key].name
    }

    /// What the state kept for the source depends on: its topic, key, columns (names and
    /// types, in order) and late policy. A state directory written with another layout is
    /// not read: the source's state is rebuilt from its topic.
    pub fn layout(&self) -> String {
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("{} {}", c.name, c.ty.name()))
            .collect();
        let late = self
            .late
            .as_ref()
            .map_or_else(|| "by offset".to_string(), |l| l.describe(&self.columns));
        let key: Vec<&str> = self
            .identity
            .iter()
            .map(|k| self.columns[*k].name.as_str())
            .collect();
        let kind = match &self.stream {
            None => String::new(),
            Some(stream) => {
                let age = stream.retain.map_or(String::new(), |r| {
                    format!(
                        " retained {}s by {}",
                        r.age.as_secs(),
                        self.columns[r.by].name
                    )
                });
                let rows = stream
                    .rows_per_entity
                    .map_or(String::new(), |n| format!(" retained {n} rows per entity"));
                format!("; stream{age}{rows}")
            }
        };
        format!(
            "topic {}; key {}; columns {}; late {late}{kind}",
            self.topic,
            key.join(", "),
            columns.join(", ")
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    name: Spanned<String>,
    #[serde(default)]
    sources: IndexMap<String, Spanned<RawSource>>,
    #[serde(default)]
    tables: IndexMap<String, Spanned<RawTable>>,
    #[serde(default)]
    commands: IndexMap<String, Spanned<command::RawCommand>>,
    #[serde(default)]
    kafka: Option<Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    topic: Spanned<String>,
    #[serde(default)]
    format: Option<Spanned<String>>,
    #[serde(default)]
    kind: Option<Spanned<String>>,
    key: Spanned<stream::RawKey>,
    columns: Spanned<IndexMap<String, Spanned<String>>>,
    #[serde(default)]
    late: Option<Spanned<late::RawLate>>,
    #[serde(default)]
    global: bool,
    #[serde(default)]
    retain: Option<Spanned<stream::RawRetain>>,
    #[serde(default)]
    retain_by: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    query: Spanned<String>,
    #[serde(default)]
    store: Option<Spanned<String>>,
    #[serde(default)]
    sink: Option<Spanned<RawSink>>,
    /// Roles whose bearer tokens may query an internal table over HTTP.
    #[serde(default)]
    readers: Option<Spanned<Vec<String>>>,
    /// A rule each row of an internal table must meet to be served to a caller.
    #[serde(default)]
    row_filter: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    postgres: Spanned<RawPostgres>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    table: Spanned<String>,
    #[serde(default)]
    url: Option<Spanned<String>>,
    #[serde(default)]
    readers: Vec<Spanned<String>>,
    #[serde(default)]
    indexes: Vec<Spanned<Vec<Spanned<String>>>>,
}

struct Reporter<'a> {
    file: &'a str,
    text: &'a str,
    diagnostics: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Reporter<'_> {
    fn at(&mut self, offset: usize, message: impl Into<String>, hint: Option<String>) {
        self.push(Position::of_offset(self.text, offset), message, hint);
    }

    /// Records something that works but probably not as meant.
    fn warn_at(&mut self, offset: usize, message: impl Into<String>, hint: Option<String>) {
        self.warnings.push(Diagnostic {
            file: self.file.to_string(),
            at: Position::of_offset(self.text, offset),
            message: message.into(),
            hint,
        });
    }

    fn push(&mut self, at: Position, message: impl Into<String>, hint: Option<String>) {
        self.diagnostics.push(Diagnostic {
            file: self.file.to_string(),
            at,
            message: message.into(),
            hint,
        });
    }
}

impl Topology {
    /// Reads and validates the topology file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Topology, TopologyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            diagnostics: vec![Diagnostic {
                file: file.clone(),
                at: Position { line: 1, col: 1 },
                message: format!("cannot read the topology file: {e}"),
                hint: None,
            }],
        })?;
        Topology::parse(&file, &text)
    }

    /// Parses and validates a topology; `file` names it in diagnostics.
    pub fn parse(file: &str, text: &str) -> Result<Topology, TopologyError> {
        let mut r = Reporter {
            file,
            text,
            diagnostics: Vec::new(),
            warnings: Vec::new(),
        };
        let raw: RawTopology = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let offset = e.span().map(|s| s.start).unwrap_or(0);
                r.at(
                    offset,
                    e.message().to_string(),
                    Some("see docs/topology.md for the file format".into()),
                );
                return Err(TopologyError {
                    diagnostics: r.diagnostics,
                });
            }
        };
        let name = raw.name.get_ref().trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            r.at(
                raw.name.span().start,
                format!("bad topology name `{name}`"),
                Some("use letters, digits, '-', '_' or '.'".into()),
            );
        }
        let kafka = raw
            .kafka
            .as_ref()
            .map(|section| kafka::properties(&mut r, section))
            .unwrap_or_default();
        let mut sources = Vec::new();
        for (source_name, raw_source) in &raw.sources {
            if let Some(source) = validate_source(&mut r, source_name, raw_source) {
                sources.push(source);
            }
        }
        same_topic_agree(&mut r, &raw, &sources);
        // Tables are planned only against a complete set of sources: a broken source would
        // otherwise show up again as an unknown source in every query.
        let sources_ok = sources.len() == raw.sources.len();
        if raw.sources.is_empty() {
            r.at(
                0,
                "the topology declares no source",
                Some("add a [sources.NAME] section".into()),
            );
        }
        let schemas: Vec<SourceSchema<'_>> = sources
            .iter()
            .map(|s| SourceSchema {
                name: &s.name,
                columns: &s.columns,
                key: &s.identity,
            })
            .collect();
        let mut tables = Vec::new();
        let mut table_names = BTreeMap::new();
        let mut query_at = BTreeMap::new();
        for (table_name, raw_table) in &raw.tables {
            check_name(&mut r, table_name, raw_table.span().start, "table");
            table_names.insert(table_name.clone(), ());
            let readers = raw_table.get_ref().readers.as_ref();
            let filter = raw_table.get_ref().row_filter.as_ref();
            if let (Some(filter), Some(_)) = (filter, &raw_table.get_ref().sink) {
                r.at(
                    filter.span().start,
                    "an external table is read in PostgreSQL: row filters are for internal tables",
                    Some("use PostgreSQL's row level security on the table".into()),
                );
                continue;
            }
            if let (Some(readers), Some(_)) = (readers, &raw_table.get_ref().sink) {
                r.at(
                    readers.span().start,
                    "an external table's readers are PostgreSQL roles, given in its sink",
                    Some("sink = { postgres = { table = \"...\", readers = [\"role\"] } }".into()),
                );
                continue;
            }
            let internal = || TableStore::Internal {
                readers: readers.map(|r| r.get_ref().clone()).unwrap_or_default(),
            };
            let store = match (&raw_table.get_ref().store, &raw_table.get_ref().sink) {
                (Some(store), Some(_)) => {
                    r.at(
                        store.span().start,
                        "a table has either `store` or `sink`, not both",
                        Some("drop `store` to keep the table in PostgreSQL only".into()),
                    );
                    continue;
                }
                (None, None) => internal(),
                (Some(store), None) if store.get_ref() == "internal" => internal(),
                (Some(store), None) => {
                    r.at(
                        store.span().start,
                        format!("unknown store `{}`", store.get_ref()),
                        Some(
                            "store = \"internal\" keeps the table in RocksDB, queryable over HTTP; \
                             sink = { postgres = { table = \"schema.table\" } } writes it to PostgreSQL"
                                .into(),
                        ),
                    );
                    continue;
                }
                (None, Some(sink)) => {
                    match validate_postgres(&mut r, sink.get_ref().postgres.get_ref()) {
                        Some(pg) => TableStore::Postgres(pg),
                        None => continue,
                    }
                }
            };
            let query = &raw_table.get_ref().query;
            if !sources_ok {
                continue;
            }
            match plan_query(query.get_ref(), &schemas) {
                Ok(planned)
                    if !indexes_known(&mut r, &store, &planned.columns, sink_at(raw_table)) => {}
                Ok(planned) => {
                    let row_filter = match filter {
                        Some(sql) => match row_filter(&mut r, sql, table_name, &planned.columns) {
                            Some(f) => Some(f),
                            None => continue,
                        },
                        None => None,
                    };
                    query_at.insert(table_name.clone(), query.span().start);
                    tables.push(TablePlan {
                        name: table_name.clone(),
                        sql: query.get_ref().clone(),
                        plan: planned.plan,
                        columns: planned.columns,
                        key: planned.key,
                        store,
                        split: None,
                        row_filter,
                    })
                }
                Err(e) => {
                    let at = position_in_string(text, query.span().start, e.line, e.col);
                    r.push(at, format!("table `{table_name}`: {}", e.message), e.hint);
                }
            }
        }
        if raw.tables.is_empty() {
            r.at(
                0,
                "the topology declares no table",
                Some("add a [tables.NAME] section with a query".into()),
            );
        }
        let mut commands = Vec::new();
        if sources_ok {
            for (command_name, raw_command) in &raw.commands {
                if let Some(spec) =
                    command::validate_command(&mut r, command_name, raw_command, &sources)
                {
                    commands.push(spec);
                }
            }
        }
        let mut repartitions = Vec::new();
        if r.diagnostics.is_empty() {
            let unsplit;
            (repartitions, unsplit) = split_tables(&name, &mut sources, &mut tables);
            for table in tables.iter().filter(|t| unsplit.contains(&t.name)) {
                let global = table.plan.global_rows_kept(&|s| sources[s].shape());
                let (message, hint) = unsplit_error(table, global.map(|s| &sources[s].name));
                r.at(query_at[&table.name], message, Some(hint));
            }
        }
        if r.diagnostics.is_empty() {
            Ok(Topology {
                name,
                sources,
                tables,
                repartitions,
                commands,
                kafka,
                warnings: r.warnings,
            })
        } else {
            r.diagnostics.sort_by_key(|d| (d.at.line, d.at.col));
            Err(TopologyError {
                diagnostics: r.diagnostics,
            })
        }
    }

    /// This topology computed without repartitions: every table's plan as written, over the
    /// declared sources only (right with one instance; for instances without changelogs,
    /// which repartition records are written with).
    pub fn unsplit(&self) -> Topology {
        let declared = self.sources.len() - self.repartitions.len();
        let mut topology = self.clone();
        topology.sources.truncate(declared);
        topology.repartitions.clear();
        for table in &mut topology.tables {
            table.split = None;
        }
        topology
    }

    /// Whether any table is kept outside the instance (in PostgreSQL).
    pub fn has_external_tables(&self) -> bool {
        self.tables.iter().any(|t| t.postgres().is_some())
    }

    /// The topics of the sources, in source order.
    pub fn topics(&self) -> Vec<&str> {
        self.sources.iter().map(|s| s.topic.as_str()).collect()
    }

    /// The topics of the global sources.
    pub fn global_topics(&self) -> Vec<&str> {
        self.sources
            .iter()
            .filter(|s| s.global)
            .map(|s| s.topic.as_str())
            .collect()
    }

    /// The topics of the sources `table` is computed from, through its stages: the
    /// repartition topics it reads and the sources that feed them, once each.
    pub fn table_topics(&self, table: &TablePlan) -> Vec<&str> {
        let mut sources = Vec::new();
        table.computed().sources(&mut sources);
        let mut read = 0;
        while read < sources.len() {
            let s = sources[read];
            if let Some(r) = self.repartitions.iter().find(|r| r.source == s) {
                r.input.sources(&mut sources);
            }
            read += 1;
        }
        sources.sort_unstable();
        sources.dedup();
        sources
            .into_iter()
            .map(|s| self.sources[s].topic.as_str())
            .collect()
    }

    /// The sources reading `source`'s topic, `source`'s own position among them, in topology
    /// order: an upsert and a stream source of one topic. The records of a topic's partition
    /// are handed to its first reader's task, which applies them to every reader's task of the
    /// partition in turn (one batch, so their offsets always agree).
    pub fn readers_of(&self, source: usize) -> impl Iterator<Item = usize> + '_ {
        let topic = &self.sources[source].topic;
        let global = self.sources[source].global;
        (0..self.sources.len())
            .filter(move |s| self.sources[*s].topic == *topic && self.sources[*s].global == global)
    }

    /// The source named `name`.
    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// The table named `name`.
    pub fn table(&self, name: &str) -> Option<&TablePlan> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Where `table`'s rows live across instances, in words (for `explain`).
    fn placement(&self, table: &TablePlan) -> String {
        match (self.distribution(table), self.partitioned_by(table)) {
            (Distribution::Everywhere, _) => "on every instance (global sources only)".into(),
            (_, Some((source, part))) => format!(
                "each row with the partition of `{}` in topic {}",
                table.columns[table.key[part]].name, self.sources[source].topic
            ),
            (Distribution::Partitioned { .. } | Distribution::Partial, _) => {
                "partial: computed from the rows of every partition without stages (`--no-changelog`), so with several instances only one holding every partition answers".into()
            }
        }
    }

    /// What the plans' distribution and keys depend on about source `source`.
    pub fn source_shape(&self, source: usize) -> SourceShape {
        self.sources[source].shape()
    }

    /// Where `table`'s rows live across instances (see [`Distribution`]).
    pub fn distribution(&self, table: &TablePlan) -> Distribution {
        table.distribution(&|s| self.source_shape(s))
    }

    /// The source whose partitions `table`'s rows follow, and the part of its key that tells
    /// the partition (see [`TablePlan::partitioned_by`]).
    pub fn partitioned_by(&self, table: &TablePlan) -> Option<(usize, usize)> {
        table.partitioned_by(&|s| self.source_shape(s))
    }

    /// The operator graph, as `miroir explain` prints it.
    pub fn explain(&self) -> String {
        let reads = |s: usize| {
            let source = &self.sources[s];
            let key: Vec<&str> = source
                .identity
                .iter()
                .map(|k| source.columns[*k].name.as_str())
                .collect();
            match &source.stream {
                None => "upsert by key".to_string(),
                Some(_) => format!("stream: every event a row, by {}", key.join(", ")),
            }
        };
        let mut out = format!("topology {}\n", self.name);
        for s in &self.sources {
            out.push_str(&format!(
                "source {} <- topic {} ({}, key {}, late: {}{})\n  exchange by partition (partition % workers)\n",
                s.name,
                s.topic,
                match s.format {
                    SourceFormat::Json => "json",
                    SourceFormat::Rows => "binary rows of a stage",
                },
                s.key_name(),
                s.late.as_ref().map(|l| l.describe(&s.columns)).unwrap_or_else(|| "ordered by offset".into()),
                if s.global { ", global: every partition on every instance" } else { "" }
            ));
        }
        for t in &self.tables {
            let key: Vec<&str> = t.key.iter().map(|k| t.columns[*k].name.as_str()).collect();
            let sink = match &t.store {
                TableStore::Internal { readers } if readers.is_empty() => {
                    "internal RocksDB".to_string()
                }
                TableStore::Internal { readers } => {
                    format!("internal RocksDB, read by {}", readers.join(", "))
                }
                TableStore::Postgres(pg) => format!("PostgreSQL {}", pg.qualified()),
            };
            out.push_str(&format!(
                "table {} (key {}) -> sink {sink}\n",
                t.name,
                key.join(", ")
            ));
            out.push_str(&format!("  across instances: {}\n", self.placement(t)));
            out.push_str("  exchange by table key\n");
            t.computed().explain(&mut out, 1, &reads);
        }
        for r in &self.repartitions {
            let key: Vec<String> = r.key.iter().map(|k| format!("c{k}")).collect();
            out.push_str(&format!(
                "repartition {} -> topic {} (one record per {}, in the partition of c{}; as many partitions as {})\n",
                r.name,
                self.sources[r.source].topic,
                key.join(", "),
                r.by,
                self.sources[r.partitions_like].topic
            ));
            r.input.explain(&mut out, 1, &reads);
        }
        for c in &self.commands {
            let entity = &self.sources[c.entity];
            out.push_str(&format!(
                "command {} ({} v{}) <- topic {} (key {}) -> entity {} on topic {}, reply to the sender, dead letters to {}\n",
                c.name, c.operation, c.schema_version, c.topic, c.payload.key_name(), entity.name, entity.topic, command::dlq_topic(&c.topic)
            ));
            match c.kind {
                command::CommandKind::Create => out.push_str("  creates the entity\n"),
                command::CommandKind::Delete => out.push_str("  deletes the entity\n"),
                command::CommandKind::Update => {}
            }
            if let Some(a) = &c.authorize {
                out.push_str(&format!("  authorize {}\n", a.sql));
            }
            for v in &c.validate {
                out.push_str(&format!("  validate {} else {}\n", v.sql, v.code));
            }
            let set: Vec<&str> = c
                .set
                .iter()
                .map(|a| entity.columns[a.column].name.as_str())
                .collect();
            if c.kind != command::CommandKind::Delete {
                out.push_str(&format!(
                    "  set {} and stamp {}\n",
                    set.join(", "),
                    entity.columns[c.stamp.version].name
                ));
            }
            if let Some(check) = &c.check {
                out.push_str(&format!(
                    "  check {} (timeout {:?}), retried {} times in all, then parked\n",
                    check.url, check.timeout, c.retry.attempts
                ));
            }
        }
        out
    }

    /// The command section named `name`.
    pub fn command(&self, name: &str) -> Option<&CommandSpec> {
        self.commands.iter().find(|c| c.name == name)
    }
}

/// PostgreSQL's limit on identifier length (longer names are truncated silently).
const PG_MAX_IDENTIFIER: usize = 63;

/// Checks a PostgreSQL sink's settings. Names are quoted in every statement, so this only
/// rejects what PostgreSQL would truncate or what cannot be a name at all.
fn validate_postgres(r: &mut Reporter<'_>, raw: &RawPostgres) -> Option<PostgresTable> {
    let before = r.diagnostics.len();
    let at = raw.table.span().start;
    let (schema, table) = match raw.table.get_ref().split_once('.') {
        Some((schema, table)) => (schema.to_string(), table.to_string()),
        None => ("public".to_string(), raw.table.get_ref().clone()),
    };
    for (what, name) in [("schema", &schema), ("table", &table)] {
        pg_identifier(r, what, name, at);
    }
    if table.contains('.') {
        r.at(
            at,
            format!("bad table `{}`", raw.table.get_ref()),
            Some("write `schema.table` or `table` (in schema public)".into()),
        );
    }
    let mut readers = Vec::new();
    for reader in &raw.readers {
        pg_identifier(r, "reader role", reader.get_ref(), reader.span().start);
        readers.push(reader.get_ref().clone());
    }
    let mut indexes = Vec::new();
    for index in &raw.indexes {
        if index.get_ref().is_empty() {
            r.at(
                index.span().start,
                "an index needs at least one column",
                Some("indexes = [[\"email\"], [\"department\", \"name\"]]".into()),
            );
        }
        indexes.push(
            index
                .get_ref()
                .iter()
                .map(|c| c.get_ref().clone())
                .collect(),
        );
    }
    if let Some(url) = &raw.url {
        if !url.get_ref().starts_with("postgres://") && !url.get_ref().starts_with("postgresql://")
        {
            r.at(
                url.span().start,
                "the connection url must start with postgres:// or postgresql://",
                Some("leave `url` out to use DATABASE_URL".into()),
            );
        }
    }
    (r.diagnostics.len() == before).then(|| PostgresTable {
        schema,
        table,
        url: raw.url.as_ref().map(|u| u.get_ref().clone()),
        readers,
        indexes,
    })
}

fn pg_identifier(r: &mut Reporter<'_>, what: &str, name: &str, at: usize) {
    if name.is_empty() || name.len() > PG_MAX_IDENTIFIER - 16 || name.contains('\0') {
        r.at(
            at,
            format!("bad {what} name `{name}`"),
            Some(format!(
                "use 1 to {} bytes (miroir adds suffixes of up to 16 to PostgreSQL's limit of {PG_MAX_IDENTIFIER})",
                PG_MAX_IDENTIFIER - 16
            )),
        );
    }
}

fn sink_at(raw: &Spanned<RawTable>) -> usize {
    raw.get_ref()
        .sink
        .as_ref()
        .map(|s| s.span().start)
        .unwrap_or(raw.span().start)
}

/// Reports declared index columns the table does not have; true when all are known.
fn indexes_known(r: &mut Reporter<'_>, store: &TableStore, columns: &[Column], at: usize) -> bool {
    let TableStore::Postgres(pg) = store else {
        return true;
    };
    let mut ok = true;
    for column in pg.indexes.iter().flatten() {
        if !columns.iter().any(|c| &c.name == column) {
            let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
            r.at(
                at,
                format!(
                    "index column `{column}` of {} is not a column of the table",
                    pg.qualified()
                ),
                Some(format!("the table's columns: {}", names.join(", "))),
            );
            ok = false;
        }
    }
    ok
}

fn check_name(r: &mut Reporter<'_>, name: &str, at: usize, what: &str) -> bool {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        r.at(
            at,
            format!("bad {what} name `{name}`"),
            Some("use lower-case letters, digits and '_' (it is used in SQL)".into()),
        );
    }
    ok
}

fn validate_source(r: &mut Reporter<'_>, name: &str, raw: &Spanned<RawSource>) -> Option<Source> {
    let before = r.diagnostics.len();
    check_name(r, name, raw.span().start, "source");
    let s = raw.get_ref();
    if let Some(format) = &s.format {
        if format.get_ref() != "json" {
            r.at(
                format.span().start,
                format!("unknown format `{}`", format.get_ref()),
                Some("format = \"json\" (the default)".into()),
            );
        }
    }
    if s.topic.get_ref().trim().is_empty() {
        r.at(s.topic.span().start, "empty topic", None);
    }
    let columns = parse_columns(r, s.columns.get_ref(), "column");
    if columns.is_empty() && s.columns.get_ref().is_empty() {
        r.at(
            s.columns.span().start,
            format!("source `{name}` declares no column"),
            None,
        );
    }
    let kind = stream::RawKind {
        kind: s.kind.as_ref(),
        key: &s.key,
        retain: s.retain.as_ref(),
        retain_by: s.retain_by.as_ref(),
        late_at: s.late.as_ref().map(|l| l.span().start),
        global: s.global,
    };
    let identity = stream::validate(r, &kind, &columns);
    let columns_ok = r.diagnostics.len() == before;
    let late = s
        .late
        .as_ref()
        .filter(|_| columns_ok)
        .and_then(|l| late::validate(r, l, &columns));
    let tombstone_retention = s
        .late
        .as_ref()
        .and_then(|l| l.get_ref().tombstone_retention.as_ref())
        .map_or(
            Source::DEFAULT_TOMBSTONE_RETENTION,
            |d| match humantime::parse_duration(d.get_ref()) {
                Ok(v) if !v.is_zero() => v,
                Ok(_) | Err(_) => {
                    r.at(
                        d.span().start,
                        format!("bad late.tombstone_retention `{}`", d.get_ref()),
                        Some("a duration above zero, like \"7d\", \"12h\" or \"30m\"".into()),
                    );
                    Source::DEFAULT_TOMBSTONE_RETENTION
                }
            },
        );
    if r.diagnostics.len() > before {
        return None;
    }
    let (identity, stream) = identity?;
    Some(Source {
        name: name.to_string(),
        topic: s.topic.get_ref().clone(),
        columns,
        key: identity[0],
        partition_column: identity[0],
        identity,
        stream,
        late,
        tombstone_retention,
        global: s.global,
        format: SourceFormat::Json,
    })
}

/// Reports sources of one topic that disagree on `global`: one consumer reads a topic, for
/// every source reading it.
fn same_topic_agree(r: &mut Reporter<'_>, raw: &RawTopology, sources: &[Source]) {
    for (i, s) in sources.iter().enumerate() {
        let other = sources[..i].iter().find(|o| o.topic == s.topic);
        if let Some(other) = other.filter(|o| o.global != s.global) {
            r.at(
                raw.sources[&s.name].span().start,
                format!(
                    "sources `{}` and `{}` read topic `{}`, one of them global",
                    other.name, s.name, s.topic
                ),
                Some("sources of one topic are all global or none".into()),
            );
        }
    }
}

/// Splits the plans of `tables` that need the rows of several partitions with repartitions
/// (see [`crate::plan::repartition`]), adding the sources that read them back to `sources`.
/// Also returns the tables that cannot be split (their rows would need every partition).
fn split_tables(
    name: &str,
    sources: &mut Vec<Source>,
    tables: &mut [TablePlan],
) -> (Vec<Repartition>, Vec<String>) {
    let mut repartitions = Vec::new();
    let mut unsplit = Vec::new();
    // Split as pruned: the stages carry the columns read above them only.
    let pruned = crate::plan::pruned(tables.iter().map(|t| &t.plan), &|s| sources[s].shape());
    for (table, pruned) in tables.iter_mut().zip(pruned) {
        // Joins on a foreign key go back to the partitions of the key of the side holding it
        // only when the table needs it: a GROUP BY above one does not.
        let attempt = |keyed_back: bool| {
            let mut splitter = Splitter::new((name, &table.name), sources);
            if keyed_back {
                splitter = splitter.keyed_back();
            }
            let plan = splitter.split(&pruned);
            let routable = matches!(splitter.distribution(&plan),
                Distribution::Partitioned { column, .. } if table.key.contains(&column));
            (plan, routable, std::mem::take(&mut splitter.made))
        };
        let (mut plan, mut routable, mut made) = attempt(false);
        if !routable {
            (plan, routable, made) = attempt(true);
        }
        if routable && !made.is_empty() {
            table.split = Some(share_stages(plan, made, sources, &mut repartitions));
        }
        let everywhere =
            table.plan.distribution(&|s| sources[s].shape()) == Distribution::Everywhere;
        if !routable && !everywhere {
            unsplit.push(table.name.clone());
        }
    }
    (repartitions, unsplit)
}

/// Plans `table`'s row filter `sql` over its `columns` and the caller (see [`RowFilter`]).
fn row_filter(
    r: &mut Reporter<'_>,
    sql: &Spanned<String>,
    table: &str,
    columns: &[Column],
) -> Option<RowFilter> {
    let mut scope: Vec<ExprColumn> = columns
        .iter()
        .map(|c| ExprColumn {
            qualifier: table.into(),
            name: c.name.clone(),
            ty: c.ty,
        })
        .collect();
    scope.extend(command::principal_scope());
    let expr = command::expression(r, sql, &scope, Some(ColumnType::Boolean))?;
    Some(RowFilter {
        sql: sql.get_ref().clone(),
        expr,
    })
}

/// What is wrong with `table`, which cannot be split into stages, and how to fix it; `global`
/// names the global source whose every row a LEFT JOIN keeps, when that is why.
fn unsplit_error(table: &TablePlan, global: Option<&String>) -> (String, String) {
    let name = &table.name;
    match global {
        Some(global) => (
            format!(
                "table `{name}`: this LEFT JOIN keeps every row of the global source `{global}`, \
                 so each of its rows needs the rows of every partition of the other side: \
                 several instances cannot compute it"
            ),
            format!(
                "declare `{global}` without `global = true` (the join is then split into \
                 stages), or put `{global}` on the right of the LEFT JOIN"
            ),
        ),
        None => (
            format!(
                "table `{name}` needs the rows of every partition of its sources and cannot be \
                 split into stages, so several instances cannot compute it"
            ),
            "keep the source's key, or the column the rows are grouped or joined by, among \
             the table's key columns"
                .into(),
        ),
    }
}

/// Adds the stages `made` for one table's `plan` (read back from `sources.len()` on, in
/// order), sharing those an earlier table has (the same rows, keyed and placed alike: one
/// topic written once); returns the plan reading the shared ones.
fn share_stages(
    mut plan: Plan,
    made: Vec<(Repartition, Source)>,
    sources: &mut Vec<Source>,
    repartitions: &mut Vec<Repartition>,
) -> Plan {
    let first = sources.len();
    let mut moved: HashMap<usize, (usize, String)> = HashMap::new();
    let follow = |s: &mut usize, moved: &HashMap<usize, (usize, String)>| {
        if let Some((to, _)) = moved.get(s) {
            *s = *to;
        }
    };
    for (i, (mut repartition, reader)) in made.into_iter().enumerate() {
        repartition.input.move_sources(&moved);
        follow(&mut repartition.from.0, &moved);
        follow(&mut repartition.partitions_like, &moved);
        let same = repartitions.iter().find(|r| {
            (&r.input, &r.key, r.by, r.from, r.partitions_like)
                == (
                    &repartition.input,
                    &repartition.key,
                    repartition.by,
                    repartition.from,
                    repartition.partitions_like,
                )
        });
        let to = match same {
            Some(shared) => (shared.source, shared.name.clone()),
            None => {
                repartition.source = sources.len();
                let to = (repartition.source, repartition.name.clone());
                repartitions.push(repartition);
                sources.push(reader);
                to
            }
        };
        moved.insert(first + i, to);
    }
    plan.move_sources(&moved);
    plan
}

/// Declared columns (`name = "type"`); an unknown type is reported as `what` `name`.
fn parse_columns(
    r: &mut Reporter<'_>,
    declared: &IndexMap<String, Spanned<String>>,
    what: &str,
) -> Vec<Column> {
    let mut columns = Vec::new();
    for (col, ty) in declared {
        match ColumnType::parse(ty.get_ref()) {
            Some(t) => columns.push(Column {
                name: col.to_lowercase(),
                ty: t,
            }),
            None => r.at(
                ty.span().start,
                format!("{what} `{col}`: unknown type `{}`", ty.get_ref()),
                Some("types: text, bigint, double precision, boolean, timestamptz".into()),
            ),
        }
    }
    columns
}

/// Maps a (line, col) inside a TOML string value that starts at byte `start` to a file position.
fn position_in_string(text: &str, start: usize, line: usize, col: usize) -> Position {
    let rest = &text[start.min(text.len())..];
    let mut content = start;
    if rest.starts_with("\"\"\"") || rest.starts_with("'''") {
        content += 3;
        if text[content..].starts_with('\n') {
            content += 1;
        } else if text[content..].starts_with("\r\n") {
            content += 2;
        }
    } else {
        content += 1;
    }
    let base = Position::of_offset(text, content);
    match (line, col) {
        (0, _) => base,
        (1, c) => Position {
            line: base.line,
            col: base.col + c.saturating_sub(1),
        },
        (l, c) => Position {
            line: base.line + l - 1,
            col: c.max(1),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;

    const GOOD: &str = r#"
name = "t"
[sources.users]
topic = "user"
key = "id"
columns = { id = "text", email = "text", dept = "text", version = "bigint", event_type = "text" }
late = { order_by = "version", per = "event_type" }

[sources.departments]
topic = "department"
key = "id"
columns = { id = "text", name = "text" }

[tables.contacts]
query = "SELECT id, lower(email) AS email FROM users WHERE email IS NOT NULL"

[tables.per_dept]
query = """
SELECT d.name AS department, count(*) AS users
FROM users u JOIN departments d ON u.dept = d.id
GROUP BY d.name"""
"#;

    #[test]
    fn plans_a_good_topology() {
        let t = Topology::parse("good.toml", GOOD).expect("valid");
        assert_eq!(
            t.sources.len() - t.repartitions.len(),
            2,
            "two declared sources, then the repartitions' readers"
        );
        let contacts = t.table("contacts").unwrap();
        assert_eq!(contacts.key, vec![0]);
        let per = t.table("per_dept").unwrap();
        assert_eq!(
            per.columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["department", "users"]
        );
        assert_eq!(per.columns[1].ty, ColumnType::Bigint);
        assert_eq!(per.key, vec![0]);
        assert!(t.explain().contains("Join Inner"));
    }

    #[test]
    fn only_keys_carried_from_a_source_key_never_hold_null() {
        let text = include_str!("../../../topologies/user-directory.toml");
        let t = Topology::parse("user-directory.toml", text).expect("valid");
        let sources = |s: usize| t.source_shape(s);
        let never_null = |name: &str| t.table(name).unwrap().key_never_null(&sources);
        // The left side of a LEFT JOIN, keyed by the users' key.
        assert!(never_null("user_directory"));
        // A GROUP BY of a joined column groups NULLs together.
        assert!(!never_null("users_per_department"));
        let good = Topology::parse("good.toml", GOOD).expect("valid");
        let sources = |s: usize| good.source_shape(s);
        assert!(good.table("contacts").unwrap().key_never_null(&sources));
        assert!(!good.table("per_dept").unwrap().key_never_null(&sources));
    }

    /// The diagnostics of an invalid topology `text`, as printed.
    pub(crate) fn errors(text: &str) -> Vec<String> {
        Topology::parse("bad.toml", text)
            .expect_err("invalid")
            .diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn reports_sql_errors_at_their_file_position() {
        let bad = GOOD.replace("lower(email) AS email", "lower(emial) AS email");
        let e = errors(&bad);
        assert_eq!(e.len(), 1, "{e:?}");
        // Line 15 of GOOD holds the query; `emial` starts at column 27 of the file.
        assert!(
            e[0].starts_with("bad.toml:15:27: table `contacts`: unknown column `emial`"),
            "{e:?}"
        );
        assert!(e[0].contains("hint: columns in scope"), "{e:?}");
    }

    #[test]
    fn reports_errors_in_multiline_queries() {
        let bad = GOOD.replace("GROUP BY d.name", "GROUP BY d.nome");
        let e = errors(&bad);
        assert!(e[0].starts_with("bad.toml:21:10: "), "{e:?}");
    }

    #[test]
    fn reports_every_structural_error() {
        let bad = GOOD
            .replace("version = \"bigint\"", "version = \"bignum\"")
            .replace(
                "key = \"id\"\ncolumns = { id = \"text\", name",
                "key = \"ident\"\ncolumns = { id = \"text\", name",
            );
        let e = errors(&bad);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("unknown type `bignum`"), "{e:?}");
        assert!(
            e[1].contains("key `ident` is not a declared column"),
            "{e:?}"
        );
    }

    #[test]
    fn reads_and_checks_late_max_operations() {
        let late = |spec: &str| {
            GOOD.replace(
                "late = { order_by = \"version\", per = \"event_type\" }",
                &format!("late = {{ order_by = \"version\"{spec} }}"),
            )
        };
        let t = Topology::parse("good.toml", GOOD).unwrap();
        let max = |t: &Topology| t.sources[0].late.as_ref().unwrap().max_operations;
        assert_eq!(max(&t), LatePolicy::DEFAULT_MAX_OPERATIONS);
        let t = Topology::parse(
            "good.toml",
            &late(", per = \"event_type\", max_operations = 3"),
        )
        .unwrap();
        assert_eq!(max(&t), 3);
        for (spec, message) in [
            (
                ", per = \"event_type\", max_operations = 0",
                "bad late.max_operations `0`",
            ),
            (
                ", per = \"event_type\", max_operations = 5000",
                "a number from 1 to 1024",
            ),
            (", max_operations = 3", "late.max_operations needs late.per"),
        ] {
            let e = errors(&late(spec));
            assert!(e.len() == 1 && e[0].contains(message), "{spec}: {e:?}");
        }
    }

    #[test]
    fn reads_and_checks_late_owns() {
        let late = |spec: &str| {
            GOOD.replace(
                "late = { order_by = \"version\", per = \"event_type\" }",
                &format!("late = {{ order_by = \"version\"{spec} }}"),
            )
        };
        let t = Topology::parse("good.toml", GOOD).unwrap();
        assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        assert!(
            t.warnings[0]
                .to_string()
                .starts_with("good.toml:7:8: late.per without late.owns"),
            "{}",
            t.warnings[0]
        );
        let owning = ", per = \"event_type\", owns = { EmailChanged = [\"email\"], Moved = [\"dept\", \"email\"] }";
        let t = Topology::parse("good.toml", &late(owning)).unwrap();
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        let owns = t.sources[0].late.as_ref().unwrap().owns.clone().unwrap();
        let op = |name: &str| Value::Text(name.into());
        assert_eq!(
            owns.operations,
            vec![(op("EmailChanged"), vec![1]), (op("Moved"), vec![2, 1])]
        );
        assert_eq!(owns.owned, vec![false, true, true, false, false]);
        assert!(owns.writes(&op("Moved"))(2) && owns.writes(&op("Moved"))(3));
        assert!(!owns.writes(&op("EmailChanged"))(2));
        assert!(
            owns.writes(&op("Imported"))(2),
            "an unlisted operation writes all"
        );
        assert!(t.explain().contains("EmailChanged owns [email]"));
        for (spec, message) in [
            (", owns = { A = [\"email\"] }", "late.owns needs late.per"),
            (
                ", per = \"event_type\", owns = { A = [\"mail\"] }",
                "late.owns: `mail` is not a declared column",
            ),
            (
                ", per = \"event_type\", owns = { A = [\"version\"] }",
                "every event carries `version`",
            ),
            (
                ", per = \"version\", owns = { A = [\"email\"] }",
                "late.owns needs a text `per` column",
            ),
            (
                ", per = \"event_type\", action = \"keep\", owns = { A = [\"email\"] }",
                "action = \"keep\" applies them whole",
            ),
        ] {
            let e = errors(&late(spec));
            assert!(e.len() == 1 && e[0].contains(message), "{spec}: {e:?}");
        }
    }

    #[test]
    fn reads_and_checks_postgres_sinks() {
        let sink = |spec: &str| {
            GOOD.replace(
                "GROUP BY d.name\"\"\"",
                &format!("GROUP BY d.name\"\"\"\nsink = {{ postgres = {{ {spec} }} }}"),
            )
        };
        let t = Topology::parse(
            "t.toml",
            &sink(r#"table = "app.per_dept", readers = ["r1", "r2"], indexes = [["users"]]"#),
        )
        .expect("valid");
        let pg = t.table("per_dept").unwrap().postgres().expect("external");
        assert_eq!((pg.schema.as_str(), pg.table.as_str()), ("app", "per_dept"));
        assert_eq!(pg.readers, ["r1", "r2"]);
        assert_eq!(pg.indexes, [["users"]]);
        assert_eq!(pg.url, None);
        let public = Topology::parse("t.toml", &sink(r#"table = "per_dept""#)).expect("valid");
        assert_eq!(
            public.table("per_dept").unwrap().postgres().unwrap().schema,
            "public"
        );
        assert!(t.explain().contains("sink PostgreSQL app.per_dept"));

        for (spec, what) in [
            (
                r#"table = "app.per_dept", indexes = [["nope"]]"#,
                "index column `nope`",
            ),
            (r#"table = "a.b.c""#, "bad table"),
            (r#"table = "", readers = [""]"#, "bad table name"),
            (r#"table = "t", url = "mysql://x""#, "postgres://"),
            (r#"table = "t", colour = "red""#, "unknown field `colour`"),
        ] {
            let e = errors(&sink(spec));
            assert!(e.iter().any(|d| d.contains(what)), "{spec}: {e:?}");
        }
        let both = sink(r#"table = "t""#).replace("sink = {", "store = \"internal\"\nsink = {");
        assert!(errors(&both)
            .iter()
            .any(|d| d.contains("either `store` or `sink`")));
    }

    #[test]
    fn a_definition_changes_with_the_query_columns_and_key() {
        let t = Topology::parse("t.toml", GOOD).unwrap();
        let reformatted = Topology::parse(
            "t.toml",
            &GOOD.replace("GROUP BY d.name", "GROUP   BY\n d.name"),
        )
        .unwrap();
        let per = |t: &Topology| t.table("per_dept").unwrap().definition();
        assert_eq!(per(&t), per(&reformatted), "whitespace does not count");
        let changed = Topology::parse(
            "t.toml",
            &GOOD.replace("count(*) AS users", "count(*) AS members"),
        )
        .unwrap();
        assert_ne!(per(&t), per(&changed));
    }

    #[test]
    fn reports_command_errors_with_positions() {
        let command = r#"
[commands.update_email]
topic = "user.cmd.update-email"
entity = "users"
key = "id"
columns = { id = "text", email = "text" }
authorize = { rule = "principal.id" }
validate = [{ rule = "command.emial LIKE '%@%'" }]
set = { email = "command.email", nope = "1", version = "2" }
retry = { attempts = 0, backoff = "soon" }
"#;
        let e = errors(&format!("{GOOD}{command}"));
        for expected in [
            "`principal.id` is text, a rule must be boolean",
            "unknown column `command.emial`",
            "`nope` is not a column of `users`",
            "`version` cannot be set by a command",
            "retry.attempts must be at least 1",
            "bad duration `soon`",
        ] {
            assert!(e.iter().any(|d| d.contains(expected)), "{expected}: {e:?}");
        }
        let unknown = command.replace("entity = \"users\"", "entity = \"people\"");
        let e = errors(&format!("{GOOD}{unknown}"));
        assert!(
            e.iter()
                .any(|d| d.contains("unknown entity source `people`")),
            "{e:?}"
        );
        let ok = format!(
            "{GOOD}{}",
            command
                .replace("rule = \"principal.id\"", "rule = \"has_role('admin')\"")
                .replace("emial", "email")
                .replace(", nope = \"1\", version = \"2\"", "")
                .replace(
                    "attempts = 0, backoff = \"soon\"",
                    "attempts = 3, backoff = \"50ms\""
                )
        );
        let t = Topology::parse("ok.toml", &ok).unwrap();
        let c = t.command("update_email").unwrap();
        assert_eq!(c.operation, "update_email");
        assert_eq!(c.retry.attempts, 3);
        assert_eq!(c.retry.backoff, std::time::Duration::from_millis(50));
        assert!(t.explain().contains("command update_email"));
    }

    #[test]
    fn rejects_unsupported_sql_by_name() {
        for (query, what) in [
            ("SELECT id FROM users ORDER BY id", "ORDER BY"),
            (
                "SELECT id FROM users WHERE email LIKE 'a%' ESCAPE '!'",
                "ESCAPE",
            ),
            ("SELECT DISTINCT id FROM users", "DISTINCT"),
            ("SELECT email FROM users", "key column `id`"),
            ("SELECT id, count(*) AS n FROM users", "GROUP BY"),
            (
                "SELECT u.id FROM users u RIGHT JOIN departments d ON u.dept = d.id",
                "Right",
            ),
            ("SELECT id, email + 1 AS x FROM users", "needs numbers"),
        ] {
            let bad = GOOD.replace(
                "SELECT id, lower(email) AS email FROM users WHERE email IS NOT NULL",
                query,
            );
            let e = errors(&bad);
            assert!(e.iter().any(|d| d.contains(what)), "{query}: {e:?}");
        }
    }

    #[test]
    fn reports_toml_syntax_errors_with_position() {
        let e = errors("name = \"x\"\n[sources.users\n");
        assert!(e[0].starts_with("bad.toml:2:"), "{e:?}");
    }
}
