//! Topic administration: create, delete and list topics.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::client::{Client, ClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaConfig, KafkaError};

const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates `topic` with `partitions` partitions if it does not exist, with the cluster's
/// default replication factor (see [`create_topics_with`]).
pub fn create_topic(config: &KafkaConfig, topic: &str, partitions: i32) -> Result<(), KafkaError> {
    create_topic_with(config, topic, partitions, &[])
}

/// Creates `topic` with `partitions` partitions and topic-level `settings`
/// (`cleanup.policy=compact`, ...) if it does not exist.
pub fn create_topic_with(
    config: &KafkaConfig,
    topic: &str,
    partitions: i32,
    settings: &[(&str, &str)],
) -> Result<(), KafkaError> {
    create_topics_with(config, &[(topic, partitions)], settings)
}

/// Creates each of `topics` (name, partitions) that does not exist, with topic-level
/// `settings`, in one request. The replication factor is the cluster's
/// (`default.replication.factor`, asked for with -1: Kafka 2.4 or later), so that internal
/// topics are as durable as the cluster's own choice, not one copy whatever the cluster.
pub fn create_topics_with(
    config: &KafkaConfig,
    topics: &[(&str, i32)],
    settings: &[(&str, &str)],
) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = config.client("admin").create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(topic, partitions)| {
            settings.iter().fold(
                NewTopic::new(topic, *partitions, TopicReplication::Fixed(-1)),
                |new, (k, v)| new.set(k, v),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let results = block_on(admin.create_topics(&new, &options))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::Topic {
                    action: "create",
                    topic,
                    code,
                })
            }
        }
    }
    Ok(())
}

/// Deletes `topics`; topics already gone are not an error.
pub fn delete_topics(config: &KafkaConfig, topics: &[&str]) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = config.client("admin").create()?;
    let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    for r in block_on(admin.delete_topics(topics, &options))? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::Topic {
                    action: "delete",
                    topic,
                    code,
                })
            }
        }
    }
    Ok(())
}

/// The topics of the cluster with their partition counts (internal topics excluded).
pub fn topics<C: ClientContext>(client: &Client<C>) -> Result<Vec<(String, i32)>, KafkaError> {
    let metadata = client.fetch_metadata(None, ADMIN_TIMEOUT)?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.name().starts_with("__"))
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// The partition count of `topic`, or `None` when it does not exist.
pub fn partition_count(config: &KafkaConfig, topic: &str) -> Result<Option<i32>, KafkaError> {
    let consumer: BaseConsumer = config.client("admin").create()?;
    Ok(topics(consumer.client())?
        .into_iter()
        .find(|(t, _)| t == topic)
        .map(|(_, n)| n))
}

/// Runs an admin future to completion on the calling thread.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    futures_executor::block_on(f)
}
