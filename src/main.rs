//! The `miroir` command line: validate, explain and run topologies; publish sample events.

mod deploy;
mod kafka_args;
mod progress;
mod token;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use miroir::commands::{self, Principal, Replayed, Reply};
use miroir::miroir_engine::metrics::Metrics;
use miroir::miroir_engine::runtime::RuntimeConfig;
use miroir::miroir_engine::state::StateStore;
use miroir::miroir_engine::topology::Topology;
use miroir_connectors::kafka::admin::create_topic;
use miroir_connectors::kafka::output::Publisher;
use tracing::info;

/// mimalloc instead of the system allocator: the dataflow allocates and frees many small rows,
/// and glibc's malloc spent about 40% of the CPU time of the ingest benchmark
/// (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Materialized tables from Kafka entity streams.
#[derive(Parser)]
#[command(name = "miroir", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Action {
    /// Checks a topology file; prints every error as FILE:LINE:COL: message, with a hint.
    ///
    /// EXAMPLES:
    ///     miroir validate topologies/user-directory.toml
    Validate {
        /// The topology file.
        file: PathBuf,
    },
    /// Prints the operator graph of a topology (sources, filters, maps, joins, reduces,
    /// exchanges, sinks).
    ///
    /// EXAMPLES:
    ///     miroir explain topologies/user-directory.toml
    Explain {
        /// The topology file.
        file: PathBuf,
    },
    /// Runs a topology until stopped (Ctrl-C or SIGTERM commits, leaves the group and exits).
    ///
    /// EXAMPLES:
    ///     miroir run topologies/user-directory.toml --brokers 127.0.0.1:19092 \
    ///         --state-dir /var/lib/miroir --listen 127.0.0.1:8080
    Run {
        /// The topology file.
        file: PathBuf,
        #[command(flatten)]
        kafka: kafka_args::KafkaArgs,
        /// Directory of the RocksDB state.
        #[arg(long, env = "MIROIR_STATE_DIR")]
        state_dir: PathBuf,
        /// Address of the HTTP API.
        #[arg(long, env = "MIROIR_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Serve /health, /ready and /metrics on this address instead, and queries alone on
        /// --listen.
        #[arg(long, env = "MIROIR_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// Worker threads.
        #[arg(long, env = "MIROIR_WORKERS", default_value_t = RuntimeConfig::DEFAULT_WORKERS)]
        workers: usize,
        /// Epoch in milliseconds when keeping up (how long an applied event may wait to be
        /// visible).
        #[arg(long, default_value_t = RuntimeConfig::DEFAULT_EPOCH_INTERVAL.as_millis() as u64)]
        epoch_ms: u64,
        /// Longest epoch in milliseconds while records are waiting (catching up): more changes
        /// of a key coalesce into one, and commits are fewer.
        #[arg(long, default_value_t = RuntimeConfig::DEFAULT_MAX_EPOCH_INTERVAL.as_millis() as u64)]
        max_epoch_ms: u64,
        /// PostgreSQL database of external tables (unless their sink names a `url`).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// Print what the start would create, rebuild or keep in PostgreSQL, and exit.
        #[arg(long)]
        plan: bool,
        /// This instance's id among the instances of the topology (default: the id of its
        /// state directory, kept across restarts).
        #[arg(long, env = "MIROIR_INSTANCE_ID")]
        instance_id: Option<String>,
        /// The host:port other instances reach this one's HTTP API at, to forward queries for
        /// the keys it owns (default: the --listen address; 127.0.0.1 for 0.0.0.0).
        #[arg(long, env = "MIROIR_ADVERTISE")]
        advertise: Option<String>,
        /// Do not log the tasks' state to changelog topics. A partition that reaches an
        /// instance without its state is then read again from the beginning of its topic:
        /// wrong once the topic is compacted. For one instance on uncompacted topics only.
        #[arg(long)]
        no_changelog: bool,
        /// How many other instances keep a warm copy of each partition's state, fed from its
        /// changelog, so that a partition whose owner dies is taken over without reading its
        /// whole changelog. Give every instance of the topology the same number.
        #[arg(
            long,
            env = "MIROIR_STANDBY_REPLICAS",
            default_value_t = 0,
            conflicts_with = "no_changelog"
        )]
        standby_replicas: usize,
        /// The consumer group protocol: `classic` (range assignment; every rebalance moves
        /// every partition; 10 s session timeout) or `consumer` (KIP-848, Kafka 4.0 or later:
        /// a rebalance moves only the partitions that must move; the broker's session timeout,
        /// `group.consumer.session.timeout.ms`). Give every instance the same one.
        #[arg(long, env = "MIROIR_GROUP_PROTOCOL", default_value = "classic", value_parser = ["classic", "consumer"])]
        group_protocol: String,
        #[command(flatten)]
        auth: token::AuthArgs,
        /// Serve the HTTP API over TLS with this certificate chain (PEM, leaf first); queries
        /// are then forwarded over TLS, so give every instance of the topology one.
        #[arg(long, env = "MIROIR_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, env = "MIROIR_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// CA certificates (PEM) that signed the other instances' certificates, trusted
        /// besides the system's when forwarding a query.
        #[arg(long, env = "MIROIR_TLS_CA", requires = "tls_cert")]
        tls_ca: Option<PathBuf>,
    },
    /// Prints the instances of a running topology, as one of them sees them: their addresses,
    /// the partitions each owns, restores and stands by for, their lag.
    ///
    /// EXAMPLES:
    ///     miroir status --url http://127.0.0.1:8080
    ///     miroir status --url http://app-1.internal:8080 --json
    Status {
        /// The HTTP API of one instance.
        #[arg(long, env = "MIROIR_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Print the answer of `GET /v1/cluster` as it is.
        #[arg(long)]
        json: bool,
    },
    /// Prints what `miroir run` would make: the internal Kafka topics (changelogs, the
    /// instances' topic), whether each exists, and what it would do to each external
    /// (PostgreSQL) table: create it, rebuild it in a shadow table (and why), or keep it.
    /// Changes nothing.
    ///
    /// EXAMPLES:
    ///     miroir plan topologies/user-directory.toml --brokers 127.0.0.1:19092
    Plan {
        /// The topology file.
        file: PathBuf,
        /// PostgreSQL database of external tables (unless their sink names a `url`).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// Kafka bootstrap servers (without them, the internal topics are listed unchecked).
        #[arg(long, env = "MIROIR_BROKERS")]
        brokers: Option<String>,
    },
    /// Deletes what the topology's instances made for themselves, for a redeploy from the
    /// sources alone: its internal topics (changelogs, the instances' topic), its consumer
    /// group and, with --state-dir, that state directory. Every instance must be stopped.
    /// Lists what it deletes and asks for the topology's name as confirmation (read from
    /// stdin), unless --yes. Source topics, error topics, command topics and external tables
    /// are not touched.
    ///
    /// EXAMPLES:
    ///     miroir reset topologies/user-directory.toml --brokers 127.0.0.1:19092 \
    ///         --state-dir /var/lib/miroir
    Reset {
        /// The topology file.
        file: PathBuf,
        #[command(flatten)]
        kafka: kafka_args::KafkaArgs,
        /// A state directory of one of the topology's instances, to delete too.
        #[arg(long, env = "MIROIR_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Delete without asking.
        #[arg(long)]
        yes: bool,
    },
    /// Forgets one key of a source in a stopped instance's state directory: its row and the
    /// order values of its last events. The repair of a key frozen by an event whose order
    /// value is far too large (every later event is dropped as late): publish the corrected
    /// event after it, stop the instance, forget the key, start it again.
    ///
    /// EXAMPLES:
    ///     miroir forget-key topologies/user-directory.toml --state-dir /var/lib/miroir \
    ///         --source users --key u-1
    ForgetKey {
        /// The topology file.
        file: PathBuf,
        /// The state directory (its instance must be stopped).
        #[arg(long, env = "MIROIR_STATE_DIR")]
        state_dir: PathBuf,
        /// The source.
        #[arg(long)]
        source: String,
        /// The key, in its URL form.
        #[arg(long)]
        key: String,
    },
    /// Sends commands to a master and reads its replies.
    #[command(subcommand)]
    Command(CommandAction),
    /// Lists and replays commands parked in a dead-letter topic.
    #[command(subcommand)]
    Dlq(DlqAction),
    /// Mints bearer tokens for development.
    #[command(subcommand)]
    Token(token::TokenAction),
    /// Publishes keyed messages to a topic, one per line of FILE (`-` for stdin):
    /// `KEY<TAB>PAYLOAD`, or `KEY<TAB>` alone for a tombstone. Creates the topic if missing.
    ///
    /// EXAMPLES:
    ///     printf 'u-1\t{"id":"u-1","email":"a@b.c"}\n' | miroir publish --topic user -
    Publish {
        /// The file of messages.
        file: PathBuf,
        /// Target topic.
        #[arg(long)]
        topic: String,
        /// Partitions when the topic must be created.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        #[command(flatten)]
        kafka: kafka_args::KafkaArgs,
    },
}

#[derive(Subcommand)]
enum CommandAction {
    /// Sends one command declared in TOPOLOGY (the master's) and prints the reply as JSON.
    /// Exit status: 0 accepted, 2 answered otherwise (rejected, forbidden, deferred,
    /// expired), 3 no reply in time (the command may still be applied), 1 error.
    ///
    /// EXAMPLES:
    ///     miroir command send topologies/user-referential.toml update_email \
    ///         --json '{"id":"u-1","email":"ada@example.org"}' --token "$(miroir token issue --sub alice --roles user-admin)"
    Send {
        /// The master's topology file.
        topology: PathBuf,
        /// The command: its section name or its command type.
        command: String,
        /// The payload, a JSON object with the command's columns.
        #[arg(long)]
        json: String,
        /// How long to wait for the reply.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The caller's bearer token (a JWT), which proves who sends the command.
        #[arg(long, env = "MIROIR_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Without a token: the user the command claims to act for, believed only by a
        /// processor started with --trust-principal-headers (development).
        #[arg(long, env = "MIROIR_PRINCIPAL")]
        principal: Option<String>,
        /// Without a token: the roles claimed, comma-separated.
        #[arg(long, default_value = "")]
        roles: String,
        #[command(flatten)]
        kafka: kafka_args::KafkaArgs,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Lists the commands parked in TOPIC's dead-letter topic (TOPIC is the command topic or
    /// its `.dlq`) as it reads them: each entity's in the order they failed. It holds one at
    /// a time, however long the topic.
    ///
    /// EXAMPLES:
    ///     miroir dlq list user.cmd.update-email --limit 20
    List {
        /// The command topic (or its dead-letter topic).
        topic: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Print at most this many (the count at the end is of all of them).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        kafka: kafka_args::KafkaArgs,
    },
    /// Re-submits parked commands in their original order, one at a time; a command whose
    /// entity changed since it was parked is skipped (and reported).
    ///
    /// EXAMPLES:
    ///     miroir dlq replay user.cmd.update-email --all --dry-run
    ///     miroir dlq replay user.cmd.update-email --id 5f0c...
    Replay {
        /// The command topic (or its dead-letter topic).
        topic: String,
        /// Replay only the command with this id.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<String>,
        /// Replay every parked command.
        #[arg(long)]
        all: bool,
        /// Print what would be replayed, send nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for each reply.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The replayer's bearer token: the processor replays for principals with the
        /// `miroir-operator` role, on behalf of each command's sender as verified when it was
        /// parked.
        #[arg(long, env = "MIROIR_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        kafka: kafka_args::KafkaArgs,
    },
}

/// Sends one command and prints the reply.
fn send_command(action: CommandAction) -> anyhow::Result<ExitCode> {
    let CommandAction::Send {
        topology,
        command,
        json,
        timeout,
        token,
        principal,
        roles,
        kafka,
    } = action;
    let topology = match Topology::load(&topology) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    let Some(spec) = topology
        .commands
        .iter()
        .find(|c| c.name == command || c.operation == command)
    else {
        let known: Vec<&str> = topology.commands.iter().map(|c| c.name.as_str()).collect();
        anyhow::bail!(
            "no command `{command}` in {} (commands: {})",
            topology.name,
            known.join(", ")
        );
    };
    let payload: serde_json::Value =
        serde_json::from_str(&json).context("--json is not valid JSON")?;
    if token.is_none() && principal.is_none() {
        anyhow::bail!(
            "no token: pass --token (or set MIROIR_TOKEN); `miroir token issue` mints one for development"
        );
    }
    let principal = Principal::new(principal.unwrap_or_default(), &roles);
    let mut command = commands::Command::new(spec, &payload, principal)?;
    if let Some(token) = token {
        command = command.with_token(token);
    }
    let metrics = Metrics::new();
    let config = kafka.config()?.with_defaults(&topology.kafka);
    miroir_connectors::kafka::credentials::check(&config)?;
    let client = commands::Client::start(&config, "cli", metrics.commands.clone())?;
    let result = client.send(&command, timeout);
    client.shutdown();
    match result {
        Ok(reply) => {
            println!("{}", serde_json::to_string(&reply)?);
            Ok(match reply {
                Reply::Accepted { .. } => ExitCode::SUCCESS,
                _ => ExitCode::from(2),
            })
        }
        Err(commands::SendError::Timeout(t)) => {
            eprintln!("no reply within {t:?}: the command may still be applied");
            Ok(ExitCode::from(3))
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints the instances `url`'s instance knows of.
fn print_status(url: &str, json: bool) -> anyhow::Result<ExitCode> {
    let cluster: serde_json::Value = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?
        .get(format!("{}/v1/cluster", url.trim_end_matches('/')))
        .send()
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("asking {url} for its instances"))?
        .json()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&cluster)?);
        return Ok(ExitCode::SUCCESS);
    }
    let me = cluster["instance"].as_str().unwrap_or_default();
    let partitions = |v: &serde_json::Value| -> String {
        let Some(topics) = v.as_object().filter(|t| !t.is_empty()) else {
            return "-".into();
        };
        topics
            .iter()
            .map(|(topic, ps)| {
                let ps: Vec<String> = ps
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| p.to_string())
                    .collect();
                format!("{topic}: {}", ps.join(","))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    println!(
        "{:<28} {:<22} {:>6}  {:<36} {:<24} standby (lag)",
        "instance", "address", "lag", "partitions", "restoring"
    );
    for m in cluster["instances"].as_array().into_iter().flatten() {
        let id = m["instance"].as_str().unwrap_or_default();
        let name = if id == me {
            format!("{id} (asked)")
        } else {
            id.to_string()
        };
        let lag = m["lag"].as_i64().map_or("-".into(), |l| l.to_string());
        let standby_lag = m["standby_lag"]
            .as_i64()
            .map_or(String::new(), |l| format!(" ({l})"));
        println!(
            "{name:<28} {:<22} {lag:>6}  {:<36} {:<24} {}{standby_lag}",
            m["advertise"].as_str().unwrap_or("-"),
            partitions(&m["partitions"]),
            partitions(&m["restoring"]),
            partitions(&m["standby"]),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Lists or replays dead letters.
/// Prints one parked command: a line of fields, or a JSON object.
fn print_parked(p: &commands::Parked, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(p)?);
        return Ok(());
    }
    println!(
        "{}/{} id={} key={} type={} by={} attempts={} first={} last={} error={} [{}] origin={} entity_version={}",
        p.partition,
        p.offset,
        p.command_id.as_deref().unwrap_or("-"),
        p.key.as_deref().unwrap_or("-"),
        p.command_type.as_deref().unwrap_or("-"),
        p.principal.as_deref().unwrap_or("-"),
        p.attempts.map_or("-".into(), |a| a.to_string()),
        p.first_failure.as_deref().unwrap_or("-"),
        p.last_failure.as_deref().unwrap_or("-"),
        p.error.as_deref().unwrap_or("-"),
        p.error_class.as_deref().unwrap_or("-"),
        p.origin.as_deref().unwrap_or("-"),
        p.entity_version.map_or("-".into(), |v| v.to_string()),
    );
    Ok(())
}

fn dead_letters(action: DlqAction) -> anyhow::Result<ExitCode> {
    match action {
        DlqAction::List {
            topic,
            json,
            limit,
            kafka,
        } => {
            let mut count = 0usize;
            let mut printed = Ok(());
            let resolved = commands::each_dead_letter(&kafka.checked()?, &topic, |p| {
                count += 1;
                if printed.is_ok() && limit.is_none_or(|l| count <= l) {
                    printed = print_parked(&p, json);
                }
            })?;
            printed?;
            eprintln!(
                "{count} parked command(s) in {} ({resolved} more resolved by replays)",
                miroir_connectors::commands::wire::dlq_topic(&topic)
            );
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Replay {
            topic,
            id,
            all: _,
            dry_run,
            timeout,
            token,
            kafka,
        } => {
            let config = kafka.checked()?;
            let mut parked = commands::dead_letters(&config, &topic)?;
            if let Some(id) = &id {
                parked.retain(|p| p.command_id.as_deref() == Some(id.as_str()));
                if parked.is_empty() {
                    anyhow::bail!("no parked command with id {id}");
                }
            }
            if dry_run {
                for p in &parked {
                    println!(
                        "would replay {}/{} id={} key={} (parked at entity version {})",
                        p.partition,
                        p.offset,
                        p.command_id.as_deref().unwrap_or("-"),
                        p.key.as_deref().unwrap_or("-"),
                        p.entity_version.map_or("-".into(), |v| v.to_string())
                    );
                }
                println!(
                    "{} command(s) would be replayed; nothing sent",
                    parked.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let metrics = Metrics::new();
            let client = commands::Client::start(&config, "dlq-replay", metrics.commands.clone())?;
            let results =
                commands::replay(&client, &parked, (timeout, token.as_deref()), |p, r| {
                    let id = p.command_id.as_deref().unwrap_or("-");
                    let key = p.key.as_deref().unwrap_or("-");
                    let json = |reply| serde_json::to_string(reply).unwrap_or_default();
                    match r {
                        Replayed::Applied(reply) => {
                            println!("applied {id} key={key}: {}", json(reply))
                        }
                        Replayed::Skipped(why) => println!("skipped {id} key={key}: {why}"),
                        Replayed::Answered(reply) => {
                            println!("answered {id} key={key}: {}", json(reply))
                        }
                        Replayed::Failed(e) => {
                            println!("failed {id} key={key}: {e}; stopping here to keep the order")
                        }
                    }
                });
            client.shutdown();
            let count = |kind: fn(&Replayed) -> bool| results.iter().filter(|r| kind(r)).count();
            let failed = count(|r| matches!(r, Replayed::Failed(_)));
            println!(
                "replayed {} of {}: {} applied, {} skipped, {} answered otherwise, {failed} failed",
                results.len(),
                parked.len(),
                count(|r| matches!(r, Replayed::Applied(_))),
                count(|r| matches!(r, Replayed::Skipped(_))),
                count(|r| matches!(r, Replayed::Answered(_))),
            );
            Ok(if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Prints the start's effect on each external table.
fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn")),
        )
        .with_writer(progress::LogOutput)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Action) -> anyhow::Result<ExitCode> {
    match command {
        Action::Validate { file } => match Topology::load(&file) {
            Ok(t) => {
                for warning in &t.warnings {
                    eprintln!("warning: {warning}");
                }
                println!(
                    "{}: ok ({} sources, {} tables, {} commands)",
                    file.display(),
                    t.sources.len(),
                    t.tables.len(),
                    t.commands.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{} error(s)", e.diagnostics.len());
                Ok(ExitCode::from(1))
            }
        },
        Action::Explain { file } => match Topology::load(&file) {
            Ok(t) => {
                print!("{}", t.explain());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(1))
            }
        },
        Action::Plan {
            file,
            database_url,
            brokers,
        } => deploy::print_plan(&file, database_url.as_deref(), brokers.as_deref()),
        Action::Reset {
            file,
            kafka,
            state_dir,
            yes,
        } => deploy::reset(&file, &kafka.config()?, state_dir.as_deref(), yes),
        Action::ForgetKey {
            file,
            state_dir,
            source,
            key,
        } => forget_key(&file, &state_dir, &source, &key),
        Action::Run {
            file,
            kafka,
            state_dir,
            listen,
            admin_listen,
            workers,
            epoch_ms,
            max_epoch_ms,
            database_url,
            plan,
            instance_id,
            advertise,
            no_changelog,
            standby_replicas,
            group_protocol,
            auth,
            tls_cert,
            tls_key,
            tls_ca,
        } => {
            if plan {
                return deploy::print_plan(&file, database_url.as_deref(), Some(&kafka.brokers));
            }
            let mut builder = miroir::Engine::builder();
            if let Some(url) = database_url {
                builder = builder.database_url(url);
            }
            if let Some(id) = instance_id {
                builder = builder.instance_id(id);
            }
            if let Some(addr) = advertise {
                builder = builder.advertise(addr);
            }
            if let Some(addr) = admin_listen {
                builder = builder.admin_listen(addr);
            }
            if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                builder = builder.tls(miroir::HttpTls {
                    cert,
                    key,
                    ca: tls_ca,
                });
            }
            builder = builder
                .auth(auth.config())
                .changelog(!no_changelog)
                .standby_replicas(standby_replicas)
                .group_protocol(match group_protocol.as_str() {
                    "consumer" => miroir::GroupProtocol::Consumer,
                    _ => miroir::GroupProtocol::Classic,
                });
            for (key, value) in kafka.config()?.extra {
                builder = builder.kafka_property(key, value);
            }
            let engine = builder
                .topology_file(&file)
                .brokers(kafka.brokers)
                .state_dir(&state_dir)
                .listen(listen)
                .workers(workers)
                .epoch_interval(Duration::from_millis(epoch_ms))
                .max_epoch_interval(Duration::from_millis(max_epoch_ms))
                .start()?;
            info!(topology = %engine.topology().name, http = ?engine.http_addr(), "running; Ctrl-C to stop");
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let stop = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|scope| {
                if terminal {
                    scope.spawn(|| progress::follow(|| engine.status().restore_remaining, &stop));
                }
                let waited = wait_for_signal_or_failure(&engine);
                stop.store(true, std::sync::atomic::Ordering::Release);
                waited
            })?;
            info!("stopping: committing and leaving the consumer group");
            let failure = engine.failure();
            engine.shutdown();
            match failure {
                Some(f) => anyhow::bail!("stopped on failure: {f}"),
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Action::Status { url, json } => print_status(&url, json),
        Action::Command(action) => send_command(action),
        Action::Token(action) => token::run(action).map(|()| ExitCode::SUCCESS),
        Action::Dlq(action) => dead_letters(action),
        Action::Publish {
            file,
            topic,
            partitions,
            kafka,
        } => {
            let config = kafka.checked()?;
            create_topic(&config, &topic, partitions).context("creating the topic")?;
            let publisher = Publisher::new(&config)?;
            let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(&file)
                        .with_context(|| format!("opening {}", file.display()))?,
                ))
            };
            let mut count = 0u64;
            for (n, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((key, payload)) = line.split_once('\t') else {
                    anyhow::bail!("{}:{}: expected KEY<TAB>PAYLOAD", file.display(), n + 1);
                };
                let payload = (!payload.is_empty()).then_some(payload.as_bytes());
                publisher.send(&topic, key.as_bytes(), payload)?;
                count += 1;
            }
            publisher.flush()?;
            println!("published {count} messages to {topic}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Blocks until SIGINT or SIGTERM.
/// Removes `key` of `source` from the state in `state_dir` (see `Action::ForgetKey`).
fn forget_key(
    file: &std::path::Path,
    state_dir: &std::path::Path,
    source: &str,
    key: &str,
) -> anyhow::Result<ExitCode> {
    let topology = Topology::load(file)?;
    let index = topology
        .sources
        .iter()
        .position(|s| s.name == source)
        .with_context(|| format!("no source `{source}` in {}", file.display()))?;
    let ty = topology.sources[index].columns[topology.sources[index].key].ty;
    let value = miroir::miroir_engine::value::Value::parse_key_text(key, ty)
        .with_context(|| format!("`{key}` is not a key of `{source}` ({})", ty.name()))?;
    let store = StateStore::open(state_dir, &[])
        .context("opening the state directory (is its instance stopped?)")?;
    let forgotten = store.forget_key(index, &value)?;
    eprintln!(
        "{forgotten} entr{} of key `{key}` forgotten in {}: the next start applies its next event whatever its order value",
        if forgotten == 1 { "y" } else { "ies" },
        state_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Waits for Ctrl-C or SIGTERM, or for a component of `engine` to fail for good (then the
/// process exits with an error, for its supervisor to see).
fn wait_for_signal_or_failure(engine: &miroir::Engine) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let failed = async {
            while engine.failure().is_none() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
            _ = failed => Ok(()),
        }
    })?;
    Ok(())
}
