//! The `miroir` command line: validate, explain and run topologies; publish sample events.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use miroir::miroir_engine::topology::Topology;
use miroir_connectors::kafka::output::{create_topic, Publisher};
use miroir_connectors::kafka::KafkaConfig;
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
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        /// Kafka bootstrap servers.
        #[arg(long, env = "MIROIR_BROKERS")]
        brokers: String,
        /// Directory of the RocksDB state.
        #[arg(long, env = "MIROIR_STATE_DIR")]
        state_dir: PathBuf,
        /// Address of the HTTP API.
        #[arg(long, env = "MIROIR_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Worker threads.
        #[arg(long, env = "MIROIR_WORKERS", default_value_t = 2)]
        workers: usize,
        /// Longest epoch in milliseconds (how long an applied event may wait to be visible).
        #[arg(long, default_value_t = 100)]
        epoch_ms: u64,
        /// PostgreSQL database of external tables (unless their sink names a `url`).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// Print what the start would create, rebuild or keep in PostgreSQL, and exit.
        #[arg(long)]
        plan: bool,
    },
    /// Prints what `miroir run` would do to each external (PostgreSQL) table: create it,
    /// rebuild it in a shadow table (and why), or keep it. Changes nothing.
    ///
    /// EXAMPLES:
    ///     miroir plan topologies/user-directory.toml --state-dir /var/lib/miroir
    Plan {
        /// The topology file.
        file: PathBuf,
        /// Directory of the RocksDB state the run would use.
        #[arg(long, env = "MIROIR_STATE_DIR")]
        state_dir: PathBuf,
        /// PostgreSQL database of external tables (unless their sink names a `url`).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
    },
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
        /// Kafka bootstrap servers.
        #[arg(long, env = "MIROIR_BROKERS")]
        brokers: String,
    },
}

/// Prints the start's effect on each external table.
fn print_plan(
    file: &std::path::Path,
    state_dir: &std::path::Path,
    database_url: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let topology = match Topology::load(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    if !topology.has_external_tables() {
        println!("no external tables: nothing to do in PostgreSQL");
        return Ok(ExitCode::SUCCESS);
    }
    let url = miroir_connectors::postgres::database_url(&topology, database_url)?;
    let instance = miroir::miroir_engine::store::Store::peek_instance_id(state_dir)
        .context("reading the state directory")?
        .unwrap_or_default();
    for decision in miroir_connectors::postgres::schema::plan(&url, &topology, &instance)? {
        println!("{decision}");
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn")),
        )
        .with_writer(std::io::stderr)
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

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Validate { file } => match Topology::load(&file) {
            Ok(t) => {
                println!(
                    "{}: ok ({} sources, {} tables)",
                    file.display(),
                    t.sources.len(),
                    t.tables.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{} error(s)", e.diagnostics.len());
                Ok(ExitCode::from(1))
            }
        },
        Command::Explain { file } => match Topology::load(&file) {
            Ok(t) => {
                print!("{}", t.explain());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(1))
            }
        },
        Command::Plan {
            file,
            state_dir,
            database_url,
        } => print_plan(&file, &state_dir, database_url.as_deref()),
        Command::Run {
            file,
            brokers,
            state_dir,
            listen,
            workers,
            epoch_ms,
            database_url,
            plan,
        } => {
            if plan {
                return print_plan(&file, &state_dir, database_url.as_deref());
            }
            let mut builder = miroir::Engine::builder();
            if let Some(url) = database_url {
                builder = builder.database_url(url);
            }
            let engine = builder
                .topology_file(&file)
                .brokers(brokers)
                .state_dir(&state_dir)
                .listen(listen)
                .workers(workers)
                .epoch_interval(Duration::from_millis(epoch_ms))
                .start()?;
            info!(topology = %engine.topology().name, http = ?engine.http_addr(), "running; Ctrl-C to stop");
            wait_for_signal()?;
            info!("stopping: committing and leaving the consumer group");
            let failure = engine.failure();
            engine.shutdown();
            match failure {
                Some(f) => anyhow::bail!("stopped on failure: {f}"),
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Publish {
            file,
            topic,
            partitions,
            brokers,
        } => {
            let config = KafkaConfig::new(brokers);
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
fn wait_for_signal() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;
    Ok(())
}
