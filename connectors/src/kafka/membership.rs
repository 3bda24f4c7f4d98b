//! How the instances of one topology find each other: through a compacted topic,
//! `<topology>.miroir-instances` (one partition), and nothing else.
//!
//! Each instance writes its record (its id, the address other instances reach its HTTP API at,
//! the source partitions it owns) when its partitions change and every
//! [`HEARTBEAT`], and reads everyone's. A record not renewed within [`EXPIRY`] is an instance
//! gone (killed, or cut off); a clean stop deletes its record. Kafka's consumer group decides
//! who owns what; this only tells everyone, so a query reaching the wrong instance goes to the
//! owner of its key's partition.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rdkafka::message::Message;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::admin::create_topic_with;
use super::output::Publisher;
use super::tail::Tail;
use super::{KafkaConfig, KafkaError};
use crate::commands::wire::now_ms;

/// How often an instance renews its record.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a record lives without being renewed.
pub const EXPIRY: Duration = Duration::from_secs(10);
/// How often the membership thread looks for changes (its own partitions, the others' records).
const TICK: Duration = Duration::from_millis(100);

/// The name of the membership topic of topology `topology`.
pub fn membership_topic(topology: &str) -> String {
    format!("{topology}.miroir-instances")
}

/// One instance, as its record says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id (`--instance-id`).
    pub instance: String,
    /// Where other instances reach its HTTP API (`host:port`), if it serves one.
    pub advertise: Option<String>,
    /// The source partitions it owns, by topic.
    pub partitions: BTreeMap<String, Vec<u32>>,
    /// Of those, the ones it is still reading up to where they ended when they came to it.
    #[serde(default)]
    pub restoring: BTreeMap<String, Vec<u32>>,
    /// Records not yet applied across its partitions, when known.
    #[serde(default)]
    pub lag: Option<i64>,
    /// Changelog records it still reads before partitions it restores from their changelogs
    /// open; `None` while it restores none.
    #[serde(default)]
    pub restore_remaining: Option<i64>,
    /// The source partitions it keeps a standby replica of, by topic.
    #[serde(default)]
    pub standby: BTreeMap<String, Vec<u32>>,
    /// Changelog records its standby replicas have not applied yet, when it has any.
    #[serde(default)]
    pub standby_lag: Option<i64>,
    /// When it wrote the record (ms since the epoch).
    pub at_ms: i64,
}

/// What an instance reports of its partitions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    /// The source partitions it owns, by topic.
    pub partitions: BTreeMap<String, Vec<u32>>,
    /// Of those, the ones still restoring.
    pub restoring: BTreeMap<String, Vec<u32>>,
    /// Records not yet applied across its partitions, when known.
    pub lag: Option<i64>,
    /// Changelog records still to read by its restores, while there are any.
    pub restore_remaining: Option<i64>,
    /// The source partitions it keeps a standby replica of, by topic.
    pub standby: BTreeMap<String, Vec<u32>>,
    /// Changelog records its standby replicas have not applied yet, when it has any.
    pub standby_lag: Option<i64>,
}

impl Ownership {
    /// Whether `other` says something else of the partitions (the lags and the restore's
    /// progress aside, which the heartbeat carries).
    fn moved(&self, other: &Ownership) -> bool {
        self.partitions != other.partitions
            || self.restoring != other.restoring
            || self.standby != other.standby
    }
}

impl Member {
    fn owns(&self, topic: &str, partition: u32) -> bool {
        self.partitions
            .get(topic)
            .is_some_and(|ps| ps.contains(&partition))
    }
}

/// The records read so far, by instance, with when each was read.
type Members = HashMap<String, (Member, Instant)>;

/// This instance's membership: its record kept up to date, and everyone's followed.
pub struct Membership {
    me: String,
    members: Arc<RwLock<Members>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Membership {
    /// Joins the membership of `topology` as `instance`, reachable at `advertise`; `owned`
    /// says which source partitions this instance owns now.
    pub fn start(
        config: &KafkaConfig,
        topology: &str,
        instance: &str,
        advertise: Option<String>,
        owned: impl Fn() -> Ownership + Send + 'static,
    ) -> Result<Membership, KafkaError> {
        let topic = membership_topic(topology);
        create_topic_with(config, &topic, 1, &[("cleanup.policy", "compact")])?;
        let tail = Tail::open(config, &topic)?;
        let publisher = Publisher::new(config)?;
        let members = Arc::new(RwLock::new(Members::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut keeper = Keeper {
            topic,
            me: instance.to_string(),
            advertise,
            tail,
            publisher,
            members: members.clone(),
            written: None,
        };
        let thread = std::thread::Builder::new()
            .name("miroir-membership".into())
            .spawn({
                let stop = stop.clone();
                move || keeper.run(&stop, owned)
            })
            .map_err(|source| KafkaError::Thread {
                name: "membership",
                source,
            })?;
        Ok(Membership {
            me: instance.to_string(),
            members,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// This instance's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The live instance that owns `partition` of `topic`: the most recent claim, when a
    /// rebalance leaves two.
    pub fn owner(&self, topic: &str, partition: u32) -> Option<Member> {
        self.live()
            .into_iter()
            .filter(|m| m.owns(topic, partition))
            .max_by_key(|m| m.at_ms)
    }

    /// Every live instance, by id.
    pub fn live(&self) -> Vec<Member> {
        let mut live: Vec<Member> = self
            .members
            .read()
            .values()
            .filter(|(_, read)| read.elapsed() < EXPIRY)
            .map(|(m, _)| m.clone())
            .collect();
        live.sort_by(|a, b| a.instance.cmp(&b.instance));
        live
    }

    /// Deletes this instance's record and stops following the others'.
    pub fn leave(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.leave();
    }
}

/// The membership thread's state.
struct Keeper {
    topic: String,
    me: String,
    advertise: Option<String>,
    tail: Tail,
    publisher: Publisher,
    members: Arc<RwLock<Members>>,
    /// What was last written, and when.
    written: Option<(Ownership, Instant)>,
}

impl Keeper {
    fn run(&mut self, stop: &AtomicBool, owned: impl Fn() -> Ownership) {
        info!(topic = %self.topic, instance = %self.me, advertise = ?self.advertise, "joined the instances of the topology");
        while !stop.load(Ordering::Acquire) {
            self.read();
            let now = owned();
            let due = self
                .written
                .as_ref()
                .is_none_or(|(last, at)| last.moved(&now) || at.elapsed() >= HEARTBEAT);
            if due {
                self.write(now);
            }
            std::thread::sleep(TICK);
        }
        if let Err(e) = self
            .publisher
            .send(&self.topic, self.me.as_bytes(), None)
            .and_then(|()| self.publisher.flush_within(Duration::from_secs(5)))
        {
            warn!(topic = %self.topic, instance = %self.me, error = %e, "cannot delete this instance's record; it expires");
        }
    }

    /// Takes the records written since the last read.
    fn read(&mut self) {
        let members = &self.members;
        let topic = &self.topic;
        let _ = self.tail.drain(|m| {
            let Some(key) = m.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
                return Ok(());
            };
            match m.payload().map(serde_json::from_slice::<Member>) {
                None => {
                    members.write().remove(&key);
                }
                Some(Ok(member)) => {
                    members.write().insert(key, (member, Instant::now()));
                }
                Some(Err(e)) => {
                    warn!(%topic, partition = m.partition(), offset = m.offset(), key, error = %e, "instance record not understood")
                }
            }
            Ok(())
        });
    }

    fn write(&mut self, ownership: Ownership) {
        let member = Member {
            instance: self.me.clone(),
            advertise: self.advertise.clone(),
            partitions: ownership.partitions.clone(),
            restoring: ownership.restoring.clone(),
            lag: ownership.lag,
            restore_remaining: ownership.restore_remaining,
            standby: ownership.standby.clone(),
            standby_lag: ownership.standby_lag,
            at_ms: now_ms(),
        };
        let record = serde_json::to_vec(&member).expect("records serialize");
        match self
            .publisher
            .send(&self.topic, self.me.as_bytes(), Some(&record))
        {
            Ok(()) => {
                debug!(topic = %self.topic, instance = %self.me, partitions = ?ownership.partitions, "instance record written");
                self.written = Some((ownership, Instant::now()));
            }
            Err(e) => {
                warn!(topic = %self.topic, instance = %self.me, error = %e, "cannot write this instance's record")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_owns_the_partitions_its_record_lists() {
        let m = Member {
            instance: "a".into(),
            advertise: Some("127.0.0.1:8080".into()),
            partitions: BTreeMap::from([("user".to_string(), vec![0, 2])]),
            restoring: BTreeMap::from([("user".to_string(), vec![2])]),
            lag: Some(3),
            restore_remaining: Some(10),
            standby: BTreeMap::from([("user".to_string(), vec![1])]),
            standby_lag: Some(0),
            at_ms: 1,
        };
        assert!(m.owns("user", 2));
        assert!(!m.owns("user", 1));
        assert!(!m.owns("department", 0));
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(serde_json::from_slice::<Member>(&json).unwrap(), m);
    }
}
