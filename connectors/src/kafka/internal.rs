//! What a topology's instances make in Kafka for themselves: the changelog topic of each
//! partitioned source, the repartition topics, the instances' topic, and the consumer group
//! named after the topology. `miroir plan` lists them; `miroir reset` deletes them, for a redeploy that starts
//! from the sources alone (Kafka Streams' application reset tool).
//!
//! Not theirs, so never touched: the source topics, the `<topic>.miroir-errors` topics of
//! malformed records (named after a source topic, which other topologies may read too), and
//! the topics of commands and replies.

use std::fmt;

use miroir_engine::plan::repartition::TOPIC_SUFFIX;
use miroir_engine::topology::Topology;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::types::RDKafkaErrorCode;

use super::admin::{block_on, create_topics_with, delete_topics, topics};
use super::changelog::{self, CHANGELOG_SUFFIX, MAX_RECORD_BYTES};
use super::membership::membership_topic;
use super::{KafkaConfig, KafkaError};

/// One topic the topology's instances make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InternalTopic {
    /// Its name.
    pub name: String,
    /// What it holds.
    pub holds: String,
    /// Its partition count when it exists.
    pub partitions: Option<i32>,
}

impl fmt::Display for InternalTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.partitions {
            Some(n) => write!(f, "{} ({}; exists, {n} partitions)", self.name, self.holds),
            None => write!(f, "{} ({}; created at start)", self.name, self.holds),
        }
    }
}

/// The topics `topology`'s instances use, each with its partition count if it exists
/// (`existing`: the cluster's topics), then the changelogs of earlier layouts of its sources
/// that still exist.
pub fn internal_topics(topology: &Topology, existing: &[(String, i32)]) -> Vec<InternalTopic> {
    let count = |name: &str| existing.iter().find(|(t, _)| t == name).map(|(_, n)| *n);
    let mut out: Vec<InternalTopic> = topology
        .sources
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.global)
        .map(|(i, s)| {
            let name = changelog::topic(topology, i);
            InternalTopic {
                partitions: count(&name),
                holds: format!(
                    "the state of source `{}`, as many partitions as {}",
                    s.name, s.topic
                ),
                name,
            }
        })
        .collect();
    out.extend(topology.repartitions.iter().map(|r| {
        let name = topology.sources[r.source].topic.clone();
        InternalTopic {
            partitions: count(&name),
            holds: format!(
                "the rows of {}, a stage of a table that needs several partitions' rows",
                r.name
            ),
            name,
        }
    }));
    let members = membership_topic(&topology.name);
    out.push(InternalTopic {
        partitions: count(&members),
        holds: "the instances' records".into(),
        name: members,
    });
    let mut stale: Vec<InternalTopic> = existing
        .iter()
        .filter(|(t, _)| {
            (is_changelog_of(&topology.name, t) || is_repartition_of(&topology.name, t))
                && !out.iter().any(|o| &o.name == t)
        })
        .map(|(t, n)| InternalTopic {
            name: t.clone(),
            holds: "a changelog or stage of an earlier definition".into(),
            partitions: Some(*n),
        })
        .collect();
    stale.sort_by(|a, b| a.name.cmp(&b.name));
    out.extend(stale);
    out
}

/// Whether `topic` is a changelog of topology `name`: `<name>.<source>.<hash>.miroir-changelog`
/// (a source's name has no dot; the hash is 8 hexadecimal digits).
fn is_changelog_of(name: &str, topic: &str) -> bool {
    let Some(middle) = topic
        .strip_prefix(name)
        .and_then(|t| t.strip_prefix('.'))
        .and_then(|t| t.strip_suffix(CHANGELOG_SUFFIX))
    else {
        return false;
    };
    let Some((source, hash)) = middle.rsplit_once('.') else {
        return false;
    };
    // A declared source's name, or a repartition's (`<table>.r<n>`).
    let name = |n: &str| !n.is_empty() && !n.contains('.');
    let stage = |n: &str| {
        n.split_once(".r").is_some_and(|(table, i)| {
            name(table) && !i.is_empty() && i.chars().all(|c| c.is_ascii_digit())
        })
    };
    (name(source) || stage(source))
        && hash.len() == 8
        && hash.chars().all(|c| c.is_ascii_hexdigit())
}

/// Whether `topic` is a repartition topic of topology `name`:
/// `<name>.<table>.r<n>.<hash>.miroir-repartition`.
fn is_repartition_of(name: &str, topic: &str) -> bool {
    topic
        .strip_prefix(name)
        .and_then(|t| t.strip_prefix('.'))
        .and_then(|t| t.strip_suffix(TOPIC_SUFFIX))
        .is_some_and(|middle| middle.split('.').count() == 3)
}

/// Creates the repartition topics of `topology` that do not exist, compacted, each with as
/// many partitions as the topic it is co-partitioned with (in order: a repartition may take
/// an earlier one's count).
pub fn create_repartition_topics(
    config: &KafkaConfig,
    topology: &Topology,
) -> Result<(), KafkaError> {
    if topology.repartitions.is_empty() {
        return Ok(());
    }
    let consumer: rdkafka::consumer::BaseConsumer = config.client("admin").create()?;
    let mut counts: std::collections::HashMap<String, i32> =
        topics(consumer.client())?.into_iter().collect();
    for r in &topology.repartitions {
        let like = &topology.sources[r.partitions_like].topic;
        let partitions = *counts.get(like).ok_or_else(|| {
            KafkaError::Config(format!(
                "topic {like} does not exist: repartition {} takes its partition count",
                r.name
            ))
        })?;
        let topic = &topology.sources[r.source].topic;
        if !counts.contains_key(topic) {
            create_topics_with(
                config,
                &[(topic.as_str(), partitions)],
                &[
                    ("cleanup.policy", "compact"),
                    ("max.message.bytes", MAX_RECORD_BYTES),
                ],
            )?;
            counts.insert(topic.clone(), partitions);
        }
    }
    Ok(())
}

/// The topics of `topology`'s instances as the cluster has them now (see
/// [`internal_topics`]).
pub fn find(config: &KafkaConfig, topology: &Topology) -> Result<Vec<InternalTopic>, KafkaError> {
    let consumer: rdkafka::consumer::BaseConsumer = config.client("admin").create()?;
    let existing = topics(consumer.client())?;
    Ok(internal_topics(topology, &existing))
}

/// Deletes `topology`'s consumer group, then its existing internal `topics`. The group goes
/// first: while an instance runs, the broker refuses (the group is not empty) and nothing
/// is deleted.
pub fn delete(
    config: &KafkaConfig,
    topology: &Topology,
    topics: &[InternalTopic],
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = config.client("admin").create()?;
    let options = AdminOptions::new();
    for result in block_on(admin.delete_groups(&[topology.name.as_str()], &options))? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
            Err((group, RDKafkaErrorCode::NonEmptyGroup)) => {
                return Err(KafkaError::Config(format!(
                    "consumer group {group} still has members: stop every instance of the topology first"
                )))
            }
            Err((group, code)) => {
                return Err(KafkaError::Config(format!(
                    "cannot delete consumer group {group}: {code}"
                )))
            }
        }
    }
    let existing: Vec<&str> = topics
        .iter()
        .filter(|t| t.partitions.is_some())
        .map(|t| t.name.as_str())
        .collect();
    delete_topics(config, &existing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_changelogs_the_instances_topic_and_stale_changelogs() {
        let t = Topology::parse(
            "t.toml",
            "name = \"app\"\n[sources.users]\ntopic = \"user\"\nkey = \"id\"\ncolumns = { id = \"text\" }\n[sources.countries]\ntopic = \"country\"\nkey = \"id\"\nglobal = true\ncolumns = { id = \"text\" }\n[tables.x]\nquery = \"SELECT id FROM users\"\n",
        )
        .unwrap();
        let current = changelog::topic(&t, 0);
        let existing = vec![
            (current.clone(), 4),
            ("app.users.0123abcd.miroir-changelog".to_string(), 4),
            ("app.x.users.0123abcd.miroir-changelog".to_string(), 4),
            ("apps.users.0123abcd.miroir-changelog".to_string(), 4),
            ("user".to_string(), 4),
        ];
        let found = internal_topics(&t, &existing);
        let names: Vec<(&str, Option<i32>)> = found
            .iter()
            .map(|t| (t.name.as_str(), t.partitions))
            .collect();
        assert_eq!(
            names,
            [
                (current.as_str(), Some(4)),
                ("app.miroir-instances", None),
                ("app.users.0123abcd.miroir-changelog", Some(4)),
            ],
            "no changelog for the global source, none of other topologies"
        );
    }
}
