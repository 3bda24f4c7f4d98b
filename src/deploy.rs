//! What a deployment makes and how to undo it: `miroir plan` prints what a start would make
//! (internal topics, external tables), `miroir reset` deletes what the instances made for
//! themselves.

use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use miroir::miroir_engine::state::StateStore;
use miroir::miroir_engine::topology::Topology;
use miroir_connectors::kafka::internal;
use miroir_connectors::kafka::KafkaConfig;

/// Prints the internal topics a start of `file`'s topology makes (checked against Kafka
/// with `brokers`) and what it would do to each external table.
pub fn print_plan(
    file: &Path,
    database_url: Option<&str>,
    brokers: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let topology = match Topology::load(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    let topics = match brokers {
        Some(brokers) => internal::find(&KafkaConfig::new(brokers), &topology)?,
        None => internal::internal_topics(&topology, &[]),
    };
    println!(
        "kafka topics of the instances{}:",
        match brokers {
            Some(_) => "",
            None => " (not checked: no --brokers)",
        }
    );
    for topic in &topics {
        println!("  {topic}");
    }
    println!("consumer group: {}", topology.name);
    if !topology.has_external_tables() {
        println!("no external tables: nothing to do in PostgreSQL");
        return Ok(ExitCode::SUCCESS);
    }
    let url = miroir_connectors::postgres::database_url(&topology, database_url)?;
    for decision in miroir_connectors::postgres::schema::plan(&url, &topology)? {
        println!("{decision}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Deletes the internal topics and the consumer group of `file`'s topology, and `state_dir`,
/// once confirmed (`yes`, or the topology's name on stdin). Exit status 2 when not confirmed.
pub fn reset(
    file: &Path,
    config: &KafkaConfig,
    state_dir: Option<&Path>,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    let topology = Topology::load(file)?;
    let config = &config.clone().with_defaults(&topology.kafka);
    miroir_connectors::kafka::credentials::check(config)?;
    let topics = internal::find(config, &topology)?;
    let existing: Vec<&internal::InternalTopic> =
        topics.iter().filter(|t| t.partitions.is_some()).collect();
    eprintln!("miroir reset deletes, for topology `{}`:", topology.name);
    for topic in &existing {
        eprintln!("  topic {topic}");
    }
    eprintln!("  consumer group {} (its committed offsets)", topology.name);
    if let Some(dir) = state_dir {
        eprintln!("  state directory {}", dir.display());
    }
    if !yes && !confirmed(&topology.name)? {
        eprintln!("not confirmed: nothing deleted");
        return Ok(ExitCode::from(2));
    }
    internal::delete(config, &topology, &topics)?;
    if let Some(dir) = state_dir.filter(|d| d.exists()) {
        StateStore::open(dir, &[]).context(
            "opening the state directory to check that no instance uses it (stop it first)",
        )?;
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("deleting the state directory {}", dir.display()))?;
    }
    eprintln!(
        "deleted: {} topics, the consumer group{}; the next start reads the sources from their beginning",
        existing.len(),
        if state_dir.is_some() { ", the state directory" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Asks for the topology's `name` on stdin; whether the line read is that name.
fn confirmed(name: &str) -> anyhow::Result<bool> {
    eprint!("type the topology's name ({name}) to delete them: ");
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the confirmation")?;
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprintln!();
    }
    Ok(line.trim() == name)
}
