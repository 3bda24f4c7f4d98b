//! The command client (app side): sends commands and waits for their replies on a reply topic
//! dedicated to this instance.
//!
//! - At start the client removes reply topics of dead instances (older than a minute, with no
//!   live member in their consumer group), creates its own (`miroir.reply.<app>.<ms>.<uuid>`,
//!   one partition) and joins the topic's consumer group. It sends nothing before its reply
//!   partition is assigned: a reply written earlier would be missed.
//! - `send` puts the command on its topic, keyed by the entity key, with the correlation id,
//!   reply-to, deadline, principal, command type and schema version in headers, and waits for
//!   the reply with that correlation id until the timeout. It never re-sends.
//! - Replies arriving after their request timed out are counted and ignored.
//! - `shutdown` leaves the group and deletes the reply topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use miroir_engine::command::{Principal, Reply};
use miroir_engine::metrics::CommandMetrics;
use miroir_engine::topology::command::CommandSpec;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tracing::{debug, info, warn};

use super::wire::{header, now_ms, text_header, CommandHeaders, REPLY_PREFIX};
use crate::kafka::admin::{create_topic, delete_topics, topics};
use crate::kafka::{KafkaConfig, KafkaError};

/// Prefix of every reply topic.
/// A reply topic with no live consumer is removed once it is this old.
const ORPHAN_AGE: Duration = Duration::from_secs(60);
const ASSIGNMENT_LIMIT: Duration = Duration::from_secs(30);

/// Errors of [`CommandClient::send`].
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No reply came within the timeout. The command may still be applied later.
    #[error("no reply within {0:?} (the command may still be applied)")]
    Timeout(Duration),
    /// The command cannot be sent as given.
    #[error("invalid command: {0}")]
    Invalid(String),
    /// Kafka refused the command.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

/// A command ready to send.
#[derive(Clone, Debug)]
pub struct Command {
    /// The command topic (one per business operation).
    pub topic: String,
    /// The command type (`UpdateUserEmail`).
    pub command_type: String,
    /// The payload's schema version.
    pub schema_version: u32,
    /// The entity key (the message key: commands for one entity stay ordered).
    pub key: String,
    /// The JSON payload.
    pub payload: Vec<u8>,
    /// The caller's bearer token (a JWT), which proves who sends it.
    pub token: Option<String>,
    /// Who sends it, as claimed: believed only by a processor in the development setting
    /// that trusts principal headers. On a replay, the principal verified when the command
    /// was parked.
    pub principal: Principal,
    /// The command's id; a new one is drawn when `None`.
    pub command_id: Option<String>,
    /// Set by a replay: the entity version when the command was parked (-1 when unknown).
    pub parked_version: Option<i64>,
    /// Set by a replay: where the command was parked (`partition/offset` of the dead-letter
    /// topic); the processor records that the replay resolved it.
    pub parked_at: Option<String>,
}

impl Command {
    /// A command of `spec` with a JSON `payload` (its key field names the entity).
    pub fn new(
        spec: &CommandSpec,
        payload: &serde_json::Value,
        principal: Principal,
    ) -> Result<Command, SendError> {
        let key_name = spec.payload.key_name();
        let key = match payload.get(key_name) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v @ serde_json::Value::Number(_)) => v.to_string(),
            _ => {
                return Err(SendError::Invalid(format!(
                    "the payload needs the key field `{key_name}`"
                )))
            }
        };
        Ok(Command {
            topic: spec.topic.clone(),
            command_type: spec.operation.clone(),
            schema_version: spec.schema_version,
            key,
            payload: serde_json::to_vec(payload).expect("JSON serializes"),
            token: None,
            principal,
            command_id: None,
            parked_version: None,
            parked_at: None,
        })
    }

    /// The command with the caller's bearer token.
    pub fn with_token(mut self, token: impl Into<String>) -> Command {
        self.token = Some(token.into());
        self
    }
}

type Waiting = Arc<Mutex<HashMap<String, Sender<Reply>>>>;

/// A client that sends commands and receives their replies.
pub struct CommandClient {
    config: KafkaConfig,
    producer: FutureProducer,
    /// Times the wait for a command's delivery (the broker may be down: librdkafka would
    /// keep the record for its own 300 s).
    timer: tokio::runtime::Runtime,
    reply_topic: String,
    waiting: Waiting,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    metrics: CommandMetrics,
}

impl CommandClient {
    /// Starts a client for the application `app`: reaps orphaned reply topics, creates this
    /// instance's reply topic and waits until its partition is assigned.
    pub fn start(
        config: &KafkaConfig,
        app: &str,
        metrics: CommandMetrics,
    ) -> Result<CommandClient, KafkaError> {
        if app.is_empty()
            || !app
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(KafkaError::Config(format!(
                "bad application name `{app}`: use letters, digits, '-', '_' or '.'"
            )));
        }
        if let Err(e) = reap_orphans(config) {
            warn!(error = %e, "cannot reap orphaned reply topics");
        }
        let reply_topic = format!(
            "{REPLY_PREFIX}{app}.{}.{}",
            now_ms(),
            uuid::Uuid::new_v4().simple()
        );
        create_topic(config, &reply_topic, 1)?;
        let consumer: BaseConsumer = config
            .client("reply")
            .set("group.id", &reply_topic)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .create()?;
        consumer.subscribe(&[&reply_topic])?;
        let producer: FutureProducer = config
            .client("command-client")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "0")
            .set("enable.idempotence", "true")
            .set("allow.auto.create.topics", "false")
            .set("topic.metadata.propagation.max.ms", "5000")
            .create()?;
        let waiting: Waiting = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let assigned = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("miroir-replies".into())
            .spawn({
                let waiting = waiting.clone();
                let stop = stop.clone();
                let assigned = assigned.clone();
                let metrics = metrics.clone();
                move || receive(consumer, &waiting, &stop, &assigned, &metrics)
            })
            .map_err(|source| KafkaError::Thread {
                name: "reply",
                source,
            })?;
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|source| KafkaError::Thread {
                name: "command timer",
                source,
            })?;
        let mut client = CommandClient {
            config: config.clone(),
            producer,
            timer,
            reply_topic,
            waiting,
            stop,
            thread: Some(thread),
            metrics,
        };
        let started = Instant::now();
        while !assigned.load(Ordering::Acquire) {
            if started.elapsed() > ASSIGNMENT_LIMIT {
                client.close();
                return Err(KafkaError::Unavailable(format!(
                    "the reply partition was not assigned within {ASSIGNMENT_LIMIT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        info!(reply_topic = %client.reply_topic, "command client ready");
        Ok(client)
    }

    /// This instance's reply topic.
    pub fn reply_topic(&self) -> &str {
        &self.reply_topic
    }

    /// Sends `command` and waits up to `timeout` for its reply. Never re-sends: on a timeout
    /// the command may still be applied later, and its reply is then ignored.
    pub fn send(&self, command: &Command, timeout: Duration) -> Result<Reply, SendError> {
        let started = Instant::now();
        let correlation = uuid::Uuid::new_v4().simple().to_string();
        let command_id = command
            .command_id
            .clone()
            .unwrap_or_else(|| correlation.clone());
        let headers = CommandHeaders {
            command_id: Some(command_id.clone()),
            correlation_id: Some(correlation.clone()),
            reply_to: Some(self.reply_topic.clone()),
            command_type: Some(command.command_type.clone()),
            schema_version: Some(command.schema_version.to_string()),
            token: command.token.clone(),
            principal: Some(command.principal.id.clone()).filter(|id| !id.is_empty()),
            roles: Some(command.principal.roles.join(",")),
            deadline: Some((now_ms() + timeout.as_millis() as i64).to_string()),
            parked_version: command.parked_version,
            parked_at: command.parked_at.clone(),
        }
        .to_owned_headers();
        let (tx, rx) = bounded(1);
        self.waiting.lock().insert(correlation.clone(), tx);
        let record = FutureRecord::to(&command.topic)
            .key(command.key.as_bytes())
            .payload(command.payload.as_slice())
            .headers(headers);
        let sent = match self.producer.send_result(record) {
            Ok(delivery) => {
                // The delivery counts against the timeout: with the broker down, the caller
                // hears of it when the command's deadline passes (the record may still be
                // written later, and is then answered `expired`).
                let left = timeout.saturating_sub(started.elapsed());
                let delivered = async move { tokio::time::timeout(left, delivery).await };
                match self.timer.block_on(delivered) {
                    Ok(Ok(Ok(_))) => Ok(()),
                    Ok(Ok(Err((e, _)))) => Err(SendError::Kafka(e.into())),
                    Ok(Err(_)) => Err(SendError::Kafka(KafkaError::Unavailable(
                        "the producer dropped the command".into(),
                    ))),
                    Err(_) => Err(SendError::Timeout(timeout)),
                }
            }
            Err((e, _)) => Err(SendError::Kafka(e.into())),
        };
        if let Err(e) = sent {
            self.waiting.lock().remove(&correlation);
            if let SendError::Timeout(_) = e {
                let label = [command.command_type.as_str()];
                self.metrics.timeouts.with_label_values(&label).inc();
                warn!(topic = %command.topic, key = %command.key, command_id, "the command was not delivered within {timeout:?}");
            }
            return Err(e);
        }
        let remaining = timeout.saturating_sub(started.elapsed());
        let reply = rx.recv_timeout(remaining);
        self.waiting.lock().remove(&correlation);
        let label = [command.command_type.as_str()];
        match reply {
            Ok(reply) => {
                self.metrics
                    .round_trip_seconds
                    .with_label_values(&label)
                    .observe(started.elapsed().as_secs_f64());
                Ok(reply)
            }
            Err(_) => {
                self.metrics.timeouts.with_label_values(&label).inc();
                warn!(topic = %command.topic, key = %command.key, command_id, "no reply within {timeout:?}");
                Err(SendError::Timeout(timeout))
            }
        }
    }

    /// Leaves the reply topic's group and deletes the topic.
    pub fn shutdown(mut self) {
        self.close();
    }

    fn close(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            if let Err(e) = delete_topics(&self.config, &[&self.reply_topic]) {
                warn!(reply_topic = %self.reply_topic, error = %e, "cannot delete the reply topic; it will be reaped");
            }
        }
    }
}

impl Drop for CommandClient {
    fn drop(&mut self) {
        self.close();
    }
}

fn receive(
    consumer: BaseConsumer,
    waiting: &Waiting,
    stop: &AtomicBool,
    assigned: &AtomicBool,
    metrics: &CommandMetrics,
) {
    while !stop.load(Ordering::Acquire) {
        let polled = consumer.poll(Duration::from_millis(50));
        if !assigned.load(Ordering::Relaxed) && consumer.assignment().is_ok_and(|a| a.count() > 0) {
            assigned.store(true, Ordering::Release);
        }
        let m = match polled {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                warn!(error = %e, "reading replies");
                continue;
            }
            None => continue,
        };
        let Some(correlation) = text_header(&m, header::CORRELATION_ID) else {
            warn!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                "reply without a correlation id"
            );
            continue;
        };
        let reply = match m.payload().map(serde_json::from_slice::<Reply>) {
            Some(Ok(r)) => r,
            other => {
                warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), correlation,
                      error = ?other.map(|r| r.err()), "reply not understood");
                continue;
            }
        };
        match waiting.lock().remove(&correlation) {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => {
                metrics.late_replies.inc();
                debug!(
                    topic = m.topic(),
                    offset = m.offset(),
                    correlation,
                    outcome = reply.outcome(),
                    "reply to a request that timed out: ignored"
                );
            }
        }
    }
    consumer.unsubscribe();
}

/// Deletes reply topics older than a minute whose consumer group has no live member.
pub fn reap_orphans(config: &KafkaConfig) -> Result<Vec<String>, KafkaError> {
    let consumer: BaseConsumer = config.client("admin").create()?;
    let now = now_ms();
    let mut orphans = Vec::new();
    for (topic, _) in topics(consumer.client())? {
        let Some(rest) = topic.strip_prefix(REPLY_PREFIX) else {
            continue;
        };
        let created = rest
            .rsplit('.')
            .nth(1)
            .and_then(|ms| ms.parse::<i64>().ok());
        let old = created.is_some_and(|c| now - c > ORPHAN_AGE.as_millis() as i64);
        if !old {
            continue;
        }
        let groups = consumer.fetch_group_list(Some(&topic), Duration::from_secs(10))?;
        let alive = groups.groups().iter().any(|g| !g.members().is_empty());
        if !alive {
            orphans.push(topic);
        }
    }
    if !orphans.is_empty() {
        let names: Vec<&str> = orphans.iter().map(String::as_str).collect();
        delete_topics(config, &names)?;
        info!(topics = ?orphans, "reaped reply topics of stopped instances");
    }
    Ok(orphans)
}
